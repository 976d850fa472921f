"""peft LoRA on the 4-bit model: attach, write an initialization's factors, save, and peft's LoftQ anchor.

peft computes y = Q x + s * B (A x) with A = lora_A.weight (r x n), B = lora_B.weight (m x r) and
s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA); factors from init_math.split_factors honour s.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, replace_lora_weights_loftq
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from quailora_app.config import LoraSettings

ADAPTER = "default"
#: peft's `adapter_names` entry for a batch row that runs the base alone (no correction)
BASE_ROW = "__base__"
#: how an adapter was initialized, beside peft's own files (peft never reads it)
RECORD = "quailora.json"


@dataclass
class Factors:
    """One layer's LoRA factors: s * B @ A is the correction C."""

    A: torch.Tensor  # (r, n)
    B: torch.Tensor  # (m, r)


def lora_config(lora: LoraSettings, leaf_targets: Sequence[str], ranks: Mapping[str, int] | None = None):
    """peft's LoraConfig for `lora` on `leaf_targets`; `ranks` (module path -> rank) become rank_pattern, with an
    alpha_pattern that keeps each layer's scaling s = alpha / r (alpha / sqrt(r) with rsLoRA) as at rank r."""
    ranks = dict(ranks or {})
    alphas = {path: lora.scaling * (k ** 0.5 if lora.rslora else k) for path, k in ranks.items()}
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, use_rslora=lora.rslora, lora_dropout=0.0, bias="none",
        target_modules=sorted(set(leaf_targets)), task_type="CAUSAL_LM", rank_pattern=ranks, alpha_pattern=alphas,
    )


def attach_lora(model, lora: LoraSettings, module_names: Sequence[str], ranks: Mapping[str, int] | None = None,
                adapter: str = ADAPTER):
    """Wrap the quantized model with peft LoRA (adapter `adapter`) on exactly `module_names` (full module paths in
    `model`), at rank `lora.rank` or, per layer, `ranks[path]`.

    Targets are given to peft as leaf names (q_proj, ...) restricted to the decoder blocks, so the saved
    adapter_config.json stays readable; the result is checked against the intended set."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    peft_model = get_peft_model(model, lora_config(lora, leaves, ranks), adapter_name=adapter)
    adapted = set(lora_layers(peft_model))
    unexpected = adapted - set(module_names)
    if unexpected or adapted != set(module_names):  # leaf names also used elsewhere: use exact paths
        peft_model = get_peft_model(peft_model.unload(), lora_config(lora, module_names, ranks), adapter_name=adapter)
    return peft_model


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """Module path in the base model -> peft LoRA layer."""
    prefix = "base_model.model."
    return {
        name[len(prefix):] if name.startswith(prefix) else name: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def read_factors(peft_model, adapter: str = ADAPTER) -> dict[str, Factors]:
    """The adapter's current factors, copied to CPU float32."""
    return {
        name: Factors(layer.lora_A[adapter].weight.detach().float().cpu().clone(),
                      layer.lora_B[adapter].weight.detach().float().cpu().clone())
        for name, layer in lora_layers(peft_model).items()
    }


def write_factors(peft_model, factors: dict[str, Factors], adapter: str = ADAPTER) -> None:
    """Copy factors into lora_A / lora_B (keeping their dtype and device)."""
    layers = lora_layers(peft_model)
    missing = set(factors) - set(layers)
    if missing:
        raise KeyError(f"no LoRA layer for {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, f in factors.items():
            A, B = layers[name].lora_A[adapter].weight, layers[name].lora_B[adapter].weight
            if A.shape != f.A.shape or B.shape != f.B.shape:
                raise ValueError(f"{name}: factor shapes {tuple(f.A.shape)}, {tuple(f.B.shape)} "
                                 f"do not fit LoRA {tuple(A.shape)}, {tuple(B.shape)}")
            A.copy_(f.A)
            B.copy_(f.B)


def add_adapter_with_factors(peft_model, name: str, lora: LoraSettings, factors: dict[str, Factors],
                             ranks: Mapping[str, int] | None = None) -> None:
    """Add adapter `name` holding `factors` to `peft_model`, on the layers of its first adapter, at rank `lora.rank`
    or, per layer, `ranks[path]`. With several adapters on one base, peft's mixed-batch inference
    (`model(..., adapter_names=[...])`, one name per batch row, BASE_ROW for the base alone) runs each row through
    its own adapter and every row through the base layers once."""
    targets = next(iter(peft_model.peft_config.values())).target_modules
    peft_model.add_adapter(name, lora_config(lora, list(targets), ranks))
    write_factors(peft_model, factors, adapter=name)


def load_factors(folder: str | Path) -> tuple[dict[str, Factors], dict[str, int]]:
    """The factors of an adapter folder that save_adapter wrote (peft's adapter_model.safetensors), by module path,
    CPU float32, and the layers whose rank is not the adapter's r (peft's rank_pattern; {} when uniform).

    They are peft's A and B as trained or initialized, so write_factors puts the same correction s * B @ A back
    into an adapter of the same rank and alpha (the same s): nothing is rescaled here."""
    folder = Path(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    prefix, parts = "base_model.model.", {}
    for key, tensor in tensors.items():
        for which in ("lora_A", "lora_B"):
            path, found, _ = key.partition(f".{which}.")
            if found:
                path = path[len(prefix):] if path.startswith(prefix) else path
                parts.setdefault(path, {})[which] = tensor.float()
    incomplete = sorted(path for path, pair in parts.items() if len(pair) != 2)
    if incomplete or not parts:
        raise ValueError(f"{folder}: no complete LoRA factors for {incomplete[:1] or 'any layer'}")
    factors = {path: Factors(pair["lora_A"], pair["lora_B"]) for path, pair in parts.items()}
    ranks = {path: int(f.A.shape[0]) for path, f in factors.items() if f.A.shape[0] != config.get("r")}
    return factors, ranks


def scaling_of(peft_model, name: str) -> float:
    return float(lora_layers(peft_model)[name].scaling[ADAPTER])


def save_adapter(peft_model, folder: str | Path, record: Mapping[str, Any] | None = None,
                 adapter: str = ADAPTER) -> Path:
    """A peft adapter folder that PeftModel.from_pretrained loads onto the same 4-bit base.

    With `record` (how the adapter was initialized: method, rank, calibration, data, figures), the folder also
    holds it as `quailora.json` (a file peft never reads) and a model card (README.md: peft's metadata header, our
    text). Written next to its place and renamed into it, so a crash mid-save never leaves a half-written adapter:
    `folder` holds the previous complete adapter or the new one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        peft_model.save_pretrained(staging, selected_adapters=[adapter])
        if adapter != ADAPTER:  # peft puts a non-default adapter in a subfolder of its name
            for item in (staging / adapter).iterdir():
                item.rename(staging / item.name)
            (staging / adapter).rmdir()
        if record is not None:
            (staging / RECORD).write_text(json.dumps(record, indent=2, default=str))
            write_model_card(staging, record)
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


def write_model_card(folder: Path, record: Mapping[str, Any]) -> None:
    """README.md of an adapter folder: the YAML header peft wrote (library, base model, tags), then how the
    adapter was initialized and how to load it."""
    card = folder / "README.md"
    text = card.read_text() if card.exists() else ""
    header = text[:text.index("\n---", 3) + 4] + "\n" if text.startswith("---") and "\n---" in text[3:] else ""
    method = record.get("method", "?")
    lines = [f"# LoRA adapter initialized with `{method}` (QuAILoRA Studio)", "",
             "A plain peft LoRA adapter whose factors start at a quantization-aware initialization: s B A cancels "
             "part of the quantization error E = W - Q of each layer, measured on calibration text "
             "(Lawton et al., 2024, arXiv:2410.14713)."]
    if record.get("base_weights"):  # a method that quantized the base again (LoftQ): its base travels with it
        base = record["base_weights"]
        lines += ["", f"`{method}` quantized the base again: its factors correct the weights Q in `{base}` "
                      "(every quantized linear layer, dequantized exactly as the measured model multiplied by them), "
                      "not the stock quantized base. Load the full-precision model, put Q in, then the adapter:", "",
                  "```python", "import torch", "from peft import PeftModel", "from safetensors.torch import load_file",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(full_precision_folder, dtype=torch.float32)",
                  f'model.load_state_dict(load_file(f"{{adapter_folder}}/{base}"), strict=False)',
                  "model = PeftModel.from_pretrained(model, adapter_folder, is_trainable=True)", "```", "",
                  "(`quailora_app.engine.requantized.load_with_base(adapter_folder, full_precision_folder)` does the "
                  "same.)"]
    else:
        lines += ["Load it onto the base quantized with the same settings:", "",
                  "```python", "from peft import PeftModel",
                  "model = PeftModel.from_pretrained(base_4bit, adapter_folder, is_trainable=True)", "```"]
    lines += ["", "| initialization | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in record.items() if key not in ("layers", "settings")]
    card.write_text(header + "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return str(value)


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
