"""Fault injection: ingest, --replace and labels import are SIGKILLed at random points
(seeded), and after every kill the graph must be whole: each layer all there or
absent, a pack either its old or its new build (never a mix), a label file all
imported or not at all. A final uninterrupted run must give the reference graph."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from flowdb.synth import SynthSpec, synthesize
from helpers import brute_force_edges, sort_edges

LAYERS, WIDTH = 5, 2048
KILLS = 4
RNG_SEED = 20261121


@pytest.fixture(scope="module")
def fault_pack(tmp_path_factory, flowdb_home):
    out = tmp_path_factory.mktemp("fault")
    synthesize(out, SynthSpec(name="fault", layers=LAYERS, d_model=96, width=WIDTH, seed=11))
    manifest = out / "manifest.toml"
    # Neuronpedia sources, so that label rows join onto the residual features.
    manifest.write_text(manifest.read_text().replace(
        'path = "saes/res/layer_{layer}"', 'path = "saes/res/layer_{layer}"\nneuronpedia = "{layer}-fault-res"'))
    return out


def flowdb(*args) -> list[str]:
    return [sys.executable, "-m", "flowdb.cli", *map(str, args)]


def run(*args, timeout=600) -> float:
    started = time.monotonic()
    done = subprocess.run(flowdb(*args), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - started


def kill_after(delay: float, *args) -> bool:
    """Start the command, SIGKILL it after `delay` seconds; True when it was still running."""
    proc = subprocess.Popen(flowdb(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def settled(read, timeout=30.0):
    """A reading once two in a row, 0.5 s apart, agree. A COMMIT the killed client sent
    just before dying is still applied by the server, and Neo4j (read committed) lets a
    reader see a commit that is being applied in part: the check waits for it to land."""
    previous, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = read()
        if current == previous:
            return current
        previous = current
    return previous


def layer_counts(db, pack):
    return db.read(
        "MATCH (f:Feature {pack: $pack}) WITH f.layer AS layer, count(f) AS nodes "
        "OPTIONAL MATCH (s)-[e]->(d:Feature {pack: $pack, layer: layer, module: 'res'}) WHERE s:Feature "
        "RETURN layer, nodes, count(e) AS edges ORDER BY layer", pack=pack)


def assert_layers_whole(db, pack, k):
    for row in settled(lambda: layer_counts(db, pack)):
        places = 2 if row["layer"] == 0 else 3
        assert row["nodes"] == 3 * WIDTH, row
        assert row["edges"] == places * WIDTH * k, row


def stored_edges(db, pack):
    from flowdb.queries import run_template

    return sort_edges(run_template(db, "edges", {"pack": pack}))


def assert_equals_brute_force(db, pack_dir, k):
    stored = stored_edges(db, "fault")
    expected = sort_edges(brute_force_edges(pack_dir, layers=LAYERS, k=k))
    assert len(stored) == len(expected)
    cols = ["src_layer", "src_module", "dst_layer", "dst_index", "kind", "rank"]
    assert (stored[cols] == expected[cols]).all().all()
    np.testing.assert_allclose(stored["cosine"], expected["cosine"], atol=1e-5)


def kill_points(duration: float) -> np.ndarray:
    return np.random.default_rng(RNG_SEED).uniform(0.2 * duration, duration, KILLS)


def test_killed_ingest_always_leaves_whole_layers(db, fault_pack):
    manifest = fault_pack / "manifest.toml"
    duration = run("ingest", manifest, "--no-progress")
    db.write_in_batches("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS")
    for delay in kill_points(duration):
        kill_after(delay, "ingest", manifest, "--no-progress")
        assert_layers_whole(db, "fault", k=1)
    run("ingest", manifest, "--no-progress")
    assert_layers_whole(db, "fault", k=1)
    assert_equals_brute_force(db, fault_pack, k=1)


def _pack_state(db):
    rows = db.read("MATCH (p:Pack) RETURN p.name AS name, p.status AS status, p.k AS k")
    return {row["name"]: row for row in rows}


def test_killed_replace_keeps_one_whole_build_and_its_labels(db, fault_pack):
    manifest = fault_pack / "manifest.toml"
    run("ingest", manifest, "--no-progress")
    labels = fault_pack / "labels.jsonl"
    labels.write_text(json.dumps({"modelId": "planted-model", "layer": "2-fault-res", "index": "5",
                                  "description": "a fault label", "id": "fault-label"}) + "\n")
    run("labels", "import", labels)
    duration = run("ingest", manifest, "--k", 2, "--replace", "--no-progress")
    run("ingest", manifest, "--k", 1, "--replace", "--no-progress")
    for delay in kill_points(duration):
        kill_after(delay, "ingest", manifest, "--k", 2, "--replace", "--no-progress")
        state = settled(lambda: _pack_state(db))["fault"]
        assert state["status"] == "complete", state  # users always see a whole build
        assert_layers_whole(db, "fault", k=state["k"])
        assert db.read("MATCH (f:Feature {key: 'fault/2/res/5'}) RETURN f.label AS l")[0]["l"] == "a fault label"
        if state["k"] == 2:  # the swap happened: go back, so the next kill hits a replace again
            run("ingest", manifest, "--k", 1, "--replace", "--no-progress")
    run("ingest", manifest, "--k", 2, "--replace", "--no-progress")
    assert set(_pack_state(db)) == {"fault"}, "a staged or retired build was left behind"
    assert_layers_whole(db, "fault", k=2)
    assert_equals_brute_force(db, fault_pack, k=2)
    assert db.read("MATCH (e:Explanation {id: 'fault-label'})-[:EXPLAINS]->(f:Feature) "
                   "RETURN collect(f.key) AS keys")[0]["keys"] == ["fault/2/res/5"]


def test_killed_label_import_is_all_or_nothing(db, fault_pack):
    manifest = fault_pack / "manifest.toml"
    run("ingest", manifest, "--no-progress")
    rows = [{"modelId": "planted-model", "layer": f"{layer}-fault-res", "index": str(index),
             "description": f"feature {layer}/{index}", "id": f"np-{layer}-{index}"}
            for layer in range(LAYERS) for index in range(WIDTH)]
    path = fault_pack / "all-labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    duration = run("labels", "import", path)
    db.write("MATCH (e:Explanation) DETACH DELETE e")
    db.write("MATCH (f:Feature {pack: 'fault'}) REMOVE f.label, f.label_by")
    for delay in kill_points(duration):
        kill_after(delay, "labels", "import", path)
        stored, labelled = settled(lambda: (
            db.read("MATCH (e:Explanation) RETURN count(e) AS n")[0]["n"],
            db.read("MATCH (f:Feature {pack: 'fault'}) WHERE f.label IS NOT NULL RETURN count(f) AS n")[0]["n"]))
        assert (stored, labelled) in ((0, 0), (len(rows), len(rows))), (stored, labelled)
    run("labels", "import", path)
    assert db.read("MATCH (e:Explanation) RETURN count(e) AS n")[0]["n"] == len(rows)
