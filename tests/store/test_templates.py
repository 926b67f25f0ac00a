import gzip
import json
import time

import pandas as pd
import pytest

import flowdb
from flowdb.classify import CATEGORIES
from flowdb.errors import FlowdbError, QueryError
from flowdb.packs.manifest import load_manifest
from flowdb.store.export import export_edges
from flowdb.store.ingest import ingest
from flowdb.store.labels import import_labels
from flowdb.store.templates import get_template, run_template, templates
from helpers import ReferenceGraph, brute_force_edges

REQUIRED = {"lineage", "descendants", "flow-graph", "origins", "newborn", "circuit",
            "steering-set", "label-search", "chains", "edges", "by-category", "hubs",
            "family", "splits", "new-features", "lineage-across"}


def test_every_template_declares_exactly_the_parameters_it_uses():
    assert REQUIRED <= set(templates())
    for template in templates().values():
        declared = {p.name for p in template.params}
        assert declared == template.used_params(), template.name
        assert template.columns and template.answers


@pytest.fixture(scope="module")
def reference(planted_pack):
    return ReferenceGraph("planted", brute_force_edges(planted_pack[0], layers=4, k=2), t_res=0.5, t_mod=0.5)


def build_k2(db, folder, pack_dir):
    ingest(load_manifest(pack_dir / "manifest.toml", k=2), db)


@pytest.fixture
def graph(shared_graph, planted_pack, reference):
    """The planted pack at k = 2, built once and shared by the tests that only read it."""
    return shared_graph(build_k2, planted_pack[0]), reference, planted_pack[1]


@pytest.fixture
def own_graph(db, planted_pack, reference):
    """The same graph in a database of the test's own, for a test that writes."""
    build_k2(db, None, planted_pack[0])
    return db, reference, planted_pack[1]


def _seeds(reference, category, layer=3, n=3):
    return sorted(k for k, c in reference.category.items() if c == category and k.split("/")[1] == str(layer))[:n]


@pytest.mark.parametrize("max_rank, t_res, t_mod", [(1, -1.0, -1.0), (1, 0.5, 0.5), (2, 0.3, 0.3)])
def test_lineage(graph, max_rank, t_res, t_mod):
    db, reference, _ = graph
    for key in _seeds(reference, "translated") + _seeds(reference, "processed"):
        frame = flowdb.query("lineage", db=db, feature=key, t_res=t_res, t_mod=t_mod, max_rank=max_rank)
        got = {row for row in zip(frame["pred_key"], frame["step_key"], frame["kind"]) if isinstance(row[0], str)}
        assert got == reference.lineage_edges(key, t_res, t_mod, max_rank)
        assert set(frame["step_key"]) == reference.ancestors(key, t_res, max_rank)
        assert (frame["depth"] == int(key.split("/")[1]) - frame["step_layer"]).all()
        for step, category in zip(frame["step_key"], frame["step_category"]):
            assert reference.category[step] == category


@pytest.mark.parametrize("max_rank, t_res, t_mod", [(1, 0.5, 0.5), (2, 0.5, 0.5)])
def test_descendants(graph, max_rank, t_res, t_mod):
    db, reference, _ = graph
    for key in _seeds(reference, "newborn", layer=0) + ["planted/1/mlp/3"]:
        frame = run_template(db, "descendants", {"feature": key, "t_res": t_res, "t_mod": t_mod,
                                                 "max_rank": max_rank})
        assert set(frame["child_key"]) == reference.descendants(key, t_res, t_mod, max_rank)


def test_flow_graph(graph):
    db, reference, _ = graph
    for key in _seeds(reference, "processed", layer=2) + _seeds(reference, "translated", layer=1):
        frame = run_template(db, "flow-graph", {"feature": key, "t_res": 0.5, "t_mod": 0.5})
        nodes = frame[frame["element"] == "node"]
        edges = frame[frame["element"] == "edge"]
        expected_nodes, expected_links = reference.flow_graph(key, 0.5, 0.5, 1)
        assert set(nodes["key"]) == expected_nodes
        assert set(zip(edges["source"], edges["target"], edges["kind"])) == expected_links
        assert nodes.loc[nodes["key"] == key, "role"].tolist() == ["seed"]


def test_steering_set_is_the_flow_graph_per_layer(graph):
    db, reference, _ = graph
    key = _seeds(reference, "processed", layer=2)[0]
    frame = run_template(db, "steering-set", {"feature": key, "t_res": 0.5, "t_mod": 0.5})
    expected_nodes, links = reference.flow_graph(key, 0.5, 0.5, 1)
    assert set(frame["key"]) == expected_nodes
    assert (frame["offset"] == frame["layer"] - 2).all()
    seed = frame[frame["role"] == "seed"]
    assert seed["key"].tolist() == [key] and seed["score"].tolist() == [1.0]
    cosines = {(s, t): c for s, t, _, c, _ in reference.edges}
    for row in frame[frame["role"] == "input"].itertuples():
        best = max(c for (s, t), c in cosines.items() if s == row.key and (s, t, "mlp") in links | {
            (a, b, k) for a, b, k in links if k == "attention"})
        assert row.score == pytest.approx(best, abs=1e-6)


def test_origins(graph):
    db, reference, _ = graph
    frame = run_template(db, "origins", {"pack": "planted"})
    for row in frame.itertuples():
        layer_keys = [k for k in reference.category if k.split("/")[1] == str(row.layer)]
        counts = pd.Series([reference.category[k] for k in layer_keys]).value_counts()
        assert row.translated == counts.get("translated", 0)
        assert row.processed == counts.get("processed", 0)
        assert row.newborn == counts.get("newborn", 0)
        assert row.from_nowhere == counts.get("from-nowhere", 0)
        assert row.total == 512


def test_newborn(graph):
    db, reference, _ = graph
    frame = run_template(db, "newborn", {"pack": "planted", "layer": 2, "limit": 1000})
    expected = {k for k, c in reference.category.items() if c == "newborn" and k.split("/")[1] == "2"}
    assert set(frame["key"]) == expected
    assert frame["cosine"].is_monotonic_decreasing
    for row in frame.itertuples():
        best = max((c, s) for s, t, kind, c, rank in reference.into[row.key] if kind != "residual" and rank == 1)
        assert (row.born_in, row.cosine) == pytest.approx((best[1], best[0]))
    only_mlp = run_template(db, "newborn", {"pack": "planted", "layer": 2, "module": "mlp", "limit": 1000})
    assert only_mlp["born_in"].str.contains("/mlp/").all() and len(only_mlp) < len(frame)


def test_circuit(graph):
    db, reference, _ = graph
    top = _seeds(reference, "translated", layer=3)[0]
    ancestors = sorted(reference.ancestors(top, 0.5, 1))
    bottom = ancestors[0]  # the lowest-layer ancestor (keys sort by layer within 0-9)
    frame = run_template(db, "circuit", {"source": top, "target": bottom, "t_res": 0.5, "t_mod": 0.5})
    on_path = frame[frame["on_path"]]
    expected = {(s, d) for s, d, kind in reference.lineage_edges(top, 0.5, 0.5, 1)
                if kind == "residual" and s in ancestors and d in ancestors}
    assert set(zip(on_path["source_key"], on_path["target_key"])) == expected
    inputs = frame[~frame["on_path"]]
    assert set(inputs["kind"]) <= {"mlp", "attention"}
    assert set(inputs["target_key"]) <= {d for _, d in expected}
    unrelated = run_template(db, "circuit", {"source": top, "target": "planted/0/mlp/0,planted/0/att/0",
                                             "t_res": 0.5, "t_mod": 0.99})
    assert unrelated.empty


def test_chains(graph):
    db, reference, _ = graph
    frame = run_template(db, "chains", {"pack": "planted", "limit": 5})
    assert len(frame) == 5 and frame["length"].is_monotonic_decreasing
    top1_res = {dst: src for src, dst, kind, cos, rank in reference.edges if kind == "residual" and rank == 1}
    for row in frame.itertuples():
        keys = list(row.keys)
        assert len(keys) == row.length + 1
        for parent, child in zip(keys, keys[1:]):
            assert top1_res[child] == parent and reference.category[child] == "translated"
        assert reference.category.get(keys[0]) != "translated" or keys[0] not in top1_res
    longest = 0  # independently: the longest translated run in the reference graph
    for key in reference.category:
        length, node = 0, key
        while reference.category.get(node) == "translated" and node in top1_res:
            length, node = length + 1, top1_res[node]
        longest = max(longest, length)
    assert frame["length"].iloc[0] == longest


def _export_file(path, rows):
    with gzip.open(path, "wt") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_label_search_and_labels_in_results(own_graph, tmp_path):
    db, reference, _ = own_graph
    # The planted pack has no Neuronpedia source: give layer 3's residual SAE one.
    db.write("MATCH (s:SAE {key: 'planted/3/res'}) SET s.neuronpedia = '3-planted-res', "
             "s.np_url = 'https://www.neuronpedia.org/planted-model/3-planted-res/'")
    target = _seeds(reference, "translated")[0]
    index = target.split("/")[-1]
    export = tmp_path / "planted-model" / "3-planted-res" / "explanations"
    export.mkdir(parents=True)
    _export_file(export / "batch-0.jsonl.gz", [
        {"id": "e1", "modelId": "planted-model", "layer": "3-planted-res", "index": index,
         "description": "Quantum Gravity terms", "authorId": "a", "typeName": "oai_token-act-pair",
         "explanationModelName": "gpt-4o-mini", "embedding": None, "umap_x": 0.1, "umap_y": 0.2,
         "umap_cluster": 1, "umap_log_feature_sparsity": -3.0},
        {"id": "e0", "modelId": "planted-model", "layer": "3-planted-res", "index": index,
         "description": "physics words", "authorId": "a", "typeName": "oai_token-act-pair",
         "explanationModelName": "gpt-4o-mini"},
    ])
    report = import_labels(db, tmp_path / "planted-model")
    assert (report.rows, report.explanations, report.features) == (2, 2, 1)
    frame = run_template(db, "label-search", {"text": "quantum GRAVITY", "t_res": 0.5})
    assert frame["key"].tolist() == [target]
    assert frame["label"].tolist() == ["physics words"]  # no scores: the first by explanation id
    assert frame["url"].tolist() == [f"https://www.neuronpedia.org/planted-model/3-planted-res/{index}"]
    assert frame["lineage"].iloc[0] == sorted(reference.ancestors(target, 0.5, 1) - {target}, reverse=True)
    lineage = run_template(db, "lineage", {"feature": target})
    assert set(lineage.loc[lineage["step_key"] == target, "step_label"]) == {"physics words"}


def test_unknown_template_and_parameter(graph):
    db, _, _ = graph
    with pytest.raises(QueryError, match="no query template named 'lineages'"):
        run_template(db, "lineages", {})
    with pytest.raises(QueryError, match="has no parameter"):
        run_template(db, "origins", {"pack": "planted", "layer": 3})


def test_parameters_are_never_spliced(graph):
    db, _, _ = graph
    hostile = "planted' }) DETACH DELETE f //"
    with pytest.raises(FlowdbError, match="stored packs: planted"):
        run_template(db, "origins", {"pack": hostile})
    assert db.read("MATCH (f:Feature) RETURN count(f) AS n")[0]["n"] == 4 * 3 * 512
    assert "$pack" in get_template("origins").cypher


def test_steering_set_keeps_the_chain_when_no_input_qualifies(graph):
    """No MLP or attention edge reaches t_mod = 1 (random decoders are never parallel): the
    residual chain alone is answered."""
    db, reference, _ = graph
    key = _seeds(reference, "processed", layer=2)[0]
    frame = run_template(db, "steering-set", {"feature": key, "t_res": 0.5, "t_mod": 1.0})
    expected_nodes, _ = reference.flow_graph(key, 0.5, 1.0, 1)
    assert set(frame["key"]) == expected_nodes and key in set(frame["key"])
    assert "input" not in set(frame["role"])


def test_a_runaway_traversal_is_stopped_with_a_message(db):
    # 30 layers of 4 residual features, each joined to all 4 of the layer before at
    # ranks 1-4: 4^29 paths from the first layer to the last, which no query finishes.
    db.write("CREATE (:Pack {name: 'deep', model: 'm', status: 'complete', k: 4, first_layer: 0, "
             "last_layer: 29, layers_done: range(0, 29)})")
    db.write("UNWIND range(0, 29) AS layer UNWIND range(0, 3) AS i "
             "CREATE (:Feature:Residual {key: 'deep/' + layer + '/res/' + i, pack: 'deep', layer: layer, "
             "module: 'res', index: i, category: 'translated'})")
    db.write("MATCH (a:Feature {pack: 'deep'}), (b:Feature {pack: 'deep'}) WHERE b.layer = a.layer + 1 "
             "CREATE (a)-[:RESIDUAL {cosine: 0.9, rank: (a.index + b.index) % 4 + 1, above: true}]->(b)")
    params = {"source": "deep/0/res/0", "target": "deep/29/res/0", "max_rank": 4, "every_edge": True}
    started = time.perf_counter()
    with pytest.raises(QueryError, match=r"template circuit ran past its 2 s limit and was stopped: lower max_rank"):
        run_template(db, "circuit", params, timeout_s=2)
    assert time.perf_counter() - started < 30


def test_by_category(graph, tmp_path):
    db, reference, _ = graph
    edges = export_edges(db, "planted", tmp_path / "edges.csv")
    top1 = edges[edges["rank"] == 1].pivot_table(index="target", columns="kind", values="cosine")
    assert get_template("by-category").params[2].choices == CATEGORIES
    for category in CATEGORIES:
        frame = run_template(db, "by-category", {"pack": "planted", "layer": 2, "category": category})
        expected = sorted((k for k, c in reference.category.items() if c == category and k.split("/")[1] == "2"),
                          key=lambda k: int(k.split("/")[-1]))[:100]
        assert frame["key"].tolist() == expected and (frame["category"] == category).all()
        assert frame["index"].tolist() == [int(k.split("/")[-1]) for k in expected]
        for column, kind in (("s_res", "RESIDUAL"), ("s_mlp", "MLP"), ("s_att", "ATTENTION")):
            assert frame[column].to_numpy() == pytest.approx(top1.loc[expected, kind].to_numpy(), abs=1e-6)
    few = run_template(db, "by-category", {"pack": "planted", "layer": 2, "category": "translated", "limit": 3})
    assert len(few) == 3
    with pytest.raises(QueryError, match="parameter category must be one of translated, processed, newborn, "
                                         "from-nowhere; got 'born'"):
        run_template(db, "by-category", {"pack": "planted", "layer": 2, "category": "born"})


def _kept(edges, t_res, t_mod, max_rank, every_edge):
    """Independently, the edges the lineage rule keeps: rank, then cosine (else the stored `above`)."""
    threshold = edges["kind"].map({"RESIDUAL": t_res, "MLP": t_mod, "ATTENTION": t_mod})
    passes = edges["above"] if t_res is None else edges["cosine"] >= threshold
    return edges[(edges["rank"] <= max_rank) & (every_edge | passes)]


def _chain_lengths(residual):
    """Longest kept residual path back from each feature, in edges."""
    longest: dict[str, int] = {}
    for row in residual.sort_values("layer").itertuples():
        longest[row.target] = max(longest.get(row.target, 0), longest.get(row.source, 0) + 1)
    return longest


@pytest.mark.parametrize("params", [{"t_res": 0.5, "t_mod": 0.5}, {}, {"max_rank": 2, "every_edge": True},
                                    {"max_rank": 2, "t_res": 0.3, "t_mod": 0.4}])
def test_hubs(graph, tmp_path, params):
    db, _, _ = graph
    edges = export_edges(db, "planted", tmp_path / "edges.csv")
    kept = _kept(edges, params.get("t_res"), params.get("t_mod"), params.get("max_rank", 1),
                 params.get("every_edge", False))
    residual = kept[kept["kind"] == "RESIDUAL"]
    lengths = _chain_lengths(residual)
    expected = {"fan-out": kept.groupby("source").size(), "fan-in": kept.groupby("target").size(),
                "chain-end": pd.Series({k: n for k, n in lengths.items() if k not in set(residual["source"])})}
    for kind, degrees in expected.items():
        frame = run_template(db, "hubs", {"pack": "planted", "kind": kind, "limit": 25, **params})
        ranked = sorted(((int(n), k) for k, n in degrees.items()), key=lambda d: (-d[0], d[1]))[:25]
        assert ranked and list(zip(frame["degree"], frame["key"])) == ranked, kind
        assert (frame["layer"] == frame["key"].str.split("/").str[1].astype(int)).all()
    default = run_template(db, "hubs", {"pack": "planted", **params})
    assert len(default) == 20 and default["degree"].is_monotonic_decreasing
    with pytest.raises(QueryError, match="parameter kind must be one of fan-out, fan-in, chain-end"):
        run_template(db, "hubs", {"pack": "planted", "kind": "fanout"})
