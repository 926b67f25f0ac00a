import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import wipe
from flowdb.errors import BuildConflict, PackError
from flowdb.flow.atlas import Atlas, default_dir
from flowdb.packs.manifest import load_manifest
from flowdb.packs.plan import make_plan
from flowdb.packs.synth import SynthSpec, synthesize
from flowdb.store.ingest import ingest
from flowdb.store.templates import run_template
from helpers import assert_edges_equal_brute_force, kill_when, settled, sort_edges


def counts(db, pack):
    return db.read(
        "MATCH (f:Feature {pack: $pack}) WITH count(f) AS nodes "
        "OPTIONAL MATCH (:Feature {pack: $pack})-[e]->(:Feature {pack: $pack}) "
        "RETURN nodes, count(e) AS edges", pack=pack)[0]


@pytest.mark.parametrize("k", [1, 3])
def test_stored_edges_equal_brute_force(db, planted_pack, k):
    pack_dir, _ = planted_pack
    ingest(load_manifest(pack_dir / "manifest.toml", k=k), db)
    assert assert_edges_equal_brute_force(db, "planted", pack_dir, layers=4, k=k) == 512 * (3 * 4 - 1) * k


def test_planted_lineage_is_recovered(db, planted_pack):
    pack_dir, truth = planted_pack
    ingest(load_manifest(pack_dir / "manifest.toml"), db)
    stored = db.read("MATCH (f:Feature:Residual {pack: 'planted'}) "
                     "RETURN f.layer AS layer, f.index AS index, f.category AS category")
    found = {(r["layer"], r["index"]): r["category"] for r in stored}
    for category in ("translated", "processed", "newborn", "from-nowhere"):
        planted = {(r.layer, r.index) for r in truth.itertuples() if r.category == category}
        called = {key for key, value in found.items() if value == category}
        precision = len(planted & called) / len(called)
        recall = len(planted & called) / len(planted)
        assert precision >= 0.95 and recall >= 0.95, (category, precision, recall)
    # Predecessors: planted (feature, module, predecessor) triples against stored
    # top-1 edges at or above the manifest's threshold (0.5).
    true_edges = {(r.layer, r.index, place, int(getattr(r, f"{place}_pred")))
                  for r in truth.itertuples() for place in ("res", "mlp", "att")
                  if getattr(r, f"{place}_pred") >= 0}
    edges = run_template(db, "edges", {"pack": "planted"})
    kept = edges[edges["cosine"] >= 0.5]
    called_edges = {(r.dst_layer, r.dst_index, r.src_module, r.src_index) for r in kept.itertuples()}
    hits = len(true_edges & called_edges)
    assert hits / len(called_edges) >= 0.99 and hits / len(true_edges) >= 0.99


def test_reingest_changes_nothing(db, planted_pack):
    manifest = load_manifest(planted_pack[0] / "manifest.toml")
    first = ingest(manifest, db)
    before = (counts(db, "planted"), db.read("MATCH (p:Pack) RETURN p.created_at AS t")[0]["t"])
    second = ingest(manifest, db)
    after = (counts(db, "planted"), db.read("MATCH (p:Pack) RETURN p.created_at AS t")[0]["t"])
    assert (first.status, second.status) == ("built", "unchanged")
    assert before == after and before[0]["edges"] > 0


def test_other_parameters_are_refused_unless_replace(db, planted_pack):
    path = planted_pack[0] / "manifest.toml"
    ingest(load_manifest(path), db)
    with pytest.raises(BuildConflict, match="already stored from other SAE files or parameters"):
        ingest(load_manifest(path, k=2), db)
    assert run_template(db, "edges", {"pack": "planted"})["rank"].max() == 1
    report = ingest(load_manifest(path, k=2), db, replace=True)
    assert report.status == "replaced"
    edges = run_template(db, "edges", {"pack": "planted"})
    assert edges["rank"].max() == 2
    assert db.read("MATCH (p:Pack {name: 'planted'}) RETURN count(p) AS n, p.k AS k")[0] == {"n": 1, "k": 2}


def test_two_packs_live_side_by_side(db, planted_pack, tmp_path):
    path = planted_pack[0] / "manifest.toml"
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace('name = "planted"', 'name = "planted-b"')
                     .replace('"saes/', f'"{planted_pack[0]}/saes/'))
    ingest(load_manifest(path), db)
    ingest(load_manifest(other), db)
    assert counts(db, "planted") == counts(db, "planted-b")
    assert db.read("MATCH (f:Feature) RETURN count(f) AS n")[0]["n"] == 2 * counts(db, "planted")["nodes"]


def _corrupt(pack_dir, module, layer, how):
    path = pack_dir / "saes" / module / f"layer_{layer}" / "sae_weights.safetensors"
    tensors = load_file(str(path))
    if how == "nan":
        tensors["W_dec"][9, 1] = np.nan
        save_file(tensors, str(path))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how, message", [
    ("nan", "layer 3 module mlp"),
    ("truncate", "layer 3 module mlp"),
    ("missing", "missing sae_weights.safetensors"),
])
def test_bad_pack_writes_nothing(db, pack_copy, how, message):
    _corrupt(pack_copy, "mlp", 3, how)  # the last layer: a streaming writer would be mid-pack
    with pytest.raises(PackError, match=message):
        ingest(load_manifest(pack_copy / "manifest.toml"), db)
    assert db.read("MATCH (n) WHERE n.pack = 'planted' OR n.name = 'planted' RETURN count(n) AS n")[0]["n"] == 0


def test_bad_replacement_keeps_the_old_build(db, planted_pack, pack_copy):
    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
    before = counts(db, "planted")
    _corrupt(pack_copy, "res", 2, "nan")
    with pytest.raises(PackError):
        ingest(load_manifest(pack_copy / "manifest.toml", k=2), db, replace=True)
    assert counts(db, "planted") == before


@pytest.fixture(scope="module")
def resumable_pack(tmp_path_factory, flowdb_home):
    out = tmp_path_factory.mktemp("resumable")
    synthesize(out, SynthSpec(name="resumable", layers=8, d_model=128, width=2048, seed=3))
    return out / "manifest.toml"


@pytest.fixture(scope="module")
def resumable_reference(neo4j_settings, resumable_pack):
    """The uninterrupted ingest, built once for every kill point: its sorted edges and
    counts, after its edges were checked against brute force."""
    from flowdb.store.connection import connect

    with connect(neo4j_settings) as database:
        wipe(database)
        ingest(load_manifest(resumable_pack), database)
        edges = sort_edges(run_template(database, "edges", {"pack": "resumable"}))
        assert assert_edges_equal_brute_force(database, "resumable", resumable_pack.parent, layers=8, k=1) \
            == len(edges)
        return edges, counts(database, "resumable")


def _ingest_process(manifest):
    return subprocess.Popen([sys.executable, "-m", "flowdb.cli", "ingest", str(manifest), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pack_state(db):
    rows = db.read("MATCH (p:Pack {name: 'resumable'}) RETURN p.status AS status, p.layers_done AS done")
    return rows[0] if rows else None


def _layers_done(db):
    state = _pack_state(db)
    return state["done"] if state else []


@pytest.mark.parametrize("kill_at", ["matching", "first-layer-written", "half-written"])
def test_killed_ingest_resumes_to_the_same_graph(resumable_reference, db, resumable_pack, kill_at):
    """Killed where it is aimed, a rerun resumes to the uninterrupted graph: the same edges,
    cosines and counts (which equal brute force, resumable_reference checks)."""
    reference, reference_counts = resumable_reference
    atlas = default_dir(make_plan(load_manifest(resumable_pack)))
    if kill_at == "matching":
        shutil.rmtree(atlas)
        ready = lambda: (atlas / "layers" / "1.json").exists()  # noqa: E731
    elif kill_at == "first-layer-written":
        ready = lambda: len(_layers_done(db)) >= 1  # noqa: E731
    else:
        ready = lambda: len(_layers_done(db)) >= 4  # noqa: E731
    kill_when(_ingest_process(resumable_pack), ready)
    # The kill landed where it was aimed: mid-match nothing is written and the atlas is
    # part done; mid-write the pack is building, with some layers and not all.
    state = settled(db, lambda: _pack_state(db))
    if kill_at == "matching":
        assert state is None and 2 <= len(Atlas(atlas).layers_done()) < 8, state
    else:
        assert state["status"] == "building" and (1 if kill_at == "first-layer-written" else 4) \
            <= len(state["done"]) < 8, state
    # Readers never see half a layer: each layer is all there or absent.
    per_layer = db.read("MATCH (f:Feature {pack: 'resumable'}) RETURN f.layer AS layer, count(f) AS n")
    assert all(row["n"] == 3 * 2048 for row in per_layer)
    rerun = _ingest_process(resumable_pack)
    assert rerun.wait(timeout=300) == 0, rerun.stdout.read()
    assert counts(db, "resumable") == reference_counts
    resumed = sort_edges(run_template(db, "edges", {"pack": "resumable"}))
    assert resumed.equals(reference)
    assert db.read("MATCH (p:Pack {name: 'resumable'}) RETURN p.status AS s")[0]["s"] == "complete"


def test_encoder_score_matches_encoder_columns_against_decoder_rows(db, planted_pack, tmp_path):
    """[match] score = "encoder": each residual feature's stored top-1 is the predecessor
    whose unit decoder row its unit encoder column reads most (dense float64 here), on
    SAEs whose W_enc is not W_dec.T; the plan records the score and only then the
    fingerprint changes."""
    pack_dir = tmp_path / "pack"
    shutil.copytree(planted_pack[0], pack_dir)
    rng = np.random.default_rng(3)
    for layer in range(4):
        weights = pack_dir / "saes" / "res" / f"layer_{layer}" / "sae_weights.safetensors"
        tensors = load_file(str(weights))
        tensors["W_enc"] = (tensors["W_enc"] + rng.normal(scale=0.08, size=tensors["W_enc"].shape)).astype(np.float32)
        save_file(tensors, str(weights))
    path = pack_dir / "manifest.toml"
    decoder_plan = make_plan(load_manifest(path))
    text = path.read_text().replace('name = "planted"', 'name = "encoded"')
    path.write_text(text.replace("k = 1", 'k = 1\nscore = "encoder"'))
    ingest(load_manifest(path), db)

    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    weights = lambda module, layer: load_file(  # noqa: E731
        str(pack_dir / "saes" / module / f"layer_{layer}" / "sae_weights.safetensors"))
    stored = run_template(db, "edges", {"pack": "encoded"})
    differs = 0
    for layer in range(4):
        encoder = unit(weights("res", layer)["W_enc"].T.astype(np.float64))
        decoder = unit(weights("res", layer)["W_dec"].astype(np.float64))
        for place in ("res", "mlp", "att"):
            src_layer = layer - 1 if place == "res" else layer
            if src_layer < 0:
                continue
            base = unit(weights(place, src_layer)["W_dec"].astype(np.float64))
            cos = encoder @ base.T
            part = stored[(stored["dst_layer"] == layer) & (stored["src_module"] == place)].sort_values("dst_index")
            assert list(part["dst_index"]) == list(range(len(cos)))
            chosen = part["src_index"].to_numpy()
            exact = cos[np.arange(len(cos)), chosen]
            np.testing.assert_allclose(part["cosine"].to_numpy(), exact, atol=1e-5)
            np.testing.assert_allclose(exact, cos.max(1), atol=1e-6)  # the best, or a tie with it
            differs += int((chosen != (decoder @ base.T).argmax(1)).sum())
    assert differs > 0  # the encoder's picks are not the decoder's here
    plan = json.loads(db.read("MATCH (p:Pack {name: 'encoded'}) RETURN p.plan AS plan")[0]["plan"])
    assert plan["score"] == "encoder"
    encoder_plan = make_plan(load_manifest(path))
    assert decoder_plan.fingerprint() != encoder_plan.fingerprint()
    assert (encoder_plan.score, decoder_plan.score) == ("encoder", "decoder")


def test_default_score_keeps_the_fingerprint(planted_pack):
    """A plan with the default score hashes exactly what it hashed before the option existed."""
    import hashlib

    plan = make_plan(load_manifest(planted_pack[0] / "manifest.toml"))
    sources = [{"layer": s.ref.layer, "module": s.ref.module, "digest": s.digest,
                "neuronpedia": s.ref.neuronpedia, "project_model": s.ref.project_model} for s in plan.saes]
    spec = {"plan": 2, "model": plan.model, "layers": [0, 3], "k": 1, "thresholds": plan.thresholds.spec(),
            "sources": sources}
    assert plan.fingerprint() == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def test_ensure_schema_makes_what_is_missing_and_leaves_the_rest(db):
    """Every index and constraint SCHEMA names exists after ensure_schema; one dropped is
    made again, and the others are the same objects (their ids unchanged)."""
    from flowdb.store.graph import SCHEMA, ensure_schema

    def schema_objects():
        return {row["name"]: row["id"] for show in ("INDEXES", "CONSTRAINTS")
                for row in db.read(f"SHOW {show} YIELD name, id RETURN name, id")}

    names = {statement.split(" IF NOT EXISTS")[0].split()[-1] for statement in SCHEMA}
    before = schema_objects()
    assert names <= set(before) and len(names) == len(SCHEMA)
    db.write("DROP INDEX feature_slot")
    db.write("DROP CONSTRAINT lock_name")
    assert not {"feature_slot", "lock_name"} & set(schema_objects())
    ensure_schema(db)
    after = schema_objects()
    assert names <= set(after)
    assert {n: i for n, i in after.items() if n not in ("feature_slot", "lock_name")} == \
        {n: i for n, i in before.items() if n not in ("feature_slot", "lock_name")}
