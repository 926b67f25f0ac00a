"""Pictures of the flow: one feature's flow graph, a pack's origins per layer, and across
linked packs (flowdb link) a feature's family and a link set's categories per layer.

PNG and SVG are drawn with matplotlib; HTML with plotly (interactive: hover shows
key, category, label and Neuronpedia URL, and a click opens the URL; the page
carries plotly.js itself, so it opens offline). The format comes from the output
file's suffix.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowdb.errors import FlowdbError
from flowdb.views import marks
from flowdb.views.marks import MODULE_COLOUR, MODULE_NAME, MODULE_X_OFFSET
from flowdb.writes import atomic_write, write_errors

FORMATS = (".png", ".svg", ".html")
KIND_MODULE = {"residual": "res", "mlp": "mlp", "attention": "att"}  # edge kind -> source module
CATEGORY_COLOUR = {"translated": "#4c72b0", "processed": "#8172b3", "newborn": "#dd8452",
                   "from_nowhere": "#bbbbbb"}
# A flow graph's marks, as the explorer's flow view (flowdb/explorer/static/flow.js) draws them:
# an edge's line style says where it stands against its layer's build (flowdb.classify.edge_status),
# a node's shape its category; MLP and attention inputs have none and are squares.
STATUS_TEXT = {"threshold": "solid: at or above its layer's threshold",
               "above-chance": "dashed: below threshold, above chance",
               "chance": "dotted: at chance level or below", "unknown": "dotted: no chance level stored"}
STATUS_LINE = {"threshold": "solid", "above-chance": "dashed", "chance": "dotted", "unknown": "dotted"}
STATUS_DASH = {"threshold": "solid", "above-chance": "dash", "chance": "dot", "unknown": "dot"}  # plotly's names
CATEGORY_MARKER = {"translated": "o", "processed": "D", "newborn": "*", "from-nowhere": "X"}
CATEGORY_SYMBOL = {"translated": "circle", "processed": "diamond", "newborn": "star", "from-nowhere": "x"}
INPUT_MARKER, INPUT_SYMBOL = "s", "square"


@dataclass(frozen=True)
class FlowLayout:
    nodes: pd.DataFrame  # with x, y
    edges: pd.DataFrame  # with x0, y0, x1, y1


STATIC = (".png", ".svg")  # pictures drawn with matplotlib only


def _target(out: str | Path, formats: tuple[str, ...] = FORMATS) -> Path:
    """The output path, checked for a suffix this picture is drawn in, with its folder made."""
    out = Path(out)
    if out.suffix not in formats:
        raise FlowdbError(f"{out}: pictures are written as {', '.join(formats)}")
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


DPI = 130


def _save(fig, out: Path, dpi: float = DPI) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_write(out) as partial:
            fig.savefig(partial, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def _save_html(fig, out: Path, **options) -> Path:
    """A Plotly figure as one self-contained HTML file."""
    with atomic_write(out) as partial:
        fig.write_html(partial, include_plotlyjs=True, **options)
    return out


def _stacked_shares(table: pd.DataFrame, colours: dict[str, str], out: Path, title: str, ylabel: str) -> Path:
    """Per-layer stacked bars of shares; table is indexed by layer, one column per part."""
    return _stacked_panels([(table, colours, "")], out, title, ylabel)


def _stacked_panels(panels: list[tuple[pd.DataFrame, dict[str, str], str]], out: Path, title: str,
                    ylabel: str) -> Path:
    """Side by side panels of per-layer stacked shares: (table indexed by layer, colour per column,
    panel title) each."""
    if out.suffix == ".html":
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[name for _, _, name in panels] or None)
        for col, (table, colours, _) in enumerate(panels, start=1):
            for name, colour in colours.items():
                fig.add_trace(go.Bar(x=table.index, y=table[name], name=name, marker_color=colour,
                                     legendgroup=str(col)), row=1, col=col)
            fig.update_xaxes(title_text="layer", row=1, col=col)
            fig.update_yaxes(title_text=ylabel, tickformat=".0%", row=1, col=col)
        fig.update_layout(barmode="stack", title=title)
        return _save_html(fig, out)
    plt = _pyplot()
    n_layers = max(len(table) for table, _, _ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * max(6.0, 0.4 * n_layers + 4), 4.2),
                             squeeze=False)
    for ax, (table, colours, name) in zip(axes[0], panels):
        bottom = pd.Series(0.0, index=table.index)
        for part, colour in colours.items():
            ax.bar(table.index, table[part], bottom=bottom, color=colour, label=part)
            bottom += table[part]
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.set_xticks(table.index)
        if name:
            ax.set_title(name, fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    if len(panels) > 1:
        fig.suptitle(title, fontsize=10)
    else:
        axes[0][0].set_title(title, fontsize=10)
    return _save(fig, out)


def flow_layout(graph: pd.DataFrame) -> FlowLayout:
    """Layers along x; residual features in the middle rows, MLP above, attention below.

    Rows are ordered to keep edges from crossing: a layer's residual features by the
    mean row of their residual predecessors, and its inputs by the mean row of the
    features they feed (the input of the highest feature highest, above and below).
    """
    nodes = graph[graph["element"] == "node"].copy()
    edges = graph[graph["element"] == "edge"].copy()
    if nodes.empty:
        raise FlowdbError("the flow graph is empty: is the feature reference right?")
    sources: dict[str, list[str]] = {}
    targets: dict[str, list[str]] = {}
    for edge in edges.itertuples():
        sources.setdefault(edge.target, []).append(edge.source)
        targets.setdefault(edge.source, []).append(edge.target)
    positions: dict[str, tuple[float, float]] = {}

    def mean_row(keys: list[str]) -> float:
        rows = [positions[k][1] for k in keys if k in positions]
        return sum(rows) / len(rows) if rows else 0.0

    for layer, group in nodes.groupby("layer"):
        residual = sorted(group.loc[group["module"] == "res", "key"],
                          key=lambda k: (mean_row(sources.get(k, [])), k))
        for row, key in enumerate(residual):
            positions[key] = (layer, row - (len(residual) - 1) / 2)
        top = (len(residual) - 1) / 2 if residual else 0
        mlp = sorted(group.loc[group["module"] == "mlp", "key"], key=lambda k: (mean_row(targets.get(k, [])), k))
        for row, key in enumerate(mlp):
            positions[key] = (layer + MODULE_X_OFFSET["mlp"], top + 1 + row)
        att = sorted(group.loc[group["module"] == "att", "key"], key=lambda k: (-mean_row(targets.get(k, [])), k))
        for row, key in enumerate(att):
            positions[key] = (layer + MODULE_X_OFFSET["att"], -top - 1 - row)
    nodes["x"] = nodes["key"].map(lambda k: positions[k][0])
    nodes["y"] = nodes["key"].map(lambda k: positions[k][1])
    edges = edges[edges["source"].isin(positions) & edges["target"].isin(positions)].copy()
    edges["x0"] = edges["source"].map(lambda k: positions[k][0])
    edges["y0"] = edges["source"].map(lambda k: positions[k][1])
    edges["x1"] = edges["target"].map(lambda k: positions[k][0])
    edges["y1"] = edges["target"].map(lambda k: positions[k][1])
    return FlowLayout(nodes.reset_index(drop=True), edges.reset_index(drop=True))


LABEL_WIDTH = 24  # characters per line of a node's label
LABEL_LINES = 3  # at most this many lines; longer labels end in "…"
SEED_RING = {"color": "black", "width": 3}


def _text(value) -> str:
    """A string value, or "" for None, NaN and NA (never "nan")."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value)


def _wrapped(label: str) -> list[str]:
    """label in lines of LABEL_WIDTH characters, at most LABEL_LINES of them."""
    lines = textwrap.wrap(label, LABEL_WIDTH, max_lines=LABEL_LINES, placeholder=" …")
    return [line if len(line) <= LABEL_WIDTH else line[:LABEL_WIDTH - 1] + "…" for line in lines]


def _name(row) -> str:
    return f"{row['layer']}/{row['module']}/{row['index']}"


def _headline(row) -> str:
    """A node's first line: its name, and its category where it has one."""
    category = _text(row["category"])
    return f"{_name(row)} · {category}" if category else _name(row)


def _status(edge) -> str:
    """An edge row's status (flowdb.classify.edge_status), "unknown" where the frame has none."""
    return _text(getattr(edge, "status", None)) or "unknown"


def _shapes(nodes: pd.DataFrame, by_category: dict[str, str], input_shape: str) -> pd.Series:
    """Each node's marker shape, by its category (a square for inputs, which have none)."""
    return nodes["category"].map(lambda c: by_category.get(_text(c), input_shape))


def _shape_legend(shapes: pd.Series, by_category: dict[str, str], input_shape: str) -> list[tuple[str, str]]:
    """(legend text, shape) for each shape drawn, in the categories' order."""
    entries = [*by_category.items(), ("input (no category)", input_shape)]
    return [(text, shape) for text, shape in entries if shape in set(shapes)]


def _statuses(edges: pd.DataFrame) -> list[str]:
    """The statuses the edges have, in the legend's order."""
    present = {_status(edge) for edge in edges.itertuples()}
    return [status for status in STATUS_TEXT if status in present]


# Where a node's label goes: an input's to its left, where no edge runs (every input
# edge leaves to the right, and those of inputs stacked farther from the chain pass
# just right of the nearer ones); a residual feature's below and to its right, clear
# of the input edges that come in from the left and of the chain's edge that leaves
# to the right.
LABEL_SIDE = {"mlp": "left", "att": "left", "res": "below right"}


def plot_flow(graph: pd.DataFrame, out: str | Path, title: str) -> Path:
    """Draw a flow graph (the flow-graph template's rows, with a status column on edge rows as
    flowdb.explorer.data.mark_flow_frame adds it); title should name the thresholds applied.
    A graph of more than marks.FLOW_NODE_CAP features is refused: it cannot be drawn readably."""

    out = _target(out)
    n_nodes, n_edges = int((graph["element"] == "node").sum()), int((graph["element"] == "edge").sum())
    if n_nodes > marks.FLOW_NODE_CAP:
        raise FlowdbError(f"the flow graph has {n_nodes} features and {n_edges} edges, too many to draw readably "
                          f"(at most {marks.FLOW_NODE_CAP} features): lower --max-rank, raise --t-res / --t-mod, "
                          "or drop --every-edge")
    layout = flow_layout(graph)
    if out.suffix == ".html":
        _flow_html(layout, out, title)
    else:
        _flow_static(layout, out, title)
    return out


def _width(cosine: float) -> float:
    return 0.5 + 5.0 * max(float(cosine), 0.0)


def _extent(nodes: pd.DataFrame) -> tuple[int, float]:
    """The number of layers drawn and the height of the tallest column, in rows."""
    return int(nodes["layer"].nunique()), float(nodes["y"].max() - nodes["y"].min())


SUBTITLE = "arrows: input → feature; edge width and number: cosine"


def _label_point(edge) -> tuple[float, float]:
    """Where an edge's cosine goes: a chain edge's midpoint; an input edge's 30% mark from the input,
    since its midpoint can fall on a residual row, over the chain's own edges."""
    t = 0.5 if edge.kind == "residual" else 0.3
    return edge.x0 + t * (edge.x1 - edge.x0), edge.y0 + t * (edge.y1 - edge.y0)


MAX_PIXELS = 8000  # the longest side of a PNG; a graph at the node cap still fits at ~100 dpi


def _flow_static(layout: FlowLayout, out: Path, title: str) -> None:
    from matplotlib.lines import Line2D

    plt = _pyplot()
    nodes, edges = layout.nodes, layout.edges
    n_layers, rows = _extent(nodes)
    size = (max(7.0, 2.6 * n_layers + 2.2), max(4.0, 2.6 + 1.35 * rows))
    fig, ax = plt.subplots(figsize=size)
    for edge in edges.itertuples():
        ax.annotate("", xy=(edge.x1, edge.y1), xytext=(edge.x0, edge.y0),
                    arrowprops={"arrowstyle": "-|>", "lw": _width(edge.cosine), "alpha": 0.55,
                                "color": MODULE_COLOUR[KIND_MODULE[edge.kind]], "mutation_scale": 14,
                                "linestyle": STATUS_LINE[_status(edge)], "shrinkA": 9, "shrinkB": 9}, zorder=1)
        ax.text(*_label_point(edge), f"{edge.cosine:.2f}", fontsize=7,
                color="#333", ha="center", va="center", zorder=2,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    markers = _shapes(nodes, CATEGORY_MARKER, INPUT_MARKER)
    for (module, marker), group in nodes.groupby([nodes["module"], markers]):
        ax.scatter(group["x"], group["y"], s=380 if marker == "*" else 260, c=MODULE_COLOUR[module],
                   marker=marker, edgecolors="white", linewidths=1, zorder=3)
    seed = nodes[nodes["role"] == "seed"]
    ax.scatter(seed["x"], seed["y"], s=700, facecolors="none", edgecolors=SEED_RING["color"],
               linewidths=SEED_RING["width"], zorder=4)
    for row in nodes.to_dict("records"):
        text = "\n".join([_headline(row), *_wrapped(_text(row["label"]))])
        if LABEL_SIDE[row["module"]] == "left":
            ax.text(row["x"] - 0.07, row["y"], text, fontsize=7, ha="right", va="center", zorder=5,
                    parse_math=False)
        else:
            ax.text(row["x"] + 0.05, row["y"] - 0.16, text, fontsize=7, ha="left", va="top", zorder=5, parse_math=False,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7})
    layers = sorted(nodes["layer"].unique())
    ax.set_xticks(layers, [f"layer {int(layer)}" for layer in layers])
    ax.set_yticks([])
    ax.set_xlim(nodes["x"].min() - 0.6, max(layers) + 0.75)
    ax.set_ylim(nodes["y"].min() - 0.7, nodes["y"].max() + 0.5)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{title}\n{SUBTITLE}", fontsize=10)
    handles = [Line2D([], [], linestyle="", marker="o", markersize=10, markerfacecolor=MODULE_COLOUR[m],
                      markeredgecolor="white", label=MODULE_NAME[m]) for m in MODULE_COLOUR
               if m in set(nodes["module"])]
    handles.append(Line2D([], [], linestyle="", marker="o", markersize=12, markerfacecolor="none",
                          markeredgecolor=SEED_RING["color"], markeredgewidth=SEED_RING["width"], label="seed"))
    handles += [Line2D([], [], linestyle="", marker=marker, markersize=9, color="#555", label=text)
                for text, marker in _shape_legend(markers, CATEGORY_MARKER, INPUT_MARKER)]
    handles += [Line2D([], [], color="#555", linewidth=2, linestyle=STATUS_LINE[status], label=STATUS_TEXT[status])
                for status in _statuses(edges)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    _save(fig, out, dpi=min(DPI, MAX_PIXELS / max(size)))


# Opens a node's Neuronpedia page when its marker is clicked (customdata holds the URL).
_OPEN_ON_CLICK = """
var plot = document.getElementById('{plot_id}');
plot.on('plotly_click', function (event) {
  var url = event.points.length ? event.points[0].customdata : '';
  if (typeof url === 'string' && /^https?:\\/\\//.test(url)) { window.open(url, '_blank', 'noopener'); }
});
"""


def _hover(row) -> str:
    lines = [f"<b>{html.escape(row['key'])}</b>",
             ", ".join(part for part in (_text(row["role"]), _text(row["category"]),
                                         MODULE_NAME[row["module"]]) if part)]
    label, url = _text(row["label"]), _text(row["url"])
    if label:
        lines.append(html.escape(label))
    if url:
        lines.append(f"{html.escape(url)} (click to open)")
    return "<br>".join(lines)


def _node_text(row) -> str:
    """A node's annotation: its name (a link to its page where there is one) and its wrapped label."""
    name, url, category = _name(row), _text(row["url"]), _text(row["category"])
    first = f'<a href="{html.escape(url, quote=True)}" target="_blank">{name}</a>' if url else name
    if category:
        first += f" · {html.escape(category)}"
    return "<br>".join([first, *(html.escape(line) for line in _wrapped(_text(row["label"])))])


def _html_width(n_layers: int) -> int | None:
    """Pixels wide enough for every layer's labels; None (fill the window) for short graphs."""
    needed = 290 * n_layers + 260
    return needed if needed > 1300 else None


def _flow_html(layout: FlowLayout, out: Path, title: str) -> None:
    import plotly.graph_objects as go

    nodes, edges = layout.nodes, layout.edges
    n_layers, rows = _extent(nodes)
    fig = go.Figure()
    annotations = []
    for edge in edges.itertuples():
        # A line, not an annotation's arrow: only a line can be dashed. Its arrowhead is a
        # marker at the feature's end, turned along the line and kept clear of the node.
        status = _status(edge)
        width = 1.0 + 4.0 * max(float(edge.cosine), 0.0)
        fig.add_trace(go.Scatter(
            x=[edge.x0, edge.x1], y=[edge.y0, edge.y1], mode="lines+markers", name=f"{edge.source} → {edge.target}",
            legendgroup=status, showlegend=False, hoverinfo="skip", opacity=0.6,
            line={"color": MODULE_COLOUR[KIND_MODULE[edge.kind]], "width": width, "dash": STATUS_DASH[status]},
            marker={"symbol": "arrow", "angleref": "previous", "size": [0, 10 + 2 * width], "standoff": 10}))
        x, y = _label_point(edge)
        annotations.append({  # its cosine
            "x": x, "y": y, "xref": "x", "yref": "y",
            "text": f"{edge.cosine:.2f}", "showarrow": False, "font": {"size": 11, "color": "#333"},
            "bgcolor": "rgba(255,255,255,0.85)",
            "hovertext": f"{edge.source} → {edge.target}<br>{edge.kind} cosine {edge.cosine:.3f}, "
                         f"{STATUS_TEXT[status].split(': ', 1)[1]}"})
    for status in _statuses(edges):  # one legend entry per line style drawn
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=STATUS_TEXT[status], legendgroup=status,
                                 line={"color": "#555", "width": 2, "dash": STATUS_DASH[status]}))
    symbols = _shapes(nodes, CATEGORY_SYMBOL, INPUT_SYMBOL)
    for module in [m for m in MODULE_COLOUR if m in set(nodes["module"])]:
        group = nodes[nodes["module"] == module]
        records = group.to_dict("records")
        fig.add_trace(go.Scatter(  # its legend entry is a circle: the shapes have entries of their own
            x=group["x"], y=group["y"], mode="markers", name=MODULE_NAME[module], legendgroup=module,
            showlegend=False,
            marker={"size": 18, "color": MODULE_COLOUR[module], "line": {"width": 1, "color": "white"},
                    "symbol": list(symbols[group.index])},
            customdata=[_text(r["url"]) for r in records],
            hovertext=[_hover(r) for r in records], hoverinfo="text"))
        for r in records:
            left = LABEL_SIDE[module] == "left"
            annotations.append({
                "x": r["x"], "y": r["y"], "xref": "x", "yref": "y", "text": _node_text(r), "showarrow": False,
                "font": {"size": 11}, "align": "right" if left else "left", "bgcolor": "rgba(255,255,255,0.7)",
                "xanchor": "right" if left else "left", "yanchor": "middle" if left else "top",
                "xshift": -13 if left else 6, "yshift": 0 if left else -12})
    seed = nodes[nodes["role"] == "seed"]
    fig.add_trace(go.Scatter(
        x=seed["x"], y=seed["y"], mode="markers", name="seed", hoverinfo="skip",
        marker={"size": 26, "symbol": "circle-open", "color": SEED_RING["color"],
                "line": {"width": SEED_RING["width"]}}))
    for module in [m for m in MODULE_COLOUR if m in set(nodes["module"])]:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=MODULE_NAME[module], legendgroup=module,
                                 marker={"size": 12, "color": MODULE_COLOUR[module], "symbol": "circle"}))
    for text, symbol in _shape_legend(symbols, CATEGORY_SYMBOL, INPUT_SYMBOL):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=text,
                                 marker={"size": 11, "color": "#555", "symbol": symbol}))
    layers = sorted(int(layer) for layer in nodes["layer"].unique())
    fig.update_layout(
        title={"text": f"{html.escape(title)}<br><sup>{SUBTITLE}; click a node to open its Neuronpedia page</sup>"},
        width=_html_width(n_layers), height=max(520, 170 * rows + 330),
        xaxis={"tickvals": layers, "ticktext": [f"layer {layer}" for layer in layers], "showgrid": False,
               "zeroline": False, "range": [nodes["x"].min() - 0.6, max(layers) + 0.75]},
        yaxis={"visible": False, "range": [nodes["y"].min() - 0.7, nodes["y"].max() + 0.5]},
        plot_bgcolor="white", annotations=annotations, hovermode="closest",
        legend={"itemsizing": "constant"})
    _save_html(fig, out, post_script=_OPEN_ON_CLICK)


def plot_origins(origins: pd.DataFrame, out: str | Path, pack: str) -> Path:
    """Stacked shares of translated / processed / newborn / from-nowhere per layer."""
    out = _target(out)
    if origins.empty:
        raise FlowdbError(f"pack {pack!r} has no residual features to plot")
    shares = origins.set_index("layer")[list(CATEGORY_COLOUR)].div(origins.set_index("layer")["total"], axis=0)
    shares.columns = [c.replace("_", "-") for c in shares.columns]
    colours = {c.replace("_", "-"): colour for c, colour in CATEGORY_COLOUR.items()}
    return _stacked_shares(shares, colours, out, f"{pack}: origins of residual features",
                           "share of residual features")


def plot_groups(groups: pd.DataFrame, out: str | Path, pack: str) -> Path:
    """Per layer, the shares of active residual features in each activation group (smallest k)."""
    from flowdb.analysis.groups import GROUPS

    out = _target(out)
    k = int(groups["top_k"].min())
    table = groups[groups["top_k"] == k].pivot(index="layer", columns="group", values="share")[list(GROUPS)]
    colours = dict(zip(GROUPS, ["#bbbbbb", "#4c72b0", "#dd8452", "#8172b3", "#55a868", "#64b5cd",
                                "#c44e52", "#937860"]))
    return _stacked_shares(table, colours, out,
                           f"{pack}: activation groups of active residual features (top-{k})",
                           "share of active residual features")


def plot_deactivation(summary: pd.DataFrame, out: str | Path, pack: str) -> Path:
    """Success rate and mean activation change per matcher with 95% intervals, the paper's
    Table 1 figures as reference marks (summary: `deactivation.with_paper(summarise(...))`)."""
    out = _target(out)
    import numpy as np

    x = np.arange(len(summary))
    panels = (("success_rate", "success_lo", "success_hi", "paper_success", "success rate"),
              ("activation_change", "change_lo", "change_hi", "paper_change", "mean activation change"))
    if out.suffix == ".html":
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=[p[-1] for p in panels])
        for col, (metric, lo, hi, paper, _) in enumerate(panels, start=1):
            fig.add_trace(go.Bar(x=summary["matcher"], y=summary[metric], name="flowdb", showlegend=col == 1,
                                 error_y=dict(type="data", array=summary[hi] - summary[metric],
                                              arrayminus=summary[metric] - summary[lo])), row=1, col=col)
            fig.add_trace(go.Scatter(x=summary["matcher"], y=summary[paper], mode="markers", name="paper",
                                     marker=dict(symbol="diamond", size=11, color="black"), showlegend=col == 1),
                          row=1, col=col)
        fig.update_layout(title=f"{pack}: removing each matcher's predecessor (Table 1)")
        return _save_html(fig, out)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab10")(np.arange(len(summary)) % 10)
    for axis, (metric, lo, hi, paper, title) in zip(axes, panels):
        errors = np.vstack([summary[metric] - summary[lo], summary[hi] - summary[metric]])
        axis.bar(x, summary[metric], 0.7, color=colours, yerr=errors, capsize=3, label="flowdb (95% interval)")
        marks = summary[paper].notna()
        axis.scatter(x[marks], summary.loc[marks, paper], marker="D", s=45, color="black", zorder=3,
                     label="paper (Gemma 2 2B)")
        for xi, value, high, n in zip(x, summary[metric], summary[hi], summary["trials"]):
            axis.annotate(f"{value:.2f}\nn={n}", (xi, max(value, high) + 0.02), ha="center", fontsize=7)
        axis.set_xticks(x, summary["matcher"], rotation=30, ha="right")
        axis.set_ylim(min(0, float(summary[lo].min()) * 1.1), 1)
        axis.set_title(title)
    axes[0].legend(frameon=False, fontsize=8, loc="upper left")
    fig.suptitle(f"{pack}: removing each matcher's predecessor at a token (paper's Table 1)")
    return _save(fig, out)


def plot_budget_curve(table: pd.DataFrame, out: str | Path) -> Path:
    """Success rate against training tokens and against SAE quality (mean residual L0, the
    sparsity; explained variance in each point's note), one point per pack, for top-1 cosine
    and the controls; the paper's top-1 as a line."""
    out = _target(out, STATIC)
    plt = _pyplot()
    quality = "residual_l0" if "residual_l0" in table and table["residual_l0"].notna().any() else "residual_ev"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for matcher, part in table.groupby("matcher"):
        if matcher not in ("top-1", "random-active", "exhaustive", "random-top-5"):
            continue
        for axis, x in zip(axes, ("train_tokens", quality)):
            part = part.sort_values(x)
            errors = [part["success_rate"] - part["success_lo"], part["success_hi"] - part["success_rate"]]
            axis.errorbar(part[x], part["success_rate"], yerr=errors, marker="o", capsize=3, label=matcher)
    labels = {"train_tokens": "training tokens per SAE", "residual_l0": "mean residual L0 (log)",
              "residual_ev": "mean residual explained variance"}
    for axis, x in zip(axes, ("train_tokens", quality)):
        axis.axhline(0.65, color="black", linestyle="--", linewidth=1, label="paper, top-1 (65%)")
        axis.set_xlabel(labels[x])
        axis.set_ylabel("success rate")
        axis.set_ylim(0, 1)
        if x != "residual_ev":
            axis.set_xscale("log")
        for _, row in table.drop_duplicates("pack").iterrows():
            axis.annotate(f"{row['pack']}\nEV {row['residual_ev']:.3f}", (row[x], 0.55), fontsize=7,
                          rotation=90, va="top")
    axes[0].legend(frameon=False, fontsize=8, loc="upper left", ncol=2)
    fig.suptitle("Deactivation success against the demo SAEs' training budget and sparsity")
    return _save(fig, out)


def plot_steering_grid(table: pd.DataFrame, out: str | Path, title: str) -> Path:
    """Proxy score (behaviour x coherence) against strength, one line per strategy."""
    out = _target(out)
    steered = table[table["strategy"] != "none"]
    baseline = table.loc[table["strategy"] == "none", "score"]
    if out.suffix == ".html":
        import plotly.graph_objects as go

        fig = go.Figure([go.Scatter(x=part["s"], y=part["score"], mode="lines+markers", name=strategy,
                                    text=part["text"]) for strategy, part in steered.groupby("strategy")])
        fig.update_layout(title=title, xaxis_title="strength s", yaxis_title="proxy score")
        return _save_html(fig, out)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy, part in steered.groupby("strategy"):
        ax.plot(part["s"], part["score"], marker="o", label=strategy)
    if len(baseline):
        ax.axhline(float(baseline.iloc[0]), color="grey", linestyle="--", label="unsteered")
    ax.set_xlabel("strength s")
    ax.set_ylabel("proxy score (behaviour x coherence)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    return _save(fig, out)


def plot_steering_comparison(summary: pd.DataFrame, out: str | Path, title: str) -> Path:
    """Mean proxy score against strength (log axis) per strategy, with 95% interval bands;
    coherence beneath."""
    out = _target(out, STATIC)
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    steered = summary[summary["strategy"] != "none"]
    # Distinct line styles keep two strategies with identical sets both visible.
    styles = {"initial": ("-", "o"), "single-layer": (":", "s"), "cumulative": ("--", "^")}
    for strategy, part in steered.groupby("strategy"):
        part = part.sort_values("strength")
        x = part["strength"].abs()
        style, marker = styles.get(strategy, ("-", "o"))
        line, = top.plot(x, part["score"], linestyle=style, marker=marker, markerfacecolor="none", label=strategy)
        top.fill_between(x, part["score_lo"], part["score_hi"], color=line.get_color(), alpha=0.15)
        bottom.plot(x, part["coherence"], linestyle=style, marker=marker, markerfacecolor="none",
                    color=line.get_color())
    unsteered = summary[summary["strategy"] == "none"]
    if len(unsteered):
        top.axhline(float(unsteered["score"].iloc[0]), color="grey", linestyle="--", label="unsteered")
    top.set_xscale("log")
    grid_values = sorted(steered["strength"].abs().unique())
    bottom.set_xticks(grid_values, [f"{v:g}" for v in grid_values])
    bottom.minorticks_off()
    top.set_ylabel("proxy score")
    top.legend(frameon=False, fontsize=8)
    top.set_title(title, fontsize=9)
    bottom.set_ylabel("coherence")
    bottom.set_xlabel("strength |s| or |r| (log)")
    bottom.set_ylim(0, 1.05)
    return _save(fig, out)


# Link categories (flowdb.flow.link_atlas): same in both sides' colours where the name is shared.
LINK_COLOUR = {"kept": "#4c72b0", "split": "#8172b3", "merged": "#55a868", "shifted": "#ccb974",
               "gone": "#bbbbbb", "new": "#dd8452"}


def plot_link(places: pd.DataFrame, out: str | Path, link: str, module: str = "res") -> Path:
    """Per-layer shares of A's categories (kept/split/shifted/gone) and B's (kept/merged/shifted/new)
    at one module, from a link set's LinkPlace records."""
    from flowdb.flow.link_atlas import A_CATEGORIES, B_CATEGORIES

    out = _target(out)
    rows = places[places["module"] == module].set_index("layer").sort_index()
    if rows.empty:
        raise FlowdbError(f"link set {link!r} has no {module} places; it has "
                          f"{', '.join(sorted(set(places['module']))) or 'none'}")
    panels = []
    for side, names, pack in (("a", A_CATEGORIES, "A"), ("b", B_CATEGORIES, "B")):
        table = rows[[f"{side}_{c}" for c in names]].set_axis(list(names), axis=1)
        panels.append((table, {c: LINK_COLOUR[c] for c in names}, f"{pack}: {rows['n_' + side].iloc[0]:,} "
                       f"features per layer" if rows[f"n_{side}"].nunique() == 1 else pack))
    return _stacked_panels(panels, out, f"link set {link}: categories per layer ({MODULE_NAME[module]})",
                           "share of features")


FAMILY_NODE_CAP = 40  # more features than this and a family tree is not readable


def plot_family(nodes: pd.DataFrame, edges: pd.DataFrame, out: str | Path, title: str) -> Path:
    """A feature's family across linked packs as a layered tree: the feature (column 0), its
    relatives (1), their relatives back (2), edges marked with cosines.
    nodes: key, column, pack, layer, module, index, category, label; edges: source, target, link, cosine."""
    out = _target(out, STATIC)
    if len(nodes) > FAMILY_NODE_CAP:
        raise FlowdbError(f"the family has {len(nodes)} features, too many to draw readably (at most "
                          f"{FAMILY_NODE_CAP}): lower --limit")
    positions: dict[str, tuple[float, float]] = {}
    parents: dict[str, list[str]] = {}
    for edge in edges.itertuples():
        parents.setdefault(edge.target, []).append(edge.source)
    for column in sorted(nodes["column"].unique()):
        keys = list(nodes.loc[nodes["column"] == column, "key"])  # in the order given: best first

        def parent_row(key: str) -> float:
            rows = [positions[p][1] for p in parents.get(key, []) if p in positions]
            return -sum(rows) / len(rows) if rows else 0.0

        keys.sort(key=parent_row)  # stable: children keep their order under one parent
        for row, key in enumerate(keys):
            positions[key] = (float(column), (len(keys) - 1) / 2 - row)
    plt = _pyplot()
    tallest = max(int((nodes["column"] == c).sum()) for c in nodes["column"].unique())
    size = (4.2 * nodes["column"].nunique() + 1.5, max(3.5, 1.25 * tallest + 1.6))
    fig, ax = plt.subplots(figsize=size)
    for edge in edges.itertuples():
        (x0, y0), (x1, y1) = positions[edge.source], positions[edge.target]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                    arrowprops={"arrowstyle": "-", "lw": _width(edge.cosine), "alpha": 0.45, "color": "#555",
                                "shrinkA": 10, "shrinkB": 10})
        ax.text(x0 + 0.5 * (x1 - x0), y0 + 0.5 * (y1 - y0), f"{edge.cosine:.2f}", fontsize=7, ha="center",
                va="center", zorder=2, bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                             "edgecolor": "none", "alpha": 0.85})
    for row in nodes.to_dict("records"):
        x, y = positions[row["key"]]
        category = _text(row["category"])
        ax.scatter([x], [y], s=260, c=LINK_COLOUR.get(category, "#999999"), edgecolors="black" if row["column"] == 0
                   else "white", linewidths=2 if row["column"] == 0 else 1, zorder=3)
        text = "\n".join([row["pack"], f"{_name(row)} · {category}" if category else _name(row),
                          *_wrapped(_text(row["label"]))])
        if row["column"] == 0:  # left of the feature, where no edge runs
            ax.text(x - 0.07, y, text, fontsize=7, ha="right", va="center", zorder=5, parse_math=False)
        else:
            ax.text(x + 0.07, y - 0.12, text, fontsize=7, ha="left", va="top", zorder=5, parse_math=False,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7})
    columns = sorted(nodes["column"].unique())
    ax.set_xticks(columns, ["feature", "its relatives", "their relatives"][:len(columns)])
    ax.set_yticks([])
    ax.set_xlim(-0.6, max(columns) + 0.9)
    ys = [y for _, y in positions.values()]
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.5)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    from matplotlib.lines import Line2D

    drawn = set(nodes["category"].map(_text))
    ax.legend(handles=[Line2D([], [], linestyle="", marker="o", markersize=9, markerfacecolor=colour,
                              markeredgecolor="white", label=name) for name, colour in LINK_COLOUR.items()
                       if name in drawn], loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8,
              title="category in the link", title_fontsize=8)
    ax.set_title(f"{title}\nedge width and number: cosine of the decoder directions", fontsize=10)
    return _save(fig, out, dpi=min(DPI, MAX_PIXELS / max(size)))
