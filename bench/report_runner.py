"""What bench/init_quality.py and bench/train_gap.py share: reprint a finished run from its report.json
(`--from-report`), or run the flow with the CLI's own flags and print its table when it finishes."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quailora_app.cli import build_parser  # noqa: E402
from quailora_app.errors import UserError  # noqa: E402
from quailora_app.events import RunFailed, RunFinished  # noqa: E402
from quailora_app.runs import read_report_at  # noqa: E402


def run_or_reprint(argv, command: str, run: Callable[[argparse.Namespace], Iterator], table: Callable[[dict], str],
                   show: Callable[[object], None] = lambda event: None) -> int:
    """`command` is the CLI subcommand whose flags the bench accepts; `run(args)` is its event stream; `show` sees
    every event (progress lines). Returns the exit code."""
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
