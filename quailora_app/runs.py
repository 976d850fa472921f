"""Run folders: results are written as they are computed, atomically, so nothing is lost on a crash or stop."""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from quailora_app.errors import Cancelled, UserError
from quailora_app.events import Event


def default_runs_root() -> Path:
    return Path(os.environ.get("QUAILORA_RUNS", "runs"))


def new_run_dir(kind: str, out: str | None = None) -> Path:
    """`out` if given, else runs/<kind>-YYYYmmdd-HHMMSS (suffixed if taken)."""
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
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


class EventLog:
    """events.jsonl: one JSON object per line, appended and flushed as each event happens."""

    def __init__(self, run_dir: Path, name: str = "events.jsonl"):
        self.path = Path(run_dir) / name
        self._file = open(self.path, "a", buffering=1)

    def append(self, event: Event) -> None:
        self._file.write(json.dumps(event.to_dict(), default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_events(run_dir: Path, name: str = "events.jsonl") -> list[dict]:
    """Every complete line of events.jsonl (a torn last line from a crash is skipped)."""
    events = []
    path = Path(run_dir) / name
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def ended_in_one_line(
    body: Iterator[Event],
    finish_failed: Callable[[str, bool], Event],
    run_dir: Path,
    device: str,
    oom_hint: str,
    release_memory: Callable[[], None],
) -> Iterator[Event]:
    """Yield `body`'s events; whatever ends the run early becomes one failed event from `finish_failed(message,
    cancelled)`: a stop, a user error, out of memory (after `release_memory()`, with `oom_hint`), or an internal
    error, whose traceback goes to error.txt in the run folder while the user gets one line."""
    try:
        yield from body
    except Cancelled as exc:
        yield finish_failed(str(exc), True)
    except UserError as exc:
        yield finish_failed(str(exc), False)
    except torch.OutOfMemoryError:
        release_memory()
        yield finish_failed(f"out of memory on {device}: {oom_hint}", False)
    except Exception as exc:  # noqa: BLE001 - the run folder keeps the traceback, the user gets one line
        (Path(run_dir) / "error.txt").write_text(traceback.format_exc())
        yield finish_failed(f"internal error: {type(exc).__name__}: {exc} (traceback in {Path(run_dir) / 'error.txt'})", False)
