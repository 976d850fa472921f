"""Fine-tuning arms at any bit width (flows/train.py on the run's quantizer): an HQQ 3-bit train run beside the
bitsandbytes NF4 4-bit reference arm on a tiny Llama. Its step-0 perplexities are the init flow's for the same base
and method, training moves the factors and lowers the loss, labels name the bits and quantizer, --from-init takes an
HQQ init run's factors, and bad bits or group sizes get one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from quailora_app import cli
from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig, TrainConfig
from quailora_app.engine.adapters import load_factors
from quailora_app.engine.arms import ARM_SPECS, ArmSpec, arm_labels, base_title, model_bytes
from quailora_app.engine.quantization.hqq import hqq_modules
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.errors import ConfigError
from quailora_app.flows.from_init import train_config_from_init
from quailora_app.flows.init import run_init
from quailora_app.flows.train import run_train
from quailora_app.plots.figures import train_figure, train_table
from quailora_app.sources.models import ModelSource

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one thread (model tests are marked by
# their fixtures)

HQQ3 = QuantConfig(quantizer="hqq", bits=3, block_size=32)  # the tiny Llama's layers have 64 and 128 inputs
ARMS = ("qlora4", "closed4", "loftq4", "qlora_nf4")
TRAIN_KW = dict(steps=4, batch_size=2, eval_every=2, learning_rate=1e-2)


@pytest.fixture(scope="module")
def text_file(train_text_file):
    """The fine-tuning tests' text (conftest's train_text_file)."""
    return train_text_file


def settings(model_dir, text_file, quant=HQQ3):
    return (ModelConfig(str(model_dir), "cpu"),
            DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=256), quant,
            LoraSettings(rank=4, alpha=8.0))


@pytest.fixture(scope="module")
def hqq_init(tiny_model_dir, text_file, tmp_path_factory):
    """A finished HQQ 3-bit init run with closed_form (and quailora) saved: (run_dir, report)."""
    run_dir = tmp_path_factory.mktemp("init-hqq3")
    cfg = InitConfig(*settings(tiny_model_dir, text_file), methods=("quailora", "closed_form"), baselines=False)
    events = list(run_init(cfg, run_dir=run_dir))
    assert events[-1].kind == "finished", events[-1]
    return run_dir, events[-1].report


@pytest.fixture(scope="module")
def run3(tiny_model_dir, text_file, tmp_path_factory):
    """qlora4 and closed4 on HQQ 3-bit, loftq4 on HQQ 3-bit re-quantized by LoftQ, qlora_nf4 on bitsandbytes NF4,
    four steps interleaved, every step-0 perplexity measured: (events, run_dir)."""
    run_dir = tmp_path_factory.mktemp("train-hqq3")
    cfg = TrainConfig(*settings(tiny_model_dir, text_file), arms=ARMS, measure_step0=True, **TRAIN_KW)
    events = list(run_train(cfg, run_dir=run_dir))
    assert events[-1].kind == "finished", events[-1]
    return events, run_dir


def step0(events) -> dict[str, float]:
    return {e.arm: e.val_perplexity for e in events if e.kind == "eval" and e.step == 0}


def test_step0_perplexity_is_the_init_flows_on_the_same_base(run3, hqq_init, tiny_model_dir, text_file, tmp_path):
    events, _ = run3
    _, report = hqq_init
    start = step0(events)
    assert start["qlora4"] == pytest.approx(report["perplexity"]["qlora"], rel=1e-5)  # plain HQQ 3-bit
    assert start["closed4"] == pytest.approx(report["perplexity"]["closed_form"], rel=1e-5)
    nf4 = list(run_init(InitConfig(*settings(tiny_model_dir, text_file, QuantConfig()), methods=("qlora",),
                                   baselines=False), run_dir=tmp_path / "nf4"))[-1].report
    assert start["qlora_nf4"] == pytest.approx(nf4["perplexity"]["qlora"], rel=1e-5)  # the QLoRA recipe's base
    assert start["qlora_nf4"] != pytest.approx(start["qlora4"], rel=1e-3)  # two different bases


def test_training_updates_the_factors_on_hqq_layers(run3, hqq_init):
    events, run_dir = run3
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "finished"
    for arm in ARMS:
        evals = report["arms"][arm]["evals"]
        assert [s for s, _ in evals] == [0, 2, 4]
        assert evals[-1][1] < evals[0][1] * 0.97, (arm, evals)
        losses = [e.train_loss for e in events if e.kind == "train_step" and e.arm == arm]
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), (arm, losses)
    # gradients reach the factors through the HQQ layers: qlora4's B, zero at the start, is not any more
    trained, _ = load_factors(run_dir / "adapters" / "qlora4")
    assert len(trained) == 14 and all(f.B.abs().max() > 0 for f in trained.values())
    # closed4's factors moved away from the closed form the HQQ init run computed (same data, same base), A and B
    start, _ = load_factors(hqq_init[0] / "adapters" / "closed_form")
    end, _ = load_factors(run_dir / "adapters" / "closed4")
    assert start.keys() == end.keys() and len(end) == 14
    for path in start:
        assert not torch.allclose(start[path].A, end[path].A), path
        assert not torch.allclose(start[path].B, end[path].B), path
    # the saved adapter says what it trained on
    record = json.loads((run_dir / "adapters" / "closed4" / "quailora.json").read_text())
    assert (record["quantizer"], record["bits"], record["base_title"]) == ("hqq", 3, "HQQ 3-bit")


def test_loftq_arm_trains_on_its_own_requantized_base(run3, tiny_model_dir, text_file, tmp_path):
    """loftq4 starts where the across-bits flow puts LoftQ (T = 5) on the same HQQ 3-bit base: its factors on its
    re-quantized layers Q_T, self-checked through those layers (not the plain base's)."""
    from quailora_app.config import BitsConfig
    from quailora_app.flows.bits import run_bits

    events, run_dir = run3
    report = json.loads((run_dir / "report.json").read_text())
    check = report["self_check"]["4bit"]["loftq_svd"]
    assert check["ratios"] and max(check["ratios"].values()) <= 1.02 and not report["layers_reset"]["4bit"]["loftq_svd"]
    model, data, _, lora = settings(tiny_model_dir, text_file)
    bits = list(run_bits(BitsConfig(model, data, lora, bases=("hqq3",), methods=("loftq_svd",), group_size=32,
                                    out=str(tmp_path / "bits"))))[-1].report
    start = step0(events)
    assert start["loftq4"] == pytest.approx(bits["points"]["hqq3/loftq_svd"]["perplexity"], rel=1e-5)
    assert start["qlora4"] == pytest.approx(bits["points"]["hqq3/qlora"]["perplexity"], rel=1e-5)
    assert start["loftq4"] < start["qlora4"]


def test_labels_name_the_bits_and_the_quantizer(run3):
    events, run_dir = run3
    report = json.loads((run_dir / "report.json").read_text())
    arms = report["arms"]
    assert arms["qlora4"]["short"] == "HQQ 3-bit QLoRA" and arms["closed4"]["label"].startswith("HQQ 3-bit + ")
    assert arms["qlora_nf4"]["short"] == ARM_SPECS["qlora_nf4"].short and "NF4 4-bit" in arms["qlora_nf4"]["short"]
    assert (arms["qlora4"]["quantizer"], arms["qlora4"]["bits"]) == ("hqq", 3)
    assert (arms["qlora_nf4"]["quantizer"], arms["qlora_nf4"]["bits"]) == ("bitsandbytes", 4)
    assert not any("4-bit" in arms[a]["label"] for a in ("qlora4", "closed4", "loftq4"))
    records = [e.to_dict() for e in events]
    legend = {t.name for t in train_figure(records).data if t.showlegend is not False}
    assert {"HQQ 3-bit QLoRA", "HQQ 3-bit closed-form init", arms["qlora_nf4"]["short"]} <= legend
    assert [row[0] for row in train_table(records)] == [arms[a]["short"] for a in ARMS]
    assert "qlora4 = HQQ 3-bit QLoRA" in cli.train_table(report)


def test_memory_counts_hqq_scales_and_zeros(tiny_model_dir):
    model = load_quantized(ModelSource("tiny", tiny_model_dir), HQQ3, torch.device("cpu"), torch.float32)
    meta = sum(t.numel() * t.element_size() for layer in hqq_modules(model).values()
               for t in layer.meta.values() if isinstance(t, torch.Tensor))
    plain = sum(p.numel() * p.element_size() for p in model.parameters())
    assert meta > 0 and model_bytes(model) >= plain + meta - 1024  # tied embeddings count once


def test_from_an_hqq_init_run(hqq_init, tmp_path):
    init_dir, report = hqq_init
    cfg = train_config_from_init(init_dir, arms=("qlora4", "closed4"), steps=2, batch_size=2, eval_every=2,
                                 learning_rate=1e-2, measure_step0=True, out=str(tmp_path / "run"))
    assert (cfg.quant.quantizer, cfg.quant.bits, cfg.quant.block_size) == ("hqq", 3, 32)
    events = list(run_train(cfg))
    assert events[-1].kind == "finished", events[-1]
    train = events[-1].report
    assert train["arms"]["closed4"]["init_from"].startswith("init run")  # loaded, not computed again
    assert not any(e.kind == "stage" and e.stage == "calibrate" for e in events)
    start = step0(events)  # measured here: the loaded factors on a freshly quantized HQQ base give the init's figure
    assert start["closed4"] == pytest.approx(report["perplexity"]["closed_form"], rel=1e-5)
    assert start["qlora4"] == pytest.approx(report["perplexity"]["qlora"], rel=1e-5)
    with pytest.raises(ConfigError, match="--bits 4"):
        train_config_from_init(init_dir, bits=4, quantizer="hqq")
    with pytest.raises(ConfigError, match="--quantizer bitsandbytes"):
        train_config_from_init(init_dir, quantizer="bitsandbytes", bits=4)


def test_arm_labels_say_the_bits_and_quantizer_of_the_base():
    assert arm_labels(ARM_SPECS["quailora4"], HQQ3) == ("HQQ 3-bit + QuAILoRA init", "HQQ 3-bit QuAILoRA")
    assert arm_labels(ARM_SPECS["quailora4"], QuantConfig()) == (ARM_SPECS["quailora4"].label,
                                                                ARM_SPECS["quailora4"].short)  # unchanged
    assert arm_labels(ARM_SPECS["qlora_nf4"], HQQ3)[1] == ARM_SPECS["qlora_nf4"].short  # not the run's base
    assert arm_labels(ARM_SPECS["qlora8"], HQQ3)[1] == "8-bit QLoRA"
    assert [base_title(b, HQQ3) for b in ("4bit", "nf4", "8bit", "full")] == [
        "HQQ 3-bit", "NF4 4-bit", "8-bit LLM.int8", "unquantized"]
    assert base_title("4bit", QuantConfig(quant="fp4")) == "FP4 4-bit"
    with pytest.raises(ValueError, match="quantizes the base again"):
        ArmSpec("loftq8", "8bit", "loftq_svd", "x", "x", "#000", "x")


@pytest.mark.parametrize(("argv", "words"), [
    (["--quantizer", "hqq", "--bits", "5"], "hqq quantizes to 2, 3, 4 or 8 bits, not 5"),
    (["--bits", "3"], "bitsandbytes quantizes to 4 bits, not 3"),
    (["--quantizer", "hqq", "--bits", "3", "--group-size", "12"], "HQQ group size must be a positive multiple of 8"),
])
def test_bad_bits_get_one_line(argv, words, capsys, tmp_path):
    assert cli.main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_a_group_size_that_does_not_divide_a_layer_gets_one_line_before_loading(tiny_model_dir, text_file, tmp_path,
                                                                               capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--device", "cpu", "--seq-len", "32",
            "--calib-samples", "8", "--eval-tokens", "256", "--rank", "4", "--steps", "2", "--quantizer", "hqq",
            "--bits", "3", "--group-size", "48", "--arms", "qlora4", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the others: progress lines
    assert len(errors) == 1 and "group size 48 does not divide the 64 inputs of layer" in errors[0]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert not any(e["kind"] == "metric" for e in events)  # refused before any model was loaded or measured


def test_a_loftq_arm_saves_the_base_it_trained_on_and_the_pair_reloads_to_its_final_perplexity(run3, tiny_model_dir,
                                                                                                text_file):
    """loftq4 trains on its own re-quantized base Q_T: its adapter folder holds that base (base_weights.safetensors),
    and plain transformers + peft reload the pair to the arm's final held-out perplexity; the arms on the stock base
    carry no base file."""
    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.engine.requantized import BASE_FILE, load_with_base
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import load_tokenizer, resolve_model

    _, run_dir = run3
    report = json.loads((run_dir / "report.json").read_text())
    folder = run_dir / "adapters" / "loftq4"
    assert (folder / BASE_FILE).is_file() and BASE_FILE in (folder / "README.md").read_text()
    assert not any((run_dir / "adapters" / arm / BASE_FILE).exists() for arm in ("qlora4", "closed4", "qlora_nf4"))
    model_cfg, data_cfg, _, _ = settings(tiny_model_dir, text_file)
    source = resolve_model(model_cfg.model)
    splits = load_splits(data_cfg, load_tokenizer(source))
    reloaded = load_with_base(folder, source.folder)
    final = report["arms"]["loftq4"]["evals"][-1][1]
    assert perplexity(reloaded, splits.eval, TrainConfig().eval_batch) == pytest.approx(final, rel=1e-4)
