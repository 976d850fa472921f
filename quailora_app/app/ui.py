"""The QuAILoRA Studio web app (the only module that imports gradio).

One page, top to bottom: 1 Setup, 2 Quantize & initialize, 3 Fine-tune, 4 Results. Compute runs in the
process-wide `JobManager` worker (one job at a time, FIFO); the page only submits jobs and polls them, so a
closed tab does not stop a run and a reopened page re-attaches (the session's owner key lives in the
browser's localStorage through gr.BrowserState). No model is ever held in gradio state.

Headless API (gradio_client; every endpoint below has this explicit api_name):

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
- ``/start_train(session, <the 19 setup settings of start_init, methods excluded>, arms, steps,
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
- ``/list_runs(session) -> run_folder``: the run folders under the runs root (QUAILORA_RUNS) this session may
    reopen (its own, and the command line's), newest first.
- ``/reopen_run(session, run_folder) -> (summary, layer_plot, heatmap_plot, perplexity_plot, curves_plot, table,
    report, zip_file)``: redraw a run folder from its report.json / events.jsonl, also after a restart of the app.

Sessions are kept apart: the status, download and stop endpoints answer only for jobs of the calling session
(another session's job id gets a refusal line and empty plots). Uploads are checked (type, size) and copied into
the session's own folder, removed when its last tab closes; typed model and dataset paths are read only inside
the allowed folders (`quailora_app.app.uploads`).

The page itself polls through three private timer endpoints (poll_init, poll_train, poll_views) that skip unchanged
figures.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from quailora_app import config as _config
from quailora_app.plots import figures as F
from quailora_app.config import ALL_LINEAR, INIT_METHODS
from quailora_app.errors import UserError
from quailora_app.app.forms import (
    describe_source,
    inspect_upload,
    make_init_config,
    make_train_config,
    make_views_config,
    one_line,
    session_owner,
    text_setting,
    vetted_sources,
)
from quailora_app.app.jobs import RUNNING, Job, JobManager, training_available, zerogpu_available
from quailora_app.app.presenters import (
    VIEW_KEYS,
    VIEW_TITLES,
    init_views,
    model_layers,
    progress_html,
    reopened_outputs,
    report_of,
    status_text,
    summary_text,
    view_defaults,
    zip_run,
)
from quailora_app.app.reopen import list_runs
from quailora_app.app import uploads as paths
from quailora_app.sources.models import EMBEDDED_NOTE
from quailora_app.teaching.views import how_it_works_markdown
from quailora_app.plots.teaching import CAPTIONS as VIEW_CAPTIONS

ASSETS = Path(__file__).resolve().parents[2] / "assets"
ARMS = getattr(_config, "ARMS", ("qlora4", "quailora4", "closed4", "svd4", "qlora8", "quailora8", "lora16"))
DEFAULT_ARMS = getattr(_config, "DEFAULT_ARMS", ("qlora4", "quailora4", "qlora8"))
TARGET_CHOICES = (ALL_LINEAR, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UPLOAD_TYPES = paths.PICKER_TYPES


# ------------------------------------------------------------------------------------------------ device
def device_summary() -> tuple[str, bool]:
    """(a line naming the device, whether it is a GPU)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}", True
    if zerogpu_available():
        return "ZeroGPU: a GPU is attached to each job while it runs", True
    return f"CPU ({torch.get_num_threads()} threads), no GPU", False


def default_settings(gpu: bool) -> dict[str, Any]:
    """Settings sized to the device.

    CPU (measured on 2 shared cores with the embedded SmolLM2): 16 x 256 calibration tokens already give the
    same per-layer errors as 256 x 256; held-out perplexity of five models (4-bit + each method, 8-bit, full)
    and calibration dominate the time, so the CPU defaults adapt q_proj and v_proj (the original LoRA recipe)
    and evaluate on 2048 tokens: about 2-3 minutes for step 2, against about 6 for all-linear."""
    if gpu:
        return dict(calib_samples=128, seq_len=512, eval_tokens=32768, methods=list(INIT_METHODS), baselines=True,
                    targets=[ALL_LINEAR], steps=200, batch_size=8, eval_every=20, learning_rate=2e-4)
    return dict(calib_samples=16, seq_len=256, eval_tokens=2048, methods=["qlora", "svd", "quailora"],
                baselines=True, targets=["q_proj", "v_proj"], steps=20, batch_size=2, eval_every=5,
                learning_rate=2e-4)


# ------------------------------------------------------------------------------------------------ uploads
def _gradio_upload_roots() -> list[str]:
    """Where gradio keeps uploaded files (the only place an upload may come from)."""
    roots = [os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")]
    try:
        from gradio.utils import get_upload_folder

        roots.append(str(get_upload_folder()))
    except Exception:  # noqa: BLE001 - older/newer gradio: the default above still holds
        pass
    return roots


# ------------------------------------------------------------------------------------------------ views
def _empty_view_figure(key: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=VIEW_TITLES[key], height=220, template="plotly_white", xaxis_visible=False,
                      yaxis_visible=False, annotations=[{"text": "press “Compute views”", "showarrow": False,
                                                             "font": {"color": "#888"}}])
    return fig


def views_outputs(job: Job | None) -> dict[str, Any]:
    """Figures, precision table and layer picker update for a views job (placeholders until it finishes)."""
    import plotly.io as pio

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


# ------------------------------------------------------------------------------------------------ the app
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


def build_ui(manager: JobManager | None = None, *, poll_seconds: float = 1.0) -> gr.Blocks:
    """The whole page. `manager` defaults to a process-wide JobManager running the real engine."""
    manager = manager or _default_manager()
    tabs = _Tabs()
    upload_roots = _gradio_upload_roots()

    def session_job(session: dict | None, job_id: str | None) -> tuple[Job | None, str | None]:
        """(the job if this session owns it, else None; a refusal line when the id is someone else's or unknown)."""
        if not job_id:
            return None, None
        job = manager.owned(job_id, (session or {}).get("owner"))
        return job, (None if job else f"No job `{one_line(job_id, 40)}` in this session: a session sees only its own jobs.")

    device, gpu = device_summary()
    d = default_settings(gpu)
    train_ready = training_available()

    # gradio's own copies of uploads are deleted after an hour (and at shutdown); ours live per session
    with gr.Blocks(title="QuAILoRA Studio", fill_width=False, delete_cache=(3600, 3600)) as demo:
        session = gr.BrowserState({"owner": ""}, storage_key="quailora-studio-session")
        init_seen = gr.State({})
        train_seen = gr.State({})
        views_seen = gr.State({})

        gr.Markdown(
            "# QuAILoRA Studio\n"
            "Quantizing a language model to 4 bits saves memory but adds error to every weight. A LoRA adapter "
            "normally starts at zero (QLoRA); **QuAILoRA** starts it at a low-rank correction that cancels as much "
            "of that error as possible *on real activations*. Here you can measure, layer by layer, how much error "
            "each initialization removes, what that does to perplexity, and how fine-tuning then proceeds.",
            elem_classes="intro")
        gr.Markdown(f"**Device:** {device}. Defaults are sized for it"
                    + (": on CPU, LoRA on q_proj and v_proj and 2048 held-out tokens, so step 2 takes about "
                       "2–3 minutes with the embedded model (all-linear: about 6)." if not gpu else "."),
                    elem_classes="device")

        # ---------------------------------------------------------------- 1 setup
        gr.Markdown("## 1 · Setup", elem_classes="step")
        with gr.Row(equal_height=False):
            with gr.Column():
                model = gr.Dropdown(["embedded"], value="embedded", allow_custom_value=True, label="Model",
                                    info="'embedded' = SmolLM2-135M-Instruct, works offline; or type a hub id / local folder")
                model_note = gr.Markdown(f"<small>{EMBEDDED_NOTE}</small>", elem_classes="note")
            with gr.Column():
                dataset = gr.Dropdown(["embedded", "embedded:speeches"], value="embedded", allow_custom_value=True,
                                      label="Text", info="embedded = Rotten Tomatoes snippets; embedded:speeches = 2012 "
                                                         "convention speeches; or a hub dataset id / local path")
                upload = gr.File(label="…or upload a text file (overrides the choice above)", file_types=UPLOAD_TYPES,
                                 type="filepath", height=150)
                text_column = gr.Dropdown([], value=None, allow_custom_value=True, label="Text column",
                                          info="filled from the uploaded file; empty = guess")
                data_info = gr.Markdown("", elem_classes="note")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=220):
                gr.Markdown("**4-bit quantization** (bitsandbytes)")
                quant = gr.Radio(["nf4", "fp4"], value="nf4", label="4-bit data type")
                double_quant = gr.Checkbox(value=True, label="double quantization (quantize the scales too)")
                block_size = gr.Dropdown([32, 64, 128, 256], value=64, label="block size (weights per scale)")
            with gr.Column(min_width=220):
                gr.Markdown("**LoRA adapter**")
                rank = gr.Slider(1, 128, value=16, step=1, label="rank r")
                alpha = gr.Number(value=16, label="alpha (scale s = alpha / r)")
                rslora = gr.Checkbox(value=False, label="rsLoRA (s = alpha / √r)")
                targets = gr.Dropdown(list(TARGET_CHOICES), value=d["targets"], multiselect=True, allow_custom_value=True,
                                      label="target modules", elem_id="targets",
                                      info="all-linear = every linear layer of the decoder blocks")
            with gr.Column(min_width=220):
                gr.Markdown("**Calibration and evaluation text**")
                calib_samples = gr.Number(value=d["calib_samples"], precision=0, label="calibration sequences")
                seq_len = gr.Number(value=d["seq_len"], precision=0, label="tokens per sequence")
                eval_tokens = gr.Number(value=d["eval_tokens"], precision=0, label="held-out tokens for perplexity")
                seed = gr.Number(value=0, precision=0, label="seed (fixes the data splits)")
        with gr.Row(equal_height=False):
            methods = gr.CheckboxGroup(
                [(F.SHORT_LABELS[m] + (" (baseline, always on)" if m == "qlora" else ""), m) for m in INIT_METHODS],
                value=d["methods"], label="initializations to compare",
                info="svd: best low-rank fit of the weight error; quailora: the paper's calibrated ALS; closed form: "
                     "its exact optimum; loftq: peft's implementation")
            baselines = gr.Checkbox(value=d["baselines"], label="also measure full-precision and 8-bit perplexity")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                als_rounds = gr.Number(value=20, precision=0, label="QuAILoRA ALS rounds")
                damping = gr.Number(value=0.01, label="damping λ (× mean diagonal of H)")
        setup = [model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha, rslora, targets,
                 calib_samples, seq_len, eval_tokens, seed]

        # ---------------------------------------------------------------- 2 init
        gr.Markdown("## 2 · Quantize & initialize", elem_classes="step")
        with gr.Row():
            start_init = gr.Button("Quantize & initialize", variant="primary", scale=2, elem_id="start-init")
            stop_init = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-init")
            init_job = gr.Textbox("", label="job id", interactive=False, scale=1, max_lines=1, elem_classes="jobid")
        init_progress = gr.HTML(progress_html(None, manager), elem_id="init-progress")
        init_status = gr.Markdown("Nothing started yet in this session.", elem_id="init-status")
        init_note = gr.Markdown("", elem_classes="note")
        layer_plot = gr.Plot(F.layer_error_figure([]), label="per-layer error", show_label=False, elem_id="layer-plot")
        gr.Markdown(F.CAPTIONS["layers"], elem_classes="caption")
        with gr.Row(equal_height=False):
            with gr.Column():
                heatmap_plot = gr.Plot(F.removal_heatmap([]), label="error removed", show_label=False, elem_id="heatmap-plot")
                gr.Markdown(F.CAPTIONS["heatmap"], elem_classes="caption")
            with gr.Column():
                ppl_plot = gr.Plot(F.perplexity_figure([]), label="perplexity", show_label=False, elem_id="ppl-plot")
                gr.Markdown(F.CAPTIONS["perplexity"], elem_classes="caption")
        numbers = gr.Dataframe(pd.DataFrame(columns=F.NUMBERS_HEADER), label="numbers per variant", interactive=False,
                               wrap=True, column_widths=["28%", "14%", "12%", "10%", "12%", "12%", "12%"])
        with gr.Accordion("report.json", open=False):
            report_json = gr.JSON(label="report")
        refresh_init = gr.Button("refresh", visible=False)

        # ---------------------------------------------------------------- teaching views + how it works
        vd = view_defaults(gpu)
        with gr.Tabs(elem_id="teaching-tabs"):
            with gr.Tab("Teaching views", elem_id="tab-views"):
                gr.Markdown(
                    "Look inside **one layer** of the 4-bit model: its weights and quantization grid, the error, "
                    "which directions of it the next layer actually feels, and how much each rank-r initialization "
                    "removes. Uses the Setup's model, text and 4-bit settings; the precision table also reads the "
                    "latest *Quantize & initialize* run when there is one. Runs in the same job queue.",
                    elem_classes="note")
                with gr.Row(equal_height=False):
                    view_layer = gr.Dropdown([("default (chosen by the app)", "")], value="", allow_custom_value=True,
                                             label="layer", elem_id="view-layer", scale=3,
                                             info="every linear layer of the decoder blocks; the rank sweep averages "
                                                  "over the chosen layer's block")
                    view_rank = gr.Number(value=vd["rank"], precision=0, label="rank r of the views", scale=1,
                                          elem_id="view-rank")
                    view_calib = gr.Number(value=vd["calib_samples"], precision=0, label="calibration sequences (views)",
                                           scale=1)
                    view_seq = gr.Number(value=vd["seq_len"], precision=0, label="tokens per sequence (views)", scale=1)
                with gr.Row():
                    start_views = gr.Button("Compute views", variant="primary", scale=2, elem_id="start-views")
                    stop_views = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-views")
                    views_job = gr.Textbox("", label="job id", interactive=False, scale=1, max_lines=1,
                                           elem_classes="jobid")
                views_progress = gr.HTML("<div class='q-progress idle'><div class='q-label'>no views yet</div></div>",
                                         elem_id="views-progress")
                views_status = gr.Markdown("", elem_id="views-status")
                view_plots = {}
                for key in VIEW_KEYS:
                    view_plots[key] = gr.Plot(_empty_view_figure(key), label=VIEW_TITLES[key], show_label=False,
                                              elem_id=f"view-{key.replace('_', '-')}")
                    gr.Markdown(VIEW_CAPTIONS[key], elem_classes="caption")
                precision_table = gr.Dataframe(pd.DataFrame(columns=["format"]), interactive=False, wrap=True,
                                               label="precision trade-off: memory of the weights per storage format (perplexity from "
                                                     "the latest Quantize & initialize run; – = not measured)",
                                               elem_id="precision-table")
                refresh_views = gr.Button("refresh", visible=False)
            with gr.Tab("How it works", elem_id="tab-how"):
                how = gr.Markdown(how_it_works_markdown(vd["rank"]), elem_id="how-it-works",
                                  latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                                    {"left": "$", "right": "$", "display": False}])

        # ---------------------------------------------------------------- 3 train
        gr.Markdown("## 3 · Fine-tune", elem_classes="step")
        if not train_ready:
            gr.Markdown("_The fine-tuning engine is not part of this build yet; starting a run will say so._",
                        elem_classes="note")
        with gr.Row(equal_height=False):
            arms = gr.CheckboxGroup([(F.ARM_LABELS[a], a) for a in ARMS], value=list(DEFAULT_ARMS),
                                    label="arms to compare (same data, seed and steps)")
        with gr.Row():
            steps = gr.Number(value=d["steps"], precision=0, label="steps")
            learning_rate = gr.Number(value=d["learning_rate"], label="learning rate")
            batch_size = gr.Number(value=d["batch_size"], precision=0, label="batch (sequences per step)")
            eval_every = gr.Number(value=d["eval_every"], precision=0, label="evaluate every (steps)")
        with gr.Accordion("More training settings", open=False):
            with gr.Row():
                grad_accum = gr.Number(value=1, precision=0, label="gradient accumulation")
                warmup_ratio = gr.Number(value=0.03, label="warm-up share of steps")
        with gr.Row():
            start_train = gr.Button("Start fine-tuning", variant="primary", scale=2, elem_id="start-train")
            stop_train = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-train")
            train_job = gr.Textbox("", label="job id", interactive=False, scale=1, max_lines=1, elem_classes="jobid")
        train_progress = gr.HTML(progress_html(None, manager), elem_id="train-progress")
        train_status = gr.Markdown("Nothing started yet in this session.", elem_id="train-status")
        curves_plot = gr.Plot(F.train_figure([]), label="fine-tuning curves", show_label=False, elem_id="curves-plot")
        gr.Markdown(F.CAPTIONS["train"], elem_classes="caption")
        throughput = gr.Dataframe(pd.DataFrame(columns=F.TRAIN_HEADER), label="speed and memory per arm",
                                  interactive=False)
        refresh_train = gr.Button("refresh", visible=False)

        # ---------------------------------------------------------------- 4 results
        gr.Markdown("## 4 · Results", elem_classes="step")
        with gr.Row():
            which = gr.Radio([("quantize & initialize run", "init"), ("fine-tuning run", "train")], value="init",
                             label="run folder to download", elem_id="which-run")
            zip_btn = gr.Button("Zip the run folder (report, events, adapters)", elem_id="zip-run")
        zip_file = gr.File(label="download", interactive=False, elem_id="zip-file")
        summary = gr.Markdown("No results yet: run step 2 (and 3) first.", elem_id="summary")
        queue_text = gr.Markdown("", elem_classes="note")
        with gr.Accordion("Reopen a run folder (also after a restart of the app)", open=False, elem_id="reopen"):
            with gr.Row(equal_height=True):
                # custom values allowed: the choices are per session; /reopen_run checks the name itself
                run_pick = gr.Dropdown([], value=None, label="run folder", scale=3, elem_id="run-pick",
                                       allow_custom_value=True,
                                       info="this session's runs under the runs root (QUAILORA_RUNS), newest first")
                refresh_runs = gr.Button("Refresh list", scale=1, elem_id="refresh-runs")
                reopen_btn = gr.Button("Reopen", variant="primary", scale=1, elem_id="reopen-run")
            reopen_summary = gr.Markdown("", elem_id="reopen-summary")
            reopen_layers = gr.Plot(F.layer_error_figure([]), show_label=False, elem_id="reopen-layers")
            with gr.Row(equal_height=False):
                reopen_heatmap = gr.Plot(F.removal_heatmap([]), show_label=False, elem_id="reopen-heatmap")
                reopen_ppl = gr.Plot(F.perplexity_figure([]), show_label=False, elem_id="reopen-ppl")
            reopen_curves = gr.Plot(F.train_figure([]), show_label=False, elem_id="reopen-curves")
            reopen_table = gr.Dataframe(pd.DataFrame(columns=F.NUMBERS_HEADER), interactive=False, wrap=True,
                                        label="numbers of the reopened run")
            with gr.Accordion("report.json of the reopened run", open=False):
                reopen_report = gr.JSON(label="report")
            reopen_zip = gr.File(label="download the reopened run folder", interactive=False, elem_id="reopen-zip")

        # ---------------------------------------------------------------- wiring
        def attach(session, request: gr.Request):
            session, owner = session_owner(session)
            tabs.seen(request, owner)
            paths.sweep_uploads(keep=manager.active_owners() | tabs.owners())
            ij, tj = manager.latest(owner, "init"), manager.latest(owner, "train")
            running, waiting = manager.queue_length()
            return session, ij.id if ij else "", tj.id if tj else "", f"Server queue: {running} running, {waiting} waiting."

        demo.load(attach, [session], [session, init_job, train_job, queue_text], api_name="attach")

        def session_ended(request: gr.Request):
            """A tab closed: its owner's uploads go, unless another tab or a queued/running job still needs them
            (then the idle sweep removes them later)."""
            owner = tabs.closed(request)
            if owner and owner not in tabs.owners() and owner not in manager.active_owners():
                paths.remove_session_uploads(owner)

        demo.unload(session_ended)

        def dataset_columns(upload):
            if not upload:
                return gr.update(choices=[], value=None), ""
            try:
                cols, guess, info = inspect_upload(upload)
            except UserError as exc:
                return gr.update(choices=[], value=None), f"**Refused:** {exc}"
            return gr.update(choices=cols, value=guess), info

        upload.change(dataset_columns, [upload], [text_column, data_info], api_name="dataset_columns")
        dataset.change(lambda name: describe_source(name), [dataset], [data_info], api_name="describe_dataset")
        model.change(lambda m: f"<small>{EMBEDDED_NOTE}</small>" if (m or "embedded") == "embedded" else "",
                     [model], [model_note], api_name="model_note")

        def start_init_fn(session, model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha,
                          rslora, targets, calib_samples, seq_len, eval_tokens, seed, methods, baselines, als_rounds,
                          damping, request: gr.Request):
            session, owner = session_owner(session)
            tabs.seen(request, owner)
            try:
                model, dataset, upload = vetted_sources(model, dataset, upload, owner, upload_roots)
                cfg = make_init_config(model, dataset, upload, text_column, quant, double_quant, block_size, rank,
                                       alpha, rslora, targets, calib_samples, seq_len, eval_tokens, seed, methods,
                                       baselines, als_rounds, damping)
                job = manager.submit("init", cfg, owner)
            except (UserError, ValueError, TypeError) as exc:
                raise gr.Error(str(exc)) from None
            return session, job.id, status_text(manager.snapshot(job.id), manager)

        start_init.click(start_init_fn, [session, *setup, methods, baselines, als_rounds, damping],
                         [session, init_job, init_status], api_name="start_init")

        def stop_fn(session, job_id):
            _, owner = session_owner(session)
            if not (session or {}).get("owner"):
                return "this session has no jobs to stop"
            return manager.stop(job_id, owner)

        stop_init.click(stop_fn, [session, init_job], [init_status], api_name="stop_init")
        stop_train.click(stop_fn, [session, train_job], [train_status], api_name="stop_train")

        init_outputs = [init_progress, init_status, layer_plot, heatmap_plot, ppl_plot, numbers, report_json, init_note]

        def init_status_fn(session, job_id):
            job, refused = session_job(session, job_id)
            v = init_views(job, manager)
            return (progress_html(job, manager), refused or status_text(job, manager), v["layers"], v["heatmap"],
                    v["perplexity"], v["numbers"], v["report"], v["note"])

        refresh_init.click(init_status_fn, [session, init_job], init_outputs, api_name="init_status")

        def poll_init(session, job_id, seen, other_job_id):
            job, refused = session_job(session, job_id)
            if job is None:
                if seen.get("job") == job_id:
                    return (*[gr.skip()] * (len(init_outputs) + 1), seen)
                return (progress_html(None, manager), refused or status_text(None, manager), *[gr.skip()] * 7,
                        {"job": job_id})
            n_layers = sum(1 for e in job.events if e.get("kind") == "layer")
            n_metrics = sum(1 for e in job.events if e.get("kind") == "metric")
            key = {"job": job.id, "version": job.version, "layers": n_layers, "metrics": n_metrics,
                   "status": job.status, "tick": int(job.elapsed) if job.status == RUNNING else -1}
            if key == seen:
                return (*[gr.skip()] * (len(init_outputs) + 1), seen)
            fresh = seen.get("job") != job.id or seen.get("status") != job.status
            parts = [p for p, changed in (("layers", fresh or seen.get("layers") != n_layers),
                                          ("heatmap", fresh or seen.get("layers") != n_layers),
                                          ("perplexity", fresh or seen.get("metrics") != n_metrics)) if changed]
            v = init_views(job, manager, parts) if parts or fresh else {}
            tables_changed = fresh or seen.get("layers") != n_layers or seen.get("metrics") != n_metrics
            return (progress_html(job, manager), status_text(job, manager),
                    v.get("layers", gr.skip()), v.get("heatmap", gr.skip()), v.get("perplexity", gr.skip()),
                    v["numbers"] if tables_changed and "numbers" in v else gr.skip(),
                    v["report"] if fresh and "report" in v else gr.skip(),
                    v["note"] if fresh and "note" in v else gr.skip(),
                    summary_text(job, session_job(session, other_job_id)[0]) if fresh else gr.skip(), key)

        init_timer = gr.Timer(poll_seconds)
        init_timer.tick(poll_init, [session, init_job, init_seen, train_job], [*init_outputs, summary, init_seen], api_name="poll_init",
                        api_visibility="private", show_progress="hidden", queue=False)

        def start_train_fn(session, model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha,
                           rslora, targets, calib_samples, seq_len, eval_tokens, seed, als_rounds, damping, arms,
                           steps, learning_rate, batch_size, grad_accum, eval_every, warmup_ratio, request: gr.Request):
            session, owner = session_owner(session)
            tabs.seen(request, owner)
            try:
                model, dataset, upload = vetted_sources(model, dataset, upload, owner, upload_roots)
                cfg = make_train_config(model, dataset, upload, text_column, quant, double_quant, block_size, rank,
                                        alpha, rslora, targets, calib_samples, seq_len, eval_tokens, seed, als_rounds,
                                        damping, arms, steps, learning_rate, batch_size, grad_accum, eval_every,
                                        warmup_ratio)
                job = manager.submit("train", cfg, owner)
            except (UserError, ValueError, TypeError) as exc:
                raise gr.Error(str(exc)) from None
            return session, job.id, status_text(manager.snapshot(job.id), manager)

        start_train.click(start_train_fn, [session, *setup, als_rounds, damping, arms, steps, learning_rate,
                                           batch_size, grad_accum, eval_every, warmup_ratio],
                          [session, train_job, train_status], api_name="start_train")

        train_outputs = [train_progress, train_status, curves_plot, throughput]

        def train_views(job):
            arms_cfg = list(getattr(job.config, "arms", ()) or ()) if job else []
            events = job.events if job else []
            return (F.train_figure(events, arms_cfg),
                    pd.DataFrame(F.train_table(events, arms_cfg), columns=F.TRAIN_HEADER))

        def train_status_fn(session, job_id):
            job, refused = session_job(session, job_id)
            fig, table = train_views(job)
            return progress_html(job, manager), refused or status_text(job, manager), fig, table

        refresh_train.click(train_status_fn, [session, train_job], train_outputs, api_name="train_status")

        def poll_train(session, job_id, seen, other_job_id):
            job, refused = session_job(session, job_id)
            if job is None:
                if seen.get("job") == job_id:
                    return (*[gr.skip()] * (len(train_outputs) + 1), seen)
                return (progress_html(None, manager), refused or status_text(None, manager), *[gr.skip()] * 3,
                        {"job": job_id})
            n_points = sum(1 for e in job.events if e.get("kind") in ("train_step", "eval", "metric") or F._is_arm_finished(e))
            key = {"job": job.id, "version": job.version, "status": job.status, "points": n_points,
                   "tick": int(job.elapsed) if job.status == RUNNING else -1}
            if key == seen:
                return (*[gr.skip()] * (len(train_outputs) + 1), seen)
            fresh = seen.get("job") != job.id or seen.get("status") != job.status
            if fresh or seen.get("points") != n_points:
                fig, table = train_views(job)
            else:
                fig, table = gr.skip(), gr.skip()
            text = summary_text(session_job(session, other_job_id)[0], job) if fresh else gr.skip()
            return progress_html(job, manager), status_text(job, manager), fig, table, text, key

        train_timer = gr.Timer(poll_seconds)
        train_timer.tick(poll_train, [session, train_job, train_seen, init_job], [*train_outputs, summary, train_seen], api_name="poll_train",
                         api_visibility="private", show_progress="hidden", queue=False)

        def download_run(session, which, init_job_id, train_job_id):
            job, refused = session_job(session, init_job_id if which == "init" else train_job_id)
            summary = summary_text(session_job(session, init_job_id)[0], session_job(session, train_job_id)[0])
            if refused:
                raise gr.Error(refused)
            if job is None or not job.run_dir:
                raise gr.Error("that run has not started yet")
            if job.active:
                gr.Warning("the run is still going: the zip holds what it has written so far")
            return zip_run(job.run_dir), summary

        zip_btn.click(download_run, [session, which, init_job, train_job], [zip_file, summary], api_name="download_run")

        # ---------------------------------------------------------------- reopen wiring
        def list_runs_fn(session):
            choices = list_runs((session or {}).get("owner") if isinstance(session, dict) else None)
            return gr.update(choices=choices, value=choices[0][1] if choices else None)

        refresh_runs.click(list_runs_fn, [session], [run_pick], api_name="list_runs")
        demo.load(list_runs_fn, [session], [run_pick], api_name="list_runs_on_load", api_visibility="private",
                  show_progress="hidden")

        def reopen_fn(session, name):
            owner = (session or {}).get("owner") if isinstance(session, dict) else None
            try:
                v = reopened_outputs(name, owner, manager)
            except UserError as exc:
                raise gr.Error(str(exc)) from None
            return (v["summary"], v["layers"], v["heatmap"], v["perplexity"], v["curves"], v["table"], v["report"],
                    v["zip"])

        reopen_btn.click(reopen_fn, [session, run_pick],
                         [reopen_summary, reopen_layers, reopen_heatmap, reopen_ppl, reopen_curves, reopen_table,
                          reopen_report, reopen_zip], api_name="reopen_run")

        # ---------------------------------------------------------------- teaching views wiring
        def view_layers_fn(model):
            try:
                names, default = model_layers(paths.check_user_path(text_setting(model, "model"), "model"))
            except Exception:  # noqa: BLE001 - the job checks the model properly; here only the picker is filled
                names, default = [], ""
            if not names:
                return gr.update(choices=[("default (chosen by the app)", "")], value="")
            return gr.update(choices=[(f"default: {default}", "")] + names, value="")

        model.change(view_layers_fn, [model], [view_layer], api_name="view_layers")
        demo.load(view_layers_fn, [model], [view_layer], api_name="view_layers_on_load", api_visibility="private",
                  show_progress="hidden")

        def attach_views(session):
            owner = (session or {}).get("owner")
            job = manager.latest(owner, "views") if owner else None
            return job.id if job else ""

        demo.load(attach_views, [session], [views_job], api_name="attach_views", api_visibility="private",
                  show_progress="hidden")

        def start_views_fn(session, init_job_id, model, dataset, upload, text_column, quant, double_quant, block_size,
                           eval_tokens, seed, als_rounds, damping, layer, views_rank, views_calib_samples, views_seq_len,
                           request: gr.Request):
            session, owner = session_owner(session)
            tabs.seen(request, owner)
            init = manager.owned(init_job_id, owner) if init_job_id else None
            if init is None or init.kind != "init":
                init = manager.latest(owner, "init")
            reports = [init.run_dir] if init and init.run_dir and (Path(init.run_dir) / "report.json").is_file() else []
            try:
                model, dataset, upload = vetted_sources(model, dataset, upload, owner, upload_roots)
                cfg = make_views_config(model, dataset, upload, text_column, quant, double_quant, block_size,
                                        eval_tokens, seed, als_rounds, damping, layer, views_rank, views_calib_samples,
                                        views_seq_len, vd["ranks"], reports)
                job = manager.submit("views", cfg, owner)
            except (UserError, ValueError, TypeError) as exc:
                raise gr.Error(str(exc)) from None
            return session, job.id, status_text(manager.snapshot(job.id), manager)

        start_views.click(start_views_fn, [session, init_job, model, dataset, upload, text_column, quant, double_quant,
                                           block_size, eval_tokens, seed, als_rounds, damping, view_layer, view_rank,
                                           view_calib, view_seq],
                          [session, views_job, views_status], api_name="start_views")
        stop_views.click(stop_fn, [session, views_job], [views_status], api_name="stop_views")

        views_out = [views_progress, views_status, *view_plots.values(), precision_table, view_layer]

        def views_status_fn(session, job_id):
            job, refused = session_job(session, job_id)
            v = views_outputs(job)
            return (progress_html(job, manager) if job else progress_html(None, manager),
                    refused or status_text(job, manager), *[v[k] for k in VIEW_KEYS], v["table"], v["layer"])

        refresh_views.click(views_status_fn, [session, views_job], views_out, api_name="views_status")

        def poll_views(session, job_id, seen):
            job, _ = session_job(session, job_id)
            if job is None:
                return (*[gr.skip()] * len(views_out), seen)
            key = {"job": job.id, "version": job.version, "status": job.status,
                   "tick": int(job.elapsed) if job.status == RUNNING else -1}
            if key == seen:
                return (*[gr.skip()] * len(views_out), seen)
            head = (progress_html(job, manager), status_text(job, manager))
            if seen.get("job") == job.id and seen.get("status") == job.status:
                return (*head, *[gr.skip()] * (len(views_out) - 2), key)
            v = views_outputs(job)
            return (*head, *[v[k] for k in VIEW_KEYS], v["table"], v["layer"], key)

        views_timer = gr.Timer(poll_seconds)
        views_timer.tick(poll_views, [session, views_job, views_seen], [*views_out, views_seen], api_name="poll_views",
                         api_visibility="private", show_progress="hidden", queue=False)
        view_rank.change(lambda r: how_it_works_markdown(int(r) if r and r >= 1 else None), [view_rank], [how],
                         api_name="how_it_works")
    # status calls are cheap and compute never runs inside a request: let many requests run side by side
    demo.queue(default_concurrency_limit=16)
    return demo


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
