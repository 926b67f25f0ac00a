"""`flowdb export`: every stored match edge of a pack as CSV or Parquet, in the flow
atlas's edge schema (flowdb.flow.atlas.EDGE_SCHEMA, plus the target's layer)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from flowdb.errors import FlowdbError
from flowdb.flow.atlas import EDGE_SCHEMA
from flowdb.modules import MODULES, RESIDUAL
from flowdb.store import graph
from flowdb.store.database import Database
from flowdb.store.templates import run_template
from flowdb.writes import atomic_write

FORMATS = (".csv", ".parquet")


def export_edges(db: Database, pack: str, out: str | Path):
    """Write the pack's edges to out (format from its suffix); returns them as written
    (a DataFrame whose attrs say when the pack is incomplete)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise FlowdbError(f"{out}: export writes {' or '.join(FORMATS)} files")
    graph.require_pack(db, pack)
    edges = atlas_edges(pack, run_template(db, "edges", {"pack": pack}))
    with atomic_write(out) as partial:  # a failed export leaves no half file
        if out.suffix == ".csv":
            edges.to_csv(partial, index=False)
        else:
            edges.to_parquet(partial, index=False)
    return edges


def atlas_edges(pack: str, stored: pd.DataFrame) -> pd.DataFrame:
    """The `edges` template's rows in the atlas's columns: feature keys, the relationship
    type as stored (RESIDUAL, MLP, ATTENTION), `above`, and the target's layer last."""
    def key(layer, module, index) -> pd.Series:
        return pack + "/" + layer.astype(str) + "/" + module + "/" + index.astype(str)

    kinds = {module.edge_type.lower(): module.edge_type for module in MODULES.values()}
    frame = pd.DataFrame({
        "source": key(stored["src_layer"], stored["src_module"], stored["src_index"]),
        "target": key(stored["dst_layer"], RESIDUAL.name, stored["dst_index"]),
        "kind": stored["kind"].map(kinds), "cosine": stored["cosine"], "rank": stored["rank"],
        "above": stored["above"], "source_layer": stored["src_layer"], "source_module": stored["src_module"],
        "source_index": stored["src_index"], "target_index": stored["dst_index"]})
    if frame["above"].isna().any():  # a build from before per-edge thresholds were stored
        frame["above"] = frame["above"].astype("boolean")
        schema = {**EDGE_SCHEMA, "above": "boolean"}
    else:
        schema = EDGE_SCHEMA
    frame = frame.astype(schema)
    frame["layer"] = stored["dst_layer"].astype("int64")
    frame.attrs = stored.attrs
    return frame
