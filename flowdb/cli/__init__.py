"""flowdb's command line: one click group, and a module of thin commands per command group
(server, build, store, links, labels, experiments, views, circuits), registered here.

A command parses its options, calls the library, and prints. Heavy imports (numpy,
faiss, neo4j, torch) happen inside commands, so `flowdb --help` is instant.
"""

from __future__ import annotations

import click

from flowdb.cli import build, circuits, experiments, labels, links, server, store, views
from flowdb.cli._common import FlowdbGroup


@click.group(cls=FlowdbGroup)
@click.version_option(package_name="flowdb")
def cli():
    """Feature-flow graphs of SAE packs in Neo4j (Laptev et al., ICML 2025)."""
    from flowdb.settings import check_environment

    check_environment()  # a bad FLOWDB_* variable fails before any work, not after an hour's


for group in (server, build, store, links, labels, experiments, views, circuits):
    for command in group.COMMANDS:
        cli.add_command(command)
