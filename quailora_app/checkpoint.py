"""Stream tensors out of a safetensors checkpoint one block at a time, never the whole model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


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

    def with_prefix(self, prefix: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors under `prefix` (e.g. 'model.layers.3.'), keys stripped of it."""
        return {key[len(prefix):]: self.get(key, device, dtype) for key in self._file_of if key.startswith(prefix)}
