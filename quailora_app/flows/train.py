"""Short LoRA fine-tuning of several arms side by side, as one event stream (`run_train(cfg)`).

Bases (engine/arms.py): the arms on "4bit" (qlora4, quailora4, closed4, ...) train on the run's quantized base as
--quantizer / --bits / --group-size set it (bitsandbytes NF4/FP4 by default, or HQQ at 2, 3, 4 or 8 bits through
quantization/load.py), with their initializations computed against that base's own Q; qlora_nf4 trains on
bitsandbytes NF4 4-bit whatever the quantizer, so one run shows HQQ 3-bit arms beside 4-bit QLoRA. Each arm's label
names its base's bits and quantizer (report["arms"][arm]["label"] / ["short"], and every EvalPoint's label).

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
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import torch

from quailora_app.config import QuantConfig, TrainConfig
from quailora_app.engine.adapters import attach_lora, save_adapter, write_factors
from quailora_app.engine.arms import ARM_SPECS, Arm, ArmSpec, arm_labels, base_title, batch_hash
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.evaluation.accuracy import task_fingerprint
from quailora_app.engine.evaluation.evaluate import gap_closed, perplexity
from quailora_app.engine.evaluation.selfcheck import check_window_count
from quailora_app.engine.evaluation.statistics import wilson_interval
from quailora_app.engine.methods.registry import QLORA
from quailora_app.engine.preflight import ModelShapes, available_bytes, preflight_train, train_estimate
from quailora_app.engine.quantization.bnb import load_4bit, load_8bit
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.engine.quiet import quiet_libraries
from quailora_app.engine.requantized import BASE_FILE, save_base
from quailora_app.errors import ConfigError, DataError, one_line
from quailora_app.events import (
    AccuracyPoint,
    ArmFinished,
    EvalPoint,
    Event,
    Log,
    Metric,
    RunFinished,
    Stage,
    TrainStep,
)
from quailora_app.flows.accuracy_ledger import AccuracyLedger, Answers, accuracy_record, gaps_closed, versus
from quailora_app.flows.from_init import InitSource, check_against_init, init_answers, read_init_run, same_held_out
from quailora_app.flows.prepare import prepare
from quailora_app.flows.recorder import Recorder, free_memory, opening_report
from quailora_app.flows.train_setup import ArmInits, TrainData, put_layer, training_order
from quailora_app.runs import Report, RunFolder
from quailora_app.sources.data import MAX_TRAIN_SEQS, load_texts
from quailora_app.sources.models import device_label, load_full_precision, pick_device
from quailora_app.sources.tasks import MIN_ITEMS, Task, asked_about, reserved_documents, subset_task

quiet_libraries()

REFERENCES = (("full", "full", "full precision"), ("int8", "8bit", "8-bit LLM.int8"))  # metric, base, note
#: the "nf4" base of the reference arm qlora_nf4: bitsandbytes' QLoRA recipe, whatever the run's quantizer
NF4_RECIPE = QuantConfig(quantizer="bitsandbytes", bits=4, quant="nf4", double_quant=True, block_size=64)
MEMORY_SHARE = 0.7


class TrainRun:
    """One fine-tuning run. Iterate `events()`; results land in `run_dir` as they happen.

    Structure (as torchtune's recipes): `__init__` opens the run folder and the report; `_setup()` runs the setup
    steps, each returning what it builds (`_setup_origin`, `_setup_data`, `_setup_schedule`, `_setup_reuse`,
    `_setup_tasks`), assigned there and nowhere else; then `_train()` and `_finish()`. Arms are set up as the
    schedule reaches them (`_setup_arm` returns the Arm); what their setups share is kept in the stores made in
    `__init__` (their initializations, spare base models)."""

    def __init__(self, cfg: TrainConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None):
        self.cfg = cfg
        folder = RunFolder.create("train", run_dir or cfg.out)
        self.run_dir = folder.path
        self.device = pick_device(cfg.model.device)
        arms = {name: self._arm_entry(ARM_SPECS[name]) for name in cfg.arms}
        self.report: Report = opening_report(
            "train", cfg, device_label(self.device), arm_names=list(cfg.arms), schedule=None, reference_perplexity={},
            arms=arms, gap_closed={}, gap_closed_full={}, seconds={}, from_init=cfg.from_init)
        self.rec = Recorder(folder, self.report, should_stop, before_save=self._summarize, on_fail=self._arms_ended,
                            stopped_status="stopped")
        self.should_stop = self.rec.should_stop
        # set by _setup(), from its steps
        self.origin: InitSource | None = None  # the init run this run starts from
        self.loaded: frozenset[str] = frozenset()  # the 4-bit initializations loaded from it
        self.data: TrainData | None = None
        self.schedule: str | None = None  # "interleaved" or "sequential"
        self.reuse = False  # the init run's perplexities are this run's (same held-out tokens, device kind and dtype)
        self.same_device = False  # the init run ran on this kind of device in this compute dtype
        self.ledger: AccuracyLedger | None = None  # the downstream tasks every arm is scored on (cfg.accuracy)
        self.init_answers: dict[str, dict[str, tuple[bool, ...]]] = {}  # task kind -> init run variant -> its answers
        # filled as the arms are set up
        self.arms: dict[str, Arm] = {}
        self.inits = ArmInits(self.rec, cfg, self.device)  # the initializations they start from, per base
        self._spare: dict[str, object] = {}  # base -> a loaded bare base model waiting for its next arm
        self._waiting = collections.Counter(ARM_SPECS[a].base for a in cfg.arms)  # base -> arms not set up yet

    # -- plumbing ---------------------------------------------------------------------------------------
    def _arm_entry(self, spec: ArmSpec) -> dict:
        """An arm's opening entry in the report: its labels (naming the bits and quantizer of its base), base,
        initialization; a quantized base's quantizer and bits."""
        label, short = arm_labels(spec, self.cfg.quant)
        entry = {"label": label, "short": short, "base": spec.base, "base_title": base_title(spec.base, self.cfg.quant),
                 "init": spec.init, "status": "pending"}
        quant = {"4bit": self.cfg.quant, "nf4": NF4_RECIPE}.get(spec.base)
        if quant is not None:
            entry.update(quantizer=quant.quantizer, bits=quant.bits, block_size=quant.block_size)
        return entry

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
        t0 = time.perf_counter()
        yield from self._setup()
        yield from self._train()
        yield from self._finish(t0)

    def _setup(self) -> Iterator[Event]:
        """Everything before the arms: each step returns what it builds, assigned here."""
        if self.cfg.from_init:
            self.origin, self.loaded = yield from self._setup_origin()
        self.data = yield from self._setup_data()
        self.schedule = yield from self._setup_schedule()
        if self.origin is not None:
            self.reuse, self.same_device = yield from self._setup_reuse()
        self.ledger, self.init_answers = yield from self._setup_tasks()
        yield from self._references()

    def _train(self) -> Iterator[Event]:
        cfg = self.cfg
        if self.schedule == "interleaved":
            for name in cfg.arms:
                yield from self._open_arm(name)
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
            return
        for name in cfg.arms:
            if self.should_stop():
                break
            yield from self._open_arm(name)
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

    def _finish(self, t0: float) -> Iterator[Event]:
        stopped = any(a.status == "stopped" for a in self.arms.values()) or len(self.arms) < len(self.cfg.arms)
        for entry in self.report["arms"].values():
            if entry["status"] == "pending":
                entry["status"] = "not started"
        self.report["status"] = "stopped" if stopped else "finished"
        self.report["seconds"]["total"] = time.perf_counter() - t0
        self.rec.save()
        yield self.rec.emit(RunFinished(str(self.run_dir), self.report))

    # -- setup steps --------------------------------------------------------------------------------------
    def _setup_origin(self) -> Generator[Event, None, tuple[InitSource, frozenset[str]]]:
        """The init run (flows/from_init.py), a config that differs from it refused, and the 4-bit initializations
        it saved that the arms start from (ArmInits.load): the init run and which initializations it gave."""
        origin = read_init_run(self.cfg.from_init)
        check_against_init(self.cfg, origin)
        self.report["from_init"] = str(origin.folder)
        loaded = self.inits.load(origin)
        what = (f"the factors of {', '.join(m for m in self.inits.wanted('4bit') if m in loaded)} loaded from its "
                "adapters" if loaded else "no factors to load")
        v = origin.values
        yield self.rec.emit(Stage("load", f"from init run {origin.name}: {v.get('model')} on {v.get('dataset')}, "
                                          f"{v.get('seq_len')}-token windows, rank {v.get('rank')}; {what}"))
        return origin, loaded

    def _setup_data(self) -> Generator[Event, None, TrainData]:
        """The load sequence (flows/prepare.py; no base model: the arms load theirs), then the training batches:
        every arm gets the same ones in the same order (training_order)."""
        cfg = self.cfg
        found: dict[str, ModelShapes | None] = {}

        def preflight(name: str, config) -> str:
            line, found["shapes"] = preflight_train(name, config, cfg, self.device)
            return line

        per_step = cfg.batch_size * cfg.grad_accum
        sizes = {"min_train_seqs": min(per_step, MAX_TRAIN_SEQS),
                 "max_train_seqs": max(min(cfg.steps * per_step, MAX_TRAIN_SEQS), 1)}
        prepared = yield from self.rec.relay(prepare(cfg.model, cfg.data, cfg.quant, self.device, preflight,
                                                     should_stop=self.should_stop, split_sizes=sizes, load_base=False))
        splits = prepared.splits
        self.report["model_note"] = prepared.source.note
        order = training_order(len(splits.train), cfg.steps * per_step, cfg.data.seed)
        micro = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.steps * cfg.grad_accum)]
        batches = [[splits.train[micro[k * cfg.grad_accum + j]] for j in range(cfg.grad_accum)]
                   for k in range(cfg.steps)]
        self.report["tokens"] = {"calibration": int(splits.calib.numel()), "eval": int(splits.eval.numel()),
                                 "train_windows": int(len(splits.train)), "per_step": per_step * cfg.data.seq_len,
                                 "epochs": round(cfg.steps * per_step / len(splits.train), 3)}
        return TrainData(prepared.source, prepared.checkpoint, prepared.tokenizer, prepared.dtype,
                         torch.float32 if self.device.type == "cpu" else prepared.dtype, splits,
                         splits.train[:check_window_count(len(splits.train), splits.seq_len)], batches,
                         found["shapes"])

    def _setup_schedule(self) -> Generator[Event, None, str]:
        """cfg.schedule; "auto": interleaved when the estimated memory of all arms stays under MEMORY_SHARE of the
        free device memory, else sequential (also when there is no estimate for this architecture)."""
        cfg, data = self.cfg, self.data
        if data.shapes is None:  # no estimate for this architecture: the safe choice
            need, free = 0, 0
        else:
            need = train_estimate(data.shapes, cfg, self.device, interleaved=True).peak[1]
            free = available_bytes(self.device)[0]
        fits = data.shapes is not None and need <= MEMORY_SHARE * free
        schedule = cfg.schedule if cfg.schedule != "auto" else ("interleaved" if fits else "sequential")
        self.report["schedule"] = schedule
        self.report["memory_estimate"] = {"all_arms_bytes": need, "free_bytes": free, "fits_interleaved": fits}
        self.rec.save()
        per_step = cfg.batch_size * cfg.grad_accum
        epochs = cfg.steps * per_step / len(data.splits.train)
        yield self.rec.emit(Log(f"{data.splits.summary()}; {cfg.steps} steps of {per_step} x {cfg.data.seq_len} "
                                f"tokens ({epochs:.2f} epochs); schedule {schedule}"))
        return schedule

    def _setup_reuse(self) -> Generator[Event, None, tuple[bool, bool]]:
        """Whether the init run's perplexities are this run's: the same held-out tokens (the init run's eval-tokens,
        and as many tokens as it counted), measured on the same kind of device in the same compute dtype; and
        whether it ran on this kind of device in this compute dtype."""
        origin, cfg = self.origin, self.cfg
        n = int(self.data.eval_ids.numel())
        reasons = []
        if not same_held_out(cfg, origin):
            reasons.append(f"eval-tokens {cfg.data.eval_tokens} (the init run's: {origin.values.get('eval_tokens')}) "
                           "evaluates on the first of its held-out windows only")
        elif origin.eval_tokens != n:
            reasons.append(f"{n} held-out tokens here, {origin.eval_tokens} in the init run (has its text changed?)")
        same_device = (origin.device_type == self.device.type
                       and origin.values.get("compute_dtype") == cfg.model.compute_dtype)
        if not same_device:
            reasons.append(f"the init run ran on {origin.report.get('device')} in compute dtype "
                           f"{origin.values.get('compute_dtype')}, this one on {self.report['device']} in "
                           f"{cfg.model.compute_dtype}")
        self.report["perplexities_from_init"] = not reasons
        if reasons:
            yield self.rec.emit(Log(f"perplexities are measured here, not taken from init run {origin.name}: "
                                    + "; ".join(reasons)))
        return not reasons, same_device

    def _setup_tasks(self) -> Generator[Event, None, tuple[AccuracyLedger, dict[str, dict[str, tuple[bool, ...]]]]]:
        """The tasks cfg.accuracy asks for, on documents this run held out, and the init run's answers to them.
        Without an init run (or one that scored no accuracy): built reserving the calibration and training
        documents. From an init run that scored accuracy: built as it built them (reserving its calibration
        documents only), then the items about this run's training documents left out (sources/tasks.asked_about);
        where the task's fingerprint is the init run's, the init report's answers to the items kept, per variant."""
        cfg, data = self.cfg, self.data
        ledger = AccuracyLedger(self.rec, cfg.accuracy, self.device, data.tokenizer)
        scored = (self.origin.report.get("accuracy") or {}) if self.origin is not None else {}
        answers: dict[str, dict[str, tuple[bool, ...]]] = {}
        trained: set[str] | None = None

        def fit(task: Task) -> tuple[Task, dict]:
            nonlocal trained
            if not scored:
                return task, {"from_init_items": False, "left_out_as_trained": 0}
            if trained is None:
                trained = reserved_documents(load_texts(cfg.data.dataset, cfg.data.text_column), data.splits,
                                             data.tokenizer, ("train",))
            asked = set(asked_about(task, trained))
            keep = [i for i in range(len(task.items)) if i not in asked]
            if len(keep) < MIN_ITEMS:
                raise DataError(f"{len(keep)} of its items are not about this run's training documents, "
                                f"fewer than {MIN_ITEMS}")
            entry = scored.get(task.kind) or {}
            if entry.get("fingerprint") == task_fingerprint(task) and entry.get("n") == len(task.items):
                answers[task.kind] = init_answers(entry, keep)
            return subset_task(task, keep, "about this run's training documents"), {
                "from_init_items": task.kind in answers, "left_out_as_trained": len(task.items) - len(keep)}

        yield from ledger.build(cfg.data, data.splits, ("calib",) if scored else ("calib", "train"), fit)
        return ledger, answers

    def _eval_due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.steps

    # -- base models and reference perplexities -------------------------------------------------------------
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
        data = self.data
        if base == "4bit":  # the run's quantizer and bits (bitsandbytes 4-bit or HQQ)
            return load_quantized(data.source, self.cfg.quant, self.device, data.dtype)
        if base == "nf4":  # the QLoRA recipe, as reference
            return load_4bit(data.source, NF4_RECIPE, self.device, data.dtype)
        if base == "8bit":
            return load_8bit(data.source, self.device)
        return load_full_precision(data.source, self.device, torch.float32 if self.device.type == "cpu" else data.dtype)

    def _references(self) -> Iterator[Event]:
        """Full-precision and 8-bit perplexities first, so every face can draw them as reference lines."""
        bases = {ARM_SPECS[a].base for a in self.cfg.arms}
        eval_ids = self.data.eval_ids
        for name, base, note in REFERENCES:
            known = self.origin.perplexity(name) if self.reuse else None
            if known is not None:  # measured by the init run on these held-out tokens
                self.report["reference_perplexity"][name] = known
                self.report.setdefault("reference_from", {})[name] = str(self.origin.folder)
                self.rec.save()
                yield self.rec.emit(Metric(name, known, "perplexity", f"{note}, from init run {self.origin.name}"))
                continue
            self.rec.check_stop("the reference perplexities")
            yield self.rec.emit(Stage("reference", f"perplexity of the {note} model on {eval_ids.numel()} "
                                                   "held-out tokens"))
            start = time.perf_counter()
            model = self._load_base(base)
            ppl = perplexity(model, eval_ids, self.cfg.eval_batch)
            self.report["seconds"][f"reference_{name}"] = time.perf_counter() - start
            self.report["reference_perplexity"][name] = ppl
            if base in bases and self.schedule == "interleaved":
                self._spare[base] = model  # the arms on this base take it over (_arm_base)
            del model
            free_memory()
            self.rec.save()
            yield self.rec.emit(Metric(name, ppl, "perplexity", note))

    # -- arms -----------------------------------------------------------------------------------------------
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
        if self.inits.was_reset(spec.base, spec.init):  # not the init run's factors any more: measured here
            return None
        if self.reuse and spec.base == "4bit" and (spec.init == QLORA or spec.init in self.loaded):
            return self.origin.perplexity(spec.init)
        return None

    def _open_arm(self, name: str) -> Iterator[Event]:
        """Arm `name` set up (_setup_arm), and where it starts: its step-0 perplexity and accuracy."""
        arm = yield from self._setup_arm(name)
        self.arms[name] = arm
        spec = arm.spec
        init_from = "peft default (B = 0)" if spec.init == QLORA else (
            f"init run {self.report['from_init']}" if spec.base == "4bit" and spec.init in self.loaded
            else "computed in this run")
        self.report["arms"][name].update(status="running", trainable_parameters=arm.trainable,
                                         weights_bytes=arm.weights_bytes, init_from=init_from)
        known = self._known_step0(spec)
        if known is not None:
            arm.evals.append((0, known))
            self.rec.save()
            yield self.rec.emit(EvalPoint(arm.name, 0, known, self.report["arms"][name]["short"]))
            yield from self._score(arm, 0)
        else:
            yield from self._evaluate(arm, 0)

    def _setup_arm(self, name: str) -> Generator[Event, None, Arm]:
        """Arm `name`: its base model, its initialization's factors (loaded, or computed and self-checked here),
        LoRA attached (peft's default A drawn from the run's seed) with the factors written in, its optimizer."""
        cfg, spec = self.cfg, ARM_SPECS[name]
        self.rec.check_stop(f"the setup of arm {name}")
        yield self.rec.emit(Stage("setup", f"arm {name}: {self.report['arms'][name]['label']}"))
        start = time.perf_counter()
        model = self._arm_base(spec.base)
        paths = target_paths(model, cfg.lora)
        if spec.init != QLORA:
            yield from self.inits.ready(spec.base, model, self.data, self.origin)
        for path, layer in self.inits.bases.get(spec.base, {}).get(spec.init, {}).items():
            put_layer(model, path, layer)  # LoftQ: the arm trains on its re-quantized base Q_T
        ranks = self.inits.ranks.get(spec.base, {}).get(spec.init)  # budget's per-layer ranks (peft's rank_pattern)
        torch.manual_seed(cfg.data.seed)  # the same random A in every default-init arm
        peft_model = attach_lora(model, cfg.lora, paths, ranks)
        if spec.init != QLORA:
            try:
                write_factors(peft_model, self.inits.factors[spec.base][spec.init])
            except (KeyError, ValueError) as exc:
                if spec.base != "4bit" or spec.init not in self.loaded:
                    raise
                raise ConfigError(f"init run {self.origin.name}: adapters/{spec.init} does not fit this model's LoRA "
                                  f"layers: {one_line(exc, 160)}") from None
        arm = Arm(name, spec, peft_model, self.device, cfg.learning_rate, cfg.weight_decay)
        arm.setup_seconds = time.perf_counter() - start
        return arm

    def _train_step(self, arm: Arm, step: int) -> Iterator[Event]:
        micro = self.data.batches[step - 1]
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
        ppl = arm.evaluate(step, self.data.eval_ids, self.cfg.eval_batch)
        self.rec.save()
        yield self.rec.emit(EvalPoint(arm.name, step, ppl, self.report["arms"][arm.name]["short"]))
        yield from self._score(arm, step)

    def _finish_arm(self, arm: Arm) -> Iterator[Event]:
        stopped = arm.steps_done < self.cfg.steps
        cfg = self.cfg
        entry = self.report["arms"][arm.name]
        record = {"arm": arm.name, "label": entry["label"], "method": arm.spec.init, "base": arm.spec.base,
                  "base_title": entry["base_title"], "quantizer": entry.get("quantizer"), "bits": entry.get("bits"),
                  "model": cfg.model.model,
                  "data": cfg.data.dataset, "rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
                  "use_rslora": cfg.lora.rslora, "calibration": f"{cfg.data.calib_samples} x {cfg.data.seq_len} tokens",
                  "steps": f"{arm.steps_done} of {cfg.steps}", "held_out_perplexity": arm.final_perplexity,
                  "init_from": self.report["arms"][arm.name].get("init_from"), "run": str(self.run_dir)}
        requantized = arm.spec.init in self.inits.bases.get(arm.spec.base, {})
        if requantized:  # LoftQ trained on its own re-quantized base Q_T: that base travels with the adapter
            record["base_weights"] = BASE_FILE
        folder = save_adapter(arm.model, self.run_dir / "adapters" / arm.name, record)
        if requantized:
            saved = save_base(arm.model, folder, self.data.dtype)
            yield self.rec.emit(Log(f"{arm.name}: it trained on its own re-quantized base, so {folder} also holds it "
                                    f"({saved.name}); load the pair with plain transformers and peft as its README.md "
                                    "says"))
        arm.adapter_dir = str(folder)
        arm.status = "stopped" if stopped else "finished"
        self.rec.save()
        yield self.rec.emit(ArmFinished(arm.name, arm.final_perplexity, arm.best_perplexity, arm.seconds,
                                        arm.adapter_dir, arm.steps_done, stopped))

    # -- downstream accuracy ----------------------------------------------------------------------------
    def _init_answers(self, spec: ArmSpec, kind: str) -> tuple[bool, ...] | None:
        """An arm's step-0 answers to task `kind` when the init run gave them (None otherwise, or with
        measure_step0): its items are the init run's (same fingerprint, less this run's training documents), it ran
        on this kind of device in this compute dtype, and it scored the model the arm starts as: qlora4 the plain
        4-bit base (B = 0), an arm with loaded factors its method, qlora8 / lora16 the 8-bit / full-precision model
        (B = 0 adds nothing)."""
        if self.cfg.measure_step0 or not self.same_device:
            return None
        if spec.base == "4bit":
            name = spec.init if spec.init == QLORA or spec.init in self.loaded else None
        else:
            name = {"8bit": "int8", "full": "full"}.get(spec.base) if spec.init == QLORA else None
        return self.init_answers.get(kind, {}).get(name)

    def _score(self, arm: Arm, step: int) -> Iterator[Event]:
        """Score every task on the arm's model after `step` steps (at step 0 the init run's answers where
        _init_answers has them): one AccuracyPoint per task."""
        def known(task: Task) -> tuple[bool, ...] | None:
            return self._init_answers(arm.spec, task.kind) if step == 0 else None

        def book(task: Task, answers: Answers, from_init: bool) -> AccuracyPoint:
            correct = answers if isinstance(answers, tuple) else answers.correct
            arm.record_accuracy(task.kind, step, correct, 0.0 if isinstance(answers, tuple) else answers.seconds)
            hits, n = sum(correct), len(correct)
            lo, hi = wilson_interval(hits, n)
            note = f"from init run {self.origin.name}" if from_init else ""
            return AccuracyPoint(arm.name, step, task.kind, hits / n, n, (lo, hi), note)

        yield from self.ledger.score(arm.model, known, book)

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
            gaps = {target: gaps_closed(acc, "qlora4", target) for target in ("qlora8", "lora16")}
            self.report["accuracy_gap_closed"][kind] = gaps["qlora8"]
            self.report["accuracy_gap_closed_full"][kind] = gaps["lora16"]
            for name, history in histories.items():
                step, best = max(history, key=lambda point: (sum(point[1]), -point[0]))
                entry = {"evals": [[s, sum(c) / len(c), *wilson_interval(sum(c), len(c))] for s, c in history],
                         "step0": accuracy_record(history[0][1], step=0, items=True) if history[0][0] == 0 else None,
                         "final": accuracy_record(history[-1][1], step=history[-1][0], items=True),
                         "best": accuracy_record(best, step=step),
                         "gap_closed": gaps["qlora8"][name], "gap_closed_full": gaps["lora16"][name]}
                if name != "qlora4" and "qlora4" in final and len(final["qlora4"]) == len(final[name]):
                    entry["vs_qlora4"], test = versus(final[name], final["qlora4"])
                    entry["vs_qlora4"]["summary"] = test.summary(name, "qlora4")
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
