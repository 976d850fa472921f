"""4-bit and 8-bit models through bitsandbytes, and the exact dequantized weight Q they hold.

Q must be the matrix the 4-bit layer multiplies by during fine-tuning, bit for bit: every error figure and
every initialization is computed against it.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from transformers import BitsAndBytesConfig

from quailora_app.config import QuantConfig
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.errors import ModelError
from quailora_app.sources.models import ModelSource, load_model


def bnb_4bit_config(quant: QuantConfig, compute_dtype: torch.dtype):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_quantized(layer) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def linear4bit_modules(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def keep_cpu_layout(model) -> None:
    """Switch off bitsandbytes' AVX512-BF16 CPU repacking.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights at the first forward and then computes
    in bf16 whatever compute dtype was asked for, so the layer no longer multiplies by Q. Turning it off keeps
    the layer's product exactly Q x (at float32 compute).
    """
    for module in linear4bit_modules(model).values():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def plain_codes(layer) -> tuple[torch.Tensor, F.QuantState]:
    """(packed 4-bit codes, QuantState) of a Linear4bit layer in bitsandbytes' plain layout, describing exactly the
    product the layer computes now, without touching the layer.

    After bitsandbytes repacked the layer for its AVX512-BF16 CPU kernel (at its first inference forward), the layer
    multiplies by codes x absmax, with absmax held as a transposed (in / blocksize x out) bfloat16 matrix and no
    longer double-quantized. The codes are unpacked by bitsandbytes' own inverse (on a copy of the state: the inverse
    rewrites the state it is given); absmax is read from the repacked state itself."""
    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import (
            _convert_weight_packed_for_cpu_inverse,  # private: only on the repacked CPU path
        )

        data, _ = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        # Workaround for bitsandbytes 0.50.2: its inverse restores absmax only for a nested (double-quantized) state,
        # and then by quantizing it again (not the bf16 values the layer uses); otherwise it leaves it transposed,
        # which dequantize_4bit reads in the wrong order (a Q 23% off on SmolLM2). The transpose back is exact.
        absmax = state.absmax.T.reshape(-1).float()
        state = F.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                             quant_type=state.quant_type, dtype=torch.float32)
    return data, state


def dequantized_weight(layer) -> torch.Tensor:
    """Q = dequant(quant(W)) exactly as the bitsandbytes layer holds it, in float32, (out x in).

    4-bit: blockwise NF4/FP4 codes times their (double-quantized) absmax. 8-bit (LLM.int8): int8 rows CB
    times their row scale SCB / 127. A peft LoRA layer is read through its quantized base layer."""
    layer = getattr(layer, "base_layer", layer)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        # the first forward pass moves the row scales from the weight to the layer's state (init_8bit_state)
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return layer.weight.data.float() * scb.float()[:, None] / 127.0

    data, state = plain_codes(layer)
    return F.dequantize_4bit(data, state).float()


def bits_per_weight(layer) -> float:
    """Memory per weight of a bitsandbytes layer's matrix, in bits. 4-bit: 4 per code, plus each block's absmax (32
    bits / block size; with double quantization 8 bits / block size plus the nested float32 absmax and offset of each
    256 blocks), the format's fixed code tables not counted, in the plain layout the layer holds before any
    repacking. 8-bit (LLM.int8): 8 per weight plus a float32 scale per row (32 / in_features)."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return 8 + 32 / layer.in_features
    state = layer.weight.quant_state
    n = layer.out_features * layer.in_features
    bits = 4 * n + state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8 + 32
    return bits / n


@contextmanager
def layout_kept(modules: Iterable[torch.nn.Module]):
    """Within the block, no 4-bit layer among `modules` is repacked by an inference forward: bitsandbytes 0.50 would
    otherwise repack it for its AVX512-BF16 CPU kernel (rounding absmax to bfloat16, into a layout it passes no
    gradient through, and failing on shapes that kernel cannot take). Each layer's setting is restored after."""
    layers = [m for m in modules
              if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


@torch.no_grad()
def own_product(layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in float32: the product Q x (+ bias) the quantized layer really computes, in whichever layout it holds
    now (a layer still in the plain layout stays in it: `layout_kept`)."""
    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    with layout_kept([layer]):
        return layer(x).float()


def requantize_block_size(model, source: ModelSource, quant: QuantConfig) -> None:
    """transformers always quantizes with blocks of 64; for another block size, quantize each 4-bit layer
    again with bitsandbytes from the full-precision weight streamed from the checkpoint."""
    checkpoint = Checkpoint(source.folder)
    for name, layer in linear4bit_modules(model).items():
        device = layer.weight.device
        weight = checkpoint.get(f"{name}.weight", device, layer.weight.quant_state.dtype)
        packed, state = F.quantize_4bit(
            weight, blocksize=quant.block_size, compress_statistics=quant.double_quant, quant_type=quant.quant
        )
        layer.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=quant.block_size,
            compress_statistics=quant.double_quant, quant_type=quant.quant, module=layer, bnb_quantized=True,
        )
        layer.quant_state = state


def is_4bit(layer) -> bool:
    """A bitsandbytes 4-bit (NF4/FP4) linear layer (not a peft wrapper)."""
    return isinstance(layer, bnb.nn.Linear4bit)


def requantize(like, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A new Linear4bit holding quant(weight) (out x in) with the settings of the 4-bit layer `like` (NF4 or FP4, its
    block size, double quantization, code storage), its compute dtype, device, bias (unless `bias` is given) and
    training mode, quantized by bitsandbytes from `weight` cast to the dtype `like` was quantized from (as
    `requantize_block_size` does). It keeps `like`'s CPU-repacking setting, so in the project's layout
    (`keep_cpu_layout`) its product is x Q^T (+ bias), Q = dequantized_weight(new layer).

    LoftQ alternates Q_t = quant(W - s B_t A_t) (this function) with fitting s B A to W - Q_t; under peft the new
    layer replaces the base: `peft_layer.base_layer = requantize(peft_layer, ...)`."""
    base = like.get_base_layer() if hasattr(like, "get_base_layer") else like
    if not is_4bit(base):
        raise TypeError(f"not a bitsandbytes 4-bit layer: {type(base).__name__}")
    param, state = base.weight, base.weight.quant_state
    device = param.device
    kept = base.bias if bias is None else bias
    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=kept is not None,
                              compute_dtype=base.compute_dtype, compress_statistics=param.compress_statistics,
                              quant_type=param.quant_type, quant_storage=param.quant_storage, device="meta")
    packed, new_state = F.quantize_4bit(weight.detach().to(device=device, dtype=state.dtype),
                                        blocksize=param.blocksize, compress_statistics=param.compress_statistics,
                                        quant_type=param.quant_type, quant_storage=param.quant_storage)
    layer.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=new_state, blocksize=param.blocksize,
        compress_statistics=param.compress_statistics, quant_type=param.quant_type, quant_storage=param.quant_storage,
        module=layer, bnb_quantized=True)
    layer.quant_state = new_state
    layer.bias = None if kept is None else torch.nn.Parameter(
        kept.detach().clone().to(device=device, dtype=base.bias.dtype if base.bias is not None else kept.dtype),
        requires_grad=False)
    layer.compute_type_is_set = base.compute_type_is_set
    if hasattr(base, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = base.support_avx512bf16_for_cpu
    layer.train(base.training)
    return layer


def load_4bit(source: ModelSource, quant: QuantConfig, device: torch.device, compute_dtype: torch.dtype):
    """The QLoRA base: NF4/FP4 linear layers, everything else in float32 (CPU) or the compute dtype (CUDA)."""
    holding_dtype = torch.float32 if device.type == "cpu" else compute_dtype
    model = load_model(source, device, quantization_config=bnb_4bit_config(quant, compute_dtype), dtype=holding_dtype)
    if not linear4bit_modules(model):
        raise ModelError(f"model '{source.name}' has no linear layers bitsandbytes could quantize")
    if quant.block_size != 64:
        requantize_block_size(model, source, quant)
    keep_cpu_layout(model)
    return model


def int8_dtype(device: torch.device) -> torch.dtype:
    """The dtype load_8bit holds the 8-bit model's other weights in: float32 on CPU, bfloat16 on an accelerator."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_8bit(source: ModelSource, device: torch.device):
    """LLM.int8 (bitsandbytes 8-bit), the comparison arm QLoRA's 4-bit tries to match."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    return load_model(source, device, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                      dtype=int8_dtype(device))
