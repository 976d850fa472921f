"""The model-level refinement `distill` (methods/distill.py): its full-precision targets are the full model's logits,
it lowers the KL to them on the windows it trains on, it never touches Q and leaves the model as it found it, and it
runs end to end through the init flow (report, figures, app views) and through the Python API."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from quailora_app import replace_lora_weights_quailora
from quailora_app.app import presenters
from quailora_app.config import DISTILL_DEFAULTS, DataConfig, InitConfig, LoraSettings, ModelConfig, TrainConfig
from quailora_app.engine.adapters import attach_lora, write_factors
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import ModelContext, uniform_plan
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods import distill
from quailora_app.engine.methods.registry import get_method, model_method_names
from quailora_app.engine.quantization.bnb import linear4bit_modules
from quailora_app.errors import ConfigError
from quailora_app.events import RunFinished
from quailora_app.flows.init import run_init
from quailora_app.plots import figures as F
from quailora_app.sources.data import load_splits

DATA = dict(seq_len=32, calib_samples=8, eval_tokens=256)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread


def four_bit(folder):
    """A user's 4-bit model as transformers loads it: bitsandbytes' CPU repacking left on (distill must not let a
    forward pass repack Q)."""
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32)


@pytest.fixture(scope="module")
def calib(tiny_model_dir, text_file):
    return load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).calib


def q_snapshot(model) -> dict[str, list[torch.Tensor]]:
    """Every 4-bit layer's packed data and quantization state (absmax, code, nested state), copied."""
    out = {}
    for name, layer in linear4bit_modules(model).items():
        state = layer.weight.quant_state.as_dict(packed=True)
        out[name] = [layer.weight.data.clone(), *(v.clone() for v in state.values() if isinstance(v, torch.Tensor))]
    return out


def model_state(model) -> dict:
    return {"modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "repack": [getattr(m, "support_avx512bf16_for_cpu", None) for m in model.modules()]}


def mean_kl_to_full(full, model, ids) -> float:
    """1/T sum_t KL(p_full || p_model), both models run whole (not distill's block-by-block path)."""
    with torch.no_grad():
        return float(distill.kl_sum(model(input_ids=ids).logits, full(input_ids=ids).logits)) / ids.numel()


def test_the_teacher_is_the_full_precision_model(tiny_model_dir, calib):
    """Block-by-block final hidden states through the 4-bit model's own final norm and lm_head are the logits of
    the full-precision model."""
    model = four_bit(tiny_model_dir)
    hidden = distill.full_precision_hidden(model, Checkpoint(tiny_model_dir), calib, CPU, torch.float32)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(distill.Head(model)(hidden), full(input_ids=calib).logits, rtol=1e-4, atol=1e-4)


def test_refinement_lowers_the_kl_and_never_touches_q(tiny_model_dir, calib):
    model = four_bit(tiny_model_dir)
    lora = LoraSettings(rank=4, alpha=8.0)
    checkpoint = Checkpoint(tiny_model_dir)
    result = InitResult()
    for _ in initialize(model, checkpoint, calib, lora, ["closed_form"], result, device=CPU):
        pass
    q_before, state_before = q_snapshot(model), model_state(model)
    ctx = ModelContext(model, checkpoint, calib, uniform_plan(model, lora), lora, CPU, torch.float32,
                       options={"distill_steps": 12, "distill_lr": 2e-3, "distill_batch": 2},
                       start=result.factors["closed_form"])
    built = get_method("distill").build(ctx)

    # Q, its quantization state and the model itself are as they were (no LoRA left, flags restored)
    q_after = q_snapshot(model)
    assert q_after.keys() == q_before.keys()
    for name, tensors in q_before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, q_after[name], strict=True)), name
    assert model_state(model) == state_before

    d = built.details
    assert len(d["kl_curve"]) == 12 and all(math.isfinite(x) for x in d["kl_curve"])
    assert d["holdout_windows"] == 1 and d["trained_windows"] == 7
    kl = d["kl"]
    assert kl["closed_form"]["train"] < kl["qlora"]["train"]
    assert kl["distill"]["train"] < 0.95 * kl["closed_form"]["train"]
    assert d["kl_ratio"]["train"] == pytest.approx(kl["distill"]["train"] / kl["closed_form"]["train"])
    assert built.layers == {} and set(built.factors) == set(ctx.plan)

    # measured independently on every window trained on, the full-precision model run whole as the teacher
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = attach_lora(model, lora, list(ctx.plan))
    peft_model.eval()
    trained = calib[:7]
    write_factors(peft_model, result.factors["closed_form"])
    before = mean_kl_to_full(full, model, trained)
    write_factors(peft_model, built.factors)
    after = mean_kl_to_full(full, model, trained)
    peft_model.unload()
    assert after < 0.95 * before, (before, after)
    assert before == pytest.approx(kl["closed_form"]["train"], rel=0.5)  # the same quantity, on other windows


def test_window_plan_keeps_the_held_out_windows_out():
    plan = distill.window_plan(32, steps=5, batch=3)
    held = {int(plan.used[r]) for r in plan.held}
    assert held == {30, 31}
    trained = {int(plan.used[r]) for step in plan.steps for r in step}
    assert not held & trained and len(trained) == plan.trained == 15
    assert {int(plan.used[r]) for r in plan.probe} <= trained and len(plan.probe) == 2
    assert distill.window_plan(1, 3, 2).held.numel() == 0  # a single window: trained on, nothing held out


def test_bad_options_are_refused():
    for options in ({"distill_steps": 0}, {"distill_lr": -1.0}, {"distill_batch": 1.5}, {"distill_lr": "fast"}):
        with pytest.raises(ConfigError, match="distill_"):
            distill.settings(options)
    with pytest.raises(ConfigError, match="distill-steps"):
        InitConfig(distill_steps=0)
    for defaults in (InitConfig(), TrainConfig()):  # the API's defaults are the CLI's, read from one declaration
        assert {name: getattr(defaults, name) for name in DISTILL_DEFAULTS} == DISTILL_DEFAULTS
    assert distill.settings({}) == tuple(DISTILL_DEFAULTS.values())


def test_init_flow_end_to_end_with_figures(tiny_model_dir, text_file, tmp_path):
    assert "distill" in model_method_names()
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), **DATA),
                     lora=LoraSettings(rank=4), methods=("closed_form", "distill"), baselines=False,
                     distill_steps=4, out=str(tmp_path / "run"))
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    report = events[-1].report
    assert math.isfinite(report["perplexity"]["distill"]) and report["seconds"]["distill"] > 0
    details = report["method_details"]["distill"]
    assert len(details["kl_curve"]) == 4 and details["steps"] == 4
    assert details["start"].startswith("closed_form of the per-layer pass")
    assert set(details["kl"]) == {"qlora", "closed_form", "distill"}
    assert all("distill" not in row["calibrated_error"] for row in report["layers"])  # no per-layer rows
    assert (tmp_path / "run" / "adapters" / "distill" / "adapter_model.safetensors").is_file()

    # the figures, the table and the app's views cope with a method that has no per-layer rows
    assert "4-bit + closed form, then distilled (model-level KL)" not in {t.name for t in
                                                                         F.layer_error_figure(report).data}
    assert F.removal_heatmap(report, "distill").data == ()  # nothing per layer to draw: an empty figure
    assert F.short_label("distill") in str(F.perplexity_figure(report).to_dict())
    row = next(r for r in F.numbers_table(report) if r[0] == F.label("distill"))
    assert row[1] == row[2] == "–" and row[3] != "–"
    job = SimpleNamespace(events=[e.to_dict() for e in events], report=report,  # a job keeps its events as dicts
                          status="finished", run_dir=str(tmp_path / "run"), stage=None, total=None,
                          config=SimpleNamespace(methods=list(cfg.methods), model=cfg.model))
    views = presenters.init_views(job, None)
    assert len(views["numbers"]) == 3
    summary = presenters.summary_text(job, None)
    assert f"- {F.label('distill')}: perplexity" in summary and "(closed form → distill)" in summary


def test_through_the_api_on_a_users_peft_model(tiny_model_dir, calib):
    model = get_peft_model(four_bit(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
    base = model.get_base_model()
    q_before, state_before = q_snapshot(base), model_state(model)
    result = replace_lora_weights_quailora(model, calib, "distill", options={"distill_steps": 3}, progress=False)
    assert result.method == "distill" and result.layers == [] and result.seconds["distill"] > 0
    assert math.isnan(result.calibrated_error_median)
    q_after = q_snapshot(base)
    for name, tensors in q_before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, q_after[name], strict=True)), name
    assert model_state(model) == state_before  # LoRA still trainable, base frozen, modes as they were
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    after = mean_kl_to_full(full, model, calib)
    with model.disable_adapter():
        plain = mean_kl_to_full(full, model, calib)
    assert after < 0.8 * plain, (plain, after)
    with pytest.raises(ConfigError, match="distill_steps"):
        replace_lora_weights_quailora(model, calib, "distill", options={"distill_steps": -1}, progress=False)
