"""Each quantizer through `replace_lora_weights_quailora` on a small Llama, the way a user's script does it, on the GPU
(bench/gpu_check.sh part 5): bitsandbytes 4-bit (NF4, double quantization), bitsandbytes 8-bit (LLM.int8) and HQQ
4-bit (hqq's own AutoHQQHFModel.quantize_model), each then get_peft_model and closed_form on calibration texts.

Per quantizer: seconds of the call, peak CUDA memory, the layers initialized and reset by the self-check, the
median calibrated error (1.0 = plain QLoRA), and the mean squared logit error to the full-precision model on
held-out texts with the adapter disabled (plain quantized) and enabled; `helped` when enabled is lower. Writes
$OUT/gpu_quantizers.json after each quantizer (OUT defaults to /tmp/gpu_check), the device named in it.

    python -m bench.gpu_quantizers            # hidden 256, 2 blocks, on CUDA (the CPU when there is none)
    python -m bench.gpu_quantizers --small    # hidden 64 (the script's own check, on the CPU)
"""
from __future__ import annotations

import argparse
import os
import random
import time
import traceback
from pathlib import Path

from bench.common import machine, write_json

OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path("/tmp/gpu_check_work")
QUANTIZERS = ("bnb4", "bnb8", "hqq4")


def texts(seed: int, n: int) -> list[str]:
    from tests.helpers import TINY_TEXT

    rng = random.Random(seed)
    words = " ".join(TINY_TEXT).split()
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]


def quantized(kind: str, folder: Path, device, dtype):
    """The model loaded and quantized as a user does it, with the LoRA target modules peft needs for it."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    place = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    holding = torch.float32 if device.type == "cpu" else dtype
    if kind == "bnb4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=holding, **place)
        if device.type == "cpu":
            from quailora_app.engine.quantization.bnb import keep_cpu_layout

            keep_cpu_layout(model)
        return model, "all-linear"
    if kind == "bnb8":
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     dtype=holding, **place)
        return model, "all-linear"
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    from quailora_app.engine.quantization.hqq import lora_targets

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=holding).to(device)
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
                                  compute_dtype=dtype, device=str(device))
    return model, lora_targets(model)  # peft's "all-linear" matches nn.Linear only, which HQQLinear is not


def one(kind: str, folder: Path, tokenizer, calib: list[str], held_out, reference, device, dtype, seq_len: int,
        samples: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from quailora_app import replace_lora_weights_quailora

    row: dict = {"quantizer": kind}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, targets = quantized(kind, folder, device, dtype)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    result = replace_lora_weights_quailora(peft_model, calib, "closed_form", tokenizer=tokenizer, seq_len=seq_len,
                                           max_samples=samples, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["seconds"] = time.perf_counter() - t0

    def error() -> float:
        with torch.no_grad():
            logits = peft_model(input_ids=held_out.to(device)).logits.float()
        return ((logits - reference) ** 2).mean().item()

    with peft_model.disable_adapter():
        row["logit_mse_plain"] = error()
    row["logit_mse_with_init"] = error()
    row["ratio"] = row["logit_mse_with_init"] / row["logit_mse_plain"]
    row["helped"] = row["logit_mse_with_init"] < row["logit_mse_plain"]
    row["layers"] = len(result.layers)
    row["layers_reset"] = len(result.layers_reset)
    row["skipped"] = len(result.skipped)
    row["calibrated_error_median"] = result.calibrated_error_median
    row["calibration"] = result.calibration
    base = next(m for n, m in peft_model.named_modules() if n.endswith("q_proj.base_layer"))
    row["base_layer"] = type(base).__name__
    held = [*base.parameters(), *base.buffers(), *(v for v in vars(base).values() if isinstance(v, torch.Tensor))]
    row["base_device"] = str(held[0].device) if held else str(getattr(base, "device", "?"))
    row["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="hidden 64 (the script's own check, on the CPU)")
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quailora_app.engine.quiet import quiet_libraries
    from tests.helpers import save_tiny_llama

    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, intermediate, seq_len, samples = (64, 128, 32, 8) if args.small else (256, 512, 64, 32)
    folder = WORK / f"quant-llama-{hidden}"
    if not (folder / "config.json").exists():
        save_tiny_llama(folder, hidden=hidden, intermediate=intermediate, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = texts(0, 40)
    held_out = tokenizer(" ".join(texts(1, 20)), return_tensors="pt").input_ids[:, : 4 * seq_len].reshape(4, -1)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        reference = full(input_ids=held_out.to(device)).logits.float()
    del full
    at_start = machine()
    print("device:", at_start["device"])
    out = {"part": "quantizers", "small": args.small, "machine": at_start,
           "model": {"hidden": hidden, "intermediate": intermediate, "blocks": 2},
           "method": "closed_form", "rank": 8, "alpha": 16, "compute_dtype": str(dtype), "rows": {}}
    print(f"\n## replace_lora_weights_quailora per quantizer, Llama hidden {hidden}, 2 blocks, rank 8, "
          f"{samples} x {seq_len} calibration tokens, on {at_start['device']}")
    print("| quantizer | base layer | layers (reset) | calibrated error median | logit MSE plain | with init | "
          "ratio | seconds | peak CUDA GiB |\n|---|---|---|---|---|---|---|---|---|")
    failed = False
    for kind in args.quantizers:
        try:
            row = one(kind, folder, tokenizer, calib, held_out, reference, device, dtype, seq_len, samples)
            peak = f"{row['peak_cuda_bytes'] / 2**30:.3f}" if row["peak_cuda_bytes"] else "-"
            print(f"| {kind} | {row['base_layer']} on {row['base_device']} | {row['layers']} ({row['layers_reset']}) | "
                  f"{row['calibrated_error_median']:.3f} | {row['logit_mse_plain']:.4g} | "
                  f"{row['logit_mse_with_init']:.4g} | {row['ratio']:.3f} | {row['seconds']:.2f} | {peak} |")
            failed |= not row["layers"]
        except Exception as exc:  # noqa: BLE001 - one quantizer's failure is a finding; the others still run
            row = {"quantizer": kind, "failed": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=6)}
            print(f"| {kind} | FAILED: {row['failed'][:200]} |")
            failed = True
        out["rows"][kind] = row
        write_json(out, OUT / "gpu_quantizers.json")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
