"""Ranks under a budget: the closed form with per-layer ranks chosen to remove the most calibrated error at the LoRA
parameter count of uniform rank r (the registry's whole-model method `budget`).

The gain curves. With Hd = H + lambda I = L L^T, the best rank-k correction of layer l is the closed form
C_k = SVD_k(E L) L^-1, and the corrections are nested: C_k = P[:, :k] @ Rt[:k] for the factors (P, Rt) at any larger
rank K (init_math.closed_form_correction). Its damped objective left is the tail sum sum_{i>k} sigma_i^2 of the
squared singular values of E L, so the removed error is concave in k. The curves here are built from the figure
the report shows, the undamped objective tr((E - C_k) H (E - C_k)^T) of those same corrections, which is concave up
to the damping's small effect; every prefix's error comes at once from K x K Gram matrices
(init_math.LowRankErrors.errors_by_rank), so one closed form at K_l = min(4 r_l, m_l, n_l) per layer gives the
whole curve g_l(k), k = 0..K_l.

The allocation. Rank k on an (m x n) layer costs k (m + n) LoRA parameters (A: k x n, B: m x k). Choose ranks
    maximize  sum_l g_l(k_l)   subject to   sum_l k_l (m_l + n_l) <= B = sum_l r_l (m_l + n_l),   k_min <= k_l <= K_l,
where B is exactly the parameter count of the plan's ranks r_l (uniform rank r in the init flow), so a budgeted
adapter never holds more parameters than the uniform one. k_min = 1 by default: peft's rank_pattern needs r >= 1,
and every layer then keeps at least one direction that fine-tuning can move.

This is a multiple-choice knapsack over concave curves. Greedy by gain per parameter, (g_l(k+1) - g_l(k)) /
(m_l + n_l), is exact only when every layer costs the same per rank; with different costs it can stop with a
remainder that no step of the best ratio fits, where a different mix fills it (tests/test_budget.py has such a
case). The exact answer is a dynamic program over layers, with costs and budget in units of the gcd u of the m + n:
    V_0(b) = 0,   V_l(b) = max_{k_min <= k <= K_l, k c_l <= b} V_{l-1}(b - k c_l) + g_l(k),   c_l = (m_l + n_l) / u,
for b = 0..B/u; V_L(B/u) is the optimum and the ranks follow back from the argmax of each step. V_l is a vector
over b, so each (layer, k) pair is one shifted maximum of numpy vectors: L x K x B/u operations, a few seconds for
SmolLM2-135M at r = 16 (210 layers, K = 64, 25,440 units of 192 parameters). `allocate_greedy` (on the upper
concave hull of each curve, so a non-concave step does not stop it) is the fallback when the table would be too
large, and its figure is reported beside the optimum.

The weighting: normalized. Summing the layers' objectives raw, tr((E - C) H (E - C)^T) in absolute units, is what
adding the per-layer objectives literally says (the total squared output error of the 4-bit layers on the calibration
text), but those units differ across the model: the residual stream and the activations grow with depth, so the late
blocks' errors are larger in absolute terms without mattering more to the loss, and raw weighting sends them the
rank. Normalized, each layer's curve is the share of its own tr(E H E^T) removed, 1 - calibrated_error(k)^2, and the
allocation maximizes the summed shares (each layer one say, whatever its output scale). Measured on the embedded
SmolLM2-135M (rank 16, 32 x 256 calibration tokens, 4,096 held-out tokens, CPU): uniform closed form 77.76, budget
raw 77.87 (its summed raw objective 35% below uniform's, ranks piled on blocks 18-29 and on o/down_proj), budget
normalized 77.55 (4-bit QLoRA: 91.52), so normalized is the default; `budget_weighting` = "raw" in the method's
options keeps the other.
"""
from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quailora_app.engine.adapters import Factors
from quailora_app.engine.calibration.initialize import InitResult, LayerCurve, initialize
from quailora_app.engine.calibration.plan import LayerLoRA, ModelContext, ModelInit
from quailora_app.engine.methods import init_math

NAME = "budget"
WEIGHTINGS = ("raw", "normalized")
DEFAULT_WEIGHTING = "normalized"
MAX_FACTOR = 4  # K_l = min(MAX_FACTOR * r_l, m_l, n_l): the largest rank a layer may get
MIN_RANK = 1  # the smallest (peft's rank_pattern needs r >= 1)
MAX_CELLS = 60_000_000  # layers x budget units above which the dynamic program's table gives way to greedy


@dataclass
class Allocation:
    """Ranks per layer (in the order of the curves given), their summed gain and parameters."""

    ranks: list[int]
    value: float  # sum_l g_l(k_l)
    parameters: int  # sum_l k_l cost_l
    budget: int
    how: str  # "dynamic program" or "greedy"


def _check(gains: Sequence[Sequence[float]], costs: Sequence[int], budget: int,
           min_ranks: Sequence[int] | None) -> tuple[list[np.ndarray], list[int], list[int]]:
    curves = [np.asarray(g, dtype=np.float64) for g in gains]
    costs = [int(c) for c in costs]
    lows = [int(k) for k in min_ranks] if min_ranks is not None else [0] * len(curves)
    if not (len(curves) == len(costs) == len(lows)):
        raise ValueError("gains, costs and min_ranks need one entry per layer")
    if any(c <= 0 for c in costs):
        raise ValueError("every cost must be a positive number of parameters")
    if any(not 0 <= lo < len(g) for lo, g in zip(lows, curves)):
        raise ValueError("each curve needs an entry at its layer's smallest rank")
    if sum(lo * c for lo, c in zip(lows, costs)) > budget:
        raise ValueError(f"the smallest ranks alone cost more than the budget of {budget} parameters")
    return curves, costs, lows


def _allocation(curves: list[np.ndarray], costs: list[int], ranks: list[int], budget: int, how: str) -> Allocation:
    return Allocation(ranks, float(sum(g[k] for g, k in zip(curves, ranks))),
                      int(sum(k * c for k, c in zip(ranks, costs))), int(budget), how)


def allocate_dp(gains: Sequence[Sequence[float]], costs: Sequence[int], budget: int,
                min_ranks: Sequence[int] | None = None) -> Allocation:
    """The exact optimum of max sum_l gains[l][k_l] s.t. sum_l k_l costs[l] <= budget, min_ranks[l] <= k_l <
    len(gains[l]): the dynamic program of the module docstring, in units of the gcd of the costs. Any curves
    (concave or not). Ties go to the smaller rank."""
    curves, costs, lows = _check(gains, costs, budget, min_ranks)
    if not curves:
        return Allocation([], 0.0, 0, int(budget), "dynamic program")
    unit = math.gcd(*costs)
    units = [c // unit for c in costs]
    top = int(budget) // unit
    value = np.zeros(top + 1)  # V_0(b) = 0: the best with at most b units
    choice = np.zeros((len(curves), top + 1), dtype=np.int32)
    for layer, (g, c, lo) in enumerate(zip(curves, units, lows)):
        best = np.full(top + 1, -np.inf)
        pick = choice[layer]
        for k in range(lo, len(g)):
            shift = k * c
            if shift > top:
                break
            candidate = value[:top + 1 - shift] + g[k]
            better = candidate > best[shift:]
            np.copyto(best[shift:], candidate, where=better)
            np.copyto(pick[shift:], k, where=better)
        value = best  # non-decreasing in b, like V_0
    ranks = [0] * len(curves)
    b = top
    for layer in reversed(range(len(curves))):
        ranks[layer] = int(choice[layer, b])
        b -= ranks[layer] * units[layer]
    return _allocation(curves, costs, ranks, budget, "dynamic program")


def allocate_greedy(gains: Sequence[Sequence[float]], costs: Sequence[int], budget: int,
                    min_ranks: Sequence[int] | None = None) -> Allocation:
    """Greedy by gain per parameter: from the smallest ranks, repeatedly take the step (k_l -> j) of the largest
    (g_l(j) - g_l(k_l)) / ((j - k_l) cost_l) that still fits (j > k_l + 1 only where the curve is not concave: the
    upper concave hull). Near-optimal, exact when every layer costs the same per rank; see allocate_dp."""
    curves, costs, lows = _check(gains, costs, budget, min_ranks)
    ranks = list(lows)
    left = int(budget) - sum(k * c for k, c in zip(ranks, costs))
    version = [0] * len(curves)
    heap: list[tuple[float, int, int, int]] = []

    def push(layer: int) -> None:
        g, k, c = curves[layer], ranks[layer], costs[layer]
        fits = min(len(g) - 1 - k, left // c)
        if fits < 1:
            return
        steps = np.arange(1, fits + 1)
        ratio = (g[k + 1:k + 1 + fits] - g[k]) / (steps * c)
        j = int(np.argmax(ratio))
        if ratio[j] > 0:
            heapq.heappush(heap, (-float(ratio[j]), layer, k + j + 1, version[layer]))

    for layer in range(len(curves)):
        push(layer)
    while heap:
        _ratio, layer, j, seen = heapq.heappop(heap)
        if seen != version[layer]:
            continue
        version[layer] += 1
        cost = (j - ranks[layer]) * costs[layer]
        if cost <= left:
            ranks[layer], left = j, left - cost
        push(layer)  # its next step, or the best step that still fits
    return _allocation(curves, costs, ranks, budget, "greedy")


def allocate(gains: Sequence[Sequence[float]], costs: Sequence[int], budget: int,
             min_ranks: Sequence[int] | None = None, max_cells: int = MAX_CELLS) -> Allocation:
    """allocate_dp, or allocate_greedy when its table (layers x budget units) would exceed `max_cells`."""
    unit = math.gcd(*[int(c) for c in costs]) if costs else 1
    if len(gains) * (int(budget) // unit + 1) > max_cells:
        return allocate_greedy(gains, costs, budget, min_ranks)
    return allocate_dp(gains, costs, budget, min_ranks)


def gain_curve(curve: LayerCurve, weighting: str = DEFAULT_WEIGHTING) -> np.ndarray:
    """g(k), k = 0..K: the calibrated objective a rank-k closed form removes, raw (tr(E H E^T) units) or as a
    share of the layer's own."""
    left = curve.calibrated_error.double().numpy() ** 2  # share of tr(E H E^T) left at each rank
    if weighting == "raw":
        return curve.calibrated_base * (1.0 - left)
    if weighting == "normalized":
        return 1.0 - left
    raise ValueError(f"budget_weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")


def _objectives(curves: Mapping[str, LayerCurve], ranks: Mapping[str, int]) -> dict[str, float]:
    """The summed calibrated objective left at `ranks`: raw (absolute) and normalized (sum of shares)."""
    shares = {p: float(curves[p].calibrated_error[k]) ** 2 for p, k in ranks.items()}
    return {"raw": sum(curves[p].calibrated_base * v for p, v in shares.items()), "normalized": sum(shares.values())}


# ------------------------------------------------------------------------------------------------- the method
def build(ctx: ModelContext) -> ModelInit:
    """Closed form at K_l per layer, its error at every rank, the exact allocation, then each layer's leading k_l
    directions split with that layer's scaling s (peft's alpha_pattern alpha_k = s k keeps s; rsLoRA: s sqrt(k)).

    Options (ctx.options): budget_weighting ("raw" | "normalized"), budget_max_factor (K_l = factor x r_l),
    budget_min_rank."""
    start = time.perf_counter()
    options = ctx.options or {}
    weighting = str(options.get("budget_weighting") or DEFAULT_WEIGHTING)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"budget_weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    factor = int(options.get("budget_max_factor") or MAX_FACTOR)
    min_rank = max(1, int(options.get("budget_min_rank") or MIN_RANK))
    modules = dict(ctx.model.named_modules())
    shapes = {p: (int(modules[p].out_features), int(modules[p].in_features)) for p in ctx.plan}
    widest = {p: LayerLoRA(min(factor * r, *shapes[p]), s) for p, (r, s) in ctx.plan.items()}

    curves: dict[str, dict[str, LayerCurve]] = {}
    for _event in initialize(ctx.model, ctx.checkpoint, ctx.calib_ids, ctx.lora, ["closed_form"], InitResult(),
                             device=ctx.device, calib_dtype=ctx.calib_dtype, damping=ctx.damping,
                             als_rounds=ctx.als_rounds, should_stop=ctx.should_stop, solver=ctx.solver, plan=widest,
                             curves=curves):
        pass
    layer_curves = curves["closed_form"]
    paths = list(ctx.plan)
    gains = [gain_curve(layer_curves[p], weighting) for p in paths]
    costs = [sum(shapes[p]) for p in paths]
    total = sum(ctx.plan[p].rank * c for p, c in zip(paths, costs))
    lows = [min(min_rank, widest[p].rank) for p in paths]
    tick = time.perf_counter()
    chosen = allocate(gains, costs, total, lows)
    allocation_seconds = time.perf_counter() - tick
    greedy = allocate_greedy(gains, costs, total, lows)
    ranks = dict(zip(paths, chosen.ranks))

    factors, layers = {}, {}
    for p, k in ranks.items():
        curve = layer_curves[p]
        A, B = init_math.split_factors(curve.P[:, :k], curve.Rt[:k], ctx.plan[p].scaling)
        factors[p] = Factors(A.float().cpu(), B.float().cpu())
        layers[p] = (float(curve.weight_error[k]), float(curve.calibrated_error[k]))
    plan_ranks = {p: ctx.plan[p].rank for p in paths}
    details: dict[str, Any] = {
        "parameters": {"used": chosen.parameters, "budget": total},
        "k_max": {"factor": factor, "largest": max(w.rank for w in widest.values())},
        "min_rank": min_rank,
        "weighting": weighting,
        "allocator": chosen.how,
        "allocation_seconds": allocation_seconds,
        "objective": {"budget": _objectives(layer_curves, ranks), "uniform": _objectives(layer_curves, plan_ranks),
                      "greedy": _objectives(layer_curves, dict(zip(paths, greedy.ranks))),
                      "before": {"raw": sum(c.calibrated_base for c in layer_curves.values()),
                                 "normalized": float(len(layer_curves))}},
        "calibrated_base": {p: layer_curves[p].calibrated_base for p in paths},
    }
    return ModelInit(factors, time.perf_counter() - start, layers, ranks, details)

