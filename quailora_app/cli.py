"""`python -m quailora_app`: the command-line face of the engine (same event stream as the UI and tests)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import MISSING, fields

from quailora_app.config import (
    ALL_LINEAR, ARMS, DEFAULT_METHODS, INIT_METHODS, LR_SCHEDULES, SCHEDULES, SOLVERS, DataConfig, InitConfig, LoraSettings,
    ModelConfig, QuantConfig, TrainConfig,
)
from quailora_app.errors import UserError
from quailora_app.events import (
    ArmFinished, EvalPoint, LayerResult, Log, Metric, Progress, RunFailed, RunFinished, Stage, TrainStep,
)


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
    g.add_argument("--als-rounds", type=int, default=InitConfig.als_rounds, help=_help(InitConfig, "als_rounds"))
    g.add_argument("--damping", type=float, default=InitConfig.damping, help=_help(InitConfig, "damping"))
    g.add_argument("--solver", choices=SOLVERS, default=InitConfig.solver, help=_help(InitConfig, "solver"))
    g.add_argument("--no-baselines", action="store_true", help="skip the 8-bit and full-precision perplexities")
    g.add_argument("--out", default=None, help="run folder (default: runs/init-<date>-<time>)")
    g.add_argument("--distributed", action="store_true",
                   help="one init over the processes of torchrun / accelerate launch (automatic when WORLD_SIZE > 1)")
    add_train_parser(sub)
    add_views_parser(sub)
    return parser


def add_views_parser(sub) -> None:
    p = sub.add_parser("views", help="teaching figures for one layer: 4-bit grid, error, calibration, rank sweep, memory",
                       description="Compute the teaching views for one layer of your model (weights and the NF4/FP4 grid, "
                                   "the error each initialization removes, why calibration matters, a rank sweep, the "
                                   "precision trade-off) and write them as offline HTML (PNG where kaleido is installed).")
    add_model_data_quant_args(p)
    g = p.add_argument_group("views")
    g.add_argument("--layer", default=None, help="module path of the layer, e.g. model.layers.3.mlp.down_proj (default: block 3's down_proj)")
    g.add_argument("--block", default="typical", help="quantization block whose 16 levels are shown: an index, 'typical' (median absmax) or 'outlier' (largest absmax)")
    g.add_argument("--sweep-layers", nargs="+", default=None, help="layers averaged in the rank sweep (default: every linear layer of --layer's block)")
    g.add_argument("--ranks", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64], help="ranks of the rank sweep; none to skip it (default: %(default)s)")
    g.add_argument("--perplexity-ranks", nargs="*", type=int, default=[], help="also measure held-out perplexity at these ranks (slow: a full initialization per rank)")
    g.add_argument("--report", nargs="*", default=[], help="init report.json files or run folders whose perplexities go into the precision trade-off")
    g.add_argument("--als-rounds", type=int, default=InitConfig.als_rounds, help=_help(InitConfig, "als_rounds"))
    g.add_argument("--damping", type=float, default=InitConfig.damping, help=_help(InitConfig, "damping"))
    g.add_argument("--out", default=None, help="output folder (default: runs/views-<date>-<time>)")


def _set_defaults(p: argparse.ArgumentParser, **defaults) -> None:
    """Change flag defaults (and the '(default: ...)' in their help) for one subcommand."""
    for action in p._actions:
        if action.dest in defaults:
            action.default = defaults[action.dest]
            if action.help and "(default:" in action.help:
                action.help = action.help[:action.help.rindex("(default:")] + f"(default: {action.default})"


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune several arms (4-bit QLoRA, 4-bit QuAILoRA, 8-bit, ...) side by side",
                       description="Short LoRA fine-tuning of several arms on the same batches, hyperparameters and "
                                   "held-out tokens; live perplexity, adapters and report.json in a run folder.")
    add_model_data_quant_args(p)
    data = TrainConfig().data
    _set_defaults(p, seq_len=data.seq_len, calib_samples=data.calib_samples, eval_tokens=data.eval_tokens)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--arms", nargs="+", default=list(TrainConfig.arms), choices=ARMS, metavar="ARM",
                   help=f"arms to train side by side, any of {', '.join(ARMS)} (default: {' '.join(TrainConfig.arms)})")
    g.add_argument("--steps", type=int, default=TrainConfig.steps, help=_help(TrainConfig, "steps"))
    g.add_argument("--lr", type=float, default=TrainConfig.learning_rate, help=_help(TrainConfig, "learning_rate"))
    g.add_argument("--warmup-ratio", type=float, default=TrainConfig.warmup_ratio, help=_help(TrainConfig, "warmup_ratio"))
    g.add_argument("--lr-schedule", default=TrainConfig.lr_schedule, choices=LR_SCHEDULES, help=_help(TrainConfig, "lr_schedule"))
    g.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help=_help(TrainConfig, "weight_decay"))
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help=_help(TrainConfig, "batch_size"))
    g.add_argument("--grad-accum", type=int, default=TrainConfig.grad_accum, help=_help(TrainConfig, "grad_accum"))
    g.add_argument("--eval-every", type=int, default=TrainConfig.eval_every, help=_help(TrainConfig, "eval_every"))
    g.add_argument("--eval-batch", type=int, default=TrainConfig.eval_batch, help=_help(TrainConfig, "eval_batch"))
    g.add_argument("--schedule", default=TrainConfig.schedule, choices=SCHEDULES, help=_help(TrainConfig, "schedule"))
    g.add_argument("--als-rounds", type=int, default=TrainConfig.als_rounds, help=_help(TrainConfig, "als_rounds"))
    g.add_argument("--damping", type=float, default=TrainConfig.damping, help=_help(TrainConfig, "damping"))
    g.add_argument("--out", default=None, help="run folder (default: runs/train-<date>-<time>)")


def train_config(args) -> TrainConfig:
    model, data, quant, lora = parse_common(args)
    return TrainConfig(model, data, quant, lora, arms=tuple(args.arms), steps=args.steps, learning_rate=args.lr,
                       warmup_ratio=args.warmup_ratio, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, eval_every=args.eval_every,
                       eval_batch=args.eval_batch, damping=args.damping, als_rounds=args.als_rounds,
                       schedule=args.schedule, out=args.out)


def init_config(args) -> InitConfig:
    model, data, quant, lora = parse_common(args)
    return InitConfig(model, data, quant, lora, tuple(args.methods), args.als_rounds, args.damping, args.solver,
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


def consume_train(events, out=None) -> int:
    """Print the fine-tuning stream: one progress bar per arm, evaluations as lines, a final table."""
    from tqdm import tqdm

    out = out or sys.stdout
    bars: dict[str, tqdm] = {}
    setup_bar = None
    code = 1

    def say(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def close_all() -> None:
        for bar in [*bars.values(), setup_bar]:
            if bar is not None:
                bar.close()

    for event in events:
        if isinstance(event, Stage):
            if setup_bar is not None:
                setup_bar.close()
                setup_bar = None
            say(f"[{event.stage}] {event.message}")
        elif isinstance(event, Progress):
            if setup_bar is None:
                setup_bar = tqdm(total=event.total, desc=event.stage, unit="blk", file=sys.stderr, leave=False)
            setup_bar.n = event.done
            setup_bar.refresh()
        elif isinstance(event, TrainStep):
            if event.arm not in bars:
                bars[event.arm] = tqdm(total=event.total_steps, desc=f"{event.arm:<10}", unit="step", file=sys.stderr,
                                       position=len(bars), dynamic_ncols=True)
            bar = bars[event.arm]
            bar.n = event.step
            bar.set_postfix(loss=f"{event.train_loss:.3f}", tok_s=f"{event.tokens_per_s:.0f}", refresh=False)
            bar.refresh()
        elif isinstance(event, EvalPoint):
            say(f"  {event.arm:<10} step {event.step:>4}: val perplexity {event.val_perplexity:.3f}")
        elif isinstance(event, Metric):
            say(f"  reference perplexity, {event.note or event.name}: {event.value:.3f}")
        elif isinstance(event, ArmFinished):
            if event.arm in bars:
                bars[event.arm].refresh()
        elif isinstance(event, Log):
            say(f"  note: {event.message}")
        elif isinstance(event, RunFinished):
            close_all()
            print(train_table(event.report), file=out)
            print(f"run folder: {event.run_dir}", file=out)
            code = 0 if event.report.get("status") == "finished" else 130
        elif isinstance(event, RunFailed):
            close_all()
            print(f"error: {event.message}" + (f" (partial results in {event.run_dir})" if os.path.exists(os.path.join(event.run_dir, "report.json")) else ""), file=sys.stderr)
            code = 130 if event.cancelled else 1
    return code


def train_table(report: dict) -> str:
    """Arm by arm: perplexity at step 0 / final / best, gap closed, speed, memory."""
    ref = report.get("reference_perplexity", {})
    head = (f"model {report['model']} | dataset {report['dataset']} | {report['device']} | schedule {report['schedule']} | "
            f"status {report['status']}")
    refs = " | ".join(f"{name} {value:.3f}" for name, value in ref.items() if value is not None)
    lines = [head, f"reference perplexity (before fine-tuning): {refs}" if refs else "",
             f"{'arm':<10} {'steps':>5} {'ppl@0':>9} {'final':>9} {'best':>9} {'gap vs 8-bit':>13} {'gap vs full':>12} "
             f"{'s/step':>7} {'tok/s':>7} {'peak MiB':>9}"]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    for name in report["arm_names"]:
        a = report["arms"][name]
        mem = a.get("peak_memory_bytes")
        lines.append(f"{name:<10} {a.get('steps_done', 0):>5} {fmt(a.get('step0_perplexity'), '.3f'):>9} "
                     f"{fmt(a.get('final_perplexity'), '.3f'):>9} {fmt(a.get('best_perplexity'), '.3f'):>9} "
                     f"{pct(report['gap_closed'].get(name)):>13} {pct(report['gap_closed_full'].get(name)):>12} "
                     f"{fmt(a.get('median_step_seconds'), '.2f'):>7} {fmt(a.get('tokens_per_s'), '.0f'):>7} "
                     f"{fmt(mem / 2**20 if mem else None, '.0f'):>9}")
    lines.append("gap closed = (ppl_qlora4 - ppl_arm) / (ppl_qlora4 - ppl_target) on the final evaluations; "
                 "target qlora8 (8-bit) and lora16 (full), each when that arm runs")
    return "\n".join(line for line in lines if line)


def views_command(args) -> int:
    """`python -m quailora_app views`: compute every teaching view for one layer and write the figures."""
    from quailora_app.plots.teaching import write_views
    from quailora_app.runs import new_run_dir
    from quailora_app.teaching.views import compute_views, open_context

    model_cfg, data_cfg, quant_cfg, lora = parse_common(args)
    say = lambda msg: print(f"[views] {msg}", file=sys.stderr)  # noqa: E731
    say(f"loading {model_cfg.model} in 4-bit {quant_cfg.quant} and reading {data_cfg.dataset}")
    ctx = open_context(model_cfg, data_cfg, quant_cfg)
    block = int(args.block) if str(args.block).isdigit() else args.block
    views = compute_views(ctx, args.layer, lora.rank, block=block, sweep_layers=args.sweep_layers,
                          ranks=args.ranks or None, perplexity_ranks=args.perplexity_ranks or (), reports=args.report or (),
                          damping=args.damping, als_rounds=args.als_rounds, targets=lora.targets, progress=say)
    out = new_run_dir("views", args.out)
    written = write_views(views, out)
    for note in [*views.precision.notes, *(views.sweep.notes if views.sweep else []), *written.notes]:
        say(f"note: {note}")
    print(views.precision.markdown())
    print(f"{len(written.html) - 1} figures ({', '.join(p.stem for p in written.html[:-1])}) for {views.layer}, rank "
          f"{views.rank}: open {out / 'index.html'}" + (f"; {len(written.png)} PNG files" if written.png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from quailora_app.engine.quiet import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            from quailora_app.flows.launch import launched, run_init_processes
            from quailora_app.flows.init import run_init

            cfg = init_config(args)
            if args.distributed or launched():
                return run_init_processes(cfg, consume_init)
            with StopOnInterrupt() as stop:
                return consume_init(run_init(cfg, should_stop=stop.flag.is_set))
        if args.command == "train":
            from quailora_app.flows.train import run_train

            cfg = train_config(args)
            with StopOnInterrupt() as stop:
                return consume_train(run_train(cfg, should_stop=stop.flag.is_set))
        if args.command == "views":
            return views_command(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
