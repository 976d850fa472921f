"""What the bench scripts share: where they write, the machine they ran on, their JSON (`--json`, `--resume`,
`--from-json`), their child processes, Markdown tables, and the CLI-flag benches' run-or-reprint.

Nothing here imports torch at import time, so a script may apply the thread policy
(`quailora_app.threads.apply_thread_policy`) before or after importing this module.

Every bench runs from the repository root as a module, `python -m bench.<name>`; a child process of a bench is
the same module again (`module_command`), started with `cwd=ROOT`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: where the benches write their JSON and run folders
OUT = ROOT / "runs" / "bench"
#: the libraries whose versions a result records
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


# ------------------------------------------------------------------------------------------------ commands
def module_name(file: str) -> str:
    """`bench.<name>` of a bench's `__file__`."""
    return f"{__package__ or 'bench'}.{Path(file).stem}"


def module_command(file: str, *args: str) -> list[str]:
    """The command line that runs the bench of `file` (its `__file__`) again in a fresh Python process, with
    `args`; run it with `cwd=ROOT`."""
    return [sys.executable, "-m", module_name(file), *args]


def command_line(file: str, argv: Sequence[str] | None = None) -> str:
    """How a person re-runs this invocation: `python -m bench.<name> <its arguments>`."""
    return " ".join(["python", "-m", module_name(file), *(sys.argv[1:] if argv is None else argv)])


# ------------------------------------------------------------------------------------------------ the machine
def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """The installed versions of `names` (read from their metadata: nothing is imported); "?" where absent."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def machine(with_torch: bool = True) -> dict[str, Any]:
    """The machine a result was measured on: CPU model, cores, torch threads, the CUDA device (None on the CPU),
    platform, Python, library versions, the load average at the call. `with_torch`: import torch for its thread
    count and CUDA device (a parent that only starts measured children leaves them None)."""
    threads = cuda = None
    if with_torch:
        import torch

        threads = torch.get_num_threads()
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads, "cuda": cuda,
            "device": f"cuda ({cuda})" if cuda else "cpu" if with_torch else None, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def machine_line(m: dict[str, Any]) -> str:
    """One line of `machine()`'s record, for a table's header."""
    threads = m.get("torch_threads")
    device = m.get("cuda") or (f"CPU {m.get('cpu', '?')}, {m.get('cores', '?')} cores"
                               + (f", {threads} torch threads" if threads else ""))
    load = m.get("load_average_at_start")
    return (f"{device}, torch {m.get('versions', {}).get('torch', '?')}"
            + (f", load average {load[0]:.2f} at the start" if load else ""))


# ------------------------------------------------------------------------------------------------ JSON
def add_json_args(parser: argparse.ArgumentParser, default: str | None, *, resume: bool = True,
                  from_json: bool = True) -> None:
    """--json PATH (where the result goes, rewritten after every setting), --from-json PATH (reprint a finished
    run's table and stop), --resume (keep the settings already in --json and run the rest)."""
    shown = os.path.relpath(default, ROOT) if default and Path(default).is_relative_to(ROOT) else default
    parser.add_argument("--json", default=default,
                        help=f"where the result is written, after every setting (default {shown})")
    if from_json:
        parser.add_argument("--from-json", metavar="PATH", help="reprint a finished run's table")
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="keep the settings already in --json and run the rest (after a stop)")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(data: Any, path: str | Path, indent: int | None = 2) -> None:
    """Write `data` to `path` at once (a temp file beside it, then a rename): a run stopped mid-write keeps the
    previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    tmp.replace(path)


def reprint(args: argparse.Namespace, table: Callable[[Any], str]) -> bool:
    """--from-json: print `table` of that file and say so (the caller then returns)."""
    if not getattr(args, "from_json", None):
        return False
    print(table(read_json(args.from_json)))
    return True


def resume(args: argparse.Namespace, fresh: dict[str, Any], free: Sequence[str] = ()) -> dict[str, Any]:
    """The result to fill: with --resume and an existing --json, that file's (the settings it finished are kept;
    its "settings" must equal `fresh`'s, but for the keys of `free`, which only shape the settings still to run and
    are taken from `fresh`); else `fresh`."""
    path = Path(args.json)
    if not getattr(args, "resume", False) or not path.exists():
        return fresh
    old = read_json(path)
    mine, theirs = fresh.get("settings"), old.get("settings")
    if isinstance(mine, dict) and isinstance(theirs, dict):
        fixed = {k: v for k, v in mine.items() if k not in free}
        if {k: v for k, v in theirs.items() if k not in free} != fixed:
            raise SystemExit(f"error: --resume with other settings than {path}'s: {theirs}")
        theirs.update({k: v for k, v in mine.items() if k in free})
    elif theirs != mine:
        raise SystemExit(f"error: --resume with other settings than {path}'s: {theirs}")
    return old


# ------------------------------------------------------------------------------------------------ tables
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; a cell is shown as str(cell), None as "-"."""
    def cells(row: Sequence[Any]) -> str:
        return "| " + " | ".join("-" if c is None else str(c) for c in row) + " |"

    return "\n".join([cells(header), "|" + "---|" * len(header), *(cells(r) for r in rows)])


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """`value` formatted, "-" for None."""
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def percent(share: float | None, digits: int = 1) -> str:
    """A share (0.25) as a percentage ("25.0%"), "-" for None."""
    return "-" if share is None else f"{100 * share:.{digits}f}%"


# ------------------------------------------------------------------------------------------------ CLI-flag benches
def run_or_reprint(argv: Sequence[str] | None, command: str, run: Callable[[argparse.Namespace], Iterator],
                   table: Callable[[dict], str], show: Callable[[object], None] = lambda event: None) -> int:
    """A bench that takes the flags of a CLI subcommand (`command`: init or train): reprint a finished run from its
    report.json (`--from-report PATH`), or run the flow, `run(args)` its event stream, and print `table(report)`
    when it finishes; `show` sees every event (progress lines). Returns the exit code."""
    from quailora_app.cli import build_parser  # loads the engine: only when a bench runs
    from quailora_app.errors import UserError
    from quailora_app.events import RunFailed, RunFinished
    from quailora_app.runs import read_report_at

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-report")
    known, rest = pre.parse_known_args(argv)
    if known.from_report:
        print(table(read_report_at(known.from_report)))
        return 0
    try:
        events = run(build_parser().parse_args([command, *rest]))
    except UserError as exc:  # a bad flag value: one line, as the CLI says it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for event in events:
        show(event)
        if isinstance(event, RunFinished):
            print(table(event.report))
            print(f"\nrun folder: {event.run_dir}")
            return 0
        if isinstance(event, RunFailed):
            print(f"error: {event.message}", file=sys.stderr)
            return 1
    return 1
