"""The QuAILoRA Studio web app: the page, built from its sections and wired to the handlers.

One page, top to bottom: 1 Setup, 2 Quantize & initialize (with the teaching views and the Across bits tab beside
it), 3 Fine-tune, 4 Results, 5 Generate (what each variant says, token by token), one module each under
`quailora_app.app.sections` (layout only). The handlers live in `quailora_app.app.handlers`; this module gathers
the sections in a `Page` and wires each section's events to them. Compute runs in the process-wide `JobManager`
worker (one job at a time, FIFO); the page only submits jobs and polls them, so a closed tab does not stop a run and
a reopened page re-attaches (the session's owner key lives in the browser's localStorage through gr.BrowserState).
No model is ever held in gradio state.

The settings reach the start handlers by name (gradio's `inputs_kwargs`: setting name -> component, the names of
`quailora_app.settings`), so nothing keeps a parameter order in step.

Headless API: every public event has an explicit api_name, so gradio_client drives the whole flow. The endpoint
list (parameters, returns, what each does) is docs/api.md, generated from this page's own API info by
`python -m quailora_app.doc_tables` (`api_info` below); tests/test_app_client.py compares it with what a
gradio_client sees of a running app. The returns' names and the descriptions are `quailora_app.app.endpoints`.

Sessions are kept apart: the status, download and stop endpoints answer only for jobs of the calling session
(another session's job id gets a refusal line and empty plots). Uploads are checked (type, size) and copied into
the session's own folder, removed when its last tab closes; typed model and dataset paths are read only inside
the allowed folders (`quailora_app.app.uploads`).

On a first visit (no job of the session's own yet) step 2, its teaching views and step 3 show the shipped example
run (assets/example), drawn by the same presenters as a reopened run or a views job and labelled as such, with
"Compute it live" beside; a job of the session's own replaces it (`_wire_example`). Without assets/example the
page starts with empty plots.

The page itself polls through five private timer endpoints (poll_init, poll_train, poll_views, poll_bits,
poll_generate), made by one factory (`Studio.poller`), that skip unchanged figures.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from quailora_app.app import uploads as paths
from quailora_app.app.across_bits import BITS_NAMES, bits_defaults, example_bits
from quailora_app.app.defaults import default_settings, device_summary
from quailora_app.app.generation import GEN_NAMES, example_generate
from quailora_app.app.handlers import (
    Studio,
    count_bits,
    count_generate,
    count_init,
    count_train,
    dataset_columns,
    describe_dataset,
    how_it_works,
    model_note,
    quantizer_settings,
    runs_to_reopen,
    view_layers,
)
from quailora_app.app.jobs import JobManager
from quailora_app.app.presenters import example_outputs, view_defaults
from quailora_app.app.sections.bits import BitsPanel, bits_section
from quailora_app.app.sections.common import JobPanel
from quailora_app.app.sections.generate import GeneratePanel, generate_section
from quailora_app.app.sections.init import InitPanel, init_section
from quailora_app.app.sections.results import Results, results_section
from quailora_app.app.sections.setup import Setup, setup_section
from quailora_app.app.sections.train import TrainPanel, train_section
from quailora_app.app.sections.views import ViewsPanel, views_section
from quailora_app.plots.frontier import bits_harm_gain_points

__all__ = ["Page", "api_info", "build_ui", "default_settings", "launch_options"]

ASSETS = Path(__file__).resolve().parents[2] / "assets"

#: The settings each start endpoint takes, by name and in its API order (session first, not listed).
SETUP_NAMES = ("model", "dataset", "upload", "text_column", "quantizer", "bits", "quant", "double_quant", "block_size",
               "rank", "alpha", "rslora", "targets", "calib_samples", "seq_len", "eval_tokens", "seed")
INIT_NAMES = (*SETUP_NAMES, "methods", "baselines", "als_rounds", "damping", "accuracy_tasks", "label_items",
              "continuation_items")
TRAIN_NAMES = (*SETUP_NAMES, "als_rounds", "damping", "arms", "steps", "learning_rate", "batch_size", "grad_accum",
               "eval_every", "warmup_ratio", "start_from_init")
VIEWS_NAMES = ("model", "dataset", "upload", "text_column", "quantizer", "bits", "quant", "double_quant", "block_size",
               "eval_tokens", "seed", "als_rounds", "damping", "layer", "views_rank", "views_calib_samples",
               "views_seq_len")


@dataclass
class Page:
    """The built page: the session's browser state, each job panel's last-seen state (the pollers' memory), the
    headline over the page, and the sections."""

    session: gr.BrowserState
    seen: dict[str, gr.State]  # "init", "train", "views", "bits", "generate"
    headline: gr.Markdown
    setup: Setup
    init: InitPanel
    views: ViewsPanel
    bits: BitsPanel
    train: TrainPanel
    results: Results
    generate: GeneratePanel


def build_ui(manager: JobManager | None = None, *, poll_seconds: float = 1.0) -> gr.Blocks:
    """The whole page. `manager` defaults to a process-wide JobManager running the real engine."""
    device, gpu = device_summary()
    d, vd = default_settings(gpu), view_defaults(gpu)
    shipped_bits = example_bits()  # the shipped example's across-bits run, if this app has one
    shipped_generate = example_generate()  # and its generate run
    studio = Studio(manager or _default_manager(), tuple(vd["ranks"]), (shipped_bits or {}).get("report"),
                    (shipped_generate or {}).get("report"))
    shipped = example_outputs(studio.manager) or {}  # the shipped example run (assets/example), if this app has one

    # gradio's own copies of uploads are deleted after an hour (and at shutdown); ours live per session
    with gr.Blocks(title="QuAILoRA Studio", fill_width=False, delete_cache=(3600, 3600)) as demo:
        session = gr.BrowserState({"owner": ""}, storage_key="quailora-studio-session")
        seen = {kind: gr.State({}) for kind in ("init", "train", "views", "bits", "generate")}
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
        idle = studio.progress(None)
        setup = setup_section(d)
        init = init_section(idle, shipped.get("init"))
        with gr.Tabs(elem_id="teaching-tabs"):  # beside step 2: the teaching views, How it works, Across ...
            views = views_section(vd, shipped.get("views"), bits_harm_gain_points((shipped_bits or {}).get("report")))
            bits = bits_section(bits_defaults(gpu), shipped_bits)
        page = Page(session, seen, headline, setup=setup, init=init, views=views, bits=bits,
                    train=train_section(idle, d, shipped.get("train")),
                    results=results_section(shipped.get("summary")), generate=generate_section(shipped_generate))

        _wire_setup(demo, studio, page)
        _wire_init(studio, page, poll_seconds)
        _wire_train(studio, page, poll_seconds)
        _wire_views(demo, studio, page, poll_seconds)
        _wire_bits(demo, studio, page, poll_seconds)
        _wire_results(demo, studio, page)
        _wire_generate(demo, studio, page, poll_seconds)
        _wire_example(page)
    # status calls are cheap and compute never runs inside a request: let many requests run side by side
    demo.queue(default_concurrency_limit=16)
    unhurried_queue(demo)
    return demo


#: seconds gradio's queue loops sleep while idle here (gradio's own on Windows; on Linux 0.001 and 0.01)
QUEUE_IDLE_SLEEP_S, PROGRESS_IDLE_SLEEP_S = 0.05, 0.1


def unhurried_queue(demo: gr.Blocks) -> None:
    """Slow gradio's idle queue loops from 1000 and 100 wake-ups a second (its Linux default) to 20 and 10.

    Every wake-up takes Python's GIL in the server's event loop. A run computes in two Python threads whose torch
    calls release the GIL and take it back thousands of times a second: each time the loop holds it, they wait.
    On 2 cores the same Generate took 27-28 s in the served app against 18-20 s in a plain process (py-spy --gil:
    the event loop held the GIL about 2.5 s a press, most of it the 1 ms loop); a request now waits up to 50 ms
    more for the queue to take it. The attributes are gradio's (queueing.Queue); a gradio without them is left
    alone."""
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = QUEUE_IDLE_SLEEP_S
        if hasattr(queue, "progress_update_sleep_when_free"):
            queue.progress_update_sleep_when_free = PROGRESS_IDLE_SLEEP_S


# ------------------------------------------------------------------------------------------------ wiring
_PRIVATE = dict(api_visibility="private", show_progress="hidden")


def _poll_timer(seconds: float, handler: Callable, inputs: list, outputs: list, name: str) -> None:
    """The page's timer poll: out of the API docs, but callable by clients ("undocumented"), so that a bench can
    poll exactly as the page does (bench.press_generate: only what changed is drawn and sent)."""
    gr.Timer(seconds).tick(handler, inputs, outputs, api_name=name, queue=False, api_visibility="undocumented",
                           show_progress="hidden")


def _wire_job(studio: Studio, page: Page, panel: JobPanel, start: Callable, start_inputs: list,
              named: dict[str, Any], status: Callable, outputs: list, kind: str) -> None:
    """Start (settings by name), stop and status of the `kind` job panel. The stop's answer replaces the status
    line, then the panel's poll state (page.seen[kind]) is forgotten so that the next poll draws the job's status
    again: a job that ended before the answer arrived would otherwise keep showing "stopping..." (its poll key no
    longer moves)."""
    session = page.session
    panel.start.click(start, start_inputs, [session, panel.job, panel.status], inputs_kwargs=named,
                      api_name=f"start_{kind}")
    panel.stop.click(studio.stop, [session, panel.job], [panel.status], api_name=f"stop_{kind}").then(
        dict, None, [page.seen[kind]], queue=False, **_PRIVATE)
    panel.refresh.click(status, [session, panel.job], outputs, api_name=f"{kind}_status")


def _wire_setup(demo: gr.Blocks, studio: Studio, page: Page) -> None:
    f, setup = page.setup.fields, page.setup
    demo.load(studio.attach, [page.session], [page.session, page.init.panel.job, page.train.panel.job,
                                              page.results.queue_text], api_name="attach")
    demo.unload(studio.session_ended)
    f["upload"].change(dataset_columns, [f["upload"]], [f["text_column"], setup.data_info], api_name="dataset_columns")
    f["dataset"].change(describe_dataset, [f["dataset"]], [setup.data_info], api_name="describe_dataset")
    f["model"].change(model_note, [f["model"]], [setup.model_note], api_name="model_note")
    f["quantizer"].change(quantizer_settings, [f["quantizer"], f["bits"]], [f["bits"], f["quant"], f["double_quant"]],
                          api_name="quantizer_settings", queue=False, **_PRIVATE)


def _wire_init(studio: Studio, page: Page, poll_seconds: float) -> None:
    init = page.init
    _wire_job(studio, page, init.panel, studio.start_init, [page.session], page.setup.named(INIT_NAMES),
              studio.init_status, init.outputs, "init")
    poll = studio.poller(count_init, studio.draw_init, len(init.outputs) - 1)
    _poll_timer(poll_seconds, poll, [page.session, init.panel.job, page.seen["init"], page.train.panel.job],
                [*init.outputs, page.results.summary, page.seen["init"]], "poll_init")


def _wire_train(studio: Studio, page: Page, poll_seconds: float) -> None:
    train = page.train
    _wire_job(studio, page, train.panel, studio.start_train, [page.session, page.init.panel.job],
              page.setup.named(TRAIN_NAMES, train.fields), studio.train_status, train.outputs, "train")
    poll = studio.poller(count_train, studio.draw_train, len(train.outputs) - 1)
    _poll_timer(poll_seconds, poll, [page.session, train.panel.job, page.seen["train"], page.init.panel.job],
                [*train.outputs, page.results.summary, page.seen["train"]], "poll_train")


def _wire_views(demo: gr.Blocks, studio: Studio, page: Page, poll_seconds: float) -> None:
    views, session = page.views, page.session
    model, layer = page.setup.fields["model"], views.fields["layer"]
    model.change(view_layers, [model], [layer], api_name="view_layers")
    demo.load(view_layers, [model], [layer], api_name="view_layers_on_load", **_PRIVATE)
    demo.load(studio.attach_views, [session], [views.panel.job], api_name="attach_views", **_PRIVATE)
    _wire_job(studio, page, views.panel, studio.start_views, [session, page.init.panel.job],
              page.setup.named(VIEWS_NAMES, views.fields), studio.views_status, views.outputs, "views")
    poll = studio.poller(lambda job: {}, studio.draw_views, len(views.outputs) - 2, idle=False)
    _poll_timer(poll_seconds, poll, [session, views.panel.job, page.seen["views"]],
                [*views.outputs, page.seen["views"]], "poll_views")
    views.fields["views_rank"].change(how_it_works, [views.fields["views_rank"]], [views.how], api_name="how_it_works")
    views.harm_gain_scale.change(studio.harm_gain, [views.harm_gain_scale, session, page.bits.panel.job],
                                 [views.harm_gain], api_name="harm_gain")


def _wire_bits(demo: gr.Blocks, studio: Studio, page: Page, poll_seconds: float) -> None:
    """The across-bits job; its poller also redraws the across-models scatter (at the scale shown) once the run has
    finished, with the run's bit widths."""
    bits, session = page.bits, page.session
    demo.load(studio.attach_bits, [session], [bits.panel.job], api_name="attach_bits", **_PRIVATE)
    _wire_job(studio, page, bits.panel, studio.start_bits, [session], page.setup.named(BITS_NAMES, bits.fields),
              studio.bits_status, bits.outputs, "bits")
    poll = studio.poller(count_bits, studio.draw_bits, len(bits.outputs) - 1, other_is_job=False)
    _poll_timer(poll_seconds, poll, [session, bits.panel.job, page.seen["bits"], page.views.harm_gain_scale],
                [*bits.outputs, page.views.harm_gain, page.seen["bits"]], "poll_bits")


def _wire_results(demo: gr.Blocks, studio: Studio, page: Page) -> None:
    results, session = page.results, page.session
    results.zip_button.click(studio.download_run, [session, results.which, page.init.panel.job,
                                                   page.train.panel.job],
                             [results.zip_file, results.summary], api_name="download_run")
    results.refresh_runs.click(runs_to_reopen, [session], [results.run_pick], api_name="list_runs")
    demo.load(runs_to_reopen, [session], [results.run_pick], api_name="list_runs_on_load", **_PRIVATE)
    results.reopen.click(studio.reopen_run, [session, results.run_pick], results.reopened, api_name="reopen_run")


def _wire_generate(demo: gr.Blocks, studio: Studio, page: Page, poll_seconds: float) -> None:
    """The generate job (from the session's latest finished init or fine-tuning run, or a run folder), its poller,
    the position chooser, the merged model's download and the list of runs to generate from."""
    gen, session = page.generate, page.session
    jobs = [page.init.panel.job, page.train.panel.job]
    demo.load(studio.attach_generate, [session], [gen.panel.job], api_name="attach_generate", **_PRIVATE)
    demo.load(studio.generate_sources, [session], [gen.fields["gen_from"]], api_name="generate_sources_on_load",
              **_PRIVATE)
    gen.refresh_sources.click(studio.generate_sources, [session], [gen.fields["gen_from"]],
                              api_name="generate_sources")
    _wire_job(studio, page, gen.panel, studio.start_generate, [session, *jobs],
              {name: gen.fields[name] for name in GEN_NAMES}, studio.generate_status, gen.outputs, "generate")
    poll = studio.poller(count_generate, studio.draw_generate, len(gen.outputs) - 2)
    _poll_timer(poll_seconds, poll, [session, gen.panel.job, page.seen["generate"]],
                [*gen.outputs, page.seen["generate"]], "poll_generate")
    gen.position.change(studio.generate_position, [session, gen.panel.job, gen.position], [gen.top10, gen.strip],
                         api_name="generate_position")
    gen.merged_button.click(studio.download_merged, [session, gen.panel.job], [gen.merged_file],
                            api_name="download_merged")


def _wire_example(page: Page) -> None:
    """While a section shows the shipped example run: its 'Compute it live' presses the section's start button;
    its banner (and, for step 2, the headline at the top) goes once the visitor has a job there (started, or
    re-attached on load), whose own figures then replace the shipped ones (the pollers draw them)."""
    for key, panel, more in (("init", page.init, [page.headline]), ("train", page.train, []),
                             ("views", page.views, []), ("bits", page.bits, []), ("generate", page.generate, [])):
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


# ------------------------------------------------------------------------------------------------ serving
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


def api_info() -> dict[str, Any]:
    """The page's public endpoints as gradio describes them (its API page and gradio_client's `view_api` read the
    same): {"named_endpoints": {"/name": {"parameters": [...], "returns": [...], ...}}, ...}. Builds a page on a
    manager of its own that never runs a job."""
    return build_ui(JobManager(gpu=False)).get_api_info()
