"""The attribution-graph templates against computations over the files alone (pandas and
brute force), on one store of synthetic graphs shared by the module."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from circuit_graphs import POOL, cantor, write_graphs
from click.testing import CliRunner

from conftest import wipe
from flowdb.circuits.store import import_graphs
from flowdb.cli import cli
from flowdb.store.templates import run_template

KINDS = {"cross layer transcoder": "feature", "mlp reconstruction error": "error",
         "embedding": "embedding", "logit": "logit"}


@pytest.fixture(scope="module")
def store(neo4j_settings, tmp_path_factory):
    from flowdb.store.connection import connect

    folder = tmp_path_factory.mktemp("query-graphs")
    graphs = write_graphs(folder, 12, seed=2)
    with connect(neo4j_settings) as db:
        wipe(db)
        import_graphs(db, [folder])
        yield db, graphs


def frames(graphs):
    nodes = pd.DataFrame([{"graph": slug, "node_id": n["node_id"], "layer": str(n["layer"]), "feature": n["feature"],
                           "kind": KINDS[n["feature_type"]], "ctx_idx": n["ctx_idx"], "clerp": n.get("clerp", ""),
                           "influence": n.get("influence"), "activation": n.get("activation")}
                          for slug, g in graphs.items() for n in g["nodes"]])
    links = pd.DataFrame([{"graph": slug, **link} for slug, g in graphs.items() for link in g["links"]])
    return nodes, links


@pytest.mark.parametrize("min_graphs", [1, 3, 5])
def test_recurring_features_equal_pandas(store, min_graphs):
    db, graphs = store
    nodes, _ = frames(graphs)
    features = nodes[nodes["kind"] == "feature"].astype({"influence": float, "activation": float})
    grouped = features.sort_values(["graph", "ctx_idx"]).groupby(["layer", "feature"]).agg(
        graphs=("graph", "nunique"), mean_influence=("influence", "mean"),
        mean_activation=("activation", "mean"), label=("clerp", "first"))
    expected = grouped[grouped["graphs"] >= min_graphs]
    assert len(expected)  # the pool is small: features recur
    frame = run_template(db, "recurring-features", {"min_graphs": min_graphs, "limit": 1000})
    got = frame.set_index(["layer", "feature"]).sort_index()
    assert list(got.index) == list(expected.sort_index().index)
    for key, row in expected.iterrows():
        found = got.loc[key]
        assert found["graphs"] == row["graphs"] and found["label"] == row["label"]
        assert found["mean_influence"] == pytest.approx(row["mean_influence"], rel=1e-12)
        assert found["mean_activation"] == pytest.approx(row["mean_activation"], rel=1e-12)
    assert frame["graphs"].is_monotonic_decreasing
    assert run_template(db, "recurring-features", {"scan": "another-model"}).empty


@pytest.mark.parametrize("min_graphs", [1, 2, 4])
def test_recurring_edges_equal_pandas(store, min_graphs):
    db, graphs = store
    nodes, links = frames(graphs)
    ends = nodes[["graph", "node_id", "layer", "feature", "kind"]]
    joined = links.merge(ends.add_prefix("s_"), left_on=["graph", "source"], right_on=["s_graph", "s_node_id"]) \
                  .merge(ends.add_prefix("t_"), left_on=["graph", "target"], right_on=["t_graph", "t_node_id"])
    joined = joined[(joined["s_kind"] == "feature") & joined["t_kind"].isin(["feature", "logit"])]
    grouped = joined.groupby(["s_layer", "s_feature", "t_kind", "t_layer", "t_feature"]).agg(
        graphs=("graph", "nunique"), links=("weight", "size"), mean_weight=("weight", "mean"))
    expected = grouped[grouped["graphs"] >= min_graphs]
    assert len(expected)
    frame = run_template(db, "recurring-edges", {"min_graphs": min_graphs, "limit": 100000})
    got = {(r.source_layer, r.source_feature, r.target_kind, r.target_layer, r.target_feature):
           (r.graphs, r.links, r.mean_weight) for r in frame.itertuples()}
    assert set(got) == set(expected.index)
    for key, row in expected.iterrows():
        assert got[key][:2] == (row["graphs"], row["links"])
        assert got[key][2] == pytest.approx(row["mean_weight"], rel=1e-9, abs=1e-12)
    assert frame["graphs"].is_monotonic_decreasing


def _adjacency(graph, min_weight=0.0):
    out = {}
    for link in graph["links"]:
        if abs(link["weight"]) >= min_weight:
            out.setdefault(link["source"], []).append((link["target"], link["weight"]))
    return out


def _reaches(graph, starts, goal):
    adjacency, seen, todo = _adjacency(graph), set(), list(starts)
    while todo:
        node = todo.pop()
        for target, _ in adjacency.get(node, []):
            if target == goal:
                return True
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return False


def test_graphs_with_against_brute_force(store):
    db, graphs = store
    checked_reach = set()
    for layer, index in POOL[::3]:
        frame = run_template(db, "graphs-with", {"layer": str(layer), "feature_id": cantor(layer, index)})
        expected = {}
        for slug, g in graphs.items():
            mine = [n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"
                    and str(n["layer"]) == str(layer) and n["feature"] == cantor(layer, index)]
            if mine:
                target = next(n["node_id"] for n in g["nodes"] if n.get("is_target_logit"))
                reaches = _reaches(g, [n["node_id"] for n in mine], target)
                checked_reach.add(reaches)
                expected[slug] = (g["metadata"]["prompt"], sorted(n["ctx_idx"] for n in mine),
                                  max(n["influence"] for n in mine), max(n["activation"] for n in mine), reaches)
        got = {r.graph: (r.prompt, list(r.positions), r.influence, r.activation, bool(r.reaches_target))
               for r in frame.itertuples()}
        assert got == expected, (layer, index)
    assert checked_reach == {True, False}  # both answers were checked


def _paths(graph, max_length, min_weight):
    adjacency = _adjacency(graph, min_weight)
    target = next(n["node_id"] for n in graph["nodes"] if n.get("is_target_logit"))
    found = []

    def walk(path, weight):
        if path[-1] == target:
            found.append((weight, path))
            return
        if len(path) - 1 == max_length:
            return
        for nxt, w in adjacency.get(path[-1], []):
            walk(path + [nxt], weight * w)

    for node in graph["nodes"]:
        if node["feature_type"] == "embedding":
            walk([node["node_id"]], 1.0)
    return sorted(found, key=lambda item: (-item[0], item[1]))


@pytest.mark.parametrize("max_length, min_weight, limit", [(6, 0.0, 10), (3, 0.0, 5), (6, 1.5, 20)])
def test_strongest_paths_against_brute_force(store, max_length, min_weight, limit):
    db, graphs = store
    for slug in ("g00", "g01", "g05", "g09"):
        expected = _paths(graphs[slug], max_length, min_weight)[:limit]
        frame = run_template(db, "strongest-paths", {"graph": slug, "max_length": max_length,
                                                     "min_weight": min_weight, "limit": limit})
        got = [(r.path_weight, list(r.path)) for r in frame.itertuples()]
        assert [w for w, _ in got] == pytest.approx([w for w, _ in expected], rel=1e-12)
        assert [p for _, p in got] == [p for _, p in expected]
        tokens = graphs[slug]["metadata"]["prompt_tokens"]
        for row in frame.itertuples():
            assert row.length == len(row.path) - 1 <= max_length
            assert row.source == row.path[0] and row.token == tokens[int(row.source.split("_")[-1])]
    assert len(_paths(graphs["g00"], 6, 0.0)) > 0


def test_templates_from_the_command_line(store):
    result = CliRunner().invoke(cli, ["query", "recurring-features", "-p", "min_graphs=2", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows and all(row["graphs"] >= 2 for row in rows)
    result = CliRunner().invoke(cli, ["query", "strongest-paths", "-p", "graph=g00", "-p", "limit=3"])
    assert result.exit_code == 0 and "path_weight" in result.output


@pytest.mark.parametrize("name, params, message", [
    ("strongest-paths", {"graph": "g00", "max_length": 9}, "max_length must be from 1 to 8"),
    ("strongest-paths", {"graph": "g00", "min_weight": -0.5}, "min_weight must be from 0"),
    ("recurring-features", {"min_graphs": 0}, "min_graphs must be from 1"),
    ("graphs-with", {"layer": 3, "feature_id": 1}, "layer must be string"),
])
def test_bad_parameters_are_refused(store, name, params, message):
    from flowdb.errors import QueryError

    with pytest.raises(QueryError, match=message):
        run_template(store[0], name, params)
