"""A quantized linear layer, whichever quantizer holds it: what it multiplies by (Q), and its own product.

Every error figure and initialization is computed against Q as the layer really computes with it, so each
quantizer reads Q through the layer itself: bitsandbytes' codes and absmax (bnb.py), HQQ's own dequantize (hqq.py).
The invariant, for every quantizer and layout: layer(x) = x Q^T (+ bias) up to the compute dtype's rounding.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from quailora_app.engine.quantization import bnb, hqq


def base_of(layer: nn.Module) -> nn.Module:
    """The quantized layer itself (a peft LoRA layer is read through its base layer)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit / 8-bit or an HQQ linear layer (or a peft LoRA layer on one)."""
    base = base_of(layer)
    return bnb.is_quantized(base) or hqq.is_hqq(base)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear layer of `model` by module name."""
    return {name: m for name, m in model.named_modules() if bnb.is_quantized(m) or hqq.is_hqq(m)}


def calibration_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype calibration runs the full-precision blocks in: float32 on CPU; on an accelerator the compute
    dtype of the model's quantized layers (bfloat16 in the QLoRA recipe), else the model's own dtype."""
    if device.type == "cpu":
        return torch.float32
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return model.dtype


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """Q (out x in, float32) exactly as the quantized layer holds it."""
    base = base_of(layer)
    return hqq.dequantized_weight(base) if hqq.is_hqq(base) else bnb.dequantized_weight(base)


def own_product(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in float32: the product x Q^T (+ bias) the quantized layer really computes."""
    base = base_of(layer)
    return hqq.own_product(base, x) if hqq.is_hqq(base) else bnb.own_product(base, x)


@contextmanager
def layout_kept(modules: Iterable[nn.Module]):
    """Within the block, no quantized layer changes the layout it computes in (bitsandbytes' CPU repacking; HQQ
    layers keep theirs anyway)."""
    with bnb.layout_kept(modules):
        yield
