"""Error feedback ("sequential"): each layer's correction fitted to the inputs the corrected 4-bit model itself
produces, aiming at the full-precision model's outputs (as GPTQ, AutoRound and ApiQ do for quantization).

The per-layer methods fit C to the full-precision inputs X of a layer: min tr((E - C) H (E - C)^T), H = X X^T / N.
In the 4-bit model the layer sees other inputs: X~, those of the 4-bit model with every correction before it
applied. Error feedback fits what the layer should output there:

    min over rank-r C of  ||W X + R - (Q + C) X~||_F^2 / N  +  lambda ||E - C||_F^2,        E = W - Q,

with R = 0 for a layer whose output feeds the next layer (q/k/v, gate/up) and, for a layer that writes into the
residual stream (o_proj, down_proj: the stream h becomes h + W x), R = h - h~, the error the residual stream carries
at that add: the layer then aims at the full-precision stream after the add, h + W X, rather than at its own
full-precision output W X, which would leave the carried error to every later block. With T = W X + R - Q X~,
H~ = X~ X~^T / N, D = (X - X~) X~^T / N, G = R X~^T / N and S = H~ + lambda I, the normal equations
C S = T X~^T / N + lambda E give the unconstrained least-squares fit

    C* = (W X X~^T / N + G - Q H~ + lambda E) S^-1 = E + (W D + G) S^-1,

and, because the fit's residual is orthogonal to every C X~ (and lambda ||E - C||^2 expands the same way),

    ||W X + R - (Q + C) X~||^2 / N + lambda ||E - C||^2 = const + tr((C* - C) S (C* - C)^T).

So it is QuAILoRA's weighted low-rank problem with E -> C* and H -> H~: init_math.closed_form_correction(C*,
damped(H~), r), the same closed form. The damping pulls C toward E, as closed_form's does (its
tr((E - C)(H + lambda I)(E - C)^T) is the same objective with X~ = X, R = 0), so with no error upstream (X~ = X,
h~ = h): D = G = 0, C* = E exactly, and the method IS closed_form. The new terms are the part of the upstream error
that this layer can undo through its own input space; the layer also no longer corrects its weight error on inputs
it never sees.

Measured on the embedded SmolLM2-135M-Instruct (rank 16, alpha 16, 4,096 held-out tokens of the calibration text's
dataset; perplexity, closed_form's beside it; CPU):
- 32 x 256 calibration tokens. Without the residual term (R = 0 everywhere, options {"sequential_residual": False})
  the layers match their own full-precision outputs better in the stream, yet the model does not improve on the
  calibration windows (83.47 vs 83.63) and gets worse held out (79.67 vs 77.76). With it: 79.32 on the calibration
  windows, 77.16 held out (86.6% of the 4-bit -> 8-bit gap vs 83.0%), but 31.33 vs 30.73 on another text (the
  convention speeches): with this little text the fit adapts to the calibration windows.
- 128 x 256 calibration tokens: 75.70 held out vs 77.65 (95.4% of the gap vs 83.6%; 85.0% of the 4-bit -> full
  precision gap), and 30.68 vs 30.73 on the speeches. More calibration text is the remedy; it costs 5-7 times the
  per-layer pass's time (calibration and closed_form: 72 s; sequential: 363-486 s on 2 CPU cores).

The residual term needs the block's layout: h1 = h + o_proj(...), out = h1 + down_proj(...), with h1 the input of
post_attention_layernorm (Llama, Mistral, Qwen2, SmolLM). It is checked on one batch of each block; a block that
does not add the projections' outputs to the stream that way (Gemma 2 and 3 normalize them first; parallel
attention) gets R = 0 and says so in details["residual_layers"].

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
(o_proj after q/k/v, down_proj after gate/up) read inputs, and a residual stream, that the corrections of the earlier
layers of the same block change; fitting the whole block from one pass would fit o_proj and down_proj to inputs that
the corrected model never produces, which is the mismatch error feedback exists to remove. Per input group (the
layers reading one tensor: q/k/v, gate/up) the moments X~ X~^T, (X - X~) X~^T, R X~^T (and X X^T, for the report)
are summed over the calibration batches from a forward pass of each stream that stops at the group's input, the
group's corrections are fitted and hooked in, and the next group's pass sees them. Cost per block: the groups'
passes stop at their input (q/k/v's after a norm, down_proj's near the end), about two block passes of the
full-precision and of the corrected stream together, plus one full pass of each of the three streams for the next
block's inputs and the report: about five times calibrate_blocks' forward work. The n x n math is the closed form's
plus one Cholesky solve for C* and the error meter's E H (m n^2 each).

What the report's per-layer figures mean for this method (ModelInit.layers):
- weight error: ||E - C||_F / ||E||_F, as for every method;
- calibrated error: what the layer aims at, measured in its own model against the full-precision model and relative
  to the same in the plain 4-bit model, over the calibration tokens at the end of the block (every correction of
  the model up to and including the block in place): sqrt(sum ||v_full - v_corrected||^2 / sum ||v_full -
  v_plain||^2), v the layer's output, or for a layer that writes into the residual stream, the stream right after
  its add. It includes each stream's upstream error, so it is not the local figure the other methods report (theirs
  assume full-precision inputs); where X~ = X (the first input group of block 0) the two coincide. The local figure,
  sqrt(tr((E - C) H (E - C)^T) / tr(E H E^T)) with H of the full-precision inputs, is kept in
  details["local_calibrated_error"].
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from quailora_app.engine.adapters import Factors
from quailora_app.engine.calibration.calibrate import (
    STORE,
    block_output,
    build_full_precision_block,
    calibration_batch_size,
    capture_block_inputs,
    decoder_layers,
    for_block,
    moved,
)
from quailora_app.engine.calibration.initialize import one_cpu_thread
from quailora_app.engine.calibration.plan import ModelContext, ModelInit, split_path
from quailora_app.engine.methods import init_math
from quailora_app.engine.quantization.layers import dequantized_weight
from quailora_app.errors import Cancelled, ModelError

NAME = "sequential"
#: ctx.options key: False fits every layer to its own full-precision output (R = 0), for comparison
RESIDUAL_OPTION = "sequential_residual"
#: the layers of a pre-norm decoder block that write into the residual stream, and where the stream they add to is
#: read: "" the block's input, else the input of that module
RESIDUAL_WRITERS = {"self_attn.o_proj": "", "mlp.down_proj": "post_attention_layernorm"}
BLOCK_OUTPUT = "<block output>"


# ---------------------------------------------------------------------------------------------- the math
def feedback_target(E: Tensor, W: Tensor, D: Tensor, spec: init_math.DampedH, G: Tensor | None = None) -> Tensor:
    """C* = E + (W D + G) S^-1, the unconstrained minimizer of ||W X + R - (Q + C) X~||^2 / N + lambda ||E - C||^2,
    with D = (X - X~) X~^T / N, G = R X~^T / N (None: R = 0) and spec S = X~ X~^T / N + lambda I (one Cholesky
    solve, no inverse formed). D = 0, G = None (the layer's inputs are the full-precision ones) gives C* = E. In the
    working precision of init_math."""
    L = spec.cholesky()
    M = W.to(L.dtype) @ D.to(L.dtype)  # (m x n)
    if G is not None:
        M = M + G.to(L.dtype)
    Z = torch.cholesky_solve(M.T.contiguous(), L)  # S^-1 (W D + G)^T = ((W D + G) S^-1)^T, S symmetric
    return E.to(L.dtype) + Z.T


def feedback_correction(E: Tensor, W: Tensor, H_tilde: Tensor, D: Tensor, rank: int, damping: float = 0.01,
                        solver: str = "exact", G: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(P, Rt): the rank-`rank` C = P @ Rt minimizing ||W X + R - (Q + C) X~||^2 / N + lambda ||E - C||^2, i.e.
    closed_form_correction(C*, H~ + lambda I, rank) with C* = feedback_target(...); lambda = damping * mean
    diag(H~), as init_math.damped. H_tilde = X~ X~^T / N, D = (X - X~) X~^T / N (both n x n), G = R X~^T / N."""
    spec = init_math.damped(H_tilde, damping)
    target = feedback_target(E, W, D, spec, G)
    return init_math.closed_form_correction(target, spec, rank, solver=solver)


def feedback_objective(W: Tensor, Q: Tensor, C: Tensor, X: Tensor, X_tilde: Tensor, damping_lambda: float,
                       R: Tensor | None = None) -> float:
    """||W X + R - (Q + C) X~||_F^2 / N + lambda ||W - Q - C||_F^2 with X, X~ as (n x N) columns and R (m x N) or
    None (a reference for tests: what feedback_correction minimizes, computed from the activations themselves)."""
    N = X.shape[1]
    residual = W @ X - (Q + C) @ X_tilde
    if R is not None:
        residual = residual + R
    D = W - Q - C
    return float((residual * residual).sum() / N + damping_lambda * (D * D).sum())


def _rows(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


class Moments:
    """One input group's sums over the calibration tokens, x the full-precision input and x~ the corrected 4-bit
    one (rows are tokens): X~ X~^T, (X - X~) X~^T and X X^T, and for a residual writer R X~^T, in float32 on the
    device (as HessianAccumulator)."""

    def __init__(self) -> None:
        self.qq: Tensor | None = None
        self.dq: Tensor | None = None
        self.ff: Tensor | None = None
        self.rq: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor, x_tilde: Tensor, r: Tensor | None = None) -> None:
        """One batch: x, x~ (..., n) and the residual stream's error r = h - h~ (..., m) or None."""
        f, q = _rows(x), _rows(x_tilde)
        if f.shape != q.shape:
            raise ModelError(f"the two streams disagree on a layer input: {tuple(f.shape)} vs {tuple(q.shape)}")
        if self.qq is None:
            n = f.shape[1]
            self.qq, self.dq, self.ff = (torch.zeros(n, n, device=f.device) for _ in range(3))
        self.qq.addmm_(q.T, q)
        self.dq.addmm_((f - q).T, q)
        self.ff.addmm_(f.T, f)
        if r is not None:
            r = _rows(r).to(q.device)
            if self.rq is None:
                self.rq = torch.zeros(r.shape[1], q.shape[1], device=q.device)
            self.rq.addmm_(r.T, q)
        self.tokens += f.shape[0]

    def normalized(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(H~, D, H, G) = (X~ X~^T, (X - X~) X~^T, X X^T, R X~^T or None) / N."""
        if not self.tokens:
            raise ModelError("no calibration tokens reached the layer")
        G = self.rq / self.tokens if self.rq is not None else None
        return self.qq / self.tokens, self.dq / self.tokens, self.ff / self.tokens, G


# ---------------------------------------------------------------------------------------------- the streams
class _Reached(Exception):
    """Raised by a pre-hook to end a forward pass once the wanted input is caught."""


def input_of(block: nn.Module, module: nn.Module, hidden: Tensor, kwargs: dict,
             also: nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
    """The input the block's forward pass gives `module` (the pass stops there), and that of `also` (a module the
    pass reaches earlier; None if not given)."""
    caught: list[Tensor] = []
    other: list[Tensor] = []

    def catch(_module, args):
        caught.append(args[0].detach())
        raise _Reached

    handles = [module.register_forward_pre_hook(catch)]
    if also is not None:
        handles.append(also.register_forward_pre_hook(lambda _module, args: other.append(args[0].detach())))
    try:
        block(hidden, **kwargs)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not caught:
        raise ModelError(f"{type(module).__name__} was not reached by the block's forward pass")
    if also is not None and not other:
        raise ModelError(f"{type(also).__name__} was not reached before {type(module).__name__}")
    return caught[0], (other[0] if other else None)


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


def residual_writers(block: nn.Module, hidden: Tensor, kwargs: dict) -> dict[str, str]:
    """Which of RESIDUAL_WRITERS this block adds to its residual stream as a pre-norm decoder block does
    (h1 = h + o_proj(...), out = h1 + down_proj(...), h1 the input of post_attention_layernorm), checked on one
    forward pass over `hidden`: {layer: where its stream is read} for those that do."""

    modules = dict(block.named_modules())
    norm = RESIDUAL_WRITERS["mlp.down_proj"]
    if not all(name in modules for name in (*RESIDUAL_WRITERS, norm)):
        return {}
    seen: dict[str, Tensor] = {}

    def keep(key: str, output: bool):
        if output:
            return lambda _module, _args, out: seen.__setitem__(key, out.detach())
        return lambda _module, args: seen.__setitem__(key, args[0].detach())

    handles = [modules["self_attn.o_proj"].register_forward_hook(keep("o", True)),
               modules["mlp.down_proj"].register_forward_hook(keep("down", True)),
               modules[norm].register_forward_pre_hook(keep("h1", False))]
    try:
        out = block_output(block(hidden, **kwargs)).detach()
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) < 3:
        return {}

    def same(a: Tensor, b: Tensor) -> bool:
        a, b = a.float(), b.float()
        return a.shape == b.shape and bool((a - b).abs().max() <= 1e-2 * (b.abs().max() + 1e-6))

    found = {}
    if same(seen["h1"], hidden.float() + seen["o"].float()):
        found["self_attn.o_proj"] = RESIDUAL_WRITERS["self_attn.o_proj"]
    if same(out, seen["h1"].float() + seen["down"].float()):
        found["mlp.down_proj"] = norm
    return found


class CorrectedBlock:
    """Forward hooks on a quantized block's target layers that add each corrected layer's s (x A^T) B^T to its output
    (peft's LoRA product, in the same order and dtypes) while `apply` is set."""

    def __init__(self, block: nn.Module, names: Sequence[str]):
        modules = dict(block.named_modules())
        self.factors: dict[str, tuple[Tensor, Tensor, float]] = {}  # name -> (A, B, s) on the device
        self.apply = True
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def hook(_module, args, out):
            if self.apply and name in self.factors:
                A, B, s = self.factors[name]
                return out + ((args[0].to(A.dtype) @ A.T) @ B.T * s).to(out.dtype)
            return None
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class Probe:
    """The values the report measures, kept for one forward pass of a block: per target layer its output (after the
    correction: create the Probe after the CorrectedBlock, hooks run in that order), or for a residual writer the
    stream right after its add: the input of post_attention_layernorm (o_proj) or the block's output (down_proj,
    filled in by the caller under BLOCK_OUTPUT)."""

    def __init__(self, block: nn.Module, names: Sequence[str], writers: Mapping[str, str]):
        modules = dict(block.named_modules())
        self.values: dict[str, Tensor] = {}
        self.point: dict[str, str] = {}  # target layer -> the key of its value
        self._handles = []
        for name in names:
            if name == "self_attn.o_proj" and name in writers:
                self.point[name] = RESIDUAL_WRITERS["mlp.down_proj"]
                self._handles.append(modules[self.point[name]].register_forward_pre_hook(self._keep_input))
            elif name == "mlp.down_proj" and name in writers:
                self.point[name] = BLOCK_OUTPUT
            else:
                self.point[name] = name
                self._handles.append(modules[name].register_forward_hook(self._keep_output(name)))

    def _keep_input(self, _module, args):
        self.values[RESIDUAL_WRITERS["mlp.down_proj"]] = args[0].detach()

    def _keep_output(self, name: str):
        def hook(_module, _args, out):
            self.values[name] = out.detach()
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
def build(ctx: ModelContext) -> ModelInit:
    """Error feedback over the whole model (see the module): block by block, input group by input group in forward
    order, C = closed_form(C*, X~ X~^T / N + lambda I) with C* = E + (W D + G) S^-1."""

    t0 = time.perf_counter()
    prefix, layers = decoder_layers(ctx.model)
    todo: dict[int, list[str]] = {}
    for path in ctx.plan:
        index, local = split_path(prefix, path)
        todo.setdefault(index, []).append(local)
    last = max(todo)
    device, dtype = ctx.device, ctx.calib_dtype
    residual = bool(ctx.options.get(RESIDUAL_OPTION, True))
    batch_size = calibration_batch_size(ctx.calib_ids.shape[-1])
    fits: dict[str, dict] = {}  # path -> what the report keeps
    seconds_per_block: list[float] = []
    with _quantized_model_as_is(ctx.model, ctx.peft_model), torch.no_grad():
        captured = capture_block_inputs(ctx.model, ctx.calib_ids, batch_size, device)
        captured_kwargs = [kw for _, kw in captured]
        full = [hidden for hidden, _ in captured]  # the full-precision stream (cast to calib_dtype per batch)
        fixed = list(full)  # the corrected 4-bit stream (the 4-bit model's own dtype)
        plain = fixed  # the plain 4-bit stream: the same list until the first correction
        del captured
        for index in range(last + 1):
            if ctx.should_stop():
                raise Cancelled(f"stopped during error-feedback initialization at block {index} of {last + 1}")
            tick = time.perf_counter()
            kwargs = [for_block(kw, index) for kw in captured_kwargs]  # this block's own (masks, rotary embeddings)
            fp_block = build_full_precision_block(ctx.model, index, ctx.checkpoint, device, dtype)
            q_block = layers[index]
            names = todo.get(index, [])
            writers: dict[str, str] = {}
            if names and residual:
                writers = residual_writers(fp_block, full[0].to(device=device, dtype=dtype),
                                           moved(kwargs[0], device))
            corrected = CorrectedBlock(q_block, names)
            probes = (Probe(fp_block, names, writers), Probe(q_block, names, writers))
            try:
                if names:
                    if plain is fixed:
                        plain = list(fixed)  # from here on the streams part
                    _fit_block(ctx, f"{prefix}.{index}", fp_block, q_block, names, writers, full, fixed, kwargs,
                               corrected, fits)
                full, fixed, plain, sums = _advance(fp_block, q_block, full, fixed, plain, kwargs, corrected, probes,
                                                    device, dtype, moved, STORE)
            finally:
                corrected.remove()
                for probe in probes:
                    probe.remove()
            for local in names:
                fit = fits[f"{prefix}.{index}.{local}"]
                plain_sum, fixed_sum = float(sums.get((False, local), 0.0)), float(sums.get((True, local), 0.0))
                fit["in_stream"] = math.sqrt(fixed_sum / plain_sum) if plain_sum > 0 else 0.0
            del fp_block, corrected, probes
            if device.type == "cuda":
                torch.cuda.empty_cache()
            seconds_per_block.append(round(time.perf_counter() - tick, 3))
    factors = {path: fit.pop("factors") for path, fit in fits.items()}
    layer_errors = {path: (fit["weight"], fit["in_stream"]) for path, fit in fits.items()}
    details = {
        "calibrated_error": "per layer: what it aims at (its output, or for o_proj / down_proj the residual stream "
                            "after its add) against the full-precision model, in the 4-bit model corrected by this "
                            "method, relative to the same in the plain 4-bit model (QLoRA), over the calibration "
                            "tokens; the other methods' figure is local and assumes full-precision inputs",
        "local_calibrated_error": {path: fit["local"] for path, fit in fits.items()},
        "residual_layers": sorted(path for path, fit in fits.items() if fit["residual"]),
        "order": "forward order within each block: one pass of each stream per input group",
        "seconds_per_block": seconds_per_block,
    }
    return ModelInit(factors, time.perf_counter() - t0, layer_errors, details=details)


def _fit_block(ctx: ModelContext, block_path: str, fp_block: nn.Module, q_block: nn.Module, names: list[str],
               writers: Mapping[str, str], full: list[Tensor], fixed: list[Tensor], kwargs: list[dict],
               corrected: CorrectedBlock, fits: dict[str, dict]) -> None:
    """Fit the block's target layers group by group in forward order, hooking each group's corrections into
    `corrected` before the next group's inputs are taken. `writers`: the residual writers (RESIDUAL_WRITERS) whose
    target includes the residual stream's error."""

    device, dtype = ctx.device, ctx.calib_dtype
    fp_modules, q_modules = dict(fp_block.named_modules()), dict(q_block.named_modules())
    groups = forward_groups(fp_block, names, full[0].to(device=device, dtype=dtype), moved(kwargs[0], device))
    for group in groups:
        moments = Moments()
        leader = group[0]
        # a residual writer reads a tensor of its own (o_proj, down_proj): its group is itself
        stream_at = writers.get(leader) if len(group) == 1 else None
        for hidden_full, hidden_fixed, kw in zip(full, fixed, kwargs):
            kw = moved(kw, device)
            h_full, h_fixed = hidden_full.to(device=device, dtype=dtype), hidden_fixed.to(device)
            x, h1 = input_of(fp_block, fp_modules[leader], h_full, kw, fp_modules[stream_at] if stream_at else None)
            x_tilde, h1_tilde = input_of(q_block, q_modules[leader], h_fixed, kw,
                                         q_modules[stream_at] if stream_at else None)
            r = None
            if stream_at == "":
                r = h_full.float() - h_fixed.float()  # the stream o_proj adds to is the block's input
            elif stream_at:
                r = h1.float() - h1_tilde.float()
            moments.add(x, x_tilde, r)
            del x, x_tilde, h1, h1_tilde, r
        H_tilde, D, H, G = moments.normalized()
        del moments
        with one_cpu_thread(device):
            spec = init_math.damped(H_tilde, ctx.damping)
            local_spec = init_math.damped(H, ctx.damping)  # for the report's local figure only
            for local in group:
                path = f"{block_path}.{local}"
                r, s = ctx.plan[path]
                W = fp_modules[local].weight.detach().float()
                meter = init_math.LowRankErrors(W - dequantized_weight(q_modules[local]).to(W.device), local_spec)
                target = feedback_target(meter.E, W, D, spec, G)
                del W
                P, Rt = init_math.closed_form_correction(target, spec, r, solver=ctx.solver)
                A, B = init_math.split_factors(P, Rt, s)
                weight, local_error = meter.errors(s * B.to(meter.E.dtype), A.to(meter.E.dtype))
                fits[path] = {"factors": Factors(A.float().cpu(), B.float().cpu()), "weight": weight,
                              "local": local_error, "residual": G is not None}
                corrected.factors[local] = (A.to(device), B.to(device), float(s))
                del meter, target, P, Rt
            del spec, local_spec, H_tilde, D, H, G


def _advance(fp_block, q_block, full, fixed, plain, kwargs, corrected: CorrectedBlock, probes: tuple[Probe, Probe],
             device, dtype, moved, store):
    """Every stream through its block i (all of the block's corrections in place in the corrected stream), giving
    block i+1's inputs, and the report's sums: {(True, name): sum ||v_full - v_corrected||^2, (False, name): the
    same for the plain stream}, v what the target layer `name` aims at (Probe)."""

    fp_probe, q_probe = probes
    new_full, new_fixed, new_plain = [], [], []
    sums: dict[tuple[bool, str], Tensor] = {}
    shared = plain is fixed
    for b, kw in enumerate(kwargs):
        kw = moved(kw, device)
        fp_probe.values = {}
        out = block_output(fp_block(full[b].to(device=device, dtype=dtype), **kw)).detach()
        fp_probe.values[BLOCK_OUTPUT] = out
        new_full.append(out.to(store))
        reference = fp_probe.values
        for applied, stream, new in ((True, fixed, new_fixed), (False, plain, new_plain)):
            if shared and not applied:
                break
            corrected.apply = applied
            q_probe.values = {}
            out = block_output(q_block(stream[b].to(device), **kw)).detach()
            q_probe.values[BLOCK_OUTPUT] = out
            new.append(out.to(store))
            for name, key in q_probe.point.items():
                diff = q_probe.values[key].float() - reference[key].float()
                total = (diff * diff).sum()
                sums[(applied, name)] = sums[(applied, name)] + total if (applied, name) in sums else total
        corrected.apply = True
        fp_probe.values, q_probe.values = {}, {}
        del out, reference
    return new_full, new_fixed, (new_fixed if shared else new_plain), sums
