"""`flowdb export`: every stored match edge of a pack as CSV or Parquet."""

from __future__ import annotations

from pathlib import Path

from flowdb.database import Database
from flowdb.errors import FlowdbError
from flowdb.graph_writer import stored_pack
from flowdb.queries import run_template

FORMATS = (".csv", ".parquet")


def export_edges(db: Database, pack: str, out: str | Path) -> int:
    """Write the pack's edges to out (format from its suffix); returns the row count."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise FlowdbError(f"{out}: export writes {' or '.join(FORMATS)} files")
    if stored_pack(db, pack) is None:
        raise FlowdbError(f"no pack named {pack!r} in {db.uri}")
    edges = run_template(db, "edges", {"pack": pack})
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        edges.to_csv(out, index=False)
    else:
        edges.to_parquet(out, index=False)
    return len(edges)
