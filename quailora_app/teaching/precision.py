"""View 4, the precision trade-off: bytes of the weights per format, measured on real bitsandbytes tensors,
against the held-out perplexity finished init runs measured (their report.json dicts)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods.registry import QLORA
from quailora_app.engine.quantization.bnb import linear4bit_modules, plain_codes
from quailora_app.errors import ConfigError
from quailora_app.units import MIB


@dataclass
class WeightInventory:
    """Shapes of the linear layers that get quantized, and the count of every other parameter (embeddings,
    norms, an untied lm_head), which QLoRA keeps in 16-bit."""

    linear_shapes: dict[str, tuple[int, int]]
    other_params: int

    @property
    def linear_params(self) -> int:
        return sum(m * n for m, n in self.linear_shapes.values())


def inventory_of_model(model) -> WeightInventory:
    """From a loaded 4-bit model: its Linear4bit layers, and every other (distinct) parameter."""
    layers = linear4bit_modules(model)
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return WeightInventory({n: (m.out_features, m.in_features) for n, m in layers.items()}, int(other))


def inventory_of_checkpoint(folder: str | Path) -> WeightInventory:
    """From a safetensors folder without loading it: 2-D weights inside the decoder blocks ('.layers.<i>.')
    are the linear layers; everything else counts as other parameters (a tied lm_head is stored once)."""
    ck = Checkpoint(folder)
    shapes, other = {}, 0
    for key in ck.keys():
        with safe_open(ck._file_of[key], framework="pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        if len(shape) == 2 and key.endswith(".weight") and re.search(r"\.layers\.\d+\.", key):
            shapes[key[: -len(".weight")]] = shape
        else:
            other += int(np.prod(shape)) if shape else 1
    return WeightInventory(shapes, other)


def _nbytes(t) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def storage_of_quant_state(packed: torch.Tensor, state) -> dict[str, int]:
    """Bytes a 4-bit weight really occupies: the packed codes (two per byte), the per-block absmax (float32, or
    uint8 with double quantization), the nested statistics (float32 absmax of each 256 absmax + the offset)
    and the code tables (16 floats; 256 floats for the nested 8-bit code), all as bitsandbytes holds them."""
    nested = state.state2 if state.nested else None
    return {
        "codes": _nbytes(packed),
        "absmax": _nbytes(state.absmax),
        "nested": _nbytes(nested.absmax) + _nbytes(state.offset) if nested is not None else 0,
        "tables": _nbytes(state.code) + (_nbytes(nested.code) if nested is not None else 0),
    }


def model_storage(model) -> dict[str, int]:
    """Summed storage breakdown of every Linear4bit layer of a loaded model, plus 'params' (their weights count)."""
    total = {"codes": 0, "absmax": 0, "nested": 0, "tables": 0, "params": 0}
    for layer in linear4bit_modules(model).values():
        data, state = plain_codes(layer)
        for k, v in storage_of_quant_state(data, state).items():
            total[k] += v
        total["params"] += layer.out_features * layer.in_features
    return total


_STORAGE_CACHE: dict[tuple, dict[str, int]] = {}

#: format key -> (label, bits of the non-quantized parameters)
FORMATS = {
    "fp32": ("32-bit float", 32),
    "bf16": ("16-bit (bf16 / fp16)", 16),
    "int8": ("8-bit LLM.int8", 16),
    "nf4": ("NF4", 16),
    "nf4+dq": ("NF4 + double quant", 16),
    "fp4": ("FP4", 16),
    "fp4+dq": ("FP4 + double quant", 16),
}


def format_storage(shape: tuple[int, int], fmt: str, block_size: int = 64) -> dict[str, int]:
    """Storage breakdown of one (out x in) weight in format `fmt` (a FORMATS key). The 4-bit formats are
    measured by quantizing a random tensor of that shape with bitsandbytes (storage depends only on the shape);
    int8 is LLM.int8's layout: int8 weights plus one float32 scale per output row."""
    m, n = int(shape[0]), int(shape[1])
    if fmt == "fp32":
        return {"codes": 4 * m * n}
    if fmt == "bf16":
        return {"codes": 2 * m * n}
    if fmt == "int8":
        return {"codes": m * n, "absmax": 4 * m}
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    key = (m, n, fmt, block_size)
    if key not in _STORAGE_CACHE:
        import bitsandbytes.functional as F  # heavy import, only where a format is measured

        quant, dq = fmt.split("+")[0], fmt.endswith("+dq")
        packed, state = F.quantize_4bit(torch.randn(m, n, generator=torch.Generator().manual_seed(0)),
                                        blocksize=block_size, compress_statistics=dq, quant_type=quant)
        _STORAGE_CACHE[key] = storage_of_quant_state(packed, state)
    return dict(_STORAGE_CACHE[key])


@dataclass
class MemoryRow:
    key: str  # FORMATS key, or "<format> + <method>" with an adapter
    label: str
    linear_bytes: int  # the quantized (or not) linear layers
    other_bytes: int  # embeddings, norms, ... (16-bit, 32-bit for fp32)
    adapter_bytes: int  # LoRA A and B in float32 (0 without)
    breakdown: dict[str, int]  # codes / absmax / nested / tables of the linear layers
    perplexity: float | None = None
    perplexity_from: str = ""  # which report and key the perplexity came from

    @property
    def total_bytes(self) -> int:
        return self.linear_bytes + self.other_bytes + self.adapter_bytes


@dataclass
class PrecisionTable:
    rows: list[MemoryRow]
    linear_params: int
    other_params: int
    block_size: int
    notes: list[str] = field(default_factory=list)

    HEADER = ("format", "bits / linear weight", "linear layers (MiB)", "other weights (MiB)", "LoRA adapter (MiB)",
              "total (MiB)", "held-out perplexity")

    def bits_per_param(self, row: MemoryRow) -> float:
        """Bits per weight of the linear layers, everything they store included (+ adapter when present)."""
        return 8.0 * (row.linear_bytes + row.adapter_bytes) / max(self.linear_params, 1)

    def table_rows(self) -> list[list[str]]:
        """Formatted rows (HEADER order) for a table widget or a terminal."""
        mib = lambda b: f"{b / MIB:,.2f}"  # noqa: E731
        return [[r.label, f"{self.bits_per_param(r):.3f}", mib(r.linear_bytes), mib(r.other_bytes),
                 mib(r.adapter_bytes) if r.adapter_bytes else "–", mib(r.total_bytes),
                 f"{r.perplexity:.2f}" if r.perplexity is not None else "–"] for r in self.rows]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self.table_rows()]
        return "\n".join(lines)


def _report_format(report: Mapping) -> tuple[str, int]:
    quant = (report.get("settings") or {}).get("quant") or {}
    fmt = quant.get("quant", "nf4") + ("+dq" if quant.get("double_quant", True) else "")
    return fmt, int(quant.get("block_size", 64))


def precision_table(inventory: WeightInventory, reports: Sequence[Mapping] = (), *, block_size: int = 64,
                    formats: Sequence[str] = tuple(FORMATS),
                    adapter_methods: Sequence[str] = ("quailora",)) -> PrecisionTable:
    """View 4: memory of the weights per format, and the held-out perplexity each finished init report (a
    report.json dict, read by the caller through runs.py; its "run_dir" names it in the notes) measured for it:
    "full" -> fp32, "int8" -> int8, "qlora" -> the report's 4-bit format, and each of `adapter_methods` -> that
    format + a LoRA adapter of the report's rank on the report's layers."""
    linear_params = inventory.linear_params
    shape_counts: dict[tuple[int, int], int] = {}
    for shape in inventory.linear_shapes.values():
        shape_counts[tuple(shape)] = shape_counts.get(tuple(shape), 0) + 1
    rows: dict[str, MemoryRow] = {}
    for fmt in formats:
        label, other_bits = FORMATS[fmt]
        breakdown: dict[str, int] = {}
        for shape, count in shape_counts.items():
            for k, v in format_storage(shape, fmt, block_size).items():
                breakdown[k] = breakdown.get(k, 0) + count * v
        other = inventory.other_params * other_bits // 8
        rows[fmt] = MemoryRow(fmt, label, sum(breakdown.values()), other, 0, breakdown)
    notes, seen_eval = [], set()
    extra: list[MemoryRow] = []
    for rep in reports:
        origin = str(rep.get("run_dir", "report"))
        layers = rep.get("layers") or []
        shapes = {row["name"]: tuple(row["shape"]) for row in layers if "name" in row and "shape" in row}
        if any(inventory.linear_shapes.get(name, shape) != shape for name, shape in shapes.items()) or (
                shapes and not set(shapes) & set(inventory.linear_shapes)):
            notes.append(f"{origin} skipped: its layers do not match this model ({rep.get('model', '?')})")
            continue
        ppl = {k: v for k, v in (rep.get("perplexity") or {}).items() if v is not None}
        fmt, bs = _report_format(rep)
        data = (rep.get("settings") or {}).get("data") or {}
        seen_eval.add((rep.get("dataset"), data.get("seq_len"), data.get("eval_tokens"), data.get("seed")))
        if bs != block_size:
            notes.append(f"{origin}: quantized with blocks of {bs}, the table assumes {block_size}")
        for key, target in (("full", "fp32"), ("int8", "int8"), (QLORA, fmt)):
            if key in ppl and target in rows and rows[target].perplexity is None:
                rows[target].perplexity, rows[target].perplexity_from = ppl[key], f"{origin}: {key}"
        rank = rep.get("rank")
        for method in adapter_methods:
            if method not in ppl or fmt not in rows or not rank:
                continue
            adapter = sum(4 * int(rank) * (int(row["shape"][0]) + int(row["shape"][1])) for row in layers)
            base = rows[fmt]
            extra.append(MemoryRow(f"{fmt}+{method}", f"{base.label} + {method} adapter (r={rank})", base.linear_bytes,
                                   base.other_bytes, adapter, base.breakdown, ppl[method], f"{origin}: {method}"))
    if len(seen_eval) > 1:
        notes.append("the reports measured perplexity on different held-out text (dataset, seq-len, eval tokens or "
                     "seed differ): compare their perplexities with care")
    return PrecisionTable([*rows.values(), *extra], linear_params, inventory.other_params, block_size, notes)
