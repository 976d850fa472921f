"""Factors written into peft honour its scaling exactly, and saved adapters reload to the same logits."""
import pytest
import torch

from quailora_app import init_math
from quailora_app.adapters import attach_lora, lora_layers, read_factors, save_adapter, write_factors
from quailora_app.config import LoraSettings, QuantConfig
from quailora_app.initialize import target_paths
from quailora_app.quantize import dequantized_weight, load_4bit
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
