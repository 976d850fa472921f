"""Downstream accuracy in the fine-tuning flow (flows/train.py): each arm scored at every evaluation, one
eval_accuracy event per arm, step and task with its Wilson interval; report.json holds step 0 / final / best, the
accuracy gap closed toward qlora8 and McNemar's test against qlora4; with --from-init the init run's accuracy
settings are inherited and its step-0 answers reused (equal to measuring them); off, nothing changes."""
from __future__ import annotations

import json

import pytest

from quailora_app import cli
from quailora_app.config import AccuracyConfig, DataConfig, InitConfig, LoraSettings, ModelConfig, TrainConfig
from quailora_app.engine.evaluation.accuracy import accuracy_gap_closed
from quailora_app.engine.evaluation.statistics import paired_test, wilson_interval
from quailora_app.flows.from_init import train_config_from_init
from quailora_app.flows.init import run_init
from quailora_app.flows.train import run_train
from quailora_app.plots import figures as F

TASKS = ("labels", "continuation")
TRAIN_KW = dict(steps=2, batch_size=2, eval_every=2, learning_rate=1e-2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread



def accuracy(labelled, tasks=TASKS) -> AccuracyConfig:
    return AccuracyConfig(accuracy_tasks=tasks, label_dataset=str(labelled), shots=2, label_prompts=2, label_items=40,
                          continuation_items=30, continuation_choices=3)


def parts(model_dir, text_file):
    return (ModelConfig(str(model_dir), "cpu"), DataConfig(str(text_file), seq_len=32, calib_samples=8,
                                                           eval_tokens=256))


def finished(events):
    assert events[-1].kind == "finished", events[-1]
    return events[-1].report


def points(events) -> dict[tuple[str, int, str], object]:
    return {(e.arm, e.step, e.task): e for e in events if e.kind == "eval_accuracy"}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_file, labelled, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train-acc")
    cfg = TrainConfig(*parts(tiny_model_dir, text_file), lora=LoraSettings(rank=4, alpha=8.0),
                      arms=("qlora4", "qlora8"), accuracy=accuracy(labelled), **TRAIN_KW)
    events = list(run_train(cfg, run_dir=run_dir))
    return run_dir, events, finished(events)


def test_each_arm_is_scored_at_each_evaluation(trained):
    run_dir, events, report = trained
    found = points(events)
    assert set(found) == {(a, s, t) for a in ("qlora4", "qlora8") for s in (0, 2) for t in TASKS}
    written = json.loads((run_dir / "report.json").read_text())
    assert set(written["accuracy"]) == set(TASKS) and not written["accuracy_unavailable"]
    logged = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "eval_accuracy" for e in logged) == len(found)
    for kind in TASKS:
        n = written["accuracy"][kind]["n"]
        assert n == (40 if kind == "labels" else 30)
        for arm in ("qlora4", "qlora8"):
            entry = written["arms"][arm]["accuracy"][kind]
            for which, step in (("step0", 0), ("final", 2)):
                rec = entry[which]
                hits = rec["correct"].count("1")
                assert rec["step"] == step and rec["n"] == n and rec["hits"] == hits and rec["accuracy"] == hits / n
                assert rec["interval"] == pytest.approx(list(wilson_interval(hits, n)))
                assert rec["half_width"] == pytest.approx((rec["interval"][1] - rec["interval"][0]) / 2)
                e = found[(arm, step, kind)]
                assert e.accuracy == rec["accuracy"] and e.n == n and list(e.interval) == pytest.approx(rec["interval"])
            best = entry["best"]
            assert best["accuracy"] == max(entry["step0"]["accuracy"], entry["final"]["accuracy"])
            assert [p[0] for p in entry["evals"]] == [0, 2]
        final = {arm: written["arms"][arm]["accuracy"][kind]["final"] for arm in ("qlora4", "qlora8")}
        expected = accuracy_gap_closed(final["qlora8"]["accuracy"], final["qlora4"]["accuracy"],
                                       final["qlora8"]["accuracy"])
        assert written["accuracy_gap_closed"][kind]["qlora8"] == expected
        assert written["arms"]["qlora8"]["accuracy"][kind]["gap_closed"] == expected
        assert written["accuracy_gap_closed"][kind]["qlora4"] is None or written["accuracy_gap_closed"][kind][
            "qlora4"] == 0.0
        test = paired_test([c == "1" for c in final["qlora8"]["correct"]],
                           [c == "1" for c in final["qlora4"]["correct"]])
        vs = written["arms"]["qlora8"]["accuracy"][kind]["vs_qlora4"]
        assert vs["p_value"] == test.p_value and vs["significant"] == (test.p_value < 0.05)
        assert "vs_qlora4" not in written["arms"]["qlora4"]["accuracy"][kind]
    assert written["gap_closed"]["qlora8"] is not None  # the perplexity figures are still there


def test_cli_table_and_curves_show_accuracy(trained):
    run_dir, events, report = trained
    table = cli.train_table(json.loads((run_dir / "report.json").read_text()))
    assert "labels acc@0" in table and "continuation final" in table and "acc gap" in table and "+-" in table
    assert "qlora8 vs qlora4" in table
    dicts = [e.to_dict() for e in events]
    fig = F.train_accuracy_figure(dicts, ["qlora4", "qlora8"])
    traces = [t for t in fig.data if t.type == "scatter"]
    assert len(traces) == 2 * len(TASKS)
    q8 = next(t for t in traces if t.name == F.label("qlora8") and t.xaxis in ("x", None))
    e = points(events)[("qlora8", 2, "labels")]
    assert list(q8.x) == [0, 2] and q8.y[1] == pytest.approx(100 * e.accuracy)
    assert q8.error_y.array[1] == pytest.approx(100 * (e.interval[1] - e.accuracy))
    # the perplexity curves are unchanged by the accuracy events
    plain = [d for d in dicts if d["kind"] != "eval_accuracy"]
    arms = ["qlora4", "qlora8"]
    assert F.train_figure(dicts, arms).to_dict() == F.train_figure(plain, arms).to_dict()


@pytest.fixture(scope="module")
def init_run(tiny_model_dir, text_file, labelled, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("init-acc")
    cfg = InitConfig(*parts(tiny_model_dir, text_file), lora=LoraSettings(rank=4, alpha=8.0), methods=("quailora",),
                     accuracy=accuracy(labelled))
    events = list(run_init(cfg, run_dir=run_dir))
    return run_dir, cfg, finished(events)


def test_from_init_inherits_the_tasks_and_reuses_step0(init_run, tmp_path):
    run_dir, init_cfg, init_report = init_run
    arms = ("qlora4", "quailora4", "qlora8")
    cfg = train_config_from_init(run_dir, arms=arms, device="cpu", **TRAIN_KW)
    assert cfg.accuracy == init_cfg.accuracy  # inherited, not given
    events = list(run_train(cfg, run_dir=tmp_path / "reused"))
    report = finished(events)
    start = {k: e for k, e in points(events).items() if k[1] == 0}
    assert set(start) == {(a, 0, t) for a in arms for t in TASKS}
    assert all(e.note.startswith("from init run") for e in start.values())  # no step-0 scoring
    measured_cfg = train_config_from_init(run_dir, arms=arms, device="cpu", measure_step0=True, **TRAIN_KW)
    measured = finished(list(run_train(measured_cfg, run_dir=tmp_path / "measured")))
    for kind in TASKS:
        entry = report["accuracy"][kind]
        assert entry["from_init_items"] is True
        for arm, variant in (("qlora4", "qlora"), ("quailora4", "quailora"), ("qlora8", "int8")):
            reused = report["arms"][arm]["accuracy"][kind]["step0"]
            assert reused["correct"] == measured["arms"][arm]["accuracy"][kind]["step0"]["correct"], (arm, kind)
            if entry["left_out_as_trained"] == 0:  # the init run's items, all of them: its figures exactly
                init = init_report["accuracy"][kind]["models"][variant]
                assert reused["correct"] == init["correct"] and reused["accuracy"] == init["accuracy"]
            else:
                assert reused["n"] == init_report["accuracy"][kind]["n"] - entry["left_out_as_trained"]
    # accuracy given as none on top of the init run's: off
    off = train_config_from_init(run_dir, arms=("qlora4",), device="cpu", accuracy_tasks=(), **TRAIN_KW)
    assert off.accuracy.accuracy_tasks == ()


def test_accuracy_off_leaves_the_run_as_before(tiny_model_dir, text_file, tmp_path):
    assert TrainConfig().accuracy.accuracy_tasks == ()
    parser = cli.build_parser()
    assert cli.train_config(parser.parse_args(["train"])).accuracy.accuracy_tasks == ()  # off on the command line
    opted = cli.train_config(parser.parse_args(["train", "--accuracy-tasks", "labels", "continuation"]))
    assert opted.accuracy.accuracy_tasks == TASKS
    cfg = TrainConfig(*parts(tiny_model_dir, text_file), lora=LoraSettings(rank=4, alpha=8.0), arms=("qlora4",),
                      **TRAIN_KW)
    events = list(run_train(cfg, run_dir=tmp_path))
    report = finished(events)
    assert not [e for e in events if e.kind == "eval_accuracy"]
    assert "accuracy" not in report and "accuracy_gap_closed" not in report
    assert "accuracy" not in report["arms"]["qlora4"]
    assert "acc@0" not in cli.train_table(report)
    assert not [t for t in F.train_accuracy_figure([e.to_dict() for e in events]).data]
