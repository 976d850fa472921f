"""Views 1 and 2 of one layer: what 4-bit does to its weights, and why the calibrated corrections win.

1. `inside_layer`: the weight histogram with the 16 NF4/FP4 levels of one quantization block (code value x that
   block's absmax), the error E = W - Q and what each correction C removes.
2. `calibration_view`: singular values of E and of E H^1/2, the share of the calibrated error a rank-k
   correction can remove with and without calibration, and the input channels dominating H.

Every correction is the engine's (engine/methods/registry.py, on the damped H initialize() uses) and every error figure
is the engine's meter (init_math.LowRankErrors).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.registry import QLORA, Method, find_method, per_layer_names
from quailora_app.errors import ConfigError
from quailora_app.teaching.snapshot import LayerSnapshot


@dataclass
class Histogram:
    """Counts of values in bins [edges[i], edges[i+1]) (the last bin closed); counts sum to the values given."""

    edges: np.ndarray
    counts: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    @property
    def width(self) -> float:
        return float(self.edges[1] - self.edges[0])

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def histogram(values: torch.Tensor | np.ndarray, bins: int = 161,
              range: tuple[float, float] | None = None) -> Histogram:
    """Histogram of every value (range defaults to [min, max], so nothing falls outside)."""
    if isinstance(values, torch.Tensor):
        v = values.detach().double().cpu().numpy().ravel()
    else:
        v = np.asarray(values, float).ravel()
    lo, hi = range if range is not None else (float(v.min()), float(v.max()))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return Histogram(edges, counts)


@dataclass
class Correction:
    """A low-rank correction C = P @ Rt (P: out x r, Rt: r x in, float64)."""

    P: torch.Tensor
    Rt: torch.Tensor

    @property
    def C(self) -> torch.Tensor:
        return self.P @ self.Rt


def per_layer_method(name: str) -> Method:
    """The registered method `name`, which must be computed per layer (a ConfigError otherwise)."""
    method = find_method(name)
    if method is None or not method.per_layer:
        raise ConfigError(f"method {name!r} has no per-layer correction; choose from {', '.join(per_layer_names())}")
    return method


def corrections(snap: LayerSnapshot, rank: int, methods: Sequence[str] | None = None, damping: float = 0.01,
                als_rounds: int = 20) -> dict[str, Correction]:
    """Each method's rank-r correction (default: every per-layer method), as initialize() computes it."""
    init_math.check_rank(rank, snap.shape, snap.name)
    spec = snap.damped(damping)
    out = {}
    for name in per_layer_names() if methods is None else methods:
        P, Rt = per_layer_method(name).correction(snap.E64, spec, rank, als_rounds=als_rounds)
        out[name] = Correction(P.double(), Rt.double())
    return out


@dataclass
class InsideLayer:
    """View 1 for one layer: weights and the quantization grid of one block, the error and what each
    correction removes. `error` maps "qlora" (E itself, no correction) and each method (E - C) to a histogram
    on shared bins."""

    layer: str
    shape: tuple[int, int]
    quant_type: str
    block_size: int
    double_quant: bool
    rank: int
    block: int  # the quantization block whose levels are shown
    block_absmax: float
    levels: np.ndarray  # (16,) code * absmax of that block, ascending
    block_weights: np.ndarray  # W of that block (full precision)
    block_quantized: np.ndarray  # Q of that block (each one of `levels`)
    weights: Histogram  # every weight of the layer
    error: dict[str, Histogram]
    weight_error: dict[str, float]  # ||E - C||_F / ||E||_F
    calibrated_error: dict[str, float]  # sqrt(tr((E-C) H (E-C)^T) / tr(E H E^T))
    absmax_quantiles: dict[str, float]  # min / median / max of the layer's block absmax


def pick_block(snap: LayerSnapshot, block: int | str = "typical") -> int:
    """'typical' = the block with the median absmax, 'outlier' = the block with the largest absmax, or an index."""
    if isinstance(block, str):
        order = torch.argsort(snap.absmax)
        if block == "typical":
            return int(order[len(order) // 2])
        if block == "outlier":
            return int(order[-1])
        raise ConfigError(f"block must be an index, 'typical' or 'outlier', not {block!r}")
    snap.block_slice(int(block))
    return int(block)


def _computed(snap: LayerSnapshot, rank: int, methods: Sequence[str] | None, damping: float, als_rounds: int,
              precomputed: Mapping[str, Correction] | None) -> dict[str, Correction]:
    """`precomputed` restricted to `methods` (all of it when None), else corrections() of them."""
    if precomputed is None:
        return corrections(snap, rank, methods, damping, als_rounds)
    return {m: c for m, c in precomputed.items() if methods is None or m in methods}


def inside_layer(snap: LayerSnapshot, rank: int = 16, *, block: int | str = "typical", bins: int = 161,
                 methods: Sequence[str] | None = None, damping: float = 0.01, als_rounds: int = 20,
                 precomputed: Mapping[str, Correction] | None = None) -> InsideLayer:
    """View 1. `precomputed`: the result of `corrections()` to reuse (same rank)."""
    corr = _computed(snap, rank, methods, damping, als_rounds, precomputed)
    b = pick_block(snap, block)
    sl = snap.block_slice(b)
    E = snap.E64
    residuals = {QLORA: E, **{m: E - c.C for m, c in corr.items()}}
    reach = max(float(r.abs().max()) for r in residuals.values())
    err = {m: histogram(r, bins, (-reach, reach)) for m, r in residuals.items()}
    meter = snap.meter(damping)
    figures = {m: meter.errors(c.P, c.Rt) for m, c in corr.items()}
    weight_err = {QLORA: 1.0, **{m: f[0] for m, f in figures.items()}}
    calib_err = {QLORA: 1.0, **{m: f[1] for m, f in figures.items()}}
    am = snap.absmax
    return InsideLayer(
        layer=snap.name, shape=snap.shape, quant_type=snap.quant_type, block_size=snap.block_size,
        double_quant=snap.double_quant, rank=rank, block=b, block_absmax=float(am[b]),
        levels=snap.levels(b).double().numpy(), block_weights=snap.W.flatten()[sl].double().numpy(),
        block_quantized=snap.Q.flatten()[sl].double().numpy(), weights=histogram(snap.W, bins),
        error=err, weight_error=weight_err, calibrated_error=calib_err,
        absmax_quantiles={"min": float(am.min()), "median": float(am.median()), "max": float(am.max())},
    )


def _sqrt_psd(H: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of the undamped PSD H (eigenvalues clamped at 0), float64."""
    H = H.double()
    w, V = torch.linalg.eigh((H + H.T) / 2)
    return (V * w.clamp(min=0).sqrt()) @ V.T


def _singular_values_and_right_vectors(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors (rows of Vh) of E, via the Gram matrix E E^T
    when E is wide (one eigh of the smaller side, float64)."""
    m, n = E.shape
    if m < n:
        w, U = torch.linalg.eigh(E @ E.T)
        w, U = w.flip(0).clamp(min=0), U.flip(1)
        s = w.sqrt()
        Vh = (U.T @ E) / s.clamp(min=1e-300)[:, None]
        return s, Vh
    _, s, Vh = torch.linalg.svd(E, full_matrices=False)
    return s, Vh


def weighted_singular_values(M: torch.Tensor, H: torch.Tensor, MH: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of M H^1/2 (undamped H), descending. Their squares sum to tr(M H M^T), the calibrated
    objective. Computed from the smaller Gram matrix: M H M^T (m <= n) or H^1/2 M^T M H^1/2 (m > n), in float64;
    `MH`: M @ H if already at hand."""
    M, H = M.double(), H.double()
    m, n = M.shape
    if m <= n:
        G = (M @ H if MH is None else MH.double()) @ M.T
    else:
        S = _sqrt_psd(H)
        G = S @ (M.T @ M) @ S
    w = torch.linalg.eigvalsh((G + G.T) / 2).flip(0).clamp(min=0)
    return w.sqrt()


@dataclass
class CalibrationView:
    """View 2 for one layer.

    captured_* arrays hold, for k = 1..K, the share of a quantity that a rank-k correction removes:
      weight_svd:        ||E||_F^2 removed by the top-k SVD of E (what the uncalibrated svd optimizes);
      calibrated_svd:    tr(E H E^T) removed by that same uncalibrated correction;
      calibrated_best:   tr(E H E^T) removed by the calibrated optimum (top-k directions of E H^1/2).
    `removed_at_rank`: 1 - calibrated_error^2 of each method's actual rank-r correction (damped H)."""

    layer: str
    rank: int
    singular_plain: np.ndarray  # singular values of E, descending
    singular_weighted: np.ndarray  # singular values of E H^1/2, descending
    captured_weight_svd: np.ndarray
    captured_calibrated_svd: np.ndarray
    captured_calibrated_best: np.ndarray
    removed_at_rank: dict[str, float]
    h_diag: np.ndarray  # diag(H), per input channel
    top_channels: np.ndarray  # indices of the top_k channels by diag(H), descending
    top_share: float  # share of tr(H) in those channels
    channel_error: dict[str, np.ndarray]  # per top channel j: ||(E - C)[:, j]|| / ||E[:, j]|| (qlora = 1)


def calibration_view(snap: LayerSnapshot, rank: int = 16, *, top_k: int = 16, methods: Sequence[str] | None = None,
                     damping: float = 0.01, als_rounds: int = 20,
                     precomputed: Mapping[str, Correction] | None = None) -> CalibrationView:
    """View 2. Exact formulas: with E = U diag(s) V^T, the top-k SVD leaves sum_{i>k} s_i^2 v_i^T H v_i of
    tr(E H E^T); the calibrated optimum leaves sum_{i>k} sw_i^2 with sw the singular values of E H^1/2."""
    corr = _computed(snap, rank, methods, damping, als_rounds, precomputed)
    E, H = snap.E64, snap.H64
    s, Vh = _singular_values_and_right_vectors(E)
    sw = weighted_singular_values(E, H, snap.EH)
    total_w = float((s ** 2).sum()) or 1.0
    total_c = float((sw ** 2).sum()) or 1.0
    gain = (s ** 2) * ((Vh @ H) * Vh).sum(dim=1)  # s_i^2 v_i^T H v_i
    diag = H.diagonal()
    k = min(top_k, diag.numel())
    top = torch.argsort(diag, descending=True)[:k]
    col_norm = E[:, top].norm(dim=0).clamp(min=1e-300)
    channel_error = {QLORA: np.ones(k)}
    for m, c in corr.items():
        channel_error[m] = ((E[:, top] - c.P @ c.Rt[:, top]).norm(dim=0) / col_norm).numpy()
    meter = snap.meter(damping)
    return CalibrationView(
        layer=snap.name, rank=rank, singular_plain=s.numpy(), singular_weighted=sw.numpy(),
        captured_weight_svd=(torch.cumsum(s ** 2, 0) / total_w).numpy(),
        captured_calibrated_svd=(torch.cumsum(gain, 0) / total_c).numpy(),
        captured_calibrated_best=(torch.cumsum(sw ** 2, 0) / total_c).numpy(),
        removed_at_rank={m: 1.0 - meter.errors(c.P, c.Rt)[1] ** 2 for m, c in corr.items()},
        h_diag=diag.numpy(), top_channels=top.numpy(), top_share=float(diag[top].sum() / diag.sum().clamp(min=1e-300)),
        channel_error=channel_error,
    )
