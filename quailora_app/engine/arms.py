"""Fine-tuning arms: what each arm is (base precision + LoRA initialization), and one arm's training state.

An arm is a peft LoRA model on a base with an AdamW optimizer over the LoRA factors. The bases (`BASES`):
    "4bit"  the run's quantized base, as --quantizer / --bits / --group-size set it: bitsandbytes NF4/FP4 at 4 bits
            (the default, the QLoRA recipe) or HQQ at 2, 3, 4 or 8 bits. The key keeps its name from when it was
            always 4-bit, so reports of older runs read the same; labels say the real bits (`arm_labels`).
    "nf4"   always bitsandbytes NF4 4-bit with double quantization in blocks of 64 (the QLoRA recipe), whatever the
            run's quantizer: the reference a run at other bits is compared with (qlora_nf4).
    "8bit"  bitsandbytes LLM.int8;  "full"  unquantized.
Its step is the same for every arm:
    loss = mean over tokens of -log p(x_t | x_<t)  (the perplexity objective, on the step's micro-batches)
    grads accumulated over grad_accum micro-batches, then one AdamW step at the scheduled learning rate.

An arm's initialization is any method of the registry that the engine computes: per layer (quailora, closed_form,
svd, ...), over the whole model after the per-layer pass (distill, sequential, budget: kind "model"), or the qlora
baseline. budget's arm gets per-layer ranks (peft's rank_pattern) at uniform rank r's parameter count, so it
trains as many LoRA parameters as the others: the flow attaches its LoRA with those ranks (adapters.attach_lora).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quailora_app.engine.evaluation.evaluate import perplexity
from quailora_app.engine.methods.registry import ANCHOR, BASELINE, REQUANT, get_method

BASES = ("4bit", "nf4", "8bit", "full")
#: bases holding a low-bit quantized model whose Q an initialization corrects
QUANTIZED_BASES = ("4bit", "nf4")


@dataclass(frozen=True)
class ArmSpec:
    """One fine-tuning arm: the base it trains on and the initialization its LoRA factors start from."""

    name: str
    base: str  # "4bit" (the run's quantizer and bits), "nf4" (bitsandbytes NF4 4-bit always), "8bit" (LLM.int8) or
    # "full" (unquantized)
    init: str  # a method of methods/registry.py computed per layer or over the whole model, or its qlora baseline
    # (peft default: B = 0)
    label: str  # the report's label
    short: str  # legend and checkbox label
    colour: str
    help: str  # one line
    default: bool = False  # in the default arm list of `train`

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"arm {self.name!r}: base must be one of {', '.join(BASES)}, not {self.base!r}")
        kind = get_method(self.init).kind
        if kind == ANCHOR:  # peft's LoftQ runs on the init flow's peft model, not in the engine's passes
            raise ValueError(f"arm {self.name!r}: {self.init} is not computed per layer nor over the whole model by "
                             "the engine, so no arm can start from it")
        if kind == REQUANT and self.base not in QUANTIZED_BASES:
            raise ValueError(f"arm {self.name!r}: {self.init} quantizes the base again, which only a low-bit base "
                             f"({', '.join(QUANTIZED_BASES)}) can")
        if self.base == "full" and kind != BASELINE:
            raise ValueError(f"arm {self.name!r}: an unquantized base has no quantization error for {self.init} "
                             "to correct; use the qlora init there")


#: The one arms registry: name -> ArmSpec, in the order of every table, figure and choice list. The "4bit" arms share
#: the run's quantized base (NF4/FP4, or HQQ at --bits) and one calibration (LoftQ's arms each get their own
#: re-quantized layers from it) (the whole-model arms distill4, sequential4 and budget4 run after it);
#: quailora8 is initialized against the 8-bit Q; lora16 is the unquantized (float32 on CPU, bfloat16 on CUDA)
#: reference.
ARM_SPECS: dict[str, ArmSpec] = {}


def register_arm(spec: ArmSpec) -> ArmSpec:
    """Add an arm (a name is registered once)."""
    if spec.name in ARM_SPECS:
        raise ValueError(f"arm {spec.name!r} is already registered")
    ARM_SPECS[spec.name] = spec
    return spec


def unregister_arm(name: str) -> None:
    """Remove an arm (for tests that register a toy one)."""
    del ARM_SPECS[name]


def find_arm(name: str) -> ArmSpec | None:
    return ARM_SPECS.get(name)


def arm_names() -> tuple[str, ...]:
    """Every registered arm (the CLI and form choices; read when a parser or form is built)."""
    return tuple(ARM_SPECS)


def default_arm_names() -> tuple[str, ...]:
    return tuple(name for name, spec in ARM_SPECS.items() if spec.default)


for _spec in (
    ArmSpec("qlora4", "4bit", "qlora", "4-bit QLoRA (peft default init)", "4-bit QLoRA", "#d62728",
            "4-bit base, peft's default init (B = 0)", default=True),
    ArmSpec("quailora4", "4bit", "quailora", "4-bit + QuAILoRA init", "4-bit QuAILoRA", "#1f77b4",
            "4-bit base, QuAILoRA's calibrated init", default=True),
    ArmSpec("closed4", "4bit", "closed_form", "4-bit + closed-form init", "4-bit closed-form init", "#2ca02c",
            "4-bit base, the calibrated objective's exact optimum as init"),
    ArmSpec("svd4", "4bit", "svd", "4-bit + SVD (uncalibrated) init", "4-bit SVD init", "#ff7f0e",
            "4-bit base, the SVD of the weight error as init"),
    ArmSpec("distill4", "4bit", "distill", "4-bit + closed form, then distilled", "4-bit distilled init", "#e377c2",
            "4-bit base, the closed form refined by a few KL steps toward the full-precision model"),
    ArmSpec("sequential4", "4bit", "sequential", "4-bit + error feedback (sequential closed form)",
            "4-bit error-feedback init", "#bcbd22",
            "4-bit base, the closed form fitted block by block to the corrected 4-bit model's inputs"),
    ArmSpec("budget4", "4bit", "budget", "4-bit + closed form, ranks under a budget", "4-bit budgeted ranks",
            "#8c564b", "4-bit base, the closed form at per-layer ranks with uniform rank r's parameter count"),
    ArmSpec("loftq4", "4bit", "loftq_svd", "4-bit LoftQ (base re-quantized, T = 5)", "4-bit LoftQ", "#aec7e8",
            "the run's quantized base re-quantized by LoftQ's 5 alternating steps, with its SVD factors as init"),
    ArmSpec("loftq_cal4", "4bit", "loftq_calibrated", "4-bit calibrated LoftQ (base re-quantized, T = 5)",
            "4-bit calibrated LoftQ", "#98df8a",
            "LoftQ's 5 alternating steps with the calibrated closed form as the fit: re-quantized base and init"),
    ArmSpec("qlora_nf4", "nf4", "qlora", "bitsandbytes NF4 4-bit QLoRA (the QLoRA recipe, as reference)",
            "NF4 4-bit QLoRA (reference)", "#9467bd",
            "bitsandbytes NF4 4-bit base whatever --quantizer and --bits say, peft's default init: the QLoRA recipe "
            "beside arms at other bit widths"),
    ArmSpec("qlora8", "8bit", "qlora", "8-bit LLM.int8 QLoRA (peft default init)", "8-bit QLoRA", "#7f7f7f",
            "8-bit LLM.int8 base, peft's default init", default=True),
    ArmSpec("quailora8", "8bit", "quailora", "8-bit + QuAILoRA init (against the 8-bit Q)", "8-bit QuAILoRA",
            "#17becf", "8-bit base, QuAILoRA's init against the 8-bit Q"),
    ArmSpec("lora16", "full", "qlora", "unquantized base, LoRA (peft default init)", "16-bit LoRA", "#4d4d4d",
            "unquantized base, plain LoRA: the reference"),
):
    register_arm(_spec)


def quantized_title(quantizer: str, bits: int) -> str:
    """How a quantized base is named in labels: '4-bit' for bitsandbytes' 4-bit (the labels' historical wording),
    'HQQ 3-bit' for HQQ."""
    return "4-bit" if quantizer == "bitsandbytes" else f"{quantizer.upper()} {bits}-bit"


def arm_labels(spec: ArmSpec, quant) -> tuple[str, str]:
    """(label, short) of arm `spec` in a run whose quantized base is `quant` (a config.QuantConfig: quantizer,
    bits, quant): an arm on the run's base ("4bit") says that base's bits and quantizer ("HQQ 3-bit QuAILoRA"), never
    "4-bit" when it is not; the others keep their registered labels."""
    if spec.base != "4bit" or quant is None or quant.quantizer == "bitsandbytes":
        return spec.label, spec.short
    title = quantized_title(quant.quantizer, quant.bits)

    def say(text: str) -> str:
        return text.replace("4-bit", title, 1) if "4-bit" in text else f"{title} {text}"

    return say(spec.label), say(spec.short)


def base_title(base: str, quant) -> str:
    """A base named in log lines and reports: the run's quantized base with its bits and quantizer ('HQQ 3-bit',
    'NF4 4-bit'), 'NF4 4-bit' for the reference base, '8-bit LLM.int8', 'unquantized'."""
    if base == "4bit":
        if quant is None or quant.quantizer == "bitsandbytes":
            return f"{(quant.quant if quant is not None else 'nf4').upper()} 4-bit"
        return quantized_title(quant.quantizer, quant.bits)
    return {"nf4": "NF4 4-bit", "8bit": "8-bit LLM.int8", "full": "unquantized"}.get(base, base)


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
    quantization state outside them (bitsandbytes' 4-bit absmax and nested state, 8-bit row scales; HQQ's scales
    and zeros, kept in each layer's `meta` dict)."""
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

    def add_meta(meta) -> None:
        for value in meta.values():
            if isinstance(value, dict):
                add_meta(value)
            else:
                add(value)

    for module in model.modules():
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict) and hasattr(module, "W_q"):  # an HQQ layer
            add_meta(meta)
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
    memory_how: str = ""  # one word for tables: measured, partly measured or accounted
    adapter_dir: str = ""
    status: str = "running"
    #: downstream task kind -> [(step, which items were right)], one per evaluation (when the run scores accuracy)
    accuracy: dict[str, list[tuple[int, tuple[bool, ...]]]] = field(default_factory=dict)

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError(f"arm {self.name}: no trainable LoRA parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        self.weights_bytes = model_bytes(self.model)
        self._weight_keys = ({_storage_key(p) for p in self.model.parameters()}
                             | {_storage_key(b) for b in self.model.buffers()})
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
            self.memory_method = ("measured: torch.cuda.max_memory_allocated during the arm's step "
                                  "(arm alone on the device)")
            self.memory_how = "measured"
        elif cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            memory = self.weights_bytes + self.optimizer_bytes() + peak - before
            self.memory_method = ("arm's weights + AdamW state (accounted) + the step's measured rise of "
                                  "torch.cuda.max_memory_allocated above the memory allocated before it")
            self.memory_how = "partly measured"
        else:
            memory = self.weights_bytes + grad_bytes + self.optimizer_bytes() + activation_peak
            self.memory_method = ("accounted: weights and quantization state + LoRA gradients + AdamW state + "
                                  "activations autograd saved for backward (one micro-batch)")
            self.memory_how = "accounted"
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

    def record_accuracy(self, task: str, step: int, correct: tuple[bool, ...], seconds: float = 0.0) -> None:
        """Which items of downstream task `task` the arm got right after `step` steps (scoring took `seconds`)."""
        self.seconds += seconds
        self.accuracy.setdefault(task, []).append((step, tuple(correct)))

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
