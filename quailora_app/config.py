"""Typed settings for every stage. Validation happens here, before anything heavy runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

INIT_METHODS = ("qlora", "svd", "quailora", "closed_form", "loftq")
DEFAULT_METHODS = ("qlora", "svd", "quailora", "closed_form", "loftq")
QUANT_TYPES = ("nf4", "fp4")
#: Shorthand accepted by --targets; "all-linear" means every nn.Linear inside the decoder blocks.
ALL_LINEAR = "all-linear"


@dataclass
class ModelConfig:
    """Which model to load and where to run it."""

    model: str = field(default="embedded", metadata={"help": "'embedded' (SmolLM2-135M-Instruct shipped in a PyPI package), a local folder, or a hub id"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda[:N]'"})
    compute_dtype: str = field(default="auto", metadata={"help": "'auto' (float32 on CPU, bfloat16 on CUDA), 'float32' or 'bfloat16'"})

    def __post_init__(self) -> None:
        if not self.model or not str(self.model).strip():
            raise ConfigError("model must not be empty")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"compute dtype must be auto, float32, bfloat16 or float16, not {self.compute_dtype!r}")


@dataclass
class DataConfig:
    """Which text to read and how to cut it into calibration, training and evaluation tokens."""

    dataset: str = field(default="embedded", metadata={"help": "'embedded' (rotten-tomatoes text), 'embedded:speeches', a .txt/.jsonl/.csv/.parquet file, or a hub dataset id"})
    text_column: str | None = field(default=None, metadata={"help": "column holding the text (default: guessed)"})
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
    block_size: int = field(default=64, metadata={"help": "weights per quantization block (64, 128, 256, ...)"})

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
