"""The explorer's steering panel on the real SmolLM2-135M and the tiny demo pack: runs off the
request with progress, one at a time, cancellable; unsteered and steered text side by side."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from flowdb.explorer.app import create_app
from flowdb.explorer.steer_jobs import model_extra_missing

TOKEN = "steer-token"
ORIGIN = "http://127.0.0.1:8047"
HEADERS = {"x-flowdb-token": TOKEN, "Origin": ORIGIN}
RUNNING = ("queued", "loading", "running")


@pytest.fixture
def client(ingested):
    with TestClient(create_app(lambda: ingested, token=TOKEN), base_url=ORIGIN) as test_client:
        yield test_client


def a_feature(db) -> str:
    """A residual feature of the tiny pack at its last layer with a residual predecessor."""
    return db.read("MATCH (:Feature)-[:RESIDUAL {rank: 1}]->(f:Feature {pack: 'tiny', layer: 4, module: 'res'}) "
                   "RETURN f.key AS key ORDER BY f.index LIMIT 1")[0]["key"]


def wait_for(client, done, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get("/api/steer").json()["job"]
        if done(job):
            return job
        assert job["state"] in RUNNING, job  # ended before reaching what is waited for
        time.sleep(0.2)
    raise AssertionError(f"steering job still {job['state']} after {timeout_s} s")


def test_a_steering_run_shows_both_generations(client, ingested):
    assert model_extra_missing() is None and client.get("/api/steer").json()["available"]
    key = a_feature(ingested)
    body = {"feature": key, "strategy": "cumulative", "schedule": "constant", "s": 8, "max_new_tokens": 6,
            "prompt": "The weather today is"}
    assert client.post("/api/steer/start", json=body).status_code == 403  # no token
    started = client.post("/api/steer/start", json=body, headers=HEADERS)
    assert started.status_code == 200, started.text
    busy = client.post("/api/steer/start", json=body, headers=HEADERS)
    assert busy.status_code == 409 and "already in progress" in busy.json()["error"]
    job = wait_for(client, lambda job: job["state"] not in RUNNING)
    assert job["state"] == "done", job
    assert job["default"] and job["steered"] and job["tokens_done"] <= job["tokens_total"] == 12
    layers = sorted({f["layer"] for f in job["features"]})
    assert layers and layers[-1] == 4 and key in {f["key"] for f in job["features"]}


def test_a_run_can_be_cancelled_and_bad_settings_are_refused(client, ingested):
    key = a_feature(ingested)
    for bad, fragment in [({"strategy": "sideways"}, "strategy must be one of"),
                          ({"s": "x"}, "s must be a number, got 'x'"),
                          ({"max_new_tokens": 100000}, "max_new_tokens must be from 1 to 256")]:
        refused = client.post("/api/steer/start", json={"feature": key, **bad}, headers=HEADERS)
        assert refused.status_code == 400 and fragment in refused.json()["error"]
    started = client.post("/api/steer/start", json={"feature": key, "max_new_tokens": 256,
                                                    "prompt": "Once upon a time, in a land far away,"}, headers=HEADERS)
    assert started.status_code == 200, started.text
    wait_for(client, lambda job: job["state"] == "running" and job["tokens_done"] > 0)
    assert client.post("/api/steer/cancel", headers=HEADERS).status_code == 200
    job = wait_for(client, lambda job: job["state"] not in RUNNING, timeout_s=60)
    assert job["state"] == "cancelled" and job["tokens_done"] < job["tokens_total"]
