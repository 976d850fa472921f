"""The documentation tables that must not drift, generated from the code: every flag of each command (from the
parser the CLI builds, so from the config dataclasses' metadata), the method registry and the arm registry; and
the web app's endpoint list (docs/api.md), from the page's own API info.

    python -m quailora_app.doc_tables          # rewrite the marked sections of README.md, docs/guide.md, docs/api.md
    python -m quailora_app.doc_tables --check  # exit 1 when a marked section differs from the code

tests/test_docs.py checks README.md and docs/guide.md (`stale`); docs/api.md needs the page built (gradio), so
tests/test_app_client.py checks it against a running app (`api_section` of what its gradio_client sees).

A marked section lies between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->`.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from quailora_app.app.endpoints import api_markdown
from quailora_app.cli import build_parser
from quailora_app.engine.arms import ARM_SPECS
from quailora_app.engine.methods.registry import all_methods

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("init", "train", "views")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def flag_rows(command: str) -> list[tuple[str, str]]:
    """(flag, help as --help prints it, default included) for every flag of `command`, in --help's order."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = []
    for action in sub.choices[command]._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        flags = " / ".join(f"`{f}`" for f in action.option_strings if f.startswith("--"))
        rows.append((flags, action.help or ""))
    return rows


def flag_table(command: str) -> str:
    lines = ["| flag | meaning (default) |", "|---|---|"]
    lines += [f"| {flags} | {_cell(text)} |" for flags, text in flag_rows(command)]
    return "\n".join(lines)


def method_table() -> str:
    lines = ["| method | what it does | kind | calibrated |", "|---|---|---|---|"]
    lines += [f"| `{m.name}` | {_cell(m.help)} | {m.kind} | {'yes' if m.calibrated else '-'} |"
              for m in all_methods()]
    return "\n".join(lines)


def arm_table() -> str:
    lines = ["| arm | base | starts from | what it is |", "|---|---|---|---|"]
    lines += [f"| `{a.name}` | {a.base} | `{a.init}` | {_cell(a.help)} |" for a in ARM_SPECS.values()]
    return "\n".join(lines)


def sections() -> dict[str, str]:
    """Generated section name -> its Markdown."""
    return {"methods": method_table(), "arms": arm_table(), **{f"flags-{c}": flag_table(c) for c in COMMANDS}}


FILES = (ROOT / "README.md", ROOT / "docs" / "guide.md")
API_FILE = ROOT / "docs" / "api.md"


def api_section(api_info: dict | None = None) -> dict[str, str]:
    """{"api": docs/api.md's endpoint list} from `api_info` (the page's API info, or what gradio_client's
    `view_api(return_format="dict")` returns for a running app), or, without it, from a page built here."""
    if api_info is None:
        from quailora_app.app.ui import api_info as page_api_info  # builds the page (gradio): only docs/api.md needs it

        api_info = page_api_info()
    return {"api": api_markdown(api_info)}


def rewrite(text: str, generated: dict[str, str]) -> str:
    """`text` with each marked section replaced by its generated Markdown."""
    for name, body in generated.items():
        tag = re.escape(name)
        pattern = re.compile(rf"(<!-- generated: {tag} -->\n)(?:.*?\n)??(<!-- /generated: {tag} -->)", re.S)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale(files=FILES, generated: dict[str, str] | None = None) -> list[str]:
    """The files whose marked sections differ from the code (from `generated`, by default `sections()`)."""
    generated = sections() if generated is None else generated
    return [str(path.relative_to(ROOT)) for path in files if rewrite(path.read_text(), generated) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    if check:
        found = stale() + stale((API_FILE,), api_section())
        if found:
            print(f"generated sections out of date in {', '.join(found)}: run python -m quailora_app.doc_tables")
        return 1 if found else 0
    generated = sections()
    for path in FILES:
        path.write_text(rewrite(path.read_text(), generated))
    API_FILE.write_text(rewrite(API_FILE.read_text(), api_section()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
