"""The explorer's attribution-graph pages over a real Neo4j: the JSON API against an
independent reading of the imported files (tests/circuits/circuit_graphs.py), and the pages
in Debian's chromium (the fixtures of test_browser.py)."""

from __future__ import annotations

import html
import json
import re

import pytest
import test_browser
from starlette.testclient import TestClient
from test_browser import TOKEN, WAIT_MS, LiveServer, ready

from circuits.circuit_graphs import cantor, make_graph, write_graphs  # tests/circuits, as a namespace package
from conftest import XSS_LABEL, wipe
from flowdb.explorer.app import create_app

PACK, LAYERS, WIDTH = "tc", 4, 64
RANKED_TYPES = {"cross layer transcoder", "transcoder", "mlp reconstruction error"}  # the node cap ranks these
UNTIED = "3_99_0"  # a transcoder index past the pack's width: no stored feature to tie to
browser, page = test_browser.browser, test_browser.page  # the same chromium, and no page error allowed


def markup_graph() -> dict:
    """A graph whose first feature's clerp, first prompt token and stored supernode's name
    are XSS_LABEL, with one feature node that ties to nothing."""
    document = make_graph("markup", seed=7)
    document["metadata"]["prompt_tokens"][0] = XSS_LABEL
    document["metadata"]["prompt"] = "".join(document["metadata"]["prompt_tokens"])
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    features[0]["clerp"] = XSS_LABEL
    document["nodes"].append({
        "node_id": UNTIED, "feature": cantor(3, 99), "layer": "3", "ctx_idx": 0, "jsNodeId": "3_99-0",
        "feature_type": "cross layer transcoder", "clerp": "untied", "influence": 0.001, "activation": 1.0})
    document["links"].append({"source": document["nodes"][0]["node_id"], "target": UNTIED, "weight": 2.5})
    grouped = [features[0]["node_id"], features[1]["node_id"]]
    document["qParams"].update(supernodes=[[XSS_LABEL, *grouped]], pinnedIds=grouped)
    return document


@pytest.fixture(scope="module")
def circuit_db(neo4j_settings, tmp_path_factory):
    """A small synthetic pack and three graphs tied to its residual features, in an emptied
    database: (db, slug -> the document as imported). The tests only read."""
    from flowdb.circuits.store import import_graphs
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import SynthSpec, synthesize
    from flowdb.store.connection import connect
    from flowdb.store.ingest import ingest

    folder = tmp_path_factory.mktemp("circuit-pages")
    synthesize(folder / "pack", SynthSpec(name=PACK, layers=LAYERS, d_model=64, width=WIDTH, seed=3))
    documents = write_graphs(folder / "graphs", 2)
    documents["markup"] = markup_graph()
    (folder / "graphs" / "markup.json").write_text(json.dumps(documents["markup"]))
    with connect(neo4j_settings) as db:
        wipe(db)
        ingest(load_manifest(folder / "pack" / "manifest.toml"), db, show_progress=False)
        import_graphs(db, [folder / "graphs"], pack=PACK, module="res")
        yield db, documents


@pytest.fixture(scope="module")
def client(circuit_db):
    db, _ = circuit_db
    with TestClient(create_app(lambda: db, token=TOKEN), base_url="http://127.0.0.1:8047") as test_client:
        yield test_client


@pytest.fixture(scope="module")
def live(circuit_db):
    """The app over circuit_db, served by uvicorn (test_browser's LiveServer)."""
    server = LiveServer(create_app(lambda: circuit_db[0], token=TOKEN))
    try:
        yield server.url
    finally:
        server.stop()


def get_json(client, path, status=200):
    response = client.get(path)
    assert response.status_code == status, response.text
    return response.json()


def tied_key(node: dict) -> str | None:
    """The pack feature a file's node names ("{layer}_{index}_{pos}"), when the pack has it."""
    layer, index, _ = node["node_id"].split("_")
    if node["feature_type"] not in RANKED_TYPES - {"mlp reconstruction error"} or not layer.isdigit():
        return None
    return f"{PACK}/{layer}/res/{index}" if int(layer) < LAYERS and 0 <= int(index) < WIDTH else None


def expected_view(document: dict, node_cap: int, link_cap: int) -> tuple[list[dict], list[tuple], int]:
    """From the file alone: every token and logit, the node_cap feature and error nodes of
    smallest influence (circuit-tracer's cumulative share: the most influential first), and
    the link_cap links among them of largest |weight|, in file order on ties."""
    ranked = [n for n in document["nodes"] if n["feature_type"] in RANKED_TYPES]
    ranked = sorted(ranked, key=lambda n: (n["influence"] is None, n["influence"] or 0.0))[:node_cap]
    kept = {n["node_id"] for n in ranked} | {n["node_id"] for n in document["nodes"]
                                              if n["feature_type"] not in RANKED_TYPES}
    nodes = [n for n in document["nodes"] if n["node_id"] in kept]
    among = [link for link in document["links"] if link["source"] in kept and link["target"] in kept]
    strongest = sorted(among, key=lambda link: -abs(link["weight"]))[:link_cap]  # sorted() keeps file order on ties
    return nodes, [(link["source"], link["target"], link["weight"]) for link in strongest], len(among)


def expected_row(node: dict, top: int) -> int:
    return {"embedding": -1, "logit": top}.get(node["feature_type"], int(node["layer"]) if node["layer"] != "E" else -1)


@pytest.mark.parametrize("caps", [{}, {"nodes": 5, "links": 10}, {"nodes": 1, "links": 1}])
@pytest.mark.parametrize("slug", ["g00", "g01", "markup"])
def test_the_graph_api_is_the_file_pruned_as_stated(client, circuit_db, slug, caps):
    _, documents = circuit_db
    document = documents[slug]
    query = "&".join(f"{name}={value}" for name, value in caps.items())
    view = get_json(client, f"/api/graphs/{slug}?suggest=false&{query}")
    nodes, links, among = expected_view(document, caps.get("nodes", 60), caps.get("links", 300))
    assert [n["node_id"] for n in view["nodes"]] == [n["node_id"] for n in nodes]  # in the file's order
    assert [(link["source"], link["target"], link["weight"]) for link in view["links"]] == links  # weights exact
    top = 1 + max(int(n["layer"]) for n in nodes if n["feature_type"] in RANKED_TYPES)
    served = {n["node_id"]: n for n in view["nodes"]}
    for node in nodes:
        got = served[node["node_id"]]
        assert (got["row"], got["key"], got["ctx_idx"], got["clerp"], got["influence"], got["activation"]) == (
            expected_row(node, top), tied_key(node), node["ctx_idx"], node.get("clerp", ""), node.get("influence"),
            node.get("activation"))
    ranked = sum(n["feature_type"] in RANKED_TYPES for n in document["nodes"])
    assert view["cut"] == {
        "nodes": {"shown": min(ranked, caps.get("nodes", 60)), "of": ranked, "cap": caps.get("nodes", 60),
                  "always": len(document["nodes"]) - ranked},
        "links": {"shown": len(links), "among": among, "of": len(document["links"]), "cap": caps.get("links", 300)}}
    assert view["graph"]["prompt_tokens"] == document["metadata"]["prompt_tokens"]


def test_the_graphs_list_has_every_graph_with_its_counts(client, circuit_db):
    _, documents = circuit_db
    listed = {g["slug"]: g for g in get_json(client, "/api/graphs")["graphs"]}
    assert set(listed) == set(documents)
    for slug, document in documents.items():
        row = listed[slug]
        assert (row["prompt"], row["scan"], row["nodes"], row["links"], row["pack"]) == (
            document["metadata"]["prompt"], document["metadata"]["scan"], len(document["nodes"]),
            len(document["links"]), PACK)
        assert re.match(r"\d{4}-\d\d-\d\dT", row["imported"])


def test_stored_supernodes_come_first_and_suggestions_keep_out_of_them(client, circuit_db):
    _, documents = circuit_db
    document = documents["markup"]
    groups = get_json(client, "/api/graphs/markup")["supernodes"]
    stored = document["qParams"]["supernodes"][0]
    assert groups[0] == {"name": XSS_LABEL, "origin": "stored", "rules": [], "node_ids": stored[1:],
                         "drawn": stored[1:]}
    suggested = groups[1:]
    assert suggested and all(g["origin"] == "suggested" and g["rules"] for g in suggested)
    assert not {node_id for g in suggested for node_id in g["node_ids"]} & set(stored[1:])
    positions: dict[tuple, list[str]] = {}  # one feature at several positions is always one supernode
    for node in document["nodes"]:
        if node["feature_type"] == "cross layer transcoder" and node["node_id"] not in stored:
            positions.setdefault((node["layer"], node["feature"]), []).append(node["node_id"])
    for ids in (ids for ids in positions.values() if len(ids) > 1):
        holding = [g for g in suggested if set(ids) <= set(g["node_ids"])]
        assert len(holding) == 1 and "same-feature" in holding[0]["rules"], (ids, suggested)


def test_a_feature_lists_the_graphs_it_is_in(client, circuit_db):
    _, documents = circuit_db
    found: dict[str, list[tuple]] = {}
    for slug, document in documents.items():
        tokens = document["metadata"]["prompt_tokens"]
        for node in document["nodes"]:
            if tied_key(node):
                found.setdefault(tied_key(node), []).append(
                    (slug, node["node_id"], node["ctx_idx"], tokens[node["ctx_idx"]], node["activation"],
                     node["influence"]))
    key = max(sorted(found), key=lambda k: len({row[0] for row in found[k]}))  # in the most graphs
    answer = get_json(client, f"/api/feature-graphs/{key}")
    rows = [(r["slug"], r["node_id"], r["position"], r["token"], r["activation"], r["influence"])
            for r in answer["graphs"]]
    assert rows == sorted(found[key], key=lambda row: (row[0], row[2])) and not answer["more"]
    assert len({row[0] for row in rows}) > 1
    assert get_json(client, f"/api/feature-graphs/{PACK}/0/res/63")["graphs"] == []  # in no graph


def test_an_unknown_graph_is_a_404_page_of_one_line(client):
    response = client.get("/graph/<b>nope")
    assert response.status_code == 404 and "<b>nope" not in response.text
    message = html.unescape(re.search(r'<p class="message">(.*?)</p>', response.text, re.S).group(1))
    assert message == "No attribution graph '<b>nope' is stored: see Attribution graphs."
    assert 'href="/graphs"' in response.text  # the navigation leads to the list
    error = get_json(client, "/api/graphs/nope", 404)["error"]
    assert error.startswith("no attribution graph 'nope'") and "\n" not in error


@pytest.mark.parametrize("query, fragment", [("nodes=0", "parameter nodes must be from 1 to 500"),
                                             ("links=x", "parameter links must be int"),
                                             ("suggest=maybe", "suggest must be true or false")])
def test_bad_caps_are_a_400_that_names_them(client, query, fragment):
    assert fragment in get_json(client, f"/api/graphs/g00?{query}", 400)["error"]


# --- in the browser ---------------------------------------------------------------------------

def drawn(page) -> dict[str, dict]:
    """Each node plotly drew, by node id: where on the screen, and how far (in pixels) the
    nearest other point is, node or link midpoint (a click lands on the nearest)."""
    return page.evaluate("""() => {
        const gd = document.getElementById('circuit-graph'), box = gd.getBoundingClientRect();
        const {xaxis, yaxis} = gd._fullLayout;
        const points = gd.data.flatMap((trace) => trace.x.map((x, i) => ({
            id: (trace.customdata || [])[i], x: box.left + xaxis._offset + xaxis.l2p(x),
            y: box.top + yaxis._offset + yaxis.l2p(trace.y[i])})));
        const out = {};
        for (const p of points.filter((p) => p.id)) {
            const others = points.filter((q) => q !== p).map((q) => Math.hypot(q.x - p.x, q.y - p.y));
            out[p.id] = {x: p.x, y: p.y, clear: Math.min(...others)};
        }
        return out;
    }""")


def show_graph(page, url: str) -> dict[str, dict]:
    ready(page, url)
    page.evaluate("document.getElementById('circuit-graph').scrollIntoView()")
    return drawn(page)


def test_the_graphs_list_leads_to_a_drawn_graph(live, page, circuit_db):
    _, documents = circuit_db
    ready(page, live + "/")
    page.click("header nav a:has-text('Attribution graphs')")
    page.wait_for_url("**/graphs", timeout=WAIT_MS)
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=WAIT_MS)
    assert {a.text_content() for a in page.locator("#graphs-table a").all()} == set(documents)
    page.click("#graphs-table a:text-is('g01')")
    page.wait_for_url("**/graph/g01", timeout=WAIT_MS)
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=WAIT_MS)
    served = page.request.get(live + "/api/graphs/g01").json()
    in_file = {n["node_id"] for n in documents["g01"]["nodes"]}
    assert set(drawn(page)) == {n["node_id"] for n in served["nodes"]} == in_file
    assert page.evaluate("document.getElementById('circuit-graph').layout.shapes.length") == (
        len(served["links"]) + sum(bool(g["drawn"]) for g in served["supernodes"]))
    assert f"all {served['cut']['nodes']['of']} feature and error nodes" in page.locator("#graph-cut").text_content()


def test_a_cut_graph_says_what_was_cut(live, page):
    cut = page.request.get(live + "/api/graphs/g00?nodes=3&links=1").json()["cut"]
    assert cut["links"]["among"] > 1
    points = show_graph(page, live + "/graph/g00?nodes=3&links=1")
    assert len(points) == 3 + cut["nodes"]["always"]
    note = page.locator("#graph-cut").text_content()
    assert f"the 3 most influential of {cut['nodes']['of']} feature and error nodes" in note
    assert f"the 1 strongest by |weight| of the {cut['links']['among']} links among the drawn nodes" in note
    assert page.locator("#graph-controls input[name=nodes]").input_value() == "3"
    ready(page, live + "/graph/g00?nodes=3&links=1&focus=nowhere")
    note = page.locator("#graph-cut").text_content()
    assert "Node nowhere (from the feature page) is not among the drawn nodes" in note


def test_a_tied_node_opens_its_feature_page_which_lists_its_graphs(live, page, circuit_db):
    served = page.request.get(live + "/api/graphs/g00").json()
    keys = {n["node_id"]: n["key"] for n in served["nodes"] if n["key"]}
    points = show_graph(page, live + "/graph/g00")
    node_id = max(keys, key=lambda i: points[i]["clear"])  # the tied node farthest from any other point
    assert points[node_id]["clear"] > 12
    page.mouse.move(points[node_id]["x"], points[node_id]["y"])
    page.mouse.click(points[node_id]["x"], points[node_id]["y"])
    page.wait_for_url(f"**/feature/{keys[node_id]}", timeout=WAIT_MS)
    page.wait_for_function("document.body.dataset.ready", timeout=WAIT_MS)
    page.wait_for_selector("#feature-graphs-table a", timeout=WAIT_MS)
    listed = page.locator("#feature-graphs-table a", has_text="g00")
    assert listed.count() >= 1
    listed.first.click()
    page.wait_for_url(re.compile(r"/graph/g00\?focus="), timeout=WAIT_MS)
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=WAIT_MS)
    focus = page.evaluate("new URL(location.href).searchParams.get('focus')")
    assert keys[focus] == keys[node_id]  # one of the feature's nodes, ringed
    ringed = "document.getElementById('circuit-graph').data.some((t) => t.name === 'from the feature page')"
    assert page.evaluate(ringed)


def test_markup_in_clerp_token_and_supernode_name_stays_text(live, page):
    points = show_graph(page, live + "/graph/markup")
    assert XSS_LABEL in page.locator("#graph-nodes-table").text_content()
    assert XSS_LABEL in page.locator("#supernodes-table").text_content()
    assert XSS_LABEL in page.locator("#graph-record").text_content()  # the prompt and its tokens
    axis = page.locator("#circuit-graph .xtick").first.text_content()
    assert axis.startswith('<a href="java')  # the token as typed, cut to fit
    assert page.locator("#circuit-graph .annotation-text", has_text='<a href="javascript').count() == 1
    served = page.request.get(live + "/api/graphs/markup").json()
    marked = next(n["node_id"] for n in served["nodes"] if n["clerp"] == XSS_LABEL)
    page.mouse.move(points[marked]["x"], points[marked]["y"])
    page.wait_for_selector("#circuit-graph .hoverlayer text", timeout=WAIT_MS)
    assert XSS_LABEL in page.locator("#circuit-graph .hoverlayer").text_content()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None  # neither handler, link nor script ran
    assert page.evaluate("document.querySelectorAll('img, main script, #circuit-graph a').length") == 0
    untied = points[UNTIED]
    page.mouse.click(untied["x"], untied["y"])  # a node tied to nothing opens nothing
    page.wait_for_timeout(300)
    assert page.url.endswith("/graph/markup")
