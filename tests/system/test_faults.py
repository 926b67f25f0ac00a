"""Fault injection: ingest, --replace and labels import are SIGKILLed at seeded points
of the stage each test aims at, and each kill must land there (the command still
running, the database showing the stage reached and not finished). After every kill
the graph must be whole: each layer all there or absent, a pack either its old or its
new build (never a mix), a label file all imported or not at all. A final
uninterrupted run must give the brute-force graph."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import wipe
from flowdb.packs.synth import SynthSpec, synthesize
from flowdb.store import graph
from helpers import assert_edges_equal_brute_force, kill_when, settled

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


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(flowdb(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def layer_counts(db, pack):
    return db.read(
        "MATCH (f:Feature {pack: $pack}) WITH f.layer AS layer, count(f) AS nodes "
        "OPTIONAL MATCH (s)-[e]->(d:Feature {pack: $pack, layer: layer, module: 'res'}) WHERE s:Feature "
        "RETURN layer, nodes, count(e) AS edges ORDER BY layer", pack=pack)


def assert_layers_whole(db, pack, k):
    for row in settled(db, lambda: layer_counts(db, pack)):
        places = 2 if row["layer"] == 0 else 3
        assert row["nodes"] == 3 * WIDTH, row
        assert row["edges"] == places * WIDTH * k, row


def pack_states(db):
    rows = db.read("MATCH (p:Pack) RETURN p.name AS name, p.status AS status, p.k AS k, p.layers_done AS done")
    return {row["name"]: row for row in rows}


def layers_done(db, pack) -> int:
    state = pack_states(db).get(pack)
    return len(state["done"]) if state else 0


def kill_points():
    """(layers committed, then a share of a layer's write time more) per kill: into the write
    of a layer that is neither the first nor the last, so a kill that lands leaves a pack
    part written."""
    rng = np.random.default_rng(RNG_SEED)
    return [(int(rng.integers(1, LAYERS - 1)), float(rng.uniform(0, 0.5))) for _ in range(KILLS)]


def kill_mid_layer(proc, done, layers: int, share: float, per_layer_s: float) -> None:
    """SIGKILL proc `share` of a layer's write time after `layers` layers are committed. The
    layer time is the least of the calibration's and the one this run shows (its layer
    `layers`, timed from the one before): the load may have changed since the calibration,
    and a kill later than a layer would land after the last one."""
    layer_s = per_layer_s
    if layers >= 2:
        while done() < layers - 1 and proc.poll() is None:
            time.sleep(0.01)
        began = time.monotonic()
        while done() < layers and proc.poll() is None:
            time.sleep(0.01)
        layer_s = min(layer_s, time.monotonic() - began)
    kill_when(proc, lambda: done() >= layers, share * layer_s)


def assert_killed_part_way(state, layers):
    assert state["status"] == "building", state
    assert layers <= len(state["done"]) < LAYERS, (layers, state)


def test_killed_ingest_always_leaves_whole_layers(db, fault_pack):
    manifest = fault_pack / "manifest.toml"
    run("ingest", manifest, "--no-progress")  # matches into the atlas: the runs below only write
    wipe(db)
    write_s = run("ingest", manifest, "--no-progress")
    for layers, share in kill_points():
        wipe(db)
        kill_mid_layer(start("ingest", manifest, "--no-progress"), lambda: layers_done(db, "fault"),
                       layers, share, write_s / LAYERS)
        assert_killed_part_way(settled(db, lambda: pack_states(db))["fault"], layers)
        assert_layers_whole(db, "fault", k=1)
    run("ingest", manifest, "--no-progress")  # resumes the last killed run
    assert pack_states(db)["fault"]["status"] == "complete"
    assert_layers_whole(db, "fault", k=1)
    assert_edges_equal_brute_force(db, "fault", fault_pack, layers=LAYERS, k=1)


def test_killed_replace_keeps_one_whole_build_and_its_labels(db, fault_pack):
    manifest = fault_pack / "manifest.toml"
    staged = "fault" + graph.STAGED_SUFFIX
    run("ingest", manifest, "--no-progress")
    labels = fault_pack / "labels.jsonl"
    labels.write_text(json.dumps({"modelId": "planted-model", "layer": "2-fault-res", "index": "5",
                                  "description": "a fault label", "id": "fault-label"}) + "\n")
    run("labels", "import", labels)
    run("ingest", manifest, "--k", 2, "--replace", "--no-progress")  # matches k = 2 into its atlas
    write_s = run("ingest", manifest, "--k", 1, "--replace", "--no-progress")
    for layers, share in kill_points():
        if staged in pack_states(db):  # each kill starts its replacement afresh
            graph.drop_pack(db, staged)
        kill_mid_layer(start("ingest", manifest, "--k", 2, "--replace", "--no-progress"),
                       lambda: layers_done(db, staged), layers, share, write_s / LAYERS)
        states = settled(db, lambda: pack_states(db))
        assert_killed_part_way(states[staged], layers)  # killed while writing the replacement
        assert (states["fault"]["status"], states["fault"]["k"]) == ("complete", 1), states
        assert_layers_whole(db, "fault", k=1)  # users see the old build, whole
        assert_layers_whole(db, staged, k=2)
        assert db.read("MATCH (f:Feature {key: 'fault/2/res/5'}) RETURN f.label AS l")[0]["l"] == "a fault label"
    run("ingest", manifest, "--k", 2, "--replace", "--no-progress")  # resumes the last replacement
    assert set(pack_states(db)) == {"fault"}, "a staged or retired build was left behind"
    assert_layers_whole(db, "fault", k=2)
    assert_edges_equal_brute_force(db, "fault", fault_pack, layers=LAYERS, k=2)
    assert db.read("MATCH (e:Explanation {id: 'fault-label'})-[:EXPLAINS]->(f:Feature) "
                   "RETURN collect(f.key) AS keys")[0]["keys"] == ["fault/2/res/5"]


def import_writing(db) -> bool:
    """Whether the server runs a label import's statement (in its one open transaction)."""
    running = db.read("SHOW TRANSACTIONS YIELD currentQuery RETURN currentQuery")
    return any(row["currentQuery"] and "MERGE (e:Explanation" in row["currentQuery"] for row in running)


def labelled(db):
    return (db.read("MATCH (e:Explanation) RETURN count(e) AS n")[0]["n"],
            db.read("MATCH (f:Feature {pack: 'fault'}) WHERE f.label IS NOT NULL RETURN count(f) AS n")[0]["n"])


def test_killed_label_import_is_all_or_nothing(db, fault_pack):
    manifest = fault_pack / "manifest.toml"
    run("ingest", manifest, "--no-progress")
    rows = [{"modelId": "planted-model", "layer": f"{layer}-fault-res", "index": str(index),
             "description": f"feature {layer}/{index}", "id": f"np-{layer}-{index}"}
            for layer in range(LAYERS) for index in range(WIDTH)]
    path = fault_pack / "all-labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(KILLS):
        # Killed while its transaction is open on the server: nothing may be committed.
        kill_when(start("labels", "import", path), lambda: import_writing(db), float(rng.uniform(0, 0.05)))
        assert settled(db, lambda: labelled(db)) == (0, 0)
    run("labels", "import", path)
    assert labelled(db) == (len(rows), len(rows))
