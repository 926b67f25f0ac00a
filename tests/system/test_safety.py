"""Issue 7: builds keyed by content, one-line errors for every command, one writer per
pack, atomic --replace that keeps labels, warnings on incomplete packs, valid JSON."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from flowdb.cli import cli
from flowdb.errors import BuildConflict
from flowdb.packs.manifest import load_manifest
from flowdb.store import graph
from flowdb.store.ingest import ingest
from flowdb.store.locks import pack_lock
from flowdb.store.templates import run_template
from helpers import assert_edges_equal_brute_force


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> bool:
    return result.output.startswith("Error: ") and result.output.count("\n") == 1 \
        and "Traceback" not in result.output


def rewrite_decoder(pack_dir, module, layer, seed):
    """New weights of the same shape (and so the same file size)."""
    path = pack_dir / "saes" / module / f"layer_{layer}" / "sae_weights.safetensors"
    tensors = load_file(str(path))
    size = path.stat().st_size
    tensors["W_dec"] = np.random.default_rng(seed).standard_normal(tensors["W_dec"].shape).astype(np.float32)
    save_file(tensors, str(path))
    assert path.stat().st_size == size


def test_changed_sae_weights_are_a_new_build(db, pack_copy):
    manifest = pack_copy / "manifest.toml"
    assert ingest(load_manifest(manifest), db).status == "built"
    _label(db, "planted/2/res/5", "on the SAE that changes")
    _label(db, "planted/1/res/5", "on an SAE that stays")
    rewrite_decoder(pack_copy, "res", 2, seed=1)
    with pytest.raises(BuildConflict, match="other SAE files"):
        ingest(load_manifest(manifest), db)
    assert ingest(load_manifest(manifest), db, replace=True).status == "replaced"
    labels = {row["key"]: row["label"] for row in db.read(
        "MATCH (f:Feature) WHERE f.key IN ['planted/2/res/5', 'planted/1/res/5'] "
        "RETURN f.key AS key, f.label AS label")}
    # A changed SAE's index names another feature: its old label must not follow it.
    assert labels == {"planted/2/res/5": None, "planted/1/res/5": "on an SAE that stays"}
    assert_edges_equal_brute_force(db, "planted", pack_copy, layers=4, k=1)
    # A fresh build after another change must not reuse the match cache of the old files.
    graph.drop_pack(db, "planted")
    rewrite_decoder(pack_copy, "mlp", 3, seed=2)
    ingest(load_manifest(manifest), db)
    assert_edges_equal_brute_force(db, "planted", pack_copy, layers=4, k=1)


def test_moved_pack_is_the_same_build(db, pack_copy, tmp_path):
    ingest(load_manifest(pack_copy / "manifest.toml"), db)
    moved = tmp_path / "moved"
    pack_copy.rename(moved)
    assert ingest(load_manifest(moved / "manifest.toml"), db).status == "unchanged"
    plan = graph.read_pack(db, "planted").plan
    assert all(sae["location"].startswith(str(moved)) for sae in plan["saes"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


COMMANDS = [
    ("packs",),
    ("export", "planted", "--out", "{tmp}/x.csv"),
    ("query", "lineage", "-p", "feature=planted/1/res/0"),
    ("cypher", "RETURN 1 AS one"),
    ("ingest", "{manifest}", "--no-progress"),
    ("labels", "import", "{labels}"),
    ("labels", "fetch", "planted", "--no-progress"),
    ("plot", "flow", "planted/1/res/0", "--out", "{tmp}/f.png"),
    ("plot", "origins", "planted", "--out", "{tmp}/o.png"),
    ("groups", "planted", "--no-progress"),
    ("validate", "deactivation", "planted", "--no-progress"),
    ("steer", "planted", "--seed-feature", "planted/1/res/0"),
]


def _server_uri(neo4j_settings) -> str:
    if neo4j_settings.uri:
        return neo4j_settings.uri
    from flowdb.store.server import ManagedServer

    return ManagedServer.default().uri


@pytest.mark.parametrize("fault", ["server stopped", "unknown database", "wrong credentials", "not a Neo4j URI"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_fails_in_one_line(db, planted_pack, neo4j_settings, tmp_path, command, fault):
    labels = tmp_path / "rows.jsonl"
    labels.write_text('{"modelId": "m", "layer": "0-x", "index": "1", "description": "d"}\n')
    args = [a.format(tmp=tmp_path, manifest=planted_pack[0] / "manifest.toml", labels=labels) for a in command]
    connection = {
        "server stopped": ["--uri", f"bolt://127.0.0.1:{_free_port()}"],
        "unknown database": ["--database", "nosuch"],
        "wrong credentials": ["--uri", _server_uri(neo4j_settings), "--user", "neo4j", "--password", "wrong"],
        "not a Neo4j URI": ["--uri", "http://127.0.0.1:1"],
    }[fault]
    result = invoke(*args, *connection)
    assert result.exit_code == 1, result.output
    assert one_line_error(result), result.output
    expected = {"server stopped": "no Neo4j answers", "unknown database": "no database 'nosuch'",
                "wrong credentials": "refused the credentials", "not a Neo4j URI": "bolt://"}[fault]
    assert expected in result.output


@pytest.mark.parametrize("toml, message", [
    ("[modules.res]\npath = 'x'\nat = 3\n", "at in [modules.res]"),
    ("classify = 3\n[modules.res]\npath = 'x'\n", "classify"),
    ("[classify]\nlayer = 3\n[modules.res]\npath = 'x'\n", "layer in [classify]"),
    ("[classify]\nt_res = '0.5'\n[modules.res]\npath = 'x'\n", "t_res in [classify]"),
    ("[match]\nk = true\n[modules.res]\npath = 'x'\n", "k must be an integer"),
    ("[modules.res]\npath = 'x_{layer-1}'\n", "names layer -1 at layer 0"),
])
def test_manifest_types_are_one_line(tmp_path, toml, message):
    path = tmp_path / "m.toml"
    path.write_text('name = "x"\nmodel = "m"\nlayers = [0, 1]\n' + toml)
    result = invoke("ingest", path)
    assert result.exit_code == 1 and one_line_error(result), result.output
    assert message in result.output


def test_symlink_loop_is_one_line(neo4j_settings, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = tmp_path / "m.toml"
    path.write_text('name = "x"\nmodel = "m"\nlayers = [0, 0]\n[modules.res]\npath = "loop"\n')
    result = invoke("ingest", path)
    assert result.exit_code == 1 and one_line_error(result), result.output


def test_second_writer_of_a_pack_is_told_so(db, planted_pack):
    with pack_lock(db, "planted"):
        result = invoke("ingest", planted_pack[0] / "manifest.toml", "--no-progress")
    assert result.exit_code == 1 and one_line_error(result), result.output
    assert "being written by another flowdb command" in result.output
    # The lock was released: the same command now goes through.
    assert invoke("ingest", planted_pack[0] / "manifest.toml", "--no-progress").exit_code == 0


def test_lock_of_a_dead_process_is_taken_over(db, planted_pack):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    assert graph.acquire_lock(db, "pack:planted", f"{socket.gethostname()}:{dead}:x", 600) is None
    assert invoke("ingest", planted_pack[0] / "manifest.toml", "--no-progress").exit_code == 0


def test_two_ingests_at_once_end_in_one_graph(db, planted_pack):
    manifest = planted_pack[0] / "manifest.toml"
    procs = [subprocess.Popen([sys.executable, "-m", "flowdb.cli", "ingest", str(manifest), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    for code, output in outputs:
        assert "Traceback" not in output
        assert code == 0 or (code == 1 and "being written by another flowdb command" in output), output
    assert_edges_equal_brute_force(db, "planted", planted_pack[0], layers=4, k=1)
    assert db.read("MATCH (f:Feature) WITH f.key AS key, count(*) AS n WHERE n > 1 RETURN count(*) AS d")[0]["d"] == 0


def _label(db, key, text):
    with db.session() as session:
        session.execute_write(lambda tx: (
            graph.write_explanations(tx, [{"key": key, "id": f"e-{key}", "description": text, "modelId": "m",
                                           "source": "s", "index": 0, "score": None, "typeName": None,
                                           "explanationModelName": None, "authorId": None}]),
            graph.set_best_labels(tx, [key])))


def test_replace_swaps_whole_builds_and_keeps_labels(db, planted_pack):
    path = planted_pack[0] / "manifest.toml"
    ingest(load_manifest(path), db)
    _label(db, "planted/2/res/5", "a planted label")
    nodes = db.read("MATCH (f:Feature {pack: 'planted'}) RETURN count(f) AS n")[0]["n"]
    assert ingest(load_manifest(path, k=2), db, replace=True).status == "replaced"
    assert db.read("MATCH (f:Feature {pack: 'planted'}) RETURN count(f) AS n")[0]["n"] == nodes
    assert db.read("MATCH (f:Feature) WHERE f.pack CONTAINS '~' RETURN count(f) AS n")[0]["n"] == 0
    assert db.read("MATCH (p:Pack) RETURN collect(p.name) AS names")[0]["names"] == ["planted"]
    kept = db.read("MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature {key: 'planted/2/res/5'}) "
                   "RETURN f.label AS label, count(e) AS n")
    assert kept == [{"label": "a planted label", "n": 1}]
    assert run_template(db, "edges", {"pack": "planted"})["rank"].max() == 2


def test_incomplete_pack_is_said_so(db, planted_pack, tmp_path):
    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
    db.write("MATCH (p:Pack {name: 'planted'}) SET p.status = 'building', p.layers_done = [0, 1]")
    result = CliRunner().invoke(cli, ["query", "lineage", "-p", "feature=planted/1/res/0"])
    assert result.exit_code == 0
    assert "Warning: pack 'planted' is incomplete (building, layers done: 2 of 4)" in result.output
    exported = CliRunner().invoke(cli, ["export", "planted", "--out", str(tmp_path / "e.csv")])
    assert exported.exit_code == 0 and "is incomplete" in exported.output
    with pytest.warns(UserWarning, match="incomplete"):
        frame = run_template(db, "lineage", {"feature": "planted/1/res/0"})
    assert "incomplete" in frame.attrs["warning"]


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def test_json_output_is_json(db):
    result = invoke("cypher", "RETURN 1.5 AS x, 'a' AS y UNION ALL RETURN null AS x, null AS y", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output, parse_constant=_reject_constant)
    assert rows == [{"x": 1.5, "y": "a"}, {"x": None, "y": None}]


def exposed(home) -> list[str]:
    """What under home (itself included) its group or others may use, with the mode: a path
    that grants them access and that they can reach, every folder above it within home
    letting them through. Files in a 0700 folder (a demo pack's) are out of their reach."""
    def reachable(path):
        return all(folder.stat().st_mode & 0o011 for folder in path.parents
                   if folder == home or home in folder.parents)

    return [f"{path} {stat.S_IMODE(path.lstat().st_mode):o}" for path in [home, *home.rglob("*")]
            if not path.is_symlink() and path.lstat().st_mode & 0o077 and reachable(path)]


def test_home_files_are_private(flowdb_home, db, planted_pack):
    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)  # fills the digest cache and an atlas
    assert (flowdb_home / "cache").is_dir() and (flowdb_home / "atlas").is_dir()
    assert exposed(flowdb_home) == []


@pytest.mark.parametrize("command", [
    ("match", "{manifest}", "--out", "{tmp}/atlas", "--no-progress"),
    ("ingest", "{manifest}", "--uri", "{uri}", "--user", "neo4j", "--password", "{password}", "--no-progress"),
], ids=lambda c: c[0])
def test_a_home_a_command_creates_is_private(db, planted_pack, managed_server, tmp_path, command):
    """Run as a user would: a parent of mode 0755 and umask 022, so only flowdb's own
    care can make what it creates 0700 (directories) and 0600 (files)."""
    os.chmod(tmp_path, 0o755)
    home = tmp_path / "home"
    args = [a.format(manifest=planted_pack[0] / "manifest.toml", tmp=tmp_path, uri=managed_server.uri,
                     password=managed_server.auth()[1]) for a in command]
    done = subprocess.run([sys.executable, "-m", "flowdb.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "FLOWDB_HOME": str(home)}, umask=0o022, timeout=600)
    assert done.returncode == 0, done.stderr
    assert home.is_dir() and exposed(home) == []


def test_a_lost_lease_stops_the_writer(db, monkeypatch):
    import time

    from flowdb.errors import BusyError
    from flowdb.store import locks

    monkeypatch.setattr(locks, "LOCK_LEASE_S", 0.4)  # renewals every 0.1 s
    with pack_lock(db, "leased") as lease:
        lease.check()
        db.write("MATCH (l:Lock {name: 'pack:leased'}) SET l.owner = 'elsewhere:1:x'")
        deadline = time.monotonic() + 10
        while not lease.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(BusyError, match="lost the lock on pack 'leased'"):
            lease.check()
    # The thief's lock is left alone.
    assert db.read("MATCH (l:Lock {name: 'pack:leased'}) RETURN l.owner AS o")[0]["o"] == "elsewhere:1:x"


def test_an_abandoned_replacement_is_cleaned_up(db, planted_pack):
    path = planted_pack[0] / "manifest.toml"
    ingest(load_manifest(path), db)
    plan = graph.read_pack(db, "planted").plan
    graph.begin_pack(db, "planted" + graph.STAGED_SUFFIX, plan, "someotherbuild", "test", "none")
    assert ingest(load_manifest(path), db).status == "unchanged"
    assert graph.read_pack(db, "planted" + graph.STAGED_SUFFIX) is None
    assert "replacement" not in invoke("packs").output


def test_a_pack_without_stored_thresholds_says_so(db, planted_pack):
    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
    db.write("MATCH ()-[e:RESIDUAL|MLP|ATTENTION]->() REMOVE e.above")  # as an older flowdb stored it
    db.write("MATCH (s:SAE) REMOVE s.threshold_rule")
    from flowdb.errors import QueryError

    with pytest.raises(QueryError, match="older flowdb"):
        run_template(db, "lineage", {"feature": "planted/3/res/0"})
    assert len(run_template(db, "lineage", {"feature": "planted/3/res/0", "every_edge": True}))


def test_numpy_numbers_are_parameters(db, planted_pack):
    import flowdb

    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db)
    frame = flowdb.query("newborn", db=db, pack="planted", layer=np.int64(2), limit=np.int32(3))
    assert len(frame) == 3
