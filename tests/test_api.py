"""The public API on a user's own PeftModel: `replace_lora_weights_quailora` gives the factors the
CLI's init gives, honours rank_pattern / alpha_pattern / rsLoRA, leaves the base untouched, works on 8-bit bases
and on a model that already ran forward passes, refuses bad input in one line, and its adapters load and merge
with plain peft."""
import json
import warnings

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import quailora_app
from quailora_app import replace_lora_weights_quailora, save_adapter
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
from quailora_app.engine.calibration.calibrate import hessians_by_hooks
from quailora_app.engine.methods.init_math import closed_form_correction, damped, svd_correction
from quailora_app.engine.quantization.bnb import dequantized_weight, keep_cpu_layout
from quailora_app.errors import ConfigError, DataError, ModelError
from quailora_app.flows.init import run_init
from quailora_app.sources.data import load_splits

DATA = dict(seq_len=32, calib_samples=8, eval_tokens=256)


def four_bit(folder, *, forward_first: bool = False, double_quant: bool = True):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32)
    if forward_first:  # as a user's script may: bitsandbytes repacks on AVX512-BF16 CPUs at an inference forward
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    else:
        keep_cpu_layout(model)
    return model


def lora(folder, **config):
    return get_peft_model(four_bit(folder), LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                                          "task_type": "CAUSAL_LM", **config}))


@pytest.fixture(scope="module")
def calib(tiny_model_dir, text_file):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return load_splits(DataConfig(str(text_file), **DATA), tokenizer).calib


def factors(peft_model, adapter="default"):
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            out[name.removeprefix("base_model.model.")] = (module.lora_A[adapter].weight.detach().clone(),
                                                           module.lora_B[adapter].weight.detach().clone(),
                                                           float(module.scaling[adapter]))
    return out


def test_same_factors_as_the_command_line_init(tiny_model_dir, text_file, calib, tmp_path):
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), **DATA),
                     lora=LoraSettings(rank=4, alpha=8.0), methods=("closed_form", "quailora"), baselines=False,
                     out=str(tmp_path / "run"))
    assert list(run_init(cfg))[-1].kind == "finished"
    for method in ("closed_form", "quailora"):
        model = lora(tiny_model_dir)
        result = replace_lora_weights_quailora(model, calib, method, progress=False)
        assert result.calibration == {"windows": 8, "seq_len": 32, "tokens": 256}
        saved = load_file(tmp_path / "run" / "adapters" / method / "adapter_model.safetensors")
        mine = factors(model)
        assert len(mine) == 14
        for name, (A, B, _) in mine.items():
            key = f"base_model.model.{name}"
            torch.testing.assert_close(A, saved[f"{key}.lora_A.weight"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(B, saved[f"{key}.lora_B.weight"], rtol=1e-5, atol=1e-6)
        assert result.calibrated_error_median < 0.9


def test_base_weights_untouched_and_patterns_honoured(tiny_model_dir, calib):
    """rank_pattern / alpha_pattern / rsLoRA: each layer's s * B @ A is the closed form at its own rank,
    checked against H from hooks on the whole full-precision model (another path than the block-by-block one)."""
    model = lora(tiny_model_dir, use_rslora=True, rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                 alpha_pattern={"v_proj": 3})
    bases = {n: m.get_base_layer().weight.data.clone() for n, m in model.named_modules() if hasattr(m, "lora_A")}
    replace_lora_weights_quailora(model, calib, "closed_form", progress=False)
    for n, m in model.named_modules():
        if n in bases:
            assert torch.equal(m.get_base_layer().weight.data, bases[n])
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    H = hessians_by_hooks(full, calib, ("all-linear",))
    modules = dict(model.get_base_model().named_modules())
    ranks = set()
    for name, (A, B, s) in factors(model).items():
        r = A.shape[0]
        ranks.add(r)
        expect_r = 2 if name.endswith("q_proj") else 6 if name == "model.layers.1.mlp.down_proj" else 4
        expect_alpha = 3 if name.endswith("v_proj") else 8
        assert r == expect_r and s == pytest.approx(expect_alpha / r ** 0.5)
        W = dict(full.named_parameters())[f"{name}.weight"].detach().double()
        E = W - dequantized_weight(modules[name]).double()
        P, Rt = closed_form_correction(E, damped(H[name].double(), 0.01), r)
        torch.testing.assert_close((s * B.double() @ A.double()), P @ Rt, rtol=1e-4, atol=1e-6)
    assert ranks == {2, 4, 6}


def test_8bit_base(tiny_model_dir, calib):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    result = replace_lora_weights_quailora(model, calib, "svd", progress=False)
    assert len(result.layers) == 4
    full = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters())
    modules = dict(model.get_base_model().named_modules())
    for name, (A, B, s) in factors(model).items():
        E = full[f"{name}.weight"].detach().double() - dequantized_weight(modules[name]).double()
        P, Rt = svd_correction(E, 4)
        torch.testing.assert_close(s * B.double() @ A.double(), P @ Rt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True], ids=["no-double-quant", "double-quant"])
def test_after_forward_passes_the_correction_still_helps(tiny_model_dir, calib, text_file, double_quant):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first inference forward (absmax transposed and
    rounded to bfloat16, no longer double-quantized): Q is read back from that layout, so the correction fits the Q
    the layer now holds, and the logits move toward full precision, with double quantization (the QLoRA recipe) and
    without (BitsAndBytesConfig's default, where bitsandbytes 0.50.2's own inverse leaves absmax transposed and the
    corrections made the logits 2.7-3.9x worse), for calibration given as windows and as padded batches."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    held_out = load_splits(DataConfig(str(text_file), **DATA), tokenizer).eval[:4]
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=held_out).logits
    ragged = [row[: 20 + 3 * i].tolist() for i, row in enumerate(calib)]  # sequences of different lengths
    width = max(map(len, ragged))
    batches = [{"input_ids": torch.tensor([r + [7] * (width - len(r)) for r in ragged[i:i + 4]]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ragged[i:i + 4]])}
               for i in range(0, len(ragged), 4)]
    for forward_first, calibration in ((False, calib), (True, calib), (True, batches)):
        model = get_peft_model(four_bit(tiny_model_dir, forward_first=forward_first, double_quant=double_quant),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        layer = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
        if forward_first and has_avx512bf16():  # the case this test is for
            assert layer.weight.quant_state.packing_format_for_cpu
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = (model(input_ids=held_out).logits - target).norm()
            result = replace_lora_weights_quailora(model, calibration, "closed_form", seq_len=32, progress=False)
        said = [str(w.message) for w in caught if "CPU inference layout" in str(w.message)]
        assert bool(said) == (forward_first and has_avx512bf16())  # training through that layout gets no gradient
        with torch.no_grad():
            after = (model(input_ids=held_out).logits - target).norm()
        assert after < 0.9 * before, (forward_first, float(after / before))
        assert result.layers_reset == [] and result.self_check["worst"] < 1.0


def test_calibration_as_texts_dataset_or_ids(tiny_model_dir, text_file):
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = text_file.read_text().splitlines()[:60]
    seen = []
    for calibration in (texts, datasets.Dataset.from_dict({"id": list(range(60)), "review": texts}),
                        [tokenizer(t)["input_ids"] for t in texts]):
        model = lora(tiny_model_dir, target_modules=["v_proj"])
        result = replace_lora_weights_quailora(model, calibration, "svd", tokenizer=tokenizer, seq_len=32,
                                               max_samples=4, progress=False)
        seen.append(result.calibration)
    assert seen[0] == seen[1] == {"windows": 4, "seq_len": 32, "tokens": 128}


def test_save_adapter_loads_and_merges_with_plain_peft(tiny_model_dir, calib, tmp_path):
    model = lora(tiny_model_dir)
    result = replace_lora_weights_quailora(model, calib, "closed_form", progress=False)
    folder = save_adapter(model, tmp_path / "adapter", result, data="tiny docs")
    record = json.loads((folder / "quailora.json").read_text())
    assert record["method"] == "closed_form" and record["rank"] == 4 and record["calibration"] == "8 x 32 tokens"
    assert record["data"] == "tiny docs" and len(record["layers"]) == 14
    card = (folder / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card and "closed_form" in card
    loaded = PeftModel.from_pretrained(four_bit(tiny_model_dir), folder, is_trainable=True)
    for (A1, B1, _), (A2, B2, _) in zip(factors(model).values(), factors(loaded).values()):
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
    base16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    W16 = base16.model.layers[0].mlp.down_proj.weight.detach().float().clone()
    merged = PeftModel.from_pretrained(base16, folder).merge_and_unload()
    A, B, s = factors(model)["model.layers.0.mlp.down_proj"]
    expected = W16 + s * B @ A
    torch.testing.assert_close(merged.model.layers[0].mlp.down_proj.weight.float(), expected, rtol=2e-2, atol=2e-2)


def test_top_level_exports():
    assert quailora_app.replace_lora_weights_quailora is replace_lora_weights_quailora
    assert "closed_form" in quailora_app.method_names()
    assert {"run_init", "run_train", "InitConfig", "TrainConfig"} <= set(quailora_app.__all__)
    with pytest.raises(AttributeError):
        quailora_app.no_such_name  # noqa: B018


# -- bad input: each one clear exception message --------------------------------------------------------------
def test_refuses_a_base_that_is_not_quantized(tiny_model_dir, calib):
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ModelError, match="not quantized with bitsandbytes .* BitsAndBytesConfig"):
        replace_lora_weights_quailora(plain, calib, progress=False)


def test_refuses_missing_checkpoint(tiny_model_dir, calib, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no safetensors checkpoint .* pass model_path="):
        replace_lora_weights_quailora(lora(tiny_model_dir), calib, model_path=tmp_path / "empty", progress=False)


def test_refuses_a_checkpoint_without_the_target_modules(tiny_model_dir, calib, tmp_path):
    from helpers import save_tiny_llama

    other = save_tiny_llama(tmp_path / "one-block", layers=1)
    with pytest.raises(ModelError, match="has no weight for the LoRA layer model.layers.1"):
        replace_lora_weights_quailora(lora(tiny_model_dir), calib, model_path=other, progress=False)


def test_refuses_bad_calibration(tiny_model_dir):
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = lora(tiny_model_dir)
    with pytest.raises(DataError, match="fewer than one window of seq_len=256"):
        replace_lora_weights_quailora(model, ["a few words"], tokenizer=tokenizer, progress=False)
    with pytest.raises(DataError, match="has no text column; columns: id, score"):
        replace_lora_weights_quailora(model, datasets.Dataset.from_dict({"id": [1, 2], "score": [0.5, 0.7]}),
                                      tokenizer=tokenizer, progress=False)
    with pytest.raises(ConfigError, match="needs tokenizer="):
        replace_lora_weights_quailora(model, ["some text"] * 100, progress=False)


def test_refuses_dora_and_other_adapters(tiny_model_dir, calib):
    with pytest.raises(ConfigError, match="uses DoRA"):
        replace_lora_weights_quailora(lora(tiny_model_dir, use_dora=True), calib, progress=False)
    ia3 = get_peft_model(four_bit(tiny_model_dir), IA3Config(target_modules=["k_proj", "down_proj"],
                                                              feedforward_modules=["down_proj"]))
    with pytest.raises(ConfigError, match="is a IA3 adapter; QuAILoRA initializes LoRA adapters only"):
        replace_lora_weights_quailora(ia3, calib, progress=False)
    with pytest.raises(ConfigError, match="expected a peft PeftModel"):
        replace_lora_weights_quailora(four_bit(tiny_model_dir), calib, progress=False)
    with pytest.raises(ConfigError, match="nothing to replace"):
        replace_lora_weights_quailora(lora(tiny_model_dir), calib, "qlora", progress=False)


# -- calibration as batches, the way a Trainer's dataloader yields them ----------------------------------------
PAD = 7  # a vocabulary token, not the tiny tokenizer's EOS (0): a padded position that leaked in would show


def padded(rows, side):
    """rows padded with PAD to a common length on `side`, as a collator does: (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [PAD] * (width - len(r))
        ids.append(r + fill if side == "right" else fill + r)
        mask.append([1] * len(r) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(r))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def token_rows(tiny_model_dir, text_file):
    """12 token sequences of 10 to 54 ids (384 tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = text_file.read_text().splitlines()
    return [tokenizer(lines[i])["input_ids"][: 10 + 4 * i] for i in range(12)]


def test_padded_batches_give_the_windows_and_factors_of_the_plain_tokens(tiny_model_dir, token_rows):
    from torch.utils.data import DataLoader

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token_id != PAD and [len(r) for r in token_rows] == list(range(10, 55, 4))
    right, left = padded(token_rows[:5], "right"), padded(token_rows[5:], "left")
    batches = [{"input_ids": right[0], "attention_mask": right[1], "labels": right[0]},
               {"input_ids": left[0].tolist(), "attention_mask": left[1].tolist()}]

    def collate(examples):  # left padding, as a decoder-only collator may do
        ids, mask = padded([e["input_ids"] for e in examples], "left")
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    loader = DataLoader([{"input_ids": r} for r in token_rows], batch_size=3, collate_fn=collate)
    plain = quailora_app.api.calibration_ids(token_rows, tokenizer, seq_len=32, max_samples=64)
    assert plain.shape == (12, 32)  # 384 tokens and 11 EOS between them
    for calibration in (batches, iter(batches), loader, (b for b in loader)):
        assert torch.equal(quailora_app.api.calibration_ids(calibration, tokenizer, 32, 64), plain)
    # the padding, had it been kept, would have changed the windows
    with_pads = [row for b in batches for row in torch.as_tensor(b["input_ids"]).tolist()]
    assert not torch.equal(quailora_app.api.calibration_ids(with_pads, tokenizer, 32, 64)[:4], plain[:4])
    # one batch as the tokenizer gives it; an endless generator is read only as far as the windows need
    assert torch.equal(quailora_app.api.calibration_ids({"input_ids": right[0], "attention_mask": right[1]},
                                                        tokenizer, 32, 2), plain[:2])
    endless = ({"input_ids": right[0], "attention_mask": right[1]} for _ in iter(int, 1))
    assert quailora_app.api.calibration_ids(endless, tokenizer, 32, 8).shape == (8, 32)

    seen = []
    for calibration in (token_rows, batches, loader):
        model = lora(tiny_model_dir, target_modules=["v_proj", "down_proj"])
        result = replace_lora_weights_quailora(model, calibration, "closed_form", tokenizer=tokenizer, seq_len=32,
                                               max_samples=8, progress=False)
        assert result.calibration == {"windows": 8, "seq_len": 32, "tokens": 256}
        seen.append(factors(model))
    for other in seen[1:]:
        assert other.keys() == seen[0].keys()
        for name, (A, B, _) in other.items():
            assert torch.equal(A, seen[0][name][0]) and torch.equal(B, seen[0][name][1]), name


def test_refuses_bad_batches_in_one_line(tiny_model_dir):
    from torch.utils.data import DataLoader

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = lora(tiny_model_dir, target_modules=["v_proj"])
    ids = torch.arange(1, 81).view(2, 40)
    cases = [
        ([{"labels": ids}], "calibration batch 0 has no input_ids \\(keys labels\\)"),
        ([{"input_ids": ids}, [1, 2, 3]], "calibration batch 1 has no input_ids \\(list\\)"),
        ([{"input_ids": ids, "attention_mask": torch.ones(2, 39, dtype=torch.long)}],
         "attention_mask has shape \\(2, 39\\) but input_ids \\(2, 40\\)"),
        ([{"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1, 0]]}],
         "attention_mask has shape \\(2, 3\\) but input_ids \\(2 rows of lengths \\[2, 3\\]\\)"),
        ([{"input_ids": ids, "attention_mask": torch.full((2, 40), 2)}], "attention_mask holds values other than 0"),
        ([{"input_ids": ids.float()}], "input_ids must hold integers \\(batch x length\\); found float 1.0"),
        ((b for b in [{"input_ids": [["a", "b"]]}]), "input_ids must hold integers .* found str 'a'"),
        ([{"input_ids": ids - 5}], "input_ids holds a negative value \\(-4\\)"),
        ([{"input_ids": "some text"}], "input_ids must be a tensor or a list of integers .* got str"),
        (iter([]), "calibration must be a non-empty list"),
        (DataLoader([], batch_size=2), "calibration must be a non-empty list"),
        ([{"input_ids": ids, "attention_mask": torch.zeros(2, 40, dtype=torch.long)}],
         "holds 0 tokens, fewer than one window of seq_len=32"),
    ]
    for calibration, message in cases:
        with pytest.raises(DataError, match=message) as caught:
            replace_lora_weights_quailora(model, calibration, tokenizer=tokenizer, seq_len=32, progress=False)
        assert "\n" not in str(caught.value)
