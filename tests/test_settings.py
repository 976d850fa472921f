"""Settings defined once: the CLI's flags and the form's fields are derived from the config dataclasses
(`quailora_app.settings`), so a default, a help line or a choice lives in one dataclass field."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from quailora_app import cli
from quailora_app.config import InitConfig, TrainConfig, ViewsConfig
from quailora_app.settings import build, groups, settings

GROWING = ["a", "b"]


@dataclass
class Inner:
    size: int = field(default=3, metadata={"help": "how big"})
    names: tuple[str, ...] = field(default=("x",), metadata={"help": "some names", "choices": lambda: tuple(GROWING)})


@dataclass
class Toy:
    inner: Inner = field(default_factory=lambda: Inner(size=5))
    rate: float = field(default=0.5, metadata={"help": "a rate", "flag": "--lr"})
    on: bool = field(default=True, metadata={"help": "switched on"})
    off: bool = field(default=False, metadata={"help": "switched off"})
    out: str | None = field(default=None, metadata={"help": "where (default: somewhere)"})
    hidden: int = field(default=1, metadata={"cli": False})


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_config_flags(parser, Toy, "toy")
    return parser


def test_settings_are_flat_with_the_parents_defaults():
    own, inner = groups(Toy)
    assert [s.name for s in own.settings] == ["rate", "on", "off", "out", "hidden"]
    assert inner.name == "inner" and inner.settings[0].default == 5  # the parent's default_factory wins
    found = settings(Toy)
    assert found["names"].many and found["names"].kind is str and found["out"].kind is str
    assert found["rate"].flag == "--lr" and found["size"].flag == "--size"


def test_flags_from_fields():
    parser = toy_parser()
    args = parser.parse_args([])
    assert (args.size, args.names, args.rate, args.on, args.off, args.out) == (5, ["x"], 0.5, True, False, None)
    assert not hasattr(args, "hidden")
    args = parser.parse_args(["--lr", "2", "--no-on", "--off", "--names", "a", "b", "--size", "7"])
    assert build(Toy, vars(args)) == Toy(Inner(7, ("a", "b")), 2.0, False, True, None)
    text = parser.format_help()
    assert "how big (default: 5)" in text and "switched on (default: True)" in text
    assert "where (default: somewhere)" in text and "(default: None)" not in text.split("where")[1][:40]
    assert "switched off\n" in text  # a switch that is off has no default to show


def test_callable_choices_are_read_when_the_parser_is_built():
    GROWING.append("c")
    try:
        toy_parser().parse_args(["--names", "c"])
    finally:
        GROWING.remove("c")
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--names", "c"])


@pytest.mark.parametrize("command, cls", [("init", InitConfig), ("train", TrainConfig), ("views", ViewsConfig)])
def test_command_defaults_are_the_config_defaults(command, cls):
    """A command's defaults are its config's, read from one instance: cls(), or for init cli.INIT_CLI_DEFAULTS
    (InitConfig's with downstream accuracy on; the Python API and the app leave it off)."""
    expected = cli.INIT_CLI_DEFAULTS if command == "init" else cls()
    assert build(cls, vars(cli.build_parser().parse_args([command]))) == expected
    if command == "init":
        assert expected == InitConfig(accuracy=expected.accuracy) and expected.accuracy.accuracy_tasks


def test_cli_flags_keep_their_names():
    parser = cli.build_parser()
    args = parser.parse_args(["init", "--no-baselines", "--no-double-quant", "--targets", "q_proj", "v_proj",
                              "--methods", "svd", "--solver", "randomized"])
    cfg = cli.init_config(args)
    assert not cfg.baselines and not cfg.quant.double_quant and cfg.lora.targets == ("q_proj", "v_proj")
    assert cfg.methods == ("qlora", "svd") and cfg.solver == "randomized"
    cfg = cli.train_config(parser.parse_args(["train", "--lr", "1e-3", "--arms", "qlora4", "--seq-len", "64"]))
    assert cfg.learning_rate == 1e-3 and cfg.arms == ("qlora4",) and cfg.data.seq_len == 64
    assert cfg.data.calib_samples == TrainConfig().data.calib_samples  # train's own data defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--arms", "no-such-arm"])
