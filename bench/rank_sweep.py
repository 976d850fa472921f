"""Rank sweep on one model: calibrated error (mean over layers, 1.0 = plain QLoRA) of svd, quailora and
closed_form at each LoRA rank, optionally held-out perplexity at a few ranks (slow: a full init per rank).

    python -m bench.rank_sweep                                   # embedded SmolLM2, every linear layer of block 3
    python -m bench.rank_sweep --blocks 0 10 20 --ranks 1 4 16 64
    python -m bench.rank_sweep --perplexity-ranks 4 16 64 --eval-tokens 8192
Flags for model, data and quantization are those of `python -m quailora_app views`.
"""
from __future__ import annotations

import argparse
import sys
import time

from quailora_app.cli import add_model_data_quant_args, parse_common
from quailora_app.engine.preflight import preflight_views
from quailora_app.engine.quiet import quiet_libraries
from quailora_app.flows.prepare import drain, prepare
from quailora_app.sources.models import pick_device
from quailora_app.teaching.rank_sweep import DEFAULT_RANKS, rank_sweep, sweep_perplexity
from quailora_app.teaching.snapshot import ViewsContext, layer_names, layer_snapshots


def table(sweep, seconds: float) -> str:
    methods = list(sweep.calibrated_error)
    rows = [f"# calibrated error, mean over {len(sweep.layers)} layers (1.0 = plain QLoRA), {seconds:.1f} s", "",
            "| rank | " + " | ".join(methods) + " | quailora - closed_form |", "|---" * (len(methods) + 2) + "|"]
    for i, r in enumerate(sweep.ranks):
        gap = sweep.calibrated_error["quailora"][i] - sweep.calibrated_error["closed_form"][i]
        rows.append(f"| {r} | " + " | ".join(f"{sweep.calibrated_error[m][i]:.4f}" for m in methods)
                    + f" | {gap:+.5f} |")
    if sweep.perplexity:
        base = sweep.perplexity.get("qlora", {}).get(0)
        rows += ["", f"# held-out perplexity (4-bit, no correction: {base:.3f})", "",
                 "| rank | " + " | ".join(m for m in sweep.perplexity if m != "qlora") + " |",
                 "|---" * len(sweep.perplexity) + "|"]
        for r in sorted({r for m, v in sweep.perplexity.items() if m != "qlora" for r in v}):
            rows.append(f"| {r} | " + " | ".join(f"{v[r]:.3f}" if r in v else "-" for m, v in sweep.perplexity.items()
                                                   if m != "qlora") + " |")
    rows += [f"note: {n}" for n in sweep.notes]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_quant_args(p)
    p.add_argument("--blocks", nargs="+", type=int, default=[3], help="decoder blocks whose linear layers are averaged")
    p.add_argument("--ranks", nargs="+", type=int, default=list(DEFAULT_RANKS))
    p.add_argument("--perplexity-ranks", nargs="*", type=int, default=[])
    p.add_argument("--als-rounds", type=int, default=20)
    p.add_argument("--damping", type=float, default=0.01)
    args = p.parse_args(argv)
    quiet_libraries()
    model_cfg, data_cfg, quant_cfg, _ = parse_common(args)
    device = pick_device(model_cfg.device)
    prepared = drain(prepare(model_cfg, data_cfg, quant_cfg, device, lambda name, config: preflight_views(
        name, config, model_cfg, data_cfg, quant_cfg, device)))
    ctx = ViewsContext(prepared.source, prepared.model, prepared.checkpoint, prepared.splits.calib,
                       prepared.splits.eval, device, quant_cfg, data_cfg, model_cfg)
    names = [n for n in layer_names(ctx.model) if any(f".{b}." in n for b in args.blocks)]
    start = time.perf_counter()
    snaps = layer_snapshots(ctx.model, ctx.checkpoint, ctx.calib_ids, names, ctx.device)
    sweep = rank_sweep(list(snaps.values()), args.ranks, damping=args.damping, als_rounds=args.als_rounds)
    if args.perplexity_ranks:
        sweep.perplexity = sweep_perplexity(ctx, args.perplexity_ranks, damping=args.damping,
                                            als_rounds=args.als_rounds)
    print(table(sweep, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
