"""Parts more than one section uses: a job panel's row of buttons, and the banner over a section's plots while
they show the shipped example run."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


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


def job_row(start_label: str, key: str) -> tuple[gr.Button, gr.Button, gr.Textbox]:
    """The start and stop buttons and the job id of a job panel (elem_ids start-KEY, stop-KEY)."""
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


def example_banner(key: str, label: str | None) -> ExampleBanner:
    """The banner of section `key` (elem_ids example-KEY, live-KEY), shown when there is a `label`."""
    with gr.Row(visible=bool(label), equal_height=True, elem_id=f"example-{key}", elem_classes="example") as row:
        gr.Markdown(label or "", elem_classes="example-label")
        live = gr.Button("Compute it live", variant="primary", size="sm", scale=0, min_width=150, elem_id=f"live-{key}")
    return ExampleBanner(row, live)
