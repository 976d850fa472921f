"""3 · Fine-tune: the arms and training settings, the job panel, the curves, the speed table and the
downstream accuracy per arm; the shipped example run until the visitor has a job."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from quailora_app.app.forms import arm_choices
from quailora_app.app.sections.common import ExampleBanner, JobPanel, example_banner, job_row
from quailora_app.config import TrainConfig
from quailora_app.plots import figures as F
from quailora_app.settings import settings


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


def train_section(idle_progress: str, d: dict[str, Any], shipped: dict[str, Any] | None = None) -> TrainPanel:
    """`idle_progress`: the progress bar before any job; `d`: the page's default settings; `shipped`: the shipped
    example's fine-tuning run (`example_outputs`), shown until the visitor has a job."""
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
    start, stop, job = job_row("Start fine-tuning", "train")
    progress = gr.HTML(idle_progress, elem_id="train-progress")
    status = gr.Markdown("Nothing started yet in this session.", elem_id="train-status")
    sv = shipped or {}
    example = example_banner("train", sv.get("label"))
    curves = gr.Plot(sv.get("curves") or F.train_figure([]), label="fine-tuning curves", show_label=False,
                     elem_id="curves-plot")
    gr.Markdown(F.CAPTIONS["train"], elem_classes="caption")
    throughput = gr.Dataframe(sv["table"] if shipped else pd.DataFrame(columns=F.TRAIN_HEADER),
                              label="speed and memory per arm", interactive=False)
    refresh = gr.Button("refresh", visible=False)
    accuracy = gr.Plot(F.train_accuracy_figure([]), visible=False, label="downstream accuracy per arm",
                       show_label=False, elem_id="train-acc-plot")
    return TrainPanel(JobPanel(start, stop, job, progress, status, refresh), f, curves, throughput, accuracy, example)
