"""peft LoRA on the 4-bit model: attach, write an initialization's factors, save, and peft's LoftQ anchor.

peft computes y = Q x + s * B (A x) with A = lora_A.weight (r x n), B = lora_B.weight (m x r) and
s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA); factors from init_math.split_factors honour s.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, replace_lora_weights_loftq
from peft.tuners.lora import LoraLayer

from quailora_app.config import LoraSettings

ADAPTER = "default"


@dataclass
class Factors:
    """One layer's LoRA factors: s * B @ A is the correction C."""

    A: torch.Tensor  # (r, n)
    B: torch.Tensor  # (m, r)


def lora_config(lora: LoraSettings, leaf_targets: Sequence[str]):
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, use_rslora=lora.rslora, lora_dropout=0.0, bias="none",
        target_modules=sorted(set(leaf_targets)), task_type="CAUSAL_LM",
    )


def attach_lora(model, lora: LoraSettings, module_names: Sequence[str]):
    """Wrap the quantized model with peft LoRA on exactly `module_names` (full module paths in `model`).

    Targets are given to peft as leaf names (q_proj, ...) restricted to the decoder blocks, so the saved
    adapter_config.json stays readable; the result is checked against the intended set."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    peft_model = get_peft_model(model, lora_config(lora, leaves))
    adapted = set(lora_layers(peft_model))
    unexpected = adapted - set(module_names)
    if unexpected or adapted != set(module_names):  # leaf names also used elsewhere: use exact paths
        peft_model = get_peft_model(peft_model.unload(), lora_config(lora, module_names))
    return peft_model


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """Module path in the base model -> peft LoRA layer."""
    prefix = "base_model.model."
    return {
        name[len(prefix):] if name.startswith(prefix) else name: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def read_factors(peft_model) -> dict[str, Factors]:
    """The adapter's current factors, copied to CPU float32."""
    return {
        name: Factors(layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                      layer.lora_B[ADAPTER].weight.detach().float().cpu().clone())
        for name, layer in lora_layers(peft_model).items()
    }


def write_factors(peft_model, factors: dict[str, Factors]) -> None:
    """Copy factors into lora_A / lora_B (keeping their dtype and device)."""
    layers = lora_layers(peft_model)
    missing = set(factors) - set(layers)
    if missing:
        raise KeyError(f"no LoRA layer for {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, f in factors.items():
            A, B = layers[name].lora_A[ADAPTER].weight, layers[name].lora_B[ADAPTER].weight
            if A.shape != f.A.shape or B.shape != f.B.shape:
                raise ValueError(f"{name}: factor shapes {tuple(f.A.shape)}, {tuple(f.B.shape)} "
                                 f"do not fit LoRA {tuple(A.shape)}, {tuple(B.shape)}")
            A.copy_(f.A)
            B.copy_(f.B)


def scaling_of(peft_model, name: str) -> float:
    return float(lora_layers(peft_model)[name].scaling[ADAPTER])


def save_adapter(peft_model, folder: str | Path) -> Path:
    """A peft adapter folder that PeftModel.from_pretrained loads onto the same 4-bit base.

    Written next to its place and renamed into it, so a crash mid-save never leaves a half-written adapter:
    `folder` holds the previous complete adapter or the new one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        peft_model.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)
    return folder


def loftq_factors(peft_model, model_folder: str | Path) -> dict[str, Factors]:
    """peft's replace_lora_weights_loftq (one LoftQ iteration on the fixed 4-bit Q), read back as factors.

    peft writes factors that assume a scaling of 1 (peft issue 1982); they are rescaled here by 1/sqrt(s)
    each so that s * B @ A equals the correction LoftQ computed, a fair comparison at any alpha/r.
    Raises whatever peft raises (on CPU: 'Torch not compiled with CUDA enabled')."""
    before = read_factors(peft_model)
    try:
        replace_lora_weights_loftq(peft_model, model_path=str(model_folder))
        raw = read_factors(peft_model)
    finally:
        write_factors(peft_model, before)
    out = {}
    for name, f in raw.items():
        root_s = scaling_of(peft_model, name) ** 0.5
        out[name] = Factors(f.A / root_s, f.B / root_s)
    return out
