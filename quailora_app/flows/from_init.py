"""Fine-tuning that starts from a finished init run (`train --from-init RUN`): what the init run fixes, the
TrainConfig built from it, and the initializations it saved.

Why: an init run has already quantized the model, calibrated it, computed each initialization and measured the
held-out perplexities (4-bit with each method, 8-bit, full precision). A train run on the same settings would
repeat all of it before its first step; starting from the init run leaves it the base models to load.

What the init run fixes (`FIXED`): the model, the data and how it is cut (dataset, eval dataset, text column,
seq-len, calibration samples, seed), the quantization (quantizer, bits, data type, block or group size: an HQQ 3-bit
init run gives a train run whose quantized arms train on HQQ 3-bit) and the LoRA shape (rank, alpha, rsLoRA, targets).
Its factors fit that base and that shape only, and its perplexities were measured on that cut. A value the user
names for one of them that differs from the init run's is refused (ConfigError), never silently replaced.

Held-out tokens. `load_splits` shuffles the documents with the seed and hands them to evaluation first, then to
calibration, then to training; the training split's size (which differs between the flows) changes neither the
held-out nor the calibration windows. So with the init run's data settings the train run evaluates on the init
run's held-out tokens and calibrates (the arms computed here) on its calibration windows: the init report's
perplexities are the train run's, and are taken from it instead of being measured again. eval-tokens may be
lowered (an evaluation every few steps on fewer tokens is cheaper): the held-out windows are then the first of the
init run's (the same documents in the same order, cut shorter), still apart from the text the loaded factors were
calibrated on, but no longer the init report's tokens, so the references and step-0 perplexities are measured.
Raising it is refused: the extra held-out documents would be the init run's calibration text.

Settings that only shape what the train run computes itself (damping, ALS rounds, distill's steps, learning rate
and batch), the compute dtype and the downstream accuracy settings (which tasks, how many items: with the init run's,
the arms are scored on its items and its step-0 scores are reused) are the init run's unless given. The training
settings (arms, steps, learning rate, batches, evaluation interval, schedule), the device and the run folder are the
user's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from quailora_app.config import AccuracyConfig, TrainConfig
from quailora_app.engine.methods.registry import LAYER, MODEL, QLORA, find_method
from quailora_app.errors import ConfigError
from quailora_app.runs import REPORT, open_run
from quailora_app.settings import build, settings

#: settings (flat names, settings.py) an init run fixes for a train run that starts from it
FIXED = ("model", "dataset", "eval_dataset", "text_column", "seq_len", "calib_samples", "seed",
         "quantizer", "bits", "quant", "double_quant", "block_size", "rank", "alpha", "rslora", "targets")
#: what an init run that predates a setting of FIXED ran with (bitsandbytes 4-bit, the only quantizer then)
BEFORE_SETTING = {"quantizer": "bitsandbytes", "bits": 4}
#: the downstream accuracy settings: the init run's unless given, so that the arms are scored on the init run's items
#: and its step-0 scores are reused (flows/train.py)
ACCURACY_SETTINGS = tuple(f.name for f in fields(AccuracyConfig))
#: settings taken from the init run unless given (eval_tokens: given, only lower; see the module)
INHERITED = ("eval_tokens", "compute_dtype", "damping", "als_rounds", "distill_steps", "distill_lr", "distill_batch",
             *ACCURACY_SETTINGS)
#: settings naming a file or folder: the same place written two ways is the same value
PATHS = ("model", "dataset", "eval_dataset")
#: what an adapter folder of an init run holds (save_adapter: peft's files and the initialization's record)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "quailora.json")


@dataclass(frozen=True)
class InitSource:
    """A finished init run, read: its folder, report and settings (flat, by setting name)."""

    folder: Path
    report: Mapping[str, Any]
    values: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def device_type(self) -> str:
        """'cuda' or 'cpu', from the report's device label (sources.models.device_label)."""
        return "cuda" if str(self.report.get("device", "")).startswith("cuda") else "cpu"

    @property
    def eval_tokens(self) -> int | None:
        """Held-out tokens the init run measured its perplexities on (report["tokens"]["eval"])."""
        return (self.report.get("tokens") or {}).get("eval")

    def adapter(self, method: str) -> Path | None:
        """adapters/<method>/ when the init run saved it whole (peft's files and quailora.json)."""
        folder = self.folder / "adapters" / method
        return folder if all((folder / name).is_file() for name in ADAPTER_FILES) else None

    @property
    def saved(self) -> tuple[str, ...]:
        """The initializations a train arm can load: the methods of the run the engine computes (per layer or over
        the whole model) whose adapter it saved. Not qlora: its A is the init run's draw, while a train run draws
        the same A for all its default-init arms from its own seed."""
        return tuple(m for m in self.report.get("methods", ())
                     if (method := find_method(m)) is not None and method.kind in (LAYER, MODEL)
                     and m != QLORA and self.adapter(m) is not None)

    def perplexity(self, name: str) -> float | None:
        """The init report's held-out perplexity of a method, "int8" or "full" (None when not measured)."""
        value = (self.report.get("perplexity") or {}).get(name)
        return float(value) if isinstance(value, (int, float)) else None


def flat(nested: Mapping[str, Any]) -> dict[str, Any]:
    """A config's asdict() with the nested configs' fields lifted to the top (settings.py's flat names)."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update(value)
        else:
            out[key] = value
    return out


def read_init_run(path: str | Path) -> InitSource:
    """The finished init run at `path` (its folder or its report.json); a one-line ConfigError otherwise."""
    run, report = open_run(path, "--from-init")
    folder = run.path
    if report is None:
        raise ConfigError(f"--from-init {path}: not an init run (no readable {REPORT})")
    kind = run.kind(report)
    if kind != "init":
        raise ConfigError(f"--from-init {path}: a {kind} run, not an init run")
    status = report.get("status")
    if status != "finished":
        raise ConfigError(f"--from-init {path}: the init run is {status or 'unfinished'}; start from a finished one "
                          "(its factors and perplexities are complete only then)")
    if not isinstance(report.get("settings"), Mapping):
        raise ConfigError(f"--from-init {path}: its {REPORT} records no settings")
    return InitSource(folder, report, {**BEFORE_SETTING, **flat(report["settings"])})


def _norm(name: str, value: Any) -> Any:
    """A setting's value in a form that compares: sequences as tuples, numbers as floats, paths resolved."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(name, v) for v in value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if name in PATHS and Path(str(value)).expanduser().exists():
        return str(Path(str(value)).expanduser().resolve())
    return value


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def conflicts(values: Mapping[str, Any], source: InitSource) -> list[str]:
    """One phrase per setting of `values` (flat names) that a run starting from `source` cannot take."""
    known = settings(TrainConfig)
    found = []
    for name in FIXED:
        if name in values and name in source.values \
                and _norm(name, values[name]) != _norm(name, source.values[name]):
            found.append(f"{known[name].flag} {_shown(values[name])} (the init run's: {_shown(source.values[name])})")
    ours, theirs = values.get("eval_tokens"), source.values.get("eval_tokens")
    if isinstance(ours, int) and isinstance(theirs, int) and ours > theirs:
        found.append(f"--eval-tokens {ours} above the init run's {theirs} (the extra held-out text would be its "
                     "calibration text)")
    return found


def _refuse(found: list[str], source: InitSource, how: str) -> None:
    if found:
        raise ConfigError(f"init run {source.name} fixes the model, data, quantization and LoRA shape: "
                          f"{'; '.join(found)}; {how}")


def train_config_from_init(run: str | Path | InitSource, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a fine-tuning run that starts from init run `run` (a folder, its report.json or an
    InitSource): the init run's settings of FIXED and INHERITED, then `overrides` (flat setting names, as the CLI
    and the form name them: steps=..., learning_rate=..., arms=...). An override of a FIXED setting must equal the
    init run's, eval_tokens must not exceed it (ConfigError, one line, before anything runs)."""
    source = run if isinstance(run, InitSource) else read_init_run(run)
    known = settings(TrainConfig)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for a train run")
    _refuse(conflicts(overrides, source), source, "leave those out, or start a new init run with them")
    values = {name: source.values[name] for name in (*FIXED, *INHERITED) if name in source.values and name in known}
    values.update(overrides)
    values["from_init"] = str(source.folder)
    return build(TrainConfig, values)


def check_against_init(cfg: TrainConfig, source: InitSource) -> None:
    """Refuse a train config whose FIXED settings differ from init run `source` (a config built by hand rather
    than by train_config_from_init)."""
    _refuse(conflicts(flat(asdict(cfg)), source), source, "build the config with train_config_from_init")


def same_held_out(cfg: TrainConfig, source: InitSource) -> bool:
    """True when `cfg` (checked against `source`) evaluates on the init run's held-out windows: the same data
    settings (check_against_init) and eval tokens. The flow also compares the token counts it got."""
    return cfg.data.eval_tokens == source.values.get("eval_tokens")


def init_answers(entry: Mapping[str, Any], keep: Sequence[int]) -> dict[str, tuple[bool, ...]]:
    """From the init report's accuracy entry of a task (report["accuracy"][kind]) whose items a train run scores
    at indices `keep`: per model variant it scored (qlora, a method, int8, full), which of those items it got
    right."""
    answers = {}
    for name, record in (entry.get("models") or {}).items():
        correct = record.get("correct") if isinstance(record, Mapping) else None
        if isinstance(correct, str) and len(correct) == entry.get("n"):
            answers[name] = tuple(correct[i] == "1" for i in keep)
    return answers
