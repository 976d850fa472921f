"""The QuAILoRA Studio web app (the only module that imports gradio).

One page, top to bottom: 1 Setup, 2 Quantize & initialize (with the teaching views), 3 Fine-tune, 4 Results.
Compute runs in the process-wide `JobManager` worker (one job at a time, FIFO); the page only submits jobs and
polls them, so a closed tab does not stop a run and a reopened page re-attaches (the session's owner key lives
in the browser's localStorage through gr.BrowserState). No model is ever held in gradio state.

The page is built by one function per section (layout only) and wired to the handlers of `Studio`; the
settings reach the start handlers by name (gradio's `inputs_kwargs`: setting name -> component, the names of
`quailora_app.settings`), so nothing keeps a parameter order in step.

Headless API (gradio_client; every endpoint below has this explicit api_name). The start endpoints take the
settings by name, e.g. ``client.predict(session, model=..., rank=8, ..., api_name="/start_init")``:

- ``/attach(session) -> (session, init_job_id, train_job_id, queue_text)``
    `session` is a dict {"owner": key}; an empty dict gets a fresh owner key. Returns the owner's latest
    init and fine-tune job ids ("" if none), so a reopened page re-attaches.
- ``/dataset_columns(upload) -> (text_column, dataset_info)``: text columns of an uploaded
    .txt/.jsonl/.csv/.parquet file (pass ``handle_file(path)``) and a one-line description.
- ``/describe_dataset(dataset) -> dataset_info``: a line saying what a dataset name refers to.
- ``/model_note(model) -> note``: the honesty note shown for the embedded model ("" for other models).
- ``/start_init(session, model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha,
    rslora, targets, calib_samples, seq_len, eval_tokens, seed, methods, baselines, als_rounds, damping)
    -> (session, init_job_id, status)``: queue the quantize & initialize flow; bad settings raise an error.
- ``/init_status(session, job_id) -> (progress_html, status, layer_plot, heatmap_plot, perplexity_plot, numbers,
    report, model_note)``: the job's state; plots are plotly figures, numbers a table, report the
    report.json dict once the run has ended (partial for a stopped run).
- ``/stop_init(session, job_id) -> status`` and ``/stop_train(session, job_id) -> status``: ask a job to
    stop after its current step; only the session that started it can.
- ``/start_train(session, <the 15 setup settings of start_init>, als_rounds, damping, arms, steps,
    learning_rate, batch_size, grad_accum, eval_every, warmup_ratio) -> (session, train_job_id, status)``
- ``/train_status(session, job_id) -> (progress_html, status, curves_plot, throughput)``
- ``/download_run(session, which, init_job_id, train_job_id) -> (zip_file, summary)``: which = "init" or "train";
    zips that run folder (report, events, adapters).
- ``/view_layers(model) -> layer``: the layer picker's choices (every linear layer of the decoder blocks, read
    from the model's config on the meta device, no weights) and its default; empty for a model not on disk yet.
- ``/start_views(session, init_job_id, model, dataset, upload, text_column, quant, double_quant, block_size,
    eval_tokens, seed, als_rounds, damping, layer, views_rank, views_calib_samples, views_seq_len)
    -> (session, views_job_id, status)``: queue the teaching views of one layer ("" = the default layer) in the
    same worker; the latest finished init run of `init_job_id` feeds the precision trade-off.
- ``/views_status(session, job_id) -> (progress_html, status, weights, error, spectrum, energy, channels, rank_sweep,
    precision, precision_table, layer)``: the 7 plotly figures (empty until the job finishes) and the table.
- ``/stop_views(session, job_id) -> status``.
- ``/how_it_works(views_rank) -> markdown``: the method in one page (LaTeX in $$...$$ and $...$).
- ``/harm_gain(scale) -> plot``: the "Across models" scatter of QuAILoRA's gain against the harm of 4-bit over
    the embedded models, texts and ranks (assets/paper_scatter.json, made by bench/paper_table.py); scale is one
    of HARM_GAIN_SCALES.
- ``/list_runs(session) -> run_folder``: the run folders under the runs root (QUAILORA_RUNS) this session may
    reopen (its own, and the command line's), newest first; then the shipped example run ("shipped:init",
    "shipped:train": assets/example, made by bench/make_example.py, read-only).
- ``/reopen_run(session, run_folder) -> (summary, layer_plot, heatmap_plot, perplexity_plot, curves_plot, table,
    report, zip_file)``: redraw a run folder from its report.json / events.jsonl, also after a restart of the app.

Sessions are kept apart: the status, download and stop endpoints answer only for jobs of the calling session
(another session's job id gets a refusal line and empty plots). Uploads are checked (type, size) and copied into
the session's own folder, removed when its last tab closes; typed model and dataset paths are read only inside
the allowed folders (`quailora_app.app.uploads`).

On a first visit (no job of the session's own yet) steps 2 and 3 show the shipped example run, drawn by the same
presenters as a reopened run and labelled as such, with "Compute it live" beside; a job of the session's own
replaces it (`_wire_example`). Without assets/example the page starts with empty plots, as before.

The page itself polls through three private timer endpoints (poll_init, poll_train, poll_views), made by one
factory (`Studio.poller`), that skip unchanged figures.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from quailora_app.app import uploads as paths
from quailora_app.app.forms import (
    arm_choices,
    describe_source,
    inspect_upload,
    make_init_config,
    make_train_config,
    make_train_config_from_init,
    make_views_config,
    method_choices,
    method_info,
    session_owner,
    text_setting,
    vetted_sources,
)
from quailora_app.app.jobs import RUNNING, Job, JobManager, zerogpu_available
from quailora_app.app.presenters import (
    VIEW_KEYS,
    VIEW_TITLES,
    example_outputs,
    init_views,
    model_layers,
    progress_html,
    reopened_outputs,
    report_of,
    status_text,
    summary_text,
    train_accuracy,
    train_outputs,
    view_defaults,
    zip_run,
)
from quailora_app.app.reopen import EXAMPLE_DIR, list_runs
from quailora_app.config import ALL_LINEAR, InitConfig, TrainConfig
from quailora_app.errors import UserError, one_line
from quailora_app.plots import figures as F
from quailora_app.plots.teaching import CAPTIONS as VIEW_CAPTIONS
from quailora_app.plots.teaching import HARM_GAIN_CAPTION, harm_gain_figure, paper_scatter
from quailora_app.runs import RunFolder
from quailora_app.settings import settings
from quailora_app.sources.models import EMBEDDED_MODELS, EMBEDDED_NOTE, embedded_note
from quailora_app.teaching.how_it_works import how_it_works_markdown

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TARGET_CHOICES = (ALL_LINEAR, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UPLOAD_TYPES = paths.PICKER_TYPES

#: The settings each start endpoint takes, by name and in its API order (session first, not listed).
SETUP_NAMES = ("model", "dataset", "upload", "text_column", "quant", "double_quant", "block_size", "rank", "alpha",
               "rslora", "targets", "calib_samples", "seq_len", "eval_tokens", "seed")
INIT_NAMES = (*SETUP_NAMES, "methods", "baselines", "als_rounds", "damping", "accuracy_tasks", "label_items",
              "continuation_items")
TRAIN_NAMES = (*SETUP_NAMES, "als_rounds", "damping", "arms", "steps", "learning_rate", "batch_size", "grad_accum",
               "eval_every", "warmup_ratio", "start_from_init")
VIEWS_NAMES = ("model", "dataset", "upload", "text_column", "quant", "double_quant", "block_size", "eval_tokens",
               "seed", "als_rounds", "damping", "layer", "views_rank", "views_calib_samples", "views_seq_len")


# ------------------------------------------------------------------------------------------------ device
def device_summary() -> tuple[str, bool]:
    """(a line naming the device, whether it is a GPU)."""
    import torch  # heavy: only when a page is built

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}", True
    if zerogpu_available():
        return "ZeroGPU: a GPU is attached to each job while it runs", True
    return f"CPU ({torch.get_num_threads()} threads), no GPU", False


def default_settings(gpu: bool) -> dict[str, Any]:
    """Settings sized to the device (the others are the config dataclasses' defaults).

    CPU, with the embedded SmolLM2: every linear layer (as on a GPU), 16 x 256 calibration tokens (on 2 shared cores
    they already give the same per-layer errors as 256 x 256) and 2048 held-out tokens, sized for step 2 to finish
    within a minute on 2 idle cores. The 4-bit base's, the 8-bit and the full-precision perplexities, which no
    method changes, are measured once per model, text and settings and then read from the perplexity cache.
    `python bench/demo_time.py` runs exactly this configuration and times each stage."""
    if gpu:
        return dict(calib_samples=128, seq_len=512, eval_tokens=32768,
                    methods=list(settings(InitConfig)["methods"].choices()), baselines=True, targets=[ALL_LINEAR],
                    steps=200, batch_size=8, eval_every=20, learning_rate=2e-4,
                    accuracy_tasks=["labels", "continuation"], label_items=2000, continuation_items=500)
    return dict(calib_samples=16, seq_len=256, eval_tokens=2048, methods=["qlora", "svd", "quailora"],
                baselines=True, targets=[ALL_LINEAR], steps=10, batch_size=1, eval_every=5,
                learning_rate=2e-4, accuracy_tasks=[], label_items=200, continuation_items=100)


def _gradio_upload_roots() -> list[str]:
    """Where gradio keeps uploaded files (the only place an upload may come from)."""
    roots = [os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")]
    try:
        from gradio.utils import get_upload_folder  # not in every gradio release

        roots.append(str(get_upload_folder()))
    except Exception:  # noqa: BLE001 - older/newer gradio: the default above still holds
        pass
    return roots


# ------------------------------------------------------------------------------------------------ what a job shows
def _empty_view_figure(key: str):
    fig = go.Figure()
    fig.update_layout(title=VIEW_TITLES[key], height=220, template="plotly_white", xaxis_visible=False,
                      yaxis_visible=False, annotations=[{"text": "press “Compute views”", "showarrow": False,
                                                             "font": {"color": "#888"}}])
    return fig


def views_outputs(job: Job | None) -> dict[str, Any]:
    """Figures, precision table and layer picker update for a views job (placeholders until it finishes)."""
    report = report_of(job) if job is not None and job.kind == "views" else None
    figures = (report or {}).get("figures") or {}
    out: dict[str, Any] = {k: (pio.from_json(figures[k]) if k in figures else _empty_view_figure(k)) for k in VIEW_KEYS}
    header = list((report or {}).get("precision_header") or ["format"])
    out["table"] = pd.DataFrame((report or {}).get("precision_rows") or [], columns=header)
    layers = next((e for e in reversed(job.events) if e.get("kind") == "layers"), None) if job else None
    if layers:
        out["layer"] = gr.update(choices=[("default: " + layers["default"], "")] + list(layers["names"]),
                                 value=layers["layer"] if layers["layer"] != layers["default"] else "")
    else:
        out["layer"] = gr.update()
    return out


def _views_tuple(job: Job | None) -> tuple:
    v = views_outputs(job)
    return (*[v[k] for k in VIEW_KEYS], v["table"], v["layer"])


# ------------------------------------------------------------------------------------------------ stateless handlers
def dataset_columns(upload):
    if not upload:
        return gr.update(choices=[], value=None), ""
    try:
        cols, guess, info = inspect_upload(upload)
    except UserError as exc:
        return gr.update(choices=[], value=None), f"**Refused:** {exc}"
    return gr.update(choices=cols, value=guess), info


def describe_dataset(dataset):
    return describe_source(dataset)


def model_note(model):
    return f"<small>{embedded_note(model)}</small>" if embedded_note(model) else ""


def view_layers(model):
    try:
        names, default = model_layers(paths.check_user_path(text_setting(model, "model"), "model"))
    except Exception:  # noqa: BLE001 - the job checks the model properly; here only the picker is filled
        names, default = [], ""
    if not names:
        return gr.update(choices=[("default (chosen by the app)", "")], value="")
    return gr.update(choices=[(f"default: {default}", "")] + names, value="")


def how_it_works(views_rank):
    return how_it_works_markdown(int(views_rank) if views_rank and views_rank >= 1 else None)


#: the scales of the "Across models" scatter: perplexity differences, or logs of perplexity ratios
HARM_GAIN_SCALES = ("perplexity points", "log ratios (texts of different perplexity on one footing)")


def harm_gain(scale: str | None = None):
    """The shipped harm-vs-gain scatter (assets/paper_scatter.json) on `scale`, one of HARM_GAIN_SCALES."""
    return harm_gain_figure(paper_scatter(), relative=scale == HARM_GAIN_SCALES[1])


def harm_gain_source(data: dict) -> str:
    """Where the shipped scatter's points (`paper_scatter()`) come from: the command, its settings' size and the
    machine."""
    if not data["points"]:
        return "No points shipped yet: `python bench/paper_table.py` measures them."
    s = data.get("settings") or {}
    return (f"Measured ahead by `bench/paper_table.py`: {len(data['points'])} init runs, "
            f"{s.get('calib_samples', '?')} x {s.get('seq_len', '?')} calibration tokens and "
            f"{s.get('eval_tokens', '?')} held-out tokens per text; {data.get('machine', '')}. Its table, downstream "
            f"accuracy included, is in bench/README.md. Command: `{data.get('command', '')}`")


def runs_to_reopen(session):
    choices = list_runs((session or {}).get("owner") if isinstance(session, dict) else None, example=EXAMPLE_DIR)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


# ------------------------------------------------------------------------------------------------ session handlers
class _Tabs:
    """Open pages (gradio session hashes) per owner key, so a closed tab can clean up its owner's uploads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner_of: dict[str, str] = {}

    def seen(self, request: Any, owner: str) -> None:
        key = getattr(request, "session_hash", None)
        if key:
            with self._lock:
                self._owner_of[key] = owner

    def closed(self, request: Any) -> str | None:
        with self._lock:
            return self._owner_of.pop(getattr(request, "session_hash", None) or "", None)

    def owners(self) -> set[str]:
        with self._lock:
            return set(self._owner_of.values())


def _shown_if(figure, shown: bool):
    """A figure update that also shows or hides its plot (the accuracy panel exists only when a run scores)."""
    return gr.update(value=figure, visible=shown)


def _skips(n: int) -> list:
    return [gr.skip()] * n


class Studio:
    """The page's handlers: each reads the job manager, the open tabs and gradio's upload folders."""

    def __init__(self, manager: JobManager, view_ranks: tuple[int, ...]) -> None:
        self.manager = manager
        self.tabs = _Tabs()
        self.upload_roots = _gradio_upload_roots()
        self.view_ranks = view_ranks

    def session_job(self, session: dict | None, job_id: str | None) -> tuple[Job | None, str | None]:
        """(the job if this session owns it, else None; a refusal line when the id is someone else's or unknown)."""
        if not job_id:
            return None, None
        job = self.manager.owned(job_id, (session or {}).get("owner"))
        refusal = f"No job `{one_line(job_id, 40)}` in this session: a session sees only its own jobs."
        return job, (None if job else refusal)

    def progress(self, job: Job | None) -> str:
        return progress_html(job, self.manager)

    def status(self, job: Job | None) -> str:
        return status_text(job, self.manager)

    # ---------------------------------------------------------------- sessions
    def attach(self, session, request: gr.Request):
        session, owner = session_owner(session)
        self.tabs.seen(request, owner)
        paths.sweep_uploads(keep=self.manager.active_owners() | self.tabs.owners())
        ij, tj = self.manager.latest(owner, "init"), self.manager.latest(owner, "train")
        running, waiting = self.manager.queue_length()
        return session, ij.id if ij else "", tj.id if tj else "", f"Server queue: {running} running, {waiting} waiting."

    def attach_views(self, session):
        owner = (session or {}).get("owner")
        job = self.manager.latest(owner, "views") if owner else None
        return job.id if job else ""

    def session_ended(self, request: gr.Request):
        """A tab closed: its owner's uploads go, unless another tab or a queued/running job still needs them
        (then the idle sweep removes them later)."""
        owner = self.tabs.closed(request)
        if owner and owner not in self.tabs.owners() and owner not in self.manager.active_owners():
            paths.remove_session_uploads(owner)

    # ---------------------------------------------------------------- starting and stopping jobs
    def _submit(self, kind: str, session, request, form: Mapping[str, Any], make: Callable[[dict], Any]):
        """Check the form's settings (sources first), queue the job; (session, job id, status line)."""
        session, owner = session_owner(session)
        self.tabs.seen(request, owner)
        try:
            model, dataset, upload = vetted_sources(form.get("model"), form.get("dataset"), form.get("upload"), owner,
                                                    self.upload_roots)
            job = self.manager.submit(kind, make({**form, "model": model, "dataset": dataset, "upload": upload}), owner)
        except (UserError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None
        return session, job.id, self.status(self.manager.snapshot(job.id))

    def start_init(self, session, request: gr.Request, **form):
        return self._submit("init", session, request, form, make_init_config)

    def start_train(self, session, init_job_id, request: gr.Request, **form):
        """Fine-tuning from the session's latest finished init run when `start_from_init` (the default) and the
        Setup still matches it; else from the Setup's settings. A toast says which and why."""
        session, owner = session_owner(session)
        from_init = form.pop("start_from_init", True)
        init = self._finished_init(owner, init_job_id) if from_init else None
        if from_init and init is not None and init.active:
            raise gr.Error(f"init run {Path(init.run_dir or '').name or init.id} is still running: wait for it to "
                           "finish, or untick 'start from my latest init run'")
        notes: list[str] = []

        def make(values: dict):
            if not from_init:
                return make_train_config(values)
            config, note = make_train_config_from_init(values, init.run_dir if init else None)
            notes.append(note)
            return config

        answer = self._submit("train", session, request, form, make)
        if notes and notes[0]:
            gr.Info(notes[0])
        return answer

    def start_views(self, session, init_job_id, request: gr.Request, **form):
        session, owner = session_owner(session)
        reports = self._init_reports(owner, init_job_id)
        return self._submit("views", session, request, form,
                            lambda values: make_views_config(values, self.view_ranks, reports))

    def _session_init(self, owner: str, init_job_id: str | None) -> Job | None:
        """`init_job_id`'s init job when this owner has it, else the owner's latest init job (None if none)."""
        init = self.manager.owned(init_job_id, owner) if init_job_id else None
        return init if init is not None and init.kind == "init" else self.manager.latest(owner, "init")

    def _finished_init(self, owner: str, init_job_id: str | None) -> Job | None:
        """The session's init job (`_session_init`) when it is running or has finished with a report; None when
        there is none, or it failed or was stopped."""
        init = self._session_init(owner, init_job_id)
        if init is None or not init.run_dir:
            return None
        if init.active:
            return init
        report = RunFolder(Path(init.run_dir)).read_report()
        return init if report and report.get("status") == "finished" else None

    def _init_reports(self, owner: str, init_job_id: str | None) -> list[str]:
        """The init run folder whose perplexities go into the views' precision table: `init_job_id`'s, else the
        owner's latest init (none before a report.json exists)."""
        init = self._session_init(owner, init_job_id)
        return [init.run_dir] if init and init.run_dir and RunFolder(Path(init.run_dir)).report_path.is_file() else []

    def stop(self, session, job_id):
        if not (session or {}).get("owner"):
            return "this session has no jobs to stop"
        return self.manager.stop(job_id, session_owner(session)[1])

    # ---------------------------------------------------------------- status
    def init_status(self, session, job_id):
        job, refused = self.session_job(session, job_id)
        v = init_views(job, self.manager)
        return (self.progress(job), refused or self.status(job), v["layers"], v["heatmap"], v["perplexity"],
                v["numbers"], v["report"], v["note"], _shown_if(v["accuracy"], v["accuracy_shown"]))

    def train_status(self, session, job_id):
        job, refused = self.session_job(session, job_id)
        return (self.progress(job), refused or self.status(job), *train_outputs(job), _shown_if(*train_accuracy(job)))

    def views_status(self, session, job_id):
        job, refused = self.session_job(session, job_id)
        return (self.progress(job), refused or self.status(job), *_views_tuple(job))

    # ---------------------------------------------------------------- polling
    def poller(self, counts: Callable[[Job], dict[str, int]], draw: Callable[..., tuple], n_outputs: int,
               idle: bool = True) -> Callable:
        """The timer handler of one job panel: (session, job_id, seen[, other_job_id]) -> (progress, status,
        n_outputs more, seen). Nothing is sent while the job's state key (id, version, status, elapsed second,
        and `counts(job)`) is unchanged; otherwise `draw(job, other_job, fresh, changed)` gives the n_outputs
        (gr.skip() for a part that need not be redrawn), where fresh = another job or status than last time and
        changed = the names of `counts` that moved. A missing job shows the idle panel once (`idle`) or nothing."""

        def poll(session, job_id, seen, other_job_id=""):
            job, refused = self.session_job(session, job_id)
            unchanged = (*_skips(2 + n_outputs), seen)
            if job is None:
                if not idle or seen.get("job") == job_id:
                    return unchanged
                return (self.progress(None), refused or self.status(None), *_skips(n_outputs), {"job": job_id})
            counted = counts(job)
            key = {"job": job.id, "version": job.version, "status": job.status,
                   "tick": int(job.elapsed) if job.status == RUNNING else -1, **counted}
            if key == seen:
                return unchanged
            fresh = seen.get("job") != job.id or seen.get("status") != job.status
            changed = {name for name, n in counted.items() if fresh or seen.get(name) != n}
            other = self.session_job(session, other_job_id)[0] if fresh else None  # for the results summary
            return (self.progress(job), self.status(job), *draw(job, other, fresh, changed), key)

        return poll

    def draw_init(self, job: Job, other: Job | None, fresh: bool, changed: set[str]) -> tuple:
        """Init panel after progress and status: the four figures, numbers, report, note, results summary."""
        parts = [p for p, count in (("layers", "layers"), ("heatmap", "layers"), ("perplexity", "metrics"),
                                    ("accuracy", "metrics")) if count in changed]
        v = init_views(job, self.manager, parts) if parts else {}
        accuracy = _shown_if(v["accuracy"], v["accuracy_shown"]) if "accuracy" in v else gr.skip()
        return (v.get("layers", gr.skip()), v.get("heatmap", gr.skip()), v.get("perplexity", gr.skip()),
                v.get("numbers", gr.skip()), v.get("report", gr.skip()) if fresh else gr.skip(),
                v.get("note", gr.skip()) if fresh else gr.skip(), accuracy,
                summary_text(job, other) if fresh else gr.skip())

    @staticmethod
    def draw_train(job: Job, other: Job | None, fresh: bool, changed: set[str]) -> tuple:
        """Fine-tuning panel after progress and status: curves, speed table, accuracy, results summary."""
        if "points" not in changed:
            return gr.skip(), gr.skip(), gr.skip(), summary_text(other, job) if fresh else gr.skip()
        return (*train_outputs(job), _shown_if(*train_accuracy(job)), summary_text(other, job) if fresh else gr.skip())

    @staticmethod
    def draw_views(job: Job, other: Job | None, fresh: bool, changed: set[str]) -> tuple:
        """Views panel after progress and status: redrawn only for another job or a new status."""
        return _views_tuple(job) if fresh else tuple(_skips(len(VIEW_KEYS) + 2))

    # ---------------------------------------------------------------- results
    def download_run(self, session, which, init_job_id, train_job_id):
        job, refused = self.session_job(session, init_job_id if which == "init" else train_job_id)
        summary = summary_text(self.session_job(session, init_job_id)[0], self.session_job(session, train_job_id)[0])
        if refused:
            raise gr.Error(refused)
        if job is None or not job.run_dir:
            raise gr.Error("that run has not started yet")
        if job.active:
            gr.Warning("the run is still going: the zip holds what it has written so far")
        return zip_run(job.run_dir), summary

    def reopen_run(self, session, name):
        owner = (session or {}).get("owner") if isinstance(session, dict) else None
        try:
            v = reopened_outputs(name, owner, self.manager)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        return v["summary"], v["layers"], v["heatmap"], v["perplexity"], v["curves"], v["table"], v["report"], v["zip"]


def _count_init(job: Job) -> dict[str, int]:
    return {"layers": sum(1 for e in job.events if e.get("kind") == "layer"),
            "metrics": sum(1 for e in job.events if e.get("kind") == "metric")}


def _count_train(job: Job) -> dict[str, int]:
    return {"points": sum(1 for e in job.events
                          if e.get("kind") in ("train_step", "eval", "eval_accuracy", "metric")
                          or F.is_arm_finished(e))}


# ------------------------------------------------------------------------------------------------ sections (layout)
@dataclass
class JobPanel:
    """Start / stop buttons, the job id, its progress bar and status line, and a hidden refresh button (the
    status endpoint's trigger)."""

    start: gr.Button
    stop: gr.Button
    job: gr.Textbox
    progress: gr.HTML
    status: gr.Markdown
    refresh: gr.Button


def _job_row(start_label: str, key: str) -> tuple[gr.Button, gr.Button, gr.Textbox]:
    with gr.Row():
        start = gr.Button(start_label, variant="primary", scale=2, elem_id=f"start-{key}")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id=f"stop-{key}")
        job = gr.Textbox("", label="job id", interactive=False, scale=1, max_lines=1, elem_classes="jobid")
    return start, stop, job


@dataclass
class ExampleBanner:
    """The line over a section's plots while they show the shipped example run (`example_outputs`), with a
    'Compute it live' button beside it (it presses the section's start button: the same start, the Setup's
    settings); both go once the visitor has a job of that kind."""

    row: gr.Row
    live: gr.Button


def _example_banner(key: str, label: str | None) -> ExampleBanner:
    with gr.Row(visible=bool(label), equal_height=True, elem_id=f"example-{key}", elem_classes="example") as row:
        gr.Markdown(label or "", elem_classes="example-label")
        live = gr.Button("Compute it live", variant="primary", size="sm", scale=0, min_width=150, elem_id=f"live-{key}")
    return ExampleBanner(row, live)


@dataclass
class Setup:
    """Step 1 and the initialization choices: one input per setting name, and the lines about the choices."""

    fields: dict[str, gr.components.Component]
    model_note: gr.Markdown
    data_info: gr.Markdown

    def named(self, names: tuple[str, ...], more: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The inputs of `names`, from here or `more` (a later section's fields), for `inputs_kwargs`."""
        pool = {**self.fields, **(more or {})}
        return {name: pool[name] for name in names}


def setup_section(d: dict[str, Any]) -> Setup:
    """1 · Setup: model, text, 4-bit and LoRA settings, calibration text, initializations, advanced."""
    init = settings(InitConfig)
    gr.Markdown("## 1 · Setup", elem_classes="step")
    f: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column():
            f["model"] = gr.Dropdown(list(EMBEDDED_MODELS), value="embedded", allow_custom_value=True, label="Model",
                                     info="'embedded' = SmolLM2-135M-Instruct, 'embedded:gemma3' = Gemma 3 270M "
                                          "(Gemma Terms of Use), both offline; or type a hub id / local folder")
            note = gr.Markdown(f"<small>{EMBEDDED_NOTE}</small>", elem_classes="note")
        with gr.Column():
            f["dataset"] = gr.Dropdown(["embedded", "embedded:speeches"], value="embedded", allow_custom_value=True,
                                       label="Text", info="embedded = Rotten Tomatoes snippets; embedded:speeches = "
                                                          "2012 convention speeches; or a hub dataset id / local path")
            f["upload"] = gr.File(label="…or upload a text file (overrides the choice above)", file_types=UPLOAD_TYPES,
                                  type="filepath", height=150)
            f["text_column"] = gr.Dropdown([], value=None, allow_custom_value=True, label="Text column",
                                           info="filled from the uploaded file; empty = guess")
            info = gr.Markdown("", elem_classes="note")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=220):
            gr.Markdown("**4-bit quantization** (bitsandbytes)")
            f["quant"] = gr.Radio(list(init["quant"].choices()), value=init["quant"].default, label="4-bit data type")
            f["double_quant"] = gr.Checkbox(value=init["double_quant"].default,
                                            label="double quantization (quantize the scales too)")
            f["block_size"] = gr.Dropdown([32, 64, 128, 256], value=init["block_size"].default,
                                          label="block size (weights per scale)")
        with gr.Column(min_width=220):
            gr.Markdown("**LoRA adapter**")
            f["rank"] = gr.Slider(1, 128, value=init["rank"].default, step=1, label="rank r")
            f["alpha"] = gr.Number(value=init["alpha"].default, label="alpha (scale s = alpha / r)")
            f["rslora"] = gr.Checkbox(value=init["rslora"].default, label="rsLoRA (s = alpha / √r)")
            f["targets"] = gr.Dropdown(list(TARGET_CHOICES), value=d["targets"], multiselect=True,
                                       allow_custom_value=True, label="target modules", elem_id="targets",
                                       info="all-linear = every linear layer of the decoder blocks")
        with gr.Column(min_width=220):
            gr.Markdown("**Calibration and evaluation text**")
            f["calib_samples"] = gr.Number(value=d["calib_samples"], precision=0, label="calibration sequences")
            f["seq_len"] = gr.Number(value=d["seq_len"], precision=0, label="tokens per sequence")
            f["eval_tokens"] = gr.Number(value=d["eval_tokens"], precision=0, label="held-out tokens for perplexity")
            f["seed"] = gr.Number(value=init["seed"].default, precision=0, label="seed (fixes the data splits)")
    with gr.Row(equal_height=False):
        f["methods"] = gr.CheckboxGroup(method_choices(), value=d["methods"], label="initializations to compare",
                                        info=method_info())
        f["baselines"] = gr.Checkbox(value=d["baselines"], label="also measure full-precision and 8-bit perplexity")
    with gr.Row(equal_height=False):
        f["accuracy_tasks"] = gr.CheckboxGroup(
            [("few-shot labels (sentiment)", "labels"), ("continuation (multiple choice)", "continuation")],
            value=d["accuracy_tasks"], label="downstream accuracy (as lm-evaluation-harness scores it)",
            info="each variant answers held-out items by log-likelihood; 95% intervals shown. On a CPU it adds about "
                 "a minute per variant at the sizes below", elem_id="accuracy-tasks")
        f["label_items"] = gr.Number(value=d["label_items"], precision=0, label="labelled items per variant")
        f["continuation_items"] = gr.Number(value=d["continuation_items"], precision=0,
                                            label="continuation items per variant")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            f["als_rounds"] = gr.Number(value=init["als_rounds"].default, precision=0, label="QuAILoRA ALS rounds")
            f["damping"] = gr.Number(value=init["damping"].default, label="damping λ (× mean diagonal of H)")
    return Setup(f, note, info)


@dataclass
class InitPanel:
    """2 · Quantize & initialize: the job panel and what the run shows."""

    panel: JobPanel
    note: gr.Markdown
    layers: gr.Plot
    heatmap: gr.Plot
    perplexity: gr.Plot
    accuracy: gr.Plot  # shown only when the run scores downstream accuracy
    numbers: gr.Dataframe
    report: gr.JSON
    example: ExampleBanner | None = None

    @property
    def outputs(self) -> list:
        """In the order of /init_status's outputs (the accuracy panel last: the earlier places keep their index)."""
        p = self.panel
        return [p.progress, p.status, self.layers, self.heatmap, self.perplexity, self.numbers, self.report, self.note,
                self.accuracy]


def init_section(studio: Studio, shipped: dict[str, Any] | None = None) -> InitPanel:
    """`shipped`: the shipped example's init run (`example_outputs`), shown until the visitor has a job."""
    gr.Markdown("## 2 · Quantize & initialize", elem_classes="step")
    start, stop, job = _job_row("Quantize & initialize", "init")
    progress = gr.HTML(studio.progress(None), elem_id="init-progress")
    status = gr.Markdown("Nothing started yet in this session.", elem_id="init-status")
    sv = shipped or {}
    example = _example_banner("init", sv.get("label"))
    note = gr.Markdown(sv.get("note", ""), elem_classes="note")
    layers = gr.Plot(sv.get("layers") or F.layer_error_figure([]), label="per-layer error", show_label=False,
                     elem_id="layer-plot")
    gr.Markdown(F.CAPTIONS["layers"], elem_classes="caption")
    with gr.Row(equal_height=False):
        with gr.Column():
            heatmap = gr.Plot(sv.get("heatmap") or F.removal_heatmap([]), label="error removed", show_label=False,
                              elem_id="heatmap-plot")
            gr.Markdown(F.CAPTIONS["heatmap"], elem_classes="caption")
        with gr.Column():
            ppl = gr.Plot(sv.get("perplexity") or F.perplexity_figure([]), label="perplexity", show_label=False,
                          elem_id="ppl-plot")
            gr.Markdown(F.CAPTIONS["perplexity"], elem_classes="caption")
    accuracy = gr.Plot(sv.get("accuracy") or F.accuracy_figure([]), visible=bool(sv.get("accuracy_shown")),
                       label="downstream accuracy", show_label=False, elem_id="acc-plot")
    numbers = gr.Dataframe(sv["table"] if shipped else pd.DataFrame(columns=F.NUMBERS_HEADER),
                           label="numbers per variant", interactive=False, wrap=True,
                           column_widths=["28%", "14%", "12%", "10%", "12%", "12%", "12%"])
    with gr.Accordion("report.json", open=False):
        report = gr.JSON(sv.get("report"), label="report")
    refresh = gr.Button("refresh", visible=False)
    return InitPanel(JobPanel(start, stop, job, progress, status, refresh), note, layers, heatmap, ppl, accuracy,
                     numbers, report, example)


@dataclass
class ViewsPanel:
    """The teaching views of one layer and the How-it-works page."""

    panel: JobPanel
    fields: dict[str, gr.components.Component]  # layer, views_rank, views_calib_samples, views_seq_len
    plots: dict[str, gr.Plot]
    table: gr.Dataframe
    how: gr.Markdown
    harm_gain_scale: gr.Radio
    harm_gain: gr.Plot

    @property
    def outputs(self) -> list:
        """In the order of /views_status's outputs."""
        p = self.panel
        return [p.progress, p.status, *self.plots.values(), self.table, self.fields["layer"]]


def views_section(vd: dict[str, Any]) -> ViewsPanel:
    with gr.Tabs(elem_id="teaching-tabs"):
        with gr.Tab("Teaching views", elem_id="tab-views"):
            gr.Markdown(
                "Look inside **one layer** of the 4-bit model: its weights and quantization grid, the error, "
                "which directions of it the next layer actually feels, and how much each rank-r initialization "
                "removes. Uses the Setup's model, text and 4-bit settings; the precision table also reads the "
                "latest *Quantize & initialize* run when there is one. Runs in the same job queue.",
                elem_classes="note")
            f: dict[str, Any] = {}
            with gr.Row(equal_height=False):
                f["layer"] = gr.Dropdown([("default (chosen by the app)", "")], value="", allow_custom_value=True,
                                         label="layer", elem_id="view-layer", scale=3,
                                         info="every linear layer of the decoder blocks; the rank sweep averages "
                                              "over the chosen layer's block")
                f["views_rank"] = gr.Number(value=vd["rank"], precision=0, label="rank r of the views", scale=1,
                                            elem_id="view-rank")
                f["views_calib_samples"] = gr.Number(value=vd["calib_samples"], precision=0,
                                                     label="calibration sequences (views)", scale=1)
                f["views_seq_len"] = gr.Number(value=vd["seq_len"], precision=0, label="tokens per sequence (views)",
                                               scale=1)
            start, stop, job = _job_row("Compute views", "views")
            progress = gr.HTML("<div class='q-progress idle'><div class='q-label'>no views yet</div></div>",
                               elem_id="views-progress")
            status = gr.Markdown("", elem_id="views-status")
            plots = {}
            for key in VIEW_KEYS:
                plots[key] = gr.Plot(_empty_view_figure(key), label=VIEW_TITLES[key], show_label=False,
                                     elem_id=f"view-{key.replace('_', '-')}")
                gr.Markdown(VIEW_CAPTIONS[key], elem_classes="caption")
            table = gr.Dataframe(pd.DataFrame(columns=["format"]), interactive=False, wrap=True,
                                 label="precision trade-off: memory of the weights per storage format (perplexity from "
                                       "the latest Quantize & initialize run; – = not measured)",
                                 elem_id="precision-table")
            refresh = gr.Button("refresh", visible=False)
        with gr.Tab("How it works", elem_id="tab-how"):
            how = gr.Markdown(how_it_works_markdown(vd["rank"]), elem_id="how-it-works",
                              latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                                {"left": "$", "right": "$", "display": False}])
        with gr.Tab("Across models", elem_id="tab-harm-gain"):
            gr.Markdown(
                "The paper finds QuAILoRA's improvements **proportional to the harm of quantization**: the more 4-bit "
                "costs a model on a text, the more its initialization wins back. Here that claim is tested on the "
                "embedded models and texts at several ranks, measured ahead (no job to run).", elem_classes="note")
            scale = gr.Radio(list(HARM_GAIN_SCALES), value=HARM_GAIN_SCALES[0], label="scale",
                             elem_id="harm-gain-scale")
            shipped = paper_scatter()
            harm = gr.Plot(harm_gain_figure(shipped), show_label=False, elem_id="harm-gain-plot")
            gr.Markdown(HARM_GAIN_CAPTION, elem_classes="caption")
            gr.Markdown(harm_gain_source(shipped), elem_classes="caption", elem_id="harm-gain-source")
    return ViewsPanel(JobPanel(start, stop, job, progress, status, refresh), f, plots, table, how, scale, harm)


@dataclass
class TrainPanel:
    """3 · Fine-tune: the arms and training settings, the job panel, the curves and the speed table."""

    panel: JobPanel
    fields: dict[str, gr.components.Component]  # arms, steps, learning_rate, batch_size, eval_every, ...
    curves: gr.Plot
    throughput: gr.Dataframe
    accuracy: gr.Plot  # shown only when the run scores downstream accuracy
    example: ExampleBanner | None = None

    @property
    def outputs(self) -> list:
        """In the order of /train_status's outputs."""
        return [self.panel.progress, self.panel.status, self.curves, self.throughput, self.accuracy]


def train_section(studio: Studio, d: dict[str, Any], shipped: dict[str, Any] | None = None) -> TrainPanel:
    """`shipped`: the shipped example's fine-tuning run (`example_outputs`), shown until the visitor has a job."""
    train = settings(TrainConfig)
    gr.Markdown("## 3 · Fine-tune", elem_classes="step")
    f: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        f["arms"] = gr.CheckboxGroup(arm_choices(), value=list(train["arms"].default),
                                     label="arms to compare (same data, seed and steps)")
    with gr.Row():
        f["steps"] = gr.Number(value=d["steps"], precision=0, label="steps")
        f["learning_rate"] = gr.Number(value=d["learning_rate"], label="learning rate")
        f["batch_size"] = gr.Number(value=d["batch_size"], precision=0, label="batch (sequences per step)")
        f["eval_every"] = gr.Number(value=d["eval_every"], precision=0, label="evaluate every (steps)")
    with gr.Accordion("More training settings", open=False):
        with gr.Row():
            f["grad_accum"] = gr.Number(value=train["grad_accum"].default, precision=0, label="gradient accumulation")
            f["warmup_ratio"] = gr.Number(value=train["warmup_ratio"].default, label="warm-up share of steps")
    f["start_from_init"] = gr.Checkbox(value=True, elem_id="start-from-init", label=(
        "start from my latest init run (its model, text, held-out perplexities and initializations: the first step "
        "comes within seconds; the Setup must still match it)"))
    start, stop, job = _job_row("Start fine-tuning", "train")
    progress = gr.HTML(studio.progress(None), elem_id="train-progress")
    status = gr.Markdown("Nothing started yet in this session.", elem_id="train-status")
    sv = shipped or {}
    example = _example_banner("train", sv.get("label"))
    curves = gr.Plot(sv.get("curves") or F.train_figure([]), label="fine-tuning curves", show_label=False,
                     elem_id="curves-plot")
    gr.Markdown(F.CAPTIONS["train"], elem_classes="caption")
    throughput = gr.Dataframe(sv["table"] if shipped else pd.DataFrame(columns=F.TRAIN_HEADER),
                              label="speed and memory per arm", interactive=False)
    refresh = gr.Button("refresh", visible=False)
    accuracy = gr.Plot(F.train_accuracy_figure([]), visible=False, label="downstream accuracy per arm",
                       show_label=False, elem_id="train-acc-plot")
    return TrainPanel(JobPanel(start, stop, job, progress, status, refresh), f, curves, throughput, accuracy, example)


@dataclass
class Results:
    """4 · Results: download a run folder, the summary, the queue line, and reopening a run folder."""

    which: gr.Radio
    zip_button: gr.Button
    zip_file: gr.File
    summary: gr.Markdown
    queue_text: gr.Markdown
    run_pick: gr.Dropdown
    refresh_runs: gr.Button
    reopen: gr.Button
    reopened: list  # in the order of /reopen_run's outputs


def results_section(shipped_summary: str | None = None) -> Results:
    """`shipped_summary`: what the shipped example run found, shown until the visitor's own runs replace it."""
    gr.Markdown("## 4 · Results", elem_classes="step")
    with gr.Row():
        which = gr.Radio([("quantize & initialize run", "init"), ("fine-tuning run", "train")], value="init",
                         label="run folder to download", elem_id="which-run")
        zip_button = gr.Button("Zip the run folder (report, events, adapters)", elem_id="zip-run")
    zip_file = gr.File(label="download", interactive=False, elem_id="zip-file")
    summary = gr.Markdown(shipped_summary or "No results yet: run step 2 (and 3) first.", elem_id="summary")
    queue_text = gr.Markdown("", elem_classes="note")
    with gr.Accordion("Reopen a run folder (also after a restart of the app)", open=False, elem_id="reopen"):
        with gr.Row(equal_height=True):
            # custom values allowed: the choices are per session; /reopen_run checks the name itself
            run_pick = gr.Dropdown([], value=None, label="run folder", scale=3, elem_id="run-pick",
                                   allow_custom_value=True,
                                   info="this session's runs under the runs root (QUAILORA_RUNS), newest first; "
                                        "then the shipped example run (read-only)")
            refresh_runs = gr.Button("Refresh list", scale=1, elem_id="refresh-runs")
            reopen = gr.Button("Reopen", variant="primary", scale=1, elem_id="reopen-run")
        reopen_summary = gr.Markdown("", elem_id="reopen-summary")
        layers = gr.Plot(F.layer_error_figure([]), show_label=False, elem_id="reopen-layers")
        with gr.Row(equal_height=False):
            heatmap = gr.Plot(F.removal_heatmap([]), show_label=False, elem_id="reopen-heatmap")
            ppl = gr.Plot(F.perplexity_figure([]), show_label=False, elem_id="reopen-ppl")
        curves = gr.Plot(F.train_figure([]), show_label=False, elem_id="reopen-curves")
        table = gr.Dataframe(pd.DataFrame(columns=F.NUMBERS_HEADER), interactive=False, wrap=True,
                             label="numbers of the reopened run")
        with gr.Accordion("report.json of the reopened run", open=False):
            report = gr.JSON(label="report")
        reopen_zip = gr.File(label="download the reopened run folder", interactive=False, elem_id="reopen-zip")
    return Results(which, zip_button, zip_file, summary, queue_text, run_pick, refresh_runs, reopen,
                   [reopen_summary, layers, heatmap, ppl, curves, table, report, reopen_zip])


# ------------------------------------------------------------------------------------------------ wiring
_PRIVATE = dict(api_visibility="private", show_progress="hidden")


def _poll_timer(seconds: float, handler: Callable, inputs: list, outputs: list, name: str) -> None:
    gr.Timer(seconds).tick(handler, inputs, outputs, api_name=name, queue=False, **_PRIVATE)


def build_ui(manager: JobManager | None = None, *, poll_seconds: float = 1.0) -> gr.Blocks:
    """The whole page. `manager` defaults to a process-wide JobManager running the real engine."""
    device, gpu = device_summary()
    d, vd = default_settings(gpu), view_defaults(gpu)
    studio = Studio(manager or _default_manager(), tuple(vd["ranks"]))
    shipped = example_outputs(studio.manager) or {}  # the shipped example run (assets/example), if this app has one

    # gradio's own copies of uploads are deleted after an hour (and at shutdown); ours live per session
    with gr.Blocks(title="QuAILoRA Studio", fill_width=False, delete_cache=(3600, 3600)) as demo:
        session = gr.BrowserState({"owner": ""}, storage_key="quailora-studio-session")
        seen = {kind: gr.State({}) for kind in ("init", "train", "views")}
        gr.Markdown(
            "# QuAILoRA Studio\n"
            "Quantizing a language model to 4 bits saves memory but adds error to every weight. A LoRA adapter "
            "normally starts at zero (QLoRA); **QuAILoRA** starts it at a low-rank correction that cancels as much "
            "of that error as possible *on real activations*. Here you can measure, layer by layer, how much error "
            "each initialization removes, what that does to perplexity, and how fine-tuning then proceeds.",
            elem_classes="intro")
        gr.Markdown(f"**Device:** {device}. Defaults are sized for it"
                    + (": on CPU, LoRA on every linear layer, 16 x 256 calibration tokens and 2048 held-out tokens, "
                       "so step 2 takes about a minute with the embedded model (the 8-bit and full-precision "
                       "perplexities are measured once, then read from a cache)." if not gpu else "."),
                    elem_classes="device")
        headline = gr.Markdown(shipped.get("headline", ""), visible=bool(shipped.get("headline")),
                               elem_id="example-headline", elem_classes="example")
        setup = setup_section(d)
        init = init_section(studio, shipped.get("init"))
        views = views_section(vd)
        train = train_section(studio, d, shipped.get("train"))
        results = results_section(shipped.get("summary"))

        _wire_setup(demo, studio, session, setup, init, train, results)
        _wire_init(studio, session, seen["init"], setup, init, train, results, poll_seconds)
        _wire_train(studio, session, seen["train"], setup, init, train, results, poll_seconds)
        _wire_views(demo, studio, session, seen["views"], setup, init, views, poll_seconds)
        _wire_results(demo, studio, session, init, train, results)
        _wire_example(init, train, headline)
    # status calls are cheap and compute never runs inside a request: let many requests run side by side
    demo.queue(default_concurrency_limit=16)
    return demo


def _wire_setup(demo: gr.Blocks, studio: Studio, session, setup: Setup, init: InitPanel, train: TrainPanel,
                results: Results) -> None:
    f = setup.fields
    demo.load(studio.attach, [session], [session, init.panel.job, train.panel.job, results.queue_text],
              api_name="attach")
    demo.unload(studio.session_ended)
    f["upload"].change(dataset_columns, [f["upload"]], [f["text_column"], setup.data_info], api_name="dataset_columns")
    f["dataset"].change(describe_dataset, [f["dataset"]], [setup.data_info], api_name="describe_dataset")
    f["model"].change(model_note, [f["model"]], [setup.model_note], api_name="model_note")


def _wire_job(studio: Studio, session, panel: JobPanel, start: Callable, start_inputs: list,
              named: dict[str, Any], status: Callable, outputs: list, kind: str) -> None:
    """Start (settings by name), stop and status of one job panel."""
    panel.start.click(start, start_inputs, [session, panel.job, panel.status], inputs_kwargs=named,
                      api_name=f"start_{kind}")
    panel.stop.click(studio.stop, [session, panel.job], [panel.status], api_name=f"stop_{kind}")
    panel.refresh.click(status, [session, panel.job], outputs, api_name=f"{kind}_status")


def _wire_init(studio: Studio, session, seen, setup: Setup, init: InitPanel, train: TrainPanel, results: Results,
               poll_seconds: float) -> None:
    _wire_job(studio, session, init.panel, studio.start_init, [session], setup.named(INIT_NAMES), studio.init_status,
              init.outputs, "init")
    poll = studio.poller(_count_init, studio.draw_init, len(init.outputs) - 1)
    _poll_timer(poll_seconds, poll, [session, init.panel.job, seen, train.panel.job],
                [*init.outputs, results.summary, seen], "poll_init")


def _wire_train(studio: Studio, session, seen, setup: Setup, init: InitPanel, train: TrainPanel, results: Results,
                poll_seconds: float) -> None:
    _wire_job(studio, session, train.panel, studio.start_train, [session, init.panel.job],
              setup.named(TRAIN_NAMES, train.fields),
              studio.train_status, train.outputs, "train")
    poll = studio.poller(_count_train, studio.draw_train, len(train.outputs) - 1)
    _poll_timer(poll_seconds, poll, [session, train.panel.job, seen, init.panel.job],
                [*train.outputs, results.summary, seen], "poll_train")


def _wire_views(demo: gr.Blocks, studio: Studio, session, seen, setup: Setup, init: InitPanel, views: ViewsPanel,
                poll_seconds: float) -> None:
    model, layer = setup.fields["model"], views.fields["layer"]
    model.change(view_layers, [model], [layer], api_name="view_layers")
    demo.load(view_layers, [model], [layer], api_name="view_layers_on_load", **_PRIVATE)
    demo.load(studio.attach_views, [session], [views.panel.job], api_name="attach_views", **_PRIVATE)
    _wire_job(studio, session, views.panel, studio.start_views, [session, init.panel.job],
              setup.named(VIEWS_NAMES, views.fields), studio.views_status, views.outputs, "views")
    poll = studio.poller(lambda job: {}, studio.draw_views, len(views.outputs) - 2, idle=False)
    _poll_timer(poll_seconds, poll, [session, views.panel.job, seen], [*views.outputs, seen], "poll_views")
    views.fields["views_rank"].change(how_it_works, [views.fields["views_rank"]], [views.how], api_name="how_it_works")
    views.harm_gain_scale.change(harm_gain, [views.harm_gain_scale], [views.harm_gain], api_name="harm_gain")


def _wire_results(demo: gr.Blocks, studio: Studio, session, init: InitPanel, train: TrainPanel,
                  results: Results) -> None:
    results.zip_button.click(studio.download_run, [session, results.which, init.panel.job, train.panel.job],
                             [results.zip_file, results.summary], api_name="download_run")
    results.refresh_runs.click(runs_to_reopen, [session], [results.run_pick], api_name="list_runs")
    demo.load(runs_to_reopen, [session], [results.run_pick], api_name="list_runs_on_load", **_PRIVATE)
    results.reopen.click(studio.reopen_run, [session, results.run_pick], results.reopened, api_name="reopen_run")


def _wire_example(init: InitPanel, train: TrainPanel, headline: gr.Markdown) -> None:
    """While a section shows the shipped example run: its 'Compute it live' presses the section's start button;
    its banner (and, for step 2, the headline at the top) goes once the visitor has a job there (started, or
    re-attached on load), whose own figures then replace the shipped ones (the pollers draw them)."""
    for key, panel, more in (("init", init, [headline]), ("train", train, [])):
        if panel.example is None:
            continue
        panel.example.live.click(None, js=f"() => document.getElementById('start-{key}').click()",
                                 api_name=f"live_{key}", **_PRIVATE)
        outputs = [panel.example.row, *more]
        panel.panel.job.change(_shown_without_job(len(outputs)), [panel.panel.job], outputs,
                               api_name=f"example_{key}", queue=False, **_PRIVATE)


def _shown_without_job(n: int) -> Callable:
    """job id -> `n` visibility updates: shown while the id is empty."""

    def shown(job_id):
        update = gr.update(visible=not job_id)
        return update if n == 1 else [update] * n

    return shown


_MANAGER: JobManager | None = None


def _default_manager() -> JobManager:
    """One JobManager per process, shared by every page built in it."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = JobManager()
    return _MANAGER


def launch_options() -> dict[str, Any]:
    """Keyword arguments for `demo.launch()`: CSS, theme, and the port from PORT when GRADIO_SERVER_PORT is unset
    (gradio itself reads GRADIO_SERVER_NAME and GRADIO_SERVER_PORT)."""
    opts: dict[str, Any] = {
        "css_paths": [ASSETS / "style.css"],
        "theme": gr.themes.Soft(primary_hue="blue", font=["ui-sans-serif", "system-ui", "sans-serif"],
                                font_mono=["ui-monospace", "monospace"]),
        "allowed_paths": [str(Path(tempfile.gettempdir()) / "quailora-zips")],
        # gradio refuses larger uploads itself; the handlers check again (QUAILORA_MAX_UPLOAD_MB)
        "max_file_size": paths.max_upload_bytes(),
    }
    if os.environ.get("PORT") and not os.environ.get("GRADIO_SERVER_PORT"):
        opts["server_port"] = int(os.environ["PORT"])
        opts.setdefault("server_name", os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
    return opts
