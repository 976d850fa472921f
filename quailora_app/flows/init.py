"""The init flow as one event stream: load -> data -> quantize -> calibrate + initialize (block by block) ->
evaluate and save adapters -> 8-bit and full-precision baselines -> report.

`run_init(cfg)` yields events; the CLI, the UI and the tests all consume this one stream. Everything
computed is written to the run folder as it happens (events.jsonl, report.json, adapters/<method>/).
"""
from __future__ import annotations

import gc
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from quailora_app.engine.adapters import Factors, attach_lora, loftq_factors, read_factors, save_adapter, write_factors
from quailora_app.engine.calibrate import decoder_layers
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.config import InitConfig
from quailora_app.engine.parallel import Processes
from quailora_app.errors import Cancelled
from quailora_app.engine.evaluate import gap_closed, perplexity
from quailora_app.events import Event, Log, Metric, Progress, RunFailed, RunFinished, Stage
from quailora_app.engine.quiet import quiet_libraries
from quailora_app.engine.initialize import InitResult, initialize, target_paths
from quailora_app.engine.preflight import preflight_init
from quailora_app.engine.quantize import load_4bit, load_8bit
from quailora_app.runs import EventLog, ended_in_one_line, new_run_dir, write_json_atomic
from quailora_app.sources.data import load_splits
from quailora_app.sources.models import (
    compute_dtype, device_label, load_config, load_full_precision, load_tokenizer, pick_device, resolve_model,
)

quiet_libraries()



def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class InitRun:
    """One run of the init flow. Iterate `events()`; results land in `run_dir` as they are computed."""

    def __init__(self, cfg: InitConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None,
                 processes: Processes | None = None):
        self.cfg = cfg
        self.processes = processes  # rank 0 of several (distributed.py): the init's work is shared, the rest is ours
        self.should_stop = should_stop or (lambda: False)
        self.run_dir = Path(run_dir) if run_dir else new_run_dir("init", cfg.out)
        self.device = pick_device(cfg.model.device)
        self.report: dict = {
            "status": "running",
            "model": cfg.model.model,
            "dataset": cfg.data.dataset,
            "device": device_label(self.device),
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
            "rslora": cfg.lora.rslora,
            "scaling": cfg.lora.scaling,
            "methods": list(cfg.methods),
            "settings": asdict(cfg),
            "perplexity": {},
            "gap_closed": {},
            "gap_closed_full": {},
            "seconds": {},
            "unavailable": {},
            "peak_memory_bytes": 0,
            "layers": [],
        }
        if processes is not None:
            self.report["processes"] = {"world_size": processes.world, "backend": processes.backend,
                                        "note": "seconds per method are summed over the processes; memory is rank 0's"}
        self._log = EventLog(self.run_dir)
        self.factors: dict[str, dict[str, Factors]] = {}

    # -- plumbing ---------------------------------------------------------------------------------------
    def _emit(self, event: Event) -> Event:
        self._log.append(event)
        return event

    def _save_report(self) -> None:
        self.report["peak_memory_bytes"] = max(self.report["peak_memory_bytes"], peak_memory_bytes(self.device))
        write_json_atomic(self.run_dir / "report.json", self.report)

    def _check_stop(self, where: str) -> None:
        if self.should_stop():
            raise Cancelled(f"stopped by the user during {where}")

    def events(self) -> Iterator[Event]:
        try:
            yield from ended_in_one_line(
                self._run(), self._finish_failed, self.run_dir, self.report["device"],
                "try a smaller model, fewer calibration samples or a shorter seq-len", free_memory)
        finally:
            self._log.close()
            free_memory()

    def _finish_failed(self, message: str, cancelled: bool = False) -> Event:
        self.report["status"] = "cancelled" if cancelled else "failed"
        self.report["error"] = message
        self._save_report()
        return self._emit(RunFailed(str(self.run_dir), message, cancelled))

    # -- the flow ---------------------------------------------------------------------------------------
    def _run(self) -> Iterator[Event]:
        cfg = self.cfg
        t0 = time.perf_counter()
        yield self._emit(Stage("load", f"resolving model '{cfg.model.model}'"))
        source = resolve_model(cfg.model.model)
        config = load_config(source)
        yield self._emit(Log(preflight_init(source.name, config, cfg, self.device)))  # before any weight is read
        tokenizer = load_tokenizer(source)
        self.report["model_note"] = source.note
        yield self._emit(Stage("data", f"reading dataset '{cfg.data.dataset}'"))
        splits = load_splits(cfg.data, tokenizer)
        self.report["tokens"] = {"calibration": int(splits.calib.numel()), "eval": int(splits.eval.numel())}
        self._check_stop("data loading")
        Checkpoint(source.folder).check_finite(source.name)  # NaN / Inf refused before quantizing

        yield self._emit(Stage("quantize", f"loading {source.name} in 4-bit {cfg.quant.quant} on {self.report['device']}"))
        dtype = compute_dtype(cfg.model.compute_dtype, self.device)
        model = load_4bit(source, cfg.quant, self.device, dtype)
        self.report["seconds"]["load"] = time.perf_counter() - t0
        self.target_paths = target_paths(model, cfg.lora)
        self.report["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in self.target_paths})
        self._save_report()
        self._check_stop("quantization")

        yield from self._calibrate_and_initialize(model, source, splits.calib, dtype)
        yield from self._evaluate_methods(model, source, splits.eval)
        del model
        free_memory()
        if cfg.baselines:
            yield from self._baselines(source, splits.eval)
        self._gap_figures()
        self.report["status"] = "finished"
        self.report["seconds"]["total"] = time.perf_counter() - t0
        self._save_report()
        yield self._emit(RunFinished(str(self.run_dir), self.report))

    def _calibrate_and_initialize(self, model, source, calib_ids, dtype) -> Iterator[Event]:
        cfg = self.cfg
        result = InitResult(factors=self.factors, layers=self.report["layers"], seconds=self.report["seconds"])
        n_blocks = len(decoder_layers(model)[1])
        yield self._emit(Stage("calibrate", f"{len(calib_ids)} x {calib_ids.shape[1]} tokens through {n_blocks} full-precision blocks"))
        calib_dtype = torch.float32 if self.device.type == "cpu" else dtype
        try:
            for event in initialize(model, Checkpoint(source.folder), calib_ids, cfg.lora, cfg.methods, result,
                                    device=self.device, calib_dtype=calib_dtype, damping=cfg.damping,
                                    als_rounds=cfg.als_rounds, should_stop=self.should_stop, solver=cfg.solver,
                                    processes=self.processes):
                if isinstance(event, Progress):
                    self._save_report()
                yield self._emit(event)
        except Cancelled:
            self._save_partial_adapters(model, n_blocks)
            raise

    def _save_partial_adapters(self, model, n_blocks: int) -> None:
        """After a stop during initialization: each method's adapter with the blocks already done (the other
        layers keep peft's default, B = 0, i.e. plain QLoRA), so the work done is not lost. Not evaluated."""
        done = {m: f for m, f in self.factors.items() if f}
        if not done:
            return
        peft_model = attach_lora(model, self.cfg.lora, self.target_paths)
        default = read_factors(peft_model)
        for method, factors in done.items():
            write_factors(peft_model, {**default, **factors})
            save_adapter(peft_model, self.run_dir / "adapters" / method)
        peft_model.unload()
        blocks = len({row["block"] for row in self.report["layers"]})
        self.report["partial_adapters"] = {"methods": sorted(done), "blocks_done": blocks, "blocks": n_blocks,
                                           "note": "stopped during initialization: layers of the blocks not done "
                                                   "keep B = 0 (plain QLoRA); not evaluated"}
        self._save_report()

    def _evaluate_methods(self, model, source, eval_ids) -> Iterator[Event]:
        cfg = self.cfg
        yield self._emit(Stage("evaluate", f"held-out perplexity on {eval_ids.numel()} tokens, adapters saved per method"))
        peft_model = attach_lora(model, cfg.lora, self.target_paths)
        self.factors["qlora"] = read_factors(peft_model)  # peft's default: A random, B = 0
        if "loftq" in cfg.methods:
            start = time.perf_counter()
            try:
                self.factors["loftq"] = loftq_factors(peft_model, source.folder)
                self.report["seconds"]["loftq"] = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - peft's anchor is optional; say why it did not run
                reason = f"peft's replace_lora_weights_loftq did not run here: {str(exc).splitlines()[0][:160]}"
                self.report["unavailable"]["loftq"] = reason
                yield self._emit(Log(reason, "warning"))
        methods = [m for m in cfg.methods if m in self.factors]
        for i, method in enumerate(methods):
            self._check_stop("evaluation")
            write_factors(peft_model, self.factors[method])
            ppl = perplexity(peft_model, eval_ids, cfg.eval_batch)
            self.report["perplexity"][method] = ppl
            save_adapter(peft_model, self.run_dir / "adapters" / method)
            self._save_report()
            yield self._emit(Metric(method, ppl, "perplexity", "4-bit + " + method))
            yield self._emit(Progress("evaluate", i + 1, len(methods), method))
        write_factors(peft_model, self.factors["qlora"])
        peft_model.unload()

    def _baselines(self, source, eval_ids) -> Iterator[Event]:
        for name, loader in (("int8", lambda: load_8bit(source, self.device)),
                             ("full", lambda: load_full_precision(source, self.device))):
            self._check_stop("baselines")
            yield self._emit(Stage("baseline", f"perplexity of the {'8-bit' if name == 'int8' else 'full-precision'} model"))
            start = time.perf_counter()
            model = loader()
            ppl = perplexity(model, eval_ids, self.cfg.eval_batch)
            self.report["seconds"][f"eval_{name}"] = time.perf_counter() - start
            self.report["perplexity"][name] = ppl
            self._save_report()
            del model
            free_memory()
            yield self._emit(Metric(name, ppl, "perplexity", "8-bit LLM.int8" if name == "int8" else "full precision"))

    def _gap_figures(self) -> None:
        ppl = self.report["perplexity"]
        base = ppl.get("qlora")
        for method in self.cfg.methods:
            if method not in ppl or base is None:
                continue
            if "int8" in ppl:
                self.report["gap_closed"][method] = gap_closed(ppl[method], base, ppl["int8"])
            if "full" in ppl:
                self.report["gap_closed_full"][method] = gap_closed(ppl[method], base, ppl["full"])
        for method, value in list(self.report["gap_closed"].items()):
            if value is not None and not math.isfinite(value):
                self.report["gap_closed"][method] = None


def run_init(cfg: InitConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None,
             processes: Processes | None = None) -> Iterator[Event]:
    """The init flow's event stream (see InitRun)."""
    return InitRun(cfg, should_stop, run_dir, processes).events()
