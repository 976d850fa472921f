"""Compute jobs for the web app: one worker thread per process runs them one at a time from a FIFO queue.

The UI never runs the engine inside a browser request. A request submits a `Job` (a config and an owner) and
gets its id back; the worker iterates the engine's event stream and appends each event to the job; the page
polls the job by id. So a closed tab does not stop a run, a reopened page re-attaches to it (the owner key
lives in the browser), and a stop request only reaches the job whose owner sent it.

Stop is cooperative: the engine's `should_stop()` reads the job's `threading.Event` and, for work that runs in
another process (ZeroGPU forks one), a STOP file in the run folder. No gradio in this module.

A job that dies (any exception, out of memory, even a BaseException raised inside a step) is marked failed with
one line; the worker then makes sure the run folder says so too (report.json `status: failed` with the `error`,
a last `failed` line in events.jsonl, both only where the engine did not get to write them), keeps whatever
the run had written (events, adapters), frees memory and goes on with the next job in the queue.

Memory stays flat over many jobs: the last `keep` jobs are remembered (a reopened page re-attaches to its owner's
latest), but only the newest `keep_full` finished ones hold their events and report in memory. Older ones give
them back to their run folder, which holds the same events and report, and `snapshot` reads them from there
(the last few read are kept), so a finished job shows the same results however old it is.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quailora_app.app.reopen import mark_owner
from quailora_app.errors import UserError, one_line
from quailora_app.events import Event, RunFailed
from quailora_app.flows.bits import run_bits
from quailora_app.flows.generate import run_generate, warm_bases
from quailora_app.flows.init import run_init
from quailora_app.flows.recorder import free_memory
from quailora_app.flows.train import run_train
from quailora_app.flows.views import run_views
from quailora_app.runs import EVENTS, RunFolder

#: (config, should_stop, run_dir) -> event stream
Runner = Callable[[Any, Callable[[], bool], Path], Iterator[Event]]

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
DONE = (FINISHED, FAILED, CANCELLED)
STOP_FILE = "STOP"

DEFAULT_RUNNERS: dict[str, Runner] = {"init": run_init, "train": run_train, "views": run_views, "bits": run_bits,
                                      "generate": run_generate}


def release_memory() -> None:
    """After every job: collect what the finished (or dead) run left behind, hand cached GPU memory back, and
    (glibc) return freed heap pages to the system, so a long-running app's memory goes back to its level."""
    free_memory()
    _malloc_trim()


def _malloc_trim() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes  # only on Linux, for glibc's malloc_trim

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
        pass


def warm_up_in_background() -> threading.Thread:
    """Generate's bases for the default model quantized ahead (flows.generate.warm_bases), in a thread of their
    own while the page starts; their line, or a warning (the first Generate then quantizes as usual), goes to the
    app's output."""
    def work() -> None:
        try:
            print(warm_bases(), flush=True)
            release_memory()  # the float32 weights the quantization read go back to the system
        except Exception as exc:  # noqa: BLE001 - a warm-up that cannot run changes nothing but speed
            print(f"warning: generate's bases not made ahead: {one_line(exc, 200)}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=work, name="quailora-warm", daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------------------------------ ZeroGPU
def zerogpu_available() -> bool:
    """True on a Hugging Face ZeroGPU Space (the `spaces` package is importable and not switched off)."""
    if os.environ.get("QUAILORA_NO_SPACES"):
        return False
    return importlib.util.find_spec("spaces") is not None


def estimate_seconds(kind: str, cfg: Any) -> int:
    """A generous guess of a job's GPU seconds, for `spaces.GPU(duration=...)`, clamped to 60..900."""
    try:
        if kind == "init":
            tokens = cfg.data.calib_samples * cfg.data.seq_len
            evals = cfg.data.eval_tokens * (len(cfg.methods) + (2 if cfg.baselines else 0))
            guess = 45 + tokens / 2_000 + evals / 20_000 + 3 * len(cfg.methods)
        elif kind == "bits":  # per base: quantize, correct with each method, one perplexity per point
            tokens = cfg.data.calib_samples * cfg.data.seq_len
            evals = cfg.data.eval_tokens * len(cfg.bases) * (1 + len(cfg.methods))
            guess = 45 + tokens / 2_000 + evals / 20_000 + 10 * len(cfg.bases) * (1 + len(cfg.methods))
        elif kind == "generate":  # a few models loaded, each continuing the prompt; deploy adds six perplexities
            guess = 60 + 2 * cfg.new_tokens * (1 + cfg.documents / 8) + (240 + cfg.deploy_tokens / 100 if cfg.deploy
                                                                         else 0)
        else:
            tokens = cfg.steps * cfg.batch_size * getattr(cfg, "grad_accum", 1) * cfg.data.seq_len * len(cfg.arms)
            evals = (cfg.steps // max(1, cfg.eval_every) + 1) * cfg.data.eval_tokens * len(cfg.arms)
            guess = 60 + tokens / 5_000 + evals / 20_000 + 20 * len(cfg.arms)
    except (AttributeError, TypeError, ZeroDivisionError):
        guess = 300
    return int(min(900, max(60, 1.5 * guess)))


def _gpu_duration(kind: str, cfg: Any, run_dir: str) -> int:
    return estimate_seconds(kind, cfg)


def _gpu_work(kind: str, cfg: Any, run_dir: str):
    """The engine's stream for a job, as run inside ZeroGPU's GPU process: only the STOP file crosses over."""
    stop_file = Path(run_dir) / STOP_FILE
    yield from DEFAULT_RUNNERS[kind](cfg, stop_file.exists, Path(run_dir))


if zerogpu_available():  # pragma: no cover - only on Hugging Face ZeroGPU Spaces
    import spaces

    # decorated at import time, as ZeroGPU wants; the duration is computed per call from the job's settings
    _gpu_work = spaces.GPU(duration=_gpu_duration)(_gpu_work)


def on_gpu(runner: Runner, kind: str) -> Runner:
    """On ZeroGPU, run the engine's own runners inside `spaces.GPU`; anything else is returned unchanged."""
    if not zerogpu_available() or runner is not DEFAULT_RUNNERS.get(kind):
        return runner

    def wrapped(cfg, should_stop, run_dir):  # pragma: no cover - only on ZeroGPU
        return _gpu_work(kind, cfg, str(run_dir))

    return wrapped


# ------------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    """One queued or finished compute job. Read it through `JobManager.snapshot` (thread-safe copy)."""

    id: str
    kind: str
    owner: str
    config: Any
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    events: list[dict] = field(default_factory=list)
    version: int = 0  # bumped on every change, so pollers can skip unchanged states
    stage: str = ""
    stage_message: str = ""
    done: int = 0
    total: int = 0
    run_dir: str | None = None
    report: dict | None = None
    message: str = ""
    position: int | None = None  # 1 = next to run; None when running or done (filled in by snapshots)
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    archived: bool = False  # events and report left to the run folder (snapshots read them back from it)

    @property
    def active(self) -> bool:
        return self.status in (QUEUED, RUNNING)

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.time()) - self.started

    def should_stop(self) -> bool:
        if self.stop_event.is_set():
            return True
        return bool(self.run_dir) and (Path(self.run_dir) / STOP_FILE).exists()


class JobManager:
    """A FIFO queue and one worker thread: at most one compute job runs at a time in this process.

    `keep`: how many finished jobs are remembered; `keep_full`: how many of the newest of them keep their events
    and report in memory (the older ones are read back from their run folders when asked for)."""

    READ_BACK = 4  # archived jobs whose events and report stay cached after being read back (an open page polls)

    def __init__(self, runners: dict[str, Runner] | None = None, *, gpu: bool = True, keep: int = 200,
                 keep_full: int = 16):
        runners = dict(runners or DEFAULT_RUNNERS)
        self.runners = {k: (on_gpu(r, k) if gpu else r) for k, r in runners.items()}
        self.keep = keep
        self.keep_full = keep_full
        self._jobs: dict[str, Job] = {}
        self._on_disk: dict[str, bool] = {}  # finished job -> its run folder holds its events (and its report: True)
        self._read_back: OrderedDict[str, tuple[list[dict], dict | None]] = OrderedDict()
        self._queue: deque[str] = deque()
        self._running: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the worker waits on it for a queued job
        self._ended = threading.Condition(self._lock)  # `wait` waits on it for a job to end
        self._worker: threading.Thread | None = None

    # -- submitting and stopping ------------------------------------------------------------------------
    def submit(self, kind: str, config: Any, owner: str) -> Job:
        """Queue a job; one active (queued or running) job per owner."""
        if kind not in self.runners:
            raise UserError(f"unknown job kind {kind!r}")
        if not owner:
            raise UserError("a job needs an owner key")
        with self._lock:
            mine = [j for j in self._jobs.values() if j.owner == owner and j.active]
            if mine:
                raise UserError(f"you already have a {mine[0].kind} job {mine[0].status} ({mine[0].id}); "
                                "stop it or wait for it")
            job = Job(uuid.uuid4().hex[:12], kind, owner, config)
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self._forget_old()
            self._ensure_worker()
            self._wake.notify()
        return job

    def stop(self, job_id: str, owner: str) -> str:
        """Ask the job to stop; only its owner may. Returns a one-line answer for the UI."""
        with self._lock:
            job = self._jobs.get(job_id or "")
            if job is None:
                return "no such job"
            if job.owner != owner:
                return "that job belongs to another session; it was not stopped"
            if job.status == QUEUED:
                self._queue.remove(job.id)
                job.status, job.ended, job.message = CANCELLED, time.time(), "removed from the queue before it started"
                job.version += 1
                self._ended.notify_all()
                return "removed from the queue"
            if job.status == RUNNING:
                job.stop_event.set()
                if job.run_dir:
                    try:
                        (Path(job.run_dir) / STOP_FILE).touch()
                    except OSError:
                        pass
                job.message = "stopping after the current step..."
                job.version += 1
                return "stopping after the current step"
            return f"already {job.status}"

    # -- reading ----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id or "")

    def snapshot(self, job_id: str, since: int = 0) -> Job | None:
        """A copy of the job safe to read while the worker runs (events from index `since` on); an archived job's
        events and report are read back from its run folder."""
        with self._lock:
            job = self._jobs.get(job_id or "")
            if job is None:
                return None
            copy = replace(job, events=job.events[since:], position=self._position(job))
        if copy.archived:
            events, copy.report = self._read_archived(copy)
            copy.events = events[since:]
        return copy

    def _read_archived(self, job: Job) -> tuple[list[dict], dict | None]:
        with self._lock:
            cached = self._read_back.get(job.id)
            if cached is not None:
                self._read_back.move_to_end(job.id)
                return list(cached[0]), cached[1]
        folder = RunFolder(Path(job.run_dir or ""))
        try:
            events, report = folder.read_events(), (folder.read_report() if self._on_disk.get(job.id) else None)
        except (OSError, ValueError):  # the run folder was removed or damaged since: the job shows what is left
            events, report = [], None
        with self._lock:
            self._read_back[job.id] = (events, report)
            while len(self._read_back) > self.READ_BACK:
                self._read_back.popitem(last=False)
        return list(events), report

    def owned(self, job_id: str, owner: str | None) -> Job | None:
        """`snapshot(job_id)` if the job belongs to `owner`, else None: a session never reads another's job."""
        job = self.snapshot(job_id) if owner else None
        return job if job is not None and job.owner == owner else None

    def active_owners(self) -> set[str]:
        with self._lock:
            return {j.owner for j in self._jobs.values() if j.active}

    def latest(self, owner: str, kind: str | None = None) -> Job | None:
        """The owner's most recent job (of `kind`), for re-attaching a reopened page."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.owner == owner and (kind is None or j.kind == kind)]
        return max(jobs, key=lambda j: j.created) if jobs else None

    def queue_length(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return (1 if self._running else 0), len(self._queue)

    def _position(self, job: Job) -> int | None:
        if job.status != QUEUED:
            return None
        try:
            return self._queue.index(job.id) + 1
        except ValueError:
            return None

    def wait(self, job_id: str, timeout: float = 60.0) -> Job | None:
        """Block until the job is done, or `timeout` seconds (tests, scripts)."""
        with self._lock:
            self._ended.wait_for(lambda: self._ended_for_good(job_id), timeout)
        return self.snapshot(job_id)

    def _ended_for_good(self, job_id: str) -> bool:
        """The job is done and the worker has finished with it (run folder marked, memory released)."""
        job = self._jobs.get(job_id or "")
        return job is None or (not job.active and self._running != job.id)

    # -- the worker -------------------------------------------------------------------------------------
    def _forget_old(self) -> None:
        """Forget finished jobs beyond the newest `keep`; archive those beyond the newest `keep_full`."""
        done = sorted((j for j in self._jobs.values() if not j.active), key=lambda j: j.created)
        cut = max(0, len(done) - self.keep)
        for job in done[:cut]:
            del self._jobs[job.id]
            self._on_disk.pop(job.id, None)
            self._read_back.pop(job.id, None)
        for job in done[cut: max(cut, len(done) - self.keep_full)]:
            if not job.archived and job.id in self._on_disk and self._running != job.id:
                job.events, job.report, job.archived = [], None, True

    def _note_on_disk(self, job: Job) -> None:
        """Remember that the finished job's run folder holds its events and report (what the engine's runners
        write as they go; a runner that writes nothing keeps its job in memory)."""
        if not job.run_dir:
            return
        folder = RunFolder(Path(job.run_dir))
        try:
            lines = (folder.path / EVENTS).read_bytes().count(b"\n") if (folder.path / EVENTS).is_file() else 0
            on_disk = lines >= len(job.events) > 0 and (job.report is None or folder.report_path.is_file())
        except OSError:
            on_disk = False
        if on_disk:
            with self._lock:
                self._on_disk[job.id] = job.report is not None

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="quailora-jobs", daemon=True)
            self._worker.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                job = self._jobs[self._queue.popleft()]
                self._running = job.id
                job.status, job.started = RUNNING, time.time()
                job.version += 1
            try:
                self._execute(job)
            finally:
                with self._lock:
                    if job.status == RUNNING:  # the stream ended without saying how
                        job.status, job.message = FAILED, job.message or "the run ended without a result"
                    job.ended = job.ended or time.time()
                    job.version += 1
                if job.status == FAILED:
                    self._mark_folder_failed(job)
                self._note_on_disk(job)
                release_memory()
                with self._lock:
                    self._running = None
                    self._forget_old()
                    self._ended.notify_all()

    def _execute(self, job: Job) -> None:
        stream = None
        folder = None
        try:
            folder = RunFolder.create(job.kind, getattr(job.config, "out", None))
            mark_owner(folder.path, job.owner)
            with self._lock:
                job.run_dir = str(folder.path)
            if job.stop_event.is_set():
                (folder.path / STOP_FILE).touch()
            stream = self.runners[job.kind](job.config, job.should_stop, folder.path)
            for event in stream:
                self._record(job, event)
        except UserError as exc:
            self._fail(job, str(exc))
        except BaseException as exc:  # noqa: BLE001 - the worker outlives any job; one line for the UI
            if folder is not None:
                try:
                    folder.write_error(traceback.format_exc())
                except OSError:
                    pass
            if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                self._fail(job, f"out of memory: {type(exc).__name__}: {one_line(exc)}")
            else:
                self._fail(job, f"internal error: {type(exc).__name__}: {one_line(exc)}")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                try:
                    close()  # runs the engine's own cleanup (event log closed, memory freed) if it was cut short
                except BaseException:  # noqa: BLE001
                    pass
            stream = None

    def _mark_folder_failed(self, job: Job) -> None:
        """Make the run folder agree with the job: report.json says failed with the reason, and events.jsonl ends
        with a failed event, where the engine died before writing them. Nothing already written is removed."""
        if not job.run_dir:
            return
        folder = RunFolder(Path(job.run_dir))
        try:
            report = folder.read_report() or {}
            if report.get("status") not in ("failed", "cancelled", "stopped"):
                report.setdefault("kind", job.kind)
                report["status"], report["error"] = "failed", job.message
                folder.write_report(report)
            events = folder.read_events()
            if not events or events[-1].get("kind") not in ("failed", "finished"):
                log = folder.open_log()
                try:
                    log.append(RunFailed(str(folder.path), job.message))
                finally:
                    log.close()
        except (OSError, ValueError):
            pass

    def _fail(self, job: Job, message: str) -> None:
        with self._lock:
            job.status, job.message, job.ended = FAILED, message, time.time()
            job.version += 1

    def _record(self, job: Job, event: Event) -> None:
        data = event.to_dict()
        kind = data.get("kind")
        with self._lock:
            job.events.append(data)
            job.version += 1
            if kind == "stage":
                job.stage, job.stage_message, job.done, job.total = data["stage"], data.get("message", ""), 0, 0
            elif kind == "progress":
                job.stage = data.get("stage") or job.stage
                job.done, job.total = data["done"], data["total"]
                job.stage_message = data.get("message") or job.stage_message
            elif kind == "train_step":
                job.stage, job.done, job.total = "train", data["step"], data["total_steps"]
            elif kind == "finished":
                job.ended, job.report = time.time(), data.get("report")
                job.run_dir = data.get("run_dir") or job.run_dir
                stopped = (job.report or {}).get("status") == "stopped"  # a fine-tuning run stopped between steps
                job.status = CANCELLED if stopped else FINISHED
                job.message = "stopped by the user; the arms' adapters so far are saved" if stopped else "finished"
            elif kind == "failed":
                job.status = CANCELLED if data.get("cancelled") else FAILED
                job.ended, job.message = time.time(), data.get("message", "")
                job.run_dir = data.get("run_dir") or job.run_dir
