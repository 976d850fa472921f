"""A base that a method quantized again (LoftQ, kind "requant"), kept with its adapter.

LoftQ's factors correct Q_T, the weight of its own re-quantized layers, not the stock base's Q_1: shipped alone, the
adapter would be applied to the wrong matrix. So an init run saves, beside such an adapter, the base it was
measured on: `base_weights.safetensors`, every quantized linear layer's dequantized weight exactly as the layer
multiplies by it (Q_T for the layers the method re-quantized, Q_1 for any other), under the module's name in the
plain transformers model. The model that gave the reported figures is then

    y = Q_T x + s B A x

and it loads with plain transformers and peft, nothing of this project needed (`load_with_base` does just that):

    model = AutoModelForCausalLM.from_pretrained(full_precision_folder, dtype=torch.float32)
    model.load_state_dict(load_file(adapter_folder / "base_weights.safetensors"), strict=False)
    model = PeftModel.from_pretrained(model, adapter_folder)

The weights are held at the precision the layer dequantizes to (float32 on CPU, so 32 bits per weight on disk,
not the 2-4 of the quantized layer: the file is a faithful copy of Q, not a compressed one). The same model at low
memory is the quantized base with each re-quantized layer swapped in (`swapped_bases`), as the flows measure it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from quailora_app.engine.adapters import lora_layers
from quailora_app.engine.quantization.layers import dequantized_weight, is_quantized
from quailora_app.errors import ModelError
from quailora_app.sources.models import MODEL_LOAD_LOCK, trust_remote_code

#: the file beside adapter_model.safetensors holding the base the adapter corrects
BASE_FILE = "base_weights.safetensors"


@contextmanager
def swapped_bases(peft_model, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Within the block, each LoRA layer named in `layers` (module path -> quantized layer) computes on that base
    layer instead of its own (a LoftQ base, Q_T); its own is put back after, whatever happens."""
    lora = lora_layers(peft_model)
    kept = {}
    try:
        for path, layer in layers.items():
            kept[path] = lora[path].base_layer
            lora[path].base_layer = layer
        yield
    finally:
        for path, layer in kept.items():
            lora[path].base_layer = layer


@contextmanager
def replaced_modules(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Within the block, each module of `model` named in `layers` (module path -> module) is that module instead
    (a model without LoRA layers: the self-check's); the model's own are put back after, whatever happens."""
    kept = {}
    try:
        for path, layer in layers.items():
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            kept[path] = (parent, child, getattr(parent, child))
            setattr(parent, child, layer)
        yield
    finally:
        for parent, child, layer in kept.values():
            setattr(parent, child, layer)


def base_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """'<module path>.weight' -> Q (CPU) of every quantized linear layer of `model` (a peft model is read through
    its LoRA layers' current base layers), as the layer multiplies by it. Held at `dtype` where that holds Q
    exactly (a compute dtype of bfloat16 dequantizes to bfloat16 values), else at float32."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    out = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer") or not is_quantized(module):
            continue
        Q = dequantized_weight(module).cpu()
        held = Q.to(dtype)
        out[f"{name}.weight"] = held if torch.equal(held.float(), Q) else Q.float()
    if not out:
        raise ModelError("the model holds no quantized linear layer to save as a base")
    return out


def save_base(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `base_weights(model)` as folder/BASE_FILE (safetensors) and return its path."""
    path = Path(folder) / BASE_FILE
    save_file({k: v.contiguous() for k, v in base_weights(model, dtype).items()}, str(path))
    return path


def load_with_base(adapter_folder: str | Path, model_folder: str | Path, device: str | torch.device = "cpu",
                   is_trainable: bool = False):
    """The model an adapter with a saved base was measured as, with plain transformers and peft: the
    full-precision model of `model_folder` in float32, every quantized layer's weight replaced by the saved Q, then
    the adapter. Raises ModelError when the folder has no base or its weights do not fit the model."""
    adapter_folder = Path(adapter_folder)
    base_file = adapter_folder / BASE_FILE
    if not base_file.is_file():
        raise ModelError(f"{adapter_folder} holds no {BASE_FILE}: its adapter goes on the stock quantized base")
    with MODEL_LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code())
    weights = {k: v.float() for k, v in load_file(str(base_file)).items()}
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ModelError(f"{base_file.name} does not fit the model in {model_folder}: "
                         f"{len(result.unexpected_keys)} weights it does not have, e.g. {result.unexpected_keys[0]}")
    return PeftModel.from_pretrained(model.to(device), str(adapter_folder), is_trainable=is_trainable)
