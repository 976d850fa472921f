"""A base quantized once and handed out as copies computes what a fresh load computes, shares nothing with its
template, and is made again when the weights or the settings change."""
import os

import bitsandbytes as bnb
import pytest
import torch

from quailora_app.config import GenerateConfig, ModelConfig, QuantConfig
from quailora_app.engine.quantization import reused
from quailora_app.engine.quantization.bnb import load_8bit
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.flows.generate import made_word, read_run, run_generate, warm_bases
from quailora_app.settings import build
from quailora_app.sources.models import ModelSource

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_templates():
    reused.forget()
    yield
    reused.forget()


def _counted(load, calls: list):
    def counted(*args):
        calls.append(args)
        return load(*args)

    return counted


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("load, args", [
    (load_quantized, (QuantConfig("nf4", False, 64), CPU, torch.float32)),  # the library default: no double quant
    (load_quantized, (QuantConfig(), CPU, torch.float32)),  # the QLoRA recipe
    (load_8bit, (CPU,)),
], ids=["nf4", "nf4-double", "int8"])
def test_a_copy_computes_what_a_fresh_load_computes_and_the_load_runs_once(tiny_model_dir, load, args):
    source = ModelSource("tiny", tiny_model_dir)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    calls = []
    counted = _counted(load, calls)
    first, made_first = reused.reused_copy(counted, source, *args)
    first(input_ids=ids)  # a copy that ran forward passes (and, for 8-bit, moved its codes to its state) ...
    for p in first.parameters():
        p.data.zero_()  # ... and was damaged: the template is not
    second, made_second = reused.reused_copy(counted, source, *args)
    assert (made_first, made_second, len(calls), len(reused.kept())) == (True, False, 1, 1)
    assert torch.equal(_logits(second, ids), _logits(load(source, *args), ids))
    template = reused.kept()[0]
    assert not reused._storages(template) & reused._storages(second)
    for layer in second.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            assert layer.weight.module is layer


def test_changed_weights_or_settings_make_a_new_base(tiny_model_dir, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    source, calls = ModelSource("tiny", folder), []
    counted = _counted(load_quantized, calls)
    reused.reused_copy(counted, source, QuantConfig(), CPU, torch.float32)
    reused.reused_copy(counted, source, QuantConfig(block_size=128), CPU, torch.float32)
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _, made = reused.reused_copy(counted, source, QuantConfig(), CPU, torch.float32)
    assert made and len(calls) == 3
    assert len(reused.kept()) == reused.MAX_TEMPLATES  # the oldest was dropped


def test_a_base_over_the_size_kept_is_made_each_time(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(reused, "MAX_TEMPLATE_BYTES", 1000)
    calls = []
    counted = _counted(load_8bit, calls)
    for _ in range(2):
        _, made = reused.reused_copy(counted, ModelSource("tiny", tiny_model_dir), CPU)
        assert made
    assert len(calls) == 2 and not reused.kept()


def test_off_the_cpu_the_loader_simply_runs(tiny_model_dir):
    calls = []
    for _ in range(2):
        model, made = reused.reused_copy(lambda *a: calls.append(a) or "model", ModelSource("t", tiny_model_dir),
                                         torch.device("meta"))
        assert (model, made) == ("model", True)
    assert len(calls) == 2 and not reused.kept()


def test_a_generate_run_after_the_warm_up_copies_both_bases_and_says_so(tiny_init_run, tmp_path):
    values = read_run(str(tiny_init_run)).values
    line = warm_bases(build(ModelConfig, {**values, "device": "cpu"}), build(QuantConfig, values))
    assert "quantized ahead" in line and len(reused.kept()) == 2
    events = list(run_generate(GenerateConfig(from_run=str(tiny_init_run), new_tokens=2, documents=0, device="cpu"),
                               run_dir=tmp_path / "gen"))
    report = events[-1].report
    assert report["status"] == "finished"
    assert report["bases"] == {"4bit": made_word(False), "int8": made_word(False)}
