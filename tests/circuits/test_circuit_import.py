"""flowdb circuits import / list / delete / export against a real Neo4j, checked against the files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
from circuit_graphs import broken_copies, circuit_tracer_model, make_graph, write_graphs
from click.testing import CliRunner
from pydantic import ValidationError

from flowdb.circuits.schema import check_graph
from flowdb.circuits.store import import_graphs
from flowdb.cli import cli
from helpers import ROOT

SCHEMA = json.loads((ROOT / "tests" / "data" / "neuronpedia-graph-schema.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    return folder, write_graphs(folder, 6, seed=1)


def invoke(*args):
    return CliRunner().invoke(cli, ["circuits", *map(str, args)])


def stored_counts(db) -> dict:
    return db.read("OPTIONAL MATCH (g:AttributionGraph) WITH count(g) AS graphs "
                   "OPTIONAL MATCH (n:GraphNode) WITH graphs, count(n) AS nodes "
                   "OPTIONAL MATCH (:GraphNode)-[r]->() RETURN graphs, nodes, count(r) AS rels")[0]


def stored_state(db) -> dict:
    """Everything the graphs stored: each node's and relationship's properties."""
    nodes = db.read("MATCH (n:GraphNode) RETURN n.graph AS g, n.node_id AS id, properties(n) AS p")
    links = db.read("MATCH (s:GraphNode)-[r:ATTRIBUTES]->(t:GraphNode) "
                    "RETURN s.graph AS g, s.node_id AS s, t.node_id AS t, r.weight AS w, r.ord AS o")
    graphs = db.read("MATCH (g:AttributionGraph) RETURN properties(g) AS p")
    return {"nodes": {(r["g"], r["id"]): r["p"] for r in nodes},
            "links": {(r["g"], r["s"], r["t"]): (r["w"], r["o"]) for r in links},
            "graphs": {r["p"]["slug"]: r["p"] for r in graphs}}


def test_import_stores_every_node_and_exact_weight(db, folder):
    path, graphs = folder
    result = invoke("import", path)
    assert result.exit_code == 0, result.output
    assert result.output.count("stored from") == len(graphs)
    state = stored_state(db)
    assert stored_counts(db) == {"graphs": len(graphs), "nodes": sum(len(g["nodes"]) for g in graphs.values()),
                                 "rels": sum(len(g["links"]) for g in graphs.values())}
    expected = {(slug, link["source"], link["target"]): link["weight"]
                for slug, g in graphs.items() for link in g["links"]}
    assert {key: w for key, (w, _) in state["links"].items()} == expected  # exactly equal floats
    kinds = {"cross layer transcoder": "feature", "mlp reconstruction error": "error",
             "embedding": "embedding", "logit": "logit"}
    for slug, g in graphs.items():
        for node in g["nodes"]:
            props = state["nodes"][(slug, node["node_id"])]
            assert props["kind"] == kinds[node["feature_type"]]
            assert props["layer"] == str(node["layer"]) and props["ctx_idx"] == node["ctx_idx"]
            for field in ("feature", "influence", "activation", "clerp"):
                if node.get(field) is not None:
                    assert props[field] == node[field], field
            assert props["is_target_logit"] == node.get("is_target_logit", False)
        meta = state["graphs"][slug]
        assert (meta["scan"], meta["prompt"], meta["prompt_tokens"], meta["node_threshold"]) == (
            g["metadata"]["scan"], g["metadata"]["prompt"], g["metadata"]["prompt_tokens"], 0.8)
        assert meta["digest"] == hashlib.sha256((path / f"{slug}.json").read_bytes()).hexdigest()


def test_reimport_changes_nothing(db, folder):
    path, graphs = folder
    assert invoke("import", path).exit_code == 0
    before = stored_state(db)
    result = invoke("import", *sorted(path.glob("g*.json")))
    assert result.exit_code == 0, result.output
    assert result.output.count("nothing to do") == len(graphs)
    assert stored_state(db) == before


def test_changed_file_needs_replace(db, folder, tmp_path):
    path, graphs = folder
    assert invoke("import", path).exit_code == 0
    before = stored_state(db)
    changed = make_graph("g02", seed=99)
    changed_file = tmp_path / "changed.json"
    changed_file.write_text(json.dumps(changed))
    result = invoke("import", changed_file)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "changed.json" in lines[0] and "metadata.slug" in lines[0] and "--replace" in lines[0]
    assert stored_state(db) == before
    result = invoke("import", changed_file, "--replace")
    assert result.exit_code == 0 and "g02: replaced" in result.output
    after = stored_state(db)
    assert {k: w for k, (w, _) in after["links"].items() if k[0] == "g02"} == {
        ("g02", link["source"], link["target"]): link["weight"] for link in changed["links"]}
    assert {k for k in after["nodes"] if k[0] == "g02"} == {("g02", n["node_id"]) for n in changed["nodes"]}
    others = {k: v for k, v in before["links"].items() if k[0] != "g02"}
    assert {k: v for k, v in after["links"].items() if k[0] != "g02"} == others


def _bad_files(tmp_path: Path) -> list[tuple[Path, str]]:
    good = make_graph("bad", seed=5)
    cases = []

    def write(name, text, field):
        path = tmp_path / name
        path.write_text(text)
        cases.append((path, field))

    write("not-json.json", json.dumps(good)[:-20], "not JSON")
    missing = json.loads(json.dumps(good))
    del missing["nodes"][3]["ctx_idx"]
    write("missing.json", json.dumps(missing), "nodes[3].ctx_idx")
    wrong = json.loads(json.dumps(good))
    wrong["links"][2]["weight"] = "0.5"
    write("wrong-type.json", json.dumps(wrong), "links[2].weight")
    unknown = json.loads(json.dumps(good))
    unknown["links"][4]["target"] = "9_9_9"
    write("unknown-node.json", json.dumps(unknown), "links[4].target")
    write("top-level-list.json", json.dumps([good]), "top level must be a JSON object")
    nodes_object = json.loads(json.dumps(good))
    nodes_object["nodes"] = {"a": 1}
    write("nodes-object.json", json.dumps(nodes_object), "nodes: input should be a valid list")
    (tmp_path / "latin1.json").write_bytes(json.dumps(good).replace("t", "\u00e9").encode("latin-1"))
    cases.append((tmp_path / "latin1.json", "not JSON"))
    no_meta = json.loads(json.dumps(good))
    del no_meta["metadata"]["slug"]
    write("no-slug.json", json.dumps(no_meta), "metadata.slug")
    return cases


def test_each_bad_file_is_one_line_and_nothing_is_stored(db, folder, tmp_path):
    path, _ = folder
    for bad, field in _bad_files(tmp_path):
        result = invoke("import", path, bad)  # good files first: still nothing stored
        assert result.exit_code == 1, (bad, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("Error: ") and str(bad) in lines[0] and field in lines[0], lines[0]
        assert stored_counts(db) == {"graphs": 0, "nodes": 0, "rels": 0}


def test_export_round_trip(db, folder, tmp_path):
    path, graphs = folder
    assert invoke("import", path).exit_code == 0
    before = stored_state(db)
    for slug, g in graphs.items():
        out = tmp_path / f"out-{slug}.json"
        result = invoke("export", slug, "--out", out)
        assert result.exit_code == 0, result.output
        exported = json.loads(out.read_text())
        jsonschema.Draft7Validator(SCHEMA).validate(exported)
        original = check_graph(g, "original")
        again = check_graph(exported, "exported")
        assert again.document == original.document and again.content_digest == original.content_digest
        assert exported["links"] == g["links"] and exported["metadata"] == g["metadata"]
        assert [n["layer"] for n in exported["nodes"]] == [n["layer"] for n in g["nodes"]]
        result = invoke("import", out)
        assert result.exit_code == 0 and "nothing to do" in result.output
    assert stored_state(db) == before


def test_exports_validate_with_circuit_tracers_own_model(db, folder, tmp_path):
    """Each plain export parses with circuit_tracer.frontend.graph_models.Model into what the
    original file parses into; the same model refuses broken copies of it."""
    model = circuit_tracer_model()
    path, graphs = folder
    assert invoke("import", path).exit_code == 0
    for slug, g in graphs.items():
        out = tmp_path / f"{slug}.json"
        assert invoke("export", slug, "--out", out).exit_code == 0
        exported = json.loads(out.read_text())
        if all(isinstance(n["layer"], str) for n in g["nodes"]):  # as circuit-tracer writes them
            assert model.model_validate(exported).model_dump() == model.model_validate(g).model_dump()
        else:  # integer layers (Neuronpedia's schema allows them): refused in the file as in its export
            for document in (g, exported):
                with pytest.raises(ValidationError, match="layer"):
                    model.model_validate(document)
        for why, broken in broken_copies(exported).items():
            with pytest.raises(ValidationError):
                model.model_validate(broken)
                pytest.fail(f"{slug}: circuit-tracer's model took a copy with {why}")
    assert sum(isinstance(g["nodes"][-1]["layer"], int) for g in graphs.values()) == 1  # both cases ran


def test_list_and_delete(db, folder):
    path, graphs = folder
    assert invoke("list").output.strip() == "(no attribution graphs)"
    assert invoke("import", path).exit_code == 0
    listed = invoke("list").output.strip().splitlines()
    assert [line.split("\t")[0] for line in listed] == sorted(graphs)
    result = invoke("delete", "g03")
    assert result.exit_code == 1 and "--yes" in result.output
    assert stored_counts(db)["graphs"] == len(graphs)
    result = invoke("delete", "g03", "--yes")
    assert result.exit_code == 0, result.output
    assert not db.read("MATCH (n:GraphNode {graph: 'g03'}) RETURN n LIMIT 1")
    assert stored_counts(db)["graphs"] == len(graphs) - 1
    missing = invoke("delete", "g03", "--yes")
    assert missing.exit_code == 1 and "no attribution graph 'g03'" in missing.output
    assert invoke("export", "nope", "--out", "x.json").exit_code == 1


def test_two_files_one_slug_other_content_refused(db, tmp_path):
    for i, seed in enumerate((1, 2)):
        (tmp_path / f"{i}.json").write_text(json.dumps(make_graph("same", seed)))
    result = invoke("import", tmp_path / "0.json", tmp_path / "1.json")
    assert result.exit_code == 1 and "metadata.slug" in result.output
    assert stored_counts(db)["graphs"] == 0


def test_unsupported_node_type_is_refused(db, tmp_path):
    graph = make_graph("lorsa", 3)
    graph["nodes"][-1]["feature_type"] = "lorsa"
    (tmp_path / "l.json").write_text(json.dumps(graph))
    with pytest.raises(Exception, match=r"nodes\[\d+\]\.feature_type: 'lorsa' is not supported"):
        import_graphs(db, [tmp_path / "l.json"])


def test_pack_ties_feature_nodes_to_its_features(db, folder, tmp_path):
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import SynthSpec, synthesize
    from flowdb.store.ingest import ingest

    path, graphs = folder
    synthesize(tmp_path / "pack", SynthSpec(name="tiny", layers=4, d_model=64, width=64, seed=3))
    ingest(load_manifest(tmp_path / "pack" / "manifest.toml"), db)
    unknown = invoke("import", path, "--pack", "nope")
    assert unknown.exit_code == 1 and "no pack named 'nope'" in unknown.output
    assert stored_counts(db)["graphs"] == 0
    result = invoke("import", path, "--pack", "tiny")
    assert result.exit_code == 0, result.output
    ties = {(r["g"], r["n"]): r["f"] for r in db.read(
        "MATCH (n:GraphNode)-[:IS]->(f:Feature) RETURN n.graph AS g, n.node_id AS n, f.key AS f")}
    expected = {(slug, n["node_id"]): "tiny/{}/mlp/{}".format(*n["node_id"].split("_")[:2])
                for slug, g in graphs.items() for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert ties == expected
    assert invoke("import", path, "--pack", "tiny").output.count("nothing to do") == len(graphs)
    untied = invoke("import", path)
    assert untied.exit_code == 1 and "tied to pack 'tiny' (mlp), not tied to no pack" in untied.output
    assert invoke("import", path, "--replace").exit_code == 0
    assert not db.read("MATCH (:GraphNode)-[r:IS]->() RETURN r LIMIT 1")


def test_a_write_that_fails_midway_leaves_nothing_of_that_graph(db, folder, monkeypatch):
    from flowdb.circuits import store

    path, graphs = folder
    monkeypatch.setattr(store, "BATCH", 5)  # many batches in the one transaction
    last = graphs["g04"]["nodes"][-1]["node_id"]
    db.write("CREATE (:GraphNode {graph: 'g04', node_id: $id, planted: true})", id=last)  # the last batch fails
    result = invoke("import", path)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    stored = {r["slug"] for r in db.read("MATCH (g:AttributionGraph) RETURN g.slug AS slug")}
    assert stored == {"g00", "g01", "g02", "g03"}  # the shared transaction failed: one graph each, in slug order
    assert db.read("MATCH (n:GraphNode {graph: 'g04'}) RETURN count(n) AS n, collect(n.planted) AS p") == [
        {"n": 1, "p": [True]}]
    db.write("MATCH (n:GraphNode {planted: true}) DELETE n")
    assert invoke("import", path).exit_code == 0
    assert stored_counts(db)["graphs"] == len(graphs)


def test_graphs_written_together_or_one_by_one_are_stored_the_same(db, folder, monkeypatch):
    from flowdb.circuits import store

    path, graphs = folder

    def state():
        found = stored_state(db)
        for props in found["graphs"].values():
            del props["imported"]  # the time of the write
        return found

    assert invoke("import", path).exit_code == 0  # the six small graphs share one transaction
    together = state()
    db.write("MATCH (n) WHERE n:GraphNode OR n:AttributionGraph DETACH DELETE n")
    monkeypatch.setattr(store, "GROUP_ROWS", 1)
    monkeypatch.setattr(store, "BATCH", 7)  # one graph per transaction, in many small batches
    assert invoke("import", path).output.count("stored from") == len(graphs)
    assert state() == together


def test_a_minimal_file_exports_with_every_field_circuit_tracer_requires(db, tmp_path):
    minimal = {"metadata": {"slug": "mini", "scan": "m", "prompt_tokens": ["a", "b"], "prompt": "ab"},
               "qParams": {},
               "nodes": [{"node_id": "E_1_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding"},
                         {"node_id": "0_3_1", "feature": 6, "layer": "0", "ctx_idx": 1,
                          "feature_type": "cross layer transcoder", "influence": 0.5, "activation": 2.0},
                         {"node_id": "2_9_1", "feature": 9, "layer": "2", "ctx_idx": 1, "feature_type": "logit",
                          "is_target_logit": True, "token_prob": 0.25}],
               "links": [{"source": "E_1_0", "target": "0_3_1", "weight": 1},
                         {"source": "0_3_1", "target": "2_9_1", "weight": -0.125}]}
    (tmp_path / "mini.json").write_text(json.dumps(minimal))
    assert invoke("import", tmp_path / "mini.json").exit_code == 0
    assert invoke("export", "mini", "--out", tmp_path / "out" / "mini.json").exit_code == 0
    exported = json.loads((tmp_path / "out" / "mini.json").read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(exported)
    assert exported["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                   "sg_pos": ""}
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt"} <= set(exported["metadata"])
    for node in exported["nodes"]:  # circuit-tracer's Node model: every field present
        assert set(node) == {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                             "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
                             "influence", "activation"}
    assert exported["nodes"][0]["jsNodeId"] == "E_1_0"
    assert [link["weight"] for link in exported["links"]] == [1.0, -0.125]
    assert "nothing to do" in invoke("import", tmp_path / "out" / "mini.json").output


def test_links_before_nodes_and_any_key_order_read_the_same(db, tmp_path):
    graph = make_graph("order", 8)
    shuffled = {key: graph[key] for key in ("links", "qParams", "nodes", "metadata")}
    (tmp_path / "a.json").write_text(json.dumps(graph))
    (tmp_path / "b.json").write_text(json.dumps(shuffled, indent=1))
    assert "order: stored" in invoke("import", tmp_path / "a.json").output
    assert "nothing to do" in invoke("import", tmp_path / "b.json").output  # same content, other bytes
    shuffled["links"][-1]["source"] = "nowhere"
    (tmp_path / "c.json").write_text(json.dumps(shuffled))
    result = invoke("import", tmp_path / "c.json", "--replace")
    assert result.exit_code == 1 and f"links[{len(graph['links']) - 1}].source: no node 'nowhere'" in result.output
