"""The run folder (report.json with its kind, events.jsonl, atomic writes), the recorder every flow shares (an
early end is one failed event with one line), and the views flow's typed event stream."""
import json

import pytest
import torch

from quailora_app.errors import Cancelled, ConfigError, DataError
from quailora_app.events import LayerChoices, Log, RunFailed, RunFinished, Stage
from quailora_app.flows.recorder import Recorder
from quailora_app.runs import RunFolder, read_report_at, write_atomic


def test_reports_and_events_round_trip_and_say_their_kind(tmp_path):
    folder = RunFolder.create("train", tmp_path / "run")
    assert folder.read_report() is None and folder.read_events() == [] and not folder.has_results()
    folder.write_report({"kind": "train", "status": "running", "shape": (2, 3)})
    log = folder.open_log()
    log.append(Stage("load", "x"))
    log.close()
    (folder.path / "events.jsonl").open("a").write('{"kind": "torn')  # a crash mid-line
    assert folder.read_report() == {"kind": "train", "status": "running", "shape": [2, 3]}
    assert [e["kind"] for e in folder.read_events()] == ["stage"] and folder.kind() == "train"
    assert [p.name for p in folder.path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_kind_of_folders_written_before_reports_said_it(tmp_path):
    old_views = RunFolder.create("views", tmp_path / "a")
    (old_views.path / "views.json").write_text(json.dumps({"status": "finished", "figures": {}}))
    assert old_views.kind() == "views" and old_views.read_report()["figures"] == {}
    old_train = RunFolder.create("init", tmp_path / "b")
    old_train.write_report({"status": "finished", "arms": {}})
    assert old_train.kind() == "train" and RunFolder.create("init", tmp_path / "c").kind() == "init"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_read_report_at_takes_a_folder_or_a_file_and_refuses_in_one_line(tmp_path):
    RunFolder(tmp_path).write_report({"kind": "init", "rank": 4})
    assert read_report_at(tmp_path)["rank"] == 4 == read_report_at(tmp_path / "report.json")["rank"]
    (tmp_path / "list.json").write_text("[1]")
    for bad in (tmp_path / "missing", tmp_path / "list.json"):
        with pytest.raises(ConfigError, match="cannot read report"):
            read_report_at(bad)


def _recorded(tmp_path, body_error: BaseException, **kw):
    folder = RunFolder.create("init", tmp_path)
    report = {"kind": "init", "status": "running"}
    rec = Recorder(folder, report, **kw)

    def body():
        yield rec.emit(Stage("load"))
        raise body_error

    released = []
    events = list(rec.run(body(), "cpu", "try less", lambda: released.append(1)))
    return folder, events, released


@pytest.mark.parametrize("error, status, cancelled, line", [
    (Cancelled("stopped by the user during x"), "stopped", True, "stopped by the user during x"),
    (DataError("no text"), "failed", False, "no text"),
    (torch.OutOfMemoryError("CUDA"), "failed", False, "out of memory on cpu: try less"),
    (KeyError("boom"), "failed", False, "internal error: KeyError: 'boom'"),
])
def test_an_early_end_is_one_failed_event_in_the_stream_the_report_and_the_log(tmp_path, error, status, cancelled,
                                                                               line):
    ended = []
    folder, events, released = _recorded(tmp_path, error, on_fail=ended.append, stopped_status="stopped")
    assert [type(e) for e in events] == [Stage, RunFailed] and events[-1].message.startswith(line)
    assert events[-1].cancelled is cancelled and ended == [cancelled] and released
    report = folder.read_report()
    assert report["status"] == status and report["error"] == events[-1].message and report["kind"] == "init"
    assert [e["kind"] for e in folder.read_events()] == ["stage", "failed"]
    assert folder.error_path.is_file() == isinstance(error, KeyError)


def test_relay_emits_and_returns_the_value(tmp_path):
    rec = Recorder(RunFolder.create("init", tmp_path), {"kind": "init"}, should_stop=lambda: True)

    def steps():
        yield Log("a")
        return 42

    def body():
        value = yield from rec.relay(steps())
        yield rec.emit(RunFinished(rec.run_dir, {"value": value}))

    events = list(rec.run(body(), "cpu", ""))
    assert events[-1].report == {"value": 42} and len(RunFolder(tmp_path).read_events()) == 2
    with pytest.raises(Cancelled, match="during the test"):
        rec.check_stop("the test")


def test_views_flow_streams_typed_events_into_its_run_folder(tiny_model_dir, text_file, tmp_path):
    from quailora_app.config import DataConfig, LoraSettings, ModelConfig, ViewsConfig
    from quailora_app.flows.views import run_views

    cfg = ViewsConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), seq_len=16, calib_samples=4,
                                                                   eval_tokens=64),
                      lora=LoraSettings(rank=4), ranks=(1, 4), out=str(tmp_path / "views"))
    events = list(run_views(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    choices = next(e for e in events if isinstance(e, LayerChoices))
    assert choices.layer == choices.default and choices.layer in choices.names
    folder = RunFolder(tmp_path / "views")
    report = folder.read_report()
    assert report["kind"] == "views" and report["status"] == "finished" and len(report["figures"]) == 7
    assert folder.read_events() == [json.loads(json.dumps(e.to_dict())) for e in events]
    with pytest.raises(ConfigError, match="block must be"):
        ViewsConfig(block="middle")
    bad = list(run_views(ViewsConfig(cfg.model, cfg.data, layer="model.layers.9.mlp.down_proj",
                                     out=str(tmp_path / "bad"))))
    assert isinstance(bad[-1], RunFailed) and "not a linear layer" in bad[-1].message
