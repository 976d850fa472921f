"""A bounded load test: sessions on several gradio_client clients queue 20 short init jobs on a tiny model
against the app on localhost; every job completes, and the app's resident memory after the 20th (and a gc) is
within 20 MB of what it was after the first. The figures are printed (run with -s to see them).

The text has a few thousand distinct words, so each run's tokenizer meets many words: tokenizers 0.23 kept the
memory of a dropped tokenizer's word cache, about 4 MB per job in the app (`sources.models._no_word_cache`)."""
from __future__ import annotations

import gc
import os
import random
import time
from contextlib import contextmanager

import pytest

gradio_client = pytest.importorskip("gradio_client")
psutil = pytest.importorskip("psutil")
from gradio_client import Client  # noqa: E402
from helpers import form_settings, launched_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("quick_heartbeat")  # conftest: Client.close() returns at once

N_JOBS = 20
N_CLIENTS = 3
MB = 1024 * 1024


@pytest.fixture(scope="module")
def many_words_file(tmp_path_factory):
    """400 lines of 30 words drawn from 6000 random letter strings."""
    rng = random.Random(0)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(6000)]
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(" ".join(rng.choices(vocab, k=30)) for _ in range(400)))
    return path


def init_args(model_dir, text, **over):
    """The smallest real init flow: zero init against QuAILoRA on q_proj and v_proj, no 8-bit/full baselines."""
    return form_settings(model_dir, **{"dataset": str(text), "methods": ["qlora", "quailora"],
                                       "targets": ["q_proj", "v_proj"], "baselines": False, "als_rounds": 2,
                                       "damping": 0.01, **over})


def rss() -> int:
    from quailora_app.app.jobs import release_memory

    release_memory()  # what the worker does after each job: gc, CUDA cache, malloc_trim
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


@contextmanager
def app_heap_frozen():
    """What the process holds before the first job (conftest.frozen_heap froze the module's start; this adds the
    app, its clients and sessions) out of the cyclic collector's sight while the jobs run: each job's three full
    collections (the flow's two, the worker's one) then scan what the jobs created, not all of that again (about
    0.35 s each on 2 cores, half of a job's time). What a job drops is collected as before and what it keeps is
    still counted; an object frozen here that a job drops is never freed, which can only add to the growth measured.
    Unfrozen after (the next module's start freezes again)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def wait_for_end(client, session, job_id, timeout=540.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.predict(session, job_id, api_name="/init_status")[1]
        if any(w in status for w in ("finished", "failed", "stopped")):
            return status
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s")


def test_twenty_jobs_complete_and_memory_stays_flat(tiny_model_dir, many_words_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QUAILORA_ALLOWED_PATHS", os.pathsep.join([str(tiny_model_dir), str(many_words_file.parent)]))
    with launched_app(tmp_path / "runs") as url:
        clients = [Client(url, verbose=False) for _ in range(N_CLIENTS)]
        # one session (owner key) per job: an owner has one active job at a time
        sessions = [(clients[i % N_CLIENTS], clients[i % N_CLIENTS].predict({}, api_name="/attach")[0])
                    for i in range(N_JOBS)]
        start = rss()
        with app_heap_frozen():
            t0 = time.time()
            client, session = sessions[0]
            session, first_id, _ = client.predict(session, **init_args(tiny_model_dir, many_words_file),
                                                  api_name="/start_init")
            first_status = wait_for_end(client, session, first_id)
            assert "finished" in first_status, first_status
            first_s = time.time() - t0
            first = rss()
            t1 = time.time()
            submitted = []
            for i, (client, session) in enumerate(sessions[1:], start=1):
                session, job_id, _ = client.predict(session, **init_args(tiny_model_dir, many_words_file, seed=i),
                                                    api_name="/start_init")
                submitted.append((client, session, job_id))
            wait_for_end(*submitted[-1])  # one worker, first in first out: the last one ends last
            states = {job_id: client.predict(session, job_id, api_name="/init_status")[1]
                      for client, session, job_id in submitted}
            rest_s = time.time() - t1
            after = rss()
        for client in clients:
            client.close()
    failed = {j: s for j, s in states.items() if "finished" not in s}
    assert not failed, failed
    print(f"\nload test: {N_JOBS} init jobs (tiny Llama, qlora + quailora on q_proj/v_proj, 6000-word text) from "
          f"{N_JOBS} sessions on {N_CLIENTS} clients, all finished; first {first_s:.1f} s, {N_JOBS - 1} more in "
          f"{rest_s:.1f} s ({rest_s / (N_JOBS - 1):.1f} s each); RSS before {start / MB:.0f} MB, after the first "
          f"{first / MB:.1f} MB, after the {N_JOBS}th {after / MB:.1f} MB ({(after - first) / MB:+.1f} MB)")
    assert after - first < 20 * MB, "memory grew with the number of jobs"
