"""The event stream every face consumes: the CLI prints it, the UI plots it, tests assert on it, and the run
folder's events.jsonl records it. Plain dataclasses, no UI code."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass
class Event:
    kind: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class Stage(Event):
    """A stage starts: load, data, quantize, calibrate, initialize, evaluate, save, train."""

    kind: ClassVar[str] = "stage"
    stage: str
    message: str = ""


@dataclass
class Progress(Event):
    """`done` of `total` units of the current stage."""

    kind: ClassVar[str] = "progress"
    stage: str
    done: int
    total: int
    message: str = ""


@dataclass
class LayerResult(Event):
    """Per-layer error figures, 1.0 = plain QLoRA (no correction)."""

    kind: ClassVar[str] = "layer"
    name: str
    block: int
    module: str
    shape: tuple[int, int]
    weight_error: dict[str, float]
    calibrated_error: dict[str, float]


@dataclass
class Metric(Event):
    """A scalar result: perplexity of a model variant, seconds of a stage, ... For group "accuracy": the share of
    `n` items of downstream task `task` (a sources/tasks.py kind) the model variant `name` answered right, and the
    95% Wilson interval of that share."""

    kind: ClassVar[str] = "metric"
    name: str
    value: float | None
    group: str = "perplexity"
    note: str = ""
    task: str | None = None
    n: int | None = None
    interval: tuple[float, float] | None = None


@dataclass
class LayerChoices(Event):
    """The linear layers of the loaded model a layer picker offers, its default, and the layer this run shows."""

    kind: ClassVar[str] = "layers"
    names: list[str]
    default: str
    layer: str


@dataclass
class Log(Event):
    kind: ClassVar[str] = "log"
    message: str
    level: str = "info"


@dataclass
class RunFinished(Event):
    kind: ClassVar[str] = "finished"
    run_dir: str
    report: dict


@dataclass
class RunFailed(Event):
    """The run ended early (a stop, bad input, out of memory); what was written so far stays in run_dir."""

    kind: ClassVar[str] = "failed"
    run_dir: str
    message: str
    cancelled: bool = False


# -- fine-tuning arms (python -m quailora_app train) ----------------------------------------------------
@dataclass
class TrainStep(Event):
    """One optimizer step of one arm. `memory_bytes`: see train.ArmMemory (measured on CUDA, accounted on CPU)."""

    kind: ClassVar[str] = "train_step"
    arm: str
    step: int  # 1-based
    total_steps: int
    train_loss: float
    learning_rate: float
    tokens_per_s: float
    elapsed_s: float  # seconds this step took (forward, backward, optimizer)
    memory_bytes: int
    batch_hash: str = ""  # fingerprint of the step's token ids: identical across arms at the same step
    memory_how: str = ""  # how memory_bytes was had: measured (CUDA), partly measured, accounted (CPU)


@dataclass
class EvalPoint(Event):
    """Held-out perplexity of one arm after `step` optimizer steps (0 = right after initialization). `label`: the
    arm's legend in this run (it names the run's bits and quantizer: "HQQ 3-bit QuAILoRA"); empty in older runs."""

    kind: ClassVar[str] = "eval"
    arm: str
    step: int
    val_perplexity: float
    label: str = ""


@dataclass
class AccuracyPoint(Event):
    """Downstream accuracy of one arm after `step` optimizer steps (0 = right after initialization): the share of
    `n` items of task `task` (a sources/tasks.py kind) it answered right and the 95% Wilson interval of that share.
    One per arm, evaluation and task, beside the arm's EvalPoint (only when the run scores accuracy)."""

    kind: ClassVar[str] = "eval_accuracy"
    arm: str
    step: int
    task: str
    accuracy: float
    n: int
    interval: tuple[float, float]
    note: str = ""


@dataclass
class ArmFinished(Event):
    """An arm ended (all steps done or stopped); its adapter is saved in adapter_dir."""

    kind: ClassVar[str] = "arm_finished"
    arm: str
    final_perplexity: float | None
    best_perplexity: float | None
    seconds: float
    adapter_dir: str
    steps_done: int = 0
    stopped: bool = False


# -- generation side by side (python -m quailora_app generate) ----------------------------------------------
@dataclass
class GeneratedToken(Event):
    """One new token of a model variant's continuation of the prompt, as soon as it is chosen."""

    kind: ClassVar[str] = "token"
    variant: str  # "full", "int8", "qlora" (plain 4-bit), a method of the init run or an arm of the train run
    step: int  # 1-based
    total: int
    token_id: int
    piece: str  # this token, decoded alone
    text: str  # the continuation so far, decoded
