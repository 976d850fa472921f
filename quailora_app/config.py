"""Typed settings for every stage. Validation happens here, before anything heavy runs."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quailora_app.engine.arms import arm_names, default_arm_names, quantized_title
from quailora_app.engine.methods.init_math import SOLVERS
from quailora_app.engine.methods.registry import QLORA, default_method_names, get_method, method_names
from quailora_app.errors import ConfigError
from quailora_app.sources.tasks import DEFAULT_SHOTS

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Shorthand accepted by --targets; "all-linear" means every nn.Linear inside the decoder blocks.
ALL_LINEAR = "all-linear"


@dataclass
class ModelConfig:
    """Which model to load and where to run it."""

    model: str = field(default="embedded", metadata={
        "help": "'embedded' (SmolLM2-135M-Instruct shipped in a PyPI package), 'embedded:gemma3' (Gemma 3 270M, "
                "the same way; Gemma Terms of Use), a local folder, or a hub id"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda[:N]'"})
    compute_dtype: str = field(default="auto", metadata={
        "help": "'auto' (float32 on CPU, bfloat16 on CUDA), 'float32', 'bfloat16' or 'float16'",
        "choices": COMPUTE_DTYPES})

    def __post_init__(self) -> None:
        if not self.model or not str(self.model).strip():
            raise ConfigError("model must not be empty")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute dtype must be auto, float32, bfloat16 or float16, not {self.compute_dtype!r}")


@dataclass
class DataConfig:
    """Which text to read and how to cut it into calibration, training and evaluation tokens."""

    dataset: str = field(default="embedded", metadata={
        "help": "'embedded' (rotten-tomatoes text), 'embedded:speeches', a .txt/.jsonl/.csv/.parquet file, or a hub "
                "dataset id"})
    text_column: str | None = field(default=None, metadata={"help": "column holding the text; guessed when not given"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed sequence"})
    calib_samples: int = field(default=64, metadata={"help": "calibration sequences of seq_len tokens"})
    eval_tokens: int = field(default=16384, metadata={"help": "held-out tokens for perplexity"})
    seed: int = field(default=0, metadata={"help": "seed of the document shuffle that fixes the splits"})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "measure perplexity on held-out text of another dataset (e.g. 'embedded:speeches'), to see whether "
                "an initialization fitted to the calibration text holds elsewhere; default: held-out documents of "
                "the dataset"})

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ConfigError(f"seq-len must be at least 8, got {self.seq_len}")
        if self.calib_samples < 1:
            raise ConfigError(f"calib-samples must be at least 1, got {self.calib_samples}")
        if self.eval_tokens < self.seq_len:
            raise ConfigError(f"eval-tokens ({self.eval_tokens}) must be at least seq-len ({self.seq_len})")


#: the quantizers: bitsandbytes (the QLoRA recipe: NF4/FP4 at 4 bits) and HQQ (2, 3, 4 or 8 bits, no calibration)
QUANTIZERS = ("bitsandbytes", "hqq")
#: the bit widths each quantizer's base offers (bitsandbytes' 8-bit LLM.int8 is the 8-bit reference and arm)
QUANTIZER_BITS = {"bitsandbytes": (4,), "hqq": (2, 3, 4, 8)}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class QuantConfig:
    """The quantized base: bitsandbytes 4-bit by default (the QLoRA recipe: nf4, double quantization, blocks of 64),
    or HQQ at 2, 3, 4 or 8 bits in groups of block_size weights."""

    quant: str = field(default="nf4", metadata={"help": "bitsandbytes' 4-bit data type: nf4 or fp4",
                                                "choices": QUANT_TYPES})
    double_quant: bool = field(default=True, metadata={"help": "bitsandbytes: quantize the per-block scales too"})
    block_size: int = field(default=64, metadata={
        "help": "weights per quantization block (bitsandbytes: a power of two from 32 to 4096) or group (hqq: a "
                "multiple of 8 that divides every layer's inputs)", "aliases": ("--group-size",)})
    quantizer: str = field(default="bitsandbytes", metadata={
        "help": "bitsandbytes (NF4/FP4 at 4 bits, the QLoRA recipe) or hqq (2, 3, 4 or 8 bits)", "choices": QUANTIZERS})
    bits: int = field(default=4, metadata={"help": "bits per weight code: 4 for bitsandbytes; 2, 3, 4 or 8 for hqq"})

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {', '.join(QUANTIZERS)}, not {self.quantizer!r}")
        offered = QUANTIZER_BITS[self.quantizer]
        if isinstance(self.bits, bool) or self.bits not in offered:
            extra = (" (its 8-bit LLM.int8 is the qlora8 arm and the int8 reference; use --quantizer hqq for 2, 3 or "
                     "8 bits)") if self.quantizer == "bitsandbytes" else ""
            listed = ", ".join(map(str, offered[:-1])) + " or " * (len(offered) > 1) + str(offered[-1])
            raise ConfigError(f"{self.quantizer} quantizes to {listed} bits, not "
                              f"{self.bits!r}{extra}")
        if self.quant not in QUANT_TYPES:
            raise ConfigError(f"quant must be one of {', '.join(QUANT_TYPES)}, not {self.quant!r}")
        if self.quantizer == "bitsandbytes" and self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block size must be a power of two from 32 to 4096, not {self.block_size}")
        if self.quantizer == "hqq" and (isinstance(self.block_size, bool) or self.block_size < 8
                                        or self.block_size % 8):
            raise ConfigError(f"HQQ group size must be a positive multiple of 8, not {self.block_size}")

    @property
    def label(self) -> str:
        """The data type: 'NF4' / 'FP4' (bitsandbytes) or 'HQQ' (with the bits: '3-bit HQQ')."""
        return self.quant.upper() if self.quantizer == "bitsandbytes" else "HQQ"


def quant_word(quant: QuantConfig | Mapping[str, Any] | None) -> str:
    """How figures and lines name a run's quantized base: '4-bit' for bitsandbytes (NF4 or FP4, the QLoRA recipe, as
    the app always said), 'HQQ 3-bit' for HQQ. `quant`: a QuantConfig or its dict (a report's settings["quant"])."""
    if quant is None:
        return quantized_title("bitsandbytes", 4)
    get = quant.get if isinstance(quant, Mapping) else lambda key, default=None: getattr(quant, key, default)
    return quantized_title(get("quantizer", "bitsandbytes"), get("bits", 4))


@dataclass
class LoraSettings:
    """LoRA shape. peft scales the update by s = alpha / r (alpha / sqrt(r) with rsLoRA)."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha"})
    rslora: bool = field(default=False, metadata={
        "help": "rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r"})
    targets: tuple[str, ...] = field(default=(ALL_LINEAR,), metadata={
        "help": "modules to adapt: all-linear (every linear layer of the decoder blocks) or leaf names such as "
                "q_proj v_proj"})

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


#: the downstream tasks (sources/tasks.py TASK_KINDS)
ACCURACY_TASKS = ("labels", "continuation")
#: what --accuracy-tasks accepts: the tasks, or "none" (as an empty list) to skip accuracy
NO_TASKS = "none"


@dataclass
class AccuracyConfig:
    """Downstream accuracy, scored as lm-evaluation-harness scores multiple choice (engine/evaluation/accuracy.py): the
    log-likelihood of each answer after the prompt, on items the run held out (sources/tasks.py)."""

    accuracy_tasks: tuple[str, ...] = field(default=ACCURACY_TASKS, metadata={
        "help": "labels: few-shot classification of labelled text; continuation: the true continuation of a held-out "
                "passage against those of other documents; none (or no value) to skip",
        "choices": (*ACCURACY_TASKS, NO_TASKS), "nargs": "*"})
    label_dataset: str = field(default="embedded", metadata={
        "help": "labelled text: 'embedded' (Rotten Tomatoes reviews, fresh/rotten as positive/negative), "
                "'embedded:speeches' (the speaker's party), or a local .csv/.tsv/.jsonl/.json/.parquet file"})
    label_text_column: str | None = field(default=None, metadata={
        "help": "column of the labelled file holding the text; guessed when not given"})
    label_column: str | None = field(default=None, metadata={
        "help": "column of the labelled file holding the label; guessed when not given (label, category, ...)"})
    label_words: tuple[str, ...] = field(default=(), metadata={
        "help": "answer word per label as label=word (e.g. fresh=positive rotten=negative); other labels are left "
                "out; default: the embedded data's own words, else each label as written",
        "nargs": "*", "metavar": "LABEL=WORD"})
    shots: int = field(default=DEFAULT_SHOTS, metadata={  # measured: see sources/tasks.py
        "help": "labelled examples in the prompt (one label after another)"})
    label_prompts: int = field(default=8, metadata={
        "help": "different few-shot prompts the labelled items are spread over: a small model's answers swing with "
                "the examples shown, more prompts average that out"})
    label_items: int = field(default=2000, metadata={
        "help": "held-out labelled items scored per model; 0: all of them"})
    continuation_items: int = field(default=500, metadata={
        "help": "held-out passages of the continuation task scored per model; 0: all of them"})
    continuation_choices: int = field(default=4, metadata={
        "help": "choices per continuation item: the true one and continuations of other documents"})
    accuracy_batch_tokens: int = field(default=2048, metadata={
        "help": "tokens per forward pass when scoring answers", "cli": False})

    def __post_init__(self) -> None:
        self.accuracy_tasks = tuple(dict.fromkeys(t for t in self.accuracy_tasks if t != NO_TASKS))
        unknown = [t for t in self.accuracy_tasks if t not in ACCURACY_TASKS]
        if unknown:
            raise ConfigError(f"unknown accuracy task(s) {', '.join(unknown)}; choose from {', '.join(ACCURACY_TASKS)}")
        self.label_dataset = (self.label_dataset or "").strip() or "embedded"
        self.label_words = tuple(self.label_words)
        if not 0 <= self.shots <= 32:
            raise ConfigError(f"shots must be from 0 to 32, got {self.shots}")
        if self.label_prompts < 1:
            raise ConfigError(f"label-prompts must be at least 1, got {self.label_prompts}")
        if self.label_items < 0 or self.continuation_items < 0:
            raise ConfigError("label-items and continuation-items must not be negative (0: all held-out items)")
        if not 2 <= self.continuation_choices <= 10:
            raise ConfigError(f"continuation-choices must be from 2 to 10, got {self.continuation_choices}")
        if self.accuracy_batch_tokens < 1:
            raise ConfigError(f"accuracy batch tokens must be at least 1, got {self.accuracy_batch_tokens}")


def init_accuracy(tasks: tuple[str, ...] = ()) -> AccuracyConfig:
    """The init flow's accuracy settings: off in InitConfig() (the Python API, the app, the benches), `tasks` on
    the command line (cli.py: both tasks). Every model variant (each method, 8-bit, full precision) is scored, so
    far fewer items than a one-model evaluation: on 2 shared CPU cores SmolLM2 scored 500 label items in 88 s and
    200 continuation items in 182 s per variant, so 200 and 100 here (about 35 s + 90 s per variant there; the
    plain 4-bit, 8-bit and full-precision scores are cached). The Wilson half-width at 70% is then about 6 and 9
    points: read differences through the paired test against QLoRA, on the same items, which is sharper."""
    return AccuracyConfig(accuracy_tasks=tasks, label_items=200, continuation_items=100)


def train_accuracy(tasks: tuple[str, ...] = ()) -> AccuracyConfig:
    """The fine-tuning flow's accuracy settings: off, in TrainConfig() and on the command line alike (opt in with
    --accuracy-tasks labels continuation). Each arm is scored at every evaluation, so with a arms and e evaluations
    a task costs a * (e + 1) scorings against the init flow's handful (on 2 CPU cores about 35 s + 90 s each at
    these sizes, the init flow's, so that a run started from an init run scores the same items and reuses its
    step-0 scores; flows/train.py)."""
    return init_accuracy(tasks)


# ------------------------------------------------------------------ settings several configs share, declared once
#: distill's settings and their defaults (engine/methods/distill.py reads these when a caller leaves one out)
DISTILL_DEFAULTS = {"distill_steps": 8, "distill_lr": 5e-4, "distill_batch": 2}


def als_rounds_setting():
    return field(default=20, metadata={"help": "alternating least squares rounds of quailora"})


def damping_setting():
    return field(default=0.01, metadata={"help": "lambda = damping * mean(diag H), keeps H invertible"})


_DISTILL_HELP = {
    "distill_steps": "distill: AdamW steps on the LoRA factors toward the full-precision model's next-token "
                     "distribution",
    "distill_lr": "distill: AdamW peak learning rate (linear warm-up over a quarter of the steps, then linear decay)",
    "distill_batch": "distill: calibration windows per step",
}


def distill_setting(name: str):
    """One of distill's settings (InitConfig: the distill method's; TrainConfig: the distill4 arm's)."""
    return field(default=DISTILL_DEFAULTS[name], metadata={"help": _DISTILL_HELP[name]})


def check_solver_settings(als_rounds: int, damping: float) -> None:
    """The calibrated methods' settings (InitConfig, TrainConfig and ViewsConfig offer them)."""
    if als_rounds < 1:
        raise ConfigError(f"als-rounds must be at least 1, got {als_rounds}")
    if not 0 <= damping < 1:
        raise ConfigError("damping must be in [0, 1)")


@dataclass
class InitConfig:
    """Everything `python -m quailora_app init` needs. Downstream accuracy (`accuracy`) is off by default here and
    on in the command line's defaults (cli.py `INIT_CLI_DEFAULTS`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    methods: tuple[str, ...] = field(default=default_method_names(), metadata={
        "help": "initializations to compute; qlora (no correction) is always included as the 1.0 baseline",
        "choices": method_names})
    als_rounds: int = als_rounds_setting()
    damping: float = damping_setting()
    solver: str = field(default="exact", metadata={
        "choices": SOLVERS, "help": "closed_form's solver: exact (Cholesky + truncated SVD) or randomized (subspace "
                                    "iteration, faster on large layers; see bench/scale.py for its objective)"})
    distill_steps: int = distill_setting("distill_steps")
    distill_lr: float = distill_setting("distill_lr")
    distill_batch: int = distill_setting("distill_batch")
    loftq_iter: int = field(default=5, metadata={
        "help": "LoftQ's alternating steps T (loftq_svd, loftq_calibrated): quantize W - C, fit C to W - Q; their "
                "re-quantized base is saved with their adapter"})
    eval_batch: int = field(default=4, metadata={
        "help": "sequences per forward pass when measuring perplexity", "cli": False})
    baselines: bool = field(default=True, metadata={
        "help": "also measure full-precision and 8-bit perplexity (and accuracy)"})
    accuracy: AccuracyConfig = field(default_factory=init_accuracy)  # off unless asked (cli.py: on)
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/init-<date>-<time>)"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(method_names())}")
        if QLORA not in self.methods:
            self.methods = (QLORA, *self.methods)  # the baseline every figure is relative to
        self.methods = tuple(dict.fromkeys(self.methods))
        check_solver_settings(self.als_rounds, self.damping)
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, not {self.solver!r}")
        check_distill(self.distill_steps, self.distill_lr, self.distill_batch)
        check_loftq_iter(self.loftq_iter)


def check_loftq_iter(iters) -> None:
    """LoftQ's T (InitConfig and BitsConfig offer it)."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq-iter (LoftQ's alternating steps) must be at least 1, got {iters!r}")


def check_distill(steps: int, lr: float, batch: int) -> None:
    """distill's settings (InitConfig and TrainConfig both offer them)."""
    if steps < 1 or batch < 1:
        raise ConfigError("distill-steps and distill-batch must be at least 1")
    if not 0 < lr < math.inf:
        raise ConfigError(f"distill-lr must be positive, got {lr}")


SCHEDULES = ("auto", "interleaved", "sequential")
LR_SCHEDULES = ("constant", "linear")


def _train_data() -> DataConfig:
    return DataConfig(seq_len=128, calib_samples=32, eval_tokens=4096)


@dataclass
class TrainConfig:
    """Everything `python -m quailora_app train` needs: a short LoRA fine-tuning of several arms side by side.

    Every arm shares the seed (data.seed), the order of training batches, the hyperparameters and the
    held-out evaluation tokens (data.eval_tokens); only the base precision and the initialization differ.

    With `from_init` the run starts from a finished init run, which fixes the model, the data cut, the quantization
    and the LoRA shape: build such a config with engine/from_init.train_config_from_init(run, **overrides), which
    takes those from the run (the flow refuses a config that differs from it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=_train_data)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    arms: tuple[str, ...] = field(default=default_arm_names(), metadata={
        "help": "arms to train side by side", "choices": arm_names, "metavar": "ARM"})
    steps: int = field(default=30, metadata={"help": "optimizer steps per arm"})
    learning_rate: float = field(default=2e-4, metadata={
        "help": "AdamW peak learning rate (the QLoRA recipe)", "flag": "--lr"})
    warmup_ratio: float = field(default=0.03, metadata={
        "help": "share of the steps over which the learning rate ramps up linearly"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "after warm-up: constant or linear (decay to 0)", "choices": LR_SCHEDULES})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA factors"})
    batch_size: int = field(default=4, metadata={"help": "sequences of seq-len tokens per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    eval_every: int = field(default=10, metadata={
        "help": "steps between held-out perplexity evaluations (also at step 0 and at the end)"})
    eval_batch: int = field(default=4, metadata={"help": "sequences per forward pass when measuring perplexity"})
    damping: float = damping_setting()
    als_rounds: int = als_rounds_setting()
    schedule: str = field(default="auto", metadata={
        "help": "interleaved (one step of each arm in turn), sequential, or auto (interleaved when all arms fit in "
                "memory)", "choices": SCHEDULES})
    distill_steps: int = distill_setting("distill_steps")
    distill_lr: float = distill_setting("distill_lr")
    distill_batch: int = distill_setting("distill_batch")
    from_init: str | None = field(default=None, metadata={
        "help": "start from a finished init run (its folder or report.json): its model, data, quantization and LoRA "
                "settings, its saved initializations and its perplexities, instead of computing them again",
        "metavar": "RUN"})
    measure_step0: bool = field(default=False, metadata={
        "help": "measure every arm's step-0 perplexity (and accuracy) even where it is known (B = 0 on a reference "
                "base; with --from-init, the init run's): a check, one evaluation per arm"})
    accuracy: AccuracyConfig = field(default_factory=train_accuracy)  # off unless asked; --from-init: the init run's
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/train-<date>-<time>)"})

    def __post_init__(self) -> None:
        if self.from_init is not None:
            self.from_init = str(self.from_init).strip() or None
        self.arms = tuple(dict.fromkeys(self.arms))
        if not self.arms:
            raise ConfigError("choose at least one arm")
        unknown = [a for a in self.arms if a not in arm_names()]
        if unknown:
            raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(arm_names())}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch"):
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
        check_solver_settings(self.als_rounds, self.damping)
        check_distill(self.distill_steps, self.distill_lr, self.distill_batch)

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


VIEW_BLOCKS = ("typical", "outlier")


@dataclass
class ViewsConfig:
    """Everything `python -m quailora_app views` and the app's teaching views need: the views of one layer at
    LoRA rank lora.rank, a rank sweep, and the precision trade-off against finished init runs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    layer: str | None = field(default=None, metadata={
        "help": "module path of the layer, e.g. model.layers.3.mlp.down_proj (default: block 3's down_proj)"})
    block: str = field(default="typical", metadata={
        "help": "quantization block whose 16 levels are shown: an index, 'typical' (median absmax) or 'outlier' "
                "(largest absmax)"})
    sweep_layers: tuple[str, ...] | None = field(default=None, metadata={
        "help": "layers averaged in the rank sweep (default: every linear layer of --layer's block)"})
    ranks: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64), metadata={
        "help": "ranks of the rank sweep; none to skip it", "nargs": "*"})
    perplexity_ranks: tuple[int, ...] = field(default=(), metadata={
        "help": "also measure held-out perplexity at these ranks (slow: a full initialization per rank)", "nargs": "*"})
    reports: tuple[str, ...] = field(default=(), metadata={
        "help": "init report.json files or run folders whose perplexities go into the precision trade-off",
        "flag": "--report", "metavar": "REPORT", "nargs": "*"})
    als_rounds: int = als_rounds_setting()
    damping: float = damping_setting()
    out: str | None = field(default=None, metadata={"help": "output folder (default: runs/views-<date>-<time>)"})

    def __post_init__(self) -> None:
        self.layer = (self.layer or "").strip() or None
        self.block = str(self.block).strip()
        if not (self.block.isdigit() or self.block in VIEW_BLOCKS):
            raise ConfigError(f"block must be an index, 'typical' or 'outlier', not {self.block!r}")
        self.ranks, self.perplexity_ranks = tuple(self.ranks), tuple(self.perplexity_ranks)
        if any(r < 1 for r in (*self.ranks, *self.perplexity_ranks)):
            raise ConfigError("ranks must be at least 1")
        self.reports = tuple(self.reports)
        if self.sweep_layers is not None:
            self.sweep_layers = tuple(self.sweep_layers)
        check_solver_settings(self.als_rounds, self.damping)

    @property
    def block_choice(self) -> int | str:
        """`block` as the views take it: an index, 'typical' or 'outlier'."""
        return int(self.block) if self.block.isdigit() else self.block


#: the quantized bases an across-bits run can compare: bitsandbytes' NF4 (4-bit) and LLM.int8 (8-bit), and HQQ at
#: 2, 3, 4 and 8 bits
BITS_BASES = ("hqq2", "hqq3", "hqq4", "hqq8", "nf4", "int8")


def base_quant(base: str, group_size: int = 64) -> QuantConfig | None:
    """The QuantConfig of an across-bits base name ('hqq3' -> HQQ 3-bit in groups of `group_size`, 'nf4' ->
    bitsandbytes' QLoRA recipe); None for 'int8' (bitsandbytes' LLM.int8, loaded as the 8-bit reference)."""
    if base == "int8":
        return None
    if base == "nf4":
        return QuantConfig()
    if base.startswith("hqq") and base[3:].isdigit():
        return QuantConfig(quantizer="hqq", bits=int(base[3:]), block_size=group_size)
    raise ConfigError(f"unknown base {base!r}; choose from {', '.join(BITS_BASES)}")


def base_bits(base: str) -> int:
    """The bits per code of an across-bits base name."""
    return 8 if base == "int8" else 4 if base == "nf4" else int(base[3:])


def _bits_methods() -> tuple[str, ...]:
    """The methods an across-bits run computes on every base: per layer, those that quantize the base again (LoftQ),
    and over the whole model at one rank (not budget, whose per-layer ranks would change the memory of each point)."""
    return tuple(m for m in method_names() if get_method(m).kind in ("layer", "requant", "model") and m != "budget")


@dataclass
class BitsConfig:
    """Everything `python -m quailora_app bits` and the app's "across bits" run need: one calibration, then each
    base's held-out perplexity with no correction and with each per-layer method, and its memory per weight."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(calib_samples=32, eval_tokens=4096))
    lora: LoraSettings = field(default_factory=LoraSettings)
    bases: tuple[str, ...] = field(default=("hqq2", "hqq3", "hqq4", "nf4"), metadata={
        "help": "quantized bases to compare: hqq2, hqq3, hqq4, hqq8 (HQQ), nf4 (bitsandbytes 4-bit), int8 "
                "(bitsandbytes LLM.int8)", "choices": BITS_BASES})
    methods: tuple[str, ...] = field(default=("svd", "closed_form"), metadata={
        "help": "initializations computed on every base (no correction is always measured); the whole-model "
                "methods (sequential, distill) run once per base after the shared calibration",
        "choices": _bits_methods})
    group_size: int = field(default=64, metadata={"help": "HQQ's group size (weights sharing a scale and a zero)"})
    loftq_iter: int = field(default=5, metadata={
        "help": "LoftQ's alternating steps T (loftq_svd, loftq_calibrated): quantize W - C, fit C to W - Q; T = 1 is "
                "svd / closed_form on the plain base"})
    als_rounds: int = als_rounds_setting()
    damping: float = damping_setting()
    distill_steps: int = distill_setting("distill_steps")
    distill_lr: float = distill_setting("distill_lr")
    distill_batch: int = distill_setting("distill_batch")
    eval_batch: int = field(default=4, metadata={
        "help": "sequences per forward pass when measuring perplexity", "cli": False})
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/bits-<date>-<time>)"})

    def __post_init__(self) -> None:
        self.bases = tuple(dict.fromkeys(self.bases))
        if not self.bases:
            raise ConfigError("choose at least one base to compare")
        for base in self.bases:
            base_quant(base, self.group_size)  # a bad name or group size: one line, before anything loads
        unknown = [m for m in self.methods if m not in _bits_methods()]
        if unknown:
            raise ConfigError(f"across bits does not compute {', '.join(unknown)}; choose from "
                              f"{', '.join(_bits_methods())}")
        self.methods = tuple(dict.fromkeys(m for m in self.methods if m != QLORA))
        check_loftq_iter(self.loftq_iter)
        check_solver_settings(self.als_rounds, self.damping)
        check_distill(self.distill_steps, self.distill_lr, self.distill_batch)


#: the dtypes a merged model can be held and saved in ("auto": the full-precision reference's, float32 on CPU and
#: bfloat16 on CUDA)
MERGE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GenerateConfig:
    """Everything `python -m quailora_app generate` and the app's generation section need: a finished run's
    model and adapters, a prompt, and how many tokens each variant (full precision, 8-bit, plain 4-bit, 4-bit with
    each adapter) adds to it; optionally what survives deployment of one adapter (merged, re-quantized, apart).
    The model, data, quantization and LoRA shape are the run's."""

    from_run: str | None = field(default=None, metadata={
        "help": "a finished init run's folder (its adapters/<method>/), or a train run's (its 4-bit arms' adapters, "
                "and those of the init run it started from) (default: none; required)"})
    prompt: str | None = field(default=None, metadata={
        "help": "text to continue (default: the start of a held-out document of the run's data)"})
    new_tokens: int = field(default=32, metadata={"help": "tokens each variant adds to the prompt"})
    prompt_tokens: int = field(default=16, metadata={
        "help": "tokens of a held-out document's start taken as the prompt when none is given, and as each held-out "
                "document's prompt for the agreement over documents"})
    documents: int = field(default=4, metadata={
        "help": "held-out documents along whose own text plain and corrected 4-bit are compared with full precision "
                "position by position (0: none)"})
    sample: bool = field(default=False, metadata={
        "help": "draw each token from the model's distribution (seeded, the same draws for every variant) instead "
                "of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --sample)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling draws (with --sample)"})
    deploy: bool = field(default=False, metadata={
        "help": "also measure what survives deployment of one adapter: held-out perplexity on the 4-bit base as "
                "trained, merged into the full-precision weights, merged then quantized again, kept apart after a "
                "save and load with peft; writes the merged model"})
    deploy_adapter: str | None = field(default=None, metadata={
        "help": "the adapter --deploy measures: a method of the init run or an arm of the train run (default: "
                "closed_form, else quailora; for a train run quailora4, else closed4)"})
    deploy_tokens: int = field(default=4096, metadata={
        "help": "held-out tokens of the deployment perplexities (the first of the run's held-out windows)"})
    merge_dtype: str = field(default="auto", metadata={
        "help": "dtype the adapter is merged into and the merged model saved in: auto (float32 on CPU, bfloat16 on "
                "CUDA), float32, bfloat16 or float16", "choices": MERGE_DTYPES})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda[:N]'"})
    eval_batch: int = field(default=4, metadata={
        "help": "sequences per forward pass when measuring perplexity", "cli": False})
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/generate-<date>-<time>)"})

    def __post_init__(self) -> None:
        if self.prompt is not None and not str(self.prompt).strip():
            raise ConfigError("the prompt is empty: give some text to continue, or leave --prompt out to continue the "
                              "start of a held-out document")
        if isinstance(self.new_tokens, bool) or self.new_tokens < 1:
            raise ConfigError(f"new tokens must be at least 1, not {self.new_tokens}: each variant needs a "
                              "continuation to compare")
        if self.prompt_tokens < 1:
            raise ConfigError(f"prompt tokens must be at least 1, not {self.prompt_tokens}")
        if self.documents < 0:
            raise ConfigError(f"documents must be 0 or more, not {self.documents}")
        if self.sample and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be positive to sample, not {self.temperature}")
        if self.deploy_tokens < 1:
            raise ConfigError(f"deploy tokens must be at least 1, not {self.deploy_tokens}")
        if self.merge_dtype not in MERGE_DTYPES:
            raise ConfigError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, not {self.merge_dtype!r}")
        self.from_run = (self.from_run or "").strip() or None
