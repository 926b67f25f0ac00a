"""What a build costs the managed Neo4j's disk, per node and per relationship: the
figures behind flowdb.store.server's BOLT_COST and BULK_COST.

    .venv/bin/python benchmarks/measure_store_bytes.py [--layers 4] [--width 1024] [--d-model 128]

Two planted packs of one shape, matched at k=1 and at k=8, have the same nodes and
different relationships, so their two costs solve for a cost per node and one per
relationship. Each is measured as the disk blocks (what df counts) of the database's
store and transaction-log directories with the server stopped (a clean shutdown
checkpoints every page to disk), after minus before:
  bolt    a fresh managed Neo4j 5.26 gets flowdb's schema, then both packs, one after
          the other, over Bolt (flowdb.store.ingest.load); also the cost of deleting the k=1
          pack again, which a replacement pays for the build it replaces
  bulk    a fresh server per pack, loaded by neo4j-admin import (flowdb.store.bulk); the
          import files' own bytes are counted too (they are on disk during the import)
Servers are private to the run (own store and port, the jars linked in) and deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import connect_to, private_server  # noqa: E402


def disk_bytes(*directories: Path) -> int:
    """Blocks allocated under the directories, in bytes (as du, and as a full disk, count them)."""
    return sum(path.lstat().st_blocks * 512 for directory in directories if directory.exists()
               for path in [directory, *directory.rglob("*")])


def stopped_bytes(server) -> tuple[int, tuple[int, int]]:
    """The database's disk blocks with the server stopped (a clean shutdown checkpoints
    every page to disk; Community has no db.checkpoint()), and its nodes and
    relationships, counted after it has started again."""
    server.stop()
    size = disk_bytes(*server.store_dirs())
    server.start()
    with connect_to(server) as db:
        return size, (db.read("MATCH (n) RETURN count(n) AS n")[0]["n"],
                      db.read("MATCH ()-[r]->() RETURN count(r) AS n")[0]["n"])


def solve(steps: list[tuple[int, int, int]]) -> tuple[float, float]:
    """Bytes per node and per relationship that fit (nodes, relationships, bytes) best."""
    a = np.array([[n, r] for n, r, _ in steps], dtype=float)
    b = np.array([cost for _, _, cost in steps], dtype=float)
    per_node, per_relationship = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(per_node), float(per_relationship)


def atlases(work: Path, args) -> dict[int, Path]:
    from flowdb.flow.atlas import match
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.plan import make_plan
    from flowdb.packs.synth import SynthSpec, synthesize

    out = {}
    for k in (1, 8):
        pack = work / f"pack-k{k}"
        synthesize(pack, SynthSpec(name=f"measure-k{k}", layers=args.layers, d_model=args.d_model,
                                   width=args.width, seed=k))
        out[k] = work / f"atlas-k{k}"
        match(make_plan(load_manifest(pack / "manifest.toml", k=k)), out[k])
    return out


def measure_bolt(found: dict[int, Path]) -> dict:
    from flowdb.flow.atlas import Atlas
    from flowdb.store.graph import drop_pack, ensure_schema
    from flowdb.store.ingest import load

    steps = []
    with private_server("measure-bolt") as server:
        with connect_to(server) as db:
            ensure_schema(db)
        before, (n0, r0) = stopped_bytes(server)
        for k in (1, 8):
            with connect_to(server) as db:
                load(Atlas.open(found[k]), db, show_progress=False)
            after, (n1, r1) = stopped_bytes(server)
            steps.append((n1 - n0, r1 - r0, after - before))
            before, n0, r0 = after, n1, r1
        with connect_to(server) as db:
            drop_pack(db, "measure-k1")
        after, (n1, r1) = stopped_bytes(server)
        deleted = (n0 - n1, r0 - r1, after - before)
    per_node, per_relationship = solve(steps)
    return {"steps": steps, "per_node": per_node, "per_relationship": per_relationship,
            "delete": deleted, "delete_per_item": deleted[2] / max(deleted[0] + deleted[1], 1)}


def measure_bulk(found: dict[int, Path]) -> dict:
    from flowdb.flow.atlas import Atlas
    from flowdb.store.bulk import BulkPack, bulk_load, write_import_files
    from flowdb.store.graph import ensure_schema

    steps, files = [], []
    for k in (1, 8):
        pack = BulkPack.from_atlas(Atlas.open(found[k]))
        with tempfile.TemporaryDirectory() as directory:
            written = write_import_files(Path(directory) / "files", [pack])
            files.append((written.n_nodes, written.n_relationships, disk_bytes(written.directory)))
        with private_server(f"measure-bulk-k{k}") as server:
            with connect_to(server) as db:
                ensure_schema(db)
            before, (n0, r0) = stopped_bytes(server)
            bulk_load(server, [pack])
            after, (n1, r1) = stopped_bytes(server)
            steps.append((n1 - n0, r1 - r0, after - before))
    per_node, per_relationship = solve(steps)
    files_node, files_relationship = solve(files)
    return {"steps": steps, "per_node": per_node, "per_relationship": per_relationship,
            "files": files, "files_per_node": files_node, "files_per_relationship": files_relationship}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("FLOWDB_NEO4J_HEAP", "1g")
    os.environ.setdefault("FLOWDB_NEO4J_PAGECACHE_MB", "256")
    with tempfile.TemporaryDirectory() as work:
        found = atlases(Path(work), args)
        for name, measure in (("bolt", measure_bolt), ("bulk", measure_bulk)):
            print(json.dumps({name: measure(found)}), flush=True)


if __name__ == "__main__":
    main()
