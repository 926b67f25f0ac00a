"""A full disk, a database that is not online, and a killed server: each is one line on
stderr, and nothing is left half-written or lost.

The disks are real tmpfs mounts, so the errors are the kernel's own ENOSPC. Mounting
needs root; the tests run as root in CI (scripts/test.sh), and fail, never skip, where
they cannot mount.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import _free_port
from flowdb.cli import cli
from flowdb.settings import Neo4jSettings
from flowdb.store.server import BOLT_COST, MIN_SPACE_MARGIN, ManagedServer

FLOWDB = [sys.executable, "-m", "flowdb.cli"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, name): a fresh tmpfs of that size (e.g. "1m") under tmp_path."""
    mounted = []

    def mount(size: str, name: str = "disk") -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True)
        assert done.returncode == 0, (f"cannot mount a tmpfs ({done.stderr.strip()}); these tests need "
                                      "root, as CI runs them")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take all but about `leave` bytes of the disk's free space."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as out:
        out.truncate(0)
        out.write(b"\0" * max(0, free - leave))
    assert shutil.disk_usage(disk).free <= leave + 8192


def one_error_line(result, *parts: str) -> str:
    """The one error line of a failed command, last on stderr (after any notes the command
    printed before it failed); it must name every part."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def leftovers(root: Path) -> list[str]:
    """Half-written files: dot-names (every partial is one) other than the atlas's lock."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name != ".lock")


# --- files flowdb writes ---------------------------------------------------------------------

def test_match_on_a_full_disk_names_the_file_and_keeps_only_whole_layers(small_disk, planted_pack):
    disk = small_disk("1m")
    fill(disk, 96 * 1024)  # room for about one layer of the planted pack's atlas
    out = disk / "atlas"
    result = invoke("match", planted_pack[0] / "manifest.toml", "--out", out, "--no-progress")
    one_error_line(result, "no space left on the device to write", str(out))
    assert leftovers(disk) == []
    done = sorted(int(p.stem) for p in (out / "layers").glob("*.json"))
    assert done != [0, 1, 2, 3]  # the disk filled up part way
    for layer in done:  # a layer recorded as done is whole: k=1 match per place that precedes it
        edges = pd.read_parquet(out / "edges" / f"layer={layer}" / "part.parquet")
        assert len(edges) == 512 * (2 if layer == 0 else 3)


@pytest.fixture
def stored(db, planted_pack):
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db, show_progress=False)
    return db


@pytest.mark.parametrize("command", [
    ["export", "planted", "--out", "{disk}/edges.csv"],
    ["export", "planted", "--out", "{disk}/edges.parquet"],
    ["export-graph", "planted/3/res/0", "--out", "{disk}/graph.json"],
    ["plot", "origins", "planted", "--out", "{disk}/origins.png"],
    ["plot", "origins", "planted", "--out", "{disk}/origins.html"],
], ids=["export csv", "export parquet", "graph json", "plot png", "plot html"])
def test_outputs_on_a_full_disk_are_one_line_and_leave_nothing(stored, small_disk, command):
    disk = small_disk("16m")  # an HTML picture holds plotly.js: about 4 MB
    fill(disk, 0)
    args = [part.format(disk=disk) for part in command]
    one_error_line(invoke(*args), "no space left on the device to write", args[-1])
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    (disk / "filler").unlink()  # with room, the same command writes its file whole
    assert invoke(*args).exit_code == 0 and Path(args[-1]).stat().st_size > 0
    assert leftovers(disk) == []


def test_bulk_import_files_on_a_full_disk_leave_no_file(small_disk, planted_pack, tmp_path):
    atlas = tmp_path / "atlas"
    assert invoke("match", planted_pack[0] / "manifest.toml", "--out", atlas, "--no-progress").exit_code == 0
    disk = small_disk("1m")
    fill(disk, 64 * 1024)
    files = disk / "files"
    # A server of one's own: the files are written for it, and no server is asked anything.
    result = invoke("load", "--bulk", "--uri", "bolt://127.0.0.1:9", "--import-dir", files, atlas)
    one_error_line(result, "no space left on the device to write", str(files))
    assert list(files.iterdir()) == []


# --- the store's disk ------------------------------------------------------------------------

@pytest.fixture
def server_on(monkeypatch, neo4j_settings):
    """server_on(home): a managed server whose FLOWDB_HOME is `home` (the session's jars
    linked in, not copied), made the default one; stopped when the test ends."""
    servers = []
    jars = ManagedServer.default()
    jars.fetch()

    def make(home: Path) -> ManagedServer:
        (home / "neo4j").mkdir(parents=True)
        os.symlink(jars.lib, home / "neo4j" / "lib")
        monkeypatch.setenv("FLOWDB_HOME", str(home))
        monkeypatch.setenv("FLOWDB_NEO4J_PORT", str(_free_port()))
        monkeypatch.setenv("FLOWDB_NEO4J_HEAP", "512m")
        monkeypatch.setenv("FLOWDB_NEO4J_PAGECACHE_MB", "32")
        for name in ("NEO4J_URI", "NEO4J_USERNAME", "NEO4J_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        servers.append(ManagedServer.default())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def store_bytes(server: ManagedServer) -> int:
    """Disk blocks of the database's store and transaction logs (as df counts them)."""
    return sum(path.lstat().st_blocks * 512 for directory in server.store_dirs()
               for path in [directory, *directory.rglob("*")])


def count_nodes(server: ManagedServer) -> int:
    from flowdb.store.connection import connect

    with connect(Neo4jSettings.resolve()) as db:
        return db.read("MATCH (n) RETURN count(n) AS n")[0]["n"]


def test_a_build_that_would_fill_the_store_is_refused_before_it_writes(small_disk, server_on, tmp_path):
    from flowdb.flow.atlas import Atlas
    from flowdb.flow.layer import PACK_NODES

    atlases, estimate = {}, {}
    for name, width, k in (("small", 256, 2), ("big", 2048, 10)):
        assert invoke("synth", tmp_path / name, "--name", name, "--layers", 4, "--width", width,
                      "--d-model", 64).exit_code == 0
        atlases[name] = tmp_path / f"atlas-{name}"
        assert invoke("match", tmp_path / name / "manifest.toml", "--k", k, "--out", atlases[name],
                      "--no-progress").exit_code == 0
        nodes, relationships = Atlas.open(atlases[name]).graph_size()
        estimate[name] = BOLT_COST.bytes(nodes + PACK_NODES, relationships)
    disk = small_disk("160m")
    server = server_on(disk / "home")
    assert invoke("neo4j", "start").exit_code == 0
    fill(disk, estimate["small"] + MIN_SPACE_MARGIN + 4 * 2**20)  # room for the small pack only
    free = shutil.disk_usage(disk).free
    assert estimate["big"] > free  # the big one would fill the disk
    before = count_nodes(server)
    bulk_dir = server.root / "bulk"

    for args, what in ((["load", atlases["big"]], "writing pack 'big'"),
                       (["load", "--bulk", atlases["big"]], "bulk-loading big")):
        line = one_error_line(invoke(*args, "--no-progress"), what, "free on the disk of the managed Neo4j",
                              "nothing was written")
        needed, has = (float(v.replace(",", "")) for v in
                       re.search(r"needs about ([\d,.]+) MiB free.* has ([\d,.]+) MiB free", line).groups())
        assert needed > has and abs(has - free / 2**20) < 2  # both figures; the free one as df sees it
        assert count_nodes(server) == before  # refused before any write, and the database answers
        assert not bulk_dir.exists() or list(bulk_dir.iterdir()) == []
        status = invoke("neo4j", "status")
        assert status.exit_code == 0 and "default database online" in status.output

    # A pack that fits is written, and takes no more of the disk than its estimate, nor
    # much less (an estimate far too high would refuse builds that fit).
    server.stop()
    used = store_bytes(server)
    result = invoke("load", atlases["small"], "--no-progress")
    assert result.exit_code == 0, result.output
    assert count_nodes(server) > before
    server.stop()
    grown = store_bytes(server) - used
    assert estimate["small"] / 2 < grown <= estimate["small"], (grown, estimate["small"])


# --- a database that is not online, and a killed server --------------------------------------

def test_a_killed_server_and_a_database_that_is_not_online_are_one_line(server_on, tmp_path):
    """One private server (each start costs a JVM): killed in the middle of a command,
    then started on a store Neo4j cannot open."""
    server = server_on(tmp_path / "home")
    started = invoke("neo4j", "start")
    assert started.exit_code == 0 and "default database online" in started.stdout
    # A read that runs for minutes; the server is killed while it runs. The driver's
    # retries used to print a warning line each before flowdb's own line.
    statement = "UNWIND range(1, 100000) AS a UNWIND range(1, 100000) AS b RETURN count(*) AS n"
    child = subprocess.Popen([*FLOWDB, "cypher", statement], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    from flowdb.store.connection import connect

    with connect(Neo4jSettings.resolve()) as db:
        deadline = time.monotonic() + 300
        while not db.read("SHOW TRANSACTIONS YIELD currentQuery WHERE currentQuery STARTS WITH 'UNWIND' "
                          "RETURN count(*) AS n")[0]["n"]:
            assert time.monotonic() < deadline and child.poll() is None, child.communicate()
            time.sleep(0.2)
    os.kill(server.pid(), signal.SIGKILL)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "127.0.0.1" in lines[0], stderr

    # A store Neo4j cannot open: the DBMS starts and Bolt answers, but the default
    # database stays offline, so neither start nor status may say "running".
    server.stop()
    store, _ = server.store_dirs()
    (store / "neostore").write_bytes(b"\xff" * 64)
    for command in ("start", "status"):
        result = invoke("neo4j", command)
        one_error_line(result, "default database 'neo4j' is offline", str(server.log_file), str(server.neo4j_log))
        assert "running" not in result.stdout
