import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.errors import DatabaseError, FlowdbError
from flowdb.store.labels import fetch_labels, import_labels, origin
from helpers import assert_one_line_error, export_row, run_flowdb, serve, write_export

HANG = 60  # seconds: refusals here take well under one; a hang fails the test here
# Tests that store something take labelled_pack, a database of their own; tests that check
# that a refusal stores nothing take labelled_graph, built once and shared (conftest.py).

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stored_explanations(db):
    return db.read("MATCH (e:Explanation) RETURN count(e) AS n")[0]["n"]


def labelled_features(db):
    return db.read("MATCH (f:Feature) WHERE f.label IS NOT NULL RETURN count(f) AS n")[0]["n"]


def test_import_export_layout_with_counts(labelled_pack, tmp_path):
    db = labelled_pack
    res_rows = [export_row(i, "2-planted-res", i, f"residual concept {i}") for i in range(1100)]  # two batches
    res_rows.append(export_row(5000, "2-planted-res", 7, "a second explanation of 7"))
    res_rows.append(export_row(5001, "2-planted-res", 512, "beyond the width"))
    mlp_rows = [export_row(6000 + i, "1-planted-mlp", i, f"mlp concept {i}") for i in range(10)]
    stray = [export_row(7000, "9-other-res", 0, "unknown source")]
    write_export(tmp_path, {"2-planted-res": res_rows, "1-planted-mlp": mlp_rows + stray})
    report = import_labels(db, tmp_path)
    assert report.rows == 1100 + 2 + 10 + 1
    assert report.unmatched == {"with an index beyond the SAE's width": 589, "with an unknown model/source": 1}
    assert report.explanations == 512 + 1 + 10
    assert report.features == 512 + 10
    assert report.files == 3
    stored = db.read("MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature {key: 'planted/2/res/7'}) "
                     "RETURN e.description AS d, e.explanationModelName AS m, f.label AS label ORDER BY d")
    assert [r["d"] for r in stored] == ["a second explanation of 7", "residual concept 7"]
    assert {r["label"] for r in stored} == {"residual concept 7"}  # first by id: clx000007 < clx005000
    assert "589 with an index beyond the SAE's width" in report.summary()
    again = import_labels(db, tmp_path)  # importing twice stores nothing new
    assert stored_explanations(db) == 512 + 1 + 10
    assert again.explanations == report.explanations


@pytest.mark.parametrize("form", ["jsonl", "json", "json-object"])
def test_import_single_files(labelled_pack, tmp_path, form):
    rows = [export_row(i, "0-planted-res", i, f"concept {i}") for i in range(3)]
    path = tmp_path / ("rows.jsonl" if form == "jsonl" else "rows.json")
    if form == "jsonl":
        write_jsonl(path, rows)
    else:
        path.write_text(json.dumps(rows if form == "json" else {"explanations": rows}))
    report = import_labels(labelled_pack, path)
    assert (report.rows, report.explanations, report.features) == (3, 3, 3)


def test_import_errors_name_the_file(labelled_graph, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"modelId": "planted-model", "layer": "0-planted-res", "index": "1"}\n')
    with pytest.raises(FlowdbError, match="bad.jsonl: row 1 lacks description"):
        import_labels(labelled_graph, bad)
    assert stored_explanations(labelled_graph) == 0
    result = CliRunner().invoke(cli, ["labels", "import", str(bad)])
    assert result.exit_code == 1 and "row 1 lacks description" in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
    result = CliRunner().invoke(cli, ["labels", "import", str(tmp_path)])
    assert result.exit_code == 1 and "no explanations/*.jsonl(.gz) files" in result.output


def test_a_bad_row_after_5000_stores_nothing_of_the_file(labelled_pack, tmp_path):
    db = labelled_pack
    rows = [export_row(i, f"{i // 512 % 4}-planted-res", i % 512, f"concept {i}") for i in range(5001)]
    bad = export_row(5001, "1-planted-res", 0, "the bad one")
    bad["index"] = 3.7
    path = write_jsonl(tmp_path / "rows.jsonl", rows + [bad])
    with pytest.raises(FlowdbError) as caught:
        import_labels(db, path)
    message = str(caught.value)
    assert "rows.jsonl" in message and "row 5002" in message and "index" in message and "\n" not in message
    assert stored_explanations(db) == 0
    assert labelled_features(db) == 0

    bad["index"] = 3
    write_jsonl(path, rows + [bad])
    report = import_labels(db, path)
    features = {(row["layer"], str(row["index"])) for row in rows + [bad]}
    assert report.explanations == stored_explanations(db) == 5002
    assert report.features == labelled_features(db) == len(features)


@pytest.mark.parametrize("index", [3.7, True, -1, "3a", "-1", " 3", None, [3]])
def test_bad_indexes_are_refused(labelled_graph, tmp_path, index):
    good = export_row(1, "0-planted-res", 1, "good")
    bad = {**export_row(2, "0-planted-res", 0, "bad"), "index": index}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad])
    with pytest.raises(FlowdbError) as caught:
        import_labels(labelled_graph, path)
    message = str(caught.value)
    assert "row 2" in message and "index" in message and "\n" not in message
    assert stored_explanations(labelled_graph) == 0


def test_index_as_digits_or_integer_is_accepted(labelled_pack, tmp_path):
    rows = [export_row(1, "0-planted-res", 0, "as text"), export_row(2, "0-planted-res", 0, "as integer")]
    rows[0]["index"], rows[1]["index"] = "3", 3
    report = import_labels(labelled_pack, write_jsonl(tmp_path / "rows.jsonl", rows))
    assert report.explanations == 2
    stored = labelled_pack.read("MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature {key: 'planted/0/res/3'}) "
                                "RETURN e.description AS d, e.index AS i, f.label AS label ORDER BY d")
    assert [(r["d"], r["i"]) for r in stored] == [("as integer", 3), ("as text", 3)]
    assert stored[0]["label"] == "as text"  # first by id: clx000001


@pytest.mark.parametrize("name, value", [
    ("typeName", {"kind": "oai"}), ("description", 5), ("explanationModelName", ["gpt"]),
    ("authorId", 3), ("scores", "high"), ("modelId", 7), ("layer", 0), ("id", {"x": 1})])
def test_wrong_property_types_are_refused(labelled_graph, tmp_path, name, value):
    rows = [export_row(1, "0-planted-res", 1, "good"), {**export_row(2, "0-planted-res", 2, "bad"), name: value}]
    with pytest.raises(FlowdbError) as caught:
        import_labels(labelled_graph, write_jsonl(tmp_path / "rows.jsonl", rows))
    assert not isinstance(caught.value, DatabaseError)  # refused before Neo4j sees it
    message = str(caught.value)
    assert "row 2" in message and name in message and "Neo" not in message and "\n" not in message
    assert stored_explanations(labelled_graph) == 0


def test_earlier_files_stay_committed_and_a_rerun_completes(labelled_pack, tmp_path):
    db = labelled_pack
    rows = [export_row(i, "2-planted-res", i % 512, f"concept {i}") for i in range(1100)]  # files of 1024 + 76
    rows[1030]["description"] = {"text": "not a string"}
    write_export(tmp_path, {"2-planted-res": rows})
    with pytest.raises(FlowdbError) as caught:
        import_labels(db, tmp_path)
    message = str(caught.value)
    assert "batch-1.jsonl.gz" in message and f"row {1030 - 1024 + 1}" in message and "description" in message
    assert "1 earlier file(s) with 1024 explanations" in message
    assert stored_explanations(db) == 1024
    rows[1030]["description"] = "fixed"
    write_export(tmp_path, {"2-planted-res": rows})
    report = import_labels(db, tmp_path)
    assert report.explanations == stored_explanations(db) == 1100
    assert labelled_features(db) == 512


# --- fetch ---------------------------------------------------------------------------------

def explained(handler, model, source, index):
    body = {"modelId": model, "layer": source, "index": index, "explanations": [
        {"id": f"{source}-{index}-a", "description": f"weak {index}", "typeName": "oai_token-act-pair",
         "explanationModelName": "gpt-4o-mini", "scores": [{"value": 0.2}]},
        {"id": f"{source}-{index}-b", "description": f"strong {index}", "typeName": "oai_token-act-pair",
         "explanationModelName": "claude", "scores": [{"value": 0.9}]},
    ]}
    send_body(json.dumps(body).encode())(handler, model, source, index)


def send_body(payload: bytes):
    def answer(handler, *_):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
    return answer


def status(code, retry_after=None):
    def answer(handler, *_):
        handler.send_response(code)
        if retry_after is not None:
            handler.send_header("Retry-After", retry_after)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


def trickle(handler, model, source, index):
    """A whole, valid answer, one byte a second."""
    payload = json.dumps({"explanations": [{"id": "slow", "description": "slow"}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    try:
        for byte in payload:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(1.0)
    except OSError:  # the client gave up
        pass


class FakeNeuronpedia(BaseHTTPRequestHandler):
    """Speaks GET /api/feature/{modelId}/{source}/{index} as Neuronpedia does."""

    seen: list = []  # (path, x-api-key, monotonic time)
    plans: dict = {}  # index -> answers given in turn; the last one repeats

    def do_GET(self):  # noqa: N802
        FakeNeuronpedia.seen.append((self.path, self.headers.get("x-api-key"), time.monotonic()))
        parts = self.path.strip("/").split("/")
        if parts[:2] != ["api", "feature"] or len(parts) != 5:
            return status(404)(self)
        plan = FakeNeuronpedia.plans.get(parts[4], [explained])
        answer = plan.pop(0) if len(plan) > 1 else plan[0]
        answer(self, *parts[2:])

    def log_message(self, *args):
        pass


def asked(index):
    """The times feature (layer 0, res, index) was asked for."""
    return [t for path, _, t in FakeNeuronpedia.seen if path == f"/api/feature/planted-model/0-planted-res/{index}"]


@pytest.fixture
def neuronpedia_server():
    FakeNeuronpedia.seen, FakeNeuronpedia.plans = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeNeuronpedia)
    server.daemon_threads = True
    # shutdown() waits for the loop's next poll: 0.5 s at the default interval, per test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def fetch(db, url, **options):
    return fetch_labels(db, "planted", module="res", api_url=url, requests_per_second=50,
                        progress=False, **{"limit": 2, **options})


def problems(db, indexes):
    return [(r["fetched"], r["problem"], r["label"]) for r in db.read(
        "UNWIND $indexes AS i MATCH (f:Feature {key: 'planted/0/res/' + toString(i)}) "
        "RETURN f.np_fetched IS NOT NULL AS fetched, f.np_problem AS problem, f.label AS label",
        indexes=indexes)]


def test_fetch_fills_labels_politely_and_resumes(labelled_pack, neuronpedia_server, monkeypatch):
    monkeypatch.setenv("NEURONPEDIA_API_KEY", "secret")
    FakeNeuronpedia.plans = {"0": [status(429, "0"), explained], "3": [status(404)]}
    db = labelled_pack
    report = fetch(db, neuronpedia_server, limit=5)
    assert (report.fetched, report.not_found, report.failed) == (4, 1, 0)  # index 3 is unknown to the server
    assert all(key == "secret" for _, key, _ in FakeNeuronpedia.seen)
    assert len(asked(0)) == 2
    labels = db.read("MATCH (f:Feature {pack: 'planted', layer: 0, module: 'res'}) WHERE f.index < 5 "
                     "RETURN f.index AS i, f.label AS label ORDER BY i")
    assert [r["label"] for r in labels] == ["strong 0", "strong 1", "strong 2", None, "strong 4"]
    count = len(FakeNeuronpedia.seen)
    second = fetch(db, neuronpedia_server, limit=2)
    assert second.fetched == 2
    assert [p for p, _, _ in FakeNeuronpedia.seen[count:]] == [
        "/api/feature/planted-model/0-planted-res/5", "/api/feature/planted-model/0-planted-res/6"]


def test_a_trickling_answer_hits_the_deadline_and_the_run_goes_on(labelled_pack, neuronpedia_server):
    FakeNeuronpedia.plans = {"0": [trickle]}
    started = time.monotonic()
    report = fetch(labelled_pack, neuronpedia_server, request_deadline_s=2)
    elapsed = time.monotonic() - started
    assert (report.failed, report.fetched) == (1, 1)
    assert elapsed < 2 + 3  # the answer alone would take a minute
    (fetched0, problem0, label0), (fetched1, problem1, label1) = problems(labelled_pack, [0, 1])
    assert fetched0 and problem0 and "deadline" in problem0 and label0 is None
    assert fetched1 and problem1 is None and label1 == "strong 1"
    assert "1 failed" in report.summary()


@pytest.mark.parametrize("answer", [b"[1, 2]", b'{"explanations": "none"}', b"<html>busy</html>",
                                    b'{"explanations": [{"id": "x", "description": 5}]}'])
def test_an_unusable_answer_is_recorded_and_not_asked_again(labelled_pack, neuronpedia_server, answer):
    FakeNeuronpedia.plans = {"0": [send_body(answer)]}
    report = fetch(labelled_pack, neuronpedia_server)
    assert (report.failed, report.fetched) == (1, 1)
    (fetched0, problem0, label0), = problems(labelled_pack, [0])
    assert fetched0 and problem0 and label0 is None
    assert stored_explanations(labelled_pack) == 2  # feature 1's two
    second = fetch(labelled_pack, neuronpedia_server)
    assert (second.failed, second.fetched) == (0, 2)
    assert len(asked(0)) == 1 and len(asked(2)) == len(asked(3)) == 1


def test_429_with_retry_after_is_waited_for_then_answered(labelled_pack, neuronpedia_server):
    FakeNeuronpedia.plans = {"0": [status(429, "1"), explained]}
    report = fetch(labelled_pack, neuronpedia_server, limit=1, backoff_s=0)
    assert (report.fetched, report.failed) == (1, 0)
    first, second = asked(0)
    assert second - first >= 1.0 - 0.05  # what Retry-After said
    assert problems(labelled_pack, [0]) == [(True, None, "strong 0")]


def test_a_503_that_never_recovers_ends_after_the_bounded_retries(labelled_pack, neuronpedia_server):
    FakeNeuronpedia.plans = {"0": [status(503)]}
    retries, backoff = 3, 0.2
    # urllib3's documented backoff: none before the first retry, then backoff * 2^n.
    sleeps = [0.0] + [backoff * 2 ** n for n in range(1, retries)]
    next_sleep = backoff * 2 ** retries
    started = time.monotonic()
    report = fetch(labelled_pack, neuronpedia_server, retries=retries, backoff_s=backoff)
    elapsed = time.monotonic() - started
    assert (report.failed, report.fetched) == (1, 1)
    tries = asked(0)
    assert len(tries) == retries + 1
    assert tries[-1] - tries[0] >= sum(sleeps) - 0.05
    assert asked(1)[0] - tries[-1] < next_sleep / 2  # no sleep after the last try
    assert elapsed < sum(sleeps) + next_sleep / 2
    (fetched0, problem0, label0), = problems(labelled_pack, [0])
    assert fetched0 and "503" in problem0 and label0 is None


def test_being_throttled_for_good_stops_the_run_unrecorded(labelled_graph, neuronpedia_server):
    FakeNeuronpedia.plans = {"0": [status(429, "0")]}
    with pytest.raises(FlowdbError, match="429"):
        fetch(labelled_graph, neuronpedia_server, retries=2, backoff_s=0)
    assert len(asked(0)) == 3 and not asked(1)
    assert problems(labelled_graph, [0]) == [(False, None, None)]


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_key_says_to_set_it(labelled_graph, neuronpedia_server, code):
    FakeNeuronpedia.plans = {"0": [status(code)]}
    with pytest.raises(FlowdbError, match="NEURONPEDIA_API_KEY"):
        fetch(labelled_graph, neuronpedia_server)
    assert problems(labelled_graph, [0]) == [(False, None, None)]


def test_an_unreachable_server_stops_the_run_unrecorded(labelled_graph):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(FlowdbError, match="cannot reach"):
        fetch(labelled_graph, f"http://127.0.0.1:{port}/api", retries=1, backoff_s=0)
    assert problems(labelled_graph, [0]) == [(False, None, None)]


def test_fetch_cli_unknown_pack(labelled_graph, neuronpedia_server):
    result = CliRunner().invoke(cli, ["labels", "fetch", "nosuch", "--api-url", neuronpedia_server])
    assert result.exit_code == 1 and "no pack named 'nosuch'" in result.output


# --- credentials stay with their origin ------------------------------------------------------

class Elsewhere(BaseHTTPRequestHandler):
    """Another origin: records every request's headers and answers a label, which must
    never be stored."""

    seen: list = []

    def do_GET(self):  # noqa: N802
        Elsewhere.seen.append(dict(self.headers))
        explained(self, "planted-model", "0-planted-res", "0")

    def log_message(self, *args):
        pass


def redirect_to(location):
    def answer(handler, *_):
        handler.send_response(302)
        handler.send_header("Location", location + handler.path)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


@pytest.fixture
def elsewhere():
    Elsewhere.seen = []
    server = serve(Elsewhere)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("target", ["another port", "another host", "another scheme"])
def test_a_redirect_to_another_origin_is_refused_and_the_key_stays(labelled_graph, neuronpedia_server,
                                                                   elsewhere, target):
    api = neuronpedia_server.removesuffix("/api")
    api_port = api.rsplit(":", 1)[1]
    location = {"another port": f"http://127.0.0.1:{elsewhere}",
                "another host": f"http://localhost:{elsewhere}",  # the same server under another name
                "another scheme": f"https://127.0.0.1:{api_port}"}[target]
    FakeNeuronpedia.plans = {"0": [redirect_to(location)]}
    result = run_flowdb("labels", "fetch", "planted", "--module", "res", "--limit", "2", "--rate", "50",
                        "--no-progress", "--api-url", neuronpedia_server,
                        env={"NEURONPEDIA_API_KEY": "secret-key"}, timeout=HANG)
    line = assert_one_line_error(result, f"redirected to {location}, another origin than {api}")
    assert "secret-key" not in line
    assert [key for _, key, _ in FakeNeuronpedia.seen] == ["secret-key"]  # the API's origin had it
    assert Elsewhere.seen == []  # nothing was sent elsewhere, so neither was the key
    assert stored_explanations(labelled_graph) == 0
    assert problems(labelled_graph, [0, 1]) == [(False, None, None), (False, None, None)]


def test_a_redirect_within_the_origin_is_followed_with_the_key(labelled_pack, neuronpedia_server, monkeypatch):
    monkeypatch.setenv("NEURONPEDIA_API_KEY", "secret-key")
    FakeNeuronpedia.plans = {"0": [redirect_to(neuronpedia_server.removesuffix("/api")), explained]}
    report = fetch(labelled_pack, neuronpedia_server, limit=1)
    assert (report.fetched, report.failed) == (1, 0)
    assert [key for _, key, _ in FakeNeuronpedia.seen] == ["secret-key", "secret-key"]
    assert problems(labelled_pack, [0]) == [(True, None, "strong 0")]


def test_origins_compare_with_default_ports_spelled_out():
    assert origin("https://Example.org/api") == origin("https://example.org:443/x") == "https://example.org:443"
    assert origin("http://example.org/api") == "http://example.org:80"
    assert len({origin("http://example.org/"), origin("https://example.org/"), origin("http://example.org:8080/"),
                origin("http://example.com/")}) == 4


# --- deep nesting -----------------------------------------------------------------------------

def test_deeply_nested_json_from_the_server_is_recorded_as_unusable(labelled_pack, neuronpedia_server):
    FakeNeuronpedia.plans = {"0": [send_body(b"[" * 100_000 + b"]" * 100_000)]}
    report = fetch(labelled_pack, neuronpedia_server)
    assert (report.failed, report.fetched) == (1, 1)
    (fetched0, problem0, label0), = problems(labelled_pack, [0])
    assert fetched0 and "nested deeper" in problem0 and label0 is None


@pytest.mark.parametrize("name, text", [
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
    ("deep.json", "[" + "[" * 100_000 + "]" * 100_000 + "]"),
    ("deep-object.json", '{"explanations": [' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "]}")])
def test_deeply_nested_label_files_are_refused_in_one_line(labelled_graph, tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    line = assert_one_line_error(run_flowdb("labels", "import", path, timeout=HANG), str(path), "row 1", "nested")
    assert "unexpected" not in line
    assert stored_explanations(labelled_graph) == 0


# --- scores and unknown sources --------------------------------------------------------------

def test_bare_number_scores_are_stored_and_pick_the_label(labelled_pack, tmp_path):
    rows = [{**export_row(1, "0-planted-res", 4, "scored low"), "scores": [{"value": 0.2}]},
            {**export_row(2, "0-planted-res", 4, "scored high"), "scores": [0.9]},
            {**export_row(3, "0-planted-res", 4, "unscored"), "scores": [{"value": None}]}]
    import_labels(labelled_pack, write_jsonl(tmp_path / "rows.jsonl", rows))
    stored = labelled_pack.read("MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature {key: 'planted/0/res/4'}) "
                                "RETURN e.description AS d, e.score AS score, f.label AS label ORDER BY d")
    assert [(r["d"], r["score"]) for r in stored] == [("scored high", 0.9), ("scored low", 0.2), ("unscored", None)]
    assert {r["label"] for r in stored} == {"scored high"}  # by id it would be "scored low"


@pytest.mark.parametrize("scores", [["0.9"], [{"val": 0.9}], [True], [[0.9]], [{"value": "high"}], [float("nan")]])
def test_scores_that_are_not_numbers_are_refused_not_dropped(labelled_graph, tmp_path, scores):
    rows = [export_row(1, "0-planted-res", 1, "good"), {**export_row(2, "0-planted-res", 2, "bad"), "scores": scores}]
    with pytest.raises(FlowdbError) as caught:
        import_labels(labelled_graph, write_jsonl(tmp_path / "rows.jsonl", rows))
    message = str(caught.value)
    assert "row 2" in message and "scores entry 1" in message and "\n" not in message
    assert stored_explanations(labelled_graph) == 0


def test_unknown_sources_are_named_with_the_stored_ones(labelled_pack, tmp_path):
    rows = [export_row(1, "0-planted-res", 1, "known"), export_row(2, "9-other-res", 1, "unknown"),
            {**export_row(3, "0-planted-res", 1, "other model"), "modelId": "gpt2-small"}]
    report = import_labels(labelled_pack, write_jsonl(tmp_path / "rows.jsonl", rows))
    summary = report.summary()
    assert "2 with an unknown model/source" in summary
    assert "unknown sources: gpt2-small/0-planted-res, planted-model/9-other-res;" in summary
    stored = sorted(f"planted-model/{layer}-planted-{module}" for layer in range(4) for module in ("mlp", "res"))
    assert f"the stored SAEs have {', '.join(stored)}" in summary


def test_import_into_an_unknown_pack_names_the_packs(labelled_graph, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [export_row(1, "0-planted-res", 1, "known")])
    with pytest.raises(FlowdbError, match="planted"):
        import_labels(labelled_graph, path, pack="nope")
    assert stored_explanations(labelled_graph) == 0


# --- only regular files; memory does not grow with the file ---------------------------------

def test_a_fifo_as_label_file_is_refused_at_once(labelled_graph, tmp_path):
    fifo = tmp_path / "labels.jsonl"
    os.mkfifo(fifo)
    assert_one_line_error(run_flowdb("labels", "import", fifo, timeout=HANG), str(fifo), "FIFO")
    assert stored_explanations(labelled_graph) == 0


def test_a_fifo_in_an_export_directory_stops_there(labelled_pack, tmp_path):
    write_export(tmp_path, {"2-planted-res": [export_row(i, "2-planted-res", i, f"c {i}") for i in range(10)]})
    fifo = tmp_path / "v1" / "planted-model" / "2-planted-res" / "explanations" / "batch-1.jsonl.gz"
    os.mkfifo(fifo)
    line = assert_one_line_error(run_flowdb("labels", "import", tmp_path, timeout=HANG), str(fifo), "FIFO")
    assert "1 earlier file(s) with 10 explanations are committed" in line
    assert stored_explanations(labelled_pack) == 10


def big_rows(count: int):
    """Export rows with a 1536-wide embedding, as Neuronpedia's carry: about 30 kB each."""
    embedding = [round(0.001 * i + 0.123456789, 9) for i in range(1536)]
    for i in range(count):
        yield {**export_row(i, f"{i // 512 % 4}-planted-res", i % 512, f"concept {i}"), "embedding": embedding}


def peak_import(path) -> int:
    result = run_flowdb("labels", "import", path, timeout=600)
    assert result.code == 0, result.stderr
    return result.peak_rss


@pytest.fixture
def small_import_peak(labelled_pack, tmp_path):
    """The peak memory of importing a 3-row file: what the command needs whatever the file."""
    peak = peak_import(write_jsonl(tmp_path / "small.jsonl", list(big_rows(3))))
    labelled_pack.write("MATCH (e:Explanation) DETACH DELETE e")
    return peak


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_import_memory_does_not_grow_with_the_file(labelled_pack, small_import_peak, tmp_path, form):
    count = 6000
    path = tmp_path / f"big.{form}"
    with path.open("w") as handle:
        if form == "json":  # one line, as the audit's 300 MB file
            handle.write("[" + ", ".join(json.dumps(row) for row in big_rows(count)) + "]")
        else:
            handle.writelines(json.dumps(row) + "\n" for row in big_rows(count))
    size = path.stat().st_size
    assert size > 100 * 2**20
    peak = peak_import(path)
    assert stored_explanations(labelled_pack) == count
    # Holding the parsed file would cost several times its size; a stream holds a batch.
    assert peak - small_import_peak < 48 * 2**20, (peak, small_import_peak, size)
    print(f"{form}: {size / 2**20:.0f} MiB file, peak RSS {peak / 2**20:.0f} MiB "
          f"(a 3-row file: {small_import_peak / 2**20:.0f} MiB)")


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_a_row_without_end_is_refused_without_holding_it(labelled_pack, small_import_peak, tmp_path, form):
    path = tmp_path / f"endless.{form}"
    with path.open("w") as handle:
        handle.write('[{"description": "' if form == "json" else '{"description": "')
        for _ in range(128):
            handle.write("x" * 2**20)
    result = run_flowdb("labels", "import", path, timeout=HANG)
    assert_one_line_error(result, str(path), "row 1 is longer than 16 MiB")
    assert result.peak_rss - small_import_peak < 48 * 2**20, (result.peak_rss, small_import_peak)
    assert stored_explanations(labelled_pack) == 0
    print(f"{form}: one 128 MiB row, peak RSS {result.peak_rss / 2**20:.0f} MiB "
          f"(a 3-row file: {small_import_peak / 2**20:.0f} MiB)")
