"""The init across model families: for each family of tests/helpers.py TINY_FAMILIES, built tiny
from its config (random weights), loaded in 4-bit the way a user does (nf4, double quantization off, one evaluation
forward first: bitsandbytes repacks the layers there on AVX512-BF16 CPUs), the API initializes every LoRA layer in
the decoder blocks and the held-out logit error to the float32 model falls; the init flow runs on families whose
blocks sit elsewhere than Llama's (`bench/families.py` measures the same with more variants)."""
import bitsandbytes as bnb
import pytest
import torch
from helpers import TINY_FAMILIES, family_init, save_tiny_family, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from quailora_app import replace_lora_weights_quailora
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
from quailora_app.flows.init import run_init

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread"),
              # the API warns that a forward-first model's repacked layers pass no gradient on the CPU (test_api.py
              # tests that warning); here the forward comes first on purpose
              pytest.mark.filterwarnings("ignore:.*CPU inference layout")]

SEQ_LEN = 32


@pytest.fixture(scope="module")
def windows():
    """(tokenizer, 8 calibration windows, 4 held-out windows) of seeded random token ids."""
    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, len(tokenizer), (8, SEQ_LEN), generator=generator)
    heldout = torch.randint(0, len(tokenizer), (4, SEQ_LEN), generator=generator)
    return tokenizer, calib, heldout


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_init_lowers_the_held_out_logit_error(family, windows, tmp_path):
    tokenizer, calib, heldout = windows
    folder = save_tiny_family(family, tmp_path / family)
    got = family_init(folder, calib, heldout, double_quant=False, forward_first=True, tokenizer=tokenizer)
    result = got["result"]
    assert got["in_blocks"] and {row["name"] for row in result.layers} == set(got["in_blocks"])
    reset = set(getattr(result, "layers_reset", ()))  # the self-check may put a layer back to B = 0
    assert set(got["written"]) == set(got["in_blocks"]) - reset
    assert got["ratio"] < 0.9, (f"{family}: held-out logit MSE {got['before']:.4g} (plain 4-bit) -> "
                                f"{got['after']:.4g} with the init (ratio {got['ratio']:.3f})")


def test_stem_layer_bitsandbytes_cannot_repack_is_left_alone(windows, tmp_path):
    """OPT-350m's layout with an embedding of 32 (< bitsandbytes' block of 64): project_in, a 4-bit layer before
    block 0, is one that the AVX512-BF16 repacking cannot take (RuntimeError inside bitsandbytes). Block 0's inputs
    are captured by a forward through that layer: it runs without repacking, and the model's layout is as it was."""
    tokenizer, calib, _ = windows
    folder = save_tiny_family("opt_350m_style", tmp_path / "opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=32)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]

    def layout():  # per layer: repacked, and may bitsandbytes repack it (False from the start without AVX512-BF16)
        return [(getattr(m.weight.quant_state, "packing_format_for_cpu", False),
                 getattr(m, "support_avx512bf16_for_cpu", None)) for m in layers]

    before = layout()
    result = replace_lora_weights_quailora(peft_model, calib, tokenizer=tokenizer, seq_len=SEQ_LEN, progress=False)
    assert len(result.layers) == 12
    assert set(result.skipped) == {"model.decoder.project_in", "model.decoder.project_out"}
    assert not any(packed for packed, _ in layout())
    assert layout() == before


@pytest.mark.parametrize("family,layers", [("gpt_neox", 8), ("opt_350m_style", 12)])
def test_init_flow(family, layers, text_file, tmp_path):
    """The command line's init on blocks under gpt_neox.layers (fused query_key_value) and model.decoder.layers
    (with 4-bit layers outside them)."""
    folder = save_tiny_family(family, tmp_path / family)
    cfg = InitConfig(ModelConfig(str(folder), "cpu"), DataConfig(str(text_file), seq_len=SEQ_LEN, calib_samples=8,
                                                                 eval_tokens=256),
                     lora=LoraSettings(rank=8, alpha=16.0), methods=("closed_form",), baselines=False)
    events = list(run_init(cfg, run_dir=tmp_path / "run"))
    assert events[-1].kind == "finished", events[-1]
    report = events[-1].report
    assert len(report["layers"]) == layers
    assert all(row["calibrated_error"]["closed_form"] < 1.0 for row in report["layers"])
