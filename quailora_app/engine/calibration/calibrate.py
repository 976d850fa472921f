"""Block-by-block calibration (as in GPTQ): H = X X^T / N for every distinct linear input, one block at a time.

1. Run the quantized model up to decoder block 0 and keep block 0's inputs (hidden states), and the keyword
   arguments the model passes each block (rotary embeddings, masks: Gemma's sliding-window and global blocks
   each get their own).
2. For each block i: build the FULL-PRECISION block i from the safetensors checkpoint, run the calibration
   inputs through it with hooks that accumulate H for each linear input (q/k/v read one tensor and share one H,
   gate/up share one), hand H and the block's weights W to the caller, and keep the block's outputs as
   block i+1's inputs.
Peak accelerator memory: the quantized model + one full-precision block + one batch's activations + a few
n x n matrices. The activations of all calibration sequences between blocks (2 x N x seq x hidden) stay in CPU
memory and each batch visits the device only while its block runs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from quailora_app.config import ALL_LINEAR
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.quantization.layers import is_quantized, layout_kept
from quailora_app.errors import Cancelled, ConfigError, ModelError


@dataclass
class InputGroup:
    """Linear layers of one block that read the same input tensor, and that input's H = X X^T / N."""

    names: list[str]  # module names inside the block, e.g. ["self_attn.q_proj", "self_attn.k_proj"]
    H: torch.Tensor | None  # (n, n) float32; initialize() drops it once its group is done
    tokens: int
    # with calibrate_blocks(keep_io=True), instead of H: the inputs (tokens x n) and each layer's outputs (tokens x m)
    X: torch.Tensor | None = None
    Y: dict[str, torch.Tensor] | None = None


@dataclass
class BlockCalibration:
    index: int
    prefix: str  # module path of the block in the model, e.g. "model.layers.3"
    groups: list[InputGroup]
    # full-precision W (out x in) in the calibration dtype (bfloat16 on CUDA): callers take .float() one layer at a
    # time, so a whole block's float32 copies never exist at once
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks, and its module path."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith("layers"):
            return name, module
    raise ModelError(f"could not find the {count} decoder blocks of {type(model).__name__}")


def _is_linear(module: nn.Module) -> bool:
    """A linear layer, full precision or quantized by any quantizer."""
    return isinstance(module, nn.Linear) or is_quantized(module)


def target_names(block: nn.Module, targets: Sequence[str]) -> list[str]:
    """Module names inside one block that LoRA adapts: every linear layer, or those whose leaf name is listed."""
    linears = [name for name, m in block.named_modules() if name and _is_linear(m)]
    if ALL_LINEAR in targets:
        return linears
    chosen = [name for name in linears if name.rsplit(".", 1)[-1] in targets or name in targets]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    missing = [t for t in targets if not any(n == t or n.rsplit(".", 1)[-1] == t for n in linears)]
    if missing:
        raise ConfigError(f"target module(s) {', '.join(missing)} not found; "
                          f"this model's block has {', '.join(leaves)}")
    return chosen


class _BlockInputsCaught(Exception):
    pass


#: Where calibration activations wait between blocks (off the accelerator).
STORE = torch.device("cpu")


def moved(value, device: torch.device):
    """`value` with every tensor inside (nested tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def calibration_batch_size(seq_len: int, tokens_per_batch: int = 2048, most: int = 8) -> int:
    """Sequences per calibration forward pass: about `tokens_per_batch` tokens, at most `most` sequences
    (8 x 256 on the CPU defaults, 1 x 2048 for a 7B model's 128 x 2048 calibration): enough rows for efficient
    matrix products, few enough that a batch's activations stay small next to the model."""
    return max(1, min(most, tokens_per_batch // max(seq_len, 1)))


class BlockKwargs(dict):
    """Block 0's keyword arguments (rotary embeddings, mask, ...), with every block's own in `by_block`: models whose
    blocks differ in kind (Gemma 2 and 3: sliding-window and global attention, each with its own mask and rotary
    embeddings) pass each block its own. `for_block(kwargs, i)` picks block i's."""

    by_block: list[dict] | None = None


def for_block(kwargs: dict, index: int) -> dict:
    """Block `index`'s keyword arguments from a captured BlockKwargs (a plain dict serves every block)."""
    by_block = getattr(kwargs, "by_block", None)
    return by_block[index] if by_block is not None and index < len(by_block) else kwargs


_DROPPED_KWARGS = ("hidden_states", "past_key_values", "cache", "past_key_value")


def capture_block_inputs(model, calib_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[tuple[torch.Tensor, BlockKwargs]]:
    """Run the model up to its blocks for each calibration batch; return (block 0's hidden states, the block
    keyword arguments: block 0's, and in `.by_block` each block's) per batch, kept in CPU memory (STORE).

    While capturing, every block's forward is replaced by one that records its keyword arguments and hands its
    input on unchanged (the last one stops the pass): no block computes, and each block's arguments are exactly
    what the model passes it."""
    _, layers = decoder_layers(model)
    captured: list[tuple[torch.Tensor, BlockKwargs]] = []
    batch: list = []  # the current batch: [hidden, [kwargs per block]]
    stored: dict[int, tuple] = {}  # id -> (tensor, its copy): blocks sharing a tensor share its copy

    def store(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in stored:  # (the tensor is kept alive with its copy, so its id is not reused)
                stored[id(value)] = (value, value.detach().to(STORE))
            return stored[id(value)][1]
        if isinstance(value, (tuple, list)):
            return type(value)(store(v) for v in value)
        if isinstance(value, dict):
            return {k: store(v) for k, v in value.items()}
        return value

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                batch.extend([hidden.detach().to(STORE), []])
            batch[1].append(store({k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}))
            if index == len(layers) - 1:
                raise _BlockInputsCaught
            return hidden
        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (accelerate's hooks) if any
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    # This pass runs the model's stem (embeddings, and any 4-bit layer before block 0, as OPT-350m's project_in) in
    # inference mode: layout_kept stops bitsandbytes from repacking those layers, which would change the user's model
    # behind their back and crashes on shapes its CPU kernel cannot take (in_features not a multiple of the block size).
    try:
        with torch.no_grad(), layout_kept(model.modules()):
            for start in range(0, len(calib_ids), batch_size):
                batch.clear()
                stored.clear()
                try:
                    model(input_ids=calib_ids[start:start + batch_size].to(device), use_cache=False)
                except _BlockInputsCaught:
                    pass
                if len(batch) != 2 or len(batch[1]) != len(layers):
                    raise ModelError(f"{type(model).__name__} did not run its {len(layers)} decoder blocks in order")
                kwargs = BlockKwargs(batch[1][0])
                kwargs.by_block = batch[1]
                captured.append((batch[0], kwargs))
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return captured


def build_full_precision_block(model, index: int, checkpoint: Checkpoint, device: torch.device,
                               dtype: torch.dtype) -> nn.Module:
    """Decoder block `index` with its full-precision weights streamed from the checkpoint (nothing else loaded)."""
    prefix, layers = decoder_layers(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    with torch.device("meta"):
        block = type(layers[index])(config, layer_idx=index)
    state = checkpoint.with_prefix(f"{prefix}.{index}.", device, dtype)
    if not state:
        raise ModelError(f"the checkpoint has no weights under '{prefix}.{index}.'")
    block.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*block.parameters(), *block.buffers()]):
        raise ModelError(f"{type(block).__name__} keeps state outside its checkpoint; "
                         "block-by-block calibration does not support it")
    return block.eval()


class HessianAccumulator:
    """Forward pre-hooks that sum x^T x per distinct input tensor of the chosen linear layers.

    With `keep_io` they keep the input rows themselves instead (and, by forward hooks, each layer's output rows),
    forming no H: what the self-check (engine/evaluation/selfcheck.py) compares a quantized layer's product with."""

    def __init__(self, root: nn.Module, names: Sequence[str], keep_io: bool = False):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.keep_io = keep_io
        self.inputs: dict[str, list[torch.Tensor]] = {}  # leader -> input rows (keep_io)
        self.outputs: dict[str, list[torch.Tensor]] = {}  # module name -> output rows (keep_io)
        self.group_of: dict[str, str] = {}  # module name -> name of the first module that read the same tensor
        self._seen: list[tuple[torch.Tensor, str]] = []
        modules = dict(root.named_modules())
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]
        if keep_io:
            self._handles += [modules[n].register_forward_hook(self._output_hook(n)) for n in names]

    def _hook(self, name: str) -> Callable:
        def hook(_module, args):
            x = args[0]
            leader = next((lead for seen, lead in self._seen if seen is x), None)
            if leader is not None:
                self.group_of.setdefault(name, leader)
                return
            self._seen.append((x, name))
            self.group_of.setdefault(name, name)
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
            if self.keep_io:
                self.inputs.setdefault(name, []).append(flat.to(STORE))
                return
            if name not in self.sums:
                self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
            self.sums[name].addmm_(flat.T, flat)
        return hook

    def _output_hook(self, name: str) -> Callable:
        def hook(_module, _args, out):
            self.outputs.setdefault(name, []).append(out.detach().reshape(-1, out.shape[-1]).float().to(STORE))
        return hook

    def new_pass(self) -> None:
        """Call before each forward pass so tensors are only matched within one pass."""
        self._seen.clear()

    def groups(self) -> list[InputGroup]:
        members: dict[str, list[str]] = {}
        for name, leader in self.group_of.items():
            members.setdefault(leader, []).append(name)
        if self.keep_io:
            return [InputGroup(names, None, self.tokens[lead], torch.cat(self.inputs[lead]),
                               {name: torch.cat(self.outputs[name]) for name in names})
                    for lead, names in members.items()]
        return [InputGroup(names, self.sums[lead] / self.tokens[lead], self.tokens[lead])
                for lead, names in members.items()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def block_output(out) -> torch.Tensor:
    """The hidden states a decoder block returns (its first output when it returns a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def calibrate_blocks(
    model,
    checkpoint: Checkpoint,
    calib_ids: torch.Tensor,
    targets: Sequence[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    only: Mapping[int, Sequence[str]] | None = None,
    stop_message: str = "during calibration",
    reduce_sums: Callable[[HessianAccumulator], None] | None = None,
    keep_io: bool = False,
) -> Iterator[BlockCalibration]:
    """Yield each block's H groups and full-precision weights, block 0 first. `model` is the quantized model
    (it supplies block 0's inputs and the block classes); the full-precision blocks come from `checkpoint`.

    `only` (block index -> module names inside that block) calibrates just those layers: the blocks before the
    last one listed still run, to produce its inputs, but accumulate no H and are not yielded.

    `reduce_sums(hooks)` runs after each block's forward passes, before H = sums / tokens is formed: several
    processes that each ran their share of the calibration sequences sum `hooks.sums` and `hooks.tokens` there.

    `keep_io` keeps each group's input rows X and each layer's output rows Y (in CPU memory) instead of forming H:
    for a few held-out windows (engine/evaluation/selfcheck.py), not for a whole calibration set."""
    prefix, layers = decoder_layers(model)
    last = max(only) if only else len(layers) - 1
    batch_size = batch_size or calibration_batch_size(calib_ids.shape[-1])
    inputs = capture_block_inputs(model, calib_ids, batch_size, device)
    for index in range(last + 1):
        if should_stop and should_stop():
            raise Cancelled(f"stopped {stop_message} at block {index} of {last + 1}")
        block = build_full_precision_block(model, index, checkpoint, device, dtype)
        names = list(only.get(index, ())) if only is not None else target_names(block, targets)
        hooks = HessianAccumulator(block, names, keep_io)
        outputs = []
        with torch.no_grad():
            for hidden, kwargs in inputs:
                hooks.new_pass()
                out = block(hidden.to(device=device, dtype=dtype), **moved(for_block(kwargs, index), device))
                outputs.append((block_output(out).detach().to(STORE), kwargs))
                del out
        hooks.remove()
        if reduce_sums is not None:
            reduce_sums(hooks)
        groups = hooks.groups() if names else []
        modules = dict(block.named_modules())
        weights = {name: modules[name].weight.detach() for name in names}
        # before the caller's math runs: drop the raw sums, the last pass's inputs the hooks still see, the
        # module (its target weights live on in `weights`) and this block's inputs (its outputs are next's)
        del hooks, block, modules
        inputs, outputs = outputs, None
        if names:
            yield BlockCalibration(index, f"{prefix}.{index}", groups, weights)
        del groups, weights
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the block's and H's memory back before the next block is built


def hessians_by_hooks(full_model, calib_ids: torch.Tensor, targets: Sequence[str],
                      batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Reference: H for every target linear from hooks on the whole full-precision model (module name -> H).
    Holds the whole model at once; used to check calibrate_blocks."""
    prefix, layers = decoder_layers(full_model)
    names = [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n in target_names(layer, targets)]
    hooks = HessianAccumulator(full_model, names)
    device = next(full_model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(calib_ids), batch_size):
            hooks.new_pass()
            full_model(input_ids=calib_ids[start:start + batch_size].to(device), use_cache=False)
    hooks.remove()
    return {name: group.H for group in hooks.groups() for name in group.names}
