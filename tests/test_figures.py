"""Figures from a synthetic report and event list: every figure has a title, axis titles, a legend, and the
numbers it shows are the report's."""
from __future__ import annotations

import json

import pytest

from quailora_app.plots import figures as F

MODULES = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]


def make_report(blocks: int = 3) -> dict:
    layers = []
    for b in range(blocks):
        for i, m in enumerate(MODULES):
            calib = {"qlora": 1.0, "svd": 0.9 - 0.01 * b, "quailora": 0.6 - 0.02 * i}
            weight = {"qlora": 1.0, "svd": 0.8, "quailora": 0.95}
            layers.append({"name": f"model.layers.{b}.{m}", "block": b, "module": m, "shape": [64, 64],
                           "weight_error": weight, "calibrated_error": calib})
    return {"model": "tiny", "dataset": "t.txt", "device": "cpu", "rank": 8, "alpha": 16,
            "methods": ["qlora", "svd", "quailora"], "layers": layers,
            "perplexity": {"full": 50.0, "int8": 51.0, "qlora": 60.0, "svd": 59.0, "quailora": 55.0},
            "gap_closed": {"qlora": 0.0, "svd": 1 / 9, "quailora": 5 / 9}, "gap_closed_full": {"quailora": 0.5},
            "seconds": {"svd": 0.5, "quailora": 2.0}, "unavailable": {}, "model_note": "note"}


def titles(fig) -> tuple[str, list[str], list[str]]:
    layout = fig.to_dict()["layout"]
    xs = [v["title"]["text"] for k, v in layout.items() if k.startswith("xaxis") and v.get("title", {}).get("text")]
    ys = [v["title"]["text"] for k, v in layout.items() if k.startswith("yaxis") and v.get("title", {}).get("text")]
    return layout["title"]["text"], xs, ys


def legend_names(fig) -> list[str]:
    return [t.name for t in fig.data if t.showlegend is not False and t.name]


def test_layer_error_figure_panels_per_module_and_both_error_kinds():
    fig = F.layer_error_figure(make_report())
    title, xs, ys = titles(fig)
    assert "1.0 = plain QLoRA" in title
    assert any("decoder block" in x for x in xs) and len(ys) == 2
    names = legend_names(fig)
    assert F.label("svd") in names and F.label("quailora") in names and any("QLoRA = 1.0" in n for n in names)
    # 2 rows x 3 module panels, each with svd, quailora and the 1.0 line
    assert len(fig.data) == 2 * 3 * 3
    quailora_q = [t for t in fig.data if t.name == F.label("quailora") and t.xaxis in ("x", "x1")][0]
    assert list(quailora_q.y) == pytest.approx([0.6, 0.6, 0.6])
    json.loads(fig.to_json())


def test_layer_error_figure_from_events_and_empty():
    report = make_report()
    events = [{"kind": "layer", **row} for row in report["layers"][:3]] + [{"kind": "progress"}]
    assert len(F.layer_error_figure(events).data) == 2 * 3 * 3
    empty = F.layer_error_figure([])
    assert not empty.data and empty.layout.title.text


def test_heatmap_is_share_removed():
    fig = F.removal_heatmap(make_report(), "quailora")
    title, xs, ys = titles(fig)
    assert "%" in title and xs and ys
    z = fig.data[0].z
    assert z[0][0] == pytest.approx(40.0) and z[2][2] == pytest.approx(100 * (1 - 0.56))
    assert fig.data[0].colorbar.ticksuffix == "%"


def test_the_heatmap_plot_keeps_one_colour_bar_orientation():
    """The init section's heatmap plot shows one panel (a live run's first layers), two (removal and the budgeted
    ranks) or a placeholder in turn; gradio redraws it with Plotly.react, which strands a colour bar's labels over
    the heatmap when its orientation changes (plotly.js 6973): every one of them keeps its colour bars below."""
    report = make_report()
    ranked = {**report, "ranks": {"budget": {row["name"]: 4 + i for i, row in enumerate(report["layers"])}}}
    figures = [F.removal_heatmap(report), F.rank_heatmap(ranked), F.init_heatmap(report), F.init_heatmap(ranked),
               F.init_heatmap({**ranked, "layers": [{k: v for k, v in row.items() if k != "calibrated_error"}
                                                    for row in ranked["layers"]]})]
    assert [len(f.data) for f in figures] == [1, 1, 1, 2, 1]
    for fig in figures:
        assert all(t.colorbar.orientation == "h" and t.colorbar.yanchor == "bottom" for t in fig.data)


def test_perplexity_bars_with_gap_closed():
    fig = F.perplexity_figure(make_report())
    title, xs, ys = titles(fig)
    assert "perplexity" in title.lower() and xs and ys
    names = [t.x[0] for t in fig.data]
    assert names[:3] == ["full precision", "8-bit", "QLoRA"]
    quailora = next(t for t in fig.data if t.x[0] == "QuAILoRA")
    assert quailora.y[0] == 55.0 and "gap closed 56%" in quailora.text[0]
    assert legend_names(fig)


def test_numbers_table_rows():
    rows = F.numbers_table(make_report())
    assert len(rows[0]) == len(F.NUMBERS_HEADER)
    by_name = {r[0]: r for r in rows}
    assert by_name[F.label("quailora")][3] == "55.00" and by_name[F.label("quailora")][4] == "56%"
    assert by_name[F.label("qlora")][1] == "1.000"


def train_events():
    ev = [{"kind": "metric", "name": "full", "value": 50.0}, {"kind": "metric", "name": "int8", "value": 51.0}]
    for arm in ("qlora4", "quailora4"):
        ev.append({"kind": "eval", "arm": arm, "step": 0, "val_perplexity": 60.0 if arm == "qlora4" else 55.0})
    for step in range(1, 5):
        for arm in ("qlora4", "quailora4"):
            ev.append({"kind": "train_step", "arm": arm, "step": step, "total_steps": 4, "train_loss": 4.0 - 0.1 * step,
                       "learning_rate": 2e-4, "tokens_per_s": 1000.0, "elapsed_s": 1.0, "memory_bytes": 2 ** 30})
    ev.append({"kind": "eval", "arm": "qlora4", "step": 4, "val_perplexity": 58.0})
    ev.append({"kind": "arm_finished", "arm": "qlora4", "final_perplexity": 58.0, "best_perplexity": 58.0,
               "seconds": 12.0, "adapter_dir": "x"})
    return ev


def test_train_figure_curves_and_reference_lines():
    fig = F.train_figure(train_events(), ["qlora4", "quailora4"])
    title, xs, ys = titles(fig)
    assert title and len(xs) == 2 and len(ys) == 2
    names = legend_names(fig)
    assert F.label("qlora4") in names and F.label("quailora4") in names
    assert any(n.startswith("full precision") for n in names) and any(n.startswith("8-bit") for n in names)
    q4 = next(t for t in fig.data if t.name == F.label("qlora4") and t.mode == "lines+markers")
    assert list(q4.x) == [0, 4] and list(q4.y) == [60.0, 58.0]


def test_train_table_and_ema():
    rows = F.train_table(train_events(), ["qlora4", "quailora4", "qlora8"])
    assert rows[0][1] == "4 / 4" and rows[0][2] == "1,000" and rows[0][3] == "1.00 GiB" and rows[0][6] == "12"
    assert rows[2][1] == "waiting"
    cpu = [{**e, "memory_how": "accounted"} if e["kind"] == "train_step" else e for e in train_events()]
    assert F.train_table(cpu, ["qlora4"])[0][3] == "1.00 GiB (accounted)"  # CPU memory says how it was had
    assert F.ema([1.0, 0.0], 0.5) == [1.0, 0.5]
    assert not F.train_figure([]).data
