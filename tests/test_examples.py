"""The Trainer and TRL examples: each runs 2 steps on the tiny Llama with finite losses, starts from the
step-0 held-out perplexity that the init report gives for the same settings, and saves an adapter that plain
`PeftModel.from_pretrained` loads onto a fresh 4-bit base, giving the perplexity the example ended with."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from quailora_app import DataConfig, InitConfig, LoraSettings, ModelConfig, keep_cpu_layout, run_init
from quailora_app.engine.evaluation.evaluate import perplexity
from quailora_app.sources.data import load_splits

EXAMPLES = Path(__file__).parent.parent / "examples"
DATA = dict(seq_len=32, calib_samples=8, eval_tokens=256)


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def init_perplexity(tiny_model_dir, text_file, tmp_path_factory) -> dict[str, float]:
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), **DATA),
                     lora=LoraSettings(rank=4, alpha=8.0), methods=("closed_form",), baselines=False,
                     out=str(tmp_path_factory.mktemp("init") / "run"))
    return list(run_init(cfg))[-1].report["perplexity"]


@pytest.mark.parametrize("name", ["finetune_trainer", "finetune_trl"])
def test_example_trains_from_the_init_reports_perplexity(name, tiny_model_dir, text_file, init_perplexity, tmp_path):
    out = example(name).main(["--model", str(tiny_model_dir), "--dataset", str(text_file), "--steps", "2",
                              "--seq-len", "32", "--calib-samples", "8", "--eval-tokens", "256", "--rank", "4",
                              "--alpha", "8", "--batch-size", "2", "--out", str(tmp_path / "adapter")])
    assert len(out["train_losses"]) == 2 and all(math.isfinite(loss) for loss in out["train_losses"])
    assert out["qlora_perplexity"] == pytest.approx(init_perplexity["qlora"], rel=1e-4)
    assert out["step0_perplexity"] == pytest.approx(init_perplexity["closed_form"], rel=1e-4)
    assert out["step0_perplexity"] < out["qlora_perplexity"] and math.isfinite(out["final_perplexity"])

    assert json.loads((out["adapter"] / "quailora.json").read_text())["method"] == "closed_form"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, dtype=torch.float32)
    keep_cpu_layout(base)
    loaded = PeftModel.from_pretrained(base, out["adapter"])
    held_out = load_splits(DataConfig(str(text_file), **DATA), AutoTokenizer.from_pretrained(tiny_model_dir)).eval
    assert perplexity(loaded, held_out) == pytest.approx(out["final_perplexity"], rel=1e-4)
