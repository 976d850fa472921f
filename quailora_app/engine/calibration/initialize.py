"""Compute every initialization's LoRA factors for every target layer, block by block.

For each block from calibrate_blocks: E = W - Q per target layer (Q exactly as the quantized layer holds it),
one damped H (and, for tall layers, its Cholesky factor, computed once) per distinct input (shared by q/k/v and
by gate/up), then per method of engine/methods/registry.py computed per layer a low-rank correction C = P Rt, split into
peft factors with s * B @ A == C, and the layer's error figures measured on the factors themselves. Used by the
init report and by the fine-tuning arms that start from an initialization. With requant=True, the methods that change
the quantized base (kind "requant", methods/loftq.py) run on the same statistics too, each giving per layer a new
quantized layer (InitResult.bases) beside its factors.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from quailora_app.config import LoraSettings
from quailora_app.engine.adapters import Factors
from quailora_app.engine.calibration.calibrate import calibrate_blocks, decoder_layers
from quailora_app.engine.calibration.plan import LayerLoRA, split_path, target_paths
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.loftq import can_requantize, residual_errors
from quailora_app.engine.methods.registry import QLORA, REQUANT, get_method
from quailora_app.engine.parallel import Processes, share_layers
from quailora_app.engine.quantization.layers import dequantized_weight
from quailora_app.errors import Cancelled
from quailora_app.events import Event, LayerResult, Progress
from quailora_app.threads import waits_passively


@dataclass
class InitResult:
    """What initialize() fills in as it goes (so a stopped run keeps the blocks already done)."""

    factors: dict[str, dict[str, Factors]] = field(default_factory=dict)  # method -> module path -> factors
    layers: list[dict] = field(default_factory=list)  # one row per layer, as in report.json
    seconds: dict[str, float] = field(default_factory=dict)  # calibrate and one entry per method
    # requant methods only: method -> module path -> the new quantized layer (Q_T) its factors correct
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LayerCurve:
    """One layer's correction C = P @ Rt at its plan's rank K, kept with its errors at every rank k = 0..K of the
    nested corrections P[:, :k] @ Rt[:k] (initialize(curves=...); what a rank allocation reads, methods/budget.py)."""

    P: torch.Tensor  # (m, K), float32 on CPU
    Rt: torch.Tensor  # (K, n)
    weight_error: torch.Tensor  # (K + 1,) float64 fractions of C = 0's (index 0: 1.0)
    calibrated_error: torch.Tensor  # (K + 1,) the same with the undamped H
    weight_base: float  # ||E||_F^2
    calibrated_base: float  # tr(E H E^T), undamped: calibrated_error[k]^2 * calibrated_base is the objective left


def correct_layer(W: torch.Tensor, layer, spec: init_math.DampedH, methods: Sequence, rank: int, scaling: float,
                  spent: dict[str, float], damping_seconds: float, *, solver: str, als_rounds: int,
                  curves: dict[str, dict[str, LayerCurve]] | None = None, name: str = "",
                  bases: dict[str, Any] | None = None, options: Mapping[str, Any] | None = None):
    """Each method's rank-`rank` correction of E = W - Q (Q: the quantized `layer`'s), split into peft's factors with
    scaling s, and its errors measured on what the adapter really adds, C = s B A: (weight errors, calibrated
    errors, factors) by method, with the qlora baseline's 1.0. Seconds are added to `spent`; forming H + lambda I
    (`damping_seconds`) is charged to each calibrated method, as if run alone.

    A requant method (methods/loftq.py, settings in `options`) re-quantizes the layer: its new layer goes into
    `bases` (method -> layer), its errors are those of W - Q_T - s B A against the same E = W - Q (so 1.0 is still
    the plain base with no correction). It is skipped on a layer its quantizer cannot quantize again (LLM.int8)."""
    start = time.perf_counter()
    meter = init_math.LowRankErrors(W - dequantized_weight(layer).to(W.device), spec)
    meter_seconds = time.perf_counter() - start  # mostly E Hd, which closed_form reuses
    E = meter.E  # in the working precision, shared by the methods (no copy per method)
    weight_err, calib_err = {QLORA: 1.0}, {QLORA: 1.0}
    factors = {}
    for method in methods:
        start = time.perf_counter()
        if method.kind == REQUANT:
            if not can_requantize(layer):
                continue
            done = method.requantize(W, layer, spec, rank, E=E, EHd=meter.EH, solver=solver, options=options)
            A, B = init_math.split_factors(done.P, done.Rt, scaling)
            spent[method.name] += time.perf_counter() - start + (damping_seconds if method.calibrated else 0.0)
            weight_err[method.name], calib_err[method.name] = residual_errors(meter, W, done.layer, scaling * B, A)
            factors[method.name] = Factors(A.float().cpu(), B.float().cpu())
            if bases is not None:
                bases[method.name] = done.layer
            continue
        reuse = method.uses_EHd is not None and method.uses_EHd(*E.shape, solver)
        P, Rt = method.correction(E, spec, rank, als_rounds=als_rounds, solver=solver, EHd=meter.EH if reuse else None)
        A, B = init_math.split_factors(P, Rt, scaling)
        shared = damping_seconds if method.calibrated else 0.0
        shared += meter_seconds if reuse else 0.0  # the E Hd it reused is charged to it
        spent[method.name] += time.perf_counter() - start + shared
        weight_err[method.name], calib_err[method.name] = meter.errors(scaling * B.to(E.dtype), A.to(E.dtype))
        factors[method.name] = Factors(A.float().cpu(), B.float().cpu())
        if curves is not None:
            by_rank = meter.errors_by_rank(P, Rt)
            curves.setdefault(method.name, {})[name] = LayerCurve(
                P.float().cpu(), Rt.float().cpu(), *(e.cpu() for e in by_rank), meter.weight_base, meter.calib_base)
    return weight_err, calib_err, factors


@contextmanager
def one_cpu_thread(device: torch.device):
    """Run the per-layer matrix math on one CPU thread, unless OpenMP's idle threads sleep (threads.py).

    The matrices are small (n <= a few thousand) and float64: OpenMP threads gain little on them (2 threads: 23 ->
    19 s for SmolLM2's 210 layers), and when the cores are shared (another process, the UI's server) their
    spin-waits made ALS and the eigen-decompositions 100-400x slower here (0.2 s -> 10 s for a 1536 x 576 layer on
    2 busy cores). With passive waiting (the app's and the CLI's policy) that cannot happen, so the threads stay.
    GPUs are unaffected."""
    if device.type != "cpu" or waits_passively():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def initialize(
    model,
    checkpoint: Checkpoint,
    calib_ids: torch.Tensor,
    lora: LoraSettings,
    methods: Sequence[str],
    result: InitResult,
    *,
    device: torch.device,
    calib_dtype: torch.dtype = torch.float32,
    damping: float = 0.01,
    als_rounds: int = 20,
    should_stop: Callable[[], bool] | None = None,
    solver: str = "exact",
    processes: Processes | None = None,
    plan: Mapping[str, LayerLoRA] | None = None,
    curves: dict[str, dict[str, LayerCurve]] | None = None,
    also: Mapping[str, tuple[Any, InitResult]] | None = None,
    requant: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Iterator[Event]:
    """Yield a LayerResult per layer and a Progress per block while filling `result`.

    `methods`: names of engine/methods/registry.py; those computed per layer run here (the others are skipped).
    `plan`: the layers to initialize (full module paths) with each one's rank and scaling s, when they differ from
    `lora`'s (peft's rank_pattern / alpha_pattern); default: every target layer of `lora` at its rank and scaling.
    `curves` (method -> module path -> LayerCurve): given, each method's (P, Rt) is also kept there with its errors
    at every rank up to the plan's (meaningful for the nested methods; one process only).

    With `processes` (several processes of a torch.distributed group, see engine/parallel.py), each process is given
    the same `calib_ids`, runs its share of them, and computes its share of each block's layers; H is summed
    over the processes and every result is gathered on rank 0, whose `result` and events equal one process's.
    The other processes yield only Progress. `seconds` per method are then summed over the processes.

    `also` (name -> (another quantized model of the same weights, its InitResult)): the same methods computed
    against each of those models' Q as well, on the same calibration statistics (H is of the full-precision inputs,
    so it does not depend on the quantization): each result is filled like `result`, without events of its own (one
    process only). Quantizing at several bit widths then costs one calibration.

    `requant`: also run the methods of `methods` that change the quantized base (kind "requant", one process only):
    their new quantized layers land in each result's `bases` (method -> module path -> layer; the models are not
    changed), their factors correct those layers, not the models' own. `options`: their settings by name (loftq_iter).
    Without `requant` they are skipped, as the whole-model methods are."""
    methods = [m for m in map(get_method, methods) if m.per_layer or (requant and m.kind == REQUANT)]
    also = dict(also or {})
    if also and processes is not None and processes.world > 1:
        raise ValueError("initialize(also=...) runs in one process")
    if requant and processes is not None and processes.world > 1:
        raise ValueError("initialize(requant=True) runs in one process")
    changing = [m.name for m in methods if m.kind == REQUANT]
    others = {key: (dict(other.named_modules()), other_result) for key, (other, other_result) in also.items()}
    for _, other_result in others.values():
        other_result.seconds.setdefault("calibrate", 0.0)
        for m in methods:
            other_result.seconds.setdefault(m.name, 0.0)
            other_result.factors.setdefault(m.name, {})
        for name in changing:
            other_result.bases.setdefault(name, {})
    if plan is None:
        plan = {name: LayerLoRA(lora.rank, lora.scaling) for name in target_paths(model, lora)}
    modules = dict(model.named_modules())
    prefix, blocks_of_model = decoder_layers(model)
    n_blocks = len(blocks_of_model)
    only: dict[int, list[str]] = {}
    for name in plan:
        index, local = split_path(prefix, name)
        only.setdefault(index, []).append(local)
    seconds = result.seconds
    seconds.setdefault("calibrate", 0.0)
    for m in methods:
        seconds.setdefault(m.name, 0.0)
        result.factors.setdefault(m.name, {})
    for name in changing:
        result.bases.setdefault(name, {})
    calibrated = any(m.calibrated for m in methods)
    split = processes is not None and processes.world > 1
    if split:
        calib_ids = processes.shard(calib_ids)
    blocks = calibrate_blocks(model, checkpoint, calib_ids, lora.targets, device, calib_dtype, should_stop=should_stop,
                              only=only, reduce_sums=processes.reduce_sums if split else None)
    tick = time.perf_counter()
    for block in blocks:
        seconds["calibrate"] += time.perf_counter() - tick
        order = [(local, group) for group in block.groups for local in group.names]
        mine = {local for local, _ in order}
        if split:
            shapes = [(local, group.names[0], tuple(block.weights[local].shape)) for local, group in order]
            owners = share_layers(shapes, processes.world, calibrated)
            mine = {local for (local, _), owner in zip(order, owners) if owner == processes.rank}
        computed: dict[str, tuple[LayerResult, dict[str, Factors]]] = {}
        spent = dict.fromkeys([m.name for m in methods], 0.0)
        with one_cpu_thread(device):
            for group in block.groups:
                todo = [local for local in group.names if local in mine]
                if not todo:
                    continue
                start = time.perf_counter()
                spec = init_math.damped(group.H, damping)  # the calibrated methods' and the error report's H
                group.H = None  # no longer needed: free it now rather than with the block
                damping_seconds = time.perf_counter() - start
                for local in todo:
                    name = f"{block.prefix}.{local}"
                    r, s = plan[name]
                    W = block.weights.pop(local).float()  # each full-precision weight is dropped once its E exists
                    shape = tuple(W.shape)
                    first = local == todo[0]
                    for other_modules, other_result in others.values():
                        other_spent = dict.fromkeys(spent, 0.0)
                        new_layers: dict[str, Any] = {}
                        weight_err, calib_err, factors = correct_layer(
                            W, other_modules[name], spec, methods, r, s, other_spent, damping_seconds if first else 0.0,
                            solver=solver, als_rounds=als_rounds, bases=new_layers, options=options)
                        for method, new_layer in new_layers.items():
                            other_result.bases[method][name] = new_layer
                        row = LayerResult(name, block.index, local, shape, weight_err, calib_err)
                        for method, f in factors.items():
                            other_result.factors[method][name] = f
                        other_result.layers.append(
                            {k: v for k, v in row.to_dict().items() if k not in ("kind", "time")})
                        for method, value in other_spent.items():
                            other_result.seconds[method] += value
                    new_layers = {}
                    weight_err, calib_err, factors = correct_layer(
                        W, modules[name], spec, methods, r, s, spent, damping_seconds if first else 0.0,
                        solver=solver, als_rounds=als_rounds, curves=curves, name=name, bases=new_layers,
                        options=options)
                    for method, new_layer in new_layers.items():
                        result.bases[method][name] = new_layer
                    del W
                    computed[local] = (LayerResult(name, block.index, local, shape, weight_err, calib_err), factors)
                del spec
        if split:
            parts = processes.gather((computed, spent))
            computed, spent = {}, dict.fromkeys([m.name for m in methods], 0.0)
            for part_computed, part_spent in parts or ():
                computed.update(part_computed)
                for method, value in part_spent.items():
                    spent[method] += value
        rows = []
        for local, _ in order:
            if local not in computed:
                continue
            row, factors = computed[local]
            for method, f in factors.items():
                result.factors[method][row.name] = f
            result.layers.append({k: v for k, v in row.to_dict().items() if k not in ("kind", "time")})
            rows.append(row)
        for method, value in spent.items():
            seconds[method] += value
        yield from rows
        done = block.index + 1
        del block
        yield Progress("calibrate", done, n_blocks, f"block {done} of {n_blocks} calibrated and initialized")
        if should_stop and should_stop() and done < n_blocks:
            raise Cancelled(f"stopped by the user during initialization after block {done} of {n_blocks}")
        tick = time.perf_counter()
