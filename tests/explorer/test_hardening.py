"""The explorer against careless and hostile requests: every refusal a one-line JSON error
with the right status, never a traceback, a Java message or a raw control character."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from flowdb.errors import QueryError
from flowdb.explorer.app import create_app

TOKEN = "test-token"
POST = {"x-flowdb-token": TOKEN}


@pytest.fixture(scope="module")
def client(explorer_db):
    db, _ = explorer_db
    app = create_app(lambda: db, token=TOKEN)
    with TestClient(app, base_url="http://127.0.0.1:8047", raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.text
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message and "internal error" not in message
    return message


@pytest.mark.parametrize("path", ["/api/cypher", "/api/steer/start", "/api/steer/cancel"])
def test_a_deeply_nested_body_is_a_400(client, path):
    deep = "[" * 100_000 + "]" * 100_000
    message = error_of(client.post(path, headers={**POST, "content-type": "application/json"}, content=deep), 400)
    assert "more than 32 deep" in message


def test_a_huge_body_is_a_400(client):
    body = '{"statement": "RETURN 1", "pad": "' + "x" * (2 << 20) + '"}'
    message = error_of(client.post("/api/cypher", headers=POST, content=body), 400)
    assert "larger than" in message


def test_a_body_of_ordinary_depth_still_runs(client):
    nested = {"a": [[[{"b": [1, 2, {"c": "[[[[ not brackets ]]]]"}]}]]]}
    answer = client.post("/api/cypher", headers=POST, json={"statement": "RETURN $p AS p", "params": {"p": nested}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["rows"] == [[nested]]


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/api/cypher", "POST"),
    ("DELETE", "/api/packs", "GET"),
    ("PUT", "/", "GET"),
])
def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(client, method, path, allowed):
    response = client.request(method, path, headers=POST)
    message = error_of(response, 405)
    assert message.startswith(f"{method} is not allowed at {path}") and allowed in message
    assert allowed in response.headers["allow"]


@pytest.mark.parametrize("path", ["/api/packs%0A", "/api/features/planted/3/res/0%0A", "/feature/planted%1B[2J"])
def test_an_address_with_a_control_character_is_refused_escaped(client, path):
    message = error_of(client.get(path), 400)
    assert "control character" in message and "\\n" in message or "\\x1b" in message
    assert "\x1b" not in message


def test_a_missing_console_parameter_is_a_400(client):
    message = error_of(client.post("/api/cypher", headers=POST, json={"statement": "RETURN $missing AS x"}), 400)
    assert "missing" in message and "parameter" in message


@pytest.mark.parametrize("q, fragment", [
    ("a" * 1_000, "words of at most 100 characters"),
    ("capital " * 1_300, "at most 1000 characters"),
    ("a" * 256, "words of at most 100 characters"),
])
def test_search_input_is_bounded(client, q, fragment):
    message = error_of(client.get("/api/search", params={"q": q}), 400)
    assert fragment in message and "automaton" not in message and "java" not in message.lower()


@pytest.mark.parametrize("reference, fragment", [
    ("planted/03/res/0", "the layer '03' has a leading zero; write 3"),
    ("planted/3/res/00", "the index '00' has a leading zero; write 0"),
    ("planted/\u0663/res/0", "the layer '\u0663' is not written in ASCII digits 0-9"),
    ("planted/3/res/\uff15", "the index '\uff15' is not written in ASCII digits 0-9"),
    ("planted-model/3-planted-res/007", "the index '007' has a leading zero; write 7"),
])
def test_a_misspelt_number_in_a_reference_is_named(client, explorer_db, reference, fragment):
    from flowdb.store.features import resolve_feature

    db, _ = explorer_db
    with pytest.raises(QueryError) as refused:
        resolve_feature(db, reference)
    assert fragment in str(refused.value) and "has indexes" not in str(refused.value)
    assert fragment in error_of(client.get(f"/api/features/{reference}"), 400)


def test_range_errors_write_whole_numbers_whole(client):
    message = error_of(client.get("/api/neighbours/planted/3/res/0", params={"cap": 999999999}), 400)
    assert "got 999999999" in message and "e+" not in message


@pytest.mark.parametrize("accept, kind", [("application/json", "application/json"), ("text/html", "text/plain")])
def test_a_refused_host_names_itself_the_allowed_names_and_allow_host(explorer_db, accept, kind):
    db, _ = explorer_db
    app = create_app(lambda: db, host="0.0.0.0", token=TOKEN, require_token=True, allow_hosts=("proxy.example",))
    with TestClient(app, base_url="http://127.0.0.1:8047") as web:
        response = web.get("/", headers={"Host": "10.1.2.3:8047", "accept": accept})
        assert response.status_code == 400 and response.headers["content-type"].startswith(kind), response.text
        text = response.json()["error"] if kind == "application/json" else response.text
        assert "\n" not in text.strip() and "'10.1.2.3'" in text, text
        assert "localhost" in text and "proxy.example" in text and "--allow-host 10.1.2.3" in text, text
        assert web.get("/api/packs", headers={"Host": "proxy.example:8047", **POST}).status_code == 200


def test_serve_off_loopback_names_the_hosts_it_answers_to(db):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flowdb.cli", "serve", "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    lines = []
    try:
        while not lines or "Ctrl-C" not in lines[-1]:  # the announcement's last line
            line = proc.stdout.readline()
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    hosts = [line for line in lines if "--allow-host NAME" in line]
    assert len(hosts) == 1 and "localhost" in hosts[0] and socket.gethostname() in hosts[0], lines


@pytest.mark.parametrize("statement", [
    "RETURN range(1, 3000000) AS numbers",  # one cell larger than the bound
    "UNWIND range(1, 900) AS i RETURN i, reduce(s = '', x IN range(1, 400) | s + '0123456789abcdefghijklmnopqrstuv')"
    " AS text",  # rows under the row cap, 11 MB together
])
def test_a_console_answer_is_bounded_in_bytes(client, statement):
    from flowdb.explorer import console

    answer = client.post("/api/cypher", headers=POST, json={"statement": statement})
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.content) <= console.MAX_BYTES + 64 * 1024, len(answer.content)
    body = answer.json()
    assert body["truncated"] is True and f"{console.MAX_BYTES:,} bytes" in body["note"], body.get("note")
    assert "LIMIT" in body["note"] and body["total"] is None


def test_a_console_answer_over_the_bound_stops_reading(explorer_db):
    """Memory stays bounded too: the records past the bound are never read into the answer."""
    import tracemalloc

    from flowdb.explorer import console

    db, _ = explorer_db
    statement = ("UNWIND range(1, 900) AS i RETURN reduce(s = '', x IN range(1, 1600) "
                 "| s + '0123456789abcdefghijklmnopqrstuv') AS text")  # 50 kB a row, 46 MB in all
    tracemalloc.start()
    try:
        answer = console.run(db, statement)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer["truncated"] and len(answer["rows"]) < 900
    assert peak < 3 * console.MAX_BYTES, f"{peak:,} bytes at peak"


@pytest.mark.parametrize("settings, fragment", [
    ({"s": True}, "s must be a number, got true"),
    ({"alpha": False}, "alpha must be a number, got false"),
    ({"s": "3"}, "s must be a number, got '3'"),
    ({"s": 1000}, "s must be from -100 to 100, got 1000"),
    ({"max_new_tokens": 6.5}, "max_new_tokens must be a whole number, got 6.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be a whole number, got true"),
    ({"max_new_tokens": 0}, "max_new_tokens must be from 1 to 256, got 0"),
    ({"prompt": {"text": "hi"}}, "prompt must be a string, got an object"),
    ({"prompt": ["hi"]}, "prompt must be a string, got an array"),
    ({"prompt": "x" * 2001}, "prompt must be at most 2000 characters"),
    ({"strategy": 1}, "strategy must be a string, got 1"),
    ({"feature": 17}, "feature must be a string, got 17"),
    ({"temprature": 2}, "unknown setting 'temprature'; the settings are"),
])
def test_steering_settings_are_typed(client, settings, fragment):
    body = {"feature": "planted/3/res/0", **settings}
    message = error_of(client.post("/api/steer/start", headers=POST, json=body), 400)
    assert fragment in message, message


def test_steering_settings_come_as_an_object(client):
    message = error_of(client.post("/api/steer/start", headers=POST, json=["planted/3/res/0"]), 400)
    assert "JSON object" in message
