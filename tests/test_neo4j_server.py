import os

import pytest

from click.testing import CliRunner

from conftest import _free_port
from flowdb.cli import cli
from flowdb.neo4j_server import ManagedServer, bolt_answers
from flowdb.settings import flowdb_home


def test_start_status_stop_cycle(neo4j_settings, tmp_path, monkeypatch):
    """A second managed server, sharing the session's jars, goes up and down on request."""
    session_lib = flowdb_home() / "neo4j" / "lib"
    root = tmp_path / "home" / "neo4j"
    root.mkdir(parents=True)
    if session_lib.exists():
        os.symlink(session_lib, root / "lib")
    port = _free_port()
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLOWDB_NEO4J_PORT", str(port))
    monkeypatch.setenv("FLOWDB_NEO4J_HEAP", "512m")
    runner = CliRunner()
    try:
        started = runner.invoke(cli, ["neo4j", "start"])
        assert started.exit_code == 0, started.output
        assert f"bolt://127.0.0.1:{port}" in started.output
        assert bolt_answers(f"bolt://127.0.0.1:{port}", None)
        assert runner.invoke(cli, ["neo4j", "status"]).exit_code == 0
        assert (root / "logs" / "server.log").exists() and (root / "dbms").is_dir()
        stopped = runner.invoke(cli, ["neo4j", "stop"])
        assert stopped.exit_code == 0 and stopped.output.strip() == "stopped"
        status = runner.invoke(cli, ["neo4j", "status"])
        assert status.exit_code == 1 and "not answering" in status.output
        assert runner.invoke(cli, ["neo4j", "stop"]).output.strip() == "not running"
    finally:
        ManagedServer(root, port).stop()


def test_a_stranger_on_the_port_is_not_taken_for_ours(neo4j_settings, tmp_path, monkeypatch):
    if not neo4j_settings.managed:
        pytest.skip("the session's server is a container: no managed server holds a port")
    port = os.environ["FLOWDB_NEO4J_PORT"]  # the session's server answers there
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("FLOWDB_NEO4J_PORT", port)
    result = CliRunner().invoke(cli, ["neo4j", "start"])
    assert result.exit_code == 1
    assert f"another Neo4j already answers on bolt://127.0.0.1:{port}" in result.output
