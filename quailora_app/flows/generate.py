"""Generation side by side, as one event stream like init and train: what each model variant says, and where it
stops saying what the full-precision model says.

From a finished run (`--from-run`: an init run's adapters/<method>/, or a train run's 4-bit arms' adapters and those
of the init run it started from): its model, data cut, quantization and LoRA shape. Variants, in order: full
precision, 8-bit LLM.int8, plain 4-bit (no correction, B = 0), then 4-bit with each adapter: one 4-bit base holding
every adapter, the plain and corrected variants decoded as the rows of one batch (peft's mixed-adapter inference,
`adapter_names=` per row; for the decode each layer's adapters stacked, engine.routed_adapters, the same rows), so
the base's layers are paid once per token for all of them.

load (prepare, no base) -> the prompt (given, or the start of a held-out document) -> per model (full precision
then 8-bit in the flow's thread; the 4-bit base with its adapters beside them in a second lane on a CPU, in turn
elsewhere): the continuation of the prompt, streamed token by token (GeneratedToken events); teacher forcing along
full precision's continuation (engine/evaluation/agreement.py): per position, top-1 agreement with full precision
and KL(p_full || p_variant), a Metric of each; the same along the first `documents` held-out documents' own text
(after their first tokens, the next `new_tokens` tokens of held-out text: real text, not a model's) -> report.json
of kind "generate": continuations, per-position arrays, the top-10 next tokens of full precision, plain 4-bit and
the best corrected variant (lowest mean KL on the prompt) at each position, and over the documents the share of
positions each corrected variant gets right where plain 4-bit does not, and the reverse.

With `deploy`: what survives deployment of one adapter (engine/deploy.py), held-out perplexity of (a) the 4-bit
base with it, (b) merged into the full-precision weights (saved under deploy/, beside a copy of the adapter
folder), (c) merged then quantized again, (d) kept apart after a save and load with plain peft.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from quailora_app.config import DataConfig, GenerateConfig, LoraSettings, ModelConfig, QuantConfig, quant_word
from quailora_app.engine.adapters import (
    BASE_ROW,
    add_adapter_with_factors,
    attach_lora,
    load_factors,
    write_factors,
)
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.deploy import (
    DEPLOY_VARIANTS,
    LETTERS,
    WHY_REQUANTIZED_LOSES,
    adapter_apart,
    deploy_labels,
    dequantized_model,
    dtype_name,
    kept_shares,
    merge_dtype,
    merged_model,
    quantized_weights,
    requantized_model,
    save_merged,
)
from quailora_app.engine.evaluation.agreement import (
    Agreement,
    Reference,
    agreement,
    forced_logprobs,
    forced_logprobs_routed,
    stream_rows,
    top_tokens,
    versus_plain,
)
from quailora_app.engine.evaluation.evaluate import check_adapters_applied, perplexity
from quailora_app.engine.methods.registry import QLORA
from quailora_app.engine.preflight import available_bytes, shapes_or_none, side_by_side_bytes
from quailora_app.engine.quantization.bnb import load_8bit
from quailora_app.engine.quantization.dequantized_once import MAX_BYTES, dequantized_once
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.engine.quantization.reused import keep, reused_copy
from quailora_app.engine.routed_adapters import PROBE_TOKENS, routed
from quailora_app.errors import Cancelled, ConfigError, one_line
from quailora_app.events import Event, GeneratedToken, Log, Metric, RunFinished, Stage
from quailora_app.flows.generate_source import RunSource, read_run
from quailora_app.flows.lane import Lane
from quailora_app.flows.prepare import prepare
from quailora_app.flows.recorder import Recorder, free_memory
from quailora_app.plots.figures import color, label
from quailora_app.runs import Report, RunFolder
from quailora_app.settings import build
from quailora_app.sources.data import bos_id
from quailora_app.sources.models import (
    compute_dtype,
    context_length,
    device_label,
    load_full_precision,
    pick_device,
    resolve_model,
)

#: the reference every variant is compared with, and the uncorrected 4-bit base
FULL, INT8, PLAIN = "full", "int8", QLORA
#: next tokens listed at each position
TOP_K = 10
#: the adapters --deploy measures when none is named, first present wins
DEPLOY_DEFAULTS = ("closed_form", "quailora", "quailora4", "closed4")
#: what measuring work hands the flow's thread: applied there, it updates the report and yields the events
Handler = Callable[[], Iterator[Event]]


def variant_label(name: str, trained: frozenset[str] = frozenset(), base: str | None = None,
                  arm_labels: Mapping[str, str] | None = None) -> str:
    """The legend of a variant, as every figure names it, on the run's quantized base (`base`: config.quant_word,
    "HQQ 3-bit"; a fine-tuning arm by the label its train run gave it, `arm_labels`), and a fine-tuning arm says so."""
    if name in trained:
        return (arm_labels or {}).get(name, label(name, base)) + ", fine-tuned"
    return label(name, base)


class GenerateRun:
    """One generate run. Iterate `events()`; the report lands in `run_dir` as each variant is measured."""

    def __init__(self, cfg: GenerateConfig, source: RunSource, should_stop: Callable[[], bool] | None = None,
                 run_dir: Path | None = None):
        self.cfg, self.source = cfg, source
        values = {**source.values, "device": cfg.device}
        self.model_cfg: ModelConfig = build(ModelConfig, values)
        self.data_cfg: DataConfig = build(DataConfig, values)
        self.quant: QuantConfig = build(QuantConfig, values)
        self.lora: LoraSettings = build(LoraSettings, values)
        self.deploy_name = self._deploy_adapter() if cfg.deploy else None
        folder = RunFolder.create("generate", run_dir or cfg.out)
        self.run_dir = folder.path
        self.device = pick_device(cfg.device)
        names = [FULL, INT8, PLAIN, *source.adapters]
        self.report: Report = {
            "kind": "generate", "status": "running", "model": self.model_cfg.model, "dataset": self.data_cfg.dataset,
            "device": device_label(self.device), "settings": asdict(cfg), "from_run": str(source.folder),
            "run_kind": source.kind, "new_tokens": cfg.new_tokens,
            "sampling": {"sample": cfg.sample, "temperature": cfg.temperature, "seed": cfg.seed} if cfg.sample
            else None,
            "variants": names, "labels": {n: variant_label(n, source.trained, quant_word(self.quant),
                                                        source.arm_labels()) for n in names},
            "colours": {n: color(n, i) for i, n in enumerate(names)}, "trained": sorted(source.trained),
            "skipped": dict(source.skipped), "continuations": {}, "agreement": {}, "seconds": {}}
        user_stop = should_stop or (lambda: False)
        # a stop reaches both lanes; a run that ends early stops its 4-bit lane
        self.rec = Recorder(folder, self.report, lambda: user_stop() or (self._lane is not None and
                                                                          self._lane.stopping()))
        self.should_stop = self.rec.should_stop
        self.tokenizer = None
        self.prompt: torch.Tensor | None = None  # 1 x P
        self.doc_prompts: torch.Tensor | None = None  # D x P'
        self.reference: torch.Tensor | None = None  # 1 x N: full precision's continuation
        self.doc_reference: torch.Tensor | None = None  # D x N': the documents' own next tokens
        self.ref_logprobs: torch.Tensor | None = None  # 1 x N x V
        self.reference_probs: Reference | None = None  # the same, ready to compare each variant with
        self.doc_reference_probs: Reference | None = None  # full precision along the documents
        self.prompt_logprobs: dict[str, torch.Tensor] = {}  # plain and corrected variants: 1 x N x V
        self.doc_agreement: dict[str, Agreement] = {}
        self._lane: Lane | None = None  # the 4-bit variants' work in its own thread (_start_lane)
        self._reference_known = threading.Event()  # full precision's continuation is in self.reference
        self._t0 = time.perf_counter()  # the run's start (_run): continuations record when they decoded
        self.dtype = torch.float32  # the compute dtype (_run: the prepared model's)

    def _deploy_adapter(self) -> str:
        chosen = self.cfg.deploy_adapter
        if chosen:
            if chosen not in self.source.adapters:
                raise ConfigError(f"--deploy-adapter {chosen}: not an adapter of run {self.source.name}; choose from "
                                  f"{', '.join(self.source.adapters)}")
            return chosen
        return next((n for n in DEPLOY_DEFAULTS if n in self.source.adapters), next(iter(self.source.adapters)))

    def events(self) -> Iterator[Event]:
        return self.rec.run(self._run(), self.report["device"],
                            "ask fewer new tokens or documents, or run on a machine with more memory")

    # -- the flow ---------------------------------------------------------------------------------------
    def _run(self) -> Iterator[Event]:
        cfg, seconds = self.cfg, self.report["seconds"]
        t0 = self._t0 = time.perf_counter()
        prepared = yield from self.rec.relay(prepare(
            self.model_cfg, self.data_cfg, self.quant, self.device,
            lambda name, _config: f"generation from {self.source.kind} run {self.source.name}: {name}, "
                                  f"{len(self.report['variants'])} variants, {cfg.new_tokens} new tokens each",
            should_stop=self.should_stop, load_base=False))
        self.tokenizer, source, splits = prepared.tokenizer, prepared.source, prepared.splits
        self.dtype = prepared.dtype
        self._prompts(prepared.config, source.name, splits.eval)
        seconds["load"] = time.perf_counter() - t0
        deploy = self.deploy_name is not None
        deploy_ids = splits.eval[:max(1, cfg.deploy_tokens // splits.seq_len)] if deploy else None
        if deploy:
            self.report["deploy"] = {"adapter": self.deploy_name, "label": self.report["labels"][self.deploy_name],
                                     "eval_tokens": int(deploy_ids.numel()), "order": list(DEPLOY_VARIANTS),
                                     "perplexity": {}, "reading": "",
                                     "explanation": WHY_REQUANTIZED_LOSES}
        self.rec.save()

        try:
            yield from self._full(source, deploy_ids,
                                  lambda: self._start_lane(source, prepared.config, prepared.dtype, deploy))
            yield from self._int8(source)
            yield from self._four_bit(source, prepared.dtype, deploy_ids)
        finally:
            if self._lane is not None:
                self._lane.close()  # a stopped or failed run: the lane stops, its model is dropped
                self._lane = None
        if deploy:
            yield from self._deploy_reloaded(source, prepared.dtype, deploy_ids)
        self._summaries()
        self.report["status"] = "finished"
        seconds["total"] = time.perf_counter() - t0
        self.rec.save()
        yield self.rec.emit(RunFinished(str(self.run_dir), self.report))

    def _prompts(self, config, model_name: str, eval_ids: torch.Tensor) -> None:
        """The prompt (given, tokenized as the run's windows are: BOS first where the tokenizer adds one; else the
        start of the first held-out window, the start of a held-out document) and the held-out documents' prompts,
        checked against the model's context."""
        cfg, tok = self.cfg, self.tokenizer
        width = min(cfg.prompt_tokens, eval_ids.shape[1])
        if cfg.prompt is not None:
            ids = list(tok(cfg.prompt, add_special_tokens=False)["input_ids"])
            bos = bos_id(tok)
            ids = ([bos] if bos is not None else []) + ids
            if not ids:
                raise ConfigError("the prompt gives no tokens: give some text to continue")
            self.prompt = torch.tensor([ids], dtype=torch.long)
            origin = "given"
        else:
            self.prompt = eval_ids[:1, :width].clone()
            origin = "the start of a held-out document"
        limit = context_length(config)
        longest = self.prompt.shape[1] + cfg.new_tokens
        if limit is not None and longest > limit:
            raise ConfigError(f"the prompt ({self.prompt.shape[1]} tokens) and {cfg.new_tokens} new tokens make "
                              f"{longest} tokens, beyond the context of model '{model_name}' ({limit} tokens): "
                              "shorten the prompt or ask fewer new tokens")
        self.report["prompt"] = {"text": tok.decode(self.prompt[0]), "tokens": int(self.prompt.shape[1]),
                                 "origin": origin}
        doc_width = min(cfg.prompt_tokens, eval_ids.shape[1] - 1)
        positions = min(cfg.new_tokens, eval_ids.shape[1] - doc_width)
        if cfg.documents and doc_width > 0:
            self.doc_prompts = eval_ids[:cfg.documents, :doc_width].clone()
            self.doc_reference = eval_ids[:cfg.documents, doc_width:doc_width + positions].clone()
        self.report["documents"] = {"n": len(self.doc_prompts), "prompt_tokens": doc_width, "new_tokens": positions,
                                    "along": "held-out text", "variants": {},
                                    "versus_plain": {}} if self.doc_prompts is not None else None

    def _apply(self, items: Iterable[Handler], drain: bool = True) -> Iterator[Event]:
        """Apply each handler of `items` in this thread (its events, the report) and, after each, those the 4-bit
        lane has ready (`drain`), so both lanes stream as they go."""
        for handle in items:
            yield from handle()
            if drain and self._lane is not None:
                for other in self._lane.ready():
                    yield from other()

    def _emit(self, event: Event) -> Iterator[Event]:
        yield self.rec.emit(event)

    def _full(self, source, deploy_ids: torch.Tensor | None, start_lane: Callable[[], Lane | None]) -> Iterator[Event]:
        """Full precision: the reference continuation and log-probabilities; with --deploy, its perplexity, then
        the adapter merged into it (b). `start_lane` runs once the model is loaded (the 4-bit lane)."""
        self.rec.check_stop("generation")
        yield self.rec.emit(Stage("load", f"loading {self.report['labels'][FULL]}"))
        start = time.perf_counter()
        model = load_full_precision(source, self.device)
        self.report["seconds"][f"load_{FULL}"] = time.perf_counter() - start
        self._lane = start_lane()
        yield from self._apply(self._measure([FULL], model))
        if deploy_ids is not None:
            yield from self._deploy_merged(source, model, deploy_ids)
        del model
        free_memory()

    def _int8(self, source) -> Iterator[Event]:
        """8-bit LLM.int8, or a note saying why it could not be loaded here."""
        self.rec.check_stop("generation")
        yield self.rec.emit(Stage("load", f"loading {self.report['labels'][INT8]}"))
        start = time.perf_counter()
        try:
            model, made = reused_copy(load_8bit, source, self.device)
        except Exception as exc:  # noqa: BLE001 - 8-bit needs bitsandbytes' kernels; say why it is missing
            why = f"8-bit LLM.int8 could not be loaded here: {one_line(exc, 160)}"
            self.report.setdefault("unavailable", {})[INT8] = why
            self.report["variants"].remove(INT8)
            yield self.rec.emit(Log(why, "warning"))
            return
        self.report["seconds"][f"load_{INT8}"] = time.perf_counter() - start
        self.report.setdefault("bases", {})[INT8] = made_word(made)
        yield from self._apply(self._measure([INT8], model))
        del model
        free_memory()

    # -- measuring: the work (any thread) yields handlers the flow's thread applies --------------------------
    def _measure(self, names: Sequence[str], model, routes: Sequence[str] | None = None) -> Iterator[Handler]:
        """Variants `names` of one loaded model, measured together: their continuations of the prompt decoded in
        lockstep, one batch row each and streamed (`routes`: peft's adapter_names, the adapter each row runs on a
        base holding several; None: the model as it is), then each variant teacher forced along full precision's
        continuation of the prompt (once it is known) and along the held-out documents' own text. Computes only;
        what it finds comes as handlers: the tokens of each step, the continuations, the agreement figures."""
        cfg = self.cfg
        together = f" each, decoded together ({len(names)} rows of one batch)" if len(names) > 1 else ""
        yield partial(self._emit, Stage("generate", f"{', '.join(self.report['labels'][n] for n in names)}: "
                                                    f"{cfg.new_tokens} new tokens{together}"))
        start = time.perf_counter()
        steps: list[list[int]] = []
        with routed(model, routes, self.prompt, self.dtype) if routes else nullcontext() as how:
            if how is not None:
                yield partial(self._routing_note, how.describe())
            for step in stream_rows(model, self.prompt.repeat(len(names), 1), cfg.new_tokens, sample=cfg.sample,
                                    temperature=cfg.temperature, seed=cfg.seed, **(how.forward if how else {})):
                steps.append(step)
                yield partial(self._tokens, names, list(steps))
                self.rec.check_stop("generation")
        yield partial(self._continuations, names, steps, start, time.perf_counter())
        while not self._reference_known.wait(0.05):  # a lane's variants are forced along full precision's words
            self.rec.check_stop("generation")
        start = time.perf_counter()
        forced = self._forced(model, routes)
        yield partial(self._agreements, names, forced, time.perf_counter() - start)

    def _routing_note(self, line: str) -> Iterator[Event]:
        self.report["four_bit_adapters"] = line
        return iter(())

    def _tokens(self, names: Sequence[str], steps: list[list[int]]) -> Iterator[Event]:
        tok = self.tokenizer
        for row, name in enumerate(names):
            tokens = [s[row] for s in steps]
            yield self.rec.emit(GeneratedToken(name, len(steps), self.cfg.new_tokens, tokens[-1],
                                               tok.decode([tokens[-1]]), tok.decode(tokens)))

    def _continuations(self, names: Sequence[str], steps: list[list[int]], started: float,
                       ended: float) -> Iterator[Event]:
        """Each row's continuation, its speed and when it decoded (seconds from the run's start); every
        continuation's `beside` names the variants another lane decoded at the same time, so a speed measured
        while the CPU was shared says so."""
        generated, done = ended - started, self.report["continuations"]
        for row, name in enumerate(names):
            tokens = [s[row] for s in steps]
            done[name] = {
                "text": self.tokenizer.decode(tokens), "token_ids": tokens, "seconds": generated,
                "batch_rows": len(names), "tokens_per_s": len(tokens) / generated if generated > 0 else None,
                "decoded": [started - self._t0, ended - self._t0], "decoded_with": list(names)}
            self.report["seconds"][f"generate_{name}"] = generated
        for entry in done.values():
            entry["beside"] = [n for n, other in done.items() if n not in entry["decoded_with"]
                               and other["decoded"][0] < entry["decoded"][1]
                               and entry["decoded"][0] < other["decoded"][1]]
        if FULL in names:
            self.reference = torch.tensor([[s[0] for s in steps]], dtype=torch.long)
            self._reference_known.set()
        return iter(())

    def _agreements(self, names: Sequence[str], forced, together: float) -> Iterator[Event]:
        """Each variant's agreement figures from the teacher-forced pass its model made (one pass for the variants
        of one base: each is charged all of it)."""
        for row, name in enumerate(names):
            yield from self._agree(name, *forced[row])
            self.report["seconds"][f"agreement_{name}"] = together
            self.rec.save()

    def _forced(self, model, routes: Sequence[str] | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The model teacher forced along full precision's continuation of the prompt and along the held-out
        documents' own next tokens, under each of `routes` (None: the model as it is): per route, the prompt's
        log-probabilities and the documents' (None without documents). The prompt and the documents share a pass
        when they are the same length (no padding), and the routes share passes (forced_logprobs_routed)."""
        docs = self.doc_prompts is not None
        same = docs and (self.prompt.shape[1], self.reference.shape[1]) == (self.doc_prompts.shape[1],
                                                                             self.doc_reference.shape[1])
        groups = ([(torch.cat([self.prompt, self.doc_prompts]), torch.cat([self.reference, self.doc_reference]))]
                  if same else [(self.prompt, self.reference)] + ([(self.doc_prompts, self.doc_reference)]
                                                                   if docs else []))
        passes = [forced_logprobs_routed(model, prompts, reference, routes) if routes
                  else [forced_logprobs(model, prompts, reference)] for prompts, reference in groups]
        per_route = list(zip(*passes, strict=True))
        if same:
            return [(both[0][:1], both[0][1:]) for both in per_route]
        return [(parts[0], parts[1] if docs else None) for parts in per_route]

    def _agree(self, name: str, logprobs: torch.Tensor, doc_logprobs: torch.Tensor | None) -> Iterator[Event]:
        """Variant `name`'s agreement figures with full precision from its teacher-forced log-probabilities along
        full precision's continuation of the prompt (`logprobs`) and along the held-out documents."""
        docs = doc_logprobs is not None
        if name == FULL:
            self.ref_logprobs = logprobs
            self.reference_probs = Reference.of(logprobs)
            self.doc_reference_probs = Reference.of(doc_logprobs) if docs else None
            self._reference_record()
        else:
            self.prompt_logprobs[name] = logprobs
        found = agreement(self.reference_probs, logprobs)
        self.report["agreement"][name] = found.record()
        if docs:
            self.doc_agreement[name] = agreement(self.doc_reference_probs, doc_logprobs)
            self.report["documents"]["variants"][name] = {
                "top1_agreement": self.doc_agreement[name].top1_agreement,
                "mean_kl": self.doc_agreement[name].mean_kl}
        label_ = self.report["labels"][name]
        yield self.rec.emit(Metric(name, found.top1_agreement, "agreement",
                                   f"{label_}: top-1 agreement with full precision {100 * found.top1_agreement:.1f}%, "
                                   f"mean KL {found.mean_kl:.4f} nats"))
        yield self.rec.emit(Metric(name, found.mean_kl, "kl", f"{label_}: mean KL(full || variant), nats"))

    def _reference_record(self) -> None:
        """Full precision's continuation token by token (the strip every variant is coloured along) and, when
        decoding greedily, the share of positions where its teacher-forced top-1 is the token it generated (1.0
        up to the numerics of the key-value cache)."""
        ids = self.reference[0].tolist()
        record = {"token_ids": ids, "pieces": [self.tokenizer.decode([i]) for i in ids]}
        if not self.cfg.sample:
            record["greedy_matches_forced"] = float((self.ref_logprobs[0].argmax(-1) == self.reference[0])
                                                    .double().mean())
        self.report["reference"] = record

    def _load_four_bit(self, source, dtype: torch.dtype) -> tuple[Any, dict[str, dict], float, bool]:
        """One 4-bit base holding every adapter under its variant's name (per-layer ranks kept; plain 4-bit is the
        base alone, peft's BASE_ROW): the peft model, the factors of each adapter, the seconds it took and whether
        the base was quantized by this call (else a copy of one quantized earlier, engine.quantization.reused).
        Emits no event (it may run in the 4-bit lane)."""
        start = time.perf_counter()
        base, made = reused_copy(load_quantized, source, self.quant, self.device, dtype)
        peft_model = None
        added = {}
        for name, folder in self.source.adapters.items():
            self.rec.check_stop("generation")
            try:
                factors, ranks = load_factors(folder)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"run {self.source.name}: {folder} cannot be read: "
                                  f"{one_line(exc, 160)}") from None
            try:
                if peft_model is None:  # the first adapter wraps the base
                    peft_model = attach_lora(base, self.lora, target_paths(base, self.lora), ranks, adapter=name)
                    write_factors(peft_model, factors, adapter=name)
                else:
                    add_adapter_with_factors(peft_model, name, self.lora, factors, ranks)
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"run {self.source.name}: adapters/{folder.name} does not fit this model's "
                                  f"LoRA layers: {one_line(exc, 160)}") from None
            added[name] = factors
        peft_model.eval()
        return peft_model, added, time.perf_counter() - start, made

    def _start_lane(self, source, config, dtype: torch.dtype, deploy: bool) -> Lane | None:
        """Start the 4-bit variants' work (load, decode, teacher forcing) in a second thread, beside full precision
        and 8-bit, where that is safe and pays: on a CPU in float32 without the deployment measures. One decode
        keeps about one of two cores busy, so two side by side finish sooner. Not on a GPU (nothing to gain) nor in
        another dtype: the loads take turns (sources.models.MODEL_LOAD_LOCK: transformers patches process-wide state
        while it builds a model), but the default dtype a load sets meanwhile (torch's, process-wide) would reach
        the other thread's decode; nor with the deployment measures, which use the 4-bit model after its variants;
        nor where the three models at once (engine.preflight.side_by_side_bytes) would take over half the memory
        available.
        The loader silences library warnings while it runs (warnings.catch_warnings, process-wide), so the other
        lane's warnings are silenced for those seconds too."""
        if deploy or self.device.type != "cpu" or dtype != torch.float32 or torch.get_default_dtype() != dtype:
            return None
        shapes = shapes_or_none(config)
        if shapes is None or side_by_side_bytes(shapes, self.quant, MAX_BYTES) > available_bytes(self.device)[0] // 2:
            return None  # three models at once where memory is short: in turn instead
        return Lane(lambda: self._four_bit_work(source, dtype, None), name="generate-4bit", split_threads=True)

    def _four_bit(self, source, dtype: torch.dtype, deploy_ids: torch.Tensor | None) -> Iterator[Event]:
        """The 4-bit variants: what their lane still has to say, or their work done here and now."""
        if self._lane is not None:
            yield from self._apply(self._lane.rest(), drain=False)
        else:
            yield from self._apply(self._four_bit_work(source, dtype, deploy_ids), drain=False)

    def _four_bit_work(self, source, dtype: torch.dtype, deploy_ids: torch.Tensor | None) -> Iterator[Handler]:
        """The 4-bit variants, each adapter checked to change the logits; plain 4-bit (the base alone) and the
        corrected variants then decode as the rows of one batch (peft's mixed-adapter inference, its adapters
        stacked for the decode: engine.routed_adapters, checked against peft's own on a probe), on the base's
        layers dequantized once for all of them (dequantized_once: the same products). Computes only (see
        `_measure`); with `deploy_ids` (done in the flow's thread), the 4-bit perplexities of the deployment table."""
        self.rec.check_stop("generation")
        yield partial(self._emit, Stage("load", f"loading the {self.quant.bits}-bit {self.quant.label} base"))
        peft_model, added, seconds, made = self._load_four_bit(source, dtype)
        with dequantized_once(peft_model, dtype) as once:
            yield partial(self._four_bit_loaded, seconds, once.describe(), made)
            with torch.no_grad():  # on the prompt's first tokens: any correction not zero changes their logits
                check_adapters_applied(peft_model, self.prompt[:, :PROBE_TOKENS], added, BASE_ROW)
            yield from self._measure([PLAIN, *self.source.adapters], peft_model, [BASE_ROW, *self.source.adapters])
            if deploy_ids is not None:
                with peft_model.disable_adapter():
                    yield partial(self._deploy_perplexity, "plain_4bit", peft_model, deploy_ids,
                                  "plain 4-bit, no correction")
                peft_model.set_adapter(self.deploy_name)
                yield partial(self._deploy_perplexity, "adapter_4bit", peft_model, deploy_ids)
        peft_model.unload()
        del peft_model
        free_memory()

    def _four_bit_loaded(self, seconds: float, layers: str, made: bool) -> Iterator[Event]:
        self.report["seconds"]["load_4bit"] = seconds
        self.report["four_bit_loaded"] = ("in its own thread, beside full precision and 8-bit"
                                          if self._lane is not None else "in turn")
        self.report["four_bit_layers"] = layers
        self.report.setdefault("bases", {})["4bit"] = made_word(made)
        return iter(())

    # -- what survives deployment ----------------------------------------------------------------------
    def _deploy_perplexity(self, name: str, model, eval_ids: torch.Tensor, note: str = "") -> Iterator[Event]:
        start = time.perf_counter()
        ppl = perplexity(model, eval_ids, self.cfg.eval_batch)
        deploy = self.report["deploy"]
        deploy["perplexity"][name] = ppl
        self.report["seconds"][f"deploy_{name}"] = time.perf_counter() - start
        self.rec.save()
        yield self.rec.emit(Metric(f"deploy:{name}", ppl, "perplexity", note or deploy["labels"][name]))

    def _deploy_merged(self, source, full_model, eval_ids: torch.Tensor) -> Iterator[Event]:
        """Full precision's perplexity, then (b): the adapter merged into the full-precision weights (into
        `full_model` itself when the merge dtype is its float32), measured and saved (deploy/<adapter>-merged/)
        beside a copy of the adapter folder (deploy/<adapter>-adapter/)."""
        cfg, deploy = self.cfg, self.report["deploy"]
        dtype = merge_dtype(cfg.merge_dtype, self.device)
        deploy["labels"] = deploy_labels(self.quant, dtype)
        deploy["merge_dtype"] = dtype_name(dtype)
        self.rec.check_stop("deployment")
        yield self.rec.emit(Stage("deploy", f"what survives deployment of {deploy['label']}: held-out perplexity on "
                                            f"{eval_ids.numel()} tokens"))
        yield from self._deploy_perplexity("full", full_model, eval_ids, "full precision")
        adapter = self.source.adapters[self.deploy_name]
        merged = merged_model(source, adapter, self.device, dtype,
                              full_model if next(full_model.parameters()).dtype == dtype else None)
        yield from self._deploy_perplexity("merged", merged, eval_ids)
        start = time.perf_counter()
        out = self.run_dir / "deploy"
        folder = save_merged(merged, self.tokenizer, out / f"{self.deploy_name}-merged")  # W + s B A
        copy = out / f"{self.deploy_name}-adapter"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(adapter, copy)
        deploy["merged_folder"], deploy["adapter_folder"] = str(folder), str(copy)
        self.report["seconds"]["deploy_save"] = time.perf_counter() - start
        self.rec.save()
        yield self.rec.emit(Log(f"merged model saved to {folder} (loads with AutoModelForCausalLM.from_pretrained), "
                                f"the adapter beside it in {copy}"))
        del merged
        free_memory()

    def _deploy_reloaded(self, source, dtype: torch.dtype, eval_ids: torch.Tensor) -> Iterator[Event]:
        """(d) the adapter folder loaded by peft onto the stock base; (e) merged into that base's dequantized
        weights Q, saved (deploy/<adapter>-merged-dequantized/); (c) and (f): the two merged folders quantized
        again."""
        deploy = self.report["deploy"]
        self.rec.check_stop("deployment")
        base = load_quantized(source, self.quant, self.device, dtype)
        weights = quantized_weights(base)
        model = adapter_apart(base, deploy["adapter_folder"])
        yield from self._deploy_perplexity("adapter_reloaded", model, eval_ids)
        del model, base
        free_memory()
        self.rec.check_stop("deployment")
        held = merge_dtype(self.cfg.merge_dtype, self.device)
        merged = merged_model(source, deploy["adapter_folder"], self.device, held,
                              dequantized_model(source, weights, self.device, held))
        del weights
        yield from self._deploy_perplexity("merged_dequantized", merged, eval_ids)
        folder = save_merged(merged, self.tokenizer, self.run_dir / "deploy" / f"{self.deploy_name}-merged-dequantized")
        deploy["merged_dequantized_folder"] = str(folder)
        del merged
        free_memory()
        for name, merged_folder in (("merged_requantized", deploy["merged_folder"]),
                                    ("dequantized_requantized", deploy["merged_dequantized_folder"])):
            self.rec.check_stop("deployment")
            model = requantized_model(merged_folder, self.quant, self.device, dtype)
            yield from self._deploy_perplexity(name, model, eval_ids)
            del model
            free_memory()
        ppl = deploy["perplexity"]
        deploy["kept"] = kept_shares(ppl, ppl.get("plain_4bit"))
        deploy["reading"] = deploy_reading(deploy)
        self.rec.save()
        yield self.rec.emit(Log(deploy["reading"]))

    # -- figures over the variants ----------------------------------------------------------------------
    def _summaries(self) -> None:
        """The best corrected variant (lowest mean KL on the prompt), the top-10 next tokens of full precision,
        plain 4-bit and it at each position, and over the documents each corrected variant against plain 4-bit."""
        corrected = [n for n in self.source.adapters if n in self.report["agreement"]]
        best = min(corrected, key=lambda n: self.report["agreement"][n]["mean_kl"]) if corrected else None
        self.report["best"] = best
        shown = [n for n in (FULL, PLAIN, best) if n is not None]
        logprobs = {FULL: self.ref_logprobs, **self.prompt_logprobs}
        self.report["top10"] = {"variants": shown, **{
            name: [[{"id": i, "text": self.tokenizer.decode([i]), "p": p} for i, p in top_tokens(row, TOP_K)]
                   for row in logprobs[name][0]] for name in shown if name in logprobs}}
        documents = self.report.get("documents")
        if documents is not None and PLAIN in self.doc_agreement:
            documents["positions"] = int(self.doc_agreement[PLAIN].agree.numel())
            documents["versus_plain"] = {n: versus_plain(self.doc_agreement[PLAIN], self.doc_agreement[n])
                                         for n in corrected if n in self.doc_agreement}
        self.prompt_logprobs.clear()
        self.reference_probs = self.doc_reference_probs = None


def warm_bases(model: ModelConfig | None = None, quant: QuantConfig | None = None) -> str:
    """Quantize, once and ahead of a first Generate, the 4-bit and 8-bit bases a generate run on `model` under
    `quant` loads (default: the embedded model, the default quantization, what the app's init runs use on a
    CPU); engine.quantization.reused keeps them, and each run gets a copy. On a CPU only. A line for the log."""
    model, quant = model or ModelConfig(), quant or QuantConfig()
    device = pick_device(model.device)
    if device.type != "cpu":
        return f"no bases made ahead on {device_label(device)}: quantizing there takes milliseconds"
    start = time.perf_counter()
    source = resolve_model(model.model)
    kept = keep(load_quantized, source, quant, device, compute_dtype(model.compute_dtype, device))
    kept = keep(load_8bit, source, device) and kept
    return (f"generate: the 4-bit {quant.label} and 8-bit bases of {source.name} quantized ahead in "
            f"{time.perf_counter() - start:.1f} s" + ("" if kept else " (not all kept: over the size kept)"))


def made_word(made: bool) -> str:
    """How a run got a quantized base (engine.quantization.reused)."""
    return "quantized by this run" if made else "a copy of the same base quantized earlier in this process"


def deploy_reading(deploy: Mapping[str, Any]) -> str:
    """One line: what each way of shipping keeps of the adapter's perplexity gain on the 4-bit base."""
    kept, ppl = deploy.get("kept") or {}, deploy.get("perplexity") or {}
    if kept.get("adapter_4bit") is None:
        plain, adapted = ppl.get("plain_4bit", float("nan")), ppl.get("adapter_4bit", float("nan"))
        return (f"The adapter does not lower the 4-bit base's perplexity here ({plain:.3f} -> {adapted:.3f}): no gain "
                "to keep or lose.")
    parts = ", ".join(f"({LETTERS[name]}) {100 * kept[name]:.0f}%" for name in DEPLOY_VARIANTS[1:]
                      if kept.get(name) is not None)
    return f"Of the adapter's perplexity gain on the 4-bit base (a), each way of shipping keeps: {parts}."


def generate_table(report: Mapping[str, Any]) -> str:
    """What the command line prints at the end: each variant's continuation, its agreement with full precision
    (top-1, mean KL) on the prompt and over the held-out documents, each corrected variant against plain 4-bit,
    and the deployment table."""
    labels = report.get("labels", {})
    prompt = report.get("prompt") or {}
    lines = [f"model {report.get('model')} | from {report.get('run_kind')} run {report.get('from_run')} | "
             f"{report.get('device')}",
             f"prompt ({prompt.get('origin', '')}, {prompt.get('tokens', 0)} tokens): {prompt.get('text', '')!r}", ""]
    for name in report.get("variants", []):
        text = (report.get("continuations", {}).get(name) or {}).get("text")
        if text is not None:
            lines.append(f"[{labels.get(name, name)}] {text!r}")
    documents = report.get("documents") or {}
    doc_head = f" {'docs top-1':>10} {'docs KL':>9}" if documents.get("variants") else ""
    lines += ["", f"{'variant':<52} {'top-1 agree':>11} {'mean KL':>9}{doc_head}"]
    for name in report.get("variants", []):
        found = report.get("agreement", {}).get(name)
        if found is None:
            continue
        docs = documents.get("variants", {}).get(name)
        cells = f" {100 * docs['top1_agreement']:>9.1f}% {docs['mean_kl']:>9.4f}" if docs else ""
        lines.append(f"{labels.get(name, name)[:52]:<52} {100 * found['top1_agreement']:>10.1f}% "
                     f"{found['mean_kl']:>9.4f}{cells}")
    lines.append(f"top-1 agree: share of the {report.get('new_tokens')} positions of full precision's continuation "
                 "where the variant's most likely next token is full precision's (teacher forced); KL(full || "
                 "variant) in nats" + (f"; docs: over {documents.get('n')} held-out documents, "
                                      f"{documents.get('positions', 0)} positions" if doc_head else ""))
    for name, shares in (documents.get("versus_plain") or {}).items():
        lines.append(f"{labels.get(name, name)}: right where plain 4-bit is wrong at "
                     f"{100 * shares['corrected_only']:.1f}% of positions, wrong where it is right at "
                     f"{100 * shares['plain_only']:.1f}%")
    if report.get("best"):
        lines.append(f"best corrected variant (lowest mean KL on the prompt): {labels.get(report['best'])}")
    for name, why in {**(report.get("unavailable") or {}), **(report.get("skipped") or {})}.items():
        lines.append(f"{name}: {why}")
    deploy = report.get("deploy")
    if deploy:
        ppl, kept, names = deploy.get("perplexity", {}), deploy.get("kept") or {}, deploy.get("labels", {})
        lines += ["", f"what survives deployment of {deploy.get('label')} (held-out perplexity, "
                      f"{deploy.get('eval_tokens')} tokens)",
                  f"{'':<72} {'perplexity':>10} {'gain kept':>9}"]
        for name, title in (("full", "full precision"), ("plain_4bit", "plain 4-bit, no correction"),
                            *((n, names.get(n, n)) for n in DEPLOY_VARIANTS)):
            if ppl.get(name) is not None:
                share = kept.get(name)
                lines.append(f"{title[:72]:<72} {ppl[name]:>10.3f} "
                             f"{(f'{100 * share:.0f}%' if share is not None else '-'):>9}")
        lines += [deploy.get("reading", ""), deploy.get("explanation", "")]
        if deploy.get("merged_folder"):
            lines.append(f"merged models (from_pretrained): {deploy['merged_folder']} (b), "
                         f"{deploy.get('merged_dequantized_folder')} (e); adapter: {deploy.get('adapter_folder')}")
    return "\n".join(lines)


def run_generate(cfg: GenerateConfig, should_stop: Callable[[], bool] | None = None,
                 run_dir: Path | None = None) -> Iterator[Event]:
    """The generation flow as events (see the module). A run folder that is missing, unfinished or without
    adapters is refused here, before anything loads (ConfigError, one line)."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped before the model was loaded")
    return GenerateRun(cfg, read_run(cfg.from_run), should_stop, run_dir).events()

