"""GPU check of the init engine, for a machine with one CUDA GPU and no network (see bench/gpu_check.sh).

1. The CUDA path's init (quantize, block-by-block calibration, svd/quailora/closed_form) on a small Llama built
   from a config matches the CPU path's calibrated objective layer by layer (within 1%), at float32 compute.
2. peft's replace_lora_weights_loftq (the anchor; CUDA only) runs beside ours: one LoftQ iteration on a fixed Q
   is the svd method, so their perplexities must agree once peft's ignored alpha/r scaling is accounted for.
The scale part (Llama-2-7B's shape) is bench/scale.py, which gpu_check.sh runs later. Prints tables; writes
$OUT/gpu_check.json (OUT defaults to /tmp/gpu_check), the device named in it.

    python -m bench.gpu_check          # from the repository root, on the GPU machine (gpu_check.sh runs it)
    python -m bench.gpu_check --small  # a 2-block hidden-64 Llama; without CUDA the "CUDA" side runs on the CPU
                                       # (CPU against CPU: it checks the script, not the GPU; the JSON says so)
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch

from bench.common import machine, write_json
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
from quailora_app.events import RunFailed, RunFinished
from quailora_app.flows.init import run_init

OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path("/tmp/gpu_check_work")


#: the model and data of each size: (hidden, MLP, blocks), (calibration windows, tokens each, held-out tokens), rank
SIZES = {"gpu": dict(model=(256, 512, 4), data=(32, 128, 4096), rank=16, baselines=True),
         "small": dict(model=(64, 128, 2), data=(8, 32, 512), rank=4, baselines=False)}
SIZE = SIZES["gpu"]


def small_model_and_text() -> tuple[Path, Path]:
    from tests.helpers import TINY_TEXT, save_tiny_llama

    hidden, intermediate, layers = SIZE["model"]
    folder = save_tiny_llama(WORK / f"llama-{hidden}-{layers}", hidden=hidden, intermediate=intermediate,
                             layers=layers)
    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    text = WORK / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)))
    return folder, text


def init_on(device: str, folder: Path, text: Path, methods, dtype="float32") -> dict:
    samples, seq_len, eval_tokens = SIZE["data"]
    cfg = InitConfig(ModelConfig(str(folder), device, dtype),
                     DataConfig(str(text), seq_len=seq_len, calib_samples=samples, eval_tokens=eval_tokens),
                     lora=LoraSettings(rank=SIZE["rank"]), methods=methods, baselines=SIZE["baselines"],
                     out=str(WORK / f"run-{device}-{dtype}-{len(list(WORK.glob('run-*')))}"))
    for event in run_init(cfg):
        if isinstance(event, RunFailed):
            raise SystemExit(f"{device}: {event.message}")
        if isinstance(event, RunFinished):
            return event.report
    raise SystemExit("no result")


def check_cpu_vs_cuda() -> dict:
    folder, text = small_model_and_text()
    cuda = torch.cuda.is_available()
    other = "cuda" if cuda else "cpu"
    cpu = init_on("cpu", folder, text, ("svd", "quailora", "closed_form"))
    gpu = init_on(other, folder, text, ("svd", "quailora", "closed_form", "loftq") if cuda
                  else ("svd", "quailora", "closed_form"))
    gpu_bf16 = init_on(other, folder, text, ("svd", "quailora", "closed_form"), "bfloat16") if cuda else None
    worst = {}
    for m in ("svd", "quailora", "closed_form"):
        ratios = [g["calibrated_error"][m] ** 2 / c["calibrated_error"][m] ** 2
                  for c, g in zip(cpu["layers"], gpu["layers"])]
        worst[m] = max(abs(r - 1) for r in ratios)
    hidden, _, layers = SIZE["model"]
    samples, seq_len, _ = SIZE["data"]
    if not cuda:
        print("NOTE: no CUDA device here: the 'CUDA' side ran on the CPU (CPU against CPU), which checks this script, "
              "not the GPU; LoftQ and the bfloat16 run need CUDA and were skipped")
    print(f"\n## CPU vs {other.upper()} (float32 compute), Llama ({layers} blocks, hidden {hidden}), "
          f"rank {SIZE['rank']}, {samples} x {seq_len} calibration tokens")
    print("| method | max per-layer |objective ratio - 1| | ppl CPU | ppl CUDA fp32 | ppl CUDA bf16 "
          "| seconds CPU | seconds CUDA |")
    print("|---|---|---|---|---|---|---|")
    for m in ("qlora", "svd", "quailora", "closed_form", "loftq", "int8", "full"):
        w = f"{100 * worst[m]:.3f}%" if m in worst else "-"
        f = lambda r, m=m: f"{r['perplexity'][m]:.3f}" if m in r["perplexity"] else "-"  # noqa: E731
        s = lambda r, m=m: f"{r['seconds'][m]:.2f}" if m in r["seconds"] else "-"  # noqa: E731
        print(f"| {m} | {w} | {f(cpu)} | {f(gpu)} | {f(gpu_bf16) if gpu_bf16 else '-'} | {s(cpu)} | {s(gpu)} |")
    print("loftq:", gpu["unavailable"].get("loftq", "ran") if cuda else "needs CUDA: not run")
    within = max(worst.values()) <= 0.01
    print(f"objective within 1% of the CPU path's on every layer: {'yes' if within else 'NO'} "
          f"(worst {100 * max(worst.values()):.3f}%)")
    return {"cuda_side_device": other, "within_1_percent": within,
            "note": None if cuda else "no CUDA: CPU against CPU (checks the script, not the GPU); LoftQ and bf16 "
                                      "skipped",
            "cpu": cpu["perplexity"], "cuda": gpu["perplexity"],
            "cuda_bf16": gpu_bf16["perplexity"] if gpu_bf16 else None, "worst_objective_ratio": worst,
            "seconds_cpu": cpu["seconds"], "seconds_cuda": gpu["seconds"], "unavailable": gpu["unavailable"],
            "device_cuda_side": gpu.get("device"), "settings": SIZE}


def main(argv: list[str] | None = None) -> None:
    global SIZE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (the script's own check, on the CPU)")
    args = parser.parse_args(argv)
    SIZE = SIZES["small" if args.small else "gpu"]
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    at_start = machine()
    print("device:", at_start["device"], "| torch", torch.__version__)
    results = {"part": "cpu_vs_cuda", "small": args.small, "machine": at_start, "cpu_vs_cuda": check_cpu_vs_cuda()}
    write_json(results, OUT / "gpu_check.json")
    if not results["cpu_vs_cuda"]["within_1_percent"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
