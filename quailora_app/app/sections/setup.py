"""1 · Setup: model, text, quantization (bitsandbytes or HQQ, bits, block size) and LoRA settings, calibration and
evaluation text, the initializations to compare, downstream accuracy, and the advanced settings. One input per
setting name (`Setup.fields`), so the start handlers take them by name."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr

from quailora_app.app import uploads as paths
from quailora_app.app.forms import method_choices, method_info
from quailora_app.config import ALL_LINEAR, QUANTIZER_BITS, InitConfig
from quailora_app.settings import settings
from quailora_app.sources.models import EMBEDDED_MODELS, EMBEDDED_NOTE

TARGET_CHOICES = (ALL_LINEAR, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UPLOAD_TYPES = paths.PICKER_TYPES
#: the quantizer radio: (label, setting value); bitsandbytes first, the default and the QLoRA recipe
QUANTIZER_CHOICES = [("bitsandbytes (QLoRA recipe)", "bitsandbytes"), ("HQQ", "hqq")]


@dataclass
class Setup:
    """Step 1 and the initialization choices: one input per setting name, and the lines about the choices."""

    fields: dict[str, gr.components.Component]
    model_note: gr.Markdown
    data_info: gr.Markdown

    def named(self, names: tuple[str, ...], more: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The inputs of `names`, from here or `more` (a later section's fields), for `inputs_kwargs`."""
        pool = {**self.fields, **(more or {})}
        return {name: pool[name] for name in names}


def setup_section(d: dict[str, Any]) -> Setup:
    """1 · Setup: model, text, quantization and LoRA settings, calibration text, initializations, advanced."""
    init = settings(InitConfig)
    gr.Markdown("## 1 · Setup", elem_classes="step")
    f: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column():
            f["model"] = gr.Dropdown(list(EMBEDDED_MODELS), value="embedded", allow_custom_value=True, label="Model",
                                     info="'embedded' = SmolLM2-135M-Instruct, 'embedded:gemma3' = Gemma 3 270M "
                                          "(Gemma Terms of Use), both offline; or type a hub id / local folder")
            note = gr.Markdown(f"<small>{EMBEDDED_NOTE}</small>", elem_classes="note")
        with gr.Column():
            f["dataset"] = gr.Dropdown(["embedded", "embedded:speeches"], value="embedded", allow_custom_value=True,
                                       label="Text", info="embedded = Rotten Tomatoes snippets; embedded:speeches = "
                                                          "2012 convention speeches; or a hub dataset id / local path")
            f["upload"] = gr.File(label="…or upload a text file (overrides the choice above)", file_types=UPLOAD_TYPES,
                                  type="filepath", height=150)
            f["text_column"] = gr.Dropdown([], value=None, allow_custom_value=True, label="Text column",
                                           info="filled from the uploaded file; empty = guess")
            info = gr.Markdown("", elem_classes="note")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=220):
            gr.Markdown("**Quantization**")
            f["quantizer"] = gr.Radio(QUANTIZER_CHOICES, value=init["quantizer"].default, label="quantizer",
                                      elem_id="quantizer", info="bitsandbytes: 4-bit NF4/FP4, the QLoRA recipe; "
                                                                "HQQ: 2, 3, 4 or 8 bits, no calibration data")
            default_quantizer = init["quantizer"].default
            f["bits"] = gr.Dropdown(list(QUANTIZER_BITS[default_quantizer]), value=init["bits"].default,
                                    allow_custom_value=True, label="bits per weight", elem_id="bits",
                                    info="bitsandbytes: 4; HQQ: 2, 3, 4 or 8")
            f["quant"] = gr.Radio(list(init["quant"].choices()), value=init["quant"].default,
                                  label="4-bit data type (bitsandbytes)", elem_id="quant-type")
            f["double_quant"] = gr.Checkbox(value=init["double_quant"].default,
                                            label="double quantization (quantize the scales too; bitsandbytes)")
            f["block_size"] = gr.Dropdown([32, 64, 128, 256], value=init["block_size"].default, allow_custom_value=True,
                                          label="block / group size (weights per scale)", elem_id="block-size")
        with gr.Column(min_width=220):
            gr.Markdown("**LoRA adapter**")
            f["rank"] = gr.Slider(1, 128, value=init["rank"].default, step=1, label="rank r")
            f["alpha"] = gr.Number(value=init["alpha"].default, label="alpha (scale s = alpha / r)")
            f["rslora"] = gr.Checkbox(value=init["rslora"].default, label="rsLoRA (s = alpha / √r)")
            f["targets"] = gr.Dropdown(list(TARGET_CHOICES), value=d["targets"], multiselect=True,
                                       allow_custom_value=True, label="target modules", elem_id="targets",
                                       info="all-linear = every linear layer of the decoder blocks")
        with gr.Column(min_width=220):
            gr.Markdown("**Calibration and evaluation text**")
            f["calib_samples"] = gr.Number(value=d["calib_samples"], precision=0, label="calibration sequences")
            f["seq_len"] = gr.Number(value=d["seq_len"], precision=0, label="tokens per sequence")
            f["eval_tokens"] = gr.Number(value=d["eval_tokens"], precision=0, label="held-out tokens for perplexity")
            f["seed"] = gr.Number(value=init["seed"].default, precision=0, label="seed (fixes the data splits)")
    with gr.Row(equal_height=False):
        f["methods"] = gr.CheckboxGroup(method_choices(), value=d["methods"], label="initializations to compare",
                                        info=method_info())
        f["baselines"] = gr.Checkbox(value=d["baselines"], label="also measure full-precision and 8-bit perplexity")
    with gr.Row(equal_height=False):
        f["accuracy_tasks"] = gr.CheckboxGroup(
            [("few-shot labels (sentiment)", "labels"), ("continuation (multiple choice)", "continuation")],
            value=d["accuracy_tasks"], label="downstream accuracy (as lm-evaluation-harness scores it)",
            info="each variant answers held-out items by log-likelihood; 95% intervals shown. On a CPU it adds about "
                 "a minute per variant at the sizes below", elem_id="accuracy-tasks")
        f["label_items"] = gr.Number(value=d["label_items"], precision=0, label="labelled items per variant")
        f["continuation_items"] = gr.Number(value=d["continuation_items"], precision=0,
                                            label="continuation items per variant")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            f["als_rounds"] = gr.Number(value=init["als_rounds"].default, precision=0, label="QuAILoRA ALS rounds")
            f["damping"] = gr.Number(value=init["damping"].default, label="damping λ (× mean diagonal of H)")
    return Setup(f, note, info)
