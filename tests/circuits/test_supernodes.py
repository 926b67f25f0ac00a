"""Supernode suggestions against planted groups (planted_supernodes.py) in a real Neo4j: a
synthetic pack with known lineage, a target graph tied to it, and background graphs of the
same model, stored once for the module (the tests only read)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from circuit_graphs import broken_copies, circuit_tracer_model
from click.testing import CliRunner
from planted_supernodes import PACK, pairs, plant, samey_graph
from pydantic import ValidationError

from conftest import wipe
from flowdb.circuits.schema import check_graph
from flowdb.circuits.store import delete_graph, export_graph, import_graphs
from flowdb.circuits.supernodes import SupernodeSpec, suggest_supernodes
from flowdb.cli import cli
from helpers import ROOT

SCHEMA = json.loads((ROOT / "tests" / "data" / "neuronpedia-graph-schema.json").read_text())
RECALL, PRECISION = 0.9, 0.9
SEEDS = (0, 1)  # two plantings: each adds its target and 40 graphs to import (~10 s)
TRANSCODER = "cross layer transcoder"
EXPECTED_RULE = {"same": "same-feature", "chain": "lineage", "label": "label", "coact": "co-activation"}


@pytest.fixture(scope="module")
def world(neo4j_settings, tmp_path_factory):
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import SynthSpec, synthesize
    from flowdb.store.connection import connect
    from flowdb.store.ingest import ingest

    folder = tmp_path_factory.mktemp("supernodes")
    truth = synthesize(folder / "pack", SynthSpec(name=PACK, layers=4, d_model=64, width=64, seed=3))
    planted = [plant(truth, seed) for seed in SEEDS]
    for kind in ("graphs", "samey"):
        (folder / kind).mkdir()
    for graphs, _ in planted:
        for slug, document in graphs.items():
            (folder / "graphs" / f"{slug}.json").write_text(json.dumps(document))
    (folder / "samey" / "samey.json").write_text(json.dumps(samey_graph()))
    with connect(neo4j_settings) as db:
        wipe(db)
        ingest(load_manifest(folder / "pack" / "manifest.toml"), db)
        import_graphs(db, [folder / "graphs"], pack=PACK, module="res")
        import_graphs(db, [folder / "samey"])
        measured = [(groups, suggest_supernodes(db, next(s for s in graphs if s.endswith("target"))))
                    for graphs, groups in planted]
        yield db, planted[0][0], planted[0][1], measured[0][1], measured


def invoke(*args):
    return CliRunner().invoke(cli, ["circuits", *map(str, args)])


def test_recall_and_precision_of_pairs_on_planted_groups(world):
    """Node pairs in one suggested supernode against the planted groups' pairs, pooled over
    the plantings (each its own target graph and 40 background graphs)."""
    planted, suggested = set(), set()
    for seed, (groups, suggestions) in zip(SEEDS, world[4]):
        planted |= {(seed, pair) for pair in pairs(groups.values())}
        suggested |= {(seed, pair) for pair in pairs(supernode.node_ids for supernode in suggestions)}
    found = planted & suggested
    recall, precision = len(found) / len(planted), len(found) / max(len(suggested), 1)
    print(f"\nsupernode pairs over {len(SEEDS)} planted graphs: recall {recall:.3f} ({len(found)}/{len(planted)}), "
          f"precision {precision:.3f} ({len(found)}/{len(suggested)})")
    assert recall >= RECALL and precision >= PRECISION, (recall, precision)


@pytest.mark.parametrize("group", list(EXPECTED_RULE))
def test_each_planted_group_is_one_supernode_grouped_by_its_rule(world, group):
    _, _, groups, suggestions, _ = world
    holding = [s for s in suggestions if set(groups[group]) & set(s.node_ids)]
    assert len(holding) == 1 and set(holding[0].node_ids) == set(groups[group]), holding
    assert EXPECTED_RULE[group] in holding[0].rules
    assert holding[0].name.endswith(f"({'+'.join(holding[0].rules)})")
    if group == "label":
        assert holding[0].name.startswith("texas (")


def feature_of(node_id: str) -> str:
    return node_id.rsplit("_", 1)[0]  # "{layer}_{index}"


def test_features_found_everywhere_do_not_co_activate(world):
    db, graphs, _, suggestions, _ = world
    everywhere = set.intersection(*({feature_of(n["node_id"]) for n in g["nodes"] if n["feature_type"] == TRANSCODER}
                                    for slug, g in graphs.items() if slug != "target"))
    nodes = {n["node_id"] for n in graphs["target"]["nodes"] if feature_of(n["node_id"]) in everywhere}
    assert len(nodes) == 2  # two features in every graph: together 40 times, as often as chance gives
    assert not any(nodes & set(s.node_ids) for s in suggestions)
    no_chance_level = suggest_supernodes(db, "target", SupernodeSpec(alpha=1e9))  # any two shared graphs
    assert any(nodes <= set(s.node_ids) for s in no_chance_level)


def outcome(suggestions, rule):
    return next(o for o in suggestions.outcomes if o.rule == rule)


def test_label_similarity_is_compared_with_random_pairs_of_the_graph(world):
    db = world[0]
    alike = suggest_supernodes(db, "samey")
    assert len(alike) == 0 and outcome(alike, "label").accepted == 0  # alike labels are common: none stands out
    floor_only = suggest_supernodes(db, "samey", SupernodeSpec(label_quantile=0.0))
    assert outcome(floor_only, "label").accepted > 0 and all(s.rules == ("label",) for s in floor_only)
    assert "tied to no pack" in outcome(alike, "lineage").chance


def test_bounds_on_layer_span_and_size(world):
    db, _, groups, _, _ = world
    narrow = suggest_supernodes(db, "target", SupernodeSpec(max_layer_span=1))
    assert narrow.refused > 0
    assert all(high - low <= 1 for low, high in (s.layers for s in narrow))
    assert not any(set(groups["chain"]) <= set(s.node_ids) for s in narrow)
    small = suggest_supernodes(db, "target", SupernodeSpec(max_share=0.01))  # at most two features
    assert all(len({feature_of(i) for i in s.node_ids}) <= 2 for s in small)


def test_export_with_supernodes_validates_and_reimports(world, tmp_path):
    db, graphs, _, suggestions, _ = world
    plain = tmp_path / "plain.json"
    assert invoke("export", "target", "--out", plain).exit_code == 0
    assert json.loads(plain.read_text()) == export_graph(db, "target")  # unchanged without --supernodes
    out = tmp_path / "sn.json"
    result = invoke("export", "target", "--out", out, "--supernodes")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    for rule in ("same-feature", "lineage", "family", "co-activation", "label"):
        line = next(line for line in lines if line.startswith(f"{rule}: "))
        assert f"{rule}: {suggestions.count(rule)} supernode" in line
    assert lines[-1].endswith(f"{len(suggestions)} supernodes")
    exported = json.loads(out.read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(exported)
    checked = check_graph(exported, "exported")
    assert checked.qparams.supernodes == [s.as_qparam() for s in suggestions]
    assert {k: v for k, v in exported.items() if k != "qParams"} == {
        k: v for k, v in json.loads(plain.read_text()).items() if k != "qParams"}
    members = {i for s in suggestions for i in s.node_ids}
    assert set(exported["qParams"]["pinnedIds"]) == members
    ids = {n["node_id"] for n in graphs["target"]["nodes"]}
    assert all(set(entry[1:]) <= ids and entry[0] not in ids for entry in exported["qParams"]["supernodes"])
    assert len({entry[0] for entry in exported["qParams"]["supernodes"]}) == len(suggestions)  # unique names
    exported["metadata"]["slug"] = "target-grouped"
    again = tmp_path / "again.json"
    again.write_text(json.dumps(exported))
    try:
        assert "target-grouped: stored" in invoke("import", again).output
        assert export_graph(db, "target-grouped")["qParams"] == exported["qParams"]
    finally:
        delete_graph(db, "target-grouped")  # the module's store stays as planted


def test_export_with_supernodes_validates_with_circuit_tracers_own_model(world, tmp_path):
    """circuit_tracer.frontend.graph_models.Model reads the --supernodes export: its supernodes as
    suggested, the rest as the stored file's; broken copies of it are refused."""
    model = circuit_tracer_model()
    db, graphs, _, suggestions, _ = world
    out = tmp_path / "sn.json"
    assert invoke("export", "target", "--out", out, "--supernodes").exit_code == 0
    exported = json.loads(out.read_text())
    parsed = model.model_validate(exported)
    assert parsed.qParams.supernodes == [s.as_qparam() for s in suggestions] and len(suggestions) > 0
    assert parsed.model_dump(exclude={"qParams"}) == model.model_validate(graphs["target"]).model_dump(
        exclude={"qParams"})
    for why, broken in broken_copies(exported).items():
        with pytest.raises(ValidationError):
            model.model_validate(broken)
            pytest.fail(f"circuit-tracer's model took a copy with {why}")


def test_export_errors_are_one_line(world, tmp_path):
    result = invoke("export", "nope", "--out", tmp_path / "x.json", "--supernodes")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "no attribution graph 'nope'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.json").exists()


def test_family_links_group_features_that_match_one_relative(world):
    """Two distractors both matching one feature of another pack above the link's threshold
    are grouped; a third matching it below the threshold is not (ALIGNS written here, then
    removed, so the module's store stays as planted)."""
    db, graphs, groups, _, _ = world
    grouped = {i for group in groups.values() for i in group}
    distractors = [n["node_id"] for n in graphs["target"]["nodes"]
                   if n["feature_type"] == TRANSCODER and n["node_id"] not in grouped][:3]
    keys = ["{}/{}/res/{}".format(PACK, *feature_of(i).split("_")) for i in distractors]
    db.write("CREATE (:LinkSet {name: 'sn-other', a: $pack, b: 'other'}) "
             "CREATE (g:Feature {key: 'other/0/res/0', pack: 'other', layer: 0, module: 'res', index: 0}) "
             "WITH g UNWIND range(0, 2) AS i MATCH (f:Feature {key: $keys[i]}) "
             "CREATE (f)-[:ALIGNS {link: 'sn-other', rank: 1, cosine: 0.8, above: i < 2}]->(g)", pack=PACK, keys=keys)
    try:
        suggestions = suggest_supernodes(db, "target")
    finally:
        db.write("MATCH (g:Feature {pack: 'other'}) DETACH DELETE g")
        db.write("MATCH (l:LinkSet {name: 'sn-other'}) DELETE l")
    holding = [s for s in suggestions if set(distractors) & set(s.node_ids)]
    assert [(set(s.node_ids), s.rules) for s in holding] == [(set(distractors[:2]), ("family",))]
    assert outcome(suggestions, "family").accepted == 1 and "1 link set" in outcome(suggestions, "family").chance


def test_a_name_without_shared_words_is_the_most_influential_members_label():
    """circuit-tracer's influence is a cumulative share: the smallest is the most influential."""
    from flowdb.circuits.supernodes import _name, _Unit

    units = [_Unit("3", 7, ["3_7_1"], "harbour cranes", influence=0.40),
             _Unit("4", 9, ["4_9_2"], "Austin city", influence=0.05),
             _Unit("5", 2, ["5_2_2"], "river mouths", influence=0.90)]
    assert _name(units, [0, 1, 2], {}) == "Austin city"
