"""What the "Across bits" tab shows and starts, without gradio: the live run's settings (the Setup's model, text,
LoRA shape and seed, and the tab's own bases, corrections, group size and token counts) as a BitsConfig, the job's
progress bar, the trade-off frontier with its one-line reading and its table, the bit widths as points of the
"Across models" scatter, and the shipped example's across-bits run (assets/example/bits).

The live default fits a free 2-core Space: three bit widths (HQQ 2, 3 and 4-bit, groups of 64) with the closed
form, one calibration of 32 x 256 tokens shared by the three bases, 4,096 held-out tokens: 107 to 164 s measured on
2 idle cores with the embedded SmolLM2 (the svd beside it took 236 s: left to the visitor to tick);
bench/make_example.py ships exactly this run.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from quailora_app.app.forms import form_values, one_line_errors
from quailora_app.app.jobs import FINISHED, RUNNING, Job
from quailora_app.app.presenters import DRAWN, ended_bar, job_key, made_by, model_title, report_of
from quailora_app.app.reopen import EXAMPLE_DIR, example_manifest
from quailora_app.config import ALL_LINEAR, BitsConfig
from quailora_app.engine.methods.registry import QLORA, find_method
from quailora_app.flows.bits import base_label
from quailora_app.plots.frontier import FRONTIER_HEADER, bits_harm_gain_points, frontier_figure, frontier_rows
from quailora_app.runs import RunFolder
from quailora_app.settings import build

#: The settings /start_bits takes, by name and in its API order (session first, not listed): the Setup's model,
#: text, LoRA shape and seed, then the tab's own (bits_* = the across-bits run's bases, methods, ...).
BITS_NAMES = ("model", "dataset", "upload", "text_column", "rank", "alpha", "rslora", "targets", "seed",
              "bits_bases", "bits_methods", "bits_group_size", "bits_calib_samples", "bits_seq_len",
              "bits_eval_tokens")
#: the tab's names for the BitsConfig settings it sets itself
TAB_NAMES = {"bits_bases": "bases", "bits_methods": "methods", "bits_group_size": "group_size",
             "bits_calib_samples": "calib_samples", "bits_seq_len": "seq_len", "bits_eval_tokens": "eval_tokens"}
#: what the live default runs on CPU (and bench/make_example.py ships): three bit widths, the closed form
CPU_DEFAULTS = {"bases": ["hqq2", "hqq3", "hqq4"], "methods": ["closed_form"], "group_size": 64, "calib_samples": 32,
                "seq_len": 256, "eval_tokens": 4096}
GPU_DEFAULTS = {"bases": ["hqq2", "hqq3", "hqq4", "hqq8", "nf4", "int8"], "methods": ["svd", "closed_form"],
                "group_size": 64, "calib_samples": 64, "seq_len": 512, "eval_tokens": 16384}
#: the rest of the live default (the Setup's values on CPU): the shipped run uses them too
SETUP_DEFAULTS = {"model": "embedded", "dataset": "embedded", "rank": 16, "alpha": 16.0, "targets": [ALL_LINEAR],
                  "seed": 0}
#: (stage, chip text, share of the run's time: measured on 2 cores with the CPU default)
BITS_STAGES = [("load", "load model & text", 0.03), ("quantize", "quantize to each base", 0.22),
               ("calibrate", "calibrate once, correct every base", 0.38), ("evaluate", "perplexity per base", 0.32),
               ("baseline", "full precision", 0.05)]
_STAGE_OF = {"data": "load", "initialize": "calibrate"}


def bits_defaults(gpu: bool) -> dict[str, Any]:
    """The tab's own settings on this device (a copy)."""
    d = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    return {k: (list(v) if isinstance(v, list) else v) for k, v in d.items()}


def default_bits_config(**over: Any) -> BitsConfig:
    """The live CPU default as a BitsConfig (what bench/make_example.py ships); `over` replaces settings by name."""
    return build(BitsConfig, {**SETUP_DEFAULTS, **CPU_DEFAULTS, **over})


@one_line_errors
def make_bits_config(values: Mapping[str, Any]) -> BitsConfig:
    """The Setup's and the tab's fields by setting name (BITS_NAMES) -> BitsConfig."""
    values = {TAB_NAMES.get(k, k): v for k, v in values.items()}
    return build(BitsConfig, form_values(BitsConfig, values))


# ------------------------------------------------------------------------------------------------ progress
def _count(job: Job, kind: str, stage: str | None = None) -> int:
    return sum(1 for e in job.events if e.get("kind") == kind and (stage is None or e.get("stage") == stage))


def _points_measured(job: Job) -> int:
    return sum(1 for e in job.events if e.get("kind") == "metric" and e.get("name") != "full")


def _points_total(job: Job) -> int:
    cfg = job.config
    return len(getattr(cfg, "bases", ()) or ()) * (1 + len(getattr(cfg, "methods", ()) or ()))


def _left(job: Job, done: int, total: int, since: float | None) -> str:
    """' · about 40 s left' at the rate measured since `since`."""
    if job.status != RUNNING or since is None or not 0 < done < total:
        return ""
    rate = max(0.0, time.time() - since) / done
    left = rate * (total - done)
    return f" · about {left:.0f} s left" if left < 90 else f" · about {left / 60:.0f} min left"


def bits_progress(job: Job) -> tuple[int, float, str]:
    """(index of the current stage, overall fraction done, a line for it) of an across-bits job."""
    names = [s for s, _, _ in BITS_STAGES]
    weights = {s: w for s, _, w in BITS_STAGES}
    stage = _STAGE_OF.get(job.stage, job.stage)
    stage = stage if stage in weights else "load"
    idx = names.index(stage)
    frac = sum(weights[s] for s in names[:idx])
    bases = len(getattr(job.config, "bases", ()) or ()) or 1
    line = job.stage_message or stage
    if stage == "quantize":
        k = _count(job, "stage", "quantize")
        frac += weights[stage] * (k - 1) / bases
        line = f"{job.stage_message} ({k} of {bases})"
    elif stage == "calibrate" and job.stage == "calibrate" and job.total:
        frac += weights[stage] * job.done / job.total
        start = next((e.get("time") for e in reversed(job.events) if e.get("kind") == "stage"), None)
        line = (f"calibrate once for {bases} base{'s' if bases > 1 else ''}, correct each: block {job.done} of "
                f"{job.total}" + _left(job, job.done, job.total, start))
    elif stage == "evaluate":
        done, total = _points_measured(job), max(1, _points_total(job))
        frac += weights[stage] * min(1.0, done / total)
        start = next((e.get("time") for e in job.events if e.get("kind") == "stage" and e.get("stage") == "evaluate"),
                     None)
        line = f"{job.stage_message}: {done} of {total} points" + _left(job, done, total, start)
    return idx, min(frac, 1.0), line


def bits_progress_html(job: Job) -> str:
    return ended_bar(job, [text for _, text, _ in BITS_STAGES], *bits_progress(job))


# ------------------------------------------------------------------------------------------------ what it shows
def reading_markdown(report: Mapping | None, running: bool = False) -> str:
    """The run's one-line reading of its frontier, as Markdown (a line saying it is coming while it runs)."""
    reading = (report or {}).get("reading")
    if reading:
        return f"**Reading:** {reading}"
    if running:
        return "*The one-line reading appears when every base is measured.*"
    if report and report.get("points"):
        return "*No reading: the run measured no correction below the plain bases' bits.*"
    return ""


def bits_drawn(report: Mapping | None, running: bool = False) -> dict[str, Any]:
    """The frontier figure, its reading (Markdown) and its table (base, correction, bits per weight, perplexity,
    gap closed) of an across-bits report (partial while it runs)."""
    return {"frontier": frontier_figure(report), "reading": reading_markdown(report, running),
            "table": pd.DataFrame(frontier_rows(report), columns=FRONTIER_HEADER)}


def _live_report(job: Job | None) -> dict | None:
    """The job's report: the final one, or the partial report.json the run writes after every point."""
    report = report_of(job)
    if report is None and job is not None and job.run_dir:
        report = RunFolder(Path(job.run_dir)).read_report()
    return report if report and report.get("kind", "bits") == "bits" else None


def bits_outputs(job: Job | None) -> tuple[Any, str, pd.DataFrame]:
    """(frontier, reading, table) of an across-bits job, drawn once per new point."""
    if job is not None and job.kind != "bits":
        job = None
    points = _points_measured(job) if job else 0

    def draw() -> tuple:
        v = bits_drawn(_live_report(job), running=bool(job) and job.status == RUNNING)
        return v["frontier"], v["reading"], v["table"]

    return DRAWN.get((*job_key(job), "bits", points), draw)


def bits_points_of(job: Job | None, shipped: Mapping | None = None) -> list[dict]:
    """The bit widths as harm-against-gain points: of the session's finished across-bits job when it has one, else
    of `shipped` (the shipped example's report)."""
    report = _live_report(job) if job is not None and job.kind == "bits" and job.status == FINISHED else None
    return bits_harm_gain_points(report or shipped)


# ------------------------------------------------------------------------------------------------ shipped example
def bits_label(report: Mapping, manifest: Mapping) -> str:
    """The line over the shipped across-bits run: that it is the shipped example, its settings, how it was made."""
    s = report.get("settings") or {}
    data, lora = s.get("data") or {}, s.get("lora") or {}
    targets = list(lora.get("targets") or [])
    where = "all linear layers" if targets == [ALL_LINEAR] else ", ".join(targets)
    bases = [base_label(b, int(s.get("group_size") or 64)) for b in report.get("bases") or []]
    methods = [getattr(find_method(m), "short", m) for m in report.get("methods") or [] if m != QLORA]
    device = "CPU" if str(report.get("device", "")).startswith("cpu") else report.get("device", "?")
    seconds = (report.get("seconds") or {}).get("total")
    took = f", {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    made = dict(manifest.get("bits") or {}) or dict(manifest)
    body = (f"{model_title(dict(report))}: {'; '.join(bases)}, each plain and with {', '.join(methods) or 'no'} "
            f"correction at LoRA rank {lora.get('rank')} on {where}, one calibration of {data.get('calib_samples')} "
            f"× {data.get('seq_len')} tokens, {data.get('eval_tokens', 0):,} held-out tokens, {device}{took}")
    return f"**Shipped example run**: {body}; {made_by(made)}. Shown until you start your own."


def example_bits(root: str | Path = EXAMPLE_DIR) -> dict[str, Any] | None:
    """The shipped across-bits run (assets/example/bits) drawn by `bits_drawn`, with its label and report; None when
    the app ships none (or it does not read back)."""
    report = RunFolder(Path(root) / "bits").read_report()
    if not report or report.get("kind") != "bits" or report.get("status") != "finished" or not report.get("points"):
        return None
    return {**bits_drawn(report), "label": bits_label(report, example_manifest(root)), "report": report}
