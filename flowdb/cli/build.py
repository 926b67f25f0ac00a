"""Making packs and putting them in the store: synth, demo-pack, match, ingest, load."""

from __future__ import annotations

import click

from flowdb.cli._common import build_options, connection_options, echo, echo_stored, open_db, resumes
from flowdb.lm.texts import TEXT_SOURCES


@click.command()
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
    echo(f"wrote {out_dir}/manifest.toml and truth.csv: {layers} layers x "
         f"{width} features, planted {counts}")
    for kind in COMPANION_NEW if companions else ():
        companion = pd.read_csv(Path(out_dir) / kind / "truth.csv")
        shares = {side: rows["category"].value_counts().to_dict() for side, rows in companion.groupby("side")}
        echo(f"wrote {out_dir}/{kind}/manifest.toml and truth.csv ({name}-{kind}): "
             f"planted {shares['a']} of {name}'s features, {shares['b']} of its own")


@click.group("demo-pack")
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
@click.option("--texts", type=click.Choice(TEXT_SOURCES), help="Default: mixed.")
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
    echo(quality.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    residual = quality[quality["module"] == "res"]
    echo(f"explained variance: mean {quality['explained_variance'].mean():.3f}, residual mean "
         f"{residual['explained_variance'].mean():.3f}, lowest {quality['explained_variance'].min():.3f}; "
         f"dead fraction at most {quality['dead_fraction'].max():.3f}")
    seconds = (out / "build_seconds.txt").read_text().strip() if (out / "build_seconds.txt").exists() else "?"
    echo(f"pack: {out} (built in {seconds} s)")
    echo(f"ingest it with: flowdb ingest {pack_dir(spec) / 'manifest.toml'}")


@resumes("match")
@click.command()
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
    echo(f"{plan.name}: atlas of build {atlas.fingerprint} in {atlas.root}; layers "
         f"{layer_ranges(atlas.layers_done())}, {atlas.n_edges()} edges, matched by {atlas.matchers()}"
         + (f" at {rate:,.1f} GFLOP/s" if rate else "")
         + f" ({time.perf_counter() - started:.1f}s this run; flowdb doctor compares it with this CPU's GEMM)")
    echo(f"read it with pandas.read_parquet('{atlas.root}/edges'); load it with flowdb load {atlas.root}")


@resumes("ingest")
@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@build_options
@click.option("--replace", is_flag=True, help="Swap a stored build that has other parameters for this one.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@connection_options
def ingest(manifest, device, replace, progress, settings):
    """Match, classify and write the pack described by MANIFEST into Neo4j (match + load)."""
    from flowdb.flow.matching import Matcher
    from flowdb.store.ingest import ingest as run_ingest

    matcher = None if device == "auto" else Matcher.for_device(device)  # auto: each build by its size
    with open_db(settings) as db:
        report = run_ingest(manifest, db, replace=replace, show_progress=progress, matcher=matcher)
    echo_stored(report)


@resumes("load")
@click.command()
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

        with open_db(settings) as db:
            nodes, relationships = finish_import(db, ImportFiles.open(finish_dir))
        echo(f"constraints and indexes online; wrote {nodes} Pack, SAE and link set nodes, "
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

    with open_db(settings) as db:
        for atlas in opened:
            echo_stored(run_load(atlas, db, replace=replace, show_progress=progress))


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
        echo(f"wrote {files.n_nodes:,} nodes and {files.n_relationships:,} relationships to {files.directory}")
        echo("stop the server, then on its machine run (--overwrite-destination only if that database is "
             "empty or may go):")
        echo("  " + shlex.join(import_command(files, settings.database or "neo4j")))
        echo(f"start it, then run: flowdb load --finish-import {shlex.quote(str(files.directory))}")
        return
    from flowdb.store.server import ManagedServer

    say = (lambda line: echo(line, err=True)) if progress is not False else None
    report = bulk_load(ManagedServer.default(), packs, progress=say, links=links)
    linked = f" and link set{'s' * (len(report.links) > 1)} {', '.join(report.links)}" if report.links else ""
    echo(f"bulk-loaded {', '.join(report.packs)}{linked}: {report.nodes:,} nodes and {report.relationships:,} "
         f"relationships in {report.total_seconds:.1f}s (neo4j-admin {report.import_seconds:.1f}s): "
         f"{report.rate:,.0f} relationships/s")


COMMANDS = (synth, demo_pack, match, ingest, load)
