"""scripts/demo.sh picks its feature with scripts/demo-feature.cypher through `flowdb cypher`;
here that query runs the same way against an ingested planted pack."""


from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.packs.manifest import load_manifest
from flowdb.store.export import export_edges
from flowdb.store.ingest import ingest
from helpers import ROOT

STATEMENT = (ROOT / "scripts" / "demo-feature.cypher").read_text()


def expected_feature(edges, category):
    """Independently: the end of the longest run of kept rank-1 residual edges whose features after
    the first are translated, runs with a kept rank-1 MLP or attention input first, ties by key."""
    kept = edges[(edges["rank"] == 1) & edges["above"]]
    residual = kept[kept["kind"] == "RESIDUAL"]
    parent = dict(zip(residual["target"], residual["source"]))
    fed_keys = set(kept.loc[kept["kind"] != "RESIDUAL", "target"])
    has_translated_child = {s for s, t in zip(residual["source"], residual["target"])
                            if category.get(t) == "translated"}
    chains = []
    for end, cat in category.items():
        if cat != "translated" or end in has_translated_child or end not in parent:
            continue
        nodes = [end]
        while category.get(nodes[-1]) == "translated" and nodes[-1] in parent:
            nodes.append(parent[nodes[-1]])
        chains.append((not fed_keys.isdisjoint(nodes), len(nodes) - 1, end))
    chains.sort(key=lambda c: (not c[0], -c[1], c[2]))
    return chains[0]


def test_demo_feature_query(db, planted_pack, tmp_path):
    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
    edges = export_edges(db, "planted", tmp_path / "edges.csv")
    category = {row["key"]: row["category"] for row in db.read(
        "MATCH (f:Feature {pack: 'planted', module: 'res'}) RETURN f.key AS key, f.category AS category")}
    fed, steps, key = expected_feature(edges, category)
    assert fed and steps >= 2  # the planted lineage has long chains fed by MLP or attention
    result = CliRunner().invoke(cli, ["cypher", STATEMENT, "-p", "pack=planted", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["feature", key]
