"""Quantized bases made once per process and handed out as copies, on the CPU.

Quantizing the embedded SmolLM2 to NF4 takes bitsandbytes about 4 s on 2 cores (its CPU quantize_4bit is plain
torch over every weight), to LLM.int8 about 1.5 s; a deep copy of the result takes 0.4 and 0.3 s. A flow that loads
the same base again and again (Generate, pressed once per prompt) asks `reused_copy(load, source, *args)`: the first
call keeps what `load(source, *args)` returned as a template nobody runs, and every call returns a deep copy of it,
so each run owns its model and may wrap, train or delete it. The template is keyed by the loader, the model folder's
fingerprint (the perplexity cache's `checkpoint_fingerprint`: config.json's hash, each weight file's size,
modification time and header hash) and the loader's other arguments; a changed file is a new key.

The copy is checked where that is cheap: no tensor of it shares memory with the template, and each bitsandbytes
parameter points back to its own layer (Params4bit.__deepcopy__ keeps the template's layer there, where bitsandbytes
writes a layer's quant_state when it quantizes). Off the CPU the loader simply runs: quantizing on a GPU takes
milliseconds, and the device's memory is the scarce thing there.
"""
from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn

from quailora_app.engine.evaluation.perplexity_cache import checkpoint_fingerprint
from quailora_app.sources.models import ModelSource

MAX_TEMPLATES = 2  # a 4-bit and an 8-bit base of one model: what Generate loads per press
MAX_TEMPLATE_BYTES = 2 << 30  # a larger base is loaded afresh each time, never kept

_templates: OrderedDict[Hashable, nn.Module] = OrderedDict()
_lock = threading.Lock()


def weights_identity(source: ModelSource) -> str:
    """The model folder and its fingerprint: another weight file, or the same one rewritten, differs."""
    folder = Path(source.folder).resolve()
    return json.dumps({"folder": str(folder), **checkpoint_fingerprint(folder)}, sort_keys=True)


def model_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _relinked(template: nn.Module, twin: nn.Module) -> nn.Module:
    """`twin` (a deep copy of `template`) with its bitsandbytes parameters pointing to their own layers, and each
    layer's quant_state its weight's where the template's layer shares it."""
    for mine, theirs in zip(template.modules(), twin.modules(), strict=True):
        if not isinstance(theirs, bnb.nn.Linear4bit):
            continue
        if getattr(mine.weight, "module", None) is mine:
            theirs.weight.module = theirs
        if getattr(mine, "quant_state", None) is mine.weight.quant_state:
            theirs.quant_state = theirs.weight.quant_state
    return twin


def _storages(model: nn.Module) -> set[int]:
    found = set()
    for t in [*model.parameters(), *model.buffers()]:
        found.add(t.untyped_storage().data_ptr())
        state = getattr(t, "quant_state", None)
        for part in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            if isinstance(part, torch.Tensor):
                found.add(part.untyped_storage().data_ptr())
    return found - {0}


def copy_of(template: nn.Module) -> nn.Module:
    """A deep copy of `template` that shares no memory with it (checked; RuntimeError otherwise)."""
    twin = _relinked(template, copy.deepcopy(template))
    shared = _storages(template) & _storages(twin)
    if shared:
        raise RuntimeError(f"a copy of a quantized base shares {len(shared)} tensors with its template")
    return twin


def _template(load: Callable[..., nn.Module], source: ModelSource, args: tuple) -> tuple[nn.Module, bool, bool]:
    """(model, made by this call, kept as the template): the template of `load(source, *args)`, made if missing;
    a model over MAX_TEMPLATE_BYTES, or off the CPU, is made and not kept. Call with `_lock` held."""
    devices = [a for a in args if isinstance(a, torch.device)]
    if len(devices) != 1 or devices[0].type != "cpu":
        return load(source, *args), True, False
    key = (f"{load.__module__}.{load.__qualname__}", id(load), weights_identity(source), repr(args))
    template = _templates.get(key)
    made = template is None
    if made:
        template = load(source, *args)
        if model_bytes(template) > MAX_TEMPLATE_BYTES:
            return template, True, False
        _templates[key] = template
        while len(_templates) > MAX_TEMPLATES:
            _templates.popitem(last=False)
    _templates.move_to_end(key)
    return template, made, True


def reused_copy(load: Callable[..., nn.Module], source: ModelSource, *args) -> tuple[nn.Module, bool]:
    """`load(source, *args)` (args include the torch.device), made once per process on a CPU (see the module's
    docstring): the model and whether it was made by this call (False: a copy of a base made earlier). The loader
    must be deterministic in its arguments (bitsandbytes' quantization is: no randomness, no calibration)."""
    with _lock:
        model, made, kept_ = _template(load, source, args)
        return (copy_of(model) if kept_ else model), made


def keep(load: Callable[..., nn.Module], source: ModelSource, *args) -> bool:
    """Make and keep the template `reused_copy(load, source, *args)` will copy, ahead of a first call (a
    process's warm-up); whether one is kept now."""
    with _lock:
        return _template(load, source, args)[2]


def kept() -> list[nn.Module]:
    """The templates this process holds (no run holds them: each run works on a copy)."""
    with _lock:
        return list(_templates.values())


def forget() -> None:
    """Drop every template (tests; a process short of memory)."""
    with _lock:
        _templates.clear()
