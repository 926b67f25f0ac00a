"""Whether a pack can be steered is known before any model is loaded: a pack `flowdb synth`
wrote, a model missing from the local Hugging Face cache while the hub is offline (or no model
extra) is one line at once, from the API, the feature page and `flowdb steer`; and a load can
be cancelled: it ends "cancelled" and frees the runner for the next start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from flowdb.cli import cli
from flowdb.explorer.app import create_app
from helpers import serve

TOKEN = "steer-token"
ORIGIN = "http://127.0.0.1:8047"
HEADERS = {"x-flowdb-token": TOKEN, "Origin": ORIGIN}
FEATURE = "av/1/res/0"


@pytest.fixture
def small_pack(db, tmp_path):
    """A small planted pack 'av', as `flowdb synth` writes it (model 'planted-model')."""
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import SynthSpec, synthesize
    from flowdb.store.ingest import ingest

    synthesize(tmp_path / "av", SynthSpec(name="av", layers=2, d_model=64, width=32, seed=5))
    ingest(load_manifest(tmp_path / "av" / "manifest.toml"), db, show_progress=False)
    return db


def with_model(db, model: str):
    db.write("MATCH (p:Pack {name: 'av'}) SET p.model = $model", model=model)
    return db


def assert_refused_everywhere(db, *fragments):
    """The API's status, the feature page, a start and `flowdb steer` all say it at once, in one line."""
    with TestClient(create_app(lambda: db, token=TOKEN), base_url=ORIGIN) as client:
        status = client.get("/api/steer", params={"pack": "av"}).json()
        assert status["available"] is False and all(f in status["message"] for f in fragments), status
        for_feature = client.get("/api/steer", params={"feature": FEATURE}).json()
        assert for_feature["message"] == status["message"]
        page = client.get(f"/feature/{FEATURE}").text
        assert "data-steering-message=\"" + status["message"].replace("'", "&#39;") in page
        refused = client.post("/api/steer/start", json={"feature": FEATURE}, headers=HEADERS)
        assert refused.status_code == 400 and refused.json()["error"] == status["message"], refused.text
        assert client.get("/api/steer").json()["job"] is None  # nothing started, nothing loading
    result = CliRunner().invoke(cli, ["steer", "av", "--seed-feature", FEATURE])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert status["message"] in result.output and "Traceback" not in result.output


def test_a_synthetic_pack_cannot_be_steered_and_says_so_at_once(small_pack):
    assert_refused_everywhere(small_pack, "pack 'av' cannot be steered", "'planted-model'", "flowdb synth")


def test_a_model_missing_from_the_cache_while_offline_says_so_at_once(small_pack, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_refused_everywhere(with_model(small_pack, "flowdb-tests/not-cached"), "pack 'av' cannot be steered",
                              "'flowdb-tests/not-cached' is not in the local Hugging Face cache", "offline")


def test_a_load_can_be_cancelled_and_frees_the_runner(small_pack, tmp_path):
    """The model comes from a hub (a local server here) that answers only when the test says so:
    the load is in flight for as long as the test needs, without a clock."""
    asked, release = threading.Event(), threading.Event()

    class Hub(BaseHTTPRequestHandler):
        def answer(self):
            asked.set()
            release.wait()
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    hub = serve(Hub)
    with_model(small_pack, "flowdb-tests/slow-model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.Popen([sys.executable, "-m", "flowdb.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        first = proc.stdout.readline()
        assert first.startswith("flowdb explorer on"), first + proc.stderr.read()
        token = first.strip().rsplit("?token=", 1)[1]

        def call(path, body=None):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                             headers={"x-flowdb-token": token, "content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        assert call("/api/steer?pack=av")[1]["available"] is True
        for _ in range(2):  # the second start finds the runner free
            status, started = call("/api/steer/start", {"feature": FEATURE})
            assert status == 200 and started["job"]["state"] in ("queued", "loading"), started
            assert asked.wait(120), "the load never asked the hub"
            assert call("/api/steer")[1]["job"]["state"] == "loading"
            status, cancelled = call("/api/steer/cancel", {})
            assert status == 200 and cancelled["job"]["state"] == "cancelled", cancelled
    finally:
        release.set()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        hub.shutdown()
    assert "Retrying" not in err and "Traceback" not in err, err
