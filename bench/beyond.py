"""Beyond the paper, measured: every initialization of the registry (the paper's and the whole-model methods:
error feedback, budgeted ranks, distillation) at ranks 8, 16 and 64 on the embedded model, and at rank 16 across
texts (calibrate on one embedded text, measure on the other), in one table.

    python -m bench.beyond                                    # the full table (about half an hour on 2 cores)
    python -m bench.beyond --ranks 16 --no-cross --calib-samples 16 --eval-tokens 4096    # a quick look
    python -m bench.beyond --resume                           # after a stop: keeps the settings already in --json
    python -m bench.beyond --from-json runs/bench/beyond.json # reprint

Per setting: held-out perplexity of 4-bit + each initialization, the share of the 4-bit -> 8-bit gap it closes
(and of the 4-bit -> full-precision gap), its seconds (as the init report measures them), and the peak resident
memory of the process while it was computed (sampled every 20 ms; the per-layer methods share one pass, so they
share its figure). lora_alpha = r everywhere (s = 1), so ranks compare at the same scaling; the budgeted method
spends exactly the parameter count of uniform rank r. The 8-bit and full-precision perplexities are measured once
per evaluation text.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from bench.common import (
    OUT,
    add_json_args,
    fmt,
    machine,
    machine_line,
    markdown_table,
    percent,
    reprint,
    resume,
    write_json,
)
from quailora_app.config import DataConfig, InitConfig, LoraSettings
from quailora_app.engine.evaluation.evaluate import gap_closed
from quailora_app.engine.methods.registry import model_method_names
from quailora_app.events import RunFailed, RunFinished, Stage
from quailora_app.flows.init import run_init
from quailora_app.units import GIB

PER_LAYER = ("qlora", "svd", "quailora", "closed_form")
TEXTS = {"embedded": "rotten tomatoes", "embedded:speeches": "convention speeches"}


class PeakByStage:
    """Resident memory of this process sampled every 20 ms, its peak kept per stage of the run."""

    def __init__(self) -> None:
        self.stage, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.02):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)

    def enter(self, stage: str) -> None:
        self.stage = stage

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def one_run(args, rank: int, dataset: str, eval_dataset: str, baselines: bool, out: Path) -> dict:
    methods = (*PER_LAYER, *model_method_names())
    cfg = InitConfig(data=DataConfig(dataset=dataset, eval_dataset=eval_dataset, seq_len=args.seq_len,
                                     calib_samples=args.calib_samples, eval_tokens=args.eval_tokens),
                     lora=LoraSettings(rank=rank, alpha=float(rank)), methods=methods, baselines=baselines,
                     out=str(out))
    meter = PeakByStage()
    try:
        for event in run_init(cfg):
            if isinstance(event, Stage):
                meter.enter(event.message.split(":")[0] if event.stage == "initialize" else event.stage)
                print(f"  [{event.stage}] {event.message[:100]}", file=sys.stderr)
            if isinstance(event, RunFailed):
                raise SystemExit(f"error: {event.message}")
            if isinstance(event, RunFinished):
                report = event.report
    finally:
        meter.close()
    memory = {m: meter.peaks.get(m, meter.peaks.get("calibrate")) for m in methods}  # per-layer ones: their pass
    return {"rank": rank, "dataset": dataset, "eval_dataset": eval_dataset, "perplexity": report["perplexity"],
            "seconds": report["seconds"], "memory": memory, "stages": meter.peaks,
            "ranks": report.get("ranks", {}), "details": report.get("method_details", {})}


def table(result: dict) -> str:
    rows = []
    for run in result["runs"]:
        ref = result["references"][run["eval_dataset"]]
        ppl = run["perplexity"]
        setting = (f"r={run['rank']}, {TEXTS.get(run['dataset'], run['dataset'])} -> "
                   f"{TEXTS.get(run['eval_dataset'], run['eval_dataset'])}")
        for name in ppl:
            if name in ("int8", "full"):
                continue
            mem = run["memory"].get(name)
            rows.append([setting, name, f"{ppl[name]:.3f}", percent(gap_closed(ppl[name], ppl.get("qlora"),
                                                                                 ref.get("int8"))),
                         percent(gap_closed(ppl[name], ppl.get("qlora"), ref.get("full"))),
                         fmt(run["seconds"].get(name) or None, ".1f"), fmt(mem / GIB if mem else None)])
    refs = "; ".join(f"{TEXTS.get(k, k)}: 8-bit {v['int8']:.3f}, full {v['full']:.3f}"
                     for k, v in result["references"].items())
    head = [f"# {result['settings']}", f"reference perplexities: {refs}"]
    if result.get("machine"):
        head.append(f"machine: {machine_line(result['machine'])}")
    return "\n".join([*head, "", markdown_table(
        ["setting", "method", "perplexity", "gap closed vs 8-bit", "vs full", "seconds", "peak memory (GiB)"], rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--cross-rank", type=int, default=16, help="rank of the across-texts runs")
    parser.add_argument("--no-cross", action="store_true", help="skip the across-texts runs")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    add_json_args(parser, str(OUT / "beyond.json"))
    args = parser.parse_args(argv)
    if reprint(args, table):
        return 0
    work = Path(args.json).with_suffix("")
    settings = []
    for r in args.ranks:  # the across-texts runs right after their rank's own run: the most telling rows first
        settings.append((r, "embedded", "embedded"))
        if r == args.cross_rank and not args.no_cross:
            settings += [(r, "embedded", "embedded:speeches"), (r, "embedded:speeches", "embedded")]
    result = resume(args, {"settings": f"embedded SmolLM2, nf4, all-linear, alpha = r, {args.calib_samples} x "
                                       f"{args.seq_len} calibration tokens, {args.eval_tokens} held-out tokens",
                           "machine": machine(), "runs": [], "references": {}})
    done = {(run["rank"], run["dataset"], run["eval_dataset"]) for run in result["runs"]}
    start = time.perf_counter()
    for rank, dataset, eval_dataset in [s for s in settings if s not in done]:
        print(f"rank {rank}: calibrate on {dataset}, evaluate on {eval_dataset}", file=sys.stderr)
        fresh = eval_dataset not in result["references"]
        run = one_run(args, rank, dataset, eval_dataset, fresh, work / f"r{rank}-{dataset}-{eval_dataset}")
        if fresh:
            result["references"][eval_dataset] = {k: run["perplexity"][k] for k in ("int8", "full")}
        result["runs"].append(run)
        write_json(result, args.json)
    print(table(result))
    print(f"\n{time.perf_counter() - start:.0f} s in all; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
