"""Attribution graphs (circuit-tracer / Neuronpedia graph JSON): flowdb circuits import, list,
delete, export."""

from __future__ import annotations

import click

from flowdb.cli._common import FlowdbGroup, connection_options, echo, open_db


@click.group(cls=FlowdbGroup)
def circuits():
    """Attribution graphs (circuit-tracer 0.5.0 / Neuronpedia graph JSON) stored beside the packs,
    so questions across prompts are one query each (flowdb query recurring-features, graphs-with,
    recurring-edges, strongest-paths)."""


@circuits.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--replace", is_flag=True, help="Replace a graph stored under the same slug from other content.")
@click.option("--pack", help="Tie each transcoder feature node to this stored pack's feature at its "
              "(layer, index): (:GraphNode)-[:IS]->(:Feature). Without it, a graph is tied to the one "
              "stored pack whose mlp module is a transcoder set of the graph's metadata.scan, if exactly "
              "one is.")
@click.option("--module", default="mlp", show_default=True, type=click.Choice(["res", "mlp", "att"]),
              help="With --pack: the module whose features the transcoder's indices name.")
@connection_options
def import_command(paths, replace, pack, module, settings):
    """Store attribution graphs: PATHS are graph JSON files, or directories of them as
    circuit-tracer's create_graph_files writes (--graph_file_dir; graph-metadata.json is
    skipped). Supported: circuit-tracer 0.5.0's graph JSON (metadata, qParams, nodes, links)
    with node feature_type 'cross layer transcoder', 'transcoder', 'mlp reconstruction
    error', 'embedding' or 'logit'; anything else (lorsa nodes, QK tracing, unknown keys)
    is refused in one line naming the file and the field. Every file is checked before
    anything is written, and no graph is ever written in part (small graphs share a
    transaction; a failed one is written again one graph each). The same content
    again changes nothing; other content under a stored slug needs --replace. Each
    line says which pack a graph's feature nodes were tied to, or why none."""
    from flowdb.circuits.store import import_graphs

    with open_db(settings) as db:
        reports = import_graphs(db, paths, replace=replace, pack=pack, module=module)
    for report in reports:
        if report.status == "unchanged":
            echo(f"{report.slug}: already stored from this content ({report.file}); nothing to do")
        else:
            if pack:
                ties = f", {report.ties:,} tied to {pack}"
            elif report.pack:
                ties = f", {report.ties:,} feature nodes tied to pack {report.pack} ({report.tie_note})"
            else:
                ties = f"; feature nodes not tied: {report.tie_note}"
            echo(f"{report.slug}: {report.status} from {report.file}: {report.nodes:,} nodes, "
                 f"{report.links:,} links{ties}")


@circuits.command("list")
@connection_options
def list_command(settings):
    """List the stored attribution graphs."""
    from flowdb.circuits.store import list_graphs

    with open_db(settings) as db:
        rows = list_graphs(db)
    if not rows:
        echo("(no attribution graphs)")
    for row in rows:
        tied = f"\tpack {row['pack']}" if row["pack"] else ""
        echo(f"{row['slug']}\t{row['scan']}\t{row['nodes']:,} nodes\t{row['links']:,} links\t"
             f"{row['prompt']!r}\tsha256 {row['digest'][:12]}{tied}")


@circuits.command("delete")
@click.argument("slug")
@click.option("--yes", is_flag=True, help="Really delete: there is no undo.")
@connection_options
def delete_command(slug, yes, settings):
    """Delete the attribution graph SLUG: its nodes and links (the packs stay)."""
    from flowdb.circuits.store import delete_graph, require_graph
    from flowdb.errors import FlowdbError

    with open_db(settings) as db:
        found = require_graph(db, slug)
        if not yes:
            raise FlowdbError(f"this deletes attribution graph {slug!r} ({found['nodes']:,} nodes, "
                              f"{found['links']:,} links) from {db.where} for good; run again with --yes to do it")
        nodes = delete_graph(db, slug)
    echo(f"deleted attribution graph {slug!r}: {nodes:,} nodes and their links")


@circuits.command("export")
@click.argument("slug")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The graph JSON file to write.")
@click.option("--supernodes", is_flag=True, help="Add flowdb's supernode suggestions to qParams.supernodes "
              "(same feature at several positions, flow lineage, families, co-activation across the stored "
              "graphs, label similarity, each against chance) and pin their members.")
@connection_options
def export_command(slug, out, supernodes, settings):
    """Write the attribution graph SLUG as graph JSON rebuilt from the store (metadata, qParams,
    nodes, links and weights as imported), which circuit-tracer's server and Neuronpedia open.
    With --supernodes, one line per rule says how many supernodes it grouped."""
    from flowdb.circuits.store import write_graph_json
    from flowdb.circuits.supernodes import write_with_supernodes

    with open_db(settings) as db:
        if supernodes:
            document, suggestions = write_with_supernodes(db, slug, out)
        else:
            document = write_graph_json(db, slug, out)
    if supernodes:
        for line in suggestions.summary_lines():
            echo(line)
    grouped = f", {len(document['qParams']['supernodes']):,} supernodes" if supernodes else ""
    echo(f"wrote {slug} to {out}: {len(document['nodes']):,} nodes, {len(document['links']):,} links{grouped}")


COMMANDS = (circuits,)
