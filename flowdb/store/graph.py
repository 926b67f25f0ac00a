"""The feature-flow graph's data model, and every Cypher statement outside queries/.

    (:Pack {name, model, fingerprint, k, thresholds, plan, status, layers_done, ...})
    (:Pack)-[:HAS_SAE]->(:SAE {key, pack, layer, module, source, hook_name, d_in, d_sae,
                              neuronpedia, np_url; residual SAEs also t_res, t_mlp, t_att,
                              threshold_rule, chance_{res,mlp,att}, above_chance_{res,mlp,att}})
    (:Feature:Residual|MLP|Attention {key: "PACK/LAYER/MODULE/INDEX", pack, layer, module, index})
        residual features also carry category, s_res, s_mlp, s_att
    (pred:Feature)-[:RESIDUAL|MLP|ATTENTION {cosine, rank, above}]->(f:Feature:Residual)
        above: the cosine reaches the threshold the build set for that layer and place
    (:Nowhere {pack})-[:FROM_NOWHERE]->(f)   for f of category from-nowhere
    (:Explanation {id, description, ...})-[:EXPLAINS]->(:Feature)
    (:Lock {name, owner, expires})          one ingest or replace of a pack at a time
    (:LinkSet)-[:HAS_PLACE]->(:LinkPlace), (:Feature)-[:ALIGNS]->(:Feature)
        families across two packs, see flowdb.store.links
    (:AttributionGraph {slug}), (:GraphNode {graph: slug})-[:ATTRIBUTES {weight}]->(:GraphNode)
        per-prompt attribution graphs, see flowdb.circuits.store

Every layer is one transaction (nodes, edges, provenance and the pack's
layers_done together), so readers see a layer whole or not at all. A replacement
is written beside the stored build under an internal name (PACK~next) and swapped
in by one transaction once complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from flowdb.errors import FlowdbError, NotFound
from flowdb.flow.layer import sae_properties
from flowdb.modules import MODULES, RESIDUAL, feature_key, sae_key

if TYPE_CHECKING:
    from flowdb.flow.layer import LayerBuild
    from flowdb.store.database import Database

DELETE_BATCH = 10_000
STAGED_SUFFIX = "~next"  # a replacement being written; '~' never occurs in a pack name
RETIRED_SUFFIX = "~old"  # a replaced build waiting to be deleted

EXPLANATION_TEXT_INDEX = "explanation_text"
SCHEMA = (
    # The pack name in the key keeps several packs (and models) in one database.
    "CREATE CONSTRAINT feature_key IF NOT EXISTS FOR (f:Feature) REQUIRE f.key IS UNIQUE",
    "CREATE CONSTRAINT pack_name IF NOT EXISTS FOR (p:Pack) REQUIRE p.name IS UNIQUE",
    "CREATE CONSTRAINT sae_key IF NOT EXISTS FOR (s:SAE) REQUIRE s.key IS UNIQUE",
    "CREATE CONSTRAINT explanation_id IF NOT EXISTS FOR (e:Explanation) REQUIRE e.id IS UNIQUE",
    "CREATE CONSTRAINT nowhere_pack IF NOT EXISTS FOR (n:Nowhere) REQUIRE n.pack IS UNIQUE",
    "CREATE CONSTRAINT lock_name IF NOT EXISTS FOR (l:Lock) REQUIRE l.name IS UNIQUE",
    "CREATE INDEX feature_slot IF NOT EXISTS FOR (f:Feature) ON (f.pack, f.layer, f.module)",
    "CREATE CONSTRAINT link_name IF NOT EXISTS FOR (l:LinkSet) REQUIRE l.name IS UNIQUE",
    "CREATE INDEX aligns_link IF NOT EXISTS FOR ()-[r:ALIGNS]-() ON (r.link)",
    # Type-ahead label search (flowdb.store.search); Lucene's standard analyzer, lower-cased words.
    f"CREATE FULLTEXT INDEX {EXPLANATION_TEXT_INDEX} IF NOT EXISTS FOR (e:Explanation) ON EACH [e.description]",
    # Attribution graphs (flowdb.circuits): one per slug, nodes keyed within their graph.
    "CREATE CONSTRAINT attribution_graph_slug IF NOT EXISTS FOR (g:AttributionGraph) REQUIRE g.slug IS UNIQUE",
    "CREATE CONSTRAINT graph_node_id IF NOT EXISTS FOR (n:GraphNode) REQUIRE (n.graph, n.node_id) IS UNIQUE",
    "CREATE INDEX graph_node_feature IF NOT EXISTS FOR (n:GraphNode) ON (n.kind, n.layer, n.feature)",
    "CREATE INDEX graph_node_graph IF NOT EXISTS FOR (n:GraphNode) ON (n.graph)",
)


def ensure_schema(db: Database) -> None:
    """Create whatever of SCHEMA is missing. Every command that writes calls this, and
    each schema statement is a transaction of its own: when all is there (the usual
    case), two reads replace a dozen writes."""
    present = {row["name"] for show in ("INDEXES", "CONSTRAINTS")
               for row in db.read(f"SHOW {show} YIELD name RETURN name")}
    for statement in SCHEMA:
        if _schema_name(statement) not in present:
            db.write(statement)


def _schema_name(statement: str) -> str:
    return re.match(r"CREATE (?:FULLTEXT )?(?:INDEX|CONSTRAINT) (\w+) IF NOT EXISTS", statement).group(1)


# --- packs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackRecord:
    """What the database says about one stored pack."""

    name: str
    model: str
    fingerprint: str
    status: str  # building | complete | dropping
    layers_done: tuple[int, ...]
    first_layer: int
    last_layer: int
    k: int
    plan: dict  # the resolved build plan (sources, hashes, thresholds), see flowdb.packs.plan

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def read_pack(db: Database, name: str) -> PackRecord | None:
    rows = db.read(
        "MATCH (p:Pack {name: $name}) RETURN p.model AS model, p.fingerprint AS fp, "
        "p.status AS status, p.layers_done AS done, p.first_layer AS first, "
        "p.last_layer AS last, p.k AS k, p.plan AS plan", name=name)
    return _pack_record(name, rows[0]) if rows else None


def _pack_record(name: str, row: dict) -> PackRecord:
    return PackRecord(name, row["model"], row["fp"], row["status"], tuple(row["done"] or ()),
                      row["first"], row["last"], row["k"], json.loads(row["plan"] or "{}"))


@dataclass(frozen=True)
class QueryContext:
    """What a query's answer notes need, read in one round trip."""

    record: PackRecord | None
    rules: list[str]  # the rules that set the pack's per-layer thresholds
    existing: frozenset[str]  # which of the asked feature keys are stored


def query_context(db: Database, pack: str, keys: list[str]) -> QueryContext:
    rows = db.read(
        "OPTIONAL MATCH (p:Pack {name: $name}) "
        "RETURN p.model AS model, p.fingerprint AS fp, p.status AS status, p.layers_done AS done, "
        "p.first_layer AS first, p.last_layer AS last, p.k AS k, p.plan AS plan, "
        "COLLECT { MATCH (s:SAE {pack: $name, module: $res}) WHERE s.threshold_rule IS NOT NULL "
        "          RETURN DISTINCT s.threshold_rule AS rule ORDER BY rule } AS rules, "
        "COLLECT { UNWIND $keys AS key MATCH (f:Feature {key: key}) RETURN f.key } AS existing",
        name=pack or "", keys=keys, res=RESIDUAL.name)
    row = rows[0]
    return QueryContext(_pack_record(pack, row) if row["status"] is not None else None,
                        row["rules"], frozenset(row["existing"]))


def require_pack(db: Database, name: str) -> PackRecord:
    """The stored pack, or an error naming the packs that do exist."""
    found = read_pack(db, name) if "~" not in name else None
    if found is None:
        names = [row["name"] for row in list_packs(db)]
        known = ", ".join(names) if names else "none; run flowdb ingest first"
        raise NotFound(f"no pack named {name!r} in {db.where}; stored packs: {known}")
    return found


def list_packs(db: Database) -> list[dict]:
    """Every user-visible pack; a replacement in progress shows as a note on its pack."""
    return db.read(
        "MATCH (p:Pack) WHERE NOT p.name CONTAINS '~' "
        "OPTIONAL MATCH (n:Pack {name: p.name + $staged}) "
        "RETURN p.name AS name, p.model AS model, p.status AS status, p.k AS k, "
        "p.first_layer AS first, p.last_layer AS last, p.fingerprint AS build, "
        "p.threshold_rule AS rule, n.fingerprint AS replacing_with ORDER BY name",
        staged=STAGED_SUFFIX)


def pack_properties(name: str, plan: dict, fingerprint: str, version: str, backend: str) -> dict:
    """What a Pack node holds about its build, whichever way it is written (begin_pack or
    flowdb.store.bulk); status, layers_done and the timestamps come on top."""
    return {"name": name, "model": plan["model"], "fingerprint": fingerprint, "k": plan["k"],
            "first_layer": plan["first_layer"], "last_layer": plan["last_layer"],
            "modules": plan["modules"], "thresholds": json.dumps(plan["thresholds"]),
            "threshold_rule": plan["thresholds"]["rule"], "plan": json.dumps(plan),
            "manifest": plan["manifest"], "flowdb_version": version, "matcher": backend}


def begin_pack(db: Database, name: str, plan: dict, fingerprint: str, version: str,
               backend: str) -> None:
    db.write(
        "CREATE (p:Pack) SET p = $props, p.created_at = datetime($now), p.status = 'building', "
        " p.layers_done = [] "
        "CREATE (:Nowhere {pack: $name})",
        props=pack_properties(name, plan, fingerprint, version, backend), name=name,
        now=datetime.now(UTC).isoformat())


def store_complete_pack(db: Database, props: dict, layers_done: list[int], saes: list[dict]) -> None:
    """The Pack node of a pack whose features, edges and Nowhere node are already stored
    (flowdb.store.bulk imported them), complete, with its SAE nodes (sae_properties of every layer)."""
    db.write(
        "CREATE (p:Pack) SET p = $props, p.created_at = datetime($now), p.status = 'complete', "
        " p.layers_done = $done, p.completed_at = datetime() "
        "WITH p UNWIND $saes AS sae CREATE (p)-[:HAS_SAE]->(s:SAE) SET s = sae",
        props=props, done=list(layers_done), saes=saes, now=datetime.now(UTC).isoformat())


def count_features(db: Database, pack: str) -> int:
    return db.read("MATCH (f:Feature {pack: $pack}) RETURN count(f) AS n", pack=pack)[0]["n"]


def count_nodes(db: Database) -> int:
    return db.read("MATCH (n) RETURN count(n) AS n")[0]["n"]


def stored_size(db: Database, name: str) -> tuple[int, int]:
    """A stored pack's feature nodes and the relationships into them (its match edges and
    marks), from the degree store: what deleting it touches, near enough."""
    row = db.read("MATCH (f:Feature {pack: $name}) "
                  "RETURN count(f) AS nodes, sum(COUNT { (f)<--() }) AS relationships", name=name)[0]
    return row["nodes"], row["relationships"] or 0


def record_plan(db: Database, name: str, plan: dict) -> None:
    db.write("MATCH (p:Pack {name: $name}) SET p.plan = $plan", name=name, plan=json.dumps(plan))


def finish_pack(db: Database, name: str) -> None:
    db.write("MATCH (p:Pack {name: $name}) SET p.status = 'complete', "
             "p.completed_at = datetime()", name=name)


@dataclass(frozen=True)
class Deletion:
    """What deleting a pack (and any build of it staged or retired beside it) takes with it:
    its features, the match edges into them, the labels (Explanation nodes) no other pack's
    feature has, and each link set it is a side of, with its ALIGNS (on the other pack too)."""

    pack: str
    features: int
    edges: int
    labels: int
    links: tuple[dict, ...]  # {name, a, b, aligns}

    def summary(self) -> str:
        """'N features, N edges, N labels no other pack uses'."""
        label = "label" if self.labels == 1 else "labels"
        return f"{self.features:,} features, {self.edges:,} edges, {self.labels:,} {label} no other pack uses"

    def link_lines(self) -> list[str]:
        """One phrase per link set: its name, the packs it links, its ALIGNS and where they are."""
        lines = []
        for link in self.links:
            others = [side for side in (link["a"], link["b"]) if _base_name(side) != self.pack]
            where = f", on pack {others[0]!r} too" if others else ""
            lines.append(f"link set {link['name']!r} (linking {link['a']} and {link['b']}) and its "
                         f"{link['aligns']:,} ALIGNS relationships{where}")
        return lines


def _base_name(name: str) -> str:
    for suffix in (STAGED_SUFFIX, RETIRED_SUFFIX):
        name = name.removesuffix(suffix)
    return name


def deletion(db: Database, pack: str) -> Deletion:
    """What delete_pack(pack) would delete, counted now (read before the delete, under its lock)."""
    names = [pack + STAGED_SUFFIX, pack + RETIRED_SUFFIX, pack]
    row = db.read(
        "MATCH (f:Feature) WHERE f.pack IN $names "
        "RETURN count(f) AS features, sum(COUNT { (f)<-[:RESIDUAL|MLP|ATTENTION]-() }) AS edges", names=names)[0]
    labels = db.read(
        "MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature) WHERE f.pack IN $names WITH DISTINCT e "
        "WHERE NOT EXISTS { (e)-[:EXPLAINS]->(g:Feature) WHERE NOT g.pack IN $names } "
        "RETURN count(e) AS n", names=names)[0]["n"]
    links = db.read(
        "MATCH (l:LinkSet) WHERE l.a IN $names OR l.b IN $names "
        "RETURN l.name AS name, l.a AS a, l.b AS b, COUNT { ()-[r:ALIGNS {link: l.name}]->() } AS aligns "
        "ORDER BY name", names=names)
    return Deletion(pack, row["features"], row["edges"] or 0, labels, tuple(links))


def drop_pack(db: Database, name: str) -> None:
    """Delete a pack and everything of it, in batches (a huge pack never fills one tx)."""
    db.write("MATCH (p:Pack {name: $name}) SET p.status = 'dropping'", name=name)
    db.write_in_batches(
        "MATCH (f:Feature {pack: $name}) "
        f"CALL (f) {{ DETACH DELETE f }} IN TRANSACTIONS OF {DELETE_BATCH} ROWS", name=name)
    db.write("MATCH (s:SAE {pack: $name}) DETACH DELETE s", name=name)
    db.write("MATCH (n:Nowhere {pack: $name}) DETACH DELETE n", name=name)
    db.write("MATCH (p:Pack {name: $name}) DETACH DELETE p", name=name)
    for link in db.read("MATCH (l:LinkSet) WHERE $name IN [l.a, l.b] RETURN l.name AS name", name=name):
        drop_link(db, link["name"])  # its ALIGNS went with the features; its record would mislead
    # Explanations whose every feature is gone would only clutter label searches.
    db.write("MATCH (e:Explanation) WHERE NOT (e)-[:EXPLAINS]->() DELETE e")


def swap_in(db: Database, name: str) -> None:
    """Make the complete build staged as NAME~next the pack NAME, in one transaction.

    The old build becomes NAME~old (deleted afterwards); its labels re-attach to the
    features of the new build with the same keys, where the SAE is the same (content,
    or Neuronpedia source and width).
    """
    with db.session() as session:
        session.execute_write(_swap_in, name)


def _swap_in(tx, name: str) -> None:
    staged, retired = name + STAGED_SUFFIX, name + RETIRED_SUFFIX
    if tx.run("MATCH (p:Pack {name: $staged, status: 'complete'}) RETURN p",
              staged=staged).single() is None:
        raise FlowdbError(f"internal: no complete staged build of {name!r} to swap in")
    if tx.run("MATCH (p:Pack {name: $name}) RETURN p", name=name).single() is not None:
        _rename(tx, name, retired)
    _rename(tx, staged, name)
    # The old build's ALIGNS leave with it: its link sets must be linked again.
    tx.run("MATCH (l:LinkSet) WHERE $name IN [l.a, l.b] SET l.status = 'stale'", name=name).consume()
    # Only where the SAE at that layer and module is the same file content, or the same
    # Neuronpedia source of the same width: there the same index is the same feature.
    tx.run(
        "MATCH (old_sae:SAE {pack: $retired}) "
        "MATCH (new_sae:SAE {pack: $name, layer: old_sae.layer, module: old_sae.module}) "
        "WHERE new_sae.digest = old_sae.digest OR (old_sae.neuronpedia IS NOT NULL "
        "      AND new_sae.neuronpedia = old_sae.neuronpedia AND new_sae.n_features = old_sae.n_features) "
        "MATCH (old:Feature {pack: $retired, layer: old_sae.layer, module: old_sae.module}) "
        "WHERE old.label IS NOT NULL OR old.np_fetched IS NOT NULL "
        "MATCH (new:Feature {key: $name + substring(old.key, size($retired))}) "
        "SET new.label = old.label, new.label_by = old.label_by, new.np_fetched = old.np_fetched, "
        "    new.np_problem = old.np_problem "
        "WITH old, new MATCH (e:Explanation)-[:EXPLAINS]->(old) MERGE (e)-[:EXPLAINS]->(new)",
        retired=retired, name=name).consume()


def _rename(tx, old: str, new: str) -> None:
    params = {"old": old, "new": new}
    tx.run("MATCH (f:Feature {pack: $old}) "
           "SET f.pack = $new, f.key = $new + substring(f.key, size($old))", params).consume()
    tx.run("MATCH (s:SAE {pack: $old}) "
           "SET s.pack = $new, s.key = $new + substring(s.key, size($old))", params).consume()
    tx.run("MATCH (n:Nowhere {pack: $old}) SET n.pack = $new", params).consume()
    tx.run("MATCH (p:Pack {name: $old}) SET p.name = $new", params).consume()


# --- writing a layer ---------------------------------------------------------------------

def write_layer(db: Database, pack: str, layer: LayerBuild) -> tuple[int, int]:
    """Write one layer in one transaction; returns (match edges, FROM_NOWHERE marks)."""
    with db.session() as session:
        return session.execute_write(_write_layer, pack, layer)


def _write_layer(tx, pack: str, layer: LayerBuild) -> tuple[int, int]:
    number = layer.layer
    s = {place: _nullable(layer.top1(place)) for place in MODULES}
    tx.run(
        "UNWIND range(0, size($category) - 1) AS i "
        f"CREATE (:Feature:{RESIDUAL.label} {{key: $prefix + toString(i), pack: $pack, layer: $layer, "
        " module: $module, index: i, category: $category[i], "
        " s_res: $s_res[i], s_mlp: $s_mlp[i], s_att: $s_att[i]})",
        prefix=f"{pack}/{number}/{RESIDUAL.name}/", pack=pack, layer=number, module=RESIDUAL.name,
        category=layer.categories.tolist(), s_res=s["res"], s_mlp=s["mlp"], s_att=s["att"],
    ).consume()
    for module in MODULES.values():
        if module is not RESIDUAL and module.name in layer.widths:
            tx.run(
                f"UNWIND range(0, $n - 1) AS i CREATE (:Feature:{module.label} "
                "{key: $prefix + toString(i), pack: $pack, layer: $layer, module: $module, index: i})",
                n=layer.widths[module.name], prefix=f"{pack}/{number}/{module.name}/", pack=pack,
                layer=number, module=module.name,
            ).consume()
    edges = sum(_write_edges(tx, pack, layer, place) for place in layer.indices)
    nowhere = tx.run(
        "MATCH (n:Nowhere {pack: $pack}) "
        "MATCH (f:Feature {pack: $pack, layer: $layer, module: $module}) "
        "WHERE f.category = 'from-nowhere' CREATE (n)-[:FROM_NOWHERE]->(f)",
        pack=pack, layer=number, module=RESIDUAL.name).consume().counters.relationships_created
    tx.run(
        "MATCH (p:Pack {name: $pack}) "
        "UNWIND $saes AS sae CREATE (p)-[:HAS_SAE]->(s:SAE) SET s = sae "
        "WITH DISTINCT p SET p.layers_done = p.layers_done + $layer",
        pack=pack, saes=sae_properties(pack, layer), layer=number).consume()
    return edges, nowhere


def _write_edges(tx, pack: str, layer: LayerBuild, place: str) -> int:
    scores, indices = layer.scores[place], layer.indices[place]
    n_res, k = indices.shape
    module = MODULES[place]
    # Nodes are collected in index order once, so each edge is two list look-ups
    # rather than two index seeks.
    summary = tx.run(
        "MATCH (s:Feature {pack: $pack, layer: $src_layer, module: $src_module}) "
        "WITH s ORDER BY s.index WITH collect(s) AS sources "
        "MATCH (d:Feature {pack: $pack, layer: $layer, module: $res}) "
        "WITH sources, d ORDER BY d.index WITH sources, collect(d) AS targets "
        "UNWIND range(0, size($src) - 1) AS i "
        "WITH sources[$src[i]] AS a, targets[$dst[i]] AS b, i "
        f"CREATE (a)-[:{module.edge_type} {{cosine: $cosine[i], rank: $rank[i], above: $above[i]}}]->(b)",
        pack=pack, src_layer=module.predecessor_layer(layer.layer), src_module=place,
        layer=layer.layer, res=RESIDUAL.name,
        src=indices.reshape(-1).tolist(), dst=np.repeat(np.arange(n_res), k).tolist(),
        cosine=scores.reshape(-1).astype(float).tolist(), rank=np.tile(np.arange(1, k + 1), n_res).tolist(),
        above=layer.above(place).reshape(-1).tolist(),
    ).consume()
    return summary.counters.relationships_created


def _nullable(values: np.ndarray) -> list | None:
    return None if np.isnan(values).all() else [None if np.isnan(v) else float(v) for v in values]


# --- locks -------------------------------------------------------------------------------

def acquire_lock(db: Database, name: str, owner: str, lease_s: float,
                 stale_owner: str | None = None) -> str | None:
    """Take the named lock for `owner` for lease_s seconds; returns None when taken, else
    the current holder. An expired lease, or one held by stale_owner (known dead), is
    taken over."""
    rows = db.write(
        # SET first: it write-locks the node, so two takers are serialised.
        "MERGE (l:Lock {name: $name}) ON CREATE SET l.owner = $owner, l.expires = 0 "
        "SET l.asked = timestamp() WITH l, l.owner AS holder, l.expires AS expires "
        "CALL (l) { WITH l WHERE l.owner IN [$owner, $stale] OR l.expires < timestamp() / 1000.0 "
        "           SET l.owner = $owner, l.expires = timestamp() / 1000.0 + $lease } "
        "RETURN holder, expires, l.owner = $owner AS mine",
        name=name, owner=owner, stale=stale_owner, lease=lease_s)
    row = rows[0]
    return None if row["mine"] else row["holder"]


def renew_lock(db: Database, name: str, owner: str, lease_s: float) -> bool:
    # The server's clock, so hosts whose clocks disagree still agree on the lease.
    rows = db.write("MATCH (l:Lock {name: $name, owner: $owner}) SET l.expires = timestamp() / 1000.0 + $lease "
                    "RETURN count(l) AS n", name=name, owner=owner, lease=lease_s)
    return rows[0]["n"] == 1


def release_lock(db: Database, name: str, owner: str) -> None:
    db.write("MATCH (l:Lock {name: $name, owner: $owner}) DELETE l", name=name, owner=owner)


# --- labels ------------------------------------------------------------------------------

def label_sources(db: Database, pack: str | None) -> list[dict]:
    """Each SAE with a Neuronpedia source: its model, source, pack, layer, module, width."""
    return db.read(
        "MATCH (p:Pack)-[:HAS_SAE]->(s:SAE) WHERE s.neuronpedia IS NOT NULL "
        "AND NOT p.name CONTAINS '~' AND ($pack IS NULL OR p.name = $pack) "
        "RETURN p.model AS model, s.neuronpedia AS source, s.pack AS pack, s.layer AS layer, "
        "s.module AS module, s.n_features AS n", pack=pack)


def write_explanations(tx, rows: list[dict]) -> int:
    """Store explanation rows (key, id, description, ...) in the given transaction."""
    return tx.run(
        "UNWIND $rows AS row MATCH (f:Feature {key: row.key}) "
        "MERGE (e:Explanation {id: row.id}) "
        "SET e.description = row.description, e.modelId = row.modelId, e.source = row.source, "
        "    e.index = row.index, e.score = row.score, e.typeName = row.typeName, "
        "    e.explanationModelName = row.explanationModelName, e.authorId = row.authorId "
        "MERGE (e)-[:EXPLAINS]->(f) RETURN count(*) AS n", rows=rows).single()["n"]


def set_best_labels(tx, keys: list[str]) -> int:
    """Each feature's label: its highest-scoring explanation, else the first by id."""
    return tx.run(
        "UNWIND $keys AS key MATCH (f:Feature {key: key})<-[:EXPLAINS]-(e:Explanation) "
        "WITH f, e ORDER BY coalesce(e.score, -1e9) DESC, e.id "
        "WITH f, collect(e)[0] AS best "
        "SET f.label = best.description, "
        "    f.label_by = coalesce(best.explanationModelName, best.typeName) "
        "RETURN count(f) AS n", keys=keys).single()["n"]


def features_to_fetch(db: Database, pack: str, module: str | None, limit: int) -> list[dict]:
    """Features of a pack with no label yet and never asked about, in a stable order."""
    return db.read(
        "MATCH (p:Pack {name: $pack})-[:HAS_SAE]->(s:SAE) "
        "WHERE s.neuronpedia IS NOT NULL AND ($module IS NULL OR s.module = $module) "
        "MATCH (f:Feature {pack: $pack, layer: s.layer, module: s.module}) "
        "WHERE f.label IS NULL AND f.np_fetched IS NULL "
        "RETURN f.key AS key, p.model AS model, s.neuronpedia AS source, f.index AS index "
        "ORDER BY f.layer, f.module, f.index LIMIT $limit", pack=pack, module=module, limit=limit)


def mark_fetched(db: Database, key: str, problem: str | None = None) -> None:
    """Mark a feature as asked about (with the problem, if its answer was unusable)."""
    db.write("MATCH (f:Feature {key: $key}) SET f.np_fetched = datetime(), f.np_problem = $problem",
             key=key, problem=problem)


def feature_exists(db: Database, key: str) -> bool:
    return bool(db.read("MATCH (f:Feature {key: $key}) RETURN 1 AS found", key=key))


def saes_with_neuronpedia_source(db: Database, model: str, source: str) -> list[dict]:
    """The stored SAEs a Neuronpedia (modelId, source) names, packs in name order."""
    return db.read(
        "MATCH (p:Pack {model: $model})-[:HAS_SAE]->(s:SAE {neuronpedia: $source}) "
        "WHERE NOT p.name CONTAINS '~' "
        "RETURN s.pack AS pack, s.layer AS layer, s.module AS module, s.n_features AS n ORDER BY pack",
        model=model, source=source)


def module_widths(db: Database, pack: str, layer: int) -> dict[str, int]:
    rows = db.read("MATCH (s:SAE {pack: $pack, layer: $layer}) RETURN s.module AS module, "
                   "s.n_features AS n", pack=pack, layer=layer)
    return {row["module"]: row["n"] for row in rows}


def store_explanations(db: Database, rows: list[dict]) -> None:
    """Explanations and their features' best labels, in one transaction."""
    keys = sorted({row["key"] for row in rows})

    def write(tx):
        for start in range(0, len(rows), 2000):
            write_explanations(tx, rows[start:start + 2000])
        for start in range(0, len(keys), 2000):
            set_best_labels(tx, keys[start:start + 2000])

    if rows:
        with db.session() as session:
            session.execute_write(write)


def best_explanations(db: Database, keys: list[str], type_name: str) -> list[dict]:
    """Per feature key: its label and the score of its best explanation of this type."""
    return db.read(
        "UNWIND $keys AS key MATCH (f:Feature {key: key})<-[:EXPLAINS]-(e:Explanation {typeName: $type}) "
        "WITH f, max(e.score) AS score RETURN f.key AS key, f.label AS label, score",
        keys=keys, type=type_name)


def feature_label(db: Database, key: str) -> str | None:
    rows = db.read("MATCH (f:Feature {key: $key}) RETURN f.label AS label", key=key)
    return rows[0]["label"] if rows else None


# --- experiments -------------------------------------------------------------------------

def predecessor_rows(db: Database, pack: str, layer: int, k: int) -> list[dict]:
    """The stored top-k predecessors of the residual features at one layer."""
    return db.read(
        "MATCH (s:Feature)-[e:RESIDUAL|MLP|ATTENTION]->"
        "(d:Feature {pack: $pack, layer: $layer, module: $res}) "
        "WHERE e.rank <= $k RETURN d.index AS dst, s.module AS place, s.index AS src, e.rank AS rank",
        pack=pack, layer=layer, k=k, res=RESIDUAL.name)


def store_groups(db: Database, pack: str, layer: int, k: int, counts: dict[int, list[int]],
                 shares: list[float]) -> None:
    """Per-feature group counts and the layer's group shares at top-k."""
    prop = f"groups_top{int(k)}"  # from a fixed pattern and an int, never user text
    db.write(f"UNWIND $rows AS row MATCH (f:Feature {{key: row.key}}) SET f.{prop} = row.counts",
             rows=[{"key": feature_key(pack, layer, RESIDUAL.name, i), "counts": c}
                   for i, c in counts.items()])
    db.write(f"MATCH (s:SAE {{key: $key}}) SET s.{prop} = $shares",
             key=sae_key(pack, layer, RESIDUAL.name), shares=shares)


# --- link sets (flowdb.store.links) ------------------------------------------------------------

def read_link(db: Database, name: str) -> dict | None:
    rows = db.read("MATCH (l:LinkSet {name: $name}) RETURN properties(l) AS link", name=name)
    return rows[0]["link"] if rows else None


def list_links(db: Database) -> list[dict]:
    return db.read("MATCH (l:LinkSet) RETURN l.name AS name, l.a AS a, l.b AS b, l.status AS status, "
                   "l.k AS k, l.t AS t, l.rule AS rule, l.places_done AS places ORDER BY name")


def begin_link(db: Database, props: dict) -> None:
    db.write("CREATE (l:LinkSet) SET l = $props, l.status = 'building', l.places_done = [], "
             "l.created_at = datetime()", props=props)


def finish_link(db: Database, name: str) -> None:
    db.write("MATCH (l:LinkSet {name: $name}) SET l.status = 'complete', l.completed_at = datetime()", name=name)


def drop_link(db: Database, name: str) -> None:
    """A link set's ALIGNS relationships (in batches), its places and its node."""
    db.write("MATCH (l:LinkSet {name: $name}) SET l.status = 'dropping'", name=name)
    db.write_in_batches(
        "MATCH ()-[r:ALIGNS {link: $name}]->() "
        f"CALL (r) {{ DELETE r }} IN TRANSACTIONS OF {DELETE_BATCH} ROWS", name=name)
    db.write("MATCH (p:LinkPlace {link: $name}) DETACH DELETE p", name=name)
    db.write("MATCH (l:LinkSet {name: $name}) DETACH DELETE l", name=name)


def write_link_place(db: Database, link: str, a_pack: str, b_pack: str, place) -> int:
    """One linked layer and module (a flowdb.flow.link_atlas.PlaceLink) in one transaction: its ALIGNS
    both ways, its LinkPlace record and the link set's places_done; returns relationships made."""
    with db.session() as session:
        return session.execute_write(_write_link_place, link, a_pack, b_pack, place)


def write_link_record(db: Database, link: str, key: str, record: dict) -> None:
    """A place's LinkPlace record and the link set's places_done, without its ALIGNS (a bulk
    import wrote those)."""
    with db.session() as session:
        session.execute_write(_write_link_record, link, key, record)


def _write_link_place(tx, link: str, a_pack: str, b_pack: str, place) -> int:
    slot = {"layer": place.layer, "module": place.module}
    made = 0
    for side, columns in place.directions().items():
        source, target = (a_pack, b_pack) if side == "a" else (b_pack, a_pack)
        # Nodes collected in index order once: each relationship is two list look-ups.
        made += tx.run(
            "MATCH (s:Feature {pack: $source, layer: $layer, module: $module}) "
            "WITH s ORDER BY s.index WITH collect(s) AS sources "
            "MATCH (d:Feature {pack: $target, layer: $layer, module: $module}) "
            "WITH sources, d ORDER BY d.index WITH sources, collect(d) AS targets "
            "UNWIND range(0, size($src) - 1) AS i "
            "WITH sources[$src[i]] AS a, targets[$dst[i]] AS b, i "
            "CREATE (a)-[:ALIGNS {link: $link, cosine: $cosine[i], rank: $rank[i], above: $above[i], "
            "                     category: $category[i]}]->(b)",
            source=source, target=target, link=link, **slot, src=columns["index"].tolist(),
            dst=columns["other"].tolist(), cosine=columns["cosine"].astype(float).tolist(),
            rank=columns["rank"].tolist(), above=columns["above"].tolist(),
            category=columns["category"].tolist()).consume().counters.relationships_created
    _write_link_record(tx, link, place.key, place.record())
    return made


def _write_link_record(tx, link: str, key: str, record: dict) -> None:
    tx.run("MATCH (l:LinkSet {name: $link}) "
           "CREATE (l)-[:HAS_PLACE]->(p:LinkPlace) SET p = $record, p.link = $link "
           "SET l.places_done = l.places_done + $key",
           link=link, record=record, key=key).consume()
