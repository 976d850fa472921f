"""The init flow as one event stream: load -> data -> quantize -> calibrate + initialize (block by block) ->
evaluate (perplexity, downstream accuracy) and save adapters -> 8-bit and full-precision baselines -> report.

A method that quantizes the base again (LoftQ: loftq_svd, loftq_calibrated, kind "requant") gets its own base layers
in the same pass over the blocks; its self-check, perplexity and accuracy are measured with them swapped in, and its
adapter folder holds that base too (engine/requantized.py: base_weights.safetensors), so the adapter is never
shipped without the matrix it corrects.

`run_init(cfg)` yields events; the CLI, the UI and the tests all consume this one stream. Everything
computed is written to the run folder as it happens (events.jsonl, report.json, adapters/<method>/).
"""
from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from quailora_app.config import InitConfig, quant_word
from quailora_app.engine.adapters import Factors, attach_lora, loftq_factors, read_factors, save_adapter, write_factors
from quailora_app.engine.calibration.calibrate import decoder_layers
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import run_model_method, target_paths
from quailora_app.engine.evaluation.accuracy import TaskScore
from quailora_app.engine.evaluation.evaluate import PROBE_TOKENS, check_adapter_applied, gap_closed, perplexity
from quailora_app.engine.evaluation.perplexity_cache import (
    four_bit_variant,
    full_variant,
    int8_variant,
    perplexity_key,
    read_cached,
    write_cached,
)
from quailora_app.engine.evaluation.selfcheck import check_window_count, self_check
from quailora_app.engine.methods.registry import MODEL, QLORA, REQUANT, get_method, requant_names
from quailora_app.engine.parallel import Processes
from quailora_app.engine.preflight import preflight_init
from quailora_app.engine.quantization.bnb import int8_dtype, load_8bit
from quailora_app.engine.quiet import quiet_libraries
from quailora_app.engine.requantized import BASE_FILE, replaced_modules, save_base, swapped_bases
from quailora_app.errors import Cancelled, one_line
from quailora_app.events import Event, Log, Metric, Progress, RunFinished, Stage
from quailora_app.flows.accuracy_ledger import AccuracyLedger, accuracy_record, gaps_closed, versus
from quailora_app.flows.prepare import prepare
from quailora_app.flows.recorder import Recorder, free_memory, opening_report
from quailora_app.runs import Report, RunFolder
from quailora_app.sources.data import MAX_TRAIN_SEQS
from quailora_app.sources.models import compute_dtype, device_label, load_full_precision, pick_device
from quailora_app.sources.tasks import Task
from quailora_app.units import format_bytes

quiet_libraries()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class InitRun:
    """One run of the init flow. Iterate `events()`; results land in `run_dir` as they are computed."""

    def __init__(self, cfg: InitConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None,
                 processes: Processes | None = None):
        self.cfg = cfg
        self.processes = processes  # rank 0 of several (flows/launch.py): the init's work is shared, the rest is ours
        folder = RunFolder.create("init", run_dir or cfg.out)
        self.run_dir = folder.path
        self.device = pick_device(cfg.model.device)
        self.report: Report = opening_report(
            "init", cfg, device_label(self.device), rank=cfg.lora.rank, alpha=cfg.lora.alpha, rslora=cfg.lora.rslora,
            scaling=cfg.lora.scaling, methods=list(cfg.methods), perplexity={}, gap_closed={}, gap_closed_full={},
            seconds={}, unavailable={}, peak_memory_bytes=0, layers=[])
        if processes is not None:
            self.report["processes"] = {"world_size": processes.world, "backend": processes.backend,
                                        "note": "seconds per method are summed over the processes; memory is rank 0's"}
        self.rec = Recorder(folder, self.report, should_stop, before_save=self._note_peak_memory)
        self.should_stop = self.rec.should_stop
        self.factors: dict[str, dict[str, Factors]] = {}
        self.bases: dict[str, dict[str, torch.nn.Module]] = {}  # requant method -> module path -> its base layer
        self.ranks: dict[str, dict[str, int]] = {}  # method -> module path -> rank, where ranks differ per layer
        self.target_paths: list[str] = []  # the modules LoRA targets (set once the model is loaded)
        self.ledger: AccuracyLedger | None = None  # the downstream tasks scored on every model variant (cfg.accuracy)
        self.scores: dict[str, dict[str, TaskScore]] = {}  # task kind -> model variant -> its score

    def _note_peak_memory(self) -> None:
        self.report["peak_memory_bytes"] = max(self.report["peak_memory_bytes"], peak_memory_bytes(self.device))

    def events(self) -> Iterator[Event]:
        return self.rec.run(self._run(), self.report["device"],
                            "try a smaller model, fewer calibration samples or a shorter seq-len")

    # -- the flow ---------------------------------------------------------------------------------------
    def _run(self) -> Iterator[Event]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prepared = yield from self.rec.relay(prepare(
            cfg.model, cfg.data, cfg.quant, self.device,
            lambda name, config: preflight_init(name, config, cfg, self.device), should_stop=self.should_stop,
            split_sizes={"max_train_seqs": check_window_count(MAX_TRAIN_SEQS, cfg.data.seq_len)}))  # the self-check's
        source, splits, model = prepared.source, prepared.splits, prepared.model
        self.report["model_note"] = source.note
        self.report["tokens"] = {"calibration": int(splits.calib.numel()), "eval": int(splits.eval.numel())}
        self.report["seconds"]["load"] = time.perf_counter() - t0
        self.target_paths = target_paths(model, cfg.lora)
        self.report["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in self.target_paths})
        self.ledger = AccuracyLedger(self.rec, cfg.accuracy, self.device, prepared.tokenizer)
        yield from self.ledger.build(cfg.data, splits, ("calib",), lambda task: (task, {"models": {}}))
        self.rec.save()
        self.rec.check_stop("quantization")

        yield from self._calibrate_and_initialize(model, prepared.checkpoint, splits.calib, prepared.dtype)
        yield from self._whole_model_methods(model, prepared.checkpoint, splits.calib, prepared.dtype)
        yield from self._self_check(model, prepared.checkpoint, splits, prepared.dtype)
        yield from self._evaluate_methods(model, source, splits.eval)
        del model, prepared
        free_memory()
        if cfg.baselines:
            yield from self._baselines(source, splits.eval)
        self._gap_figures()
        self._accuracy_figures()
        self.report["status"] = "finished"
        self.report["seconds"]["total"] = time.perf_counter() - t0
        self.rec.save()
        yield self.rec.emit(RunFinished(str(self.run_dir), self.report))

    def _calibrate_and_initialize(self, model, checkpoint, calib_ids, dtype) -> Iterator[Event]:
        cfg = self.cfg
        result = InitResult(factors=self.factors, layers=self.report["layers"], seconds=self.report["seconds"])
        n_blocks = len(decoder_layers(model)[1])
        requant = [m for m in cfg.methods if m in requant_names()]
        split = self.processes is not None and self.processes.world > 1
        for name in requant if split else ():  # LoftQ's bases are computed in one process
            reason = (f"{name} quantizes the base again, which an init run spread over processes does not do: run it "
                      "in one process, or measure it with `python -m quailora_app bits --methods {name}`")
            self.report["unavailable"][name] = reason
            yield self.rec.emit(Log(reason, "warning"))
        yield self.rec.emit(Stage("calibrate", f"{len(calib_ids)} x {calib_ids.shape[1]} tokens through {n_blocks} "
                                               "full-precision blocks"))
        calib_dtype = torch.float32 if self.device.type == "cpu" else dtype
        try:
            for event in initialize(model, checkpoint, calib_ids, cfg.lora, cfg.methods, result,
                                    device=self.device, calib_dtype=calib_dtype, damping=cfg.damping,
                                    als_rounds=cfg.als_rounds, should_stop=self.should_stop, solver=cfg.solver,
                                    processes=self.processes, requant=bool(requant) and not split,
                                    options={"loftq_iter": cfg.loftq_iter}):
                if isinstance(event, Progress):
                    self.rec.save()
                yield self.rec.emit(event)
        except Cancelled:
            self._save_partial_adapters(model, n_blocks)
            raise
        finally:
            self.bases = {m: layers for m, layers in result.bases.items() if layers}
        for name in requant if not split else ():
            self.report.setdefault("requantized", {})[name] = {
                "loftq_iter": cfg.loftq_iter, "layers": len(self.bases.get(name, {})),
                "note": f"the base is quantized again: the adapter folder holds it ({BASE_FILE})"}

    def _whole_model_methods(self, model, checkpoint, calib_ids, dtype) -> Iterator[Event]:
        """The registry's whole-model methods (kind "model"), each after the per-layer pass, which gives them
        closed_form's factors as a starting point when it ran."""
        cfg = self.cfg
        for method in [get_method(name) for name in cfg.methods if get_method(name).kind == MODEL]:
            self.rec.check_stop(f"initialization ({method.name})")
            yield self.rec.emit(Stage("initialize", f"{method.name}: {method.help}"))
            built = run_model_method(method.name, model, checkpoint, calib_ids, cfg.lora, self.device,
                                     torch.float32 if self.device.type == "cpu" else dtype, damping=cfg.damping,
                                     als_rounds=cfg.als_rounds, solver=cfg.solver, should_stop=self.should_stop,
                                     options=asdict(cfg), start=self.factors.get("closed_form"))
            self.factors[method.name] = built.factors
            if built.ranks:
                self.ranks[method.name] = built.ranks
                self.report.setdefault("ranks", {})[method.name] = built.ranks
            if built.details:
                self.report.setdefault("method_details", {})[method.name] = built.details
            for row in self.report["layers"]:
                if row["name"] in built.layers:
                    row["weight_error"][method.name], row["calibrated_error"][method.name] = built.layers[row["name"]]
            self.report["seconds"][method.name] = built.seconds
            self.rec.save()
            yield self.rec.emit(Log(f"{method.name}: initialized in {built.seconds:.1f} s"))

    def _self_check(self, model, checkpoint, splits, dtype) -> Iterator[Event]:
        """Every method's factors measured through each layer's own product on held-out windows (the first
        training windows: documents the fit never saw); a layer a per-layer method makes worse is reset to B = 0
        (engine/evaluation/selfcheck.py) before anything is evaluated or saved."""
        corrections = {m: f for m, f in self.factors.items() if m != QLORA and f}
        if not corrections:
            return
        windows = splits.train[:check_window_count(len(splits.train), splits.seq_len)]
        yield self.rec.emit(Stage("initialize", f"self-check: {', '.join(corrections)} through each layer's own "
                                                f"product on {windows.numel()} held-out tokens"))
        start = time.perf_counter()
        scalings = {path: self.cfg.lora.scaling for path in self.target_paths}
        check_dtype = torch.float32 if self.device.type == "cpu" else dtype
        shared = {m: f for m, f in corrections.items() if m not in self.bases}
        checks = self_check(model, checkpoint, windows, shared, scalings, device=self.device,
                            dtype=check_dtype) if shared else {}  # short: not stopped halfway
        for method in [m for m in corrections if m in self.bases]:  # each on its own base layers (Q_T)
            with replaced_modules(model, self.bases[method]):
                checks.update(self_check(model, checkpoint, windows, {method: corrections[method]}, scalings,
                                         device=self.device, dtype=check_dtype))
        self.report["seconds"]["self_check"] = time.perf_counter() - start
        self.report["self_check"] = {m: c.record() for m, c in checks.items()}
        self.report["layers_reset"] = {m: list(c.reset) for m, c in checks.items()}
        self.rec.save()
        for check in checks.values():
            yield self.rec.emit(Log(check.summary(), "warning" if check.reset else "info"))

    def _save_partial_adapters(self, model, n_blocks: int) -> None:
        """After a stop during initialization: each method's adapter with the blocks already done (the other
        layers keep peft's default, B = 0, i.e. plain QLoRA), so the work done is not lost. Not evaluated."""
        done = {m: f for m, f in self.factors.items() if f and m not in self.bases}  # a LoftQ base is not saved here
        if not done:
            return
        peft_model = attach_lora(model, self.cfg.lora, self.target_paths)
        default = read_factors(peft_model)
        for method, factors in done.items():
            write_factors(peft_model, {**default, **factors})
            save_adapter(peft_model, self.run_dir / "adapters" / method,
                         {**self._adapter_record(method), "partial": "stopped: only the blocks done are initialized"})
        peft_model.unload()
        blocks = len({row["block"] for row in self.report["layers"]})
        self.report["partial_adapters"] = {"methods": sorted(done), "blocks_done": blocks, "blocks": n_blocks,
                                           "note": "stopped during initialization: layers of the blocks not done "
                                                   "keep B = 0 (plain QLoRA); not evaluated"}
        self.rec.save()

    def _adapter_record(self, method: str) -> dict:
        """What adapters/<method>/quailora.json and its model card say of the initialization."""
        cfg, report = self.cfg, self.report
        errors = [row["calibrated_error"][method] for row in report["layers"] if method in row["calibrated_error"]]
        ppl = report["perplexity"]
        return {"method": method, "model": cfg.model.model, "data": cfg.data.dataset, "rank": cfg.lora.rank,
                "lora_alpha": cfg.lora.alpha, "use_rslora": cfg.lora.rslora,
                "quantization": (f"{cfg.quant.quant}, double quant {cfg.quant.double_quant}, blocks of "
                                 f"{cfg.quant.block_size}") if cfg.quant.quantizer == "bitsandbytes" else
                                f"hqq {cfg.quant.bits}-bit, groups of {cfg.quant.block_size}",
                "calibration": f"{cfg.data.calib_samples} x {cfg.data.seq_len} tokens",
                "calibrated_error_median": statistics.median(errors) if errors else None,
                "held_out_perplexity": ppl.get(method), "held_out_perplexity_qlora": ppl.get(QLORA),
                "eval_tokens": report.get("tokens", {}).get("eval"), "run": str(self.run_dir),
                **({"base_weights": BASE_FILE, "loftq_iter": cfg.loftq_iter} if get_method(method).kind == REQUANT
                   else {})}

    def _evaluate_methods(self, model, source, eval_ids) -> Iterator[Event]:
        """Each method's held-out perplexity on the one 4-bit base, its factors swapped into one peft model, and
        its adapter saved. qlora's (B = 0: the plain 4-bit base) comes from the perplexity cache when measured
        before with the same weights, tokens and numerics (engine/evaluation/perplexity_cache.py)."""
        cfg, seconds = self.cfg, self.report["seconds"]
        yield self.rec.emit(Stage("evaluate", f"held-out perplexity on {eval_ids.numel()} tokens, "
                                              "adapters saved per method"))
        start = time.perf_counter()
        peft_model = attach_lora(model, cfg.lora, self.target_paths)
        self.factors["qlora"] = read_factors(peft_model)  # peft's default: A random, B = 0
        seconds["attach"] = time.perf_counter() - start
        if "loftq" in cfg.methods:
            start = time.perf_counter()
            try:
                self.factors["loftq"] = loftq_factors(peft_model, source.folder)
                seconds["loftq"] = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - peft's anchor is optional; say why it did not run
                reason = f"peft's replace_lora_weights_loftq did not run here: {one_line(exc, 160)}"
                self.report["unavailable"]["loftq"] = reason
                yield self.rec.emit(Log(reason, "warning"))
        base_variant = four_bit_variant(cfg.quant, compute_dtype(cfg.model.compute_dtype, self.device))
        base_key = perplexity_key(base_variant, source.folder, eval_ids, cfg.eval_batch, self.device)
        methods = [m for m in cfg.methods if m in self.factors]
        probe = eval_ids[:1, :PROBE_TOKENS]
        with torch.no_grad():
            plain_logits = peft_model(input_ids=probe.to(self.device)).logits  # B = 0: the uncorrected base
        for i, method in enumerate(methods):
            self.rec.check_stop("evaluation")
            ranked = attach_lora(peft_model.unload(), cfg.lora, self.target_paths, self.ranks[method]) \
                if method in self.ranks else None  # ranks per layer (peft's rank_pattern): an adapter of its own
            evaluated = ranked or peft_model  # the one model this method's perplexity, accuracy and adapter come from
            with swapped_bases(evaluated, self.bases.get(method, {})):  # a LoftQ method: on its own base layers
                yield from self._evaluate_one(evaluated, method, probe, plain_logits, base_key, base_variant, source,
                                              eval_ids)
            if ranked is not None:  # back to the uniform-rank adapter, after everything measured on this one
                peft_model = attach_lora(ranked.unload(), cfg.lora, self.target_paths)
            yield self.rec.emit(Progress("evaluate", i + 1, len(methods), method))
        peft_model.unload()

    def _evaluate_one(self, evaluated, method: str, probe, plain_logits, base_key, base_variant, source,
                      eval_ids) -> Iterator[Event]:
        """One method's factors written, its perplexity and accuracy measured and its adapter saved (with its base,
        when the method quantized the base again)."""
        cfg, seconds = self.cfg, self.report["seconds"]
        write_factors(evaluated, self.factors[method])
        check_adapter_applied(evaluated, probe, plain_logits, method, self.factors[method])
        start = time.perf_counter()
        cached = read_cached(base_key) if method == QLORA else None
        if cached is not None:
            ppl = cached.perplexity
            self.report.setdefault("perplexity_cached", {})[method] = cached.record()
        else:
            ppl = perplexity(evaluated, eval_ids, cfg.eval_batch)
            if method == QLORA:
                write_cached(base_key, ppl, time.perf_counter() - start)
        seconds[f"eval_{method}"] = time.perf_counter() - start
        self.report["perplexity"][method] = ppl
        start = time.perf_counter()
        folder = save_adapter(evaluated, self.run_dir / "adapters" / method, self._adapter_record(method))
        saved = None
        if method in self.bases:  # the matrix its factors correct goes with them
            saved = save_base(evaluated, folder, compute_dtype(cfg.model.compute_dtype, self.device))
        seconds[f"save_{method}"] = time.perf_counter() - start
        self.rec.save()
        if saved is not None:
            yield self.rec.emit(Log(f"{method}: its base is quantized again, so {folder} also holds it ({saved.name}, "
                                    f"{format_bytes(saved.stat().st_size)}); load the pair with plain transformers "
                                    "and peft as its README.md says"))
        word = quant_word(cfg.quant)
        yield self.rec.emit(Metric(method, ppl, "perplexity",
                                   f"{word} + " + method + (" (cached)" if cached is not None else "")))
        variant = base_variant if method == QLORA else None  # only the plain quantized base is cached
        yield from self._score(evaluated, method, f"{word} + " + method, variant, source.folder)

    def _baselines(self, source, eval_ids) -> Iterator[Event]:
        """8-bit and full-precision perplexity: from the perplexity cache when measured before with the same
        weights, tokens and numerics (no model loaded then), else loaded, measured and stored."""
        for name, variant, loader in (
                ("int8", int8_variant(int8_dtype(self.device)), lambda: load_8bit(source, self.device)),
                ("full", full_variant(), lambda: load_full_precision(source, self.device))):
            self.rec.check_stop("baselines")
            what = "8-bit" if name == "int8" else "full-precision"
            note = "8-bit LLM.int8" if name == "int8" else "full precision"
            start = time.perf_counter()
            key = perplexity_key(variant, source.folder, eval_ids, self.cfg.eval_batch, self.device)
            cached = read_cached(key)
            scores = self.ledger.cached_scores(variant, source.folder)
            model = None
            if cached is None or None in scores.values():  # something to measure: load the model once for it
                scored = " and downstream accuracy" if None in scores.values() else ""
                told = f" (perplexity measured before, {cached.measured_at})" if cached is not None else ""
                yield self.rec.emit(Stage("baseline", f"perplexity{scored} of the {what} model{told}"))
                model = loader()
            else:
                yield self.rec.emit(Stage("baseline", f"perplexity{' and accuracy' if scores else ''} of the {what} "
                                                      f"model: measured before ({cached.measured_at}), read from "
                                                      "the cache"))
            if cached is not None:
                ppl = cached.perplexity
                self.report.setdefault("perplexity_cached", {})[name] = cached.record()
                note += " (cached)"
            else:
                ppl = perplexity(model, eval_ids, self.cfg.eval_batch)
                write_cached(key, ppl, time.perf_counter() - start)
            self.report["seconds"][f"eval_{name}"] = time.perf_counter() - start
            self.report["perplexity"][name] = ppl
            self.rec.save()
            yield self.rec.emit(Metric(name, ppl, "perplexity", note))
            yield from self._score(model, name, what, variant, source.folder, scores)
            del model
            free_memory()

    # -- downstream accuracy ----------------------------------------------------------------------------
    def _score(self, model, name: str, what: str, variant: dict | None, folder,
               known: dict[str, TaskScore | None] | None = None) -> Iterator[Event]:
        """Score every task on `model` (variant `name`), or read the score from the accuracy cache when `variant`
        (a model no method changes: qlora's base, 8-bit, full precision) was scored before (`known`: read
        already); a fresh score of such a variant is stored. One Metric(group="accuracy") per task."""
        ledger = self.ledger

        def look_up(task: Task) -> TaskScore | None:
            if known is not None:
                return known.get(task.kind)
            return ledger.cached(task, variant, folder) if variant is not None else None

        def book(task: Task, score: TaskScore, cached: bool) -> Metric:  # here always a TaskScore
            if variant is not None and not cached:
                ledger.store(task, variant, folder, score)
            self.scores.setdefault(task.kind, {})[name] = score
            self.report["accuracy"][task.kind]["models"][name] = accuracy_record(
                score.correct, acc_raw=score.acc_raw, seconds=score.seconds, cached=cached, items=True)
            lo, hi = score.interval()
            return Metric(name, score.accuracy, "accuracy",
                          f"{what}, {task.kind}: {100 * score.accuracy:.1f}% +- {50 * (hi - lo):.1f} (n={score.n:,})"
                          + (" (cached)" if cached else ""), task=task.kind, n=score.n, interval=(lo, hi))

        yield from ledger.score(model, look_up, book)

    def _accuracy_figures(self) -> None:
        """Per task: accuracy gap closed = (acc_method - acc_qlora) / (acc_int8 - acc_qlora) (and against full
        precision), and each variant against qlora on the same items (McNemar's exact test), in plain words."""
        for kind, scores in self.scores.items():
            entry = self.report["accuracy"].get(kind)
            base = scores.get(QLORA)
            if entry is None or base is None:
                continue
            acc = {name: s.accuracy for name, s in scores.items()}
            for ref, field in (("int8", "accuracy_gap_closed"), ("full", "accuracy_gap_closed_full")):
                gaps = gaps_closed(acc, QLORA, ref)
                gaps = {m: gaps[m] for m in self.cfg.methods if m != QLORA and gaps.get(m) is not None}
                entry["gap_closed" if ref == "int8" else "gap_closed_full"] = gaps
                self.report[field][kind] = gaps
            vs = {}
            notes = []
            for name, score in scores.items():
                if name == QLORA:
                    continue
                vs[name], test = versus(score, base)
                notes.append(test.summary(name, QLORA))
            entry["vs_qlora"] = vs
            if "int8" in vs and not vs["int8"]["significant"]:
                notes.append("8-bit and 4-bit QLoRA do not differ significantly on this task: its accuracy gap "
                             "closed is noise, not a measurement")
            full = scores.get("full")
            if full is not None and full.interval()[0] <= max(full.chance, full.majority):
                notes.append(f"the full-precision model is not clearly above chance ({100 * full.chance:.0f}%) or the "
                             f"majority answer ({100 * full.majority:.0f}%) here: this task gives no signal")
            entry["notes"] = notes

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


def run_init(cfg: InitConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None,
             processes: Processes | None = None) -> Iterator[Event]:
    """The init flow's event stream (see InitRun)."""
    return InitRun(cfg, should_stop, run_dir, processes).events()
