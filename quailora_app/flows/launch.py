"""Launch one init over the processes of torchrun / accelerate launch (torch.distributed, env://).

Rank 0 runs the usual init flow (run folder, events); the others run `run_worker`: the same preparation, then
their share of the calibration and the per-layer math (engine/parallel.py), whose results go to rank 0.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from quailora_app.config import InitConfig
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.parallel import Processes
from quailora_app.engine.preflight import preflight_init
from quailora_app.errors import ConfigError, UserError
from quailora_app.flows.init import run_init
from quailora_app.flows.prepare import drain, prepare
from quailora_app.sources.models import pick_device

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True inside a multi-process launch (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
        raise ConfigError(f"--distributed needs a launcher ({', '.join(missing)} not set): torchrun "
                          "--nproc_per_node N -m quailora_app init ... or accelerate launch -m quailora_app init ...")
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
    """What a process other than rank 0 does: the same preparation (so a bad input fails here too, rather than
    leaving this process waiting in a collective), then its part in the calibration and the per-layer math;
    rank 0 keeps every result."""
    device = pick_device(cfg.model.device)
    prepared = drain(prepare(cfg.model, cfg.data, cfg.quant, device,
                             lambda name, config: preflight_init(name, config, cfg, device)))
    target_paths(prepared.model, cfg.lora)
    calib_dtype = torch.float32 if device.type == "cpu" else prepared.dtype
    for _ in initialize(prepared.model, prepared.checkpoint, prepared.splits.calib, cfg.lora, cfg.methods, InitResult(),
                        device=device, calib_dtype=calib_dtype, damping=cfg.damping, als_rounds=cfg.als_rounds,
                        solver=cfg.solver, processes=processes):
        pass


def run_init_processes(cfg: InitConfig, consume: Callable) -> int:
    """The init as one process of a launched group: rank 0 runs the usual flow (run folder, events, `consume`
    prints them); the others work for it and stay silent unless they fail. Returns the exit code."""
    with process_group(cfg) as (processes, cfg):
        if processes.is_main:
            return consume(run_init(cfg, processes=processes))
        try:
            run_worker(cfg, processes)
        except UserError as exc:
            print(f"[rank {processes.rank}] error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None  # leaves without the closing barrier: rank 0 may be inside a collective
        return 0
