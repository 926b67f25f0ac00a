"""Feature families across packs: flowdb link and flowdb links."""

from __future__ import annotations

import click

from flowdb.cli._common import connection_options, echo, echo_stored, open_db, resumes
from flowdb.flow.link_spec import LINK_RULES, LinkSpec


@resumes("link")
@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--name", help="The link set's name (default: A--B).")
@click.option("--k", default=LinkSpec.k, show_default=True, type=click.IntRange(1, 10),
              help="Matches in B per feature of A.")
@click.option("--threshold", "t", default=LinkSpec.t, show_default=True, type=click.FloatRange(-1.0, 1.0),
              help="Cosine at which two features are the same or parts of one (the fixed cut-off).")
@click.option("--rule", type=click.Choice(LINK_RULES), default=LinkSpec.rule, show_default=True,
              help="auto: the larger of --threshold and chance p99.9 at each place's width and d_in.")
@click.option("--modules", default=",".join(LinkSpec.modules), show_default=True,
              help="Comma-separated modules to link where both packs have them.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--replace", is_flag=True, help="Link again over a stored link set of other builds or parameters.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@connection_options
def link(a, b, name, k, t, rule, modules, device, replace, progress, settings):
    """Feature families across two packs A and B that read the same space: each feature of A
    with its top-k in B, each of B with its top-1 in A, stored as ALIGNS relationships, and
    every feature categorised (A: kept, split, shifted, gone; B: kept, merged, shifted, new).
    A and B are stored pack names or manifests (ingested first, as flowdb ingest would)."""
    from flowdb.flow.link_atlas import CATEGORY_RULE, link_rate, shares_table
    from flowdb.flow.matching import Matcher
    from flowdb.store.ingest import stored_pack
    from flowdb.store.links import link_packs

    spec = LinkSpec(k=k, t=t, rule=rule, modules=tuple(m.strip() for m in modules.split(",") if m.strip()))
    matcher = None if device == "auto" else Matcher.for_device(device)  # auto: each build by its size
    with open_db(settings) as db:
        names = []
        for side in (a, b):
            name_of_side, built = stored_pack(db, side, matcher, show_progress=progress)
            if built is not None and built.status != "unchanged":
                echo_stored(built)
            names.append(name_of_side)
        a, b = names
        report = link_packs(db, a, b, spec, name=name, replace=replace, matcher=matcher, show_progress=progress)
    if report.status == "unchanged":
        echo(f"{report.name}: already stored with these builds and parameters ({report.fingerprint}); "
             "nothing to do")
    else:
        rate = link_rate(report.records)
        echo(f"{report.name}: {report.status} link set {report.fingerprint} of {a} and {b}; "
             f"{len(report.places_written)} places, {report.relationships:,} ALIGNS relationships "
             f"({report.seconds:.1f}s" + (f"; searched at {rate:,.1f} GFLOP/s" if rate else "") + ")")
        echo(f"atlas: {report.atlas} (pandas.read_parquet('{report.atlas}/matches'))")
    table = shares_table(report.records)
    echo("shares per layer and module (t: threshold, chance: p99.9 of a top-1 at that width and d_in):")
    echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    echo(f"rule: {CATEGORY_RULE}")


@click.command("links")
@connection_options
def links_command(settings):
    """List the link sets stored in the database (flowdb link)."""
    from flowdb.store import graph

    with open_db(settings) as db:
        rows = graph.list_links(db)
    if not rows:
        echo("(no link sets)")
    for row in rows:
        echo(f"{row['name']}\t{row['a']} -> {row['b']}\tk={row['k']}\tt={row['t']:g} ({row['rule']})\t"
             f"{len(row['places'] or [])} places\t{row['status']}")


COMMANDS = (link, links_command)
