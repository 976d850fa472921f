"""quailora_app.flows.train: several fine-tuning arms side by side on a tiny Llama, as one event stream."""
from __future__ import annotations

import json
import math

import pytest
import torch

from quailora_app import cli
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig, TrainConfig
from quailora_app.errors import ConfigError
from quailora_app.flows.init import run_init
from quailora_app.flows.train import run_train
from quailora_app.runs import RunFolder

ARMS4 = ("qlora4", "quailora4", "closed4", "svd4")
INIT_NAME = {"qlora4": "qlora", "quailora4": "quailora", "closed4": "closed_form", "svd4": "svd"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread


@pytest.fixture(scope="module")
def text_file(train_text_file):
    """The fine-tuning tests' text (conftest's train_text_file)."""
    return train_text_file


def settings(model_dir, text_file):
    return (ModelConfig(str(model_dir), "cpu"),
            DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=256),
            QuantConfig(), LoraSettings(rank=4, alpha=8.0))


TRAIN_KW = dict(steps=4, batch_size=2, eval_every=2, learning_rate=1e-2)
CLI_ARGS = ["--device", "cpu", "--seq-len", "32", "--calib-samples", "8", "--eval-tokens", "256", "--rank", "4",
            "--alpha", "8", "--steps", "4", "--batch-size", "2", "--eval-every", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def run4(tiny_model_dir, text_file, tmp_path_factory):
    """The four 4-bit arms plus qlora8, four steps, interleaved: (events, run_dir)."""
    run_dir = tmp_path_factory.mktemp("train4")
    cfg = TrainConfig(*settings(tiny_model_dir, text_file), arms=(*ARMS4, "qlora8"), **TRAIN_KW)
    events = list(run_train(cfg, run_dir=run_dir))
    assert events[-1].kind == "finished", events[-1]
    return events, run_dir


def of_kind(events, kind):
    return [e for e in events if e.kind == kind]


def test_arms_see_identical_batches(run4):
    events, _ = run4
    steps = of_kind(events, "train_step")
    by_step: dict[int, set] = {}
    for e in steps:
        by_step.setdefault(e.step, set()).add(e.batch_hash)
    assert sorted(by_step) == [1, 2, 3, 4]
    assert all(len(hashes) == 1 for hashes in by_step.values())  # the same tokens in every arm
    assert len({h for hashes in by_step.values() for h in hashes}) == 4  # and a new batch every step
    # interleaved: one step of each arm in turn
    assert [e.arm for e in steps[:5]] == [*ARMS4, "qlora8"] and [e.step for e in steps[:5]] == [1] * 5


def test_step0_perplexity_matches_the_init_engine(run4, tiny_model_dir, text_file, tmp_path):
    events, _ = run4
    model, data, quant, lora = settings(tiny_model_dir, text_file)
    init = list(run_init(InitConfig(model, data, quant, lora, methods=("qlora", "svd", "quailora", "closed_form")),
                         run_dir=tmp_path))
    report = init[-1].report
    step0 = {e.arm: e.val_perplexity for e in of_kind(events, "eval") if e.step == 0}
    for arm, method in INIT_NAME.items():
        assert step0[arm] == pytest.approx(report["perplexity"][method], rel=1e-4), arm
    refs = {e.name: e.value for e in of_kind(events, "metric")}
    assert refs["full"] == pytest.approx(report["perplexity"]["full"], rel=1e-4)
    assert refs["int8"] == pytest.approx(report["perplexity"]["int8"], rel=1e-4)
    assert step0["qlora8"] == refs["int8"]  # reused: see the next test
    # references come before any arm's first evaluation, so faces can draw them as lines from the start
    kinds = [e.kind for e in events]
    assert kinds.index("eval") > max(i for i, k in enumerate(kinds) if k == "metric")


@pytest.mark.parametrize("base", ["8bit", "full"])
def test_default_init_leaves_the_base_output_unchanged(base, tiny_model_dir, text_file):
    """Why a default-init arm's step-0 perplexity can reuse its base's reference perplexity: B = 0 adds exactly 0."""
    from quailora_app.engine.adapters import attach_lora
    from quailora_app.engine.calibration.plan import target_paths
    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.engine.quantization.bnb import load_8bit
    from quailora_app.sources.models import ModelSource, load_full_precision

    source, cpu = ModelSource("tiny", tiny_model_dir), torch.device("cpu")
    model = load_8bit(source, cpu) if base == "8bit" else load_full_precision(source, cpu)
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    before = perplexity(model, ids)
    lora = LoraSettings(rank=4, alpha=8.0)
    peft_model = attach_lora(model, lora, target_paths(model, lora))
    assert perplexity(peft_model, ids) == before


def test_training_lowers_val_perplexity(run4):
    events, run_dir = run4
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "finished" and report["kind"] == "train"
    for arm in (*ARMS4, "qlora8"):
        evals = report["arms"][arm]["evals"]
        assert [s for s, _ in evals] == [0, 2, 4]
        assert evals[-1][1] < evals[0][1] * 0.97, (arm, evals)
        assert report["arms"][arm]["final_perplexity"] == evals[-1][1]
        assert report["arms"][arm]["steps_done"] == 4
    losses = [e.train_loss for e in of_kind(events, "train_step") if e.arm == "quailora4"]
    assert all(math.isfinite(x) for x in losses)
    # the report's figures: gap closed against qlora8 is 0 for qlora4 and 1 for qlora8 by definition
    assert report["gap_closed"]["qlora4"] == 0.0 and report["gap_closed"]["qlora8"] == pytest.approx(1.0)
    assert report["gap_closed_full"]["quailora4"] is None  # no lora16 arm, no post-fine-tuning full target
    finished = of_kind(events, "arm_finished")
    assert [e.arm for e in finished] == [*ARMS4, "qlora8"] and not any(e.stopped for e in finished)


def test_events_jsonl_records_the_stream(run4):
    events, run_dir = run4
    assert RunFolder(run_dir).read_events() == [json.loads(json.dumps(e.to_dict())) for e in events]


def _signature(records: list[dict]) -> list[tuple]:
    """What must not depend on the consumer: order, kinds, arms, steps and the computed values."""
    out = []
    for r in records:
        values = tuple(round(r[k], 9)
                       for k in ("train_loss", "learning_rate", "val_perplexity", "value", "final_perplexity")
                       if r.get(k) is not None)
        out.append((r["kind"], r.get("arm"), r.get("step"), r.get("batch_hash"), r.get("name"), values))
    return out


def test_cli_stream_equals_the_library_stream(run4, tiny_model_dir, text_file, tmp_path, capsys):
    events, _ = run4
    out = tmp_path / "cli-run"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), *CLI_ARGS,
                     "--arms", *ARMS4, "qlora8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "quailora4" in printed and "run folder" in printed
    assert _signature(RunFolder(out).read_events()) == _signature([e.to_dict() for e in events])


def test_stop_mid_run_saves_loadable_adapters(tiny_model_dir, text_file, tmp_path):
    from peft import PeftModel

    from quailora_app.engine.quantization.bnb import load_8bit
    from quailora_app.sources.models import ModelSource

    cfg = TrainConfig(*settings(tiny_model_dir, text_file), arms=("qlora4", "qlora8"), **{**TRAIN_KW, "steps": 6})
    stop = {"now": False}
    events = []
    for event in run_train(cfg, should_stop=lambda: stop["now"], run_dir=tmp_path):
        events.append(event)
        if event.kind == "train_step":
            stop["now"] = True  # asked during step 1: every arm still finishes step 1, then ends
    assert events[-1].kind == "finished" and events[-1].report["status"] == "stopped"
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(events) and all(json.loads(line) for line in lines)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "stopped"
    finished = of_kind(events, "arm_finished")
    assert [(e.arm, e.steps_done, e.stopped) for e in finished] == [("qlora4", 1, True), ("qlora8", 1, True)]
    assert all(report["arms"][a]["status"] == "stopped" for a in ("qlora4", "qlora8"))

    base = load_8bit(ModelSource("tiny", tiny_model_dir), torch.device("cpu"))
    model = PeftModel.from_pretrained(base, tmp_path / "adapters" / "qlora8")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # default-init arms start from the same random A; after one step A is unchanged (B = 0 gives it no gradient)
    from safetensors.torch import load_file

    a4 = load_file(tmp_path / "adapters" / "qlora4" / "adapter_model.safetensors")
    a8 = load_file(tmp_path / "adapters" / "qlora8" / "adapter_model.safetensors")
    keys = [k for k in a4 if "lora_A" in k]
    assert keys and all(torch.equal(a4[k], a8[k]) for k in keys)
    assert any(not torch.equal(a4[k], a8[k]) for k in a4 if "lora_B" in k)  # B trained on different bases


def test_sequential_schedule_gives_the_same_figures(run4, tiny_model_dir, text_file, tmp_path):
    events, _ = run4
    cfg = TrainConfig(*settings(tiny_model_dir, text_file), arms=("qlora4", "qlora8"), schedule="sequential",
                      **TRAIN_KW)
    seq = list(run_train(cfg, run_dir=tmp_path))
    assert seq[-1].report["schedule"] == "sequential"
    evals = lambda evs, arm: [(e.step, round(e.val_perplexity, 6)) for e in evs if e.kind == "eval" and e.arm == arm]  # noqa: E731
    for arm in ("qlora4", "qlora8"):
        assert evals(seq, arm) == evals(events, arm)
    arms_in_order = [e.arm for e in seq if e.kind == "train_step"]
    assert arms_in_order == ["qlora4"] * 4 + ["qlora8"] * 4


def test_config_checks():
    with pytest.raises(ConfigError, match="unknown arm"):
        TrainConfig(arms=("qlora4", "qlora3"))
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="parallel")
    cfg = TrainConfig(steps=100, warmup_ratio=0.03, lr_schedule="linear")
    assert cfg.warmup_steps == 3
    assert [round(cfg.lr_at(k) / cfg.learning_rate, 4) for k in (1, 3, 4, 100)] == [0.25, 0.75, 1.0, round(1 / 97, 4)]
