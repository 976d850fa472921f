"""What the page shows of a job: stage progress, status lines, the init figures, the results summary, and a
reopened run folder's outputs, built from the job's events and report. No gradio here."""
from __future__ import annotations

import html
import shutil
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from quailora_app.app.forms import text_setting
from quailora_app.app.jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, Job, JobManager
from quailora_app.app.reopen import open_run
from quailora_app.config import ModelConfig
from quailora_app.errors import UserError, one_line
from quailora_app.plots import figures as F
from quailora_app.runs import RunFolder
from quailora_app.sources.models import EMBEDDED, EMBEDDED_NOTE, cache_dir, trust_remote_code
from quailora_app.teaching.snapshot import default_layer, layer_names

INIT_STAGES = [("load", "load model", 0.04), ("data", "read text", 0.04), ("quantize", "quantize to 4-bit", 0.07),
               ("calibrate", "calibrate + initialize", 0.55), ("evaluate", "perplexity per method", 0.2),
               ("baseline", "8-bit & full-precision baselines", 0.1)]
TRAIN_STAGES = [("load", "load model & text", 0.03), ("reference", "full-precision & 8-bit perplexity", 0.07),
                ("setup", "set up arms (quantize, calibrate, initialize)", 0.2), ("train", "train + evaluate", 0.7)]


def _stage_progress(job: Job) -> tuple[float, str]:
    """Overall fraction done and a line for the current stage of an init job."""
    names = [s for s, _, _ in INIT_STAGES]
    weights = {s: w for s, _, w in INIT_STAGES}
    stage = job.stage if job.stage in weights else ("calibrate" if job.stage == "initialize" else "load")
    current = names.index(stage)
    frac = sum(weights[s] for s in names[:current])
    if stage == "baseline":
        done = sum(1 for e in job.events if e.get("kind") == "metric" and e.get("name") in ("full", "int8"))
        frac += weights[stage] * done / 2
    elif job.total:
        frac += weights[stage] * job.done / job.total
    line = job.stage_message or stage
    if stage == "calibrate" and job.total:
        line = f"calibrate + initialize: block {job.done} of {job.total}"
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
        return min(frac, 1.0), line
    done = sum(last[a]["step"] / max(1, last[a]["total_steps"]) for a in last) / max(1, len(arms))
    per_arm = ", ".join(f"{F.label(a)} step {last[a]['step']}/{last[a]['total_steps']}" for a in last)
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
    return _stages_bar(job, [text for _, text, _ in stages], idx, frac, line)


def _stages_bar(job: Job, texts: list[str], idx: int, frac: float, line: str) -> str:
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
    what = {"init": "Quantize & initialize", "views": "Teaching views"}.get(job.kind, "Fine-tuning")
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
    note = (report or {}).get("model_note") or (EMBEDDED_NOTE if model_name in ("", "embedded") else "")
    return f"**About this model:** {note}" if note else ""


def init_views(job: Job | None, manager: JobManager, parts=("layers", "heatmap", "perplexity")) -> dict[str, Any]:
    events = job.events if job else []
    report = report_of(job)
    source = report if report and report.get("layers") else events
    out: dict[str, Any] = {}
    if "layers" in parts:
        n_blocks = job.total if job and job.stage == "calibrate" and job.total else None
        out["layers"] = F.layer_error_figure(source, n_blocks)
    if "heatmap" in parts:
        out["heatmap"] = F.init_heatmap(source, "quailora")  # with the budget method's ranks when it ran
    if "perplexity" in parts:
        methods = list(getattr(job.config, "methods", ()) or ()) if job else []
        out["perplexity"] = F.perplexity_figure(report if report and report.get("perplexity") else events, methods)
    if report:
        out["numbers"] = pd.DataFrame(F.numbers_table(report), columns=F.NUMBERS_HEADER)
    else:
        live = {"layers": F.layers_from(events), "perplexity": F.perplexities_from(events),
                "methods": list(getattr(job.config, "methods", ()) or ()) if job else []}
        out["numbers"] = pd.DataFrame(F.numbers_table(live), columns=F.NUMBERS_HEADER)
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
    folder = cache_dir() / "models" / "smollm2-135m-instruct" if name in ("", EMBEDDED) else Path(name).expanduser()
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
    return _stages_bar(job, [text for _, text in stages], idx, frac, line)


def summary_text(init_job: Job | None, train_job: Job | None) -> str:
    """A few plain sentences on what the runs found."""
    lines = []
    report = report_of(init_job)
    if report:
        ppl = report.get("perplexity") or {}
        lines.append(f"**Quantize & initialize** ({report.get('status', init_job.status)}): model "
                     f"`{report.get('model')}`, data `{Path(str(report.get('dataset'))).name}`, rank "
                     f"{report.get('rank')}, on {report.get('device')}.\n")
        if "qlora" in ppl:
            parts = [f"full precision {ppl['full']:.2f}" if ppl.get("full") else None,
                     f"8-bit {ppl['int8']:.2f}" if ppl.get("int8") else None, f"4-bit QLoRA {ppl['qlora']:.2f}"]
            lines.append("- Perplexity: " + ", ".join(p for p in parts if p) + ".")
        for m in report.get("methods", []):
            if m == "qlora" or ppl.get(m) is None:
                continue
            gap = (report.get("gap_closed") or {}).get(m)
            errs = [r["calibrated_error"][m] for r in report.get("layers", []) if m in r.get("calibrated_error", {})]
            err = F._median(errs)
            lines.append(f"- {F.label(m)}: perplexity {ppl[m]:.2f}"
                         + (f", closes {100 * gap:.0f}% of the 4-bit→8-bit gap" if gap is not None else "")
                         + (f"; median layer keeps {100 * err:.0f}% of QLoRA's activation error"
                            if err is not None else "")
                         + ".")
        for m, details in (report.get("method_details") or {}).items():  # a model-level method's KL (distill)
            kl = details.get("kl") if isinstance(details, dict) else None
            held = {k: (v or {}).get("holdout") for k, v in kl.items()} if isinstance(kl, dict) else {}
            if held.get(m) is not None and held.get("closed_form") is not None:
                lines.append(f"- {F.label(m)}: KL to the full-precision model on held-out calibration windows "
                             f"{held['closed_form']:.4f} → {held[m]:.4f} (closed form → {m}); "
                             f"{details.get('overfitting', '')}.")
        for m, why in (report.get("unavailable") or {}).items():
            lines.append(f"- {m}: not computed ({why}).")
        if report.get("model_note"):
            lines.append(f"- Note on the model: {report['model_note']}")
    if train_job is not None:
        finished = [e for e in train_job.events if F._is_arm_finished(e)]
        state = {CANCELLED: "stopped by the user"}.get(train_job.status, train_job.status)
        lines.append(f"\n**Fine-tuning** ({state}), perplexity on the held-out text:\n")
        for e in finished:
            lines.append(f"- {F.label(e['arm'])}: final perplexity {e['final_perplexity']:.2f}, best "
                         f"{e['best_perplexity']:.2f}, {e['seconds']:.0f} s.")
        if not finished:
            lines.append("- no arm has finished yet.")
    return "\n".join(lines) or "No results yet: run step 2 (and 3) first."


def zip_run(run_dir: str) -> str:
    """Zip a run folder into the temp dir; returns the zip's path."""
    src = Path(run_dir)
    out_dir = Path(tempfile.gettempdir()) / "quailora-zips" / uuid.uuid4().hex[:8]
    out_dir.mkdir(parents=True, exist_ok=True)
    return shutil.make_archive(str(out_dir / src.name), "zip", root_dir=src.parent, base_dir=src.name)


# ------------------------------------------------------------------------------------------------ reopen
_REPORT_STATUS = {"finished": FINISHED, "cancelled": CANCELLED, "stopped": CANCELLED, "failed": FAILED}


def reopened_outputs(name: Any, owner: str | None, manager: JobManager) -> dict[str, Any]:
    """Figures, tables, report and a zip of a run folder under the runs root (this owner's or the CLI's), read
    back from report.json / events.jsonl: what a finished job shows, after a restart of the app."""
    run = open_run(text_setting(name, "run folder"), owner)
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
    job = Job(id="", kind=run.kind, owner=owner or "", config=config, status=status, events=run.events,
              run_dir=str(run.run_dir), report=run.report, message=str(message))
    out: dict[str, Any] = {"layers": F.layer_error_figure([]), "heatmap": F.removal_heatmap([]),
                           "perplexity": F.perplexity_figure([]), "curves": F.train_figure([]),
                           "table": pd.DataFrame(columns=F.NUMBERS_HEADER), "report": run.report}
    what = {"init": "Quantize & initialize", "train": "Fine-tuning", "views": "Teaching views"}[run.kind]
    error = f": {one_line(report['error'])}" if report.get("error") else ""
    head = f"**Reopened `{run.name}`** ({what}, {run.status}{error})."
    if run.kind == "init":
        v = init_views(job, manager)
        out.update(layers=v["layers"], heatmap=v["heatmap"], perplexity=v["perplexity"], table=v["numbers"])
        out["summary"] = head + "\n\n" + summary_text(job, None)
    elif run.kind == "train":
        out["curves"] = F.train_figure(run.events, arms)
        out["table"] = pd.DataFrame(F.train_table(run.events, arms), columns=F.TRAIN_HEADER)
        out["summary"] = head + "\n\n" + summary_text(None, job)
    else:
        out["summary"] = head + " Its seven figures are in report.json inside the zip."
    out["zip"] = zip_run(str(run.run_dir))
    return out
