"""View 3: calibrated error against LoRA rank for every per-layer method (mean over layers), and optionally the
held-out perplexity of the 4-bit model + each initialization at a few ranks (slow, opt-in)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from quailora_app.config import ALL_LINEAR, LoraSettings
from quailora_app.engine.adapters import attach_lora, write_factors
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.evaluation.evaluate import perplexity
from quailora_app.engine.methods.registry import QLORA, per_layer_names
from quailora_app.engine.quantization.layers import calibration_dtype
from quailora_app.errors import Cancelled, ConfigError
from quailora_app.teaching.layer_views import per_layer_method
from quailora_app.teaching.snapshot import LayerSnapshot, ViewsContext

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


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
    dropped = [r for r in ranks if r > limit]
    notes = [f"ranks {', '.join(map(str, dropped))} skipped: larger than min(out, in) = {limit}"] if dropped else []
    if not kept:
        raise ConfigError(f"every rank is larger than the layers allow (min(out, in) = {limit})")
    return kept, notes


def rank_sweep(snaps: Sequence[LayerSnapshot], ranks: Iterable[int] = DEFAULT_RANKS,
               methods: Sequence[str] | None = None, damping: float = 0.01, als_rounds: int = 20,
               should_stop: Callable[[], bool] | None = None) -> RankSweep:
    """View 3: per layer and rank, each method's correction (default: every per-layer method, as initialize()
    computes them) measured by the engine's meter, averaged over layers. A nested method (svd, closed_form) is
    decomposed once per layer and truncated to each rank (Method.sweep)."""
    snaps = list(snaps)
    if not snaps:
        raise ConfigError("choose at least one layer for the rank sweep")
    ranks, notes = usable_ranks(ranks, snaps)
    chosen = [per_layer_method(m) for m in (per_layer_names() if methods is None else methods)]
    per = {m.name: {} for m in chosen}
    werr = {m.name: {} for m in chosen}
    for snap in snaps:
        if should_stop and should_stop():
            raise Cancelled("stopped during the rank sweep")
        spec, meter = snap.damped(damping), snap.meter(damping)
        for method in chosen:
            figures = [meter.errors(P, Rt) for P, Rt in method.sweep(snap.E64, spec, ranks, als_rounds=als_rounds)]
            per[method.name][snap.name] = [f[1] for f in figures]
            werr[method.name][snap.name] = [f[0] for f in figures]
    mean = lambda d: [float(np.mean([v[i] for v in d.values()])) for i in range(len(ranks))]  # noqa: E731
    return RankSweep(ranks, [s.name for s in snaps], {m: mean(v) for m, v in per.items()},
                     {m: mean(v) for m, v in werr.items()}, per, notes=notes)


def sweep_perplexity(ctx: ViewsContext, ranks: Sequence[int], methods: Sequence[str] | None = None,
                     *, targets: Sequence[str] = (ALL_LINEAR,), damping: float = 0.01, als_rounds: int = 20,
                     eval_batch: int = 4, should_stop: Callable[[], bool] | None = None) -> dict[str, dict[int, float]]:
    """Held-out perplexity of the 4-bit model + each method's initialization at each rank (every target layer
    initialized, as the init run does; default: every per-layer method). Slow: one full calibration pass and one
    evaluation per method per rank. Returns {method: {rank: ppl}} plus "qlora": {0: ppl without correction}."""
    methods = per_layer_names() if methods is None else tuple(methods)
    model, out = ctx.model, {m: {} for m in methods}
    out[QLORA] = {0: perplexity(model, ctx.eval_ids, eval_batch)}
    calib_dtype = calibration_dtype(model, ctx.device)
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
