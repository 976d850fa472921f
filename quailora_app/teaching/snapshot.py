"""One layer as the teaching views see it: W, the 4-bit Q, H of its inputs and its quantization blocks.

`layer_snapshots` runs the calibration only through the decoder blocks it needs; `ViewsContext` is what every
view needs, loaded once by flows/views.py (the model, its checkpoint, the token windows).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quailora_app.config import ALL_LINEAR, DataConfig, ModelConfig, QuantConfig
from quailora_app.engine.calibration.calibrate import calibrate_blocks, decoder_layers, target_names
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods import init_math
from quailora_app.engine.quantization.bnb import dequantized_weight, linear4bit_modules, plain_codes
from quailora_app.errors import ConfigError


@dataclass
class LayerSnapshot:
    """One linear layer as the teaching views need it: full-precision W, the 4-bit Q the layer multiplies by,
    H = X X^T / N of its full-precision inputs on calibration text, and the quantization blocks of Q.

    Blocks: bitsandbytes flattens W row-major and cuts it into runs of `block_size` weights; block b holds
    flat indices [b * block_size, (b + 1) * block_size) and every Q value in it is code[i] * absmax[b]."""

    name: str
    block: int  # decoder block index
    W: torch.Tensor  # (out, in) float32, full precision
    Q: torch.Tensor  # (out, in) float32, dequantized exactly as the 4-bit layer holds it
    H: torch.Tensor  # (in, in) float32
    tokens: int
    quant_type: str  # "nf4" or "fp4"
    block_size: int
    double_quant: bool
    absmax: torch.Tensor  # (n_blocks,) float32, the scale each block's codes are multiplied by (after nested dequant)
    code: torch.Tensor  # (16,) float32, bitsandbytes' code table of quant_type (values in [-1, 1])
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def E(self) -> torch.Tensor:
        """The quantization error W - Q."""
        return self.W - self.Q

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def n_blocks(self) -> int:
        return int(self.absmax.numel())

    def block_slice(self, b: int) -> slice:
        if not 0 <= b < self.n_blocks:
            raise ConfigError(f"quantization block {b} out of range: layer {self.name} has {self.n_blocks} blocks")
        return slice(b * self.block_size, min((b + 1) * self.block_size, self.W.numel()))

    def levels(self, b: int) -> torch.Tensor:
        """The 16 values a weight of block b can take after quantization: code * absmax[b] (ascending)."""
        dtype = self.Q.dtype
        return torch.sort((self.code.float() * self.absmax[b].float()).to(dtype)).values

    # -- float64 quantities shared by the views, computed once -------------------------------------------
    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def E64(self) -> torch.Tensor:
        return self._get("E", lambda: (self.W.double() - self.Q.double()))

    @property
    def H64(self) -> torch.Tensor:
        return self._get("H", lambda: ((self.H.double() + self.H.double().T) / 2))

    @property
    def EH(self) -> torch.Tensor:
        """E @ H (m x n) with the undamped H: the product the singular values of E H^1/2 start from."""
        return self._get("EH", lambda: self.E64 @ self.H64)

    def damped(self, damping: float = 0.01) -> init_math.DampedH:
        """H + lambda I as initialize() forms it (init_math.damped), cached: the spec every correction reads."""
        return self._get(("damped", damping), lambda: init_math.damped(self.H, damping))

    def meter(self, damping: float = 0.01) -> init_math.LowRankErrors:
        """The engine's error meter of this layer: `meter().errors(P, Rt)` = (weight error, calibrated error) of
        C = P @ Rt, as fractions of C = 0's (the calibrated one with the undamped H, whatever the damping)."""
        return self._get(("meter", damping), lambda: init_math.LowRankErrors(self.E64, self.damped(damping)))


def block_absmax(state) -> torch.Tensor:
    """The per-block scale bitsandbytes multiplies the codes by: absmax, or with double quantization the
    8-bit absmax dequantized through the nested state plus its offset (what dequantize_4bit does)."""
    import bitsandbytes.functional as F  # heavy import, only where its tensors are read

    if state.nested:
        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def layer_names(model, targets: Sequence[str] = (ALL_LINEAR,)) -> list[str]:
    """Full module paths of the linear layers inside the decoder blocks (for a layer picker)."""
    prefix, layers = decoder_layers(model)
    return [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n in target_names(layer, targets)]


def default_layer(model) -> str:
    """A representative layer: the MLP output projection of block 3 (or the last block if fewer), else the
    last linear layer of that block."""
    names = layer_names(model)
    prefix, layers = decoder_layers(model)
    block = min(3, len(layers) - 1)
    inside = [n for n in names if n.startswith(f"{prefix}.{block}.")]
    return next((n for n in inside if n.endswith("down_proj")), inside[-1])


def block_of(model, name: str) -> int:
    """The decoder block index of the layer `name` (a ConfigError outside the decoder blocks)."""
    prefix, layers = decoder_layers(model)
    rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else ""
    head = rest.split(".", 1)[0]
    if not head.isdigit() or int(head) >= len(layers):
        raise ConfigError(f"layer '{name}' is not inside the decoder blocks '{prefix}.<i>'")
    return int(head)


@torch.no_grad()
def layer_snapshots(
    model,
    checkpoint: Checkpoint,
    calib_ids: torch.Tensor,
    names: Sequence[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, LayerSnapshot]:
    """Snapshots of the 4-bit linear layers `names` (full module paths) of the quantized `model`.

    Runs the calibration inputs through the full-precision blocks 0..max(block of names) only, one block at a
    time as calibrate.calibrate_blocks does, accumulating H only in the blocks that hold a requested layer."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError("choose at least one layer")
    modules = linear4bit_modules(model)
    valid = layer_names(model)
    for name in names:
        if name not in valid:
            near = [v for v in valid if v.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3] or valid[:3]
            raise ConfigError(f"layer '{name}' is not a linear layer of the decoder blocks; e.g. {', '.join(near)}")
        if name not in modules:
            raise ConfigError(f"layer '{name}' was not quantized to 4-bit")
    prefix, _ = decoder_layers(model)
    wanted: dict[int, list[str]] = {}
    for name in names:
        wanted.setdefault(block_of(model, name), []).append(name)
    only = {index: [n[len(f"{prefix}.{index}."):] for n in inside] for index, inside in wanted.items()}
    out: dict[str, LayerSnapshot] = {}
    for calibrated in calibrate_blocks(model, checkpoint, calib_ids, (), device, dtype, batch_size, should_stop,
                                       only=only, stop_message="while computing the layer view"):
        for group in calibrated.groups:
            for loc in group.names:
                full = f"{calibrated.prefix}.{loc}"
                layer = modules[full]
                _, state = plain_codes(layer)
                out[full] = LayerSnapshot(
                    name=full, block=calibrated.index, W=calibrated.weights[loc].float().cpu(),
                    Q=dequantized_weight(layer).cpu(), H=group.H.float().cpu(), tokens=group.tokens,
                    quant_type=state.quant_type, block_size=int(state.blocksize), double_quant=bool(state.nested),
                    absmax=block_absmax(state).cpu(), code=state.code.float().cpu(),
                )
    return {n: out[n] for n in names}


@dataclass
class ViewsContext:
    """What every view needs, loaded once: the resolved model source, its 4-bit model, the calibration and
    held-out token windows, and the device."""

    source: object  # sources.models.ModelSource
    model: object  # the 4-bit model
    checkpoint: Checkpoint
    calib_ids: torch.Tensor
    eval_ids: torch.Tensor
    device: torch.device
    quant: QuantConfig
    data: DataConfig
    model_cfg: ModelConfig

