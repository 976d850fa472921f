"""GPU check of the init engine, for a machine with one CUDA GPU and no network (see bench/gpu_check.sh).

1. The CUDA path's init (quantize, block-by-block calibration, svd/quailora/closed_form) on a small Llama built
   from a config matches the CPU path's calibrated objective layer by layer (within 1%), at float32 compute.
2. peft's replace_lora_weights_loftq (the anchor; CUDA only) runs beside ours: one LoftQ iteration on a fixed Q
   is the svd method, so their perplexities must agree once peft's ignored alpha/r scaling is accounted for.
3. Scale probe: two decoder blocks of Llama-2-7B's shape (random weights), calibration with 128 x 2048 tokens and
   closed_form at rank 64, seconds per block and peak CUDA memory, beside one QLoRA step (batch 1 x 2048) on the
   same 4-bit model. Prints tables; writes JSON to $OUT (or /tmp/gpu_check).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from quailora_app.checkpoint import Checkpoint  # noqa: E402
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig  # noqa: E402
from quailora_app.events import RunFailed, RunFinished  # noqa: E402
from quailora_app.initialize import InitResult, initialize  # noqa: E402
from quailora_app.pipeline import run_init  # noqa: E402
from quailora_app.quantize import load_4bit  # noqa: E402
from quailora_app.sources.models import ModelSource  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path("/tmp/gpu_check_work")


def small_model_and_text() -> tuple[Path, Path]:
    from helpers import TINY_TEXT, save_tiny_llama

    folder = save_tiny_llama(WORK / "small-llama", hidden=256, intermediate=512, layers=4)
    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    text = WORK / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)))
    return folder, text


def init_on(device: str, folder: Path, text: Path, methods, dtype="float32") -> dict:
    cfg = InitConfig(ModelConfig(str(folder), device, dtype), DataConfig(str(text), seq_len=128, calib_samples=32, eval_tokens=4096),
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
        ratios = [g["calibrated_error"][m] ** 2 / c["calibrated_error"][m] ** 2 for c, g in zip(cpu["layers"], gpu["layers"])]
        worst[m] = max(abs(r - 1) for r in ratios)
    print("\n## CPU vs CUDA (float32 compute), small Llama (4 blocks, hidden 256), rank 16, 32 x 128 calibration tokens")
    print("| method | max per-layer |objective ratio - 1| | ppl CPU | ppl CUDA fp32 | ppl CUDA bf16 | seconds CPU | seconds CUDA |")
    print("|---|---|---|---|---|---|---|")
    for m in ("qlora", "svd", "quailora", "closed_form", "loftq", "int8", "full"):
        w = f"{100 * worst[m]:.3f}%" if m in worst else "-"
        f = lambda r: f"{r['perplexity'][m]:.3f}" if m in r["perplexity"] else "-"  # noqa: E731
        s = lambda r: f"{r['seconds'][m]:.2f}" if m in r["seconds"] else "-"  # noqa: E731
        print(f"| {m} | {w} | {f(cpu)} | {f(gpu)} | {f(gpu_bf16)} | {s(cpu)} | {s(gpu)} |")
    print("loftq unavailable:", gpu["unavailable"].get("loftq", "no, it ran"))
    return {"cpu": cpu["perplexity"], "cuda": gpu["perplexity"], "cuda_bf16": gpu_bf16["perplexity"], "worst_objective_ratio": worst,
            "seconds_cpu": cpu["seconds"], "seconds_cuda": gpu["seconds"], "unavailable": gpu["unavailable"]}


def scale_probe(blocks: int = 2, tokens: int = 2048, samples: int = 128, rank: int = 64) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from quailora_app.adapters import attach_lora
    from quailora_app.initialize import target_paths

    folder = WORK / "llama2-7b-shape"
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    device = torch.device("cuda")
    source = ModelSource("llama2-7b-shape", folder)
    lora = LoraSettings(rank=rank, alpha=16)
    ids = torch.randint(0, 32000, (samples, tokens), generator=torch.Generator().manual_seed(0))

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_4bit(source, QuantConfig(), device, torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = InitResult()
    t0 = time.perf_counter()
    for _ in initialize(model, Checkpoint(folder), ids, lora, ("closed_form",), result, device=device, calib_dtype=torch.bfloat16):
        pass
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    init_peak = torch.cuda.max_memory_allocated()

    peft_model = attach_lora(model, lora, target_paths(model, lora))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    peft_model.train()
    step_ids = ids[:1].to(device)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = peft_model(input_ids=step_ids, labels=step_ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    step_peak = torch.cuda.max_memory_allocated()
    row = {"blocks": blocks, "calibration": f"{samples} x {tokens}", "rank": rank, "load_s": load_s, "init_s": init_s,
           "init_s_per_block": init_s / blocks, "calibrate_s": result.seconds["calibrate"], "closed_form_s": result.seconds["closed_form"],
           "init_s_extrapolated_32_blocks": init_s / blocks * 32, "model_bytes": base_mem, "init_peak_bytes": init_peak,
           "qlora_step_s": step_s, "qlora_step_peak_bytes": step_peak}
    print(f"\n## Llama-2-7B shape, {blocks} of 32 blocks, random bf16 weights, nf4, closed_form rank {rank}, calibration {samples} x {tokens} tokens")
    print("| what | seconds | peak CUDA memory (GiB) |\n|---|---|---|")
    print(f"| load + quantize ({blocks} blocks) | {load_s:.1f} | {base_mem / 2**30:.2f} (held) |")
    print(f"| calibration + closed_form init ({blocks} blocks) | {init_s:.1f} (calibrate {result.seconds['calibrate']:.1f}, closed_form {result.seconds['closed_form']:.1f}) | {init_peak / 2**30:.2f} |")
    print(f"| same, extrapolated to 32 blocks | {init_s / blocks * 32:.0f} | per-block peak unchanged |")
    print(f"| one QLoRA step, batch 1 x {tokens}, r {rank} all-linear | {step_s:.2f} | {step_peak / 2**30:.2f} |")
    return row


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    results = {"cpu_vs_cuda": check_cpu_vs_cuda()}
    try:
        results["scale"] = scale_probe()
    except Exception as exc:  # noqa: BLE001 - report and keep the first part's results
        results["scale_error"] = f"{type(exc).__name__}: {exc}"
        print("scale probe failed:", results["scale_error"])
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
