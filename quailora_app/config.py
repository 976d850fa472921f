"""Typed settings for every stage. Validation happens here, before anything heavy runs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from quailora_app.errors import ConfigError

INIT_METHODS = ("qlora", "svd", "quailora", "closed_form", "loftq")
DEFAULT_METHODS = ("qlora", "svd", "quailora", "closed_form", "loftq")
QUANT_TYPES = ("nf4", "fp4")
SOLVERS = ("exact", "randomized")
#: Shorthand accepted by --targets; "all-linear" means every nn.Linear inside the decoder blocks.
ALL_LINEAR = "all-linear"


@dataclass
class ModelConfig:
    """Which model to load and where to run it."""

    model: str = field(default="embedded", metadata={"help": "'embedded' (SmolLM2-135M-Instruct shipped in a PyPI package), a local folder, or a hub id"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda[:N]'"})
    compute_dtype: str = field(default="auto", metadata={"help": "'auto' (float32 on CPU, bfloat16 on CUDA), 'float32', 'bfloat16' or 'float16'"})

    def __post_init__(self) -> None:
        if not self.model or not str(self.model).strip():
            raise ConfigError("model must not be empty")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"compute dtype must be auto, float32, bfloat16 or float16, not {self.compute_dtype!r}")


@dataclass
class DataConfig:
    """Which text to read and how to cut it into calibration, training and evaluation tokens."""

    dataset: str = field(default="embedded", metadata={"help": "'embedded' (rotten-tomatoes text), 'embedded:speeches', a .txt/.jsonl/.csv/.parquet file, or a hub dataset id"})
    text_column: str | None = field(default=None, metadata={"help": "column holding the text; guessed when not given"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed sequence"})
    calib_samples: int = field(default=64, metadata={"help": "calibration sequences of seq_len tokens"})
    eval_tokens: int = field(default=16384, metadata={"help": "held-out tokens for perplexity"})
    seed: int = field(default=0, metadata={"help": "seed of the document shuffle that fixes the splits"})

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ConfigError(f"seq-len must be at least 8, got {self.seq_len}")
        if self.calib_samples < 1:
            raise ConfigError(f"calib-samples must be at least 1, got {self.calib_samples}")
        if self.eval_tokens < self.seq_len:
            raise ConfigError(f"eval-tokens ({self.eval_tokens}) must be at least seq-len ({self.seq_len})")


@dataclass
class QuantConfig:
    """bitsandbytes 4-bit settings (the QLoRA recipe: nf4, double quantization, blocks of 64)."""

    quant: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the per-block scales too"})
    block_size: int = field(default=64, metadata={"help": "weights per quantization block: a power of two from 32 to 4096"})

    def __post_init__(self) -> None:
        if self.quant not in QUANT_TYPES:
            raise ConfigError(f"quant must be one of {', '.join(QUANT_TYPES)}, not {self.quant!r}")
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"block size must be a power of two from 32 to 4096, not {self.block_size}")


@dataclass
class LoraSettings:
    """LoRA shape. peft scales the update by s = alpha / r (alpha / sqrt(r) with rsLoRA)."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilized scaling alpha / sqrt(r)"})
    targets: tuple[str, ...] = field(default=(ALL_LINEAR,), metadata={"help": "module names to adapt (e.g. q_proj v_proj) or all-linear"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        self.targets = tuple(self.targets) or (ALL_LINEAR,)

    @property
    def scaling(self) -> float:
        """s in y = Q x + s * B A x."""
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclass
class InitConfig:
    """Everything `python -m quailora_app init` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    methods: tuple[str, ...] = DEFAULT_METHODS
    als_rounds: int = field(default=20, metadata={"help": "alternating least squares rounds of quailora"})
    damping: float = field(default=0.01, metadata={"help": "lambda = damping * mean(diag H), keeps H invertible"})
    solver: str = field(default="exact", metadata={"help": "closed_form's solver: exact (Cholesky + truncated SVD) or randomized (subspace iteration, faster on large layers; see bench/scale.py for its objective)"})
    eval_batch: int = field(default=4, metadata={"help": "sequences per forward pass when measuring perplexity"})
    baselines: bool = field(default=True, metadata={"help": "also measure full-precision and 8-bit perplexity"})
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/init-<time>)"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in INIT_METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(INIT_METHODS)}")
        if "qlora" not in self.methods:
            self.methods = ("qlora", *self.methods)  # the baseline every figure is relative to
        self.methods = tuple(dict.fromkeys(self.methods))
        if self.als_rounds < 1:
            raise ConfigError("als-rounds must be at least 1")
        if not 0 <= self.damping < 1:
            raise ConfigError("damping must be in [0, 1)")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, not {self.solver!r}")


#: Fine-tuning arms: base precision and LoRA initialization. 4-bit arms share one NF4/FP4 base and one
#: calibration; quailora8 is initialized against the 8-bit Q; lora16 is the unquantized (float32 on CPU,
#: bfloat16 on CUDA) reference.
ARMS = ("qlora4", "quailora4", "closed4", "svd4", "qlora8", "quailora8", "lora16")
DEFAULT_ARMS = ("qlora4", "quailora4", "qlora8")
SCHEDULES = ("auto", "interleaved", "sequential")
LR_SCHEDULES = ("constant", "linear")


def _train_data() -> DataConfig:
    return DataConfig(seq_len=128, calib_samples=32, eval_tokens=4096)


@dataclass
class TrainConfig:
    """Everything `python -m quailora_app train` needs: a short LoRA fine-tuning of several arms side by side.

    Every arm shares the seed (data.seed), the order of training batches, the hyperparameters and the
    held-out evaluation tokens (data.eval_tokens); only the base precision and the initialization differ."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=_train_data)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    arms: tuple[str, ...] = field(default=DEFAULT_ARMS, metadata={"help": f"arms to train side by side: {', '.join(ARMS)}"})
    steps: int = field(default=30, metadata={"help": "optimizer steps per arm"})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW peak learning rate (the QLoRA recipe)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of the steps over which the learning rate ramps up linearly"})
    lr_schedule: str = field(default="constant", metadata={"help": "after warm-up: constant or linear (decay to 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA factors"})
    batch_size: int = field(default=4, metadata={"help": "sequences of seq-len tokens per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    eval_every: int = field(default=10, metadata={"help": "steps between held-out perplexity evaluations (also at step 0 and at the end)"})
    eval_batch: int = field(default=4, metadata={"help": "sequences per forward pass when measuring perplexity"})
    damping: float = field(default=0.01, metadata={"help": "lambda = damping * mean(diag H), keeps H invertible"})
    als_rounds: int = field(default=20, metadata={"help": "alternating least squares rounds of quailora"})
    schedule: str = field(default="auto", metadata={"help": "interleaved (one step of each arm in turn), sequential, or auto (interleaved when all arms fit in memory)"})
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/train-<time>)"})

    def __post_init__(self) -> None:
        self.arms = tuple(dict.fromkeys(self.arms))
        if not self.arms:
            raise ConfigError("choose at least one arm")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch", "als_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must not be negative, got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not 0 <= self.damping < 1:
            raise ConfigError("damping must be in [0, 1)")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)

    def lr_at(self, step: int) -> float:
        """Learning rate of 1-based optimizer step `step`: a linear ramp over the first warmup_steps steps
        (step k of w at k / (w + 1) of the peak, so no step is wasted at 0), then the peak, constant or
        decaying linearly to reach 0 one step after the last."""
        warm = self.warmup_steps
        if step <= warm:
            return self.learning_rate * step / (warm + 1)
        if self.lr_schedule == "linear":
            return self.learning_rate * (self.steps - step + 1) / (self.steps - warm)
        return self.learning_rate
