"""Held-out perplexities that no initialization changes, kept on disk: the full-precision model's, the 8-bit
model's and the plain 4-bit base's (qlora: with B = 0 its adapter adds exactly nothing). A later run with the same
weights, held-out tokens and numerics reads them instead of loading and evaluating those models again.

An entry's key holds everything that moves the number: the checkpoint (each weight file's name, size, modification
time and safetensors header, and config.json's hash), the held-out token ids themselves (so the text, its split,
the tokenizer, seq-len and eval-tokens), the sequences per forward pass, the variant (full, int8, or the 4-bit
settings) with its dtype, the device (CPU kernel level and threads, or the GPU's name), the versions of torch,
transformers, bitsandbytes and peft, and evaluate.PERPLEXITY_VERSION (bumped whenever perplexity() or the way a
baseline is loaded changes). So a hit is the number a fresh measurement gives, bit for bit. The file repeats its
key, compared on reading: a hash collision, a damaged or a foreign file is a miss, measured and written again.

The store itself (`read_entry` / `write_entry`: one JSON file per key, which it repeats) also keeps downstream
accuracies (accuracy_cache.py).

QUAILORA_PERPLEXITY_CACHE: the folder (default <QUAILORA_CACHE>/perplexity), or "off".
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quailora_app.config import QuantConfig
from quailora_app.engine.evaluation.evaluate import PERPLEXITY_VERSION
from quailora_app.runs import write_json_atomic
from quailora_app.sources.models import cache_dir

CACHE_ENV = "QUAILORA_PERPLEXITY_CACHE"
LIBRARIES = ("torch", "transformers", "bitsandbytes", "peft")
_OFF = ("off", "0", "no", "false", "none")
_HEADER_LIMIT = 100_000_000  # a safetensors header longer than this is not one


@dataclass(frozen=True)
class CachedPerplexity:
    """A perplexity read from the cache, with when and in how many seconds it was measured."""

    perplexity: float
    measured_at: str
    seconds: float

    def record(self) -> dict[str, Any]:
        """What a report says of it."""
        return {"measured_at": self.measured_at, "seconds": self.seconds}


def cache_folder() -> Path | None:
    """QUAILORA_PERPLEXITY_CACHE, else <cache_dir()>/perplexity; None when switched off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser() if value and value.strip() else cache_dir() / "perplexity"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_header(path: Path) -> str:
    """The hash of a safetensors file's header (every tensor's name, dtype, shape and offsets)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        return _sha256(f.read(size) if 0 < size < _HEADER_LIMIT else raw)


def checkpoint_fingerprint(folder: str | Path) -> dict[str, Any]:
    """The model folder's identity: config.json's hash and, per weight file, its size, modification time and
    header hash (a file rewritten, even with the same size, changes its time)."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()  # follows the hub cache's symlinks to the blob
        files.append({"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "header": _safetensors_header(path)})
    config = folder / "config.json"
    return {"config": _sha256(config.read_bytes()) if config.is_file() else None, "files": files}


def token_fingerprint(ids: torch.Tensor) -> dict[str, Any]:
    """The held-out token ids themselves: shape, dtype and the hash of their bytes."""
    flat = ids.detach().to("cpu", torch.int64).contiguous()
    return {"shape": list(flat.shape), "sha256": _sha256(flat.numpy().tobytes())}


def device_fingerprint(device: torch.device) -> dict[str, Any]:
    """What decides the kernels: the CPU's kernel level and torch's threads (the reduction order of a matmul
    can depend on them), or the GPU's name and compute capability."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "capability": list(torch.cuda.get_device_capability(device))}
    if device.type == "cpu":
        return {"type": "cpu", "kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    return {"type": device.type}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def full_variant() -> dict[str, Any]:
    """The unquantized model, as sources.models.load_full_precision loads it (float32)."""
    return {"model": "full", "dtype": str(torch.float32)}


def int8_variant(dtype: torch.dtype) -> dict[str, Any]:
    """bitsandbytes LLM.int8, its other weights held in `dtype` (engine.quantize.int8_dtype)."""
    return {"model": "int8", "dtype": str(dtype)}


def four_bit_variant(quant: QuantConfig, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The quantized base with no correction (qlora), as quantization/load.py loads it: bitsandbytes 4-bit (its key
    unchanged since before HQQ, so earlier entries still hit), or HQQ at its bits and group size with hqq's version."""
    if quant.quantizer == "hqq":
        return {"model": f"hqq{quant.bits}", "group_size": quant.block_size, "dtype": str(compute_dtype),
                "hqq": importlib.metadata.version("hqq")}
    return {"model": "4bit", "quant": quant.quant, "double_quant": quant.double_quant,
            "block_size": quant.block_size, "dtype": str(compute_dtype)}


def perplexity_key(variant: Mapping[str, Any], folder: str | Path, eval_ids: torch.Tensor, batch_size: int,
                   device: torch.device) -> dict[str, Any]:
    """Everything the perplexity of `variant` of the model in `folder` on `eval_ids` depends on."""
    return {"version": PERPLEXITY_VERSION, "variant": dict(variant), "weights": checkpoint_fingerprint(folder),
            "tokens": token_fingerprint(eval_ids), "batch": int(batch_size), "device": device_fingerprint(device),
            "libraries": library_versions()}


def entry_path(folder: Path, key: Mapping[str, Any]) -> Path:
    digest = _sha256(json.dumps(key, sort_keys=True).encode())
    prefix = "acc-" if "task" in key else ""
    return folder / f"{prefix}{key['variant'].get('model', 'model')}-{digest[:40]}.json"


def read_entry(key: Mapping[str, Any]) -> dict | None:
    """The cache entry stored under `key` (its file repeats the key), or None."""
    folder = cache_folder()
    if folder is None:
        return None
    try:
        entry = json.loads(entry_path(folder, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
        return None
    return entry


def write_entry(key: Mapping[str, Any], values: Mapping[str, Any], seconds: float) -> Path | None:
    """Store `values` under `key` (atomically); None when the cache is off or the folder cannot be written."""
    folder = cache_folder()
    if folder is None:
        return None
    path = entry_path(folder, key)
    entry = {"key": dict(key), **values, "seconds": round(float(seconds), 3),
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_json_atomic(path, entry)
    except OSError:
        return None
    return path


def read_cached(key: Mapping[str, Any]) -> CachedPerplexity | None:
    """The perplexity stored under `key`, or None: no cache, no entry, or an entry that is damaged, holds another
    key or a value that is not a finite perplexity (>= 1)."""
    entry = read_entry(key)
    if entry is None:
        return None
    value, seconds = entry.get("perplexity"), entry.get("seconds", 0.0)
    if not isinstance(value, float) or not math.isfinite(value) or value < 1.0:
        return None
    return CachedPerplexity(value, str(entry.get("measured_at", "")),
                            float(seconds) if isinstance(seconds, (int, float)) else 0.0)


def write_cached(key: Mapping[str, Any], perplexity: float, seconds: float) -> Path | None:
    """Store a freshly measured perplexity under `key` (atomically); nothing when the cache is off, the value is
    not finite or the folder cannot be written (the run goes on: the cache only saves time)."""
    if not math.isfinite(perplexity):
        return None
    return write_entry(key, {"perplexity": float(perplexity)}, seconds)
