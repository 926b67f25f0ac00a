"""`flowdb export`: every stored match edge of a pack as CSV or Parquet."""

from __future__ import annotations

from pathlib import Path

from flowdb import graph
from flowdb.database import Database
from flowdb.errors import FlowdbError
from flowdb.queries import run_template
from flowdb.writes import atomic_write

FORMATS = (".csv", ".parquet")


def export_edges(db: Database, pack: str, out: str | Path):
    """Write the pack's edges to out (format from its suffix); returns them as written
    (a DataFrame whose attrs say when the pack is incomplete)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise FlowdbError(f"{out}: export writes {' or '.join(FORMATS)} files")
    graph.require_pack(db, pack)
    edges = run_template(db, "edges", {"pack": pack})
    with atomic_write(out) as partial:  # a failed export leaves no half file
        if out.suffix == ".csv":
            edges.to_csv(partial, index=False)
        else:
            edges.to_parquet(partial, index=False)
    return edges
