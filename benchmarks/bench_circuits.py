"""Attribution graphs at scale: import rate and the cross-graph queries over N stored graphs,
each figure beside a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_circuits.py [--graphs 1000] [--runs 3] [--seed 0]

1. Writes N graph files in circuit-tracer 0.5.0's graph JSON (as create_graph_files writes
   them, graph-metadata.json included) into a temporary folder: a seeded generator, 8-16
   prompt positions, about 300-500 nodes and 3,000-4,000 links each, Gemma-2-2B-shaped (26
   layers), transcoder features drawn from one shared vocabulary with Zipf popularity so
   that features and edges recur across graphs.
2. Starts a fresh private managed Neo4j (its own store and port under FLOWDB_HOME/bench,
   deleted after) and imports the folder with flowdb.circuits.store.import_graphs, what
   `flowdb circuits import` runs: links/s, nodes/s, total time, and the time that checking
   the files alone takes (read_graph_file over every file, timed separately before).
3. recurring-features and recurring-edges (min_graphs 2) through run_template, the runner
   `flowdb query` uses: the median of --runs after one warm-up, for the first 100 rows (the
   CLI's default limit) and for every row. Baseline: a plain pandas script answering the
   same question from the JSON files (reading them included: what a user runs without a
   store). Its answer is compared with the template's, row by row: OK or MISMATCH.
4. Baseline for the import: the same server's raw write rate for the same rows (every
   node's and link's fields, UNWIND batches of 10,000 across graphs, no checks, one
   auto-commit transaction per batch, only the server calls timed), written after the
   queries under other labels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from bench_scale import connect_to, private_server

LAYERS = 26
VOCAB = 2_000  # transcoder features per layer that graphs draw from
ZIPF = 1.0  # popularity of the r-th most popular feature ~ 1 / r^ZIPF
MIN_GRAPHS = 2
RAW_BATCH = 10_000
TRANSCODER = "cross layer transcoder"
KINDS = {TRANSCODER: "feature", "mlp reconstruction error": "error", "embedding": "embedding", "logit": "logit"}


# --- the graph files -----------------------------------------------------------------------

def popularity(seed: int) -> np.ndarray:
    """Probability of each (layer, index) in the shared vocabulary, flattened layer-major."""
    rank = np.random.default_rng([seed, 0]).permutation(LAYERS * VOCAB) + 1
    weights = 1.0 / rank**ZIPF
    return weights / weights.sum()


def make_graph(slug: str, rng: np.random.Generator, p: np.ndarray) -> dict:
    """One pruned attribution graph as circuit-tracer's create_graph_files writes it
    (graph_models.Node fields, string layers, error nodes "0_{layer}_{pos}")."""
    n_pos = int(rng.integers(8, 17))
    token_ids = rng.integers(0, 256_000, n_pos)
    tokens = [f"tok{int(t)}" for t in token_ids]
    nodes, where = [], []  # where: (layer rank for the links' direction, position)

    def add(node: dict, level: int) -> None:
        nodes.append(node)
        where.append((level, node["ctx_idx"]))

    for pos, vocab in enumerate(token_ids):
        add({"node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos, "feature_type": "embedding",
             "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
             "jsNodeId": f"E_{vocab}-{pos}", "clerp": "", "influence": float(rng.random()), "activation": None}, -1)
    seen = set()
    drawn = rng.choice(len(p), size=int(rng.integers(260, 420)), p=p)
    positions = rng.integers(0, n_pos, len(drawn))
    for flat, pos in zip(drawn.tolist(), positions.tolist()):
        layer, index = divmod(flat, VOCAB)
        node_id = f"{layer}_{index}_{pos}"
        if node_id in seen:
            continue
        seen.add(node_id)
        add({"node_id": node_id, "feature": (layer + index) * (layer + index + 1) // 2 + index, "layer": str(layer),
             "ctx_idx": pos, "feature_type": TRANSCODER, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
             "reverse_ctx_idx": 0, "jsNodeId": f"{layer}_{index}-0",
             "clerp": f"feature {layer}/{index}" if index % 4 else "",  # a quarter unlabelled
             "influence": float(rng.random()), "activation": float(rng.random() * 20)}, layer)
    for _ in range(int(rng.integers(20, 40))):
        layer, pos = int(rng.integers(0, LAYERS)), int(rng.integers(0, n_pos))
        node_id = f"0_{layer}_{pos}"
        if node_id in seen:
            continue
        seen.add(node_id)
        add({"node_id": node_id, "feature": -1, "layer": str(layer), "ctx_idx": pos,
             "feature_type": "mlp reconstruction error", "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
             "reverse_ctx_idx": 0, "jsNodeId": f"{layer}_{pos}-0", "clerp": "", "influence": float(rng.random()),
             "activation": None}, layer)
    last = n_pos - 1
    for j, vocab in enumerate(rng.choice(20, size=int(rng.integers(3, 8)), replace=False)):  # few target tokens
        prob = float(rng.random())
        add({"node_id": f"{LAYERS + 1}_{vocab}_{last}", "feature": int(vocab), "layer": str(LAYERS + 1),
             "ctx_idx": last, "feature_type": "logit", "token_prob": prob, "is_target_logit": j == 0, "run_idx": 0,
             "reverse_ctx_idx": 0, "jsNodeId": f"L_{vocab}-{last}", "clerp": f'Output "v{vocab}" (p={prob:.3f})',
             "influence": None, "activation": None}, LAYERS + 1)
    level, pos = (np.array(v) for v in zip(*where))
    allowed = (level[None, :] < level[:, None]) & (pos[None, :] <= pos[:, None])  # [target, source]
    scores = np.where(allowed, rng.random(allowed.shape), -1.0)
    per_target = rng.poisson(9, len(nodes))
    links = []
    for target in np.flatnonzero(allowed.any(axis=1)):
        k = min(int(per_target[target]), int(allowed[target].sum()))
        for source in np.argsort(-scores[target])[:k]:
            links.append({"source": nodes[source]["node_id"], "target": nodes[target]["node_id"],
                          "weight": float(rng.normal() * 2)})
    return {"metadata": {"slug": slug, "scan": "gemma-2-2b", "transcoder_list": [], "prompt_tokens": tokens,
                         "prompt": "".join(tokens), "node_threshold": 0.8, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def write_graphs(folder: Path, n: int, seed: int) -> tuple[list[Path], int, int]:
    """The files, and how many nodes and links they hold."""
    p = popularity(seed)
    files, n_nodes, n_links, index = [], 0, 0, []
    for i in range(n):
        slug = f"bench-{i:05d}"
        graph = make_graph(slug, np.random.default_rng([seed, 1, i]), p)
        files.append(folder / f"{slug}.json")
        files[-1].write_text(json.dumps(graph))
        n_nodes, n_links = n_nodes + len(graph["nodes"]), n_links + len(graph["links"])
        index.append(graph["metadata"])
    (folder / "graph-metadata.json").write_text(json.dumps({"graphs": index}))
    return files, n_nodes, n_links


# --- the pandas baseline ----------------------------------------------------------------------

def pandas_recurring_features(files: list[Path], min_graphs: int):
    import pandas as pd

    columns = {name: [] for name in ("graph", "layer", "feature", "ctx_idx", "influence", "activation", "clerp")}
    for path in files:
        graph = json.loads(path.read_text())
        for node in graph["nodes"]:
            if KINDS[node["feature_type"]] == "feature":
                columns["graph"].append(graph["metadata"]["slug"])
                for name in ("layer", "feature", "ctx_idx", "influence", "activation", "clerp"):
                    columns[name].append(node[name])
    frame = pd.DataFrame(columns).astype({"influence": float, "activation": float})
    keys = ["layer", "feature"]
    grouped = frame.groupby(keys).agg(graphs=("graph", "nunique"), mean_influence=("influence", "mean"),
                                      mean_activation=("activation", "mean"))
    labelled = frame[frame["clerp"] != ""].sort_values(["graph", "ctx_idx"], kind="stable")
    grouped["label"] = labelled.groupby(keys)["clerp"].first()
    return grouped[grouped["graphs"] >= min_graphs]


def pandas_recurring_edges(files: list[Path], min_graphs: int):
    import pandas as pd

    names = ("graph", "source_layer", "source_feature", "target_kind", "target_layer", "target_feature", "weight")
    columns = {name: [] for name in names}
    for path in files:
        graph = json.loads(path.read_text())
        slug = graph["metadata"]["slug"]
        ends = {n["node_id"]: (KINDS[n["feature_type"]], n["layer"], n["feature"]) for n in graph["nodes"]}
        for link in graph["links"]:
            source, target = ends[link["source"]], ends[link["target"]]
            if source[0] == "feature" and target[0] in ("feature", "logit"):
                for name, value in zip(names, (slug, source[1], source[2], *target, link["weight"])):
                    columns[name].append(value)
    frame = pd.DataFrame(columns)
    grouped = frame.groupby(list(names[1:-1])).agg(graphs=("graph", "nunique"), links=("weight", "size"),
                                                   mean_weight=("weight", "mean"))
    return grouped[grouped["graphs"] >= min_graphs]


def same_features(frame, expected) -> bool:
    got = frame.set_index(["layer", "feature"]).sort_index()
    expected = expected.sort_index()
    if list(got.index) != list(expected.index):
        return False
    return bool((got["graphs"].to_numpy() == expected["graphs"].to_numpy()).all()
                and (got["label"].fillna("").to_numpy() == expected["label"].fillna("").to_numpy()).all()
                and np.allclose(got["mean_influence"], expected["mean_influence"], rtol=1e-9, atol=0)
                and np.allclose(got["mean_activation"], expected["mean_activation"], rtol=1e-9, atol=0))


def same_edges(frame, expected) -> bool:
    keys = ["source_layer", "source_feature", "target_kind", "target_layer", "target_feature"]
    got = frame.set_index(keys).sort_index()
    expected = expected.sort_index()
    if list(got.index) != list(expected.index):
        return False
    return bool((got["graphs"].to_numpy() == expected["graphs"].to_numpy()).all()
                and (got["links"].to_numpy() == expected["links"].to_numpy()).all()
                and np.allclose(got["mean_weight"], expected["mean_weight"], rtol=1e-9, atol=1e-12))


# --- the server's raw write rate ----------------------------------------------------------------

def raw_write(db, files: list[Path]) -> dict:
    """Every node and link of the files written as plainly as the server takes them; returns
    the seconds spent in server calls for nodes and for links."""
    db.write("CREATE CONSTRAINT raw_node_id IF NOT EXISTS FOR (n:RawNode) REQUIRE (n.graph, n.node_id) IS UNIQUE")
    spent = {"nodes": 0.0, "links": 0.0}
    cypher = {"nodes": "UNWIND $rows AS row CREATE (n:RawNode) SET n = row",
              "links": "UNWIND $rows AS row MATCH (s:RawNode {graph: row.g, node_id: row.s}), "
                       "(t:RawNode {graph: row.g, node_id: row.t}) CREATE (s)-[:RAW {weight: row.w, ord: row.o}]->(t)"}

    def flush(kind: str, rows: list) -> None:
        started = time.perf_counter()
        db.write(cypher[kind], rows=rows)
        spent[kind] += time.perf_counter() - started
        rows.clear()

    for kind in ("nodes", "links"):  # every node first: a batch's links may be any graph's
        rows: list[dict] = []
        for path in files:
            graph = json.loads(path.read_text())
            slug = graph["metadata"]["slug"]
            if kind == "nodes":
                rows.extend({**node, "graph": slug, "ord": i} for i, node in enumerate(graph["nodes"]))
            else:
                rows.extend({"g": slug, "s": link["source"], "t": link["target"], "w": link["weight"], "o": i}
                            for i, link in enumerate(graph["links"]))
            if len(rows) >= RAW_BATCH:
                flush(kind, rows)
        if rows:
            flush(kind, rows)
    return spent


# --- the run ------------------------------------------------------------------------------------

def timed(call, runs: int) -> tuple[float, object]:
    """The median seconds of `runs` calls after one warm-up, and the last answer."""
    answer = call()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=1_000, help="how many graph files (default 1,000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each query, after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.graphs < 2 or args.runs < 1:
        parser.error("--graphs must be at least 2 and --runs at least 1")
    say = lambda text: print(text, flush=True)  # noqa: E731
    folder = Path(tempfile.mkdtemp(prefix="flowdb-bench-circuits-"))
    try:
        started = time.perf_counter()
        files, n_nodes, n_links = write_graphs(folder, args.graphs, args.seed)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        say(f"wrote {len(files):,} graph files (circuit-tracer 0.5.0 graph JSON, {LAYERS} layers, a shared "
            f"vocabulary of {LAYERS * VOCAB:,} features): {n_nodes:,} nodes, {n_links:,} links, {megabytes:,.0f} MB, "
            f"in {time.perf_counter() - started:.0f} s (not timed below)")
        run(folder, files, n_nodes, n_links, args.runs, say)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(folder: Path, files: list[Path], n_nodes: int, n_links: int, runs: int, say) -> None:
    from flowdb.circuits.schema import read_graph_file
    from flowdb.circuits.store import import_graphs
    from flowdb.store.templates import MAX_LIMIT, run_template

    started = time.perf_counter()
    for path in files:
        read_graph_file(path)
    checking = time.perf_counter() - started
    with private_server("neo4j-circuits") as server, connect_to(server) as db:
        started = time.perf_counter()
        reports = import_graphs(db, [folder])
        seconds = time.perf_counter() - started
        assert sum(r.status == "stored" for r in reports) == len(files)
        rate = n_links / seconds
        say(f"flowdb import_graphs ({len(files):,} graphs, one call): {seconds:.1f} s, {rate:,.0f} links/s, "
            f"{n_nodes / seconds:,.0f} nodes/s, {seconds / len(files) * 1e3:.0f} ms per graph; checking the files "
            f"alone (read_graph_file, timed before) {checking:.1f} s, {checking / seconds:.0%} of it")

        answers = {}
        for name, pandas_answer, same in (("recurring-features", pandas_recurring_features, same_features),
                                          ("recurring-edges", pandas_recurring_edges, same_edges)):
            first, _ = timed(partial(run_template, db, name, {"min_graphs": MIN_GRAPHS}, timeout_s=600), runs)
            every, frame = timed(partial(run_template, db, name, {"min_graphs": MIN_GRAPHS, "limit": MAX_LIMIT},
                                         timeout_s=600), runs)
            baseline, expected = timed(partial(pandas_answer, files, MIN_GRAPHS), 1)
            verdict = "OK" if len(frame) < MAX_LIMIT and same(frame, expected) else "MISMATCH"
            answers[name] = verdict
            say(f"{name} (min_graphs {MIN_GRAPHS}) over {len(files):,} stored graphs, median of {runs}: "
                f"{first:.2f} s for the first 100 rows, {every:.2f} s for every row ({len(frame):,}); "
                f"baseline, pandas from the JSON files: {baseline:.2f} s, so the store answers in "
                f"{every / baseline:.0%} of its time; same answer as pandas: {verdict}")

        spent = raw_write(db, files)
        raw_rate = n_links / spent["links"]
        say(f"baseline, the server's raw write rate for the same rows (UNWIND batches of {RAW_BATCH:,} across graphs, "
            f"no checks, server time only): links {raw_rate:,.0f}/s ({spent['links']:.1f} s), nodes "
            f"{n_nodes / spent['nodes']:,.0f}/s ({spent['nodes']:.1f} s); flowdb's import end to end is "
            f"{seconds / (spent['links'] + spent['nodes']):.2f}x the raw writes' time")
    if "MISMATCH" in answers.values():
        sys.exit(1)


if __name__ == "__main__":
    main()
