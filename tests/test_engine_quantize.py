"""Q is exactly what the bitsandbytes layer multiplies by."""
import pytest
import torch

from quailora_app.config import QuantConfig
from quailora_app.engine.quantization.bnb import dequantized_weight, linear4bit_modules, load_4bit, load_8bit
from quailora_app.sources.models import ModelSource


@pytest.mark.parametrize("quant", [QuantConfig("nf4", True, 64), QuantConfig("fp4", False, 64),
                                   QuantConfig("nf4", False, 128)])
def test_dequantized_weight_is_what_the_4bit_layer_multiplies_by(tiny_model_dir, quant):
    model = load_4bit(ModelSource("tiny", tiny_model_dir), quant, torch.device("cpu"), torch.float32)
    layers = linear4bit_modules(model)
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name, layer in layers.items():
        assert layer.weight.quant_state.blocksize == quant.block_size
        assert layer.weight.quant_state.quant_type == quant.quant
        Q = dequantized_weight(layer)
        with torch.no_grad():
            out = layer(torch.eye(layer.in_features))  # rows of I x Q^T = Q^T
        assert torch.equal(out.T, Q), name


def test_4bit_error_is_real_and_block_size_changes_it(tiny_model_dir):
    from safetensors.torch import load_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    errors = {}
    for bs in (64, 256):
        model = load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig(block_size=bs), torch.device("cpu"),
                          torch.float32)
        name = "model.layers.0.mlp.down_proj"
        W = weights[name + ".weight"]
        Q = dequantized_weight(linear4bit_modules(model)[name])
        errors[bs] = ((W - Q).norm() / W.norm()).item()
    assert 0.02 < errors[64] < 0.2
    assert errors[64] < errors[256] < 0.3  # coarser blocks, larger (but sane) error


def test_8bit_dequantized_weight_matches_layer(tiny_model_dir):
    model = load_8bit(ModelSource("tiny", tiny_model_dir), torch.device("cpu"))
    layer = model.model.layers[0].self_attn.q_proj
    Q8 = dequantized_weight(layer)
    with torch.no_grad():
        out = layer(torch.eye(layer.in_features))
    # LLM.int8 casts the input to float16 on CPU: equal up to that rounding
    torch.testing.assert_close(out.T.float(), Q8, atol=1e-4, rtol=1e-3)
