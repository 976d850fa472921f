"""LoftQ as published (engine/methods/loftq.py), on CPU, for both quantizers: a re-quantized layer multiplies by
the Q it holds; T = 1 is the svd (closed_form) method on the plain base, bit for bit; what the alternation keeps
(each fit step never raises the error; T = 5 ends below T = 1 here, though single steps may rise); the API replaces
each base layer in place and moves the logits toward full precision; the across-bits flow measures LoftQ points on
their own bases and puts the bases back; the init flow measures it and saves its base with its adapter."""
import math

import pytest
import torch

from quailora_app.config import (
    BitsConfig,
    DataConfig,
    InitConfig,
    LoraSettings,
    ModelConfig,
    QuantConfig,
    base_quant,
)
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods.init_math import svd_correction
from quailora_app.engine.methods.loftq import can_requantize, check_iter, loftq_layer, requantizer
from quailora_app.engine.methods.registry import REQUANT, get_method, per_layer_names, requant_names
from quailora_app.engine.quantization import bnb, hqq
from quailora_app.engine.quantization.layers import dequantized_weight, own_product, quantized_modules
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.errors import ConfigError
from quailora_app.events import RunFinished
from quailora_app.sources.models import resolve_model

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]

CPU = torch.device("cpu")
LORA = LoraSettings(rank=4)
BASES = {"hqq2": base_quant("hqq2", 32), "hqq3": base_quant("hqq3", 32), "nf4": QuantConfig(),
         "fp4-128": QuantConfig(quant="fp4", double_quant=False, block_size=128)}


def quantized(tiny_model_dir, base: str):
    return load_quantized(resolve_model(str(tiny_model_dir)), BASES[base], CPU, torch.float32)


def weight(tiny_model_dir, name: str) -> torch.Tensor:
    return Checkpoint(tiny_model_dir).get(f"{name}.weight", CPU, torch.float32)


CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_registered_as_a_kind_of_its_own():
    for name in ("loftq_svd", "loftq_calibrated"):
        method = get_method(name)
        assert method.kind == REQUANT and method.changes_base and name in requant_names()
        assert name not in per_layer_names()  # not in the teaching views' per-layer corrections
    assert get_method("loftq_calibrated").calibrated and not get_method("loftq_svd").calibrated
    with pytest.raises(ConfigError, match="at least 1"):
        check_iter(0)
    with pytest.raises(ConfigError, match="loftq-iter"):
        BitsConfig(loftq_iter=0)


@pytest.mark.parametrize("base", list(BASES))
def test_a_requantized_layer_multiplies_by_the_q_it_holds(tiny_model_dir, base):
    """requantizer(layer)(W) is the layer's own Q again (same quantizer and settings); of W - C it is a new layer of
    those settings whose own product is x Q^T exactly (float32 compute), Q read back through it."""
    model = quantized(tiny_model_dir, base)
    name, layer = "model.layers.1.mlp.down_proj", quantized_modules(model)["model.layers.1.mlp.down_proj"]
    W = weight(tiny_model_dir, name)
    quant = requantizer(layer)
    assert torch.equal(dequantized_weight(quant(W)), dequantized_weight(layer))
    E = W - dequantized_weight(layer)
    P, Rt = svd_correction(E.double(), 4)
    new = quant(W - (P @ Rt).float())  # LoftQ's second step (W - E / 2 would round back to Q: round to nearest)
    Q = dequantized_weight(new)
    assert type(new) is type(layer) and not torch.equal(Q, dequantized_weight(layer))
    if hqq.is_hqq(layer):
        assert hqq.settings_of(new) == hqq.settings_of(layer)
    else:
        old, state = layer.weight.quant_state, new.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == (old.quant_type, old.blocksize, old.nested)
    x = torch.randn(5, W.shape[1])
    assert torch.equal(own_product(new, x), x @ Q.T)
    assert can_requantize(layer) and can_requantize(new)


@pytest.mark.parametrize("base", ["hqq3", "nf4"])
def test_one_step_is_svd_and_closed_form_on_the_plain_base(tiny_model_dir, base):
    model = quantized(tiny_model_dir, base)
    result = InitResult()
    list(initialize(model, Checkpoint(tiny_model_dir), CALIB, LORA,
                    ("svd", "closed_form", "loftq_svd", "loftq_calibrated"),
                    result, device=CPU, requant=True, options={"loftq_iter": 1}))
    layers = quantized_modules(model)
    for plain, loftq in (("svd", "loftq_svd"), ("closed_form", "loftq_calibrated")):
        assert result.factors[loftq].keys() == result.factors[plain].keys() == result.bases[loftq].keys()
        for path, f in result.factors[plain].items():
            g = result.factors[loftq][path]
            assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B), (plain, path)
            assert result.bases[loftq][path] is layers[path]  # T = 1: the base is left as it is
        for row in result.layers:
            assert row["weight_error"][loftq] == pytest.approx(row["weight_error"][plain], rel=1e-9)
            assert row["calibrated_error"][loftq] == pytest.approx(row["calibrated_error"][plain], rel=1e-9)
    # without requant=True (the init flow, the arms) LoftQ is skipped like a whole-model method
    skipped = InitResult()
    list(initialize(model, Checkpoint(tiny_model_dir), CALIB, LORA, ("svd", "loftq_svd"), skipped, device=CPU))
    assert set(skipped.factors) == {"svd"} and not skipped.bases


@pytest.mark.parametrize("base", ["hqq2", "hqq3", "nf4"])
def test_what_the_alternation_keeps(tiny_model_dir, base):
    """Each fit step is optimal for its Q: ||W - Q_t - C_t|| <= ||W - Q_t - C_{t-1}||, always. The quantization step
    is not a minimization, so a single step may raise the error (at 2 bits it does on several layers); over the
    model, T = 5 ends below T = 1, as the paper finds."""
    model = quantized(tiny_model_dir, base)
    first = last = 0.0
    for name, layer in quantized_modules(model).items():
        W = weight(tiny_model_dir, name)
        done = loftq_layer(W, layer, 4, 5)
        assert done.steps == 5 and len(done.before_fit) == 4
        for t in range(1, 5):
            assert done.errors[t] <= done.before_fit[t - 1] * (1 + 1e-12), (name, t)
        # the layer's own Q and C reproduce the recorded error; its product is x Q_T^T
        Q = dequantized_weight(done.layer)
        R = W.double() - Q.double() - done.P @ done.Rt
        assert float(R.norm()) == pytest.approx(done.errors[-1], rel=1e-6)  # E formed in float32, as the engine
        x = torch.randn(3, W.shape[1])
        assert torch.equal(own_product(done.layer, x), x @ Q.T)
        first, last = first + done.errors[0], last + done.errors[-1]
    assert last < 0.97 * first, (base, last / first)


def test_the_calibrated_variant_and_the_error_figures(tiny_model_dir):
    """Through initialize: each LoftQ layer's figures are against the plain base's E = W - Q_1 (1.0 = no correction,
    the report's reference), measured on W - Q_T - s B A; here at 2 bits both variants end below their one-step form
    on most layers' own objective."""
    model = quantized(tiny_model_dir, "hqq2")
    result = InitResult()
    list(initialize(model, Checkpoint(tiny_model_dir), CALIB, LORA,
                    ("svd", "closed_form", "loftq_svd", "loftq_calibrated"),
                    result, device=CPU, requant=True, options={"loftq_iter": 5}))
    rows = result.layers
    better_w = sum(r["weight_error"]["loftq_svd"] < r["weight_error"]["svd"] for r in rows)
    better_c = sum(r["calibrated_error"]["loftq_calibrated"] < r["calibrated_error"]["closed_form"] for r in rows)
    assert better_w >= 0.8 * len(rows) and better_c >= 0.5 * len(rows), (better_w, better_c, len(rows))
    s = LORA.scaling
    name = rows[0]["name"]
    W, new, f = weight(tiny_model_dir, name), result.bases["loftq_svd"][name], result.factors["loftq_svd"][name]
    E = W.double() - dequantized_weight(quantized_modules(model)[name]).double()
    R = W.double() - dequantized_weight(new).double() - s * f.B.double() @ f.A.double()
    assert rows[0]["weight_error"]["loftq_svd"] == pytest.approx(float(R.norm() / E.norm()), rel=1e-6)
    assert all(new is not layer for layer in quantized_modules(model).values())  # the model itself unchanged


def held_out_logits(tiny_model_dir, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quailora_app.sources.data import load_splits

    splits = load_splits(DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=256),
                         AutoTokenizer.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        target = full(input_ids=splits.eval[:4]).logits
    return splits, target


@pytest.mark.parametrize("quantizer", ["hqq", "bitsandbytes"])
def test_api_replaces_each_base_layer_and_moves_logits_toward_full_precision(tiny_model_dir, text_file, quantizer):
    """A user's PeftModel, quantized the way hqq documents it (AutoHQQHFModel.quantize_model, 3 bits) or by
    transformers' BitsAndBytesConfig (NF4): LoftQ replaces every adapted base layer in place, the factors correct
    the new base, and the logits move toward full precision (more than with the svd on the plain base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quailora_app import replace_lora_weights_quailora

    splits, target = held_out_logits(tiny_model_dir, text_file)

    def user_model():
        if quantizer == "hqq":
            from hqq.core.quantize import BaseQuantizeConfig
            from hqq.models.hf.base import AutoHQQHFModel

            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=3, group_size=32),
                                          compute_dtype=torch.float32, device="cpu")
            targets = hqq.lora_targets(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=(
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)))
            bnb.keep_cpu_layout(model)
            targets = "all-linear"
        model.config._name_or_path = str(tiny_model_dir)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))

    errors = {}
    for method in ("svd", "loftq_svd"):
        model = user_model()
        with torch.no_grad():
            before = float((model(input_ids=splits.eval[:4]).logits - target).norm())
        bases = {n: m.get_base_layer() for n, m in model.named_modules() if hasattr(m, "lora_A")}
        result = replace_lora_weights_quailora(model, splits.calib, method, seq_len=32, progress=False,
                                               options={"loftq_iter": 3})
        with torch.no_grad():
            errors[method] = float((model(input_ids=splits.eval[:4]).logits - target).norm()) / before
        now = {n: m.get_base_layer() for n, m in model.named_modules() if hasattr(m, "lora_A")}
        if method == "svd":
            assert all(now[n] is bases[n] for n in bases) and not result.bases_replaced
            continue
        assert len(result.bases_replaced) + len(result.layers_reset) == len(bases) == len(result.layers)
        assert all((now[n] is bases[n]) == (n.removeprefix("base_model.model.") in result.layers_reset)
                   for n in bases)
        assert result.self_check["judged"] and result.self_check["median_ratio"] < 1.0
        assert result.record()["bases_replaced"] == result.bases_replaced
        for n, layer in now.items():
            x = torch.randn(3, layer.in_features if hasattr(layer, "in_features") else layer.meta["shape"][1])
            Q = dequantized_weight(layer)
            assert torch.allclose(own_product(layer, x), x @ Q.T, atol=1e-5), n
    assert errors["loftq_svd"] < 0.9, errors
    assert errors["loftq_svd"] < errors["svd"], errors


def test_api_refuses_an_8bit_base_and_a_bad_t_in_one_line(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quailora_app import replace_lora_weights_quailora

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
        LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="quantizes each base layer again") as err:
        replace_lora_weights_quailora(model, CALIB, "loftq_svd", progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="loftq_iter .* must be a whole number of at least 1, got 0"):
        replace_lora_weights_quailora(model, CALIB, "loftq_svd", progress=False, options={"loftq_iter": 0})


def test_bits_flow_measures_loftq_on_its_own_base_and_puts_the_base_back(tiny_model_dir, text_file, tmp_path):
    """T = 1: LoftQ's points are svd's and closed_form's exactly. T = 3: its own points differ, and svd measured
    after them on the same peft model gives T = 1's figure again (the base layers were put back)."""
    from quailora_app.flows.bits import run_bits

    def run(iters: int, out: str) -> dict:
        cfg = BitsConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), seq_len=32, calib_samples=8,
                                                            eval_tokens=256), LORA, bases=("hqq2", "nf4"),
                         methods=("loftq_svd", "loftq_calibrated", "svd", "closed_form"), group_size=32,
                         loftq_iter=iters, out=str(tmp_path / out))
        events = list(run_bits(cfg))
        assert isinstance(events[-1], RunFinished), events[-1]
        return events[-1].report

    one, three = run(1, "t1"), run(3, "t3")
    for report in (one, three):
        assert set(report["points"]) == {f"{b}/{m}" for b in ("hqq2", "nf4")
                                         for m in ("qlora", "loftq_svd", "loftq_calibrated", "svd", "closed_form")}
        assert all(math.isfinite(p["perplexity"]) for p in report["points"].values())
    for base in ("hqq2", "nf4"):
        p1, p3 = one["points"], three["points"]
        assert p1[f"{base}/loftq_svd"]["perplexity"] == p1[f"{base}/svd"]["perplexity"]
        assert p1[f"{base}/loftq_calibrated"]["perplexity"] == p1[f"{base}/closed_form"]["perplexity"]
        assert p3[f"{base}/loftq_svd"]["loftq_iter"] == 3
        assert p3[f"{base}/loftq_svd"]["perplexity"] != p3[f"{base}/svd"]["perplexity"]
        assert p3[f"{base}/svd"]["perplexity"] == p1[f"{base}/svd"]["perplexity"]
        assert p3[f"{base}/loftq_svd"]["bits_per_weight"] == p3[f"{base}/svd"]["bits_per_weight"]


@pytest.mark.parametrize("quant", [base_quant("hqq3", 32), QuantConfig()], ids=["hqq3", "nf4"])
def test_init_flow_saves_loftq_with_its_base_and_the_pair_reloads_to_its_perplexity(tiny_model_dir, text_file,
                                                                                      tmp_path, quant):
    """`init --methods loftq_svd` measures LoftQ on its own base (T = 2: its figure differs from svd's), saves the
    re-quantized base beside the adapter, and plain transformers + peft reload the pair to the reported perplexity;
    svd's adapter (the stock base) has no base file."""
    from safetensors.torch import load_file

    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.engine.requantized import BASE_FILE, load_with_base
    from quailora_app.flows.init import run_init
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import load_tokenizer

    cfg = InitConfig(ModelConfig(str(tiny_model_dir)),
                     DataConfig(str(text_file), seq_len=32, calib_samples=4, eval_tokens=128), quant=quant,
                     lora=LORA, methods=("svd", "loftq_svd"), loftq_iter=2, baselines=False,
                     out=str(tmp_path / "init"))
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    report = events[-1].report
    ppl = report["perplexity"]
    assert {"qlora", "svd", "loftq_svd"} <= set(ppl) and "loftq_svd" not in report["unavailable"]
    assert ppl["loftq_svd"] != ppl["svd"] and math.isfinite(ppl["loftq_svd"])
    assert report["requantized"]["loftq_svd"]["layers"] == 14 and report["requantized"]["loftq_svd"]["loftq_iter"] == 2
    assert "loftq_svd" in report["self_check"]
    folder = tmp_path / "init" / "adapters" / "loftq_svd"
    assert (folder / BASE_FILE).is_file() and not (tmp_path / "init" / "adapters" / "svd" / BASE_FILE).exists()
    assert BASE_FILE in (folder / "README.md").read_text()
    source = resolve_model(str(tiny_model_dir))
    saved = load_file(str(folder / BASE_FILE))
    plain = quantized_modules(load_quantized(source, quant, CPU, torch.float32))
    assert set(saved) == {f"{name}.weight" for name in plain}
    changed = [k for k in saved if not torch.equal(saved[k], dequantized_weight(plain[k.removesuffix(".weight")]))]
    assert len(changed) == 14  # every adapted layer holds Q_T, not the stock base's Q
    splits = load_splits(cfg.data, load_tokenizer(source))
    reloaded = load_with_base(folder, source.folder)
    assert perplexity(reloaded, splits.eval, cfg.eval_batch) == pytest.approx(ppl["loftq_svd"], rel=1e-4)
    # the same adapter on the stock base (Q_1) is another model: why the base travels with it
    from peft import PeftModel

    stock = PeftModel.from_pretrained(load_quantized(source, quant, CPU, torch.float32), str(folder))
    assert perplexity(stock, splits.eval, cfg.eval_batch) != pytest.approx(ppl["loftq_svd"], rel=1e-3)
