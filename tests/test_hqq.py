"""HQQ, the second quantizer: Q is exactly what the HQQ layer multiplies by, at 2, 3, 4 and 8 bits; memory per
weight; peft wraps the layers; bad settings get one line; a model quantized hqq's own way is recognised."""
import pytest
import torch

from quailora_app.engine.quantization.hqq import (
    HqqSettings,
    bits_per_weight,
    dequantized_weight,
    hqq_modules,
    is_hqq,
    lora_targets,
    own_product,
    product_gap,
    quantize_linears,
    quantize_weight,
    requantize,
    settings_of,
)
from quailora_app.errors import ConfigError

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]  # conftest: tiny matrices, one thread

LINEARS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


def tiny_llama(seed: int = 0):
    """A random 2-block Llama from a config (hidden 64, MLP 128): inputs of 64 (attention, gate, up) and 128 (down)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def full_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantized_weight_is_what_the_hqq_layer_multiplies_by(bits, group_size):
    model = tiny_llama()
    weights = full_weights(model)
    layers = quantize_linears(model, HqqSettings(bits, group_size))
    assert len(layers) == LINEARS and set(layers) == set(weights)
    assert hqq_modules(model).keys() == layers.keys() and type(model.lm_head) is torch.nn.Linear  # lm_head kept
    for name, layer in layers.items():
        assert is_hqq(layer) and settings_of(layer) == HqqSettings(bits, group_size)
        Q = dequantized_weight(layer)
        assert Q.shape == weights[name].shape and Q.dtype == torch.float32
        # rows of I x Q^T = Q^T, bit for bit (float32 compute: the layer runs the same matmul)
        assert torch.equal(own_product(layer, torch.eye(layer.in_features)).T, Q), name
        assert product_gap(layer, torch.randn(5, layer.in_features)) < 1e-6, name
        # each group of `group_size` inputs of a row holds at most 2^bits distinct values
        assert Q[0, :group_size].unique().numel() <= 2 ** bits
        error = ((weights[name] - Q).norm() / weights[name].norm()).item()
        assert 0 < error < {2: 0.45, 3: 0.2, 4: 0.1, 8: 0.01}[bits], (name, error)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_bits_per_weight_counts_codes_scales_and_zeros():
    per_bits = {}
    for bits in (2, 3, 4, 8):
        model = tiny_llama()
        layer = quantize_linears(model, HqqSettings(bits, 64))["model.layers.0.mlp.down_proj"]  # 64 x 128
        held, at16 = bits_per_weight(layer), bits_per_weight(layer, meta_bits=16)
        # a float32 scale and zero per 64 weights: + 1 bit (+ 0.5 at float16); 3 bits pack 10 codes in 32 bits
        codes = {2: 2.0, 3: 3.2, 4: 4.0, 8: 8.0}[bits]
        assert codes + 1.0 <= held <= codes + 1.0 + 0.3, (bits, held)
        assert held - at16 == pytest.approx(0.5)
        per_bits[bits] = held
    assert per_bits[2] < per_bits[3] < per_bits[4] < per_bits[8]
    small = quantize_linears(tiny_llama(), HqqSettings(4, 32))["model.layers.0.mlp.down_proj"]
    assert bits_per_weight(small) == pytest.approx(4 + 64 / 32)  # smaller groups, more statistics


def test_peft_wraps_hqq_layers_and_trains_through_them():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    quantize_linears(model, HqqSettings(3, 32))
    with torch.no_grad():
        base_logits = model(IDS).logits
    # peft's "all-linear" matches only nn.Linear subclasses, which HQQLinear is not: name the targets
    targets = lora_targets(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = {n: m for n, m in peft_model.named_modules() if type(m).__name__ == "HqqLoraLinear"}
    assert len(wrapped) == LINEARS and all(is_hqq(m) for m in wrapped.values())
    assert lora_targets(peft_model) == targets  # names under peft end in .base_layer
    with torch.no_grad():
        assert torch.equal(peft_model(IDS).logits, base_logits)  # B = 0: the quantized model itself
    layer = next(iter(wrapped.values()))
    assert torch.equal(dequantized_weight(layer), dequantized_weight(layer.base_layer))
    peft_model.train()
    peft_model(IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * LINEARS and all(g is not None for g in grads)


def test_requantize_reproduces_q_and_replaces_the_base_under_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    W = full_weights(model)["model.layers.1.self_attn.o_proj"]
    quantize_linears(model, HqqSettings(2, 64))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=lora_targets(model)))
    lora = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    Q = dequantized_weight(lora)
    assert torch.equal(dequantized_weight(requantize(lora, W)), Q)  # same weight, same settings: same Q
    assert torch.equal(dequantized_weight(quantize_weight(W, HqqSettings(2, 64))), Q)
    # one LoftQ step: quantize W - C instead of W; the new layer becomes the base
    C = 0.5 * (W - Q)
    lora.base_layer = requantize(lora, W - C)
    Q1 = dequantized_weight(lora)
    assert not torch.equal(Q1, Q) and settings_of(lora) == HqqSettings(2, 64)
    assert product_gap(lora, torch.randn(3, 64)) < 1e-6
    with torch.no_grad():
        assert torch.isfinite(peft_model(IDS).logits).all()


@pytest.mark.parametrize("bits", [0, 1, 5, 7, 9, 1.58, True])
def test_bad_bits_get_one_line(bits):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="HQQ bits must be one of 2, 3, 4, 8") as err:
        quantize_linears(model, HqqSettings(bits, 64))
    assert "\n" not in str(err.value)
    assert not hqq_modules(model)  # nothing swapped


@pytest.mark.parametrize("group_size, words", [
    (48, "does not divide the 64 inputs of layer 'model.layers.0.self_attn.q_proj'"),
    (128, "does not divide the 64 inputs of layer"),
    (12, "positive multiple of 8"),
    (0, "positive multiple of 8"),
])
def test_bad_group_size_gets_one_line_naming_the_layer(group_size, words):
    model = tiny_llama()
    with pytest.raises(ConfigError) as err:
        quantize_linears(model, HqqSettings(4, group_size))
    message = str(err.value)
    assert words in message and "\n" not in message, message
    assert not hqq_modules(model)
    with pytest.raises(ConfigError, match="does not divide the 128 inputs"):
        quantize_weight(torch.randn(8, 128), HqqSettings(4, 96))


def test_unknown_layer_name_gets_one_line():
    with pytest.raises(ConfigError, match="no linear layer 'model.layers.9.mlp.up_proj'"):
        quantize_linears(tiny_llama(), HqqSettings(4, 64), names=["model.layers.9.mlp.up_proj"])


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16])
def test_model_quantized_the_hqq_way_is_recognised(compute_dtype):
    """A user's model quantized as hqq documents it (AutoHQQHFModel.quantize_model), here 3 bits on CPU."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    model = tiny_llama()
    weights = full_weights(model)
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=3, group_size=64),
                                  compute_dtype=compute_dtype, device="cpu")
    layers = hqq_modules(model)
    assert layers.keys() == weights.keys()
    tolerance = 1e-6 if compute_dtype == torch.float32 else 1e-2  # float16 compute rounds the product
    for name, layer in layers.items():
        assert is_hqq(layer) and settings_of(layer) == HqqSettings(3, 64)
        Q = dequantized_weight(layer)
        assert Q.dtype == torch.float32 and Q.shape == weights[name].shape
        assert product_gap(layer, torch.randn(4, layer.in_features)) < tolerance, name
        assert ((weights[name] - Q).norm() / weights[name].norm()).item() < 0.2
        # 3.2 bits of codes (3.5-4 on these tiny layers: codes pack in runs of 10 groups) + scale and zero per 64
        assert 3.2 < bits_per_weight(layer) <= 4.0 + 2 * torch.finfo(compute_dtype).bits / 64
