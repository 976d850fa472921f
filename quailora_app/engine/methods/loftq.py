"""LoftQ as published (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
Algorithm 1), on any device and for both quantizers: the quantized base itself changes.

Per layer, with W (m x n) the full-precision weight, quant(.) the layer's own quantizer and settings (`requantizer`:
bitsandbytes NF4/FP4 with its block size and double quantization, or HQQ at any bits and group size) and fit_r a
rank-r fit of a matrix:

    C_0 = 0
    Q_t = dequant(quant(W - C_{t-1}))      t = 1 .. T
    C_t = fit_r(W - Q_t)

The layer becomes Q_T + C_T: a new quantized layer holding Q_T (the same quantizer, settings, compute dtype, device
and bias, whose own product is x Q_T^T) and LoRA factors with s B A = C_T. fit_r is
- svd, LoftQ as published (method loftq_svd): SVD_r(W - Q_t) = argmin ||W - Q_t - C||_F over rank-r C;
- calibrated (method loftq_calibrated): the closed form argmin tr((W - Q_t - C) Hd (W - Q_t - C)^T), on the same
  damped H = X^T X + lambda I as the per-layer methods.
Q_1 = quant(W) is the layer already held: it is read back, not quantized again, so T = 1 is exactly the svd
(closed_form) method on the plain base, with the base left as it is.

What the alternation guarantees: each fit step is optimal for its Q, so ||W - Q_t - C_t|| <= ||W - Q_t - C_{t-1}||
(the calibrated objective for the calibrated fit). The quantization step minimizes nothing of the kind: NF4 rounds
each block of W - C to its absmax grid, HQQ fits its own l_p<1 error with scales and zeros of its own, so the
objective may rise from one step to the next; LoftQ returns the last step, as published. `LoftqLayer.errors` keeps
||W - Q_t - C_t||_F for every t (tests/test_loftq.py measures what holds).

Cost per layer and step: one quantization of an m x n matrix (bitsandbytes: one pass; HQQ: its solver's ~20) and
the fit (svd: an eigen-decomposition of the min(m, n)-square Gram matrix; calibrated: the closed form, m n^2 plus
Hd's Cholesky, factored once and kept by the DampedH). On CPU the fit runs in float64, as every per-layer method.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.init_math import DampedH, LowRankErrors
from quailora_app.engine.quantization import bnb, hqq
from quailora_app.engine.quantization.layers import base_of, dequantized_weight
from quailora_app.errors import ConfigError

DEFAULT_ITER = 5
"""T, LoftQ's alternating steps (the setting `loftq_iter`, peft's LoftQConfig name for it): the paper uses 5."""

Requantizer = Callable[[Tensor], nn.Module]
"""quant(weight) -> a new quantized layer of the same quantizer and settings holding it."""


def can_requantize(layer: nn.Module) -> bool:
    """Whether the layer's quantizer can quantize a new weight the same way: bitsandbytes 4-bit or HQQ (a peft LoRA
    layer is read through its base). LLM.int8 layers cannot (LoftQ is a low-bit method)."""
    base = base_of(layer)
    return hqq.is_hqq(base) or bnb.is_4bit(base)


def requantizer(layer: nn.Module) -> Requantizer:
    """quant(.) of the quantized `layer` (or of a peft LoRA layer's base): weight (out x in) -> a new layer of the same
    quantizer, settings, compute dtype, device and bias, whose own product is x Q^T (+ bias)."""
    base = base_of(layer)
    if hqq.is_hqq(base):
        return lambda weight: hqq.requantize(base, weight)
    if bnb.is_4bit(base):
        return lambda weight: bnb.requantize(base, weight)
    raise ConfigError(f"LoftQ quantizes W - C again with the layer's own quantizer: bitsandbytes 4-bit (NF4/FP4) or "
                      f"HQQ; a {type(base).__name__} layer cannot be")


def check_iter(iters: Any) -> int:
    """T, or ConfigError with one line."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq_iter (LoftQ's alternating steps T) must be a whole number of at least 1, "
                          f"got {iters!r}")
    return iters


def iters_of(options: Mapping[str, Any] | None) -> int:
    """T from a method's options (`loftq_iter`), DEFAULT_ITER when not given."""
    return check_iter((options or {}).get("loftq_iter", DEFAULT_ITER))


@dataclass
class LoftqLayer:
    """One layer after T LoftQ steps: the quantized layer holding Q_T (the given layer itself when T = 1) and the
    factors of C_T = P @ Rt (working precision), with ||W - Q_t - C_t||_F at every step t = 1..T and, for t >= 2,
    ||W - Q_t - C_{t-1}||_F before that step's fit (never below the fit's: the invariant the alternation keeps)."""

    layer: nn.Module
    P: Tensor  # (m, r)
    Rt: Tensor  # (r, n)
    errors: list[float] = field(default_factory=list)
    before_fit: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.errors)


def _working(t: Tensor) -> Tensor:
    """`t` in the per-layer math's working precision (init_math's rule): float64 on CPU, float32 elsewhere."""
    return t.to(torch.float64 if t.device.type == "cpu" else torch.float32)


def _fit(E: Tensor, rank: int, spec: DampedH | None, solver: str, EHd: Tensor | None) -> tuple[Tensor, Tensor]:
    if spec is None:
        return init_math.svd_correction(E, rank)
    return init_math.closed_form_correction(E, spec, rank, solver=solver, EHd=EHd)


@torch.no_grad()
def loftq_layer(W: Tensor, layer: nn.Module, rank: int, iters: int = DEFAULT_ITER, *, spec: DampedH | None = None,
                solver: str = "exact", E: Tensor | None = None, EHd: Tensor | None = None,
                quantize: Requantizer | None = None) -> LoftqLayer:
    """T = `iters` LoftQ steps on one layer (see the module): W its full-precision weight (m x n), `layer` the
    quantized layer holding Q_1 = quant(W) (or a peft LoRA layer on one; it is not changed), the svd fit, or the
    calibrated closed form when `spec` (Hd) is given. `E`, `EHd`: W - Q_1 and (W - Q_1) Hd when the caller has them
    (the error report's: T = 1 then gives the svd / closed_form factors bit for bit; EHd is used where closed_form
    would use it). `quantize`: quant(.) (default `requantizer(layer)`)."""
    iters = check_iter(iters)
    quantize = quantize or requantizer(layer)
    current = base_of(layer)
    E = _working(W - dequantized_weight(current).to(W.device)) if E is None else E
    W_work = _working(W)
    errors, before_fit = [], []
    P = Rt = None
    for step in range(1, iters + 1):
        if step > 1:
            target = (W_work - P @ Rt).to(W.dtype)
            current = quantize(target)
            del target
            E = _working(W - dequantized_weight(current).to(W.device))
            EHd = None
            before_fit.append(_norm(E, P, Rt))
        P, Rt = _fit(E, rank, spec, solver, EHd)
        errors.append(_norm(E, P, Rt))
    return LoftqLayer(current, P, Rt, errors, before_fit)


def _norm(E: Tensor, P: Tensor, Rt: Tensor) -> float:
    """||E - P Rt||_F."""
    return float(torch.linalg.matrix_norm(E - P.to(E.dtype) @ Rt.to(E.dtype)))


def residual_errors(meter: LowRankErrors, W: Tensor, layer: nn.Module, sB: Tensor, A: Tensor) -> tuple[float, float]:
    """(weight error, calibrated error) of a re-quantized layer with its correction, as fractions of the plain base's
    (the meter's E = W - Q_1, so that every method's figures share one reference): with R = W - Q_T - s B A,

        ||R||_F / ||E||_F    and    sqrt(tr(R H R^T) / tr(E H E^T)),  tr(R H R^T) = tr(R Hd R^T) - lambda ||R||_F^2

    (the undamped H, as LowRankErrors reports; cost m n^2 for R Hd)."""
    R = _working(W - dequantized_weight(layer).to(W.device)).to(meter.E.dtype)
    R = R - sB.to(R.dtype) @ A.to(R.dtype)
    weight = float((R * R).sum())
    damped = float((meter.h.apply(R.T).T * R).sum())
    calib = damped - meter.h.damping_lambda * weight
    w = (max(weight, 0.0) / meter.weight_base) ** 0.5 if meter.weight_base > 0 else 0.0
    c = (max(calib, 0.0) / meter.calib_base) ** 0.5 if meter.calib_base > 0 else 0.0
    return w, c


# ------------------------------------------------------------------------------------- the registry's requant methods
def loftq_svd(W: Tensor, layer: nn.Module, spec: DampedH, rank: int, *, E: Tensor | None = None,
              EHd: Tensor | None = None, solver: str = "exact", options: Mapping[str, Any] | None = None) -> LoftqLayer:
    """LoftQ as published: T = options["loftq_iter"] steps with the svd fit (spec unused)."""
    return loftq_layer(W, layer, rank, iters_of(options), E=E)


def loftq_calibrated(W: Tensor, layer: nn.Module, spec: DampedH, rank: int, *, E: Tensor | None = None,
                     EHd: Tensor | None = None, solver: str = "exact",
                     options: Mapping[str, Any] | None = None) -> LoftqLayer:
    """LoftQ's alternation with the calibrated closed form as the fit step (T = options["loftq_iter"])."""
    return loftq_layer(W, layer, rank, iters_of(options), spec=spec, solver=solver, E=E, EHd=EHd)
