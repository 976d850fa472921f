"""What the page shows of a job: stage progress, status lines, the init figures, the teaching views' figures, the
results summary, a reopened run folder's outputs and the shipped example run's (the same figures, labelled),
built from the job's events and report. No gradio here."""
from __future__ import annotations

import html
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch

from quailora_app.app.forms import text_setting
from quailora_app.app.jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, Job, JobManager
from quailora_app.app.reopen import (
    EXAMPLE_DIR,
    ReopenedRun,
    example_manifest,
    example_runs,
    is_example_name,
    open_example,
    open_run,
)
from quailora_app.config import ALL_LINEAR, ModelConfig, quant_word
from quailora_app.engine.evaluation.selfcheck import report_lines
from quailora_app.engine.methods.registry import QLORA, init_method_names
from quailora_app.errors import UserError, one_line
from quailora_app.plots import figures as F
from quailora_app.plots.frontier import FRONTIER_HEADER, frontier_figure, frontier_rows
from quailora_app.runs import RunFolder
from quailora_app.sources.models import converted_folder, embedded_model, embedded_note, trust_remote_code
from quailora_app.teaching.snapshot import default_layer, layer_names

INIT_STAGES = [("load", "load model", 0.04), ("data", "read text", 0.04), ("quantize", "quantize to 4-bit", 0.07),
               ("calibrate", "calibrate + initialize", 0.55), ("evaluate", "perplexity per method", 0.2),
               ("baseline", "8-bit & full-precision baselines", 0.1)]
TRAIN_STAGES = [("load", "load model & text", 0.03), ("reference", "full-precision & 8-bit perplexity", 0.07),
                ("setup", "set up arms (quantize, calibrate, initialize)", 0.2), ("train", "train + evaluate", 0.7)]


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def time_left(job: Job, done: float, total: float, now: float | None = None) -> str:
    """' · about 40 s left in this stage': the current stage's measured rate (seconds since its Stage event per
    unit done: blocks, methods, steps) times the units left; "" before the first unit, at the end, or when the job
    is not running."""
    if job.status != RUNNING or not total or not 0 < done < total:
        return ""
    start = next((e.get("time") for e in reversed(job.events) if e.get("kind") == "stage"), None)
    if not isinstance(start, (int, float)):
        return ""
    elapsed = max(0.0, (time.time() if now is None else now) - start)
    return f" · about {_seconds(elapsed / done * (total - done))} left in this stage"


def _stage_progress(job: Job) -> tuple[float, str]:
    """Overall fraction done and a line for the current stage of an init job."""
    names = [s for s, _, _ in INIT_STAGES]
    weights = {s: w for s, _, w in INIT_STAGES}
    stage = job.stage if job.stage in weights else ("calibrate" if job.stage == "initialize" else "load")
    current = names.index(stage)
    frac = sum(weights[s] for s in names[:current])
    if stage == "baseline":
        done = sum(1 for e in job.events if e.get("kind") == "metric" and e.get("name") in ("full", "int8")
                   and e.get("group", "perplexity") == "perplexity")
        frac += weights[stage] * done / 2
    elif job.total:
        frac += weights[stage] * job.done / job.total
    line = job.stage_message or stage
    if stage == "calibrate" and job.total:
        line = f"calibrate + initialize: block {job.done} of {job.total}"
    if stage != "baseline":
        line += time_left(job, job.done, job.total)
    return min(frac, 1.0), line


def _train_stage(job: Job) -> str:
    stage = job.stage.split()[0] if job.stage else "load"
    return {"data": "load", "calibrate": "setup"}.get(stage, stage)


def _train_progress(job: Job) -> tuple[float, str]:
    """Overall fraction done and a line for a fine-tuning job (steps summed over the arms)."""
    weights = {s: w for s, _, w in TRAIN_STAGES}
    names = list(weights)
    stage = _train_stage(job)
    stage = stage if stage in weights else "load"
    frac = sum(weights[s] for s in names[: names.index(stage)])
    arms = list(getattr(job.config, "arms", ()) or F.arms_in(job.events))
    last: dict[str, dict] = {}
    for e in job.events:
        if e.get("kind") == "train_step":
            last[e["arm"]] = e
    if stage != "train" or not last:
        if stage == "setup":
            ready = len({e["arm"] for e in job.events if e.get("kind") == "eval" and e.get("step") == 0})
            frac += weights["setup"] * ready / max(1, len(arms))
        line = job.stage_message or stage
        if job.stage.startswith("calibrate") and job.total:
            line = f"calibrate + initialize the 4-bit arms: block {job.done} of {job.total}"
            line += time_left(job, job.done, job.total)
        return min(frac, 1.0), line
    done = sum(last[a]["step"] / max(1, last[a]["total_steps"]) for a in last) / max(1, len(arms))
    per_arm = ", ".join(f"{F.label(a)} step {last[a]['step']}/{last[a]['total_steps']}" for a in last)
    steps = getattr(job.config, "steps", 0) or max(e["total_steps"] for e in last.values())
    per_arm += time_left(job, sum(e["step"] for e in last.values()), steps * max(1, len(arms)))
    return min(frac + weights["train"] * done, 1.0), per_arm


def progress_html(job: Job | None, manager: JobManager) -> str:
    if job is None:
        return "<div class='q-progress idle'><div class='q-label'>no job yet</div></div>"
    if job.status == QUEUED:
        running, waiting = manager.queue_length()
        return (f"<div class='q-progress queued'><div class='q-bar'><span style='width:0%'></span></div>"
                f"<div class='q-label'>queued: position {job.position} of {waiting} waiting"
                f"{' (a job is running)' if running else ''}</div></div>")
    if job.kind == "views":
        return views_progress_html(job)
    frac, line = (_stage_progress(job) if job.kind == "init" else _train_progress(job))
    if job.status == FINISHED:
        frac, line = 1.0, f"done in {job.elapsed:.0f} s"
    stages = INIT_STAGES if job.kind == "init" else TRAIN_STAGES
    cur = job.stage if job.kind == "init" else _train_stage(job)
    names = [s for s, _, _ in stages]
    idx = names.index(cur) if cur in names else (names.index("calibrate") if cur == "initialize" else 0)
    word = job_base(job)
    texts = [text.replace("4-bit", word) if name == "quantize" else text for name, text, _ in stages]
    return stages_bar(job, texts, idx, frac, line)


def job_base(job: Job | None) -> str:
    """How the job's quantized base is named (config.quant_word): "4-bit" (bitsandbytes) or "HQQ 3-bit"; from the
    job's config, else its report's settings."""
    quant = getattr(getattr(job, "config", None), "quant", None)
    if quant is None:
        settings = (getattr(job, "report", None) or {}).get("settings") or {}
        quant = settings.get("quant") if isinstance(settings, dict) else None
    return quant_word(quant)


def ended_bar(job: Job, texts: list[str], idx: int, frac: float, line: str) -> str:
    """`stages_bar` of a job whose own progress gives (idx, frac, line) while it runs: once it has finished, a full bar
    and "done in N s"; once it failed or was stopped, its message."""
    if job.status == FINISHED:
        frac, line = 1.0, f"done in {job.elapsed:.0f} s"
    elif job.status in (FAILED, CANCELLED):
        line = job.message or job.status
    return stages_bar(job, texts, idx, frac, line)


def stages_bar(job: Job, texts: list[str], idx: int, frac: float, line: str) -> str:
    """The stage chips (done / now) above a progress bar at `frac`, with `line` under it."""
    chips = []
    for i, text in enumerate(texts):
        state = "done" if (i < idx or job.status == FINISHED) else ("now" if i == idx and job.status == RUNNING else "")
        chips.append(f"<span class='q-step {state}'>{html.escape(text)}</span>")
    cls = {FAILED: "failed", CANCELLED: "cancelled"}.get(job.status, "")
    return (f"<div class='q-progress {cls}'><div class='q-steps'>{''.join(chips)}</div>"
            f"<div class='q-bar' role='progressbar' aria-valuenow='{100 * frac:.0f}' aria-valuemin='0' "
            f"aria-valuemax='100'>"
            f"<span style='width:{100 * frac:.1f}%'></span></div>"
            f"<div class='q-label'>{100 * frac:.0f}% · {html.escape(line)}</div></div>")


def status_text(job: Job | None, manager: JobManager) -> str:
    if job is None:
        return "Nothing started yet in this session."
    running, waiting = manager.queue_length()
    what = {"init": "Quantize & initialize", "views": "Teaching views", "bits": "Across bits",
            "generate": "Generation"}.get(job.kind, "Fine-tuning")
    where = f" · run folder `{job.run_dir}`" if job.run_dir else ""
    if job.status == QUEUED:
        return (f"**{what}: queued**, position {job.position} in line ({running} running, {waiting} waiting). "
                "It starts by itself; you may close this tab and come back.")
    if job.status == RUNNING:
        extra = f" · {job.message}" if job.message else ""
        return f"**{what}: running** for {job.elapsed:.0f} s{extra}{where}. Closing the tab does not stop it."
    if job.status == FINISHED:
        return f"**{what}: finished** in {job.elapsed:.0f} s{where}."
    if job.status == CANCELLED:
        return f"**{what}: stopped** ({job.message}). Results computed before the stop are kept{where}."
    return f"**{what}: failed**: {job.message}{where}"


def report_of(job: Job | None) -> dict | None:
    """The job's final report, or the partial report.json a stopped or failed run left behind."""
    if job is None:
        return None
    if job.report:
        return job.report
    if job.status in DONE and job.run_dir:
        return RunFolder(Path(job.run_dir)).read_report()
    return None


def _note(report: dict | None, model_name: str) -> str:
    note = (report or {}).get("model_note") or embedded_note(model_name)
    return f"**About this model:** {note}" if note else ""


class DrawnFigures:
    """The figures and tables last built from each job, keyed by what they are built from (the job and its run
    folder, its status, whether its report is in, the part, how many of the events that part reads): a status call
    with nothing new for a part hands back the one already built, so each is built once per new event however often
    the page or an API client polls. Bounded: the `size` most recent entries (a figure of 200 layers is ~100 KB)."""

    def __init__(self, size: int = 24):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The value drawn for `key`, built by `build()` when there is none yet. A key whose job has neither an id
        nor a run folder (key[0] and key[1] empty) names no job for sure: built afresh, never kept."""
        if not (key[0] or key[1]):
            return build()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()  # outside the lock: another job's poll need not wait for this figure
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


DRAWN = DrawnFigures()


class LiveCounts:
    """The event counts a running job's figures are drawn at: a count the figures see moves at most once every
    `seconds` while the job runs, and shows its latest value once the job has ended. Plotly builds the per-layer
    figure of 210 layers in 0.1-0.4 s; redrawn on every new layer at the page's one poll a second it would take a
    tenth of a 2-core machine from the job it shows. Keyed by (job id, the names counted), bounded to `size` jobs."""

    def __init__(self, seconds: float = 5.0, size: int = 64):
        self.seconds, self.size = seconds, size
        self._held: OrderedDict[tuple, tuple[float, dict[str, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, job, counts: dict[str, int], now: float | None = None) -> dict[str, int]:
        """`counts` as the figures of `job` see them now (the ones last handed out, while they are younger than
        `seconds` and the job runs)."""
        if getattr(job, "status", None) != RUNNING or not getattr(job, "id", None):
            return counts
        now = time.monotonic() if now is None else now
        key = (job.id, tuple(sorted(counts)))
        with self._lock:
            held = self._held.get(key)
            if held is not None and now - held[0] < self.seconds:
                return held[1]
            self._held[key] = (now, counts)
            self._held.move_to_end(key)
            while len(self._held) > self.size:
                self._held.popitem(last=False)
        return counts


LIVE = LiveCounts()


def job_key(job) -> tuple:
    """Which job a drawn figure belongs to: its id, run folder and status (a reopened run's id is empty; without
    either, DrawnFigures does not keep the figure)."""
    return tuple(getattr(job, name, None) for name in ("id", "run_dir", "status"))


def _event_counts(events: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        kind = e.get("kind", "")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def init_views(job: Job | None, manager: JobManager,
               parts=("layers", "heatmap", "perplexity", "accuracy")) -> dict[str, Any]:
    events = job.events if job else []
    report = report_of(job)
    source = report if report and report.get("layers") else events
    n = LIVE.of(job, _event_counts(events))
    base = (*job_key(job), report is not None)
    layers, metrics = n.get("layer", 0), n.get("metric", 0)
    out: dict[str, Any] = {}
    methods = list(getattr(job.config, "methods", ()) or ()) if job else []
    word = job_base(job)  # the legends name the run's base: "4-bit + QuAILoRA", "HQQ 3-bit + QuAILoRA"
    if "layers" in parts:
        n_blocks = job.total if job and job.stage == "calibrate" and job.total else None
        out["layers"] = DRAWN.get((*base, "layers", layers, n_blocks),
                                  lambda: F.layer_error_figure(source, n_blocks, word))
    if "heatmap" in parts:  # with the budget method's ranks when it ran
        out["heatmap"] = DRAWN.get((*base, "heatmap", layers), lambda: F.init_heatmap(source, "quailora"))
    if "perplexity" in parts:
        scored = report if report and report.get("perplexity") else events
        out["perplexity"] = DRAWN.get((*base, "perplexity", metrics),
                                      lambda: F.perplexity_figure(scored, methods, word))
    if "accuracy" in parts:  # downstream accuracy with Wilson intervals (an empty panel when accuracy is off)
        scored_acc = report if report and report.get("accuracy") else events
        out["accuracy"], out["accuracy_shown"] = DRAWN.get(
            (*base, "accuracy", metrics),
            lambda: (F.accuracy_figure(scored_acc, methods, word), bool(F.accuracies_from(scored_acc))))
    if report:
        out["numbers"] = DRAWN.get((*base, "numbers"), lambda: pd.DataFrame(F.numbers_table(report, word),
                                                                            columns=F.NUMBERS_HEADER))
    else:
        def live_numbers() -> pd.DataFrame:
            live = {"layers": F.layers_from(events), "perplexity": F.perplexities_from(events), "methods": methods}
            return pd.DataFrame(F.numbers_table(live, word), columns=F.NUMBERS_HEADER)

        out["numbers"] = DRAWN.get((*base, "numbers", layers, metrics), live_numbers)
    out["report"] = report
    model = getattr(getattr(job, "config", None), "model", ModelConfig()).model if job else "embedded"
    out["note"] = _note(report, model)
    return out


# ------------------------------------------------------------------------------------------------ teaching views
VIEW_KEYS = ("weights", "error", "spectrum", "energy", "channels", "rank_sweep", "precision")
VIEW_TITLES = {
    "weights": "1 · Inside a layer: the weights and the 16 levels of a 4-bit block",
    "error": "2 · The quantization error E = W − Q, before and after each correction",
    "spectrum": "3 · Which directions of the error matter: singular values of E and of E·H½",
    "energy": "4 · How much of the error a rank-k correction can remove",
    "channels": "5 · Outlier input channels and where the correction goes",
    "rank_sweep": "6 · Error left against LoRA rank",
    "precision": "7 · Precision trade-off: memory against perplexity",
}


def empty_view_figure(key: str):
    """The placeholder of teaching view `key` before a views job has drawn it."""
    fig = go.Figure()
    fig.update_layout(title=VIEW_TITLES[key], height=220, template="plotly_white", xaxis_visible=False,
                      yaxis_visible=False, annotations=[{"text": "press “Compute views”", "showarrow": False,
                                                             "font": {"color": "#888"}}])
    return fig


def views_drawn(report: dict | None) -> dict[str, Any]:
    """The seven teaching-view figures (VIEW_KEYS) of a views report, placeholders where it has none (no report
    yet), and its precision table ("table")."""
    figures = (report or {}).get("figures") or {}
    out: dict[str, Any] = {k: (pio.from_json(figures[k]) if k in figures else empty_view_figure(k)) for k in VIEW_KEYS}
    header = list((report or {}).get("precision_header") or ["format"])
    out["table"] = pd.DataFrame((report or {}).get("precision_rows") or [], columns=header)
    return out


def view_defaults(gpu: bool) -> dict[str, Any]:
    """Teaching-view settings: on CPU 8 x 128 calibration tokens and ranks 1..32, about a minute with the
    embedded model (no perplexity sweep: that needs a full initialization per rank)."""
    if gpu:
        return {"calib_samples": 64, "seq_len": 512, "rank": 16, "ranks": (1, 2, 4, 8, 16, 32, 64)}
    return {"calib_samples": 8, "seq_len": 128, "rank": 16, "ranks": (1, 2, 4, 8, 16, 32)}


def model_layers(model: str | None) -> tuple[list[str], str]:
    """(linear layer names, default layer) of a model already on disk, from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: only when the layer picker reads a model

    name = (model or "embedded").strip()
    folder = converted_folder(name) or Path(name).expanduser()
    if not (folder / "config.json").is_file():
        return [], ""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code())
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code())
    except Exception:  # noqa: BLE001 - no layer list for a config transformers cannot build; the job says why
        return [], ""
    return layer_names(meta), default_layer(meta)


def views_progress_html(job: Job) -> str:
    stages = [("load", "load 4-bit model & text"), ("compute", "calibrate, correct, sweep ranks"), ("figures", "draw")]
    names = [s for s, _ in stages]
    idx = names.index(job.stage) if job.stage in names else 0
    if job.status == FINISHED:
        frac, line = 1.0, f"done in {job.elapsed:.0f} s"
    else:
        frac = (0.05, 0.2, 0.95)[idx] if job.status == RUNNING else 0.0
        if job.stage == "compute" and "rank sweep" in job.stage_message:
            frac = 0.6
        line = job.stage_message or job.stage or job.status
    return stages_bar(job, [text for _, text in stages], idx, frac, line)


def summary_text(init_job: Job | None, train_job: Job | None) -> str:
    """A few plain sentences on what the runs found."""
    lines = []
    report = report_of(init_job)
    if report:
        ppl = report.get("perplexity") or {}
        word = job_base(init_job)
        plain = "4-bit QLoRA" if word == "4-bit" else f"{word}, no correction"
        lines.append(f"**Quantize & initialize** ({report.get('status', init_job.status)}): model "
                     f"`{report.get('model')}`, data `{Path(str(report.get('dataset'))).name}`, rank "
                     f"{report.get('rank')}, on {report.get('device')}.\n")
        if "qlora" in ppl:
            parts = [f"full precision {ppl['full']:.2f}" if ppl.get("full") else None,
                     f"8-bit {ppl['int8']:.2f}" if ppl.get("int8") else None, f"{plain} {ppl['qlora']:.2f}"]
            lines.append("- Perplexity: " + ", ".join(p for p in parts if p) + ".")
        for m in report.get("methods", []):
            if m == "qlora" or ppl.get(m) is None:
                continue
            gap = (report.get("gap_closed") or {}).get(m)
            errs = [r["calibrated_error"][m] for r in report.get("layers", []) if m in r.get("calibrated_error", {})]
            err = F.median(errs)
            lines.append(f"- {F.label(m, word)}: perplexity {ppl[m]:.2f}"
                         + (f", closes {100 * gap:.0f}% of the {word}→8-bit gap" if gap is not None else "")
                         + (f"; median layer keeps {100 * err:.0f}% of QLoRA's activation error"
                            if err is not None else "")
                         + ".")
        lines.extend(_accuracy_lines(report, word))
        for m, details in (report.get("method_details") or {}).items():  # a model-level method's KL (distill)
            kl = details.get("kl") if isinstance(details, dict) else None
            held = {k: (v or {}).get("holdout") for k, v in kl.items()} if isinstance(kl, dict) else {}
            if held.get(m) is not None and held.get("closed_form") is not None:
                lines.append(f"- {F.label(m)}: KL to the full-precision model on held-out calibration windows "
                             f"{held['closed_form']:.4f} → {held[m]:.4f} (closed form → {m}); "
                             f"{details.get('overfitting', '')}.")
        lines.extend(f"- {line}." for line in report_lines(report.get("self_check") or {}))
        for m, why in (report.get("unavailable") or {}).items():
            lines.append(f"- {m}: not computed ({why}).")
        if report.get("model_note"):
            lines.append(f"- Note on the model: {report['model_note']}")
    if train_job is not None:
        finished = [e for e in train_job.events if F.is_arm_finished(e)]
        state = {CANCELLED: "stopped by the user"}.get(train_job.status, train_job.status)
        lines.append(f"\n**Fine-tuning** ({state}), perplexity on the held-out text:\n")
        for e in finished:
            lines.append(f"- {F.label(e['arm'])}: final perplexity {e['final_perplexity']:.2f}, best "
                         f"{e['best_perplexity']:.2f}, {e['seconds']:.0f} s.")
        if not finished:
            lines.append("- no arm has finished yet.")
        train_report = report_of(train_job) or {}
        for base, records in (train_report.get("self_check") or {}).items():
            lines.extend(f"- {base} base, {line}." for line in report_lines(records))
    return "\n".join(lines) or "No results yet: run step 2 (and 3) first."


def _accuracy_lines(report: dict, word: str = "4-bit") -> list[str]:
    """One line per downstream task: each variant's accuracy +- its 95% half-width, the accuracy gap closed, and
    whether the difference from QLoRA is more than noise (McNemar's exact test on the same items)."""
    lines = []
    for entry in (report.get("accuracy") or {}).values():
        models = entry.get("models") or {}
        if not models:
            continue
        parts = []
        for name, m in models.items():
            text = f"{F.label(name, word)} {100 * m['accuracy']:.1f}% ± {100 * m['half_width']:.1f}"
            gap = (entry.get("gap_closed") or {}).get(name)
            vs = (entry.get("vs_qlora") or {}).get(name)
            if gap is not None:
                text += f" (closes {100 * gap:.0f}% of the {word}→8-bit accuracy gap"
                text += ", not significant vs QLoRA)" if vs and not vs.get("significant") else ")"
            parts.append(text)
        lines.append(f"- Accuracy, {entry.get('title')} (n={entry.get('n', 0):,}): " + ", ".join(parts) + ".")
    return lines


def zip_run(run_dir: str, name: str | None = None) -> str:
    """Zip a run folder into the temp dir (as `name`.zip, default the folder's name); returns the zip's path."""
    src = Path(run_dir)
    out_dir = Path(tempfile.gettempdir()) / "quailora-zips" / uuid.uuid4().hex[:8]
    out_dir.mkdir(parents=True, exist_ok=True)
    return shutil.make_archive(str(out_dir / (name or src.name)), "zip", root_dir=src.parent, base_dir=src.name)


# ------------------------------------------------------------------------------------------------ reopen
_REPORT_STATUS = {"finished": FINISHED, "cancelled": CANCELLED, "stopped": CANCELLED, "failed": FAILED}


def reopened_job(run: ReopenedRun, owner: str | None = None) -> Job:
    """A finished job as the presenters read one, made from a run folder's report.json / events.jsonl."""
    report = run.report or {}
    status = _REPORT_STATUS.get(run.status, FAILED)
    arms = list(report.get("arms") or {}) if isinstance(report.get("arms"), dict) else list(report.get("arms") or [])
    try:
        model_cfg = ModelConfig(str(report.get("model") or "embedded"))
    except UserError:
        model_cfg = ModelConfig()
    config = SimpleNamespace(methods=list(report.get("methods") or []), arms=arms, model=model_cfg)
    ended = "the app stopped before this run ended" if run.status == "running" else run.status
    message = report.get("error") or ended
    return Job(id="", kind=run.kind, owner=owner or "", config=config, status=status, events=run.events,
               run_dir=str(run.run_dir), report=run.report, message=str(message))


def run_outputs(run: ReopenedRun, manager: JobManager, owner: str | None = None) -> dict[str, Any]:
    """What a finished job of the run's kind shows, read back from its folder: the init figures (layers,
    heatmap, perplexity) and numbers, or the fine-tuning curves and speed table; the report, the model note and
    a summary headed by the run's name."""
    job = reopened_job(run, owner)
    report = run.report or {}
    out: dict[str, Any] = {"layers": F.layer_error_figure([]), "heatmap": F.removal_heatmap([]),
                           "perplexity": F.perplexity_figure([]), "curves": F.train_figure([]),
                           "table": pd.DataFrame(columns=F.NUMBERS_HEADER), "report": run.report, "note": "",
                           "job": job}
    what = {"init": "Quantize & initialize", "train": "Fine-tuning", "views": "Teaching views",
            "bits": "Across bits", "generate": "Generate"}.get(run.kind, run.kind)
    error = f": {one_line(report['error'])}" if report.get("error") else ""
    shipped = " (the shipped example, read-only)" if is_example_name(run.name) else ""
    head = f"**Reopened `{run.name}`**{shipped} ({what}, {run.status}{error})."
    if run.kind == "init":
        v = init_views(job, manager)
        out.update(layers=v["layers"], heatmap=v["heatmap"], perplexity=v["perplexity"], table=v["numbers"],
                   note=v["note"], accuracy=v["accuracy"], accuracy_shown=v["accuracy_shown"])
        out["summary"] = head + "\n\n" + summary_text(job, None)
    elif run.kind == "train":
        out["curves"], out["table"] = train_outputs(job)
        out["summary"] = head + "\n\n" + summary_text(None, job)
    elif run.kind == "bits":  # the frontier in the perplexity panel, its points in the table
        out["perplexity"] = frontier_figure(report)
        out["table"] = pd.DataFrame(frontier_rows(report), columns=FRONTIER_HEADER)
        out["summary"] = head + (f" {report['reading']}" if report.get("reading") else "")
    elif run.kind == "generate":  # each variant's agreement with full precision; section 5 draws generate runs
        labels, found = report.get("labels") or {}, report.get("agreement") or {}
        parts = [f"{labels.get(n, n)} {100 * found[n]['top1_agreement']:.0f}% top-1, mean KL {found[n]['mean_kl']:.3f}"
                 for n in report.get("variants") or [] if n in found and n != "full"]
        out["summary"] = (head + " Agreement with full precision along its continuation: " + "; ".join(parts)
                          + ". Its continuations, strip and top-10 lists are in report.json inside the zip.")
    else:
        out["summary"] = head + " Its figures are in report.json inside the zip."
    return out


def _train_key(job: Job | None, part: str) -> tuple:
    """What a fine-tuning figure is built from: the job, its status and how many events it has (DrawnFigures; at
    most once every LIVE.seconds while it runs)."""
    return (*job_key(job), part, LIVE.of(job, {"events": len(job.events)})["events"] if job else 0)


def train_accuracy(job: Job | None) -> tuple[Any, bool]:
    """(the arms' downstream accuracy at each evaluation, figure; whether the run scores any)."""
    arms = list(getattr(job.config, "arms", ()) or ()) if job else []
    events = job.events if job else []
    return DRAWN.get(_train_key(job, "accuracy"), lambda: (F.train_accuracy_figure(events, arms),
                                                           bool(F.train_accuracies_from(events))))


def train_outputs(job: Job | None) -> tuple[Any, pd.DataFrame]:
    """(curves figure, speed and memory table) of a fine-tuning job."""
    arms = list(getattr(job.config, "arms", ()) or ()) if job else []
    events = job.events if job else []
    return DRAWN.get(_train_key(job, "curves"), lambda: (
        F.train_figure(events, arms), pd.DataFrame(F.train_table(events, arms), columns=F.TRAIN_HEADER)))


def reopened_outputs(name: Any, owner: str | None, manager: JobManager) -> dict[str, Any]:
    """Figures, tables, report and a zip of a run folder under the runs root (this owner's or the CLI's), or of
    the shipped example ("shipped:init", "shipped:train", "shipped:bits", "shipped:generate"), read back from
    report.json / events.jsonl: what a finished job shows, after a restart of the app."""
    name = text_setting(name, "run folder")
    run = open_example(name) if is_example_name(name) else open_run(name, owner)
    out = run_outputs(run, manager, owner)
    zip_name = f"quailora-example-{run.kind}" if is_example_name(run.name) else None
    out["zip"] = zip_run(str(run.run_dir), zip_name)  # into the temp folder: a shipped run is never written
    return out


# ------------------------------------------------------------------------------------------------ shipped example
def model_title(report: dict) -> str:
    model = str(report.get("model") or "?")
    embedded = embedded_model(model)
    return f"the embedded {embedded.title}" if embedded else f"`{Path(model).name}`"


def made_by(manifest: dict) -> str:
    command = manifest.get("command") or "python -m bench.make_example"
    when = f", {str(manifest['date']).split(' ')[0]}" if manifest.get("date") else ""
    return f"made by `{command}` (seed {manifest.get('seed', 0)}{when})"


def _quant_named(settings: dict) -> str:
    """'NF4 4-bit' (bitsandbytes, its data type) or 'HQQ 3-bit', from a report's settings."""
    quant = settings.get("quant") or {}
    word = quant_word(quant)
    return f"{str(quant.get('quant', 'nf4')).upper()} {word}" if word == "4-bit" else word


def example_label(kind: str, report: dict, manifest: dict) -> str:
    """The line over a shipped run's plots: that it is the shipped example, its settings, how it was made."""
    s = report.get("settings") or {}
    data, lora = s.get("data") or {}, s.get("lora") or {}
    targets = list(lora.get("targets") or [])
    where = "all linear layers" if targets == [ALL_LINEAR] else ", ".join(targets)
    quick = " (a quick development run, small settings)" if manifest.get("preset") == "quick" else ""
    device = "CPU" if str(report.get("device", "")).startswith("cpu") else report.get("device", "?")
    if kind == "init":
        methods = [m for m in report.get("methods") or [] if m != QLORA]
        every = set(report.get("methods") or []) >= set(init_method_names())
        what = f"every initialization ({len(methods)} beside QLoRA)" if every else ", ".join(methods)
        missing = "; ".join(f"{m} not run here" for m in (report.get("unavailable") or {}))
        body = (f"{model_title(report)}, {_quant_named(s)}, LoRA rank "
                f"{lora.get('rank')} on {where}, {data.get('calib_samples')} × {data.get('seq_len')} calibration "
                f"tokens, {data.get('eval_tokens', 0):,} held-out tokens, {what}{f' ({missing})' if missing else ''}, "
                f"{device}")
    elif kind == "views":
        ranks = ", ".join(str(r) for r in report.get("ranks") or [])
        body = (f"{model_title(report)}, {_quant_named(s)}, layer "
                f"`{report.get('layer')}` at LoRA rank {report.get('rank')}, {data.get('calib_samples')} × "
                f"{data.get('seq_len')} calibration tokens, rank sweep over r = {ranks}, the precision table's "
                f"perplexities from the shipped init run, {device}")
    else:
        arms = ", ".join(F.label(a) for a in (report.get("arm_names") or report.get("arms") or []))
        body = (f"{arms}: {s.get('steps')} steps of {s.get('batch_size')} × {data.get('seq_len')} tokens, learning "
                f"rate {s.get('learning_rate')}, perplexity every {s.get('eval_every')} steps on "
                f"{data.get('eval_tokens', 0):,} held-out tokens, {device}")
    return f"**Shipped example run{quick}**: {body}; {made_by(manifest)}. Shown until you start your own."


def example_headline(init: dict | None, train: dict | None, manifest: dict, bits: dict | None = None) -> str:
    """Two sentences for the top of the page: what the shipped run found, in numbers (and, with the shipped
    across-bits run, its frontier's reading)."""
    ppl = (init or {}).get("perplexity") or {}
    parts = []
    if ppl.get("qlora") is not None and ppl.get("quailora") is not None:
        ref = (f"{ppl['full']:.1f} (full precision) to " if ppl.get("full") else "")
        gap = (init.get("gap_closed") or {}).get("quailora")
        parts.append(f"4-bit quantization takes held-out perplexity from {ref}{ppl['qlora']:.1f}; QuAILoRA's "
                     f"initialization brings it back to **{ppl['quailora']:.1f}** before any training"
                     + (f", **{100 * gap:.0f}% of the 4-bit → 8-bit gap closed**" if gap is not None else "") + ".")
    arms = (train or {}).get("arms") or {}
    finals = [(a, e.get("final_perplexity")) for a, e in arms.items() if isinstance(e, dict)
              and e.get("final_perplexity") is not None]
    if finals:
        steps = (train.get("settings") or {}).get("steps")
        parts.append(f"After {steps} fine-tuning steps: "
                     + ", ".join(f"{F.label(a)} {p:.1f}" for a, p in finals) + ".")
    if (bits or {}).get("reading"):
        reading = bits["reading"]
        parts.append(f"Across bit widths (the *Across bits* tab beside the teaching views): {reading[:1].lower()}"
                     f"{reading[1:]}")
    if not parts:
        return ""
    model = model_title(init or train or {}).replace("the embedded ", "")
    quick = ", a quick development run" if manifest.get("preset") == "quick" else ""
    return (f"**The shipped example run** ({model}{quick}): " + " ".join(parts)
            + " [Its plots](#example-init) are in step 2 and [its curves](#example-train) in step 3 below; press "
              "*Compute it live* there to run it yourself.")


def example_views(root: str | Path = EXAMPLE_DIR, manifest: dict | None = None) -> dict[str, Any] | None:
    """The shipped example's teaching views (assets/example/views: a views run of the example's model, text, 4-bit
    settings, rank and calibration tokens, whose precision table reads the shipped init run), drawn by `views_drawn`
    (the seven figures and the precision table, as a views job shows them), with the label over them; None when the
    app ships none (or it does not read back)."""
    report = RunFolder(Path(root) / "views").read_report()
    if not report or report.get("kind") != "views" or report.get("status") != "finished" or not report.get("figures"):
        return None
    manifest = example_manifest(root) if manifest is None else manifest
    return {**views_drawn(report), "label": example_label("views", report, manifest)}


def example_outputs(manager: JobManager, root: str | Path = EXAMPLE_DIR) -> dict[str, Any] | None:
    """What the page shows before a visitor computes anything: the shipped example's init and fine-tuning runs,
    drawn by `run_outputs` (the same figures as a live or reopened run), each with its label; a headline and a
    results summary. None when the app ships no example (or it does not read back)."""
    try:
        runs = example_runs(root)
        if not runs:
            return None
        manifest = example_manifest(root)
        out: dict[str, Any] = {}
        for kind, run in runs.items():
            if kind not in ("init", "train"):  # the across-bits run: app/across_bits.example_bits draws it
                continue
            out[kind] = {**run_outputs(run, manager), "label": example_label(kind, run.report or {}, manifest)}
        views = example_views(root, manifest)
        if views:
            out["views"] = views
        init_job, train_job = (out[k]["job"] if k in out else None for k in ("init", "train"))
        out["headline"] = example_headline(runs["init"].report if "init" in runs else None,
                                           runs["train"].report if "train" in runs else None, manifest,
                                           runs["bits"].report if "bits" in runs else None)
        out["summary"] = ("**Shipped example run** (" + made_by(manifest) + "; your own runs replace it):\n\n"
                          + summary_text(init_job, train_job))
        return out
    except Exception as exc:  # noqa: BLE001 - a damaged example must not keep the app from starting
        warnings.warn(f"the shipped example in {root} is not shown: {one_line(exc)}", stacklevel=2)
        return None
