"""Pictures of the flow: one feature's flow graph, and a pack's origins per layer.

PNG and SVG are drawn with matplotlib; HTML with plotly (interactive, hover shows
key, category, label and Neuronpedia URL; the page carries plotly.js itself, so
it opens offline). The format comes from the output file's suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowdb.errors import FlowdbError

FORMATS = (".png", ".svg", ".html")
MODULE_COLOUR = {"res": "#1f77b4", "mlp": "#ff7f0e", "att": "#2ca02c"}
MODULE_NAME = {"res": "residual", "mlp": "MLP", "att": "attention"}
KIND_MODULE = {"residual": "res", "mlp": "mlp", "attention": "att"}  # edge kind -> source module
CATEGORY_COLOUR = {"translated": "#4c72b0", "processed": "#8172b3", "newborn": "#dd8452",
                   "from_nowhere": "#bbbbbb"}
MODULE_X_OFFSET = {"res": 0.0, "mlp": -0.4, "att": -0.4}  # module outputs feed R_L from the left


@dataclass(frozen=True)
class FlowLayout:
    nodes: pd.DataFrame  # with x, y
    edges: pd.DataFrame  # with x0, y0, x1, y1


def _target(out: str | Path) -> Path:
    """The output path, checked for a picture suffix, with its folder made."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise FlowdbError(f"{out}: pictures are written as {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def _stacked_shares(table: pd.DataFrame, colours: dict[str, str], out: Path, title: str, ylabel: str) -> Path:
    """Per-layer stacked bars of shares; table is indexed by layer, one column per part."""
    if out.suffix == ".html":
        import plotly.graph_objects as go

        fig = go.Figure([go.Bar(x=table.index, y=table[name], name=name, marker_color=colour)
                         for name, colour in colours.items()])
        fig.update_layout(barmode="stack", title=title, xaxis_title="layer",
                          yaxis={"title": ylabel, "tickformat": ".0%"})
        fig.write_html(out, include_plotlyjs=True)
        return out
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(table) + 4), 4.2))
    bottom = pd.Series(0.0, index=table.index)
    for name, colour in colours.items():
        ax.bar(table.index, table[name], bottom=bottom, color=colour, label=name)
        bottom += table[name]
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_xticks(table.index)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    return _save(fig, out)


def flow_layout(graph: pd.DataFrame) -> FlowLayout:
    """Layers along x; residual features in the middle rows, MLP above, attention below."""
    nodes = graph[graph["element"] == "node"].copy()
    edges = graph[graph["element"] == "edge"].copy()
    if nodes.empty:
        raise FlowdbError("the flow graph is empty: is the feature reference right?")
    positions = {}
    for layer, group in nodes.groupby("layer"):
        residual = sorted(group.loc[group["module"] == "res", "key"])
        for row, key in enumerate(residual):
            positions[key] = (layer, row - (len(residual) - 1) / 2)
        top = (len(residual) - 1) / 2 if residual else 0
        for row, key in enumerate(sorted(group.loc[group["module"] == "mlp", "key"])):
            positions[key] = (layer + MODULE_X_OFFSET["mlp"], top + 1 + row)
        for row, key in enumerate(sorted(group.loc[group["module"] == "att", "key"])):
            positions[key] = (layer + MODULE_X_OFFSET["att"], -top - 1 - row)
    nodes["x"] = nodes["key"].map(lambda k: positions[k][0])
    nodes["y"] = nodes["key"].map(lambda k: positions[k][1])
    edges = edges[edges["source"].isin(positions) & edges["target"].isin(positions)].copy()
    edges["x0"] = edges["source"].map(lambda k: positions[k][0])
    edges["y0"] = edges["source"].map(lambda k: positions[k][1])
    edges["x1"] = edges["target"].map(lambda k: positions[k][0])
    edges["y1"] = edges["target"].map(lambda k: positions[k][1])
    return FlowLayout(nodes.reset_index(drop=True), edges.reset_index(drop=True))


def _short(row) -> str:
    name = f"{row['layer']}/{row['module']}/{row['index']}"
    label = row.get("label")
    if isinstance(label, str) and label:
        name += "\n" + (label if len(label) <= 28 else label[:27] + "…")
    return name


def plot_flow(graph: pd.DataFrame, out: str | Path, title: str) -> Path:
    out = _target(out)
    layout = flow_layout(graph)
    if out.suffix == ".html":
        _flow_html(layout, out, title)
    else:
        _flow_static(layout, out, title)
    return out


def _width(cosine: float) -> float:
    return 0.5 + 5.0 * max(float(cosine), 0.0)


def _flow_static(layout: FlowLayout, out: Path, title: str) -> None:
    plt = _pyplot()
    nodes, edges = layout.nodes, layout.edges
    n_layers = nodes["layer"].nunique()
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * n_layers), 2.0 + 1.2 * (nodes["y"].max() - nodes["y"].min())))
    for edge in edges.itertuples():
        ax.annotate("", xy=(edge.x1, edge.y1), xytext=(edge.x0, edge.y0),
                    arrowprops={"arrowstyle": "-|>", "lw": _width(edge.cosine), "alpha": 0.55,
                                "color": MODULE_COLOUR[KIND_MODULE[edge.kind]],
                                "shrinkA": 9, "shrinkB": 9})
        ax.text((edge.x0 + edge.x1) / 2, (edge.y0 + edge.y1) / 2, f"{edge.cosine:.2f}",
                fontsize=7, color="#444", ha="center", va="bottom")
    for module, group in nodes.groupby("module"):
        ax.scatter(group["x"], group["y"], s=260, c=MODULE_COLOUR[module], label=MODULE_NAME[module],
                   edgecolors=["black" if r == "seed" else "white" for r in group["role"]],
                   linewidths=[2.5 if r == "seed" else 1 for r in group["role"]], zorder=3)
    for row in nodes.to_dict("records"):
        ax.text(row["x"], row["y"] - 0.28, _short(row), fontsize=7, ha="center", va="top")
    layers = sorted(nodes["layer"].unique())
    ax.set_xticks(layers, [f"layer {int(layer)}" for layer in layers])
    ax.set_yticks([])
    ax.set_xlim(min(layers) - 0.8, max(layers) + 0.5)
    ax.set_ylim(nodes["y"].min() - 1.0, nodes["y"].max() + 0.6)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title + "\nedge width and number: cosine")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save(fig, out)


def _flow_html(layout: FlowLayout, out: Path, title: str) -> None:
    import plotly.graph_objects as go

    nodes, edges = layout.nodes, layout.edges
    fig = go.Figure()
    for edge in edges.itertuples():
        fig.add_trace(go.Scatter(
            x=[edge.x0, edge.x1], y=[edge.y0, edge.y1], mode="lines", showlegend=False,
            line={"width": _width(edge.cosine),
                  "color": MODULE_COLOUR[KIND_MODULE[edge.kind]]},
            opacity=0.55, hoverinfo="text", text=f"{edge.source} → {edge.target}<br>{edge.kind} cosine {edge.cosine:.3f}"))
    for module, group in nodes.groupby("module"):
        hover = [f"<b>{r['key']}</b><br>{r['role']}, {r['category'] or module}<br>{r['label'] or '(no label)'}"
                 f"<br>{r['url'] or ''}" for r in group.to_dict("records")]
        fig.add_trace(go.Scatter(
            x=group["x"], y=group["y"], mode="markers+text", name=MODULE_NAME[module],
            marker={"size": 18, "color": MODULE_COLOUR[module],
                    "line": {"width": [3 if r == "seed" else 1 for r in group["role"]], "color": "black"}},
            text=[f"{r['layer']}/{r['module']}/{r['index']}" for r in group.to_dict("records")],
            textposition="bottom center", hovertext=hover, hoverinfo="text"))
    fig.update_layout(title=title, xaxis={"title": "layer", "dtick": 1}, yaxis={"visible": False},
                      plot_bgcolor="white")
    fig.write_html(out, include_plotlyjs=True)


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
    from flowdb.groups import GROUPS

    out = _target(out)
    k = int(groups["top_k"].min())
    table = groups[groups["top_k"] == k].pivot(index="layer", columns="group", values="share")[list(GROUPS)]
    colours = dict(zip(GROUPS, ["#bbbbbb", "#4c72b0", "#dd8452", "#8172b3", "#55a868", "#64b5cd",
                                "#c44e52", "#937860"]))
    return _stacked_shares(table, colours, out,
                           f"{pack}: activation groups of active residual features (top-{k})",
                           "share of active residual features")


def plot_deactivation(summary: pd.DataFrame, out: str | Path, pack: str) -> Path:
    """Success rate and mean activation change per layer, one bar per matcher."""
    out = _target(out)
    matchers = list(dict.fromkeys(summary["matcher"]))
    layers = sorted(summary["layer"].unique())
    if out.suffix == ".html":
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("success rate", "mean activation change"))
        for matcher in matchers:
            part = summary[summary["matcher"] == matcher]
            for col, metric in ((1, "success_rate"), (2, "activation_change")):
                fig.add_trace(go.Bar(x=part["layer"], y=part[metric], name=matcher, showlegend=col == 1,
                                     legendgroup=matcher), row=1, col=col)
        fig.update_layout(title=f"{pack}: deactivating matched predecessors", barmode="group")
        fig.write_html(out, include_plotlyjs=True)
        return out
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(matchers)
    for axis, metric, title in ((axes[0], "success_rate", "success rate"),
                                (axes[1], "activation_change", "mean activation change")):
        for i, matcher in enumerate(matchers):
            part = summary[summary["matcher"] == matcher].set_index("layer").reindex(layers)
            axis.bar(np.arange(len(layers)) + i * width, part[metric], width, label=matcher)
        axis.set_xticks(np.arange(len(layers)) + width * (len(matchers) - 1) / 2, [f"layer {x}" for x in layers])
        axis.set_title(title)
        axis.set_ylim(min(0, summary[metric].min() * 1.1), 1)
    axes[1].legend(frameon=False)
    fig.suptitle(f"{pack}: deactivating matched predecessors (paper, top-1: 65% success, 0.75 change)")
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
        fig.write_html(out, include_plotlyjs=True)
        return out
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
