"""Figures of a generate run (flows/generate.py): the token-level agreement strip, the top-10 next tokens at one
position, each corrected variant against plain 4-bit over held-out documents, and what survives deployment.

Inputs are report.json's dict (kind "generate"), complete or partial: a figure draws what is there.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from quailora_app.plots.figures import empty_figure, figure_layout, short_label

STRIP_TITLE = "Where each variant stops saying what full precision says"
TOP_TITLE = "Next-token probabilities"
VERSUS_TITLE = "Corrected vs plain 4-bit, held-out docs"
DEPLOY_TITLE = "What survives deployment"

CAPTIONS = {
    "strip": "Each cell is one token of full precision's continuation. Teacher-forced along it, the variant's most "
             "likely next token there is full precision's (green) or not (red); darker = larger KL(full || variant) "
             "at that position. Each row's label gives its top-1 agreement and mean KL.",
    "top10": "The ten most likely next tokens at the chosen position, after the same prefix (full precision's "
             "continuation so far), for full precision, plain 4-bit and the best corrected variant.",
    "versus": "Share of positions along held-out documents' own text where the corrected 4-bit model picks full "
              "precision's top-1 next token and plain 4-bit does not, and the reverse.",
    "deploy": "Held-out perplexity of one adapter shipped six ways (lower is better); dashed: full precision, dotted: "
              "plain 4-bit with no correction.",
}
#: the strip's colours: agreeing cells from light to dark green, others from light to dark red, by KL
STRIP_SCALE = [[0.0, "#d9f0d3"], [0.4999, "#1b7837"], [0.5, "#fddbc7"], [1.0, "#b2182b"]]
_DEPLOY_COLOURS = {"adapter_4bit": "#2ca02c", "merged": "#9467bd", "merged_requantized": "#d62728",
                   "adapter_reloaded": "#2ca02c", "merged_dequantized": "#17becf", "dequantized_requantized": "#ff9896"}


def _short(text: str, limit: int = 12) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def strip_values(agree: list[bool], kl: list[float], kl_max: float) -> list[float]:
    """One cell per position on STRIP_SCALE: agreeing in [0, 0.5), disagreeing in [0.5, 1], shaded by
    sqrt(KL / kl_max) (one large KL would otherwise leave every other cell pale)."""
    shade = [math.sqrt(min(1.0, k / kl_max)) if kl_max > 0 else 0.0 for k in kl]
    return [0.4999 * s if a else 0.5 + 0.5 * s for a, s in zip(agree, shade, strict=True)]


def _mix(a: str, b: str, t: float) -> str:
    """The colour a fraction `t` of the way from hex colour `a` to `b`."""
    ca, cb = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in (a, b))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb, strict=True))


def cell_colour(value: float) -> tuple[str, str]:
    """(background, text colour) of one strip cell of `strip_values` on STRIP_SCALE, as the HTML strip paints it:
    the same colours as the figure's."""
    if value < 0.5:
        shade = value / 0.4999
        background = _mix(STRIP_SCALE[0][1], STRIP_SCALE[1][1], min(1.0, shade))
    else:
        shade = (value - 0.5) / 0.5
        background = _mix(STRIP_SCALE[2][1], STRIP_SCALE[3][1], min(1.0, shade))
    return background, ("#ffffff" if shade > 0.55 else "#1a1a1a")


def agreement_strip(report: Mapping | None) -> go.Figure:
    """Rows: the variants but full precision; columns: the positions of full precision's continuation (its tokens as
    the column labels and in each cell); colour: top-1 agreement, shade: KL."""
    report = report or {}
    reference = report.get("reference") or {}
    pieces = reference.get("pieces") or []
    rows = [n for n in report.get("variants", []) if n != "full" and n in (report.get("agreement") or {})]
    if not pieces or not rows:
        return empty_figure(STRIP_TITLE, "generate from a run to see each variant's agreement, token by token", 320)
    found = report["agreement"]
    kl_max = max((k for n in rows for k in found[n]["kl"]), default=0.0)
    labels = report.get("labels", {})
    names = [f"{labels.get(n, n)} \u00b7 {100 * found[n]['top1_agreement']:.0f}% \u00b7 KL {found[n]['mean_kl']:.3f}"
             for n in rows]
    z = [strip_values(found[n]["agree"], found[n]["kl"], kl_max) for n in rows]
    hover = [[f"{labels.get(n, n)}<br>position {t + 1}: full precision says {pieces[t]!r}<br>"
              f"top-1 {'agrees' if found[n]['agree'][t] else 'differs'}; KL {found[n]['kl'][t]:.4f} nats"
              for t in range(len(pieces))] for n in rows]
    text = [[_short(p, 6) for p in pieces] for _ in rows]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(1, len(pieces) + 1)), y=names, zmin=0.0, zmax=1.0,
                               colorscale=STRIP_SCALE, showscale=False, text=text, texttemplate="%{text}",
                               textfont={"size": 9}, hovertext=hover, hoverinfo="text", xgap=1, ygap=2))
    fig.update_yaxes(autorange="reversed", title_text="")
    fig.update_xaxes(title_text=f"position in full precision's continuation (shade: sqrt of KL, 0 to {kl_max:.3f} "
                                "nats)",
                     dtick=max(1, len(pieces) // 16))
    return figure_layout(fig, STRIP_TITLE, 120 + 42 * len(rows), legend_rows=0)


def top10_figure(report: Mapping | None, position: int = 0) -> go.Figure:
    """Side by side, one panel per variant of report["top10"]: its ten most likely next tokens at `position`
    (0-based) and their probabilities, full precision's actual token marked."""
    report = report or {}
    top = report.get("top10") or {}
    shown = [n for n in top.get("variants", []) if top.get(n)]
    title = f"{TOP_TITLE} ({position + 1})"
    if not shown:
        return empty_figure(TOP_TITLE, "generate from a run to compare next-token probabilities", 360)
    position = max(0, min(position, len(top[shown[0]]) - 1))
    labels, colours = report.get("labels", {}), report.get("colours", {})
    actual = ((report.get("reference") or {}).get("token_ids") or [None] * (position + 1))[position]
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[short_label(n) for n in shown],
                        horizontal_spacing=0.12)
    for i, name in enumerate(shown, start=1):
        entries = top[name][position]
        fig.add_trace(go.Bar(x=[e["p"] for e in entries], y=[f"{_short(e['text'], 14)!r}" for e in entries],
                             orientation="h", name=labels.get(name, name), marker_color=colours.get(name, "#555"),
                             marker_line={"width": [2 if e["id"] == actual else 0 for e in entries],
                                          "color": "#000"},
                             hovertemplate="%{y}: %{x:.3f}<extra>" + labels.get(name, name) + "</extra>",
                             showlegend=False), row=1, col=i)
        fig.update_yaxes(autorange="reversed", row=1, col=i)
        fig.update_xaxes(title_text="probability", range=[0, 1], row=1, col=i)
    fig.update_annotations(font_size=11)
    return figure_layout(fig, title, 380, legend_rows=0)


def versus_plain_figure(report: Mapping | None) -> go.Figure:
    """Per corrected variant, two bars: the share of positions it gets right where plain 4-bit is wrong, and the
    reverse, over the held-out documents."""
    report = report or {}
    documents = report.get("documents") or {}
    versus = documents.get("versus_plain") or {}
    if not versus:
        return empty_figure(VERSUS_TITLE, "generate with one or more held-out documents to compare", 320)
    labels = report.get("labels", {})
    names = list(versus)
    fig = go.Figure([
        go.Bar(x=[labels.get(n, n) for n in names], y=[100 * versus[n]["corrected_only"] for n in names],
               name="right where plain 4-bit is wrong", marker_color="#1b7837"),
        go.Bar(x=[labels.get(n, n) for n in names], y=[100 * versus[n]["plain_only"] for n in names],
               name="wrong where plain 4-bit is right", marker_color="#b2182b")])
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text=f"% of {documents.get('positions', 0)} positions ({documents.get('n', 0)} documents)")
    return figure_layout(fig, VERSUS_TITLE, 360)


def deploy_figure(report: Mapping | None) -> go.Figure:
    """Held-out perplexity of each way of shipping (a)-(f), full precision and plain 4-bit as lines."""
    deploy = (report or {}).get("deploy") or {}
    ppl, labels = deploy.get("perplexity") or {}, deploy.get("labels") or {}
    order = [n for n in deploy.get("order", []) if ppl.get(n) is not None]
    if not order:
        return empty_figure(DEPLOY_TITLE, "not measured in this run:<br>tick 'what survives deployment'", 360)
    ticks = [labels.get(n, n).split(" ", 1)[0] for n in order]
    fig = go.Figure(go.Bar(x=ticks, y=[ppl[n] for n in order],
                           marker_color=[_DEPLOY_COLOURS.get(n, "#555") for n in order],
                           hovertext=[labels.get(n, n) for n in order], hoverinfo="text+y",
                           text=[f"{ppl[n]:.2f}" for n in order], textposition="outside", showlegend=False))
    for name, dash, what in (("full", "dash", "full precision"), ("plain_4bit", "dot", "plain 4-bit, no correction")):
        value = ppl.get(name)
        if value is not None and math.isfinite(value):  # a line across the bars, named in the legend
            fig.add_trace(go.Scatter(x=[ticks[0], ticks[-1]], y=[value, value], mode="lines",
                                     name=f"{what}: {value:.2f}", line={"dash": dash, "color": "#555"},
                                     hoverinfo="name"))
    top = max([ppl[n] for n in order] + [v for v in (ppl.get("full"), ppl.get("plain_4bit")) if v is not None])
    fig.update_yaxes(title_text="held-out perplexity", range=[0, 1.12 * top])
    fig.update_xaxes(title_text="way of shipping")
    return figure_layout(fig, f"{DEPLOY_TITLE}: {deploy.get('label', '')}", 380)
