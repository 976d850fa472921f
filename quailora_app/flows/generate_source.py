"""The finished run a generate run reads (`--from-run`): an init run's adapters/<method>/, or a train run's 4-bit
arms' adapters and those of the init run it started from, with its settings; refused in one line when it cannot
serve (missing, unfinished, of another kind, without adapters)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quailora_app.engine.arms import find_arm
from quailora_app.engine.methods.registry import QLORA, REQUANT, get_method
from quailora_app.errors import ConfigError
from quailora_app.flows.from_init import flat
from quailora_app.runs import RunFolder, open_run

#: what a saved adapter folder must hold for peft to load it
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class RunSource:
    """A finished run a generate run reads: its report, settings (flat) and the adapters to compare, by variant
    name (a method of the init run, an arm of the train run), in order."""

    folder: Path
    report: Mapping[str, Any]
    kind: str
    values: Mapping[str, Any]
    adapters: dict[str, Path]
    trained: frozenset[str] = frozenset()  # the variants that are fine-tuning arms
    skipped: dict[str, str] = field(default_factory=dict)  # arms not on the 4-bit base, and why

    @property
    def name(self) -> str:
        return self.folder.name

    def arm_labels(self) -> dict[str, str]:
        """A train run's arms by the labels it gave them (they name the bits it trained at)."""
        arms = self.report.get("arms") if self.kind == "train" else None
        return {n: a["label"] for n, a in arms.items() if isinstance(a, Mapping) and a.get("label")} \
            if isinstance(arms, Mapping) else {}


def _saved(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PEFT_FILES)


def _init_adapters(folder: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """An init run's saved adapters but qlora's (B = 0: plain 4-bit, which is always a variant)."""
    return {m: folder / "adapters" / m for m in report.get("methods", ())
            if m != QLORA and _saved(folder / "adapters" / m)}


def read_run(path: str | Path | None) -> RunSource:
    """The finished init or train run at `path` (its folder or its report.json), with at least one adapter to
    compare; a one-line ConfigError otherwise."""
    if not path or not str(path).strip():
        raise ConfigError("--from-run is required: an init run's folder (its adapters/<method>/) or a train run's")
    run, report = open_run(str(path), "--from-run")
    folder = run.path
    if report is None:
        raise ConfigError(f"--from-run {path}: not a run folder (no readable report.json)")
    kind = run.kind(report)
    if kind not in ("init", "train"):
        raise ConfigError(f"--from-run {path}: a {kind} run; give an init or train run, whose folders hold adapters")
    if not isinstance(report.get("settings"), Mapping):
        raise ConfigError(f"--from-run {path}: its report.json records no settings")
    status = report.get("status")
    if status not in (("finished",) if kind == "init" else ("finished", "stopped")):
        raise ConfigError(f"--from-run {path}: the {kind} run is {status or 'unfinished'}; give a finished one (its "
                          "adapters are complete only then)")
    adapters, trained, skipped = {}, set(), {}
    if kind == "init":
        adapters = _init_adapters(folder, report)
    else:
        origin = Path(str(report.get("from_init") or ""))
        origin_report = RunFolder(origin).read_report() if report.get("from_init") and origin.is_dir() else None
        if origin_report is not None and origin_report.get("status") == "finished":
            adapters.update(_init_adapters(origin, origin_report))
        for arm in report.get("arm_names", ()):
            spec = find_arm(arm)
            if spec is not None and spec.base != "4bit":
                skipped[arm] = f"trained on the {spec.base} base, not the 4-bit one the variants share"
            elif spec is not None and get_method(spec.init).kind == REQUANT:
                skipped[arm] = "trained on a base LoftQ quantized again, not the stock one the variants share"
            elif _saved(folder / "adapters" / arm) and arm not in adapters:
                adapters[arm] = folder / "adapters" / arm
                trained.add(arm)
    if not adapters:
        raise ConfigError(f"--from-run {path}: the run folder has no adapters to compare (adapters/<name>/ with "
                          f"{' and '.join(PEFT_FILES)}, a method besides qlora or a 4-bit arm)")
    return RunSource(folder, report, kind, flat(report["settings"]), adapters, frozenset(trained), skipped)
