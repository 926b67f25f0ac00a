"""Reference computations for tests, written independently of flowdb's code paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]  # the checkout
DATA = Path(__file__).resolve().parent / "data"  # files tests read

PLACE_KIND = {"res": "residual", "mlp": "mlp", "att": "attention"}


def unit_decoder(pack_dir: Path, module: str, layer: int) -> np.ndarray:
    w = load_file(str(pack_dir / "saes" / module / f"layer_{layer}" / "sae_weights.safetensors"))["W_dec"]
    w = w.astype(np.float64)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def top_k(cos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest entries, largest first, as (columns, values): what a stable
    descending sort puts first (ties by column), from k passes of argmax, not a full sort."""
    work = cos.copy() if k > 1 else cos
    rows = np.arange(len(cos))
    columns = np.empty((len(cos), k), dtype=np.int64)
    for rank in range(k):
        columns[:, rank] = work.argmax(axis=1)
        if rank < k - 1:
            work[rows, columns[:, rank]] = -np.inf
    return columns, np.take_along_axis(cos, columns, axis=1)


def brute_force_top_k(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k cosine matches of raw rows, in float64: (scores, columns, every cosine)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos = unit(queries.astype(np.float64)) @ unit(base.astype(np.float64)).T
    columns, scores = top_k(cos, k)
    return scores, columns, cos


def brute_force_edges(pack_dir: Path, layers: int, k: int) -> pd.DataFrame:
    """Every top-k match by dense float64 cosines."""
    rows = []
    for layer in range(layers):
        queries = unit_decoder(pack_dir, "res", layer)
        for place in ("res", "mlp", "att"):
            src_layer = layer - 1 if place == "res" else layer
            if src_layer < 0:
                continue
            cos = queries @ unit_decoder(pack_dir, place, src_layer).T
            order, _ = top_k(cos, k)
            for dst, preds in enumerate(order):
                for rank, src in enumerate(preds, start=1):
                    rows.append((src_layer, place, int(src), layer, "res", dst, PLACE_KIND[place],
                                 float(cos[dst, src]), rank))
    columns = ["src_layer", "src_module", "src_index", "dst_layer", "dst_module", "dst_index",
               "kind", "cosine", "rank"]
    return pd.DataFrame(rows, columns=columns)


TIE = 1e-6  # float64 cosines closer than this may come in either order


def assert_edges_equal_brute_force(db, pack: str, pack_dir: Path, layers: int, k: int) -> int:
    """Every stored match edge of a pack, whole (source key, target key, kind, rank,
    cosine), against dense float64 cosines of the SAE files. At each rank the stored
    predecessor must be the brute-force one, or one whose exact cosine is within TIE of
    it (a tie, either order); its stored cosine must be its own exact cosine. Returns
    how many edges were checked: every edge stored for the pack, none missing."""
    stored = pd.DataFrame(db.read(
        "MATCH (s:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(d:Feature {pack: $pack}) "
        "RETURN s.key AS source, d.key AS target, toLower(type(e)) AS kind, e.rank AS rank, "
        "e.cosine AS cosine", pack=pack), columns=["source", "target", "kind", "rank", "cosine"])
    checked = 0
    for layer in range(layers):
        queries = unit_decoder(pack_dir, "res", layer)
        for place, kind in PLACE_KIND.items():
            src_layer = layer - 1 if place == "res" else layer
            if src_layer < 0:
                continue
            cos = queries @ unit_decoder(pack_dir, place, src_layer).T
            n = len(cos)
            part = stored[(stored["kind"] == kind) & stored["target"].str.startswith(f"{pack}/{layer}/")]
            target = part["target"].str.rsplit("/", n=1)
            source = part["source"].str.rsplit("/", n=1)
            assert (target.str[0] == f"{pack}/{layer}/res").all(), (layer, kind)
            assert (source.str[0] == f"{pack}/{src_layer}/{place}").all(), (layer, kind)
            part = part.assign(dst=target.str[1].astype(int), src=source.str[1].astype(int))
            part = part.sort_values(["dst", "rank"])
            assert len(part) == n * k, (layer, kind, len(part), n * k)
            assert (part["dst"].to_numpy() == np.repeat(np.arange(n), k)).all(), (layer, kind)
            assert (part["rank"].to_numpy() == np.tile(np.arange(1, k + 1), n)).all(), (layer, kind)
            chosen = part["src"].to_numpy().reshape(n, k)
            assert all(len(set(row)) == k for row in chosen), f"a predecessor repeats at {layer}/{kind}"
            exact = np.take_along_axis(cos, chosen, axis=1)
            np.testing.assert_allclose(part["cosine"].to_numpy().reshape(n, k), exact, atol=1e-5,
                                       err_msg=f"stored cosine is not its predecessor's at {layer}/{kind}")
            order, best = top_k(cos, k)
            wrong = np.argwhere(np.abs(exact - best) > TIE)
            if len(wrong):
                dst, rank = wrong[0]
                raise AssertionError(
                    f"{len(wrong)} wrong predecessor(s) at layer {layer} {kind}; first "
                    f"{pack}/{layer}/res/{dst} rank {rank + 1}: stored {place} {chosen[dst, rank]} "
                    f"(cosine {exact[dst, rank]:.7f}), brute force {order[dst, rank]} "
                    f"(cosine {best[dst, rank]:.7f})")
            checked += len(part)
    assert checked == len(stored), f"{len(stored) - checked} stored edge(s) outside the pack's layers"
    return checked


def sort_edges(frame: pd.DataFrame) -> pd.DataFrame:
    keys = ["dst_layer", "dst_index", "kind", "rank"]
    return frame.sort_values(keys).reset_index(drop=True)


class ReferenceGraph:
    """The flow graph rebuilt in plain Python from brute-force matches, to check
    query templates against. Nodes are keys "PACK/LAYER/MODULE/INDEX"."""

    def __init__(self, pack: str, edges: pd.DataFrame, t_res: float, t_mod: float):
        self.pack = pack
        self.edges = [
            (f"{pack}/{r.src_layer}/{r.src_module}/{r.src_index}", f"{pack}/{r.dst_layer}/res/{r.dst_index}",
             r.kind, float(r.cosine), int(r.rank)) for r in edges.itertuples()]
        self.into: dict[str, list] = {}
        self.out_of: dict[str, list] = {}
        for edge in self.edges:
            self.into.setdefault(edge[1], []).append(edge)
            self.out_of.setdefault(edge[0], []).append(edge)
        top1: dict[tuple[str, str], float] = {}
        for _src, dst, kind, cos, rank in self.edges:
            if rank == 1:
                top1[(dst, kind)] = cos
        self.category = {}
        for dst in {e[1] for e in self.edges} | self._first_layer_keys(edges):
            high_res = top1.get((dst, "residual"), -2) >= t_res
            high_mod = top1.get((dst, "mlp"), -2) >= t_mod or top1.get((dst, "attention"), -2) >= t_mod
            self.category[dst] = ("processed" if high_mod else "translated") if high_res else (
                "newborn" if high_mod else "from-nowhere")

    def _first_layer_keys(self, edges):
        return {f"{self.pack}/{r.dst_layer}/res/{r.dst_index}" for r in edges.itertuples()}

    @staticmethod
    def _keep(edge, t_res, t_mod, max_rank):
        _, _, kind, cos, rank = edge
        return rank <= max_rank and cos >= (t_res if kind == "residual" else t_mod)

    def ancestors(self, key, t_res, max_rank):
        """Residual chain backwards, key included."""
        found, todo = {key}, [key]
        while todo:
            for edge in self.into.get(todo.pop(), []):
                if edge[2] == "residual" and self._keep(edge, t_res, 2, max_rank) and edge[0] not in found:
                    found.add(edge[0])
                    todo.append(edge[0])
        return found

    def descendants(self, key, t_res, t_mod, max_rank):
        found, todo = set(), [key]
        while todo:
            for edge in self.out_of.get(todo.pop(), []):
                if self._keep(edge, t_res, t_mod, max_rank) and edge[1] not in found:
                    found.add(edge[1])
                    todo.append(edge[1])
        return found

    def lineage_edges(self, key, t_res, t_mod, max_rank):
        return {(src, dst, kind) for step in self.ancestors(key, t_res, max_rank)
                for src, dst, kind, cos, rank in self.into.get(step, [])
                if self._keep((src, dst, kind, cos, rank), t_res, t_mod, max_rank)}

    def flow_graph(self, key, t_res, t_mod, max_rank):
        chain = self.ancestors(key, t_res, max_rank) | self.descendants(key, t_res, t_mod, max_rank)
        links = {(src, dst, kind) for dst in chain for src, _, kind, cos, rank in self.into.get(dst, [])
                 if self._keep((src, dst, kind, cos, rank), t_res, t_mod, max_rank)
                 and (kind != "residual" or src in chain)}
        return chain | {src for src, _, _ in links}, links


# Properties that record when something was written, not what: they differ between runs.
RUN_PROPERTIES = {"created_at", "completed_at"}


def graph_dump(db, pack: str) -> dict:
    """A canonical description of everything stored for a pack: every node of it (labels
    and properties, timestamps left out) and every relationship between them (type,
    endpoints and properties), each sorted, so two builds compare with ==."""
    def clean(props: dict) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in props.items() if k not in RUN_PROPERTIES))

    nodes = db.read(
        "MATCH (n) WHERE n.pack = $pack OR n.name = $pack RETURN labels(n) AS labels, properties(n) AS props",
        pack=pack)
    rels = db.read(
        "MATCH (a)-[r]->(b) WHERE (a.pack = $pack OR a.name = $pack) AND (b.pack = $pack) "
        "RETURN type(r) AS type, coalesce(a.key, a.name, 'nowhere:' + a.pack) AS source, "
        "b.key AS target, properties(r) AS props", pack=pack)
    return {"nodes": sorted((tuple(sorted(row["labels"])), clean(row["props"])) for row in nodes),
            "relationships": sorted((row["type"], row["source"], row["target"], clean(row["props"]))
                                    for row in rels)}


def settled(db, read, timeout=60.0):
    """read() once the server runs no transaction but the one asking. A COMMIT a killed
    client sent just before dying is still applied by the server, and Neo4j (read
    committed) lets a reader see a commit that is being applied in part; a transaction is
    listed until it has closed (committed, or rolled back once the server sees its
    client's connection gone), so none listed means every write has landed."""
    deadline = time.monotonic() + timeout
    # An idle open transaction has no current query: counted, as everything but the asker is.
    while db.read("SHOW TRANSACTIONS YIELD currentQuery RETURN count(*) - sum(CASE WHEN currentQuery "
                  "STARTS WITH 'SHOW TRANSACTIONS' THEN 1 ELSE 0 END) AS n")[0]["n"]:
        assert time.monotonic() < deadline, "the killed command's transactions never closed"
        time.sleep(0.02)
    return read()


def kill_when(proc, reached, delay: float = 0.0, timeout: float = 300.0) -> str:
    """SIGKILL a running command once reached() holds and `delay` seconds more have
    passed; fail unless the kill is what ended it (a command that finishes, or dies,
    before its kill point fails the test). Returns its output."""
    deadline = time.monotonic() + timeout
    while not reached():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}) before its kill point: "
                                 f"{proc.communicate()[0]}")
        assert time.monotonic() < deadline, "the command did not reach its kill point in time"
        time.sleep(0.01)
    time.sleep(delay)
    proc.kill()
    try:
        output = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        raise AssertionError("the command outlived SIGKILL") from None
    # A process that exited before the signal is reaped with its own exit status.
    assert proc.returncode == -signal.SIGKILL, f"the command ended by itself (exit {proc.returncode}): {output}"
    return output


# --- running the command line in a subprocess -----------------------------------------------

@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the command's own peak resident memory (VmHWM at exit)


# The command line, reporting its peak memory at exit. Not getrusage: a child's
# ru_maxrss starts at the RSS of the process it was forked from (here pytest's), as
# Linux keeps the high-water mark across exec; VmHWM belongs to the new program alone.
_REPORTING_CLI = """
import atexit, sys
report = sys.argv.pop(1)

def write_peak():
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

atexit.register(write_peak)
from flowdb.cli import cli
cli(prog_name="flowdb")
"""


def run_flowdb(*args, timeout: float = 120, env: dict | None = None) -> Finished:
    """`flowdb ARGS` in a fresh interpreter; a hang fails the test at `timeout` seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        try:
            done = subprocess.run([sys.executable, "-c", _REPORTING_CLI, str(report), *map(str, args)],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise AssertionError(f"flowdb {' '.join(map(str, args))} still ran after {timeout} s") from None
        return Finished(done.returncode, done.stdout, done.stderr, int(report.read_text()) * 1024)  # kB


def assert_one_line_error(result: Finished, *fragments: str) -> str:
    """A refusal as the house rules want it: non-zero exit, one "Error:" line on stderr,
    no traceback; returns that line."""
    assert result.code != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def serve(handler):
    """A threaded HTTP server on 127.0.0.1 (a free port) running `handler`; shut it down after."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# The public export's explanation fields (formats.md), in order.
EXPORT_FIELDS = ("id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName",
                 "explanationModelName", "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity")


def export_row(n, source, index, description):
    values = {"id": f"clx{n:06d}", "modelId": "planted-model", "layer": source, "index": str(index),
              "authorId": "auto", "description": description, "embedding": [0.1, 0.2],
              "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini",
              "umap_x": 1.5, "umap_y": -2.0, "umap_cluster": 7, "umap_log_feature_sparsity": -4.2}
    return {field: values[field] for field in EXPORT_FIELDS}


def write_export(root, rows_by_source):
    """The bucket layout: v1/{modelId}/{source}/explanations/batch-N.jsonl.gz."""
    import gzip
    import json

    for source, rows in rows_by_source.items():
        directory = root / "v1" / "planted-model" / source / "explanations"
        directory.mkdir(parents=True, exist_ok=True)
        for batch, start in enumerate(range(0, len(rows), 1024)):
            with gzip.open(directory / f"batch-{batch}.jsonl.gz", "wt") as handle:
                for row in rows[start:start + 1024]:
                    handle.write(json.dumps(row) + "\n")
