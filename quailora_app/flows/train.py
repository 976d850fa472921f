"""Short LoRA fine-tuning of several arms side by side, as one event stream (`run_train(cfg)`).

Flow: load -> data -> reference perplexities (full precision, 8-bit) -> per arm: base model, its
initialization (one block-by-block calibration per base precision computes every per-layer method at
once; the whole-model methods, distill, sequential and budget, run after it, distill from closed_form's factors),
LoRA attached (at per-layer ranks for budget), step-0 perplexity -> training -> per arm: adapter saved,
ArmFinished -> report.

From a finished init run (cfg.from_init, flows/from_init.py): its settings fix the model, the data cut, the
quantization and the LoRA shape, so the held-out and calibration windows are the init run's. Then the reference
perplexities and the step-0 perplexities of qlora4 and of every arm whose factors are loaded are the init report's
(no measurement, when measured on the same kind of device and compute dtype), and the 4-bit arms whose method the
init run saved load its adapters/<method>/ factors instead of calibrating. Arms whose initialization it lacks
(quailora8, against the 8-bit Q; a method it did not compute) are computed as without it, with a Log line saying
so. What is left before the first step is loading the arms' base models. report["from_init"] names the run.

Downstream accuracy (cfg.accuracy, off unless asked): at every evaluation each arm is also scored on the tasks
(evaluation/accuracy.py, as the init flow scores its variants), one AccuracyPoint per arm, step and task, each with its
95% Wilson interval. Items are documents the run held out: neither calibration nor training text. From an init run
that scored accuracy, the tasks are built as it built them (it reserved only its calibration documents), less the
items about this run's training documents; when they are the init run's (the same task fingerprint, the same kind
of device and compute dtype) an arm's step-0 answers are the init report's for its method (qlora4: qlora, qlora8:
int8, lora16: full), read back item by item instead of scored. The report gives each arm's accuracy at step 0, at
the last and at the best evaluation, the accuracy gap closed on the last evaluations,
    (acc_arm - acc_qlora4) / (acc_qlora8 - acc_qlora4)   (and toward lora16: "gap_closed_full"),
the same formula as the init flow's toward 8-bit, and McNemar's exact test of each arm against qlora4 on the
items of the last evaluation.

Every arm shares the seed (data.seed), the training batches in the same order (a seeded permutation of
TokenSplits.train, epoch after epoch), the hyperparameters and the held-out evaluation tokens. peft's default
LoRA init draws A at random: the RNG is seeded right before each attach, so every default-init arm starts from
the same A. Schedules: "interleaved" (one step of each arm in turn, the arm that opens a round rotating; curves
grow together; all arms resident), "sequential" (one arm after the other, one resident at a time), "auto"
(interleaved when the estimated memory of all arms stays under 70% of the free device memory).

Durability: every event is appended to events.jsonl as it happens; report.json is rewritten after each
evaluation; adapters/<arm>/ is written when an arm ends, also on a stop. A stop (`should_stop()`, checked
before each step) ends every running arm cleanly: adapters saved, report status "stopped", RunFinished.
A stop before training starts gives RunFailed(cancelled=True); bad input, out of memory or an internal error
give RunFailed with one line (status "failed"; internal errors leave their traceback in error.txt).
"""
from __future__ import annotations

import collections
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from quailora_app.config import TrainConfig
from quailora_app.engine.adapters import attach_lora, load_factors, save_adapter, write_factors
from quailora_app.engine.arms import ARM_SPECS, Arm, ArmSpec, batch_hash
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import run_model_method, target_paths
from quailora_app.engine.evaluation.accuracy import (
    accuracy_gap_closed,
    build_tasks,
    score_task,
    task_fingerprint,
)
from quailora_app.engine.evaluation.evaluate import gap_closed, perplexity
from quailora_app.engine.evaluation.selfcheck import SelfCheck, check_window_count, self_check
from quailora_app.engine.evaluation.statistics import paired_test, wilson_interval
from quailora_app.engine.methods.registry import MODEL, QLORA, get_method
from quailora_app.engine.preflight import available_bytes, preflight_train, train_estimate
from quailora_app.engine.quantization.bnb import load_4bit, load_8bit
from quailora_app.engine.quiet import quiet_libraries
from quailora_app.errors import ConfigError, DataError, one_line
from quailora_app.events import (
    AccuracyPoint,
    ArmFinished,
    EvalPoint,
    Event,
    Log,
    Metric,
    Progress,
    RunFinished,
    Stage,
    TrainStep,
)
from quailora_app.flows.from_init import InitSource, check_against_init, read_init_run, same_held_out
from quailora_app.flows.prepare import prepare
from quailora_app.flows.recorder import Recorder, free_memory, opening_report
from quailora_app.runs import Report, RunFolder
from quailora_app.sources.data import load_texts
from quailora_app.sources.models import device_label, load_full_precision, pick_device
from quailora_app.sources.tasks import MIN_ITEMS, Task, asked_about, reserved_documents, subset_task

quiet_libraries()

REFERENCES = (("full", "full", "full precision"), ("int8", "8bit", "8-bit LLM.int8"))  # metric, base, note
MEMORY_SHARE = 0.7


def training_order(n_train: int, needed: int, seed: int) -> torch.Tensor:
    """Indices into TokenSplits.train: seeded permutations, one per epoch, concatenated to `needed`."""
    gen = torch.Generator().manual_seed(seed)
    chunks, have = [], 0
    while have < needed:
        chunks.append(torch.randperm(n_train, generator=gen))
        have += n_train
    return torch.cat(chunks)[:needed]


class TrainRun:
    """One fine-tuning run. Iterate `events()`; results land in `run_dir` as they happen."""

    def __init__(self, cfg: TrainConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None):
        self.cfg = cfg
        folder = RunFolder.create("train", run_dir or cfg.out)
        self.run_dir = folder.path
        self.device = pick_device(cfg.model.device)
        arms = {name: {"label": ARM_SPECS[name].label, "base": ARM_SPECS[name].base, "init": ARM_SPECS[name].init,
                       "status": "pending"} for name in cfg.arms}
        self.report: Report = opening_report(
            "train", cfg, device_label(self.device), arm_names=list(cfg.arms), schedule=None, reference_perplexity={},
            arms=arms, gap_closed={}, gap_closed_full={}, seconds={}, from_init=cfg.from_init)
        self.rec = Recorder(folder, self.report, should_stop, before_save=self._summarize, on_fail=self._arms_ended,
                            stopped_status="stopped")
        self.should_stop = self.rec.should_stop
        self.arms: dict[str, Arm] = {}
        self.factors: dict[str, dict] = {}  # base -> method -> module path -> Factors
        self.ranks: dict[str, dict[str, dict[str, int]]] = {}  # base -> method -> module path -> rank (budget)
        self.origin: InitSource | None = None  # the init run this run starts from
        self.loaded: set[str] = set()  # 4-bit initializations loaded from it
        self.reuse = False  # its perplexities are this run's (same held-out tokens, device kind and dtype)
        self.calib_dtype = torch.float32 if self.device.type == "cpu" else None  # else the compute dtype, once known
        self._spare: dict[str, object] = {}  # base -> a loaded bare base model waiting for its next arm
        self._waiting = collections.Counter(ARM_SPECS[a].base for a in cfg.arms)  # base -> arms not set up yet
        self.same_device = False  # the init run ran on this kind of device in this compute dtype
        self.tasks: list[Task] = []  # the downstream tasks every arm is scored on (cfg.accuracy)
        self.tokenizer = None
        self.keep: dict[str, list[int]] = {}  # task kind -> its items' indices in the init run's task
        self.init_accuracy: dict[str, dict] = {}  # task kind -> the init report's entry, when its items are these
        self.checked: dict[str, dict[str, SelfCheck]] = {}  # base -> method -> its self-check (evaluation/selfcheck.py)

    # -- plumbing ---------------------------------------------------------------------------------------
    def _summarize(self) -> None:
        for name, arm in self.arms.items():
            self.report["arms"][name].update(self._arm_summary(arm))
        self._gap_figures()
        self._accuracy_figures()

    def events(self) -> Iterator[Event]:
        hint = "try --schedule sequential, fewer arms, a smaller batch or a shorter seq-len"
        return self.rec.run(self._run(), self.report["device"], hint, self._drop_models)

    def _drop_models(self) -> None:
        for arm in self.arms.values():
            arm.model = None
            arm.optimizer = None
        self._spare.clear()
        free_memory()

    def _arms_ended(self, cancelled: bool) -> None:
        """The run ended early: arms still running or pending are stopped or failed with it."""
        for entry in self.report["arms"].values():
            if entry["status"] in ("running", "pending"):
                entry["status"] = "stopped" if cancelled else "failed"

    # -- the flow ---------------------------------------------------------------------------------------
    def _run(self) -> Iterator[Event]:
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.from_init:
            yield from self._from_init()
        per_step = cfg.batch_size * cfg.grad_accum
        sizes = {"min_train_seqs": min(per_step, 4096), "max_train_seqs": max(min(cfg.steps * per_step, 4096), 1)}
        prepared = yield from self.rec.relay(prepare(cfg.model, cfg.data, cfg.quant, self.device, self._preflight,
                                                     should_stop=self.should_stop, split_sizes=sizes, load_base=False))
        self.source, self.dtype, self.checkpoint = prepared.source, prepared.dtype, prepared.checkpoint
        self.calib_dtype = self.calib_dtype or self.dtype
        self.tokenizer = prepared.tokenizer
        splits = prepared.splits
        self.report["model_note"] = self.source.note
        self.eval_ids, self.calib_ids = splits.eval, splits.calib
        self.check_ids = splits.train[:check_window_count(len(splits.train), splits.seq_len)]
        order = training_order(len(splits.train), cfg.steps * per_step, cfg.data.seed)
        micro = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.steps * cfg.grad_accum)]
        self.batches = [[splits.train[micro[k * cfg.grad_accum + j]] for j in range(cfg.grad_accum)]
                        for k in range(cfg.steps)]
        epochs = cfg.steps * per_step / len(splits.train)
        self.report["tokens"] = {"calibration": int(splits.calib.numel()), "eval": int(splits.eval.numel()),
                                 "train_windows": int(len(splits.train)), "per_step": per_step * cfg.data.seq_len,
                                 "epochs": round(epochs, 3)}
        self._choose_schedule()
        self.rec.save()
        yield self.rec.emit(Log(f"{splits.summary()}; {cfg.steps} steps of {per_step} x {cfg.data.seq_len} tokens "
                                f"({epochs:.2f} epochs); schedule {self.schedule}"))
        if self.origin is not None:
            yield from self._reuse_check()
        yield from self._build_tasks(splits)

        yield from self._references()
        if self.schedule == "interleaved":
            for name in cfg.arms:
                yield from self._setup_arm(name)
            yield self.rec.emit(Stage("train", f"{len(cfg.arms)} arms interleaved, {cfg.steps} steps each"))
            n = len(cfg.arms)
            for step in range(1, cfg.steps + 1):
                if self.should_stop():
                    break
                # the arm that opens a round starts with cold caches: rotate who opens, so step times compare fairly
                for name in (cfg.arms[(step - 1) % n:] + cfg.arms[:(step - 1) % n]):
                    yield from self._train_step(self.arms[name], step)
                if self._eval_due(step):
                    for name in cfg.arms:
                        yield from self._evaluate(self.arms[name], step)
            for name in cfg.arms:
                yield from self._finish_arm(self.arms[name])
        else:
            for name in cfg.arms:
                if self.should_stop():
                    break
                yield from self._setup_arm(name)
                arm = self.arms[name]
                yield self.rec.emit(Stage("train", f"arm {name}: {cfg.steps} steps"))
                for step in range(1, cfg.steps + 1):
                    if self.should_stop():
                        break
                    yield from self._train_step(arm, step)
                    if self._eval_due(step):
                        yield from self._evaluate(arm, step)
                yield from self._finish_arm(arm)
                arm.model = arm.optimizer = None
                free_memory()
        stopped = any(a.status == "stopped" for a in self.arms.values()) or len(self.arms) < len(cfg.arms)
        for entry in self.report["arms"].values():
            if entry["status"] == "pending":
                entry["status"] = "not started"
        self.report["status"] = "stopped" if stopped else "finished"
        self.report["seconds"]["total"] = time.perf_counter() - t0
        self.rec.save()
        yield self.rec.emit(RunFinished(str(self.run_dir), self.report))

    def _from_init(self) -> Iterator[Event]:
        """Read the init run, refuse a config that differs from it, and load the 4-bit initializations it saved
        that the arms start from (peft's A and B: the same correction at the same rank and alpha)."""
        self.origin = origin = read_init_run(self.cfg.from_init)
        check_against_init(self.cfg, origin)
        self.report["from_init"] = str(origin.folder)
        for method in self._inits("4bit"):
            folder = origin.adapter(method) if method in origin.saved else None
            if folder is None:
                continue
            try:
                factors, ranks = load_factors(folder)
            except Exception as exc:  # noqa: BLE001 - a damaged adapter file of the user's run: say which, one line
                raise ConfigError(f"init run {origin.name}: adapters/{method} cannot be read: {one_line(exc, 160)}") \
                    from None
            self.factors.setdefault("4bit", {})[method] = factors
            if ranks:
                self.ranks.setdefault("4bit", {})[method] = ranks
            self.loaded.add(method)
            errors = [row["calibrated_error"][method] for row in origin.report.get("layers", [])
                      if method in row.get("calibrated_error", {})]
            if errors:
                self.report.setdefault("calibrated_error_median", {}).setdefault("4bit", {})[method] = \
                    statistics.median(errors)
        loaded = [m for m in self._inits("4bit") if m in self.loaded]
        what = f"the factors of {', '.join(loaded)} loaded from its adapters" if loaded else "no factors to load"
        v = origin.values
        yield self.rec.emit(Stage("load", f"from init run {origin.name}: {v.get('model')} on {v.get('dataset')}, "
                                          f"{v.get('seq_len')}-token windows, rank {v.get('rank')}; {what}"))

    def _inits(self, base: str) -> list[str]:
        """The initializations the arms on `base` start from (qlora aside), in arm order."""
        return list(dict.fromkeys(ARM_SPECS[a].init for a in self.cfg.arms
                                  if ARM_SPECS[a].base == base and ARM_SPECS[a].init != QLORA))

    def _reuse_check(self) -> Iterator[Event]:
        """Whether the init run's perplexities are this run's: the same held-out tokens (the init run's eval-tokens,
        and as many tokens as it counted), measured on the same kind of device in the same compute dtype."""
        origin, cfg = self.origin, self.cfg
        n = int(self.eval_ids.numel())
        reasons = []
        if not same_held_out(cfg, origin):
            reasons.append(f"eval-tokens {cfg.data.eval_tokens} (the init run's: {origin.values.get('eval_tokens')}) "
                           "evaluates on the first of its held-out windows only")
        elif origin.eval_tokens != n:
            reasons.append(f"{n} held-out tokens here, {origin.eval_tokens} in the init run (has its text changed?)")
        self.same_device = (origin.device_type == self.device.type
                            and origin.values.get("compute_dtype") == cfg.model.compute_dtype)
        if not self.same_device:
            reasons.append(f"the init run ran on {origin.report.get('device')} in compute dtype "
                           f"{origin.values.get('compute_dtype')}, this one on {self.report['device']} in "
                           f"{cfg.model.compute_dtype}")
        self.reuse = not reasons
        self.report["perplexities_from_init"] = self.reuse
        if reasons:
            yield self.rec.emit(Log(f"perplexities are measured here, not taken from init run {origin.name}: "
                                    + "; ".join(reasons)))

    def _preflight(self, name: str, config) -> str:
        line, self.shapes = preflight_train(name, config, self.cfg, self.device)
        return line

    def _eval_due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.steps

    def _choose_schedule(self) -> None:
        cfg = self.cfg
        if self.shapes is None:  # no estimate for this architecture: the safe choice
            need, free = 0, 0
        else:
            need = train_estimate(self.shapes, cfg, self.device, interleaved=True).peak[1]
            free = available_bytes(self.device)[0]
        fits = self.shapes is not None and need <= MEMORY_SHARE * free
        self.schedule = cfg.schedule if cfg.schedule != "auto" else ("interleaved" if fits else "sequential")
        self.report["schedule"] = self.schedule
        self.report["memory_estimate"] = {"all_arms_bytes": need, "free_bytes": free, "fits_interleaved": fits}

    def _arm_base(self, base: str):
        """A bare `base` model for the arm set up next.

        Quantizing is most of an arm's setup (about 18 s of CPU time for the embedded model's 4-bit base, 9 s for
        its 8-bit one, against under 2 s to copy one), and bitsandbytes quantizes deterministically. So in the
        interleaved schedule, where every arm stays resident anyway, a base is loaded once (or taken over from the
        reference measured on it) and kept while more arms on it wait: they get deep copies of it, the same Q bit
        for bit (test_train's step-0 perplexities match the init engine's), and the last one the model itself, so
        that no more models are resident than arms. The sequential schedule keeps one arm resident at a time: it
        loads each arm's base anew."""
        model = self._spare.pop(base) if base in self._spare else self._load_base(base)
        self._waiting[base] -= 1
        if self.schedule == "interleaved" and self._waiting[base] > 0:
            self._spare[base] = model
            model = copy.deepcopy(model)
        return model

    def _load_base(self, base: str):
        if base == "4bit":
            return load_4bit(self.source, self.cfg.quant, self.device, self.dtype)
        if base == "8bit":
            return load_8bit(self.source, self.device)
        return load_full_precision(self.source, self.device, torch.float32 if self.device.type == "cpu" else self.dtype)

    def _references(self) -> Iterator[Event]:
        """Full-precision and 8-bit perplexities first, so every face can draw them as reference lines."""
        bases = {ARM_SPECS[a].base for a in self.cfg.arms}
        for name, base, note in REFERENCES:
            known = self.origin.perplexity(name) if self.reuse else None
            if known is not None:  # measured by the init run on these held-out tokens
                self.report["reference_perplexity"][name] = known
                self.report.setdefault("reference_from", {})[name] = str(self.origin.folder)
                self.rec.save()
                yield self.rec.emit(Metric(name, known, "perplexity", f"{note}, from init run {self.origin.name}"))
                continue
            self.rec.check_stop("the reference perplexities")
            yield self.rec.emit(Stage("reference", f"perplexity of the {note} model on {self.eval_ids.numel()} "
                                                   "held-out tokens"))
            start = time.perf_counter()
            model = self._load_base(base)
            ppl = perplexity(model, self.eval_ids, self.cfg.eval_batch)
            self.report["seconds"][f"reference_{name}"] = time.perf_counter() - start
            self.report["reference_perplexity"][name] = ppl
            if base in bases and self.schedule == "interleaved":
                self._spare[base] = model  # the arms on this base take it over (_arm_base)
            del model
            free_memory()
            self.rec.save()
            yield self.rec.emit(Metric(name, ppl, "perplexity", note))

    def _init_factors(self, base: str, model) -> Iterator[Event]:
        """Factors of every initialization the arms on `base` start from that is not there yet (loaded from an init
        run, or computed by an earlier arm): one calibration pass computes the per-layer methods at once, with
        closed_form when a whole-model method needs its start; then each whole-model method runs."""
        have = self.factors.setdefault(base, {})
        missing = [m for m in self._inits(base) if m not in have]
        if not missing:
            return
        if self.origin is not None:
            why = "it initialized against the 4-bit Q" if base != "4bit" else "it did not save them"
            yield self.rec.emit(Log(f"{', '.join(missing)} against the {base} Q: not in init run {self.origin.name} "
                                    f"({why}), computed here"))
        whole = [m for m in missing if get_method(m).kind == MODEL]
        per_layer = {m for m in missing if m not in whole}
        if whole and "closed_form" not in have:
            per_layer.add("closed_form")  # the whole-model methods' start (distill refines it), in the same pass
        if per_layer:
            yield from self._calibrate(base, sorted(per_layer), model)
        for name in whole:
            yield from self._whole_model(base, name, model)

    def _calibrate(self, base: str, methods: list[str], model) -> Iterator[Event]:
        """One block-by-block calibration of `model` computing every per-layer method of `methods`."""
        result = InitResult()
        n = len(self.calib_ids)
        yield self.rec.emit(Stage("calibrate", f"{n} x {self.calib_ids.shape[1]} tokens through the full-precision "
                                               f"blocks; {', '.join(methods)} against the {base} Q"))
        start = time.perf_counter()
        for event in initialize(model, self.checkpoint, self.calib_ids, self.cfg.lora, methods, result,
                                device=self.device, calib_dtype=self.calib_dtype, damping=self.cfg.damping,
                                als_rounds=self.cfg.als_rounds, should_stop=self.should_stop):
            if isinstance(event, Progress):
                yield self.rec.emit(Progress(f"calibrate {base}", event.done, event.total, event.message))
        self.factors[base].update(result.factors)
        self.report["seconds"][f"calibrate_{base}"] = time.perf_counter() - start  # calibration + every method
        self.report["seconds"].setdefault(f"init_{base}", {}).update(result.seconds)  # initialize()'s split
        self.report.setdefault("calibrated_error_median", {}).setdefault(base, {}).update({
            m: statistics.median(row["calibrated_error"][m] for row in result.layers) for m in methods})

    def _whole_model(self, base: str, name: str, model) -> Iterator[Event]:
        """Whole-model method `name` on the `base` model (engine/plan.run_model_method, as the init flow runs it),
        from the closed_form factors of the calibration pass."""
        method = get_method(name)
        self.rec.check_stop(f"initialization ({name})")
        yield self.rec.emit(Stage("setup", f"{name} against the {base} Q: {method.help}"))
        built = run_model_method(name, model, self.checkpoint, self.calib_ids, self.cfg.lora, self.device,
                                 self.calib_dtype, damping=self.cfg.damping, als_rounds=self.cfg.als_rounds,
                                 should_stop=self.should_stop, options=asdict(self.cfg),
                                 start=self.factors[base].get("closed_form"))
        self.factors[base][name] = built.factors
        if built.ranks:
            self.ranks.setdefault(base, {})[name] = built.ranks
        if built.details:
            self.report.setdefault("method_details", {}).setdefault(base, {})[name] = built.details
        self.report["seconds"].setdefault(f"init_{base}", {})[name] = built.seconds
        self.rec.save()
        yield self.rec.emit(Log(f"{name}: initialized against the {base} Q in {built.seconds:.1f} s"))

    def _self_check(self, base: str, model) -> Iterator[Event]:
        """The initializations on `base` not checked yet, loaded from an init run or computed here, measured through
        each layer's own product on held-out windows (the first training windows, which no fit saw); a layer a
        per-layer method makes worse is reset to B = 0 before any arm starts from it (evaluation/selfcheck.py)."""
        done = self.checked.setdefault(base, {})
        todo = {m: self.factors[base][m] for m in self._inits(base) if m not in done and m in self.factors[base]}
        if not todo:
            return
        self.rec.check_stop("the self-check")
        yield self.rec.emit(Stage("setup", f"self-check: {', '.join(todo)} through each {base} layer's own product "
                                           f"on {self.check_ids.numel()} held-out tokens"))
        start = time.perf_counter()
        checks = self_check(model, self.checkpoint, self.check_ids, todo,
                            {path: self.cfg.lora.scaling for path in target_paths(model, self.cfg.lora)},
                            device=self.device, dtype=self.calib_dtype, should_stop=self.should_stop)
        done.update(checks)
        self.report["seconds"][f"self_check_{base}"] = time.perf_counter() - start
        self.report.setdefault("self_check", {}).setdefault(base, {}).update({m: c.record() for m, c in checks.items()})
        self.report.setdefault("layers_reset", {}).setdefault(base, {}).update(
            {m: list(c.reset) for m, c in checks.items()})
        self.rec.save()
        for check in checks.values():
            yield self.rec.emit(Log(f"{base} {check.summary()}", "warning" if check.reset else "info"))

    def _known_step0(self, spec: ArmSpec) -> float | None:
        """An arm's step-0 perplexity when it is known without measuring (None otherwise, or with measure_step0).
        B = 0 adds exactly zero to every layer's output: a default-init arm on a reference base starts at that
        reference, bit for bit. From an init run with the same held-out tokens, device kind and dtype: qlora4 starts
        at its qlora perplexity, an arm with loaded factors at its perplexity of that method (the same Q, the same
        factors, the same tokens)."""
        if self.cfg.measure_step0:
            return None
        reference = {"8bit": "int8", "full": "full"}.get(spec.base)
        if spec.init == QLORA and reference in self.report["reference_perplexity"]:
            return self.report["reference_perplexity"][reference]
        check = self.checked.get(spec.base, {}).get(spec.init)
        if check is not None and check.reset:  # not the init run's factors any more: measured here
            return None
        if self.reuse and spec.base == "4bit" and (spec.init == QLORA or spec.init in self.loaded):
            return self.origin.perplexity(spec.init)
        return None

    def _setup_arm(self, name: str) -> Iterator[Event]:
        cfg, spec = self.cfg, ARM_SPECS[name]
        self.rec.check_stop(f"the setup of arm {name}")
        yield self.rec.emit(Stage("setup", f"arm {name}: {spec.label}"))
        start = time.perf_counter()
        model = self._arm_base(spec.base)
        paths = target_paths(model, cfg.lora)
        if spec.init != QLORA:
            yield from self._init_factors(spec.base, model)
            yield from self._self_check(spec.base, model)
        ranks = self.ranks.get(spec.base, {}).get(spec.init)  # budget's per-layer ranks (peft's rank_pattern)
        torch.manual_seed(cfg.data.seed)  # the same random A in every default-init arm
        peft_model = attach_lora(model, cfg.lora, paths, ranks)
        if spec.init != QLORA:
            try:
                write_factors(peft_model, self.factors[spec.base][spec.init])
            except (KeyError, ValueError) as exc:
                if spec.base != "4bit" or spec.init not in self.loaded:
                    raise
                raise ConfigError(f"init run {self.origin.name}: adapters/{spec.init} does not fit this model's LoRA "
                                  f"layers: {one_line(exc, 160)}") from None
        arm = Arm(name, spec, peft_model, self.device, cfg.learning_rate, cfg.weight_decay)
        arm.setup_seconds = time.perf_counter() - start
        self.arms[name] = arm
        init_from = "peft default (B = 0)" if spec.init == QLORA else (
            f"init run {self.report['from_init']}" if spec.base == "4bit" and spec.init in self.loaded
            else "computed in this run")
        self.report["arms"][name].update(status="running", trainable_parameters=arm.trainable,
                                         weights_bytes=arm.weights_bytes, init_from=init_from)
        known = self._known_step0(spec)
        if known is not None:
            arm.evals.append((0, known))
            self.rec.save()
            yield self.rec.emit(EvalPoint(arm.name, 0, known))
            yield from self._score(arm, 0)
        else:
            yield from self._evaluate(arm, 0)

    def _train_step(self, arm: Arm, step: int) -> Iterator[Event]:
        micro = self.batches[step - 1]
        lr = self.cfg.lr_at(step)
        measure = "peak" if self.schedule == "sequential" else "own"
        loss, seconds, memory = arm.step(micro, lr, measure)
        tokens = sum(ids.numel() for ids in micro)
        if not math.isfinite(loss) and all(math.isfinite(x) for x in arm.losses[:-1]):
            yield self.rec.emit(Log(f"arm {arm.name}: the training loss is {loss} at step {step}; its LoRA factors are "
                                 "no longer finite (try a lower learning rate)", "warning"))
        yield self.rec.emit(TrainStep(arm.name, step, self.cfg.steps, loss, lr, tokens / seconds, seconds, memory,
                                      batch_hash(micro), arm.memory_how))

    def _evaluate(self, arm: Arm, step: int) -> Iterator[Event]:
        ppl = arm.evaluate(step, self.eval_ids, self.cfg.eval_batch)
        self.rec.save()
        yield self.rec.emit(EvalPoint(arm.name, step, ppl))
        yield from self._score(arm, step)

    def _finish_arm(self, arm: Arm) -> Iterator[Event]:
        stopped = arm.steps_done < self.cfg.steps
        cfg = self.cfg
        record = {"arm": arm.name, "method": arm.spec.init, "base": arm.spec.base, "model": cfg.model.model,
                  "data": cfg.data.dataset, "rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
                  "use_rslora": cfg.lora.rslora, "calibration": f"{cfg.data.calib_samples} x {cfg.data.seq_len} tokens",
                  "steps": f"{arm.steps_done} of {cfg.steps}", "held_out_perplexity": arm.final_perplexity,
                  "init_from": self.report["arms"][arm.name].get("init_from"), "run": str(self.run_dir)}
        folder = save_adapter(arm.model, self.run_dir / "adapters" / arm.name, record)
        arm.adapter_dir = str(folder)
        arm.status = "stopped" if stopped else "finished"
        self.rec.save()
        yield self.rec.emit(ArmFinished(arm.name, arm.final_perplexity, arm.best_perplexity, arm.seconds,
                                        arm.adapter_dir, arm.steps_done, stopped))

    # -- downstream accuracy ----------------------------------------------------------------------------
    def _build_tasks(self, splits) -> Iterator[Event]:
        """The tasks cfg.accuracy asks for, on documents this run held out. Without an init run (or one that scored
        no accuracy): build_tasks reserving the calibration and training documents. From an init run that scored
        accuracy: built as it built them (reserving its calibration documents only), then the items about this
        run's training documents left out (sources/tasks.asked_about); where the task's fingerprint is the init
        run's, self.keep maps the items to the init report's. A task that cannot be built is left out with a
        warning and the reason in report["accuracy_unavailable"]."""
        acc, data = self.cfg.accuracy, self.cfg.data
        if not acc.accuracy_tasks:
            return
        self.report.update(accuracy={}, accuracy_gap_closed={}, accuracy_gap_closed_full={}, accuracy_unavailable={})
        yield self.rec.emit(Stage("data", f"downstream tasks: {', '.join(acc.accuracy_tasks)}"))
        scored = (self.origin.report.get("accuracy") or {}) if self.origin is not None else {}
        like_init = bool(scored)
        trained: set[str] | None = None
        for kind in acc.accuracy_tasks:
            try:
                (task,) = build_tasks(replace(acc, accuracy_tasks=(kind,)), data, splits, self.tokenizer,
                                      reserved_splits=("calib",) if like_init else ("calib", "train"))
                keep = list(range(len(task.items)))
                left_out = 0
                if like_init:
                    if trained is None:
                        trained = reserved_documents(load_texts(data.dataset, data.text_column), splits,
                                                     self.tokenizer, ("train",))
                    asked = set(asked_about(task, trained))
                    keep = [i for i in keep if i not in asked]
                    if len(keep) < MIN_ITEMS:
                        raise DataError(f"{len(keep)} of its items are not about this run's training documents, "
                                        f"fewer than {MIN_ITEMS}")
                    entry = scored.get(kind) or {}
                    if entry.get("fingerprint") == task_fingerprint(task) and entry.get("n") == len(task.items):
                        self.init_accuracy[kind] = entry
                    left_out = len(task.items) - len(keep)
                    task = subset_task(task, keep, "about this run's training documents")
            except (DataError, ConfigError) as exc:
                self.report["accuracy_unavailable"][kind] = f"not built: {one_line(exc, 200)}"
                yield self.rec.emit(Log(f"accuracy task {kind} not built: {one_line(exc, 200)}", "warning"))
                continue
            self.tasks.append(task)
            self.keep[kind] = keep
            self.report["accuracy"][kind] = {
                "title": task.title, "metric": task.metric, "description": task.description, "n": len(task.items),
                "chance": task.chance, "majority": task.majority, "fingerprint": task_fingerprint(task),
                "from_init_items": kind in self.init_accuracy, "left_out_as_trained": left_out}
            yield self.rec.emit(Log(f"accuracy task {task.title}: {task.description}"))

    def _init_answers(self, spec: ArmSpec, kind: str) -> tuple[bool, ...] | None:
        """An arm's step-0 answers to task `kind` when the init run gave them (None otherwise, or with
        measure_step0): its items are the init run's (same fingerprint, less this run's training documents), it ran
        on this kind of device in this compute dtype, and it scored the model the arm starts as: qlora4 the plain
        4-bit base (B = 0), an arm with loaded factors its method, qlora8 / lora16 the 8-bit / full-precision model
        (B = 0 adds nothing)."""
        entry = self.init_accuracy.get(kind)
        if self.cfg.measure_step0 or entry is None or not self.same_device:
            return None
        if spec.base == "4bit":
            name = spec.init if spec.init == QLORA or spec.init in self.loaded else None
        else:
            name = {"8bit": "int8", "full": "full"}[spec.base] if spec.init == QLORA else None
        correct = ((entry.get("models") or {}).get(name) or {}).get("correct")
        if not isinstance(correct, str) or len(correct) != entry.get("n"):
            return None
        return tuple(correct[i] == "1" for i in self.keep[kind])

    def _score(self, arm: Arm, step: int) -> Iterator[Event]:
        """Score every task on the arm's model after `step` steps (at step 0 the init run's answers where
        _init_answers has them): one AccuracyPoint per task."""
        for task in list(self.tasks):
            self.rec.check_stop("accuracy scoring")
            correct = self._init_answers(arm.spec, task.kind) if step == 0 else None
            note = f"from init run {self.origin.name}" if correct is not None else ""
            if correct is None:
                try:
                    score = score_task(arm.model, self.tokenizer, task, should_stop=self.should_stop,
                                       batch_tokens=self.cfg.accuracy.accuracy_batch_tokens)
                except ConfigError as exc:  # prompts longer than the model's context: the task gives nothing here
                    self.tasks.remove(task)
                    self.report["accuracy_unavailable"][task.kind] = f"not scored: {one_line(exc, 200)}"
                    yield self.rec.emit(Log(f"accuracy task {task.kind} not scored: {one_line(exc, 200)}", "warning"))
                    continue
                correct = score.correct
                arm.record_accuracy(task.kind, step, correct, score.seconds)
            else:
                arm.record_accuracy(task.kind, step, correct)
            hits, n = sum(correct), len(correct)
            lo, hi = wilson_interval(hits, n)
            self.rec.save()
            yield self.rec.emit(AccuracyPoint(arm.name, step, task.kind, hits / n, n, (lo, hi), note))

    @staticmethod
    def _accuracy_record(step: int, correct: tuple[bool, ...], with_items: bool = False) -> dict:
        """One evaluation's accuracy: hits / n, its 95% Wilson interval and half-width (and which items were right,
        "1"/"0" per item, for paired tests read back later)."""
        hits, n = sum(correct), len(correct)
        lo, hi = wilson_interval(hits, n)
        record = {"step": step, "accuracy": hits / n, "hits": hits, "n": n, "interval": [lo, hi],
                  "half_width": (hi - lo) / 2}
        if with_items:
            record["correct"] = "".join("1" if c else "0" for c in correct)
        return record

    def _accuracy_figures(self) -> None:
        """Per task and arm: accuracy at step 0, at the last and at the best evaluation (report["arms"][arm]
        ["accuracy"][task]); the accuracy gap closed on the last evaluations,
        (acc_arm - acc_qlora4) / (acc_qlora8 - acc_qlora4) ("gap_closed"; toward lora16: "gap_closed_full"), each
        when that arm runs; and McNemar's exact test of each arm against qlora4 on the last evaluations' items."""
        if "accuracy" not in self.report:
            return
        for kind in self.report["accuracy"]:
            histories = {name: arm.accuracy[kind] for name, arm in self.arms.items() if arm.accuracy.get(kind)}
            final = {name: h[-1][1] for name, h in histories.items()}
            acc = {name: sum(c) / len(c) for name, c in final.items()}
            gaps = {target: {name: accuracy_gap_closed(a, acc.get("qlora4"), acc.get(target))
                             for name, a in acc.items()} for target in ("qlora8", "lora16")}
            self.report["accuracy_gap_closed"][kind] = gaps["qlora8"]
            self.report["accuracy_gap_closed_full"][kind] = gaps["lora16"]
            for name, history in histories.items():
                step, best = max(history, key=lambda point: (sum(point[1]), -point[0]))
                entry = {"evals": [[s, sum(c) / len(c), *wilson_interval(sum(c), len(c))] for s, c in history],
                         "step0": self._accuracy_record(0, history[0][1], True) if history[0][0] == 0 else None,
                         "final": self._accuracy_record(*history[-1], True),
                         "best": self._accuracy_record(step, best),
                         "gap_closed": gaps["qlora8"][name], "gap_closed_full": gaps["lora16"][name]}
                if name != "qlora4" and "qlora4" in final and len(final["qlora4"]) == len(final[name]):
                    test = paired_test(final[name], final["qlora4"])
                    entry["vs_qlora4"] = {**test.as_dict(), "significant": test.p_value < 1 - test.confidence,
                                          "summary": test.summary(name, "qlora4")}
                self.report["arms"][name].setdefault("accuracy", {})[kind] = entry

    # -- figures ----------------------------------------------------------------------------------------
    def _arm_summary(self, arm: Arm) -> dict:
        tokens = self.cfg.batch_size * self.cfg.grad_accum * self.cfg.data.seq_len
        median = statistics.median(arm.step_seconds) if arm.step_seconds else None
        return {
            "status": arm.status,
            "steps_done": arm.steps_done,
            "evals": [[s, p] for s, p in arm.evals],
            "step0_perplexity": arm.evals[0][1] if arm.evals and arm.evals[0][0] == 0 else None,
            "final_perplexity": arm.final_perplexity,  # at the last evaluation (the last step, unless stopped)
            "final_eval_step": arm.evals[-1][0] if arm.evals else None,
            "best_perplexity": arm.best_perplexity,
            "last_train_loss": arm.losses[-1] if arm.losses else None,
            "median_step_seconds": median,
            "tokens_per_s": tokens / median if median else None,
            "peak_memory_bytes": arm.peak_memory_bytes,
            "memory_method": arm.memory_method,
            "seconds": arm.seconds,
            "setup_seconds": arm.setup_seconds,
            "adapter_dir": arm.adapter_dir or None,
        }

    def _gap_figures(self) -> None:
        """gap closed = (ppl_qlora4 - ppl_arm) / (ppl_qlora4 - ppl_target).
        After fine-tuning (latest evaluations): target qlora8 ("gap_closed") and lora16 ("gap_closed_full"),
        each only when that arm runs. At initialization (step 0, "gap_closed_init"): target the 8-bit and
        full-precision models before fine-tuning, as in the init report."""
        final = {n: a.final_perplexity for n, a in self.arms.items() if a.final_perplexity is not None}
        for name, ppl in final.items():
            self.report["gap_closed"][name] = gap_closed(ppl, final.get("qlora4"), final.get("qlora8"))
            self.report["gap_closed_full"][name] = gap_closed(ppl, final.get("qlora4"), final.get("lora16"))
        ref = self.report["reference_perplexity"]
        start = {n: a.evals[0][1] for n, a in self.arms.items() if a.evals and a.evals[0][0] == 0}
        self.report["gap_closed_init"] = {
            n: {target: gap_closed(p, start.get("qlora4"), ref.get(target)) for target in ("int8", "full")}
            for n, p in start.items()}


def run_train(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None,
              run_dir: Path | None = None) -> Iterator[Event]:
    """The fine-tuning flow's event stream (see TrainRun)."""
    return TrainRun(cfg, should_stop, run_dir).events()
