"""Bits as a dial: held-out perplexity, share of the gap to full precision closed, memory per weight and seconds
over bases (HQQ 2/3/4/8-bit, bitsandbytes NF4 and LLM.int8) x methods, one across-bits run per model
(flows/bits.py: one calibration shared by every base).

    python -m bench.bits                                   # embedded SmolLM2, HQQ 2/3/4-bit + NF4, rank 16
    python -m bench.bits --models embedded embedded:gemma3 --methods svd closed_form sequential
    python -m bench.bits --from-json runs/bench/bits.json   # reprint

Each model's result is written to --json as soon as its run ends (--resume keeps the models already done).
"""
from __future__ import annotations

import argparse
import time

from bench.common import (
    OUT,
    add_json_args,
    command_line,
    machine,
    machine_line,
    markdown_table,
    reprint,
    resume,
    write_json,
)

GOALS = ("at 3 bits the best method at most 100 (the closed form: 125); moonshot: at most plain 4-bit's 86.8")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bits", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["embedded"], help="models to run (default: embedded)")
    p.add_argument("--bases", nargs="+", default=["hqq2", "hqq3", "hqq4", "nf4"], help="bases (flows/bits.py)")
    p.add_argument("--methods", nargs="+", default=["svd", "closed_form"], help="initializations on every base")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    add_json_args(p, str(OUT / "bits.json"))
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("bases", "methods", "rank", "group_size", "calib_samples", "seq_len",
                                          "eval_tokens")}


def run_model(model: str, args: argparse.Namespace) -> dict:
    """One across-bits run of `model`: its report's points, full precision, reading and seconds."""
    from quailora_app.config import BitsConfig, DataConfig, LoraSettings, ModelConfig
    from quailora_app.events import RunFailed, RunFinished, Stage
    from quailora_app.flows.bits import run_bits

    cfg = BitsConfig(model=ModelConfig(model), data=DataConfig(seq_len=args.seq_len, calib_samples=args.calib_samples,
                                                                eval_tokens=args.eval_tokens),
                     lora=LoraSettings(rank=args.rank, alpha=args.rank), bases=tuple(args.bases),
                     methods=tuple(args.methods), group_size=args.group_size,
                     out=str(OUT / f"bits-{model.replace(':', '-')}"))
    start = time.perf_counter()
    for event in run_bits(cfg):
        if isinstance(event, Stage):
            print(f"  [{model}] {event.message}", flush=True)
        elif isinstance(event, RunFailed):
            raise SystemExit(f"error: {model}: {event.message}")
        elif isinstance(event, RunFinished):
            report = event.report
    return {"points": report["points"], "full": report["full"], "reading": report["reading"],
            "seconds": report["seconds"], "wall_seconds": time.perf_counter() - start, "run": cfg.out}


def table(result: dict) -> str:
    """bits x method per model: perplexity, gap to full precision closed at that base, memory per weight, seconds."""
    lines = []
    for model, run in result["models"].items():
        full = run["full"]
        plain = {p["base"]: p["perplexity"] for p in run["points"].values() if p["method"] == "qlora"}
        rows = []
        for point in run["points"].values():
            base_ppl = plain[point["base"]]
            closed = None if point["method"] == "qlora" or base_ppl <= full else \
                (base_ppl - point["perplexity"]) / (base_ppl - full)
            correct = run["seconds"].get(f"correct_{point['base']}", {}).get(point["method"])
            rows.append([point["label"], point["method"], f"{point['perplexity']:,.2f}",
                         "-" if closed is None else f"{100 * closed:.1f}%", f"{point['bits_per_weight']:.2f}",
                         "-" if correct is None else f"{correct:.1f}", f"{point['eval_seconds']:.1f}"])
        rows.append(["full precision", "-", f"{full:.2f}", "-", "16", "-", "-"])
        lines += [f"### {model}", "", markdown_table(
            ["base", "method", "perplexity", "gap to full closed", "bits / weight (with adapter)",
             "correction s", "eval s"], rows), "", run["reading"],
                  f"wall {run['wall_seconds']:.0f} s (calibration and corrections of every base "
                  f"{run['seconds'].get('calibrate_and_correct', 0):.0f} s)", ""]
    lines += [f"goals: {GOALS}", machine_line(result["machine"]), f"command: {result['command']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if reprint(args, table):
        return 0
    from quailora_app.threads import apply_thread_policy

    apply_thread_policy()
    result = resume(args, {"settings": settings_of(args), "models": {}, "machine": machine(),
                           "command": command_line(__file__, argv)})
    for model in args.models:
        if model in result["models"]:
            continue
        result["models"][model] = run_model(model, args)
        write_json(result, args.json)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
