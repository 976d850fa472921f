"""Run folders the web app can reopen after a restart (no gradio here; `presenters.py` draws them).

Every folder the app's worker creates holds `.owner`, a hash of the browser's owner key, so a session lists
and reopens only its own runs; folders without it (written by the command line) are listed for everyone.
Only direct children of the runs root are reachable: a name is a plain folder name, never a path.

The shipped example run (assets/example/, made by bench/make_example.py: an init run, a fine-tuning run, an
across-bits run and a generate run) is listed for everyone after the session's own runs, under the names
"shipped:init", "shipped:train", "shipped:bits" and "shipped:generate" (a colon never names a folder of the runs
root). It is only read, never
written; a missing or unreadable example is no error, it is just not listed.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quailora_app.app.uploads import owner_tag
from quailora_app.errors import UserError
from quailora_app.runs import REPORT, Report, RunFolder, RunKind, default_runs_root

OWNER_FILE = ".owner"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,199}$")
#: The shipped example run: its folder, its manifest (command, settings, machine, date), its runs and their names.
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "example"
EXAMPLE_MANIFEST = "example.json"
EXAMPLE_KINDS: tuple[RunKind, ...] = ("init", "train", "bits", "generate")
EXAMPLE_PREFIX = "shipped:"


def mark_owner(run_dir: str | Path, owner: str) -> None:
    """Tag a run folder with its owner's hash (not the key)."""
    (Path(run_dir) / OWNER_FILE).write_text(owner_tag(owner) + "\n")


def _visible(run_dir: Path, owner: str | None) -> bool:
    tag_file = run_dir / OWNER_FILE
    if not tag_file.is_file():
        return True
    try:
        return bool(owner) and tag_file.read_text().strip() == owner_tag(owner)
    except OSError:
        return False


def list_runs(owner: str | None, root: str | Path | None = None, limit: int = 100,
              example: str | Path | None = None) -> list[tuple[str, str]]:
    """(label, folder name) of the runs under the runs root this owner may reopen, newest first; then, with
    `example` (a shipped example folder, e.g. EXAMPLE_DIR), its runs as (label, "shipped:<kind>")."""
    shipped = example_choices(example) if example is not None else []
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return shipped
    runs = []
    for child in root.iterdir():
        if child.is_symlink() or not child.is_dir() or not _RUN_NAME.match(child.name):
            continue
        if RunFolder(child).has_results() and _visible(child, owner):
            runs.append((child.stat().st_mtime, child))
    out = []
    for _, child in sorted(runs, key=lambda r: r[0], reverse=True)[:limit]:
        report = RunFolder(child).read_report() or {}
        status = report.get("status") or "no report"
        model = Path(str(report.get("model") or "?")).name
        out.append((f"{child.name} · {status} · {model}", child.name))
    return out + shipped


@dataclass
class ReopenedRun:
    name: str
    kind: RunKind
    run_dir: Path
    report: Report | None
    events: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str((self.report or {}).get("status") or "unknown")


def open_run(name: str | None, owner: str | None, root: str | Path | None = None) -> ReopenedRun:
    """The run folder `name` directly under the runs root, if this owner may see it; else a UserError."""
    root = (Path(root) if root is not None else default_runs_root()).resolve()
    name = str(name or "").strip()
    missing = UserError(f"no run folder named '{name[:80]}' among this session's runs; pick one from the list")
    if not _RUN_NAME.match(name):
        raise missing
    run_dir = (root / name).resolve()
    if run_dir.parent != root or not run_dir.is_dir() or not _visible(run_dir, owner):
        raise missing
    folder = RunFolder(run_dir)
    report = folder.read_report() or None  # an empty report says nothing
    events = folder.read_events()
    if report is None and not events:
        raise UserError(f"run folder '{name}' holds neither report.json nor events.jsonl")
    return ReopenedRun(name, folder.kind(report or {}, events), run_dir, report, events)


# ------------------------------------------------------------------------------------------------ the shipped example
def is_example_name(name: str | None) -> bool:
    return str(name or "").strip().startswith(EXAMPLE_PREFIX)


def example_manifest(root: str | Path = EXAMPLE_DIR) -> dict:
    """assets/example/example.json (what made the example: command, preset, seed, settings, machine, date);
    {} when there is none or it cannot be read."""
    try:
        data = json.loads((Path(root) / EXAMPLE_MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def open_example(name: str | None, root: str | Path = EXAMPLE_DIR) -> ReopenedRun:
    """The shipped example's run "shipped:init", "shipped:train" or "shipped:bits", read (never written); else a
    UserError."""
    kind = str(name or "").strip().removeprefix(EXAMPLE_PREFIX)
    shipped = ", ".join(example_names(root)) or "none"
    missing = UserError(f"no shipped example run '{str(name)[:80]}' (this app ships: {shipped})")
    if kind not in EXAMPLE_KINDS:
        raise missing
    folder = RunFolder(Path(root) / kind)
    report = folder.read_report() or None
    events = folder.read_events()
    if report is None:
        raise missing
    if folder.kind(report, events) != kind:
        raise UserError(f"the shipped example's {kind} folder holds a {folder.kind(report, events)} run")
    return ReopenedRun(EXAMPLE_PREFIX + kind, kind, folder.path, report, events)


def example_names(root: str | Path = EXAMPLE_DIR) -> list[str]:
    """The names of the shipped example's runs that have a report ("shipped:init", "shipped:train",
    "shipped:bits")."""
    return [EXAMPLE_PREFIX + kind for kind in EXAMPLE_KINDS if (Path(root) / kind / REPORT).is_file()]


def example_runs(root: str | Path = EXAMPLE_DIR) -> dict[str, ReopenedRun]:
    """kind -> the shipped example's run, for those that read back; {} without an example."""
    runs = {}
    for name in example_names(root):
        try:
            run = open_example(name, root)
        except UserError:
            continue
        runs[run.kind] = run
    return runs


def example_choices(root: str | Path = EXAMPLE_DIR) -> list[tuple[str, str]]:
    """(label, name) of the shipped example's runs for the reopen list."""
    what = {"init": "quantize & initialize", "train": "fine-tuning", "bits": "across bits", "generate": "generate"}
    quick = " (quick development run)" if example_manifest(root).get("preset") == "quick" else ""
    out = []
    for name in example_names(root):
        kind = name.removeprefix(EXAMPLE_PREFIX)
        out.append((f"shipped example{quick} · {what[kind]} · made by python -m bench.make_example", name))
    return out
