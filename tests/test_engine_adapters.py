"""Factors written into peft honour its scaling exactly, and saved adapters reload to the same logits."""
from pathlib import Path

import pytest
import torch

from quailora_app.config import LoraSettings, QuantConfig
from quailora_app.engine.adapters import attach_lora, lora_layers, read_factors, save_adapter, write_factors
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.methods import init_math
from quailora_app.engine.quantization.bnb import dequantized_weight, load_4bit
from quailora_app.sources.models import ModelSource


def _quantized(tiny_model_dir):
    return load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig(), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("rank,alpha,rslora", [(4, 16.0, False), (8, 8.0, True), (2, 32.0, False), (16, 1.0, True)])
def test_peft_layer_adds_exactly_the_correction(tiny_model_dir, rank, alpha, rslora):
    """y_lora(x) - Q x == C x for the C we wrote, whatever r, alpha and rsLoRA are."""
    model = _quantized(tiny_model_dir)
    lora = LoraSettings(rank, alpha, rslora)
    paths = target_paths(model, lora)
    peft_model = attach_lora(model, lora, paths)
    assert set(lora_layers(peft_model)) == set(paths)
    torch.manual_seed(1)
    name = "model.layers.1.mlp.down_proj"
    layer = lora_layers(peft_model)[name]
    assert layer.scaling["default"] == pytest.approx(lora.scaling)
    m, n = layer.out_features, layer.in_features
    P, Rt = torch.randn(m, rank), torch.randn(rank, n)  # some rank-r correction
    A, B = init_math.split_factors(P, Rt, lora.scaling)
    factors = read_factors(peft_model)
    factors[name].A, factors[name].B = A, B
    write_factors(peft_model, factors)
    x = torch.randn(5, n)
    with torch.no_grad():
        delta = layer(x) - x @ dequantized_weight(layer.base_layer).T
    torch.testing.assert_close(delta, x @ (P @ Rt).T, rtol=1e-4, atol=1e-4)


def test_saved_adapter_reloads_to_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    lora = LoraSettings(4, 16.0)
    model = _quantized(tiny_model_dir)
    peft_model = attach_lora(model, lora, target_paths(model, lora))
    factors = read_factors(peft_model)
    torch.manual_seed(2)
    for f in factors.values():
        f.B = torch.randn_like(f.B) * 0.05  # a non-trivial adapter
    write_factors(peft_model, factors)
    ids = torch.randint(0, 250, (2, 16))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    folder = save_adapter(peft_model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_quantized(tiny_model_dir), folder)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert not torch.allclose(expected, _quantized(tiny_model_dir)(input_ids=ids).logits)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_saving_over_an_adapter_is_all_or_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous complete adapter in place; a save that succeeds replaces it;
    no staging folders are left behind."""
    from safetensors.torch import load_file

    lora = LoraSettings(4, 16.0)
    model = _quantized(tiny_model_dir)
    peft_model = attach_lora(model, lora, target_paths(model, lora))
    folder = save_adapter(peft_model, tmp_path / "adapters" / "svd")
    first = load_file(folder / "adapter_model.safetensors")
    factors = read_factors(peft_model)
    for f in factors.values():
        f.B = torch.ones_like(f.B)
    write_factors(peft_model, factors)

    real = type(peft_model).save_pretrained

    def dies_half_way(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(type(peft_model), "save_pretrained", dies_half_way)
    with pytest.raises(OSError):
        save_adapter(peft_model, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["svd"]  # no staging folder left
    kept = load_file(folder / "adapter_model.safetensors")
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in first)
    monkeypatch.setattr(type(peft_model), "save_pretrained", real)
    save_adapter(peft_model, folder)
    replaced = load_file(folder / "adapter_model.safetensors")
    assert any(torch.all(v == 1) for k, v in replaced.items() if "lora_B" in k)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["svd"]
