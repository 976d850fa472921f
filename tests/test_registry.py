"""Adding an initialization method is registering one function: a toy method appears in the CLI choices, the
form's choices, a real init run's report and the per-layer plot with no edit elsewhere. The same for an arm."""
from __future__ import annotations

import argparse

import pytest
import torch

from quailora_app.app.forms import arm_choices, method_choices
from quailora_app.cli import build_parser
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig, TrainConfig
from quailora_app.engine.arms import ArmSpec, register_arm, unregister_arm
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.registry import (
    get_method,
    method_names,
    per_layer_names,
    register_method,
    unregister_method,
)
from quailora_app.engine.quantization.bnb import load_4bit
from quailora_app.errors import ConfigError
from quailora_app.events import RunFinished
from quailora_app.flows.init import run_init
from quailora_app.plots import figures as F
from quailora_app.plots import teaching as TF
from quailora_app.sources.models import ModelSource
from quailora_app.teaching.layer_views import corrections, inside_layer
from quailora_app.teaching.rank_sweep import rank_sweep
from quailora_app.teaching.snapshot import layer_snapshots

TOY = "half_svd"


@pytest.fixture
def half_svd():
    """A toy method, registered with one function for the test's duration."""

    @register_method(TOY, label="4-bit + half the SVD correction", short="half SVD", colour="#8c564b",
                     help="half of the svd correction (a test method)")
    def half(E, spec, rank, **options):
        P, Rt = init_math.svd_correction(E, rank)
        return P / 2, Rt

    yield get_method(TOY)
    unregister_method(TOY)


@pytest.fixture
def toy_arm(half_svd):
    register_arm(ArmSpec("half4", "4bit", TOY, "4-bit + half-SVD init", "4-bit half SVD", "#e377c2",
                         "4-bit base, half the SVD correction as init"))
    yield "half4"
    unregister_arm("half4")


def cli_choices(command: str, dest: str) -> tuple[str, ...]:
    """The choices of flag `dest` of subcommand `command`, as a freshly built parser has them."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return tuple(next(a for a in sub.choices[command]._actions if a.dest == dest).choices)


def test_a_registered_method_is_offered_everywhere(half_svd):
    assert TOY in method_names() and TOY in per_layer_names()
    assert TOY in cli_choices("init", "methods")
    assert ("half SVD", TOY) in method_choices()
    assert InitConfig(methods=(TOY,)).methods == ("qlora", TOY)
    assert TOY not in InitConfig().methods  # a new method is not a default unless it says so


def test_unregistered_names_are_refused_early(half_svd):
    unregister_method(TOY)
    try:
        assert TOY not in cli_choices("init", "methods")
        with pytest.raises(ConfigError, match="unknown method"):
            InitConfig(methods=(TOY,))
    finally:
        register_method(TOY, label=half_svd.label, colour=half_svd.colour, help=half_svd.help)(half_svd.correct)
    with pytest.raises(ValueError, match="already registered"):
        register_method(TOY, label="again", colour="#000", help="twice")(half_svd.correct)


def test_a_registered_arm_is_offered_everywhere(toy_arm):
    assert toy_arm in cli_choices("train", "arms")
    assert ("4-bit half SVD", toy_arm) in arm_choices()
    assert TrainConfig(arms=(toy_arm,)).arms == (toy_arm,)
    assert F.label(toy_arm) == "4-bit half SVD" and F.color(toy_arm) == "#e377c2"
    with pytest.raises(ValueError, match="not computed per layer"):
        ArmSpec("loftq4", "4bit", "loftq", "x", "x", "#000", "x")


def test_a_registered_method_runs_in_init_and_is_plotted(half_svd, tiny_model_dir, text_file, tmp_path):
    torch.manual_seed(0)
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), seq_len=32, calib_samples=8,
                                                                  eval_tokens=256),
                     lora=LoraSettings(rank=4), methods=("svd", TOY), baselines=False, out=str(tmp_path / "run"))
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    report = events[-1].report
    assert report["methods"] == ["qlora", "svd", TOY]
    assert TOY in report["perplexity"] and TOY in report["seconds"]
    assert report["layers"]
    for row in report["layers"]:
        # half of the best weight-space fit C: ||E - C/2|| >= ||E - C||, and it still removes something
        assert row["weight_error"]["svd"] - 1e-9 <= row["weight_error"][TOY] < 1.0
    assert (tmp_path / "run" / "adapters" / TOY / "adapter_config.json").is_file()
    fig = F.layer_error_figure(report)
    mine = [t for t in fig.data if t.name == half_svd.label]
    assert mine and all(t.line.color == half_svd.colour for t in mine)
    assert F.label(TOY) == half_svd.label and F.short_label(TOY) == "half SVD"


def test_a_registered_method_is_in_the_teaching_views(half_svd, tiny_model_dir):
    cpu = torch.device("cpu")
    model = load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig(), cpu, torch.float32)
    layer = "model.layers.0.mlp.down_proj"
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    snap = layer_snapshots(model, Checkpoint(tiny_model_dir), ids, [layer], cpu)[layer]
    corr = corrections(snap, 4)
    assert torch.allclose(corr[TOY].C, corr["svd"].C / 2)
    inside = inside_layer(snap, 4, precomputed=corr)
    assert inside.weight_error["svd"] <= inside.weight_error[TOY] < 1.0
    sweep = rank_sweep([snap], ranks=(1, 2, 4))
    assert len(sweep.calibrated_error[TOY]) == 3
    legends = [t.name for t in TF.rank_sweep_figure(sweep).data]
    assert TF.label(TOY) == "half SVD" and TF.label(TOY) in legends


def test_every_method_has_its_own_colour():
    """One colour per method in every figure: two methods drawn in the same colour cannot be told apart."""
    colours = {name: get_method(name).colour.lower() for name in method_names()}
    assert len(set(colours.values())) == len(colours), colours
