"""The page's one poller factory (`Studio.poller`), called directly (no server): a poll sends only what changed,
and a job of another session is refused with one line."""
from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")
from quailora_app.app.handlers import Studio, count_init, count_train  # noqa: E402
from quailora_app.app.jobs import FINISHED, RUNNING, Job  # noqa: E402


class Manager:
    """The part of JobManager the handlers read: jobs by id for their owner, and the queue line."""

    def __init__(self, *jobs: Job) -> None:
        self.jobs = {job.id: job for job in jobs}

    def owned(self, job_id, owner):
        job = self.jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def queue_length(self):
        return 1, 0


def skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


@pytest.fixture(autouse=True)
def every_event_seen_at_once(monkeypatch):
    """These tests follow each new event; the redraw throttle of running jobs has its own test below."""
    from quailora_app.app import handlers, presenters

    live = presenters.LiveCounts(seconds=0.0)
    monkeypatch.setattr(presenters, "LIVE", live)
    monkeypatch.setattr(handlers, "LIVE", live)


def init_job(**kw) -> Job:
    return Job(id="j1", kind="init", owner="alice", config=None, status=RUNNING, started=0.0, stage="calibrate", **kw)


def test_init_poll_draws_once_then_only_what_moved():
    job = init_job(events=[{"kind": "layer", "module": "model.layers.0.mlp.down_proj", "block": 0,
                            "calibrated_error": {"qlora": 1.0, "svd": 0.5}, "weight_error": {"qlora": 1.0}}])
    studio = Studio(Manager(job), (1, 2))
    poll = studio.poller(count_init, studio.draw_init, 8)
    alice = {"owner": "alice"}
    first = poll(alice, "j1", {}, "")
    assert len(first) == 11 and "calibrate" in first[0] and not any(skipped(v) for v in first[2:5])
    seen = first[-1]
    assert seen["layers"] == 1 and seen["metrics"] == 0
    job.version += 1  # a new log line: progress and status only
    second = poll(alice, "j1", seen, "")
    assert all(skipped(v) for v in second[2:10]) and not skipped(second[1])
    assert all(skipped(v) for v in poll(alice, "j1", second[-1], "")[:-1])  # nothing moved: nothing sent
    job.events.append({"kind": "metric", "name": "qlora", "value": 20.0, "group": "perplexity"})
    job.version += 1
    third = poll(alice, "j1", second[-1], "")
    assert skipped(third[2]) and skipped(third[3]) and not skipped(third[4])  # the perplexity figure
    assert not skipped(third[8]) and third[8]["visible"] is False  # and the accuracy panel, hidden: none scored
    job.events.append({"kind": "metric", "name": "qlora", "value": 0.6, "group": "accuracy", "task": "labels",
                       "n": 100, "interval": [0.5, 0.69]})
    job.version += 1
    fourth = poll(alice, "j1", third[-1], "")
    assert fourth[8]["visible"] is True and fourth[8]["value"] is not None  # the first score shows the panel
    job.status, job.ended, job.version = FINISHED, 1.0, job.version + 1
    assert not skipped(poll(alice, "j1", fourth[-1], "")[9])  # a new status redraws the results summary


def test_poll_of_another_sessions_job_is_refused_once():
    studio = Studio(Manager(init_job()), (1, 2))
    poll = studio.poller(count_init, studio.draw_init, 8)
    out = poll({"owner": "bob"}, "j1", {}, "")
    assert "No job" in out[1] and out[-1] == {"job": "j1"}
    assert all(skipped(v) for v in poll({"owner": "bob"}, "j1", out[-1], "")[:-1])


def test_views_poll_without_a_job_sends_nothing():
    studio = Studio(Manager(), (1, 2))
    poll = studio.poller(lambda job: {}, studio.draw_views, 9, idle=False)
    out = poll({"owner": "alice"}, "", {})
    assert len(out) == 12 and all(skipped(v) for v in out[:-1]) and out[-1] == {}


def test_train_poll_redraws_the_curves_when_points_arrive():
    job = Job(id="t1", kind="train", owner="alice", config=None, status=RUNNING, started=0.0, stage="train")
    studio = Studio(Manager(job), (1, 2))
    poll = studio.poller(count_train, studio.draw_train, 4)
    first = poll({"owner": "alice"}, "t1", {}, "")
    job.events.append({"kind": "train_step", "arm": "qlora4", "step": 1, "total_steps": 4, "train_loss": 2.0})
    job.version += 1
    second = poll({"owner": "alice"}, "t1", first[-1], "")
    assert not skipped(second[2]) and skipped(second[5])  # the curves, not the summary
    assert second[4]["visible"] is False  # no accuracy scored: its panel stays hidden
    job.events.append({"kind": "eval_accuracy", "arm": "qlora4", "step": 0, "task": "labels", "accuracy": 0.6,
                       "n": 50, "interval": [0.46, 0.72]})
    job.version += 1
    third = poll({"owner": "alice"}, "t1", second[-1], "")
    assert third[4]["visible"] is True  # the first accuracy point shows the panel


def test_progress_says_the_time_left_in_the_stage_from_its_measured_rate():
    """Init: 3 of 30 blocks in 30 s since the stage began -> about 4 min left; fine-tuning: 4 of 2 x 10 steps in
    40 s -> about 160 s = 3 min; nothing before the first unit or once the job is done."""
    from types import SimpleNamespace

    from quailora_app.app.presenters import _stage_progress, _train_progress, time_left

    job = init_job(events=[{"kind": "stage", "stage": "calibrate", "time": 1000.0}], done=3, total=30)
    assert time_left(job, 3, 30, now=1030.0) == " · about 4 min left in this stage"
    assert time_left(job, 0, 30, now=1030.0) == "" and time_left(job, 30, 30, now=1030.0) == ""
    assert "left in this stage" in _stage_progress(job)[1]
    job.status = FINISHED
    assert time_left(job, 3, 30, now=1030.0) == ""
    steps = [{"kind": "train_step", "arm": arm, "step": s, "total_steps": 10, "train_loss": 2.0}
             for s in (1, 2) for arm in ("qlora4", "quailora4")]
    train = Job(id="t1", kind="train", owner="alice", config=SimpleNamespace(arms=("qlora4", "quailora4"), steps=10),
                status=RUNNING, started=0.0, stage="train",
                events=[{"kind": "stage", "stage": "train", "time": 2000.0}, *steps])
    assert time_left(train, 4, 20, now=2040.0) == " · about 3 min left in this stage"
    assert "left in this stage" in _train_progress(train)[1]


def test_status_calls_build_each_figure_once_per_new_event(monkeypatch):
    """/init_status and /train_status (what an API client polls) hand back the figures already built while nothing
    new arrived: each is built once per new event, however often it is asked for."""
    from quailora_app.app import presenters
    from quailora_app.plots import figures as F

    monkeypatch.setattr(presenters, "DRAWN", presenters.DrawnFigures())
    built = {"layers": 0, "curves": 0}
    layer_figure, train_figure = F.layer_error_figure, F.train_figure
    monkeypatch.setattr(F, "layer_error_figure", lambda *a: built.__setitem__("layers", built["layers"] + 1)
                        or layer_figure(*a))
    monkeypatch.setattr(F, "train_figure", lambda *a: built.__setitem__("curves", built["curves"] + 1)
                        or train_figure(*a))
    job = init_job(events=[{"kind": "layer", "module": "model.layers.0.mlp.down_proj", "block": 0,
                            "calibrated_error": {"qlora": 1.0, "svd": 0.5}, "weight_error": {"qlora": 1.0}}])
    train = Job(id="t1", kind="train", owner="alice", config=None, status=RUNNING, started=0.0, stage="train")
    studio = Studio(Manager(job, train), (1, 2))
    alice = {"owner": "alice"}
    first = studio.init_status(alice, "j1")
    for _ in range(5):
        job.version += 1  # log lines, progress: nothing the figures read
        again = studio.init_status(alice, "j1")
        assert again[2] is first[2]  # the same figure object, not rebuilt
    assert built["layers"] == 1
    job.events.append({"kind": "layer", "module": "model.layers.0.mlp.up_proj", "block": 0,
                       "calibrated_error": {"qlora": 1.0, "svd": 0.4}, "weight_error": {"qlora": 1.0}})
    assert studio.init_status(alice, "j1")[2] is not first[2] and built["layers"] == 2
    job.status = FINISHED  # a new status is drawn afresh (from the report when there is one)
    studio.init_status(alice, "j1")
    assert built["layers"] == 3
    for _ in range(3):
        studio.train_status(alice, "t1")
    train.events.append({"kind": "eval", "arm": "qlora4", "step": 0, "val_perplexity": 20.0})
    studio.train_status(alice, "t1")
    assert built["curves"] == 2
    other = Job(id="", kind="init", owner="", config=None, status=FINISHED, run_dir="/elsewhere", events=job.events)
    assert presenters.init_views(other, None)["layers"] is not presenters.init_views(job, None)["layers"]


def test_a_running_job_is_redrawn_at_most_once_every_few_seconds_and_in_full_when_it_ends(monkeypatch):
    """While a job runs, the counts its figures are keyed by move at most once every LIVE.seconds (a new layer a
    second would otherwise rebuild the 0.1-0.4 s layer figure on every poll); the job that ended shows everything."""
    from quailora_app.app import handlers, presenters
    from quailora_app.app.presenters import LiveCounts

    live = LiveCounts(seconds=5.0)
    job = init_job(events=[])
    assert live.of(job, {"layers": 1}, now=100.0) == {"layers": 1}
    assert live.of(job, {"layers": 7}, now=104.9) == {"layers": 1}  # held
    assert live.of(job, {"layers": 7, "metrics": 1}, now=104.9) == {"layers": 7, "metrics": 1}  # other names: own slot
    assert live.of(job, {"layers": 9}, now=105.0) == {"layers": 9}
    job.status = FINISHED
    assert live.of(job, {"layers": 12}, now=105.1) == {"layers": 12}  # ended: never held

    monkeypatch.setattr(presenters, "DRAWN", presenters.DrawnFigures())
    monkeypatch.setattr(presenters, "LIVE", LiveCounts(seconds=3600.0))
    monkeypatch.setattr(handlers, "LIVE", presenters.LIVE)
    layer = {"kind": "layer", "module": "model.layers.0.mlp.down_proj", "block": 0,
             "calibrated_error": {"qlora": 1.0, "svd": 0.5}, "weight_error": {"qlora": 1.0}}
    job = init_job(events=[layer])
    studio = Studio(Manager(job), (1, 2))
    first = studio.init_status({"owner": "alice"}, "j1")[2]
    assert handlers.count_init(job) == {"layers": 1, "metrics": 0}
    job.events.append({**layer, "module": "model.layers.0.mlp.up_proj"})
    assert studio.init_status({"owner": "alice"}, "j1")[2] is first  # within the hour: the figure drawn before
    assert handlers.count_init(job) == {"layers": 1, "metrics": 0}  # and the page's poller sees nothing new
    job.status = FINISHED
    assert studio.init_status({"owner": "alice"}, "j1")[2] is not first
    assert handlers.count_init(job) == {"layers": 2, "metrics": 0}


def test_a_job_with_neither_id_nor_run_folder_is_never_served_another_ones_figure():
    from quailora_app.app.presenters import DrawnFigures

    drawn, calls = DrawnFigures(), []
    for _ in range(2):
        drawn.get(("", None, "finished", "layers", 1), lambda: calls.append(1))
    drawn.get(("", "/runs/a", "finished", "layers", 1), lambda: calls.append(2))
    drawn.get(("", "/runs/a", "finished", "layers", 1), lambda: calls.append(3))
    assert calls == [1, 1, 2]


def test_across_bits_progress_goes_stage_by_stage_and_its_poller_passes_the_scale():
    """An across-bits job's bar: quantize k of n bases, the shared calibration block by block, then the points
    measured of bases x (1 + methods), always moving forward; its poller hands the scatter's scale to the drawing and
    redraws the scatter only once the run has finished."""
    from types import SimpleNamespace

    from quailora_app.app.across_bits import bits_progress
    from quailora_app.app.handlers import count_bits

    cfg = SimpleNamespace(bases=("hqq2", "hqq3"), methods=("closed_form",))
    job = Job(id="b1", kind="bits", owner="alice", config=cfg, status=RUNNING, started=1000.0)
    seen = []

    def step(event: dict, **state) -> None:
        job.events.append({"time": 1000.0 + len(job.events), **event})
        for name, value in state.items():
            setattr(job, name, value)
        seen.append(bits_progress(job))

    step({"kind": "stage", "stage": "load"}, stage="load")
    step({"kind": "stage", "stage": "quantize", "message": "quantizing to HQQ 2-bit"}, stage="quantize",
         stage_message="quantizing to HQQ 2-bit")
    step({"kind": "stage", "stage": "quantize", "message": "quantizing to HQQ 3-bit"},
         stage_message="quantizing to HQQ 3-bit")
    assert seen[-1][2] == "quantizing to HQQ 3-bit (2 of 2)"
    step({"kind": "stage", "stage": "calibrate"}, stage="calibrate", done=0, total=30)
    step({"kind": "progress", "stage": "calibrate", "done": 15, "total": 30}, done=15)
    assert seen[-1][2].startswith("calibrate once for 2 bases, correct each: block 15 of 30")
    step({"kind": "stage", "stage": "evaluate", "message": "HQQ 2-bit"}, stage="evaluate", stage_message="HQQ 2-bit")
    for name in ("hqq2/qlora", "hqq2/closed_form", "hqq3/qlora"):
        step({"kind": "metric", "name": name, "value": 10.0, "group": "perplexity"})
    assert seen[-1][2].startswith("HQQ 2-bit: 3 of 4 points")
    step({"kind": "stage", "stage": "baseline"}, stage="baseline")
    fractions = [frac for _, frac, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0 and 0.9 < fractions[-1] < 1
    assert [idx for idx, _, _ in seen] == sorted(idx for idx, _, _ in seen) and seen[-1][0] == 4

    drawn = []
    studio = Studio(Manager(job), (1, 2))
    studio.draw_bits = lambda j, scale, fresh, changed: drawn.append((scale, fresh)) or ("f", "r", "t", "s")
    poll = studio.poller(count_bits, lambda *a: studio.draw_bits(*a), 4, other_is_job=False)
    out = poll({"owner": "alice"}, "b1", {}, "log ratios")
    assert out[2:6] == ("f", "r", "t", "s") and drawn == [("log ratios", True)]
    assert "Across bits: running" in out[1]


def test_the_queue_loops_sleep_while_idle_instead_of_waking_a_thousand_times_a_second():
    """gradio's Linux default wakes its event loop every millisecond while the queue is idle, taking the GIL from
    the run's two compute threads each time; the page's queue sleeps 50 ms (and its progress loop 100 ms)."""
    from quailora_app.app.ui import PROGRESS_IDLE_SLEEP_S, QUEUE_IDLE_SLEEP_S, unhurried_queue

    with gr.Blocks() as demo:
        gr.Button("press").click(lambda: None)
    demo.queue()
    assert demo._queue.sleep_when_free < QUEUE_IDLE_SLEEP_S  # gradio's own: what the page changes
    unhurried_queue(demo)
    assert demo._queue.sleep_when_free == QUEUE_IDLE_SLEEP_S == 0.05
    assert demo._queue.progress_update_sleep_when_free == PROGRESS_IDLE_SLEEP_S == 0.1
