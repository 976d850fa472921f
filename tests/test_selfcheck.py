"""The self-check (evaluation/selfcheck.py) on every path that writes an initialization: a layer whose correction was
fitted to a wrong Q is measured through the layer's own product, reset to the plain QLoRA start (B = 0) and named;
the rest are kept. The API refuses when more than a few layers get worse, leaving the adapter as it was; the init
flow and fine-tuning from an init run report the reset layers (report["layers_reset"]) and the CLI says so."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from quailora_app import replace_lora_weights_quailora
from quailora_app.cli import summary_table, train_table
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig, TrainConfig
from quailora_app.engine.adapters import Factors
from quailora_app.engine.calibration import initialize as initialize_module
from quailora_app.engine.evaluation.evaluate import check_adapter_applied, check_adapters_applied
from quailora_app.engine.evaluation.selfcheck import max_resets, plain_start
from quailora_app.engine.quantization.bnb import dequantized_weight
from quailora_app.errors import ModelError
from quailora_app.flows.init import run_init
from quailora_app.flows.train import run_train
from quailora_app.sources.data import load_splits

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = dict(seq_len=32, calib_samples=8, eval_tokens=256)
BROKEN = "model.layers.1.mlp.down_proj"


def corrupt_q(monkeypatch, *names: str) -> None:
    """Make the engine read back a wrong Q for `names` (every layer when none): its blocks in the wrong order, as
    bitsandbytes' inverse once left them, so the correction is fitted to an error the layer does not have."""

    def wrong(layer):
        Q = dequantized_weight(layer)
        path = next((n for n, m in modules.items() if m is layer or getattr(m, "base_layer", None) is layer), None)
        return Q.roll(shifts=1, dims=0) if not names or path in names else Q

    modules: dict = {}
    real_initialize = initialize_module.initialize

    def initialize(model, *args, **kwargs):
        modules.update(dict(model.named_modules()))
        return real_initialize(model, *args, **kwargs)

    monkeypatch.setattr(initialize_module, "dequantized_weight", wrong)
    monkeypatch.setattr(initialize_module, "initialize", initialize)
    import quailora_app.api as api
    import quailora_app.flows.init as init_flow
    import quailora_app.flows.train_setup as train_setup

    for module in (api, init_flow, train_setup):
        monkeypatch.setattr(module, "initialize", initialize)


def four_bit_lora(folder):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")  # the class's defaults: no double quant
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # a user's evaluation pass first
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def lora_b(peft_model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): m.lora_B["default"].weight.detach().clone()
            for n, m in peft_model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}


@pytest.fixture(scope="module")
def texts(text_file):
    return text_file.read_text().splitlines()


def test_a_layer_fitted_to_a_wrong_q_is_reset_and_named_the_rest_kept(tiny_model_dir, texts, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = four_bit_lora(tiny_model_dir)
    corrupt_q(monkeypatch, BROKEN)
    result = replace_lora_weights_quailora(model, texts, "closed_form", tokenizer=tokenizer, seq_len=32,
                                           max_samples=8, progress=False)
    assert result.layers_reset == [BROKEN]
    check = result.self_check
    assert check["held_out"] and check["tokens"] >= 32 and check["layers_reset"] == [BROKEN]
    assert check["ratios"][BROKEN] > 1.2  # the wrong Q's correction makes that layer clearly worse
    assert max(r for p, r in check["ratios"].items() if p != BROKEN) < 1.0
    B = lora_b(model)
    assert len(B) == 14 and not B[BROKEN].any()  # plain QLoRA start
    assert all(b.any() for p, b in B.items() if p != BROKEN)  # the others keep their correction
    assert json.loads(json.dumps(result.record()))["layers_reset"] == [BROKEN]


def test_the_api_refuses_when_many_layers_get_worse_and_leaves_the_adapter(tiny_model_dir, texts, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = four_bit_lora(tiny_model_dir)
    before = lora_b(model)
    corrupt_q(monkeypatch)  # every layer
    with pytest.raises(ModelError) as caught:
        replace_lora_weights_quailora(model, texts, "closed_form", tokenizer=tokenizer, seq_len=32, max_samples=8,
                                      progress=False)
    message = str(caught.value)
    assert "\n" not in message and "layers worse than no correction" in message and "read back" in message
    after = lora_b(model)
    assert all(torch.equal(before[p], after[p]) for p in before)  # nothing written
    assert max_resets(14) == 2


def test_init_flow_resets_reports_and_the_cli_says_so(tiny_model_dir, text_file, tmp_path, monkeypatch):
    corrupt_q(monkeypatch, BROKEN)
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), **DATA), lora=LoraSettings(rank=4),
                     methods=("svd", "closed_form"), baselines=False, out=str(tmp_path))
    events = list(run_init(cfg))
    assert events[-1].kind == "finished", events[-1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layers_reset"] == {"svd": [BROKEN], "closed_form": [BROKEN]}
    for method in ("svd", "closed_form"):
        check = report["self_check"][method]
        assert check["held_out"] and check["judged"] and check["ratios"][BROKEN] > 1.2
        saved = load_file(tmp_path / "adapters" / method / "adapter_model.safetensors")
        assert not saved[f"base_model.model.{BROKEN}.lora_B.weight"].any()
        assert saved["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].any()
    warnings = [e.message for e in events if e.kind == "log" and e.level == "warning"]
    assert any(BROKEN in w and "reset to B = 0" in w for w in warnings)
    assert f"reset to B = 0: {BROKEN}" in summary_table(report)
    assert report["seconds"]["self_check"] > 0


def test_from_an_init_run_a_damaged_saved_layer_is_reset_and_step0_measured(tiny_model_dir, text_file, tmp_path):
    init_dir = tmp_path / "init"
    cfg = InitConfig(ModelConfig(str(tiny_model_dir), "cpu"), DataConfig(str(text_file), **DATA),
                     lora=LoraSettings(rank=4, alpha=8.0), methods=("closed_form",), out=str(init_dir))
    assert list(run_init(cfg))[-1].kind == "finished"
    assert json.loads((init_dir / "report.json").read_text())["layers_reset"] == {"closed_form": []}
    adapter = init_dir / "adapters" / "closed_form" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    key = f"base_model.model.{BROKEN}.lora_B.weight"
    tensors[key] = -3 * tensors[key]  # a damaged saved layer: now it adds the wrong error, three times over
    save_file(tensors, adapter)
    train = TrainConfig(ModelConfig(str(tiny_model_dir), "cpu"), DataConfig(str(text_file), **DATA), QuantConfig(),
                        LoraSettings(rank=4, alpha=8.0), arms=("qlora4", "closed4"), steps=1, batch_size=1,
                        eval_every=1, from_init=str(init_dir), out=str(tmp_path / "train"))
    events = list(run_train(train))
    assert events[-1].kind == "finished", events[-1]
    report = events[-1].report
    assert report["layers_reset"] == {"4bit": {"closed_form": [BROKEN]}}
    assert report["self_check"]["4bit"]["closed_form"]["ratios"][BROKEN] > 1.5
    init_ppl = json.loads((init_dir / "report.json").read_text())["perplexity"]["closed_form"]
    step0 = next(e.val_perplexity for e in events if e.kind == "eval" and e.arm == "closed4" and e.step == 0)
    assert step0 != pytest.approx(init_ppl, rel=1e-9)  # measured on the reset factors, not taken from the init run
    assert "reset to B = 0" in train_table(report)


def test_plain_start_is_peft_like_and_adds_nothing():
    f = plain_start(Factors(torch.ones(4, 64), torch.ones(32, 4)))
    assert not f.B.any() and f.A.shape == (4, 64) and 0 < f.A.abs().max() <= 1 / 8
    assert torch.equal(f.A, plain_start(Factors(torch.zeros(4, 64), torch.zeros(32, 4))).A)  # reproducible


def test_guard_fails_loudly_when_a_corrected_variants_logits_are_the_bases(tiny_model_dir, calib_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = model(input_ids=calib_ids[:1]).logits
    nonzero = {"x": Factors(torch.ones(2, 4), torch.ones(4, 2))}
    with pytest.raises(RuntimeError, match="its adapter is not applied"):
        check_adapter_applied(model, calib_ids[:1], plain, "budget", nonzero)
    check_adapter_applied(model, calib_ids[:1], plain, "qlora", {"x": Factors(torch.ones(2, 4), torch.zeros(4, 2))})
    check_adapter_applied(model, calib_ids[:1], plain + 1, "budget", nonzero)


def test_guard_on_a_base_holding_several_adapters_names_the_one_not_applied(tiny_model_dir, calib_ids):
    """The generate flow's check, one mixed-batch pass: row 0 the base alone, then one row per adapter."""
    from quailora_app.engine.adapters import BASE_ROW, add_adapter_with_factors, attach_lora, read_factors

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraSettings(rank=2, alpha=4.0)
    peft_model = attach_lora(model, lora, ["model.layers.0.self_attn.q_proj"])
    ones = {"model.layers.0.self_attn.q_proj": Factors(torch.full((2, 64), 0.1), torch.full((64, 2), 0.1))}
    add_adapter_with_factors(peft_model, "good", lora, ones)
    zero = {k: Factors(f.A, torch.zeros_like(f.B)) for k, f in ones.items()}
    add_adapter_with_factors(peft_model, "lost", lora, zero)
    peft_model.eval()
    assert read_factors(peft_model, "good")["model.layers.0.self_attn.q_proj"].B.any()
    with torch.no_grad():
        check_adapters_applied(peft_model, calib_ids[0, :16], {"good": ones}, BASE_ROW)
        with pytest.raises(RuntimeError, match="lost's logits equal"):  # its factors say B != 0, the model has B = 0
            check_adapters_applied(peft_model, calib_ids[0, :16], {"good": ones, "lost": ones}, BASE_ROW)
        check_adapters_applied(peft_model, calib_ids[0, :16], {"lost": zero}, BASE_ROW)  # no correction: nothing to see


@pytest.fixture(scope="module")
def calib_ids(tiny_model_dir, text_file):
    return load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).calib
