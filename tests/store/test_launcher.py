"""The managed Neo4j's launcher: compiled once into a jar and its classes archived once
per set of jars and JDK (flowdb.store.launcher); without javac, the source program."""

import os
import stat
import zipfile

from conftest import _free_port
from flowdb.settings import flowdb_home
from flowdb.store import launcher
from flowdb.store.server import NEO4J_VERSION, ManagedServer, _resource, bolt_answers


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_jar_and_archive_are_built_once_private_and_shared(neo4j_settings):
    lib = (flowdb_home() / "neo4j" / "lib").resolve()
    source = _resource("FlowdbNeo4j.java").read_bytes()
    marker = lib / f".complete-{NEO4J_VERSION}"
    args = launcher.launcher_args(lib, source, marker)  # the session's server built them
    jar = next(lib.glob(".flowdb-launcher/*/launcher.jar"))
    archive = jar.with_name("classes.jsa")
    assert args == [f"-XX:SharedArchiveFile={archive}", launcher.QUIET_SHARING,
                    "-cp", f"{lib / '*'}:{jar}", "FlowdbNeo4j"]
    assert "FlowdbNeo4j.class" in zipfile.ZipFile(jar).namelist()
    assert archive.stat().st_size > 10 * 2**20  # thousands of Neo4j classes, not a stub
    built = (jar.stat().st_mtime_ns, archive.stat().st_mtime_ns)
    assert launcher.launcher_args(lib, source, marker) == args  # found, not built again
    assert (jar.stat().st_mtime_ns, archive.stat().st_mtime_ns) == built
    assert _mode(jar.parent) == _mode(jar.parent.parent) == 0o700
    assert _mode(jar) & 0o077 == 0 and _mode(archive) & 0o077 == 0
    assert [p.name for p in jar.parent.iterdir() if p.name.startswith(".")] == []  # no build left over
    # Another launcher source, or another fetch of the jars, is another key.
    assert launcher._key(source + b"\n", marker) != launcher._key(source, marker)
    os.utime(marker, ns=(marker.stat().st_atime_ns, marker.stat().st_mtime_ns + 1))
    try:
        assert launcher._key(source, marker) != jar.parent.name
    finally:
        os.utime(marker, ns=(marker.stat().st_atime_ns, marker.stat().st_mtime_ns - 1))
    assert launcher._key(source, marker) == jar.parent.name


def test_without_javac_the_server_runs_the_source_program(neo4j_settings, tmp_path, monkeypatch):
    which = launcher.shutil.which
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None if name == "javac" else which(name))
    # A launcher source of its own, so no jar built before is found.
    source = _resource("FlowdbNeo4j.java").read_bytes() + b"\n// a launcher never built\n"
    monkeypatch.setattr("flowdb.store.server._resource", lambda name: _Bytes(source))
    root = tmp_path / "neo4j"
    root.mkdir()
    os.symlink(flowdb_home() / "neo4j" / "lib", root / "lib")
    server = ManagedServer(root, _free_port())
    try:
        server.start(heap="512m", page_cache_mb=32)
        assert bolt_answers(server.uri, server.auth())
        command = open(f"/proc/{server.pid()}/cmdline", "rb").read().split(b"\0")
        assert str(root / "maven" / "FlowdbNeo4j.java").encode() in command
        assert not any(arg.startswith(b"-XX:SharedArchiveFile") for arg in command)
    finally:
        server.stop()
    key = launcher._key(source, root / "lib" / f".complete-{NEO4J_VERSION}")
    assert not (root / "lib" / ".flowdb-launcher" / key).exists()


class _Bytes:
    def __init__(self, data: bytes):
        self.data = data

    def read_bytes(self) -> bytes:
        return self.data
