"""How many CPU threads torch computes with, and how its idle OpenMP threads wait: one policy per process.

torch's CPU kernels run on an OpenMP team (GNU libgomp in the pip wheels, MKL included) whose threads spin for a
while before they sleep, and each parallel region waits for its slowest thread. On cores shared with another busy
process a spinning thread takes turns from the one holding the work: some of the init's work ran 36x slower on 2
shared cores. Passive waiting (OMP_WAIT_POLICY=PASSIVE; KMP_BLOCKTIME=0 for Intel's runtime) puts a waiting
thread to sleep at once, so a competing process slows a run down about in proportion to the CPU it takes.

OpenMP reads its variables once, when torch loads it: `apply_thread_policy()` runs before anything imports torch
(app.py, `python -m quailora_app`); called later it still sets the thread count, and says the waiting was late.

QUAILORA_THREADS (the operator's override): unset or "auto", the usable CPUs (the affinity mask, capped by a cgroup
CPU quota, which OpenMP does not see), or OMP_NUM_THREADS when set (a launcher's choice, e.g. torchrun's 1); a
whole number N, N threads; "native", leave torch and OpenMP as they start. Variables already set are kept.
No project imports: the bottom layer.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

THREADS_ENV = "QUAILORA_THREADS"
#: OpenMP's waiting: sleep at once instead of spinning (GNU libgomp and LLVM's runtime; Intel's reads KMP_BLOCKTIME)
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
AUTO, NATIVE = "auto", "native"


@dataclass(frozen=True)
class ThreadPolicy:
    """What `apply_thread_policy` sets: `threads` torch intra-op threads (None: left alone) and the OpenMP variables
    `env` (those the environment already had are kept)."""

    mode: str  # "auto", "native" or "N" (QUAILORA_THREADS)
    threads: int | None
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why the policy differs from what was asked (a bad QUAILORA_THREADS), "" when it does not
    in_time: bool = True  # the OpenMP variables were set before torch loaded its runtime

    def describe(self) -> str:
        """One line for logs and bench tables."""
        if self.mode == NATIVE:
            return "threads: torch's own (QUAILORA_THREADS=native)"
        waits = ", ".join(f"{k}={v}" for k, v in self.env.items()) or "OpenMP waiting as set"
        late = "" if self.in_time else " (set after torch loaded: waiting unchanged)"
        return f"threads: {self.threads} ({self.mode}), {waits}{late}"


_applied: ThreadPolicy | None = None  # the policy applied to this process's environment, once applied


def _cgroup_cpus(root: Path) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 cpu.max, v1 cfs quota / period), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _whole(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value >= 1 else None


def thread_policy(environ: MutableMapping[str, str] | None = None, cpus: int | None = None) -> ThreadPolicy:
    """The policy `environ` asks for (default os.environ), without applying it; `cpus`: the usable CPUs."""
    environ = os.environ if environ is None else environ
    asked = (environ.get(THREADS_ENV) or AUTO).strip().lower()
    if asked == NATIVE:
        return ThreadPolicy(NATIVE, None)
    env = {k: environ.get(k, v) for k, v in PASSIVE_WAIT.items()}
    if asked != AUTO:
        if _whole(asked) is not None:
            return ThreadPolicy(asked, _whole(asked), env)
        note = f"{THREADS_ENV}={environ.get(THREADS_ENV)!r} is not auto, native or a whole number >= 1: using auto"
    else:
        note = ""
    threads = _whole(environ.get("OMP_NUM_THREADS")) or (cpus or usable_cpus())
    return ThreadPolicy(AUTO, threads, env, note)


def apply_thread_policy(environ: MutableMapping[str, str] | None = None, cpus: int | None = None) -> ThreadPolicy:
    """Set the policy of `environ` (default os.environ): the OpenMP waiting variables into it (kept where set),
    then torch's intra-op threads. Call it before torch is imported for the waiting to take effect; calling it
    again (the CLI's main after `python -m quailora_app`) changes nothing and keeps the first call's `in_time`."""
    global _applied
    process = environ is None or environ is os.environ
    environ = os.environ if environ is None else environ
    policy = thread_policy(environ, cpus)
    if policy.threads is None:
        return policy
    in_time = "torch" not in sys.modules or (process and _applied is not None and _applied.in_time)
    for key, value in policy.env.items():
        environ.setdefault(key, value)
    import torch  # after the OpenMP variables above: the runtime reads them when torch loads it

    if torch.get_num_threads() != policy.threads:
        torch.set_num_threads(policy.threads)
    applied = ThreadPolicy(policy.mode, policy.threads, policy.env, policy.note, in_time)
    if process:
        _applied = applied
    return applied


def waits_passively() -> bool:
    """True when this process's OpenMP threads sleep at once when idle: the policy applied in time with
    OMP_WAIT_POLICY=PASSIVE (then several threads on shared cores slow down only in proportion)."""
    return _applied is not None and _applied.in_time and _applied.threads is not None \
        and str(_applied.env.get("OMP_WAIT_POLICY", "")).upper() == "PASSIVE"
