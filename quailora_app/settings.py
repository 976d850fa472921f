"""The config dataclasses read as flat settings: what the command line's flags and the web form's fields are
derived from, so a setting is defined once, in its dataclass field.

A leaf field of a config (nested configs such as `InitConfig.data` are flattened) is one `Setting`, named by
the field. Its field metadata says how it is shown:

- ``help``: one line (the CLI appends "(default: ...)" unless the text already names its default);
- ``choices``: a tuple, or a callable returning one, read when a parser or form is built (a registry);
- ``flag``: the CLI flag when it is not ``--<name-with-dashes>`` (e.g. ``"--lr"``);
- ``metavar``: the CLI's placeholder for a several-values field whose choices are listed in its help;
- ``nargs``: ``"+"`` (default for a tuple field) or ``"*"``;
- ``cli``: False for a setting the command line does not offer;
- ``aliases``: further CLI flags for the same setting (e.g. ``("--group-size",)``).

No project imports: this reads any dataclass.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config dataclass."""

    name: str  # the field's name: the CLI's dest, the form's key
    kind: type  # int, float, str or bool; for a tuple field, the type of its items
    many: bool  # a tuple field: several values
    default: Any  # from the config's default instance (a nested config may change its own defaults)
    metadata: Mapping[str, Any]

    @property
    def help(self) -> str:
        return self.metadata.get("help", "")

    @property
    def flag(self) -> str:
        return self.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def on_cli(self) -> bool:
        return self.metadata.get("cli", True)

    def choices(self) -> tuple | None:
        """The allowed values, evaluated now (a registry may have grown since import)."""
        choices = self.metadata.get("choices")
        return tuple(choices() if callable(choices) else choices) if choices is not None else None


@dataclass(frozen=True)
class Group:
    """The leaf settings of one config, or of one nested config (`name` is the parent's field, "" at the top)."""

    name: str
    settings: tuple[Setting, ...]


def groups(cls: type, defaults: Any = None) -> list[Group]:
    """The settings of config class `cls`: its own leaf fields (group ""), then one group per nested config
    field, in field order. Defaults are read from `defaults` (an instance; `cls()` when None)."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    own: list[Setting] = []
    nested: list[Group] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            inner = groups(hints[f.name], getattr(defaults, f.name))
            if len(inner) > 1:
                raise TypeError(f"{cls.__name__}.{f.name}: a nested config must not nest further")
            nested.append(Group(f.name, inner[0].settings))
        else:
            own.append(_setting(f, hints[f.name], getattr(defaults, f.name)))
    names = [s.name for s in own] + [s.name for g in nested for s in g.settings]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{cls.__name__}: settings {', '.join(clashes)} appear twice; flat names must be unique")
    return [Group("", tuple(own)), *nested]


def settings(cls: type) -> dict[str, Setting]:
    """Every leaf setting of `cls` by name, with the defaults of `cls()` (see `groups`)."""
    return {s.name: s for g in groups(cls) for s in g.settings}


def build(cls: type, values: Mapping[str, Any], defaults: Any = None):
    """A `cls` from flat values by setting name (lists become tuples); a setting not in `values` keeps its
    default. The config's own checks run as usual (ConfigError)."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, getattr(defaults, f.name))
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        else:
            kwargs[f.name] = getattr(defaults, f.name)
    return cls(**kwargs)


def _setting(f: dataclasses.Field, hint: Any, default: Any) -> Setting:
    kind = _without_none(hint)
    many = typing.get_origin(kind) is tuple
    if many:
        kind = typing.get_args(kind)[0]
    if kind not in (int, float, str, bool):
        raise TypeError(f"setting {f.name}: type {hint} is not int, float, str, bool, a tuple of one or optional")
    return Setting(f.name, kind, many, default, f.metadata)


def _without_none(hint: Any) -> Any:
    """X for `X | None` (an optional setting's type), else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint

