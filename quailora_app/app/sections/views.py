"""The tabs beside step 2: the teaching views of one layer (its own job), How it works, and the "Across models"
scatter measured ahead (with the bit widths of an across-bits run as points); the "Across bits" tab beside them is
sections/bits.py. The views show the shipped example's until the visitor has a views job."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from quailora_app.app.handlers import HARM_GAIN_SCALES
from quailora_app.app.presenters import VIEW_KEYS, VIEW_TITLES, views_drawn
from quailora_app.app.sections.common import ExampleBanner, JobPanel, example_banner, job_row
from quailora_app.plots.teaching import CAPTIONS as VIEW_CAPTIONS
from quailora_app.plots.teaching import HARM_GAIN_CAPTION, harm_gain_figure, paper_scatter
from quailora_app.teaching.how_it_works import how_it_works_markdown


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
    example: ExampleBanner | None = None

    @property
    def outputs(self) -> list:
        """In the order of /views_status's outputs."""
        p = self.panel
        return [p.progress, p.status, *self.plots.values(), self.table, self.fields["layer"]]


def views_section(vd: dict[str, Any], shipped: dict[str, Any] | None = None,
                  bits_points: list[dict] | None = None) -> ViewsPanel:
    """`vd`: the views' default settings (`view_defaults`); `shipped`: the shipped example's teaching views
    (`example_views`), shown until the visitor has a views job (placeholders without them); `bits_points`: the bit
    widths of the shipped across-bits run, points of the "Across models" scatter. Its three tabs go inside the
    page's gr.Tabs."""
    sv = shipped or views_drawn(None)
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
        start, stop, job = job_row("Compute views", "views")
        progress = gr.HTML("<div class='q-progress idle'><div class='q-label'>no views yet</div></div>",
                           elem_id="views-progress")
        status = gr.Markdown("", elem_id="views-status")
        example = example_banner("views", sv.get("label"))
        plots = {}
        for key in VIEW_KEYS:
            plots[key] = gr.Plot(sv[key], label=VIEW_TITLES[key], show_label=False,
                                 elem_id=f"view-{key.replace('_', '-')}")
            gr.Markdown(VIEW_CAPTIONS[key], elem_classes="caption")
        table = gr.Dataframe(sv["table"], interactive=False, wrap=True,
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
        harm = gr.Plot(harm_gain_figure(shipped, bits=bits_points), show_label=False, elem_id="harm-gain-plot")
        gr.Markdown(HARM_GAIN_CAPTION + BITS_CAPTION, elem_classes="caption")
        gr.Markdown(harm_gain_source(shipped), elem_classes="caption", elem_id="harm-gain-source")
    return ViewsPanel(JobPanel(start, stop, job, progress, status, refresh), f, plots, table, how, scale, harm,
                      example)


#: what the bit widths' points of the scatter are
BITS_CAPTION = (" The dark hexagons, labelled, are bit widths of an across-bits run (the Across bits tab: the shipped "
                "one, or yours once it has finished): harm = how far the plain base's perplexity is above full "
                "precision, gain = how much of it the best correction wins back. Their harms span orders of "
                "magnitude, so with them both axes are logarithmic; the fit is of the runs' points alone.")


def harm_gain_source(data: dict) -> str:
    """Where the shipped scatter's points (`paper_scatter()`) come from: the command, its settings' size and the
    machine."""
    if not data["points"]:
        return "No points shipped yet: `python -m bench.paper_table` measures them."
    s = data.get("settings") or {}
    return (f"Measured ahead by `python -m bench.paper_table`: {len(data['points'])} init runs, "
            f"{s.get('calib_samples', '?')} x {s.get('seq_len', '?')} calibration tokens and "
            f"{s.get('eval_tokens', '?')} held-out tokens per text; {data.get('machine', '')}. Its table, downstream "
            f"accuracy included, is in bench/README.md. Command: `{data.get('command', '')}`")
