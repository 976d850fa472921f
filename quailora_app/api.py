"""QuAILoRA in your own training script, in one call, the way peft's `replace_lora_weights_loftq` works:

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_folder, quantization_config=bnb)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    result = replace_lora_weights_quailora(peft_model, texts, tokenizer=tokenizer)   # then train as usual

For every LoRA layer of the adapter, with W its full-precision weight (read block by block from the model's
safetensors checkpoint, never a second model in memory), Q the weight its bitsandbytes layer holds (4-bit or
8-bit), E = W - Q, H = X X^T / N of its inputs in the full-precision model on the calibration text, and s the
layer's own scaling (lora_alpha / r, or / sqrt(r) with rsLoRA; rank_pattern and alpha_pattern honoured), the
chosen method writes factors with s * B @ A = C, the method's rank-r correction of E (closed_form: the minimizer
of tr((E - C) H (E - C)^T)). The base weights are not touched; the adapter saves and loads with plain peft.
The exception is LoftQ (methods loftq_svd and loftq_calibrated, engine/methods/loftq.py): T alternating steps of
quantizing W - C and fitting C to W - Q replace each adapted base layer by a new quantized one (bitsandbytes 4-bit or
HQQ, the same settings), as peft's own LoftQ replaces the base weights; the adapter then only holds with that base.
"""
from __future__ import annotations

import math
import operator
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PeftType
from peft.tuners.lora import LoraLayer
from tqdm import tqdm

from quailora_app.config import LoraSettings
from quailora_app.engine.adapters import Factors, loftq_factors, lora_layers, write_factors
from quailora_app.engine.adapters import save_adapter as save_engine_adapter
from quailora_app.engine.calibration.calibrate import decoder_layers
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import LayerLoRA, ModelContext, split_path
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.evaluation.selfcheck import (
    SelfCheck,
    check_window_count,
    measure,
    plain_start,
    refuse_if_damaged,
    scalings_of,
    self_check,
)
from quailora_app.engine.methods.loftq import can_requantize, iters_of
from quailora_app.engine.methods.registry import MODEL, QLORA, REQUANT, get_method, method_names
from quailora_app.engine.quantization.layers import calibration_dtype, is_quantized
from quailora_app.errors import ConfigError, DataError, ModelError, one_line
from quailora_app.events import Progress
from quailora_app.sources.data import PREFERRED_TEXT_COLUMNS, bos_id, pack_windows, texts_of_dataset


@dataclass
class QuailoraResult:
    """What `replace_lora_weights_quailora` did: per layer the error left by plain QLoRA (1.0) and by the method,
    as the init report's rows (`name`, `block`, `module`, `shape`, `weight_error`, `calibrated_error`)."""

    method: str
    layers: list[dict]
    seconds: dict[str, float]
    calibration: dict[str, int]  # windows, seq_len, tokens
    skipped: list[str] = field(default_factory=list)  # LoRA layers outside the decoder blocks, left as they were
    # the self-check (evaluation/selfcheck.py): layers whose correction made them worse on held-out windows, reset to
    # the plain QLoRA start (B = 0), and the check's figures (held-out error ratio per layer, ...)
    layers_reset: list[str] = field(default_factory=list)
    self_check: dict[str, Any] = field(default_factory=dict)
    # LoftQ (a requant method): the LoRA layers whose base layer was replaced by a re-quantized one (Q_T)
    bases_replaced: list[str] = field(default_factory=list)

    @property
    def calibrated_error_median(self) -> float:
        """Median over layers of sqrt(tr((E - C) H (E - C)^T) / tr(E H E^T)) (1.0 = no correction; NaN when the
        method reports no per-layer figures, as peft's LoftQ)."""
        errors = [row["calibrated_error"][self.method] for row in self.layers]
        return statistics.median(errors) if errors else float("nan")

    def record(self) -> dict[str, Any]:
        """What an adapter folder records of its initialization (see `save_adapter`)."""
        record = {"method": self.method, "calibration": self.calibration, "seconds": self.seconds,
                  "calibrated_error_median": self.calibrated_error_median, "layers_reset": list(self.layers_reset),
                  "layers": {row["name"]: row["calibrated_error"][self.method] for row in self.layers}}
        if self.bases_replaced:
            record["bases_replaced"] = list(self.bases_replaced)
        return record


def replace_lora_weights_quailora(
    peft_model,
    calibration,
    method: str = "closed_form",
    *,
    tokenizer=None,
    model_path: str | Path | None = None,
    adapter_name: str = "default",
    seq_len: int = 256,
    max_samples: int = 64,
    text_column: str | None = None,
    damping: float = 0.01,
    als_rounds: int = 20,
    solver: str = "exact",
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
) -> QuailoraResult:
    """Replace the LoRA factors of `peft_model` (a PeftModel with LoRA on a bitsandbytes 4-bit or 8-bit base)
    by a quantization-aware initialization, in place.

    calibration: a list of strings (needs `tokenizer`), a `datasets.Dataset` with a text column (`text_column`,
        guessed when None; needs `tokenizer`), a LongTensor of token ids (windows x length, used as given), a
        list of token-id sequences, or batches as a Trainer's dataloader yields them: any iterable (a list, a
        generator, a torch DataLoader) of dicts with `input_ids` (batch x length) and optionally `attention_mask`
        (1 = token, 0 = padding; other keys ignored), each row taken without its padding and read only as far as
        needed. Texts and sequences are joined by the EOS token and cut into at most `max_samples` windows of
        `seq_len` tokens.
    method: any per-layer method of the registry (`quailora_app.method_names()`: svd, quailora, closed_form, ...)
        or "loftq" (peft's replace_lora_weights_loftq, rescaled so that s * B @ A is its correction; CUDA only).
        "loftq_svd" (LoftQ as published) and "loftq_calibrated" CHANGE THE BASE: T = options["loftq_iter"] (5 by
        default) alternating steps of quantizing W - C with the layer's own quantizer (bitsandbytes 4-bit or HQQ,
        the same settings) and fitting C to W - Q; each adapted LoRA layer's base_layer is then replaced, in place,
        by the new quantized layer (Q_T), which the factors correct. The adapter alone no longer reproduces the
        model: keep (save) the model with its new base layers. Names of the replaced layers: `result.bases_replaced`.
    model_path: the folder of the full-precision safetensors checkpoint (default: the model's `name_or_path`, a
        local folder or the hub cache, as peft's LoftQ finds it).
    options: settings of a whole-model method (e.g. {"distill_steps": 40}; the InitConfig fields of that name) or of
        LoftQ ({"loftq_iter": 5}).
    Self-check (evaluation/selfcheck.py): before anything is written, each layer's correction is measured through the
    layer's own product against W x on held-out windows (about 512 tokens after the first `max_samples` windows when
    the calibration holds them, else a few of the fitted ones); a layer it makes worse is reset to B = 0 (warned,
    and named in `result.layers_reset`), and when more than a few are, ModelError is raised and nothing is written.
    Returns a QuailoraResult with the per-layer errors. Raises ConfigError / DataError / ModelError (one line)."""
    name = _check_method(method)
    layers = _lora_layers(peft_model, adapter_name)
    base = peft_model.get_base_model()
    prefix, _ = decoder_layers(base)
    plan, skipped = {}, []
    for path, layer in layers.items():
        try:
            split_path(prefix, path)
        except ConfigError:
            skipped.append(path)
            continue
        plan[path] = LayerLoRA(int(layer.r[adapter_name]), float(layer.scaling[adapter_name]))
    if not plan:
        raise ConfigError(f"no LoRA layer of adapter '{adapter_name}' is inside the decoder blocks '{prefix}.<i>'")
    _warn_if_repacked(layers)
    changes_base = get_method(name).kind == REQUANT
    if changes_base:
        iters_of(options)  # a bad loftq_iter: one line before any calibration
        cannot = [path for path in plan if not can_requantize(layers[path])]
        if cannot:
            kind = type(layers[cannot[0]].get_base_layer()).__name__
            raise ConfigError(f"method '{name}' quantizes each base layer again with its own quantizer (bitsandbytes "
                              f"4-bit or HQQ); layer {cannot[0]} is a {kind}")
    folder = checkpoint_folder(base, model_path)
    if name == "loftq":
        return _loftq(peft_model, folder, plan, adapter_name, skipped)
    extra = check_window_count(max_samples, seq_len)  # windows beyond the fitted ones, for the self-check
    windows = calibration_ids(calibration, tokenizer, seq_len, max_samples + extra, text_column)
    ids, check_ids, held_out = split_check_windows(windows, max_samples)
    checkpoint = _checkpoint(folder, plan)
    device = next(base.parameters()).device
    calib_dtype = calibration_dtype(base, device)
    if get_method(name).kind == MODEL:
        result = _whole_model(name, ModelContext(
            base, checkpoint, ids, plan, _lora_settings(peft_model, adapter_name), device, calib_dtype, damping,
            als_rounds, solver, options=dict(options or {}), peft_model=peft_model,
            adapter=adapter_name))
    else:
        result = _per_layer(base, name, checkpoint, ids, plan, device, calib_dtype, damping, als_rounds, solver,
                            progress, options if changes_base else None)
    if changes_base:
        return _replace_bases(peft_model, layers, name, result, checkpoint, check_ids, plan, device, calib_dtype,
                              held_out, adapter_name, skipped)
    factors = result.factors
    checks = self_check(base, checkpoint, check_ids, {name: factors}, scalings_of(plan), device=device,
                        dtype=calib_dtype, held_out=held_out)
    refuse_if_damaged(checks, len(factors))
    if result.ranks:
        resize_lora(peft_model, adapter_name, result.ranks)
    write_factors(peft_model, factors, adapter_name)
    check = checks[name]
    if check.reset:
        warnings.warn(check.summary(), stacklevel=2)
    return QuailoraResult(name, result.layers, result.seconds | {"self_check": check.seconds}, result.calibration,
                          skipped, list(check.reset), check.record())


@dataclass
class _Computed:
    """A method's factors for the plan's layers, before the self-check and before they are written."""

    factors: dict[str, Factors]
    layers: list[dict]
    seconds: dict[str, float]
    calibration: dict[str, int]
    ranks: dict[str, int] | None = None
    bases: dict[str, torch.nn.Module] = field(default_factory=dict)  # a requant method's new base layers


def _per_layer(base, name: str, checkpoint: Checkpoint, ids: torch.Tensor, plan: Mapping[str, LayerLoRA],
               device: torch.device, calib_dtype: torch.dtype, damping: float, als_rounds: int, solver: str,
               progress: bool, requant_options: Mapping[str, Any] | None = None) -> _Computed:
    """A per-layer method's factors; with `requant_options` (a requant method's settings) also its new base layers."""
    result = InitResult()
    stream = initialize(base, checkpoint, ids, LoraSettings(), [name], result, device=device, calib_dtype=calib_dtype,
                        damping=damping, als_rounds=als_rounds, solver=solver, plan=plan,
                        requant=requant_options is not None, options=requant_options)
    bar = tqdm(total=len(decoder_layers(base)[1]), desc=f"QuAILoRA {name}", unit="block", disable=not progress)
    with torch.no_grad(), bar:
        for event in stream:
            if isinstance(event, Progress):
                bar.update(event.done - bar.n)
    return _Computed(result.factors[name], result.layers, dict(result.seconds), _windows(ids),
                     bases=result.bases.get(name, {}))


def _windows(ids: torch.Tensor) -> dict[str, int]:
    return {"windows": len(ids), "seq_len": int(ids.shape[1]), "tokens": int(ids.numel())}


def split_check_windows(windows: torch.Tensor, max_samples: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(fit windows, self-check windows, whether those are held out): the first `max_samples` windows are fitted;
    the self-check reads the windows after them, or, when the calibration holds no more, a few of the fitted ones."""
    fit = windows[:max_samples]
    count = check_window_count(len(windows), int(windows.shape[1]))
    if len(windows) > max_samples:
        return fit, windows[max_samples:max_samples + count], True
    return fit, fit[:count], False


def save_adapter(peft_model, folder: str | Path, result: QuailoraResult | None = None, *,
                 adapter_name: str = "default", data: str | None = None) -> Path:
    """peft's save_pretrained of one adapter (loads with PeftModel.from_pretrained), plus, with `result`, how it
    was initialized: quailora.json (method, rank, calibration, data, per-layer errors; peft never reads it) and a
    model card (README.md) with those figures."""
    record = None
    if result is not None:
        config = peft_model.peft_config[adapter_name]
        record = {"method": result.method, "rank": config.r, "lora_alpha": config.lora_alpha,
                  "use_rslora": config.use_rslora, "rank_pattern": dict(config.rank_pattern or {}),
                  "alpha_pattern": dict(config.alpha_pattern or {}), "data": data or "not given",
                  "model": getattr(peft_model.get_base_model().config, "_name_or_path", "") or "not given",
                  **result.record()}
        record["calibration"] = (f"{result.calibration['windows']} x {result.calibration['seq_len']} tokens"
                                 if result.calibration else "none")
    return save_engine_adapter(peft_model, folder, record, adapter_name)


# ---------------------------------------------------------------------------------------------- checks
def _check_method(method: str) -> str:
    if method == QLORA:
        raise ConfigError("'qlora' is peft's default initialization (B = 0): there is nothing to replace; "
                          f"choose one of {', '.join(m for m in method_names() if m != QLORA)}")
    try:
        get_method(method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return method


def _lora_layers(peft_model, adapter: str) -> dict[str, LoraLayer]:
    """The adapter's LoRA layers by module path in the base model, after checking the model is one we can
    initialize: a PeftModel, a LoRA adapter without DoRA, on bitsandbytes-quantized linear layers."""
    if not isinstance(peft_model, PeftModel):
        raise ConfigError(f"expected a peft PeftModel (get_peft_model(model, LoraConfig(...))), got "
                          f"{type(peft_model).__name__}")
    config = peft_model.peft_config.get(adapter)
    if config is None:
        raise ConfigError(f"the model has no adapter '{adapter}'; it has {', '.join(peft_model.peft_config)}")
    if config.peft_type != PeftType.LORA:
        raise ConfigError(f"adapter '{adapter}' is a {config.peft_type.value} adapter; QuAILoRA initializes LoRA "
                          "adapters only")
    if getattr(config, "use_dora", False):
        raise ConfigError(f"adapter '{adapter}' uses DoRA (use_dora=True): its magnitude vector changes what B A "
                          "corrects, which QuAILoRA's closed form does not model; use plain LoRA")
    layers = {path: layer for path, layer in lora_layers(peft_model).items() if adapter in layer.lora_A}
    if not layers:
        raise ConfigError(f"adapter '{adapter}' has no LoRA linear layers")
    plain = [path for path, layer in layers.items() if not is_quantized(layer.get_base_layer())]
    if plain:
        raise ModelError(f"the base model is not quantized with bitsandbytes (layer {plain[0]} is a "
                         f"{type(layers[plain[0]].get_base_layer()).__name__}): load it with "
                         "BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True; QuAILoRA corrects the "
                         "quantization error, which a full-precision base does not have")
    return layers


def _warn_if_repacked(layers: Mapping[str, LoraLayer]) -> None:
    """Say so when bitsandbytes repacked 4-bit layers for its AVX512-BF16 CPU inference kernel (at an earlier forward
    pass): the initialization fits the Q they compute with, but bitsandbytes 0.50.2 passes no gradient back through
    a layer in that layout (its gemv_4bit has no autograd kernel), so CPU fine-tuning would silently leave the LoRA
    factors of the earlier layers untrained."""
    packed = [p for p, layer in layers.items()
              if getattr(getattr(getattr(layer.get_base_layer(), "weight", None), "quant_state", None),
                         "packing_format_for_cpu", False)]  # HQQ layers hold no `weight`
    if packed:
        warnings.warn(f"{len(packed)} of {len(layers)} 4-bit layers are in bitsandbytes' CPU inference layout "
                      f"(repacked at an earlier forward pass, e.g. {packed[0]}): the initialization fits them, but "
                      "bitsandbytes "
                      "passes no gradient through that layout, so fine-tuning on the CPU would not train the LoRA "
                      "factors below them; call quailora_app.keep_cpu_layout(model) right after loading, before any "
                      "forward pass", stacklevel=3)


def checkpoint_folder(model, model_path: str | Path | None = None) -> Path:
    """The folder of the model's full-precision safetensors: `model_path`, else the model's name_or_path as a
    local folder or a snapshot in the hub cache (no download)."""
    where = str(model_path or getattr(model.config, "_name_or_path", "") or "")
    folder = Path(where).expanduser() if where else None
    if folder is None or not folder.is_dir():
        folder = None
        if where and model_path is None:
            from huggingface_hub import snapshot_download  # only for a hub id: its cached snapshot

            try:
                folder = Path(snapshot_download(where, local_files_only=True, allow_patterns=["*.json",
                                                                                           "*.safetensors"]))
            except Exception:  # noqa: BLE001 - not in the cache (or not a hub id): said below, in one line
                folder = None
    if folder is None or not any(folder.glob("*.safetensors")):
        raise ModelError(f"no safetensors checkpoint to read the full-precision weights from "
                         f"({where or 'the model has no name_or_path'}): pass model_path= the folder holding the "
                         "model's *.safetensors (pickle .bin checkpoints cannot be read layer by layer)")
    return folder


def _checkpoint(folder: Path, plan: Mapping[str, LayerLoRA]) -> Checkpoint:
    checkpoint = Checkpoint(folder)
    keys = set(checkpoint.keys())
    missing = [path for path in plan if f"{path}.weight" not in keys]
    if missing:
        raise ModelError(f"the checkpoint in {folder} has no weight for the LoRA layer {missing[0]} "
                         f"({len(missing)} of {len(plan)} missing): is it the model this PeftModel was loaded from?")
    return checkpoint


# ---------------------------------------------------------------------------------------------- calibration
def calibration_ids(calibration, tokenizer=None, seq_len: int = 256, max_samples: int = 64,
                    text_column: str | None = None) -> torch.LongTensor:
    """Calibration windows (n x seq_len) from strings, a datasets.Dataset, token-id sequences, dict batches (rows
    without their padding) or a tensor; packed windows start with the tokenizer's BOS where it adds one by default
    (sources/data.py `bos_id`)."""
    if seq_len < 2 or max_samples < 1:
        raise ConfigError(f"need seq_len >= 2 and max_samples >= 1; got {seq_len}, {max_samples}")
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise DataError(f"a calibration tensor must hold token ids as (windows x length) integers; got "
                            f"{tuple(calibration.shape)} {calibration.dtype}")
        if calibration.shape[0] < 1 or calibration.shape[1] < 2:
            raise DataError(f"calibration tensor of shape {tuple(calibration.shape)} is too short")
        return calibration[:max_samples].long()
    sequences = _token_sequences(calibration, tokenizer, text_column, max_samples * seq_len)
    sep = getattr(tokenizer, "eos_token_id", None)
    windows = pack_windows(sequences, sep, seq_len, max_samples, bos_id(tokenizer) if tokenizer is not None else None)
    if len(windows) == 0:
        tokens = sum(len(s) for s in sequences)
        raise DataError(f"the calibration data holds {tokens:,} tokens, fewer than one window of seq_len={seq_len}: "
                        "give more text or a smaller seq_len")
    return windows


def _token_sequences(calibration, tokenizer, text_column: str | None, limit: int) -> list[list[int]]:
    """Token-id sequences of the calibration; dict batches are read until `limit` tokens (enough for the windows)."""
    if _is_dataset(calibration):
        calibration = texts_of_dataset(calibration, text_column, "the calibration dataset")
    if isinstance(calibration, Mapping):  # one batch, as tokenizer(texts, padding=True) gives it
        calibration = [calibration]
    if not isinstance(calibration, (str, Sequence)) and isinstance(calibration, Iterable):
        items = iter(calibration)  # a generator or a DataLoader: iterated once
        first = next(items, _NONE)
        if isinstance(first, Mapping):
            return _batch_sequences(chain([first], items), limit)
        calibration = [] if first is _NONE else [first, *items]
    if isinstance(calibration, str) or not isinstance(calibration, Sequence) or not calibration:
        raise DataError("calibration must be a non-empty list of strings, a datasets.Dataset with a text column "
                        f"({', '.join(PREFERRED_TEXT_COLUMNS[:4])}, ...), token-id sequences, batches (dicts with "
                        "input_ids, e.g. a DataLoader) or a LongTensor")
    if all(isinstance(item, str) for item in calibration):
        if tokenizer is None:
            raise ConfigError("calibration text needs tokenizer= (the model's tokenizer)")
        texts = [t for t in calibration if t.strip()]
        if not texts:
            raise DataError("the calibration text is empty")
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if any(isinstance(item, Mapping) for item in calibration):
        return _batch_sequences(calibration, limit)
    try:
        return [[int(i) for i in (seq.tolist() if isinstance(seq, torch.Tensor) else seq)] for seq in calibration]
    except (TypeError, ValueError):
        raise DataError("calibration items must all be strings, all sequences of token ids or all batches (dicts "
                        "with input_ids)") from None


_NONE = object()


def _batch_sequences(batches, limit: int) -> list[list[int]]:
    """The rows of dict batches (input_ids, optional attention_mask; other keys ignored) as their unpadded token ids
    (where the mask is 1; the whole row without one), empty rows left out, until `limit` tokens are read."""
    sequences, tokens = [], 0
    for n, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            got = f"keys {', '.join(map(str, batch))}" if isinstance(batch, Mapping) else type(batch).__name__
            raise DataError(f"calibration batch {n} has no input_ids ({got}): give dicts with input_ids and "
                            "attention_mask, as a DataLoader over tokenized data yields them")
        rows = _int_rows(batch["input_ids"], "input_ids", n)
        if batch.get("attention_mask") is not None:
            masks = _int_rows(batch["attention_mask"], "attention_mask", n)
            if [len(m) for m in masks] != [len(r) for r in rows]:
                raise DataError(f"calibration batch {n}: attention_mask has shape {_shape(masks)} but input_ids "
                                f"{_shape(rows)}: give one 0/1 mask value per token id")
            if any(v not in (0, 1) for m in masks for v in m):
                raise DataError(f"calibration batch {n}: attention_mask holds values other than 0 and 1")
            rows = [[t for t, v in zip(row, m) if v] for row, m in zip(rows, masks)]
        for row in rows:
            if row:
                sequences.append(row)
                tokens += len(row)
        if tokens >= limit:
            break
    return sequences


def _int_rows(value, key: str, n: int) -> list[list[int]]:
    """A batch's `key` (a tensor or array, a list of lists or a list of ints: one row) as rows of non-negative ints."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise DataError(f"calibration batch {n}: {key} must be a tensor or a list of integers (batch x length); "
                        f"got {type(value).__name__}")
    value = [row.tolist() if hasattr(row, "tolist") else row for row in value]  # rows given as tensors
    nested = bool(value) and all(isinstance(row, Sequence) and not isinstance(row, (str, bytes)) for row in value)
    rows = []
    for row in value if nested else [value]:
        ints = []
        for v in row:
            try:
                ints.append(operator.index(v))
            except TypeError:
                raise DataError(f"calibration batch {n}: {key} must hold integers (batch x length); found "
                                f"{type(v).__name__} {one_line(repr(v), 40)}") from None
        if ints and min(ints) < 0:
            raise DataError(f"calibration batch {n}: {key} holds a negative value ({min(ints)})")
        rows.append(ints)
    return rows


def _shape(rows: list[list[int]]) -> str:
    lengths = sorted({len(row) for row in rows})
    return f"({len(rows)}, {lengths[0]})" if len(lengths) == 1 else f"({len(rows)} rows of lengths {lengths})"


def _is_dataset(value) -> bool:
    return type(value).__module__.startswith("datasets.") and hasattr(value, "column_names")


# ---------------------------------------------------------------------------------------------- whole-model methods
def _lora_settings(peft_model, adapter: str) -> LoraSettings:
    config = peft_model.peft_config[adapter]
    return LoraSettings(rank=int(config.r), alpha=float(config.lora_alpha), rslora=bool(config.use_rslora))


def _whole_model(name: str, ctx: ModelContext) -> _Computed:
    """A method of kind "model" (calibration/plan.py): its factors, at ranks of its own where it chooses them (the
    LoRA layers are then resized, and the adapter's rank_pattern / alpha_pattern say so, keeping s)."""
    built = get_method(name).build(ctx)
    rows = [{"name": path, "rank": (built.ranks or {}).get(path, ctx.plan[path].rank),
             "weight_error": {QLORA: 1.0, name: errors[0]}, "calibrated_error": {QLORA: 1.0, name: errors[1]}}
            for path, errors in built.layers.items()]
    return _Computed(built.factors, rows, {name: built.seconds}, _windows(ctx.calib_ids), built.ranks)


def resize_lora(peft_model, adapter: str, ranks: Mapping[str, int]) -> None:
    """Give each listed LoRA layer its own rank (new A, B from peft's own update_layer), keeping its scaling s, and
    record the ranks in the adapter's rank_pattern / alpha_pattern so that save_pretrained / from_pretrained agree."""
    config = peft_model.peft_config[adapter]
    layers = lora_layers(peft_model)
    for path, rank in ranks.items():
        layer = layers[path]
        s = float(layer.scaling[adapter])
        alpha = s * (rank ** 0.5 if config.use_rslora else rank)
        if int(layer.r[adapter]) != rank:
            layer.update_layer(adapter, rank, alpha, config)
        config.rank_pattern = {**(config.rank_pattern or {}), path: rank}
        config.alpha_pattern = {**(config.alpha_pattern or {}), path: alpha}


# ---------------------------------------------------------------------------------------------- LoftQ
def _replace_bases(peft_model, layers: Mapping[str, LoraLayer], name: str, computed: _Computed,
                   checkpoint: Checkpoint, check_ids: torch.Tensor, plan: Mapping[str, LayerLoRA],
                   device: torch.device, dtype: torch.dtype, held_out: bool, adapter: str,
                   skipped: list[str]) -> QuailoraResult:
    """A requant method (LoftQ): each LoRA layer's base_layer replaced by its new quantized layer (Q_T), its factors
    written. The self-check measures each layer against the plain base it replaces, on the held-out windows,

        ratio = sqrt( sum_x ||W x - Q_T x - s B A x||^2 / sum_x ||W x - Q_1 x||^2 )

    (Q_1 x, Q_T x: the old and the new layer's own products), and a layer above 1 + tolerance gets its own base back
    with the plain QLoRA start (B = 0); more than a few such layers: ModelError, every base put back, nothing
    written."""
    base = peft_model.get_base_model()
    factors, new_bases = computed.factors, computed.bases
    scalings = scalings_of(plan)
    start = time.perf_counter()
    before = measure(base, checkpoint, check_ids, {name: factors}, scalings, device=device, dtype=dtype)[name]
    kept = {path: layers[path].base_layer for path in new_bases}
    for path, layer in new_bases.items():
        layers[path].base_layer = layer
    try:
        after = measure(base, checkpoint, check_ids, {name: factors}, scalings, device=device, dtype=dtype)[name]
        ratios = {path: math.sqrt(after[path][1] / plain) if (plain := before[path][0]) > 0 else
                  (1.0 if after[path][1] == 0 else math.inf) for path in after}
        check = SelfCheck(name, ratios, True, int(check_ids.numel()), held_out,
                          seconds=time.perf_counter() - start)
        check.reset = check.worse
        refuse_if_damaged({name: check}, len(factors))
    except BaseException:
        for path, layer in kept.items():
            layers[path].base_layer = layer
        raise
    for path in check.reset:
        factors[path] = plain_start(factors[path])
        if path in kept:
            layers[path].base_layer = kept[path]
    write_factors(peft_model, factors, adapter)
    if check.reset:
        warnings.warn(check.summary() + " (their own base layers were put back)", stacklevel=3)
    replaced = [path for path in new_bases if path not in check.reset and new_bases[path] is not kept[path]]
    return QuailoraResult(name, computed.layers, computed.seconds | {"self_check": check.seconds},
                          computed.calibration, skipped, list(check.reset), check.record(), replaced)


def _loftq(peft_model, folder: Path, plan: Mapping[str, LayerLoRA], adapter: str,
           skipped: list[str]) -> QuailoraResult:
    """peft's own LoftQ (one iteration), rescaled per layer so that s * B @ A is LoftQ's correction."""
    if adapter != "default":
        raise ConfigError("method 'loftq' runs peft's replace_lora_weights_loftq, which initializes the 'default' "
                          "adapter only")
    start = time.perf_counter()
    try:
        factors: dict[str, Factors] = loftq_factors(peft_model, folder)
    except Exception as exc:  # noqa: BLE001 - peft's error, in one line (on CPU: it needs CUDA)
        raise ModelError(f"peft's replace_lora_weights_loftq failed: {one_line(exc, 200)}") from None
    write_factors(peft_model, {p: f for p, f in factors.items() if p in plan}, adapter)
    return QuailoraResult("loftq", [], {"loftq": time.perf_counter() - start}, {}, skipped)
