"""The trade-off frontier of an across-bits run (flows/bits.py): memory per linear weight against held-out
perplexity, one line per initialization through the bases it was measured on, and the bit widths as points of the
harm-against-gain scatter."""
from __future__ import annotations

import math
from collections.abc import Mapping

import plotly.graph_objects as go

from quailora_app.engine.methods.registry import QLORA, find_method
from quailora_app.plots.figures import empty_figure, figure_layout

TITLE = "Memory against quality"
NO_CORRECTION = "no correction"
_SYMBOLS = {"hqq": "circle", "bitsandbytes": "square"}


def _method_label(method: str) -> str:
    if method == QLORA:
        return NO_CORRECTION
    found = find_method(method)
    return f"+ {found.short} (rank-r correction)" if found else method


def _short(method: str) -> str:
    found = find_method(method)
    return found.short if found else method


def _colour(method: str) -> str:
    found = find_method(method)
    return found.colour if found else "#555"


def frontier_figure(report: Mapping | None) -> go.Figure:
    """x: memory per linear weight in bits (codes, scales, zeros, nested statistics and, for a corrected point, the
    adapter); y: held-out perplexity, log axis. One line per initialization through the HQQ bases (circles, by
    bits), bitsandbytes' bases as squares beside them; full precision as a dashed line. (The run's one-line reading,
    report["reading"], is shown beside the figure: a line of text that long does not fit a narrow figure.)"""
    points = list((report or {}).get("points", {}).values())
    if not points:
        return empty_figure(TITLE, "run 'Across bits' (or python -m quailora_app bits) to draw the frontier", 460)
    fig = go.Figure()
    methods = list(dict.fromkeys(p["method"] for p in points))
    for method in methods:
        for quantizer in ("hqq", "bitsandbytes"):
            group = sorted((p for p in points if p["method"] == method and p["quantizer"] == quantizer),
                           key=lambda p: p["bits_per_weight"])
            if not group:
                continue
            name = _method_label(method) + ("" if quantizer == "hqq" else " (bitsandbytes)")
            fig.add_trace(go.Scatter(
                x=[p["bits_per_weight"] for p in group], y=[p["perplexity"] for p in group],
                mode="lines+markers" if quantizer == "hqq" else "markers", name=name,
                line={"color": _colour(method), "dash": "dot" if method == QLORA else "solid"},
                marker={"symbol": _SYMBOLS[quantizer], "size": 10, "color": _colour(method),
                        "line": {"width": 1, "color": "white"}},
                text=[p["label"] for p in group],
                customdata=[[p.get("quantized_bits_per_weight", p["bits_per_weight"]),
                             p.get("adapter_bits_per_weight", 0.0)] for p in group],
                hovertemplate=("%{text}<br>" + _method_label(method) + "<br>perplexity %{y:.2f}<br>%{x:.2f} bits "
                               "per weight (%{customdata[0]:.2f} quantized + %{customdata[1]:.2f} adapter)"
                               "<extra></extra>")))
    full = (report or {}).get("full")
    if full:
        fig.add_hline(y=full, line={"color": "#4d4d4d", "dash": "dash", "width": 1})
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"full precision ({full:.1f})",
                                 line={"color": "#4d4d4d", "dash": "dash", "width": 1}))
    hqq_bits = sorted({p["bits"] for p in points if p["quantizer"] == "hqq"})
    bnb = sorted({p["label"].split(" (")[0] for p in points if p["quantizer"] == "bitsandbytes"})
    fig.update_xaxes(title_text="memory per linear weight (bits, with scales, zeros and the adapter)")
    values = [p["perplexity"] for p in points] + ([full] if full else [])
    low, high = min(values), max(values)
    fig.update_yaxes(title_text="held-out perplexity (log)", type="log",
                     range=[math.log10(low) - 0.05, math.log10(high) + 0.1])
    parts = ([f"HQQ at {', '.join(map(str, hqq_bits))} bits (circles)"] if hqq_bits else []) + \
        ([f"{', '.join(bnb)} (squares)"] if bnb else [])
    title = f"{TITLE}: {'; '.join(parts)}; rank {(report or {}).get('rank', '?')}"
    return figure_layout(fig, title, 480, legend_rows=2)


def bits_harm_gain_points(report: Mapping | None) -> list[dict]:
    """The bit widths of an across-bits run as points of the harm-against-gain scatter (plots/teaching.
    harm_gain_figure): per base, harm = ppl_plain - ppl_full (what quantizing to those bits costs) and gain =
    ppl_plain - ppl_best (what the best correction wins back), with their log-ratio forms."""
    report = report or {}
    full = report.get("full")
    points = list(report.get("points", {}).values())
    out = []
    for base in dict.fromkeys(p["base"] for p in points):
        plain = next((p for p in points if p["base"] == base and p["method"] == QLORA), None)
        corrected = [p for p in points if p["base"] == base and p["method"] != QLORA]
        if plain is None or not corrected or not full:
            continue
        best = min(corrected, key=lambda p: p["perplexity"])
        out.append({"model": str(report.get("model", "")), "text": plain["label"].split(" (")[0],
                    "rank": report.get("rank"), "method": _short(best["method"]),
                    "harm": plain["perplexity"] - full,
                    "gain": plain["perplexity"] - best["perplexity"],
                    "log_harm": math.log(plain["perplexity"] / full),
                    "log_gain": math.log(plain["perplexity"] / best["perplexity"])})
    return out


FRONTIER_HEADER = ["base", "correction", "bits / weight", "perplexity", "gap closed"]


def frontier_rows(report: Mapping | None) -> list[list]:
    """The frontier's points as table rows, by base then method: base (its label), correction, memory per linear
    weight in bits (with the adapter), held-out perplexity, and the share of the gap between the plain base and full
    precision the correction closes ("" for the plain base, and where the plain base is not above full
    precision); full precision last."""
    report = report or {}
    points = list(report.get("points", {}).values())
    full = report.get("full")
    rows = []
    for base in dict.fromkeys(p["base"] for p in points):
        group = [p for p in points if p["base"] == base]
        plain = next((p for p in group if p["method"] == QLORA), None)
        for p in group:
            gap = ""
            if p["method"] != QLORA and plain is not None and full and plain["perplexity"] > full:
                gap = f"{100 * (plain['perplexity'] - p['perplexity']) / (plain['perplexity'] - full):.1f}%"
            label = _method_label(p["method"]).removesuffix(" (rank-r correction)")
            rows.append([p["label"], label, round(p["bits_per_weight"], 2), _rounded(p["perplexity"]), gap])
    if full:
        rows.append(["full precision", "", "16 / 32", _rounded(full), ""])
    return rows


def _rounded(perplexity: float) -> float:
    return round(perplexity, 2) if perplexity < 1e4 else round(perplexity)
