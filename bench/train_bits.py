"""Fine-tuning at low bits: arms on an HQQ base (3-bit by default) beside bitsandbytes NF4 4-bit QLoRA, trained side
by side on the embedded model and text. Prints every arm's held-out perplexity at every evaluation, with its label
(bits and quantizer), and whether the goal of issue 24 is met: after the steps, the best arm below 4 bits ends
below 4-bit QLoRA (qlora_nf4).

    python -m bench.train_bits            # HQQ 3-bit, groups of 64, 30 steps, rank 16: qlora4 closed4 loftq_cal4
                                          # on HQQ 3-bit, qlora_nf4 on NF4
    python -m bench.train_bits --steps 30 --batch-size 2 --eval-tokens 2048 --arms qlora4 closed4 qlora_nf4
    python -m bench.train_bits --from-report runs/train-.../report.json      # reprint a finished run
Any flag of `python -m quailora_app train` is accepted; flags given override the defaults below.
"""
from __future__ import annotations

import sys

from bench.common import run_or_reprint
from bench.train_gap import progress
from quailora_app.cli import train_config
from quailora_app.flows.train import run_train

#: what this bench runs unless a flag says otherwise (argparse keeps the last value of a flag given twice)
DEFAULTS = ("--quantizer", "hqq", "--bits", "3", "--group-size", "64", "--steps", "30", "--rank", "16",
            "--arms", "qlora4", "closed4", "loftq_cal4", "qlora_nf4")
REFERENCE = "qlora_nf4"


def goal(report: dict) -> str:
    """One line: the best arm below 4 bits at the last evaluation against qlora_nf4's."""
    arms = report["arms"]
    final = {name: a.get("final_perplexity") for name, a in arms.items() if a.get("final_perplexity") is not None}
    low = {name: p for name, p in final.items() if arms[name].get("bits") is not None and arms[name]["bits"] < 4}
    if REFERENCE not in final or not low:
        return f"goal: not measured (needs {REFERENCE} and an arm below 4 bits, each with a final evaluation)"
    best = min(low, key=low.get)
    met = low[best] < final[REFERENCE]
    return (f"goal (the best arm below 4 bits ends below 4-bit QLoRA NF4): {'MET' if met else 'MISSED'}: "
            f"{arms[best]['label']} ({best}) {low[best]:.3f} vs {arms[REFERENCE]['label']} {final[REFERENCE]:.3f}")


def table(report: dict) -> str:
    s, arms, names = report["settings"], report["arms"], report["arm_names"]
    head = (f"# {report['model']} on {report['dataset']} | {report['device']} | schedule {report['schedule']} | "
            f"{s['steps']} steps of {s['batch_size'] * s['grad_accum']} x {s['data']['seq_len']} tokens, "
            f"lr {s['learning_rate']}, rank {s['lora']['rank']}, alpha {s['lora']['alpha']} | "
            f"eval {report.get('tokens', {}).get('eval', '?')} tokens | status {report['status']}")
    ref = report.get("reference_perplexity", {})
    rows = [head, "", "reference perplexity before fine-tuning: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ref.items() if v is not None), "",
            "| arm | label | " + " | ".join(f"step {st}" for st in _steps(report)) + " | s/step |",
            "|---|---|" + "---|" * (len(_steps(report)) + 1)]
    for name in names:
        evals = dict(map(tuple, arms[name].get("evals", [])))
        cells = [f"{evals[st]:.2f}" if st in evals else "-" for st in _steps(report)]
        sec = arms[name].get("median_step_seconds")
        rows.append(f"| {name} | {arms[name].get('label', name)} | " + " | ".join(cells)
                    + (f" | {sec:.2f} |" if sec else " | - |"))
    resets = {m: r for m, r in ((report.get("layers_reset") or {}).get("4bit") or {}).items() if r}
    rows += ["", goal(report), "layers reset by the self-check: "
             + (", ".join(f"{m}: {len(r)}" for m, r in resets.items()) if resets else "none")]
    return "\n".join(rows)


def _steps(report: dict) -> list[int]:
    return sorted({st for a in report["arms"].values() for st, _ in a.get("evals", [])})


def main(argv=None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    argv = given if any(a.startswith("--from-report") for a in given) else [*DEFAULTS, *given]
    return run_or_reprint(argv, "train", lambda args: run_train(train_config(args)), table, progress)


if __name__ == "__main__":
    sys.exit(main())
