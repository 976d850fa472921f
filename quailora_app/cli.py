"""`python -m quailora_app`: the command-line face of the engine (same event stream as the UI and tests)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import MISSING, fields

from .config import ALL_LINEAR, DEFAULT_METHODS, INIT_METHODS, DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from .errors import UserError
from .events import LayerResult, Log, Metric, Progress, RunFailed, RunFinished, Stage


def _help(cls, name: str) -> str:
    f = next(f for f in fields(cls) if f.name == name)
    default = f.default if f.default is not MISSING else None
    return f"{f.metadata.get('help', '')} (default: {default})"


def add_model_data_quant_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `init` and `train`."""
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default="embedded", help=_help(ModelConfig, "model"))
    g.add_argument("--device", default="auto", help=_help(ModelConfig, "device"))
    g.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=_help(ModelConfig, "compute_dtype"))
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="embedded", help=_help(DataConfig, "dataset"))
    g.add_argument("--text-column", default=None, help=_help(DataConfig, "text_column"))
    g.add_argument("--seq-len", type=int, default=256, help=_help(DataConfig, "seq_len"))
    g.add_argument("--calib-samples", type=int, default=64, help=_help(DataConfig, "calib_samples"))
    g.add_argument("--eval-tokens", type=int, default=16384, help=_help(DataConfig, "eval_tokens"))
    g.add_argument("--seed", type=int, default=0, help=_help(DataConfig, "seed"))
    g = p.add_argument_group("quantization (bitsandbytes)")
    g.add_argument("--quant", default="nf4", choices=["nf4", "fp4"], help=_help(QuantConfig, "quant"))
    g.add_argument("--double-quant", default=True, action=argparse.BooleanOptionalAction, help=_help(QuantConfig, "double_quant"))
    g.add_argument("--block-size", type=int, default=64, help=_help(QuantConfig, "block_size"))
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=16, help=_help(LoraSettings, "rank"))
    g.add_argument("--alpha", type=float, default=16.0, help=_help(LoraSettings, "alpha"))
    g.add_argument("--rslora", action="store_true", help="rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r")
    g.add_argument("--targets", nargs="+", default=[ALL_LINEAR], help="modules to adapt: all-linear (every linear layer of the decoder blocks) or leaf names such as q_proj v_proj")


def parse_common(args) -> tuple[ModelConfig, DataConfig, QuantConfig, LoraSettings]:
    return (
        ModelConfig(args.model, args.device, args.compute_dtype),
        DataConfig(args.dataset, args.text_column, args.seq_len, args.calib_samples, args.eval_tokens, args.seed),
        QuantConfig(args.quant, args.double_quant, args.block_size),
        LoraSettings(args.rank, args.alpha, args.rslora, tuple(args.targets)),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quailora_app", description="QuAILoRA Studio: how much 4-bit quantization error does each LoRA initialization remove?")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="quantize, calibrate, initialize every method; write report.json and adapters",
                       description="Quantize the model to 4-bit, calibrate block by block, compute each LoRA initialization, "
                                   "measure per-layer error and held-out perplexity, and write a run folder.")
    add_model_data_quant_args(p)
    g = p.add_argument_group("initialization")
    g.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=INIT_METHODS, help="initializations to compute; qlora (no correction) is always included as the 1.0 baseline")
    g.add_argument("--als-rounds", type=int, default=20, help=_help(InitConfig, "als_rounds"))
    g.add_argument("--damping", type=float, default=0.01, help=_help(InitConfig, "damping"))
    g.add_argument("--no-baselines", action="store_true", help="skip the 8-bit and full-precision perplexities")
    g.add_argument("--out", default=None, help="run folder (default: runs/init-<date>-<time>)")
    return parser


def init_config(args) -> InitConfig:
    model, data, quant, lora = parse_common(args)
    return InitConfig(model, data, quant, lora, tuple(args.methods), args.als_rounds, args.damping,
                      baselines=not args.no_baselines, out=args.out)


class StopOnInterrupt:
    """Ctrl-C requests a cooperative stop; a second Ctrl-C aborts."""

    def __init__(self):
        self.flag = threading.Event()

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.flag.is_set():
            raise KeyboardInterrupt
        self.flag.set()
        print("\nstopping after the current step (Ctrl-C again to abort)...", file=sys.stderr)

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self._old)


def consume_init(events, out=sys.stdout) -> int:
    """Print the init stream with a progress bar; return the exit code."""
    from tqdm import tqdm

    bar = None
    code = 1
    for event in events:
        if isinstance(event, Stage):
            if bar:
                bar.close()
                bar = None
            print(f"[{event.stage}] {event.message}", file=sys.stderr)
        elif isinstance(event, Progress):
            if bar is None:
                bar = tqdm(total=event.total, desc=event.stage, unit="blk" if event.stage == "calibrate" else "it", file=sys.stderr)
            bar.n = event.done
            bar.refresh()
        elif isinstance(event, Metric):
            print(f"  perplexity {event.note or event.name}: {event.value:.3f}", file=sys.stderr)
        elif isinstance(event, Log):
            print(f"  note: {event.message}", file=sys.stderr)
        elif isinstance(event, LayerResult):
            pass
        elif isinstance(event, RunFinished):
            if bar:
                bar.close()
            print(summary_table(event.report), file=out)
            print(f"run folder: {event.run_dir}", file=out)
            code = 0
        elif isinstance(event, RunFailed):
            if bar:
                bar.close()
            kept = has_partial_results(event.run_dir)
            print(f"error: {event.message}" + (f" (results so far kept in {event.run_dir})" if kept else ""), file=sys.stderr)
            code = 130 if event.cancelled else 1
    return code


def has_partial_results(run_dir: str) -> bool:
    """True when the run folder holds something worth going back to (layers, perplexities, adapters)."""
    import json

    try:
        report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    except (OSError, ValueError):
        return False
    return bool(report.get("layers") or report.get("perplexity") or report.get("arms"))


def summary_table(report: dict) -> str:
    """Method by method: median calibrated error, perplexity, gap closed, seconds."""
    import statistics

    lines = [f"model {report['model']} | dataset {report['dataset']} | {report['device']} | rank {report['rank']} alpha {report['alpha']}",
             f"{'method':<12} {'calib err (median)':>18} {'perplexity':>11} {'gap closed vs 8-bit':>20} {'seconds':>8}"]
    ppl = report["perplexity"]
    for name in ("full", "int8", *report["methods"]):
        errs = [row["calibrated_error"][name] for row in report["layers"] if name in row["calibrated_error"]]
        err = f"{statistics.median(errs):.3f}" if errs else "-"
        p = f"{ppl[name]:.3f}" if ppl.get(name) is not None else "n/a"
        gap = report["gap_closed"].get(name)
        g = f"{100 * gap:.1f}%" if gap is not None else "-"
        sec = report["seconds"].get(name)
        label = {"full": "full prec.", "int8": "8-bit"}.get(name, name)
        lines.append(f"{label:<12} {err:>18} {p:>11} {g:>20} {(f'{sec:.2f}' if sec is not None else '-'):>8}")
    for name, why in report.get("unavailable", {}).items():
        lines.append(f"{name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .quiet import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            from .pipeline import run_init

            cfg = init_config(args)
            with StopOnInterrupt() as stop:
                return consume_init(run_init(cfg, should_stop=stop.flag.is_set))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
