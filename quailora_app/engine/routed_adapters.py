"""peft's mixed-adapter batches with each layer's adapters stacked: the same rows, fewer and larger products.

peft runs one adapter per batch row when a forward gets `adapter_names` (one name per row, BASE_ROW for the base
alone): at every call it registers a hook on each LoRA layer, and each layer loops over the adapters present,
gathering their rows, y[rows_a] += s_a B_a (A_a x[rows_a]). On a CPU decode of the embedded SmolLM2 (3 rows: plain,
svd, quailora) that bookkeeping cost more than the base's products: 8.8 s for 32 tokens against 2.8 s for the
base alone.

Within `routed(model, routes)` each LoRA layer instead computes, for rows routed as `routes` (one per batch row),

    y = base(x) + s_row * (((x A^T) * M) B^T)

with A = [A_1; ...; A_k] and B = [B_1 ... B_k] the routed adapters' factors stacked along the rank, M the row's 0/1
mask of its adapter's rank block (a base row has none) and s_row its adapter's scaling: per row exactly peft's
s_a B_a (A_a x), since the other blocks add exact zeros. The model is then called without `adapter_names`. On
entry the model's logits on a short probe, one row per route, are compared with peft's own mixed batch; only where
they agree within float32 rounding (`TOLERANCE` of the largest logit; bit for bit on the embedded model) are the
layers switched, and otherwise nothing changes and `Routed.why_not` says why. Vanilla LoRA only (no DoRA or other
variant), inference only (the model in eval mode), the factors in the input's dtype.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quailora_app.engine.adapters import BASE_ROW, lora_layers

#: largest |routed - peft| logit difference accepted on the probe, as a share of the largest |logit|
TOLERANCE = 1e-5
PROBE_TOKENS = 4


@dataclass(frozen=True)
class Routed:
    """What `routed` did: `layers` LoRA layers switched (0: none, see `why_not`), the probe's largest logit
    difference from peft's own mixed batch, and `forward`, what each forward call in the block must be given:
    nothing once switched, else peft's own `adapter_names`."""
    layers: int
    forward: dict = field(default_factory=dict)
    max_difference: float = 0.0
    why_not: str = ""

    def describe(self) -> str:
        if self.layers:
            how = "bit for bit" if self.max_difference == 0 else f"within {self.max_difference:.1e}"
            return (f"{self.layers} LoRA layers with their adapters stacked, equal to peft's mixed batch on a probe "
                    f"({how})")
        return f"peft's own mixed-adapter batch ({self.why_not})"


@dataclass(frozen=True)
class _Stack:
    """One layer's routed adapters stacked: A (R x n), B (m x R), and per batch row its 0/1 mask (rows x 1 x R)
    and scaling (rows x 1 x 1)."""
    A: torch.Tensor
    B: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor


def _stack(layer: nn.Module, routes: Sequence[str], dtype: torch.dtype) -> _Stack:
    names = [name for name in dict.fromkeys(routes) if name != BASE_ROW and name in layer.lora_A]
    if not names:
        n, m = layer.in_features, layer.out_features
        return _Stack(torch.zeros(0, n, dtype=dtype), torch.zeros(m, 0, dtype=dtype),
                      torch.zeros(len(routes), 1, 0, dtype=dtype), torch.zeros(len(routes), 1, 1, dtype=dtype))
    A = torch.cat([layer.lora_A[name].weight.detach() for name in names])
    B = torch.cat([layer.lora_B[name].weight.detach() for name in names], dim=1)
    mask = torch.zeros(len(routes), 1, A.shape[0], dtype=dtype)
    scale = torch.zeros(len(routes), 1, 1, dtype=dtype)
    start = 0
    for name in names:
        stop = start + layer.lora_A[name].weight.shape[0]
        for row, route in enumerate(routes):
            if route == name:
                mask[row, 0, start:stop] = 1
                scale[row, 0, 0] = layer.scaling[name]
        start = stop
    return _Stack(A, B, mask, scale)


def _forward(layer: nn.Module, stack: _Stack):
    base = layer.base_layer

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != stack.mask.shape[0]:
            raise ValueError(f"a batch routed for {stack.mask.shape[0]} rows got input of shape {tuple(x.shape)}")
        result = base(x, *args, **kwargs)
        if stack.A.shape[0] == 0:
            return result
        delta = F.linear(F.linear(x, stack.A) * stack.mask, stack.B) * stack.scale
        return result.add_(delta.to(result.dtype))

    return forward


def _unsupported(layers: dict[str, nn.Module], model: nn.Module, routes: Sequence[str], dtype: torch.dtype) -> str:
    if not layers:
        return "no LoRA layers"
    if model.training:
        return "the model is training"
    missing = sorted({r for r in routes if r != BASE_ROW} - {a for layer in layers.values() for a in layer.lora_A})
    if missing:
        return f"no adapter named {missing[0]}"
    for layer in layers.values():
        if any(name in getattr(layer, "lora_variant", {}) for name in routes):
            return "a LoRA variant (DoRA, ...)"
        if any(layer.lora_A[n].weight.dtype != dtype for n in routes if n in layer.lora_A):
            return f"adapter factors not in {dtype}"
        if any(layer.lora_A[n].bias is not None or layer.lora_B[n].bias is not None for n in routes
               if n in layer.lora_A):
            return "LoRA factors with a bias"
    return ""


@contextmanager
def routed(model: nn.Module, routes: Sequence[str], probe_ids: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> Iterator[Routed]:
    """Within the block, a forward of `model` (a peft model holding the adapters of `routes`) without
    `adapter_names` runs batch row i through adapter routes[i] (BASE_ROW: the base alone), as peft's
    `model(..., adapter_names=routes)` would: every batch must have len(routes) rows. `probe_ids` (token ids,
    any shape) give the probe's first PROBE_TOKENS tokens. Yields what was done: every forward in the block is
    given its `forward` (peft's `adapter_names` where the layers were not switched). The layers' own forwards are
    back after the block."""
    routes = list(routes)
    layers = lora_layers(model)
    why_not = _unsupported(layers, model, routes, dtype)
    switched: list[nn.Module] = []
    difference = 0.0
    if not why_not:
        with torch.no_grad():
            distinct = list(dict.fromkeys(routes))
            device = next(model.parameters()).device
            probe = probe_ids.reshape(-1)[:PROBE_TOKENS].to(device).repeat(len(distinct), 1)
            own = model(input_ids=probe, adapter_names=distinct).logits.float()
            _switch(layers, distinct, dtype, switched)
            try:
                stacked = model(input_ids=probe).logits.float()
            finally:
                _restore(switched)
            difference = float((stacked - own).abs().max())
            if difference > TOLERANCE * float(own.abs().max()):
                why_not = f"stacked adapters differed from peft's mixed batch by {difference:.1e} on a probe"
        if not why_not:
            _switch(layers, routes, dtype, switched)
    try:
        yield (Routed(len(switched), {}, difference) if switched else
               Routed(0, {"adapter_names": routes}, difference, why_not))
    finally:
        _restore(switched)


def _switch(layers: dict[str, nn.Module], routes: Sequence[str], dtype: torch.dtype,
            switched: list[nn.Module]) -> None:
    for layer in layers.values():
        layer.forward = _forward(layer, _stack(layer, routes, dtype))
        switched.append(layer)


def _restore(switched: list[nn.Module]) -> None:
    while switched:
        del switched.pop().forward
