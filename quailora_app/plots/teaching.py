"""Plotly figures for the teaching views (numbers from `teaching`), and their export to HTML / PNG.

No gradio here. Each figure function takes one result object of `teaching` and returns a go.Figure with a title,
axis titles with units and a legend; `CAPTIONS[name]` is the one line to print under figure `name`.
`write_figures` writes them as offline HTML (plotly.js copied once beside them) and as PNG where kaleido is
installed.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.offline
from plotly.subplots import make_subplots

from quailora_app.engine.methods.registry import QLORA, find_method
from quailora_app.errors import one_line
from quailora_app.teaching.how_it_works import how_it_works_markdown
from quailora_app.teaching.layer_views import CalibrationView, InsideLayer
from quailora_app.teaching.precision import PrecisionTable
from quailora_app.teaching.rank_sweep import RankSweep
from quailora_app.teaching.views import Views
from quailora_app.units import MIB

_NEUTRAL = "#555"  # anything the method registry does not know

CAPTIONS = {
    "weights": "Left: every weight of the layer (grey) and the 16 values one 4-bit block can store (its code table x "
               "the block's absmax, dotted). Right: that block's weights, each snapped to the nearest of its 16 "
               "levels.",
    "error": "Distribution of the quantization error E = W - Q before any correction (red) and what is left, E - C, "
             "after each rank-r LoRA initialization; the legend gives the share left in the weights and on real "
             "activations.",
    "spectrum": "Singular values of the error E (what an uncalibrated SVD sees) and of E H^1/2 (the error as the next "
                "layer feels it on calibration text), each relative to its largest: the faster a curve falls, the more "
                "of it the first r directions hold.",
    "energy": "Share of the calibrated error tr(E H E^T) a rank-k correction removes: the calibrated optimum (top-k "
              "directions of E H^1/2) against the SVD of E; markers: the actual rank-r initializations.",
    "channels": "Left: mean squared activation of each input channel (diag H), sorted; the title gives the top "
                "channels' share of the total. Right: share of the error left in the weight columns of those channels "
                "after each initialization (calibrated methods spend their rank where the activations are large).",
    "rank_sweep": "Calibrated error (1.0 = plain QLoRA, lower is better) against LoRA rank, averaged over the chosen "
                  "layers; right panel (when computed): held-out perplexity of the 4-bit model + each initialization.",
    "precision": "Left: bits each linear-layer weight really costs in bitsandbytes' storage (codes, block scales, "
                 "nested statistics, code tables, LoRA adapter). Right, on the same rows: held-out perplexity from "
                 "init runs, labelled with the whole model's weight memory.",
}
#: the caption of the harm-vs-gain scatter (across runs, from bench/paper_table.py; not a view of one layer)
HARM_GAIN_CAPTION = ("Each point: one model, text and LoRA rank (bigger: higher rank, 8 / 16 / 64). x: how much "
                     "4-bit quantization raises held-out perplexity over 8-bit; y: how much of that QuAILoRA's "
                     "initialization takes back. A line through the origin with a high R^2 is the paper's claim that "
                     "the gain is proportional to the harm; its slope is the share of the 8-bit gap closed.")


def label(name: str) -> str:
    """The method's legend in the teaching views (engine/methods/registry.py)."""
    method = find_method(name)
    return method.legend if method else name


def colour(name: str) -> str:
    method = find_method(name)
    return method.colour if method else _NEUTRAL


def dash(name: str) -> str | None:
    method = find_method(name)
    return method.dash if method else None


def marker(name: str) -> str:
    method = find_method(name)
    return method.marker if method else "circle"


def _open(name: str) -> bool:
    """An open marker: drawn larger and last, so that it rings the others' markers at the same point."""
    return marker(name).endswith("-open")


def _layout(fig: go.Figure, title: str, height: int, top: int = 60) -> go.Figure:
    """Title top left, white template; the legend in rows at the bottom of the figure, under the axes' tick labels
    and titles, and every axis making room for its tick labels and title (automargin): no text covers another at
    any page width. The legend is anchored to the figure (container), so plotly reserves the rows it really takes
    at the page's width (more on a narrow page) and the axes' labels sit above them. `top`: room for the title (more
    with subplot titles under it: 75 for one line of them)."""
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 1, "yanchor": "top", "pad": {"t": 14},
               "font": {"size": 16}},
        template="plotly_white", height=height, margin={"l": 70, "r": 30, "t": top, "b": 8},
        legend={"orientation": "h", "xref": "container", "x": 0.01, "xanchor": "left", "yref": "container", "y": 0,
                "yanchor": "bottom"},
        hovermode="closest", font={"size": 12},
    )
    fig.update_annotations(font={"size": 12})
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def _rank_marker(fig: go.Figure, x: float, text: str, y_range: tuple[float, float], log_y: bool = False) -> None:
    """A dotted vertical line at rank x drawn as a trace (shapes on log axes would need log coordinates)."""
    fig.add_trace(go.Scatter(x=[x, x], y=list(y_range), mode="lines", name=text, showlegend=False,
                             line={"color": "#555", "dash": "dot", "width": 1}, hoverinfo="skip"))
    fig.add_annotation(x=np.log10(x), y=np.log10(y_range[1]) if log_y else y_range[1], text=text, showarrow=False,
                       xanchor="left", yanchor="top", xshift=3, font={"size": 11, "color": "#555"})


def _log_range(n: int) -> list[float]:
    return [np.log10(0.9), np.log10(max(n, 2) * 1.1)]


def _short(layer: str) -> str:
    return layer.replace("model.layers.", "block ").replace(".self_attn.", " ").replace(".mlp.", " ")


# ================================================================================================ view 1
def weights_figure(view: InsideLayer) -> go.Figure:
    """Histogram of the layer's weights with the 16 levels of one block; the block's weights and their 4-bit values."""
    q = view.quant_type.upper()
    title = f"Inside {view.layer}: its weights and the {q} grid of block {view.block}"
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.09,
                        subplot_titles=[f"all {view.weights.total:,} weights of the layer "
                                        f"({view.shape[0]} x {view.shape[1]})",
                                        f"block {view.block}: {len(view.block_weights)} weights, "
                                        f"absmax {view.block_absmax:.3g}"])
    h = view.weights
    fig.add_trace(go.Bar(x=h.centers, y=h.counts, width=h.width, name="weights of the layer", marker_color="#9e9e9e",
                         hovertemplate="weight %{x:.4f}: %{y:,} weights<extra></extra>"), row=1, col=1)
    top = float(h.counts.max())
    for i, level in enumerate(view.levels):
        fig.add_trace(go.Scatter(
            x=[level, level], y=[0.8, top * 1.5], mode="lines", name=f"the 16 {q} levels of block {view.block}",
            legendgroup="levels", showlegend=i == 0, line={"color": "#1f77b4", "dash": "dot", "width": 1.3},
            hovertemplate=f"level {i + 1} of 16: {level:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=view.block_weights, y=np.full(len(view.block_weights), 0.9), mode="markers",
        name=f"weights of block {view.block}",
        marker={"symbol": "line-ns-open", "size": 12, "color": "#d62728", "line": {"width": 1.5}},
        hovertemplate="W = %{x:.4f}<extra></extra>"), row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="number of weights (log scale)", row=1, col=1)
    fig.update_xaxes(title_text="weight value", row=1, col=1)
    # right: the quantization function on the block
    lo, hi = float(view.levels.min()), float(view.levels.max())
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="no error (Q = W)", showlegend=True,
                             line={"color": "#bbb", "width": 1}, hoverinfo="skip"), row=1, col=2)
    for level in view.levels:
        fig.add_trace(go.Scatter(x=[lo, hi], y=[level, level], mode="lines", legendgroup="levels", showlegend=False,
                                 line={"color": "#1f77b4", "dash": "dot", "width": 0.8}, hoverinfo="skip"),
                      row=1, col=2)
    fig.add_trace(go.Scatter(
        x=view.block_weights, y=view.block_quantized, mode="markers",
        name=f"block {view.block}: W -> its 4-bit value Q",
        marker={"color": "#d62728", "size": 7},
        hovertemplate="W = %{x:.4f} -> Q = %{y:.4f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="full-precision weight W", row=1, col=2)
    fig.update_yaxes(title_text="4-bit weight Q = code x absmax", row=1, col=2)
    return _layout(fig, title, 500, top=75)


def error_figure(view: InsideLayer) -> go.Figure:
    """Histograms (as step lines on shared bins) of E and of E - C for each method."""
    title = f"The error E = W - Q of {view.layer} and what a rank-{view.rank} correction leaves"
    fig = go.Figure()
    for name, h in view.error.items():
        left = (f"{100 * view.weight_error[name]:.1f}% of the error left in the weights, "
                f"{100 * view.calibrated_error[name]:.1f}% on activations")
        legend = "E (no correction): " + left if name == QLORA else f"E - C, {label(name)}: {left}"
        fig.add_trace(go.Scatter(
            x=h.centers, y=h.counts, mode="lines", line_shape="hvh", name=legend,
            line={"color": colour(name), "width": 2.2 if name == QLORA else 1.6, "dash": dash(name)},
            hovertemplate=f"{label(name)}<br>error %{{x:.2e}}: %{{y:,}} weights<extra></extra>"))
    base = view.error[QLORA]
    cum = np.cumsum(base.counts) / max(base.total, 1)
    lo = base.edges[int(np.searchsorted(cum, 0.0005))]
    hi = base.edges[min(int(np.searchsorted(cum, 0.9995)) + 1, len(base.edges) - 1)]
    reach = max(abs(lo), abs(hi))
    fig.update_xaxes(title_text="error per weight (same units as the weights; central 99.9% shown, zoom out for the "
                                "tails)", range=[-reach, reach])
    fig.update_yaxes(title_text="number of weights")
    return _layout(fig, title, 520)


# ================================================================================================ view 2
def spectrum_figure(view: CalibrationView) -> go.Figure:
    title = f"Singular values of E and E H½ for {view.layer}"
    fig = go.Figure()
    for name, values, tint in (
            ("E: the error in the weights (what SVD sees)", view.singular_plain, colour("svd")),
            ("E H½: the error on calibration activations", view.singular_weighted, colour("closed_form"))):
        rel = values / values[0] if values[0] > 0 else values
        fig.add_trace(go.Scatter(x=np.arange(1, len(rel) + 1), y=rel, mode="lines", name=name,
                                 line={"color": tint, "width": 2},
                                 hovertemplate="direction %{x}: %{y:.3g} of the largest<extra></extra>"))
    rel_min = min(float(np.min(v[v > 0] / v[0])) for v in (view.singular_plain, view.singular_weighted) if v[0] > 0)
    _rank_marker(fig, view.rank, f"r = {view.rank}", (rel_min, 1.0), log_y=True)
    fig.update_xaxes(title_text="singular direction k (largest first, log scale)", type="log",
                     range=_log_range(len(view.singular_plain)))
    fig.update_yaxes(title_text="singular value / largest (log scale)", type="log", dtick=1)
    return _layout(fig, title, 430)


def energy_figure(view: CalibrationView) -> go.Figure:
    title = f"Share of the error a rank-k correction removes, {view.layer}"
    k = np.arange(1, len(view.captured_calibrated_best) + 1)
    fig = go.Figure()
    curves = (
        ("calibrated optimum: top-k directions of E H½ (on activations)", view.captured_calibrated_best,
         colour("closed_form"), "solid"),
        ("SVD of E: its effect on activations", view.captured_calibrated_svd, colour("svd"), "solid"),
        ("SVD of E: its effect on the weights ||E||² (what it optimizes)", view.captured_weight_svd, "#7f7f7f", "dot"),
    )
    for name, y, tint, style in curves:
        fig.add_trace(go.Scatter(x=k, y=100 * y, mode="lines", name=name,
                                 line={"color": tint, "dash": style, "width": 2},
                                 hovertemplate="rank %{x}: %{y:.1f}% removed<extra></extra>"))
    for m, removed in view.removed_at_rank.items():
        fig.add_trace(go.Scatter(
            x=[view.rank], y=[100 * removed], mode="markers",
            name=f"{label(m)} at r = {view.rank}: {100 * removed:.1f}%",
            marker={"color": colour(m), "size": 11 if _open(m) else 8, "symbol": marker(m),
                    "line": {"width": 2, "color": colour(m)}},
            hovertemplate=f"{label(m)}: %{{y:.2f}}% of tr(E H Eᵀ) removed<extra></extra>"))
    _rank_marker(fig, view.rank, f"r = {view.rank}", (0, 100))
    fig.update_xaxes(title_text="rank k of the correction (log scale)", type="log", range=_log_range(len(k)))
    fig.update_yaxes(title_text="share of the squared error removed (%)", range=[0, 102])
    return _layout(fig, title, 520)


def channels_figure(view: CalibrationView) -> go.Figure:
    title = f"Input channels that dominate H, {view.layer}"
    k = len(view.top_channels)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], horizontal_spacing=0.1,
                        subplot_titles=[f"diag(H) of all {len(view.h_diag)} input channels, sorted "
                                        f"(top {k}: {100 * view.top_share:.0f}% of the total)",
                                        f"error left in the weight columns of the top {k} channels"])
    order = np.sort(view.h_diag)[::-1]
    rank = np.arange(1, len(order) + 1)
    fig.add_trace(go.Scatter(x=rank, y=order, mode="lines", name="all channels", line={"color": "#777", "width": 2},
                             hovertemplate="%{x}-th largest: %{y:.3g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=rank[:k], y=order[:k], mode="markers", name=f"top {k} channels", marker={"color": "#9467bd", "size": 7},
        text=[f"channel {c}" for c in view.top_channels],
        hovertemplate="%{text}: mean squared activation %{y:.3g}<extra></extra>"), row=1, col=1)
    fig.update_xaxes(title_text="channel, largest first (log scale)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="mean squared activation (log scale)", type="log", dtick=1, row=1, col=1)
    names = [f"ch {c}" for c in view.top_channels]
    for m, err in view.channel_error.items():
        if m == QLORA:
            continue
        fig.add_trace(go.Bar(x=names, y=100 * err, name=label(m), marker_color=colour(m),
                             hovertemplate=f"{label(m)}<br>%{{x}}: %{{y:.0f}}% of the column's error left"
                                           "<extra></extra>"),
                      row=1, col=2)
    fig.add_trace(go.Scatter(x=[names[0], names[-1]], y=[100, 100], mode="lines", name="QLoRA = 100% (no correction)",
                             line={"color": colour(QLORA), "dash": "dash", "width": 1}, hoverinfo="skip"), row=1, col=2)
    fig.update_xaxes(title_text="input channel (largest diag(H) first)", tickangle=-45, row=1, col=2)
    fig.update_yaxes(title_text="||(E - C)[:, j]|| / ||E[:, j]|| (%)", range=[0, 110], row=1, col=2)
    fig.update_layout(barmode="group", bargap=0.25)
    return _layout(fig, title, 500, top=75)


# ================================================================================================ view 3
def rank_sweep_figure(sweep: RankSweep) -> go.Figure:
    n = len(sweep.layers)
    what = _short(sweep.layers[0]) if n == 1 else f"mean over {n} layers"
    title = f"Calibrated error against LoRA rank ({what})"
    has_ppl = any(v for k, v in sweep.perplexity.items() if k != QLORA)
    fig = make_subplots(rows=1, cols=2 if has_ppl else 1, horizontal_spacing=0.1,
                        subplot_titles=(["calibrated error (1.0 = plain QLoRA)", "held-out perplexity"] if has_ppl
                                        else None))
    fig.add_trace(go.Scatter(x=[sweep.ranks[0], sweep.ranks[-1]], y=[1, 1], mode="lines", name=label(QLORA),
                             line={"color": colour(QLORA), "dash": "dash", "width": 1}, hoverinfo="skip"), row=1, col=1)
    order = sorted(sweep.calibrated_error, key=_open)  # open markers on top
    for m in order:
        ys = sweep.calibrated_error[m]
        fig.add_trace(go.Scatter(
            x=sweep.ranks, y=ys, mode="lines+markers", name=label(m), legendgroup=m,
            line={"color": colour(m), "dash": dash(m), "width": 2},
            marker={"size": 11 if _open(m) else 7, "symbol": "circle-open" if _open(m) else "circle",
                    "line": {"width": 2, "color": colour(m)}},
            hovertemplate=f"{label(m)}<br>rank %{{x}}: calibrated error %{{y:.3f}}<extra></extra>"), row=1, col=1)
    for m, ys in sweep.weight_error.items():
        fig.add_trace(go.Scatter(
            x=sweep.ranks, y=ys, mode="lines", name=f"{label(m)}: error in the weights", legendgroup=m,
            visible="legendonly",
            line={"color": colour(m), "dash": "dot", "width": 1},
            hovertemplate=f"{label(m)}<br>rank %{{x}}: weight error %{{y:.3f}}<extra></extra>"), row=1, col=1)
    ticks = {"tickvals": sweep.ranks, "ticktext": [str(r) for r in sweep.ranks]}
    fig.update_xaxes(title_text="LoRA rank r (log scale)", type="log", **ticks)
    fig.update_yaxes(title_text="calibrated error (ratio to QLoRA)", range=[0, 1.05], row=1, col=1)
    if has_ppl:
        base = sweep.perplexity.get(QLORA, {}).get(0)
        for m, by_rank in sweep.perplexity.items():
            if m == QLORA or not by_rank:
                continue
            rs = sorted(by_rank)
            fig.add_trace(go.Scatter(
                x=rs, y=[by_rank[r] for r in rs], mode="lines+markers", name=label(m), legendgroup=m, showlegend=False,
                line={"color": colour(m), "dash": dash(m), "width": 2},
                hovertemplate=f"{label(m)}<br>rank %{{x}}: perplexity %{{y:.2f}}<extra></extra>"), row=1, col=2)
        if base is not None:
            fig.add_hline(y=base, line={"color": colour(QLORA), "dash": "dash", "width": 1}, row=1, col=2,
                          annotation_text=f"4-bit, no correction: {base:.2f}", annotation_position="top left")
        fig.update_yaxes(title_text="perplexity (lower is better)", row=1, col=2)
    return _layout(fig, title, 500, top=75 if has_ppl else 60)


# ================================================================================================ view 4
_PARTS = (("codes", "4-bit / 8-bit / 16-bit codes", "#1f77b4"), ("absmax", "block or row scales (absmax)", "#ff7f0e"),
          ("nested", "nested statistics (double quant)", "#2ca02c"), ("tables", "code tables (per layer)", "#9467bd"),
          ("adapter", "LoRA adapter (A, B in float32)", "#d62728"))


def precision_figure(table: PrecisionTable) -> go.Figure:
    """Left: the bits each linear-layer weight costs per storage format (stacked parts, the total beside each bar).
    Right, on the same rows: the held-out perplexity of the formats an init run measured, labelled with the whole
    model's weight memory (one label per row: two formats of about the same memory and perplexity never put one
    label on the other, as labels beside points of a memory x perplexity scatter would)."""
    title = "Memory of the weights against held-out perplexity"
    rated = [r for r in table.rows if r.perplexity is not None]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[f"bits per linear-layer weight<br>({table.linear_params / 1e6:,.1f} M weights)",
                                        "held-out perplexity<br>(" + ("weight memory of the whole model)" if rated
                                                                     else "no init report given)")])
    labels = [r.label for r in table.rows]
    for key, name, tint in _PARTS:
        xs = [8.0 * (r.adapter_bytes if key == "adapter" else r.breakdown.get(key, 0)) / max(table.linear_params, 1)
              for r in table.rows]
        if not any(xs):
            continue
        fig.add_trace(go.Bar(y=labels, x=xs, orientation="h", name=name, marker_color=tint,
                             hovertemplate=f"%{{y}}<br>{name}: %{{x:.3f}} bits per weight<extra></extra>"),
                      row=1, col=1)
    totals = [table.bits_per_param(r) for r in table.rows]
    fig.add_trace(go.Scatter(y=labels, x=totals, mode="text", text=[f"{t:.2f}" for t in totals],
                             textposition="middle right", cliponaxis=False, showlegend=False, hoverinfo="skip"),
                  row=1, col=1)
    fig.update_layout(barmode="stack", legend={"traceorder": "normal"})
    fig.update_xaxes(range=[0, max(totals) * 1.18], row=1, col=1)
    fig.update_yaxes(autorange="reversed", title_text="storage format", row=1, col=1)
    fig.update_xaxes(title_text="bits per weight<br>(linear layers)", row=1, col=1)
    if rated:
        ppl = [r.perplexity for r in rated]
        lo, hi = min(ppl), max(ppl)
        pad = 0.1 * (hi - lo or 1.0)
        fig.add_trace(go.Scatter(
            x=ppl, y=[r.label for r in rated], mode="markers+text", name="measured models", showlegend=False,
            text=[f"{r.perplexity:.2f} ({r.total_bytes / MIB:,.0f} MiB)" for r in rated],
            # each label runs into the panel, away from its edges
            textposition=["top center" if hi == lo else "middle right" if p <= (lo + hi) / 2 else "middle left"
                          for p in ppl],
            customdata=[r.total_bytes / MIB for r in rated], marker={"size": 11, "color": "#333"},
            hovertemplate="%{y}<br>perplexity %{x:.2f}, weights of the whole model %{customdata:.1f} MiB"
                          "<extra></extra>"), row=1, col=2)
        fig.update_xaxes(range=[lo - pad, hi + pad], row=1, col=2)
    else:
        # an empty panel: plotly draws no axes for it and places "x2 domain" notes on the page's left, over the
        # first panel's labels; so the note is placed in page coordinates at the middle of the panel's domain
        left, right = fig.layout.xaxis2.domain
        fig.add_annotation(text="measured models appear here<br>after an init run (step 2,<br>"
                                "or <i>python -m quailora_app init</i>)",
                           xref="paper", yref="paper", x=(left + right) / 2, y=0.5, showarrow=False,
                           font={"color": "#777"})
    fig.update_xaxes(title_text="perplexity<br>(lower is better)", row=1, col=2)
    fig.update_yaxes(title_text="storage format (rows as left)", side="right", row=1, col=2)
    return _layout(fig, title, 500, top=95)


# ===================================================================================== harm against gain
@dataclass(frozen=True)
class OriginFit:
    """y = slope * x fitted through the origin by least squares: slope = sum xy / sum x^2. r2 = 1 - SS_res / SS_tot
    with SS_tot about the mean of y (how much of the spread of y the line explains; negative when a flat line at
    the mean does better); r2_uncentred = 1 - SS_res / sum y^2, the figure usually quoted for lines through the
    origin (always higher)."""

    slope: float
    r2: float
    r2_uncentred: float
    n: int


def fit_through_origin(xs, ys) -> OriginFit:
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.size < 1 or not np.any(x):
        raise ValueError("a line through the origin needs as many x as y and some x other than 0")
    slope = float(x @ y / (x @ x))
    res = float(np.sum((y - slope * x) ** 2))
    tot = float(np.sum((y - y.mean()) ** 2))
    return OriginFit(slope, 1.0 - res / tot if tot > 0 else float("nan"),
                     1.0 - res / float(y @ y) if np.any(y) else float("nan"), int(x.size))


#: the scatter points bench/paper_table.py ships for the teaching views
PAPER_SCATTER = Path(__file__).resolve().parents[2] / "assets" / "paper_scatter.json"


def paper_scatter(path: str | Path | None = None) -> dict:
    """The shipped scatter (assets/paper_scatter.json: "points", "fits", "settings", "machine", "command"), or
    {"points": []} when it is missing or unreadable (harm_gain_figure then draws an empty panel with a note)."""
    try:
        data = json.loads(Path(path or PAPER_SCATTER).read_text())
    except (OSError, ValueError):
        return {"points": []}
    return data if isinstance(data, dict) and isinstance(data.get("points"), list) else {"points": []}


_GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_TEXT_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "x", "star")


def _rank_size(rank) -> float:
    """Marker size of a LoRA rank: 8 px at r = 8, 3 px more per doubling (points of one model and text share x,
    so a text label per rank would overlap)."""
    return 8 + 3 * math.log2(rank / 8) if isinstance(rank, (int, float)) and rank >= 1 else 10


def harm_gain_figure(points, relative: bool = False, bits: list[Mapping] | None = None) -> go.Figure:
    """The paper's "improvements proportional to the negative effect of quantization error", tested: each point is
    one model, text and rank (bench/paper_table.py; assets/paper_scatter.json holds them), x = the harm of 4-bit
    (ppl_qlora - ppl_int8), y = the gain of QuAILoRA (ppl_qlora - ppl_quailora); with `relative`, the logs of
    those perplexity ratios (log_harm, log_gain). One trace per model (colour) and text (marker), the size of a
    point its rank (its hover text "r=16"); the least-squares line through the origin (its slope is the typical
    share of the 8-bit gap closed) with R^2 in its name; and gain = harm (all of it closed), dotted. `points`: the
    list of point dicts or the scatter JSON's mapping with a "points" list.

    `bits`: the bit widths of an across-bits run (plots/frontier.bits_harm_gain_points: harm = ppl of the plain base
    - ppl full precision, gain = what its best correction wins back), one labelled trace of their own ("HQQ 2-bit"
    beside each marker), left out of the fit. Their harms span orders of magnitude (a collapsed 2-bit model), so with
    them both axes are logarithmic (when every value is positive; the lines stay straight there)."""
    if isinstance(points, Mapping):
        points = points.get("points") or []
    points = list(points)
    xk, yk = ("log_harm", "log_gain") if relative else ("harm", "gain")
    unit = "ln(ppl ratio)" if relative else "perplexity"
    fig = go.Figure()
    models = list(dict.fromkeys(str(p.get("model", "")) for p in points))
    texts = list(dict.fromkeys(str(p.get("text", "")) for p in points))
    for model in models:
        for text in texts:
            group = [p for p in points if str(p.get("model", "")) == model and str(p.get("text", "")) == text]
            if not group:
                continue
            name = " / ".join(part for part in (model, text) if part) or "runs"
            fig.add_trace(go.Scatter(
                x=[p[xk] for p in group], y=[p[yk] for p in group], mode="markers", name=name,
                text=[f"r={p['rank']}" if "rank" in p else "" for p in group],
                marker={"size": [_rank_size(p.get("rank")) for p in group],
                        "color": _GROUP_COLOURS[models.index(model) % len(_GROUP_COLOURS)],
                        "symbol": _TEXT_SYMBOLS[texts.index(text) % len(_TEXT_SYMBOLS)],
                        "line": {"width": 1, "color": "white"}},
                hovertemplate=f"{name}<br>%{{text}}<br>harm %{{x:.3f}}, gain %{{y:.3f}} ({unit})<extra></extra>"))
    bits = [b for b in (bits or []) if xk in b and yk in b]
    if bits:
        return _with_bit_widths(fig, points, bits, xk, yk, unit, relative)
    title = "Gain of QuAILoRA against the harm of 4-bit quantization"
    if points:
        top = max(max(p[xk] for p in points), max(p[yk] for p in points), 0.0) * 1.1 or 1.0
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="gain = harm (all of the 8-bit gap)",
                                 line={"color": "#999", "dash": "dot", "width": 1}, hoverinfo="skip"))
        if len(points) >= 2 and any(p[xk] for p in points):
            fit = fit_through_origin([p[xk] for p in points], [p[yk] for p in points])
            fig.add_trace(go.Scatter(
                x=[0, top], y=[0, fit.slope * top], mode="lines", line={"color": "#333", "width": 2},
                name=f"fit through the origin: gain = {fit.slope:.2f} x harm, R^2 = {fit.r2:.2f} (n = {fit.n})",
                hoverinfo="skip"))
            title += f": slope {fit.slope:.2f}, R^2 {fit.r2:.2f}"
        # the ranges start a little below 0: the two axes' "0" labels then never meet in the corner
        fig.update_xaxes(range=[-0.04 * top, top])
        fig.update_yaxes(range=[min(0.0, min(p[yk] for p in points) * 1.1) - 0.04 * top, top])
    else:
        fig.add_annotation(text="no points yet: run <i>python -m bench.paper_table</i>", xref="paper", yref="paper",
                           x=0.5, y=0.5, showarrow=False, font={"color": "#777"})
    fig.update_xaxes(title_text=("harm of 4-bit: ln(ppl 4-bit / ppl 8-bit)" if relative
                                 else "harm of 4-bit: ppl 4-bit - ppl 8-bit"))
    fig.update_yaxes(title_text=("gain of QuAILoRA: ln(ppl 4-bit / ppl QuAILoRA)" if relative
                                 else "gain of QuAILoRA: ppl 4-bit - ppl QuAILoRA"))
    return _layout(fig, title, 500)


def _with_bit_widths(fig: go.Figure, points: list, bits: list, xk: str, yk: str, unit: str,
                     relative: bool) -> go.Figure:
    """harm_gain_figure with an across-bits run's bit widths: their trace (labelled markers), the fit of the runs'
    points alone, gain = harm; log axes when every value is positive."""
    fig.add_trace(go.Scatter(
        x=[b[xk] for b in bits], y=[b[yk] for b in bits], mode="markers+text", name="bit widths (across bits: "
        "plain base vs full precision, best correction)", text=[str(b.get("text", "")) for b in bits],
        textposition="middle right", textfont={"size": 11, "color": "#444"},
        marker={"size": 12, "symbol": "hexagon", "color": "#444", "line": {"width": 1, "color": "white"}},
        customdata=[[b.get("rank"), str(b.get("method", "best"))] for b in bits],
        hovertemplate=f"%{{text}} (r=%{{customdata[0]}}, %{{customdata[1]}})<br>harm %{{x:.3f}}, gain %{{y:.3f}} "
                      f"({unit})<extra></extra>"))
    values = [p[k] for p in [*points, *bits] for k in (xk, yk)]
    log = all(v > 0 for v in values)
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    ends = [low / 2, high * 2] if log else [0, max(high, 0.0) * 1.1 or 1.0]
    fig.add_trace(go.Scatter(x=ends, y=ends, mode="lines", name="gain = harm (all of it back)",
                             line={"color": "#999", "dash": "dot", "width": 1}, hoverinfo="skip"))
    title = "Gain against harm: the runs' 4-bit (vs 8-bit) and the bit widths (vs full precision)"
    if len(points) >= 2 and any(p[xk] for p in points):
        fit = fit_through_origin([p[xk] for p in points], [p[yk] for p in points])
        fig.add_trace(go.Scatter(
            x=ends, y=[fit.slope * e for e in ends], mode="lines", line={"color": "#333", "width": 2},
            name=f"fit through the origin of the runs: gain = {fit.slope:.2f} x harm, R^2 = {fit.r2:.2f} "
                 f"(n = {fit.n})", hoverinfo="skip"))
    if log:
        fig.update_xaxes(type="log", range=[math.log10(low) - 0.15, math.log10(high) + 0.45])
        fig.update_yaxes(type="log", range=[math.log10(low) - 0.15, math.log10(high) + 0.15])
    what = "ln(ppl ratio)" if relative else "perplexity"
    fig.update_xaxes(title_text=f"harm of quantization ({what}{', log axis' if log else ''})")
    fig.update_yaxes(title_text=f"gain of the correction ({what}{', log axis' if log else ''})")
    return _layout(fig, title, 520)


# ============================================================================================ all + export
def view_figures(inside: InsideLayer | None = None, calibration: CalibrationView | None = None,
                 sweep: RankSweep | None = None, precision: PrecisionTable | None = None) -> dict[str, go.Figure]:
    """Every figure whose view is given, keyed like CAPTIONS."""
    figs: dict[str, go.Figure] = {}
    if inside is not None:
        figs["weights"] = weights_figure(inside)
        figs["error"] = error_figure(inside)
    if calibration is not None:
        figs["spectrum"] = spectrum_figure(calibration)
        figs["energy"] = energy_figure(calibration)
        figs["channels"] = channels_figure(calibration)
    if sweep is not None:
        figs["rank_sweep"] = rank_sweep_figure(sweep)
    if precision is not None:
        figs["precision"] = precision_figure(precision)
    return figs


@dataclass
class Written:
    html: list[Path] = field(default_factory=list)
    png: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title><script src="plotly.min.js"></script>
<style>body{{font-family:sans-serif;max-width:1250px;margin:1em auto}}
p.caption{{color:#444;margin:0.2em 1em 2em}}</style>
</head><body>
{body}
</body></html>
"""


def write_figures(figs: Mapping[str, go.Figure], out: str | Path, *, markdown: str | None = None,
                  extra_text: Mapping[str, str] | None = None, png: bool = True) -> Written:
    """Write each figure as <name>.html (offline: plotly.min.js is written once into `out`), an index.html with
    every figure and its caption, how_it_works.md when `markdown` is given, and <name>.png when kaleido is
    installed (skipped with a note otherwise). `extra_text`: name -> text to write as <name>.md (e.g. a table)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = Written()
    (out / "plotly.min.js").write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
    blocks = []
    for name, fig in figs.items():
        div = fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})
        caption = f'<p class="caption">{html.escape(CAPTIONS.get(name, ""))}</p>'
        title = fig.layout.title.text or name
        path = out / f"{name}.html"
        path.write_text(_PAGE.format(title=html.escape(title), body=div + caption), encoding="utf-8")
        result.html.append(path)
        blocks.append(div + caption)
    index = out / "index.html"
    index.write_text(_PAGE.format(title="QuAILoRA Studio: teaching views", body="\n".join(blocks)), encoding="utf-8")
    result.html.append(index)
    if markdown:
        (out / "how_it_works.md").write_text(markdown + "\n", encoding="utf-8")
    for name, text in (extra_text or {}).items():
        (out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    if png:
        try:
            import kaleido  # noqa: F401
        except ImportError:
            result.notes.append("PNG files skipped: the static image renderer kaleido is not installed "
                                "(pip install kaleido)")
        else:
            for name, fig in figs.items():
                try:
                    path = out / f"{name}.png"
                    fig.write_image(path, width=1200, height=fig.layout.height or 500, scale=1)
                    result.png.append(path)
                except Exception as exc:  # noqa: BLE001 - kaleido needs a browser; a missing one is not fatal
                    result.notes.append(f"PNG files skipped: kaleido could not render ({one_line(exc, 160)})")
                    break
    return result


def write_views(views: Views, out: str | Path, png: bool = True) -> Written:
    """All figures of a teaching.Views bundle, how_it_works.md and precision_table.md into `out`."""
    figs = view_figures(views.inside, views.calibration, views.sweep, views.precision)
    table = views.precision.markdown() + "".join(f"\n\nnote: {n}" for n in views.precision.notes)
    return write_figures(figs, out, markdown=how_it_works_markdown(views.rank), extra_text={"precision_table": table},
                         png=png)
