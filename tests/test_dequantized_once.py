"""Within `dequantized_once` a 4-bit model computes what it computes without it, bit for bit, and refuses to switch
where it cannot promise that."""
import pytest
import torch

from quailora_app.config import LoraSettings, QuantConfig
from quailora_app.engine.adapters import BASE_ROW, attach_lora
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.evaluation.agreement import stream_rows
from quailora_app.engine.quantization import dequantized_once as module
from quailora_app.engine.quantization.bnb import linear4bit_modules, load_4bit
from quailora_app.engine.quantization.dequantized_once import dequantized_once
from quailora_app.sources.models import ModelSource

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tiny_model_dir, quant: QuantConfig):
    return load_4bit(ModelSource("tiny", tiny_model_dir), quant, torch.device("cpu"), torch.float32).eval()


def _own_forwards(model) -> bool:
    """No layer carries a forward of its own (the class's is back)."""
    return all("forward" not in vars(m) for m in linear4bit_modules(model).values())


@pytest.mark.parametrize("quant", [QuantConfig("nf4", False, 64), QuantConfig("nf4", True, 64),
                                   QuantConfig("fp4", False, 128)])
def test_a_model_computes_the_same_logits_with_its_layers_dequantized_once(tiny_model_dir, quant):
    """The library default (no double quantization), the QLoRA recipe and another format and block size; a padded
    batch with its attention mask; the model had run forward passes before."""
    model = _model(tiny_model_dir, quant)
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on one row
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with dequantized_once(model) as once:
            assert once.layers == len(linear4bit_modules(model)) == 14
            assert once.bytes == sum(m.in_features * m.out_features * 4 for m in linear4bit_modules(model).values())
            assert "dequantized once" in once.describe()
            assert not _own_forwards(model)
            within = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(within, before)
    assert torch.equal(after, before)
    assert _own_forwards(model)


def test_a_mixed_adapter_decode_gives_the_same_tokens(tiny_model_dir):
    """peft's LoRA layers on the 4-bit base call the switched base layers: the decode of three rows (the base alone
    and two adapters) is the same token for token."""
    model = _model(tiny_model_dir, QuantConfig())
    lora = LoraSettings(rank=4, alpha=4.0)
    peft_model = attach_lora(model, lora, target_paths(model, lora))
    for name, seed in (("one", 2), ("two", 3)):
        peft_model.add_adapter(name, peft_model.peft_config["default"])
        gen = torch.Generator().manual_seed(seed)
        for p_name, p in peft_model.named_parameters():
            if f"lora_B.{name}" in p_name:
                p.data = torch.randn(p.shape, generator=gen) * 0.5
    peft_model.eval()
    prompt = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(4)).repeat(3, 1)
    routes = [BASE_ROW, "one", "two"]
    plain = list(stream_rows(peft_model, prompt, 8, adapter_names=routes))
    with dequantized_once(peft_model) as once:
        assert once.layers == 14
        switched = list(stream_rows(peft_model, prompt, 8, adapter_names=routes))
    assert switched == plain
    assert len({tuple(s[r] for s in plain) for r in range(3)}) > 1  # the adapters do change what is said


def test_over_the_memory_bound_nothing_is_switched(tiny_model_dir):
    model = _model(tiny_model_dir, QuantConfig())
    with dequantized_once(model, max_bytes=1000) as once:
        assert once.layers == 0
        assert "over" in once.why_not and "bitsandbytes' own" in once.describe()
        assert _own_forwards(model)


def test_another_compute_dtype_is_left_alone(tiny_model_dir):
    model = _model(tiny_model_dir, QuantConfig())
    with dequantized_once(model, torch.bfloat16) as once:
        assert once.layers == 0 and "compute dtype" in once.why_not


def test_a_dequantized_matrix_that_differs_from_the_layers_product_switches_nothing(tiny_model_dir, monkeypatch):
    """The probe check: were bitsandbytes' dequantize ever to disagree with the layer's own product (another
    layout, another kernel), no layer is switched and the model computes as before."""
    model = _model(tiny_model_dir, QuantConfig())
    real = module.bnb_functional.dequantize_4bit
    calls = []

    def off_on_the_third(data, state):
        calls.append(1)
        q = real(data, state)
        return q * (1 + 1e-3) if len(calls) == 3 else q

    monkeypatch.setattr(module.bnb_functional, "dequantize_4bit", off_on_the_third)
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with dequantized_once(model) as once:
            assert once.layers == 0 and "probe" in once.why_not
            assert _own_forwards(model)
            assert torch.equal(model(input_ids=ids).logits, before)


def test_an_input_in_another_dtype_takes_the_layers_own_path(tiny_model_dir):
    model = _model(tiny_model_dir, QuantConfig())
    layer = next(iter(linear4bit_modules(model).values()))
    x = torch.randn(2, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        own = layer(x)
        with dequantized_once(model):
            assert torch.equal(layer(x), own)
