"""qlora4 against quailora4 fine-tuning on a ~1B-parameter Llama built from a config (random bf16 weights), through
the app's own fine-tuning flow (quailora_app.flows.train.run_train) on the GPU (bench/gpu_check.sh part 3).

Both arms train the same steps on the same batches, one after the other (schedule "sequential": each arm's peak
CUDA memory is measured over its own steps, nothing else resident). The figures are the report's per arm: tokens/s
(batch tokens over the median step seconds) and peak memory; the ratios are quailora4 over qlora4 (the goals:
speed at least 0.95, memory at most 1.05: the init changes the starting factors, not the LoRA shape). Writes
$OUT/gpu_train.json (OUT defaults to /tmp/gpu_check), the device named in it.

    python -m bench.gpu_train            # hidden 2048, MLP 5632, 16 blocks, vocabulary 32000: 0.95B; 20 steps
    python -m bench.gpu_train --small    # hidden 64, 2 blocks, 2 steps (the script's own check, on the CPU)
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from bench.common import machine, write_json

OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path("/tmp/gpu_check_work")
#: ~1B parameters: Llama-style blocks of hidden 2048 (TinyLlama's width) with full multi-head attention
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)


def config_model(spec: dict) -> tuple[Path, int]:
    """A random-weight Llama of `spec` saved in bf16 with the tests' tiny tokenizer (its ids are a few hundred, all
    inside the vocabulary); written once. Returns the folder and the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import tiny_tokenizer

    folder = WORK / ("llama-" + "-".join(str(spec[k]) for k in ("hidden_size", "intermediate_size",
                                                                  "num_hidden_layers", "vocab_size")))
    config = LlamaConfig(**spec, tie_word_embeddings=False)
    if not (folder / "config.json").exists():
        tokenizer = tiny_tokenizer()
        ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.eos_token_id)
        config = LlamaConfig(**spec, tie_word_embeddings=False, **ids)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        tmp = folder.with_suffix(".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        tmp.rename(folder)
    with torch.device("meta"):
        count = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return folder, count


def text_file(lines: int) -> Path:
    from tests.helpers import TINY_TEXT

    path = WORK / f"train-text-{lines}.txt"
    if not path.exists():
        rng = random.Random(0)
        words = " ".join(TINY_TEXT).split()
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(lines)))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes, 2 steps (the script's own check)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 20; --small: 2)")
    args = parser.parse_args(argv)
    from quailora_app.config import DataConfig, LoraSettings, ModelConfig, TrainConfig
    from quailora_app.events import RunFailed, RunFinished, Stage, TrainStep
    from quailora_app.flows.train import run_train

    WORK.mkdir(parents=True, exist_ok=True)
    spec = SMALL if args.small else ONE_B
    t0 = time.perf_counter()
    folder, params = config_model(spec)
    print(f"model: {params / 1e6:.1f}M parameters, {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    steps, batch, seq_len, calib, eval_tokens, rank = ((2, 2, 32, 4, 256, 8) if args.small
                                                       else (20, 4, 512, 32, 8192, 64))
    steps = args.steps or steps
    cfg = TrainConfig(model=ModelConfig(str(folder)),
                      data=DataConfig(str(text_file(600 if args.small else 4000)), seq_len=seq_len,
                                      calib_samples=calib, eval_tokens=eval_tokens),
                      lora=LoraSettings(rank=rank, alpha=16), arms=("qlora4", "quailora4"), steps=steps,
                      batch_size=batch, eval_every=steps, warmup_ratio=0.0, schedule="sequential",
                      out=str(WORK / f"train-{'small' if args.small else '1b'}-{int(time.time())}"))
    at_start = machine()
    out = {"part": "train_1b", "small": args.small, "machine": at_start, "parameters": params, "spec": spec,
           "settings": {"steps": steps, "batch": batch, "seq_len": seq_len, "calib_samples": calib, "rank": rank,
                        "alpha": 16, "eval_tokens": eval_tokens, "schedule": "sequential"}}
    report = None
    t0 = time.perf_counter()
    for event in run_train(cfg):
        if isinstance(event, Stage):
            print(f"[{time.perf_counter() - t0:6.1f} s] {event.stage}: {event.message}", flush=True)
        elif isinstance(event, TrainStep) and (event.step in (1, steps) or event.step % 10 == 0):
            print(f"[{time.perf_counter() - t0:6.1f} s] {event.arm} step {event.step}/{steps} "
                  f"loss {event.train_loss:.3f}", flush=True)
        elif isinstance(event, RunFailed):
            out["failed"] = event.message
            write_json(out, OUT / "gpu_train.json")
            raise SystemExit(f"failed: {event.message}")
        elif isinstance(event, RunFinished):
            report = event.report
    out["seconds"] = time.perf_counter() - t0
    arms = report["arms"]
    keep = ("steps_done", "tokens_per_s", "median_step_seconds", "peak_memory_bytes", "memory_method",
            "step0_perplexity", "final_perplexity", "setup_seconds", "seconds")
    out["arms"] = {name: {k: arms[name].get(k) for k in keep} for name in ("qlora4", "quailora4")}
    out["report_device"] = report.get("device")
    q, a = out["arms"]["qlora4"], out["arms"]["quailora4"]
    ratio = lambda k: a[k] / q[k] if a.get(k) and q.get(k) else None  # noqa: E731
    out["speed_ratio"], out["memory_ratio"] = ratio("tokens_per_s"), ratio("peak_memory_bytes")
    out["goals"] = {"speed_at_least_0.95": out["speed_ratio"] is not None and out["speed_ratio"] >= 0.95,
                    "memory_at_most_1.05": out["memory_ratio"] is not None and out["memory_ratio"] <= 1.05}
    write_json(out, OUT / "gpu_train.json")
    print(f"\n## qlora4 vs quailora4, Llama {params / 1e6:.0f}M parameters ({spec['num_hidden_layers']} blocks, "
          f"hidden {spec['hidden_size']}), rank {rank}, {steps} steps of {batch} x {seq_len} tokens, "
          f"on {report.get('device')}")
    print("| arm | tokens/s | median step s | peak memory GiB (how) | step-0 ppl | final ppl | set-up s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in out["arms"].items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['median_step_seconds']:.3f} | "
              f"{r['peak_memory_bytes'] / 2**30:.3f} ({r['memory_method'].split(':')[0]}) | "
              f"{r['step0_perplexity']:.2f} | {r['final_perplexity']:.2f} | {r['setup_seconds']:.1f} |")
    print(f"speed ratio quailora4/qlora4: {out['speed_ratio']:.3f} (goal >= 0.95); "
          f"memory ratio: {out['memory_ratio']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
