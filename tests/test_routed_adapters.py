"""Within `routed` a peft model holding several adapters computes what peft's own mixed-adapter batch computes for
the same rows, and refuses to switch where it cannot promise that."""
import pytest
import torch
from helpers import save_tiny_family

from quailora_app.config import LoraSettings, QuantConfig
from quailora_app.engine import routed_adapters as module
from quailora_app.engine.adapters import BASE_ROW, add_adapter_with_factors, attach_lora, lora_layers, read_factors
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.evaluation.agreement import stream_rows
from quailora_app.engine.quantization.bnb import load_4bit
from quailora_app.engine.quantization.dequantized_once import dequantized_once
from quailora_app.engine.routed_adapters import routed
from quailora_app.sources.models import ModelSource

pytestmark = pytest.mark.usefixtures("one_thread")
ROUTES = [BASE_ROW, "one", "two"]


def _peft_model(tiny_model_dir, lora: LoraSettings, quant: QuantConfig = QuantConfig(), ranks_two=None):
    """The tiny Llama's 4-bit base with adapters "one" (rank lora.rank) and "two" (per-layer `ranks_two`), every
    factor random so that each adapter changes what the model says."""
    base = load_4bit(ModelSource("tiny", tiny_model_dir), quant, torch.device("cpu"), torch.float32)
    peft_model = attach_lora(base, lora, target_paths(base, lora))
    shapes = {path: (layer.in_features, layer.out_features) for path, layer in lora_layers(peft_model).items()}
    gen = torch.Generator().manual_seed(2)
    for name, ranks in (("one", None), ("two", ranks_two)):
        factors = read_factors(peft_model)
        for path, f in factors.items():
            r = (ranks or {}).get(path, lora.rank)
            n, m = shapes[path]
            f.A, f.B = torch.randn(r, n, generator=gen) * 0.3, torch.randn(m, r, generator=gen) * 0.3
        add_adapter_with_factors(peft_model, name, lora, factors, ranks)
    return peft_model.eval()


def _switched(peft_model) -> int:
    return sum("forward" in vars(layer) for layer in lora_layers(peft_model).values())


@pytest.mark.parametrize("family, lora, quant", [
    ("llama", LoraSettings(rank=4, alpha=4.0), QuantConfig()),
    ("llama", LoraSettings(rank=4, alpha=8.0, rslora=True), QuantConfig("nf4", False, 64)),  # library default
    ("qwen2", LoraSettings(rank=4, alpha=4.0), QuantConfig()),
])
def test_the_rows_give_peft_s_own_mixed_batch_logits(tiny_model_dir, tmp_path, family, lora, quant):
    """Scaling 1 and an rsLoRA scaling of 4; bitsandbytes' default (no double quantization); another
    architecture; per-layer ranks on one adapter; a left-padded batch with its attention mask that repeats routes
    (as the teacher-forced passes do); a model that ran forward passes before."""
    folder = tiny_model_dir if family == "llama" else save_tiny_family(family, tmp_path / family)
    paths = list(lora_layers(_peft_model(folder, lora, quant)))
    peft_model = _peft_model(folder, lora, quant, ranks_two={paths[0]: 2, paths[3]: 6})
    ids = torch.randint(3, 200, (6, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    rows = [BASE_ROW, "one", "two", "two", BASE_ROW, "one"]
    with torch.no_grad():
        own = peft_model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        with routed(peft_model, rows, ids[0]) as how:
            assert how.layers == len(paths) == 14 and how.forward == {}
            assert "stacked" in how.describe() and _switched(peft_model) == 14
            within = peft_model(input_ids=ids, attention_mask=mask, **how.forward).logits
        after = peft_model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    torch.testing.assert_close(within, own, rtol=0, atol=module.TOLERANCE * float(own.abs().max()))
    assert torch.equal(after, own)
    assert _switched(peft_model) == 0
    assert not torch.allclose(own[1], own[0]) and not torch.allclose(own[2], own[1])  # each route differs


def test_a_decode_on_the_dequantized_base_gives_the_same_tokens(tiny_model_dir):
    """The generate run's way: routed inside dequantized_once, three rows decoded with the key-value cache."""
    peft_model = _peft_model(tiny_model_dir, LoraSettings(rank=4, alpha=4.0))
    prompt = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(4)).repeat(3, 1)
    with dequantized_once(peft_model):
        plain = list(stream_rows(peft_model, prompt, 8, adapter_names=ROUTES))
        with routed(peft_model, ROUTES, prompt) as how:
            assert how.layers == 14
            stacked = list(stream_rows(peft_model, prompt, 8, **how.forward))
    assert stacked == plain
    assert len({tuple(s[r] for s in plain) for r in range(3)}) == 3  # each adapter says something else


def test_a_batch_of_another_size_is_refused(tiny_model_dir):
    peft_model = _peft_model(tiny_model_dir, LoraSettings(rank=4, alpha=4.0))
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(5))
    with routed(peft_model, ROUTES, ids) as how, pytest.raises(ValueError, match="routed for 3 rows"):
        assert how.layers == 14
        peft_model(input_ids=ids)


def test_a_stack_that_differs_from_peft_switches_nothing(tiny_model_dir, monkeypatch):
    """A wrong scaling in the stack is caught by the probe: nothing is switched, and the forward the block hands
    out is peft's own `adapter_names`, so the rows are still right."""
    peft_model = _peft_model(tiny_model_dir, LoraSettings(rank=4, alpha=4.0))
    stack = module._stack

    def doubled(layer, routes, dtype):
        found = stack(layer, routes, dtype)
        return module._Stack(found.A, found.B, found.mask, found.scale * 2)

    monkeypatch.setattr(module, "_stack", doubled)
    ids = torch.randint(3, 200, (3, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        own = peft_model(input_ids=ids, adapter_names=ROUTES).logits
        with routed(peft_model, ROUTES, ids[0]) as how:
            assert how.layers == 0 and _switched(peft_model) == 0
            assert "differed from peft's mixed batch" in how.why_not
            assert how.forward == {"adapter_names": ROUTES}
            assert "peft's own mixed-adapter batch" in how.describe()
            assert torch.equal(peft_model(input_ids=ids, **how.forward).logits, own)


def test_a_training_model_or_an_unknown_adapter_is_left_to_peft(tiny_model_dir):
    peft_model = _peft_model(tiny_model_dir, LoraSettings(rank=4, alpha=4.0))
    probe = torch.tensor([5, 6, 7])
    with routed(peft_model, [BASE_ROW, "three"], probe) as how:
        assert how.layers == 0 and "no adapter named three" in how.why_not
    peft_model.train()
    with routed(peft_model, ROUTES, probe) as how:
        assert how.layers == 0 and how.why_not == "the model is training"
        assert how.forward == {"adapter_names": ROUTES}
    assert _switched(peft_model) == 0
