"""The collectives one init spread over several processes needs (torch.distributed); launching is flows/launch.py.

Every process loads the 4-bit model and reads the same calibration split; then, block by block:
1. calibration: process k runs its share of the calibration sequences through the full-precision block, and
   the H sums and token counts are summed over the processes (all_reduce), so that every process holds the H
   one process would have computed from every sequence;
2. per-layer math: the block's layers are shared out (`share_layers`, greedy on an estimate of each layer's
   cost) and each process computes the factors and error figures of its own layers;
3. gather: factors and report rows go to rank 0 (gather_object), which alone writes the run folder
   (report.json, events.jsonl, adapters/<method>/), evaluates perplexity and prints, as one process does.
Backends: gloo on CPU, nccl on CUDA (process k on cuda:LOCAL_RANK). Nothing here launches processes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from quailora_app.engine.calibration.calibrate import HessianAccumulator
from quailora_app.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    """This process's place in the group, and the three collectives the init needs."""

    rank: int
    world: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, calib_ids: torch.Tensor) -> torch.Tensor:
        """This process's calibration sequences: rank k takes the k-th of `world` contiguous slices."""
        if len(calib_ids) < self.world:
            raise ConfigError(f"{len(calib_ids)} calibration sequences cannot be shared by {self.world} processes; "
                              f"use --calib-samples {self.world} or more")
        return torch.tensor_split(calib_ids, self.world)[self.rank]

    def reduce_sums(self, hooks: HessianAccumulator) -> None:
        """Sum each input's x^T x and token count over the processes (in place, the same order everywhere)."""
        names = sorted(hooks.sums)
        for name in names:
            dist.all_reduce(hooks.sums[name])
        if names:
            counts = torch.tensor([hooks.tokens[n] for n in names], dtype=torch.int64,
                                  device=hooks.sums[names[0]].device)
            dist.all_reduce(counts)
            hooks.tokens.update(zip(names, counts.tolist()))

    def gather(self, part):
        """Every process's `part`, in rank order, on rank 0; None elsewhere."""
        parts = [None] * self.world if self.is_main else None
        dist.gather_object(part, parts, dst=0)
        return parts


def share_layers(layers: Sequence[tuple[str, str, tuple[int, int]]], world: int, calibrated: bool) -> list[int]:
    """The process of each layer (name, input group, (m, n)): costliest first, each to the process where it
    would finish soonest (greedy longest-processing-time).

    Cost estimate, in flops up to a constant: m n min(m, n) for the truncated SVD, + m n^2 for a calibrated
    method's products with H, + n^3 for forming (and, for tall layers, factorizing) the group's damped H, paid
    once on each process that holds a layer of that group. The result depends on the shapes only, so every process
    computes the same split without talking."""
    def own(m: int, n: int) -> float:
        return m * n * min(m, n) + (m * n * n if calibrated else 0)

    load = [0.0] * world
    groups_on: list[set[str]] = [set() for _ in range(world)]
    owner = [0] * len(layers)
    for i in sorted(range(len(layers)), key=lambda i: -own(*layers[i][2])):
        _, group, (m, n) = layers[i]

        def finish(k: int, m: int = m, n: int = n, group: str = group) -> float:
            return load[k] + own(m, n) + (n ** 3 if calibrated and group not in groups_on[k] else 0)

        k = min(range(world), key=finish)
        load[k] = finish(k)
        groups_on[k].add(group)
        owner[i] = k
    return owner
