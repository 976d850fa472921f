"""5 · Generate: see it in words. What each variant says after a prompt (full precision, 8-bit, plain 4-bit, 4-bit
with each adapter of a finished init or fine-tuning run), side by side and streamed; the agreement strip (each
token coloured by whether the variant's top-1 next token there is full precision's, shaded by the KL); the top-10
next tokens at a chosen position; corrected against plain 4-bit over held-out documents; and, on request, what
survives deployment (a)-(f) with a download of the merged model. Shows the shipped example's generate run until the
visitor has a job. Layout only: app/generation.py builds what it shows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from quailora_app.app.generation import DEFAULTS, LATEST_CHOICE, PROMPT_CHOICES, generate_drawn
from quailora_app.app.sections.common import ExampleBanner, JobPanel, example_banner, job_row

CAPTIONS = {
    "strip": "Each token of full precision's continuation; for each variant, teacher-forced along it (the same "
             "prefix at every position), green where its most likely next token is full precision's and red where "
             "not, darker for a larger KL(full ‖ variant) at that position. The outlined column is the position "
             "chosen below.",
    "deploy": "One adapter shipped six ways, held-out perplexity (lower is better): (a) on the 4-bit base as "
              "trained, (b) merged into the original weights, (c) (b) quantized again, (d) kept apart after a save "
              "and load, (e) merged into the dequantized 4-bit weights, (f) (e) quantized again.",
}


@dataclass
class GeneratePanel:
    """The Generate section: its settings, the job panel, and what it shows."""

    panel: JobPanel
    fields: dict[str, gr.components.Component]  # gen_from, gen_prompt_from, gen_prompt, gen_new_tokens, ...
    refresh_sources: gr.Button
    continuations: gr.HTML
    strip: gr.HTML
    summary: gr.Dataframe
    versus: gr.Plot
    position: gr.Slider
    top10: gr.Plot
    deploy_table: gr.Dataframe
    deploy_reading: gr.Markdown
    deploy_plot: gr.Plot
    merged_button: gr.Button
    merged_file: gr.File
    example: ExampleBanner | None = None

    @property
    def outputs(self) -> list:
        """In the order of /generate_status's outputs."""
        p = self.panel
        return [p.progress, p.status, self.continuations, self.strip, self.summary, self.versus, self.position,
                self.top10, self.deploy_table, self.deploy_reading, self.deploy_plot]


def generate_section(shipped: dict[str, Any] | None = None) -> GeneratePanel:
    """`shipped`: the shipped example's generate run (`generation.example_generate`), shown until the visitor has a
    job (empty panels without it)."""
    sg = shipped or generate_drawn(None)
    with gr.Column(elem_id="generate-section"):
        gr.Markdown("## 5 · Generate: see it in words", elem_classes="step")
        gr.Markdown(
            "What does the model *say* at 4 bits, and where does it stop saying what the full-precision model says? "
            "Continue one prompt with full precision, 8-bit, plain 4-bit and 4-bit with each adapter of a finished run "
            "(each initialization of an init run; after fine-tuning, each 4-bit arm too), side by side, then "
            "teacher-force each variant along full precision's continuation and along held-out documents' own text. "
            "One 4-bit base holds every adapter, and plain and corrected 4-bit decode together as one batch (on a "
            "CPU in a second thread, beside 8-bit). About 25 s with the embedded model on 2 idle cores.",
            elem_classes="note")
        f: dict[str, Any] = {}
        with gr.Row(equal_height=False):
            f["gen_from"] = gr.Dropdown([LATEST_CHOICE], value=LATEST_CHOICE[1], label="generate from", scale=4,
                                        info="a finished init or fine-tuning run: its model, text, 4-bit settings and "
                                             "adapters", elem_id="gen-from")
            refresh = gr.Button("↻ run folders", size="sm", scale=0, min_width=120)
            f["gen_new_tokens"] = gr.Number(value=DEFAULTS["new_tokens"], precision=0, label="new tokens", scale=1,
                                            elem_id="gen-new-tokens")
            f["gen_documents"] = gr.Number(value=DEFAULTS["documents"], precision=0, label="held-out documents",
                                           info="agreement over them (0: none)", scale=1)
        with gr.Row(equal_height=False):
            f["gen_prompt_from"] = gr.Radio([(a, b) for a, b in PROMPT_CHOICES], value="held_out", label="prompt",
                                            scale=1, elem_id="gen-prompt-from")
            f["gen_prompt"] = gr.Textbox("", lines=2, max_lines=6, label="your prompt (with 'my own text')", scale=3,
                                         elem_id="gen-prompt")
        with gr.Row(equal_height=False):
            f["gen_sample"] = gr.Checkbox(DEFAULTS["sample"], label="sample instead of greedy (seeded: the same draws "
                                                                    "for every variant)", scale=2)
            f["gen_temperature"] = gr.Number(value=DEFAULTS["temperature"], label="temperature", scale=1)
            f["gen_seed"] = gr.Number(value=DEFAULTS["seed"], precision=0, label="sampling seed", scale=1)
            f["gen_deploy"] = gr.Checkbox(DEFAULTS["deploy"], label="also measure what survives deployment (merge, "
                                                                    "re-quantize; a few minutes more)", scale=2,
                                          elem_id="gen-deploy")
        start, stop, job = job_row("Generate", "generate")
        progress = gr.HTML("<div class='q-progress idle'><div class='q-label'>no generate run yet</div></div>",
                           elem_id="generate-progress")
        status = gr.Markdown("", elem_id="generate-status")
        example = example_banner("generate", sg.get("label"))
        continuations = gr.HTML(sg["continuations"], elem_id="gen-continuations")
        gr.Markdown("### Where each variant stops saying what full precision says", elem_classes="subhead")
        strip = gr.HTML(sg["strip"], elem_id="gen-strip")
        gr.Markdown(CAPTIONS["strip"], elem_classes="caption")
        summary = gr.Dataframe(sg["summary"], interactive=False, wrap=True, elem_id="gen-summary",
                               label="each variant against full precision: on the prompt, over the held-out documents")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                position = gr.Slider(1, max(2, sg["positions"]), value=sg["position"], step=1,
                                     label="position in full precision's continuation", elem_id="gen-position")
                top10 = gr.Plot(sg["top10"], show_label=False, elem_id="gen-top10")
                gr.Markdown("The ten most likely next tokens at the chosen position: full precision, plain 4-bit, "
                            "the best corrected variant; full precision's own token outlined.", elem_classes="caption")
            with gr.Column(scale=2):
                versus = gr.Plot(sg["versus"], show_label=False, elem_id="gen-versus")
        with gr.Accordion("What survives deployment", open=True, elem_id="gen-deploy-box"):
            deploy_reading = gr.Markdown(sg["deploy_reading"], elem_id="gen-deploy-reading")
            # one above the other: beside the table, the figure gets too narrow for its titles on a 900 px page
            deploy_table = gr.Dataframe(sg["deploy_table"], interactive=False, wrap=True, elem_id="gen-deploy-table",
                                        column_widths=["64%", "18%", "18%"])  # the numbers in view at 900 px
            deploy_plot = gr.Plot(sg["deploy_plot"], show_label=False, elem_id="gen-deploy-plot")
            gr.Markdown(CAPTIONS["deploy"], elem_classes="caption")
            with gr.Row():
                merged_button = gr.Button("Download the merged model and the adapter (zip)", size="sm", scale=1)
                merged_file = gr.File(label="merged model (safetensors + config: from_pretrained) and adapter folder",
                                      interactive=False, scale=2, elem_id="gen-merged-file")
        refresh_status = gr.Button("refresh", visible=False)
    return GeneratePanel(JobPanel(start, stop, job, progress, status, refresh_status), f, refresh, continuations, strip,
                         summary, versus, position, top10, deploy_table, deploy_reading, deploy_plot, merged_button,
                         merged_file, example)
