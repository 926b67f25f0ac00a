"""Precision and recall of `flowdb link`'s categories on planted families, and its
throughput against this machine's fp32 GEMM rate, measured in the same run.

    .venv/bin/python benchmarks/eval_links.py [--width 2048 --d-model 512 --layers 2 --seed 0]
        [--speed-a 4096 --speed-b 16384 --speed-d 2304]

`flowdb synth --companions` plants a split companion (features split into 2-3 children
whose normalised sum is the parent, kept, gone, new) and a drift companion (kept,
rotated to a cosine between chance and the threshold, gone, new). Each is linked
from the base pack (no Neo4j: the link atlas alone), and the split companion also the
other way round, where the planted splits must come out as merged. Every feature's
category is compared with the truth in the companion's truth.csv.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from flowdb.flow.link_atlas import LinkPlan, link_atlas, link_place
from flowdb.flow.link_spec import LinkSpec
from flowdb.flow.matching import Matcher
from flowdb.packs.manifest import load_manifest
from flowdb.packs.plan import make_plan
from flowdb.packs.synth import SynthSpec, synthesize

# Reading the split companion as A and the base as B turns each planted category into its mirror.
REVERSED = {"a": {"kept": "kept", "new": "gone", "shifted": "shifted"},
            "b": {"kept": "kept", "split": "merged", "gone": "new", "shifted": "shifted"}}


def categories(atlas) -> pd.DataFrame:
    rows = []
    for place in atlas.places():
        for side, values in (("a", place.a_categories), ("b", place.b_categories)):
            rows += [{"side": side, "layer": place.layer, "index": i, "found": c} for i, c in enumerate(values)]
    return pd.DataFrame(rows)


def scores(truth: pd.DataFrame, found: pd.DataFrame, case: str) -> pd.DataFrame:
    joined = truth.merge(found, on=["side", "layer", "index"], validate="one_to_one")
    assert len(joined) == len(truth) == len(found), "every feature has one truth and one category"
    rows = []
    for (side, category), _ in joined.groupby(["side", "category"]):
        planted = joined[(joined.side == side) & (joined.category == category)]
        called = joined[(joined.side == side) & (joined.found == category)]
        rows.append({"case": case, "side": "A" if side == "a" else "B", "category": category,
                     "planted": len(planted), "called": len(called),
                     "recall": (planted.found == category).mean(),
                     "precision": (called.category == category).mean() if len(called) else float("nan")})
    return pd.DataFrame(rows)


def link_dirs(a_dir: Path, b_dir: Path, out: Path, name: str) -> tuple[LinkPlan, object, float]:
    plan = LinkPlan(name, make_plan(load_manifest(a_dir / "manifest.toml")),
                    make_plan(load_manifest(b_dir / "manifest.toml")), LinkSpec())
    started = time.perf_counter()
    atlas = link_atlas(plan, out / name)
    return plan, atlas, time.perf_counter() - started


def planted_table(width: int, d_model: int, layers: int, seed: int, work: Path) -> pd.DataFrame:
    synthesize(work / "pack", SynthSpec(layers=layers, width=width, d_model=d_model, seed=seed, companions=True))
    tables = []
    for kind in ("split", "drift"):
        truth = pd.read_csv(work / "pack" / kind / "truth.csv")[["side", "layer", "index", "category"]]
        _, atlas, _ = link_dirs(work / "pack", work / "pack" / kind, work / "links", kind)
        tables.append(scores(truth, categories(atlas), f"base -> {kind}"))
        if kind == "split":
            mirrored = truth.assign(side=truth.side.map({"a": "b", "b": "a"}))
            mirrored["category"] = [REVERSED[s][c] for s, c in zip(mirrored.side, mirrored.category)]
            _, atlas, _ = link_dirs(work / "pack" / kind, work / "pack", work / "links", "split-reversed")
            tables.append(scores(mirrored, categories(atlas), "split -> base"))
    return pd.concat(tables, ignore_index=True)


def throughput(n_a: int, n_b: int, d: int) -> tuple[float, float]:
    """(link GFLOP/s, numpy fp32 GEMM GFLOP/s) on random decoders of these shapes."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n_a, d), dtype=np.float32)
    b = rng.standard_normal((n_b, d), dtype=np.float32)
    block = np.empty((2048, n_b), dtype=np.float32)
    np.matmul(a[:2048], b.T, out=block)  # warm up BLAS threads and pages
    started = time.perf_counter()
    for start in range(0, n_a, 2048):
        np.matmul(a[start:start + 2048], b.T, out=block[:len(a[start:start + 2048])])
    gemm = 2.0 * n_a * n_b * d / (time.perf_counter() - started) / 1e9
    place = link_place(a, b, 0, "res", LinkSpec(), Matcher())
    return place.search_flops() / place.search_seconds / 1e9, gemm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-a", type=int, default=4096)
    parser.add_argument("--speed-b", type=int, default=16384)
    parser.add_argument("--speed-d", type=int, default=2304)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        table = planted_table(args.width, args.d_model, args.layers, args.seed, Path(scratch))
    print(f"planted families: width {args.width}, d_model {args.d_model}, {args.layers} layers, seed {args.seed}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    rate, gemm = throughput(args.speed_a, args.speed_b, args.speed_d)
    print(f"link throughput: {args.speed_a} x {args.speed_b} features in d {args.speed_d}, both ways: "
          f"{rate:,.0f} GFLOP/s against numpy's fp32 GEMM at {gemm:,.0f} GFLOP/s in this run = {rate / gemm:.0%}")


if __name__ == "__main__":
    main()
