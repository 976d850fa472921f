"""The init flow end to end on a tiny model, and its bad-input answers through the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.events import LayerResult, Progress, RunFailed, RunFinished
from quailora_app.flows.init import run_init

REPORT_KEYS = {"model", "dataset", "device", "rank", "alpha", "methods", "perplexity", "gap_closed", "seconds",
               "peak_memory_bytes", "layers"}
ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(model_dir, text_file, out, **kw) -> InitConfig:
    return InitConfig(ModelConfig(str(model_dir)),
                      DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=512),
                      lora=LoraSettings(rank=4), methods=("svd", "quailora", "closed_form"), out=str(out), **kw)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    events = list(run_init(tiny_cfg(tiny_model_dir, text_file, out)))
    return out, events


def test_report_has_every_key_and_layer(finished):
    out, events = finished
    assert isinstance(events[-1], RunFinished), events[-1]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["status"] == "finished" and report["kind"] == "init"
    assert set(report["perplexity"]) == {"full", "int8", "qlora", "svd", "quailora", "closed_form"}
    assert len(report["layers"]) == 14 and len([e for e in events if isinstance(e, LayerResult)]) == 14
    for row in report["layers"]:
        assert row["calibrated_error"]["qlora"] == 1.0
        # the calibrated methods beat svd on the calibrated objective, layer by layer
        assert row["calibrated_error"]["closed_form"] <= row["calibrated_error"]["svd"] + 1e-6
        assert row["calibrated_error"]["quailora"] <= row["calibrated_error"]["closed_form"] * 1.01 + 1e-6
        assert row["weight_error"]["svd"] <= row["weight_error"]["quailora"] + 1e-6  # svd is the weight-space optimum
    assert {"load", "calibrate", "svd", "quailora", "closed_form"} <= set(report["seconds"])
    assert report["peak_memory_bytes"] > 0
    assert "loftq" not in report["methods"]
    progress = [e for e in events if isinstance(e, Progress) and e.stage == "calibrate"]
    assert [p.done for p in progress] == [1, 2]


def test_events_jsonl_mirrors_the_stream(finished):
    out, events = finished
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == [e.kind for e in events]


def test_adapters_reload_to_the_reported_perplexity(finished, tiny_model_dir, text_file):
    from peft import PeftModel

    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.engine.quantization.bnb import load_4bit
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import ModelSource, load_tokenizer

    out, _ = finished
    report = json.loads((out / "report.json").read_text())
    source = ModelSource("tiny", tiny_model_dir)
    splits = load_splits(DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=512),
                         load_tokenizer(source))
    model = PeftModel.from_pretrained(load_4bit(source, QuantConfig(), torch.device("cpu"), torch.float32),
                                      out / "adapters" / "quailora")
    assert perplexity(model, splits.eval) == pytest.approx(report["perplexity"]["quailora"], rel=1e-5)


def test_run_adapters_are_plain_peft_folders_that_merge(finished, tiny_model_dir):
    """adapters/<method>/ loads with plain peft onto the stock 4-bit base (transformers' own BitsAndBytesConfig),
    merges onto a 16-bit base, and records how it was initialized where peft does not look."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out, _ = finished
    folder = out / "adapters" / "closed_form"
    record = json.loads((folder / "quailora.json").read_text())
    assert record["method"] == "closed_form" and record["rank"] == 4 and record["calibration"] == "8 x 32 tokens"
    assert record["held_out_perplexity"] == pytest.approx(json.loads((out / "report.json").read_text())
                                                          ["perplexity"]["closed_form"])
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "closed_form" in card and "8 x 32 tokens" in card
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb),
                                      folder, is_trainable=True)
    assert any(p.requires_grad for p in stock.parameters())
    base16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    W = base16.model.layers[1].self_attn.o_proj.weight.detach().float().clone()
    peft16 = PeftModel.from_pretrained(base16, folder)
    layer = peft16.base_model.model.model.layers[1].self_attn.o_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float() * layer.scaling["default"]
    merged = peft16.merge_and_unload()
    torch.testing.assert_close(merged.model.layers[1].self_attn.o_proj.weight.float(), W + delta, rtol=2e-2, atol=2e-2)
    assert delta.abs().max() > 0.01  # the merge really added the initialization


# the pipeline asks should_stop() after data loading (1), after quantization (2), before each block's
# calibration (3: block 0, 5: block 1), after each block's initialization (4) and before each evaluation (6...)
@pytest.mark.parametrize("checks, where, partial", [(3, "during calibration at block 0 of 2", False),
                                                    (4, "during initialization after block 1 of 2", True),
                                                    (5, "during calibration at block 1 of 2", True),
                                                    (6, "during evaluation", False)])
def test_stop_keeps_what_was_done(tiny_model_dir, text_file, tmp_path, checks, where, partial):
    """A stop during calibration, initialization or evaluation: the run ends cancelled with a valid run folder
    (report.json, every events.jsonl line parses, the last is the stop), and a stop between blocks saves each
    method's adapter for the blocks done, which peft loads."""
    calls = {"n": 0}

    def stop_at_check():
        calls["n"] += 1
        return calls["n"] >= checks

    events = list(run_init(tiny_cfg(tiny_model_dir, text_file, tmp_path), should_stop=stop_at_check))
    assert isinstance(events[-1], RunFailed) and events[-1].cancelled
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "cancelled" and where in report["error"], report["error"]
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert lines[-1]["kind"] == "failed" and lines[-1]["cancelled"]
    assert len(report["layers"]) == sum(1 for e in lines if e["kind"] == "layer")
    assert ("partial_adapters" in report) == partial
    if partial:
        from peft import PeftModel

        from quailora_app.engine.adapters import read_factors
        from quailora_app.engine.quantization.bnb import load_4bit
        from quailora_app.sources.models import resolve_model

        assert report["partial_adapters"]["blocks_done"] == 1 and report["partial_adapters"]["blocks"] == 2
        assert report["partial_adapters"]["methods"] == ["closed_form", "quailora", "svd"]
        base = load_4bit(resolve_model(str(tiny_model_dir)), QuantConfig(), torch.device("cpu"), torch.float32)
        factors = read_factors(PeftModel.from_pretrained(base, tmp_path / "adapters" / "closed_form"))
        done = {row["name"] for row in report["layers"]}
        assert done and all(float(f.B.abs().max()) > 0 for name, f in factors.items() if name in done)
        assert all(float(f.B.abs().max()) == 0 for name, f in factors.items() if name not in done)


def run_cli_subprocess(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "quailora_app", "init", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.subprocess
def test_cli_process_exits_nonzero_without_traceback(tmp_path):
    result = run_cli_subprocess("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model 'no-such-org/no-such-model' is not a local folder "
        "and the Hugging Face hub is not reachable from here")


@pytest.mark.parametrize("case,expect", [
    ("unknown-model", "is not a local folder and the Hugging Face hub is not reachable"),
    ("missing-folder", "does not exist"),
    ("unknown-dataset", "hub is not reachable"),
    ("no-text-column", "column 'body' not found"),
    ("empty-file", "empty"),
    ("rank-too-large", "rank 100 is larger than"),
    ("not-causal", "is not a causal language model"),
])
def test_cli_bad_input_is_one_clear_line(case, expect, tiny_model_dir, text_file, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from quailora_app.cli import main

    model, dataset, extra = str(tiny_model_dir), str(text_file), []
    if case == "unknown-model":
        model = "no-such-org/no-such-model"
    elif case == "missing-folder":
        model = str(tmp_path / "nowhere")
    elif case == "unknown-dataset":
        dataset = "no-such-org/no-such-dataset"
    elif case == "no-text-column":
        dataset = str(tmp_path / "d.jsonl")
        Path(dataset).write_text('{"title": "a", "score": 1}\n' * 50)
        extra = ["--text-column", "body"]
    elif case == "empty-file":
        dataset = str(tmp_path / "empty.txt")
        Path(dataset).write_text("")
    elif case == "rank-too-large":
        extra = ["--rank", "100"]
    elif case == "not-causal":
        model = str(tmp_path / "bert")
        BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(model)
    code = main(["init", "--model", model, "--dataset", dataset, "--seq-len", "32", "--calib-samples", "4",
                 "--eval-tokens", "256", "--out", str(tmp_path / "run"), *extra])
    stderr = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expect in error_lines[0], stderr[-2000:]


def test_randomized_solver_reaches_the_exact_closed_form(tiny_model_dir, text_file, tmp_path, finished):
    """--solver randomized: the same per-layer calibrated error as the exact solver (the optimum), to 1%."""
    out, _ = finished
    exact = json.loads((out / "report.json").read_text())
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "randomized", solver="randomized", baselines=False)
    cfg.methods = ("qlora", "closed_form")
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    report = json.loads((tmp_path / "randomized" / "report.json").read_text())
    assert report["settings"]["solver"] == "randomized"
    for e_row, r_row in zip(exact["layers"], report["layers"]):
        assert e_row["name"] == r_row["name"]
        e, r = e_row["calibrated_error"]["closed_form"], r_row["calibrated_error"]["closed_form"]
        assert e * (1 - 1e-6) <= r <= e * 1.01  # never below the optimum (to the float32 factors' round-off)


def test_unknown_solver_is_refused():
    from quailora_app.errors import ConfigError

    with pytest.raises(ConfigError, match="solver must be one of exact, randomized"):
        InitConfig(solver="lanczos")
