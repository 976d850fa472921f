"""Fine-tuning gap: the default arms (qlora4, quailora4, qlora8) trained side by side on the embedded model
and text. Prints the held-out perplexity of every arm at every evaluation, the share of the 4-bit -> 8-bit
gap each arm closes at the end, and quailora4's cost against qlora4: median step time and peak memory.

    python -m bench.train_gap                                  # defaults of `python -m quailora_app train`
    python -m bench.train_gap --steps 60 --arms qlora4 quailora4 closed4 qlora8 lora16
    python -m bench.train_gap --from-report runs/train-.../report.json   # reprint a finished run
    python -m bench.train_gap --arms qlora4 quailora4 distill4 qlora8 --steps 40 --eval-every 8 --head-start 8
        # distill4 (8 distillation steps before step 0) against qlora4 / quailora4 given 8 more ordinary steps
Any flag of `python -m quailora_app train` is accepted.

Memory: on CUDA, measured (torch.cuda.max_memory_allocated, reset before each step; with the interleaved
schedule, the arm's own resident bytes plus its step's measured rise). On CPU, accounted per arm: weights and
quantization state + LoRA gradients + AdamW state + activations autograd saved for one micro-batch's backward
(the process's RSS mixes all arms and cannot be split). The report names the method used.
"""
from __future__ import annotations

import argparse
import sys

from bench.common import run_or_reprint
from quailora_app.cli import train_config
from quailora_app.events import EvalPoint, Metric, TrainStep
from quailora_app.flows.train import run_train
from quailora_app.units import MIB, format_bytes


def table(report: dict) -> str:
    arms = report["arm_names"]
    a = report["arms"]
    s = report["settings"]
    head = (f"# {report['model']} on {report['dataset']} | {report['device']} | schedule {report['schedule']} | "
            f"{s['steps']} steps of {s['batch_size'] * s['grad_accum']} x {s['data']['seq_len']} tokens, "
            f"lr {s['learning_rate']}, "
            f"rank {s['lora']['rank']}, alpha {s['lora']['alpha']} | "
            f"eval {report.get('tokens', {}).get('eval', '?')} tokens | "
            f"status {report['status']}")
    ref = report.get("reference_perplexity", {})
    rows = [head, "", "reference perplexity before fine-tuning: " +
            ", ".join(f"{k} {v:.3f}" for k, v in ref.items() if v is not None), "",
            "| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    steps = sorted({st for name in arms for st, _ in a[name].get("evals", [])})
    for st in steps:
        cells = []
        for name in arms:
            p = dict(map(tuple, a[name].get("evals", []))).get(st)
            cells.append(f"{p:.3f}" if p is not None else "-")
        rows.append(f"| {st} | " + " | ".join(cells) + " |")
    rows += ["", "| arm | final ppl | best ppl | gap closed vs qlora8 | gap closed at init vs int8 | median s/step "
                 "| tokens/s | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    num = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for name in arms:
        r = a[name]
        mem = r.get("peak_memory_bytes")
        init_gap = (report.get("gap_closed_init") or {}).get(name, {}).get("int8")
        rows.append(f"| {name} | {num(r.get('final_perplexity'), '.3f')} | {num(r.get('best_perplexity'), '.3f')} | "
                    f"{pct(report['gap_closed'].get(name))} | {pct(init_gap)} | "
                    f"{num(r.get('median_step_seconds'), '.2f')} | "
                    f"{num(r.get('tokens_per_s'), '.0f')} | {num(mem / MIB if mem else None, '.1f')} |")
    if "qlora4" in a and "quailora4" in a and a["qlora4"].get("evals") and a["quailora4"].get("evals"):
        q4, qa = dict(map(tuple, a["qlora4"]["evals"])), dict(map(tuple, a["quailora4"]["evals"]))
        common = sorted(set(q4) & set(qa))
        below = [st for st in common if qa[st] < q4[st]]
        rows.append("")
        rows.append(f"quailora4 below qlora4 at {len(below)} of {len(common)} evaluations"
                    + ("" if len(below) == len(common) else f" (not at steps {sorted(set(common) - set(below))})"))
        gap = report["gap_closed"].get("quailora4")
        if gap is not None:
            rows.append(f"share of the 4-bit -> 8-bit gap quailora4 closes at the end: {100 * gap:.1f}%")
        for key, what in (("median_step_seconds", "median step time"), ("peak_memory_bytes", "peak memory")):
            x, y = a["quailora4"].get(key), a["qlora4"].get(key)
            if x and y:
                rows.append(f"quailora4 / qlora4 {what}: {x / y:.3f} "
                            f"({'within' if abs(x / y - 1) <= 0.05 else 'NOT within'} 5%)")
        rows.append(f"memory: {a['qlora4'].get('memory_method', '?')}")
    rows += head_start_rows(report, HEAD_START)
    return "\n".join(rows)


#: --head-start K: the refinement a whole-model init arm (distill4, sequential4) ran before step 0, counted as K
#: ordinary steps (distill: distill_steps steps of distill_batch x seq_len tokens; at the defaults 8 x 2 x 256 =
#: 8 x 4 x 128, the same tokens as 8 training steps); 0: compare at the same step.
HEAD_START = 0


def head_start_rows(report: dict, head_start: int) -> list[str]:
    """Each other 4-bit arm against quailora4 and qlora4 at every evaluation, and the fair comparison: the
    other arm at step t against them at step t + head_start (they get the refinement's steps as ordinary
    fine-tuning steps)."""
    a, rows = report["arms"], []
    evals = {name: dict(map(tuple, arm.get("evals", []))) for name, arm in a.items()}
    for name in [n for n in report["arm_names"] if n not in ("qlora4", "quailora4") and a[n].get("base") == "4bit"]:
        for anchor in ("quailora4", "qlora4"):
            if anchor not in evals:
                continue
            for shift in sorted({0, head_start}):
                pairs = [(t, evals[name][t], evals[anchor][t + shift]) for t in sorted(evals[name])
                         if t + shift in evals[anchor]]
                if not pairs:
                    continue
                below = [t for t, x, y in pairs if x < y]
                cells = ", ".join(f"{t}: {x:.2f} vs {y:.2f}" for t, x, y in pairs)
                rows.append(f"{name} at step t vs {anchor} at step t + {shift}: below at {len(below)} of "
                            f"{len(pairs)} ({cells})")
    return [""] + rows if rows else []


def progress(event) -> None:
    if isinstance(event, Metric):
        print(f"reference {event.name}: perplexity {event.value:.3f}", file=sys.stderr, flush=True)
    elif isinstance(event, EvalPoint):
        print(f"step {event.step:>4} {event.arm:<10} val perplexity {event.val_perplexity:.3f}",
              file=sys.stderr, flush=True)
    elif isinstance(event, TrainStep) and (event.step == 1 or event.step % 5 == 0):
        print(f"step {event.step:>4} {event.arm:<10} loss {event.train_loss:.3f}  {event.elapsed_s:.2f} s  "
              f"{format_bytes(event.memory_bytes)}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    global HEAD_START
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--head-start", type=int, default=0, help="steps of refinement a whole-model init arm ran")
    known, rest = pre.parse_known_args(argv)
    HEAD_START = known.head_start
    return run_or_reprint(rest, "train", lambda args: run_train(train_config(args)), table, progress)


if __name__ == "__main__":
    sys.exit(main())
