"""flowdb neo4j (the managed server) and flowdb doctor (this machine's matching rate)."""

from __future__ import annotations

import sys

import click

from flowdb.cli._common import echo


@click.group()
def neo4j():
    """flowdb's managed local Neo4j 5.26 (fetched through Maven; no Docker needed)."""


@neo4j.command("start")
def neo4j_start():
    """Fetch Neo4j on first use, start it, and wait until Bolt answers."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    server.start()  # refuses unless the default database takes queries
    echo(f"running: Neo4j answers on {server.uri}, its default database online (home {server.root})")


@neo4j.command("stop")
def neo4j_stop():
    """Stop the managed Neo4j."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    echo("stopped" if server.stop() else "not running")


@neo4j.command("status")
def neo4j_status():
    """Exit 0 only when the managed Neo4j answers on Bolt and its default database is online."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    if not server.answers():
        echo(f"not answering on {server.uri} ({server.logs})")
        sys.exit(1)
    server.require_online()  # else one line: what is wrong, and where the logs are
    echo(f"running: {server.uri}, default database online (pid {server.pid()}, home {server.root})")


@click.command()
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Time numpy's GEMM and a search on each CPU backend (about a second each).")
def doctor(measure):
    """Which BLAS each matching library loaded, and each CPU backend's search rate as a
    share of this CPU's fp32 GEMM rate: a BLAS that does not know the CPU shows here."""
    from flowdb.flow.doctor import report

    for line in report(measure):
        echo(line)


COMMANDS = (neo4j, doctor)
