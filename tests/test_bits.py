"""Across bits (flows/bits.py): one calibration shared by every base gives exactly the factors a separate
calibration per base gives; every point's perplexity is its own model's; memory per weight is what the formats
hold; the frontier figure and the CLI; bad input gets one line."""
import math

import pytest
import torch

from quailora_app.cli import main as cli_main
from quailora_app.config import BitsConfig, DataConfig, LoraSettings, ModelConfig, QuantConfig, base_quant
from quailora_app.engine.adapters import attach_lora, write_factors
from quailora_app.engine.calibration.initialize import InitResult, initialize
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.evaluation.evaluate import perplexity
from quailora_app.engine.quantization.load import bits_per_weight, load_quantized
from quailora_app.errors import ConfigError
from quailora_app.events import RunFailed, RunFinished
from quailora_app.flows.bits import run_bits
from quailora_app.plots.frontier import bits_harm_gain_points, frontier_figure
from quailora_app.sources.models import resolve_model

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]

CPU = torch.device("cpu")
LORA = LoraSettings(rank=4)


def bits_config(tiny_model_dir, text_file, out, **over) -> BitsConfig:
    values = {"model": ModelConfig(str(tiny_model_dir)), "data": DataConfig(str(text_file), seq_len=32, calib_samples=8,
                                                                  eval_tokens=256),
              "lora": LORA, "bases": ("hqq2", "hqq3", "nf4"), "group_size": 32, "out": str(out)}
    return BitsConfig(**{**values, **over})


@pytest.fixture(scope="module")
def bits_run(tiny_model_dir, text_file, tmp_path_factory):
    events = list(run_bits(bits_config(tiny_model_dir, text_file, tmp_path_factory.mktemp("bits-run") / "run")))
    assert isinstance(events[-1], RunFinished), events[-1]
    return events[-1].report


def test_every_base_has_a_point_per_method(bits_run):
    points = bits_run["points"]
    assert set(points) == {f"{b}/{m}" for b in ("hqq2", "hqq3", "nf4") for m in ("qlora", "svd", "closed_form")}
    assert bits_run["full"] > 1 and all(math.isfinite(p["perplexity"]) for p in points.values())
    assert bits_run["reading"].startswith("At 2 bits plus a rank-4 ")


def test_shared_calibration_gives_the_factors_of_a_calibration_per_base(tiny_model_dir, text_file):
    """H is of the full-precision inputs: computing every base's corrections on one calibration must give, bit for
    bit, the factors each base gets from a calibration of its own."""
    source = resolve_model(str(tiny_model_dir))
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    models = {b: load_quantized(source, base_quant(b, 32), CPU, torch.float32) for b in ("hqq3", "nf4")}
    shared = {b: InitResult() for b in models}
    list(initialize(models["hqq3"], Checkpoint(source.folder), calib, LORA, ("svd", "closed_form"), shared["hqq3"],
                    device=CPU, also={"nf4": (models["nf4"], shared["nf4"])}))
    for base, model in models.items():
        alone = InitResult()
        list(initialize(model, Checkpoint(source.folder), calib, LORA, ("svd", "closed_form"), alone, device=CPU))
        for method in ("svd", "closed_form"):
            assert alone.factors[method].keys() == shared[base].factors[method].keys()
            for path, f in alone.factors[method].items():
                g = shared[base].factors[method][path]
                assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B), (base, method, path)
        assert [r["name"] for r in alone.layers] == [r["name"] for r in shared[base].layers]


def test_a_point_is_the_perplexity_of_its_own_model(bits_run, tiny_model_dir, text_file):
    """Re-measure hqq3 + closed_form from scratch: quantize, attach the run's own split of factors (recomputed),
    and compare with the report."""
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import load_tokenizer

    cfg = bits_config(tiny_model_dir, text_file, None)
    source = resolve_model(str(tiny_model_dir))
    splits = load_splits(cfg.data, load_tokenizer(source))
    model = load_quantized(source, base_quant("hqq3", 32), CPU, torch.float32)
    result = InitResult()
    list(initialize(model, Checkpoint(source.folder), splits.calib, LORA, ("closed_form",), result, device=CPU))
    peft_model = attach_lora(model, LORA, target_paths(model, LORA))
    write_factors(peft_model, result.factors["closed_form"])
    assert perplexity(peft_model, splits.eval, 4) == pytest.approx(bits_run["points"]["hqq3/closed_form"]["perplexity"],
                                                                   rel=1e-6)


def test_memory_per_weight_is_what_the_formats_hold(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    # HQQ: codes packed (3 bits: 10 codes in 32 bits, the last word padded) plus a 16-bit scale and zero per group
    hqq3 = bits_per_weight(load_quantized(source, QuantConfig(quantizer="hqq", bits=3, block_size=32), CPU,
                                          torch.float32))
    assert 3.2 + 32 / 32 <= hqq3 < 3.3 + 32 / 32
    hqq4 = bits_per_weight(load_quantized(source, QuantConfig(quantizer="hqq", bits=4, block_size=64), CPU,
                                          torch.float32))
    assert hqq4 == pytest.approx(4 + 32 / 64)
    # NF4 without double quantization: 4 bits plus a float32 absmax per block of 64
    nf4 = bits_per_weight(load_quantized(source, QuantConfig(double_quant=False), CPU, torch.float32))
    assert nf4 == pytest.approx(4 + 32 / 64)


def test_corrected_points_count_the_adapter(bits_run):
    for point in bits_run["points"].values():
        adds = point["adapter_bits_per_weight"]
        assert (adds > 0) == (point["method"] != "qlora")
        assert point["bits_per_weight"] == pytest.approx(point["quantized_bits_per_weight"] + adds)


def test_frontier_figure_draws_every_point_on_a_log_axis(bits_run):
    fig = frontier_figure(bits_run)
    drawn = sum(len([x for x in trace.x if x is not None]) for trace in fig.data)
    assert drawn == len(bits_run["points"])
    assert fig.layout.yaxis.type == "log"
    assert "HQQ at 2, 3 bits (circles)" in fig.layout.title.text and "NF4 4-bit (squares)" in fig.layout.title.text
    scatter = bits_harm_gain_points(bits_run)
    assert [p["text"] for p in scatter] == ["HQQ 2-bit", "HQQ 3-bit", "NF4 4-bit"]


def test_cli_prints_the_table(tiny_model_dir, text_file, tmp_path, capsys):
    code = cli_main(["bits", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--bases", "hqq4",
                     "--group-size",
                     "32", "--seq-len", "32", "--calib-samples", "4", "--eval-tokens", "128", "--methods", "svd",
                     "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0 and "HQQ 4-bit (groups of 32)" in out and "svd" in out and "full precision" in out


@pytest.mark.parametrize("argv, words", [
    (["init", "--quantizer", "hqq", "--bits", "5"], "hqq quantizes to 2, 3, 4 or 8 bits, not 5"),
    (["init", "--bits", "3"], "bitsandbytes quantizes to 4 bits, not 3"),
    (["init", "--quantizer", "hqq", "--group-size", "12"], "HQQ group size must be a positive multiple of 8"),
    (["bits", "--bases", "hqq3", "--group-size", "20"], "HQQ group size must be a positive multiple of 8"),
])
def test_bad_settings_get_one_line(argv, words, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_a_group_size_that_does_not_divide_a_layer_gets_one_line(tiny_model_dir, text_file, tmp_path):
    events = list(run_bits(bits_config(tiny_model_dir, text_file, tmp_path / "bad", bases=("hqq3",), group_size=48)))
    assert isinstance(events[-1], RunFailed)
    assert "group size 48 does not divide the 64 inputs of layer" in events[-1].message
    with pytest.raises(ConfigError):
        BitsConfig(bases=())
