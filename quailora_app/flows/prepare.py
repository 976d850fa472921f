"""The load sequence every flow starts with, written once: resolve the model -> its config -> the flow's
preflight (context and memory, before any weight is read) -> tokenizer -> data splits -> NaN / Inf check ->
the 4-bit base (optional: fine-tuning loads a base per arm).

`prepare()` is a generator: it yields the Stage and Log events of those steps, which a flow relays into its own
stream (`Recorder.relay`), and returns the `Prepared` bundle. `drain()` runs it silently (a worker process).
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from quailora_app.config import DataConfig, ModelConfig, QuantConfig
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.errors import Cancelled
from quailora_app.events import Event, Log, Stage
from quailora_app.sources.data import TokenSplits, load_splits
from quailora_app.sources.models import (
    ModelSource,
    compute_dtype,
    device_label,
    load_config,
    load_tokenizer,
    resolve_model,
)

#: (model name, its transformers config) -> the line for the run's events; raises when the run cannot fit
Preflight = Callable[[str, Any], str]
T = TypeVar("T")


@dataclass
class Prepared:
    """What the load sequence produced."""

    source: ModelSource
    config: Any  # the model's transformers config
    tokenizer: Any
    splits: TokenSplits
    checkpoint: Checkpoint  # the full-precision weights, read tensor by tensor
    device: torch.device
    dtype: torch.dtype  # the compute dtype
    model: Any = None  # the 4-bit base, when prepare() loaded it


def prepare(model: ModelConfig, data: DataConfig, quant: QuantConfig, device: torch.device, preflight: Preflight, *,
            should_stop: Callable[[], bool] = lambda: False, split_sizes: Mapping[str, int] | None = None,
            load_base: bool = True) -> Generator[Event, None, Prepared]:
    """Load what a flow needs, yielding its stages. `split_sizes`: min_train_seqs / max_train_seqs for
    load_splits; by default one training window, for a flow that reads only the evaluation and calibration
    windows (those come first and do not depend on the training split's size, so only the documents a flow reads
    are tokenized); `load_base`: also load the 4-bit model."""
    yield Stage("load", f"resolving model '{model.model}'")
    source = resolve_model(model.model)
    config = load_config(source)
    yield Log(preflight(source.name, config))  # before any weight is read
    tokenizer = load_tokenizer(source)
    yield Stage("data", f"reading dataset '{data.dataset}'")
    splits = load_splits(data, tokenizer, **(split_sizes or {"max_train_seqs": 1}))
    if should_stop():
        raise Cancelled("stopped by the user during data loading")
    checkpoint = Checkpoint(source.folder)
    checkpoint.check_finite(source.name)  # NaN / Inf refused before quantizing
    dtype = compute_dtype(model.compute_dtype, device)
    prepared = Prepared(source, config, tokenizer, splits, checkpoint, device, dtype)
    if load_base:
        yield Stage("quantize", f"loading {source.name} quantized to {quant.bits}-bit {quant.label} on "
                                f"{device_label(device)}")
        prepared.model = load_quantized(source, quant, device, prepared.dtype)
    return prepared


def drain(stream: Generator[Event, None, T]) -> T:
    """Run a generator to its end, dropping its events; its return value."""
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value
