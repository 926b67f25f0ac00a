"""Looking at the graph: plot, export-graph and serve (the explorer)."""

from __future__ import annotations

import click

from flowdb.cli._common import connection_options, echo, flow_graph_options, on_interrupt, open_db, template_frame
from flowdb.explorer.serve import STOPPED


@click.command("export-graph")
@click.argument("feature")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="A .json file.")
@flow_graph_options
@click.option("--slug", help="The graph's Neuronpedia slug (default: flowdb-PACK-LAYER-MODULE-INDEX).")
@connection_options
def export_graph(feature, out, params, slug, settings):
    """Write the flow graph of FEATURE as Neuronpedia graph JSON (its graph viewer, circuit-tracer)."""
    import time

    from flowdb.store import graph as stored
    from flowdb.store.features import resolve_feature
    from flowdb.views.graph_json import flow_graph_json, json_target, write_graph_json

    json_target(out)  # a wrong suffix fails before any connection is made
    with open_db(settings) as db:
        feature = resolve_feature(db, feature)
        model = stored.require_pack(db, feature.split("/", 1)[0]).model
        graph = template_frame(db, "flow-graph", {"feature": feature, **params})
    settings_used = {**params, "thresholds": graph.attrs.get("thresholds")}
    document = flow_graph_json(graph, model, slug=slug, settings=settings_used, created_ms=int(time.time() * 1000))
    write_graph_json(document, out)
    echo(f"wrote {out}: {len(document['nodes'])} nodes, {len(document['links'])} links "
         f"(scan {model}, slug {document['metadata']['slug']})")


@on_interrupt(STOPPED, status=0)
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any other than loopback requires the printed token for every request.")
@click.option("--port", default=8047, show_default=True, type=click.IntRange(1, 65535))
@click.option("--feature", help="Open on this feature's page (a key, Neuronpedia URL or MODEL/SOURCE/INDEX).")
@click.option("--open", "open_browser", is_flag=True, help="Open the URL in the default browser.")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Another name the Host header may carry (a proxy's, say; '*.domain' and '*' too); "
                   "loopback names always may. With any, every request needs the printed token.")
@connection_options
def serve(host, port, feature, open_browser, allow_hosts, settings):
    """The flow explorer: find a feature, walk its flow graph, steer with it, in the browser."""
    from flowdb.explorer.serve import serve as run

    def connect():
        db = open_db(settings)
        if feature:
            from flowdb.store.features import resolve_feature

            try:
                resolve_feature(db, feature)
            except BaseException:
                db.close()
                raise
        return db

    run(connect, host=host, port=port, feature=feature, open_browser=open_browser,
        allow_hosts=tuple(allow_hosts), echo=echo)


@click.group()
def plot():
    """Pictures: a feature's flow graph, a pack's origins per layer, a feature's family across linked
    packs, a link set's categories per layer (.png, .svg, .html; family: .png, .svg)."""


@plot.command("flow")
@click.argument("feature")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@flow_graph_options
@connection_options
def plot_flow_command(feature, out, params, settings):
    """Draw the flow graph of FEATURE (a key, a Neuronpedia URL or MODEL/SOURCE/INDEX)."""
    from flowdb.explorer.data import mark_flow_frame
    from flowdb.store.features import resolve_feature
    from flowdb.views.plots import plot_flow

    with open_db(settings) as db:
        feature = resolve_feature(db, feature)
        graph = template_frame(db, "flow-graph", {"feature": feature, **params})
        graph = mark_flow_frame(db, feature.split("/", 1)[0], graph)
    import textwrap

    title = f"flow graph of {feature}: {graph.attrs.get('thresholds')}, max_rank {params['max_rank']}"
    plot_flow(graph, out, "\n".join(textwrap.wrap(title, 64)))  # narrow graphs must not cut the title
    echo(f"wrote {out}")


@plot.command("origins")
@click.argument("pack")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@connection_options
def plot_origins_command(pack, out, settings):
    """Draw the per-layer shares of translated/processed/newborn/from-nowhere features."""
    from flowdb.views.plots import plot_origins

    with open_db(settings) as db:
        origins = template_frame(db, "origins", {"pack": pack})
    plot_origins(origins, out, pack)
    echo(f"wrote {out}")


@plot.command("family")
@click.argument("feature")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="A .png or .svg file.")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(1, 40),
              help="At most this many relatives of each feature drawn.")
@connection_options
def plot_family_command(feature, out, limit, settings):
    """Draw FEATURE's family across linked packs (flowdb link): its relatives at or above each link's
    threshold, and theirs back, with cosines."""
    from flowdb.store.features import resolve_feature
    from flowdb.store.links import family_tree
    from flowdb.views.plots import STATIC, _target, plot_family

    _target(out, STATIC)  # a wrong suffix fails before any connection is made
    with open_db(settings) as db:
        feature = resolve_feature(db, feature)
        nodes, edges = family_tree(db, feature, limit)
    plot_family(nodes, edges, out, f"family of {feature} across linked packs (relatives at or above threshold)")
    echo(f"wrote {out}: {len(nodes)} features, {len(edges)} links")


@plot.command("link")
@click.argument("link")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--module", type=click.Choice(["res", "mlp", "att"]), default="res", show_default=True)
@connection_options
def plot_link_command(link, out, module, settings):
    """Draw the per-layer shares of each category in link set LINK (A: kept, split, shifted, gone;
    B: kept, merged, shifted, new)."""
    import pandas as pd

    from flowdb.store.links import graph_link_records
    from flowdb.store.templates import check_link
    from flowdb.views.plots import plot_link

    with open_db(settings) as db:
        note = check_link(db, link)
        places = pd.DataFrame(graph_link_records(db, link))
    if note:
        echo(f"Warning: {note}", err=True)
    plot_link(places, out, link, module)
    echo(f"wrote {out}")


COMMANDS = (export_graph, serve, plot)
