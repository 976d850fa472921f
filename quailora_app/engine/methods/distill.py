"""`distill`: a short model-level refinement of the closed form (DESIGN.md, "Model-level refinement").

The per-layer methods each minimize one layer's calibrated error tr((E - C) H (E - C)^T), every other layer held at
full precision. The adapter serves the whole 4-bit model, where the layers' remaining errors add up and interact
through the nonlinearities. This method starts from closed_form's factors and trains only the LoRA factors A, B of
the planned layers (Q frozen: the bitsandbytes weights are never written) for a small fixed number of AdamW steps,
so that the 4-bit model's next-token distribution matches the full-precision model's on the calibration text (RILQ,
Lee et al. 2024, reports that such a model-level loss beats layer-level ones):

    min over {A_l, B_l}  L = 1/T sum_t KL(p_t || q_t) = 1/T sum_t sum_v p_t(v) (log p_t(v) - log q_t(v)),

p_t = softmax(z_t) from the full-precision model's logits at position t, q_t = softmax(z~_t) from the 4-bit model's,
in which each planned layer computes y = Q x + s B A x, and T the tokens of a step's windows (every position). The
forward KL is the cross-entropy against the teacher's soft labels minus the teacher's entropy (a constant), so its
gradient with respect to the student's logits is (q_t - p_t) / T: it pulls probability toward every token the
full-precision model finds plausible (mass-covering), which is what keeps the 4-bit model's perplexity on any text
close to the full model's. AdamW runs without weight decay (it would pull the factors from the closed form toward
zero, i.e. toward plain QLoRA), with a linear warm-up over a quarter of the steps, then a linear decay, and
gradients clipped at norm 1.

Full-precision targets without a full-precision model in memory: the windows stream through the full-precision
decoder blocks one block at a time (as calibration does, calibrate.py), which leaves the final hidden states h
(windows x seq_len x hidden, in CPU memory: the size of one block's activations). The teacher's logits
z = lm_head(norm(h)) are recomputed at each step from h through the model's own final norm and lm_head, which QLoRA
leaves unquantized (so they are the full-precision model's). Caching the logits would cost windows x seq_len x vocab
numbers (1.6 GB for 32 x 256 tokens of a 49k vocabulary); caching the top k only would turn the KL into an
approximation; recomputing is one matrix product per step, a fraction of the student's forward pass. That the head
maps the model's last hidden state to its own logits is checked on the first batch (a ModelError names an
architecture with more in between, such as a logit scale).

Windows: the last 1/16 of the calibration windows (at least one when there are two or more) are held out: never
trained on, their KL before and after shows overfitting to the windows trained on (they did enter the closed form's
H, through second moments only). The others are visited in a seeded random order, `distill_batch` per step; only the
windows visited and held out get targets, so a short run pays for few. The KL is measured before and after on the
held-out windows and on as many windows of the first steps (the training probe), and, for reference, for plain 4-bit
(QLoRA's start, B = 0). Whether the refinement holds on other text is the init flow's `--eval-dataset` question.

Per-layer errors: none (ModelInit.layers is empty). The refinement optimizes no layer's objective: the weight and
calibrated errors of its factors would need a second calibration pass and would measure what the method deliberately
trades away. method_details keeps instead the KL curve (each step's KL), the KL of qlora / closed_form / distill on
the probe and held-out windows, and how far the factors moved (median over layers of ||C - C0||_F / ||C0||_F,
C = s B A, C0 the closed form's).

Memory: the 4-bit model + the LoRA factors, their gradients and two AdamW moments + one step's activations, logits
included (batch x seq_len x vocab, a few times over). The model is left as found: a LoRA this module attaches is
unloaded; a user's LoRA layers get their own factors back (the caller writes the result); training flags,
requires_grad, the active adapter and bitsandbytes' CPU repacking switch (off while distill runs, so that no forward
pass repacks Q) are restored.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quailora_app.config import DISTILL_DEFAULTS
from quailora_app.engine.adapters import Factors, attach_lora, lora_layers, write_factors
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
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import ModelContext, ModelInit
from quailora_app.errors import Cancelled, ConfigError, ModelError

NAME = "distill"
HOLDOUT_SHARE = 16  # one calibration window in sixteen is held out
SEED = 0  # the order of the training windows


def build(ctx: ModelContext) -> ModelInit:
    """The closed form, refined by `distill_steps` AdamW steps on KL(p_full || p_4bit+LoRA) (see the module)."""

    t0 = time.perf_counter()
    steps, lr, batch = settings(ctx.options)
    start, start_note, start_seconds = _start(ctx)
    windows = window_plan(len(ctx.calib_ids), steps, batch)
    ids = ctx.calib_ids[windows.used]  # only the windows distill reads get full-precision targets

    model = ctx.model
    restore = _State(model)
    attached = None
    try:
        restore.quiet_model()
        with _adapters_off(ctx.peft_model):
            tick = time.perf_counter()
            hidden = full_precision_hidden(model, ctx.checkpoint, ids, ctx.device, ctx.calib_dtype,
                                           should_stop=ctx.should_stop)
            teacher_seconds = time.perf_counter() - tick
        if ctx.peft_model is None:
            ranks = {path: layer.rank for path, layer in ctx.plan.items() if layer.rank != ctx.lora.rank}
            attached = attach_lora(model, ctx.lora, list(ctx.plan), ranks or None)
            peft_model, adapter = attached, "default"
        else:
            peft_model, adapter = ctx.peft_model, ctx.adapter
        layers = lora_layers(peft_model)
        missing = sorted(set(ctx.plan) - set(layers))
        if missing:
            raise ModelError(f"distill: no LoRA layer for {', '.join(missing[:3])}")
        restore.lora(layers, adapter, ctx.plan)
        restore.active_adapter(peft_model, adapter)
        write_factors(peft_model, {path: start[path] for path in ctx.plan}, adapter)
        model.eval()  # the LoRA layers just attached too: no dropout
        params = [p for path in ctx.plan for p in (layers[path].lora_A[adapter].weight,
                                                  layers[path].lora_B[adapter].weight)]
        for p in params:
            p.requires_grad_(True)
        head = Head(model)

        def kl_now() -> dict[str, float | None]:
            return {part: mean_kl(model, head, ids[rows], hidden[rows], batch, ctx.device) if len(rows) else None
                    for part, rows in (("train", windows.probe), ("holdout", windows.held))}

        kl: dict[str, dict[str, float | None]] = {}
        with peft_model.disable_adapter():
            kl["qlora"] = kl_now()
        kl["closed_form"] = kl_now()
        tick = time.perf_counter()
        curve = train(model, head, params, ids, hidden, windows.steps, lr=lr, device=ctx.device,
                      should_stop=ctx.should_stop)
        train_seconds = time.perf_counter() - tick
        kl[NAME] = kl_now()
        trained = {path: Factors(layers[path].lora_A[adapter].weight.detach().float().cpu().clone(),
                                 layers[path].lora_B[adapter].weight.detach().float().cpu().clone())
                   for path in ctx.plan}
    finally:
        restore.undo()
        if attached is not None:
            attached.unload()
    details = {
        "start": start_note, "steps": steps, "lr": lr, "batch_windows": batch,
        "tokens_per_step": int(len(windows.steps[0]) * ctx.calib_ids.shape[1]),
        "trained_windows": windows.trained, "probe_windows": len(windows.probe), "holdout_windows": len(windows.held),
        "kl_curve": curve, "kl_curve_is": "each step's mean token KL on that step's windows, before its update",
        "kl": kl, "moved": _median_move(start, trained, ctx.plan),
        "seconds": {"closed_form": start_seconds, "teacher": teacher_seconds, "train": train_seconds},
        **_verdict(kl),
    }
    return ModelInit(trained, time.perf_counter() - t0, details=details)


# ---------------------------------------------------------------------------------------------- settings, windows
def settings(options: Mapping[str, Any]) -> tuple[int, float, int]:
    """(steps, learning rate, windows per step) from the InitConfig fields or the API's options."""

    steps, lr, batch = (options.get(name, DISTILL_DEFAULTS[name])
                        for name in ("distill_steps", "distill_lr", "distill_batch"))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"distill_steps must be an integer of at least 1, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"distill_lr must be a positive number, got {lr!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"distill_batch must be an integer of at least 1, got {batch!r}")
    return steps, float(lr), batch


def holdout_count(windows: int) -> int:
    """Calibration windows held out of the training: one in HOLDOUT_SHARE, at least one when there are two."""
    return 0 if windows < 2 else max(1, windows // HOLDOUT_SHARE)


@dataclass
class WindowPlan:
    """Which calibration windows distill reads; all but `used` are rows of calib_ids[used]."""

    used: torch.Tensor  # indices into the calibration windows, ascending: the windows given targets
    steps: list[torch.Tensor]  # per step, the rows trained on
    probe: torch.Tensor  # rows trained on, measured before and after
    held: torch.Tensor  # rows never trained on, measured before and after
    trained: int  # distinct windows trained on


def window_plan(windows: int, steps: int, batch: int, seed: int = SEED) -> WindowPlan:
    """The last holdout_count(windows) windows are held out; the others are visited in a seeded random order,
    reshuffled at each pass, `batch` per step; the first ones visited (as many as are held out, at least one) are
    the training probe."""
    held = holdout_count(windows)
    pool_size = windows - held
    generator = torch.Generator().manual_seed(seed)
    size = min(batch, pool_size)
    pool: list[int] = []
    chosen: list[list[int]] = []
    for _ in range(steps):
        if len(pool) < size:
            pool += torch.randperm(pool_size, generator=generator).tolist()
        chosen.append(pool[:size])
        pool = pool[size:]
    visited = list(dict.fromkeys(i for step in chosen for i in step))
    used = sorted(set(visited) | set(range(pool_size, windows)))
    row = {index: r for r, index in enumerate(used)}
    rows = lambda indices: torch.tensor([row[i] for i in indices], dtype=torch.long)  # noqa: E731
    return WindowPlan(torch.tensor(used, dtype=torch.long), [rows(step) for step in chosen],
                      rows(visited[:max(1, held)]), rows(range(pool_size, windows)), len(visited))


def _start(ctx: ModelContext) -> tuple[Mapping, str, float]:
    """closed_form's factors for every planned layer: the per-layer pass's, or computed here."""
    if ctx.start is not None and set(ctx.plan) <= set(ctx.start):
        return ctx.start, "closed_form of the per-layer pass (its seconds are closed_form's)", 0.0

    tick = time.perf_counter()
    result = InitResult()
    for _ in initialize(ctx.model, ctx.checkpoint, ctx.calib_ids, ctx.lora, ["closed_form"], result,
                        device=ctx.device, calib_dtype=ctx.calib_dtype, damping=ctx.damping,
                        als_rounds=ctx.als_rounds, should_stop=ctx.should_stop, solver=ctx.solver, plan=ctx.plan):
        pass
    return result.factors["closed_form"], "closed_form, computed here (its seconds are included)", \
        time.perf_counter() - tick


# ---------------------------------------------------------------------------------------------- the teacher
def full_precision_hidden(model, checkpoint, calib_ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                          batch_size: int | None = None,
                          should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """The full-precision model's last hidden states (before the final norm) for every window: (n, L, hidden) on
    the CPU, computed block by block from the checkpoint (one full-precision block in memory at a time)."""

    _, layers = decoder_layers(model)
    batch_size = batch_size or calibration_batch_size(calib_ids.shape[-1])
    with torch.no_grad():
        states = capture_block_inputs(model, calib_ids, batch_size, device)
        for index in range(len(layers)):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped during distill's full-precision pass at block {index} of {len(layers)}")
            block = build_full_precision_block(model, index, checkpoint, device, dtype)
            states = [(block_output(block(hidden.to(device=device, dtype=dtype),
                                                **moved(for_block(kwargs, index), device)))
                       .detach().to(STORE), kwargs) for hidden, kwargs in states]
            del block
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return torch.cat([hidden for hidden, _ in states])


class Head:
    """The model's own map from its last hidden state to logits: final norm, lm_head (and Gemma 2's softcap)."""

    def __init__(self, model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.norm = getattr(decoder, "norm", None)
        self.lm_head = model.get_output_embeddings()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if not isinstance(self.norm, nn.Module) or self.lm_head is None:
            raise ModelError(f"distill: {type(model).__name__} has no final norm (.norm of its decoder) and lm_head "
                             "to compute the full-precision logits with")
        self.checked = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = next(self.lm_head.parameters()).dtype
        logits = self.lm_head(self.norm(hidden.to(dtype)))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """ModelError unless this head maps the model's own last hidden state to the model's own logits."""
        if self.checked:
            return
        mine = self(hidden).float()
        scale = float(logits.float().abs().max().clamp_min(1e-6))
        if not torch.allclose(mine, logits.float(), rtol=0, atol=1e-3 * scale):
            raise ModelError("distill: the final norm and lm_head do not reproduce this model's logits from its last "
                             "hidden state (something else sits between them); distill does not support it")
        self.checked = True


# ---------------------------------------------------------------------------------------------- the loss
def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """sum over tokens t of KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v)), p = softmax(teacher),
    q = softmax(student), in float32."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_q.reshape(-1, log_q.shape[-1]), log_p.reshape(-1, log_p.shape[-1]), reduction="sum",
                    log_target=True)


@contextlib.contextmanager
def _last_hidden(model) -> Iterator[list[torch.Tensor]]:
    """Catches the output of the model's last decoder block (its last hidden state) during a forward pass."""

    caught: list[torch.Tensor] = []
    handle = decoder_layers(model)[1][-1].register_forward_hook(
        lambda _module, _args, out: caught.append(block_output(out).detach()))
    try:
        yield caught
    finally:
        handle.remove()


@torch.no_grad()
def mean_kl(model, head: Head, ids: torch.Tensor, hidden: torch.Tensor, batch: int, device: torch.device) -> float:
    """1/T sum_t KL(p_full || p_model) over every token of `ids` (the teacher: `hidden` through `head`)."""
    total, tokens = 0.0, 0
    for first in range(0, len(ids), batch):
        part = slice(first, first + batch)
        with _last_hidden(model) as caught:
            logits = model(input_ids=ids[part].to(device), use_cache=False).logits
        head.check(caught[-1], logits)
        total += float(kl_sum(logits, head(hidden[part].to(device))))
        tokens += ids[part].numel()
    return total / max(tokens, 1)


def train(model, head: Head, params: list[torch.Tensor], ids: torch.Tensor, hidden: torch.Tensor,
          steps: list[torch.Tensor], *, lr: float, device: torch.device,
          should_stop: Callable[[], bool] | None = None) -> list[float]:
    """One AdamW step per entry of `steps` (rows of `ids` / `hidden`) on those windows' mean token KL; returns each
    step's KL (before its update). The learning rate rises linearly to `lr` over the first quarter of the steps
    (Adam's first updates move every factor by about the learning rate, whatever its gradient) and then decays
    linearly toward 0."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, len(steps)))
    curve = []
    for step, rows in enumerate(steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped during distill at step {step} of {len(steps)}")
        logits = model(input_ids=ids[rows].to(device), use_cache=False).logits
        with torch.no_grad():
            target = head(hidden[rows].to(device))
        loss = kl_sum(logits, target) / ids[rows].numel()
        del logits, target
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve


def lr_factor(step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of `steps`, as a share of the peak: (step + 1) / w over the first
    w = ceil(steps / 4) steps, then (steps - step) / (steps - w + 1), reaching 1 / (steps - w + 1) at the last."""
    warm = math.ceil(steps / 4)
    return (step + 1) / warm if step < warm else (steps - step) / (steps - warm + 1)


# ---------------------------------------------------------------------------------------------- the report
def _median_move(start: Mapping, trained: Mapping, plan: Mapping) -> float | None:
    """Median over layers of ||C - C0||_F / ||C0||_F, C = s B A (trained) and C0 (the closed form's)."""
    moves = []
    for path, (_, s) in plan.items():
        before = s * start[path].B.float() @ start[path].A.float()
        after = s * trained[path].B @ trained[path].A
        norm = float(before.norm())
        if norm > 0:
            moves.append(float((after - before).norm()) / norm)
    moves.sort()
    return moves[len(moves) // 2] if moves else None


def _verdict(kl: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
    """KL after / before on the probe and the held-out windows, and what the held-out windows say."""
    before, after = kl["closed_form"], kl[NAME]
    ratio = {part: after[part] / before[part] if before[part] and after[part] is not None else None
             for part in ("train", "holdout")}
    if ratio["holdout"] is None:
        note = "no held-out window (a single calibration window): overfitting not measured"
    elif ratio["holdout"] > 1.0:
        note = "overfitting: the KL rose on the held-out windows while the windows trained on were fitted"
    elif ratio["train"] is not None and 1.0 - ratio["holdout"] < 0.5 * (1.0 - ratio["train"]):
        note = "partly overfitted: the held-out windows gained less than half of what the windows trained on gained"
    else:
        note = "no sign of overfitting: the held-out windows gained with the windows trained on"
    return {"kl_ratio": ratio, "overfitting": note}


class _State:
    """What distill changes on the model, and puts back: each module's training flag, each parameter's
    requires_grad, bitsandbytes' AVX512-BF16 repacking switch, a user's LoRA factors and active adapter."""

    def __init__(self, model):
        self.model = model
        self.training = {m: m.training for m in model.modules()}
        self.grad = {p: p.requires_grad for p in model.parameters()}
        self.lora_weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.repack: dict[nn.Module, bool] = {}
        self.adapter: tuple[Any, Any] | None = None

    def quiet_model(self) -> None:
        """Evaluation mode (no dropout), and no repacking of Q for bitsandbytes' CPU kernel: Q stays as it is."""
        self.model.eval()
        for module in self.model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                self.repack[module] = module.support_avx512bf16_for_cpu
                module.support_avx512bf16_for_cpu = False

    def lora(self, layers: Mapping[str, nn.Module], adapter: str, plan: Mapping) -> None:
        for path in plan:
            for w in (layers[path].lora_A[adapter].weight, layers[path].lora_B[adapter].weight):
                self.lora_weights.append((w, w.detach().clone()))
                self.grad.setdefault(w, w.requires_grad)

    def active_adapter(self, peft_model, adapter: str) -> None:
        """Make `adapter` the active one for the student's passes (the previous one comes back in undo)."""
        previous = peft_model.active_adapter
        if previous != adapter:
            self.adapter = (peft_model, previous)
            peft_model.set_adapter(adapter)

    def undo(self) -> None:
        with torch.no_grad():
            for w, saved in self.lora_weights:
                w.copy_(saved)
                w.grad = None
        if self.adapter is not None:
            peft_model, previous = self.adapter
            peft_model.set_adapter(previous)
        for module, value in self.repack.items():
            module.support_avx512bf16_for_cpu = value
        for p, flag in self.grad.items():
            p.requires_grad_(flag)
        for module, flag in self.training.items():
            module.training = flag


@contextlib.contextmanager
def _adapters_off(peft_model) -> Iterator[None]:
    """The user's LoRA switched off while the teacher runs (the full-precision model has no adapter)."""
    if peft_model is None:
        yield
        return
    with peft_model.disable_adapter():
        yield
