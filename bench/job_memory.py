"""Resident memory of a process that runs many short init jobs through the app's JobManager (the worker the web app
uses, without gradio): RSS before, after a warm-up job, and after N more, with the worker's own release_memory().
Compare with tests/test_load.py (`pytest tests/test_load.py -s`), which goes through a launched gradio app.

The text matters: each run loads its own tokenizer, and tokenizers 0.23 keeps the memory of a dropped tokenizer's
word cache (the app now switches that cache off, `sources.models._no_word_cache`). A text of a few dozen distinct
words hides it; the embedded Rotten Tomatoes text (the app's default) showed about +3.7 MB per job.

    python -m bench.job_memory                      # tiny Llama built from a config, embedded text, 10 more jobs
    python -m bench.job_memory --jobs 30 --each     # RSS after every job
    python -m bench.job_memory --text tiny          # the old 40-word text
    python -m bench.job_memory --word-cache         # tokenizers' word cache left on (the leak, for comparison)
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

from quailora_app.app.jobs import DONE, JobManager, release_memory  # noqa: E402
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig  # noqa: E402
from tests.helpers import TINY_TEXT, save_tiny_llama  # noqa: E402

MB = 2**20


def rss_mb() -> float:
    release_memory()
    gc.collect()
    return psutil.Process().memory_info().rss / MB


def make_text(kind: str, folder: Path) -> str:
    """'embedded' (the app's default text), 'words' (6000 distinct random words) or 'tiny' (40 words)."""
    if kind == "embedded":
        return "embedded"
    rng = random.Random(0)
    if kind == "words":
        vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(6000)]
        lines = [" ".join(rng.choices(vocab, k=30)) for _ in range(400)]
    else:
        words = " ".join(TINY_TEXT).split()
        lines = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)]
    path = folder / "text.txt"
    path.write_text("\n".join(lines))
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--text", choices=("embedded", "words", "tiny"), default="embedded")
    parser.add_argument("--each", action="store_true", help="print RSS after every job")
    parser.add_argument("--word-cache", action="store_true", help="leave tokenizers' word cache on")
    args = parser.parse_args()
    if args.word_cache:
        from quailora_app.sources import models

        models._no_word_cache = lambda tokenizer: None
    tmp = Path(tempfile.mkdtemp(prefix="quailora-jobs-"))
    model = save_tiny_llama(tmp / "model")
    text = make_text(args.text, tmp)
    os.chdir(tmp)  # run folders land in tmp/runs
    manager = JobManager(gpu=False)

    def run(seed: int) -> str:
        cfg = InitConfig(ModelConfig(str(model)),
                         DataConfig(text, seq_len=32, calib_samples=4, eval_tokens=128, seed=seed),
                         lora=LoraSettings(rank=4), methods=("qlora", "svd", "quailora"), baselines=False, als_rounds=2)
        job = manager.submit("init", cfg, "bench")
        while manager.snapshot(job.id).status not in DONE:
            time.sleep(0.1)
        manager.wait(job.id)  # and the worker has released the job's memory
        status = manager.snapshot(job.id).status
        if args.each:
            print(f"job {seed + 1}: {status}, RSS {rss_mb():.1f} MB", flush=True)
        return status

    start = rss_mb()
    t0 = time.perf_counter()
    statuses = [run(0)]
    warm = rss_mb()
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    statuses += [run(seed) for seed in range(1, args.jobs + 1)]
    after = rss_mb()
    print(f"text: {args.text}; tokenizers' word cache {'on' if args.word_cache else 'off'}\n"
          f"| jobs | finished | warm-up s | s per job | RSS before (MB) | after warm-up | after {args.jobs} more "
          f"| growth |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| 1 + {args.jobs} | {statuses.count('finished')} | {warm_s:.1f} | "
          f"{(time.perf_counter() - t1) / args.jobs:.1f} | "
          f"{start:.1f} | {warm:.1f} | {after:.1f} | {after - warm:+.1f} MB |")
    # leave without interpreter teardown: tearing it down under the idle worker thread aborted ("terminate called")
    os._exit(0 if statuses.count("finished") == len(statuses) else 1)


if __name__ == "__main__":
    main()
