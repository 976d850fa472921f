"""Every teaching view of one layer at once, from a loaded ViewsContext (no plotting: plots/teaching.py draws them).

The views: 1. inside a layer and 2. why calibration matters (layer_views.py), 3. the rank sweep (rank_sweep.py),
4. the precision trade-off (precision.py); how_it_works.py explains them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from quailora_app.config import ALL_LINEAR
from quailora_app.engine.calibration.calibrate import decoder_layers
from quailora_app.teaching.layer_views import CalibrationView, InsideLayer, calibration_view, corrections, inside_layer
from quailora_app.teaching.precision import PrecisionTable, inventory_of_model, precision_table
from quailora_app.teaching.rank_sweep import DEFAULT_RANKS, RankSweep, rank_sweep, sweep_perplexity
from quailora_app.teaching.snapshot import ViewsContext, block_of, default_layer, layer_names, layer_snapshots


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
                  perplexity_ranks: Sequence[int] = (), reports: Sequence[Mapping] = (),
                  damping: float = 0.01, als_rounds: int = 20, targets: Sequence[str] = (ALL_LINEAR,),
                  progress: Callable[[str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Views:
    """Views 1-4 for `layer` (default: default_layer) at LoRA rank `rank`, for every per-layer method of the
    registry. The rank sweep averages over `sweep_layers` (default: every linear layer in the chosen layer's
    block); `ranks=None` skips it; `perplexity_ranks` (slow) adds held-out perplexity at those ranks. `reports`:
    init report.json dicts for the precision trade-off; `targets`: the layers the perplexity sweep initializes."""
    say = progress or (lambda _msg: None)
    layer = layer or default_layer(ctx.model)
    if sweep_layers is None:
        block_prefix = f"{decoder_layers(ctx.model)[0]}.{block_of(ctx.model, layer)}."
        sweep_layers = [n for n in layer_names(ctx.model) if n.startswith(block_prefix)] if ranks else []
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    last = max(block_of(ctx.model, n) for n in [layer, *sweep_layers])
    say(f"calibrating up to block {last} for {1 + len(set(sweep_layers) - {layer})} layer(s)")
    snaps = layer_snapshots(ctx.model, ctx.checkpoint, ctx.calib_ids, [layer, *sweep_layers], ctx.device,
                            should_stop=should_stop)
    seconds["calibrate"] = time.perf_counter() - t
    snap = snaps[layer]
    t = time.perf_counter()
    say(f"corrections of rank {rank} for {layer}")
    corr = corrections(snap, rank, damping=damping, als_rounds=als_rounds)
    inside = inside_layer(snap, rank, block=block, damping=damping, precomputed=corr)
    calibration = calibration_view(snap, rank, damping=damping, precomputed=corr)
    seconds["layer_views"] = time.perf_counter() - t
    sweep = None
    if ranks and sweep_layers:
        t = time.perf_counter()
        say(f"rank sweep over {len(sweep_layers)} layer(s) at ranks {', '.join(map(str, sorted(set(ranks))))}")
        sweep = rank_sweep([snaps[n] for n in dict.fromkeys(sweep_layers)], ranks, None, damping, als_rounds,
                           should_stop=should_stop)
        seconds["rank_sweep"] = time.perf_counter() - t
        if perplexity_ranks:
            t = time.perf_counter()
            say(f"held-out perplexity at ranks {', '.join(map(str, perplexity_ranks))} "
                "(slow: a full initialization per rank)")
            sweep.perplexity = sweep_perplexity(ctx, perplexity_ranks, targets=targets, damping=damping,
                                                als_rounds=als_rounds, should_stop=should_stop)
            seconds["perplexity"] = time.perf_counter() - t
    precision = precision_table(inventory_of_model(ctx.model), reports, block_size=ctx.quant.block_size)
    return Views(layer, rank, inside, calibration, sweep, precision, seconds)
