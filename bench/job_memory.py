"""Resident memory of a process that runs many short init jobs through the app's JobManager (the worker the web app
uses, without gradio): RSS before, after a warm-up job, and after N more, with the worker's own release_memory().
Compare with tests/test_load.py (`pytest tests/test_load.py -s`), which goes through a launched gradio app.

    python bench/job_memory.py            # tiny Llama built from a config, 10 jobs after the warm-up
    python bench/job_memory.py --jobs 30
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
from helpers import TINY_TEXT, save_tiny_llama  # noqa: E402

from quailora_app.app.jobs import DONE, JobManager, release_memory  # noqa: E402
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig  # noqa: E402

MB = 2**20


def rss_mb() -> float:
    release_memory()
    gc.collect()
    return psutil.Process().memory_info().rss / MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="quailora-jobs-"))
    model = save_tiny_llama(tmp / "model")
    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)))
    os.chdir(tmp)  # run folders land in tmp/runs
    manager = JobManager(gpu=False)

    def run(seed: int) -> str:
        cfg = InitConfig(ModelConfig(str(model)),
                         DataConfig(str(text), seq_len=32, calib_samples=4, eval_tokens=128, seed=seed),
                         lora=LoraSettings(rank=4), methods=("qlora", "svd", "quailora"), baselines=False, als_rounds=2)
        job = manager.submit("init", cfg, "bench")
        while manager.snapshot(job.id).status not in DONE:
            time.sleep(0.1)
        return manager.snapshot(job.id).status

    start = rss_mb()
    t0 = time.perf_counter()
    statuses = [run(0)]
    warm = rss_mb()
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    statuses += [run(seed) for seed in range(1, args.jobs + 1)]
    after = rss_mb()
    print(f"| jobs | finished | warm-up s | s per job | RSS before (MB) | after warm-up | after {args.jobs} more "
          f"| growth |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| 1 + {args.jobs} | {statuses.count('finished')} | {warm_s:.1f} | "
          f"{(time.perf_counter() - t1) / args.jobs:.1f} | "
          f"{start:.1f} | {warm:.1f} | {after:.1f} | {after - warm:+.1f} MB |")
    # leave without interpreter teardown: tearing it down under the idle worker thread aborted ("terminate called")
    os._exit(0 if statuses.count("finished") == len(statuses) else 1)


if __name__ == "__main__":
    main()
