"""GPU check of the init engine, for a machine with one CUDA GPU and no network (see bench/gpu_check.sh).

1. The CUDA path's init (quantize, block-by-block calibration, svd/quailora/closed_form) on a small Llama built
   from a config matches the CPU path's calibrated objective layer by layer (within 1%), at float32 compute.
2. peft's replace_lora_weights_loftq (the anchor; CUDA only) runs beside ours: one LoftQ iteration on a fixed Q
   is the svd method, so their perplexities must agree once peft's ignored alpha/r scaling is accounted for.
The scale part (Llama-2-7B's shape) is bench/scale.py, which gpu_check.sh runs next. Prints tables; writes
JSON to $OUT (or /tmp/gpu_check).

    python -m bench.gpu_check          # from the repository root, on the GPU machine (gpu_check.sh runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
from quailora_app.events import RunFailed, RunFinished
from quailora_app.flows.init import run_init

OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path("/tmp/gpu_check_work")


def small_model_and_text() -> tuple[Path, Path]:
    from tests.helpers import TINY_TEXT, save_tiny_llama

    folder = save_tiny_llama(WORK / "small-llama", hidden=256, intermediate=512, layers=4)
    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    text = WORK / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)))
    return folder, text


def init_on(device: str, folder: Path, text: Path, methods, dtype="float32") -> dict:
    cfg = InitConfig(ModelConfig(str(folder), device, dtype),
                     DataConfig(str(text), seq_len=128, calib_samples=32, eval_tokens=4096),
                     lora=LoraSettings(rank=16), methods=methods, out=str(WORK / f"run-{device}-{dtype}"))
    for event in run_init(cfg):
        if isinstance(event, RunFailed):
            raise SystemExit(f"{device}: {event.message}")
        if isinstance(event, RunFinished):
            return event.report
    raise SystemExit("no result")


def check_cpu_vs_cuda() -> dict:
    folder, text = small_model_and_text()
    cpu = init_on("cpu", folder, text, ("svd", "quailora", "closed_form"))
    gpu = init_on("cuda", folder, text, ("svd", "quailora", "closed_form", "loftq"))
    gpu_bf16 = init_on("cuda", folder, text, ("svd", "quailora", "closed_form"), "bfloat16")
    worst = {}
    for m in ("svd", "quailora", "closed_form"):
        ratios = [g["calibrated_error"][m] ** 2 / c["calibrated_error"][m] ** 2
                  for c, g in zip(cpu["layers"], gpu["layers"])]
        worst[m] = max(abs(r - 1) for r in ratios)
    print("\n## CPU vs CUDA (float32 compute), small Llama (4 blocks, hidden 256), rank 16, "
          "32 x 128 calibration tokens")
    print("| method | max per-layer |objective ratio - 1| | ppl CPU | ppl CUDA fp32 | ppl CUDA bf16 "
          "| seconds CPU | seconds CUDA |")
    print("|---|---|---|---|---|---|---|")
    for m in ("qlora", "svd", "quailora", "closed_form", "loftq", "int8", "full"):
        w = f"{100 * worst[m]:.3f}%" if m in worst else "-"
        f = lambda r, m=m: f"{r['perplexity'][m]:.3f}" if m in r["perplexity"] else "-"  # noqa: E731
        s = lambda r, m=m: f"{r['seconds'][m]:.2f}" if m in r["seconds"] else "-"  # noqa: E731
        print(f"| {m} | {w} | {f(cpu)} | {f(gpu)} | {f(gpu_bf16)} | {s(cpu)} | {s(gpu)} |")
    print("loftq unavailable:", gpu["unavailable"].get("loftq", "no, it ran"))
    return {"cpu": cpu["perplexity"], "cuda": gpu["perplexity"], "cuda_bf16": gpu_bf16["perplexity"],
            "worst_objective_ratio": worst,
            "seconds_cpu": cpu["seconds"], "seconds_cuda": gpu["seconds"], "unavailable": gpu["unavailable"]}


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    results = {"cpu_vs_cuda": check_cpu_vs_cuda()}
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
