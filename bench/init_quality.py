"""Init quality on one model: per method, seconds, calibrated error (median/min/max over layers),
held-out perplexity and the share of the 4-bit -> 8-bit (and -> full precision) gap it closes.
peft's LoftQ (replace_lora_weights_loftq, one iteration) is the anchor where it runs (it needs CUDA).

    python -m bench.init_quality                         # embedded SmolLM2 + rotten-tomatoes, rank 16, 64 x 256
    python -m bench.init_quality --rank 64 --out runs/bench-r64
    python -m bench.init_quality --from-report runs/bench-r64/report.json   # reprint a finished run
Any flag of `python -m quailora_app init` is accepted.
"""
from __future__ import annotations

import statistics
import sys

from bench.common import run_or_reprint
from quailora_app.cli import init_config
from quailora_app.flows.init import run_init
from quailora_app.units import format_bytes


def table(report: dict) -> str:
    ppl, seconds = report["perplexity"], report["seconds"]
    head = (f"# {report['model']} on {report['dataset']} | {report['device']} | rank {report['rank']}, "
            f"alpha {report['alpha']}"
            f" | calibration {report.get('tokens', {}).get('calibration', '?')} tokens, "
            f"eval {report.get('tokens', {}).get('eval', '?')} tokens"
            f" | load {seconds.get('load', 0):.1f} s, calibration {seconds.get('calibrate', 0):.1f} s")
    rows = [head, "",
            "| method | seconds | calibrated error median | min | max | perplexity "
            "| gap closed vs 8-bit | gap closed vs full |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ("full", "int8", *report["methods"]):
        errs = [layer["calibrated_error"][name] for layer in report["layers"] if name in layer["calibrated_error"]]
        med, lo, hi = ((f"{statistics.median(errs):.3f}", f"{min(errs):.3f}", f"{max(errs):.3f}") if errs
                       else ("-", "-", "-"))
        p = f"{ppl[name]:.3f}" if ppl.get(name) is not None else report.get("unavailable", {}).get(name, "n/a")
        g8, gf = report["gap_closed"].get(name), report.get("gap_closed_full", {}).get(name)
        sec = seconds.get(name)
        label = {"full": "full precision", "int8": "8-bit LLM.int8", "loftq": "loftq (peft anchor)"}.get(name, name)
        rows.append(f"| {label} | {f'{sec:.2f}' if sec is not None else '-'} | {med} | {lo} | {hi} | {p} | "
                    f"{f'{100 * g8:.1f}%' if g8 is not None else '-'} | "
                    f"{f'{100 * gf:.1f}%' if gf is not None else '-'} |")
    q, c = ppl.get("quailora"), ppl.get("closed_form")
    if q and c:
        rows.append(f"\nquailora vs closed_form perplexity: {100 * abs(q - c) / c:.2f}% apart")
    if seconds.get("svd"):
        for m in ("quailora", "closed_form"):
            if seconds.get(m):
                rows.append(f"{m} seconds / svd seconds: {seconds[m] / seconds['svd']:.2f}")
    rows.append(f"peak memory: {format_bytes(report['peak_memory_bytes'])} "
                f"({'CUDA allocated' if 'cuda' in report['device'] else 'process RSS'})")
    return "\n".join(rows)


def main(argv=None) -> int:
    return run_or_reprint(argv, "init", lambda args: run_init(init_config(args)), table)


if __name__ == "__main__":
    sys.exit(main())
