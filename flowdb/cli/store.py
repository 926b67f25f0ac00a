"""What is stored: packs, delete, export, query (templates) and cypher."""

from __future__ import annotations

import click

from flowdb.cli._common import (
    connection_options,
    echo,
    echo_frame,
    echo_notes,
    notes_said_once,
    open_db,
    parse_params,
    template_frame,
)


@click.command()
@connection_options
def packs(settings):
    """List the packs stored in the database."""
    from flowdb.store import graph

    with open_db(settings) as db:
        rows = graph.list_packs(db)
    if not rows:
        echo("(no packs)")
    for row in rows:
        note = f"\treplacement {row['replacing_with']} in progress" if row["replacing_with"] else ""
        echo(f"{row['name']}\t{row['model']}\tlayers {row['first']}-{row['last']}\t"
             f"k={row['k']}\tthresholds {row['rule']}\t{row['status']}\tbuild {row['build']}{note}")


@click.command()
@click.argument("pack")
@click.option("--yes", is_flag=True, help="Really delete: there is no undo.")
@connection_options
def delete(pack, yes, settings):
    """Delete PACK from the database: its features, edges, SAE and Pack nodes, labels no other
    pack uses, and its link sets with their ALIGNS (on the other pack too); without --yes, say
    what would go (its atlas under FLOWDB_HOME/atlas stays, for a later ingest)."""
    from flowdb.errors import FlowdbError
    from flowdb.store import graph
    from flowdb.store.ingest import delete_pack

    with open_db(settings) as db:
        graph.require_pack(db, pack)
        if not yes:
            going = graph.deletion(db, pack)
            links = "".join(f"; {line}" for line in going.link_lines())
            raise FlowdbError(f"this deletes pack {pack!r} ({going.summary()}{links}) from {db.where} for good; "
                              "run again with --yes to do it")
        deleted = delete_pack(db, pack)
    echo(f"deleted pack {pack!r}: {deleted.summary()}")
    for line in deleted.link_lines():
        echo(f"deleted {line}")


@click.command()
@click.argument("pack")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="A .csv or .parquet file.")
@connection_options
def export(pack, out, settings):
    """Write every stored match edge of PACK to a CSV or Parquet file."""
    from flowdb.store.export import export_edges

    with open_db(settings) as db, notes_said_once():
        edges = export_edges(db, pack, out)
    echo_notes(edges)
    echo(f"wrote {len(edges)} edges of {pack} to {out}")


@click.command()
@click.argument("name", required=False)
@click.option("-p", "--param", "pairs", multiple=True, help="A template parameter, key=value.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--list", "list_templates", is_flag=True, help="List the templates and what they answer.")
@click.option("--explain", is_flag=True, help="Show the template, its parameters and columns.")
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Stop the query after this many seconds "
              "(default: $FLOWDB_QUERY_TIMEOUT, else 60).")
@connection_options
def query(name, pairs, fmt, list_templates, explain, timeout, settings):
    """Run the query template NAME (see --list) with -p key=value parameters."""
    from flowdb.store.templates import get_template, templates

    if list_templates:
        for template in templates().values():
            echo(f"{template.name:14} {template.answers}")
        return
    if not name:
        raise click.UsageError("give a template NAME, or --list")
    template = get_template(name)
    if explain:
        echo(template.cypher.rstrip())
        return
    params = parse_params(pairs)
    template.bind(params)  # bad parameters fail before any connection is made
    with open_db(settings) as db:
        frame = template_frame(db, name, params, timeout)
    echo_frame(frame, fmt)


@click.command()
@click.argument("statement")
@click.option("-p", "--param", "pairs", multiple=True, help="A parameter, key=value (passed as a string).")
@click.option("--write", is_flag=True, help="Run in a write transaction (default: read-only).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@connection_options
def cypher(statement, pairs, write, fmt, settings):
    """Run raw Cypher; read-only unless --write."""
    import pandas as pd

    from flowdb.errors import DatabaseError, QueryError, ReadOnlyRefused
    from flowdb.store import guard

    params = parse_params(pairs)
    with open_db(settings) as db:
        try:
            frame = pd.DataFrame(db.write(statement, **params)) if write else guard.read_frame(db, statement, params)
        except ReadOnlyRefused as exc:
            raise QueryError(f"{exc} (flowdb cypher reads by default; use --write to run it)") from None
        except DatabaseError as exc:
            hint = " (use --write to change the graph)" if not write and "write" in str(exc).lower() else ""
            raise QueryError(f"{exc}{hint}") from None
    echo_frame(frame, fmt)


COMMANDS = (packs, delete, export, query, cypher)
