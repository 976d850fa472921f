"""What every flow does around its own work, written once: each event appended to events.jsonl as it is
yielded, the report rewritten atomically, stop requests turned into `Cancelled`, and whatever ends a run
early turned into one `RunFailed` event with one line (the traceback of an internal error goes to error.txt).
"""
from __future__ import annotations

import gc
import traceback
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict
from typing import TypeVar

import torch

from quailora_app.errors import Cancelled, UserError
from quailora_app.events import Event, RunFailed
from quailora_app.runs import Report, RunFolder, RunKind

E = TypeVar("E", bound=Event)
T = TypeVar("T")


def opening_report(kind: RunKind, cfg, device: str, **fields) -> Report:
    """A run's report as it starts: its kind, status "running", what it runs on (model, dataset, device), every
    setting, then the flow's own `fields`."""
    return {"kind": kind, "status": "running", "model": cfg.model.model, "dataset": cfg.data.dataset,
            "device": device, "settings": asdict(cfg), **fields}


def free_memory() -> None:
    """Collect what a run dropped and hand cached GPU memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Recorder:
    """One run's folder, report and event log.

    `before_save()` runs before each write of the report (a flow's derived figures); `on_fail(cancelled)` before
    the report of a run that ended early is written; `stopped_status` is the report's status after a stop."""

    def __init__(self, folder: RunFolder, report: Report, should_stop: Callable[[], bool] | None = None, *,
                 before_save: Callable[[], None] = lambda: None, on_fail: Callable[[bool], None] = lambda _: None,
                 stopped_status: str = "cancelled"):
        self.folder = folder
        self.report = report
        self.should_stop = should_stop or (lambda: False)
        self._before_save = before_save
        self._on_fail = on_fail
        self._stopped_status = stopped_status
        self._log = folder.open_log()

    @property
    def run_dir(self) -> str:
        return str(self.folder.path)

    def emit(self, event: E) -> E:
        self._log.append(event)
        return event

    def relay(self, stream: Generator[Event, None, T]) -> Generator[Event, None, T]:
        """Emit every event of `stream`; its return value."""
        while True:
            try:
                event = next(stream)
            except StopIteration as stop:
                return stop.value
            yield self.emit(event)

    def save(self) -> None:
        self._before_save()
        self.folder.write_report(self.report)

    def check_stop(self, where: str) -> None:
        if self.should_stop():
            raise Cancelled(f"stopped by the user during {where}")

    def fail(self, message: str, cancelled: bool = False) -> RunFailed:
        """The run ended early: the report says so (status, error) and the last event is RunFailed."""
        self.report["status"] = self._stopped_status if cancelled else "failed"
        self.report["error"] = message
        self._on_fail(cancelled)
        self.save()
        return self.emit(RunFailed(self.run_dir, message, cancelled))

    def run(self, body: Iterator[Event], device: str, oom_hint: str,
            release_memory: Callable[[], None] = free_memory) -> Iterator[Event]:
        """Yield `body`'s events; whatever ends it early becomes one failed event: a stop, a user error, out of
        memory on `device` (after `release_memory()`, with `oom_hint`), or an internal error. At the end the
        event log is closed and memory released."""
        try:
            yield from body
        except Cancelled as exc:
            yield self.fail(str(exc), True)
        except UserError as exc:
            yield self.fail(str(exc))
        except torch.OutOfMemoryError:
            release_memory()
            yield self.fail(f"out of memory on {device}: {oom_hint}")
        except Exception as exc:  # noqa: BLE001 - the run folder keeps the traceback, the user gets one line
            self.folder.write_error(traceback.format_exc())
            yield self.fail(f"internal error: {type(exc).__name__}: {exc} (traceback in {self.folder.error_path})")
        finally:
            self._log.close()
            release_memory()
