"""The LoRA plan of a model: which layers LoRA adapts, at what rank r and scaling s each (peft adds s * B @ A),
and what a whole-model initialization method is given and gives back (engine/methods/registry.py, kind "model").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from quailora_app.config import LoraSettings
from quailora_app.engine.adapters import Factors
from quailora_app.engine.calibration.calibrate import decoder_layers, target_names
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.registry import MODEL, get_method
from quailora_app.errors import ConfigError


class LayerLoRA(NamedTuple):
    """One layer's LoRA shape: rank r and scaling s (peft adds s * B @ A)."""

    rank: int
    scaling: float


def split_path(prefix: str, name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj') for blocks under `prefix` ('model.layers')."""
    head, _, local = name[len(prefix) + 1:].partition(".") if name.startswith(prefix + ".") else ("", "", "")
    if not head.isdigit() or not local:
        raise ConfigError(f"layer '{name}' is not inside the decoder blocks '{prefix}.<i>'")
    return int(head), local


def target_paths(model, lora: LoraSettings) -> list[str]:
    """Full module paths of the layers LoRA adapts, checked against the rank."""
    prefix, layers = decoder_layers(model)
    names = [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n in target_names(layer, lora.targets)]
    modules = dict(model.named_modules())
    for name in names:
        init_math.check_rank(lora.rank, (modules[name].out_features, modules[name].in_features), name)
    return names


def uniform_plan(model, lora: LoraSettings) -> dict[str, LayerLoRA]:
    """Every target layer of `lora` at its rank and scaling."""
    return {name: LayerLoRA(lora.rank, lora.scaling) for name in target_paths(model, lora)}


@dataclass
class ModelContext:
    """What a whole-model method (kind "model") is given, after the per-layer methods ran."""

    model: Any  # the quantized base model, no LoRA attached; a method that attaches LoRA removes it again
    checkpoint: Checkpoint  # the full-precision weights, read block by block
    calib_ids: torch.Tensor  # calibration windows (n x seq_len)
    plan: dict[str, LayerLoRA]  # the target layers with their rank and scaling
    lora: LoraSettings
    device: torch.device
    calib_dtype: torch.dtype
    damping: float = 0.01
    als_rounds: int = 20
    solver: str = "exact"
    should_stop: Callable[[], bool] = lambda: False
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's own settings (distill_steps, ...)
    start: dict[str, Factors] | None = None  # closed_form's factors when the per-layer pass computed them
    peft_model: Any = None  # the user's PeftModel (the Python API): use its LoRA layers instead of attaching new ones
    adapter: str = "default"  # the user's adapter in peft_model that the factors are for


@dataclass
class ModelInit:
    """What a whole-model method gives back."""

    factors: dict[str, Factors]  # module path -> LoRA factors (s * B @ A is the correction)
    seconds: float
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)  # path -> (weight, calibrated error)
    ranks: dict[str, int] | None = None  # per-layer ranks when they differ from the plan's (peft rank_pattern)
    details: dict[str, Any] = field(default_factory=dict)  # what the report keeps of the method (curves, ...)


def run_model_method(name: str, model, checkpoint: Checkpoint, calib_ids: torch.Tensor, lora: LoraSettings,
                     device: torch.device, calib_dtype: torch.dtype, *, damping: float = 0.01, als_rounds: int = 20,
                     solver: str = "exact", should_stop: Callable[[], bool] = lambda: False,
                     options: Mapping[str, Any] | None = None, start: dict[str, Factors] | None = None) -> ModelInit:
    """Whole-model method `name` (kind "model") on `model` (the quantized base, no LoRA attached), every target layer
    of `lora` at its rank and scaling: its factors, per-layer ranks, details and seconds.

    Written once for the two flows that run these methods after their per-layer pass: init (every method it is
    asked for) and train (the arms that start from one). `start` is closed_form's factors from that pass, which
    distill refines (without it, distill computes them itself); `options` the method's own settings by name
    (distill_steps, ...: the config's fields)."""
    method = get_method(name)
    if method.kind != MODEL:
        raise ValueError(f"method {name!r} is not a whole-model method")
    ctx = ModelContext(model, checkpoint, calib_ids, uniform_plan(model, lora), lora, device, calib_dtype, damping,
                       als_rounds, solver, should_stop, dict(options or {}), start)
    return method.build(ctx)
