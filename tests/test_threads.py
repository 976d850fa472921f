"""The thread policy (quailora_app/threads.py): what QUAILORA_THREADS and a launcher's OMP_NUM_THREADS ask for, the
OpenMP waiting it sets, and that it takes effect in a fresh process when applied before torch loads."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quailora_app.threads import PASSIVE_WAIT, THREADS_ENV, apply_thread_policy, thread_policy, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def test_auto_uses_the_usable_cpus_and_waits_passively():
    policy = thread_policy({}, cpus=3)
    assert (policy.mode, policy.threads, policy.env, policy.note) == ("auto", 3, PASSIVE_WAIT, "")
    assert thread_policy({THREADS_ENV: " AUTO "}, cpus=2).threads == 2


@pytest.mark.parametrize("env, threads", [
    ({THREADS_ENV: "1"}, 1),
    ({THREADS_ENV: "4"}, 4),
    ({"OMP_NUM_THREADS": "1"}, 1),  # a launcher's choice (torchrun sets 1 per process) is kept
    ({THREADS_ENV: "2", "OMP_NUM_THREADS": "1"}, 2),  # the override wins
    ({"OMP_NUM_THREADS": "zero"}, 3),
])
def test_the_override_and_the_launcher(env, threads):
    assert thread_policy(env, cpus=3).threads == threads


def test_native_leaves_everything_alone():
    env = {THREADS_ENV: "native"}
    policy = apply_thread_policy(env, cpus=1)
    assert policy.threads is None and policy.env == {} and env == {THREADS_ENV: "native"}
    assert "native" in policy.describe()


def test_a_bad_value_falls_back_to_auto_and_says_so():
    policy = thread_policy({THREADS_ENV: "lots"}, cpus=2)
    assert policy.mode == "auto" and policy.threads == 2 and "'lots'" in policy.note
    assert thread_policy({THREADS_ENV: "0"}, cpus=2).note


def test_waiting_variables_already_set_are_kept():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    before = torch.get_num_threads()
    try:
        policy = apply_thread_policy(env, cpus=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}
    assert policy.env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert not policy.in_time and "after torch loaded" in policy.describe()  # torch is loaded in this process


def test_a_cgroup_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_applied_before_torch_it_reaches_openmp():
    code = ("import os, sys; from quailora_app.threads import apply_thread_policy; p = apply_thread_policy(); "
            "import torch; print(p.in_time, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, THREADS_ENV: "1"}, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "1", "PASSIVE"]


def test_the_heap_policy_freezes_what_is_alive_and_still_collects_later_cycles():
    """app.py freezes the startup heap (quailora_app/heap.py) so each run's gc.collect walks only the runs' own
    objects; a model dropped later while held in a reference cycle must still be collected."""
    import gc
    import weakref

    from quailora_app.heap import freeze_startup_heap

    class Node:
        pass

    try:
        frozen = freeze_startup_heap()
        # frozen objects still die when their last reference goes, so another thread of this process (a server an
        # earlier test left, pytest-xdist's) may free a few between the two reads: the count only ever falls
        assert frozen > 1000 and frozen - 100 <= gc.get_freeze_count() <= frozen
        node = Node()
        node.self = node  # a cycle: reference counting alone never frees it
        ref = weakref.ref(node)
        del node
        assert ref() is not None
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()  # this test process keeps collecting as before
