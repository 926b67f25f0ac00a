"""`flowdb export-graph`: flow graphs as Neuronpedia graph JSON, checked against Neuronpedia's own schema.

tests/data/neuronpedia-graph-schema.json is Neuronpedia's
apps/webapp/app/api/graph/graph-schema.json (hijohnnylin/neuronpedia, commit 3c068b764d66,
MIT; see tests/data/neuronpedia-graph-schema.LICENSE), the schema its upload endpoint
checks graphs against. The viewer checks below restate what its graph page does with a
graph (apps/webapp/app/[modelId]/graph/utils.ts, formatCLTGraphData, and
components/provider/graph-provider.tsx), written independently of flowdb's code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.errors import FlowdbError
from flowdb.views.graph_json import flow_graph_json, write_graph_json
from helpers import DATA

SCHEMA = json.loads((DATA / "neuronpedia-graph-schema.json").read_text())
COLUMNS = ["element", "key", "layer", "module", "index", "category", "label", "url", "role",
           "source", "target", "kind", "cosine"]
NP = "https://www.neuronpedia.org/gpt2-small"


def _frame(nodes, edges) -> pd.DataFrame:
    """A frame shaped like the flow-graph template's: nodes (key, category, label, url, role), edges."""
    rows = []
    for key, category, label, url, role in nodes:
        _, layer, module, index = key.split("/")
        rows.append(["node", key, int(layer), module, int(index), category, label, url, role,
                     None, None, None, None])
    for source, target, kind, cosine in edges:
        rows.append(["edge", None, int(target.split("/")[1]), None, None, None, None, None, None,
                     source, target, kind, cosine])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["index"] = frame["index"].astype("Int64")
    return frame


# Feature 5 at layer 3 in all three modules: the viewer would merge them if positions did not differ.
NODES = [
    ("p/2/res/7", "translated", "Python imports", f"{NP}/2-res-jb/7", "ancestor"),
    ("p/3/res/5", "processed", float("nan"), f"{NP}/3-res-jb/5", "seed"),
    ("p/3/mlp/5", None, None, f"{NP}/3-mlp-oai/5", "input"),
    ("p/3/att/5", None, "keywords", f"{NP}/3-att-kk/5", "input"),
    ("p/4/res/1", "translated", None, f"{NP}/4-res-jb/1", "descendant"),
]
EDGES = [("p/2/res/7", "p/3/res/5", "residual", 0.91), ("p/3/mlp/5", "p/3/res/5", "mlp", 0.4),
         ("p/3/att/5", "p/3/res/5", "attention", 0.2), ("p/3/res/5", "p/4/res/1", "residual", 0.8)]


def _decode(feature: int) -> tuple[int, int]:
    """The viewer's getLayerFromCantorValue / getIndexFromCantorValue."""
    w = math.floor((math.sqrt(8 * feature + 1) - 1) / 2)
    t = (w * w + w) / 2
    return int(w - (feature - t)), int(feature - t)


def check_viewer_reads(document: dict) -> None:
    """The schema, plus what Neuronpedia's graph page needs to draw the graph."""
    jsonschema.Draft7Validator(SCHEMA).validate(document)
    metadata, nodes, links = document["metadata"], document["nodes"], document["links"]
    # the upload refuses other characters in scan and slug
    assert all(c.isalnum() or c in "_.-" for c in metadata["slug"] + metadata["scan"])
    ids = [n["node_id"] for n in nodes]
    assert len(set(ids)) == len(ids)
    # formatCLTGraphData merges nodes with one `${layer}_${feature}_${ctx_idx}`, and stops when the top layer is 0
    assert len({(n["layer"], n["feature"], n["ctx_idx"]) for n in nodes}) == len(nodes)
    assert max(int(n["layer"]) for n in nodes) > 0
    assert all(0 <= n["ctx_idx"] < len(metadata["prompt_tokens"]) for n in nodes)
    # links whose ends are not nodes are dropped by the viewer: flowdb writes none
    assert {link["source"] for link in links} | {link["target"] for link in links} <= set(ids)
    assert set(document["qParams"]["pinnedIds"]) <= set(ids)
    assert document["qParams"]["clickedId"] in ids
    assert metadata["schema_version"] == 1
    for node in nodes:  # schema 1: the viewer decodes layer and index from `feature`
        assert _decode(node["feature"])[0] == int(node["layer"])
    # the file is plain JSON: no NaN
    json.dumps(document, allow_nan=False)


def test_flow_graph_json_is_what_neuronpedia_reads():
    document = flow_graph_json(_frame(NODES, EDGES), "gpt2-small", settings={"t_res": 0.5, "t_mod": 0.15})
    check_viewer_reads(document)
    nodes = {(n["layer"], _decode(n["feature"])[1], n["ctx_idx"]): n for n in document["nodes"]}
    assert set(nodes) == {("2", 7, 2), ("3", 5, 2), ("3", 5, 1), ("3", 5, 0), ("4", 1, 2)}
    assert [nodes[("2", 7, 2)]["clerp"], nodes[("3", 5, 2)]["clerp"], nodes[("3", 5, 1)]["clerp"]] == \
        ["Python imports", "", ""]
    seed = nodes[("3", 5, 2)]["node_id"]
    assert document["qParams"]["pinnedIds"] == [seed] and document["qParams"]["clickedId"] == seed
    weights = {(link["source"], link["target"]): link["weight"] for link in document["links"]}
    assert weights[(nodes[("3", 5, 1)]["node_id"], seed)] == pytest.approx(0.4)
    assert len(weights) == 4
    metadata = document["metadata"]
    assert metadata["scan"] == "gpt2-small" and metadata["slug"] == "flowdb-p-3-res-5"
    assert "t_res 0.5, t_mod 0.15" in metadata["info"]["description"]
    assert metadata["generation_settings"]["t_mod"] == 0.15
    # residual features link to the residual set, attention ones to the lorsa slot; MLP cannot link
    assert metadata["feature_details"] == {"neuronpedia_source_set": "res-jb",
                                           "neuronpedia_lorsa_source_set": "att-kk"}
    assert {k: n["feature_type"] for k, n in nodes.items()} == {
        ("2", 7, 2): "cross layer transcoder", ("3", 5, 2): "cross layer transcoder",
        ("4", 1, 2): "cross layer transcoder", ("3", 5, 0): "lorsa", ("3", 5, 1): "unknown"}
    assert nodes[("3", 5, 1)]["vis_link"] == f"{NP}/3-mlp-oai/5"


def test_source_sets_only_where_the_viewer_would_find_the_feature():
    # no URLs at all: nothing is looked up, every module draws as a feature
    bare = [(key, cat, label, None, role) for key, cat, label, _, role in NODES]
    document = flow_graph_json(_frame(bare, EDGES), "gpt2-small")
    check_viewer_reads(document)
    assert "feature_details" not in document["metadata"]
    assert {n["ctx_idx"]: n["feature_type"] for n in document["nodes"]} == {
        0: "lorsa", 1: "cross layer transcoder", 2: "cross layer transcoder"}
    assert all("vis_link" not in n for n in document["nodes"])
    # Neuronpedia layers that are not flowdb's (resid_pre mapped with {layer+1}): the viewer would
    # fetch the wrong layer's feature, so residual nodes do not link and MLP takes the graph's set
    shifted = [(key, cat, label, re.sub(r"/(\d+)-res-jb/", lambda m: f"/{int(m.group(1)) + 1}-res-jb/", url), role)
               for key, cat, label, url, role in NODES]
    document = flow_graph_json(_frame(shifted, EDGES), "gpt2-small")
    check_viewer_reads(document)
    assert document["metadata"]["feature_details"] == {"neuronpedia_source_set": "mlp-oai",
                                                       "neuronpedia_lorsa_source_set": "att-kk"}
    assert {n["ctx_idx"]: n["feature_type"] for n in document["nodes"]} == {
        0: "lorsa", 1: "cross layer transcoder", 2: "unknown"}
    # one residual node without a URL: the module has no single set
    partial = [(k, c, lab, None if k == "p/4/res/1" else u, r) for k, c, lab, u, r in NODES]
    document = flow_graph_json(_frame(partial, EDGES), "gpt2-small")
    assert document["metadata"]["feature_details"]["neuronpedia_source_set"] == "mlp-oai"


def test_refusals(tmp_path):
    with pytest.raises(FlowdbError, match="the flow graph is empty"):
        flow_graph_json(_frame([], []), "m")
    with pytest.raises(FlowdbError, match="at layer 0"):
        flow_graph_json(_frame([("p/0/res/1", "newborn", None, None, "seed")], []), "m")
    with pytest.raises(FlowdbError, match="slug"):
        flow_graph_json(_frame(NODES, EDGES), "m", slug="has space")
    with pytest.raises(FlowdbError, match=r"\.json file"):
        write_graph_json({}, tmp_path / "g.txt")


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "g.json"
    document = flow_graph_json(_frame(NODES, EDGES), "gpt2-small")
    write_graph_json(document, out)
    assert json.loads(out.read_text()) == document
    before = out.read_text()
    def disk_full(self, *args, **kwargs):
        self.write_bytes(b'{"half": ')  # a partial file appears, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(FlowdbError, match=f"cannot write {out} "):
        write_graph_json({"other": 1}, out)
    assert out.read_text() == before and sorted(p.name for p in out.parent.iterdir()) == ["g.json"]


@pytest.fixture
def stored(db, planted_pack):
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
    return db


def test_export_graph_command(stored, tmp_path):
    # Labels and Neuronpedia sources for the residual SAEs of the planted pack, as a real pack has.
    stored.write("MATCH (s:SAE {module: 'res'}) WHERE s.key STARTS WITH 'planted/' "
                 "SET s.np_url = 'https://www.neuronpedia.org/planted-model/' + s.layer + '-res-test/'")
    stored.write("MATCH (f:Feature {key: 'planted/2/res/1'}) SET f.label = 'a planted chain'")
    runner = CliRunner()
    out = tmp_path / "flow.json"
    result = runner.invoke(cli, ["export-graph", "planted/2/res/1", "--out", str(out), "--t-res", "0.4"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "scan planted-model" in result.output
    document = json.loads(out.read_text())
    check_viewer_reads(document)
    metadata = document["metadata"]
    assert metadata["scan"] == "planted-model" and metadata["slug"] == "flowdb-planted-2-res-1"
    settings = metadata["generation_settings"]
    assert {k: settings[k] for k in ("method", "t_res", "t_mod", "every_edge", "max_rank")} == \
        {"method": "flowdb flow-graph", "t_res": 0.4, "t_mod": None, "every_edge": False, "max_rank": 1}
    assert settings["thresholds"].startswith("t_res=0.4 given; otherwise the thresholds stored with the build")
    assert metadata["feature_details"] == {"neuronpedia_source_set": "res-test"}
    graph = {(n["layer"], _decode(n["feature"])[1], n["ctx_idx"]): n for n in document["nodes"]}
    assert graph[("2", 1, 2)]["clerp"] == "a planted chain"
    assert graph[("2", 1, 2)]["node_id"] == document["qParams"]["clickedId"]
    assert {n["feature_type"] for n in document["nodes"] if n["ctx_idx"] != 2} <= {"unknown"}
    # every edge of the template's answer is a link, weighted by its cosine
    from flowdb.store.templates import run_template

    frame = run_template(stored, "flow-graph", {"feature": "planted/2/res/1", "t_res": 0.4})
    edges = frame[frame["element"] == "edge"]
    assert sorted(round(link["weight"], 6) for link in document["links"]) == \
        sorted(round(float(c), 6) for c in edges["cosine"])
    assert len(document["nodes"]) == (frame["element"] == "node").sum()

    slugged = runner.invoke(cli, ["export-graph", "planted/2/res/1", "--out", str(out), "--slug", "my.graph_1"])
    assert slugged.exit_code == 0 and json.loads(out.read_text())["metadata"]["slug"] == "my.graph_1"


def test_export_graph_errors(stored, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export-graph", "planted/2/res/1", "--out", str(tmp_path / "g.csv")])
    assert result.exit_code == 1 and ".json file" in result.output
    result = runner.invoke(cli, ["export-graph", "nosuch/2/res/1", "--out", str(tmp_path / "g.json")])
    assert result.exit_code == 1 and "no pack named 'nosuch'" in result.output
    result = runner.invoke(cli, ["export-graph", "planted/99/res/1", "--out", str(tmp_path / "g.json")])
    assert result.exit_code == 1 and "no feature 'planted/99/res/1': pack 'planted' has layers 0-3" in result.output
    result = runner.invoke(cli, ["export-graph", "planted/2/res/1", "--out", str(tmp_path / "g.json"),
                                 "--slug", "a/b"])
    assert result.exit_code == 1 and "slug 'a/b'" in result.output
    assert not list(tmp_path.iterdir())
