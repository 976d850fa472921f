"""`python -m quailora_app`: the command-line face of the engine (same event stream as the UI and tests)."""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from quailora_app.config import (
    ACCURACY_TASKS,
    BitsConfig,
    DataConfig,
    GenerateConfig,
    InitConfig,
    LoraSettings,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    ViewsConfig,
    init_accuracy,
)
from quailora_app.engine.evaluation.selfcheck import report_lines
from quailora_app.engine.quiet import quiet_libraries
from quailora_app.errors import UserError
from quailora_app.events import (
    AccuracyPoint,
    ArmFinished,
    EvalPoint,
    LayerResult,
    Log,
    Metric,
    Progress,
    RunFailed,
    RunFinished,
    Stage,
    TrainStep,
)
from quailora_app.flows.from_init import train_config_from_init
from quailora_app.runs import RunFolder
from quailora_app.settings import Setting, build, groups, settings
from quailora_app.threads import apply_thread_policy
from quailora_app.units import MIB

#: Titles of the flag groups of the nested configs, by the parent config's field name.
GROUP_TITLES = {"model": "model and device", "data": "data", "quant": "quantization", "lora": "LoRA",
                "accuracy": "downstream accuracy"}
#: `init`'s defaults: InitConfig's, with downstream accuracy on (--accuracy-tasks none skips it)
INIT_CLI_DEFAULTS = InitConfig(accuracy=init_accuracy(ACCURACY_TASKS))


def flag_help(s: Setting, choices: tuple | None) -> str:
    """The setting's help, its choices when a metavar hides them, and "(default: ...)" unless the help names
    the default already or the flag is a switch that is off by default."""
    text = s.help
    if choices and "metavar" in s.metadata:
        text += ", any of " + ", ".join(map(str, choices))
    if "(default:" in text or (s.kind is bool and not s.default):
        return text
    shown = (" ".join(map(str, s.default)) or "none") if s.many and s.default is not None else s.default
    return f"{text} (default: {shown})"


def add_flag(group, s: Setting) -> None:
    """One flag for one setting, from its dataclass field: type, default, choices, help. A bool that is on by
    default is --x / --no-x, one that is off is a --x switch; a tuple takes several values."""
    choices = s.choices()
    default = list(s.default) if s.many and s.default is not None else s.default
    kwargs = {"dest": s.name, "default": default, "help": flag_help(s, choices)}
    if s.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if s.default else "store_true"
    else:
        kwargs.update(type=s.kind, choices=choices, metavar=s.metadata.get("metavar"))
        if s.many:
            kwargs["nargs"] = s.metadata.get("nargs", "+")
    group.add_argument(s.flag, *s.metadata.get("aliases", ()), **kwargs)


def add_config_flags(p: argparse.ArgumentParser, cls: type, title: str | None,
                     defaults=None) -> argparse._ArgumentGroup | None:
    """Flags for every setting of config `cls` (defaults from the instance `defaults`, else `cls()`): one group
    per nested config, then the group `title` of its own settings (returned, so a command can add its own flags to
    it; None: not added)."""
    own, *nested = groups(cls, defaults)
    for g in nested:
        group = p.add_argument_group(GROUP_TITLES.get(g.name, g.name))
        for s in g.settings:
            add_flag(group, s)
    if title is None:
        return None
    group = p.add_argument_group(title)
    for s in own.settings:
        if s.on_cli:
            add_flag(group, s)
    return group


def add_model_data_quant_args(p: argparse.ArgumentParser) -> None:
    """The model, data, quantization and LoRA flags with init's defaults (the bench scripts)."""
    add_config_flags(p, InitConfig, None)


def parse_common(args) -> tuple[ModelConfig, DataConfig, QuantConfig, LoraSettings]:
    values = vars(args)
    return tuple(build(cls, values) for cls in (ModelConfig, DataConfig, QuantConfig, LoraSettings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quailora_app", description="QuAILoRA Studio: how much 4-bit "
                                     "quantization error does each LoRA initialization remove?")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="quantize, calibrate, initialize every method; write report.json and adapters",
                       description="Quantize the model to 4-bit, calibrate block by block, compute each LoRA "
                                   "initialization, measure per-layer error and held-out perplexity, and write a run "
                                   "folder.")
    g = add_config_flags(p, InitConfig, "initialization", INIT_CLI_DEFAULTS)
    g.add_argument("--distributed", action="store_true",
                   help="one init over the processes of torchrun / accelerate launch (automatic when WORLD_SIZE > 1)")
    p = sub.add_parser("train", help="fine-tune several arms (4-bit QLoRA, 4-bit QuAILoRA, 8-bit, ...) side by side",
                       description="Short LoRA fine-tuning of several arms on the same batches, hyperparameters and "
                                   "held-out tokens; live perplexity, adapters and report.json in a run folder.")
    add_config_flags(p, TrainConfig, "fine-tuning")
    add_views_parser(sub)
    p = sub.add_parser("bits", help="memory against quality across bit widths (HQQ 2-8 bits, NF4, LLM.int8), with "
                                    "and without each correction",
                       description="Quantize the model to each base (HQQ at 2, 3, 4 or 8 bits, bitsandbytes NF4 and "
                                   "LLM.int8), calibrate once, compute each per-layer correction on every base, and "
                                   "measure held-out perplexity and memory per weight: the trade-off frontier.")
    add_config_flags(p, BitsConfig, "across bits")
    p = sub.add_parser("generate", help="what each variant says: full precision, 8-bit, plain 4-bit and 4-bit with "
                                        "each adapter of a run continue a prompt; token-level agreement",
                       description="Continue a prompt with full precision, 8-bit, plain 4-bit and 4-bit with each "
                                   "adapter of a finished init or train run; teacher-force each variant along full "
                                   "precision's continuation (top-1 agreement, KL); optionally what survives "
                                   "deployment of one adapter (--deploy).")
    add_config_flags(p, GenerateConfig, "generation")
    return parser


def bits_table(report: dict) -> str:
    """Base by base and method by method: memory per weight (with the adapter), perplexity, the share of the gap
    to full precision closed; then the one-line reading."""
    full = report.get("full")
    lines = [f"{'base':<34} {'method':<17} {'bits/weight':>11} {'perplexity':>12} {'gap closed':>10}"]
    plain = {p["base"]: p["perplexity"] for p in report.get("points", {}).values() if p["method"] == "qlora"}
    for point in report.get("points", {}).values():
        base_ppl = plain.get(point["base"])
        closed = "-" if point["method"] == "qlora" or not full or not base_ppl or base_ppl <= full else \
            f"{100 * (base_ppl - point['perplexity']) / (base_ppl - full):.1f}%"
        lines.append(f"{point['label']:<34} {point['method']:<17} {point['bits_per_weight']:>11.2f} "
                     f"{point['perplexity']:>12.2f} {closed:>10}")
    if full:
        lines.append(f"{'full precision':<34} {'-':<17} {'16/32':>11} {full:>12.2f} {'-':>10}")
    lines.append("gap closed = (ppl_plain - ppl) / (ppl_plain - ppl_full) at the same base")
    if report.get("reading"):
        lines.append(report["reading"])
    return "\n".join(lines)


def add_views_parser(sub) -> None:
    p = sub.add_parser("views", help="teaching figures for one layer: 4-bit grid, error, calibration, rank sweep, "
                                     "memory",
                       description="Compute the teaching views for one layer of your model (weights and the NF4/FP4 "
                                   "grid, the error each initialization removes, why calibration matters, a rank "
                                   "sweep, the precision trade-off) and write them as offline HTML (PNG where kaleido "
                                   "is installed).")
    add_config_flags(p, ViewsConfig, "views")


def given_settings(argv: list[str], cls: type) -> set[str]:
    """The settings of `cls` that `argv` names (flags typed, whatever their value). argparse fills in a default
    for every flag not typed, and writes nothing it finds already set on the namespace: parsing again into a
    namespace where every setting holds a marker leaves the marker exactly where no flag was typed."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_flags(parser, cls, "")
    marker = object()
    namespace = argparse.Namespace(**dict.fromkeys(settings(cls), marker))
    parser.parse_known_args(argv, namespace)
    return {name for name, value in vars(namespace).items() if value is not marker}


def train_config(args, given: set[str] | None = None) -> TrainConfig:
    """The TrainConfig of parsed `train` flags. With --from-init, the init run's settings, then the flags `given`
    (typed on the command line; None: those whose value is not the default) over them: a typed flag that
    conflicts with the init run is refused, one the user did not type never is."""
    values = vars(args)
    if not values.get("from_init"):
        return build(TrainConfig, values)
    if given is None:
        defaults = vars(build_parser().parse_args(["train"]))
        given = {name for name, value in values.items() if value != defaults.get(name)}
    known = settings(TrainConfig)
    return train_config_from_init(values["from_init"], **{name: values[name] for name in given
                                                          if name in known and name != "from_init"})


def init_config(args) -> InitConfig:
    return build(InitConfig, vars(args))


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


def consume_init(events, out=None, table=None) -> int:
    """Print the init stream (or another flow's of the same events) with a progress bar, then `table(report)`
    (default: the init summary) on `out` (default: standard output); return the exit code."""
    out = out or sys.stdout
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
                bar = tqdm(total=event.total, desc=event.stage, unit="blk" if event.stage == "calibrate" else "it",
                           file=sys.stderr)
            bar.n = event.done
            bar.refresh()
        elif isinstance(event, Metric) and event.group == "accuracy":
            print(f"  accuracy {event.note or event.name}", file=sys.stderr)
        elif isinstance(event, Metric) and event.group in ("agreement", "kl"):  # generate: the note says both
            if event.group == "agreement":
                print(f"  {event.note or event.name}", file=sys.stderr)
        elif isinstance(event, Metric):
            print(f"  perplexity {event.note or event.name}: {event.value:.3f}", file=sys.stderr)
        elif isinstance(event, Log):
            print(f"  note: {event.message}", file=sys.stderr)
        elif isinstance(event, LayerResult):
            pass
        elif isinstance(event, RunFinished):
            if bar:
                bar.close()
            print((table or summary_table)(event.report), file=out)
            print(f"run folder: {event.run_dir}", file=out)
            code = 0
        elif isinstance(event, RunFailed):
            if bar:
                bar.close()
            kept = has_partial_results(event.run_dir)
            print(f"error: {event.message}" + (f" (results so far kept in {event.run_dir})" if kept else ""),
                  file=sys.stderr)
            code = 130 if event.cancelled else 1
    return code


def has_partial_results(run_dir: str) -> bool:
    """True when the run folder holds something worth going back to (layers, perplexities, adapters)."""
    report = RunFolder(Path(run_dir)).read_report() or {}
    return bool(report.get("layers") or report.get("perplexity") or report.get("arms") or report.get("points"))


def summary_table(report: dict) -> str:
    """Method by method: median calibrated error, perplexity, perplexity gap closed, per downstream task the
    accuracy +- its 95% Wilson half-width and the accuracy gap closed, seconds; then what the paired tests say."""
    tasks = {kind: entry for kind, entry in (report.get("accuracy") or {}).items() if entry.get("models")}
    acc_head = "".join(f" {kind + ' acc (n=' + str(entry['n']) + ')':>24} {'acc gap closed':>14}"
                       for kind, entry in tasks.items())
    lines = [f"model {report['model']} | dataset {report['dataset']} | {report['device']} | rank {report['rank']} "
             f"alpha {report['alpha']}",
             f"{'method':<12} {'calib err (median)':>18} {'perplexity':>11} {'ppl gap closed':>14}{acc_head} "
             f"{'seconds':>8}"]
    ppl = report["perplexity"]
    for name in ("full", "int8", *report["methods"]):
        errs = [row["calibrated_error"][name] for row in report["layers"] if name in row["calibrated_error"]]
        err = f"{statistics.median(errs):.3f}" if errs else "-"
        p = f"{ppl[name]:.3f}" if ppl.get(name) is not None else "n/a"
        gap = report["gap_closed"].get(name)
        g = f"{100 * gap:.1f}%" if gap is not None else "-"
        sec = report["seconds"].get(name)
        label = {"full": "full prec.", "int8": "8-bit"}.get(name, name)
        accs = "".join(f" {_accuracy_cell(entry, name):>24} {_share(entry.get('gap_closed', {}).get(name)):>14}"
                       for entry in tasks.values())
        lines.append(f"{label:<12} {err:>18} {p:>11} {g:>14}{accs} {(f'{sec:.2f}' if sec is not None else '-'):>8}")
    lines.append("gap closed = the share of the 4-bit QLoRA -> 8-bit difference recovered (perplexity: (ppl_qlora - "
                 "ppl) / (ppl_qlora - ppl_8bit); accuracy: (acc - acc_qlora) / (acc_8bit - acc_qlora))")
    for kind, entry in tasks.items():
        lines.append(f"{kind}: {entry.get('title', kind)}; {entry.get('metric', 'acc')}, 95% Wilson half-widths")
        lines.extend(f"  {note}" for note in entry.get("notes", []))
    lines.extend(report_lines(report.get("self_check") or {}))
    for name, why in report.get("unavailable", {}).items():
        lines.append(f"{name}: {why}")
    for kind, why in (report.get("accuracy_unavailable") or {}).items():
        lines.append(f"accuracy task {kind}: {why}")
    return "\n".join(lines)


def _accuracy_cell(entry: dict, name: str) -> str:
    """'71.2% +- 4.0' (95% Wilson half-width, in points), or '-'."""
    m = entry["models"].get(name)
    return f"{100 * m['accuracy']:.1f}% +- {100 * m['half_width']:.1f}" if m else "-"


def _share(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def consume_train(events, out=None) -> int:
    """Print the fine-tuning stream: one progress bar per arm, evaluations as lines, a final table."""
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
        elif isinstance(event, AccuracyPoint):
            lo, hi = event.interval
            say(f"  {event.arm:<10} step {event.step:>4}: {event.task} accuracy {100 * event.accuracy:.1f}% +- "
                f"{50 * (hi - lo):.1f} (n={event.n:,})" + (f", {event.note}" if event.note else ""))
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
            kept = RunFolder(Path(event.run_dir)).report_path.is_file()
            print(f"error: {event.message}" + (f" (partial results in {event.run_dir})" if kept else ""),
                  file=sys.stderr)
            code = 130 if event.cancelled else 1
    return code


def train_table(report: dict) -> str:
    """Arm by arm: perplexity at step 0 / final / best, gap closed, speed, memory; when the run scored downstream
    accuracy, per task the accuracy at step 0 and at the last evaluation +- its 95% Wilson half-width and the
    accuracy gap closed toward qlora8."""
    ref = report.get("reference_perplexity", {})
    head = (f"model {report['model']} | dataset {report['dataset']} | {report['device']} | "
            f"schedule {report['schedule']} | status {report['status']}")
    refs = " | ".join(f"{name} {value:.3f}" for name, value in ref.items() if value is not None)
    origin = f"started from init run {report['from_init']}" if report.get("from_init") else ""
    lines = [head, origin, f"reference perplexity (before fine-tuning): {refs}" if refs else "",
             f"{'arm':<10} {'steps':>5} {'ppl@0':>9} {'final':>9} {'best':>9} {'gap vs 8-bit':>13} {'gap vs full':>12} "
             f"{'s/step':>7} {'tok/s':>7} {'peak MiB':>9}{_train_accuracy_head(report)}"]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    for name in report["arm_names"]:
        a = report["arms"][name]
        mem = a.get("peak_memory_bytes")
        lines.append(f"{name:<10} {a.get('steps_done', 0):>5} {fmt(a.get('step0_perplexity'), '.3f'):>9} "
                     f"{fmt(a.get('final_perplexity'), '.3f'):>9} {fmt(a.get('best_perplexity'), '.3f'):>9} "
                     f"{pct(report['gap_closed'].get(name)):>13} {pct(report['gap_closed_full'].get(name)):>12} "
                     f"{fmt(a.get('median_step_seconds'), '.2f'):>7} {fmt(a.get('tokens_per_s'), '.0f'):>7} "
                     f"{fmt(mem / MIB if mem else None, '.0f'):>9}{_train_accuracy_cells(report, name)}")
    lines.append("arms: " + "; ".join(f"{name} = {report['arms'][name].get('label', name)}"
                                      for name in report["arm_names"]))
    lines.append("gap closed = (ppl_qlora4 - ppl_arm) / (ppl_qlora4 - ppl_target) on the final evaluations; "
                 "target qlora8 (8-bit) and lora16 (full), each when that arm runs")
    lines.extend(_train_accuracy_notes(report))
    for base, records in (report.get("self_check") or {}).items():
        lines.extend(f"{base} base: {line}" for line in report_lines(records))
    how = next((a.get("memory_method") for a in report["arms"].values() if a.get("memory_method")), "")
    if how:
        lines.append(f"peak MiB, {how}")
    return "\n".join(line for line in lines if line)


def _train_tasks(report: dict) -> list[str]:
    """The downstream tasks some arm of a train report was scored on."""
    return [kind for kind in report.get("accuracy") or {}
            if any(kind in (a.get("accuracy") or {}) for a in report["arms"].values())]


def _train_accuracy_head(report: dict) -> str:
    return "".join(f" {kind + ' acc@0':>22} {kind + ' final':>22} {'acc gap':>8}" for kind in _train_tasks(report))


def _train_accuracy_cells(report: dict, arm: str) -> str:
    """Per task: '71.2% +- 4.0' at step 0 and at the last evaluation, and the accuracy gap closed toward qlora8."""
    def cell(record: dict | None) -> str:
        return f"{100 * record['accuracy']:.1f}% +- {100 * record['half_width']:.1f}" if record else "-"

    out = ""
    for kind in _train_tasks(report):
        entry = (report["arms"][arm].get("accuracy") or {}).get(kind) or {}
        out += f" {cell(entry.get('step0')):>22} {cell(entry.get('final')):>22} {_share(entry.get('gap_closed')):>8}"
    return out


def _train_accuracy_notes(report: dict) -> list[str]:
    """What the accuracy columns are, each task's title and n, and each arm's paired test against qlora4."""
    tasks = _train_tasks(report)
    if not tasks:
        return []
    lines = ["accuracy: +- the 95% Wilson half-width; acc gap = (acc_arm - acc_qlora4) / (acc_qlora8 - acc_qlora4) on "
             "the final evaluations"]
    for kind in tasks:
        entry = report["accuracy"][kind]
        lines.append(f"{kind}: {entry.get('title', kind)}; {entry.get('metric', 'acc')}, n={entry.get('n')}")
        lines.extend(f"  {a['accuracy'][kind]['vs_qlora4']['summary']}" for a in report["arms"].values()
                     if (a.get("accuracy") or {}).get(kind, {}).get("vs_qlora4"))
    lines.extend(f"accuracy task {kind}: {why}" for kind, why in (report.get("accuracy_unavailable") or {}).items())
    return lines


def views_command(args) -> int:
    """`python -m quailora_app views`: compute every teaching view for one layer and write the figures."""
    from quailora_app.flows.views import run_views  # heavy (torch, the engine): only for a command that runs

    cfg = build(ViewsConfig, vars(args))
    with StopOnInterrupt() as stop:
        return consume_views(run_views(cfg, stop.flag.is_set, write_files=True))


def consume_views(events) -> int:
    """Print the views stream: stages and notes as lines, then the precision table and where the figures are."""
    code = 1
    for event in events:
        if isinstance(event, Stage):
            print(f"[views] {event.message}", file=sys.stderr)
        elif isinstance(event, Log):
            print(f"[views] note: {event.message}", file=sys.stderr)
        elif isinstance(event, RunFinished):
            report, files = event.report, event.report["files"]
            figures = [Path(name).stem for name in files["html"] if name != "index.html"]
            print(report["precision_markdown"])
            png = f"; {len(files['png'])} PNG files" if files["png"] else ""
            print(f"{len(figures)} figures ({', '.join(figures)}) for {report['layer']}, rank {report['rank']}: open "
                  f"{Path(event.run_dir) / 'index.html'}{png}")
            code = 0
        elif isinstance(event, RunFailed):
            print(f"error: {event.message}", file=sys.stderr)
            code = 130 if event.cancelled else 2
    return code


def main(argv: list[str] | None = None) -> int:
    policy = apply_thread_policy()  # QUAILORA_THREADS; `python -m quailora_app` applied it before torch loaded
    if policy.note:
        print(f"warning: {policy.note}", file=sys.stderr)
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            from quailora_app.flows.init import run_init  # the flows: only for the command that runs
            from quailora_app.flows.launch import launched, run_init_processes  # the same

            cfg = init_config(args)
            if args.distributed or launched():
                return run_init_processes(cfg, consume_init)
            with StopOnInterrupt() as stop:
                return consume_init(run_init(cfg, should_stop=stop.flag.is_set))
        if args.command == "train":
            from quailora_app.flows.train import run_train  # the flows: only for the command that runs

            cfg = train_config(args, given_settings(sys.argv[1:] if argv is None else argv, TrainConfig))
            with StopOnInterrupt() as stop:
                return consume_train(run_train(cfg, should_stop=stop.flag.is_set))
        if args.command == "views":
            return views_command(args)
        if args.command == "bits":
            from quailora_app.flows.bits import run_bits  # the flows: only for the command that runs

            with StopOnInterrupt() as stop:
                return consume_init(run_bits(build(BitsConfig, vars(args)), should_stop=stop.flag.is_set),
                                    table=bits_table)
        if args.command == "generate":
            from quailora_app.flows.generate import generate_table, run_generate  # the flows: only for this command

            with StopOnInterrupt() as stop:
                return consume_init(run_generate(build(GenerateConfig, vars(args)), should_stop=stop.flag.is_set),
                                    table=generate_table)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
