"""Stream tensors out of a safetensors checkpoint one block at a time, never the whole model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from quailora_app.errors import ModelError

#: (file, size, mtime_ns) of safetensors files already found finite in this process
_FINITE: set[tuple[str, int, int]] = set()


class Checkpoint:
    """Key -> file index over `model.safetensors` or a sharded `model.safetensors.index.json`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {key: self.folder / name for key, name in weight_map.items()}
        else:
            self._file_of = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self._file_of.update({key: file for key in f.keys()})
        if not self._file_of:
            raise FileNotFoundError(f"no safetensors weights in {self.folder}")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, key: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        with safe_open(self._file_of[key], framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(key)
        return tensor if dtype is None else tensor.to(dtype)

    def with_prefix(self, prefix: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors under `prefix` (e.g. 'model.layers.3.'), keys stripped of it."""
        return {key[len(prefix):]: self.get(key, device, dtype) for key in self._file_of if key.startswith(prefix)}

    def check_finite(self, name: str, chunk: int = 1 << 24) -> None:
        """ModelError naming the first floating-point tensor that holds NaN or Inf.

        Streamed: one tensor at a time, read in row slices of about `chunk` elements, so the extra memory is
        one slice. A file found clean is remembered (by size and mtime) for the rest of the process."""
        for file in sorted(set(self._file_of.values())):
            stat = file.stat()
            key = (str(file), stat.st_size, stat.st_mtime_ns)
            if key in _FINITE:
                continue
            with safe_open(file, framework="pt") as f:
                for tensor_name in f.keys():
                    part = f.get_slice(tensor_name)
                    if not part.get_dtype().startswith(("F", "BF")):
                        continue  # integer tensors cannot hold NaN or Inf
                    shape = part.get_shape()
                    rows = shape[0] if shape else 1
                    step = max(1, chunk // max(1, math.prod(shape[1:]))) if shape else 1
                    for start in range(0, rows, step):
                        values = part[start:start + step] if shape else f.get_tensor(tensor_name)
                        if not torch.isfinite(values).all():
                            what = "NaN" if torch.isnan(values).any() else "Inf"
                            raise ModelError(f"model '{name}' has {what} values in the weight {tensor_name} "
                                             f"({file.name}); fix or re-export the checkpoint")
            _FINITE.add(key)
