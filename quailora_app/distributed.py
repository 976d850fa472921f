"""One init spread over several processes (torch.distributed, launched by torchrun or accelerate launch).

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

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .calibrate import HessianAccumulator
from .config import InitConfig
from .errors import ConfigError, UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True inside a multi-process launch (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
            counts = torch.tensor([hooks.tokens[n] for n in names], dtype=torch.int64, device=hooks.sums[names[0]].device)
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

        def finish(k: int) -> float:
            return load[k] + own(m, n) + (n ** 3 if calibrated and group not in groups_on[k] else 0)

        k = min(range(world), key=finish)
        load[k] = finish(k)
        groups_on[k].add(group)
        owner[i] = k
    return owner


# -- launching ------------------------------------------------------------------------------------------
def on_own_device(cfg: InitConfig, local_rank: int) -> InitConfig:
    """The config with this process's device: cuda:LOCAL_RANK when the run asks for CUDA ('auto' with a GPU,
    'cuda' or 'cuda:N'), else cpu."""
    spec = cfg.model.device
    if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process with LOCAL_RANK {local_rank} has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); launch at most one process per GPU")
        spec = f"cuda:{local_rank}"
    else:
        spec = "cpu"
    return replace(cfg, model=replace(cfg.model, device=spec))


@contextmanager
def process_group(cfg: InitConfig) -> Iterator[tuple[Processes, InitConfig]]:
    """Join the process group the launcher describes (env://) and leave it at the end."""
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"--distributed needs a launcher ({', '.join(missing)} not set): "
                          "torchrun --nproc_per_node N -m quailora_app init ... or accelerate launch -m quailora_app init ...")
    local_rank = int(os.environ["LOCAL_RANK"])
    cfg = on_own_device(cfg, local_rank)
    backend = "gloo"
    if cfg.model.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)  # gather_object on nccl sends through the current device
        backend = "nccl"
    if not dist.is_initialized():
        # the other processes wait while rank 0 evaluates and writes the run folder: allow it an hour
        dist.init_process_group(backend=backend, timeout=timedelta(hours=1))
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), backend), cfg
        # leave together: a process that tears its connections down while another still uses the group can
        # make gloo abort that one (seen once as a SIGABRT of a torchrun child here)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_worker(cfg: InitConfig, processes: Processes) -> None:
    """What a process other than rank 0 does: load, read the same split, and take its part in the
    calibration and the per-layer math; rank 0 keeps every result."""
    from .checkpoint import Checkpoint
    from .initialize import InitResult, initialize, target_paths
    from .quantize import load_4bit
    from .sources.data import load_splits
    from .sources.models import compute_dtype, load_tokenizer, pick_device, resolve_model

    source = resolve_model(cfg.model.model)
    splits = load_splits(cfg.data, load_tokenizer(source))
    device = pick_device(cfg.model.device)
    dtype = compute_dtype(cfg.model.compute_dtype, device)
    model = load_4bit(source, cfg.quant, device, dtype)
    target_paths(model, cfg.lora)
    calib_dtype = torch.float32 if device.type == "cpu" else dtype
    for _ in initialize(model, Checkpoint(source.folder), splits.calib, cfg.lora, cfg.methods, InitResult(),
                        device=device, calib_dtype=calib_dtype, damping=cfg.damping, als_rounds=cfg.als_rounds,
                        solver=cfg.solver, processes=processes):
        pass


def run_init_processes(cfg: InitConfig, consume: Callable) -> int:
    """The init as one process of a launched group: rank 0 runs the usual flow (run folder, events, `consume`
    prints them); the others work for it and stay silent unless they fail. Returns the exit code."""
    with process_group(cfg) as (processes, cfg):
        if processes.is_main:
            from .pipeline import run_init

            return consume(run_init(cfg, processes=processes))
        try:
            run_worker(cfg, processes)
        except UserError as exc:
            print(f"[rank {processes.rank}] error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None  # leaves without the closing barrier: rank 0 may be inside a collective
        return 0
