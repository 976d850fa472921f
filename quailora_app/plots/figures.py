"""Plotly figures and small tables from an init report or an event list. No gradio here: the UI, notebooks
and tests all call these.

Inputs are plain dicts, as written to report.json and events.jsonl (`Event.to_dict()`), so a figure can be
drawn live from a partial event list or later from a finished run folder. Every figure carries a title, axis
titles with units and a legend; `CAPTIONS` holds the one line the UI prints under each.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from quailora_app.config import quant_word
from quailora_app.engine.arms import find_arm
from quailora_app.engine.evaluation.evaluate import gap_closed
from quailora_app.engine.methods.registry import QLORA, find_method, method_names
from quailora_app.units import format_bytes

#: The reference models measured beside the methods: name -> (label, short label, colour). Methods and arms
#: take theirs from engine/methods/registry.py and engine/arms.py.
REFERENCES = {"full": ("full precision", "full precision", "#4d4d4d"), "int8": ("8-bit (LLM.int8)", "8-bit", "#8c8c8c")}
_FALLBACK = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#9467bd")

CAPTIONS = {
    "layers": "Each point is one linear layer. 1.0 = the 4-bit error left by plain QLoRA (adapter starts at zero); "
              "lower = the initialization cancels more of it. Top: error on real activations (what the model feels); "
              "bottom: error of the weights alone.",
    "heatmap": "Share of each layer's quantization error (measured on calibration activations) that the initialization "
               "removes before any training: 100% would restore full precision, 0% = plain QLoRA. When the budget "
               "method ran, the right panel shows the rank it gives each layer (blue: above the uniform rank, red: "
               "below), at the same LoRA parameter count.",
    "ranks": "The rank the budget method gives each layer, chosen to remove the most calibrated error at the LoRA "
             "parameter count of uniform rank r (blue: above r, red: below); the column titles give each module "
             "type's mean rank.",
    "perplexity": "Perplexity on held-out text (lower is better), before any fine-tuning. 'Gap closed' = how much of "
                  "the distance from 4-bit QLoRA to the 8-bit model the initialization recovers (100% = as good as "
                  "8-bit).",
    "accuracy": "Downstream accuracy before any fine-tuning, one panel per task: the log-likelihood of each answer "
                "after the prompt, as lm-evaluation-harness scores multiple choice (higher is better). Whiskers: 95% "
                "Wilson intervals; dashed line: chance, dotted: always the most frequent answer. 'Gap closed' = how "
                "much of the 4-bit -> 8-bit accuracy difference the initialization recovers; with small sets read it "
                "beside the paired test in the report.",
    "train_accuracy": "Downstream accuracy of each arm at every evaluation, scored as lm-evaluation-harness scores "
                      "multiple choice on items the run held out (higher is better). Whiskers: 95% Wilson intervals; "
                      "the report's paired test against 4-bit QLoRA on the same items is sharper than comparing them.",
    "train": "Left: perplexity on held-out text measured every few steps (lower is better; dashed lines: the "
             "full-precision and 8-bit models without fine-tuning). Right: training loss, smoothed (EMA), faint dots "
             "raw.",
}


#: how the registry's method labels name the quantized base ("4-bit + QuAILoRA (calibrated)")
REGISTRY_BASE = "4-bit"


def label(name: str, base: str | None = None) -> str:
    """The legend of a reference model, a method or an arm. `base`: how the run names its quantized base
    (config.quant_word: "HQQ 3-bit"), put where a method's label says "4-bit"; None or "4-bit" (bitsandbytes)
    leaves the label as registered."""
    method, arm = find_method(name), find_arm(name)
    text = REFERENCES[name][0] if name in REFERENCES else method.label if method else arm.short if arm else name
    if method and base and base != REGISTRY_BASE and text.startswith(REGISTRY_BASE):
        text = base + text[len(REGISTRY_BASE):]
    return text


def base_of(source: Mapping | Iterable[Mapping] | None, base: str | None = None) -> str:
    """How a run names its quantized base: `base` when given, else from a report's settings (config.quant_word:
    "4-bit" for bitsandbytes, "HQQ 3-bit"), else "4-bit"."""
    if base:
        return base
    settings = source.get("settings") if isinstance(source, Mapping) else None
    return quant_word((settings or {}).get("quant") if isinstance(settings, Mapping) else None)


def short_label(name: str) -> str:
    """A reference model's or a method's short name (bar ticks, heatmap titles, checkboxes)."""
    method = find_method(name)
    return REFERENCES[name][1] if name in REFERENCES else method.short if method else name


def color(name: str, i: int = 0) -> str:
    method, arm = find_method(name), find_arm(name)
    if name in REFERENCES:
        return REFERENCES[name][2]
    return method.colour if method else arm.colour if arm else _FALLBACK[i % len(_FALLBACK)]


def variant_order() -> list[str]:
    """The order of every table and figure: the reference models, then the methods as registered."""
    return [*REFERENCES, *method_names()]


#: pixels a figure grows per row its legend is expected to take (see `_layout`)
LEGEND_ROW = 22


def figure_layout(fig: go.Figure, title: str, height: int, legend_rows: int = 1) -> go.Figure:
    """Title top left, white template; the legend in rows at the bottom of the figure, under the axes' tick labels
    and titles, and every axis making room for its tick labels and title (automargin): no text covers another at
    any page width. The legend is anchored to the figure (container), so plotly reserves the rows it really takes
    at the page's width (more on a narrow page) and the axes' labels sit above them; the figure is
    `height` + LEGEND_ROW per expected legend row tall."""
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 0.98, "yanchor": "top", "font": {"size": 16}},
        template="plotly_white", height=height + LEGEND_ROW * legend_rows, margin={"l": 60, "r": 30, "t": 70, "b": 8},
        legend={"orientation": "h", "xref": "container", "x": 0.01, "xanchor": "left", "yref": "container", "y": 0,
                "yanchor": "bottom", "title": {"text": ""}, "font": {"size": 12}},
        hovermode="closest", font={"size": 12},
    )
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def empty_figure(title: str, message: str, height: int = 320) -> go.Figure:
    """A placeholder with the figure's title and a line saying what will appear here."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 14, "color": "#777"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return figure_layout(fig, title, height)


# ------------------------------------------------------------------------------------------------ init run
def layers_from(source: Mapping | Iterable[Mapping]) -> list[dict]:
    """Per-layer rows from a report (its "layers") or from an event list (its "layer" events)."""
    if isinstance(source, Mapping):
        return list(source.get("layers") or [])
    return [e for e in source if e.get("kind") == "layer"]


def module_types(layers: Sequence[Mapping]) -> list[str]:
    """Module types in the order they appear in a block (q, k, v, o, gate, up, down for Llama)."""
    return list(dict.fromkeys(row["module"] for row in layers))


def _short_module(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _methods_in(layers: Sequence[Mapping], key: str) -> list[str]:
    seen: dict[str, None] = {}
    for row in layers:
        seen.update(dict.fromkeys(row.get(key, {})))
    order = variant_order()
    return sorted(seen, key=lambda m: order.index(m) if m in order else len(order))


def layer_error_figure(source: Mapping | Iterable[Mapping], n_blocks: int | None = None,
                       base: str | None = None) -> go.Figure:
    """Per-layer error of each method relative to plain QLoRA, one panel per module type.

    Top row: calibrated error sqrt(tr((E-C)H(E-C)^T) / tr(E H E^T)); bottom row: weight error ||E-C||/||E||.
    x = decoder block. Lower is better; 1.0 = no correction. The legend names the run's base (`base`, or the
    report's)."""
    title = "Quantization error left per layer (1.0 = plain QLoRA, lower is better)"
    base = base_of(source, base)
    layers = layers_from(source)
    if not layers:
        return empty_figure(title, "per-layer errors appear here while the blocks are calibrated")
    modules = module_types(layers)
    methods = [m for m in _methods_in(layers, "calibrated_error") if m != QLORA]
    fig = make_subplots(rows=2, cols=len(modules), shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.012, vertical_spacing=0.09,
                        subplot_titles=[_short_module(m) for m in modules])
    for r, key in enumerate(("calibrated_error", "weight_error"), start=1):
        for c, module in enumerate(modules, start=1):
            rows = sorted((row for row in layers if row["module"] == module), key=lambda row: row["block"])
            for i, method in enumerate(methods):
                pts = [(row["block"], row[key][method]) for row in rows if method in row.get(key, {})]
                if not pts:
                    continue
                fig.add_trace(go.Scatter(
                    x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                    name=label(method, base), legendgroup=method, showlegend=(r == 1 and c == 1),
                    line={"color": color(method, i), "width": 1.5}, marker={"size": 4},
                    hovertemplate=f"{label(method, base)}<br>{module} of block %{{x}}<br>"
                                  f"{'calibrated' if r == 1 else 'weight'} error %{{y:.3f}}<extra></extra>",
                ), row=r, col=c)
    # the baseline every number is relative to
    blocks = sorted({row["block"] for row in layers})
    x0, x1 = (0, n_blocks - 1) if n_blocks else (blocks[0], blocks[-1])
    for r in (1, 2):
        for c in range(1, len(modules) + 1):
            fig.add_trace(go.Scatter(x=[x0, x1], y=[1.0, 1.0], mode="lines", name="QLoRA = 1.0 (no correction)",
                                     legendgroup=QLORA, showlegend=(r == 1 and c == 1), hoverinfo="skip",
                                     line={"color": color(QLORA), "dash": "dash", "width": 1}), row=r, col=c)
    fig.update_yaxes(title_text="on activations<br>(ratio to QLoRA)", row=1, col=1)
    fig.update_yaxes(title_text="in the weights<br>(ratio to QLoRA)", row=2, col=1)
    fig.update_xaxes(showgrid=True, range=[x0 - 0.5, x1 + 0.5] if x1 > x0 else None)
    if x1 - x0 < 6:  # a few blocks: whole-number ticks only (plotly's own put -0.5, 1.5 at neighbouring panels' edges)
        fig.update_xaxes(tick0=0, dtick=1)
    # one title under the middle panel: seven "decoder block" titles would run into one another on a narrow page
    fig.update_xaxes(title_text="decoder block (every panel)" if len(modules) > 2 else "decoder block", row=2,
                     col=(len(modules) + 1) // 2)
    ymin = min((row[k][m] for row in layers for k in ("calibrated_error", "weight_error")
                for m in methods if m in row.get(k, {})), default=0.8)
    fig.update_yaxes(range=[max(0.0, ymin - 0.05), 1.05])
    fig.update_annotations(font={"size": 13})
    return figure_layout(fig, title, 520)


def removal_heatmap(source: Mapping | Iterable[Mapping], method: str = "quailora") -> go.Figure:
    """Block x module heatmap of 1 - calibrated error: the share of the (activation-weighted) quantization
    error the method removes."""
    title = f"Error {short_label(method)} removes, per layer (%)"
    layers = [row for row in layers_from(source) if method in row.get("calibrated_error", {})]
    if not layers:
        return empty_figure(title, f"appears once {short_label(method)} has initialized a block")
    modules = module_types(layers)
    blocks = sorted({row["block"] for row in layers})
    grid = {(row["block"], row["module"]): 100.0 * (1.0 - row["calibrated_error"][method]) for row in layers}
    z = [[grid.get((b, m)) for m in modules] for b in blocks]
    fig = go.Figure(go.Heatmap(
        z=z, x=[_short_module(m) for m in modules], y=blocks, colorscale="Blues", zmin=0, zmax=100,
        colorbar={**colorbar_below(), "ticksuffix": "%"},
        texttemplate="%{z:.0f}" if len(blocks) * len(modules) <= 400 else None,
        hovertemplate="block %{y}, %{x}: %{z:.1f}% of the calibrated error removed<extra></extra>",
        name=short_label(method), showscale=True,
    ))
    return _block_module_layout(fig, title, "module type (inside each decoder block)", len(blocks))


def colorbar_below(x: float = 0.5, length: float = 0.9) -> dict:
    """A thin horizontal colour bar at the foot of the figure, centred at paper `x`, `length` of its width. Every
    block x module heatmap uses this one orientation: plotly.js redraws a colour bar whose orientation changes
    under Plotly.react (gradio's update) with its labels stranded over the heatmap (plotly.js issue 6973), and the
    same plot shows one panel (a live run's first layers) and two (the shipped run's removal and ranks) in turn."""
    return {"orientation": "h", "x": x, "xanchor": "center", "len": length, "thickness": 10, "yref": "container",
            "y": 0, "yanchor": "bottom", "title": {"text": ""}}


def _block_module_layout(fig: go.Figure, title: str, x_title: str, n_blocks: int) -> go.Figure:
    """Axes and size of a decoder block x module type heatmap (block 0 at the top, the colour bar under it)."""
    fig.update_xaxes(title_text=x_title, side="bottom")
    fig.update_yaxes(title_text="decoder block", autorange="reversed", dtick=1 if n_blocks <= 12 else 2)
    return figure_layout(fig, title, max(380, 170 + 17 * n_blocks), legend_rows=0)


def ranks_of(report: Mapping | Iterable[Mapping], method: str = "budget") -> dict[str, int]:
    """The per-layer ranks a method chose (report["ranks"][method]); {} for an event list or a uniform method."""
    return dict((report.get("ranks") or {}).get(method) or {}) if isinstance(report, Mapping) else {}


def _where(path: str, rows: Mapping[str, Mapping]) -> tuple[int, str] | None:
    """(block, module) of a layer path, from its report row or from 'model.layers.<i>.<module>'."""
    if path in rows:
        return int(rows[path]["block"]), str(rows[path]["module"])
    parts = path.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return (int(parts[index]), ".".join(parts[index + 1:])) if index is not None and index + 1 < len(parts) else None


def rank_heatmap(report: Mapping | Iterable[Mapping], method: str = "budget") -> go.Figure:
    """Block x module heatmap of the rank a budgeted method gives each layer, coloured around the run's uniform
    rank r (blue: more than r, red: fewer; the axis title names r); the column titles carry each module type's mean
    rank, and the hover the share of the layer's calibrated error removed."""
    ranks = ranks_of(report, method)
    r = report.get("rank") if isinstance(report, Mapping) else None
    title = f"Ranks per layer: {short_label(method)}"
    rows = {row["name"]: row for row in layers_from(report)}
    cells = {where: (k, path) for path, k in ranks.items() if (where := _where(path, rows)) is not None}
    if not cells:
        return empty_figure(title, f"appears once {short_label(method)} has chosen its ranks")
    order, present = module_types(list(rows.values())), {module for _, module in cells}
    modules = [m for m in order if m in present] + sorted(present - set(order))
    blocks = sorted({block for block, _ in cells})
    z = [[cells[(b, m)][0] if (b, m) in cells else None for m in modules] for b in blocks]

    def removed(b: int, m: str) -> str:
        row = rows.get(cells[(b, m)][1]) if (b, m) in cells else None
        error = (row or {}).get("calibrated_error", {}).get(method)
        return f"{100 * (1 - error):.0f}%" if error is not None else "n/a"

    custom = [[removed(b, m) for m in modules] for b in blocks]
    means = {m: sum(cells[(b, m)][0] for b in blocks if (b, m) in cells) / sum((b, m) in cells for b in blocks)
             for m in modules}
    top = max(k for k, _ in cells.values())
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"{_short_module(m)} ({means[m]:.1f})" for m in modules], y=blocks, customdata=custom,
        colorscale="RdBu", zmid=r if r else None, zmin=0, zmax=max(top, 2 * r if r else top),
        colorbar=colorbar_below(),
        texttemplate="%{z}" if len(blocks) * len(modules) <= 400 else None,
        hovertemplate="block %{y}, %{x}: rank %{z}, removes %{customdata} of its calibrated error<extra></extra>",
        name=short_label(method), showscale=True,
    ))
    return _block_module_layout(fig, title, "module type (mean rank" + (f"; uniform r = {r})" if r else ")"),
                                len(blocks))


def init_heatmap(source: Mapping | Iterable[Mapping], method: str = "quailora", ranked: str = "budget") -> go.Figure:
    """The init results' heatmap: the share of the error `method` removes per layer and, when `ranked` chose
    per-layer ranks in this run (report["ranks"]), the ranks it gave beside it: two panels sharing the block axis,
    each with its colour scale under it (a half-width column leaves no room for colour bars between them)."""
    removal = removal_heatmap(source, method)
    if not ranks_of(source, ranked):
        return removal
    ranks = rank_heatmap(source, ranked)
    if not removal.data:
        return ranks
    gap = 0.04
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=gap,
                        subplot_titles=[f"{short_label(method)}:<br>% of the error removed",
                                        short_label(ranked) + (f"<br>(uniform r = {source['rank']})"
                                                               if source.get("rank") else "")])
    half = (1 - gap) / 2 * 0.9
    fig.add_trace(removal.data[0].update(colorbar={**colorbar_below((1 - gap) / 4, half), "ticksuffix": "%"}),
                  row=1, col=1)
    fig.add_trace(ranks.data[0].update(colorbar=colorbar_below(1 - (1 - gap) / 4, half)), row=1, col=2)
    fig.update_xaxes(side="bottom")
    fig.update_xaxes(title_text="module type", row=1, col=1)
    fig.update_xaxes(title_text="module (mean rank)", row=1, col=2)
    fig.update_yaxes(title_text="decoder block", autorange="reversed", row=1, col=1)
    fig.update_annotations(font={"size": 13})
    n_blocks = len(ranks.data[0].y)
    return figure_layout(fig, "Error removed and ranks, per layer",
                   max(400, 210 + 17 * n_blocks), legend_rows=0)


def _gap(ppl: Mapping, method: str, ref: str) -> float | None:
    """The share of the QLoRA -> `ref` perplexity gap `method` closes."""
    return gap_closed(ppl.get(method), ppl.get(QLORA), ppl.get(ref))


def perplexities_from(source: Mapping | Iterable[Mapping]) -> dict[str, float]:
    """{name: perplexity} from a report or from the "metric" events of an event list."""
    if isinstance(source, Mapping):
        return {k: v for k, v in (source.get("perplexity") or {}).items() if v is not None}
    return {e["name"]: e["value"] for e in source if e.get("kind") == "metric"
            and e.get("group", "perplexity") == "perplexity" and e.get("value") is not None}


def perplexity_figure(source: Mapping | Iterable[Mapping], methods: Sequence[str] | None = None,
                      base: str | None = None) -> go.Figure:
    """Bars: held-out perplexity of full precision, 8-bit, 4-bit (QLoRA init) and 4-bit + each method, each
    labelled inside, along the bar, with its perplexity and the share of the 4-bit -> 8-bit gap it closes (one
    line per bar: labels of neighbouring bars never meet, however narrow the page). The legend names the run's
    base (`base`, or the report's: "HQQ 3-bit + QuAILoRA")."""
    title = "Held-out perplexity before fine-tuning"
    base = base_of(source, base)
    ppl = perplexities_from(source)
    if not ppl:
        return empty_figure(title, "perplexities appear here after the evaluation stage")
    order = [*REFERENCES, QLORA, *(methods or []), *variant_order()]
    names = [n for n in dict.fromkeys(order) if n in ppl]
    texts = []
    for n in names:
        text = f"{ppl[n]:.2f}"
        gap = _gap(ppl, n, "int8") if n not in ("full", "int8", "qlora") else None
        if gap is not None:
            text += f" · gap closed {100 * gap:.0f}%"
        texts.append(text)
    fig = go.Figure()
    for i, n in enumerate(names):
        fig.add_trace(go.Bar(
            x=[short_label(n)], y=[ppl[n]], name=label(n, base), marker_color=color(n, i),
            text=[texts[i]], textposition="inside", insidetextanchor="end", textangle=-90, textfont={"size": 12},
            hovertemplate=f"{label(n, base)}: perplexity %{{y:.3f}}<extra></extra>",
        ))
    fig.update_layout(showlegend=True, bargap=0.2)
    # tick labels level or upright (slanted ones reach under the y axis's labels), and a little below the axis: a
    # level first label reaching left of the axis passes under the y axis's "0"
    fig.update_xaxes(title_text="model variant<br>(weights precision + LoRA initialization)", autotickangles=[0, 90],
                     ticklabelstandoff=10)
    fig.update_yaxes(title_text="perplexity (unitless, lower is better)", range=[0, 1.04 * max(ppl[n] for n in names)])
    return figure_layout(fig, title, 400, legend_rows=len(names))


def accuracies_from(source: Mapping | Iterable[Mapping]) -> dict[str, dict]:
    """{task kind: {"title", "chance", "majority", "n", "models": {variant: {"accuracy", "interval"}},
    "gap_closed": {method: share}}} from a report (its "accuracy") or from the accuracy "metric" events of an event
    list (chance, majority and the gaps only in a report)."""
    if isinstance(source, Mapping):
        return {kind: dict(entry) for kind, entry in (source.get("accuracy") or {}).items()
                if isinstance(entry, Mapping) and entry.get("models")}
    out: dict[str, dict] = {}
    for e in source:
        if e.get("kind") == "metric" and e.get("group") == "accuracy" and e.get("value") is not None and e.get("task"):
            entry = out.setdefault(e["task"], {"title": e["task"], "n": e.get("n"), "models": {}})
            entry["models"][e["name"]] = {"accuracy": e["value"], "interval": e.get("interval")}
    return out


def accuracy_figure(source: Mapping | Iterable[Mapping], methods: Sequence[str] | None = None,
                    base: str | None = None) -> go.Figure:
    """Bars, one panel per downstream task: the accuracy of full precision, 8-bit, 4-bit (QLoRA init) and 4-bit +
    each method, with 95% Wilson intervals as whiskers, the chance and majority-answer lines, and the share of the
    4-bit -> 8-bit accuracy gap each method closes."""
    title = "Downstream accuracy before fine-tuning (higher is better)"
    base = base_of(source, base)
    tasks = accuracies_from(source)
    if not tasks:
        return empty_figure(title, "accuracies appear here after the evaluation stage (when accuracy tasks are on)")
    order = [*REFERENCES, QLORA, *(methods or []), *variant_order()]
    names = [n for n in dict.fromkeys(order) if any(n in t["models"] for t in tasks.values())]
    titles = [f"{t.get('title', kind)}" + (f", n={t['n']:,}" if t.get("n") else "") for kind, t in tasks.items()]
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=titles, horizontal_spacing=0.08)
    for col, entry in enumerate(tasks.values(), start=1):
        gaps = entry.get("gap_closed") or {}
        for i, n in enumerate(names):
            m = entry["models"].get(n)
            if m is None:
                continue
            acc = 100 * m["accuracy"]
            lo, hi = (100 * v for v in m["interval"]) if m.get("interval") else (acc, acc)
            text = f"{acc:.1f}% ± {(hi - lo) / 2:.1f}"
            if gaps.get(n) is not None:
                text += f" · gap closed {100 * gaps[n]:.0f}%"
            fig.add_trace(go.Bar(
                x=[short_label(n)], y=[acc], name=label(n, base), marker_color=color(n, i), legendgroup=n,
                showlegend=col == 1, error_y={"type": "data", "symmetric": False, "array": [hi - acc],
                                              "arrayminus": [acc - lo], "thickness": 1.5, "width": 4},
                text=[text], textposition="inside", insidetextanchor="start", textangle=-90, textfont={"size": 11},
                hovertemplate=f"{label(n, base)}: %{{y:.1f}}% (95% CI {lo:.1f}-{hi:.1f})<extra></extra>"), row=1,
                col=col)
        # the two lines' notes on opposite sides of their lines: close values (chance 50%, majority 52%) never
        # put one note on the other
        for key, dash, what, where in (("chance", "dash", "chance", "bottom right"),
                                       ("majority", "dot", "majority answer", "top right")):
            if entry.get(key) is not None:
                fig.add_hline(y=100 * entry[key], line={"color": "#555", "dash": dash, "width": 1}, row=1, col=col,
                              annotation_text=f"{what} {100 * entry[key]:.0f}%", annotation_position=where,
                              annotation_font={"size": 10, "color": "#555"})
    fig.update_layout(showlegend=True, bargap=0.3)
    fig.update_xaxes(title_text="model variant", autotickangles=[0, 90], ticklabelstandoff=10)  # as perplexity_figure
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100], row=1, col=1)
    fig.update_yaxes(range=[0, 100])
    return figure_layout(fig, title, 420, legend_rows=len(names))


def median(values: Sequence[float]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def numbers_table(report: Mapping, base: str | None = None) -> list[list]:
    """Rows of [variant, median calibrated error, median weight error, perplexity, gap closed vs 8-bit,
    gap closed vs full precision, seconds] for the UI's table (header: NUMBERS_HEADER); variants named with the
    run's base (`base`, or the report's)."""
    base = base_of(report, base)
    layers = report.get("layers") or []
    ppl = {k: v for k, v in (report.get("perplexity") or {}).items() if v is not None}
    methods = list(report.get("methods") or [])
    rows = []

    def fmt(x, pattern="{:.3f}"):
        return pattern.format(x) if x is not None and not (isinstance(x, float) and math.isnan(x)) else "–"

    for name in dict.fromkeys(["full", "int8", *methods]):
        if name in ("full", "int8") and name not in ppl:
            continue
        calib = median([r["calibrated_error"].get(name) for r in layers if name in r.get("calibrated_error", {})])
        weight = median([r["weight_error"].get(name) for r in layers if name in r.get("weight_error", {})])
        gap8 = (report.get("gap_closed") or {}).get(name, _gap(ppl, name, "int8"))
        gapf = (report.get("gap_closed_full") or {}).get(name, _gap(ppl, name, "full"))
        if name in ("full", "int8", "qlora"):
            gap8 = gapf = None
        seconds = (report.get("seconds") or {}).get(name)
        rows.append([label(name, base), fmt(calib), fmt(weight), fmt(ppl.get(name), "{:.2f}"),
                     fmt(None if gap8 is None else 100 * gap8, "{:.0f}%"),
                     fmt(None if gapf is None else 100 * gapf, "{:.0f}%"), fmt(seconds, "{:.1f}")])
    return rows


NUMBERS_HEADER = ["variant", "calibrated error (median, 1 = QLoRA)", "weight error (median)", "perplexity",
                  "gap closed vs 8-bit", "gap closed vs full", "init seconds"]


# ------------------------------------------------------------------------------------------------ training
def ema(values: Sequence[float], alpha: float = 0.3) -> list[float]:
    """Exponential moving average (alpha = weight of the newest value)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def is_arm_finished(e: Mapping) -> bool:
    """Whether event `e` (a dict) is a fine-tuning arm's end."""
    return "final_perplexity" in e and "arm" in e


def arms_in(events: Iterable[Mapping]) -> list[str]:
    return list(dict.fromkeys(e["arm"] for e in events if "arm" in e))


def arm_labels_in(events: Sequence[Mapping]) -> dict[str, str]:
    """Arm -> its legend in this run, as its evaluations name it (the run's bits and quantizer: "HQQ 3-bit
    QuAILoRA"); an arm whose events carry none (older runs) is labelled from the arms registry."""
    found = {e["arm"]: e["label"] for e in events if e.get("kind") == "eval" and e.get("label") and "arm" in e}
    return {arm: found.get(arm) or label(arm) for arm in arms_in(events)} | found


def train_figure(events: Sequence[Mapping], arms: Sequence[str] | None = None) -> go.Figure:
    """Two panels per arm colour: validation perplexity vs step (with full-precision and 8-bit reference
    lines), and EMA-smoothed training loss vs step."""
    title = "Fine-tuning: held-out perplexity and training loss per arm"
    arms = list(dict.fromkeys([*(arms or []), *arms_in(events)]))
    if not arms:
        return empty_figure(title, "curves appear here as the arms train", 420)
    names = arm_labels_in(events)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["validation perplexity (lower is better)", "training loss (EMA-smoothed)"])
    max_step = max([e.get("total_steps") or e.get("step", 0) for e in events if e.get("kind") == "train_step"] +
                   [e.get("step", 0) for e in events if e.get("kind") == "eval"] + [1])
    for i, arm in enumerate(arms):
        c, lab = color(arm, i), names.get(arm) or label(arm)
        evals = [e for e in events if e.get("kind") == "eval" and e.get("arm") == arm
                 and e.get("val_perplexity") is not None]
        fig.add_trace(go.Scatter(
            x=[e["step"] for e in evals], y=[e["val_perplexity"] for e in evals], mode="lines+markers",
            name=lab, legendgroup=arm, line={"color": c, "width": 2}, marker={"size": 7},
            hovertemplate=f"{lab}<br>step %{{x}}: perplexity %{{y:.2f}}<extra></extra>",
        ), row=1, col=1)
        steps = [e for e in events if e.get("kind") == "train_step" and e.get("arm") == arm
                 and e.get("train_loss") is not None]
        xs, ys = [e["step"] for e in steps], [e["train_loss"] for e in steps]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker={"color": c, "size": 4, "opacity": 0.3},
                                 legendgroup=arm, showlegend=False, hoverinfo="skip"), row=1, col=2)
        fig.add_trace(go.Scatter(
            x=xs, y=ema(ys), mode="lines+markers", name=lab, legendgroup=arm, showlegend=False,
            line={"color": c, "width": 2}, marker={"size": 3},
            hovertemplate=f"{lab}<br>step %{{x}}: loss %{{y:.3f}} (smoothed)<extra></extra>",
        ), row=1, col=2)
    refs = {e["name"]: e["value"] for e in events if e.get("kind") == "metric" and e.get("name") in ("full", "int8")
            and e.get("value") is not None}
    for name, dash in (("full", "dot"), ("int8", "dash")):
        if name in refs:
            fig.add_trace(go.Scatter(
                x=[0, max_step], y=[refs[name], refs[name]], mode="lines",
                name=f"{label(name)}, no fine-tuning ({refs[name]:.1f})",
                line={"color": color(name), "dash": dash, "width": 1.5},
                hovertemplate=f"{label(name)}: %{{y:.2f}}<extra></extra>",
            ), row=1, col=1)
    fig.update_xaxes(title_text="training step (optimizer updates)",
                     range=[-0.3, max_step + 0.3] if max_step <= 10 else None)
    fig.update_yaxes(title_text="perplexity (unitless)", row=1, col=1)
    fig.update_yaxes(title_text="loss (nats per token)", row=1, col=2)
    fig.update_annotations(font={"size": 13})
    return figure_layout(fig, title, 440, legend_rows=2)


def train_accuracies_from(events: Iterable[Mapping]) -> dict[str, dict[str, list[Mapping]]]:
    """{task kind: {arm: its "eval_accuracy" events in order}} from an event list (events.jsonl, live)."""
    out: dict[str, dict[str, list[Mapping]]] = {}
    for e in events:
        if e.get("kind") == "eval_accuracy" and e.get("accuracy") is not None:
            out.setdefault(e["task"], {}).setdefault(e["arm"], []).append(e)
    return out


def train_accuracy_figure(events: Sequence[Mapping], arms: Sequence[str] | None = None) -> go.Figure:
    """One panel per downstream task: each arm's accuracy (%) at every evaluation, with its 95% Wilson interval as
    whiskers. Only for a run that scores accuracy (an empty placeholder otherwise; train_figure is unchanged)."""
    title = "Fine-tuning: downstream accuracy per arm (higher is better)"
    tasks = train_accuracies_from(events)
    if not tasks:
        return empty_figure(title, "accuracy curves appear here when the run scores downstream tasks", 420)
    order = list(dict.fromkeys([*(arms or []), *arms_in(events)]))
    names = arm_labels_in(events)
    fig = make_subplots(rows=1, cols=len(tasks), horizontal_spacing=0.08,
                        subplot_titles=[f"{kind}, n={next(iter(per.values()))[-1].get('n', 0):,}"
                                        for kind, per in tasks.items()])
    max_step = max(e["step"] for per in tasks.values() for points in per.values() for e in points)
    shown: set[str] = set()
    for col, per in enumerate(tasks.values(), start=1):
        for i, arm in enumerate(a for a in order if a in per):
            points, lab = per[arm], names.get(arm) or label(arm)
            ys = [100 * e["accuracy"] for e in points]
            his = [100 * (e.get("interval") or [e["accuracy"]] * 2)[1] for e in points]
            los = [100 * (e.get("interval") or [e["accuracy"]] * 2)[0] for e in points]
            fig.add_trace(go.Scatter(
                x=[e["step"] for e in points], y=ys, mode="lines+markers", name=lab, legendgroup=arm,
                showlegend=arm not in shown, line={"color": color(arm, i), "width": 2}, marker={"size": 7},
                error_y={"type": "data", "symmetric": False, "array": [h - y for h, y in zip(his, ys, strict=True)],
                         "arrayminus": [y - lo for y, lo in zip(ys, los, strict=True)], "thickness": 1.2, "width": 3},
                customdata=[[lo, hi] for lo, hi in zip(los, his, strict=True)],
                hovertemplate=f"{lab}<br>step %{{x}}: %{{y:.1f}}% (95% CI %{{customdata[0]:.1f}}-"
                              f"%{{customdata[1]:.1f}})<extra></extra>"), row=1, col=col)
            shown.add(arm)
    fig.update_xaxes(title_text="training step (optimizer updates)",
                     range=[-0.3, max_step + 0.3] if max_step <= 10 else None)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=1)
    fig.update_annotations(font={"size": 13})
    return figure_layout(fig, title, 420, legend_rows=2)


TRAIN_HEADER = ["arm", "step", "tokens / s", "memory (peak)", "val perplexity (last)", "best", "seconds training"]


def train_table(events: Sequence[Mapping], arms: Sequence[str] | None = None) -> list[list]:
    """Per arm: step reached, mean tokens/s over the last 5 steps, peak memory (with how it was had: measured on
    CUDA, accounted on CPU, where a process's memory cannot be told apart per arm), last and best perplexity."""
    rows, names = [], arm_labels_in(events)
    for arm in dict.fromkeys([*(arms or []), *arms_in(events)]):
        steps = [e for e in events if e.get("kind") == "train_step" and e.get("arm") == arm]
        evals = [e["val_perplexity"] for e in events if e.get("kind") == "eval" and e.get("arm") == arm
                 and e.get("val_perplexity") is not None]
        done = next((e for e in events if is_arm_finished(e) and e.get("arm") == arm), None)
        recent = [e["tokens_per_s"] for e in steps[-5:] if e.get("tokens_per_s")]
        last = steps[-1] if steps else {}
        peak = max((e.get("memory_bytes") or 0 for e in steps), default=0)
        rows.append([
            names.get(arm) or label(arm),
            f"{last.get('step', 0)} / {last.get('total_steps', '?')}" if steps else "waiting",
            f"{sum(recent) / len(recent):,.0f}" if recent else "–",
            (format_bytes(peak, 2) + (f" ({last['memory_how']})" if last.get("memory_how") else "")) if peak else "–",
            f"{evals[-1]:.2f}" if evals else "–",
            f"{min(evals):.2f}" if evals else "–",
            f"{done['seconds']:.0f}" if done and done.get("seconds") is not None else
            (f"{sum(e.get('elapsed_s') or 0 for e in steps):.0f}" if steps else "–"),
        ])
    return rows
