"""What the CLI prints of stored text cannot act on the terminal, and interrupts end
each command as it should."""

import json

import pytest
from click.testing import CliRunner

from conftest import build_labelled
from flowdb.cli import cli

EVIL = ("evil \x1b]52;c;ZXZpbA==\x07 \x1b]0;title\x07 \x1b[2J\x1b[31mred \x9b2J del\x7f "
        "nul\x00 cr\r line\nbreak")
RAW = ("\x1b", "\x07", "\x9b", "\x7f", "\x00", "\r")


def build_evil(db, folder, pack_dir):
    from flowdb.store.labels import import_labels

    build_labelled(db, folder, pack_dir)
    row = {"id": "evil0", "modelId": "planted-model", "layer": "1-planted-res", "index": "404", "authorId": "auto",
           "description": EVIL, "embedding": [0.1], "typeName": "oai_token-act-pair",
           "explanationModelName": "gpt-4o-mini"}
    (folder / "evil.jsonl").write_text(json.dumps(row) + "\n")
    import_labels(db, folder / "evil.jsonl", pack="planted")


@pytest.fixture
def evil_labels(shared_graph, planted_pack):
    """Built once and shared: the tests that take it only print what is stored."""
    return shared_graph(build_evil, planted_pack[0])


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
@pytest.mark.parametrize("template, param", [("label-search", "text=evil"), ("lineage", "feature=planted/2/res/5")])
def test_stored_labels_reach_the_terminal_escaped(evil_labels, template, param, fmt):
    # color=True: as on a terminal, where click strips nothing
    result = CliRunner().invoke(cli, ["query", template, "-p", param, "--format", fmt], color=True,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for raw in RAW:
        assert raw not in result.stdout, (raw, result.stdout)
    if fmt == "json":
        rows = json.loads(result.stdout)
        assert EVIL in {row.get(column) for row in rows for column in ("label", "step_label")}
    else:
        assert "\\x1b]52;c;ZXZpbA==\\x07" in result.stdout and "\\x9b2J" in result.stdout
        assert "\\x7f" in result.stdout and "line\\nbreak" in result.stdout


def test_error_messages_escape_control_characters(db):
    result = CliRunner().invoke(cli, ["delete", "no\x1b]0;pwned\x07pack"], color=True)
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "no\\x1b]0;pwned\\x07pack" in result.output and result.output.count("\n") == 1


def _interrupt(*args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("args, message", [
    (["link", "planted", "other", "--device", "cpu"],
     "Error: interrupted; a stopped link resumes where it ended when run again"),
    (["ingest", "manifest.toml", "--device", "cpu"],
     "Error: interrupted; a stopped ingest resumes where it ended when run again"),
])
def test_an_interrupted_build_says_how_to_resume(monkeypatch, tmp_path, planted_pack, args, message):
    from flowdb.flow.matching import Matcher

    # Ctrl-C as the work starts: a named device's matcher is made first (auto's, per build, later)
    monkeypatch.setattr(Matcher, "for_device", staticmethod(_interrupt))
    if args[0] == "ingest":
        args = ["ingest", str(planted_pack[0] / "manifest.toml"), *args[2:]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130
    assert result.output.splitlines() == [message]


def test_other_commands_say_plainly_they_were_interrupted(monkeypatch, db):
    from flowdb.store import graph

    monkeypatch.setattr(graph, "list_packs", _interrupt)
    result = CliRunner().invoke(cli, ["packs"])
    assert result.exit_code == 130 and result.output.splitlines() == ["Error: interrupted"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ctrl_c_stops_serve_in_one_line_with_a_query_in_flight(db):
    """Ctrl-C on flowdb serve, while a console statement runs: one line that it stopped, exit 0,
    no traceback; the statement's client gets a JSON answer, not a plain-text 500."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.error
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flowdb.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        first = proc.stdout.readline()
        assert first.startswith("flowdb explorer on"), first + proc.stderr.read()
        token = first.strip().rsplit("?token=", 1)[1]
        answer = {}

        def slow_query():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/cypher", method="POST",
                data=json.dumps({"statement": "UNWIND range(1, 2000000000) AS x RETURN count(x)"}).encode(),
                headers={"x-flowdb-token": token, "content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer["status"], answer["body"] = response.status, response.read()
            except urllib.error.HTTPError as exc:
                answer["status"], answer["body"], answer["type"] = exc.code, exc.read(), exc.headers["content-type"]
            except (urllib.error.URLError, ConnectionError) as exc:
                answer["error"] = exc

        client = threading.Thread(target=slow_query)
        client.start()
        deadline = time.monotonic() + 120
        while not db.read("SHOW TRANSACTIONS YIELD currentQuery WHERE currentQuery STARTS WITH 'UNWIND range' "
                          "RETURN count(*) AS n")[0]["n"]:  # until the statement runs on the server
            assert time.monotonic() < deadline and client.is_alive(), answer
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # Through the same buffered readers as the first line: lines that came with it are in them.
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(60)
        client.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    assert err == "", err  # no traceback, no CancelledError, no uvicorn ERROR line
    assert out.splitlines()[-1] == "flowdb explorer stopped" and "Traceback" not in out, out
    assert answer["status"] == 503 and answer["type"] == "application/json", answer
    assert "stopped" in json.loads(answer["body"])["error"]
