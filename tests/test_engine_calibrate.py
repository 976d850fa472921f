"""Block-by-block calibration gives the same H as hooks on the whole full-precision model."""
import torch

from quailora_app.config import QuantConfig
from quailora_app.engine.calibration.calibrate import calibrate_blocks, hessians_by_hooks, target_names
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.quantization.bnb import load_4bit
from quailora_app.errors import ConfigError
from quailora_app.sources.models import ModelSource, load_full_precision


def test_blockwise_h_equals_whole_model_hooks(tiny_model_dir):
    source = ModelSource("tiny", tiny_model_dir)
    cpu = torch.device("cpu")
    quantized = load_4bit(source, QuantConfig(), cpu, torch.float32)
    ids = torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(0))
    blocks = list(calibrate_blocks(quantized, Checkpoint(tiny_model_dir), ids, ("all-linear",), cpu, batch_size=4))
    reference = hessians_by_hooks(load_full_precision(source, cpu), ids, ("all-linear",), batch_size=4)
    assert [b.index for b in blocks] == [0, 1]
    seen = set()
    for block in blocks:
        groups = {tuple(g.names) for g in block.groups}
        # q/k/v read one tensor, gate/up read one: one H each
        assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") in groups
        assert ("mlp.gate_proj", "mlp.up_proj") in groups
        for group in block.groups:
            assert group.tokens == ids.numel()
            for name in group.names:
                full = f"{block.prefix}.{name}"
                torch.testing.assert_close(group.H, reference[full], rtol=1e-5, atol=1e-6)
                seen.add(full)
    assert seen == set(reference)


def test_blockwise_weights_are_the_full_precision_ones(tiny_model_dir):
    from safetensors.torch import load_file

    quantized = load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig(), torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 250, (2, 16))
    block = next(calibrate_blocks(quantized, Checkpoint(tiny_model_dir), ids, ("q_proj", "down_proj"),
                                  torch.device("cpu")))
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert set(block.weights) == {"self_attn.q_proj", "mlp.down_proj"}
    for name, W in block.weights.items():
        assert torch.equal(W, weights[f"model.layers.0.{name}.weight"])


def test_unknown_target_lists_the_real_ones(tiny_model_dir):
    model = load_full_precision(ModelSource("tiny", tiny_model_dir), torch.device("cpu"))
    try:
        target_names(model.model.layers[0], ("qkv",))
    except ConfigError as exc:
        assert "qkv" in str(exc) and "q_proj" in str(exc)
    else:
        raise AssertionError("expected ConfigError")
