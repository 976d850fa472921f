"""Teaching views on the tiny Llama: the numbers each figure shows are the engine's own (Q, H, errors, storage)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quailora_app.config import QuantConfig
from quailora_app.engine.calibration.calibrate import calibrate_blocks
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods import init_math
from quailora_app.engine.quantization.bnb import dequantized_weight, linear4bit_modules, load_4bit
from quailora_app.plots import teaching as TF
from quailora_app.sources.models import ModelSource
from quailora_app.teaching.how_it_works import how_it_works_markdown
from quailora_app.teaching.layer_views import calibration_view, corrections, inside_layer, weighted_singular_values
from quailora_app.teaching.precision import inventory_of_checkpoint, inventory_of_model, model_storage, precision_table
from quailora_app.teaching.rank_sweep import rank_sweep
from quailora_app.teaching.snapshot import layer_snapshots

CPU = torch.device("cpu")
DOWN = "model.layers.1.mlp.down_proj"
BLOCK1 = [f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread


def calib_ids() -> torch.Tensor:
    return torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def nf4(tiny_model_dir):
    model = load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig(), CPU, torch.float32)
    snaps = layer_snapshots(model, Checkpoint(tiny_model_dir), calib_ids(), BLOCK1, CPU)
    return model, snaps


@pytest.fixture(scope="module")
def views(nf4):
    _, snaps = nf4
    snap = snaps[DOWN]
    corr = corrections(snap, 8)
    return snap, inside_layer(snap, 8, precomputed=corr), calibration_view(snap, 8, precomputed=corr), corr


def test_snapshot_is_what_calibration_and_the_4bit_layer_hold(nf4, tiny_model_dir):
    model, snaps = nf4
    block = list(calibrate_blocks(model, Checkpoint(tiny_model_dir), calib_ids(), ("all-linear",), CPU))[1]
    H = {name: g.H for g in block.groups for name in g.names}
    for name in BLOCK1:
        local = name[len("model.layers.1."):]
        snap = snaps[name]
        assert torch.equal(snap.W, block.weights[local])
        torch.testing.assert_close(snap.H, H[local], rtol=1e-5, atol=1e-6)
        assert torch.equal(snap.Q, dequantized_weight(linear4bit_modules(model)[name]))
        assert (snap.quant_type, snap.block_size, snap.double_quant) == ("nf4", 64, True)


def test_histogram_counts_sum_to_layer_size(views):
    snap, inside, _, _ = views
    assert inside.weights.total == snap.W.numel()
    assert set(inside.error) == {"qlora", "svd", "quailora", "closed_form"}
    for hist in inside.error.values():
        assert hist.total == snap.W.numel()
    assert inside.weight_error["qlora"] == inside.calibrated_error["qlora"] == 1.0


@pytest.mark.parametrize("quant", [QuantConfig("nf4", True, 64), QuantConfig("fp4", False, 64)])
def test_block_levels_reproduce_the_dequantized_values(tiny_model_dir, quant):
    import bitsandbytes.functional as F

    model = load_4bit(ModelSource("tiny", tiny_model_dir), quant, CPU, torch.float32)
    snap = layer_snapshots(model, Checkpoint(tiny_model_dir), calib_ids()[:2], ["model.layers.0.mlp.up_proj"], CPU)[
        "model.layers.0.mlp.up_proj"]
    table = F.get_4bit_type(quant.quant, device="cpu").float()
    assert torch.equal(snap.code, table)
    assert snap.n_blocks * quant.block_size == snap.W.numel()
    flat = snap.Q.flatten()
    for b in range(snap.n_blocks):
        levels = snap.levels(b)
        torch.testing.assert_close(levels, torch.sort(table * snap.absmax[b]).values)
        assert torch.isin(flat[snap.block_slice(b)], levels).all(), f"block {b}"
    inside = inside_layer(snap, 4, block="outlier", methods=("svd",))
    assert inside.block_absmax == pytest.approx(float(snap.absmax.max()))
    assert np.isin(inside.block_quantized, inside.levels).all()
    assert inside.block_absmax == pytest.approx(float(np.abs(inside.block_weights).max()), rel=0.02)


def test_weighted_spectrum_energy_is_the_calibrated_error(views):
    snap, _, calib, corr = views
    E = snap.E64
    base = float((weighted_singular_values(E, snap.H) ** 2).sum())
    assert base == pytest.approx(init_math.calibrated_objective(E, torch.zeros_like(E), snap.H), rel=1e-10)
    for method, c in corr.items():
        left = float((weighted_singular_values(E - c.C, snap.H) ** 2).sum()) / base
        assert left == pytest.approx(init_math.calibrated_error(E, c.C, snap.H) ** 2, rel=1e-8), method
        weight, calibrated = snap.meter().errors(c.P, c.Rt)
        assert weight == pytest.approx(init_math.weight_error(E, c.C), rel=1e-8)
        assert calibrated == pytest.approx(init_math.calibrated_error(E, c.C, snap.H), rel=1e-8)
    r = calib.rank
    # the curves at k = r are the actual corrections: svd exactly, closed form up to the damping
    assert calib.removed_at_rank["svd"] == pytest.approx(calib.captured_calibrated_svd[r - 1], abs=1e-9)
    assert calib.removed_at_rank["closed_form"] <= calib.captured_calibrated_best[r - 1] + 1e-9
    assert calib.removed_at_rank["closed_form"] == pytest.approx(calib.captured_calibrated_best[r - 1], abs=0.02)
    assert calib.captured_calibrated_best[-1] == pytest.approx(1.0)
    assert calib.captured_weight_svd[-1] == pytest.approx(1.0)
    assert np.all(calib.captured_calibrated_best >= calib.captured_calibrated_svd - 1e-9)  # calibration never loses
    top = calib.top_channels
    assert np.all(np.diff(calib.h_diag[top]) <= 0) and calib.h_diag[top[0]] == calib.h_diag.max()


def test_rank_sweep_closed_form_is_monotone_and_best(nf4):
    _, snaps = nf4
    sweep = rank_sweep([snaps[n] for n in BLOCK1], ranks=(64, 1, 2, 4, 8, 16, 32))
    assert sweep.ranks == [1, 2, 4, 8, 16, 32] and sweep.notes  # 64 > min(out, in) of k_proj (32 x 64)
    closed = sweep.calibrated_error["closed_form"]
    assert all(b <= a + 1e-9 for a, b in zip(closed, closed[1:]))
    for layer, values in sweep.per_layer["closed_form"].items():
        assert all(b <= a + 1e-9 for a, b in zip(values, values[1:])), layer
    assert all(c <= s + 1e-3 for c, s in zip(closed, sweep.calibrated_error["svd"]))
    assert all(abs(q - c) < 0.02 for q, c in zip(sweep.calibrated_error["quailora"], closed))
    # the same number initialize() would report for one layer at one rank
    snap = snaps[DOWN]
    P, Rt = init_math.closed_form_correction(snap.E64, snap.damped(0.01), 8)
    expected = init_math.calibrated_error(snap.E, P @ Rt, snap.H)
    assert sweep.per_layer["closed_form"][DOWN][3] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("double_quant", [True, False])
def test_memory_accounting_is_the_models_storage(tiny_model_dir, double_quant):
    model = load_4bit(ModelSource("tiny", tiny_model_dir), QuantConfig("nf4", double_quant), CPU, torch.float32)
    stored = model_storage(model)
    params = stored["params"]
    inventory = inventory_of_model(model)
    assert inventory.linear_params == params == inventory_of_checkpoint(tiny_model_dir).linear_params
    assert inventory.other_params == inventory_of_checkpoint(tiny_model_dir).other_params
    assert stored["codes"] == params // 2  # two 4-bit codes per byte
    scale_bits = 8.0 * (stored["absmax"] + stored["nested"]) / params
    if double_quant:  # uint8 absmax per block of 64, one float32 per 256 blocks and an offset per layer
        assert stored["absmax"] == params // 64
        assert 8 / 64 < scale_bits < 8 / 64 + 0.05
    else:  # float32 absmax per block of 64
        assert stored["absmax"] == 4 * params // 64 and stored["nested"] == 0
        assert scale_bits == pytest.approx(0.5)
    table = precision_table(inventory)
    row = next(r for r in table.rows if r.key == ("nf4+dq" if double_quant else "nf4"))
    assert row.breakdown == {k: stored[k] for k in ("codes", "absmax", "nested", "tables")}
    assert row.linear_bytes == sum(row.breakdown.values())
    assert 4.0 + 8 / 64 < table.bits_per_param(row) < 4.0 + 0.5 + 8.0 * stored["tables"] / params + 1e-9
    fp32 = next(r for r in table.rows if r.key == "fp32")
    assert fp32.linear_bytes == 4 * params and fp32.other_bytes == 4 * inventory.other_params


def test_precision_table_takes_perplexity_from_reports(nf4):
    model, _ = nf4
    inventory = inventory_of_model(model)
    layers = [{"name": n, "shape": list(s)} for n, s in inventory.linear_shapes.items()]
    quant = {"quant": "nf4", "double_quant": True, "block_size": 64}
    report = {"model": "tiny", "rank": 4, "layers": layers, "settings": {"quant": quant},
              "perplexity": {"full": 50.0, "int8": 51.0, "qlora": 60.0, "quailora": 55.0}, "run_dir": "runs/init-a"}
    wrong = {**report, "layers": [{"name": layers[0]["name"], "shape": [7, 7]}], "run_dir": "runs/init-b"}
    table = precision_table(inventory, [report, wrong])
    ppl = {r.key: r.perplexity for r in table.rows}
    assert ppl["fp32"] == 50.0 and ppl["int8"] == 51.0 and ppl["nf4+dq"] == 60.0 and ppl["nf4+dq+quailora"] == 55.0
    assert ppl["nf4"] is None and ppl["bf16"] is None
    adapter = next(r for r in table.rows if r.key == "nf4+dq+quailora")
    assert adapter.adapter_bytes == sum(4 * 4 * (m + n) for m, n in inventory.linear_shapes.values())
    assert table.notes == ["runs/init-b skipped: its layers do not match this model (tiny)"]
    assert adapter.perplexity_from == "runs/init-a: quailora"
    assert len(table.table_rows()[0]) == len(table.HEADER)


def test_figures_have_titles_axes_captions_and_export_offline(views, nf4, tmp_path):
    snap, inside, calib, _ = views
    _, snaps = nf4
    sweep = rank_sweep([snaps[DOWN]], ranks=(1, 4, 16), methods=("svd", "closed_form"))
    sweep.perplexity = {"qlora": {0: 60.0}, "closed_form": {1: 58.0, 4: 57.0}}
    figs = TF.view_figures(inside, calib, sweep, precision_table(inventory_of_model(nf4[0])))
    assert set(figs) == set(TF.CAPTIONS)
    for name, fig in figs.items():
        layout = fig.to_dict()["layout"]
        assert layout["title"]["text"], name
        axes = [v for k, v in layout.items() if k.startswith(("xaxis", "yaxis"))]
        assert axes and all(a.get("title", {}).get("text") for a in axes), name
        assert any(t.name for t in fig.data if t.showlegend is not False), name
    written = TF.write_figures(figs, tmp_path / "out", markdown=how_it_works_markdown(8))
    assert {p.name for p in written.html} == {f"{n}.html" for n in figs} | {"index.html"}
    page = (tmp_path / "out" / "weights.html").read_text()
    assert '<script src="plotly.min.js">' in page and "cdn.plot.ly" not in page and TF.CAPTIONS["weights"][:40] in page
    assert (tmp_path / "out" / "plotly.min.js").stat().st_size > 1_000_000
    try:
        import kaleido  # noqa: F401
    except ImportError:
        assert not written.png and any("kaleido" in n for n in written.notes)


def test_how_it_works_explains_every_plot():
    text = how_it_works_markdown(16)
    assert text.count("$$") % 2 == 0 and text.count("$$") >= 8
    for plot in ("Inside a layer", "Quantization error", "Singular values", "rank-k correction removes",
                 "Input channels that dominate H", "Calibrated error against LoRA rank", "Memory of the weights"):
        assert plot in text, plot


def test_views_cli_writes_every_figure(tiny_model_dir, tmp_path, capsys):
    from helpers import TINY_TEXT

    from quailora_app.cli import main

    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(TINY_TEXT * 10))
    out = tmp_path / "views"
    common = ["views", "--model", str(tiny_model_dir), "--dataset", str(data), "--seq-len", "16",
              "--calib-samples", "4", "--eval-tokens", "64"]
    code = main([*common, "--layer", "model.layers.0.self_attn.o_proj", "--rank", "4", "--ranks", "1", "4",
                 "--out", str(out)])
    assert code == 0
    assert {p.stem for p in out.glob("*.html")} == set(TF.CAPTIONS) | {"index"}
    assert (out / "how_it_works.md").exists() and (out / "precision_table.md").exists()
    assert "index.html" in capsys.readouterr().out
    assert main([*common, "--layer", "model.layers.9.mlp.down_proj", "--out", str(tmp_path / "bad")]) == 2


def test_harm_gain_figure_has_a_trace_per_group_and_the_fitted_slope(tmp_path):
    """Three hand-made points: two of one model and text, one of another; the line through the origin has slope
    sum xy / sum x^2 = (1*0.8 + 2*1.6 + 4*2.8) / (1 + 4 + 16) = 15.2 / 21."""
    points = [{"model": "A", "text": "t", "rank": 8, "harm": 1.0, "gain": 0.8, "log_harm": 0.1, "log_gain": 0.08},
              {"model": "A", "text": "t", "rank": 16, "harm": 2.0, "gain": 1.6, "log_harm": 0.2, "log_gain": 0.16},
              {"model": "B", "text": "t", "rank": 8, "harm": 4.0, "gain": 2.8, "log_harm": 0.4, "log_gain": 0.28}]
    fit = TF.fit_through_origin([p["harm"] for p in points], [p["gain"] for p in points])
    assert fit.slope == pytest.approx(15.2 / 21)
    residual = sum((p["gain"] - fit.slope * p["harm"]) ** 2 for p in points)
    mean = sum(p["gain"] for p in points) / 3
    assert fit.r2 == pytest.approx(1 - residual / sum((p["gain"] - mean) ** 2 for p in points))
    assert fit.r2_uncentred == pytest.approx(1 - residual / sum(p["gain"] ** 2 for p in points))
    fig = TF.harm_gain_figure(points)
    names = [t.name for t in fig.data]
    assert names[:2] == ["A / t", "B / t"]
    assert list(fig.data[0].x) == [1.0, 2.0] and list(fig.data[0].y) == [0.8, 1.6]
    assert list(fig.data[0].text) == ["r=8", "r=16"]
    assert names[2].startswith("gain = harm")
    line = fig.data[3]
    assert line.name.startswith(f"fit through the origin: gain = {15.2 / 21:.2f} x harm")
    assert line.y[1] / line.x[1] == pytest.approx(15.2 / 21)
    assert line.x[0] == 0 and line.y[0] == 0
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    # the scatter JSON's mapping works as well, and the log scale reads the log keys (a tenth of each: the same slope)
    relative = TF.harm_gain_figure({"points": points}, relative=True)
    assert list(relative.data[1].x) == [0.4]
    assert relative.data[3].y[1] / relative.data[3].x[1] == pytest.approx(15.2 / 21)
    assert len(TF.harm_gain_figure([]).data) == 0
    # the shipped scatter's loader: a missing or broken file is an empty scatter, a written one reads back
    assert TF.paper_scatter(tmp_path / "none.json") == {"points": []}
    (tmp_path / "bad.json").write_text("{")
    assert TF.paper_scatter(tmp_path / "bad.json") == {"points": []}
    (tmp_path / "ok.json").write_text(json.dumps({"points": points, "fits": {}}))
    assert len(TF.harm_gain_figure(TF.paper_scatter(tmp_path / "ok.json")).data) == 4
    if TF.PAPER_SCATTER.is_file():  # what bench/paper_table.py shipped draws
        shipped = TF.paper_scatter()
        assert shipped["points"] and len(TF.harm_gain_figure(shipped).data) >= 3
