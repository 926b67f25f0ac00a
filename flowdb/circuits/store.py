"""Attribution graphs in Neo4j, beside the packs:

    (:AttributionGraph {slug, scan, prompt, prompt_tokens, transcoder_list, node_threshold,
                        schema_version, metadata (JSON), qparams (JSON), digest (sha256 of the
                        file), content_digest, file, nodes, links, pack, module, imported})
    (:GraphNode {graph (the slug), node_id, ord, kind: feature|error|embedding|logit, layer
                 (string), ctx_idx, feature, index (a feature node's transcoder index),
                 feature_type, activation, influence, token_prob, is_target_logit, clerp,
                 jsNodeId, run_idx, reverse_ctx_idx})
    (:GraphNode)-[:ATTRIBUTES {weight, ord}]->(:GraphNode)    weights exactly the file's
    (:GraphNode)-[:IS]->(:Feature)    with --pack: the feature PACK/LAYER/MODULE/INDEX

A graph is written in one transaction, in batches of a few thousand rows, so a failure
leaves nothing of it and a reader sees it whole or not at all. The same content under a
stored slug changes nothing; other content under it is refused unless replace=True, which
swaps the old graph for the new one in that same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from flowdb.circuits.schema import NODE_FIELDS, GraphFile, GraphFileError, kind_of, read_graph_file, transcoder_index
from flowdb.errors import FlowdbError, NotFound
from flowdb.modules import MODULES
from flowdb.store import graph

if TYPE_CHECKING:
    from flowdb.store.database import Database

BATCH = 2_000
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
    transaction. pack: tie feature nodes to that pack's MODULE features at (layer, index)."""
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
    graph.ensure_schema(db)  # the store's one schema, attribution graphs included
    stored = {row["slug"]: row for row in db.read(
        "UNWIND $slugs AS slug MATCH (g:AttributionGraph {slug: slug}) "
        "RETURN g.slug AS slug, g.content_digest AS content, g.pack AS pack, g.module AS module, g.file AS file",
        slugs=list(by_slug))}
    for slug, graph_file in by_slug.items():
        row = stored.get(slug)
        if row and not _same(row, graph_file, pack, module) and not replace:
            if row["content"] != graph_file.content_digest:
                why = f"from other content (from {row['file']})"
            else:
                def tie(p, m):
                    return f"tied to pack {p!r} ({m})" if p else "tied to no pack"
                why = f"{tie(row['pack'], row['module'])}, not {tie(pack, module)}"
            raise GraphConflict(f"{graph_file.path}: metadata.slug: graph {slug!r} is stored {why}; "
                                "pass --replace to replace it")
    reports = []
    for slug, graph_file in by_slug.items():
        row = stored.get(slug)
        if row and _same(row, graph_file, pack, module):
            reports.append(ImportReport(slug, graph_file.path, "unchanged", graph_file.n_nodes,
                                        graph_file.n_links, 0))
            continue
        ties = _write_graph(db, graph_file, pack, module, replace=row is not None)
        reports.append(ImportReport(slug, graph_file.path, "replaced" if row else "stored",
                                    graph_file.n_nodes, graph_file.n_links, ties))
    return reports


def _same(row: dict, graph_file: GraphFile, pack: str | None, module: str) -> bool:
    return (row["content"] == graph_file.content_digest and row["pack"] == pack
            and (pack is None or row["module"] == module))


def _batches(rows: Iterable[dict], size: int = BATCH) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _node_rows(graph_file: GraphFile) -> Iterator[dict]:
    for ord_, node in enumerate(graph_file.nodes()):
        row = node.model_dump()
        row.update(graph=graph_file.slug, ord=ord_, kind=kind_of(node), layer=str(node.layer),
                   layer_int=isinstance(node.layer, int), index=transcoder_index(node))
        yield row


def _graph_properties(graph_file: GraphFile, pack: str | None, module: str) -> dict:
    metadata = graph_file.metadata
    return {
        "slug": metadata.slug, "scan": metadata.scan, "prompt": metadata.prompt,
        "prompt_tokens": metadata.prompt_tokens, "transcoder_list": metadata.transcoder_list,
        "node_threshold": metadata.node_threshold, "schema_version": metadata.schema_version,
        "metadata": json.dumps(metadata.model_dump(mode="json", exclude_none=True)),
        "qparams": json.dumps(graph_file.qparams.model_dump(mode="json", exclude_none=True)),
        "digest": graph_file.file_digest, "content_digest": graph_file.content_digest,
        "file": Path(graph_file.path).name, "nodes": graph_file.n_nodes,
        "links": graph_file.n_links, "pack": pack, "module": module if pack else None,
        "imported": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_graph(db: Database, graph_file: GraphFile, pack: str | None, module: str, replace: bool) -> int:
    slug = graph_file.slug

    def work(tx) -> int:
        if replace:
            _delete_in(tx, slug)
        tx.run("CREATE (g:AttributionGraph) SET g = $props",
               props=_graph_properties(graph_file, pack, module)).consume()
        for rows in _batches(_node_rows(graph_file)):
            tx.run("UNWIND $rows AS row CREATE (n:GraphNode) SET n = row", rows=rows).consume()
        links = ({"s": link.source, "t": link.target, "w": link.weight, "o": i}
                 for i, link in enumerate(graph_file.links()))
        for rows in _batches(links):
            tx.run("UNWIND $rows AS row "
                   "MATCH (s:GraphNode {graph: $slug, node_id: row.s}), (t:GraphNode {graph: $slug, node_id: row.t}) "
                   "CREATE (s)-[:ATTRIBUTES {weight: row.w, ord: row.o}]->(t)", rows=rows, slug=slug).consume()
        if pack is None:
            return 0
        record = tx.run(
            "MATCH (n:GraphNode {graph: $slug, kind: 'feature'}) WHERE n.index IS NOT NULL "
            "MATCH (f:Feature {key: $pack + '/' + n.layer + '/' + $module + '/' + toString(n.index)}) "
            "CREATE (n)-[:IS]->(f) RETURN count(*) AS ties", slug=slug, pack=pack, module=module).single()
        return record["ties"]

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
