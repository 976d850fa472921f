"""The page's handlers: what each event of the page (and each endpoint of its headless API, docs/api.md) does.
No layout here: the sections build the components and `ui.py` wires them to these functions.

`Studio` holds the handlers that read the job manager, the open tabs and gradio's upload folders: sessions
(attach, a closed tab), starting and stopping jobs (`_submit`: the form's settings, sources vetted first), the
status endpoints, the pollers of the page's timers (`poller`, with `draw_init` / `draw_train` / `draw_views`
sending only what changed), downloads and reopened run folders. The module-level functions need no state.

gradio is imported here for its event protocol only: `gr.update` / `gr.skip()` as return values, `gr.Error` to
refuse with a message, `gr.Info` / `gr.Warning` toasts, and `gr.Request` as the annotation by which gradio hands a
handler the request (it resolves the annotation at runtime, so it cannot live under TYPE_CHECKING). What a job
shows is built by `presenters` (no gradio).
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from quailora_app.app import uploads as paths
from quailora_app.app.across_bits import bits_outputs, bits_points_of, bits_progress_html, make_bits_config
from quailora_app.app.forms import (
    describe_source,
    inspect_upload,
    make_init_config,
    make_train_config,
    make_train_config_from_init,
    make_views_config,
    session_owner,
    text_setting,
    vetted_sources,
)
from quailora_app.app.generation import (
    generate_cards,
    generate_outputs,
    generate_progress_html,
    live_report,
    make_generate_config,
    merged_zip,
    position_view,
    source_choices,
    source_folder,
)
from quailora_app.app.jobs import FINISHED, RUNNING, Job, JobManager
from quailora_app.app.presenters import (
    LIVE,
    VIEW_KEYS,
    init_views,
    model_layers,
    progress_html,
    reopened_outputs,
    report_of,
    status_text,
    summary_text,
    train_accuracy,
    train_outputs,
    views_drawn,
    zip_run,
)
from quailora_app.app.reopen import EXAMPLE_DIR, list_runs
from quailora_app.config import QUANTIZER_BITS
from quailora_app.errors import UserError, one_line
from quailora_app.flows.generate_source import read_run
from quailora_app.plots import figures as F
from quailora_app.plots.teaching import harm_gain_figure, paper_scatter
from quailora_app.runs import RunFolder
from quailora_app.sources.models import embedded_note
from quailora_app.teaching.how_it_works import how_it_works_markdown


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
def views_outputs(job: Job | None) -> dict[str, Any]:
    """Figures, precision table and layer picker update for a views job (placeholders until it finishes)."""
    out = views_drawn(report_of(job) if job is not None and job.kind == "views" else None)
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
def quantizer_settings(quantizer, bits):
    """The Setup's bits and bitsandbytes-only fields for `quantizer`: bits offered per quantizer (bitsandbytes 4;
    HQQ 2, 3, 4, 8), the shown bits kept when the new quantizer offers them, else its first offered (bitsandbytes'
    4, HQQ's 3 when coming from another width); NF4/FP4 and double quantization only for bitsandbytes."""
    offered = list(QUANTIZER_BITS.get(quantizer, QUANTIZER_BITS["bitsandbytes"]))
    try:
        shown = int(bits)
    except (TypeError, ValueError):
        shown = None
    value = shown if shown in offered else (3 if 3 in offered else offered[0])
    bnb = quantizer != "hqq"
    return gr.update(choices=offered, value=value), gr.update(interactive=bnb), gr.update(interactive=bnb)


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


def harm_gain(scale: str | None = None, bits: list[dict] | None = None):
    """The shipped harm-vs-gain scatter (assets/paper_scatter.json) on `scale`, one of HARM_GAIN_SCALES, with the
    bit widths `bits` of an across-bits run (plots/frontier.bits_harm_gain_points) as points of their own."""
    return harm_gain_figure(paper_scatter(), relative=scale == HARM_GAIN_SCALES[1], bits=bits)


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

    def __init__(self, manager: JobManager, view_ranks: tuple[int, ...], shipped_bits: dict | None = None,
                 shipped_generate: dict | None = None) -> None:
        self.manager = manager
        self.shipped_bits = shipped_bits  # the shipped example's across-bits report: its points in the scatter
        self.shipped_generate = shipped_generate  # the shipped example's generate report: its top-10 by position
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
        if job is not None and job.kind == "bits" and job.status != "queued":
            return bits_progress_html(job)
        if job is not None and job.kind == "generate" and job.status != "queued":
            return generate_progress_html(job)
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

    def attach_bits(self, session):
        owner = (session or {}).get("owner")
        job = self.manager.latest(owner, "bits") if owner else None
        return job.id if job else ""

    def attach_generate(self, session):
        owner = (session or {}).get("owner")
        job = self.manager.latest(owner, "generate") if owner else None
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

    def start_bits(self, session, request: gr.Request, **form):
        return self._submit("bits", session, request, form, make_bits_config)

    def start_generate(self, session, init_job_id, train_job_id, request: gr.Request, **form):
        """Generation from the run chosen in `gen_from`: the session's latest finished init or fine-tuning run
        (`init_job_id` / `train_job_id`, else the latest of each), or one of its run folders."""
        session, owner = session_owner(session)
        self.tabs.seen(request, owner)
        try:
            folder = source_folder(form.get("gen_from"), owner, self._latest_run(owner, init_job_id, train_job_id))
            config = make_generate_config(form, folder)
            read_run(folder)  # a run folder without adapters (or unfinished) is refused here, in one line
            job = self.manager.submit("generate", config, owner)
        except (UserError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None
        return session, job.id, self.status(self.manager.snapshot(job.id))

    def _latest_run(self, owner: str, init_job_id: str | None, train_job_id: str | None) -> str | None:
        """The run folder of the session's most recent init or fine-tuning job that has finished (a fine-tuning
        run stopped between steps counts: its adapters so far are saved); None when there is none."""
        jobs = []
        for kind, job_id in (("init", init_job_id), ("train", train_job_id)):
            job = self.manager.owned(job_id, owner) if job_id else None
            job = job if job is not None and job.kind == kind else self.manager.latest(owner, kind)
            if job is not None and not job.active and job.run_dir:
                jobs.append(job)
        for job in sorted(jobs, key=lambda j: j.created, reverse=True):
            report = RunFolder(Path(job.run_dir)).read_report() or {}
            if report.get("status") in (("finished",) if job.kind == "init" else ("finished", "stopped")):
                return job.run_dir
        return None

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

    def bits_status(self, session, job_id):
        job, refused = self.session_job(session, job_id)
        return (self.progress(job), refused or self.status(job), *bits_outputs(job))

    def generate_status(self, session, job_id):
        job, refused = self.session_job(session, job_id)
        return (self.progress(job), refused or self.status(job), *_generate_tuple(generate_outputs(job)))

    def generate_position(self, session, job_id, position):
        """The top-10 figure and the agreement strip at `position` of the session's generate job `job_id`, else of
        the shipped example's generate run."""
        job = self.session_job(session, job_id)[0]
        report = live_report(job) if job is not None and job.kind == "generate" else self.shipped_generate
        return position_view(report, position)

    def download_merged(self, session, job_id):
        """A zip of the merged model and the adapter folder of the session's generate job (run with deploy)."""
        job, refused = self.session_job(session, job_id)
        if refused:
            raise gr.Error(refused)
        if job is None or job.kind != "generate":
            raise gr.Error("no generate run of yours yet: the shipped example keeps no model weights; generate with "
                           "'what survives deployment' ticked")
        try:
            return merged_zip(live_report(job))
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    @staticmethod
    def generate_sources(session):
        return gr.update(choices=source_choices((session or {}).get("owner") if isinstance(session, dict) else None))

    def draw_generate(self, job: Job, other: Job | None, fresh: bool, changed: set[str]) -> tuple:
        """Generate panel after progress and status: the continuations for each new token, everything else for each
        measured variant (and a new status)."""
        if not fresh and "metrics" not in changed:
            if "tokens" not in changed:
                return tuple(_skips(9))
            return (generate_cards(job), *_skips(8))
        return _generate_tuple(generate_outputs(job))

    def harm_gain(self, scale, session=None, bits_job_id=""):
        """The "Across models" scatter on `scale` with the bit widths of the session's finished across-bits job
        `bits_job_id`, else the shipped example's."""
        job = self.session_job(session, bits_job_id)[0] if isinstance(bits_job_id, str) else None
        return harm_gain(scale, bits_points_of(job, self.shipped_bits))

    # ---------------------------------------------------------------- polling
    def poller(self, counts: Callable[[Job], dict[str, int]], draw: Callable[..., tuple], n_outputs: int,
               idle: bool = True, other_is_job: bool = True) -> Callable:
        """The timer handler of one job panel: (session, job_id, seen[, other_job_id]) -> (progress, status,
        n_outputs more, seen). Nothing is sent while the job's state key (id, version, status, elapsed second,
        and `counts(job)`) is unchanged; otherwise `draw(job, other_job, fresh, changed)` gives the n_outputs
        (gr.skip() for a part that need not be redrawn), where fresh = another job or status than last time and
        changed = the names of `counts` that moved. A missing job shows the idle panel once (`idle`) or nothing.
        `other_is_job`: the fourth input is a job id (other_job is that job of the session's, read when fresh);
        else its value is handed to `draw` as it is."""

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
            if not other_is_job:
                other = other_job_id
            else:  # for the results summary
                other = self.session_job(session, other_job_id)[0] if fresh else None
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

    def draw_bits(self, job: Job, scale: str, fresh: bool, changed: set[str]) -> tuple:
        """Across-bits panel after progress and status: the frontier, reading and table for each new point (and a
        new status), and the across-models scatter with the run's bit widths once it has finished."""
        drawn = bits_outputs(job) if "points" in changed else tuple(_skips(3))
        finished = fresh and job.status == FINISHED
        scatter = harm_gain(scale, bits_points_of(job, self.shipped_bits)) if finished else gr.skip()
        return (*drawn, scatter)

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


def count_init(job: Job) -> dict[str, int]:
    return LIVE.of(job, {"layers": sum(1 for e in job.events if e.get("kind") == "layer"),
                         "metrics": sum(1 for e in job.events if e.get("kind") == "metric")})


def count_bits(job: Job) -> dict[str, int]:
    return {"points": sum(1 for e in job.events if e.get("kind") == "metric")}


def count_generate(job: Job) -> dict[str, int]:
    return {"tokens": sum(1 for e in job.events if e.get("kind") == "token"),
            "metrics": sum(1 for e in job.events if e.get("kind") in ("metric", "log"))}


def _generate_tuple(v: dict[str, Any]) -> tuple:
    """The generate panel's outputs after progress and status (GeneratePanel.outputs)."""
    return (v["continuations"], v["strip"], v["summary"], v["versus"],
            gr.update(maximum=max(2, v["positions"]), value=v["position"]), v["top10"], v["deploy_table"],
            v["deploy_reading"], v["deploy_plot"])


def count_train(job: Job) -> dict[str, int]:
    return LIVE.of(job, {"points": sum(1 for e in job.events
                                       if e.get("kind") in ("train_step", "eval", "eval_accuracy", "metric")
                                       or F.is_arm_finished(e))})
