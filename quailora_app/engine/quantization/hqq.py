"""HQQ (half-quadratic quantization, PyPI `hqq`) at 2, 3, 4 and 8 bits, and the exact dequantized weight Q it holds.

HQQ quantizes W (out x in) in groups of `group_size` consecutive inputs of a row: each group g gets a scale s_g
and a zero z_g (floats at the layer's compute dtype; the zero is rounded to an integer only at 4 bits), fitted by
hqq's half-quadratic proximal solver (an l_p<1 error, no calibration data), and codes q in [0, 2^b - 1]. The layer
multiplies by

    Q[i, j] = (q[i, j] - z_g) * s_g,    y = x Q^T (+ bias),

computed by dequantizing Q at every forward (hqq's PyTorch backend, the only one on CPU). As for bitsandbytes, Q
is read through the layer's own `dequantize()`, so every error figure and initialization is computed against the
matrix the layer really multiplies by; `own_product` / `product_gap` check that invariant.

transformers 5 refuses to load with `HqqConfig` ("... is not available yet"), so layers are swapped in place with
hqq's own `HQQLinear`, as hqq's `AutoHQQHFModel.quantize_model` does; peft wraps them (`HqqLoraLinear`).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import Tensor, nn

from quailora_app.errors import ConfigError

BITS = (2, 3, 4, 8)
"""Bit widths offered. hqq also takes 5 and 6, but stores their codes in 8 bits (no packing), and 1 / 1.58."""
DEFAULT_GROUP_SIZE = 64
SKIPPED = ("lm_head",)
"""Linear layers never quantized by default (hqq skips them too: tied to the embeddings in small models)."""


@dataclass(frozen=True)
class HqqSettings:
    """One HQQ quantization: `bits` per code and `group_size` inputs sharing a scale and a zero."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE

    def check(self, inputs: Mapping[str, int] | None = None) -> HqqSettings:
        """These settings, or ConfigError with one line: bits not in BITS, a group size that is not a positive
        multiple of 8 (hqq's rule), or one that does not divide the inputs of a layer (`inputs`: layer name ->
        in_features). hqq itself only asks the group size to divide the whole matrix, letting groups straddle rows."""
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError(f"HQQ bits must be one of {', '.join(map(str, BITS))} (got {self.bits!r})")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 8 or g % 8:
            raise ConfigError(f"HQQ group size must be a positive multiple of 8 (got {g!r})")
        for name, n in (inputs or {}).items():
            if n % g:
                fits = [d for d in (32, 64, 128, 256) if n % d == 0]
                hint = f"; {' or '.join(map(str, fits))} would" if fits else ""
                raise ConfigError(f"HQQ group size {g} does not divide the {n} inputs of layer '{name}'{hint}")
        return self

    def quant_config(self) -> dict:
        """hqq's quant_config for these settings (BaseQuantizeConfig: axis=1, i.e. groups run along a row's inputs;
        no quantized scales or zeros, which hqq 0.2.8 deprecates)."""
        self.check()
        return BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size)


def is_hqq(layer: nn.Module) -> bool:
    """An HQQ linear layer (or a peft LoRA layer whose base layer is one)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return isinstance(base, HQQLinear)


def _base(layer: nn.Module) -> HQQLinear:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if not isinstance(base, HQQLinear):
        raise TypeError(f"not an HQQ layer: {type(base).__name__}")
    return base


def hqq_modules(model: nn.Module) -> dict[str, HQQLinear]:
    """Every HQQLinear of `model` by module name (under peft, the name ends in '.base_layer')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HQQLinear)}


def lora_targets(model: nn.Module) -> list[str]:
    """peft `target_modules` naming every HQQ layer (their last name parts, e.g. q_proj ... down_proj): peft's
    "all-linear" shortcut matches only nn.Linear subclasses, which HQQLinear is not, and finds nothing."""
    return sorted({name.removesuffix(".base_layer").rpartition(".")[2] for name in hqq_modules(model)})


def settings_of(layer: nn.Module) -> HqqSettings:
    """The HqqSettings an HQQ layer was quantized with (e.g. by hqq's own AutoHQQHFModel.quantize_model)."""
    params = _base(layer).quant_config["weight_quant_params"]
    return HqqSettings(bits=params["nbits"], group_size=params["group_size"])


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


def quantize_linears(model: nn.Module, settings: HqqSettings, names: Iterable[str] | None = None,
                     compute_dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> dict[str, HQQLinear]:
    """Replace the named nn.Linear modules of a full-precision `model` by HQQLinear layers, in place.

    `names`: module names; by default every nn.Linear but the output head (the model's output embeddings, or a
    layer named in SKIPPED). All are checked (ConfigError) before any is
    swapped. Each layer is quantized from its own weight, which hqq then frees; the bias is kept at
    `compute_dtype`, the dtype the layer dequantizes Q to and multiplies in (float32 on CPU). Returns the new
    layers by name."""
    modules = dict(model.named_modules())
    if names is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in modules.items()
                 if type(m) is nn.Linear and m is not head and n.rpartition(".")[2] not in SKIPPED]
    names = list(names)
    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            raise ConfigError(f"no linear layer '{name}' to quantize with HQQ")
    settings.check({name: modules[name].in_features for name in names})
    config, device = settings.quant_config(), str(device)
    swapped = {}
    for name in names:
        layer = HQQLinear(modules[name], config, del_orig=True, compute_dtype=compute_dtype, device=device)
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
        swapped[name] = layer
    return swapped


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> Tensor:
    """Q (out x in, float32) exactly as the HQQ layer holds it: its own dequantize(), (q - z) * s per group. A peft
    LoRA layer is read through its HQQ base layer."""
    return _base(layer).dequantize().float()


@torch.no_grad()
def own_product(layer: nn.Module, x: Tensor) -> Tensor:
    """The product x Q^T (+ bias) the HQQ layer computes, in float32; x is cast to the layer's compute dtype."""
    base = _base(layer)
    return base(x.to(base.compute_dtype)).float()


@torch.no_grad()
def product_gap(layer: nn.Module, x: Tensor) -> float:
    """max |layer(x) - (x Q^T + bias)| / max(1, max |layer(x)|): 0 up to rounding when Q is what the layer multiplies
    by (exactly 0 at float32 compute, where both sides run the same matmul)."""
    base = _base(layer)
    Q = dequantized_weight(base)
    expected = x.float() @ Q.T
    if base.bias is not None:
        expected = expected + base.bias.float()
    out = own_product(base, x)
    return ((out - expected).abs().max() / out.abs().max().clamp(min=1.0)).item()


def _bits_held(meta: Mapping, meta_bits: int | None) -> int:
    bits = 0
    for key, value in meta.items():
        if isinstance(value, Tensor):
            per = meta_bits if (meta_bits is not None and value.is_floating_point()) else value.element_size() * 8
            bits += value.numel() * per
        elif isinstance(value, Mapping) and key.startswith("meta_"):  # quantized zeros/scales: their own statistics
            bits += _bits_held(value, meta_bits)
    return bits


def bits_per_weight(layer: nn.Module, meta_bits: int | None = None) -> float:
    """Memory per weight of the layer's matrix, in bits: the packed codes (3 bits pack 10 codes in 32, so 3.2) plus
    every scale and zero, and their own statistics when they are quantized; the bias is not a weight.

    Scales and zeros are held at the compute dtype (float32 on CPU: 2 x 32 / group_size bits; hqq's default
    float16 on GPU: 2 x 16 / group_size). `meta_bits` counts each floating statistic at that width instead
    (16: the memory of the same layer deployed at float16)."""
    base = _base(layer)
    out_features, in_features = base.meta["shape"]
    bits = base.W_q.numel() * base.W_q.element_size() * 8 + _bits_held(base.meta, meta_bits)
    return bits / (out_features * in_features)


def requantize(like: nn.Module, weight: Tensor, bias: Tensor | None = None) -> HQQLinear:
    """A new HQQ layer holding quant(weight) with the settings, compute dtype and device of the HQQ layer `like`
    (its bias unless `bias` is given), built the way peft re-quantizes an HQQ base when merging.

    LoftQ alternates Q_t = quant(W - s B_t A_t) (this function, then `dequantized_weight`) with fitting s B A to
    W - Q_t; under peft the new layer replaces the base: `peft_layer.base_layer = requantize(peft_layer, ...)`."""
    base = _base(like)
    config = {**copy.deepcopy(base.quant_config), "offload_meta": base.offload_meta}
    layer = HQQLinear(None, config, compute_dtype=base.compute_dtype, device=base.device)
    config.pop("offload_meta", None)
    layer.quantize(weight.detach().to(device=base.device), **config)
    kept = base.bias if bias is None else bias
    layer.bias = None if kept is None else kept.detach().clone().to(device=base.device, dtype=base.compute_dtype)
    return layer


def quantize_weight(weight: Tensor, settings: HqqSettings, compute_dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", name: str = "weight") -> HQQLinear:
    """A new HQQ layer (no bias) holding quant(weight) (out x in) with `settings`, checked against the weight's
    inputs (`name` names it in the error)."""
    config = settings.check({name: weight.shape[1]}).quant_config()
    layer = HQQLinear(None, config, compute_dtype=compute_dtype, device=str(device))
    config.pop("offload_meta", None)
    layer.quantize(weight.detach().to(device=str(device)), **config)
    return layer
