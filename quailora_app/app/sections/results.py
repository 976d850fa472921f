"""4 · Results: download a run folder, the results summary, the queue line, and reopening a run folder
(also after a restart of the app, and the shipped example's)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from quailora_app.plots import figures as F


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
