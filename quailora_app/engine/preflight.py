"""How much memory a run needs, estimated from config.json alone, checked before any weight is read.

The model is built on the meta device (shapes only, no storage, well under a second even for 70B), which
gives, for any architecture transformers knows:
    L = weights of the nn.Linear layers bitsandbytes quantizes (every linear except the output head),
    O = every other parameter (embeddings, norms, biases, an untied lm_head),
    one decoder block's parameters, the in/out widths of its linears, h (hidden), V (vocab), n_blocks.

Bytes per element: w = holding dtype of the unquantized tensors (4 on CPU, where everything is float32;
the compute dtype on CUDA, 2 for bfloat16), c = calibration dtype (4 on CPU, the compute dtype on CUDA).

    base 4-bit  = L * (0.5 + q) + O * w      q = (1 + 4/256) / block with double quantization (8-bit absmax
                                             per block, one float32 per 256 absmax), else 4 / block
    base HQQ b  = L * (b/8 + 2 w/g) + O * w  (b-bit codes, a scale and a zero per group of g at the holding dtype)
    base 8-bit  = L * 1 + O * w              (LLM.int8: int8 weights, a float32 scale per row is negligible)
    base full   = (L + O) * w
    calibration = block * c                  one full-precision block, streamed from the checkpoint
                + 2 * N * S * h * c          the block's inputs and outputs for all N x S calibration tokens
                                             (kept in CPU memory: counted on CPU only)
                + T * (2 h + sum(out)) * c   one forward batch of T = S * min(8, 8192 // S, N) tokens
                + sum_in in^2 * 4            one float32 H per distinct linear input width of a block
                + 4 * m * n * 4              working copies for the largest layer's SVD / least squares
    evaluation  = B_eval * S * V * 4 * 2     float32 logits and their log-softmax
    LoRA (train)= r * sum(in + out) * n_blocks * 16   float32 A and B, gradients, two AdamW moments
    activations = B * S * (n_blocks * sum(in + out) * w + 3 * V * 4)   saved for backward, and the logits
    factors     = r * sum(in + out) * n_blocks * 4 per method (kept for every method until evaluated)

Init peak  = max("4-bit + calibration": base 4-bit + max(calibration, evaluation + factors),
                 "full-precision baseline": max(base 8-bit, base full) + evaluation, unless --no-baselines).
Train peak = max("full-precision reference": max(base full, base 8-bit) + evaluation,
                 the largest arm alone (sequential and auto schedules) or every arm together (interleaved)),
  arm = base + LoRA + max(activations, evaluation, calibration when its init is calibrated).
The device has torch.cuda.mem_get_info()[0] free on CUDA, psutil's available memory on CPU, capped by
QUAILORA_MEMORY_LIMIT_GIB when set. These are rough estimates, not measurements: activations in particular
depend on the attention implementation, and the process's own baseline (torch, Python) is not counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from quailora_app.config import ALL_LINEAR, InitConfig, TrainConfig
from quailora_app.engine.arms import ARM_SPECS
from quailora_app.engine.methods.init_math import check_rank
from quailora_app.engine.quantization.hqq import HqqSettings
from quailora_app.errors import ModelError
from quailora_app.sources.models import check_context, trust_remote_code
from quailora_app.units import GIB, format_bytes

LIMIT_ENV = "QUAILORA_MEMORY_LIMIT_GIB"


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs to know about a model, read from its config."""

    linear_params: int  # L
    other_params: int  # O
    block_params: int  # parameters of the largest decoder block
    block_linears: tuple[tuple[str, int, int], ...]  # (leaf name, in, out) of one block's linear layers
    n_blocks: int
    hidden: int
    vocab: int

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


@dataclass
class Estimate:
    """Bytes per phase of a run; `peak` is the largest and names the phase that needs it."""

    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> tuple[str, int]:
        return max(self.phases.items(), key=lambda kv: kv[1])

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in self.phases.items())
        return f"about {format_bytes(self.peak[1])} at the peak ({parts})"


def model_shapes(config) -> ModelShapes:
    """Build the model on the meta device from its config (no weights, no storage) and read its shapes."""
    from transformers import AutoModelForCausalLM  # heavy: only when an estimate is made

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code())
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    blocks = next((m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.ModuleList) and name.endswith("layers")
                   and len(m) == getattr(config.get_text_config(), "num_hidden_layers", -1)), None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("no decoder blocks found")
    block = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    linears = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features)
                    for name, m in block.named_modules() if isinstance(m, torch.nn.Linear))
    embed = model.get_input_embeddings()
    return ModelShapes(linear, total - linear, sum(p.numel() for p in block.parameters()), linears, len(blocks),
                       embed.embedding_dim, embed.num_embeddings)


def _bytes(dtype_spec: str, device: torch.device) -> int:
    """Holding bytes per element: float32 on CPU; the compute dtype on CUDA ('auto' is bfloat16)."""
    if device.type == "cpu":
        return 4
    return 4 if dtype_spec == "float32" else 2


def base_bytes(shapes: ModelShapes, base: str, w: int, block_size: int = 64, double_quant: bool = True,
               hqq_bits: int | None = None) -> int:
    """Resident bytes of a base model: '4bit', 'nf4' (the QLoRA recipe), '8bit' or 'full' (see the module docstring);
    with `hqq_bits`, '4bit' is HQQ at those bits in groups of block_size: L * (b / 8 + 2 w / g) + O * w (codes, a
    scale and a zero per group at the holding dtype)."""
    L, other = shapes.linear_params, shapes.other_params
    if base == "nf4":
        return base_bytes(shapes, "4bit", w)
    if base == "4bit" and hqq_bits is not None:
        return int(L * (hqq_bits / 8 + 2 * w / block_size) + other * w)
    if base == "4bit":
        q = (1 + 4 / 256) / block_size if double_quant else 4 / block_size
        return int(L * (0.5 + q) + other * w)
    if base == "8bit":
        return int(L + other * w)
    return int((L + other) * w)


def calibration_bytes(shapes: ModelShapes, n_seqs: int, seq_len: int, c: int, device: torch.device) -> int:
    widths = {n for _, n, _ in shapes.block_linears}
    largest = max((n * m for _, n, m in shapes.block_linears), default=0)
    stored = 2 * n_seqs * seq_len * shapes.hidden * c if device.type == "cpu" else 0
    batch = seq_len * max(1, min(8, 8192 // max(seq_len, 1), n_seqs))
    working = batch * (2 * shapes.hidden + sum(m for _, _, m in shapes.block_linears)) * c
    return shapes.block_params * c + stored + working + sum(n * n for n in widths) * 4 + 4 * largest * 4


def eval_bytes(shapes: ModelShapes, batch: int, seq_len: int) -> int:
    return batch * seq_len * shapes.vocab * 4 * 2


def lora_params(shapes: ModelShapes, rank: int, targets: tuple[str, ...]) -> int:
    """r * sum(in + out) over the adapted linear layers of every block."""
    chosen = [(n, m) for leaf, n, m in shapes.block_linears if ALL_LINEAR in targets or leaf in targets]
    return rank * sum(n + m for n, m in chosen) * shapes.n_blocks


def init_estimate(shapes: ModelShapes, cfg: InitConfig, device: torch.device) -> Estimate:
    """Phases of `init`: the 4-bit model with calibration or evaluation, then the baselines."""
    w = _bytes(cfg.model.compute_dtype, device)
    S, ev = cfg.data.seq_len, eval_bytes(shapes, cfg.eval_batch, cfg.data.seq_len)
    factors = lora_params(shapes, cfg.lora.rank, cfg.lora.targets) * 4 * len(cfg.methods)
    est = Estimate({"4-bit + calibration": base_bytes(shapes, "4bit", w, cfg.quant.block_size, cfg.quant.double_quant)
                    + max(calibration_bytes(shapes, cfg.data.calib_samples, S, w, device), ev + factors)})
    if cfg.baselines:
        est.phases["full-precision baseline"] = max(base_bytes(shapes, "8bit", w), base_bytes(shapes, "full", w)) + ev
    return est


def views_estimate(shapes: ModelShapes, cfg_model, data, quant, device: torch.device) -> Estimate:
    """The teaching views hold the 4-bit model and calibrate (no baselines)."""
    w = _bytes(cfg_model.compute_dtype, device)
    return Estimate({"4-bit + calibration": base_bytes(shapes, "4bit", w, quant.block_size, quant.double_quant)
                     + calibration_bytes(shapes, data.calib_samples, data.seq_len, w, device)})


def train_estimate(shapes: ModelShapes, cfg: TrainConfig, device: torch.device, interleaved: bool = False) -> Estimate:
    """Phases of `train`: the reference models, then the arms one at a time (or all together, interleaved)."""
    w = _bytes(cfg.model.compute_dtype, device)
    S, ev = cfg.data.seq_len, eval_bytes(shapes, cfg.eval_batch, cfg.data.seq_len)
    lora = lora_params(shapes, cfg.lora.rank, cfg.lora.targets) * 16
    acts = cfg.batch_size * S * (shapes.n_blocks * sum(n + m for _, n, m in shapes.block_linears) * w
                                 + 3 * shapes.vocab * 4)
    calib = calibration_bytes(shapes, cfg.data.calib_samples, S, w, device)
    arms = {}
    for name in cfg.arms:
        spec = ARM_SPECS[name]
        base = base_bytes(shapes, spec.base, w, cfg.quant.block_size, cfg.quant.double_quant,
                          cfg.quant.bits if cfg.quant.quantizer == "hqq" else None)
        arms[name] = base + lora + max(acts, ev, calib if spec.init != "qlora" else 0)
    est = Estimate({"full-precision reference": max(base_bytes(shapes, "full", w), base_bytes(shapes, "8bit", w)) + ev})
    if interleaved:
        est.phases[f"{len(arms)} arms interleaved"] = sum(arms.values())
    else:
        largest = max(arms, key=arms.get)
        est.phases[f"arm {largest}"] = arms[largest]
    return est


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory of the device (CUDA: mem_get_info; CPU: psutil available), capped by QUAILORA_MEMORY_LIMIT_GIB;
    with a word saying where the figure comes from."""
    if device.type == "cuda":
        free, where = int(torch.cuda.mem_get_info(device)[0]), "free on the GPU"
    else:
        try:
            import psutil  # optional: present with gradio; without it the limit alone applies

            free, where = int(psutil.virtual_memory().available), "available"
        except ImportError:
            free, where = 1 << 62, "available"
    limit = os.environ.get(LIMIT_ENV, "").strip()
    if limit:
        try:
            cap = int(float(limit) * GIB)
        except ValueError:
            raise ModelError(f"{LIMIT_ENV}={limit!r} is not a number of GiB") from None
        if cap < free:
            free, where = cap, f"allowed by {LIMIT_ENV}"
    return free, where


def side_by_side_bytes(shapes: ModelShapes, quant, dequantized_max: int) -> int:
    """Peak bytes of a CPU generate run whose 4-bit variants work beside full precision and then 8-bit (float32
    holding): max(base full, base 8-bit) + base 4-bit + its layers dequantized once, min(4 L, dequantized_max)."""
    four_bit = base_bytes(shapes, "4bit", 4, quant.block_size, quant.double_quant)
    return max(base_bytes(shapes, "full", 4), base_bytes(shapes, "8bit", 4)) + four_bit + min(
        4 * shapes.linear_params, dequantized_max)


def check_fits(name: str, job: str, estimate: Estimate, device: torch.device, hint: str = "") -> str:
    """Refuse (ModelError, with the figures) when the estimate's peak exceeds the device's memory; otherwise
    return the line to show in the run's events."""
    free, where = available_bytes(device)
    phase, need = estimate.peak
    line = (f"memory estimate for {job} of '{name}' on {device.type}: {estimate.describe()}; "
            f"{format_bytes(free)} {where}")
    if need > free:
        raise ModelError(f"model '{name}' needs about {format_bytes(need)} for {job} on {device.type} (peak: {phase}); "
                         f"{format_bytes(free)} {where}" + (f": {hint}" if hint else ""))
    return line


def shapes_or_none(config) -> ModelShapes | None:
    """model_shapes, or None for an architecture that cannot be built on the meta device (no estimate then)."""
    try:
        return model_shapes(config)
    except Exception:  # noqa: BLE001 - an estimate we cannot make is not the user's error
        return None


NO_ESTIMATE = "memory estimate unavailable for this architecture (it could not be built from its config)"


def check_rank_fits(shapes: ModelShapes, lora) -> None:
    """The LoRA rank against every adapted layer's min(out, in), from the config alone (before the memory
    estimate, which a huge rank would otherwise turn into a misleading 'needs 500 GiB')."""
    for leaf, n_in, n_out in shapes.block_linears:
        if ALL_LINEAR in lora.targets or leaf in lora.targets:
            check_rank(lora.rank, (n_out, n_in), f"{leaf} (in every decoder block)")


def preflight_init(name: str, config, cfg: InitConfig, device: torch.device) -> str:
    """Before any weight is read: seq-len within the context, the rank within every adapted layer, and the
    init's memory within the device's. Returns the line for the run's events."""
    check_context(config, cfg.data.seq_len, name)
    shapes = shapes_or_none(config)
    if shapes is None:
        return NO_ESTIMATE
    check_rank_fits(shapes, cfg.lora)
    est = init_estimate(shapes, cfg, device)
    only_baselines = est.peak[0] == "full-precision baseline" and \
        est.phases["4-bit + calibration"] <= available_bytes(device)[0]
    hint = ("skip the 8-bit and full-precision baselines (--no-baselines)" if only_baselines
            else "choose a smaller model, fewer calibration samples or a shorter seq-len")
    return check_fits(name, "init", est, device, hint)


def preflight_train(name: str, config, cfg: TrainConfig, device: torch.device) -> tuple[str, ModelShapes | None]:
    """As preflight_init for `train` (all arms together only when the schedule is 'interleaved')."""
    check_context(config, cfg.data.seq_len, name)
    shapes = shapes_or_none(config)
    if shapes is None:
        return NO_ESTIMATE, None
    check_rank_fits(shapes, cfg.lora)
    check_group_size(shapes, cfg.quant)
    est = train_estimate(shapes, cfg, device, interleaved=cfg.schedule == "interleaved")
    hint = "choose a smaller model, fewer arms, --schedule sequential, a smaller batch or a shorter seq-len"
    return check_fits(name, "fine-tuning", est, device, hint), shapes


def check_group_size(shapes: ModelShapes, quant) -> None:
    """An HQQ group size that does not divide every quantized layer's inputs: one-line ConfigError before any weight
    is read (quantize_linears would refuse it too, but only once the run gets to the quantized base)."""
    if quant.quantizer == "hqq":
        HqqSettings(quant.bits, quant.block_size).check({leaf: n for leaf, n, _ in shapes.block_linears})


def preflight_views(name: str, config, model_cfg, data, quant, device: torch.device) -> str:
    """Before any weight is read: seq-len within the context, the views' memory within the device's."""
    check_context(config, data.seq_len, name)
    shapes = shapes_or_none(config)
    if shapes is None:
        return NO_ESTIMATE
    return check_fits(name, "the teaching views", views_estimate(shapes, model_cfg, data, quant, device), device,
                      "choose a smaller model, fewer calibration samples or a shorter seq-len")
