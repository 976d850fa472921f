"""Ranks under a budget (methods/budget.py): the allocation is the exact optimum within the parameter budget (brute
force on small problems, where greedy is not), the per-rank errors match the direct ones, and an init run writes a
plain peft adapter with a rank_pattern, no more parameters than uniform rank and a summed objective no worse."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from quailora_app.config import AccuracyConfig, DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.budget import allocate, allocate_dp, allocate_greedy
from quailora_app.engine.methods.registry import get_method, method_names, model_method_names
from quailora_app.events import RunFinished
from quailora_app.flows.init import run_init


def brute_force(gains, costs, budget, min_ranks=None):
    """max sum g_l(k_l) over every rank combination within the budget."""
    lows = min_ranks or [0] * len(gains)
    best = -np.inf
    for ranks in itertools.product(*[range(lo, len(g)) for lo, g in zip(lows, gains)]):
        if sum(k * c for k, c in zip(ranks, costs)) <= budget:
            best = max(best, sum(g[k] for g, k in zip(gains, ranks)))
    return best


def concave_curve(rng, K: int) -> np.ndarray:
    """g(0) = 0 and decreasing positive steps: what a closed form's removed error looks like."""
    steps = np.sort(rng.exponential(1.0, K))[::-1] * rng.exponential(1.0)
    return np.concatenate([[0.0], np.cumsum(steps)])


@pytest.mark.parametrize("seed", range(12))
def test_the_dynamic_program_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed % 2
    gains = [concave_curve(rng, int(rng.integers(3, 7))) for _ in range(n)]
    costs = [int(c) for c in rng.choice([6, 9, 10, 14, 15, 21], size=n)]
    budget = int(rng.integers(10, sum(costs) * 3))
    lows = [int(rng.integers(0, 2)) for _ in range(n)]
    if sum(lo * c for lo, c in zip(lows, costs)) > budget:
        lows = [0] * n
    best = brute_force(gains, costs, budget, lows)
    dp = allocate_dp(gains, costs, budget, lows)
    assert dp.parameters <= budget and dp.parameters == sum(k * c for k, c in zip(dp.ranks, costs))
    assert all(lo <= k < len(g) for lo, k, g in zip(lows, dp.ranks, gains))
    assert dp.value == pytest.approx(best, rel=1e-12, abs=1e-12)
    greedy = allocate_greedy(gains, costs, budget, lows)
    assert greedy.parameters <= budget and greedy.value <= best + 1e-12


def test_the_dynamic_program_needs_no_concavity():
    rng = np.random.default_rng(7)
    gains = [np.concatenate([[0.0], np.cumsum(rng.normal(1.0, 1.5, 5))]) for _ in range(4)]
    costs, budget = [4, 6, 10, 8], 37
    assert allocate_dp(gains, costs, budget).value == pytest.approx(brute_force(gains, costs, budget))


def test_greedy_by_ratio_is_not_always_optimal():
    """Layer a: one rank of 3 parameters removes 3.0 (ratio 1.0); layer b: ranks of 2 parameters remove 1.9 then
    1.8 (ratios 0.95, 0.9). With 4 parameters greedy takes a's rank and nothing else fits (3.0); the optimum gives
    both ranks to b (3.7)."""
    gains, costs, budget = [[0.0, 3.0], [0.0, 1.9, 3.7]], [3, 2], 4
    greedy, dp = allocate_greedy(gains, costs, budget), allocate_dp(gains, costs, budget)
    assert greedy.ranks == [1, 0] and greedy.value == pytest.approx(3.0)
    assert dp.ranks == [0, 2] and dp.value == pytest.approx(3.7) == brute_force(gains, costs, budget)
    assert allocate(gains, costs, budget).how == "dynamic program"
    assert allocate(gains, costs, budget, max_cells=1).how == "greedy"


def test_equal_costs_make_greedy_exact_and_the_budget_is_checked():
    rng = np.random.default_rng(3)
    gains = [concave_curve(rng, 8) for _ in range(4)]
    for budget in (5, 40, 96, 200):
        assert allocate_greedy(gains, [8] * 4, budget).value == pytest.approx(allocate_dp(gains, [8] * 4, budget).value)
    with pytest.raises(ValueError, match="smallest ranks"):
        allocate_dp(gains, [8] * 4, 20, [1, 1, 1, 1])


def test_the_table_runs_at_a_real_models_size():
    """210 layers of SmolLM2-135M's shapes, ranks 0..64, the budget of uniform rank 16: 25,440 units of 192 (its
    seconds are bench/beyond.py's concern)."""
    rng = np.random.default_rng(0)
    costs = [1152, 768, 768, 1152, 2112, 2112, 2112] * 30
    gains = [concave_curve(rng, 64) for _ in costs]
    budget = 16 * sum(costs)
    dp = allocate_dp(gains, costs, budget, [1] * len(costs))
    greedy = allocate_greedy(gains, costs, budget, [1] * len(costs))
    assert dp.parameters <= budget and greedy.value <= dp.value + 1e-9
    assert greedy.value >= 0.999 * dp.value  # near-optimal on concave curves


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_errors_by_rank_match_the_direct_errors(shape):
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    E = torch.randn(m, n, generator=gen, dtype=torch.float64)
    X = torch.randn(n, 300, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    spec = init_math.damped(X @ X.T / 300, 0.01)
    meter = init_math.LowRankErrors(E, spec)
    for P, Rt in (init_math.closed_form_correction(E, spec, 16), init_math.svd_correction(E, 16),
                  init_math.quailora_correction(E, spec, 16, 3)):
        weight, calibrated = meter.errors_by_rank(P, Rt)
        assert weight.shape == calibrated.shape == (17,) and weight[0] == 1.0 and calibrated[0] == 1.0
        for k in range(17):
            w, c = meter.errors(P[:, :k], Rt[:k])
            assert float(weight[k]) == pytest.approx(w, abs=1e-10)
            assert float(calibrated[k]) == pytest.approx(c, abs=1e-10)
            C = P[:, :k] @ Rt[:k]
            assert float(calibrated[k]) == pytest.approx(init_math.calibrated_error(E, C, X @ X.T / 300), abs=1e-9)


def test_budget_is_a_whole_model_method_of_the_registry():
    assert "budget" in method_names() and "budget" in model_method_names()
    assert get_method("budget").build is not None and not get_method("budget").default
    assert InitConfig(methods=("budget",)).methods == ("qlora", "budget")


# ------------------------------------------------------------------------------------------------ an init run
@pytest.fixture(scope="module")
def budget_run(tiny_model_dir, text_file, labelled, tmp_path_factory):
    """One init run with closed_form and budget, scoring the label task; beside it, the held-out perplexity of every
    model the accuracy scorer was handed, in scoring order."""
    from transformers import AutoTokenizer

    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.flows import accuracy_ledger
    from quailora_app.sources.data import load_splits

    out = tmp_path_factory.mktemp("budget-run")
    data = DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=512)
    acc = AccuracyConfig(accuracy_tasks=("labels",), label_dataset=str(labelled), shots=2, label_prompts=2,
                         label_items=40)
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), data, lora=LoraSettings(rank=4),
                     methods=("closed_form", "budget"), baselines=False, accuracy=acc, out=str(out))
    eval_ids = load_splits(data, AutoTokenizer.from_pretrained(tiny_model_dir)).eval
    scored, score_task = [], accuracy_ledger.score_task
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accuracy_ledger, "score_task",
                   lambda model, *a, **k: scored.append(perplexity(model, eval_ids)) or score_task(model, *a, **k))
        events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    return out, events[-1].report, scored


def lora_parameters(folder) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for name, t in load_file(folder / "adapter_model.safetensors").items() if "lora_" in name)


def test_budget_adapter_has_a_rank_pattern_within_the_budget(budget_run):
    out, report, _ = budget_run
    ranks = report["ranks"]["budget"]
    assert set(ranks) == {row["name"] for row in report["layers"]} and len(set(ranks.values())) > 1
    config = json.loads((out / "adapters" / "budget" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ranks
    scaling = report["scaling"]
    assert all(config["alpha_pattern"][p] == pytest.approx(scaling * k) for p, k in ranks.items())
    used = lora_parameters(out / "adapters" / "budget")
    uniform = lora_parameters(out / "adapters" / "closed_form")
    details = report["method_details"]["budget"]
    assert used <= uniform and used == details["parameters"]["used"] and uniform == details["parameters"]["budget"]
    assert details["allocator"] == "dynamic program"


def test_budget_lowers_the_summed_objective(budget_run):
    """The optimum of the summed objective (by default each layer's share of tr(E H E^T) left, calibrated_error^2)
    over closed-form ranks within the budget: no worse than uniform rank r (closed_form), layer by layer in the
    report."""
    _, report, _ = budget_run
    details = report["method_details"]["budget"]
    assert details["weighting"] == "normalized"

    def summed(method):
        return sum(row["calibrated_error"][method] ** 2 for row in report["layers"])

    assert summed("budget") <= summed("closed_form") * (1 + 1e-6)
    objective = details["objective"]
    assert objective["budget"]["normalized"] <= objective["uniform"]["normalized"] < objective["before"]["normalized"]
    assert objective["budget"]["normalized"] <= objective["greedy"]["normalized"] + 1e-9
    assert objective["uniform"]["normalized"] == pytest.approx(summed("closed_form"), rel=1e-4)
    assert objective["uniform"]["raw"] == pytest.approx(
        sum(details["calibrated_base"][row["name"]] * row["calibrated_error"]["closed_form"] ** 2
            for row in report["layers"]), rel=1e-4)
    assert report["seconds"]["budget"] > 0 and "budget" in report["perplexity"]


def test_budget_adapter_loads_with_plain_peft_to_the_reported_perplexity(budget_run, tiny_model_dir, text_file):
    from peft import PeftModel

    from quailora_app.engine.adapters import lora_layers
    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.engine.quantization.bnb import load_4bit
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import ModelSource, load_tokenizer

    out, report, _ = budget_run
    source = ModelSource("tiny", tiny_model_dir)
    splits = load_splits(DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=512),
                         load_tokenizer(source))
    model = PeftModel.from_pretrained(load_4bit(source, QuantConfig(), torch.device("cpu"), torch.float32),
                                      out / "adapters" / "budget")
    layers = lora_layers(model)
    for path, k in report["ranks"]["budget"].items():
        assert layers[path].r["default"] == k and layers[path].scaling["default"] == pytest.approx(report["scaling"])
    assert perplexity(model, splits.eval) == pytest.approx(report["perplexity"]["budget"], rel=1e-5)


def test_each_variants_accuracy_is_scored_on_the_model_its_perplexity_comes_from(budget_run, tiny_model_dir,
                                                                                 text_file, labelled):
    """The scorer is handed, for every variant, the model whose held-out perplexity the report gives (budget's has
    its own per-layer ranks: its accuracy was once scored on plain QLoRA's), and its items re-scored on the saved
    adapter loaded with plain peft are right or wrong exactly as the report says."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from quailora_app.engine.evaluation.accuracy import build_tasks, score_task
    from quailora_app.engine.quantization.bnb import load_4bit
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import ModelSource

    out, report, scored = budget_run
    methods = [m for m in report["methods"] if m in report["perplexity"]]
    assert methods == ["qlora", "closed_form", "budget"] and len(scored) == len(methods)
    for method, ppl in zip(methods, scored):
        assert ppl == pytest.approx(report["perplexity"][method], rel=1e-6), method
    assert report["perplexity"]["budget"] != pytest.approx(report["perplexity"]["qlora"], rel=1e-3)

    data = DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=512)
    acc = AccuracyConfig(accuracy_tasks=("labels",), label_dataset=str(labelled), shots=2, label_prompts=2,
                         label_items=40)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (task,) = build_tasks(acc, data, load_splits(data, tokenizer), tokenizer, reserved_splits=("calib",))
    for method in ("qlora", "budget"):
        base = load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig(), torch.device("cpu"), torch.float32)
        model = PeftModel.from_pretrained(base, out / "adapters" / method)
        correct = "".join("1" if c else "0" for c in score_task(model, tokenizer, task).correct)
        assert correct == report["accuracy"]["labels"]["models"][method]["correct"], method


# ------------------------------------------------------------------------------------------------ the figure
def ranked_report() -> dict:
    modules = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    layers, ranks = [], {}
    for b in range(3):
        for i, m in enumerate(modules):
            name = f"model.layers.{b}.{m}"
            layers.append({"name": name, "block": b, "module": m, "shape": [64, 64],
                           "weight_error": {"qlora": 1.0, "quailora": 0.9, "budget": 0.9},
                           "calibrated_error": {"qlora": 1.0, "quailora": 0.6, "budget": 0.5 + 0.1 * i}})
            ranks[name] = 8 + 4 * (1 - i) + b
    return {"rank": 8, "layers": layers, "ranks": {"budget": ranks}, "methods": ["qlora", "quailora", "budget"]}


def test_rank_heatmap_shows_the_ranks_per_block_and_module():
    from quailora_app.plots import figures as F

    report = ranked_report()
    fig = F.rank_heatmap(report)
    assert "uniform r = 8" in fig.layout.xaxis.title.text and fig.layout.title.text and fig.layout.yaxis.title.text
    heat = fig.data[0]
    assert [list(row) for row in heat.z] == [[12, 8, 4], [13, 9, 5], [14, 10, 6]]
    assert heat.zmid == 8 and heat.x[0] == "q_proj (13.0)" and "mean rank" in fig.layout.xaxis.title.text
    assert heat.customdata[0][0] == "50%"
    both = F.init_heatmap(report, "quailora")
    assert len(both.data) == 2 and [list(row) for row in both.data[1].z] == [list(row) for row in heat.z]
    without = {k: v for k, v in report.items() if k != "ranks"}
    assert len(F.init_heatmap(without, "quailora").data) == 1  # no ranks: the removal heatmap alone
    assert not F.rank_heatmap(without).data and not F.rank_heatmap([]).data
    json.loads(fig.to_json())
    json.loads(both.to_json())


# ------------------------------------------------------------------------------------------------ the Python API
def test_the_api_resizes_the_users_lora_to_the_same_ranks(budget_run, tiny_model_dir, text_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from quailora_app import replace_lora_weights_quailora
    from quailora_app.engine.adapters import lora_layers
    from quailora_app.engine.quantization.bnb import keep_cpu_layout
    from quailora_app.sources.data import load_splits

    _, report, _ = budget_run
    def four_bit():
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, dtype=torch.float32)
        keep_cpu_layout(base)
        return base

    def config():  # a fresh one per model: resizing writes the rank_pattern into the model's config
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")

    model = get_peft_model(four_bit(), config())
    uniform = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    calib = load_splits(DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=512),
                        AutoTokenizer.from_pretrained(tiny_model_dir)).calib
    result = replace_lora_weights_quailora(model, calib, "budget", progress=False)
    ranks = {row["name"]: row["rank"] for row in result.layers}
    assert ranks == report["ranks"]["budget"]
    assert model.peft_config["default"].rank_pattern == ranks
    layers = lora_layers(model)
    assert all(layers[p].r["default"] == k and layers[p].scaling["default"] == pytest.approx(2.0)
               for p, k in ranks.items())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) <= uniform

    # raw weighting (an option): the optimum of the summed absolute objective, no worse than uniform closed_form's
    base = report["method_details"]["budget"]["calibrated_base"]
    model = get_peft_model(four_bit(), config())
    raw = replace_lora_weights_quailora(model, calib, "budget", progress=False, options={"budget_weighting": "raw"})
    assert {row["name"]: row["rank"] for row in raw.layers} != ranks
    summed = sum(base[row["name"]] * row["calibrated_error"]["budget"] ** 2 for row in raw.layers)
    closed = sum(base[row["name"]] * row["calibrated_error"]["closed_form"] ** 2 for row in report["layers"])
    assert summed <= closed * (1 + 1e-6)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) <= uniform
