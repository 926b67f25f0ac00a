import http.server
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from neo4j import GraphDatabase
from neo4j.exceptions import AuthError, ClientError

from conftest import _free_port
from flowdb.cli import cli
from flowdb.settings import flowdb_home
from flowdb.store.server import ManagedServer, bolt_answers
from helpers import ROOT


@pytest.fixture
def managed(managed_server) -> ManagedServer:
    return managed_server


def _share_session_jars(root) -> None:
    session_lib = flowdb_home() / "neo4j" / "lib"
    root.mkdir(parents=True, exist_ok=True)
    if session_lib.exists():
        os.symlink(session_lib, root / "lib")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_start_status_stop_cycle(neo4j_settings, tmp_path, monkeypatch):
    """A second managed server, sharing the session's jars, goes up and down on request,
    and its password is the password file's whatever the store held."""
    root = tmp_path / "home" / "neo4j"
    _share_session_jars(root)
    port = _free_port()
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLOWDB_NEO4J_PORT", str(port))
    monkeypatch.setenv("FLOWDB_NEO4J_HEAP", "512m")
    runner = CliRunner()
    try:
        started = runner.invoke(cli, ["neo4j", "start"])
        assert started.exit_code == 0, started.output
        assert f"bolt://127.0.0.1:{port}" in started.output
        assert bolt_answers(f"bolt://127.0.0.1:{port}", ManagedServer.default().auth())
        assert runner.invoke(cli, ["neo4j", "status"]).exit_code == 0
        assert (root / "logs" / "server.log").exists() and (root / "dbms").is_dir()
        stopped = runner.invoke(cli, ["neo4j", "stop"])
        assert stopped.exit_code == 0 and stopped.output.strip() == "stopped"
        status = runner.invoke(cli, ["neo4j", "status"])
        assert status.exit_code == 1 and "not answering" in status.output
        assert runner.invoke(cli, ["neo4j", "stop"]).output.strip() == "not running"

        # The new store took the password as its system database was made: no default
        # password ever, and no initial-user file left behind.
        first = ManagedServer.default().auth()
        assert "set for the new store" in (root / "logs" / "server.log").read_text()
        assert not list((root / "dbms").rglob("auth.ini"))
        # A store that holds another password (a replaced password file, or a system
        # database from elsewhere) is given the file's with Bolt off.
        (root / "password").write_text("another-password-of-28-chars\n")
        assert runner.invoke(cli, ["neo4j", "start"]).exit_code == 0
        assert "password of neo4j set with Bolt off" in (root / "logs" / "server.log").read_text()
        for wrong in (first, ("neo4j", "neo4j")):
            with GraphDatabase.driver(f"bolt://127.0.0.1:{port}", auth=wrong) as driver, pytest.raises(AuthError):
                driver.verify_connectivity()
        assert bolt_answers(f"bolt://127.0.0.1:{port}", ("neo4j", "another-password-of-28-chars"))
    finally:
        ManagedServer(root, port).stop()


def test_a_start_that_times_out_leaves_no_server_behind(neo4j_settings, tmp_path, monkeypatch):
    """A JVM that start() spawned and gave up on is stopped, not left holding the store."""
    import flowdb.store.server as neo4j_server

    root = tmp_path / "home" / "neo4j"
    _share_session_jars(root)
    server = ManagedServer(root, _free_port())
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(neo4j_server, "START_TIMEOUT_S", 1.0)  # far shorter than a JVM start
    spawned = []
    spawn = ManagedServer._spawn
    monkeypatch.setattr(ManagedServer, "_spawn", lambda self, *a: (spawn(self, *a), spawned.append(self.pid())))
    try:
        with pytest.raises(neo4j_server.Neo4jUnavailable, match="did not answer .* within 1.0s"):
            server.start(heap="512m")
        assert spawned and spawned[0] is not None  # a JVM really was started
        stat_file = Path(f"/proc/{spawned[0]}/stat")  # gone, or a zombie its parent has yet to reap
        assert not stat_file.exists() or stat_file.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        assert server.pid() is None and not server.pid_file.exists()
    finally:
        server.stop()


def test_a_stranger_on_the_port_is_not_taken_for_ours(managed, tmp_path, monkeypatch):
    port = str(managed.port)  # the managed server answers there
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("FLOWDB_NEO4J_PORT", port)
    result = CliRunner().invoke(cli, ["neo4j", "start"])
    assert result.exit_code == 1
    assert f"another Neo4j already answers on bolt://127.0.0.1:{port}" in result.output


@pytest.mark.parametrize("auth", [None, ("neo4j", "neo4j"), ("neo4j", "wrong-password")],
                         ids=["no credentials", "default password", "wrong password"])
def test_only_the_generated_password_logs_in(managed, auth):
    with GraphDatabase.driver(managed.uri, auth=auth) as driver, pytest.raises(AuthError):
        driver.verify_connectivity()
    with GraphDatabase.driver(managed.uri, auth=managed.auth()) as driver:
        driver.verify_connectivity()


def _load_csv(server: ManagedServer, url: str):
    with GraphDatabase.driver(server.uri, auth=server.auth()) as driver:
        return driver.execute_query("LOAD CSV FROM $url AS row RETURN row LIMIT 1", url=url)


def test_load_csv_reads_no_local_file(managed):
    for url in ("file:///etc/passwd", "file:///passwd"):
        with pytest.raises(ClientError, match="allow_csv_import_from_file_urls"):
            _load_csv(managed, url)


class _CsvHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"a,b\n1,2\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_load_csv_fetches_no_url(managed):
    port = _free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _CsvHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{port}/rows.csv", timeout=5) as reply:
            assert reply.read() == b"a,b\n1,2\n"  # the server does serve the file
        for host in ("127.0.0.1", "localhost"):
            with pytest.raises(ClientError, match="blocked"):
                _load_csv(managed, f"http://{host}:{port}/rows.csv")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_files_are_private_to_their_owner(managed):
    home = managed.home
    assert _mode(home) == 0o700 and _mode(managed.root) == 0o700
    assert _mode(managed.password_file) == 0o600
    command = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(managed.pid())],
                             capture_output=True, text=True).stdout
    assert "FlowdbNeo4j" in command and managed.auth()[1] not in command
    exposed = [str(path) for path in managed.root.rglob("*")
               if not path.is_symlink() and path.stat().st_mode & 0o077]
    assert exposed == []


def test_a_stranger_pid_is_neither_killed_nor_waited_for(neo4j_settings, tmp_path):
    """A pid file naming an unrelated process: stop leaves it alone, start ignores it.

    The home is laid out as an older flowdb left it: world-readable, no password."""
    root = tmp_path / "neo4j"
    _share_session_jars(root)
    os.chmod(root, 0o755)
    (root / "logs").mkdir(mode=0o755)
    (root / "logs" / "server.log").write_text("an older server's log\n")
    os.chmod(root / "logs" / "server.log", 0o644)
    server = ManagedServer(root, _free_port())
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        server.pid_file.write_text(str(stranger.pid))
        assert server.pid() is None
        assert server.stop() is False
        assert stranger.poll() is None and not server.pid_file.exists()

        server.pid_file.write_text(str(stranger.pid))
        # Trusting the pid file, start would wait START_TIMEOUT_S for the stranger, then fail.
        server.start(heap="512m", page_cache_mb=64)
        assert stranger.poll() is None
        assert server.pid() not in (None, stranger.pid)
        assert bolt_answers(server.uri, server.auth())
        assert _mode(root) == 0o700 and _mode(server.password_file) == 0o600
        assert _mode(root / "logs") == 0o700 and _mode(root / "logs" / "server.log") == 0o600
        assert server.stop() is True
        assert stranger.poll() is None
    finally:
        server.stop()
        stranger.kill()
        stranger.wait()


def _tcp_listeners() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets of this network namespace: inode -> (address, port)."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(fields[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _ipv4_if_mapped(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def _own_addresses() -> set[str]:
    """This machine's IPv4 addresses other than loopback, from the kernel's routing trie."""
    lines = open("/proc/net/fib_trie").read().splitlines()
    return {lines[i - 1].split()[-1] for i, line in enumerate(lines)
            if "/32 host LOCAL" in line and not lines[i - 1].split()[-1].startswith("127.")}


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc")
def test_the_server_listens_on_loopback_only(managed):
    listeners = _tcp_listeners()
    ours = [listeners[inode] for inode in _socket_inodes(managed.pid()) if inode in listeners]
    # Java binds IPv6 sockets: 127.0.0.1 shows as ::ffff:127.0.0.1.
    ours = [(_ipv4_if_mapped(address), port) for address, port in ours]
    assert ("127.0.0.1", managed.port) in ours, ours  # Bolt, and it is found here
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in ours), ours
    for address in _own_addresses():  # from another machine's side: nothing answers
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, managed.port), timeout=5):
            pass


def _compose_settings(environment: dict) -> dict:
    """Neo4j settings from the neo4j image's NEO4J_ variables: '_' is '.', '__' is '_'."""
    return {name[len("NEO4J_"):].replace("__", "\0").replace("_", ".").replace("\0", "_"): str(value)
            for name, value in environment.items() if name.startswith("NEO4J_") and name != "NEO4J_AUTH"}


def test_compose_file_keeps_its_neo4j_private(managed):
    """docker/compose.yaml as the README describes it: no default password, ports on
    loopback only, LOAD CSV refused from files and from the network."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    neo4j = services["neo4j"]
    # ${NEO4J_PASSWORD:?...}: compose stops when it is unset or empty; no :- or - default.
    required = r"\$\{NEO4J_PASSWORD:\?[^}]*\}"
    assert re.fullmatch(f"neo4j/{required}", neo4j["environment"]["NEO4J_AUTH"])
    assert re.fullmatch(required, services["flowdb"]["environment"]["NEO4J_PASSWORD"])
    for service in services.values():
        assert not re.search(r"NEO4J_PASSWORD:?-", json.dumps(service)), service
        for port in service.get("ports", []):
            host = port["host_ip"] if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host == "127.0.0.1", port
    settings = _compose_settings(neo4j["environment"])
    assert settings["dbms.security.allow_csv_import_from_file_urls"] == "false"
    assert {"0.0.0.0/0", "::/0"} <= set(settings["internal.dbms.cypher_ip_blocklist"].split(","))
    # The names are settings Neo4j 5.26 knows: the managed server runs with the same values.
    with GraphDatabase.driver(managed.uri, auth=managed.auth()) as driver:
        known = {row["name"]: row["value"] for row in driver.execute_query(
            "CALL dbms.listConfig() YIELD name, value RETURN name, value").records}
    assert known["dbms.security.allow_csv_import_from_file_urls"] == "false"


def _launchers_of(dbms: Path) -> list[int]:
    """Live JVMs whose command line runs the launcher on this dbms directory."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that ended meanwhile
            continue
        launcher = any(arg == b"FlowdbNeo4j" or arg.endswith(b"FlowdbNeo4j.java") for arg in argv)
        if str(dbms).encode() in argv and launcher:
            found.append(int(entry))
    return found


def test_two_starts_at_once_end_in_one_server(neo4j_settings, tmp_path):
    """Two `flowdb neo4j start` at once on a fresh home: both succeed, on one JVM."""
    home = tmp_path / "home"
    _share_session_jars(home / "neo4j")
    env = {**os.environ, "FLOWDB_HOME": str(home), "FLOWDB_NEO4J_PORT": str(_free_port()),
           "FLOWDB_NEO4J_HEAP": "512m", "FLOWDB_NEO4J_PAGECACHE_MB": "32"}
    starts = [subprocess.Popen([sys.executable, "-m", "flowdb.cli", "neo4j", "start"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    server = ManagedServer(home / "neo4j", int(env["FLOWDB_NEO4J_PORT"]))
    try:
        for start in starts:
            output = start.communicate(timeout=300)[0]
            assert start.returncode == 0, output
        assert _launchers_of(server.dbms_dir) == [server.pid()]
        assert bolt_answers(server.uri, server.auth())
    finally:
        server.stop()
