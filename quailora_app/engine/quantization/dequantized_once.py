"""A 4-bit model's layers dequantized once for a decode on the CPU, computing the same products.

In the plain CPU layout the project keeps (`bnb.keep_cpu_layout`), bitsandbytes computes a 4-bit layer as
y = F.linear(x, dequant(W_q), b), dequantizing W_q again at every call: a decode of T tokens dequantizes every layer
T times (about a quarter of a CPU decode step of the embedded SmolLM2). Within `dequantized_once`, each layer
computes y = F.linear(x, Q, b) from Q = dequant(W_q) made once, by bitsandbytes' own dequantize_4bit. That is the same
product bit for bit; each layer is checked on a probe against its own forward before any layer is switched, and on a
difference none is. The price is the memory of the layers' matrices in the compute dtype, bounded by `max_bytes`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import bitsandbytes.functional as bnb_functional
import torch
import torch.nn.functional as F
from torch import nn

from quailora_app.engine.quantization.bnb import is_4bit, layout_kept, plain_codes

MAX_BYTES = 2 << 30  # 2 GiB: float32 matrices of a model up to about 0.5 B parameters
PROBE_ROWS = 2


@dataclass(frozen=True)
class Dequantized:
    """What `dequantized_once` did: `layers` switched to their Q made once (0: none), and why not where none was."""
    layers: int
    bytes: int
    why_not: str = ""

    def describe(self) -> str:
        if self.layers:
            return (f"{self.layers} 4-bit layers dequantized once ({self.bytes / 2**20:.0f} MiB), each checked equal "
                    "to its own forward")
        return f"bitsandbytes' own 4-bit forward ({self.why_not})"


def _cached_forward(layer: nn.Module, q: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """Linear4bit.forward for inputs in `dtype` (its compute dtype): F.linear(x, Q, b); other inputs take the
    layer's own path."""
    own = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype:
            return own(x)
        return F.linear(x, q, bias)

    return forward


def _why_not(layers: list[nn.Module], dtype: torch.dtype, max_bytes: int) -> tuple[str, int]:
    size = sum(m.out_features * m.in_features for m in layers) * torch.empty((), dtype=dtype).element_size()
    if not layers:
        return "no 4-bit layers", 0
    if any(m.weight.device.type != "cpu" for m in layers):
        return "not on a CPU", size
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        return "repacked for bitsandbytes' AVX512-BF16 kernel", size
    if any(m.compute_dtype not in (None, dtype) for m in layers):
        return f"a compute dtype other than {dtype}", size
    if size > max_bytes:
        return f"{size / 2**20:.0f} MiB of dequantized matrices, over {max_bytes / 2**20:.0f} MiB", size
    return "", size


@contextmanager
def dequantized_once(model: nn.Module, dtype: torch.dtype = torch.float32,
                     max_bytes: int = MAX_BYTES) -> Iterator[Dequantized]:
    """Within the block, every bitsandbytes 4-bit layer of `model` (in its plain CPU layout, computing in `dtype`)
    multiplies inputs in `dtype` by its Q dequantized once, where all of them can and each one's product on a
    probe equals its own forward's bit for bit; otherwise nothing changes. Yields what was done; the layers' own
    forwards are back after the block."""
    layers = [m for m in model.modules() if is_4bit(m)]
    why_not, size = _why_not(layers, dtype, max_bytes)
    switched: list[nn.Module] = []
    if not why_not:
        generator = torch.Generator().manual_seed(0)
        forwards = []
        with torch.no_grad(), layout_kept(layers):
            for layer in layers:
                data, state = plain_codes(layer)
                q = bnb_functional.dequantize_4bit(data, state).to(dtype)
                bias = None if layer.bias is None else layer.bias.detach().to(dtype)
                forward = _cached_forward(layer, q, bias, dtype)
                probe = torch.randn(PROBE_ROWS, layer.in_features, generator=generator).to(dtype)
                if not torch.equal(forward(probe), layer(probe)):
                    why_not = "a layer's product differed from its own forward on a probe"
                    break
                forwards.append(forward)
        if not why_not:
            for layer, forward in zip(layers, forwards, strict=True):
                layer.forward = forward
                switched.append(layer)
    try:
        yield Dequantized(len(switched), size if switched else 0, why_not)
    finally:
        for layer in switched:
            del layer.forward
