"""Writes builds into Neo4j: the feature-flow graph's data model lives here.

    (:Pack {name, model, fingerprint, k, thresholds, status, layers_done, ...})
    (:Pack)-[:HAS_SAE]->(:SAE {key, pack, layer, module, source, hook_name, d_in, d_sae,
                              neuronpedia, t_res, t_mlp, t_att})
    (:Feature:Residual|MLP|Attention {key: "PACK/LAYER/MODULE/INDEX", pack, layer, module, index})
        residual features also carry category, s_res, s_mlp, s_att
    (pred:Feature)-[:RESIDUAL|MLP|ATTENTION {cosine, rank}]->(f:Feature:Residual)
    (:Nowhere {pack})-[:FROM_NOWHERE]->(f)   for f of category from-nowhere

Every layer is one transaction (nodes, edges, provenance and the pack's
layers_done together), so readers see a layer whole or not at all, and a run
killed mid-layer resumes at that layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from flowdb.build import LayerBuild
from flowdb.database import Database
from flowdb.manifest import Manifest

MODULE_LABEL = {"res": "Residual", "mlp": "MLP", "att": "Attention"}
EDGE_TYPE = {"res": "RESIDUAL", "mlp": "MLP", "att": "ATTENTION"}
DELETE_BATCH = 10_000


def feature_key(pack: str, layer: int, module: str, index: int) -> str:
    return f"{pack}/{layer}/{module}/{index}"


@dataclass(frozen=True)
class StoredPack:
    name: str
    fingerprint: str
    status: str  # building | complete | dropping
    layers_done: tuple[int, ...]


def stored_pack(db: Database, name: str) -> StoredPack | None:
    rows = db.read("MATCH (p:Pack {name: $name}) "
                   "RETURN p.fingerprint AS fp, p.status AS status, p.layers_done AS done",
                   name=name)
    if not rows:
        return None
    row = rows[0]
    return StoredPack(name, row["fp"], row["status"], tuple(row["done"] or ()))


def begin_pack(db: Database, manifest: Manifest, build_id: str, version: str, backend: str) -> None:
    db.write(
        "CREATE (p:Pack {name: $name, model: $model, fingerprint: $fp, k: $k, "
        " first_layer: $first, last_layer: $last, modules: $modules, thresholds: $thresholds, "
        " manifest: $manifest, flowdb_version: $version, matcher: $backend, "
        " created_at: datetime($now), status: 'building', layers_done: []}) "
        "CREATE (:Nowhere {pack: $name})",
        name=manifest.name, model=manifest.model, fp=build_id, k=manifest.k,
        first=manifest.first_layer, last=manifest.last_layer, modules=sorted(manifest.modules),
        thresholds=json.dumps(manifest.thresholds.spec()), manifest=str(manifest.path),
        version=version, backend=backend, now=datetime.now(timezone.utc).isoformat())


def finish_pack(db: Database, name: str) -> None:
    db.write("MATCH (p:Pack {name: $name}) SET p.status = 'complete', "
             "p.completed_at = datetime()", name=name)


def write_layer(db: Database, pack: str, layer: LayerBuild) -> tuple[int, int]:
    """Write one layer in one transaction; returns (match edges, FROM_NOWHERE marks)."""
    with db.session() as session:
        return session.execute_write(_write_layer, pack, layer)


def _write_layer(tx, pack: str, layer: LayerBuild) -> tuple[int, int]:
    number = layer.layer
    s = {place: _nullable(layer.top1(place)) for place in ("res", "mlp", "att")}
    tx.run(
        "UNWIND range(0, size($category) - 1) AS i "
        "CREATE (:Feature:Residual {key: $prefix + toString(i), pack: $pack, layer: $layer, "
        " module: 'res', index: i, category: $category[i], "
        " s_res: $s_res[i], s_mlp: $s_mlp[i], s_att: $s_att[i]})",
        prefix=f"{pack}/{number}/res/", pack=pack, layer=number,
        category=layer.categories.tolist(), s_res=s["res"], s_mlp=s["mlp"], s_att=s["att"],
    ).consume()
    for module in ("mlp", "att"):
        if module in layer.widths:
            tx.run(
                f"UNWIND range(0, $n - 1) AS i CREATE (:Feature:{MODULE_LABEL[module]} "
                "{key: $prefix + toString(i), pack: $pack, layer: $layer, module: $module, index: i})",
                n=layer.widths[module], prefix=f"{pack}/{number}/{module}/", pack=pack,
                layer=number, module=module,
            ).consume()
    edges = sum(_write_edges(tx, pack, layer, place) for place in layer.indices)
    nowhere = tx.run(
        "MATCH (n:Nowhere {pack: $pack}) "
        "MATCH (f:Feature {pack: $pack, layer: $layer, module: 'res'}) "
        "WHERE f.category = 'from-nowhere' CREATE (n)-[:FROM_NOWHERE]->(f)",
        pack=pack, layer=number).consume().counters.relationships_created
    t = layer.thresholds
    saes = [{**meta, "key": f"{pack}/{number}/{module}", "pack": pack, "layer": number,
             "module": module, "n_features": layer.widths[module]}
            for module, meta in layer.saes.items()]
    tx.run(
        "MATCH (p:Pack {name: $pack}) "
        "UNWIND $saes AS sae CREATE (p)-[:HAS_SAE]->(s:SAE) SET s = sae "
        "WITH p, s WHERE s.module = 'res' SET s.t_res = $t_res, s.t_mlp = $t_mlp, s.t_att = $t_att "
        "WITH DISTINCT p SET p.layers_done = p.layers_done + $layer",
        pack=pack, saes=saes, layer=number,
        t_res=_finite(t.t_res), t_mlp=_finite(t.t_mlp), t_att=_finite(t.t_att)).consume()
    return edges, nowhere


def _write_edges(tx, pack: str, layer: LayerBuild, place: str) -> int:
    scores, indices = layer.scores[place], layer.indices[place]
    n_res, k = indices.shape
    source_layer = layer.layer - 1 if place == "res" else layer.layer
    # Nodes are collected in index order once, so each edge is two list look-ups
    # rather than two index seeks.
    summary = tx.run(
        "MATCH (s:Feature {pack: $pack, layer: $src_layer, module: $src_module}) "
        "WITH s ORDER BY s.index WITH collect(s) AS sources "
        "MATCH (d:Feature {pack: $pack, layer: $layer, module: 'res'}) "
        "WITH sources, d ORDER BY d.index WITH sources, collect(d) AS targets "
        "UNWIND range(0, size($src) - 1) AS i "
        "WITH sources[$src[i]] AS a, targets[$dst[i]] AS b, i "
        f"CREATE (a)-[:{EDGE_TYPE[place]} {{cosine: $cosine[i], rank: $rank[i]}}]->(b)",
        pack=pack, src_layer=source_layer, src_module=place, layer=layer.layer,
        src=indices.reshape(-1).tolist(), dst=np.repeat(np.arange(n_res), k).tolist(),
        cosine=scores.reshape(-1).astype(float).tolist(), rank=np.tile(np.arange(1, k + 1), n_res).tolist(),
    ).consume()
    return summary.counters.relationships_created


def _nullable(values: np.ndarray) -> list | None:
    return None if np.isnan(values).all() else [None if np.isnan(v) else float(v) for v in values]


def _finite(value: float) -> float | None:
    return None if value != value else float(value)


def drop_pack(db: Database, name: str) -> None:
    """Delete a pack and everything of it, in batches (a huge pack never fills one tx)."""
    db.write("MATCH (p:Pack {name: $name}) SET p.status = 'dropping'", name=name)
    db.write_in_batches(
        "MATCH (f:Feature {pack: $name}) "
        f"CALL (f) {{ DETACH DELETE f }} IN TRANSACTIONS OF {DELETE_BATCH} ROWS", name=name)
    db.write("MATCH (s:SAE {pack: $name}) DETACH DELETE s", name=name)
    db.write("MATCH (n:Nowhere {pack: $name}) DETACH DELETE n", name=name)
    db.write("MATCH (p:Pack {name: $name}) DETACH DELETE p", name=name)
