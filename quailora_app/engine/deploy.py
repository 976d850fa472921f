"""What survives deployment of a LoRA adapter fitted on a quantized base: the ways it is shipped.

    (a) adapter_4bit         the 4-bit base with the adapter, as trained: Q x + s B A x
    (b) merged               merged into the original full-precision weights, W' = W + s B A (peft's
                             merge_and_unload on the float32 / bfloat16 model), saved as a plain transformers folder
    (c) merged_requantized   (b) quantized again with the run's quantizer (NF4 by default): quant(W + s B A)
    (d) adapter_reloaded     the adapter saved and loaded with plain peft (PeftModel.from_pretrained) onto the stock
                             4-bit base: what a user of the adapter folder gets
    (e) merged_dequantized   merged into the dequantized 4-bit weights, Q + s B A, in the same dtype as (b): the
                             model (a) computes, as a plain transformers folder
    (f) dequantized_requantized  (e) quantized again: quant(Q + s B A)

Why quantizing again loses the correction: the adapter was fitted to cancel E = W - Q, the rounding error of *this*
Q. Quantizing W + s B A again rounds each weight afresh: s B A is mostly smaller than a quantization step, so the new
error quant(W') - W' is about as large as E and unrelated to the correction (c); Q + s B A mostly rounds back to Q,
the plain 4-bit model (f). Merging into W (b) keeps s B A but adds it to weights that had no error to cancel: a
correction fitted to W - Q is, on W, an error of its own (for an initialization, s B A ~ E, so W + s B A ~ W + E).
Merged into Q (e) it gives back exactly the model measured as (a); kept apart (d) it stays on the very Q it was
fitted to.

(a) is measured where the flow holds its 4-bit peft model; this module builds the others and saves (b) and (e).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel

from quailora_app.config import QuantConfig
from quailora_app.engine.quantization.layers import dequantized_weight, quantized_modules
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.errors import ConfigError
from quailora_app.sources.models import ModelSource, load_full_precision

#: the ways of shipping an adapter, in the order of the table: (a) to (f)
DEPLOY_VARIANTS = ("adapter_4bit", "merged", "merged_requantized", "adapter_reloaded", "merged_dequantized",
                   "dequantized_requantized")
LETTERS = dict(zip(DEPLOY_VARIANTS, "abcdef", strict=True))

WHY_REQUANTIZED_LOSES = ("Quantizing again rounds every weight afresh: s B A is mostly smaller than a quantization "
                         "step, so quant(W + s B A) (c) carries a new rounding error about as large as the one the "
                         "adapter was fitted to cancel and unrelated to it, and quant(Q + s B A) (f) rounds mostly "
                         "back to plain 4-bit. Merged into W (b), the correction lands on weights with no error to "
                         "cancel; merged into the dequantized Q (e) it is exactly the model (a), as is the adapter "
                         "kept apart (d).")


def merge_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto': the full-precision reference's dtype (float32 on CPU, bfloat16 on CUDA); else the named dtype."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def deploy_labels(quant: QuantConfig, dtype: torch.dtype) -> dict[str, str]:
    """One line per way of shipping, as the table and figure name them."""
    held = dtype_name(dtype)
    base = f"{quant.bits}-bit {quant.label}"
    return {"adapter_4bit": f"(a) {base} base + adapter, as trained",
            "merged": f"(b) merged into the original weights, W + s B A ({held})",
            "merged_requantized": f"(c) (b) quantized again to {base}",
            "adapter_reloaded": f"(d) adapter kept apart on the stock {base} base, saved and loaded with peft",
            "merged_dequantized": f"(e) merged into the dequantized {base} weights, Q + s B A ({held})",
            "dequantized_requantized": f"(f) (e) quantized again to {base}"}


def merged_model(source: ModelSource, adapter_folder: str | Path, device: torch.device, dtype: torch.dtype,
                 model=None):
    """(b): the full-precision model in `dtype` (`model`, changed in place, when given: (e) passes the dequantized
    model) with the adapter folder merged into its weights (W + s B A), a plain transformers model with no LoRA
    layers left."""
    model = load_full_precision(source, device, dtype) if model is None else model
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_folder))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"the adapter {adapter_folder} does not fit model '{source.name}': {exc}") from None
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def save_merged(model, tokenizer, folder: str | Path) -> Path:
    """The merged model as a folder `AutoModelForCausalLM.from_pretrained` loads with nothing of this project:
    config.json, safetensors weights in the model's dtype, the tokenizer. Written beside its place and renamed into
    it, so a crash never leaves half a model."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    use_cache = model.config.use_cache
    model.config.use_cache = True  # the project's loader turns the cache off; a user generating wants it on
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.config.use_cache = use_cache
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def requantized_model(merged_folder: str | Path, quant: QuantConfig, device: torch.device,
                      compute_dtype: torch.dtype):
    """(c): the merged folder loaded quantized again with `quant` (bitsandbytes NF4 / FP4 or HQQ), as the
    memory-saving recipe does."""
    folder = Path(merged_folder)
    return load_quantized(ModelSource(folder.name, folder), quant, device, compute_dtype)


def adapter_apart(base, adapter_folder: str | Path):
    """(d): a stock quantized base (load_quantized) with the adapter folder loaded by plain peft
    (PeftModel.from_pretrained)."""
    model = PeftModel.from_pretrained(base, str(adapter_folder))
    model.eval()
    return model


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """Q (float32, CPU) of every quantized linear layer of a quantized base, by module name, as the layer holds it."""
    return {name: dequantized_weight(layer).cpu() for name, layer in quantized_modules(model).items()}


def dequantized_model(source: ModelSource, weights: dict[str, torch.Tensor], device: torch.device,
                      dtype: torch.dtype):
    """The full-precision model in `dtype` with each quantized layer's weight replaced by its Q (`weights`, from
    quantized_weights): a plain transformers model that computes what the quantized base computes, up to `dtype`."""
    model = load_full_precision(source, device, dtype)
    with torch.no_grad():
        for name, q in weights.items():
            weight = model.get_submodule(name).weight
            if weight.shape != q.shape:
                raise ValueError(f"{name}: Q of shape {tuple(q.shape)} does not fit the weight {tuple(weight.shape)}")
            weight.copy_(q.to(weight.dtype))
    return model


def kept_shares(perplexity: dict[str, float | None], plain: float | None) -> dict[str, float | None]:
    """Of the perplexity the adapter gains on the 4-bit base, (plain - ppl_a), the share each way of shipping keeps:
    (plain - ppl_x) / (plain - ppl_a). 1 = all kept, 0 = back to plain 4-bit; None for every way when the adapter
    gains nothing ((a) not below plain)."""
    a = perplexity.get("adapter_4bit")
    if plain is None or a is None or plain - a < 1e-9:
        return dict.fromkeys(DEPLOY_VARIANTS)
    return {name: (plain - value) / (plain - a) if value is not None else None
            for name, value in ((n, perplexity.get(n)) for n in DEPLOY_VARIANTS)}
