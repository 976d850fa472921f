"""The job queue: one job at a time in FIFO order, visible positions, stops only from the owner, failures
reported in one line, events recorded as they arrive. Fake runners, no models."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from quailora_app.app import jobs
from quailora_app.errors import UserError
from quailora_app.events import Metric, Progress, RunFailed, RunFinished, Stage


@pytest.fixture(autouse=True)
def runs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QUAILORA_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("QUAILORA_NO_SPACES", "1")


def slow_runner(gate: threading.Event | None = None, steps: int | None = 3, started: threading.Event | None = None):
    """A fake engine: sets `started` when it runs, waits on `gate` if given, then emits progress step by step
    until should_stop() or `steps` steps (None: until stopped, at most 30 s)."""

    def run(cfg, should_stop, run_dir):
        if started is not None:
            started.set()
        if gate is not None:
            gate.wait(10)
        yield Stage("calibrate", "fake")
        total = steps or 3000
        for i in range(total):
            if should_stop():
                yield RunFailed(str(run_dir), "stopped by the user", cancelled=True)
                return
            yield Progress("calibrate", i + 1, total)
            if steps is None:
                time.sleep(0.01)  # a step's work: the stop request lands between steps
        yield Metric("qlora", 10.0)
        yield RunFinished(str(run_dir), {"status": "finished", "cfg": cfg})

    return run


def test_runs_one_at_a_time_in_order_with_positions():
    gate, started = threading.Event(), threading.Event()
    order = []

    def run(cfg, should_stop, run_dir):
        order.append(cfg)
        yield from slow_runner(gate if cfg == "a" else None, started=started)(cfg, should_stop, run_dir)

    m = jobs.JobManager({"init": run})
    a, b, c = (m.submit("init", name, owner) for name, owner in (("a", "u1"), ("b", "u2"), ("c", "u3")))
    assert started.wait(10)
    assert m.snapshot(a.id).status == jobs.RUNNING
    assert m.snapshot(b.id).position == 1 and m.snapshot(c.id).position == 2
    assert m.queue_length() == (1, 2)
    gate.set()
    assert m.wait(c.id, 10).status == jobs.FINISHED
    assert order == ["a", "b", "c"]
    done = m.snapshot(a.id)
    assert done.report["cfg"] == "a" and done.run_dir and done.position is None
    kinds = [e["kind"] for e in done.events]
    assert kinds[0] == "stage" and kinds[-1] == "finished" and "progress" in kinds


def test_stop_only_by_owner_and_only_that_job():
    started = threading.Event()
    m = jobs.JobManager({"init": slow_runner(steps=None, started=started)})
    a = m.submit("init", "a", "alice")
    b = m.submit("init", "b", "bob")
    assert started.wait(10)
    assert "another session" in m.stop(a.id, "bob")
    assert m.snapshot(a.id).status == jobs.RUNNING
    assert m.stop(b.id, "bob") == "removed from the queue"  # bob's queued job leaves the queue
    assert m.snapshot(b.id).status == jobs.CANCELLED
    assert m.stop(a.id, "alice").startswith("stopping")
    done = m.wait(a.id, 10)
    assert done.status == jobs.CANCELLED and "stopped" in done.message
    assert m.stop("nope", "alice") == "no such job"


def test_stop_file_reaches_the_runner(tmp_path):
    """What a ZeroGPU child process sees: only the STOP file in the run folder."""
    started = threading.Event()
    m = jobs.JobManager({"init": slow_runner(steps=None, started=started)})
    a = m.submit("init", "a", "alice")
    assert started.wait(10)  # the run folder exists before the runner starts
    from pathlib import Path

    (Path(m.snapshot(a.id).run_dir) / jobs.STOP_FILE).touch()
    assert m.wait(a.id, 10).status == jobs.CANCELLED


def test_one_active_job_per_owner_and_latest():
    gate = threading.Event()
    m = jobs.JobManager({"init": slow_runner(gate), "train": slow_runner()})
    a = m.submit("init", "a", "alice")
    with pytest.raises(UserError, match="already have"):
        m.submit("train", "t", "alice")
    gate.set()
    m.wait(a.id, 10)
    t = m.submit("train", "t", "alice")
    assert m.latest("alice", "init").id == a.id and m.latest("alice").id == t.id and m.latest("bob") is None
    m.wait(t.id, 10)


def test_failures_are_one_line():
    def user_error(cfg, should_stop, run_dir):
        raise UserError("model 'x' does not exist")
        yield  # pragma: no cover

    def crash(cfg, should_stop, run_dir):
        yield Stage("load")
        raise RuntimeError("boom")

    def silent(cfg, should_stop, run_dir):
        yield Stage("load")

    m = jobs.JobManager({"a": user_error, "b": crash, "c": silent})
    ja, jb, jc = m.submit("a", 1, "o1"), m.submit("b", 1, "o2"), m.submit("c", 1, "o3")
    assert m.wait(ja.id).message == "model 'x' does not exist"
    b = m.wait(jb.id)
    assert b.status == jobs.FAILED and "RuntimeError: boom" in b.message
    from pathlib import Path

    assert "Traceback" in (Path(b.run_dir) / "error.txt").read_text()
    assert m.wait(jc.id).status == jobs.FAILED
    with pytest.raises(UserError):
        m.submit("nope", 1, "o4")


def test_stopped_training_that_finishes_is_cancelled():
    def run(cfg, should_stop, run_dir):
        yield RunFinished(str(run_dir), {"status": "stopped"})

    m = jobs.JobManager({"train": run})
    assert m.wait(m.submit("train", 1, "o").id).status == jobs.CANCELLED


def test_gpu_duration_estimate_and_no_spaces_passthrough():
    data = SimpleNamespace(calib_samples=16, seq_len=256, eval_tokens=4096)
    init = SimpleNamespace(data=data, methods=("qlora", "svd", "quailora"), baselines=True)
    big = SimpleNamespace(data=SimpleNamespace(calib_samples=512, seq_len=2048, eval_tokens=1 << 20),
                          methods=init.methods, baselines=True)
    assert 60 <= jobs.estimate_seconds("init", init) < jobs.estimate_seconds("init", big) <= 900
    train = SimpleNamespace(data=data, steps=100, batch_size=4, grad_accum=1, eval_every=10, arms=("a", "b"))
    assert 60 <= jobs.estimate_seconds("train", train) <= 900
    bits = SimpleNamespace(data=SimpleNamespace(calib_samples=32, seq_len=256, eval_tokens=4096),
                           bases=("hqq2", "hqq3", "hqq4"), methods=("closed_form",))
    more = SimpleNamespace(data=bits.data, bases=("hqq2", "hqq3", "hqq4", "hqq8", "nf4", "int8"),
                           methods=("svd", "closed_form"))
    assert 60 <= jobs.estimate_seconds("bits", bits) < jobs.estimate_seconds("bits", more) <= 900
    assert jobs.DEFAULT_RUNNERS["bits"].__name__ == "run_bits"  # the across-bits flow is a job kind of its own
    generate = SimpleNamespace(new_tokens=32, documents=4, deploy=False, deploy_tokens=4096)
    deploy = SimpleNamespace(new_tokens=32, documents=4, deploy=True, deploy_tokens=4096)
    assert 60 <= jobs.estimate_seconds("generate", generate) < jobs.estimate_seconds("generate", deploy) <= 900
    assert jobs.DEFAULT_RUNNERS["generate"].__name__ == "run_generate"
    runner = slow_runner()
    assert jobs.on_gpu(runner, "init") is runner  # QUAILORA_NO_SPACES / no spaces package: unchanged


def test_zerogpu_wrapping_with_a_fake_spaces_module(monkeypatch):
    """With `spaces` importable, the engine's runners run inside spaces.GPU(duration=f(settings)), and a stop
    reaches them through the STOP file only (ZeroGPU runs them in another process)."""
    import importlib
    import importlib.machinery
    import sys
    import types

    calls = []
    fake = types.ModuleType("spaces")
    fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)

    def GPU(duration):
        def decorate(fn):
            def run(*args):
                calls.append(duration(*args))
                return fn(*args)
            return run
        return decorate

    fake.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.delenv("QUAILORA_NO_SPACES")
    try:
        gpu_jobs = importlib.reload(jobs)
        seen_stop, started = [], threading.Event()

        def fake_init(cfg, should_stop, run_dir):
            seen_stop.append(should_stop)
            yield from slow_runner(steps=None, started=started)(cfg, should_stop, run_dir)

        monkeypatch.setitem(gpu_jobs.DEFAULT_RUNNERS, "init", fake_init)
        m = gpu_jobs.JobManager()
        cfg = SimpleNamespace(data=SimpleNamespace(calib_samples=16, seq_len=256, eval_tokens=4096),
                              methods=("qlora",), baselines=False)
        job = m.submit("init", cfg, "alice")
        assert started.wait(10)
        assert calls == [gpu_jobs.estimate_seconds("init", cfg)]
        assert getattr(seen_stop[0], "__self__", None) is not None  # Path(run_dir / STOP).exists, not the Event
        m.stop(job.id, "alice")
        assert m.wait(job.id, 10).status == gpu_jobs.CANCELLED
    finally:
        monkeypatch.undo()
        importlib.reload(jobs)


def test_a_dying_runner_leaves_a_failed_run_folder_and_the_worker_goes_on():
    """Whatever a step raises, even a BaseException the engine does not catch: the job fails in one line, the
    run folder says so (report.json status + error, a last failed event) and keeps what was written (events,
    an adapter), and the worker runs the next job."""
    import json
    from pathlib import Path

    from quailora_app.runs import RunFolder

    def dies(cfg, should_stop, run_dir):
        RunFolder(run_dir).write_report({"status": "running", "perplexity": {"qlora": 9.0}})
        (Path(run_dir) / "adapters" / "qlora").mkdir(parents=True)
        (Path(run_dir) / "adapters" / "qlora" / "adapter_config.json").write_text("{}")
        with open(Path(run_dir) / "events.jsonl", "a") as f:
            f.write(json.dumps({"kind": "metric", "name": "qlora", "value": 9.0}) + "\n")
        yield Metric("qlora", 9.0)
        raise cfg("injected\nfailure")

    m = jobs.JobManager({"init": dies, "train": slow_runner()})
    for exc in (SystemExit, MemoryError, KeyError):
        job = m.wait(m.submit("init", exc, "alice").id, 10)
        assert job.status == jobs.FAILED and "\n" not in job.message
        assert ("out of memory" if exc is MemoryError else exc.__name__) in job.message, job.message
        run_dir = Path(job.run_dir)
        report = RunFolder(run_dir).read_report()
        assert report["status"] == "failed" and report["error"] == job.message
        assert report["perplexity"] == {"qlora": 9.0} and report["kind"] == "init"
        events = RunFolder(run_dir).read_events()
        assert [e["kind"] for e in events] == ["metric", "failed"] and events[-1]["message"] == job.message
        assert (run_dir / "adapters" / "qlora" / "adapter_config.json").is_file()
        assert "Traceback" in (run_dir / "error.txt").read_text()
        assert (run_dir / ".owner").read_text().strip() != "alice"  # a hash of the owner key, not the key
    assert m.wait(m.submit("train", "t", "alice").id, 10).status == jobs.FINISHED
    assert m.owned(job.id, "alice").id == job.id and m.owned(job.id, "bob") is None and m.owned(job.id, "") is None


def test_old_finished_jobs_leave_their_events_and_report_to_the_run_folder():
    """Only the newest `keep_full` finished jobs hold their events and report in memory; an older one is read back
    from its run folder (which the engine's runners write as they go), so its snapshots show the same as before.
    A job whose runner wrote nothing to its folder stays in memory."""
    from quailora_app.runs import RunFolder

    def writes(cfg, should_stop, run_dir):
        folder, report = RunFolder(run_dir), {"status": "finished", "cfg": cfg}
        log = folder.open_log()
        try:
            for event in (Stage("calibrate", "fake"), Progress("calibrate", 1, 1), Metric("qlora", 10.0)):
                log.append(event)
                yield event
            folder.write_report(report)
            log.append(done := RunFinished(str(run_dir), report))
            yield done
        finally:
            log.close()

    m = jobs.JobManager({"init": writes, "train": slow_runner()}, keep_full=2)
    silent = m.wait(m.submit("train", "t", "o9").id, 10)
    ids = [m.wait(m.submit("init", i, f"o{i}").id, 10).id for i in range(4)]
    kinds = ["stage", "progress", "metric", "finished"]
    assert [m.get(i).archived for i in ids] == [True, True, False, False]
    assert m.get(ids[0]).events == [] and m.get(ids[0]).report is None  # nothing of it left in memory
    assert not m.get(silent.id).archived and m.get(silent.id).events  # its folder holds no events
    for n, job_id in enumerate(ids):
        job = m.snapshot(job_id)
        assert job.status == jobs.FINISHED and [e["kind"] for e in job.events] == kinds
        assert job.report == {"status": "finished", "cfg": n} and job.events[-1]["report"] == job.report
    assert [e["kind"] for e in m.snapshot(ids[0], since=2).events] == kinds[2:]
    assert m.latest("o0").id == ids[0] and m.owned(ids[1], "o1").report["cfg"] == 1
