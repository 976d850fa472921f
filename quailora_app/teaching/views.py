"""Teaching views: the numbers behind "what does 4-bit do to a layer, and what does each LoRA init win back".

Every view is computed from the user's own model (no plotting here; `teaching_figures` draws them, the UI and
the CLI call both). The views:

1. `inside_layer`:   a layer's weight histogram with the 16 NF4/FP4 levels of one quantization block
                     (code value x that block's absmax), the error E = W - Q and what each correction C removes.
2. `calibration_view`: singular values of E and of E H^1/2, the share of the calibrated error a rank-k
                     correction can remove with and without calibration, and the input channels dominating H.
3. `rank_sweep`:     calibrated error against LoRA rank for svd, quailora and closed_form (mean over layers);
                     `sweep_perplexity` adds held-out perplexity for a few ranks (slow, opt-in).
4. `precision_table`: bytes of the weights per format, measured on real bitsandbytes tensors, against the
                     held-out perplexity of finished init runs (report.json).
5. `how_it_works_markdown`: the method in a page of Markdown with LaTeX, one paragraph per plot.

A layer's W, Q and H come from `layer_snapshots`, which runs the calibration only through the blocks it needs.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quailora_app.engine import init_math
from quailora_app.engine.calibrate import (
    calibrate_blocks, decoder_layers, target_names,
)
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.config import ALL_LINEAR, DataConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.errors import ConfigError
from quailora_app.engine.quantize import dequantized_weight, linear4bit_modules, load_4bit

COMPUTED = ("svd", "quailora", "closed_form")
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)

__all__ = [
    "LayerSnapshot", "layer_snapshots", "layer_snapshot", "layer_names", "default_layer", "ViewsContext", "open_context",
    "Histogram", "histogram", "corrections", "InsideLayer", "inside_layer", "CalibrationView", "calibration_view",
    "weighted_singular_values", "RankSweep", "rank_sweep", "sweep_perplexity", "WeightInventory", "inventory_of_model",
    "inventory_of_checkpoint", "storage_of_quant_state", "model_storage", "format_storage", "MemoryRow",
    "PrecisionTable", "precision_table", "how_it_works_markdown", "Views", "compute_views", "Correction",
]


# ============================================================================================ layer snapshot
@dataclass
class LayerSnapshot:
    """One linear layer as the teaching views need it: full-precision W, the 4-bit Q the layer multiplies by,
    H = X X^T / N of its full-precision inputs on calibration text, and the quantization blocks of Q.

    Blocks: bitsandbytes flattens W row-major and cuts it into runs of `block_size` weights; block b holds
    flat indices [b * block_size, (b + 1) * block_size) and every Q value in it is code[i] * absmax[b]."""

    name: str
    block: int  # decoder block index
    W: torch.Tensor  # (out, in) float32, full precision
    Q: torch.Tensor  # (out, in) float32, dequantized exactly as the 4-bit layer holds it
    H: torch.Tensor  # (in, in) float32
    tokens: int
    quant_type: str  # "nf4" or "fp4"
    block_size: int
    double_quant: bool
    absmax: torch.Tensor  # (n_blocks,) float32, the scale each block's codes are multiplied by (after nested dequant)
    code: torch.Tensor  # (16,) float32, bitsandbytes' code table of quant_type (values in [-1, 1])

    @property
    def E(self) -> torch.Tensor:
        """The quantization error W - Q."""
        return self.W - self.Q

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def n_blocks(self) -> int:
        return int(self.absmax.numel())

    def block_slice(self, b: int) -> slice:
        if not 0 <= b < self.n_blocks:
            raise ConfigError(f"quantization block {b} out of range: layer {self.name} has {self.n_blocks} blocks")
        return slice(b * self.block_size, min((b + 1) * self.block_size, self.W.numel()))

    def levels(self, b: int) -> torch.Tensor:
        """The 16 values a weight of block b can take after quantization: code * absmax[b] (ascending)."""
        dtype = self.Q.dtype
        return torch.sort((self.code.float() * self.absmax[b].float()).to(dtype)).values

    # -- float64 quantities shared by the views, computed once -------------------------------------------
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def E64(self) -> torch.Tensor:
        return self._get("E", lambda: (self.W.double() - self.Q.double()))

    @property
    def H64(self) -> torch.Tensor:
        return self._get("H", lambda: ((self.H.double() + self.H.double().T) / 2))

    @property
    def EH(self) -> torch.Tensor:
        """E @ H (m x n), the one m n^2 product every calibrated figure needs."""
        return self._get("EH", lambda: self.E64 @ self.H64)

    @property
    def calibrated_energy(self) -> float:
        """tr(E H E^T): the calibrated error of plain QLoRA, before normalization."""
        return self._get("trEHE", lambda: float((self.EH * self.E64).sum()))

    def spectrum(self, damping: float = 0.01) -> init_math.HSpectrum:
        """init_math.spectrum(H, damping), cached (the eigen-decomposition is the expensive part)."""
        return self._get(("spectrum", damping), lambda: init_math.spectrum(self.H, damping))

    def errors(self, P: torch.Tensor, Rt: torch.Tensor) -> tuple[float, float]:
        """(weight error, calibrated error) of C = P @ Rt without forming C (D = E - C):
        ||D||^2 = ||E||^2 - 2 <P, E Rt^T> + <P^T P, Rt Rt^T>,
        tr(D H D^T) = tr(E H E^T) - 2 <P, E H Rt^T> + <P^T P, Rt H Rt^T>."""
        E, P, Rt = self.E64, P.double(), Rt.double()
        PP = P.T @ P
        e2 = float((E * E).sum())
        w = e2 - 2 * float((P * (E @ Rt.T)).sum()) + float((PP * (Rt @ Rt.T)).sum())
        t0 = self.calibrated_energy
        c = t0 - 2 * float((P * (self.EH @ Rt.T)).sum()) + float((PP * (Rt @ self.H64 @ Rt.T)).sum())
        werr = math.sqrt(max(w, 0.0) / e2) if e2 > 0 else 0.0
        cerr = math.sqrt(max(c, 0.0) / t0) if t0 > 0 else 0.0
        return werr, cerr


def _quant_state(layer):
    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return data, state


def block_absmax(state) -> torch.Tensor:
    """The per-block scale bitsandbytes multiplies the codes by: absmax, or with double quantization the
    8-bit absmax dequantized through the nested state plus its offset (what dequantize_4bit does)."""
    import bitsandbytes.functional as F

    if state.nested:
        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def layer_names(model, targets: Sequence[str] = (ALL_LINEAR,)) -> list[str]:
    """Full module paths of the linear layers inside the decoder blocks (for a layer picker)."""
    prefix, layers = decoder_layers(model)
    return [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n in target_names(layer, targets)]


def default_layer(model) -> str:
    """A representative layer: the MLP output projection of block 3 (or the last block if fewer), else the
    last linear layer of that block."""
    names = layer_names(model)
    prefix, layers = decoder_layers(model)
    block = min(3, len(layers) - 1)
    inside = [n for n in names if n.startswith(f"{prefix}.{block}.")]
    return next((n for n in inside if n.endswith("down_proj")), inside[-1])


def _parse_block(model, name: str) -> int:
    prefix, layers = decoder_layers(model)
    rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else ""
    head = rest.split(".", 1)[0]
    if not head.isdigit() or int(head) >= len(layers):
        raise ConfigError(f"layer '{name}' is not inside the decoder blocks '{prefix}.<i>'")
    return int(head)


@torch.no_grad()
def layer_snapshots(
    model,
    checkpoint: Checkpoint,
    calib_ids: torch.Tensor,
    names: Sequence[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, LayerSnapshot]:
    """Snapshots of the 4-bit linear layers `names` (full module paths) of the quantized `model`.

    Runs the calibration inputs through the full-precision blocks 0..max(block of names) only, one block at a
    time as calibrate.calibrate_blocks does, accumulating H only in the blocks that hold a requested layer."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError("choose at least one layer")
    modules = linear4bit_modules(model)
    valid = layer_names(model)
    for name in names:
        if name not in valid:
            near = [v for v in valid if v.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3] or valid[:3]
            raise ConfigError(f"layer '{name}' is not a linear layer of the decoder blocks; e.g. {', '.join(near)}")
        if name not in modules:
            raise ConfigError(f"layer '{name}' was not quantized to 4-bit")
    prefix, _ = decoder_layers(model)
    wanted: dict[int, list[str]] = {}
    for name in names:
        wanted.setdefault(_parse_block(model, name), []).append(name)
    only = {index: [n[len(f"{prefix}.{index}."):] for n in inside] for index, inside in wanted.items()}
    out: dict[str, LayerSnapshot] = {}
    for calibrated in calibrate_blocks(model, checkpoint, calib_ids, (), device, dtype, batch_size, should_stop,
                                       only=only, stop_message="while computing the layer view"):
        for group in calibrated.groups:
            for loc in group.names:
                full = f"{calibrated.prefix}.{loc}"
                layer = modules[full]
                _, state = _quant_state(layer)
                out[full] = LayerSnapshot(
                    name=full, block=calibrated.index, W=calibrated.weights[loc].float().cpu(),
                    Q=dequantized_weight(layer).cpu(), H=group.H.float().cpu(), tokens=group.tokens,
                    quant_type=state.quant_type, block_size=int(state.blocksize), double_quant=bool(state.nested),
                    absmax=block_absmax(state).cpu(), code=state.code.float().cpu(),
                )
    return {n: out[n] for n in names}


@dataclass
class ViewsContext:
    """What every view needs, loaded once: the resolved model source, its 4-bit model, the calibration and
    held-out token windows, and the device."""

    source: object  # sources.models.ModelSource
    model: object  # the 4-bit model
    checkpoint: Checkpoint
    calib_ids: torch.Tensor
    eval_ids: torch.Tensor
    device: torch.device
    quant: QuantConfig
    data: DataConfig
    model_cfg: ModelConfig


def open_context(model_cfg: ModelConfig, data_cfg: DataConfig, quant_cfg: QuantConfig) -> ViewsContext:
    """Resolve the model, read and split the dataset, and load the 4-bit model (the slow part, a few seconds)."""
    from quailora_app.engine.preflight import preflight_views
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import compute_dtype, load_config, load_tokenizer, pick_device, resolve_model

    source = resolve_model(model_cfg.model)
    config = load_config(source)
    device = pick_device(model_cfg.device)
    preflight_views(source.name, config, model_cfg, data_cfg, quant_cfg, device)  # before any weight is read
    tokenizer = load_tokenizer(source)
    splits = load_splits(data_cfg, tokenizer)
    Checkpoint(source.folder).check_finite(source.name)
    model = load_4bit(source, quant_cfg, device, compute_dtype(model_cfg.compute_dtype, device))
    return ViewsContext(source, model, Checkpoint(source.folder), splits.calib, splits.eval, device, quant_cfg,
                        data_cfg, model_cfg)


def layer_snapshot(source, quant: QuantConfig, layer_name: str, calib_ids: torch.Tensor, device: torch.device,
                   *, model=None) -> LayerSnapshot:
    """One layer's snapshot; loads the 4-bit model from `source` (a ModelSource) unless `model` is given."""
    if model is None:
        from quailora_app.sources.models import compute_dtype

        model = load_4bit(source, quant, device, compute_dtype("auto", device))
    return layer_snapshots(model, Checkpoint(source.folder), calib_ids, [layer_name], device)[layer_name]


# ====================================================================================== 1. inside a layer
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


def histogram(values: torch.Tensor | np.ndarray, bins: int = 161, range: tuple[float, float] | None = None) -> Histogram:
    """Histogram of every value (range defaults to [min, max], so nothing falls outside)."""
    v = values.detach().double().cpu().numpy().ravel() if isinstance(values, torch.Tensor) else np.asarray(values, float).ravel()
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


def corrections(snap: LayerSnapshot, rank: int, methods: Sequence[str] = COMPUTED, damping: float = 0.01,
                als_rounds: int = 20) -> dict[str, Correction]:
    """Each method's rank-r correction, with the same init_math calls as initialize()."""
    init_math.check_rank(rank, snap.shape, snap.name)
    E = snap.E64
    out = {}
    for m in methods:
        if m == "svd":
            P, Rt = init_math.svd_correction(E, rank)
        elif m == "quailora":
            P, Rt = init_math.quailora_correction(E, snap.spectrum(damping), rank, als_rounds)
        elif m == "closed_form":
            P, Rt = init_math.closed_form_correction(E, snap.spectrum(damping), rank)
        else:
            raise ConfigError(f"method {m!r} has no per-layer correction; choose from {', '.join(COMPUTED)}")
        out[m] = Correction(P.double(), Rt.double())
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


def inside_layer(snap: LayerSnapshot, rank: int = 16, *, block: int | str = "typical", bins: int = 161,
                 methods: Sequence[str] = COMPUTED, damping: float = 0.01, als_rounds: int = 20,
                 precomputed: Mapping[str, Correction] | None = None) -> InsideLayer:
    """View 1. `precomputed`: the result of `corrections()` to reuse (same rank and methods)."""
    corr = dict(precomputed) if precomputed is not None else corrections(snap, rank, methods, damping, als_rounds)
    methods = [m for m in methods if m in corr]
    b = pick_block(snap, block)
    sl = snap.block_slice(b)
    E = snap.E64
    residuals = {"qlora": E, **{m: E - corr[m].C for m in methods}}
    reach = max(float(r.abs().max()) for r in residuals.values())
    err = {m: histogram(r, bins, (-reach, reach)) for m, r in residuals.items()}
    figures = {m: snap.errors(corr[m].P, corr[m].Rt) for m in methods}
    weight_err = {"qlora": 1.0, **{m: f[0] for m, f in figures.items()}}
    calib_err = {"qlora": 1.0, **{m: f[1] for m, f in figures.items()}}
    am = snap.absmax
    return InsideLayer(
        layer=snap.name, shape=snap.shape, quant_type=snap.quant_type, block_size=snap.block_size,
        double_quant=snap.double_quant, rank=rank, block=b, block_absmax=float(am[b]),
        levels=snap.levels(b).double().numpy(), block_weights=snap.W.flatten()[sl].double().numpy(),
        block_quantized=snap.Q.flatten()[sl].double().numpy(), weights=histogram(snap.W, bins),
        error=err, weight_error=weight_err, calibrated_error=calib_err,
        absmax_quantiles={"min": float(am.min()), "median": float(am.median()), "max": float(am.max())},
    )


# =========================================================================== 2. why calibration matters
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


def calibration_view(snap: LayerSnapshot, rank: int = 16, *, top_k: int = 16, methods: Sequence[str] = COMPUTED,
                     damping: float = 0.01, als_rounds: int = 20,
                     precomputed: Mapping[str, Correction] | None = None) -> CalibrationView:
    """View 2. Exact formulas: with E = U diag(s) V^T, the top-k SVD leaves sum_{i>k} s_i^2 v_i^T H v_i of
    tr(E H E^T); the calibrated optimum leaves sum_{i>k} sw_i^2 with sw the singular values of E H^1/2."""
    corr = dict(precomputed) if precomputed is not None else corrections(snap, rank, methods, damping, als_rounds)
    methods = [m for m in methods if m in corr]
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
    channel_error = {"qlora": np.ones(k)}
    for m in methods:
        channel_error[m] = ((E[:, top] - corr[m].P @ corr[m].Rt[:, top]).norm(dim=0) / col_norm).numpy()
    return CalibrationView(
        layer=snap.name, rank=rank, singular_plain=s.numpy(), singular_weighted=sw.numpy(),
        captured_weight_svd=(torch.cumsum(s ** 2, 0) / total_w).numpy(),
        captured_calibrated_svd=(torch.cumsum(gain, 0) / total_c).numpy(),
        captured_calibrated_best=(torch.cumsum(sw ** 2, 0) / total_c).numpy(),
        removed_at_rank={m: 1.0 - snap.errors(corr[m].P, corr[m].Rt)[1] ** 2 for m in methods},
        h_diag=diag.numpy(), top_channels=top.numpy(), top_share=float(diag[top].sum() / diag.sum().clamp(min=1e-300)),
        channel_error=channel_error,
    )


# ============================================================================================ 3. rank sweep
@dataclass
class RankSweep:
    """Calibrated and weight error (1.0 = plain QLoRA) against LoRA rank, mean over `layers`.
    `perplexity[method][rank]` (and "qlora": the 4-bit model without correction) when sweep_perplexity ran."""

    ranks: list[int]
    layers: list[str]
    calibrated_error: dict[str, list[float]]
    weight_error: dict[str, list[float]]
    per_layer: dict[str, dict[str, list[float]]]  # method -> layer -> calibrated error per rank
    perplexity: dict[str, dict[int, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def usable_ranks(ranks: Iterable[int], snaps: Sequence[LayerSnapshot]) -> tuple[list[int], list[str]]:
    """Sorted distinct ranks that every layer allows (r <= min(out, in)), and a note for those dropped."""
    limit = min(min(s.shape) for s in snaps)
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise ConfigError("ranks must be positive integers")
    kept = [r for r in ranks if r <= limit]
    notes = [f"ranks {', '.join(map(str, (r for r in ranks if r > limit)))} skipped: larger than min(out, in) = {limit}"] if len(kept) < len(ranks) else []
    if not kept:
        raise ConfigError(f"every rank is larger than the layers allow (min(out, in) = {limit})")
    return kept, notes


def rank_sweep(snaps: Sequence[LayerSnapshot], ranks: Iterable[int] = DEFAULT_RANKS, methods: Sequence[str] = COMPUTED,
               damping: float = 0.01, als_rounds: int = 20,
               should_stop: Callable[[], bool] | None = None) -> RankSweep:
    """View 3: per layer and rank, each method's correction (the same math as initialize()), averaged over layers.
    svd and closed_form reuse one decomposition per layer across ranks (truncations of the same SVD)."""
    from quailora_app.errors import Cancelled

    snaps = list(snaps)
    if not snaps:
        raise ConfigError("choose at least one layer for the rank sweep")
    ranks, notes = usable_ranks(ranks, snaps)
    top = ranks[-1]
    per = {m: {} for m in methods}
    werr = {m: {} for m in methods}
    for snap in snaps:
        if should_stop and should_stop():
            raise Cancelled("stopped during the rank sweep")
        E = snap.E64
        for m in methods:
            if m == "svd":
                U, S, Vh = init_math._truncated_svd(E, top)
                factors = [(U[:, :r] * S[:r], Vh[:r]) for r in ranks]
            elif m == "closed_form":
                spec = snap.spectrum(damping)
                U, S, Vh = init_math._truncated_svd(E @ spec.sqrt(), top)
                back = Vh @ spec.inv_sqrt()  # rows: the top right singular vectors of E S mapped back by S^-1
                factors = [(U[:, :r] * S[:r], back[:r]) for r in ranks]
            elif m == "quailora":
                factors = [init_math.quailora_correction(E, snap.spectrum(damping), r, als_rounds) for r in ranks]
            else:
                raise ConfigError(f"method {m!r} has no per-layer correction; choose from {', '.join(COMPUTED)}")
            figures = [snap.errors(P, Rt) for P, Rt in factors]
            per[m][snap.name] = [f[1] for f in figures]
            werr[m][snap.name] = [f[0] for f in figures]
    mean = lambda d: [float(np.mean([v[i] for v in d.values()])) for i in range(len(ranks))]  # noqa: E731
    return RankSweep(ranks, [s.name for s in snaps], {m: mean(per[m]) for m in methods},
                     {m: mean(werr[m]) for m in methods}, per, notes=notes)


def sweep_perplexity(ctx: ViewsContext, ranks: Sequence[int], methods: Sequence[str] = ("svd", "quailora", "closed_form"),
                     *, targets: Sequence[str] = (ALL_LINEAR,), damping: float = 0.01, als_rounds: int = 20,
                     eval_batch: int = 4, should_stop: Callable[[], bool] | None = None) -> dict[str, dict[int, float]]:
    """Held-out perplexity of the 4-bit model + each method's initialization at each rank (every target layer
    initialized, as the init run does). Slow: one full calibration pass and one evaluation per method per rank.
    Returns {method: {rank: ppl}} plus "qlora": {0: ppl of the 4-bit model without correction}."""
    from quailora_app.engine.adapters import attach_lora, write_factors
    from quailora_app.engine.evaluate import perplexity
    from quailora_app.engine.initialize import InitResult, initialize, target_paths

    model, out = ctx.model, {m: {} for m in methods}
    out["qlora"] = {0: perplexity(model, ctx.eval_ids, eval_batch)}
    calib_dtype = torch.float32 if ctx.device.type == "cpu" else compute_dtype_of(model)
    for r in sorted(set(ranks)):
        lora = LoraSettings(rank=r, alpha=float(r), targets=tuple(targets))
        paths = target_paths(model, lora)
        result = InitResult()
        for _ in initialize(model, ctx.checkpoint, ctx.calib_ids, lora, methods, result, device=ctx.device,
                            calib_dtype=calib_dtype, damping=damping, als_rounds=als_rounds, should_stop=should_stop):
            pass
        peft_model = attach_lora(model, lora, paths)
        try:
            for m in methods:
                write_factors(peft_model, result.factors[m])
                out[m][r] = perplexity(peft_model, ctx.eval_ids, eval_batch)
        finally:
            model = peft_model.unload()
    ctx.model = model
    return out


def compute_dtype_of(model) -> torch.dtype:
    for layer in linear4bit_modules(model).values():
        return layer.compute_dtype or torch.float32
    return torch.float32


# ===================================================================================== 4. precision trade-off
@dataclass
class WeightInventory:
    """Shapes of the linear layers that get quantized, and the count of every other parameter (embeddings,
    norms, an untied lm_head), which QLoRA keeps in 16-bit."""

    linear_shapes: dict[str, tuple[int, int]]
    other_params: int

    @property
    def linear_params(self) -> int:
        return sum(m * n for m, n in self.linear_shapes.values())


def inventory_of_model(model) -> WeightInventory:
    """From a loaded 4-bit model: its Linear4bit layers, and every other (distinct) parameter."""
    layers = linear4bit_modules(model)
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return WeightInventory({n: (m.out_features, m.in_features) for n, m in layers.items()}, int(other))


def inventory_of_checkpoint(folder: str | Path) -> WeightInventory:
    """From a safetensors folder without loading it: 2-D weights inside the decoder blocks ('.layers.<i>.')
    are the linear layers; everything else counts as other parameters (a tied lm_head is stored once)."""
    import re

    from safetensors import safe_open

    ck = Checkpoint(folder)
    shapes, other = {}, 0
    for key in ck.keys():
        with safe_open(ck._file_of[key], framework="pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        if len(shape) == 2 and key.endswith(".weight") and re.search(r"\.layers\.\d+\.", key):
            shapes[key[: -len(".weight")]] = shape
        else:
            other += int(np.prod(shape)) if shape else 1
    return WeightInventory(shapes, other)


def _nbytes(t) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def storage_of_quant_state(packed: torch.Tensor, state) -> dict[str, int]:
    """Bytes a 4-bit weight really occupies: the packed codes (two per byte), the per-block absmax (float32, or
    uint8 with double quantization), the nested statistics (float32 absmax of each 256 absmax + the offset)
    and the code tables (16 floats; 256 floats for the nested 8-bit code), all as bitsandbytes holds them."""
    nested = state.state2 if state.nested else None
    return {
        "codes": _nbytes(packed),
        "absmax": _nbytes(state.absmax),
        "nested": _nbytes(nested.absmax) + _nbytes(state.offset) if nested is not None else 0,
        "tables": _nbytes(state.code) + (_nbytes(nested.code) if nested is not None else 0),
    }


def model_storage(model) -> dict[str, int]:
    """Summed storage breakdown of every Linear4bit layer of a loaded model, plus 'params' (their weights count)."""
    total = {"codes": 0, "absmax": 0, "nested": 0, "tables": 0, "params": 0}
    for layer in linear4bit_modules(model).values():
        data, state = _quant_state(layer)
        for k, v in storage_of_quant_state(data, state).items():
            total[k] += v
        total["params"] += layer.out_features * layer.in_features
    return total


_STORAGE_CACHE: dict[tuple, dict[str, int]] = {}

#: format key -> (label, bits of the non-quantized parameters)
FORMATS = {
    "fp32": ("32-bit float", 32),
    "bf16": ("16-bit (bf16 / fp16)", 16),
    "int8": ("8-bit LLM.int8", 16),
    "nf4": ("NF4", 16),
    "nf4+dq": ("NF4 + double quant", 16),
    "fp4": ("FP4", 16),
    "fp4+dq": ("FP4 + double quant", 16),
}


def format_storage(shape: tuple[int, int], fmt: str, block_size: int = 64) -> dict[str, int]:
    """Storage breakdown of one (out x in) weight in format `fmt` (a FORMATS key). The 4-bit formats are
    measured by quantizing a random tensor of that shape with bitsandbytes (storage depends only on the shape);
    int8 is LLM.int8's layout: int8 weights plus one float32 scale per output row."""
    m, n = int(shape[0]), int(shape[1])
    if fmt == "fp32":
        return {"codes": 4 * m * n}
    if fmt == "bf16":
        return {"codes": 2 * m * n}
    if fmt == "int8":
        return {"codes": m * n, "absmax": 4 * m}
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    key = (m, n, fmt, block_size)
    if key not in _STORAGE_CACHE:
        import bitsandbytes.functional as F

        quant, dq = fmt.split("+")[0], fmt.endswith("+dq")
        packed, state = F.quantize_4bit(torch.randn(m, n, generator=torch.Generator().manual_seed(0)),
                                        blocksize=block_size, compress_statistics=dq, quant_type=quant)
        _STORAGE_CACHE[key] = storage_of_quant_state(packed, state)
    return dict(_STORAGE_CACHE[key])


@dataclass
class MemoryRow:
    key: str  # FORMATS key, or "<format> + <method>" with an adapter
    label: str
    linear_bytes: int  # the quantized (or not) linear layers
    other_bytes: int  # embeddings, norms, ... (16-bit, 32-bit for fp32)
    adapter_bytes: int  # LoRA A and B in float32 (0 without)
    breakdown: dict[str, int]  # codes / absmax / nested / tables of the linear layers
    perplexity: float | None = None
    perplexity_from: str = ""  # which report and key the perplexity came from

    @property
    def total_bytes(self) -> int:
        return self.linear_bytes + self.other_bytes + self.adapter_bytes


@dataclass
class PrecisionTable:
    rows: list[MemoryRow]
    linear_params: int
    other_params: int
    block_size: int
    notes: list[str] = field(default_factory=list)

    HEADER = ("format", "bits / linear weight", "linear layers (MiB)", "other weights (MiB)", "LoRA adapter (MiB)",
              "total (MiB)", "held-out perplexity")

    def bits_per_param(self, row: MemoryRow) -> float:
        """Bits per weight of the linear layers, everything they store included (+ adapter when present)."""
        return 8.0 * (row.linear_bytes + row.adapter_bytes) / max(self.linear_params, 1)

    def table_rows(self) -> list[list[str]]:
        """Formatted rows (HEADER order) for a table widget or a terminal."""
        mib = lambda b: f"{b / 2**20:,.2f}"  # noqa: E731
        return [[r.label, f"{self.bits_per_param(r):.3f}", mib(r.linear_bytes), mib(r.other_bytes),
                 mib(r.adapter_bytes) if r.adapter_bytes else "–", mib(r.total_bytes),
                 f"{r.perplexity:.2f}" if r.perplexity is not None else "–"] for r in self.rows]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self.table_rows()]
        return "\n".join(lines)


def _read_report(report: Mapping | str | Path) -> tuple[dict, str]:
    if isinstance(report, Mapping):
        return dict(report), str(report.get("run_dir", "report"))
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read init report {path}: {exc}") from None


def _report_format(report: Mapping) -> tuple[str, int]:
    quant = (report.get("settings") or {}).get("quant") or {}
    fmt = quant.get("quant", "nf4") + ("+dq" if quant.get("double_quant", True) else "")
    return fmt, int(quant.get("block_size", 64))


def precision_table(inventory: WeightInventory, reports: Sequence[Mapping | str | Path] = (), *, block_size: int = 64,
                    formats: Sequence[str] = tuple(FORMATS), adapter_methods: Sequence[str] = ("quailora",)) -> PrecisionTable:
    """View 4: memory of the weights per format, and the held-out perplexity each finished init report measured
    for it: "full" -> fp32, "int8" -> int8, "qlora" -> the report's 4-bit format, and each of `adapter_methods`
    -> that format + a LoRA adapter of the report's rank on the report's layers."""
    linear_params = inventory.linear_params
    shape_counts: dict[tuple[int, int], int] = {}
    for shape in inventory.linear_shapes.values():
        shape_counts[tuple(shape)] = shape_counts.get(tuple(shape), 0) + 1
    rows: dict[str, MemoryRow] = {}
    for fmt in formats:
        label, other_bits = FORMATS[fmt]
        breakdown: dict[str, int] = {}
        for shape, count in shape_counts.items():
            for k, v in format_storage(shape, fmt, block_size).items():
                breakdown[k] = breakdown.get(k, 0) + count * v
        rows[fmt] = MemoryRow(fmt, label, sum(breakdown.values()), inventory.other_params * other_bits // 8, 0, breakdown)
    notes, seen_eval = [], set()
    extra: list[MemoryRow] = []
    for report in reports:
        rep, origin = _read_report(report)
        shapes = {row["name"]: tuple(row["shape"]) for row in rep.get("layers") or [] if "name" in row and "shape" in row}
        if any(inventory.linear_shapes.get(name, shape) != shape for name, shape in shapes.items()) or (
                shapes and not set(shapes) & set(inventory.linear_shapes)):
            notes.append(f"{origin} skipped: its layers do not match this model ({rep.get('model', '?')})")
            continue
        ppl = {k: v for k, v in (rep.get("perplexity") or {}).items() if v is not None}
        fmt, bs = _report_format(rep)
        data = (rep.get("settings") or {}).get("data") or {}
        seen_eval.add((rep.get("dataset"), data.get("seq_len"), data.get("eval_tokens"), data.get("seed")))
        if bs != block_size:
            notes.append(f"{origin}: quantized with blocks of {bs}, the table assumes {block_size}")
        for key, target in (("full", "fp32"), ("int8", "int8"), ("qlora", fmt)):
            if key in ppl and target in rows and rows[target].perplexity is None:
                rows[target].perplexity, rows[target].perplexity_from = ppl[key], f"{origin}: {key}"
        rank = rep.get("rank")
        for method in adapter_methods:
            if method not in ppl or fmt not in rows or not rank:
                continue
            adapter = sum(4 * int(rank) * (int(row["shape"][0]) + int(row["shape"][1])) for row in rep.get("layers") or [])
            base = rows[fmt]
            extra.append(MemoryRow(f"{fmt}+{method}", f"{base.label} + {method} adapter (r={rank})", base.linear_bytes,
                                   base.other_bytes, adapter, base.breakdown, ppl[method], f"{origin}: {method}"))
    if len(seen_eval) > 1:
        notes.append("the reports measured perplexity on different held-out text (dataset, seq-len, eval tokens or "
                     "seed differ): compare their perplexities with care")
    return PrecisionTable([*rows.values(), *extra], linear_params, inventory.other_params, block_size, notes)


# ========================================================================================= 5. how it works
def how_it_works_markdown(rank: int | None = None) -> str:
    """The method in one page of Markdown (LaTeX between $$ ... $$ and $ ... $), one paragraph per plot."""
    r = str(rank) if rank else "r"
    rtxt = f"r = {rank}" if rank else "r"
    return rf"""
## How it works

**4-bit weights (plot: *Inside a layer: weights and the quantization grid*).** bitsandbytes cuts each weight
matrix into blocks of 64 consecutive weights. A block stores one scale, its largest magnitude (*absmax*), and for
each weight a 4-bit index into a fixed table of 16 values $c_1, \dots, c_{{16}}$ in $[-1, 1]$ (NF4: the quantiles
of a normal distribution; FP4: a tiny floating-point format). The weight becomes
$$Q_{{ij}} = c_{{k(ij)}} \cdot \mathrm{{absmax}}_{{\text{{block}}}},$$
the nearest of the 16 levels. The plot overlays those 16 levels of one block on the histogram of the layer's
weights: a single large weight stretches the absmax, spreading the levels and leaving the many small weights
with a coarse grid. *Double quantization* stores the absmax themselves in 8 bits (one float32 per 256 blocks).

**The error (plot: *Quantization error E = W − Q and what each correction removes*).** The 4-bit layer computes
$Qx$ instead of $Wx$; the error matrix is $E = W - Q$. LoRA adds a low-rank term: peft computes
$$y = Qx + s\,BAx, \qquad A \in \mathbb{{R}}^{{r \times n}},\ B \in \mathbb{{R}}^{{m \times r}},\ s = \alpha / r.$$
Plain QLoRA starts with $B = 0$, so the whole error is still there. A quantization-aware initialization picks
$A, B$ so that $C = sBA$ cancels part of $E$ before training starts. The histogram shows $E$ and $E - C$ for each
method; the legend gives how much of it is left.

**What to cancel: the calibrated objective (plot: *Singular values of E and E·H½*).** Not every part of $E$ matters
equally: only $E x$ reaches the next layer. With $X$ the layer's inputs in the full-precision model on
calibration text and $H = XX^\top/N$,
$$\min_{{\operatorname{{rank}}(C) \le r}} \; \mathrm{{tr}}\big((E - C)\,H\,(E - C)^\top\big) = \big\|(E - C)\,H^{{1/2}}\big\|_F^2 .$$
The figures report the *calibrated error* $\sqrt{{\mathrm{{tr}}((E-C)H(E-C)^\top) / \mathrm{{tr}}(EHE^\top)}}$
(1 = plain QLoRA). The uncalibrated choice, the truncated SVD of $E$, spends its {rtxt} directions on the largest
singular values of $E$; the calibrated one on those of $EH^{{1/2}}$. Their spectra differ: $EH^{{1/2}}$ is much
more concentrated, so a few directions capture most of what the model actually feels.

**Where the rank-{r} budget goes (plot: *Share of the error a rank-k correction removes*).** Write
$E = \sum_i \sigma_i u_i v_i^\top$. The SVD correction of rank $k$ removes $\sum_{{i \le k}} \sigma_i^2\, v_i^\top H v_i$
of $\mathrm{{tr}}(EHE^\top)$, while the best calibrated correction removes $\sum_{{i \le k}} \tilde\sigma_i^2$, with
$\tilde\sigma_i$ the singular values of $EH^{{1/2}}$. The gap between the two curves is what calibration buys.

**Closed form.** With $S = (H + \lambda I)^{{1/2}}$ ($\lambda$ a small damping that keeps $S$ invertible), $CS$
ranges over all rank-$r$ matrices, so the optimum is the truncated SVD of $ES$ mapped back:
$$C^\star = \big[\mathrm{{SVD}}_r(E S)\big]\, S^{{-1}}.$$

**QuAILoRA's alternating least squares.** The paper solves the same problem iteratively with $C = PR^\top$,
starting from the SVD of $E$ and alternating 20 times
$$P \leftarrow E H R\,(R^\top H R)^{{-1}}, \qquad R^\top \leftarrow (P^\top P)^{{-1}} P^\top E,$$
each step the exact least-squares optimum of one factor with the other fixed, so the objective never increases; it
converges to the closed form. Finally $C = U\Sigma V^\top$ is split as $B = U\Sigma^{{1/2}}/\sqrt s$,
$A = \Sigma^{{1/2}}V^\top/\sqrt s$, so that $sBA = C$ exactly.

**Outlier channels (plot: *Input channels that dominate H*).** $H_{{jj}}$ is the mean squared activation of input
channel $j$. In transformers a handful of channels often carry activations far larger than the rest; an error in the
weight column of such a channel is amplified in every output. The calibrated methods concentrate their correction
on those columns; the right panel shows the share of each column's error left.

**Rank sweep (plot: *Calibrated error against LoRA rank*).** The same corrections at ranks 1 to 64, averaged over
the chosen layers: the closed form is optimal at every rank, QuAILoRA follows it, and the SVD of $E$ lags far
behind because it optimizes the weights, not the outputs. Held-out perplexity, when computed, shows how much of
the layer-level gain reaches the model.

**Precision trade-off (plot: *Memory of the weights against held-out perplexity*).** Bytes of the weights per
format, measured on bitsandbytes' own tensors: 4-bit codes (0.5 byte per weight) plus one absmax per block of 64
(float32: +0.5 bit per weight; with double quantization 8-bit: +0.127 bit), against the perplexity measured by init
runs. A QuAILoRA adapter costs $4\,r(m+n)$ bytes per layer and moves the 4-bit point toward the 8-bit one.
""".strip()


# ============================================================================================ all views
@dataclass
class Views:
    """Every view for one layer, as `compute_views` returns them (the figures take these one by one)."""

    layer: str
    rank: int
    inside: InsideLayer
    calibration: CalibrationView
    sweep: RankSweep | None
    precision: PrecisionTable
    seconds: dict[str, float] = field(default_factory=dict)


def compute_views(ctx: ViewsContext, layer: str | None = None, rank: int = 16, *, block: int | str = "typical",
                  sweep_layers: Sequence[str] | None = None, ranks: Sequence[int] | None = DEFAULT_RANKS,
                  perplexity_ranks: Sequence[int] = (), reports: Sequence[Mapping | str | Path] = (),
                  damping: float = 0.01, als_rounds: int = 20, targets: Sequence[str] = (ALL_LINEAR,),
                  progress: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Views:
    """Views 1-4 for `layer` (default: default_layer) at LoRA rank `rank`. The rank sweep averages over
    `sweep_layers` (default: every linear layer in the chosen layer's block); `ranks=None` skips it;
    `perplexity_ranks` (slow) adds held-out perplexity at those ranks. `reports`: init report.json files, run
    folders or report dicts for the precision trade-off; `targets`: the layers the perplexity sweep initializes."""
    import time

    say = progress or (lambda _msg: None)
    layer = layer or default_layer(ctx.model)
    prefix, _ = decoder_layers(ctx.model)
    if sweep_layers is None:
        block_prefix = f"{prefix}.{_parse_block(ctx.model, layer)}."
        sweep_layers = [n for n in layer_names(ctx.model) if n.startswith(block_prefix)] if ranks else []
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    say(f"calibrating up to block {max(_parse_block(ctx.model, n) for n in [layer, *sweep_layers])} for {1 + len(set(sweep_layers) - {layer})} layer(s)")
    snaps = layer_snapshots(ctx.model, ctx.checkpoint, ctx.calib_ids, [layer, *sweep_layers], ctx.device,
                            should_stop=should_stop)
    seconds["calibrate"] = time.perf_counter() - t
    snap = snaps[layer]
    t = time.perf_counter()
    say(f"corrections of rank {rank} for {layer}")
    corr = corrections(snap, rank, COMPUTED, damping, als_rounds)
    inside = inside_layer(snap, rank, block=block, precomputed=corr)
    calibration = calibration_view(snap, rank, precomputed=corr)
    seconds["layer_views"] = time.perf_counter() - t
    sweep = None
    if ranks and sweep_layers:
        t = time.perf_counter()
        say(f"rank sweep over {len(sweep_layers)} layer(s) at ranks {', '.join(map(str, sorted(set(ranks))))}")
        sweep = rank_sweep([snaps[n] for n in dict.fromkeys(sweep_layers)], ranks, COMPUTED, damping, als_rounds,
                           should_stop=should_stop)
        seconds["rank_sweep"] = time.perf_counter() - t
        if perplexity_ranks:
            t = time.perf_counter()
            say(f"held-out perplexity at ranks {', '.join(map(str, perplexity_ranks))} (slow: a full initialization per rank)")
            sweep.perplexity = sweep_perplexity(ctx, perplexity_ranks, targets=targets, damping=damping,
                                                als_rounds=als_rounds, should_stop=should_stop)
            seconds["perplexity"] = time.perf_counter() - t
    precision = precision_table(inventory_of_model(ctx.model), reports, block_size=ctx.quant.block_size)
    return Views(layer, rank, inside, calibration, sweep, precision, seconds)
