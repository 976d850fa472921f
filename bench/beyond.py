"""Beyond the paper, measured: every initialization of the registry (the paper's and the whole-model methods:
error feedback, budgeted ranks, distillation) at ranks 8, 16 and 64 on the embedded model, and at rank 16 across
texts (calibrate on one embedded text, measure on the other), in one table.

    python bench/beyond.py                                    # the full table (about half an hour on 2 cores)
    python bench/beyond.py --ranks 16 --no-cross --calib-samples 16 --eval-tokens 4096    # a quick look
    python bench/beyond.py --from-json runs/bench/beyond.json # reprint

Per setting: held-out perplexity of 4-bit + each initialization, the share of the 4-bit -> 8-bit gap it closes
(and of the 4-bit -> full-precision gap), its seconds (as the init report measures them), and the peak resident
memory of the process while it was computed (sampled every 20 ms; the per-layer methods share one pass, so they
share its figure). lora_alpha = r everywhere (s = 1), so ranks compare at the same scaling; the budgeted method
spends exactly the parameter count of uniform rank r. The 8-bit and full-precision perplexities are measured once
per evaluation text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quailora_app.config import DataConfig, InitConfig, LoraSettings  # noqa: E402
from quailora_app.engine.evaluation.evaluate import gap_closed  # noqa: E402
from quailora_app.engine.methods.registry import model_method_names  # noqa: E402
from quailora_app.events import RunFailed, RunFinished, Stage  # noqa: E402
from quailora_app.flows.init import run_init  # noqa: E402
from quailora_app.units import GIB  # noqa: E402

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
    rows = ["| setting | method | perplexity | gap closed vs 8-bit | vs full | seconds | peak memory (GiB) |",
            "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        ref = result["references"][run["eval_dataset"]]
        ppl = run["perplexity"]
        setting = (f"r={run['rank']}, {TEXTS.get(run['dataset'], run['dataset'])} -> "
                   f"{TEXTS.get(run['eval_dataset'], run['eval_dataset'])}")
        for name in ppl:
            if name in ("int8", "full"):
                continue
            g8 = gap_closed(ppl[name], ppl.get("qlora"), ref.get("int8"))
            gf = gap_closed(ppl[name], ppl.get("qlora"), ref.get("full"))
            sec = run["seconds"].get(name)
            mem = run["memory"].get(name)
            rows.append(f"| {setting} | {name} | {ppl[name]:.3f} | {f'{100 * g8:.1f}%' if g8 is not None else '-'} | "
                        f"{f'{100 * gf:.1f}%' if gf is not None else '-'} | {f'{sec:.1f}' if sec else '-'} | "
                        f"{f'{mem / GIB:.2f}' if mem else '-'} |")
    refs = "; ".join(f"{TEXTS.get(k, k)}: 8-bit {v['int8']:.3f}, full {v['full']:.3f}"
                     for k, v in result["references"].items())
    return "\n".join([f"# {result['settings']}", f"reference perplexities: {refs}", "", *rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--cross-rank", type=int, default=16, help="rank of the across-texts runs")
    parser.add_argument("--no-cross", action="store_true", help="skip the across-texts runs")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--json", default="runs/bench/beyond.json")
    parser.add_argument("--from-json", help="reprint a finished run's table")
    parser.add_argument("--resume", action="store_true", help="keep the settings already in --json and run the rest")
    args = parser.parse_args(argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return 0
    work = Path(args.json).with_suffix("")
    settings = []
    for r in args.ranks:  # the across-texts runs right after their rank's own run: the most telling rows first
        settings.append((r, "embedded", "embedded"))
        if r == args.cross_rank and not args.no_cross:
            settings += [(r, "embedded", "embedded:speeches"), (r, "embedded:speeches", "embedded")]
    result = {"settings": f"embedded SmolLM2, nf4, all-linear, alpha = r, {args.calib_samples} x {args.seq_len} "
                          f"calibration tokens, {args.eval_tokens} held-out tokens",
              "runs": [], "references": {}}
    if args.resume and Path(args.json).exists():  # keep the settings a stopped run finished
        result = json.loads(Path(args.json).read_text())
    done = {(run["rank"], run["dataset"], run["eval_dataset"]) for run in result["runs"]}
    start = time.perf_counter()
    for rank, dataset, eval_dataset in [s for s in settings if s not in done]:
        print(f"rank {rank}: calibrate on {dataset}, evaluate on {eval_dataset}", file=sys.stderr)
        fresh = eval_dataset not in result["references"]
        run = one_run(args, rank, dataset, eval_dataset, fresh, work / f"r{rank}-{dataset}-{eval_dataset}")
        if fresh:
            result["references"][eval_dataset] = {k: run["perplexity"][k] for k in ("int8", "full")}
        result["runs"].append(run)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\n{time.perf_counter() - start:.0f} s in all; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
