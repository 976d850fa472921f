"""Docs that cannot drift: the README's method and arm tables and the guide's flag tables are generated from the
registries and the parser (quailora_app/doc_tables.py); they must equal what the code gives now, and the flag
tables must hold every flag `--help` prints."""
import re

import pytest

from quailora_app import doc_tables


def test_generated_sections_match_the_code():
    assert doc_tables.stale() == [], "run: python -m quailora_app.doc_tables"


@pytest.mark.parametrize("command", doc_tables.COMMANDS)
def test_the_flag_table_lists_every_flag_help_prints(command):
    import argparse

    from quailora_app.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shown = sub.choices[command].format_help()  # what `python -m quailora_app COMMAND --help` prints
    printed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", shown)) - {"--help"}
    table = doc_tables.flag_table(command)
    listed = set(re.findall(r"`(--[a-z][a-z0-9-]*)`", table))
    assert printed == listed
    guide = (doc_tables.ROOT / "docs" / "guide.md").read_text()
    assert table in guide


def test_a_new_method_makes_the_docs_stale(monkeypatch):
    from quailora_app.engine.methods import registry as methods

    methods.register_method("half_svd_docs_probe", label="probe", colour="#000000", help="a probe")(
        lambda E, spec, rank, **o: None)
    try:
        assert "README.md" in doc_tables.stale()
    finally:
        methods.unregister_method("half_svd_docs_probe")
    assert doc_tables.stale() == []


def test_rewrite_fills_an_empty_section_and_keeps_the_rest():
    text = ("a\n<!-- generated: arms -->\n<!-- /generated: arms -->\nb\n"
            "<!-- generated: arms -->\nold\n<!-- /generated: arms -->\n")
    assert doc_tables.rewrite(text, {"arms": "T"}) == ("a\n<!-- generated: arms -->\nT\n<!-- /generated: arms -->\nb\n"
                                                      "<!-- generated: arms -->\nT\n<!-- /generated: arms -->\n")
