"""What survives deployment (engine/deploy.py, `generate --deploy`) on a tiny Llama and a tiny init run: the merged
model reloads with plain transformers and gives (b)'s perplexity; the adapter saved and loaded with peft, and merged
into the dequantized weights, give (a)'s."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from quailora_app.config import DataConfig, GenerateConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.engine.deploy import (
    DEPLOY_VARIANTS,
    deploy_labels,
    kept_shares,
    merged_model,
    save_merged,
)
from quailora_app.engine.evaluation.evaluate import perplexity
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.events import RunFinished
from quailora_app.flows.generate import generate_table, run_generate
from quailora_app.flows.init import run_init
from quailora_app.sources.data import load_splits
from quailora_app.sources.models import ModelSource

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread

DATA = dict(seq_len=32, calib_samples=8, eval_tokens=256)


@pytest.fixture(scope="module")
def init_run(tiny_model_dir, text_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("init")
    cfg = InitConfig(ModelConfig(str(tiny_model_dir), "cpu"), DataConfig(str(text_file), **DATA), QuantConfig(),
                     LoraSettings(rank=4, alpha=8.0), methods=("closed_form",), baselines=False)
    events = list(run_init(cfg, run_dir=run_dir))
    assert events[-1].kind == "finished", events[-1]
    return run_dir


@pytest.fixture(scope="module")
def deployed(init_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    cfg = GenerateConfig(from_run=str(init_run), new_tokens=4, documents=0, deploy=True, device="cpu")
    events = list(run_generate(cfg, run_dir=out))
    assert isinstance(events[-1], RunFinished), events[-1]
    return out, events[-1].report


@pytest.fixture(scope="module")
def eval_ids(tiny_model_dir, text_file):
    """The held-out windows the deployment perplexities are measured on (the run's data cut, all 8 windows)."""
    return load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).eval


def test_every_way_of_shipping_is_measured(deployed, init_run):
    out, report = deployed
    deploy = report["deploy"]
    assert deploy["adapter"] == "closed_form" and deploy["eval_tokens"] == 256 and deploy["merge_dtype"] == "float32"
    assert deploy["order"] == list(DEPLOY_VARIANTS)
    assert set(deploy["perplexity"]) == {"full", "plain_4bit", *DEPLOY_VARIANTS}
    assert all(p > 1 for p in deploy["perplexity"].values())
    assert deploy["labels"] == deploy_labels(QuantConfig(), torch.float32)
    assert deploy["kept"] == kept_shares(deploy["perplexity"], deploy["perplexity"]["plain_4bit"])
    assert deploy["reading"] and deploy["explanation"].startswith("Quantizing again")
    assert "what survives deployment" in generate_table(report)
    # the adapter beside the merged models is the run's, file for file
    copy = out / "deploy" / "closed_form-adapter"
    assert deploy["adapter_folder"] == str(copy)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (copy / name).read_bytes() == (init_run / "adapters" / "closed_form" / name).read_bytes()


def test_the_merged_model_reloads_with_plain_transformers(deployed, eval_ids):
    """(b) and (e) are plain transformers folders (config, safetensors, tokenizer; no peft files), and reloaded with
    AutoModelForCausalLM.from_pretrained they give the perplexities the run measured on the merged models."""
    _, report = deployed
    deploy = report["deploy"]
    for name, key in (("merged", "merged_folder"), ("merged_dequantized", "merged_dequantized_folder")):
        folder = deploy[key]
        files = {p.name for p in Path(folder).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "adapter_config.json" not in files
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert not hasattr(model, "peft_config")
        assert perplexity(model, eval_ids) == deploy["perplexity"][name], name


def test_apart_and_merged_into_q_are_the_model_as_trained(deployed):
    ppl = deployed[1]["deploy"]["perplexity"]
    assert ppl["adapter_reloaded"] == pytest.approx(ppl["adapter_4bit"], rel=1e-6)  # (d) == (a)
    assert ppl["merged_dequantized"] == pytest.approx(ppl["adapter_4bit"], rel=1e-4)  # (e) == (a) up to float32
    assert ppl["adapter_4bit"] != ppl["plain_4bit"]  # the adapter does something
    # quantizing again is not the merged model: (c) differs from (b), (f) from (e)
    assert ppl["merged_requantized"] != pytest.approx(ppl["merged"], rel=1e-4)
    assert ppl["dequantized_requantized"] != pytest.approx(ppl["merged_dequantized"], rel=1e-6)


def test_what_quantizing_again_keeps_is_reported(deployed, capsys):
    """Measured, not asserted (a random tiny model's perplexities sit near its vocabulary size, and its full
    precision is not better than 4-bit): how far (c) and (f) are from plain 4-bit, next to (a)."""
    ppl = deployed[1]["deploy"]["perplexity"]
    with capsys.disabled():
        print("\ntiny-model deployment perplexities: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    reading = deployed[1]["deploy"]["reading"]
    assert all(f"({letter}) " in reading for letter in "bcdef")


def test_merging_in_bfloat16_saves_and_reloads_the_same_model(init_run, tiny_model_dir, tmp_path, eval_ids):
    source = ModelSource("tiny", tiny_model_dir)
    merged = merged_model(source, init_run / "adapters" / "closed_form", torch.device("cpu"), torch.bfloat16)
    ppl = perplexity(merged, eval_ids)
    folder = save_merged(merged, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.use_cache
    assert perplexity(reloaded, eval_ids) == ppl
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_adapter_loads_with_plain_peft_onto_the_stock_base(deployed, tiny_model_dir):
    base = load_quantized(ModelSource("tiny", tiny_model_dir), QuantConfig(), torch.device("cpu"), torch.float32)
    model = PeftModel.from_pretrained(base, deployed[1]["deploy"]["adapter_folder"])
    assert any(layer.weight.abs().max() > 0 for name, layer in model.named_modules()
               if name.endswith("lora_B.default"))


def test_kept_shares():
    ppl = {"adapter_4bit": 10.0, "merged": 9.0, "merged_requantized": 11.5, "adapter_reloaded": 10.0,
           "merged_dequantized": 10.0, "dequantized_requantized": 12.0}
    kept = kept_shares(ppl, 12.0)
    assert kept == {"adapter_4bit": 1.0, "merged": 1.5, "merged_requantized": 0.25, "adapter_reloaded": 1.0,
                    "merged_dequantized": 1.0, "dequantized_requantized": 0.0}
    assert set(kept_shares(ppl, 9.0).values()) == {None}  # the adapter gains nothing: no share to keep


def test_the_deploy_figure_draws_every_way(deployed):
    from quailora_app.plots.agreement import deploy_figure  # the figure: this test only

    ppl = deployed[1]["deploy"]["perplexity"]
    bars, *lines = deploy_figure(deployed[1]).data
    assert list(bars.x) == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    assert list(bars.y) == [ppl[n] for n in DEPLOY_VARIANTS]
    assert [line.y[0] for line in lines] == [ppl["full"], ppl["plain_4bit"]]
