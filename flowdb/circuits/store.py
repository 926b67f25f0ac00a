"""Attribution graphs in Neo4j, beside the packs:

    (:AttributionGraph {slug, scan, prompt, prompt_tokens, transcoder_list, node_threshold,
                        schema_version, metadata (JSON), qparams (JSON), digest (sha256 of the
                        file), content_digest, file, nodes, links, pack, module, imported})
    (:GraphNode {graph (the slug), node_id, ord, kind: feature|error|embedding|logit, layer
                 (string), ctx_idx, feature, index (a feature node's transcoder index),
                 feature_type, activation, influence, token_prob, is_target_logit, clerp,
                 jsNodeId, run_idx, reverse_ctx_idx})
    (:GraphNode)-[:ATTRIBUTES {weight, ord}]->(:GraphNode)    weights exactly the file's
    (:GraphNode)-[:IS]->(:Feature)    the feature PACK/LAYER/MODULE/INDEX of the tied pack

A graph's feature nodes are tied to one pack's features: the pack given (--pack, with its
module), or else, automatically, the one stored pack whose [modules.mlp] is a transcoder
set of the graph's metadata.scan (flowdb.packs.transcoders), when exactly one is; the
report says which pack, or why none.

A graph is written whole in one transaction, in batches of a few thousand rows, so a
failure leaves nothing of it and a reader sees it whole or not at all. Small graphs share
a transaction (up to GROUP_ROWS nodes and links, their rows pooled in the batches), since
many of them would otherwise pay a commit and round trips each; when such a transaction
fails, its graphs are written again one per transaction, so the graphs before the failing
one are kept and the error is that graph's. The same content under a stored slug changes
nothing; other content under it is refused unless replace=True, which swaps the old graph
for the new one in the transaction that writes it.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from flowdb.circuits.schema import NODE_FIELDS, GraphFile, GraphFileError, kind_of, read_graph_file, transcoder_index
from flowdb.errors import FlowdbError, Neo4jUnavailable, NotFound
from flowdb.modules import MODULES
from flowdb.store import graph

if TYPE_CHECKING:
    from flowdb.store.database import Database

BATCH = 2_000
GROUP_ROWS = 20_000  # nodes and links of small graphs written in one transaction
INDEX_FILE = "graph-metadata.json"  # circuit-tracer's list of the graphs in a directory, not a graph


class GraphConflict(FlowdbError):
    """Another graph is stored under the slug; --replace swaps it."""


@dataclass(frozen=True)
class ImportReport:
    slug: str
    file: str
    status: str  # stored | replaced | unchanged
    nodes: int
    links: int
    ties: int  # (:GraphNode)-[:IS]->(:Feature) written
    pack: str | None = None  # the pack its feature nodes are tied to
    tie_note: str = ""  # how that pack was chosen, or why none was


@dataclass(frozen=True)
class Tie:
    """Which pack and module a graph's feature nodes are tied to (pack None: none), and why."""

    pack: str | None
    module: str
    note: str

    def describe(self) -> str:
        return f"tied to pack {self.pack!r} ({self.module})" if self.pack else "tied to no pack"


def transcoder_packs(db: Database) -> dict[str, list[str]]:
    """scan -> the complete stored packs whose mlp module is a transcoder set of that scan
    (read from each pack's stored build plan)."""
    found: dict[str, list[str]] = {}
    for row in db.read("MATCH (p:Pack {status: 'complete'}) WHERE NOT p.name CONTAINS '~' "
                       "RETURN p.name AS name, p.plan AS plan ORDER BY name"):
        plan = json.loads(row["plan"] or "{}")
        scans = {sae.get("scan") for sae in plan.get("saes", [])
                 if sae.get("module") == "mlp" and sae.get("kind") == "transcoders"}
        for scan in scans - {None}:
            found.setdefault(scan, []).append(row["name"])
    return found


def automatic_tie(scan: str, packs: dict[str, list[str]]) -> Tie:
    """The one stored pack whose mlp transcoder set has this scan, else no tie and why."""
    names = packs.get(scan, [])
    if len(names) == 1:
        return Tie(names[0], "mlp", f"its mlp module is the transcoder set of scan {scan!r}")
    if names:
        return Tie(None, "mlp", f"packs {', '.join(map(repr, names))} all have the transcoder set of "
                                f"scan {scan!r}; choose one with --pack")
    return Tie(None, "mlp", f"no stored pack's mlp module is a transcoder set of scan {scan!r} "
                            "(--pack ties them to a pack by hand)")


def graph_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given and a directory's *.json files (circuit-tracer's graph_file_dir);
    graph-metadata.json, circuit-tracer's index of a directory's graphs, is never a graph."""
    found: list[Path] = []
    paths = list(paths)
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.glob("*.json") if p.is_file() and p.name != INDEX_FILE)
            if not inside:
                raise GraphFileError(f"{path}: a directory with no graph .json files")
            found.extend(inside)
        elif path.is_file():
            if path.name != INDEX_FILE:
                found.append(path)
        else:
            raise GraphFileError(f"{path}: no such file or directory")
    if not found:
        raise GraphFileError(f"{', '.join(map(str, paths))}: no graph files (only {INDEX_FILE})")
    return found


def import_graphs(db: Database, paths: Iterable[str | Path], replace: bool = False, pack: str | None = None,
                  module: str = "mlp") -> list[ImportReport]:
    """Check every file first (one bad file: nothing stored), then write each graph in one
    transaction. pack: tie feature nodes to that pack's MODULE features at (layer, index);
    without it, to the one stored pack whose mlp transcoder set has the graph's scan."""
    files = [read_graph_file(path) for path in graph_files(paths)]
    by_slug: dict[str, GraphFile] = {}
    for graph_file in files:
        other = by_slug.get(graph_file.slug)
        if other is not None and other.content_digest != graph_file.content_digest:
            raise GraphConflict(f"{graph_file.path}: metadata.slug: {graph_file.slug!r} is also the slug of "
                                f"{other.path}, with other content")
        by_slug[graph_file.slug] = graph_file
    if pack is not None:
        from flowdb.store.graph import require_pack

        if module not in MODULES:
            raise FlowdbError(f"module {module!r} is not one of {', '.join(MODULES)}")
        require_pack(db, pack)
        tie_of = {slug: Tie(pack, module, "as --pack asked") for slug in by_slug}
    else:
        packs = transcoder_packs(db)
        tie_of = {slug: automatic_tie(graph_file.metadata.scan, packs) for slug, graph_file in by_slug.items()}
    graph.ensure_schema(db)  # the store's one schema, attribution graphs included
    stored = {row["slug"]: row for row in db.read(
        "UNWIND $slugs AS slug MATCH (g:AttributionGraph {slug: slug}) "
        "RETURN g.slug AS slug, g.content_digest AS content, g.pack AS pack, g.module AS module, g.file AS file",
        slugs=list(by_slug))}
    for slug, graph_file in by_slug.items():
        row = stored.get(slug)
        if row and not _same(row, graph_file, tie_of[slug]) and not replace:
            if row["content"] != graph_file.content_digest:
                why = f"from other content (from {row['file']})"
            else:
                why = f"{Tie(row['pack'], row['module'], '').describe()}, not {tie_of[slug].describe()}"
            raise GraphConflict(f"{graph_file.path}: metadata.slug: graph {slug!r} is stored {why}; "
                                "pass --replace to replace it")
    todo = [(graph_file, slug in stored) for slug, graph_file in by_slug.items()
            if not (slug in stored and _same(stored[slug], graph_file, tie_of[slug]))]
    ties: dict[str, int] = {}
    for group in _groups(todo):
        try:
            ties.update(_write_graphs(db, group, tie_of))
        except Neo4jUnavailable:
            raise
        except FlowdbError:
            if len(group) == 1:
                raise
            for one in group:  # the failing graph raises; those before it are kept
                ties.update(_write_graphs(db, [one], tie_of))
    reports = []
    for slug, graph_file in by_slug.items():
        status = "unchanged" if slug not in ties else "replaced" if slug in stored else "stored"
        reports.append(ImportReport(slug, graph_file.path, status, graph_file.n_nodes, graph_file.n_links,
                                    ties.get(slug, 0), tie_of[slug].pack, tie_of[slug].note))
    return reports


def _groups(todo: list[tuple[GraphFile, bool]]) -> Iterator[list[tuple[GraphFile, bool]]]:
    """Consecutive graphs of at most GROUP_ROWS nodes and links together; a larger one alone."""
    group, rows = [], 0
    for item in todo:
        size = item[0].n_nodes + item[0].n_links
        if group and rows + size > GROUP_ROWS:
            yield group
            group, rows = [], 0
        group.append(item)
        rows += size
    if group:
        yield group


def _same(row: dict, graph_file: GraphFile, tie: Tie) -> bool:
    return (row["content"] == graph_file.content_digest and row["pack"] == tie.pack
            and (tie.pack is None or row["module"] == tie.module))


def _batches(rows: Iterable[dict], size: int | None = None) -> Iterator[list[dict]]:
    size = size or BATCH  # read when called: a test sets a small BATCH
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Prefetched:
    """Batches made in a thread, at most two ahead, so reading and checking the file again
    overlaps the server's write of the batch before (the driver waits on the socket)."""

    _END = object()

    def __init__(self, batches: Iterator[list[dict]]):
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._make, args=(batches,), daemon=True)
        self.thread.start()

    def _make(self, batches: Iterator[list[dict]]) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the writer, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[list[dict]]:
        try:
            while (item := self.queue.get()) is not self._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            self.thread.join()


def _node_rows(graph_file: GraphFile) -> Iterator[dict]:
    for ord_, node in enumerate(graph_file.nodes()):
        row = node.model_dump()
        row.update(graph=graph_file.slug, ord=ord_, kind=kind_of(node), layer=str(node.layer),
                   layer_int=isinstance(node.layer, int), index=transcoder_index(node))
        yield row


def _graph_properties(graph_file: GraphFile, tie: Tie) -> dict:
    metadata = graph_file.metadata
    return {
        "slug": metadata.slug, "scan": metadata.scan, "prompt": metadata.prompt,
        "prompt_tokens": metadata.prompt_tokens, "transcoder_list": metadata.transcoder_list,
        "node_threshold": metadata.node_threshold, "schema_version": metadata.schema_version,
        "metadata": json.dumps(metadata.model_dump(mode="json", exclude_none=True)),
        "qparams": json.dumps(graph_file.qparams.model_dump(mode="json", exclude_none=True)),
        "digest": graph_file.file_digest, "content_digest": graph_file.content_digest,
        "file": Path(graph_file.path).name, "nodes": graph_file.n_nodes,
        "links": graph_file.n_links, "pack": tie.pack, "module": tie.module if tie.pack else None,
        "imported": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _link_rows(graph_file: GraphFile) -> Iterator[dict]:
    for ord_, link in enumerate(graph_file.links()):
        yield {"g": graph_file.slug, "s": link.source, "t": link.target, "w": link.weight, "o": ord_}


def _write_graphs(db: Database, group: list[tuple[GraphFile, bool]], tie_of: dict[str, Tie]) -> dict[str, int]:
    """The graphs of a group in one transaction (a stored one first deleted when its flag
    says so); returns each slug's (:GraphNode)-[:IS]->(:Feature) count."""
    files = [graph_file for graph_file, _ in group]
    slugs = [graph_file.slug for graph_file in files]

    def work(tx) -> dict[str, int]:
        for graph_file, replace in group:
            if replace:
                _delete_in(tx, graph_file.slug)
        tx.run("UNWIND $props AS props CREATE (g:AttributionGraph) SET g = props",
               props=[_graph_properties(graph_file, tie_of[graph_file.slug]) for graph_file in files]).consume()
        for rows in _Prefetched(_batches(chain.from_iterable(map(_node_rows, files)))):
            tx.run("UNWIND $rows AS row CREATE (n:GraphNode) SET n = row", rows=rows).consume()
        for rows in _Prefetched(_batches(chain.from_iterable(map(_link_rows, files)))):
            tx.run("UNWIND $rows AS row "
                   "MATCH (s:GraphNode {graph: row.g, node_id: row.s}), (t:GraphNode {graph: row.g, node_id: row.t}) "
                   "CREATE (s)-[:ATTRIBUTES {weight: row.w, ord: row.o}]->(t)", rows=rows).consume()
        ties = dict.fromkeys(slugs, 0)
        tied = [{"slug": slug, "pack": tie_of[slug].pack, "module": tie_of[slug].module}
                for slug in slugs if tie_of[slug].pack is not None]
        if tied:
            for record in tx.run(
                    "UNWIND $tied AS t MATCH (n:GraphNode {graph: t.slug, kind: 'feature'}) WHERE n.index IS NOT NULL "
                    "MATCH (f:Feature {key: t.pack + '/' + n.layer + '/' + t.module + '/' + toString(n.index)}) "
                    "CREATE (n)-[:IS]->(f) RETURN t.slug AS slug, count(*) AS ties", tied=tied):
                ties[record["slug"]] = record["ties"]
        return ties

    with db.session() as session:
        return session.execute_write(work)


def _delete_in(tx, slug: str) -> None:
    while True:
        record = tx.run("MATCH (n:GraphNode {graph: $slug}) WITH n LIMIT $batch DETACH DELETE n "
                        "RETURN count(*) AS deleted", slug=slug, batch=BATCH).single()
        if not record["deleted"]:
            break
    tx.run("MATCH (g:AttributionGraph {slug: $slug}) DELETE g", slug=slug).consume()


def list_graphs(db: Database) -> list[dict]:
    return db.read("MATCH (g:AttributionGraph) RETURN g.slug AS slug, g.scan AS scan, g.prompt AS prompt, "
                   "g.nodes AS nodes, g.links AS links, g.pack AS pack, g.file AS file, g.digest AS digest, "
                   "g.imported AS imported ORDER BY slug")


def require_graph(db: Database, slug: str) -> dict:
    rows = db.read("MATCH (g:AttributionGraph {slug: $slug}) RETURN properties(g) AS g", slug=slug)
    if not rows:
        names = [row["slug"] for row in list_graphs(db)]
        raise NotFound(f"no attribution graph {slug!r} in {db.where}; stored graphs: "
                       f"{', '.join(names) if names else 'none; run flowdb circuits import first'}")
    return rows[0]["g"]


def delete_graph(db: Database, slug: str) -> int:
    """Delete one graph, its nodes and links, in one transaction; returns how many nodes."""
    found = require_graph(db, slug)

    def work(tx) -> None:
        _delete_in(tx, slug)

    with db.session() as session:
        session.execute_write(work)
    return found["nodes"]


def export_graph(db: Database, slug: str) -> dict:
    """The graph as circuit-tracer / Neuronpedia graph JSON, rebuilt from the store."""
    found = require_graph(db, slug)
    nodes = []
    for row in db.read("MATCH (n:GraphNode {graph: $slug}) RETURN properties(n) AS n ORDER BY n.ord", slug=slug):
        props = row["n"]
        node = {field: props.get(field) for field in NODE_FIELDS}
        if props.get("layer_int"):
            node["layer"] = int(props["layer"])
        nodes.append(node)
    links = [{"source": row["s"], "target": row["t"], "weight": row["w"]} for row in db.read(
        "MATCH (s:GraphNode {graph: $slug})-[r:ATTRIBUTES]->(t:GraphNode) "
        "RETURN s.node_id AS s, t.node_id AS t, r.weight AS w ORDER BY r.ord", slug=slug)]
    return {"metadata": json.loads(found["metadata"]), "qParams": json.loads(found["qparams"]),
            "nodes": nodes, "links": links}


def write_graph_json(db: Database, slug: str, out: str | Path) -> dict:
    """export_graph written to `out` whole (a temporary file replaced at the end); returns it."""
    document = export_graph(db, slug)
    write_document(document, out)
    return document


def write_document(document: dict, out: str | Path) -> None:
    """A graph document written to `out` whole, or not at all."""
    from flowdb.writes import atomic_write

    with atomic_write(out) as partial:
        partial.write_text(json.dumps(document, allow_nan=False), encoding="utf-8")
