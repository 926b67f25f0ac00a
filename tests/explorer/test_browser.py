"""The explorer in a real browser: Playwright driving Debian's chromium (scripts/setup.sh
installs it) against the app served by uvicorn over a real Neo4j."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import jsonschema
import pytest

from conftest import XSS_LABEL, _free_port
from flowdb.explorer.app import create_app
from flowdb.explorer.security import is_loopback
from flowdb.store.templates import run_template
from helpers import DATA

TOKEN = "browser-test-token"
WAIT_MS = 30_000


class LiveServer:
    """The app on a free port, served by uvicorn in a thread."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the explorer did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(explorer_db):
    db, _ = explorer_db
    server = LiveServer(create_app(lambda: db, token=TOKEN))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not on PATH: bash scripts/setup.sh full installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    opened = context.new_page()
    errors = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == [], errors


def ready(page, url: str):
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready", timeout=WAIT_MS)
    return page.evaluate("document.body.dataset.ready")


def node_point(page, key: str) -> dict:
    """Where on the screen plotly drew the node `key`."""
    point = page.evaluate("""(key) => {
        const gd = document.getElementById('flow-graph'), fl = gd._fullLayout, box = gd.getBoundingClientRect();
        for (const t of gd.data) {
            const i = (t.customdata || []).indexOf(key);
            if (i >= 0) return {x: box.left + fl.xaxis._offset + fl.xaxis.l2p(t.x[i]),
                                y: box.top + fl.yaxis._offset + fl.yaxis.l2p(t.y[i])};
        }
        return null;
    }""", key)
    assert point, f"{key} is not drawn"
    return point


def click_node(page, key: str) -> None:
    point = node_point(page, key)
    page.mouse.wheel(0, point["y"] - 500)  # bring it into the viewport
    page.wait_for_timeout(200)
    point = node_point(page, key)
    page.mouse.move(point["x"], point["y"])
    page.wait_for_timeout(100)
    page.mouse.click(point["x"], point["y"])


def drawn_keys(page) -> set[str]:
    return set(page.evaluate("[].concat(...document.getElementById('flow-graph').data"
                             ".map((t) => t.customdata || []))"))


def residual_predecessor(db, key: str) -> str:
    lineage = run_template(db, "lineage", {"feature": key})
    steps = lineage[(lineage["depth"] == 0) & (lineage["kind"] == "residual")]
    return steps["pred_key"].iloc[0] if len(steps) else None


def test_search_by_label_words_then_walk_to_a_predecessor(live, page, explorer_db):
    db, labels = explorer_db
    key = next(k for k in sorted(labels) if k.startswith("planted/3/res/") and k != "planted/3/res/4"
               and residual_predecessor(db, k))
    predecessor = residual_predecessor(db, key)
    ready(page, live + "/")
    page.fill("#find-box", labels[key])  # its last word is searched as a prefix, as it is typed
    suggestion = page.locator("#find-suggestions a", has_text=key)
    suggestion.first.wait_for(timeout=WAIT_MS)
    suggestion.first.click()
    page.wait_for_url(f"**/feature/{key}", timeout=WAIT_MS)
    page.wait_for_function("document.body.dataset.ready", timeout=WAIT_MS)
    assert page.locator("#feature-labels .label-text").first.text_content() == labels[key]
    click_node(page, predecessor)
    page.wait_for_url(f"**/feature/{predecessor}*", timeout=WAIT_MS)
    page.wait_for_function("document.body.dataset.ready", timeout=WAIT_MS)
    assert page.locator("#feature-key").text_content() == predecessor


def test_a_control_changes_the_graph_and_the_url(live, page, explorer_db):
    db, _ = explorer_db

    def nodes(key, **params):
        frame = run_template(db, "flow-graph", {"feature": key, **params})
        return set(frame.loc[frame["element"] == "node", "key"])

    key, expected = next((key, nodes(key, max_rank=2)) for key in (f"planted/3/res/{i}" for i in range(100))
                         if len(nodes(key)) > 1 and nodes(key) != nodes(key, max_rank=2)
                         and len(nodes(key, max_rank=2)) <= 60)
    ready(page, f"{live}/feature/{key}?depth=64")
    assert drawn_keys(page) == nodes(key)
    page.fill("#flow-controls input[name=max_rank]", "2")
    with page.expect_response(lambda r: "/api/flow/" in r.url and "max_rank=2" in r.url):
        page.click("#flow-controls button[type=submit]")
    page.wait_for_function(f"document.body.dataset.flowNodes === '{len(expected)}'", timeout=WAIT_MS)
    assert drawn_keys(page) == expected
    assert "max_rank=2" in page.url and "depth=64" in page.url  # the view is a permalink
    ready(page, page.url)
    assert drawn_keys(page) == expected


def test_expanding_a_node_fetches_only_its_neighbourhood(live, page, explorer_db):
    db, _ = explorer_db
    key = "planted/3/res/0"
    ready(page, f"{live}/feature/{key}?depth=1&max_rank=3&every_edge=true")
    before = drawn_keys(page)
    boundary = sorted(k for k in before if k.startswith("planted/2/res/"))[0]
    requests = []
    page.on("request", lambda request: requests.append(urlparse(request.url).path))
    page.check("#expand-mode")
    with page.expect_response(lambda r: "/api/neighbours/" in r.url) as answer:
        click_node(page, boundary)
    body = answer.value.json()
    assert unquote(urlparse(answer.value.url).path) == f"/api/neighbours/{boundary}"
    assert body["edges"] and all(boundary in (e["source"], e["target"]) for e in body["edges"])
    stored = db.read("MATCH (a)-[e:RESIDUAL|MLP|ATTENTION]-(b:Feature {key: $key}) WHERE e.rank <= 3 "
                     "RETURN count(e) AS n", key=boundary)[0]["n"]
    assert len(body["edges"]) == stored
    grown = before | {n["key"] for n in body["nodes"]}
    page.wait_for_function(f"document.body.dataset.flowNodes === '{len(grown)}'", timeout=WAIT_MS)
    assert drawn_keys(page) == grown
    assert [p for p in requests if p.startswith("/api/")] == [f"/api/neighbours/{boundary}"]


def test_the_graph_json_download_is_neuronpedia_s_format(live, page):
    ready(page, f"{live}/feature/planted/3/res/0?max_rank=2")
    with page.expect_download() as download:
        page.click(".downloads a[data-fmt=json]")
    document = json.loads(Path(download.value.path()).read_text())
    schema = json.loads((DATA / "neuronpedia-graph-schema.json").read_text())
    jsonschema.validate(document, schema)
    assert document["metadata"]["slug"] == "flowdb-planted-3-res-0"
    assert len(document["nodes"]) == int(page.evaluate("document.body.dataset.flowNodes"))


def test_the_console_reads_and_refuses_writes_and_load_csv(live, page):
    ready(page, f"{live}/console?token={TOKEN}")  # the token comes as flowdb serve prints it
    assert "token=" not in page.url  # kept in a cookie, gone from the address bar
    page.fill("#cypher-statement", "MATCH (f:Feature {key: 'planted/2/res/17'}) RETURN f.key AS key, f.layer AS layer")
    page.click("#cypher-form button[type=submit]")
    page.wait_for_selector("#console-table td a", timeout=WAIT_MS)
    assert page.locator("#console-table td").first.text_content() == "planted/2/res/17"
    for statement, fragment in [("CREATE (n:Feature {key: 'x'}) RETURN n", "writes"),
                                ("LOAD CSV FROM 'file:///etc/passwd' AS row RETURN row", "LOAD CSV")]:
        page.fill("#cypher-statement", statement)
        page.click("#cypher-form button[type=submit]")
        page.wait_for_function("!document.getElementById('error').hidden", timeout=WAIT_MS)
        assert fragment in page.locator("#error").text_content()
        page.evaluate("document.getElementById('error').hidden = true")
    page.select_option("#template-name", "lineage")
    page.fill("#template-params input[name=feature]", "planted/3/res/0")
    page.click("#template-form button[type=submit]")
    page.wait_for_selector("#console-table th >> text=pred_key", timeout=WAIT_MS)


def test_markup_in_a_label_stays_text(live, page):
    ready(page, f"{live}/feature/planted/3/res/4?every_edge=true&depth=1")
    assert page.locator("#feature-labels .label-text").first.text_content() == XSS_LABEL
    page.fill("#find-box", "quotes")
    page.locator("#find-suggestions li").first.wait_for(timeout=WAIT_MS)
    assert XSS_LABEL in page.locator("#find-suggestions").text_content()
    ready(page, f"{live}/search?q=quotes")
    assert XSS_LABEL in page.locator("#search-results").text_content()
    ready(page, f"{live}/feature/planted/3/res/4?every_edge=true&depth=1")
    point = node_point(page, "planted/3/res/4")
    page.mouse.move(point["x"], point["y"])  # plotly reads <a>, <b> and <br> in text: the hover shows them as text
    page.wait_for_selector("#flow-graph .hoverlayer text", timeout=WAIT_MS)
    assert XSS_LABEL in page.locator("#flow-graph .hoverlayer").text_content()
    assert 'href="javascript:window' in page.locator("#flow-graph").text_content()  # the node's own text
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None  # neither handler, link nor script ran
    assert page.evaluate("document.querySelectorAll('img, main script, #flow-graph a').length") == 0


def test_the_family_table_links_relatives_and_keeps_labels_as_text(live, page, explorer_db, planted_pack, tmp_path):
    from flowdb.flow.link_spec import LinkSpec
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import delete_pack, ingest
    from flowdb.store.links import link_packs

    db, _ = explorer_db
    (tmp_path / "manifest.toml").write_text(  # the planted residual SAEs again, as a pack of its own
        f'name = "copy"\nmodel = "planted-model"\nlayers = [0, 3]\n\n'
        f'[modules.res]\npath = "{planted_pack[0]}/saes/res/layer_{{layer}}"\n')
    ingest(load_manifest(tmp_path / "manifest.toml"), db)
    try:
        link_packs(db, "copy", "planted", LinkSpec(k=1, modules=("res",)))
        ready(page, f"{live}/feature/copy/3/res/4?depth=1")
        page.wait_for_selector("#family-table td", timeout=WAIT_MS)
        row = page.locator("#family-table tr").nth(1)
        assert XSS_LABEL in row.text_content()  # its relative is planted/3/res/4 itself (cosine 1), labelled in markup
        row.locator("a", has_text="planted/3/res/4").click()
        page.wait_for_url("**/feature/planted/3/res/4**", timeout=WAIT_MS)
        page.wait_for_function("document.body.dataset.ready", timeout=WAIT_MS)
        page.wait_for_selector("#family-table td", timeout=WAIT_MS)  # and back: its family names the copy
        assert "copy/3/res/4" in page.locator("#family-table").text_content()
        assert page.evaluate("window.__xss") is None
        assert page.evaluate("document.querySelectorAll('img, main script, #family-table a[href^=javascript]')"
                             ".length") == 0
    finally:
        delete_pack(db, "copy")


def test_off_loopback_a_request_without_the_token_is_refused(explorer_db, page):
    db, _ = explorer_db
    host = "0.0.0.0"
    server = LiveServer(create_app(lambda: db, host=host, token=TOKEN, require_token=not is_loopback(host)), host)
    try:
        refused = page.goto(server.url + "/")
        assert refused.status == 403 and "needs its token" in page.text_content("body")
        assert page.request.get(server.url + "/api/packs").status == 403
        assert ready(page, f"{server.url}/?token={TOKEN}") == "1"
        assert page.locator("#packs-table a", has_text="planted").count() == 1
    finally:
        server.stop()


@pytest.fixture
def private_neo4j(tmp_path):
    """A managed Neo4j of this test's own (stopped and started here), sharing the jars."""
    from flowdb.settings import Neo4jSettings, flowdb_home
    from flowdb.store.connection import connect
    from flowdb.store.server import ManagedServer

    root = tmp_path / "neo4j"
    root.mkdir(mode=0o700)
    if (flowdb_home() / "neo4j" / "lib").exists():
        os.symlink(flowdb_home() / "neo4j" / "lib", root / "lib")
    server = ManagedServer(root, _free_port())
    server.start(heap="256m", page_cache_mb=32)
    user, password = server.auth()
    db = connect(Neo4jSettings(server.uri, user, password, None))
    try:
        yield server, db
    finally:
        db.close()
        server.stop()


def test_a_stopped_neo4j_is_named_and_the_app_recovers(private_neo4j, page):
    server, db = private_neo4j
    live = LiveServer(create_app(lambda: db, token=TOKEN))
    try:
        assert ready(page, live.url + "/") == "1"
        server.stop()
        assert ready(page, live.url + "/") == "error"
        message = page.locator("#error").text_content()
        assert "Neo4j at" in message and "is it running?" in message
        server.start(heap="256m", page_cache_mb=32)
        assert ready(page, live.url + "/") == "1"
        assert page.locator("#error").is_hidden()
    finally:
        live.stop()
