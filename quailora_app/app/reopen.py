"""Run folders the web app can reopen after a restart (no gradio here; `ui.py` draws them).

Every folder the app's worker creates holds `.owner`, a hash of the browser's owner key, so a session lists
and reopens only its own runs; folders without it (written by the command line) are listed for everyone.
Only direct children of the runs root are reachable: a name is a plain folder name, never a path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from quailora_app.app.uploads import owner_tag
from quailora_app.errors import UserError
from quailora_app.runs import Report, RunFolder, RunKind, default_runs_root

OWNER_FILE = ".owner"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,199}$")


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


def list_runs(owner: str | None, root: str | Path | None = None, limit: int = 100) -> list[tuple[str, str]]:
    """(label, folder name) of the runs under the runs root this owner may reopen, newest first."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return []
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
    return out


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
