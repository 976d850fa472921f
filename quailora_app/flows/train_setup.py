"""What a fine-tuning run (flows/train.py) builds before its arms train: its data (`TrainData`: the token splits
and the training batches every arm shares) and the initializations its arms start from (`ArmInits`).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quailora_app.config import TrainConfig
from quailora_app.engine.adapters import load_factors
from quailora_app.engine.arms import ARM_SPECS, base_title
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import run_model_method, target_paths
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.evaluation.selfcheck import SelfCheck, self_check
from quailora_app.engine.methods.loftq import DEFAULT_ITER
from quailora_app.engine.methods.registry import MODEL, QLORA, REQUANT, get_method
from quailora_app.engine.preflight import ModelShapes
from quailora_app.errors import ConfigError, one_line
from quailora_app.events import Event, Log, Progress, Stage
from quailora_app.flows.from_init import InitSource
from quailora_app.flows.recorder import Recorder
from quailora_app.sources.data import TokenSplits
from quailora_app.sources.models import ModelSource


def training_order(n_train: int, needed: int, seed: int) -> torch.Tensor:
    """Indices into TokenSplits.train: seeded permutations, one per epoch, concatenated to `needed`."""
    gen = torch.Generator().manual_seed(seed)
    chunks, have = [], 0
    while have < needed:
        chunks.append(torch.randperm(n_train, generator=gen))
        have += n_train
    return torch.cat(chunks)[:needed]


@dataclass(frozen=True)
class TrainData:
    """What the data step builds: the model's files and numerics, the token splits and the training batches."""

    source: ModelSource
    checkpoint: Checkpoint  # the full-precision weights, read tensor by tensor
    tokenizer: Any
    dtype: torch.dtype  # the compute dtype
    calib_dtype: torch.dtype  # of calibration and the self-check: float32 on CPU, else the compute dtype
    splits: TokenSplits
    check_ids: torch.Tensor  # the self-check's held-out windows: the first training windows, which no fit saw
    batches: list[list[torch.Tensor]]  # per step, its grad_accum micro-batches of batch_size windows
    shapes: ModelShapes | None  # what the memory estimate reads (preflight_train); None: no estimate for this model

    @property
    def eval_ids(self) -> torch.Tensor:
        return self.splits.eval

    @property
    def calib_ids(self) -> torch.Tensor:
        return self.splits.calib


@contextmanager
def swapped_layers(model: nn.Module, layers: Mapping[str, nn.Module]):
    """Within the block, the modules of `model` at the paths of `layers` are those layers (a LoftQ base's
    re-quantized Q_T); the model's own are put back after, whatever happens."""
    kept = {}
    try:
        for path, layer in layers.items():
            kept[path] = model.get_submodule(path)
            put_layer(model, path, layer)
        yield
    finally:
        for path, layer in kept.items():
            put_layer(model, path, layer)


def put_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Set the module at `path` of `model` to `layer`."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def load_initializations(source: InitSource, methods: Iterable[str]) -> dict[str, tuple[dict, dict]]:
    """method -> (its factors, its per-layer ranks: empty unless they differ per layer) for each of `methods` that
    init run `source` saved whole (InitSource.saved), read from its adapters/<method>/ (peft's A and B: the same
    correction at the same rank and alpha). A damaged adapter is a one-line ConfigError naming it."""
    loaded = {}
    for method in methods:
        folder = source.adapter(method) if method in source.saved else None
        if folder is None:
            continue
        try:
            loaded[method] = load_factors(folder)
        except Exception as exc:  # noqa: BLE001 - a damaged adapter file of the user's run: say which, one line
            raise ConfigError(f"init run {source.name}: adapters/{method} cannot be read: {one_line(exc, 160)}") \
                from None
    return loaded


class ArmInits:
    """The initializations a run's arms start from, per base model ("4bit": the run's quantizer and bits, "nf4",
    "8bit", "full"): loaded from an init
    run (`load`), or computed when the first arm on a base needs them (`ready`: one block-by-block calibration
    computes every per-layer method at once, then each whole-model method runs from closed_form's factors), each
    self-checked once before an arm starts from it. Their timings and figures go to the run's report."""

    def __init__(self, rec: Recorder, cfg: TrainConfig, device: torch.device):
        self.rec = rec
        self.report = rec.report
        self.cfg = cfg
        self.device = device
        self.factors: dict[str, dict] = {}  # base -> method -> module path -> Factors
        self.ranks: dict[str, dict[str, dict[str, int]]] = {}  # base -> method -> module path -> rank (budget)
        self.checked: dict[str, dict[str, SelfCheck]] = {}  # base -> method -> its self-check (evaluation/selfcheck.py)
        #: base -> requant method (LoftQ) -> module path -> the re-quantized layer (Q_T) its factors correct
        self.bases: dict[str, dict[str, dict[str, nn.Module]]] = {}

    def title(self, base: str) -> str:
        """`base` named with its bits and quantizer ('HQQ 3-bit', 'NF4 4-bit', '8-bit LLM.int8')."""
        return base_title(base, self.cfg.quant)

    def wanted(self, base: str) -> list[str]:
        """The initializations the arms on `base` start from (qlora aside), in arm order."""
        return list(dict.fromkeys(ARM_SPECS[a].init for a in self.cfg.arms
                                  if ARM_SPECS[a].base == base and ARM_SPECS[a].init != QLORA))

    def load(self, origin: InitSource) -> frozenset[str]:
        """The 4-bit initializations init run `origin` saved that the arms start from; which were loaded."""
        loaded = load_initializations(origin, [m for m in self.wanted("4bit") if get_method(m).kind != REQUANT])
        for method, (factors, ranks) in loaded.items():
            self.factors.setdefault("4bit", {})[method] = factors
            if ranks:
                self.ranks.setdefault("4bit", {})[method] = ranks
            errors = [row["calibrated_error"][method] for row in origin.report.get("layers", [])
                      if method in row.get("calibrated_error", {})]
            if errors:
                self.report.setdefault("calibrated_error_median", {}).setdefault("4bit", {})[method] = \
                    statistics.median(errors)
        return frozenset(loaded)

    def was_reset(self, base: str, method: str) -> bool:
        """The self-check reset layers of `method` on `base` (its factors are no longer the ones loaded)."""
        check = self.checked.get(base, {}).get(method)
        return check is not None and bool(check.reset)

    def ready(self, base: str, model, data: TrainData, origin: InitSource | None) -> Iterator[Event]:
        """Every initialization the arms on `base` start from, there and self-checked, on `model` (a bare `base`
        model)."""
        yield from self._compute(base, model, data, origin)
        yield from self._self_check(base, model, data)

    def _compute(self, base: str, model, data: TrainData, origin: InitSource | None) -> Iterator[Event]:
        """Factors of every initialization the arms on `base` start from that is not there yet (loaded from an init
        run, or computed for an earlier arm): one calibration pass computes the per-layer methods at once, with
        closed_form when a whole-model method needs its start; then each whole-model method runs."""
        have = self.factors.setdefault(base, {})
        missing = [m for m in self.wanted(base) if m not in have]
        if not missing:
            return
        if origin is not None:
            why = "it initialized against its own quantized base" if base != "4bit" else "it did not save them"
            yield self.rec.emit(Log(f"{', '.join(missing)} against the {self.title(base)} Q: not in init run "
                                    f"{origin.name} ({why}), computed here"))
        whole = [m for m in missing if get_method(m).kind == MODEL]
        per_layer = {m for m in missing if m not in whole}
        if whole and "closed_form" not in have:
            per_layer.add("closed_form")  # the whole-model methods' start (distill refines it), in the same pass
        if per_layer:
            yield from self._calibrate(base, sorted(per_layer), model, data)
        for name in whole:
            yield from self._whole_model(base, name, model, data)

    def _calibrate(self, base: str, methods: list[str], model, data: TrainData) -> Iterator[Event]:
        """One block-by-block calibration of `model` computing every per-layer method of `methods`."""
        result = InitResult()
        yield self.rec.emit(Stage("calibrate", f"{len(data.calib_ids)} x {data.calib_ids.shape[1]} tokens through "
                                               f"the full-precision blocks; {', '.join(methods)} against the "
                                               f"{self.title(base)} Q"))
        start = time.perf_counter()
        requant = any(get_method(m).kind == REQUANT for m in methods)
        for event in initialize(model, data.checkpoint, data.calib_ids, self.cfg.lora, methods, result,
                                device=self.device, calib_dtype=data.calib_dtype, damping=self.cfg.damping,
                                als_rounds=self.cfg.als_rounds, should_stop=self.rec.should_stop, requant=requant,
                                options={"loftq_iter": DEFAULT_ITER}):
            if isinstance(event, Progress):
                yield self.rec.emit(Progress(f"calibrate {base}", event.done, event.total, event.message))
        self.factors[base].update(result.factors)
        self.bases.setdefault(base, {}).update(result.bases)
        self.report["seconds"][f"calibrate_{base}"] = time.perf_counter() - start  # calibration + every method
        self.report["seconds"].setdefault(f"init_{base}", {}).update(result.seconds)  # initialize()'s split
        self.report.setdefault("calibrated_error_median", {}).setdefault(base, {}).update({
            m: statistics.median(row["calibrated_error"][m] for row in result.layers) for m in methods})

    def _whole_model(self, base: str, name: str, model, data: TrainData) -> Iterator[Event]:
        """Whole-model method `name` on the `base` model (engine/plan.run_model_method, as the init flow runs it),
        from the closed_form factors of the calibration pass."""
        method = get_method(name)
        self.rec.check_stop(f"initialization ({name})")
        yield self.rec.emit(Stage("setup", f"{name} against the {self.title(base)} Q: {method.help}"))
        built = run_model_method(name, model, data.checkpoint, data.calib_ids, self.cfg.lora, self.device,
                                 data.calib_dtype, damping=self.cfg.damping, als_rounds=self.cfg.als_rounds,
                                 should_stop=self.rec.should_stop, options=asdict(self.cfg),
                                 start=self.factors[base].get("closed_form"))
        self.factors[base][name] = built.factors
        if built.ranks:
            self.ranks.setdefault(base, {})[name] = built.ranks
        if built.details:
            self.report.setdefault("method_details", {}).setdefault(base, {})[name] = built.details
        self.report["seconds"].setdefault(f"init_{base}", {})[name] = built.seconds
        self.rec.save()
        yield self.rec.emit(Log(f"{name}: initialized against the {self.title(base)} Q in {built.seconds:.1f} s"))

    def _self_check(self, base: str, model, data: TrainData) -> Iterator[Event]:
        """The initializations on `base` not checked yet, loaded from an init run or computed here, measured through
        each layer's own product on held-out windows (the first training windows, which no fit saw); a layer a
        per-layer method makes worse is reset to B = 0 before any arm starts from it (evaluation/selfcheck.py)."""
        done = self.checked.setdefault(base, {})
        todo = {m: self.factors[base][m] for m in self.wanted(base) if m not in done and m in self.factors[base]}
        if not todo:
            return
        self.rec.check_stop("the self-check")
        yield self.rec.emit(Stage("setup", f"self-check: {', '.join(todo)} through each {self.title(base)} layer's "
                                           "own product "
                                           f"on {data.check_ids.numel()} held-out tokens"))
        start = time.perf_counter()
        scalings = {path: self.cfg.lora.scaling for path in target_paths(model, self.cfg.lora)}
        own = {m: f for m, f in todo.items() if m not in self.bases.get(base, {})}
        checks = self_check(model, data.checkpoint, data.check_ids, own, scalings, device=self.device,
                            dtype=data.calib_dtype, should_stop=self.rec.should_stop) if own else {}
        for method in [m for m in todo if m not in own]:  # LoftQ: its factors through its own re-quantized layers
            with swapped_layers(model, self.bases[base][method]):
                checks.update(self_check(model, data.checkpoint, data.check_ids, {method: todo[method]}, scalings,
                                         device=self.device, dtype=data.calib_dtype,
                                         should_stop=self.rec.should_stop))
        done.update(checks)
        self.report["seconds"][f"self_check_{base}"] = time.perf_counter() - start
        self.report.setdefault("self_check", {}).setdefault(base, {}).update({m: c.record() for m, c in checks.items()})
        self.report.setdefault("layers_reset", {}).setdefault(base, {}).update(
            {m: list(c.reset) for m, c in checks.items()})
        self.rec.save()
        for check in checks.values():
            yield self.rec.emit(Log(f"{self.title(base)} {check.summary()}", "warning" if check.reset else "info"))
