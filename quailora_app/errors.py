"""User-facing errors: one clear line for the UI and the CLI, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelError(UserError):
    """The model cannot be found, loaded, or is not a causal language model."""


class DataError(UserError):
    """The dataset cannot be found or read, is empty, or has no usable text column."""


class ConfigError(UserError):
    """A setting is out of range (rank too large, unknown method, ...)."""


class Cancelled(UserError):
    """The run was stopped by the user; what was computed so far is kept."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` (a message or an exception) as one line of at most `limit` characters: every run of whitespace,
    newlines included, becomes one space; a longer text is cut and ends with '...'."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
