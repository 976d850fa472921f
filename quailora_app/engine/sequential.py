"""Error feedback ("sequential"): each layer's correction fitted to the inputs the corrected 4-bit model itself
produces, aiming at the full-precision model's outputs (as GPTQ, AutoRound and ApiQ do for quantization).

The per-layer methods fit C to the full-precision inputs X of a layer: min tr((E - C) H (E - C)^T), H = X X^T / N.
In the 4-bit model the layer sees other inputs: X~, those of the 4-bit model with every correction before it
applied. Error feedback fits what the layer should output there:

    min over rank-r C of  ||W X - (Q + C) X~||_F^2 / N  +  lambda ||E - C||_F^2,        E = W - Q.

With T = W X - Q X~ = E X~ + W (X - X~), H~ = X~ X~^T / N, D = (X - X~) X~^T / N and S = H~ + lambda I, the normal
equations C S = T X~^T / N + lambda E give the unconstrained least-squares fit

    C* = (W X X~^T / N - Q H~ + lambda E) S^-1 = E + W D S^-1,

and, because the fit's residual is orthogonal to every C X~ (and lambda ||E - C||^2 expands the same way),

    ||W X - (Q + C) X~||^2 / N + lambda ||E - C||^2 = const + tr((C* - C) S (C* - C)^T).

So it is QuAILoRA's weighted low-rank problem with E -> C* and H -> H~: init_math.closed_form_correction(C*,
damped(H~), r), the same closed form. The damping pulls C toward E, as closed_form's does (its
tr((E - C)(H + lambda I)(E - C)^T) is the same objective with X~ = X), so with X~ = X: D = 0, C* = E exactly, and
the method IS closed_form. The new term W D S^-1 is the part of the upstream error W (X - X~) that this layer can
undo through its own input space; the layer also no longer corrects its weight error on inputs it never sees.

Two streams, block by block (one full-precision block in memory at a time, as calibrate_blocks):
- the full-precision stream: block i built from the checkpoint, its inputs the previous full-precision block's
  outputs;
- the corrected 4-bit stream: the quantized model's own block i, with the corrections already computed added by
  forward hooks, y = Q x + s (x A^T) B^T, exactly what peft's LoRA layer will add (the user's own LoRA switched off
  while it runs, in the Python API);
and a third for the report only, the plain 4-bit stream (no correction: QLoRA's init). The streams' activations
wait in CPU memory between blocks and visit the device one batch at a time; batch b of every stream holds the same
calibration windows, so the moments pair token by token.

Order within a block: forward order, one input group at a time (GPTQ-style). Layers later in the forward pass
(o_proj after q/k/v, down_proj after gate/up) read inputs that the corrections of the earlier layers of the same
block change; fitting the whole block from one pass would fit o_proj and down_proj to inputs that the corrected
model never produces, which is the mismatch error feedback exists to remove. Per input group (the layers reading
one tensor: q/k/v, gate/up) the moments X~ X~^T, (X - X~) X~^T (and X X^T, for the report) are summed over the
calibration batches from a forward pass of each stream that stops at the group's input, the group's corrections are
fitted and hooked in, and the next group's pass sees them. Cost per block: the groups' passes stop at their input
(q/k/v's after a norm, down_proj's near the end), about two block passes of the full-precision and of the corrected
stream together, plus one full pass of each of the three streams for the next block's inputs and the report: about
five times calibrate_blocks' forward work. The n x n math is the closed form's plus one Cholesky solve for C* and the
error meter's E H (m n^2 each).

What the report's per-layer figures mean for this method (ModelInit.layers):
- weight error: ||E - C||_F / ||E||_F, as for every method;
- calibrated error: the layer's output error in its own model against the full-precision output, relative to the
  same in the plain 4-bit model: sqrt(sum ||y_full - y_corrected||^2 / sum ||y_full - y_plain||^2) over the
  calibration tokens, each measured at the end of the block on the real forward passes, every correction of the
  model up to and including the block in place. It includes each stream's upstream error, so it is not the local
  figure the other methods report (theirs assume full-precision inputs); where X~ = X (the first input group of
  block 0) the two coincide. The local figure, sqrt(tr((E - C) H (E - C)^T) / tr(E H E^T)) with H of the
  full-precision inputs, is kept in details["local_calibrated_error"].
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quailora_app.engine import init_math
from quailora_app.engine.methods import register_model_method
from quailora_app.errors import Cancelled, ModelError

if TYPE_CHECKING:
    from quailora_app.engine.plan import ModelContext, ModelInit

NAME = "sequential"


# ---------------------------------------------------------------------------------------------- the math
def feedback_target(E: Tensor, W: Tensor, D: Tensor, spec: init_math.DampedH) -> Tensor:
    """C* = E + W D S^-1, the unconstrained minimizer of ||W X - (Q + C) X~||^2 / N + lambda ||E - C||^2, with
    D = (X - X~) X~^T / N and spec S = X~ X~^T / N + lambda I (one Cholesky solve, no inverse formed). D = 0 (the
    layer's inputs are the full-precision ones) gives C* = E. In the working precision of init_math."""
    L = spec.cholesky()
    M = W.to(L.dtype) @ D.to(L.dtype)  # (m x n)
    Z = torch.cholesky_solve(M.T.contiguous(), L)  # S^-1 (W D)^T = (W D S^-1)^T, S symmetric
    return E.to(L.dtype) + Z.T


def feedback_correction(E: Tensor, W: Tensor, H_tilde: Tensor, D: Tensor, rank: int, damping: float = 0.01,
                        solver: str = "exact") -> tuple[Tensor, Tensor]:
    """(P, Rt): the rank-`rank` C = P @ Rt minimizing ||W X - (Q + C) X~||^2 / N + lambda ||E - C||^2, i.e.
    closed_form_correction(C*, H~ + lambda I, rank) with C* = feedback_target(...); lambda = damping * mean
    diag(H~), as init_math.damped. H_tilde = X~ X~^T / N, D = (X - X~) X~^T / N (both n x n)."""
    spec = init_math.damped(H_tilde, damping)
    target = feedback_target(E, W, D, spec)
    return init_math.closed_form_correction(target, spec, rank, solver=solver)


def feedback_objective(W: Tensor, Q: Tensor, C: Tensor, X: Tensor, X_tilde: Tensor, damping_lambda: float) -> float:
    """||W X - (Q + C) X~||_F^2 / N + lambda ||W - Q - C||_F^2 with X, X~ as (n x N) columns (a reference for
    tests: what feedback_correction minimizes, computed from the activations themselves)."""
    N = X.shape[1]
    R = W @ X - (Q + C) @ X_tilde
    D = W - Q - C
    return float((R * R).sum() / N + damping_lambda * (D * D).sum())


class Moments:
    """One input group's sums over the calibration tokens, x the full-precision input and x~ the corrected 4-bit
    one (rows are tokens): X~ X~^T, (X - X~) X~^T and X X^T, in float32 on the device (as HessianAccumulator)."""

    def __init__(self) -> None:
        self.qq: Tensor | None = None
        self.dq: Tensor | None = None
        self.ff: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor, x_tilde: Tensor) -> None:
        f = x.detach().reshape(-1, x.shape[-1]).float()
        q = x_tilde.detach().reshape(-1, x_tilde.shape[-1]).float()
        if f.shape != q.shape:
            raise ModelError(f"the two streams disagree on a layer input: {tuple(f.shape)} vs {tuple(q.shape)}")
        if self.qq is None:
            n = f.shape[1]
            self.qq, self.dq, self.ff = (torch.zeros(n, n, device=f.device) for _ in range(3))
        self.qq.addmm_(q.T, q)
        self.dq.addmm_((f - q).T, q)
        self.ff.addmm_(f.T, f)
        self.tokens += f.shape[0]

    def normalized(self) -> tuple[Tensor, Tensor, Tensor]:
        """(H~, D, H) = (X~ X~^T, (X - X~) X~^T, X X^T) / N."""
        if not self.tokens:
            raise ModelError("no calibration tokens reached the layer")
        return self.qq / self.tokens, self.dq / self.tokens, self.ff / self.tokens


# ---------------------------------------------------------------------------------------------- the streams
class _Reached(Exception):
    """Raised by a pre-hook to end a forward pass once the wanted input is caught."""


def input_of(block: nn.Module, module: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """The input the block's forward pass gives `module` (the pass stops there)."""
    caught: list[Tensor] = []

    def catch(_module, args):
        caught.append(args[0].detach())
        raise _Reached

    handle = module.register_forward_pre_hook(catch)
    try:
        block(hidden, **kwargs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not caught:
        raise ModelError(f"{type(module).__name__} was not reached by the block's forward pass")
    return caught[0]


def forward_groups(block: nn.Module, names: Sequence[str], hidden: Tensor, kwargs: dict) -> list[list[str]]:
    """The block's layers `names` grouped by the tensor they read (q/k/v one group, gate/up one), the groups in the
    order the forward pass reaches them (from one pass over `hidden`)."""
    modules = dict(block.named_modules())
    seen: list[tuple[Tensor, list[str]]] = []
    done: set[str] = set()

    def hook(name: str):
        def record(_module, args):
            if name in done:
                return
            done.add(name)
            x = args[0]
            for tensor, members in seen:
                if tensor is x:
                    members.append(name)
                    return
            seen.append((x, [name]))
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in done]
    if missing:
        raise ModelError(f"the block's forward pass never reaches {', '.join(missing)}")
    return [members for _, members in seen]


class CorrectedBlock:
    """Forward hooks on a quantized block's target layers that add each corrected layer's s (x A^T) B^T to its output
    (peft's LoRA product, in the same order and dtypes) while `apply` is set, and, while `reference` holds the
    full-precision outputs of the same batch, sum each layer's squared distance to them into `sums[(apply, name)]`."""

    def __init__(self, block: nn.Module, names: Sequence[str]):
        modules = dict(block.named_modules())
        self.factors: dict[str, tuple[Tensor, Tensor, float]] = {}  # name -> (A, B, s) on the device
        self.apply = True
        self.reference: dict[str, Tensor] | None = None
        self.sums: dict[tuple[bool, str], Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def hook(_module, args, out):
            if self.apply and name in self.factors:
                A, B, s = self.factors[name]
                out = out + ((args[0].to(A.dtype) @ A.T) @ B.T * s).to(out.dtype)
            if self.reference is not None:
                diff = out.float() - self.reference[name].float()
                total, key = (diff * diff).sum(), (self.apply, name)
                self.sums[key] = self.sums[key] + total if key in self.sums else total
            return out
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class OutputRecorder:
    """Forward hooks that keep the outputs of a block's target layers for the current batch."""

    def __init__(self, block: nn.Module, names: Sequence[str]):
        modules = dict(block.named_modules())
        self.outputs: dict[str, Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def hook(_module, _args, out):
            self.outputs[name] = out.detach()
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def _quantized_model_as_is(model, peft_model) -> Iterator[None]:
    """The 4-bit model in eval mode with the user's LoRA switched off (the Python API); both restored after."""
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext():
            yield
    finally:
        for module, mode in training.items():
            module.training = mode


# ---------------------------------------------------------------------------------------------- the method
@register_model_method(
    NAME, label="4-bit + error feedback (sequential closed form)", short="sequential", colour="#bcbd22",
    help="the closed form fitted block by block, in forward order, to the inputs the corrected 4-bit model "
         "produces, aiming at the full-precision outputs", layer_label="error feedback (sequential)", dash="dot",
    marker="diamond")
def build(ctx: ModelContext) -> ModelInit:
    """Error feedback over the whole model (see the module): block by block, input group by input group in forward
    order, C = closed_form(C*, X~ X~^T / N + lambda I) with C* = E + W D S^-1."""
    # here, not at the top: engine/__init__ imports this module to register it, possibly while quailora_app.config
    # (which plan, adapters and calibrate import) is itself still loading
    from quailora_app.engine.calibrate import (
        STORE,
        _block_output,
        _moved,
        build_full_precision_block,
        calibration_batch_size,
        capture_block_inputs,
        decoder_layers,
    )
    from quailora_app.engine.plan import ModelInit, split_path  # (the same reason)

    t0 = time.perf_counter()
    prefix, layers = decoder_layers(ctx.model)
    todo: dict[int, list[str]] = {}
    for path in ctx.plan:
        index, local = split_path(prefix, path)
        todo.setdefault(index, []).append(local)
    last = max(todo)
    device, dtype = ctx.device, ctx.calib_dtype
    batch_size = calibration_batch_size(ctx.calib_ids.shape[-1])
    fits: dict[str, dict] = {}  # path -> what the report keeps
    seconds_per_block: list[float] = []
    with _quantized_model_as_is(ctx.model, ctx.peft_model), torch.no_grad():
        captured = capture_block_inputs(ctx.model, ctx.calib_ids, batch_size, device)
        kwargs = [kw for _, kw in captured]
        full = [hidden for hidden, _ in captured]  # the full-precision stream (cast to calib_dtype per batch)
        fixed = list(full)  # the corrected 4-bit stream (the 4-bit model's own dtype)
        plain = fixed  # the plain 4-bit stream: the same list until the first correction
        del captured
        for index in range(last + 1):
            if ctx.should_stop():
                raise Cancelled(f"stopped during error-feedback initialization at block {index} of {last + 1}")
            tick = time.perf_counter()
            fp_block = build_full_precision_block(ctx.model, index, ctx.checkpoint, device, dtype)
            q_block = layers[index]
            names = todo.get(index, [])
            corrected = CorrectedBlock(q_block, names)
            recorder = OutputRecorder(fp_block, names)
            try:
                if names:
                    if plain is fixed:
                        plain = list(fixed)  # from here on the streams part
                    _fit_block(ctx, f"{prefix}.{index}", fp_block, q_block, names, full, fixed, kwargs, corrected,
                               fits)
                full, fixed, plain = _advance(fp_block, q_block, full, fixed, plain, kwargs, corrected, recorder,
                                              device, dtype, _moved, _block_output, STORE)
            finally:
                corrected.remove()
                recorder.remove()
            for local in names:
                fit = fits[f"{prefix}.{index}.{local}"]
                plain_sum = float(corrected.sums.get((False, local), 0.0))
                fixed_sum = float(corrected.sums.get((True, local), 0.0))
                fit["in_stream"] = math.sqrt(fixed_sum / plain_sum) if plain_sum > 0 else 0.0
                local_base = fit.pop("local_base")
                fit["qlora_in_stream"] = (math.sqrt(plain_sum / fit.pop("tokens") / local_base)
                                          if local_base > 0 else 0.0)
            del fp_block, corrected, recorder
            if device.type == "cuda":
                torch.cuda.empty_cache()
            seconds_per_block.append(round(time.perf_counter() - tick, 3))
    factors = {path: fit.pop("factors") for path, fit in fits.items()}
    layer_errors = {path: (fit["weight"], fit["in_stream"]) for path, fit in fits.items()}
    details = {
        "calibrated_error": "per layer: the layer's output error against the full-precision model's, in the 4-bit "
                            "model corrected by this method (its own inputs), relative to the same in the plain "
                            "4-bit model (QLoRA), over the calibration tokens; the other methods' figure assumes "
                            "full-precision inputs",
        "local_calibrated_error": {path: fit["local"] for path, fit in fits.items()},
        "qlora_in_stream_over_local": {path: fit["qlora_in_stream"] for path, fit in fits.items()},
        "order": "forward order within each block: one pass of each stream per input group",
        "seconds_per_block": seconds_per_block,
    }
    return ModelInit(factors, time.perf_counter() - t0, layer_errors, details=details)


def _fit_block(ctx: ModelContext, block_path: str, fp_block: nn.Module, q_block: nn.Module, names: list[str],
               full: list[Tensor], fixed: list[Tensor], kwargs: list[dict], corrected: CorrectedBlock,
               fits: dict[str, dict]) -> None:
    """Fit the block's target layers group by group in forward order, hooking each group's corrections into
    `corrected` before the next group's inputs are taken."""
    # here, not at the top: see build()
    from quailora_app.engine.adapters import Factors
    from quailora_app.engine.calibrate import _moved  # (the same reason)
    from quailora_app.engine.initialize import one_cpu_thread  # (the same reason)
    from quailora_app.engine.quantize import dequantized_weight  # (the same reason)

    device, dtype = ctx.device, ctx.calib_dtype
    fp_modules, q_modules = dict(fp_block.named_modules()), dict(q_block.named_modules())
    groups = forward_groups(fp_block, names, full[0].to(device=device, dtype=dtype), _moved(kwargs[0], device))
    for group in groups:
        moments = Moments()
        leader = group[0]
        for hidden_full, hidden_fixed, kw in zip(full, fixed, kwargs):
            kw = _moved(kw, device)
            x = input_of(fp_block, fp_modules[leader], hidden_full.to(device=device, dtype=dtype), kw)
            x_tilde = input_of(q_block, q_modules[leader], hidden_fixed.to(device), kw)
            moments.add(x, x_tilde)
            del x, x_tilde
        H_tilde, D, H = moments.normalized()
        tokens = moments.tokens
        del moments
        with one_cpu_thread(device):
            spec = init_math.damped(H_tilde, ctx.damping)
            local_spec = init_math.damped(H, ctx.damping)  # for the report's local figure only
            for local in group:
                path = f"{block_path}.{local}"
                r, s = ctx.plan[path]
                W = fp_modules[local].weight.detach().float()
                meter = init_math.LowRankErrors(W - dequantized_weight(q_modules[local]).to(W.device), local_spec)
                target = feedback_target(meter.E, W, D, spec)
                del W
                P, Rt = init_math.closed_form_correction(target, spec, r, solver=ctx.solver)
                A, B = init_math.split_factors(P, Rt, s)
                weight, local_error = meter.errors(s * B.to(meter.E.dtype), A.to(meter.E.dtype))
                fits[path] = {"factors": Factors(A.float().cpu(), B.float().cpu()), "weight": weight,
                              "local": local_error, "local_base": meter.calib_base, "tokens": tokens}
                corrected.factors[local] = (A.to(device), B.to(device), float(s))
                del meter, target, P, Rt
            del spec, local_spec, H_tilde, D, H


def _advance(fp_block, q_block, full, fixed, plain, kwargs, corrected: CorrectedBlock, recorder: OutputRecorder,
             device, dtype, moved, block_output, store):
    """Every stream through its block i (all of the block's corrections in place in the corrected stream), giving
    block i+1's inputs; on the way, each target layer's squared output distance to the full-precision one is summed
    into corrected.sums[(True, name)] (corrected stream) and [(False, name)] (plain stream)."""
    new_full, new_fixed, new_plain = [], [], []
    shared = plain is fixed
    for b, kw in enumerate(kwargs):
        kw = moved(kw, device)
        recorder.outputs = {}
        out = fp_block(full[b].to(device=device, dtype=dtype), **kw)
        new_full.append(block_output(out).detach().to(store))
        reference = recorder.outputs
        for applied, stream, new in ((True, fixed, new_fixed), (False, plain, new_plain)):
            if shared and not applied:
                break
            corrected.apply = applied
            corrected.reference = reference
            out = q_block(stream[b].to(device), **kw)
            new.append(block_output(out).detach().to(store))
        corrected.apply, corrected.reference = True, None
        del out, reference
        recorder.outputs = {}
    return new_full, new_fixed, (new_fixed if shared else new_plain)
