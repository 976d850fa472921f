"""quailora_app.flows.train started from a finished init run (--from-init), and the whole-model arms (distill4,
sequential4, budget4) on a tiny Llama."""
from __future__ import annotations

import json

import pytest

from quailora_app import cli
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig, TrainConfig
from quailora_app.engine.arms import ARM_SPECS, ArmSpec
from quailora_app.errors import ConfigError
from quailora_app.flows.from_init import read_init_run, train_config_from_init
from quailora_app.flows.init import run_init
from quailora_app.flows.train import run_train

TRAIN_KW = dict(steps=2, batch_size=2, eval_every=2, learning_rate=1e-2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread


def settings(model_dir, text_file):
    return (ModelConfig(str(model_dir), "cpu"),
            DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=256),
            QuantConfig(), LoraSettings(rank=4, alpha=8.0))


@pytest.fixture(scope="module")
def init_run(tiny_model_dir, text_file, tmp_path_factory):
    """A finished init run with quailora, closed_form and budget (per-layer ranks) saved, and its baselines."""
    run_dir = tmp_path_factory.mktemp("init")
    cfg = InitConfig(*settings(tiny_model_dir, text_file), methods=("quailora", "closed_form", "budget"))
    events = list(run_init(cfg, run_dir=run_dir))
    assert events[-1].kind == "finished", events[-1]
    return run_dir, events[-1].report


def of_kind(events, kind):
    return [e for e in events if e.kind == kind]


def step0(events) -> dict[str, float]:
    return {e.arm: e.val_perplexity for e in of_kind(events, "eval") if e.step == 0}


def test_from_init_loads_the_saved_factors_and_reuses_the_report(init_run, tmp_path):
    run_dir, report = init_run
    cfg = train_config_from_init(run_dir, arms=("qlora4", "quailora4", "budget4", "qlora8"), device="cpu",
                                 measure_step0=True, **TRAIN_KW)
    assert (cfg.data.seq_len, cfg.data.calib_samples, cfg.data.eval_tokens, cfg.lora.rank, cfg.lora.alpha) == \
        (32, 8, 256, 4, 8.0)  # the init run's, not TrainConfig's defaults
    events = list(run_train(cfg, run_dir=tmp_path))
    assert events[-1].kind == "finished", events[-1]
    stages = of_kind(events, "stage")
    assert stages[0].message.startswith(f"from init run {run_dir.name}")
    assert not [s for s in stages if s.stage in ("calibrate", "reference")]  # nothing calibrated, nothing re-measured
    refs = {e.name: e.value for e in of_kind(events, "metric")}
    assert refs == {"full": report["perplexity"]["full"], "int8": report["perplexity"]["int8"]}
    # measured here (measure_step0): the loaded factors on the same Q and held-out tokens give the init run's figures
    start = step0(events)
    for arm, method in (("quailora4", "quailora"), ("budget4", "budget"), ("qlora4", "qlora")):
        assert start[arm] == pytest.approx(report["perplexity"][method], rel=1e-5), arm
    assert start["qlora8"] == pytest.approx(report["perplexity"]["int8"], rel=1e-5)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["from_init"] == str(run_dir) and saved["settings"]["from_init"] == str(run_dir)
    assert saved["arms"]["quailora4"]["init_from"] == f"init run {run_dir}"
    assert saved["arms"]["qlora4"]["init_from"].startswith("peft default")
    # budget's per-layer ranks came along: its adapter has the init run's rank pattern, as many parameters as r = 4
    budget = json.loads((tmp_path / "adapters" / "budget4" / "adapter_config.json").read_text())
    assert budget["rank_pattern"] and set(budget["rank_pattern"].values()) != {4}
    arms = saved["arms"]
    assert arms["budget4"]["trainable_parameters"] <= arms["quailora4"]["trainable_parameters"]


def test_cli_from_init_takes_the_figures_from_the_report(init_run, tmp_path, capsys):
    run_dir, report = init_run
    out = tmp_path / "train"
    code = cli.main(["train", "--from-init", str(run_dir / "report.json"), "--steps", "2", "--batch-size", "2",
                     "--device", "cpu", "--rank", "4", "--out", str(out)])  # --rank as the init run's: accepted
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"started from init run {run_dir}" in captured.out
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["kind"] == "stage" and e["stage"] in ("calibrate", "reference")]
    start = {e["arm"]: e["val_perplexity"] for e in events if e["kind"] == "eval" and e["step"] == 0}
    assert start == {"qlora4": report["perplexity"]["qlora"], "quailora4": report["perplexity"]["quailora"],
                     "qlora8": report["perplexity"]["int8"]}  # the default arms, every start from the report
    saved = json.loads((out / "report.json").read_text())
    assert saved["status"] == "finished" and saved["perplexities_from_init"] is True
    assert all(saved["arms"][a]["steps_done"] == 2 for a in ("qlora4", "quailora4", "qlora8"))


def test_cli_from_init_refuses_bad_input_in_one_line(init_run, tmp_path, capsys):
    run_dir, _ = init_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    report = json.loads((run_dir / "report.json").read_text())
    (unfinished / "report.json").write_text(json.dumps({**report, "status": "cancelled"}))
    cases = {
        "empty folder": ([str(tmp_path)], "not an init run"),
        "no folder": ([str(tmp_path / "nowhere")], "no such run folder"),
        "cancelled": ([str(unfinished)], "is cancelled"),
        "rank": ([str(run_dir), "--rank", "8"], "--rank 8"),
        "targets": ([str(run_dir), "--targets", "q_proj"], "--targets q_proj"),
        "more eval tokens": ([str(run_dir), "--eval-tokens", "512"], "--eval-tokens 512 above"),
    }
    for case, (args, words) in cases.items():
        code = cli.main(["train", "--from-init", *args, "--device", "cpu", "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err.strip()
        assert code == 2, case
        assert err.startswith("error: ") and "\n" not in err and words in err, (case, err)
    assert not (tmp_path / "never").exists()  # refused before any run folder


def test_hand_built_config_that_differs_from_the_init_run_fails_in_one_line(init_run, tmp_path):
    run_dir, _ = init_run
    cfg = TrainConfig(ModelConfig(device="cpu"), from_init=str(run_dir), arms=("qlora4",), **TRAIN_KW)
    events = list(run_train(cfg, run_dir=tmp_path))
    assert [e.kind for e in events] == ["failed"]
    assert "train_config_from_init" in events[0].message and "--seq-len 128" in events[0].message


def test_arms_the_init_run_lacks_are_computed_and_fewer_eval_tokens_are_measured(init_run, tmp_path):
    run_dir, report = init_run
    cfg = train_config_from_init(run_dir, arms=("quailora4", "quailora8"), device="cpu", eval_tokens=128,
                                 **TRAIN_KW)
    events = list(run_train(cfg, run_dir=tmp_path))
    assert events[-1].kind == "finished", events[-1]
    logs = [e.message for e in of_kind(events, "log")]
    assert any(m.startswith("quailora against the 8-bit LLM.int8 Q: not in init run") for m in logs)
    assert any(m.startswith("perplexities are measured here") for m in logs)
    calibrations = [s.message for s in of_kind(events, "stage") if s.stage == "calibrate"]
    assert len(calibrations) == 1 and calibrations[0].endswith("against the 8-bit LLM.int8 Q")  # 4-bit: loaded
    assert {s.stage for s in of_kind(events, "stage")} >= {"reference"}  # other held-out tokens: measured
    assert step0(events)["quailora4"] != report["perplexity"]["quailora"]  # on half of the init run's tokens
    assert events[-1].report["arms"]["quailora8"]["init_from"] == "computed in this run"


def test_whole_model_arms_train_without_an_init_run(tiny_model_dir, text_file, tmp_path):
    cfg = TrainConfig(*settings(tiny_model_dir, text_file), arms=("qlora4", "distill4", "sequential4", "budget4"),
                      distill_steps=4, distill_lr=2e-3, **TRAIN_KW)
    events = list(run_train(cfg, run_dir=tmp_path))
    assert events[-1].kind == "finished", events[-1]
    calibrate = [s.message for s in of_kind(events, "stage") if s.stage == "calibrate"]
    assert len(calibrate) == 1 and "closed_form against the NF4 4-bit Q" in calibrate[0]  # distill's start, one pass
    start = step0(events)
    assert start["distill4"] < start["qlora4"] and start["sequential4"] < start["qlora4"], start
    assert start["budget4"] < 1.01 * start["qlora4"]  # its allocation weighs layer errors, not perplexity: near
    report = events[-1].report
    assert report["method_details"]["4bit"]["distill"]["steps"] == 4
    assert set(report["seconds"]["init_4bit"]) >= {"distill", "sequential", "budget"}
    assert all(report["arms"][a]["steps_done"] == 2 for a in cfg.arms)
    # budget's arm trains at its per-layer ranks (peft's rank_pattern), within uniform rank r's parameter count
    budget = json.loads((tmp_path / "adapters" / "budget4" / "adapter_config.json").read_text())
    assert budget["rank_pattern"]
    assert report["arms"]["budget4"]["trainable_parameters"] <= report["arms"]["qlora4"]["trainable_parameters"]


def test_arm_specs_take_whole_model_methods():
    assert {"distill4", "sequential4", "budget4"} <= set(ARM_SPECS)
    assert not any(ARM_SPECS[a].default for a in ("distill4", "sequential4", "budget4"))
    with pytest.raises(ValueError, match="unquantized base"):
        ArmSpec("closed16", "full", "closed_form", "x", "x", "#000", "x")
    with pytest.raises(ValueError, match="not computed per layer"):
        ArmSpec("loftq4", "4bit", "loftq", "x", "x", "#000", "x")


def test_read_init_run_and_unknown_overrides(init_run):
    run_dir, _ = init_run
    source = read_init_run(run_dir / "report.json")
    assert source.folder == run_dir and set(source.saved) == {"quailora", "closed_form", "budget"}
    with pytest.raises(ConfigError, match="unknown setting"):
        train_config_from_init(source, stepz=3)


def test_the_form_starts_from_the_init_run_while_the_setup_matches_it(init_run, tiny_model_dir, text_file):
    """The app's step 3 (app/forms.make_train_config_from_init): the session's finished init run is used while the
    Setup still shows its model, data cut and LoRA shape; a changed Setup or no init run computes afresh, and the
    one line says which."""
    from quailora_app.app.forms import make_train_config_from_init

    run_dir, _ = init_run
    form = dict(model=str(tiny_model_dir), dataset=str(text_file), seq_len=32, calib_samples=8, eval_tokens=256,
                rank=4, alpha=8.0, arms=["qlora4", "quailora4"], steps=3, batch_size=1, eval_every=3,
                learning_rate=1e-3)
    cfg, note = make_train_config_from_init(form, run_dir)
    assert cfg.from_init == str(run_dir) and note.startswith(f"starts from init run {run_dir.name}")
    assert (cfg.steps, cfg.batch_size, cfg.arms, cfg.lora.rank, cfg.data.eval_tokens) == \
        (3, 1, ("qlora4", "quailora4"), 4, 256)
    changed, note = make_train_config_from_init({**form, "rank": 8}, run_dir)
    assert changed.from_init is None and changed.lora.rank == 8
    assert "no longer matches" in note and "--rank 8" in note
    fresh, note = make_train_config_from_init(form, None)
    assert fresh.from_init is None and note.startswith("no finished init run")
