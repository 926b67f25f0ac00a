"""The explorer's JSON API and flowdb.show(), over a real Neo4j (Starlette's TestClient
drives the app in-process; the browser tests are in test_browser.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from starlette.testclient import TestClient

from conftest import XSS_LABEL
from flowdb.explorer.app import create_app
from flowdb.store.templates import run_template
from flowdb.views import marks
from helpers import DATA

TOKEN = "test-token"
SEEDS = ["planted/3/res/0", "planted/3/res/4", "planted/2/res/17", "planted/1/mlp/3", "planted/0/res/9"]


@pytest.fixture(scope="module")
def client(explorer_db):
    db, _ = explorer_db
    with TestClient(create_app(lambda: db, token=TOKEN), base_url="http://127.0.0.1:8047") as test_client:
        yield test_client


def get_json(client, path, status=200):
    response = client.get(path)
    assert response.status_code == status, response.text
    return response.json()


def edge_set(edges) -> set:
    return {(e["source"], e["target"], e["kind"], round(e["cosine"], 6)) for e in edges}


@pytest.mark.parametrize("params", [{}, {"max_rank": 2}, {"t_res": 0.3, "t_mod": 0.3}, {"every_edge": True}])
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_a_deep_walk_is_the_flow_graph_template(client, explorer_db, seed, params):
    """Walked step by step to any depth, the view holds exactly the flow-graph template's nodes and
    edges (one Cypher statement over the whole chain), or is summarised when that is too big."""
    db, _ = explorer_db
    frame = run_template(db, "flow-graph", {"feature": seed, **params})
    nodes = frame[frame["element"] == "node"]
    edges = frame[frame["element"] == "edge"]
    query = "&".join(f"{k}={str(v).lower()}" for k, v in params.items())
    view = get_json(client, f"/api/flow/{seed}?depth=64&{query}")
    if len(nodes) > marks.FLOW_NODE_CAP:
        assert view["too_big"]["nodes"] == len(nodes) and view["nodes"] == []
        assert sum(c["features"] for c in view["too_big"]["counts"]) == len(nodes)
        return
    assert view["too_big"] is None
    assert {n["key"]: n["role"] for n in view["nodes"]} == dict(zip(nodes["key"], nodes["role"]))
    expected = {(r.source, r.target, r.kind, round(r.cosine, 6)) for r in edges.itertuples()}
    assert edge_set(view["edges"]) == expected


def test_depth_cuts_the_walk(client, explorer_db):
    full = get_json(client, "/api/flow/planted/3/res/0?depth=64&max_rank=2")
    one = get_json(client, "/api/flow/planted/3/res/0?depth=1&max_rank=2")
    residual = [n["layer"] for n in one["nodes"] if n["module"] == "res"]
    assert min(residual) >= 2 and len(one["nodes"]) <= len(full["nodes"])


def stored_thresholds(db) -> pd.DataFrame:
    return pd.DataFrame(db.read("MATCH (s:SAE {pack: 'planted', module: 'res'}) RETURN s.layer AS layer, "
                                "s.t_res AS t_res, s.t_mlp AS t_mlp, s.t_att AS t_att, s.chance_res AS chance_res, "
                                "s.chance_mlp AS chance_mlp, s.chance_att AS chance_att")).set_index("layer")


def test_edges_are_marked_against_their_layer_threshold_and_chance(client, explorer_db):
    db, _ = explorer_db
    thresholds = stored_thresholds(db)
    place = {"residual": "res", "mlp": "mlp", "attention": "att"}
    seen = set()
    for seed in SEEDS:
        view = get_json(client, f"/api/flow/{seed}?every_edge=true&depth=2")
        for edge in view["edges"]:
            row = thresholds.loc[int(edge["target"].split("/")[1])]
            p = place[edge["kind"]]
            expected = ("threshold" if edge["cosine"] >= row[f"t_{p}"] else
                        "above-chance" if edge["cosine"] > row[f"chance_{p}"] else "chance")
            assert edge["status"] == expected, edge
            seen.add(expected)
    assert {"threshold", "chance"} <= seen  # every_edge shows edges at chance level too


def test_a_neighbourhood_is_one_node_s_edges_only(client, explorer_db):
    db, _ = explorer_db
    key = "planted/2/res/17"
    answer = get_json(client, f"/api/neighbours/{key}?max_rank=3&every_edge=true")
    stored = db.read("MATCH (a:Feature)-[e:RESIDUAL|MLP|ATTENTION]-(b:Feature {key: $key}) WHERE e.rank <= 3 "
                     "RETURN startNode(e).key AS source, endNode(e).key AS target, e.cosine AS cosine", key=key)
    assert {(e["source"], e["target"]) for e in answer["edges"]} == {(r["source"], r["target"]) for r in stored}
    assert all(key in (e["source"], e["target"]) for e in answer["edges"])
    ends = {e["source"] for e in answer["edges"]} | {e["target"] for e in answer["edges"]}
    assert {n["key"] for n in answer["nodes"]} == ends
    capped = get_json(client, f"/api/neighbours/{key}?max_rank=3&every_edge=true&cap=2")
    assert capped["more"] and len(capped["edges"]) <= 4


def test_a_graph_too_big_to_read_is_summarised(client, explorer_db):
    db, _ = explorer_db
    view = get_json(client, "/api/flow/planted/3/res/0?every_edge=true&max_rank=3&depth=64")
    frame = run_template(db, "flow-graph", {"feature": "planted/3/res/0", "every_edge": True, "max_rank": 3})
    assert (frame["element"] == "node").sum() > marks.FLOW_NODE_CAP
    assert view["nodes"] == [] and view["edges"] == []
    assert re.match(r"\d+ features and \d+ edges: too many to draw", view["too_big"]["message"])


def test_feature_page_data_says_scores_against_thresholds_and_chance(client, explorer_db):
    db, labels = explorer_db
    key = "planted/3/res/4"
    detail = get_json(client, f"/api/features/{key}")
    stored = db.read("MATCH (f:Feature {key: $key}) RETURN f.s_res AS res, f.s_mlp AS mlp, f.s_att AS att, "
                     "f.category AS category", key=key)[0]
    row = stored_thresholds(db).loc[3]
    assert detail["feature"]["category"] == stored["category"]
    for score in detail["scores"]:
        assert score["score"] == pytest.approx(stored[score["place"]])
        assert score["threshold"] == pytest.approx(row[f"t_{score['place']}"])
        assert score["chance"] == pytest.approx(row[f"chance_{score['place']}"])
    assert detail["labels"][0]["text"] == XSS_LABEL == labels[key]  # stored and sent as text, unchanged
    assert detail["labels"][0]["source"] == "neuronpedia"
    assert detail["feature"]["url"] == "https://www.neuronpedia.org/planted-model/3-planted-res/4"


TRIALS = 3000


def random_top1(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Monte Carlo of chance: the largest cosine between a random unit vector and n others in d dimensions."""
    rng = np.random.default_rng(seed)
    top = []
    for _ in range(TRIALS // 100):
        base = rng.standard_normal((100, n, d), dtype=np.float32)
        base /= np.linalg.norm(base, axis=2, keepdims=True)
        query = rng.standard_normal((100, d), dtype=np.float32)
        query /= np.linalg.norm(query, axis=1, keepdims=True)
        top.append(np.einsum("tnd,td->tn", base, query).max(axis=1))
    return np.concatenate(top)


def test_pack_page_data_draws_scores_against_chance(client, explorer_db):
    db, _ = explorer_db
    pack = get_json(client, "/api/packs/planted")
    assert pack["widths"] == {"res": [512], "mlp": [512], "att": [512]} and pack["k"] == 3
    top1 = pd.DataFrame(db.read(
        "MATCH (f:Feature {pack: 'planted', module: 'res'})<-[e {rank: 1}]-() "
        "RETURN f.layer AS layer, toLower(type(e)) AS kind, count(*) AS n"))
    place = {"residual": "res", "mlp": "mlp", "attention": "att"}
    chance_top1 = random_top1(512, 256)  # every place searches 512 features in d 256: one Monte Carlo serves all
    for histogram in pack["histograms"]:
        expected = top1[(top1["layer"] == histogram["layer"]) & (top1["kind"].map(place) == histogram["place"])]
        assert sum(histogram["observed"]) == int(expected["n"].iloc[0])
        edges, chance, total = histogram["bin_edges"], histogram["chance"], sum(histogram["observed"])
        assert sum(chance) == pytest.approx(total, rel=1e-6)
        simulated = np.histogram(chance_top1, bins=edges)[0] / TRIALS
        assert np.abs(np.asarray(chance) / total - simulated).max() < 0.05
    origins = run_template(db, "origins", {"pack": "planted"})
    assert [o["total"] for o in pack["origins"]] == origins["total"].tolist()
    coverage = {row["module"]: row for row in pack["labels"]}
    assert coverage["res"]["labelled"] == 4 * 128 and coverage["res"]["sources"] == ["neuronpedia"]


def test_errors_are_one_sentence_with_a_status_and_the_app_goes_on(client):
    cases = [("/api/features/planted/9/res/0", 404, "has layers 0-3"),
             ("/api/features/nopack/1/res/0", 404, "no pack named 'nopack'"),
             ("/api/packs/nopack", 404, "no pack named 'nopack'"),
             ("/api/flow/planted/3/res/0?max_rank=abc", 400, "max_rank must be int"),
             ("/api/flow/planted/3/res/0?t_res=5", 400, "t_res must be from -1 to 1"),
             ("/api/flow/planted/3/res/0?max_rank=4", 400, "above pack 'planted''s k=3"),
             ("/api/flow/planted/3/res/0?depth=0", 400, "depth must be from 1"),
             ("/api/nothing", 404, "no such address")]
    for path, status, fragment in cases:
        answer = get_json(client, path, status)
        assert fragment in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert get_json(client, "/api/features/planted/3/res/0")["feature"]["key"] == "planted/3/res/0"


def test_a_stopped_server_is_named_and_a_timed_out_query_is_a_504(explorer_db, neo4j_settings):
    from flowdb.errors import Neo4jUnavailable
    from flowdb.settings import Neo4jSettings
    from flowdb.store.connection import connect

    def nowhere():
        return connect(Neo4jSettings("bolt://127.0.0.1:9", "neo4j", "x", None))

    with TestClient(create_app(nowhere, token=TOKEN), base_url="http://127.0.0.1:8047") as down:
        for _ in range(2):  # the next request tries again, and is answered the same way
            answer = get_json(down, "/api/packs", 503)
            assert answer["error"].startswith("no Neo4j answers at bolt://127.0.0.1:9")
    with pytest.raises(Neo4jUnavailable):
        nowhere()
    db, _ = explorer_db
    with TestClient(create_app(lambda: db, token=TOKEN, timeout_s=0.5), base_url="http://127.0.0.1:8047") as slow:
        pairs = "MATCH (a:Feature), (b:Feature), (c:Feature) WHERE a.index + b.index + c.index = 7 RETURN count(*)"
        answer = slow.post("/api/cypher", json={"statement": pairs},
                           headers={"x-flowdb-token": TOKEN, "Origin": "http://127.0.0.1:8047"})
        assert answer.status_code == 504 and "0.5 s limit" in answer.json()["error"]


def test_reference_search_and_the_console(client):
    assert get_json(client, "/api/search?q=planted/2/res/17")["feature"] == "planted/2/res/17"
    assert get_json(client, "/api/search?q=https://www.neuronpedia.org/planted-model/2-planted-res/17")["feature"] \
        == "planted/2/res/17"
    missing = get_json(client, "/api/search?q=planted/2/res/9999", 404)
    assert "indexes 0-511" in missing["error"]
    headers = {"x-flowdb-token": TOKEN, "Origin": "http://127.0.0.1:8047"}
    answer = client.post("/api/cypher", headers=headers, json={
        "statement": "MATCH (a:Feature {key: $key})<-[e:RESIDUAL]-(b) RETURN a, e, b",
        "params": {"key": "planted/2/res/17"}})
    assert answer.status_code == 200, answer.text
    graph = answer.json()["graph"]
    assert {n["properties"]["key"] for n in graph["nodes"]} >= {"planted/2/res/17"}
    assert all(r["type"] == "RESIDUAL" for r in graph["relationships"]) and graph["relationships"]
    for statement, fragment in [("CREATE (n:Feature {key: 'x'}) RETURN n", "writes"),
                                ("LOAD CSV FROM 'file:///etc/passwd' AS row RETURN row", "LOAD CSV")]:
        refused = client.post("/api/cypher", headers=headers, json={"statement": statement})
        assert refused.status_code == 400 and fragment in refused.json()["error"], refused.text
    templates = get_json(client, "/api/templates")["templates"]
    assert "lineage" in {t["name"] for t in templates}
    lineage = get_json(client, "/api/templates/lineage?feature=planted/3/res/0")
    assert lineage["columns"][0] == "depth" and lineage["rows"]


def test_downloads_are_the_view(client):
    view = get_json(client, "/api/flow/planted/3/res/0?max_rank=2")
    document = get_json(client, "/api/download/json/planted/3/res/0?max_rank=2")
    assert len(document["nodes"]) == len(view["nodes"]) and len(document["links"]) == len(view["edges"])
    import jsonschema

    schema = json.loads((DATA / "neuronpedia-graph-schema.json").read_text())
    jsonschema.validate(document, schema)
    csv = client.get("/api/download/csv/planted/3/res/0?max_rank=2")
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("element,key,layer")
    png = client.get("/api/download/png/planted/3/res/0")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def security_app(db, host="0.0.0.0"):
    return create_app(lambda: db, host=host, token=TOKEN, require_token=True)


def test_off_loopback_every_request_needs_the_token(explorer_db):
    db, _ = explorer_db
    with TestClient(security_app(db), base_url="http://127.0.0.1:8047") as web:
        refused = web.get("/api/packs")
        assert refused.status_code == 403 and "token" in refused.json()["error"]
        assert web.get("/api/packs", headers={"x-flowdb-token": "wrong"}).status_code == 403
        assert web.get("/api/packs", headers={"x-flowdb-token": TOKEN}).status_code == 200
        landing = web.get(f"/?token={TOKEN}", follow_redirects=False)
        assert landing.status_code == 303 and landing.headers["location"] == "/"
        cookie = landing.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        web.cookies.set("flowdb_explorer_token", TOKEN)
        assert web.get("/api/packs").status_code == 200


def test_host_header_and_origin_are_checked(client):
    assert client.get("/api/packs", headers={"Host": "attacker.example"}).status_code == 400
    assert client.get("/api/packs", headers={"Host": "localhost:8047"}).status_code == 200
    body = {"statement": "RETURN 1 AS one"}
    assert client.post("/api/cypher", json=body).status_code == 403  # no token
    foreign = client.post("/api/cypher", json=body, headers={"x-flowdb-token": TOKEN, "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "evil.example" in foreign.json()["error"]
    own = client.post("/api/cypher", json=body, headers={"x-flowdb-token": TOKEN, "Origin": "http://127.0.0.1:8047"})
    assert own.status_code == 200 and own.json()["rows"] == [[1]]


def test_no_credential_reaches_a_page(client, neo4j_settings):
    password = neo4j_settings.password or ""
    for path in ["/", "/pack/planted", "/feature/planted/3/res/0", "/console", "/api/packs", "/api/packs/planted"]:
        text = client.get(path).text
        assert not password or password not in text


def test_show_draws_inline_and_keeps_labels_inert(explorer_db):
    import flowdb

    db, labels = explorer_db
    view = flowdb.show("planted/3/res/4", db=db, every_edge=True, depth=1)
    html = view._repr_html_()
    assert XSS_LABEL not in html and "<script>window.__xss" not in html
    payload = re.search(r"var view = (\{.*?\}); FlowView", html, re.S).group(1)
    decoded = json.loads(payload)
    assert {n["key"]: n["label"] for n in decoded["nodes"]}["planted/3/res/4"] == labels["planted/3/res/4"]
    assert len(decoded["nodes"]) == len(view.view["nodes"]) and "window.Plotly" in html
    big = flowdb.show("planted/3/res/0", db=db, every_edge=True, max_rank=3, depth=64)
    assert big.too_big and "too many to draw" in big._repr_html_()


def test_label_words_find_features_with_type_ahead(client, explorer_db):
    _, labels = explorer_db
    answer = get_json(client, "/api/search?q=River%20names%202re&limit=200")
    expected = {key for key, text in labels.items() if {"river", "names"} <= set(text.split()) and
                any(word.startswith("2re") for word in text.split())}
    assert 10 < len(expected) < 200
    assert answer["feature"] is None and {r["key"] for r in answer["results"]} == expected
    assert all(r["source"] == "neuronpedia" and r["type"] == "oai_token-act-pair" for r in answer["results"])
    markup = get_json(client, "/api/search?q=quotes")["results"]
    assert [r["matched"] for r in markup] == [XSS_LABEL]
    assert get_json(client, "/api/search?q=%20")["results"] == []
    assert "limit" in get_json(client, "/api/search?q=river&limit=0", 400)["error"]


def test_serve_refuses_a_busy_port_and_a_bad_host_pattern_in_one_line():
    import socket

    from helpers import assert_one_line_error, run_flowdb

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run_flowdb("serve", "--port", port), f"port {port} on 127.0.0.1 is in use")
    assert_one_line_error(run_flowdb("serve", "--allow-host", "foo*"), "--allow-host 'foo*' is not a host name")
