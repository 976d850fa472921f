"""A bounded load test: several sessions queue short init jobs on a tiny model through gradio_client against the
app on localhost; every job completes, and the app's resident memory after them (and a gc) is back within a
margin of its level after a first, warm-up job. The figures are printed (run with -s to see them)."""
from __future__ import annotations

import gc
import os
import time

import pytest

gradio_client = pytest.importorskip("gradio_client")
psutil = pytest.importorskip("psutil")
from gradio_client import Client  # noqa: E402
from helpers import form_settings, launched_app  # noqa: E402

N_JOBS = 5
MB = 1024 * 1024


def init_args(model_dir, **over):
    return form_settings(model_dir, **{"methods": ["qlora", "svd", "quailora"], "baselines": False, "als_rounds": 2,
                                       "damping": 0.01, **over})


def rss() -> int:
    from quailora_app.app.jobs import release_memory

    release_memory()  # what the worker does after each job: gc, CUDA cache, malloc_trim
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


def wait_all(clients, timeout=180.0) -> dict[str, str]:
    deadline, states = time.time() + timeout, {}
    while time.time() < deadline:
        for client, session, job_id in clients:
            if job_id not in states:
                status = client.predict(session, job_id, api_name="/init_status")[1]
                if any(w in status for w in ("finished", "failed", "stopped")):
                    states[job_id] = status
        if len(states) == len(clients):
            return states
        time.sleep(0.5)
    raise AssertionError(f"only {len(states)} of {len(clients)} jobs ended in {timeout:.0f} s")


def test_many_short_jobs_complete_and_memory_returns(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUAILORA_ALLOWED_PATHS", str(tiny_model_dir))
    with launched_app(tmp_path / "runs") as url:
        clients = [Client(url, verbose=False) for _ in range(N_JOBS)]
        sessions = [c.predict({}, api_name="/attach")[0] for c in clients]
        start = rss()
        t0 = time.time()
        session, warm_id, _ = clients[0].predict(sessions[0], **init_args(tiny_model_dir), api_name="/start_init")
        warm_status = wait_all([(clients[0], session, warm_id)])[warm_id]
        assert "finished" in warm_status, warm_status
        warm_s = time.time() - t0
        warm = rss()
        t1 = time.time()
        submitted = []
        for i, (client, session) in enumerate(zip(clients, sessions)):
            session, job_id, status = client.predict(session, **init_args(tiny_model_dir, seed=i + 1),
                                                     api_name="/start_init")
            submitted.append((client, session, job_id))
        states = wait_all(submitted)
        batch_s = time.time() - t1
        after = rss()
        for client in clients:
            client.close()
    failed = {j: s for j, s in states.items() if "finished" not in s}
    assert not failed, failed
    print(f"\nload test: 1 warm-up + {N_JOBS} queued init jobs (tiny Llama, rank 4, qlora+svd+quailora), all finished; "
          f"warm-up {warm_s:.1f} s, {N_JOBS} jobs in {batch_s:.1f} s ({batch_s / N_JOBS:.1f} s each); "
          f"RSS before {start / MB:.0f} MB, after warm-up {warm / MB:.0f} MB, after {N_JOBS} jobs {after / MB:.0f} MB "
          f"({(after - warm) / MB:+.1f} MB)")
    assert after - warm < max(48 * MB, 0.1 * warm), "memory grew with the number of jobs"
