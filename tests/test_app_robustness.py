"""The web app under a public Space's conditions, driven through gradio_client against a launched app:
uploads are checked and kept per session, typed paths stay inside the allowed folders, two sessions at once
never see or stop each other's jobs, a job that dies inside a step is marked failed (UI, report.json) without
losing what it wrote and without stopping the next job, and a run folder reopens after a restart."""
from __future__ import annotations

import gc
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from helpers import JOB_ENDED as DONE  # noqa: E402
from helpers import form_settings, launched_app, plot_of, wait_for  # noqa: E402

from quailora_app.app import uploads as paths  # noqa: E402
from quailora_app.errors import UserError  # noqa: E402

pytestmark = pytest.mark.usefixtures("quick_heartbeat")  # conftest: sessions end within a second of a close


@pytest.fixture(scope="module")
def app_url(allowed, tmp_path_factory):
    with launched_app(tmp_path_factory.mktemp("runs")) as url:
        yield url


def init_args(model_dir, short_docs_file=None, **over):
    """/start_init's settings for a ~2 s init of the tiny model (qlora + svd, no baselines)."""
    upload = handle_file(str(short_docs_file)) if short_docs_file else None
    return form_settings(model_dir, **{"upload": upload, "methods": ["qlora", "svd"], "baselines": False,
                                       "als_rounds": 2, "damping": 0.01, **over})


def wait_status(client, session, job_id, done=lambda status: any(w in status for w in DONE), timeout=120.0):
    """/init_status's outputs once done(status line) holds."""
    return wait_for(client, session, "/init_status", job_id, lambda out: done(out[1]), timeout)


# ------------------------------------------------------------------------------------------------ policy units
def test_upload_checks_and_session_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("QUAILORA_UPLOADS", str(tmp_path / "up"))
    for ok in ("a.txt", "a.jsonl", "a.csv", "a.TSV", "a.parquet", "a.txt.gz", "a.csv.bz2", "a.jsonl.xz"):
        paths.check_upload_name(ok)
    for bad in ("a.exe", "a", "a.gz", "a.parquet.gz", "a.txt.zip", "a.py", ".csv.tar"):
        with pytest.raises(UserError, match="uploads must be"):
            paths.check_upload_name(bad)
    src = tmp_path / "doc.csv"
    src.write_text("text\n" + "a line of text\n" * 200)
    with pytest.raises(UserError, match="empty"):
        (tmp_path / "empty.txt").touch()
        paths.check_upload(tmp_path / "empty.txt")
    monkeypatch.setenv("QUAILORA_MAX_UPLOAD_MB", "0.001")
    with pytest.raises(UserError, match=r"at most 1.0 KiB.*QUAILORA_MAX_UPLOAD_MB"):
        paths.store_upload(src, "alice")
    monkeypatch.setenv("QUAILORA_MAX_UPLOAD_MB", "1")
    with pytest.raises(UserError, match="not in the upload folder"):
        paths.store_upload(src, "alice", sources=[tmp_path / "elsewhere"])
    copy = paths.store_upload(src, "alice", sources=[tmp_path])
    assert copy.read_text() == src.read_text() and copy.is_relative_to(paths.session_upload_dir("alice"))
    assert paths.store_upload(copy, "alice") == copy  # already stored: returned as is
    assert "alice" not in str(copy)  # the owner key never reaches the disk, only its hash
    bob = paths.store_upload(src, "bob", sources=[tmp_path])
    assert paths.sweep_uploads(keep=["bob"], max_age_s=-1) == 1  # alice's idle folder goes, bob's job keeps his
    assert not copy.exists() and bob.exists()
    assert paths.remove_session_uploads("bob") and not bob.exists()


def test_typed_paths_stay_inside_allowed_folders(tmp_path, monkeypatch):
    cache, allowed, outside = tmp_path / "cache", tmp_path / "allowed", tmp_path / "outside"
    for folder in (cache, allowed, outside):
        folder.mkdir()
    (outside / "secret.txt").write_text("no")
    (allowed / "data.txt").write_text("yes")
    (allowed / "escape").symlink_to(outside)
    monkeypatch.setenv("QUAILORA_CACHE", str(cache))
    monkeypatch.setenv("QUAILORA_UPLOADS", str(tmp_path / "up"))
    monkeypatch.delenv("QUAILORA_ALLOWED_PATHS", raising=False)
    check = paths.check_user_path
    assert check("embedded", "model") == "embedded" and check("", "model") == "embedded"
    assert check("embedded:speeches") == "embedded:speeches"
    assert check("HuggingFaceTB/SmolLM2-135M", "model") == "HuggingFaceTB/SmolLM2-135M"
    assert check("stanfordnlp/imdb:plain_text") == "stanfordnlp/imdb:plain_text"
    assert check(str(cache / "models" / "m"), "model") == str(cache / "models" / "m")
    for bad in (str(allowed / "data.txt"), "/etc/passwd", "~/.ssh/id_rsa", "../../../../etc/passwd",
                f"{cache}/../outside/secret.txt", "/proc/self/environ", "a/../../b"):
        with pytest.raises(UserError, match="outside the folders this app reads") as info:
            check(bad)
        assert "\n" not in str(info.value)
    monkeypatch.setenv("QUAILORA_ALLOWED_PATHS", os.pathsep.join([str(allowed), str(tmp_path / "nonexistent")]))
    assert check(str(allowed / "data.txt")) == str(allowed / "data.txt")
    with pytest.raises(UserError):  # a symlink inside an allowed folder does not lead out of it
        check(str(allowed / "escape" / "secret.txt"))
    # a session reads its own uploads, not another session's
    mine = paths.session_upload_dir("alice") / "x" / "t.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("hello")
    assert check(str(mine), "dataset", owner="alice") == str(mine)
    with pytest.raises(UserError):
        check(str(mine), "dataset", owner="bob")


# ------------------------------------------------------------------------------------------------ through the app
def test_uploads_and_typed_paths_through_the_app(app_url, tiny_model_dir, short_docs_file, tmp_path, monkeypatch):
    client = Client(app_url, verbose=False)
    session, *_ = client.predict({}, api_name="/attach")
    owner = session["owner"]
    # a type the app does not read is refused by the upload itself
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ\x90\x00" * 64)
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict(handle_file(str(exe)), api_name="/dataset_columns")
    # over the size limit (checked again by the handler, read at each call)
    big = tmp_path / "big.csv"
    big.write_text("text\n" + "a long line of text to make the file big\n" * 100)
    monkeypatch.setenv("QUAILORA_MAX_UPLOAD_MB", "0.001")
    column, info = client.predict(handle_file(str(big)), api_name="/dataset_columns")
    assert info.startswith("**Refused:**") and "at most" in info and column["choices"] == []
    with pytest.raises(Exception, match="at most"):
        client.predict(session, **init_args(tiny_model_dir, big), api_name="/start_init")
    monkeypatch.delenv("QUAILORA_MAX_UPLOAD_MB")
    column, info = client.predict(handle_file(str(big)), api_name="/dataset_columns")
    assert column["value"] == "text" and "CSV" in info
    # typed paths outside the allowed folders: one clear refusal, nothing read
    for over in ({"model": "/etc"}, {"dataset": "/etc/passwd"}, {"dataset": "../../../../etc/passwd"}):
        with pytest.raises(Exception, match="outside the folders this app reads"):
            client.predict(session, **init_args(tiny_model_dir, None, **over), api_name="/start_init")
    assert "outside the folders" in client.predict("/etc/passwd", api_name="/describe_dataset")
    assert client.predict("/etc", api_name="/view_layers")["choices"] == [["default (chosen by the app)", ""]]
    # an accepted upload is copied into this session's folder and the run reads that copy
    session, job_id, _ = client.predict(session, **init_args(tiny_model_dir, short_docs_file), api_name="/start_init")
    out = wait_status(client, session, job_id)
    assert "finished" in out[1], out[1]
    folder = paths.session_upload_dir(owner)
    stored = Path(out[6]["dataset"])
    assert stored.is_relative_to(folder) and stored.read_text() == short_docs_file.read_text()
    # closing the session (the page's tab; here the client's heartbeat) removes its upload folder
    client.close()
    deadline = time.time() + 15
    while folder.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), "the session's upload folder outlived the session"


def test_two_sessions_at_once_queue_and_stay_apart(app_url, tiny_model_dir, monkeypatch):
    """Alice's job holds the worker (gated in data loading) while Bob's waits in the queue with its position;
    neither sees, downloads or stops the other's job; both finish."""
    from quailora_app.flows import prepare

    gate, held = threading.Event(), []
    real = prepare.load_splits

    def gated(*args, **kwargs):
        if not held:
            held.append(True)
            gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "load_splits", gated)
    alice_c, bob_c = Client(app_url, verbose=False), Client(app_url, verbose=False)
    try:
        alice, *_ = alice_c.predict({}, api_name="/attach")
        bob, *_ = bob_c.predict({}, api_name="/attach")
        alice, a_id, _ = alice_c.predict(alice, **init_args(tiny_model_dir), api_name="/start_init")
        wait_status(alice_c, alice, a_id, done=lambda s: "running" in s, timeout=30)
        bob, b_id, b_status = bob_c.predict(bob, **init_args(tiny_model_dir, rank=2), api_name="/start_init")
        assert "queued" in b_status and "position 1 in line" in b_status, b_status
        progress, status, *_ = bob_c.predict(bob, b_id, api_name="/init_status")
        assert "queued: position 1 of 1 waiting" in progress and "queued" in status
        # each session sees only its own job
        out = bob_c.predict(bob, a_id, api_name="/init_status")
        assert "No job" in out[1] and out[6] is None and not plot_of(out[2])["data"]
        assert "No job" in alice_c.predict(alice, b_id, api_name="/init_status")[1]
        assert alice_c.predict(alice, api_name="/attach")[1] == a_id
        assert bob_c.predict(bob, api_name="/attach")[1] == b_id
        with pytest.raises(Exception, match="No job"):
            bob_c.predict(bob, "init", a_id, "", api_name="/download_run")
        # a stop from one user never stops the other's run
        assert "another session" in bob_c.predict(bob, a_id, api_name="/stop_init")
        assert "another session" in alice_c.predict(alice, b_id, api_name="/stop_init")
        assert "running" in alice_c.predict(alice, a_id, api_name="/init_status")[1]
        gate.set()
        assert "finished" in wait_status(alice_c, alice, a_id)[1]
        assert "another session" in alice_c.predict(alice, b_id, api_name="/stop_init")
        out = wait_status(bob_c, bob, b_id)
        assert "finished" in out[1] and out[6]["rank"] == 2
        a_runs = own_runs(alice_c.predict(alice, api_name="/list_runs"))
        b_runs = own_runs(bob_c.predict(bob, api_name="/list_runs"))
        assert a_runs and b_runs and not set(a_runs) & set(b_runs)
    finally:
        gate.set()
        alice_c.close()
        bob_c.close()


def own_runs(pick: dict) -> list[str]:
    """The run folders of a /list_runs answer, without the shipped example (listed for every session)."""
    return [name for _, name in pick["choices"] if not name.startswith("shipped:")]


def _live_models() -> int:
    """Models alive anywhere in the process, the frozen heap included (conftest.frozen_heap; gc.get_objects() leaves
    frozen objects out), but for the quantized bases kept to be copied (engine.quantization.reused: no run holds
    them). Frozen again after (the module's app too, which then outlives its close: memory only)."""
    from transformers import PreTrainedModel

    from quailora_app.engine.quantization import reused

    kept = {id(m) for template in reused.kept() for m in template.modules()}
    gc.unfreeze()
    gc.collect()
    try:
        return sum(1 for o in gc.get_objects() if isinstance(o, PreTrainedModel) and id(o) not in kept)
    finally:
        gc.freeze()


def test_a_job_that_dies_is_failed_keeps_its_files_and_the_next_runs(app_url, tiny_model_dir, monkeypatch):
    """Out of memory, then an unexpected exception, inside the evaluation step after the first adapter was
    saved: each run is marked failed with the reason (UI status and report.json), keeps events.jsonl and the
    adapter written so far, leaves no model behind; then a normal job runs to the end."""
    import torch

    from quailora_app.flows import init as pipeline

    real = pipeline.perplexity
    injected: dict[str, type | None] = {"exc": None}  # a class: a held exception instance would hold its frames
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2 == 0 and injected["exc"] is not None:  # the 2nd method of each run
            raise injected["exc"]("injected: tried to allocate 64 GiB inside a step")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "perplexity", dying)
    client = Client(app_url, verbose=False)
    session, *_ = client.predict({}, api_name="/attach")
    for exc, reason in ((torch.OutOfMemoryError, "out of memory on"),
                        (RuntimeError, "internal error: RuntimeError: injected")):
        injected["exc"], calls[:] = exc, []
        session, job_id, _ = client.predict(session, **init_args(tiny_model_dir), api_name="/start_init")
        out = wait_status(client, session, job_id)
        status, report = out[1], out[6]
        assert "failed" in status and reason in status, status
        run_dir = Path(status.split("run folder `")[1].split("`")[0])
        on_disk = json.loads((run_dir / "report.json").read_text())
        assert on_disk["status"] == "failed" and reason in on_disk["error"] and report["status"] == "failed"
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert events[-1]["kind"] == "failed" and reason in events[-1]["message"]
        assert any(e["kind"] == "metric" and e["name"] == "qlora" for e in events)
        assert (run_dir / "adapters" / "qlora" / "adapter_config.json").is_file()
        assert not (run_dir / "adapters" / "svd").exists()
        assert on_disk["perplexity"].get("qlora") and "svd" not in on_disk["perplexity"]
        assert _live_models() == 0, "the failed run left a model in memory"
    injected["exc"] = None
    session, job_id, _ = client.predict(session, **init_args(tiny_model_dir), api_name="/start_init")
    out = wait_status(client, session, job_id)
    assert "finished" in out[1] and set(out[6]["perplexity"]) == {"qlora", "svd"}
    client.close()


def test_reopen_a_run_folder_after_a_restart(allowed, tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    with launched_app(runs) as url:
        client = Client(url, verbose=False)
        session, *_ = client.predict({}, api_name="/attach")
        session, job_id, _ = client.predict(session, **init_args(tiny_model_dir), api_name="/start_init")
        first = wait_status(client, session, job_id)
        assert "finished" in first[1]
        client.close()
    with launched_app(runs) as url:  # a new app process state: no jobs in memory, the same runs root
        client = Client(url, verbose=False)
        assert client.predict(session, api_name="/attach")[1] == ""
        pick = client.predict(session, api_name="/list_runs")
        names = own_runs(pick)
        assert len(names) == 1 and names[0].startswith("init-") and pick["value"] == names[0]
        summary, layers, heatmap, ppl, curves, table, report, zip_path = client.predict(
            session, names[0], api_name="/reopen_run")
        assert "Reopened" in summary and "finished" in summary
        assert report["status"] == "finished" and report["perplexity"] == first[6]["perplexity"]
        assert plot_of(layers) == plot_of(first[2]) and plot_of(ppl) == plot_of(first[4])
        assert plot_of(heatmap) == plot_of(first[3]) and len(plot_of(layers)["data"]) >= 2
        assert table["headers"][0] == "variant" and len(table["data"]) == 2
        files = zipfile.ZipFile(zip_path).namelist()
        assert any(f.endswith("report.json") for f in files) and any("adapters/svd" in f for f in files)
        # another session neither lists nor opens it; names are folder names, never paths
        stranger = Client(url, verbose=False)
        other, *_ = stranger.predict({}, api_name="/attach")
        assert own_runs(stranger.predict(other, api_name="/list_runs")) == []
        for name in (names[0], f"../{runs.name}/{names[0]}", str(runs / names[0]), "..", "/etc", ""):
            with pytest.raises(Exception, match="no run folder"):
                stranger.predict(other, name, api_name="/reopen_run")
        with pytest.raises(Exception, match="no run folder"):
            client.predict(session, f"../{runs.name}/{names[0]}", api_name="/reopen_run")
        client.close()
        stranger.close()
