"""flowdb's command line: thin commands that gather options and call the library.

Heavy imports (numpy, faiss, neo4j, torch) happen inside commands, so
`flowdb --help` is instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import click

from flowdb.errors import FlowdbError
from flowdb.store.graph import ensure_schema


class FlowdbGroup(click.Group):
    """The one place where errors meet the user: one line on stderr, never a traceback.

    flowdb's own errors exit 1; an interrupt exits 130; a closed output pipe exits 141
    quietly; anything unforeseen is named
    in one line too (FLOWDB_DEBUG=1 shows its traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except FlowdbError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted; a stopped ingest resumes where it ended when run again", 130)
        except BrokenPipeError:
            # The reader went away (`flowdb ... | head`): stop quietly, as Unix tools do, and
            # point stdout at /dev/null so the interpreter's last flush has nowhere to fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except MemoryError:
            _fail("out of memory", 1)
        except Exception as exc:
            if os.environ.get("FLOWDB_DEBUG"):
                raise
            message = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"unexpected {type(exc).__name__}: {message} (FLOWDB_DEBUG=1 shows the traceback)", 1)


def _fail(message: str, status: int):
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def connection_options(command):
    """--uri/--user/--password/--database, else NEO4J_* variables, else the managed server."""

    @click.option("--uri", help="Bolt URI (default: $NEO4J_URI, else flowdb's managed local Neo4j).")
    @click.option("--user", "username", help="User name (default: $NEO4J_USERNAME or neo4j).")
    @click.option("--password", help="Password (default: $NEO4J_PASSWORD).")
    @click.option("--database", help="Database name (default: $NEO4J_DATABASE or the server's default).")
    @functools.wraps(command)
    def wrapper(*args, uri, username, password, database, **kwargs):
        from flowdb.settings import Neo4jSettings

        settings = Neo4jSettings.resolve(uri, username, password, database)
        return command(*args, settings=settings, **kwargs)

    return wrapper


def _connect(settings):
    from flowdb.store.connection import connect

    return connect(settings)


@click.group(cls=FlowdbGroup)
@click.version_option(package_name="flowdb")
def cli():
    """Feature-flow graphs of SAE packs in Neo4j (Laptev et al., ICML 2025)."""
    from flowdb.settings import check_environment

    check_environment()  # a bad FLOWDB_* variable fails before any work, not after an hour's


@cli.group()
def neo4j():
    """flowdb's managed local Neo4j 5.26 (fetched through Maven; no Docker needed)."""


@neo4j.command("start")
def neo4j_start():
    """Fetch Neo4j on first use, start it, and wait until Bolt answers."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    server.start()  # refuses unless the default database takes queries
    click.echo(f"running: Neo4j answers on {server.uri}, its default database online (home {server.root})")


@neo4j.command("stop")
def neo4j_stop():
    """Stop the managed Neo4j."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    click.echo("stopped" if server.stop() else "not running")


@neo4j.command("status")
def neo4j_status():
    """Exit 0 only when the managed Neo4j answers on Bolt and its default database is online."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    if not server.answers():
        click.echo(f"not answering on {server.uri} ({server.logs})")
        sys.exit(1)
    server.require_online()  # else one line: what is wrong, and where the logs are
    click.echo(f"running: {server.uri}, default database online (pid {server.pid()}, home {server.root})")


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--d-model", default=256, show_default=True, type=click.IntRange(64, 8192))
@click.option("--width", default=512, show_default=True, type=click.IntRange(8, 1 << 20))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--name", default="planted", show_default=True, help="Pack name in the manifest.")
@click.option("--companions", is_flag=True,
              help="Also write residual-only companion packs with planted splits (OUT_DIR/split) "
                   "and base/instruct drift (OUT_DIR/drift), for `flowdb link`.")
def synth(out_dir, layers, d_model, width, seed, name, companions):
    """Write a planted SAE pack with known lineage (sae-lens format) to OUT_DIR."""
    from pathlib import Path

    import pandas as pd

    from flowdb.packs.synth import COMPANION_NEW, SynthSpec, synthesize

    truth = synthesize(out_dir, SynthSpec(name=name, layers=layers, d_model=d_model,
                                          width=width, seed=seed, companions=companions))
    counts = truth["category"].value_counts().to_dict()
    click.echo(f"wrote {out_dir}/manifest.toml and truth.csv: {layers} layers x "
               f"{width} features, planted {counts}")
    for kind in COMPANION_NEW if companions else ():
        companion = pd.read_csv(Path(out_dir) / kind / "truth.csv")
        shares = {side: rows["category"].value_counts().to_dict() for side, rows in companion.groupby("side")}
        click.echo(f"wrote {out_dir}/{kind}/manifest.toml and truth.csv ({name}-{kind}): "
                   f"planted {shares['a']} of {name}'s features, {shares['b']} of its own")


def build_options(command):
    """What a build is made of beyond the manifest: k, thresholds, and where to search."""
    @click.option("--k", type=click.IntRange(1, 10),
                  help="Top-k predecessors per module (default: the manifest's, else 1).")
    @click.option("--t-res", type=float, help="Residual threshold (overrides [classify]).")
    @click.option("--t-mlp", type=float, help="MLP threshold (overrides [classify]).")
    @click.option("--t-att", type=float, help="Attention threshold (overrides [classify]).")
    @click.option("--threshold-rule", type=click.Choice(["auto", "fixed", "chance", "quantile"]),
                  help="Per-layer threshold rule (default: the manifest's, else auto).")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="Where to search: auto takes a CUDA GPU when one is visible.")
    @functools.wraps(command)
    def wrapper(*args, manifest, k, t_res, t_mlp, t_att, threshold_rule, **kwargs):
        from flowdb.packs.manifest import load_manifest

        parsed = load_manifest(manifest, k=k)
        overrides = {key: value for key, value in (("t_res", t_res), ("t_mlp", t_mlp), ("t_att", t_att),
                                                   ("rule", threshold_rule)) if value is not None}
        if overrides:
            parsed = _with_thresholds(parsed, overrides)
        return command(*args, manifest=parsed, **kwargs)

    return wrapper


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@build_options
@click.option("--replace", is_flag=True, help="Swap a stored build that has other parameters for this one.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@connection_options
def ingest(manifest, device, replace, progress, settings):
    """Match, classify and write the pack described by MANIFEST into Neo4j (match + load)."""
    from flowdb.flow.matching import Matcher
    from flowdb.store.ingest import ingest as run_ingest

    matcher = Matcher.for_device(device)
    with _connect(settings) as db:
        report = run_ingest(manifest, db, replace=replace, show_progress=progress, matcher=matcher)
    _echo_stored(report)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The atlas directory.")
@build_options
@click.option("--ray", "ray_address", help="Search each layer as a Ray task on this cluster (ADDRESS or auto).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
def match(manifest, out, device, ray_address, progress):
    """Match and classify the pack of MANIFEST into a Parquet flow atlas in OUT (no Neo4j needed)."""
    import time

    from flowdb.flow.atlas import match as run_match
    from flowdb.packs.plan import layer_ranges, make_plan
    from flowdb.progress import layer_bar

    plan = make_plan(manifest)
    started = time.perf_counter()
    atlas = run_match(plan, out, device=device, ray_address=ray_address,
                      progress=layer_bar(len(plan.layers), f"matching {plan.name}", progress))
    rate = atlas.search_rate()
    click.echo(f"{plan.name}: atlas of build {atlas.fingerprint} in {atlas.root}; layers "
               f"{layer_ranges(atlas.layers_done())}, {atlas.n_edges()} edges, matched by {atlas.matchers()}"
               + (f" at {rate:,.1f} GFLOP/s" if rate else "")
               + f" ({time.perf_counter() - started:.1f}s this run; flowdb doctor compares it with this CPU's GEMM)")
    click.echo(f"read it with pandas.read_parquet('{atlas.root}/edges'); load it with flowdb load {atlas.root}")


@cli.command()
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Time numpy's GEMM and a search on each CPU backend (about a second each).")
def doctor(measure):
    """Which BLAS each matching library loaded, and each CPU backend's search rate as a
    share of this CPU's fp32 GEMM rate: a BLAS that does not know the CPU shows here."""
    import os
    import platform

    import numpy as np

    from flowdb._version import __version__
    from flowdb.flow import doctor as checks
    from flowdb.flow.matching import CPU_DEFAULT, choose_backend

    backends = checks.cpu_backends()
    click.echo(f"flowdb {__version__}, Python {platform.python_version()}, numpy {np.__version__}; "
               f"CPU: {checks.cpu_model()}, {os.cpu_count()} cores; --device auto searches with "
               f"{choose_backend('auto')}")
    for lib in checks.blas_libraries(backends):
        click.echo(f"loaded by {lib.package}: {lib.describe()}")
    if not measure:
        return
    gemm = checks.gemm_rate()
    shape = f"{checks.QUERIES:,} x {checks.BASE:,}, d {checks.D_MODEL}"
    click.echo(f"fp32 GEMM, numpy ({shape}): {gemm:,.0f} GFLOP/s")
    for backend in backends:
        rate = checks.BackendRate(backend, gflops := checks.search_rate(backend), gflops / gemm)
        role = " (the CPU default)" if backend == CPU_DEFAULT else ""
        verdict = (f"; slow: under {checks.SLOW_SHARE:.0%}, its BLAS above may not know this CPU"
                   if rate.slow else "")
        click.echo(f"matching {backend}{role}: top-{checks.K} of {shape}: {rate.gflops:,.0f} GFLOP/s = "
                   f"{rate.share:.0%} of the GEMM rate{verdict}")


@cli.command()
@click.argument("atlases", nargs=-1, type=click.Path(file_okay=False))
@click.option("--replace", is_flag=True, help="Swap a stored build that has other parameters for this one.")
@click.option("--bulk", is_flag=True, help="Build a new, empty database with neo4j-admin's importer.")
@click.option("--import-dir", type=click.Path(file_okay=False),
              help="With --bulk and a server of your own: write the import files here and print the command.")
@click.option("--finish-import", "finish_dir", type=click.Path(file_okay=False),
              help="After you ran that command and started the server: constraints, Pack and SAE nodes.")
@click.option("--link", "link_atlases", multiple=True, type=click.Path(file_okay=False),
              help="With --bulk: a link atlas of two of these packs' builds, imported as its link set (repeatable).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@connection_options
def load(atlases, replace, bulk, import_dir, finish_dir, link_atlases, progress, settings):
    """Write one or more flow atlases (from flowdb match) into Neo4j: over Bolt, or
    with --bulk through neo4j-admin database import (into an empty database only)."""
    from flowdb.flow.atlas import Atlas

    if finish_dir:
        from flowdb.store.bulk import ImportFiles, finish_import

        with _connect(settings) as db:
            nodes, relationships = finish_import(db, ImportFiles.open(finish_dir))
        click.echo(f"constraints and indexes online; wrote {nodes} Pack, SAE and link set nodes, "
                   f"{relationships} relationships")
        return
    if not atlases:
        raise click.UsageError("give one or more atlas directories (from flowdb match)")
    opened = [Atlas.open(path) for path in atlases]
    for atlas in opened:
        atlas.require_complete()
    if bulk:
        from flowdb.flow.link_atlas import LinkAtlas

        _bulk_load(opened, [LinkAtlas(path) for path in link_atlases], import_dir, replace, progress, settings)
        return
    if import_dir:
        raise click.UsageError("--import-dir goes with --bulk")
    if link_atlases:
        raise click.UsageError("--link goes with --bulk; over Bolt, link stored packs with flowdb link A B")
    from flowdb.store.ingest import load as run_load

    with _connect(settings) as db:
        for atlas in opened:
            _echo_stored(run_load(atlas, db, replace=replace, show_progress=progress))


def _bulk_load(atlases, links, import_dir, replace, progress, settings) -> None:
    import shlex
    from pathlib import Path

    from flowdb.store.bulk import BulkPack, bulk_load, import_command, write_import_files

    if replace:
        raise click.UsageError("--bulk builds a new database; it replaces nothing (load without --bulk)")
    packs = [BulkPack.from_atlas(atlas) for atlas in atlases]
    if not settings.managed:
        if not import_dir:
            raise click.UsageError("--bulk into a server of your own: neo4j-admin must run where its store is; "
                                   "give --import-dir DIR to write the files and get the command")
        files = write_import_files(Path(import_dir), packs, links)
        click.echo(f"wrote {files.n_nodes:,} nodes and {files.n_relationships:,} relationships to {files.directory}")
        click.echo("stop the server, then on its machine run (--overwrite-destination only if that database is "
                   "empty or may go):")
        click.echo("  " + shlex.join(import_command(files, settings.database or "neo4j")))
        click.echo(f"start it, then run: flowdb load --finish-import {shlex.quote(str(files.directory))}")
        return
    from flowdb.store.server import ManagedServer

    say = (lambda line: click.echo(line, err=True)) if progress is not False else None
    report = bulk_load(ManagedServer.default(), packs, progress=say, links=links)
    linked = f" and link set{'s' * (len(report.links) > 1)} {', '.join(report.links)}" if report.links else ""
    click.echo(f"bulk-loaded {', '.join(report.packs)}{linked}: {report.nodes:,} nodes and {report.relationships:,} "
               f"relationships in {report.total_seconds:.1f}s (neo4j-admin {report.import_seconds:.1f}s): "
               f"{report.rate:,.0f} relationships/s")


def _echo_stored(report) -> None:
    from flowdb.packs.plan import layer_ranges

    if report.status == "unchanged":
        click.echo(f"{report.pack}: already stored with these parameters (build {report.fingerprint}); nothing to do")
        return
    click.echo(f"{report.pack}: {report.status} build {report.fingerprint}; "
               f"layers {layer_ranges(report.layers_written)}, {report.features} features, "
               f"{report.match_edges} match edges + {report.nowhere_marks} from-nowhere marks "
               f"(match {report.match_seconds:.1f}s, write {report.write_seconds:.1f}s, "
               f"{report.write_rate:,.0f} rel/s)")
    click.echo("categories: " + ", ".join(f"{k}={v}" for k, v in sorted(report.categories.items())))
    rules = sorted(set(report.layer_rules.values()))
    click.echo(f"thresholds: rule {report.threshold_rule} ({'; '.join(rules)}); "
               f"per layer: flowdb query thresholds -p pack={report.pack}")
    if report.chance_summary():
        click.echo(f"top-1 matches above chance (mean [min-max] over layers): {report.chance_summary()}")


def _with_thresholds(manifest, overrides):
    import dataclasses

    from flowdb.errors import ManifestError

    try:
        thresholds = dataclasses.replace(manifest.thresholds, **overrides)
    except ValueError as exc:
        raise ManifestError(f"threshold option: {exc}") from None
    return dataclasses.replace(manifest, thresholds=thresholds)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--name", help="The link set's name (default: A--B).")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1, 10), help="Matches in B per feature of A.")
@click.option("--threshold", "t", default=0.5, show_default=True, type=click.FloatRange(-1.0, 1.0),
              help="Cosine at which two features are the same or parts of one (the fixed cut-off).")
@click.option("--rule", type=click.Choice(["auto", "fixed", "chance"]), default="auto", show_default=True,
              help="auto: the larger of --threshold and chance p99.9 at each place's width and d_in.")
@click.option("--modules", default="res,mlp,att", show_default=True,
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
    from flowdb.flow.link_atlas import CATEGORY_RULE, LinkSpec, link_rate, shares_table
    from flowdb.flow.matching import Matcher
    from flowdb.store.links import link_packs

    spec = LinkSpec(k=k, t=t, rule=rule, modules=tuple(m.strip() for m in modules.split(",") if m.strip()))
    matcher = Matcher.for_device(device)
    with _connect(settings) as db:
        a, b = (_stored_pack_name(db, side, matcher, progress) for side in (a, b))
        report = link_packs(db, a, b, spec, name=name, replace=replace, matcher=matcher, show_progress=progress)
    if report.status == "unchanged":
        click.echo(f"{report.name}: already stored with these builds and parameters ({report.fingerprint}); "
                   "nothing to do")
    else:
        rate = link_rate(report.records)
        click.echo(f"{report.name}: {report.status} link set {report.fingerprint} of {a} and {b}; "
                   f"{len(report.places_written)} places, {report.relationships:,} ALIGNS relationships "
                   f"({report.seconds:.1f}s" + (f"; searched at {rate:,.1f} GFLOP/s" if rate else "") + ")")
        click.echo(f"atlas: {report.atlas} (pandas.read_parquet('{report.atlas}/matches'))")
    table = shares_table(report.records)
    click.echo("shares per layer and module (t: threshold, chance: p99.9 of a top-1 at that width and d_in):")
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"rule: {CATEGORY_RULE}")


@cli.command("links")
@connection_options
def links_command(settings):
    """List the link sets stored in the database (flowdb link)."""
    from flowdb.store import graph

    with _connect(settings) as db:
        rows = graph.list_links(db)
    if not rows:
        click.echo("(no link sets)")
    for row in rows:
        click.echo(f"{row['name']}\t{row['a']} -> {row['b']}\tk={row['k']}\tt={row['t']:g} ({row['rule']})\t"
                   f"{len(row['places'] or [])} places\t{row['status']}")


def _stored_pack_name(db, pack_or_manifest: str, matcher, progress) -> str:
    """A stored pack's name as given, or a manifest's pack, ingested first (unchanged if stored)."""
    from pathlib import Path

    if not pack_or_manifest.endswith(".toml") and not Path(pack_or_manifest).is_file():
        return pack_or_manifest
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest as run_ingest

    report = run_ingest(load_manifest(pack_or_manifest), db, show_progress=progress, matcher=matcher)
    if report.status != "unchanged":
        _echo_stored(report)
    return report.pack


@cli.command()
@click.argument("pack")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="A .csv or .parquet file.")
@connection_options
def export(pack, out, settings):
    """Write every stored match edge of PACK to a CSV or Parquet file."""
    from flowdb.store.export import export_edges

    with _connect(settings) as db, _notes_said_once():
        edges = export_edges(db, pack, out)
    _echo_notes(edges)
    click.echo(f"wrote {len(edges)} edges of {pack} to {out}")


@cli.command()
@connection_options
def packs(settings):
    """List the packs stored in the database."""
    from flowdb.store import graph

    with _connect(settings) as db:
        rows = graph.list_packs(db)
    if not rows:
        click.echo("(no packs)")
    for row in rows:
        note = f"\treplacement {row['replacing_with']} in progress" if row["replacing_with"] else ""
        click.echo(f"{row['name']}\t{row['model']}\tlayers {row['first']}-{row['last']}\t"
                   f"k={row['k']}\tthresholds {row['rule']}\t{row['status']}\tbuild {row['build']}{note}")


@cli.command()
@click.argument("pack")
@click.option("--yes", is_flag=True, help="Really delete: there is no undo.")
@connection_options
def delete(pack, yes, settings):
    """Delete PACK from the database: its features, edges, SAE and Pack nodes, and labels no
    other pack uses (its atlas under FLOWDB_HOME/atlas stays, for a later ingest)."""
    from flowdb.errors import FlowdbError
    from flowdb.store import graph
    from flowdb.store.ingest import delete_pack

    with _connect(settings) as db:
        graph.require_pack(db, pack)
        if not yes:
            raise FlowdbError(f"this deletes pack {pack!r} ({graph.count_features(db, pack):,} features) from "
                              f"{db.where} for good; run again with --yes to do it")
        features = delete_pack(db, pack)
    click.echo(f"deleted pack {pack!r}: {features:,} features and their edges")


def _parse_params(pairs):
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="-p")
        key, value = pair.split("=", 1)
        params[key.strip()] = value
    return params


@cli.command()
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
            click.echo(f"{template.name:14} {template.answers}")
        return
    if not name:
        raise click.UsageError("give a template NAME, or --list")
    template = get_template(name)
    if explain:
        click.echo(template.cypher.rstrip())
        return
    params = _parse_params(pairs)
    template.bind(params)  # bad parameters fail before any connection is made
    with _connect(settings) as db:
        frame = _template(db, name, params, timeout)
    _echo_frame(frame, fmt)


def _template(db, name, params, timeout_s=None):
    """Run a query template; its notes (incomplete pack, thresholds applied) go to stderr."""
    from flowdb.store.templates import run_template

    with _notes_said_once():
        frame = run_template(db, name, params, timeout_s=timeout_s)
    _echo_notes(frame)
    return frame


@contextlib.contextmanager
def _notes_said_once():
    """flowdb's warnings are said by _echo_notes in one line, not again by Python."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _echo_notes(frame) -> None:
    for label, key in (("Warning", "warning"), ("Thresholds", "thresholds")):
        if frame.attrs.get(key):
            click.echo(f"{label}: {frame.attrs[key]}", err=True)


def _echo_frame(frame, fmt: str) -> None:
    from flowdb.store.templates import csv_text, records, table_text

    if fmt == "csv":
        click.echo(csv_text(frame), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(records(frame), indent=2, default=str, allow_nan=False))
    else:
        click.echo(table_text(frame) if len(frame) else "(no rows)")


@cli.command()
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

    params = _parse_params(pairs)
    with _connect(settings) as db:
        try:
            rows = db.write(statement, **params) if write else guard.read(db, statement, params)
        except ReadOnlyRefused as exc:
            raise QueryError(f"{exc} (flowdb cypher reads by default; use --write to run it)") from None
        except DatabaseError as exc:
            hint = " (use --write to change the graph)" if not write and "write" in str(exc).lower() else ""
            raise QueryError(f"{exc}{hint}") from None
    _echo_frame(pd.DataFrame(rows), fmt)


@cli.group("demo-pack")
def demo_pack():
    """SAEs for SmolLM2-135M, trained here on offline text (ingest/smollm2-135m-demo.toml)."""


@demo_pack.command("build")
@click.option("--budget", type=click.Choice(["tiny", "default", "large"]), default="default", show_default=True,
              help="tiny: tests (about a minute); default: about 20 minutes on 2 CPU cores; large: a CUDA GPU.")
@click.option("--name", help="Pack name (default: per budget; a built pack is never overwritten).")
@click.option("--layers", help="Contiguous layer range FIRST-LAST (default: per budget).")
@click.option("--architecture", type=click.Choice(["jumprelu", "topk"]), help="Default: jumprelu.")
@click.option("--width", type=click.IntRange(16), help="Features per SAE.")
@click.option("--l0", type=click.IntRange(1), help="Target L0 (JumpReLU) or k (TopK).")
@click.option("--tokens", type=click.IntRange(1000), help="Training tokens per hook point.")
@click.option("--samples", type=click.IntRange(1000), help="Training samples per SAE (steps x batch).")
@click.option("--texts", type=click.Choice(["mixed", "python-stdlib", "python-docs"]), help="Default: mixed.")
@click.option("--device", help="cpu, cuda, ... (default: per budget).")
@click.option("--seed", type=int)
@click.option("--progress/--no-progress", default=None)
def demo_pack_build(budget, name, layers, architecture, width, l0, tokens, samples, texts, device, seed, progress):
    """Train (or reuse) a demo pack and print each SAE's quality."""
    from flowdb.packs.demo_pack import budget_spec, build_demo_pack, pack_dir

    first = last = None
    if layers:
        first, _, last = layers.partition("-")
        last = last or first
        if not (first.isdigit() and last.isdigit()) or int(first) > int(last) or int(last) > 29:
            raise click.BadParameter("give a range FIRST-LAST within 0-29", param_hint="--layers")
        first, last = int(first), int(last)
    spec = budget_spec(budget, name=name, first_layer=first, last_layer=last, architecture=architecture,
                       width=width, l0=l0, train_tokens=tokens, samples=samples, texts=texts, device=device,
                       seed=seed)
    out, quality = build_demo_pack(spec, show_progress=progress)
    click.echo(quality.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    residual = quality[quality["module"] == "res"]
    click.echo(f"explained variance: mean {quality['explained_variance'].mean():.3f}, residual mean "
               f"{residual['explained_variance'].mean():.3f}, lowest {quality['explained_variance'].min():.3f}; "
               f"dead fraction at most {quality['dead_fraction'].max():.3f}")
    seconds = (out / "build_seconds.txt").read_text().strip() if (out / "build_seconds.txt").exists() else "?"
    click.echo(f"pack: {out} (built in {seconds} s)")
    click.echo(f"ingest it with: flowdb ingest {pack_dir(spec) / 'manifest.toml'}")


@cli.command()
@click.argument("pack")
@click.option("--texts", default="python-stdlib", show_default=True, help="Offline text source.")
@click.option("--samples", default=250, show_default=True, type=click.IntRange(1))
@click.option("--tokens-per-sample", default=5, show_default=True, type=click.IntRange(1, 127))
@click.option("--top-k", default="1,5", show_default=True, help="Comma-separated k values (at most the pack's k).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", type=click.Path(dir_okay=False), help="Also draw the per-layer shares (.png, .svg, .html).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def groups(pack, texts, samples, tokens_per_sample, top_k, seed, out, progress, settings):
    """Activation-based groups of PACK's residual features on real text (stored on the graph)."""
    from flowdb.analysis.groups import GROUPS, GroupsSpec, activation_groups

    try:
        ks = tuple(int(k) for k in top_k.split(","))
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,5", param_hint="--top-k") from None
    spec = GroupsSpec(texts=texts, samples=samples, tokens_per_sample=tokens_per_sample, top_k=ks, seed=seed)
    with _connect(settings) as db:
        try:
            table = activation_groups(db, pack, spec, progress=progress)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--top-k") from None
    for k, part in table.groupby("top_k"):
        click.echo(f"top-{k}: share of active residual features per group")
        wide = part.pivot(index="layer", columns="group", values="share")[list(GROUPS)]
        click.echo(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    if out:
        from flowdb.views.plots import plot_groups

        plot_groups(table, out, pack)
        click.echo(f"wrote {out}")


@cli.group()
def validate():
    """Causal checks of a pack's matches on its model."""


@validate.command("deactivation")
@click.argument("pack")
@click.option("--layers", help="Comma-separated target layers (default: two, at a third and two thirds of the pack).")
@click.option("--texts", type=click.Choice(["mixed", "python-stdlib", "python-docs"]), default="mixed",
              show_default=True)
@click.option("--samples", default=64, show_default=True, type=click.IntRange(1), help="Windows of 64 tokens.")
@click.option("--max-targets", default=200, show_default=True, type=click.IntRange(1),
              help="Active (token, target feature) pairs per layer.")
@click.option("--exhaustive/--no-exhaustive", default=True, show_default=True,
              help="Also run the exhaustive search (one replay per active feature of each place).")
@click.option("--ceiling", is_flag=True,
              help="Also run the same trials with R_{L-1} read by R_L's own SAE (a feature's top-1 is itself): "
                   "the figures a matcher could reach if consecutive dictionaries shared their features.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Also write the summary, with the pack's training tokens and quality (input of `validate curve`).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also draw the results (.png, .svg, .html).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def validate_deactivation(pack, layers, texts, samples, max_targets, exhaustive, ceiling, seed, csv_path, out,
                          progress, settings):
    """Table 1 of the paper: remove each matcher's predecessor at a token; does the target turn off?"""
    import time

    from flowdb.analysis.deactivation import (
        DeactivationSpec,
        deactivation_experiment,
        pack_facts,
        summarise,
        with_paper,
    )
    from flowdb.analysis.groups import GROUPS
    from flowdb.writes import atomic_write

    layer_list = None
    if layers:
        try:
            layer_list = tuple(int(x) for x in layers.split(","))
        except ValueError:
            raise click.BadParameter("comma-separated integers", param_hint="--layers") from None
    spec = DeactivationSpec(layers=layer_list, texts=texts, samples=samples, max_targets=max_targets,
                            exhaustive=exhaustive, ceiling=ceiling, seed=seed)
    timings: list = []
    started = time.perf_counter()
    with _connect(settings) as db:
        trials = deactivation_experiment(db, pack, spec, progress=progress, timings=timings)
        facts = pack_facts(db, pack)
    if trials.empty:
        raise click.ClickException("no eligible (target, active predecessor) pairs at these layers")
    everything, trials = trials, trials[trials["reading"] == "real"]
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    click.echo("per layer, place and matcher (95% bootstrap intervals):")
    click.echo(summarise(trials, ("layer", "place", "matcher")).to_string(index=False, float_format=fmt))
    overall = with_paper(summarise(trials, ("matcher",)))
    click.echo("all layers and places, beside the paper (Gemma 2 2B, Gemma Scope; Table 1):")
    click.echo(overall.to_string(index=False, float_format=fmt, na_rep="-"))
    click.echo("by activation group of the target (top-1):")
    named = trials[trials["matcher"] == "top-1"].assign(group=lambda t: t["group"].map(lambda code: GROUPS[code]))
    click.echo(summarise(named, ("group",)).to_string(index=False, float_format=fmt))
    removals = sum(t["removals"] for t in timings)
    seconds = sum(t["seconds"] for t in timings)
    if ceiling:
        overall = _echo_ceiling(everything, overall, fmt)
    click.echo(f"{removals} removals in {seconds:.1f} s ({removals / max(seconds, 1e-9):.0f} per second, batched); "
               f"{len(everything)} matcher trials; {time.perf_counter() - started:.0f} s in all")
    if csv_path:
        with atomic_write(csv_path) as partial:
            overall.assign(pack=pack, **facts).to_csv(partial, index=False)
        click.echo(f"wrote {csv_path}")
    if out:
        from flowdb.views.plots import plot_deactivation

        plot_deactivation(overall, out, pack)
        click.echo(f"wrote {out}")


def _echo_ceiling(trials, overall, fmt):
    """Print the ceiling control beside the real figures; return `overall` with its columns."""
    from flowdb.analysis.deactivation import with_ceiling

    shown = ["trials", "success_rate", "ceiling_success_rate", "ceiling_success_lo", "ceiling_success_hi",
             "fraction_of_ceiling", "activation_change", "ceiling_activation_change", "ceiling_change_lo",
             "ceiling_change_hi", "change_fraction_of_ceiling"]
    ceiling_rows = trials[trials["reading"] == "ceiling"]
    if ceiling_rows.empty:
        click.echo("ceiling: no trials (no residual SAE at L-1, or no active target)")
        return overall
    click.echo("ceiling control: R_{L-1} read by R_L's own SAE (its top-1 is the feature itself); "
               "M and A as they are. Place RES, per layer:")
    res = trials[trials["place"] == "RES"]
    click.echo(with_ceiling(res, ("layer", "matcher"))[["layer", "matcher", *shown]]
               .to_string(index=False, float_format=fmt, na_rep="-"))
    click.echo("ceiling, all layers, per place:")
    click.echo(with_ceiling(trials, ("place", "matcher"))[["place", "matcher", *shown]]
               .to_string(index=False, float_format=fmt, na_rep="-"))
    click.echo("ceiling, all layers and places (control: RES read by R_L's SAE, M and A unchanged):")
    whole = with_ceiling(trials, ("matcher",))
    click.echo(whole[["matcher", *shown]].to_string(index=False, float_format=fmt, na_rep="-"))
    added = [c for c in whole if c.startswith("ceiling_") or c.endswith("fraction_of_ceiling")]
    return overall.merge(whole[["matcher", *added]], on="matcher", how="left")


@validate.command("curve")
@click.argument("tables", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Picture (.png, .svg).")
def validate_curve(tables, out):
    """Success and activation change against training tokens and SAE quality, one point per
    `validate deactivation --csv` table (one per budget)."""
    import pandas as pd

    from flowdb.files import regular_file
    from flowdb.views.plots import plot_budget_curve

    table = pd.concat([pd.read_csv(regular_file(path, "table")) for path in tables], ignore_index=True)
    shown = table[table["matcher"].isin(["top-1", "random-active", "exhaustive"])]
    columns = ["pack", "train_tokens", "residual_ev", "residual_l0", "matcher", "trials", "success_rate",
               "success_lo", "success_hi", "activation_change"]
    click.echo(shown[[c for c in columns if c in shown]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    plot_budget_curve(table, out)
    click.echo(f"wrote {out}")


@validate.command("steering")
@click.argument("pack")
@click.option("--seeds", default="10", show_default=True,
              help="How many seed features to pick (clear themes, multi-layer flow graphs), or comma-separated keys.")
@click.option("--method", type=click.Choice(["activation", "deactivation"]), default="activation", show_default=True)
@click.option("--strengths", default="1,2,4,8,16", show_default=True,
              help="Comma-separated s (activation) or r (deactivation) values.")
@click.option("--generations", default=4, show_default=True, type=click.IntRange(1), help="Samples per grid point.")
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1, 256))
@click.option("--prompt", default="I think ", show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write every generation and score.")
@click.option("--out", type=click.Path(dir_okay=False), help="Plot score against strength per strategy (.png, .svg).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def validate_steering(pack, seeds, method, strengths, generations, max_new_tokens, prompt, csv_path, out, progress,
                      settings):
    """The paper's steering comparison: the initial feature against single-layer and cumulative
    flow-graph sets, over a strength grid, scored by an offline proxy judge."""
    from flowdb.analysis.steering import (
        GenerationSpec,
        Steerer,
        SteeringSpec,
        compare,
        compare_summary,
        compare_verdict,
    )
    from flowdb.analysis.top_contexts import pick_seeds
    from flowdb.writes import atomic_write

    try:
        grid_values = [float(x) for x in strengths.split(",")]
    except ValueError:
        raise click.BadParameter("comma-separated numbers", param_hint="--strengths") from None
    with _connect(settings) as db:
        if seeds.isdigit():
            chosen = pick_seeds(db, pack, int(seeds))
        else:
            from flowdb.analysis.top_contexts import theme
            from flowdb.store.features import resolve_feature
            from flowdb.store.graph import feature_label

            keys = [resolve_feature(db, key.strip()) for key in seeds.split(",")]
            chosen = [(key, theme(feature_label(db, key) or "")) for key in keys]
            if any(not t for _, t in chosen):
                raise click.UsageError("every seed needs a label to take its theme from")
        click.echo(f"{len(chosen)} seeds: " + "; ".join(f"{key} ({t})" for key, t in chosen))
        steerer = Steerer(db, pack)
        base = SteeringSpec(seed_feature=chosen[0][0], method=method)
        generation = GenerationSpec(prompt=prompt, max_new_tokens=max_new_tokens)
        table = compare(steerer, chosen, base, generation, grid_values, generations, progress=progress)
    summary = compare_summary(table)
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    click.echo("proxy score (behaviour x coherence; a proxy for the paper's LLM judge), 95% bootstrap intervals:")
    click.echo(summary.to_string(index=False, float_format=fmt))
    click.echo("best score at mean coherence >= 0.5, and grid points within half of each strategy's peak:")
    click.echo(compare_verdict(summary).to_string(index=False, float_format=fmt))
    if csv_path:
        with atomic_write(csv_path) as partial:
            table.to_csv(partial, index=False)
        click.echo(f"wrote {csv_path}")
    if out:
        from flowdb.views.plots import plot_steering_comparison

        plot_steering_comparison(summary, out, f"{pack}: {method} steering, {len(chosen)} seeds x {generations} "
                                               "generations (proxy judge)")
        click.echo(f"wrote {out}")


@cli.command()
@click.argument("pack")
@click.option("--seed-feature", required=True, help="PACK/LAYER/MODULE/INDEX of the feature to steer with.")
@click.option("--strategy", type=click.Choice(["initial", "single-layer", "cumulative"]), default="cumulative",
              show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "linear", "exponential"]), default="exponential",
              show_default=True)
@click.option("--method", type=click.Choice(["activation", "deactivation"]), default="activation", show_default=True)
@click.option("--s", "strength", default=3.0, show_default=True, type=float, help="Strength (activation steering).")
@click.option("--alpha", default=0.25, show_default=True, type=float, help="Exponential decay rate per layer.")
@click.option("--s-end", default=1.0, show_default=True, type=float, help="Linear schedule's final strength.")
@click.option("--r", default=0.0, show_default=True, type=float, help="Rescale factor (deactivation steering).")
@click.option("--layer", type=int, help="Layer l of single-layer/cumulative (default: the seed's).")
@click.option("--prompt", default="I think that the biggest problem of contemporary theoretical physics is ",
              show_default=True)
@click.option("--max-new-tokens", default=36, show_default=True, type=click.IntRange(1, 1024))
@click.option("--top-p", default=0.7, show_default=True, type=click.FloatRange(0, 1))
@click.option("--temperature", default=1.27, show_default=True, type=click.FloatRange(0.01))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--theme", help="Theme text for the proxy score (default: the seed feature's label, if any).")
@click.option("--grid", "grid_strengths", help="Comma-separated strengths: score every strategy at each.")
@click.option("--out", type=click.Path(dir_okay=False), help="With --grid: plot score against strength.")
@connection_options
def steer(pack, seed_feature, strategy, schedule, method, strength, alpha, s_end, r, layer, prompt,
          max_new_tokens, top_p, temperature, seed, theme, grid_strengths, out, settings):
    """Generate with and without steering by the flow graph of a seed feature."""
    import textwrap

    from flowdb.analysis.steering import GenerationSpec, ProxyJudge, Steerer, SteeringSpec, grid

    spec = SteeringSpec(seed_feature=seed_feature, strategy=strategy, schedule=schedule, method=method,
                        s=strength, alpha=alpha, s_end=s_end, r=r, layer=layer)
    generation = GenerationSpec(prompt=prompt, max_new_tokens=max_new_tokens, top_p=top_p,
                                temperature=temperature, seed=seed)
    with _connect(settings) as db:
        from dataclasses import replace

        from flowdb.store.features import resolve_feature

        seed_feature = resolve_feature(db, seed_feature)
        spec = replace(spec, seed_feature=seed_feature)
        steerer = Steerer(db, pack)
        if theme is None:
            from flowdb.store.graph import feature_label

            theme = feature_label(db, seed_feature)
        if grid_strengths:
            if not theme:
                raise click.UsageError("--grid needs --theme (the seed feature has no label)")
            strengths = [float(x) for x in grid_strengths.split(",")]
            table = grid(steerer, spec, generation, theme, strengths)
            click.echo(table.drop(columns="text").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
            if out:
                from flowdb.views.plots import plot_steering_grid

                plot_steering_grid(table, out, f"{seed_feature}: proxy score vs strength ({schedule})")
                click.echo(f"wrote {out}")
            return
        result = steerer.steer(spec, generation)
    click.echo(f"steering with {len(result['features'])} feature(s) on layers "
               f"{sorted(set(result['features']['layer']))} ({strategy}, {schedule}, {method})")
    left, right = textwrap.wrap(result["default"], 44), textwrap.wrap(result["steered"], 44)
    click.echo(f"{'default':44} | steered")
    for i in range(max(len(left), len(right))):
        click.echo(f"{left[i] if i < len(left) else '':44} | {right[i] if i < len(right) else ''}")
    if theme:
        judge = ProxyJudge(steerer)
        reference = judge.perplexity(prompt, result["default"])
        for name in ("default", "steered"):
            scores = judge.score(prompt, result[name], theme, reference)
            click.echo(f"proxy score {name}: behaviour {scores['behaviour']:.3f} x coherence "
                       f"{scores['coherence']:.3f} = {scores['score']:.3f} (perplexity {scores['perplexity']:.1f})")


@cli.group()
def labels():
    """Neuronpedia labels: import public exports, or fetch from the API."""


@labels.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--pack", help="Only join to this pack (default: every pack whose model and source match).")
@connection_options
def labels_import(path, pack, settings):
    """Join a Neuronpedia explanations export (directory or .jsonl/.jsonl.gz/.json) onto features."""
    from flowdb.store.labels import import_labels

    with _connect(settings) as db:
        ensure_schema(db)
        report = import_labels(db, path, pack)
    click.echo(report.summary())


@labels.command("contexts")
@click.argument("pack")
@click.option("--texts", type=click.Choice(["mixed", "python-stdlib", "python-docs"]), default="mixed",
              show_default=True)
@click.option("--windows", default=192, show_default=True, type=click.IntRange(1), help="Windows of 64 tokens.")
@click.option("--top", default=12, show_default=True, type=click.IntRange(1), help="Contexts kept per feature.")
@click.option("--progress/--no-progress", default=None)
@connection_options
def labels_contexts(pack, texts, windows, top, progress, settings):
    """Label every feature of PACK offline by its top-activating contexts (typeName "top-contexts")."""
    from flowdb.analysis.top_contexts import ContextsSpec, label_with_contexts

    with _connect(settings) as db:
        report = label_with_contexts(db, pack, ContextsSpec(texts=texts, windows=windows, top=top),
                                     progress=progress)
    click.echo(f"{report.explanations} top-contexts explanations over {report.saes} SAEs of {pack}; "
               f"{report.silent} features never fired on the {windows} windows")


@labels.command("fetch")
@click.argument("pack")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="At most this many features.")
@click.option("--module", type=click.Choice(["res", "mlp", "att"]), help="Only this module.")
@click.option("--rate", default=2.0, show_default=True, type=click.FloatRange(0.01, 50), help="Requests per second.")
@click.option("--api-url", help="API base (default: $NEURONPEDIA_API_URL or Neuronpedia's).")
@click.option("--deadline", default=30.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds one request may take in all, however slowly its answer arrives.")
@click.option("--retries", default=4, show_default=True, type=click.IntRange(0, 20),
              help="Retries of a 429 or 5xx answer (Retry-After honoured).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def labels_fetch(pack, limit, module, rate, api_url, deadline, retries, progress, settings):
    """Fill missing labels of PACK from the Neuronpedia API (key: $NEURONPEDIA_API_KEY); resumable."""
    from flowdb.store.labels import fetch_labels

    with _connect(settings) as db:
        ensure_schema(db)
        report = fetch_labels(db, pack, limit=limit, module=module, api_url=api_url,
                              requests_per_second=rate, progress=progress,
                              request_deadline_s=deadline, retries=retries)
    click.echo(report.summary())


def flow_graph_options(command):
    """The cut-offs of a flow graph: the build's own unless given."""

    @click.option("--t-res", type=float, help="Residual chain cut-off (default: the thresholds stored with the build).")
    @click.option("--t-mod", type=float, help="MLP/attention cut-off (default: the thresholds stored with the build).")
    @click.option("--every-edge", is_flag=True, help="Follow every stored edge, whatever its cosine.")
    @click.option("--max-rank", default=1, show_default=True, type=click.IntRange(1, 10))
    @functools.wraps(command)
    def wrapper(*args, t_res, t_mod, every_edge, max_rank, **kwargs):
        params = {"t_res": t_res, "t_mod": t_mod, "every_edge": every_edge, "max_rank": max_rank}
        return command(*args, params=params, **kwargs)

    return wrapper


@cli.command("export-graph")
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
    with _connect(settings) as db:
        feature = resolve_feature(db, feature)
        model = stored.require_pack(db, feature.split("/", 1)[0]).model
        graph = _template(db, "flow-graph", {"feature": feature, **params})
    settings_used = {**params, "thresholds": graph.attrs.get("thresholds")}
    document = flow_graph_json(graph, model, slug=slug, settings=settings_used, created_ms=int(time.time() * 1000))
    write_graph_json(document, out)
    click.echo(f"wrote {out}: {len(document['nodes'])} nodes, {len(document['links'])} links "
               f"(scan {model}, slug {document['metadata']['slug']})")


@cli.command()
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
        db = _connect(settings)
        if feature:
            from flowdb.store.features import resolve_feature

            try:
                resolve_feature(db, feature)
            except BaseException:
                db.close()
                raise
        return db

    run(connect, host=host, port=port, feature=feature, open_browser=open_browser,
        allow_hosts=tuple(allow_hosts), echo=click.echo)


@cli.group()
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

    with _connect(settings) as db:
        feature = resolve_feature(db, feature)
        graph = _template(db, "flow-graph", {"feature": feature, **params})
        graph = mark_flow_frame(db, feature.split("/", 1)[0], graph)
    import textwrap

    title = f"flow graph of {feature}: {graph.attrs.get('thresholds')}, max_rank {params['max_rank']}"
    plot_flow(graph, out, "\n".join(textwrap.wrap(title, 64)))  # narrow graphs must not cut the title
    click.echo(f"wrote {out}")


@plot.command("origins")
@click.argument("pack")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@connection_options
def plot_origins_command(pack, out, settings):
    """Draw the per-layer shares of translated/processed/newborn/from-nowhere features."""
    from flowdb.views.plots import plot_origins

    with _connect(settings) as db:
        origins = _template(db, "origins", {"pack": pack})
    plot_origins(origins, out, pack)
    click.echo(f"wrote {out}")


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
    with _connect(settings) as db:
        feature = resolve_feature(db, feature)
        nodes, edges = family_tree(db, feature, limit)
    plot_family(nodes, edges, out, f"family of {feature} across linked packs (relatives at or above threshold)")
    click.echo(f"wrote {out}: {len(nodes)} features, {len(edges)} links")


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

    with _connect(settings) as db:
        note = check_link(db, link)
        places = pd.DataFrame(graph_link_records(db, link))
    if note:
        click.echo(f"Warning: {note}", err=True)
    plot_link(places, out, link, module)
    click.echo(f"wrote {out}")

