"""Downstream accuracies of the models no initialization changes (full precision, 8-bit, the plain 4-bit base),
kept on disk in perplexity_cache.py's store. An entry holds the choice picked per item, so the per-item hits (and
the paired tests built on them) come back, not only the rate. Its key holds the task's fingerprint (its prompts,
items and answers: accuracy.task_fingerprint), the tokenizer's files, the tokens per forward pass and
accuracy.ACCURACY_VERSION in place of perplexity's held-out tokens.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quailora_app.engine.evaluation.accuracy import ACCURACY_VERSION
from quailora_app.engine.evaluation.perplexity_cache import (
    checkpoint_fingerprint,
    device_fingerprint,
    library_versions,
    read_entry,
    write_entry,
)


@dataclass(frozen=True)
class CachedAccuracy:
    """A task's scoring read from the cache: the choice picked per item (acc's or acc_norm's, the task's metric)
    and the unnormalized acc, with when and in how many seconds it was measured."""

    predictions: tuple[int, ...]
    acc_raw: float
    measured_at: str
    seconds: float

    def record(self) -> dict[str, Any]:
        """What a report says of it."""
        return {"measured_at": self.measured_at, "seconds": self.seconds}


def tokenizer_fingerprint(folder: str | Path) -> str:
    """The hash of the model folder's tokenizer files (the text of a task becomes tokens through them)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*")):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json",
                                                                                   "vocab.json", "merges.txt")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def accuracy_key(variant: Mapping[str, Any], folder: str | Path, task: str, batch_tokens: int,
                 device: torch.device) -> dict[str, Any]:
    """Everything the accuracy of `variant` of the model in `folder` on the task of fingerprint `task` (engine/
    accuracy.py `task_fingerprint`) depends on."""
    return {"version": ACCURACY_VERSION, "variant": dict(variant), "weights": checkpoint_fingerprint(folder),
            "tokenizer": tokenizer_fingerprint(folder), "task": task, "batch_tokens": int(batch_tokens),
            "device": device_fingerprint(device), "libraries": library_versions()}


def read_cached_accuracy(key: Mapping[str, Any], choices: Sequence[int]) -> CachedAccuracy | None:
    """The scoring stored under `key` for a task whose items have `choices[i]` choices each, or None (no cache, no
    entry, a damaged entry or one whose predictions do not fit the items)."""
    entry = read_entry(key)
    if entry is None:
        return None
    picks, raw, seconds = entry.get("predictions"), entry.get("acc_raw"), entry.get("seconds", 0.0)
    if not isinstance(picks, list) or len(picks) != len(choices) or not isinstance(raw, (int, float)):
        return None
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < k for p, k in zip(picks, choices,
                                                                                                strict=True)):
        return None
    if not 0.0 <= raw <= 1.0:
        return None
    return CachedAccuracy(tuple(picks), float(raw), str(entry.get("measured_at", "")),
                          float(seconds) if isinstance(seconds, (int, float)) else 0.0)


def write_cached_accuracy(key: Mapping[str, Any], predictions: Sequence[int], acc_raw: float,
                          seconds: float) -> Path | None:
    """Store a freshly scored task under `key` (atomically); nothing when the cache is off or unwritable."""
    return write_entry(key, {"predictions": [int(p) for p in predictions], "acc_raw": float(acc_raw)}, seconds)
