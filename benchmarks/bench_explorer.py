"""The flow explorer (`flowdb serve`) at scale, each figure beside `flowdb query lineage`
measured on the same features in the same run.

    .venv/bin/python benchmarks/bench_explorer.py [--keep] [--features 200] [--searches 200] [--renders 20]

On bench_scale's Gemma-2-2B-shaped graph (26 layers x res/mlp/att x 16,384 features,
d 2,304, k=5; FLOWDB_BENCH_SHAPE=LAYERS,WIDTH,D shrinks it for a smoke run, and then the
pack and atlas are made here as bench_scale makes them):
  load      the atlas through `flowdb load --bulk` into a private server
  labels    one million synthetic Neuronpedia-format explanations (one per feature, on
            min(1M, features) features; descriptions of 3-7 words from a Zipf-weighted
            vocabulary of 3,000 made-up words, seed 0) through flowdb.store.labels.import_labels
  baseline  lineage (flowdb.store.templates.run_template) p50/p95 on the sampled residual features
  api       GET /api/features + /api/flow (the feature page's data; target p95 <= 150 ms)
            and GET /api/neighbours (one expansion; target p95 <= 150 ms) over keep-alive HTTP
  search    GET /api/search over the million labels: one and two words, prefixes as typed
            (target p95 <= 200 ms)
  render    headless chromium: navigation start to body[data-ready="1"] and to an svg in
            #flow-graph (target <= 1.5 s)
The explorer runs in a child process (uvicorn, as `flowdb serve` runs it). --keep keeps the
loaded, labelled server under FLOWDB_HOME/bench for the next --keep run (which then skips
load and labels and reports their times from the run that made it); by default it is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import (  # noqa: E402
    D_MODEL,
    LAYERS,
    WIDTH,
    K,
    bench_dir,
    connect_to,
    free_port,
    gemma_pack,
    in_child,
)

PACK = "gemma-shaped"  # the name gemma_pack's manifest gives it
MODEL = "planted-model"
MODULES = ("res", "mlp", "att")
FEATURES = LAYERS * len(MODULES) * WIDTH
LABELS = min(1_000_000, FEATURES)
VOCABULARY = 3_000
TARGETS_MS = {"feature page data": 150, "neighbourhood expansion": 150, "search": 200, "render": 1500}
MARKER = "flowdb-bench-explorer.json"  # in a kept server's root: what was loaded, and how long it took


# --- data ---------------------------------------------------------------------------------

def atlas() -> Path:
    """bench_scale's atlas of this shape, matched here when it is not there yet."""
    out = bench_dir() / f"atlas-{LAYERS}x{WIDTH}x{D_MODEL}-k{K}"
    if not (out / "atlas.json").exists():
        in_child("match", manifest=str(gemma_pack() / "manifest.toml"), out=str(out), k=K)
    return out


def vocabulary(rng: np.random.Generator) -> list[str]:
    """Made-up words of 2-4 syllables, so prefixes behave as in a real vocabulary."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        words["".join(rng.choice(syllables, size=rng.integers(2, 5)))] = None
    return list(words)


def neuronpedia_source(layer: int, module: str) -> str:
    return f"{layer}-planted-{module}-{WIDTH // 1024}k"


def write_labels(out: Path, words: list[str], rng: np.random.Generator) -> None:
    """The export's bucket layout, v1/{modelId}/{source}/explanations/batch-0.jsonl: one
    explanation on each of LABELS features drawn at random; fields as Neuronpedia exports them."""
    chosen = np.sort(rng.choice(FEATURES, size=LABELS, replace=False))
    zipf = 1.0 / np.arange(1, len(words) + 1)
    lengths = rng.integers(3, 8, size=LABELS)
    drawn = rng.choice(len(words), size=int(lengths.sum()), p=zipf / zipf.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)])
    shutil.rmtree(out, ignore_errors=True)
    handles = {}
    try:
        for n, feature in enumerate(chosen.tolist()):
            sae, index = divmod(feature, WIDTH)
            layer, module = divmod(sae, len(MODULES))
            source = neuronpedia_source(layer, MODULES[module])
            if source not in handles:
                folder = out / "v1" / MODEL / source / "explanations"
                folder.mkdir(parents=True)
                handles[source] = open(folder / "batch-0.jsonl", "w")
            description = " ".join(words[w] for w in drawn[starts[n]:starts[n + 1]])
            handles[source].write(json.dumps({
                "id": f"bench{n:07d}", "modelId": MODEL, "layer": source, "index": str(index), "authorId": "bench",
                "description": description, "typeName": "oai_token-act-pair",
                "explanationModelName": "gpt-4o-mini"}) + "\n")
    finally:
        for handle in handles.values():
            handle.close()


def set_neuronpedia_sources(db) -> int:
    """What a pack whose manifest names Neuronpedia sources ([modules.*] neuronpedia = ...)
    stores on its SAE nodes (flowdb/flow/build.py _provenance); the bench pack names none."""
    return db.write(
        "MATCH (p:Pack {name: $pack})-[:HAS_SAE]->(s:SAE) "
        "SET s.neuronpedia = toString(s.layer) + '-planted-' + s.module + $suffix, "
        "    s.np_url = 'https://www.neuronpedia.org/' + p.model + '/' + s.neuronpedia + '/' "
        "RETURN count(s) AS n", pack=PACK, suffix=f"-{WIDTH // 1024}k")[0]["n"]


def load_and_label(server, words: list[str]) -> dict:
    from flowdb.store.graph import ensure_schema
    from flowdb.store.labels import import_labels

    bulk = in_child("bulk", atlas_dir=str(atlas()), server_root=str(server.root), port=server.port)
    labels_dir = bench_dir() / f"labels-{LAYERS}x{WIDTH}-{LABELS}"
    started = time.perf_counter()
    write_labels(labels_dir, words, np.random.default_rng(1))
    written = time.perf_counter() - started
    try:
        with connect_to(server) as db:
            ensure_schema(db)  # the full-text index exists before the labels come, as after any load
            saes = set_neuronpedia_sources(db)
            started = time.perf_counter()
            report = import_labels(db, labels_dir)
            seconds = time.perf_counter() - started
            db.write("CALL db.awaitIndexes(600)")
            indexed = time.perf_counter() - started
    finally:
        shutil.rmtree(labels_dir, ignore_errors=True)
    return {"bulk_seconds": bulk["seconds"], "relationships": bulk["relationships"], "nodes": bulk["nodes"],
            "saes_with_sources": saes, "write_seconds": written, "import_seconds": seconds,
            "indexed_seconds": indexed, "explanations": report.explanations, "labelled": report.features,
            "files": report.files}


@contextmanager
def loaded_server(keep: bool):
    """The private server with the graph and labels: reused when --keep kept one, else made
    (and, without --keep, deleted at the end)."""
    from flowdb.store.server import ManagedServer

    default = ManagedServer.default()
    default.fetch()
    root = bench_dir() / f"neo4j-explorer-{LAYERS}x{WIDTH}x{D_MODEL}"
    marker = root / MARKER
    words = vocabulary(np.random.default_rng(0))
    reused = keep and marker.exists()
    if not reused:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        os.symlink(default.lib, root / "lib")
    server = ManagedServer(root, free_port())  # the port is given at each start
    try:
        if reused:
            server.start()
            loaded = {**json.loads(marker.read_text()), "reused": True}
        else:
            loaded = load_and_label(server, words)
            marker.write_text(json.dumps(loaded))
        yield server, loaded, words
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# --- the explorer -------------------------------------------------------------------------

def serve(server_root: str, port: int, http_port: int) -> None:
    """The child: the explorer app over the private server, as `flowdb serve` runs it."""
    import uvicorn

    from flowdb.explorer.app import create_app
    from flowdb.store.server import ManagedServer

    server = ManagedServer(Path(server_root), port)
    app = create_app(lambda: connect_to(server), host="127.0.0.1", token="bench", require_token=False)
    uvicorn.run(app, host="127.0.0.1", port=http_port, log_level="warning", access_log=False)


@contextmanager
def explorer(server):
    import httpx

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(server.root), str(server.port), str(port)])
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/api/packs", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the explorer did not start")
            time.sleep(0.2)
        yield base
    finally:
        child.terminate()
        child.wait(30)


# --- measuring ----------------------------------------------------------------------------

def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "n": len(ms),
            "max": float(a.max())}


def timed(function, items, warm: int = 10) -> tuple[list[float], list]:
    for item in items[:warm]:  # the plan cache, the JIT, the page cache on these paths
        function(item)
    times, answers = [], []
    for item in items:
        started = time.perf_counter()
        answers.append(function(item))
        times.append((time.perf_counter() - started) * 1e3)
    return times, answers


def sample_features(n: int) -> list[str]:
    pick = random.Random(0)
    return [f"{PACK}/{pick.randrange(LAYERS)}/res/{pick.randrange(WIDTH)}" for _ in range(n)]


def search_queries(words: list[str], n: int) -> dict[str, list[str]]:
    """Type-ahead as typed: whole words, and the first 2-5 letters of a word, alone or after a word."""
    pick = random.Random(2)
    word = lambda: pick.choice(words)  # noqa: E731
    prefix = lambda: (lambda w: w[:pick.randint(2, min(5, len(w) - 1))])(word())  # noqa: E731
    per = max(1, n // 4)
    return {"one word": [word() for _ in range(per)],
            "two words": [f"{word()} {word()}" for _ in range(per)],
            "prefix": [prefix() for _ in range(per)],
            "word + prefix": [f"{word()} {prefix()}" for _ in range(per)]}


RECORDER = """
window.__bench = {};
new MutationObserver(() => {
  const t = window.__bench, body = document.body;
  if (!body) return;
  if (t.ready === undefined && body.dataset.ready) { t.ready = performance.now(); t.state = body.dataset.ready; }
  if (t.svg === undefined && document.querySelector('#flow-graph svg')) t.svg = performance.now();
}).observe(document, {subtree: true, childList: true, attributes: true});
"""


def render(base: str, keys: list[str]) -> dict:
    """Navigation start (performance.now()'s origin) to body[data-ready] and to #flow-graph's svg."""
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        page.add_init_script(RECORDER)
        ready, svg, failed = [], [], []

        def visit(key):
            page.goto(f"{base}/feature/{quote(key)}", wait_until="commit")
            page.wait_for_function("window.__bench && window.__bench.ready !== undefined", timeout=60_000)
            return page.evaluate("window.__bench")

        for key in keys[:3]:  # plotly.js and the scripts into the browser's cache, as after a first page
            visit(key)
        for key in keys:
            t = visit(key)
            if t["state"] != "1":
                failed.append(key)
            ready.append(t["ready"])
            if t.get("svg") is not None:
                svg.append(t["svg"])
        browser.close()
    return {"ready": stats(ready), "svg": stats(svg) if svg else None, "failed": failed}


def measure(base: str, server, words: list[str], args) -> dict:
    import httpx

    from flowdb.store.templates import run_template

    keys = sample_features(args.features)
    out = {}
    with connect_to(server) as db:
        floor, _ = timed(lambda _: db.read("RETURN 1 AS one"), list(range(50)))  # what any one read costs here
        out["round trip (RETURN 1)"] = stats(floor)
        times, frames = timed(lambda key: run_template(db, "lineage", {"feature": key}), keys)
        out["lineage (Python API)"] = {**stats(times), "rows": float(np.mean([len(f) for f in frames]))}
    with httpx.Client(base_url=base, timeout=120) as client:  # one keep-alive connection
        def get(path, params=None):
            response = client.get(path, params=params)
            if response.status_code != 200:
                raise SystemExit(f"GET {path} {params or ''}: {response.status_code} {response.text[:200]}")
            return response.json()

        feature, _ = timed(lambda key: get(f"/api/features/{key}"), keys)
        flow, flows = timed(lambda key: get(f"/api/flow/{key}"), keys)
        out["GET /api/features"] = stats(feature)
        out["GET /api/flow"] = {**stats(flow), "rows": float(np.mean([len(f["nodes"]) for f in flows])),
                                "too_big": sum(f["too_big"] is not None for f in flows)}
        out["feature page data"] = stats([a + b for a, b in zip(feature, flow)])
        expand, parts = timed(lambda key: get(f"/api/neighbours/{key}"), keys)
        out["neighbourhood expansion"] = {**stats(expand), "rows": float(np.mean([len(p["edges"]) for p in parts]))}
        every = []
        for kind, queries in search_queries(words, args.searches).items():
            times, answers = timed(lambda q: get("/api/search", {"q": q, "limit": 20}), queries, warm=3)
            slowest = queries[int(np.argmax(times))]
            out[f"search: {kind}"] = {**stats(times), "rows": float(np.mean([len(a["results"]) for a in answers])),
                                      "slowest": f"{slowest!r} {max(times):.0f} ms"}
            every += times
        out["search"] = stats(every)
    out["render"] = render(base, keys[:args.renders])
    return out


# --- the run ------------------------------------------------------------------------------

def report(out: dict, loaded: dict, wall: float) -> None:
    say = lambda text: print(text, flush=True)  # noqa: E731
    base = out["lineage (Python API)"]
    say(f"\n{' '.join([Path(sys.executable).name, *sys.argv])}"
        + (f" (FLOWDB_BENCH_SHAPE={os.environ['FLOWDB_BENCH_SHAPE']})" if "FLOWDB_BENCH_SHAPE" in os.environ else ""))
    how = "from the run that kept this server" if loaded.get("reused") else "this run"
    say(f"\ngraph: {LAYERS} layers x 3 x {WIDTH:,} features (d {D_MODEL}, k={K}): {loaded['nodes']:,} nodes, "
        f"{loaded['relationships']:,} relationships, bulk load {loaded['bulk_seconds']:.0f} s ({how})")
    say(f"labels: {loaded['explanations']:,} explanations on {loaded['labelled']:,} features in "
        f"{loaded['files']} files: import_labels {loaded['import_seconds']:.0f} s "
        f"({loaded['explanations'] / loaded['import_seconds']:,.0f} explanations/s), full-text index online "
        f"{loaded['indexed_seconds']:.0f} s after the import started; writing the files "
        f"{loaded['write_seconds']:.0f} s ({how})")
    say(f"\n{'figure':34} {'p50 ms':>8} {'p95 ms':>8} {'target':>8} {'p95/lineage':>12}  notes")
    rows = [(name, r) for name, r in out.items() if name != "render"]
    rows += [("render: body data-ready", out["render"]["ready"]), ("render: #flow-graph svg", out["render"]["svg"])]
    for name, r in rows:
        if r is None:
            say(f"{name:34} (no flow graph drawn)")
            continue
        target = next((t for k, t in TARGETS_MS.items() if name.startswith(k)), None)
        shown = f"<= {target}" if target else ""
        met = "" if target is None else (" met" if r["p95"] <= target else " MISSED")
        notes = "; ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("p50", "p95"))
        say(f"{name:34} {r['p50']:8.1f} {r['p95']:8.1f} {shown:>8} {r['p95'] / base['p95']:11.1f}x  "
            f"{notes}{met}")
    if out["render"]["failed"]:
        say(f"pages that ended in an error: {', '.join(out['render']['failed'])}")
    say(f"\nrun time {wall / 60:.1f} min; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the loaded server for the next --keep run")
    parser.add_argument("--features", type=int, default=200)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--renders", type=int, default=20)
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]))
        return
    started = time.perf_counter()
    with loaded_server(args.keep) as (server, loaded, words):
        with explorer(server) as base:
            out = measure(base, server, words, args)
    report(out, loaded, time.perf_counter() - started)


if __name__ == "__main__":
    main()
