"""The shipped example run (assets/example, made by bench/make_example.py): its folders read back as an init run,
a fine-tuning run, an across-bits run and a generate run, carry the settings its README and manifest promise (the
across-bits run: exactly what the app's "Run across bits" starts by default), stay small, and draw through the
same presenters as a live or reopened run; reopening them writes nothing into assets/; an app without them starts."""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest

from quailora_app.app.across_bits import default_bits_config, example_bits
from quailora_app.app.jobs import JobManager
from quailora_app.app.presenters import example_outputs, reopened_outputs
from quailora_app.app.reopen import (
    EXAMPLE_DIR,
    EXAMPLE_MANIFEST,
    example_choices,
    list_runs,
    open_example,
    open_run,
)
from quailora_app.engine.arms import default_arm_names
from quailora_app.engine.methods.registry import init_method_names
from quailora_app.errors import UserError
from quailora_app.plots import figures as F
from quailora_app.runs import RunFolder

#: what the README promises of the full example (bench/make_example.py without --quick)
FULL = {"rank": 16, "targets": ["all-linear"], "calib_samples": 64, "seq_len": 256, "eval_tokens": 16384}

pytestmark = pytest.mark.skipif(not (EXAMPLE_DIR / EXAMPLE_MANIFEST).is_file(),
                                reason="no shipped example: python -m bench.make_example")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((EXAMPLE_DIR / EXAMPLE_MANIFEST).read_text())


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    return {kind: RunFolder(EXAMPLE_DIR / kind).read_report() for kind in ("init", "train")}


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_shipped_folders_read_as_finished_init_and_train_runs(reports):
    for kind in ("init", "train"):
        folder = RunFolder(EXAMPLE_DIR / kind)
        assert folder.kind() == kind and reports[kind]["status"] == "finished"
        assert folder.read_events()[-1]["kind"] == "finished"
    init, train = reports["init"], reports["train"]
    assert init["layers"] and {"qlora", "quailora", "full", "int8"} <= set(init["perplexity"])
    assert all(entry["status"] == "finished" and len(entry["evals"]) >= 2 for entry in train["arms"].values())


def test_the_shipped_run_carries_the_settings_its_readme_promises(manifest, reports):
    init, train = reports["init"], reports["train"]
    s, lora = init["settings"]["data"], init["settings"]["lora"]
    promised = manifest["init"]
    assert (lora["rank"], lora["targets"], s["calib_samples"], s["seq_len"], s["eval_tokens"]) == (
        promised["rank"], promised["targets"].split(", "), promised["calib_samples"], promised["seq_len"],
        promised["eval_tokens"])
    assert init["methods"] == promised["methods"] and train["arm_names"] == manifest["train"]["arms"]
    assert init["settings"]["data"]["seed"] == train["settings"]["data"]["seed"] == manifest["seed"]
    # every initialization of the registry, and the default arms
    assert set(init["methods"]) == set(init_method_names()) and tuple(train["arm_names"]) == default_arm_names()
    readme = (EXAMPLE_DIR / "README.md").read_text()
    assert manifest["command"] in readme and f"seed {manifest['seed']}" in readme
    assert f"rank {lora['rank']}" in readme and f"{s['calib_samples']} x {s['seq_len']} calibration" in readme
    assert f"{s['eval_tokens']:,} held-out tokens" in readme
    if manifest["preset"] == "full":
        assert {k: (lora if k in ("rank", "targets") else s)[k] for k in FULL} == FULL
    else:  # a development example says so wherever it is shown
        assert manifest["preset"] == "quick" and "quick development run" in readme
    # the perplexities --check compares are the ones the page shows
    assert manifest["perplexity"]["init"] == init["perplexity"]
    assert {arm: [s for s, _ in e] for arm, e in manifest["perplexity"]["train"].items()} == \
        {arm: [s for s, _ in entry["evals"]] for arm, entry in train["arms"].items()}


def test_the_shipped_run_is_small_and_holds_no_adapter_weights():
    files = [p for p in EXAMPLE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    assert not [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".zip")]


def test_the_presenters_draw_the_shipped_run_with_its_label():
    shown = example_outputs(JobManager(gpu=False))
    init, train = shown["init"], shown["train"]
    for key in ("layers", "heatmap", "perplexity"):
        assert init[key].data, key
    assert len(init["perplexity"].data) == len(F.perplexities_from(init["report"]))
    assert len(init["table"]) >= 5 and init["table"].columns[0] == "variant"
    curves = [t for t in train["curves"].data if t.mode == "lines+markers" and t.xaxis == "x"]
    assert len(curves) == len(default_arm_names()) and all(len(t.x) >= 2 for t in curves)
    assert len(train["table"]) == len(default_arm_names())
    for part in (init, train):
        assert part["label"].startswith("**Shipped example run") and "make_example" in part["label"]
    assert "rank 16" in init["label"] and "all linear layers" in init["label"]
    assert re.search(r"perplexity .* \*\*\d+\.\d\*\*", shown["headline"]) and "Compute it live" in shown["headline"]
    assert "QuAILoRA" in shown["summary"] and "Fine-tuning" in shown["summary"]


def test_the_shipped_runs_reopen_like_any_run_folder_and_stay_untouched(tmp_path):
    before = fingerprint(EXAMPLE_DIR)
    runs_root = tmp_path / "runs"
    names = [name for _, name in list_runs("someone", runs_root, example=EXAMPLE_DIR)]
    assert names == ["shipped:init", "shipped:train", "shipped:bits", "shipped:generate"]
    manager = JobManager(gpu=False)
    init = reopened_outputs("shipped:init", "someone", manager)
    train = reopened_outputs("shipped:train", None, manager)
    assert "shipped example" in init["summary"] and init["layers"].data and init["perplexity"].data
    assert train["curves"].data and Path(init["zip"]).name == "quailora-example-init.zip"
    bits = reopened_outputs("shipped:bits", None, manager)  # the frontier in the perplexity panel, its points below
    assert "Across bits" in bits["summary"] and bits["perplexity"].data and len(bits["table"]) >= 4
    generate = reopened_outputs("shipped:generate", None, manager)  # each variant's agreement in the summary
    assert "Generate" in generate["summary"] and "Agreement with full precision" in generate["summary"]
    assert not Path(init["zip"]).resolve().is_relative_to(EXAMPLE_DIR)
    assert fingerprint(EXAMPLE_DIR) == before
    for name in ("shipped:views", "shipped:../init", "shipped:", "shipped:init/report.json"):
        with pytest.raises(UserError):
            open_example(name)
    with pytest.raises(UserError):  # the runs root never reaches the example, nor the example a folder of the root
        open_run("shipped:init", None, runs_root)


def test_an_app_without_a_shipped_example_starts_as_before(tmp_path, monkeypatch):
    missing = tmp_path / "example"
    assert example_outputs(JobManager(gpu=False), missing) is None
    assert example_choices(missing) == [] and list_runs(None, tmp_path / "runs", example=missing) == []
    (missing / "init").mkdir(parents=True)
    (missing / "init" / "report.json").write_text('{"kind": "train", "status": "finished"}')  # damaged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert example_outputs(JobManager(gpu=False), missing) is None

    import quailora_app.app.ui as ui  # gradio: only this test builds the page

    monkeypatch.setattr(ui, "example_outputs", lambda manager: example_outputs(manager, missing))
    demo = ui.build_ui(JobManager(gpu=False))
    headline = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "example-headline")
    assert headline.visible is False
    assert demo._queue.sleep_when_free == ui.QUEUE_IDLE_SLEEP_S  # the page's queue sleeps while idle


def test_the_check_compares_every_shipped_perplexity(manifest):
    """bench/make_example.py --check: every perplexity the page shows, exactly by default, or to a tolerance."""
    import copy
    import importlib.util

    make_example = importlib.import_module("bench.make_example")
    shipped = manifest["perplexity"]
    rows = make_example.compare(shipped, shipped, 0.0)
    n = sum(v is not None for v in shipped["init"].values()) + len(shipped["train_reference"]) + \
        sum(len(e) for e in shipped["train"].values()) + sum(v is not None for v in shipped["bits"].values())
    assert len(rows) == n and all(ok for *_, ok in rows)
    again = copy.deepcopy(shipped)
    arm = next(iter(again["train"]))
    again["train"][arm][-1][1] *= 1 + 1e-6
    assert [name for name, *_, ok in make_example.compare(shipped, again, 0.0) if not ok] == \
        [f"train {arm} @ step {again['train'][arm][-1][0]}"]
    assert all(ok for *_, ok in make_example.compare(shipped, again, 1e-5))
    del again["init"]["quailora"]
    assert not all(ok for *_, ok in make_example.compare(shipped, again, 1e-5))  # a missing one is a difference
    again = copy.deepcopy(shipped)
    again["bits"]["hqq3/closed_form"] *= 1 + 1e-6  # the across-bits points are compared too
    assert [name for name, *_, ok in make_example.compare(shipped, again, 0.0) if not ok] == ["bits hqq3/closed_form"]
    only = make_example.compare({"bits": shipped["bits"]}, {"bits": shipped["bits"]}, 0.0)  # --check --only bits
    assert len(only) == sum(v is not None for v in shipped["bits"].values()) and all(ok for *_, ok in only)


def test_the_shipped_across_bits_run_is_the_apps_live_default(manifest):
    """assets/example/bits: a finished across-bits run with exactly the settings "Run across bits" starts by
    default (so a visitor pressing it recomputes the frontier they were shown), its perplexities in the manifest
    (what --check compares), its reading and command in the README; drawn as a frontier with its reading."""
    report = RunFolder(EXAMPLE_DIR / "bits").read_report()
    assert report["kind"] == "bits" and report["status"] == "finished"
    assert RunFolder(EXAMPLE_DIR / "bits").read_events()[-1]["kind"] == "finished"
    live = default_bits_config(device="cpu")
    s = report["settings"]
    assert tuple(s["bases"]) == live.bases and tuple(s["methods"]) == live.methods
    assert (s["group_size"], s["lora"]["rank"], s["lora"]["targets"]) == (live.group_size, live.lora.rank,
                                                                          list(live.lora.targets))
    assert (s["data"]["calib_samples"], s["data"]["seq_len"], s["data"]["eval_tokens"], s["data"]["seed"]) == (
        live.data.calib_samples, live.data.seq_len, live.data.eval_tokens, live.data.seed)
    assert (s["model"]["model"], s["data"]["dataset"]) == (live.model.model, live.data.dataset)
    assert len(report["points"]) == len(live.bases) * (1 + len(live.methods)) and report["full"]
    shipped = manifest["perplexity"]["bits"]
    assert shipped == {**{k: p["perplexity"] for k, p in report["points"].items()}, "full": report["full"]}
    assert manifest["bits"]["settings"]["bases"] == list(live.bases) and "--only bits" in manifest["bits"]["command"]
    readme = (EXAMPLE_DIR / "README.md").read_text()
    assert manifest["bits"]["command"] in readme and report["reading"] in readme
    assert "assets/example/bits" in (EXAMPLE_DIR / "bits" / "report.json").read_text()  # relabelled, no temp path
    drawn = example_bits()
    assert drawn["reading"] == f"**Reading:** {report['reading']}" and report["reading"].startswith("At ")
    assert len(drawn["frontier"].data) >= 1 + len(live.methods) and len(drawn["table"]) == len(report["points"]) + 1
    assert drawn["label"].startswith("**Shipped example run**") and "--only bits" in drawn["label"]
    assert "Across bit widths" in example_outputs(JobManager(gpu=False))["headline"]
