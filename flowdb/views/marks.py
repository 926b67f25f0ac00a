"""The marks a flow graph is drawn with, shared by the pictures (flowdb.views.plots) and the
explorer's flow view (flowdb/explorer/static/flow.js, which gets them from view_config).
Read FLOW_NODE_CAP through this module (marks.FLOW_NODE_CAP), so that one setting reaches both."""

from __future__ import annotations

MODULE_COLOUR = {"res": "#1f77b4", "mlp": "#ff7f0e", "att": "#2ca02c"}
MODULE_NAME = {"res": "residual", "mlp": "MLP", "att": "attention"}
MODULE_X_OFFSET = {"res": 0.0, "mlp": -0.4, "att": -0.4}  # module outputs feed R_L from the left
FLOW_NODE_CAP = 60  # more nodes than this and a flow graph is summarised, not drawn


def view_config() -> dict:
    """What flow.js draws with: module colours, names and offsets, and the node cap."""
    return {"colours": MODULE_COLOUR, "names": MODULE_NAME, "offsets": MODULE_X_OFFSET,
            "flow_node_cap": FLOW_NODE_CAP}
