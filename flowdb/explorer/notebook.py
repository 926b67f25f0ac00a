"""flowdb.show(): the explorer's flow graph view inline in Jupyter, with no server.

The cell's HTML carries the view's data, the explorer's own flow.js and plotly.js (from
the plotly wheel, so it works offline, as plotly's own include_plotlyjs=True does).
Data goes into the page as JSON with every "<" escaped, so no label can close the
script it sits in.
"""

from __future__ import annotations

import html
import json
import uuid
from functools import lru_cache

from flowdb.explorer import data
from flowdb.explorer.assets import STATIC, plotly_js
from flowdb.views import marks


@lru_cache(maxsize=1)
def _assets() -> tuple[str, str]:
    return plotly_js().read_text(encoding="utf-8"), (STATIC / "flow.js").read_text(encoding="utf-8")


def script_json(value) -> str:
    """JSON safe inside a <script> element."""
    return (json.dumps(value, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


class FlowView:
    """A feature's flow graph as the explorer draws it; Jupyter shows it through _repr_html_."""

    def __init__(self, view: dict):
        self.view = view

    @property
    def too_big(self) -> dict | None:
        return self.view.get("too_big")

    def frame(self):
        """The view as the flow-graph template's rows (a pandas DataFrame)."""
        return data.flow_frame(self.view)

    def __repr__(self) -> str:
        if self.too_big:
            return f"FlowView({self.view['seed']}: {self.too_big['message']})"
        return f"FlowView({self.view['seed']}: {len(self.view['nodes'])} features, {len(self.view['edges'])} edges)"

    def _repr_html_(self) -> str:
        title = f"flow graph of {self.view['seed']}"
        if self.too_big:
            return f"<p><b>{html.escape(title)}</b>: {html.escape(self.too_big['message'])}</p>"
        plotly, flow = _assets()
        element = f"flowdb-{uuid.uuid4().hex}"
        return (f'<div><p><b>{html.escape(title)}</b> ({len(self.view["nodes"])} features; click a node to open '
                f'its Neuronpedia page)</p><div id="{element}"></div></div>'
                f"<script>if (!window.Plotly) {{ {plotly} }}</script><script>{flow}</script>"
                f"<script>(function () {{ var view = {script_json(self.view)}; "
                f"FlowView.draw(document.getElementById('{element}'), view, {script_json(marks.view_config())}, "
                "function (key) { var n = view.nodes.find(function (x) { return x.key === key; }); "
                "if (n && n.url) window.open(n.url, '_blank', 'noopener'); }); })();</script>")


def show(feature: str, db=None, *, t_res: float | None = None, t_mod: float | None = None, max_rank: int = 1,
         every_edge: bool = False, depth: int = 3) -> FlowView:
    """The flow graph of `feature` (a key, Neuronpedia URL or MODEL/SOURCE/INDEX) for a notebook.

    >>> flowdb.show("gemma-2-2b-gemmascope-16k/24/res/14548", depth=4)

    Without db, connects as the CLI does (NEO4J_* variables, else the managed server)."""
    from flowdb.store.connection import connect
    from flowdb.store.features import resolve_feature

    flt = data.EdgeFilter.parse({"t_res": t_res, "t_mod": t_mod, "max_rank": max_rank, "every_edge": every_edge})
    depth = data.parse_depth(depth)
    if db is not None:
        return FlowView(data.flow(data.TimeLimited(db), resolve_feature(db, feature), flt, depth))
    with connect() as database:
        return FlowView(data.flow(data.TimeLimited(database), resolve_feature(database, feature), flt, depth))
