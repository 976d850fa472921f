"""Error feedback (methods/sequential.py, method "sequential"): the math is the least-squares fit it claims; where the
4-bit model's inputs equal the full-precision ones (no quantization error upstream) it is closed_form; it runs end to
end through the init flow and through the Python API on a user's PeftModel, with the same factors."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quailora_app import replace_lora_weights_quailora
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.engine.calibration.calibrate import hessians_by_hooks
from quailora_app.engine.calibration.plan import ModelContext, uniform_plan
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods.init_math import closed_form_correction, damped, split_factors
from quailora_app.engine.methods.registry import MODEL, get_method, model_method_names
from quailora_app.engine.methods.sequential import feedback_correction, feedback_objective, feedback_target
from quailora_app.engine.quantization.bnb import dequantized_weight, load_4bit
from quailora_app.events import RunFinished
from quailora_app.flows.init import run_init
from quailora_app.sources.data import load_splits
from quailora_app.sources.models import ModelSource

DATA = dict(seq_len=32, calib_samples=8, eval_tokens=256)
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- the math
def problem(m=8, n=12, N=300, seed=0, same_inputs=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Q = W + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, N, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)[:, None]
    X_tilde = X if same_inputs else X + 0.2 * torch.randn(n, N, generator=g, dtype=torch.float64)
    H_tilde = X_tilde @ X_tilde.T / N
    D = (X - X_tilde) @ X_tilde.T / N
    return W, Q, X, X_tilde, H_tilde, D


@pytest.mark.parametrize("residual", [False, True])
def test_the_objective_is_closed_forms_with_c_star_and_h_tilde(residual):
    """f(C) = ||W X + R - (Q + C) X~||^2 / N + lambda ||E - C||^2 = const + tr((C* - C) S (C* - C)^T) for any C."""
    W, Q, X, X_tilde, H_tilde, D = problem()
    R = torch.randn(W.shape[0], X.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) \
        if residual else None
    G = R @ X_tilde.T / X.shape[1] if residual else None
    spec = damped(H_tilde, 0.01)
    target = feedback_target(W - Q, W, D, spec, G)
    g = torch.Generator().manual_seed(1)
    values = []
    for _ in range(3):
        C = torch.randn(*W.shape, generator=g, dtype=torch.float64)
        f = feedback_objective(W, Q, C, X, X_tilde, spec.damping_lambda, R)
        values.append(f - float(((target - C) @ spec.matrix * (target - C)).sum()))
    assert max(values) - min(values) < 1e-9 * abs(values[0]) + 1e-9


def test_rank_r_fit_is_optimal_and_beats_closed_form_on_its_objective():
    W, Q, X, X_tilde, H_tilde, D = problem()
    rank, lam = 3, damped(H_tilde, 0.01).damping_lambda
    P, Rt = feedback_correction(W - Q, W, H_tilde, D, rank)
    best = feedback_objective(W, Q, P @ Rt, X, X_tilde, lam)
    P0, Rt0 = closed_form_correction(W - Q, damped(X @ X.T / X.shape[1], 0.01), rank)
    assert best < feedback_objective(W, Q, P0 @ Rt0, X, X_tilde, lam)
    assert best < feedback_objective(W, Q, torch.zeros_like(W), X, X_tilde, lam)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):  # no nearby rank-r point is better
        dP, dR = torch.randn(*P.shape, generator=g, dtype=P.dtype), torch.randn(*Rt.shape, generator=g, dtype=P.dtype)
        assert best <= feedback_objective(W, Q, (P + 1e-3 * dP) @ (Rt + 1e-3 * dR), X, X_tilde, lam) + 1e-12


def test_full_rank_without_damping_is_the_least_squares_fit():
    W, Q, X, X_tilde, H_tilde, D = problem()
    P, Rt = feedback_correction(W - Q, W, H_tilde, D, min(W.shape), damping=0.0)
    residual = W @ X - (Q + P @ Rt) @ X_tilde
    assert float((residual @ X_tilde.T).abs().max()) < 1e-8 * float((W @ X).abs().max()) * X.shape[1]


def test_same_inputs_is_closed_form():
    W, Q, X, _, H_tilde, D = problem(same_inputs=True)
    assert float(D.abs().max()) == 0.0
    assert torch.equal(feedback_target(W - Q, W, D, damped(H_tilde, 0.01)), (W - Q).to(torch.float64))
    P, Rt = feedback_correction(W - Q, W, H_tilde, D, 3)
    P0, Rt0 = closed_form_correction(W - Q, damped(H_tilde, 0.01), 3)
    torch.testing.assert_close(P @ Rt, P0 @ Rt0, rtol=1e-10, atol=1e-12)


def test_registered_as_a_whole_model_method():
    method = get_method("sequential")
    assert method.kind == MODEL and "sequential" in model_method_names()
    assert "sequential" in InitConfig(methods=("sequential",)).methods
    assert "sequential" not in InitConfig().methods  # not a default: about three times calibration's forward work


# ---------------------------------------------------------------------------------------------- on the tiny Llama
def products(adapter_folder, scaling):
    """module path -> s * B @ A of a saved adapter (float64)."""
    saved = load_file(adapter_folder / "adapter_model.safetensors")
    out = {}
    for key, A in saved.items():
        if key.endswith("lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = saved[key.replace("lora_A", "lora_B")]
            out[path] = scaling * B.double() @ A.double()
    return out


def close(a, b, tol=1e-5):
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-12)


@pytest.fixture(scope="module")
def flow_run(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), **DATA),
                     lora=LoraSettings(rank=4, alpha=8.0), methods=("closed_form", "sequential"), baselines=False,
                     out=str(out))
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    return out, json.loads((out / "report.json").read_text())


def test_init_flow_end_to_end(flow_run):
    out, report = flow_run
    assert report["methods"] == ["qlora", "closed_form", "sequential"]
    ppl = report["perplexity"]
    assert math.isfinite(ppl["sequential"]) and ppl["sequential"] > 1
    assert report["seconds"]["sequential"] > 0
    details = report["method_details"]["sequential"]
    assert len(details["seconds_per_block"]) == 2 and len(details["local_calibrated_error"]) == 14
    assert details["residual_layers"] == [f"model.layers.{i}.{name}" for i in (0, 1)
                                          for name in ("mlp.down_proj", "self_attn.o_proj")]
    assert len(report["layers"]) == 14
    for row in report["layers"]:
        weight, calibrated = row["weight_error"]["sequential"], row["calibrated_error"]["sequential"]
        assert 0 <= weight and math.isfinite(calibrated) and calibrated >= 0
        # the local figure of the layer's own correction never beats closed_form's optimum of that objective
        assert details["local_calibrated_error"][row["name"]] >= row["calibrated_error"]["closed_form"] - 1e-6
    # in its own model, each corrected layer's output is closer to the full-precision one than plain 4-bit's
    in_stream = sorted(row["calibrated_error"]["sequential"] for row in report["layers"])
    assert in_stream[len(in_stream) // 2] < 0.9
    assert (out / "adapters" / "sequential" / "adapter_config.json").is_file()


def test_first_input_group_equals_closed_form(flow_run):
    """Block 0's q/k/v read the embeddings, identical in both streams (X~ = X): closed_form's correction there.
    Later layers see inputs changed by the corrections before them, and their fits differ."""
    out, _ = flow_run
    mine = products(out / "adapters" / "sequential", 2.0)
    theirs = products(out / "adapters" / "closed_form", 2.0)
    for local in ("q_proj", "k_proj", "v_proj"):
        path = f"model.layers.0.self_attn.{local}"
        assert close(mine[path], theirs[path]), path
    for path in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert not close(mine[path], theirs[path], 1e-3), path


def test_zero_quantization_error_upstream_is_closed_form(tiny_model_dir, text_file, tmp_path):
    """A 'full-precision' checkpoint equal to the 4-bit weights in every layer but the last one (block 1's
    down_proj): upstream nothing differs, so X~ = X there and error feedback gives closed_form's correction, with
    H from hooks on the whole full-precision model (another path than the two streams); elsewhere E = 0, C = 0."""
    source = ModelSource("tiny", tiny_model_dir)
    model = load_4bit(source, QuantConfig(), CPU, torch.float32)
    last = "model.layers.1.mlp.down_proj"
    folder = tmp_path / "exact-upstream"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    modules = dict(model.named_modules())
    lora = LoraSettings(rank=4, alpha=8.0)
    plan = uniform_plan(model, lora)
    for path in plan:
        if path != last:
            state[f"{path}.weight"] = dequantized_weight(modules[path]).contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    calib = load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).calib

    built = get_method("sequential").build(ModelContext(model, Checkpoint(folder), calib, plan, lora, CPU,
                                                        torch.float32))
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    H = hessians_by_hooks(full, calib, ("all-linear",))[last]
    E = state[f"{last}.weight"].double() - dequantized_weight(modules[last]).double()
    P, Rt = closed_form_correction(E, damped(H.double(), 0.01), 4)
    A, B = split_factors(P, Rt, lora.scaling)
    f = built.factors[last]
    assert close(lora.scaling * f.B.double() @ f.A.double(), lora.scaling * B.double() @ A.double(), 1e-4)
    for path, f in built.factors.items():
        if path != last:  # no error to correct: C = 0 up to round-off
            assert float((f.B.double() @ f.A.double()).norm()) < 1e-4 * float(E.norm())
    assert built.layers[last][1] < 1.0


def test_python_api_on_a_users_peft_model(flow_run, tiny_model_dir, text_file):
    """The user's PeftModel: its own LoRA is switched off while the 4-bit stream runs, and the factors written are
    the init flow's."""
    # test_api's helpers: the user's 4-bit PeftModel (r = 4, alpha = 8, all-linear) and its factors
    from test_api import factors, lora

    out, _ = flow_run
    calib = load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).calib
    model = lora(tiny_model_dir)
    model.train()
    bases = {n: m.get_base_layer().weight.data.clone() for n, m in model.named_modules() if hasattr(m, "lora_A")}
    result = replace_lora_weights_quailora(model, calib, "sequential", progress=False)
    assert len(result.layers) == 14 and result.calibrated_error_median < 1.0
    assert model.training and not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
    for n, m in model.named_modules():
        if n in bases:
            assert torch.equal(m.get_base_layer().weight.data, bases[n])
    saved = products(out / "adapters" / "sequential", 2.0)
    mine = factors(model)
    assert len(mine) == 14
    for name, (A, B, s) in mine.items():
        assert close(s * B.double() @ A.double(), saved[name]), name


def test_residual_writers_and_the_option_that_turns_them_off(tiny_model_dir, text_file):
    """The tiny Llama's blocks add o_proj and down_proj to the residual stream (checked on a forward pass); with
    options {"sequential_residual": False} every layer aims at its own full-precision output: the same fits up to
    block 0's gate/up (the residual error o_proj sees there is zero: both streams start from the same embeddings),
    different from block 0's down_proj on."""
    from quailora_app.engine.calibration.calibrate import build_full_precision_block, capture_block_inputs
    from quailora_app.engine.methods.sequential import residual_writers

    source = ModelSource("tiny", tiny_model_dir)
    model = load_4bit(source, QuantConfig(), CPU, torch.float32)
    checkpoint = Checkpoint(tiny_model_dir)
    calib = load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).calib
    hidden, kwargs = capture_block_inputs(model, calib, 8, CPU)[0]
    block = build_full_precision_block(model, 0, checkpoint, CPU, torch.float32)
    assert residual_writers(block, hidden, kwargs) == {"self_attn.o_proj": "", "mlp.down_proj":
                                                       "post_attention_layernorm"}
    lora = LoraSettings(rank=4, alpha=8.0)
    plan = uniform_plan(model, lora)
    built = {flag: get_method("sequential").build(ModelContext(model, checkpoint, calib, plan, lora, CPU, torch.float32,
                                                               options={"sequential_residual": flag}))
             for flag in (True, False)}
    assert built[False].details["residual_layers"] == [] and len(built[True].details["residual_layers"]) == 4
    prod = {flag: {p: f.B.double() @ f.A.double() for p, f in b.factors.items()} for flag, b in built.items()}
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj"):
        assert close(prod[True][path], prod[False][path], 1e-6), path
    for path in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        assert not close(prod[True][path], prod[False][path], 1e-3), path
