"""Precision and recall of flowdb on a planted pack (ground truth from `flowdb synth`).

    .venv/bin/python benchmarks/eval_planted.py [--layers 6 --width 4096 --d-model 256 --seed 0]

Synthesises a pack, ingests it into Neo4j (the configured one, else the managed
server), and compares what is stored with the planted truth: per category, the
precision and recall of the data-free classification; for predecessors, the
planted (feature, module, predecessor) triples against stored top-1 edges at or
above the manifest's threshold.
"""

from __future__ import annotations

import argparse
import tempfile

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.synth import THRESHOLD, SynthSpec, synthesize
    from flowdb.store.connection import connect
    from flowdb.store.graph import drop_pack, ensure_schema, read_pack
    from flowdb.store.ingest import ingest
    from flowdb.store.templates import run_template

    name = "eval-planted"
    with tempfile.TemporaryDirectory() as out, connect() as db:
        truth = synthesize(out, SynthSpec(name=name, layers=args.layers, d_model=args.d_model,
                                          width=args.width, seed=args.seed))
        ensure_schema(db)
        if read_pack(db, name):
            drop_pack(db, name)
        ingest(load_manifest(f"{out}/manifest.toml"), db, show_progress=False)
        stored = pd.DataFrame(db.read(
            "MATCH (f:Feature:Residual {pack: $pack}) RETURN f.layer AS layer, f.index AS index, "
            "f.category AS called", pack=name))
        edges = run_template(db, "edges", {"pack": name})
        drop_pack(db, name)

    joined = truth.merge(stored, on=["layer", "index"])
    print(f"planted pack: {args.layers} layers x {args.width} features, d_model {args.d_model}, seed {args.seed}")
    for category in ("translated", "processed", "newborn", "from-nowhere"):
        planted, called = joined["category"] == category, joined["called"] == category
        hits = (planted & called).sum()
        print(f"  {category:13} planted {planted.sum():6}  called {called.sum():6}  "
              f"precision {hits / max(called.sum(), 1):.4f}  recall {hits / max(planted.sum(), 1):.4f}")
    true = {(r.layer, r.index, m, int(getattr(r, f"{m}_pred"))) for r in truth.itertuples()
            for m in ("res", "mlp", "att") if getattr(r, f"{m}_pred") >= 0}
    kept = edges[(edges["rank"] == 1) & (edges["cosine"] >= THRESHOLD)]
    called = {(r.dst_layer, r.dst_index, r.src_module, r.src_index) for r in kept.itertuples()}
    hits = len(true & called)
    print(f"  predecessors  planted {len(true):6}  called {len(called):6}  "
          f"precision {hits / len(called):.4f}  recall {hits / len(true):.4f}")


if __name__ == "__main__":
    main()
