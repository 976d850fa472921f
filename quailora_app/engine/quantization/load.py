"""The quantized base a run works on, from its QuantConfig: bitsandbytes 4-bit through transformers (the QLoRA
recipe), or HQQ at 2-8 bits, swapped in layer by layer from the full-precision model (transformers 5 does not load
HqqConfig models)."""
from __future__ import annotations

import torch

from quailora_app.config import QuantConfig
from quailora_app.engine.quantization import bnb, hqq
from quailora_app.errors import ModelError
from quailora_app.sources.models import ModelSource, load_full_precision


def load_quantized(source: ModelSource, quant: QuantConfig, device: torch.device, compute_dtype: torch.dtype):
    """The quantized base of `quant`: every linear layer but the output head quantized, everything else in float32
    (CPU) or the compute dtype (CUDA)."""
    if quant.quantizer == "bitsandbytes":
        return bnb.load_4bit(source, quant, device, compute_dtype)
    holding_dtype = torch.float32 if device.type == "cpu" else compute_dtype
    model = load_full_precision(source, device, dtype=holding_dtype)
    swapped = hqq.quantize_linears(model, hqq_settings(quant), compute_dtype=compute_dtype, device=device)
    if not swapped:
        raise ModelError(f"model '{source.name}' has no linear layers HQQ could quantize")
    return model


def hqq_settings(quant: QuantConfig) -> hqq.HqqSettings:
    """The HQQ settings of an hqq QuantConfig (its block size is HQQ's group size)."""
    return hqq.HqqSettings(bits=quant.bits, group_size=quant.block_size)


def bits_per_weight(model) -> float:
    """Memory per linear weight of the quantized layers, in bits (codes, scales, zeros, nested statistics), weighted
    by each layer's size. HQQ's scales and zeros count 16 bits each, as deployed (hqq's float16 default on a GPU; on
    the CPU they are held at the float32 compute dtype), bitsandbytes' absmax as it stores them."""
    total_bits = total_weights = 0.0
    bnb_layers = [m for m in model.modules() if bnb.is_quantized(m)]
    for layer in bnb_layers:
        n = layer.out_features * layer.in_features
        total_bits += bnb.bits_per_weight(layer) * n
        total_weights += n
    for layer in hqq.hqq_modules(model).values():
        out_features, in_features = layer.meta["shape"]
        total_bits += hqq.bits_per_weight(layer, meta_bits=16) * out_features * in_features
        total_weights += out_features * in_features
    if not total_weights:
        raise ModelError("the model holds no quantized linear layer")
    return total_bits / total_weights
