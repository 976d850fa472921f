"""Run folders: results are written as they are computed, atomically, so nothing is lost on a crash or stop.

A run folder holds report.json (a `Report`: its kind and status, and what the flow of that kind measured),
events.jsonl (one event per line, as the run streamed them), adapters/ and, after an internal error, error.txt.
Every reader and writer of those files goes through `RunFolder`; every atomic write through `write_atomic`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from quailora_app.errors import ConfigError
from quailora_app.events import Event

RunKind = Literal["init", "train", "views", "bits", "generate"]
REPORT = "report.json"
EVENTS = "events.jsonl"
ERROR = "error.txt"
#: views runs written before their report went to report.json kept it in views.json
OLD_VIEWS_REPORT = "views.json"


class Report(TypedDict, total=False):
    """report.json. Every run's report says its kind and status; the other keys depend on the kind
    (flows/init.py, flows/train.py, flows/views.py)."""

    kind: RunKind
    status: str  # running, finished, stopped (train), cancelled, failed
    error: str  # the one line a run that ended early gave
    model: str
    dataset: str
    device: str
    settings: dict
    seconds: dict[str, float]


def default_runs_root() -> Path:
    return Path(os.environ.get("QUAILORA_RUNS", "runs"))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename: readers see
    the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, atomically and synced to disk."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def _jsonable(value: Any):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class EventLog:
    """events.jsonl: one JSON object per line, appended and flushed as each event happens."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)

    def append(self, event: Event) -> None:
        self._file.write(json.dumps(event.to_dict(), default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class RunFolder:
    """One run's folder: its report, its event log, its error file."""

    path: Path

    @classmethod
    def create(cls, kind: RunKind, out: str | Path | None = None) -> RunFolder:
        """`out` if given, else <runs root>/<kind>-YYYYmmdd-HHMMSS (suffixed if taken); created."""
        if out:
            path = Path(out)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = default_runs_root() / f"{kind}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = default_runs_root() / f"{kind}-{stamp}-{n}"
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    @property
    def error_path(self) -> Path:
        return self.path / ERROR

    def has_results(self) -> bool:
        """True when the folder holds a report or an event log."""
        return self.report_path.is_file() or (self.path / EVENTS).is_file()

    def read_report(self) -> Report | None:
        """report.json (or an older views run's views.json); None when there is none or it cannot be read."""
        for name in (REPORT, OLD_VIEWS_REPORT):
            try:
                data = _read_json(self.path / name)
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return cast(Report, data)
        return None

    def write_report(self, report: Report) -> None:
        write_json_atomic(self.report_path, report)

    def open_log(self) -> EventLog:
        return EventLog(self.path / EVENTS)

    def read_events(self) -> list[dict]:
        """Every complete line of events.jsonl (a torn last line from a crash is skipped)."""
        path = self.path / EVENTS
        if not path.exists():
            return []
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def write_error(self, text: str) -> None:
        self.error_path.write_text(text)

    def kind(self, report: Report | None = None, events: list[dict] | None = None) -> RunKind:
        """The report's kind; for folders written before reports said it, guessed from the folder's name and
        contents."""
        report = self.read_report() if report is None else report
        if report and report.get("kind") in ("init", "train", "views", "bits", "generate"):
            return report["kind"]
        events = self.read_events() if events is None else events
        if (self.path / OLD_VIEWS_REPORT).is_file() or self.name.startswith("views-"):
            return "views"
        if self.name.startswith("train-") or "arms" in (report or {}) \
                or any(e.get("kind") == "train_step" for e in events):
            return "train"
        return "init"


def open_run(path: str | Path, flag: str) -> tuple[RunFolder, Report | None]:
    """The run folder a user named with `flag` (its folder or its report.json) and its report (None when it has no
    readable one); a one-line ConfigError when no such folder exists."""
    given = Path(path).expanduser()
    folder = given.parent if given.name == REPORT and given.is_file() else given
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: no such run folder")
    run = RunFolder(folder)
    return run, run.read_report()


def read_report_at(path: str | Path) -> Report:
    """The report of a run folder, or a report.json file, named by the user; a ConfigError if unreadable."""
    path = Path(path)
    file = path / REPORT if path.is_dir() else path
    try:
        data = _read_json(file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read report {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read report {file}: not a JSON object")
    return cast(Report, data)
