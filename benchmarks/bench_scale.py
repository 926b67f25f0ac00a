"""flowdb at scale, every figure beside a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_scale.py [--only PART,...] [--million-tiles 4]

Parts (all by default, in this order):
  gemm      this machine's fp32 GEMM rate (numpy/BLAS; torch too on a GPU), the baseline
  backends  one 8,192 x 16,384 x 2,304 top-5 search per matching backend on this
            machine (torch-bf16 included) and one through --device auto, GFLOP/s =
            2 n m d / s, and its ratio to numpy's fp32 GEMM rate on the same shape; each
            answer also checked against float64 brute force on a set with exact ties
            planted at the k-th place (copied base rows) and near ties (the check is
            untimed). Targets for auto: >= 200% on a CPU with bf16, >= 90% elsewhere
  gemma     a Gemma-2-2B-shaped pack (26 layers x res/mlp/att x 16,384 features,
            d 2,304; planted lineage, flowdb synth) end to end at k=5: match into an
            atlas, then load over Bolt into a fresh managed Neo4j. Wall time (target
            <= 15 min) and its ratio to the seconds numpy's fp32 GEMM needs for the
            matching's FLOPs (target <= 0.8x), matching GFLOP/s against the GEMM rate,
            peak RSS of each step
  bulk      the same atlas through `flowdb load --bulk` (neo4j-admin import) into
            another fresh server: relationships/s against the Bolt load's
  bolt-k1   Bolt at k=1 on the pack's first 6 layers: relationships/s
  queries   lineage, descendants and circuit p50/p99 on the Gemma-shaped graph at
            max_rank 1 and 5 (targets: lineage p50 <= 20 ms, p99 <= 100 ms), and
            how many the time limit stopped
  million   one 1M-wide layer (2^20 rows, d 2,304, tiles generated as they are read,
            so it never exists whole) matched against 16k and 65k bases: peak RSS
            against the bound the tiles set, and seconds per search, extrapolated
            from --million-tiles query tiles of 8,192 (each tile costs the same)
Each step runs in a child process, so its peak RSS is its own. Data lives under
FLOWDB_HOME/bench (the pack, about 12 GB, is kept for the next run); the servers
are private to the run and deleted after it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# Gemma 2 2B with Gemma Scope 16k; FLOWDB_BENCH_SHAPE=LAYERS,WIDTH,D shrinks it for a smoke run,
# FLOWDB_BENCH_QUERIES the query rows of the GEMM baseline and the backends' searches.
LAYERS, WIDTH, D_MODEL = (int(v) for v in os.environ.get("FLOWDB_BENCH_SHAPE", "26,16384,2304").split(","))
QUERIES = int(os.environ.get("FLOWDB_BENCH_QUERIES", 8192))
TIED_QUERIES = 512  # rows of the exactness check
K = 5
PARTS = ("gemm", "backends", "gemma", "bulk", "bolt-k1", "queries", "million")
MILLION = int(os.environ.get("FLOWDB_BENCH_MILLION", 1 << 20))


# --- helpers ------------------------------------------------------------------------------

def bench_dir() -> Path:
    from flowdb.settings import flowdb_home

    return flowdb_home() / "bench"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def in_child(part: str, **kwargs) -> dict:
    """Run one step in a fresh interpreter; returns its JSON answer (with its peak RSS)."""
    done = subprocess.run([sys.executable, __file__, "--child", part, "--kwargs", json.dumps(kwargs)],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"step {part} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def private_server(name: str, started: bool = True):
    """A fresh managed Neo4j of this run (its own store and port, sharing the jars),
    stopped and deleted when the block ends."""
    from flowdb.store.server import ManagedServer

    default = ManagedServer.default()
    default.fetch()
    root = bench_dir() / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.symlink(default.lib, root / "lib")
    server = ManagedServer(root, free_port())
    try:
        if started:
            server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def connect_to(server):
    from flowdb.settings import Neo4jSettings
    from flowdb.store.connection import connect

    user, password = server.auth()
    return connect(Neo4jSettings(server.uri, user, password, None))


def gemma_pack() -> Path:
    from flowdb.packs.synth import SynthSpec, synthesize

    out = bench_dir() / f"gemma-shaped-{LAYERS}x{WIDTH}x{D_MODEL}"
    if not (out / "manifest.toml").exists():
        print(f"writing the Gemma-shaped pack to {out} (about 12 GB, once) ...", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
        synthesize(out, SynthSpec(name="gemma-shaped", layers=LAYERS, d_model=D_MODEL, width=WIDTH, seed=3))
    return out


# --- steps (each in its own process) -------------------------------------------------------

def step_gemm() -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((QUERIES, D_MODEL), dtype=np.float32)
    b = rng.standard_normal((D_MODEL, WIDTH), dtype=np.float32)
    a @ b
    started = time.perf_counter()
    for _ in range(3):
        a @ b
    answer = {"numpy": 3 * 2 * QUERIES * WIDTH * D_MODEL / (time.perf_counter() - started) / 1e9}
    from flowdb.flow.calibration import cpu_flags, has_bf16
    from flowdb.flow.doctor import blas_libraries, cpu_backends, cpu_model

    answer["cpu"] = cpu_model()
    answer["bf16"] = has_bf16(cpu_flags())
    answer["blas"] = [f"{lib.package}: {lib.describe()}" for lib in blas_libraries(cpu_backends())]
    import torch

    if answer["bf16"]:  # torch's bf16 GEMM, bf16 out (what torch-bf16 runs); emulated and slow without bf16
        x, y = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
        x @ y
        started = time.perf_counter()
        for _ in range(3):
            x @ y
        answer["torch bf16"] = 3 * 2 * QUERIES * WIDTH * D_MODEL / (time.perf_counter() - started) / 1e9

    if torch.cuda.is_available():
        x, y = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        for precision, tf32 in (("fp32", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            x @ y
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(10):
                x @ y
            torch.cuda.synchronize()
            answer[f"cuda {precision}"] = 10 * 2 * QUERIES * WIDTH * D_MODEL / (time.perf_counter() - started) / 1e9
        answer["gpu"] = torch.cuda.get_device_name()
    return answer


def step_backend(backend: str) -> dict:
    """backend "auto": whatever --device auto picks here (its calibration runs first, untimed)."""
    from flowdb.flow.calibration import agrees, brute_force, planted_problem
    from flowdb.flow.matching import Matcher

    matcher = Matcher.for_device("auto") if backend == "auto" else Matcher(backend)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((QUERIES, D_MODEL), dtype=np.float32)
    base = rng.standard_normal((WIDTH, D_MODEL), dtype=np.float32)
    matcher.search(queries[:512], base, K)  # warm up (GPU context, thread pools)
    # numpy's GEMM on the same arrays just before and after the search: on a shared machine
    # the load changes from one child to the next, so the share compares like with like.
    gemm_seconds = time_gemm(queries, base)
    started = time.perf_counter()
    matcher.search(queries, base, K)
    seconds = time.perf_counter() - started
    gemm_seconds = (gemm_seconds + time_gemm(queries, base)) / 2
    # Exactness, untimed: exact ties at the k-th place (copied base rows), near ties, random rows.
    tied_q, tied_b = planted_problem(TIED_QUERIES, WIDTH, D_MODEL, K)
    reference = brute_force(tied_q, tied_b, K)
    found = matcher.search(tied_q, tied_b, K)
    answer = {"seconds": seconds, "gflops": 2 * QUERIES * WIDTH * D_MODEL / seconds / 1e9,
              "gemm_gflops": 2 * QUERIES * WIDTH * D_MODEL / gemm_seconds / 1e9,
              "backend": matcher.backend, "exact": agrees(found, reference),
              "max_error": float(np.abs(found[0] - reference[0]).max())}
    if matcher.backend == "torch-bf16":  # how often the certificate sent rows back to fp32
        from flowdb.flow.bf16 import CertifiedSearch
        from flowdb.flow.matching import _torch_cuda
        from flowdb.flow.ranking import normalise

        for name, (q, b) in (("random", (queries[:2048], base)), ("tied", (tied_q, tied_b))):
            search = CertifiedSearch("cuda" if _torch_cuda() else "cpu")
            search(normalise(q), normalise(b[:65536]), K)
            answer[f"widened {name}"] = search.rows_widened / search.rows
            answer[f"redone {name}"] = search.rows_redone / search.rows
    return answer


def time_gemm(queries: np.ndarray, base: np.ndarray) -> float:
    """Seconds of numpy's fp32 GEMM queries @ base.T (its output written into one buffer)."""
    out = np.empty((queries.shape[0], base.shape[0]), dtype=np.float32)
    started = time.perf_counter()
    np.matmul(queries, base.T, out=out)
    return time.perf_counter() - started


def step_match(manifest: str, out: str, k: int, layers: list[int] | None = None) -> dict:
    import dataclasses

    from flowdb.flow.atlas import match
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.plan import make_plan

    parsed = load_manifest(manifest, k=k)
    if layers:
        parsed = dataclasses.replace(parsed, first_layer=layers[0], last_layer=layers[1])
    started = time.perf_counter()
    plan = make_plan(parsed)
    planned = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    atlas = match(plan, out)
    seconds = time.perf_counter() - started
    flops = sum(atlas.read_layer_header(layer).search_flops() for layer in atlas.layers_done())
    return {"plan_seconds": planned, "match_seconds": seconds, "flops": flops, "search_gflops": atlas.search_rate(),
            "edges": atlas.n_edges(), "matcher": atlas.matchers()}


def step_bolt_load(atlas_dir: str, server_root: str, port: int) -> dict:
    from flowdb.flow.atlas import Atlas
    from flowdb.store.ingest import load
    from flowdb.store.server import ManagedServer

    server = ManagedServer(Path(server_root), port)
    with connect_to(server) as db:
        started = time.perf_counter()
        report = load(Atlas.open(atlas_dir), db, show_progress=False)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "write_seconds": report.write_seconds, "relationships": report.relationships,
            "features": report.features, "rate": report.relationships / seconds}


def step_bulk_load(atlas_dir: str, server_root: str, port: int) -> dict:
    from flowdb.flow.atlas import Atlas
    from flowdb.store.bulk import BulkPack, bulk_load
    from flowdb.store.server import ManagedServer

    report = bulk_load(ManagedServer(Path(server_root), port), [BulkPack.from_atlas(Atlas.open(atlas_dir))])
    return {"seconds": report.total_seconds, "import_seconds": report.import_seconds,
            "relationships": report.relationships, "nodes": report.nodes, "rate": report.rate}


def step_queries(server_root: str, port: int, pack: str, samples: int) -> dict:
    from flowdb.errors import QueryError
    from flowdb.store.server import ManagedServer
    from flowdb.store.templates import run_template

    pick = random.Random(0)
    last = LAYERS - 1
    answer = {}
    with connect_to(ManagedServer(Path(server_root), port)) as db:
        floor = []  # the baseline: one trivial read through the same driver
        for _ in range(samples):
            started = time.perf_counter()
            db.read("RETURN 1 AS one")
            floor.append(time.perf_counter() - started)
        answer["round trip (RETURN 1)"] = {"p50": float(np.percentile(np.asarray(floor) * 1e3, 50)),
                                           "p99": float(np.percentile(np.asarray(floor) * 1e3, 99)),
                                           "rows": 1.0, "stopped": 0, "n": samples}
        for max_rank in (1, 5):
            jobs = {
                "lineage": [{"feature": f"{pack}/{last}/res/{pick.randrange(WIDTH)}"} for _ in range(samples)],
                "descendants": [{"feature": f"{pack}/0/res/{pick.randrange(WIDTH)}"} for _ in range(samples)],
                "circuit": [{"source": f"{pack}/{pick.randrange(last)}/res/{pick.randrange(WIDTH)}",
                             "target": f"{pack}/{last}/res/{pick.randrange(WIDTH)}"} for _ in range(samples)],
            }
            for name, params in jobs.items():
                for p in params[:10]:  # warm the plan cache and the server's JIT on this template
                    run_template(db, name, {**p, "max_rank": max_rank})
                times, rows, stopped = [], [], 0
                for p in params:
                    started = time.perf_counter()
                    try:
                        rows.append(len(run_template(db, name, {**p, "max_rank": max_rank})))
                    except QueryError:
                        stopped += 1
                    times.append(time.perf_counter() - started)
                ms = np.asarray(times) * 1e3
                answer[f"{name} max_rank {max_rank}"] = {
                    "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                    "rows": float(np.mean(rows)) if rows else 0.0, "stopped": stopped, "n": len(params)}
    return answer


class GeneratedDecoder:
    """A decoder too big to hold: rows made (deterministically) when a tile is read."""

    def __init__(self, rows: int, d: int, seed: int):
        self.shape, self.seed = (rows, d), seed

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return np.random.default_rng([self.seed, start]).standard_normal((stop - start, self.shape[1]),
                                                                          dtype=np.float32)


def step_million(base_width: int, tiles: int) -> dict:
    from flowdb.flow.matching import QUERY_TILE, Matcher

    rss_before = peak_rss_gb()
    base = np.random.default_rng(2).standard_normal((base_width, D_MODEL), dtype=np.float32)
    queries = GeneratedDecoder(MILLION, D_MODEL, seed=4)
    measured = tiles * QUERY_TILE
    head = GeneratedDecoder(measured, D_MODEL, seed=4)  # the same first rows
    started = time.perf_counter()
    Matcher().search(head, base, K)
    seconds = time.perf_counter() - started
    # The bound: the base and its normalised copy, one query tile raw and normalised,
    # the score block FAISS keeps per tile, and the [1M, k] results, over the start-up RSS.
    bound = (2 * base.nbytes + 2 * QUERY_TILE * D_MODEL * 4 + QUERY_TILE * base_width * 4
             + queries.shape[0] * K * 12) / 2**30 + rss_before + 0.5
    return {"seconds_measured": seconds, "queries_measured": measured,
            "seconds_per_search": seconds * MILLION / measured,
            "gflops": 2 * measured * base_width * D_MODEL / seconds / 1e9, "bound_gb": bound}


STEPS = {"gemm": step_gemm, "backend": step_backend, "match": step_match, "bolt": step_bolt_load,
         "bulk": step_bulk_load, "queries": step_queries, "million": step_million}


# --- the run ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--million-tiles", type=int, default=4)
    parser.add_argument("--query-samples", type=int, default=100)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        answer = STEPS[args.child](**json.loads(args.kwargs))
        print(json.dumps({**answer, "peak_rss_gb": peak_rss_gb()}))
        return
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}")
    run(parts, args)


def run(parts: list[str], args) -> None:
    from flowdb.flow.bf16 import EXTRA_CANDIDATES, WIDER
    from flowdb.flow.matching import BACKENDS, CPU_DEFAULT, choose_backend

    say = lambda text: print(text, flush=True)  # noqa: E731
    gemm = in_child("gemm")
    say(f"fp32 GEMM, numpy ({QUERIES}x{D_MODEL} @ {D_MODEL}x{WIDTH}): {gemm['numpy']:,.0f} GFLOP/s"
        + "".join(f"; {name} {value:,.0f} GFLOP/s" for name, value in gemm.items()
                  if name.startswith(("cuda", "torch")))
        + (f" on {gemm['gpu']}" if "gpu" in gemm else "; no GPU on this machine"))
    say(f"CPU: {gemm['cpu']} ({'with' if gemm['bf16'] else 'no'} bf16 instructions); "
        f"BLAS and thread pools loaded: {'; '.join(gemm['blas'])}")
    if "backends" in parts:
        gpu = "gpu" in gemm
        for backend in [*BACKENDS, "auto"]:
            if ("cuda" in backend or "gpu" in backend) and not gpu:
                continue
            if backend == "faiss-gpu" and choose_backend("cuda") != "faiss-gpu":
                continue  # faiss-gpu not installed
            r = in_child("backend", backend=backend)
            on_gpu = "cuda" in r["backend"] or "gpu" in r["backend"] or (r["backend"] == "torch-bf16" and gpu)
            baseline = gemm["cuda fp32"] if on_gpu else r["gemm_gflops"]
            role = " (the CPU default)" if backend == CPU_DEFAULT else ""
            name = f"--device auto (= {r['backend']})" if backend == "auto" else f"matching {backend}{role}"
            target = ""
            if backend == "auto" and not gpu:
                target = f" (target >= {'200' if gemm['bf16'] else '90'}% on this CPU)"
            redone = "".join(
                f"; {what}: " + ", ".join(f"{r[f'{step} {rows}']:.1%} of {rows} rows" for rows in ("random", "tied"))
                for step, what in (("widened", f"rows given k + {WIDER * EXTRA_CANDIDATES} candidates"),
                                   ("redone", "rows searched again in fp32"))
                if f"{step} tied" in r)
            say(f"{name}: top-{K} of {QUERIES:,} x {WIDTH:,}, d {D_MODEL}: {r['seconds']:.2f} s, "
                f"{r['gflops']:,.0f} GFLOP/s = {r['gflops'] / baseline:.0%} of the {'CUDA' if on_gpu else 'numpy'} "
                f"fp32 GEMM rate ({baseline:,.0f} GFLOP/s, timed beside it){target}; "
                f"exact on {TIED_QUERIES} rows with planted ties: "
                f"{'yes' if r['exact'] else 'NO'} (max |score - float64| {r['max_error']:.1e}){redone}")
    work = bench_dir()
    atlas_dir = work / f"atlas-{LAYERS}x{WIDTH}x{D_MODEL}-k5"
    bolt = None
    if {"gemma", "bulk", "queries", "bolt-k1"} & set(parts):
        manifest = str(gemma_pack() / "manifest.toml")
    if "gemma" in parts:
        started = time.perf_counter()
        m = in_child("match", manifest=manifest, out=str(atlas_dir), k=K)
        with private_server("neo4j-bolt") as server:
            bolt = in_child("bolt", atlas_dir=str(atlas_dir), server_root=str(server.root), port=server.port)
            wall = time.perf_counter() - started
            gflops = m["flops"] / m["match_seconds"] / 1e9
            say(f"Gemma-shaped pack ({LAYERS} layers x 3 x {WIDTH:,}, d {D_MODEL}, k={K}) end to end on this "
                f"machine: {wall / 60:.1f} min (target <= 15): plan (hash {3 * LAYERS} SAEs) "
                f"{m['plan_seconds']:.0f} s, "
                f"match {m['match_seconds']:.0f} s, Bolt load {bolt['seconds']:.0f} s incl. server start")
            gemm_seconds = m["flops"] / (gemm["numpy"] * 1e9)
            say(f"  against the arithmetic: numpy's fp32 GEMM needs {gemm_seconds:.0f} s for the matching's "
                f"FLOPs alone; end to end took {wall / gemm_seconds:.2f}x that (target <= 0.8x)")
            say(f"  matching: {m['flops'] / 1e12:.0f} TFLOP by {m['matcher']} at {gflops:,.0f} GFLOP/s = "
                f"{gflops / gemm['numpy']:.0%} of the GEMM rate (searches alone {m['search_gflops']:,.0f} "
                f"GFLOP/s = {m['search_gflops'] / gemm['numpy']:.0%}; the rest reads SAEs); "
                f"peak RSS {m['peak_rss_gb']:.1f} GB")
            say(f"  Bolt load: {bolt['relationships']:,} relationships + {bolt['features']:,} nodes, "
                f"{bolt['rate']:,.0f} relationships/s; peak RSS {bolt['peak_rss_gb']:.1f} GB")
            if "queries" in parts:
                q = in_child("queries", server_root=str(server.root), port=server.port, pack="gemma-shaped",
                             samples=args.query_samples)
                for name, r in q.items():
                    if name == "peak_rss_gb":
                        continue
                    say(f"  {name}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['rows']:.0f} rows on "
                        f"average, {r['stopped']} of {r['n']} stopped by the time limit")
    if "bulk" in parts:
        with private_server("neo4j-bulk", started=False) as server:
            b = in_child("bulk", atlas_dir=str(atlas_dir), server_root=str(server.root), port=server.port)
            versus = f" = {b['rate'] / bolt['rate']:.1f}x Bolt's" if bolt else ""
            say(f"bulk load (neo4j-admin import) of the same atlas: {b['relationships']:,} relationships + "
                f"{b['nodes']:,} nodes in {b['seconds']:.0f} s (import {b['import_seconds']:.0f} s): "
                f"{b['rate']:,.0f} relationships/s (target >= 300,000){versus}")
            if "gemma" in parts:  # a fresh store's way: flowdb match, then flowdb load --bulk
                fresh = m["plan_seconds"] + m["match_seconds"] + b["seconds"]
                say(f"  end to end into a fresh store with --bulk: plan + match + bulk load = {fresh:.0f} s, "
                    f"{fresh / gemm_seconds:.2f}x the fp32 GEMM's {gemm_seconds:.0f} s (target <= 0.8x)")
    if "bolt-k1" in parts:
        small = work / f"atlas-{LAYERS}x{WIDTH}x{D_MODEL}-k1-6layers"
        in_child("match", manifest=manifest, out=str(small), k=1, layers=[0, 5])
        with private_server("neo4j-bolt-k1") as server:
            r = in_child("bolt", atlas_dir=str(small), server_root=str(server.root), port=server.port)
            say(f"Bolt load at k=1 (6 layers): {r['relationships']:,} relationships + {r['features']:,} nodes "
                f"in {r['seconds']:.0f} s: {r['rate']:,.0f} relationships/s")
    if "million" in parts:
        for base_width in (16384, 65536):
            r = in_child("million", base_width=base_width, tiles=args.million_tiles)
            say(f"1M-wide layer ({MILLION:,} x {D_MODEL}) against a {base_width:,}-wide base: "
                f"{r['seconds_per_search'] / 60:.1f} min per search at {r['gflops']:,.0f} GFLOP/s "
                f"(measured on {r['queries_measured']:,} queries); peak RSS {r['peak_rss_gb']:.2f} GB "
                f"within the bound of {r['bound_gb']:.2f} GB: {r['peak_rss_gb'] <= r['bound_gb']}")


if __name__ == "__main__":
    main()
