"""flowdb delete says what goes before --yes, and what went after: features, edges, labels no
other pack uses, and each link set of the pack, with the packs it links (its ALIGNS leave the
pack that stays too)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from flowdb.cli import cli


@pytest.fixture
def linked_packs(db, tmp_path):
    """Two small linked planted packs, 'dl' and its companion 'dl-split'; a label on a feature of
    each pack alone and one shared by both."""
    from flowdb.flow.link_spec import LinkSpec
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import SynthSpec, synthesize
    from flowdb.store.ingest import ingest
    from flowdb.store.links import link_packs

    synthesize(tmp_path, SynthSpec(name="dl", layers=2, d_model=256, width=64, seed=3, companions=True))
    for manifest in (tmp_path / "manifest.toml", tmp_path / "split" / "manifest.toml"):
        ingest(load_manifest(manifest), db, show_progress=False)
    link_packs(db, "dl", "dl-split", LinkSpec(k=1))
    db.write("MATCH (a:Feature {key: 'dl/1/res/0'}), (b:Feature {key: 'dl-split/1/res/0'}) "
             "CREATE (:Explanation {id: 'mine', description: 'mine'})-[:EXPLAINS]->(b), "
             "(:Explanation {id: 'theirs', description: 'theirs'})-[:EXPLAINS]->(a), "
             "(s:Explanation {id: 'shared', description: 'shared'}), (s)-[:EXPLAINS]->(a), (s)-[:EXPLAINS]->(b)")
    return db


def count(db, cypher: str) -> int:
    return db.read(cypher + " RETURN count(*) AS n")[0]["n"]


def test_delete_of_a_linked_pack_names_its_link_sets_before_and_after(linked_packs):
    db = linked_packs
    features = count(db, "MATCH (f:Feature {pack: 'dl-split'})")
    edges = count(db, "MATCH ()-[:RESIDUAL|MLP|ATTENTION]->(:Feature {pack: 'dl-split'})")
    aligns = count(db, "MATCH ()-[:ALIGNS {link: 'dl--dl-split'}]->()")
    assert features and edges and aligns

    asked = CliRunner().invoke(cli, ["delete", "dl-split"])
    assert asked.exit_code == 1 and asked.output.count("\n") == 1, asked.output
    line = asked.output
    assert f"this deletes pack 'dl-split' ({features:,} features, {edges:,} edges, 1 label no other pack uses" in line
    assert (f"link set 'dl--dl-split' (linking dl and dl-split) and its {aligns:,} ALIGNS relationships, "
            "on pack 'dl' too") in line
    assert "--yes" in line
    assert count(db, "MATCH ()-[:ALIGNS]->()") == aligns  # nothing went

    done = CliRunner().invoke(cli, ["delete", "dl-split", "--yes"])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        f"deleted pack 'dl-split': {features:,} features, {edges:,} edges, 1 label no other pack uses",
        f"deleted link set 'dl--dl-split' (linking dl and dl-split) and its {aligns:,} ALIGNS relationships, "
        "on pack 'dl' too"]
    assert count(db, "MATCH ()-[:ALIGNS]->()") == 0 and count(db, "MATCH (l:LinkSet)") == 0
    assert {row["id"] for row in db.read("MATCH (e:Explanation) RETURN e.id AS id")} == {"theirs", "shared"}


def test_delete_of_a_pack_without_links_says_no_link_set(linked_packs):
    CliRunner().invoke(cli, ["delete", "dl-split", "--yes"])
    asked = CliRunner().invoke(cli, ["delete", "dl"])
    assert asked.exit_code == 1 and "link set" not in asked.output, asked.output
    assert "edges, 2 labels no other pack uses) from" in asked.output, asked.output  # 'theirs', and 'shared' now
