"""2 · Quantize & initialize: the job panel and what the run shows (per-layer error, error removed,
perplexity, downstream accuracy, the numbers and report.json); the shipped example run until the visitor has a job."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from quailora_app.app.sections.common import ExampleBanner, JobPanel, example_banner, job_row
from quailora_app.plots import figures as F


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


def init_section(idle_progress: str, shipped: dict[str, Any] | None = None) -> InitPanel:
    """`idle_progress`: the progress bar before any job; `shipped`: the shipped example's init run
    (`example_outputs`), shown until the visitor has a job."""
    gr.Markdown("## 2 · Quantize & initialize", elem_classes="step")
    start, stop, job = job_row("Quantize & initialize", "init")
    progress = gr.HTML(idle_progress, elem_id="init-progress")
    status = gr.Markdown("Nothing started yet in this session.", elem_id="init-status")
    sv = shipped or {}
    example = example_banner("init", sv.get("label"))
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
