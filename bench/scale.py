"""Seconds and peak memory of the init beside a plain QLoRA set-up and step, for a model shape given by a config.

    python -m bench.scale                      # small Llama shape (runs on the CPU here in a few minutes)
    python -m bench.scale --shape 7b           # Llama-2-7B's shape, random weights (one GPU)
    python -m bench.scale --shape tiny         # 2 blocks of hidden 256: seconds (bench/gpu_check.sh --small)
    python -m bench.scale --shape path/to/config.json --blocks 4 --samples 16 --seq-len 512

Each stage runs in a fresh child process, so its peak memory is its own: peak CUDA memory allocated on a GPU,
peak resident anonymous memory (RssAnon, sampled every 5 ms) on the CPU. Stages:
  qlora       load the 4-bit model, attach LoRA (peft's default init: the plain QLoRA set-up), one AdamW step
              at batch 1 x seq-len
  init        load the 4-bit model, block-by-block calibration (samples x seq-len tokens), then svd (uncalibrated,
              exact truncated SVD), quailora (20 ALS rounds) and closed_form with the exact solver
  randomized  the same with closed_form's randomized solver (its objective is compared with the exact one's)
  loftq       peft's replace_lora_weights_loftq, one iteration (CUDA only; on the CPU the svd method, the
              same math, is the anchor)
Prints a Markdown table and writes JSON (--json, default runs/bench/scale-<shape>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from bench.common import OUT, ROOT, machine, module_command, write_json
from quailora_app.units import GIB

SHAPES = {
    # Llama-2-7B: 32 blocks of hidden 4096, MLP 11008, 32 heads, vocabulary 32000
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # small enough for two CPU cores: 4 blocks of hidden 1024, MLP 2816 (a 7B block scaled down 4x)
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096),
    # seconds on the CPU: the script's own check (bench/gpu_check.sh --small)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512),
}
DEFAULTS = {"7b": dict(samples=128, seq_len=2048, rank=64), "small": dict(samples=32, seq_len=512, rank=16),
            "tiny": dict(samples=4, seq_len=64, rank=8)}
WORK = Path(os.environ.get("QUAILORA_BENCH_WORK", "/tmp/quailora_bench"))


def anonymous_rss() -> int:
    """Resident anonymous memory of this process (RssAnon: heap and tensors, not the pages of loaded libraries)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory of a stage: max_memory_allocated on CUDA; on the CPU the process's resident anonymous memory
    sampled every 5 ms (RSS would also count the code pages of the linear-algebra libraries a stage touches)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()
        self.peak = anonymous_rss()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, anonymous_rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, anonymous_rss())


def model_folder(shape: str, blocks: int | None) -> tuple[Path, dict]:
    """A safetensors checkpoint of the shape with random weights (bf16), written once and reused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape in SHAPES:
        spec = dict(SHAPES[shape])
    else:
        spec = json.loads(Path(shape).read_text())
    if blocks:
        spec["num_hidden_layers"] = blocks
    tag = "-".join(f"{spec[k]}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    folder = WORK / f"llama-{tag}"
    if not (folder / "config.json").exists():
        config = LlamaConfig(**{k: v for k, v in spec.items() if k != "model_type"})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        tmp = folder.with_suffix(".tmp")
        model.save_pretrained(tmp)
        del model
        tmp.rename(folder)
    return folder, spec


def run_stage(stage: str, args) -> dict:
    """One stage in this process; returns its row."""
    import torch

    from quailora_app.config import LoraSettings, QuantConfig
    from quailora_app.engine.calibration.initialize import InitResult, initialize, one_cpu_thread
    from quailora_app.engine.calibration.plan import target_paths
    from quailora_app.engine.checkpoint import Checkpoint
    from quailora_app.engine.quantization.bnb import load_4bit
    from quailora_app.sources.models import ModelSource, compute_dtype, pick_device

    device = pick_device(args.device)
    dtype = compute_dtype("auto", device)
    folder = Path(args.folder)
    lora = LoraSettings(rank=args.rank, alpha=16)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    row: dict = {"stage": stage, "device": str(device)}
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        model = load_4bit(ModelSource("bench", folder), QuantConfig(), device, dtype)
        row["load_s"] = time.perf_counter() - t0
    row["load_peak_bytes"] = mem.peak
    row["model_bytes"] = int(torch.cuda.memory_allocated()) if device.type == "cuda" else None

    if stage in ("init", "randomized"):
        methods = tuple(args.methods) if stage == "init" else ("svd", "closed_form")
        solver = "exact" if stage == "init" else "randomized"
        result = InitResult()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            for _ in initialize(model, Checkpoint(folder), ids, lora, methods, result, device=device,
                                calib_dtype=dtype if device.type == "cuda" else torch.float32, solver=solver):
                pass
            row["init_s"] = time.perf_counter() - t0
        row["init_peak_bytes"] = mem.peak
        row["seconds"] = dict(result.seconds)
        row["calibrated_error"] = {m: [layer["calibrated_error"][m] for layer in result.layers] for m in methods}
    elif stage == "qlora":
        from quailora_app.engine.adapters import attach_lora

        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            peft_model = attach_lora(model, lora, target_paths(model, lora))
            row["setup_s"] = time.perf_counter() - t0
        row["setup_peak_bytes"] = mem.peak
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4)
        peft_model.train()
        batch = ids[:1].to(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = peft_model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            row["step_s"] = time.perf_counter() - t0
        row["step_peak_bytes"] = mem.peak
    elif stage == "loftq":
        from quailora_app.engine.adapters import attach_lora, loftq_factors
        from quailora_app.engine.calibration.calibrate import decoder_layers
        from quailora_app.errors import one_line

        prefix, layers = decoder_layers(model)
        blocks = min(args.loftq_blocks or len(layers), len(layers))
        paths = [p for p in target_paths(model, lora) if int(p[len(prefix) + 1:].split(".")[0]) < blocks]
        row["loftq_blocks"], row["blocks"] = blocks, len(layers)
        peft_model = attach_lora(model, lora, paths)
        with PeakMemory(device) as mem, one_cpu_thread(device):
            t0 = time.perf_counter()
            try:
                loftq_factors(peft_model, folder)
                row["loftq_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - peft needs CUDA; say why it did not run
                row["unavailable"] = f"{type(exc).__name__}: {one_line(exc, 120)}"
        row["loftq_peak_bytes"] = mem.peak
    return row


def run_child(cmd: list[str], timeout: float) -> dict:
    """Run one bench stage in a fresh Python process (its peak memory is its own; `cmd` from
    common.module_command, run from the repository root); its last JSON line, or {"failed": why} in one line."""
    # glibc would keep freed blocks of up to 32 MB in its heap after the first large free (dynamic mmap
    # threshold), so RSS would not fall back with the live tensors; a fixed threshold makes it follow them.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"failed": " | ".join(tail)}
    return json.loads(lines[-1])


def child(stage: str, args, folder: Path, vocab: int) -> dict:
    row = run_child(module_command(__file__, "--stage", stage, "--folder", str(folder), "--vocab", str(vocab),
                                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--rank",
                                   str(args.rank), "--device", args.device, "--methods", *args.methods,
                                   "--loftq-blocks", str(args.loftq_blocks or 0)), args.stage_timeout)
    return row if "failed" not in row else {"stage": stage, **row}


def gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) else "-"


def report(rows: dict, args, spec: dict) -> dict:
    init, rand, qlora, loftq = (rows.get(k, {}) for k in ("init", "randomized", "qlora", "loftq"))
    sec = init.get("seconds", {})
    rsec = rand.get("seconds", {})
    print(f"\n## {args.shape} shape: {spec['num_hidden_layers']} blocks, hidden {spec['hidden_size']}, "
          f"MLP {spec['intermediate_size']}; "
          f"nf4; rank {args.rank} all-linear; calibration {args.samples} x {args.seq_len} tokens; "
          f"device {init.get('device', '?')}")
    print("| stage | seconds | peak memory (GiB) |\n|---|---|---|")
    print(f"| load + quantize (4-bit) | {init.get('load_s', float('nan')):.1f} | {gib(init.get('load_peak_bytes'))} |")
    print(f"| plain QLoRA set-up (attach LoRA) | {qlora.get('setup_s', float('nan')):.2f} | "
          f"{gib(qlora.get('setup_peak_bytes'))} |")
    print(f"| one QLoRA step, batch 1 x {args.seq_len} | {qlora.get('step_s', float('nan')):.2f} | "
          f"{gib(qlora.get('step_peak_bytes'))} |")
    print(f"| init: calibration + {' + '.join(args.methods)} (closed_form exact) | "
          f"{init.get('init_s', float('nan')):.1f} | {gib(init.get('init_peak_bytes'))} |")
    for key, label in (("calibrate", "  of which calibration"), ("svd", "  svd (exact truncated SVD)"),
                       ("quailora", "  quailora (20 ALS rounds)"), ("closed_form", "  closed_form, exact")):
        if key in sec:
            print(f"| {label} | {sec[key]:.2f} | |")
    if rsec:
        print(f"| init: calibration + svd + closed_form (randomized) | {rand.get('init_s', float('nan')):.1f} | "
              f"{gib(rand.get('init_peak_bytes'))} |")
        print(f"|   svd (same run) | {rsec.get('svd', float('nan')):.2f} | |")
        print(f"|   closed_form, randomized | {rsec.get('closed_form', float('nan')):.2f} | |")
    if "loftq_s" in loftq:
        part = ("" if loftq["loftq_blocks"] == loftq["blocks"]
                else f" ({loftq['loftq_blocks']} of {loftq['blocks']} blocks)")
        print(f"| peft LoftQ, 1 iteration{part} | {loftq['loftq_s']:.2f} | {gib(loftq.get('loftq_peak_bytes'))} |")
    else:
        print(f"| peft LoftQ, 1 iteration | n/a: {loftq.get('unavailable', loftq.get('failed', 'not run'))} "
              f"| (svd is its math) |")
    summary: dict = {}
    if sec.get("svd"):
        summary["closed_form_exact_over_svd"] = sec["closed_form"] / sec["svd"]
    if rsec.get("svd"):
        summary["closed_form_randomized_over_svd"] = rsec["closed_form"] / rsec["svd"]
    if init.get("calibrated_error") and rand.get("calibrated_error"):
        exact, approx = init["calibrated_error"]["closed_form"], rand["calibrated_error"]["closed_form"]
        gaps = [(a * a - e * e) / (e * e) for e, a in zip(exact, approx) if e > 0]
        summary["randomized_objective_gap_max"] = max(gaps)
        summary["randomized_objective_gap_mean"] = sum(gaps) / len(gaps)
    if init.get("init_peak_bytes") and qlora.get("step_peak_bytes"):
        summary["init_peak_over_qlora_step_peak"] = init["init_peak_bytes"] / qlora["step_peak_bytes"]
    if "loftq_s" in loftq and sec.get("closed_form"):  # per block, as LoftQ may have run on the first blocks only
        per_block = loftq["loftq_s"] / loftq["loftq_blocks"]
        summary["loftq_s_per_block"] = per_block
        summary["closed_form_over_loftq_per_block"] = sec["closed_form"] / spec["num_hidden_layers"] / per_block
        if sec.get("svd"):
            summary["svd_over_loftq_per_block"] = sec["svd"] / spec["num_hidden_layers"] / per_block
    print()
    for key, value in summary.items():
        print(f"- {key}: {value:.4g}")
    for name, row in rows.items():
        if "failed" in row:
            print(f"- stage {name} failed: {row['failed']}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", help="small, 7b, or a config.json of a Llama-like model")
    parser.add_argument("--blocks", type=int, default=None, help="override the number of decoder blocks")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (calibration and the QLoRA step)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", nargs="+", default=["qlora", "init", "randomized", "loftq"],
                        choices=["qlora", "init", "randomized", "loftq"])
    parser.add_argument("--methods", nargs="+", default=["svd", "quailora", "closed_form"],
                        choices=["svd", "quailora", "closed_form"], help="methods of the init stage")
    parser.add_argument("--loftq-blocks", type=int, default=None,
                        help="run peft's LoftQ on the first N blocks only (it is slow on big models); "
                             "seconds are per block too")
    parser.add_argument("--stage-timeout", type=float, default=None, help="seconds before a stage is given up")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--make-only", action="store_true",
                        help="only write the random-weight checkpoint (bench/gpu_check.sh does it ahead)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape not in SHAPES and not args.stage and not Path(args.shape).is_file():
        parser.error(f"--shape must be {' or '.join(SHAPES)} or a config.json file; {args.shape!r} is neither")
    defaults = DEFAULTS.get(args.shape, DEFAULTS["small"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stage:  # child process
        from quailora_app.engine.quiet import quiet_libraries

        quiet_libraries()
        print(json.dumps(run_stage(args.stage, args)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder, spec = model_folder(args.shape, args.blocks)
    print(f"random-weight checkpoint: {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.make_only:
        return
    out = Path(args.json or OUT / f"scale-{Path(args.shape).stem}.json")
    rows: dict = {}
    at_start = machine()

    def write(summary: dict) -> None:  # after every stage, so a run cut short keeps what it measured
        write_json({"shape": args.shape, "spec": spec, "samples": args.samples, "seq_len": args.seq_len,
                    "rank": args.rank, "rows": rows, "summary": summary, "machine": at_start}, out)

    for stage in args.stages:
        t0 = time.perf_counter()
        rows[stage] = child(stage, args, folder, spec["vocab_size"])
        print(f"stage {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
        write({})
    write(report(rows, args, spec))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
