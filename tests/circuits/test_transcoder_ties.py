"""circuits import ties a graph's transcoder feature nodes, without --pack, to the one stored
pack whose mlp module is the transcoder set the graph's metadata.scan names; each line
of the report says which pack, or why none (real Neo4j, graphs in circuit-tracer's JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

from circuit_graphs import write_graphs
from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.packs.manifest import load_manifest
from flowdb.packs.synth import SynthSpec, synthesize
from flowdb.store.ingest import ingest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packs"))
from transcoder_sets import transcoder_manifest, write_transcoder_set  # noqa: E402

SCAN = "synth-model"  # what circuit_graphs.make_graph writes as metadata.scan


def invoke(*args):
    return CliRunner().invoke(cli, ["circuits", *map(str, args)])


def ties(db) -> dict:
    return {(r["g"], r["n"]): r["f"] for r in db.read(
        "MATCH (n:GraphNode)-[:IS]->(f:Feature) RETURN n.graph AS g, n.node_id AS n, f.key AS f")}


def expected(graphs, pack) -> dict:
    return {(slug, n["node_id"]): "{}/{}/mlp/{}".format(pack, *n["node_id"].split("_")[:2])
            for slug, g in graphs.items() for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"}


def test_feature_nodes_are_tied_to_the_one_pack_of_their_scan(db, tmp_path):
    graphs = write_graphs(tmp_path / "graphs", 4, seed=5)
    pack_dir = tmp_path / "pack"
    synthesize(pack_dir, SynthSpec(name="tiny", layers=4, d_model=64, width=64, seed=3))
    set_dir = write_transcoder_set(pack_dir, tmp_path / "set", 4, scan=SCAN)

    alone = invoke("import", tmp_path / "graphs")  # no pack stored: nothing to tie to, and it says why
    assert alone.exit_code == 0, alone.output
    assert alone.output.count(f"feature nodes not tied: no stored pack's mlp module is a transcoder set of "
                              f"scan {SCAN!r}") == len(graphs), alone.output
    assert not ties(db)

    ingest(load_manifest(pack_dir / "manifest.toml"), db)  # MLP SAEs: never chosen automatically
    ingest(load_manifest(transcoder_manifest(pack_dir, set_dir, tmp_path / "tc.toml", name="tiny-tc")), db)
    stale = invoke("import", tmp_path / "graphs")
    assert stale.exit_code == 1 and len(stale.output.strip().splitlines()) == 1
    assert "is stored tied to no pack, not tied to pack 'tiny-tc' (mlp); pass --replace" in stale.output
    tied = invoke("import", tmp_path / "graphs", "--replace")
    assert tied.exit_code == 0, tied.output
    assert tied.output.count(f"feature nodes tied to pack tiny-tc (its mlp module is the transcoder set of "
                             f"scan {SCAN!r})") == len(graphs), tied.output
    assert ties(db) == expected(graphs, "tiny-tc")
    assert db.read("MATCH (g:AttributionGraph) RETURN collect(DISTINCT g.pack) AS p")[0]["p"] == ["tiny-tc"]
    assert invoke("import", tmp_path / "graphs").output.count("nothing to do") == len(graphs)

    # A second pack of the same set: the choice is ambiguous, so nothing is tied, and it says so.
    ingest(load_manifest(transcoder_manifest(pack_dir, set_dir, tmp_path / "tc2.toml", name="tiny-tc2")), db)
    ambiguous = invoke("import", tmp_path / "graphs", "--replace")
    assert ambiguous.exit_code == 0, ambiguous.output
    assert ambiguous.output.count(f"feature nodes not tied: packs 'tiny-tc', 'tiny-tc2' all have the transcoder "
                                  f"set of scan {SCAN!r}; choose one with --pack") == len(graphs), ambiguous.output
    assert not ties(db)
    chosen = invoke("import", tmp_path / "graphs", "--replace", "--pack", "tiny-tc2")
    assert chosen.exit_code == 0, chosen.output
    assert ties(db) == expected(graphs, "tiny-tc2")
