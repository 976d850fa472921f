"""The "Across bits" tab beside the teaching views: memory against quality over bit widths (the trade-off
frontier), its one-line reading and its points as a table, and a live across-bits run (its own job) at the Setup's
model, text, LoRA shape and seed. Shows the shipped example's across-bits run until the visitor has a job."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from quailora_app.app.across_bits import bits_drawn
from quailora_app.app.sections.common import ExampleBanner, JobPanel, example_banner, job_row
from quailora_app.config import BITS_BASES
from quailora_app.engine.methods.registry import find_method
from quailora_app.flows.bits import base_label

#: the corrections the tab offers (fast, per layer; the command line has the whole-model ones too)
BITS_METHODS = ("closed_form", "svd", "quailora")

FRONTIER_CAPTION = (
    "Each point: one quantized base, plain (dotted line) or with a rank-r correction (solid), all from one "
    "calibration. x: memory per linear weight in bits, counting every scale, zero and nested statistic and, for a "
    "corrected point, the adapter's 16-bit parameters; y: held-out perplexity on a log axis (a collapsed model is "
    "orders of magnitude up). HQQ bases are circles, bitsandbytes' squares; the dashed line is full precision. A "
    "point below and left of another is a smaller model that is also better.")


@dataclass
class BitsPanel:
    """The across-bits tab: its own settings, the job panel, the frontier, its reading and table."""

    panel: JobPanel
    fields: dict[str, gr.components.Component]  # bits_bases, bits_methods, bits_group_size, bits_calib_samples, ...
    frontier: gr.Plot
    reading: gr.Markdown
    table: gr.Dataframe
    example: ExampleBanner | None = None

    @property
    def outputs(self) -> list:
        """In the order of /bits_status's outputs."""
        p = self.panel
        return [p.progress, p.status, self.frontier, self.reading, self.table]


def bits_section(bd: dict[str, Any], shipped: dict[str, Any] | None = None) -> BitsPanel:
    """`bd`: the tab's default settings (`across_bits.bits_defaults`); `shipped`: the shipped example's across-bits
    run (`across_bits.example_bits`), shown until the visitor has a job (an empty frontier without it). Call inside
    the page's gr.Tabs."""
    sb = shipped or bits_drawn(None)
    with gr.Tab("Across bits", elem_id="tab-bits"):
        gr.Markdown(
            "**Bits as a dial.** Quantize the Setup's model to several bit widths (HQQ at 2, 3, 4 and 8 bits beside "
            "bitsandbytes' NF4 and LLM.int8), calibrate **once** (the activation statistics do not depend on the "
            "bits) and correct every base with each rank-r initialization; then measure held-out perplexity and "
            "memory per weight. Uses the Setup's model, text, LoRA rank and targets and seed; runs in the same job "
            "queue. The default (three bit widths, the closed form) takes 2 to 3 minutes on 2 CPU cores.",
            elem_classes="note")
        f: dict[str, Any] = {}
        with gr.Row(equal_height=False):
            f["bits_bases"] = gr.CheckboxGroup([(base_label(b, 64).replace(" (groups of 64)", ""), b)
                                                for b in BITS_BASES], value=bd["bases"], label="bases to compare",
                                               elem_id="bits-bases", scale=3)
            f["bits_methods"] = gr.CheckboxGroup([(f"+ {find_method(m).short}", m) for m in BITS_METHODS],
                                                 value=bd["methods"], label="corrections (no correction is always "
                                                                            "measured)", elem_id="bits-methods",
                                                 scale=2)
        with gr.Row(equal_height=False):
            f["bits_group_size"] = gr.Dropdown([32, 64, 128], value=bd["group_size"], label="HQQ group size",
                                               scale=1)
            f["bits_calib_samples"] = gr.Number(value=bd["calib_samples"], precision=0,
                                                label="calibration sequences (across bits)", scale=1)
            f["bits_seq_len"] = gr.Number(value=bd["seq_len"], precision=0,
                                          label="tokens per sequence (across bits)", scale=1)
            f["bits_eval_tokens"] = gr.Number(value=bd["eval_tokens"], precision=0,
                                              label="held-out tokens (across bits)", scale=1)
        start, stop, job = job_row("Run across bits", "bits")
        progress = gr.HTML("<div class='q-progress idle'><div class='q-label'>no across-bits run yet</div></div>",
                           elem_id="bits-progress")
        status = gr.Markdown("", elem_id="bits-status")
        example = example_banner("bits", sb.get("label"))
        frontier = gr.Plot(sb["frontier"], show_label=False, elem_id="bits-frontier")
        reading = gr.Markdown(sb["reading"], elem_id="bits-reading")
        gr.Markdown(FRONTIER_CAPTION, elem_classes="caption")
        table = gr.Dataframe(sb.get("table", pd.DataFrame()), interactive=False, wrap=True,
                             label="the frontier's points: memory per linear weight (with the adapter) and held-out "
                                   "perplexity; gap closed = the share of plain base → full precision won back",
                             elem_id="bits-table")
        refresh = gr.Button("refresh", visible=False)
    return BitsPanel(JobPanel(start, stop, job, progress, status, refresh), f, frontier, reading, table, example)
