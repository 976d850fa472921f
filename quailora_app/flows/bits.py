"""Across bits: the trade-off between memory and quality over bit widths, and what a calibrated low-rank correction
buys back at each, as one event stream like init and train.

load (prepare, no base) -> every base of cfg.bases quantized from the same weights (HQQ at 2-8 bits, bitsandbytes'
NF4 and LLM.int8) -> one calibration: H = X^T X of the full-precision inputs does not depend on the quantization,
so each method's correction of E_b = W - Q_b is computed for every base b on the same statistics
(initialize(also=...)) -> per base: held-out perplexity with no correction and with each method, and its memory
per linear weight -> the full-precision perplexity -> report.json of kind "bits" (the frontier's points).

LoftQ (loftq_svd, loftq_calibrated: kind "requant") changes the base itself: in the same shared pass each base's
layers are quantized again T times (initialize(requant=True)); its point swaps the LoRA layers' base layers for those
new ones, writes its factors, measures, and puts the base's own layers back. Its memory per weight is the base's (the
same quantizer and settings). LLM.int8 layers cannot be quantized again that way: int8 gets no LoftQ point (said in
report["unavailable"]).

Memory per weight counts the codes, every scale, zero and nested statistic (quantization/load.bits_per_weight),
and, for a corrected point, the adapter: r (m + n) 16-bit parameters per adapted m x n layer, spread over the
quantized weights.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from quailora_app.config import BitsConfig, base_bits, base_quant
from quailora_app.engine.adapters import attach_lora, write_factors
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import run_model_method, target_paths
from quailora_app.engine.evaluation.evaluate import PROBE_TOKENS, check_adapter_applied, perplexity
from quailora_app.engine.evaluation.perplexity_cache import full_variant, perplexity_key, read_cached, write_cached
from quailora_app.engine.methods.registry import MODEL, QLORA, REQUANT, get_method
from quailora_app.engine.preflight import check_rank_fits, shapes_or_none
from quailora_app.engine.quantization.bnb import load_8bit
from quailora_app.engine.quantization.layers import calibration_dtype, quantized_modules
from quailora_app.engine.quantization.load import bits_per_weight, load_quantized
from quailora_app.engine.requantized import swapped_bases
from quailora_app.errors import Cancelled
from quailora_app.events import Event, Metric, Progress, RunFinished, Stage
from quailora_app.flows.prepare import prepare
from quailora_app.flows.recorder import Recorder, free_memory, opening_report
from quailora_app.runs import Report, RunFolder
from quailora_app.sources.models import check_context, device_label, load_full_precision, pick_device

ADAPTER_BITS = 16  # the adapter's parameters as deployed (bfloat16)


def base_label(base: str, group_size: int) -> str:
    """'HQQ 3-bit (groups of 64)', 'NF4 4-bit (bitsandbytes)', 'LLM.int8 8-bit (bitsandbytes)'."""
    if base == "int8":
        return "LLM.int8 8-bit (bitsandbytes)"
    if base == "nf4":
        return "NF4 4-bit (bitsandbytes)"
    return f"HQQ {base_bits(base)}-bit (groups of {group_size})"


def point_name(base: str, method: str) -> str:
    """The name of one point of the frontier (a Metric's name): 'hqq3/closed_form'."""
    return f"{base}/{method}"


class BitsRun:
    """One across-bits run. Iterate `events()`; the report lands in `run_dir` as each base is measured."""

    def __init__(self, cfg: BitsConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None):
        self.cfg = cfg
        folder = RunFolder.create("bits", run_dir or cfg.out)
        self.run_dir = folder.path
        self.device = pick_device(cfg.model.device)
        self.report: Report = opening_report(
            "bits", cfg, device_label(self.device), rank=cfg.lora.rank, alpha=cfg.lora.alpha,
            bases=list(cfg.bases), methods=[QLORA, *cfg.methods], points={}, full=None, seconds={})
        self.rec = Recorder(folder, self.report, should_stop)
        self.should_stop = self.rec.should_stop

    def events(self) -> Iterator[Event]:
        return self.rec.run(self._run(), self.report["device"],
                            "compare fewer bases, or use fewer calibration samples or held-out tokens")

    def _preflight(self, name: str, config) -> str:
        check_context(config, self.cfg.data.seq_len, name)
        shapes = shapes_or_none(config)
        if shapes is not None:
            check_rank_fits(shapes, self.cfg.lora)
        return f"across bits: {len(self.cfg.bases)} bases of {name}, one calibration shared by all of them"

    def _run(self) -> Iterator[Event]:
        cfg, seconds = self.cfg, self.report["seconds"]
        t0 = time.perf_counter()
        prepared = yield from self.rec.relay(prepare(cfg.model, cfg.data, base_quant("nf4"), self.device,
                                                     self._preflight, should_stop=self.should_stop, load_base=False))
        source, splits = prepared.source, prepared.splits
        self.report["tokens"] = {"calibration": int(splits.calib.numel()), "eval": int(splits.eval.numel())}
        models = {}
        for base in cfg.bases:
            self.rec.check_stop("quantization")
            yield self.rec.emit(Stage("quantize", f"quantizing to {base_label(base, cfg.group_size)}"))
            start = time.perf_counter()
            quant = base_quant(base, cfg.group_size)
            models[base] = load_8bit(source, self.device) if quant is None else \
                load_quantized(source, quant, self.device, prepared.dtype)
            seconds[f"quantize_{base}"] = time.perf_counter() - start
        seconds["load"] = time.perf_counter() - t0

        first, *rest = cfg.bases
        # distill starts from the closed form: computed in the shared pass when it is asked for
        per_layer = [m for m in cfg.methods if get_method(m).per_layer or get_method(m).kind == REQUANT]
        if "distill" in cfg.methods and "closed_form" not in per_layer:
            per_layer.append("closed_form")
        results = {base: InitResult() for base in cfg.bases}
        paths = target_paths(models[first], cfg.lora)
        yield self.rec.emit(Stage("calibrate", f"{splits.calib.shape[0]} x {splits.calib.shape[1]} tokens, one "
                                               f"calibration for {len(cfg.bases)} bases; {', '.join(cfg.methods)} "
                                               "on each"))
        start = time.perf_counter()
        for event in initialize(models[first], prepared.checkpoint, splits.calib, cfg.lora, per_layer,
                                results[first], device=self.device,
                                calib_dtype=calibration_dtype(models[first], self.device), damping=cfg.damping,
                                als_rounds=cfg.als_rounds, should_stop=self.should_stop,
                                also={base: (models[base], results[base]) for base in rest},
                                requant=True, options={"loftq_iter": cfg.loftq_iter}):
            if isinstance(event, Progress):
                yield self.rec.emit(event)
        seconds["calibrate_and_correct"] = time.perf_counter() - start
        whole = [m for m in cfg.methods if get_method(m).kind == MODEL]
        for base in cfg.bases:
            for name in whole:  # each on its own base: these follow the quantized model's own activations
                self.rec.check_stop(f"initialization ({name})")
                yield self.rec.emit(Stage("initialize", f"{base_label(base, cfg.group_size)}: {name}"))
                built = run_model_method(name, models[base], prepared.checkpoint, splits.calib, cfg.lora, self.device,
                                         calibration_dtype(models[base], self.device), damping=cfg.damping,
                                         als_rounds=cfg.als_rounds, should_stop=self.should_stop,
                                         options=asdict(cfg), start=results[base].factors.get("closed_form"))
                results[base].factors[name] = built.factors
                results[base].seconds[name] = built.seconds
            seconds[f"correct_{base}"] = {m: results[base].seconds.get(m, 0.0) for m in cfg.methods}

        for i, base in enumerate(cfg.bases):
            self.rec.check_stop("evaluation")
            result = results.pop(base)
            yield from self._measure_base(base, models.pop(base), result.factors, paths, splits.eval, result.bases)
            free_memory()
            yield self.rec.emit(Progress("evaluate", i + 1, len(cfg.bases), base))
        yield from self._full_precision(source, splits.eval)
        self.report["reading"] = frontier_reading(self.report)
        self.report["status"] = "finished"
        seconds["total"] = time.perf_counter() - t0
        self.rec.save()
        yield self.rec.emit(RunFinished(str(self.run_dir), self.report))

    def _measure_base(self, base: str, model, factors: dict, paths: list[str], eval_ids: torch.Tensor,
                      bases: dict | None = None) -> Iterator[Event]:
        """One base's memory per weight and its held-out perplexity with no correction and with each method's
        factors, swapped into one peft model; a requant method's (LoftQ) on its own base layers (`bases`: method ->
        module path -> layer), swapped in for its point and swapped back after."""
        cfg = self.cfg
        label = base_label(base, cfg.group_size)
        yield self.rec.emit(Stage("evaluate", f"{label}: held-out perplexity on {eval_ids.numel()} tokens"))
        layers = quantized_modules(model)
        quantized_weights = sum(layer_shape(m)[0] * layer_shape(m)[1] for m in layers.values())
        adapter = sum(cfg.lora.rank * sum(layer_shape(layers[p])) for p in paths if p in layers)
        quant_bits = bits_per_weight(model)
        adapter_bits = ADAPTER_BITS * adapter / quantized_weights
        peft_model = attach_lora(model, cfg.lora, paths)
        probe = eval_ids[:1, :PROBE_TOKENS].to(self.device)
        with torch.no_grad():
            plain_logits = peft_model(input_ids=probe).logits
        bases = bases or {}
        for method in (QLORA, *cfg.methods):
            self.rec.check_stop("evaluation")
            if get_method(method).kind == REQUANT and not bases.get(method):
                self.report.setdefault("unavailable", {})[point_name(base, method)] = (
                    f"{method} quantizes the base again with its own quantizer: bitsandbytes 4-bit or HQQ, not "
                    f"{label}")
                continue
            start = time.perf_counter()
            with swapped_bases(peft_model, bases.get(method, {})):
                if method != QLORA:
                    write_factors(peft_model, factors[method])
                    check_adapter_applied(peft_model, probe, plain_logits, point_name(base, method), factors[method])
                ppl = perplexity(peft_model, eval_ids, cfg.eval_batch)
            corrected = method != QLORA
            point = {"base": base, "method": method, "label": label, "bits": base_bits(base),
                     "quantizer": "hqq" if base.startswith("hqq") else "bitsandbytes",
                     "perplexity": ppl, "bits_per_weight": quant_bits + (adapter_bits if corrected else 0.0),
                     "quantized_bits_per_weight": quant_bits, "adapter_bits_per_weight": adapter_bits if corrected
                     else 0.0, "eval_seconds": time.perf_counter() - start}
            if get_method(method).kind == REQUANT:
                point["loftq_iter"] = cfg.loftq_iter  # T: its base is quantized again T - 1 times
            self.report["points"][point_name(base, method)] = point
            self.rec.save()
            yield self.rec.emit(Metric(point_name(base, method), ppl, "perplexity",
                                       f"{label} + {'no correction' if method == QLORA else get_method(method).short}"))
        peft_model.unload()

    def _full_precision(self, source, eval_ids: torch.Tensor) -> Iterator[Event]:
        """The reference every point is measured against: from the perplexity cache when measured before."""
        key = perplexity_key(full_variant(), source.folder, eval_ids, self.cfg.eval_batch, self.device)
        cached = read_cached(key)
        if cached is not None:
            ppl = cached.perplexity
        else:
            yield self.rec.emit(Stage("baseline", "perplexity of the full-precision model"))
            start = time.perf_counter()
            model = load_full_precision(source, self.device)
            ppl = perplexity(model, eval_ids, self.cfg.eval_batch)
            write_cached(key, ppl, time.perf_counter() - start)
            del model
        self.report["full"] = ppl
        self.rec.save()
        yield self.rec.emit(Metric("full", ppl, "perplexity", "full precision" + (" (cached)" if cached else "")))


def layer_shape(layer) -> tuple[int, int]:
    """(out, in) of a quantized linear layer of either quantizer."""
    if hasattr(layer, "meta") and "shape" in getattr(layer, "meta", {}):
        return tuple(layer.meta["shape"])
    return layer.out_features, layer.in_features


def frontier_reading(report: Report) -> str:
    """One line: the best corrected point below the bits of plain 4-bit (NF4 when measured, else the plain base of
    most bits), against that plain base and full precision."""
    points = list(report.get("points", {}).values())
    corrected = [p for p in points if p["method"] != QLORA]
    plain = {p["base"]: p for p in points if p["method"] == QLORA}
    if not corrected or not plain:
        return ""
    anchor = plain.get("nf4") or plain.get("hqq4") or max(plain.values(), key=lambda p: p["bits"])
    fewer = [p for p in corrected if p["bits"] < anchor["bits"]] or \
        [p for p in corrected if p["bits"] == min(q["bits"] for q in corrected)]
    best = min(fewer, key=lambda p: p["perplexity"])
    word = "below" if best["perplexity"] < anchor["perplexity"] else "above"
    full = report.get("full")
    tail = f"; full precision: {full:.1f}" if full else ""
    return (f"At {best['bits']} bits plus a rank-{report.get('rank')} {get_method(best['method']).short} correction "
            f"the model is at perplexity {best['perplexity']:.1f} ({best['bits_per_weight']:.2f} bits per weight), "
            f"{word} plain {anchor['label'].split(' (')[0]}'s {anchor['perplexity']:.1f} "
            f"({anchor['bits_per_weight']:.2f} bits per weight){tail}.")


def run_bits(cfg: BitsConfig, should_stop: Callable[[], bool] | None = None,
             run_dir: Path | None = None) -> Iterator[Event]:
    """The across-bits flow as events (see the module)."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped before the model was loaded")
    return BitsRun(cfg, should_stop, run_dir).events()
