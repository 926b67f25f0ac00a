"""Lineage latency on a Gemma-2-2B-sized graph, against an in-memory baseline.

    .venv/bin/python benchmarks/bench_lineage.py [--layers 26 --width 16384 --samples 200]

Builds (once; later runs reuse it) a synthetic pack of 26 layers x 16,384
residual, MLP and attention features, top-1, into Neo4j (the configured one,
else flowdb's managed server). It then times the `lineage` template from
randomly chosen last-layer features: p50 and p99 latency through the Python
driver. In the same run it computes the same answers by a breadth-first walk
over Python dicts holding every edge, the baseline, and checks that both agree.
The PROFILE of one lineage query shows the plan: a unique-index seek on the
key, then the expansion.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def build(layers: int, width: int):
    from flowdb.database import connect
    from flowdb.ingest import ingest
    from flowdb.manifest import load_manifest
    from flowdb.settings import flowdb_home
    from flowdb.synth import SynthSpec, synthesize

    out = flowdb_home() / "bench" / f"gemma-size-{layers}x{width}"
    name = f"bench-lineage-{layers}x{width}"
    if not (out / "manifest.toml").exists():
        print(f"writing a synthetic pack to {out} ...", flush=True)
        synthesize(out, SynthSpec(name=name, layers=layers, d_model=256, width=width, seed=11))
    db = connect()
    report = ingest(load_manifest(out / "manifest.toml"), db, show_progress=True)
    if report.status != "unchanged":
        print(f"ingested {report.features:,} features and {report.relationships:,} relationships "
              f"in {report.write_seconds:.0f}s", flush=True)
    return db, name


def load_edges(db, pack):
    """Every edge into memory: dst key -> list of (pred key, kind, cosine, rank)."""
    from flowdb.queries import run_template

    edges = run_template(db, "edges", {"pack": pack})
    into: dict[str, list] = {}
    for row in edges.itertuples(index=False):
        dst = f"{pack}/{row.dst_layer}/res/{row.dst_index}"
        into.setdefault(dst, []).append((f"{pack}/{row.src_layer}/{row.src_module}/{row.src_index}",
                                         row.kind, row.cosine, row.rank))
    return into


def lineage_in_memory(into, key):
    rows, todo, seen = [], [key], {key}
    while todo:
        step = todo.pop()
        for pred, kind, _cosine, _rank in into.get(step, ()):
            rows.append((step, pred, kind))
            if kind == "residual" and pred not in seen:
                seen.add(pred)
                todo.append(pred)
    return set(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()

    from flowdb.queries import get_template, run_template

    db, pack = build(args.layers, args.width)
    last = args.layers - 1
    features = [f"{pack}/{last}/res/{i}" for i in random.Random(0).sample(range(args.width), args.samples)]
    run_template(db, "lineage", {"feature": features[0]})  # warm the plan cache

    neo4j_times, answers = [], {}
    for key in features:
        started = time.perf_counter()
        frame = run_template(db, "lineage", {"feature": key})
        neo4j_times.append(time.perf_counter() - started)
        answers[key] = set(zip(frame["step_key"], frame["pred_key"], frame["kind"]))

    started = time.perf_counter()
    into = load_edges(db, pack)
    load_seconds = time.perf_counter() - started
    memory_times = []
    for key in features:
        started = time.perf_counter()
        expected = lineage_in_memory(into, key)
        memory_times.append(time.perf_counter() - started)
        assert answers[key] == expected, f"lineage of {key} differs from the in-memory walk"

    rows = np.mean([len(a) for a in answers.values()])
    print(f"graph: {pack}, {args.layers} layers x {args.width} features x 3 modules, top-1")
    print(f"lineage via Neo4j ({args.samples} layer-{last} features, {rows:.0f} rows each): "
          f"p50 {percentile(neo4j_times, 50):.1f} ms, p99 {percentile(neo4j_times, 99):.1f} ms")
    print(f"in-memory Python walk (baseline, same answers): p50 {percentile(memory_times, 50):.3f} ms, "
          f"p99 {percentile(memory_times, 99):.3f} ms, after loading every edge in {load_seconds:.1f}s")
    print(f"answers identical for all {args.samples} features")

    template = get_template("lineage")
    with db.session() as session:
        summary = session.run("PROFILE " + template.cypher, template.bind({"feature": features[0]})).consume()
    plan, operators = summary.profile, []

    def walk(node):
        operators.append(f"{node['operatorType'].split('@')[0]}({node.get('dbHits', 0)})")
        for child in node.get("children", []):
            walk(child)

    walk(plan)
    print("PROFILE lineage (operator(db hits), root first): " + " <- ".join(operators))
    db.close()


if __name__ == "__main__":
    main()
