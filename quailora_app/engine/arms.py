"""Fine-tuning arms: what each arm is (base precision + LoRA initialization), and one arm's training state.

An arm is a peft LoRA model on a base (4-bit NF4/FP4, 8-bit LLM.int8, or unquantized) with an AdamW
optimizer over the LoRA factors. Its step is the same for every arm:
    loss = mean over tokens of -log p(x_t | x_<t)  (the perplexity objective, on the step's micro-batches)
    grads accumulated over grad_accum micro-batches, then one AdamW step at the scheduled learning rate.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quailora_app.config import ARMS
from quailora_app.engine.evaluate import perplexity


@dataclass(frozen=True)
class ArmSpec:
    base: str  # "4bit", "8bit" or "full"
    init: str  # "qlora" (peft default: A random, B = 0), "quailora", "closed_form" or "svd"
    label: str


ARM_SPECS: dict[str, ArmSpec] = {
    "qlora4": ArmSpec("4bit", "qlora", "4-bit QLoRA (peft default init)"),
    "quailora4": ArmSpec("4bit", "quailora", "4-bit + QuAILoRA init"),
    "closed4": ArmSpec("4bit", "closed_form", "4-bit + closed-form init"),
    "svd4": ArmSpec("4bit", "svd", "4-bit + SVD (uncalibrated) init"),
    "qlora8": ArmSpec("8bit", "qlora", "8-bit LLM.int8 QLoRA (peft default init)"),
    "quailora8": ArmSpec("8bit", "quailora", "8-bit + QuAILoRA init (against the 8-bit Q)"),
    "lora16": ArmSpec("full", "qlora", "unquantized base, LoRA (peft default init)"),
}
assert set(ARM_SPECS) == set(ARMS)


def batch_hash(micro_batches: list[torch.Tensor]) -> str:
    """A short fingerprint of a step's token ids (the same at the same step in every arm)."""
    h = hashlib.sha1()
    for ids in micro_batches:
        h.update(ids.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr())


def model_bytes(model) -> int:
    """Bytes the model holds: parameters and buffers (each storage once, so tied weights count once) plus
    bitsandbytes' quantization state outside them (4-bit absmax and nested state, 8-bit row scales)."""
    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and _storage_key(t) not in seen:
            seen.add(_storage_key(t))
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    for b in model.buffers():
        add(b)
    return total


class SavedActivations:
    """Counts the bytes autograd keeps for backward during a forward pass (activations), each storage once,
    leaving out the model's own weights. On CPU this is how an arm's activation memory is accounted."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.seen: set = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.seen.clear()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.seen.clear()


@dataclass
class Arm:
    """One arm's model, optimizer and history."""

    name: str
    spec: ArmSpec
    model: object  # peft model
    device: torch.device
    lr: float
    weight_decay: float = 0.0
    evals: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)  # per step, see step()
    steps_done: int = 0
    seconds: float = 0.0  # steps + evaluations of this arm
    setup_seconds: float = 0.0
    memory_method: str = ""
    adapter_dir: str = ""
    status: str = "running"

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError(f"arm {self.name}: no trainable LoRA parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        self.weights_bytes = model_bytes(self.model)
        self._weight_keys = {_storage_key(p) for p in self.model.parameters()} | {_storage_key(b) for b in self.model.buffers()}
        self.trainable = sum(p.numel() for p in self.params)

    def optimizer_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for s in self.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def step(self, micro_batches: list[torch.Tensor], lr: float, measure_cuda: str = "") -> tuple[float, float, int]:
        """One optimizer step; returns (mean train loss, seconds, memory bytes).

        memory: on CUDA, torch.cuda.max_memory_allocated over the step (reset before it): `measure_cuda="peak"`
        reports it as is (sequential schedule: this arm is alone on the device), `"own"` adds this arm's
        resident bytes to the step's rise above what was allocated before it (interleaved: other arms are
        resident too). On CPU: accounted, weights + LoRA gradients + AdamW state + the largest set of
        activations autograd kept for one micro-batch's backward."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        meter = SavedActivations(self._weight_keys)
        activation_peak, total = 0, 0.0
        start = time.perf_counter()
        for ids in micro_batches:
            ids = ids.to(self.device)
            with meter:
                logits = self.model(input_ids=ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            activation_peak = max(activation_peak, meter.bytes)
            (loss / len(micro_batches)).backward()
            total += loss.item()
            del logits, loss
        grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in self.params if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if cuda and measure_cuda == "peak":
            memory = int(torch.cuda.max_memory_allocated(self.device))
            self.memory_method = "measured: torch.cuda.max_memory_allocated during the arm's step (arm alone on the device)"
        elif cuda:
            memory = self.weights_bytes + self.optimizer_bytes() + int(torch.cuda.max_memory_allocated(self.device)) - before
            self.memory_method = ("arm's weights + AdamW state (accounted) + the step's measured rise of "
                                  "torch.cuda.max_memory_allocated above the memory allocated before it")
        else:
            memory = self.weights_bytes + grad_bytes + self.optimizer_bytes() + activation_peak
            self.memory_method = ("accounted: weights and quantization state + LoRA gradients + AdamW state + "
                                  "activations autograd saved for backward (one micro-batch)")
        self.steps_done += 1
        self.step_seconds.append(seconds)
        self.losses.append(total / len(micro_batches))
        self.seconds += seconds
        self.memory.append(memory)
        return self.losses[-1], seconds, memory

    def evaluate(self, step: int, eval_ids: torch.Tensor, batch_size: int) -> float:
        start = time.perf_counter()
        ppl = perplexity(self.model, eval_ids, batch_size)
        self.seconds += time.perf_counter() - start
        self.evals.append((step, ppl))
        return ppl

    @property
    def peak_memory_bytes(self) -> int:
        """Largest per-step memory. With measure_cuda="own" the first step is left out when there are others:
        whichever arm steps first also pays for the CUDA libraries' one-off workspaces (backward kernels)."""
        own_cuda = self.device.type == "cuda" and self.memory_method.startswith("arm's")
        return max(self.memory[1:] if own_cuda and len(self.memory) > 1 else self.memory, default=0)

    @property
    def final_perplexity(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def best_perplexity(self) -> float | None:
        return min(p for _, p in self.evals) if self.evals else None
