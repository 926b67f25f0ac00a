"""What the explorer's pages show, read from the graph in bounded pieces.

Every function here takes a Database and returns JSON-ready dicts. Nothing reads a
whole pack: a flow graph is walked step by step from its seed, each step one query
with a row cap, and a neighbourhood is one node's edges, capped. The edge filter is
the templates' (flow-graph, lineage, descendants): rank <= max_rank, and a cosine at
or above t_res / t_mod, else the `above` mark the build stored, unless every_edge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flowdb.classify import CATEGORIES, PLACES, chance_cdf, edge_status
from flowdb.errors import NotFound, QueryError, number_text
from flowdb.modules import BY_KIND, MODULES, RESIDUAL
from flowdb.store import graph
from flowdb.store.templates import get_template, json_ready
from flowdb.views import marks

EDGE_ROW_CAP = 2_000  # edges one step of a walk reads at most
NEIGHBOUR_CAP = 40  # edges one expansion returns at most, per direction
MAX_DEPTH = 64
MAX_ROWS = 20_000  # rows one interactive read may answer
HISTOGRAM_BINS = 40
NODE_FIELDS = ("key", "pack", "layer", "module", "index", "category", "label", "s_res", "s_mlp", "s_att")

_KEEP = ("e.rank <= $max_rank AND ($every_edge OR CASE type(e) WHEN 'RESIDUAL' "
         "THEN coalesce(e.cosine >= $t_res, e.above) ELSE coalesce(e.cosine >= $t_mod, e.above) END)")
_RETURN_EDGE = ("RETURN p.key AS source, c.key AS target, toLower(type(e)) AS kind, e.cosine AS cosine, "
                "e.rank AS rank, p {.*} AS source_node, c {.*} AS target_node "
                "ORDER BY e.rank, e.cosine DESC, source, target LIMIT $limit")
_INTO = ("UNWIND $keys AS key MATCH (c:Feature {key: key})<-[e:RESIDUAL|MLP|ATTENTION]-(p:Feature) "
         f"WHERE type(e) IN $types AND {_KEEP} {_RETURN_EDGE}")
_OUT_OF = ("UNWIND $keys AS key MATCH (p:Feature {key: key})-[e:RESIDUAL|MLP|ATTENTION]->(c:Feature) "
           f"WHERE {_KEEP} {_RETURN_EDGE}")
_EDGE_TYPES = [m.edge_type for m in MODULES.values()]


class TimeLimited:
    """A Database for interactive reads: each is stopped by the server at the query time
    limit, and none is retried (the driver's managed transactions retry an unreachable
    server for 30 s; a page should say at once that Neo4j is not answering)."""

    def __init__(self, db, timeout_s: float | None = None):
        from flowdb.settings import query_timeout_s

        self._db, self.timeout_s = db, timeout_s or query_timeout_s()

    def read(self, cypher: str, timeout_s: float | None = None, **params):
        return self.read_with(cypher, params, timeout_s)

    def read_with(self, cypher: str, params: dict, timeout_s: float | None = None):
        return self.read_table(cypher, params, timeout_s)[1]

    def read_table(self, cypher: str, params: dict, timeout_s: float | None = None):
        from neo4j import Query

        from flowdb.store.database import neo4j_errors

        with neo4j_errors(self._db), self._db.driver.session(database=self._db.database,
                                                             default_access_mode="READ") as session:
            result = session.run(Query(cypher, timeout=timeout_s or self.timeout_s), params)
            keys, rows = list(result.keys()), []
            for record in result:
                if len(rows) == MAX_ROWS:
                    raise QueryError(f"the answer has more than {MAX_ROWS:,} rows, more than a page shows: "
                                     "narrow it (a pack, a layer, a lower max_rank), or use flowdb query")
                rows.append(record.data())
            return keys, rows

    def __getattr__(self, name):
        return getattr(self._db, name)


@dataclass(frozen=True)
class EdgeFilter:
    """Which stored edges a view follows (the flow-graph template's parameters)."""

    t_res: float | None = None
    t_mod: float | None = None
    max_rank: int = 1
    every_edge: bool = False

    @classmethod
    def parse(cls, given: dict) -> EdgeFilter:
        """From query-string values, checked as the flow-graph template checks them."""
        names = ("t_res", "t_mod", "max_rank", "every_edge")
        known = {p.name: p for p in get_template("flow-graph").params}
        values = {}
        for name in names:
            value = given.get(name)
            if value not in (None, ""):
                values[name] = known[name].coerce(value)
        return cls(**values)

    def params(self) -> dict:
        return {"t_res": self.t_res, "t_mod": self.t_mod, "max_rank": self.max_rank,
                "every_edge": self.every_edge}


def bounded(value, name: str, default, low, high, kind=int):
    """A request's number: the default when not given, else a `kind` from low to high."""
    if value in (None, ""):
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise QueryError(f"parameter {name} must be {kind.__name__}, got {value!r}") from None
    if not low <= number <= high:
        raise QueryError(f"parameter {name} must be from {number_text(low)} to {number_text(high)}, "
                         f"got {number_text(number)}")
    return number


def parse_depth(value) -> int:
    return bounded(value, "depth", 3, 1, MAX_DEPTH)


# --- packs --------------------------------------------------------------------------------

def packs(db, name: str | None = None) -> list[dict]:
    """Every pack (or the one named) with its build, thresholds spec and widths per module."""
    rows = db.read(
        "MATCH (p:Pack) WHERE NOT p.name CONTAINS '~' AND ($name IS NULL OR p.name = $name) "
        "RETURN p.name AS name, p.model AS model, p.status AS status, p.k AS k, p.first_layer AS first_layer, "
        "p.last_layer AS last_layer, p.fingerprint AS fingerprint, p.matcher AS matcher, "
        "p.threshold_rule AS rule, p.thresholds AS thresholds, "
        "COLLECT { MATCH (p)-[:HAS_SAE]->(s:SAE) RETURN DISTINCT s.module + ':' + toString(s.n_features) } AS widths "
        "ORDER BY name", name=name)
    for row in rows:
        widths: dict[str, set[int]] = {}
        for item in row.pop("widths"):
            module, width = item.split(":")
            widths.setdefault(module, set()).add(int(width))
        row["widths"] = {m: sorted(widths[m]) for m in MODULES if m in widths}
        row["thresholds"] = json.loads(row["thresholds"] or "{}")
    return rows


def pack_detail(db, name: str) -> dict:
    """One pack: its record, per-layer thresholds against chance, origins, the top-1 cosine
    histograms beside the chance distribution, and label coverage."""
    found = packs(db, name) if "~" not in name else []
    if not found:
        graph.require_pack(db, name)  # raises, naming the stored packs
    summary = found[0]
    saes = _saes(db, name)
    q_chance = float(summary["thresholds"].get("q_chance", 0.999))
    layers = []
    for layer in range(summary["first_layer"], summary["last_layer"] + 1):
        res = saes.get((layer, RESIDUAL.name), {})
        layers.append({"layer": layer, "rule": res.get("threshold_rule"),
                       **{f"t_{p}": res.get(f"t_{p}") for p in PLACES},
                       **{f"chance_{p}": res.get(f"chance_{p}") for p in PLACES},
                       **{f"above_chance_{p}": res.get(f"above_chance_{p}") for p in PLACES}})
    origins = get_template("origins")
    origin_rows = db.read(origins.cypher, pack=name)
    return {**summary, "q_chance": q_chance, "layers": layers, "origins": origin_rows,
            "histograms": _histograms(db, name, saes), "labels": label_coverage(db, name)}


def _saes(db, pack: str) -> dict[tuple[int, str], dict]:
    return _pack_saes(db, pack)[1]


def _pack_saes(db, pack: str) -> tuple[int | None, dict[tuple[int, str], dict]]:
    """A pack's k and its SAE nodes by (layer, module), in one read."""
    rows = db.read("MATCH (p:Pack {name: $pack}) RETURN p.k AS k, "
                   "COLLECT { MATCH (s:SAE {pack: $pack}) RETURN s {.*} } AS saes", pack=pack)
    if not rows:
        graph.require_pack(db, pack)  # raises, naming the stored packs
    return rows[0]["k"], {(s["layer"], s["module"]): s for s in rows[0]["saes"]}


def _histograms(db, pack: str, saes: dict) -> list[dict]:
    """Per layer and place, the rank-1 cosines in bins, with the count chance predicts per bin:
    the largest of n random cosines in d dimensions (n, d of the SAE searched there)."""
    edges = [i / HISTOGRAM_BINS * 2 - 1 for i in range(HISTOGRAM_BINS + 1)]
    rows = db.read(
        "MATCH (f:Feature {pack: $pack, module: 'res'})<-[e:RESIDUAL|MLP|ATTENTION {rank: 1}]-() "
        "WITH f.layer AS layer, toLower(type(e)) AS kind, "
        "     toInteger(floor((e.cosine + 1) / 2 * $bins)) AS bin "
        "RETURN layer, kind, CASE WHEN bin >= $bins THEN $bins - 1 ELSE bin END AS bin, count(*) AS n",
        pack=pack, bins=HISTOGRAM_BINS)
    counts: dict[tuple[int, str], list[int]] = {}
    for row in rows:
        counts.setdefault((row["layer"], BY_KIND[row["kind"]].name), [0] * HISTOGRAM_BINS)[row["bin"]] += row["n"]
    out = []
    for (layer, place), observed in sorted(counts.items()):
        searched = saes.get((MODULES[place].predecessor_layer(layer), place), {})
        n, d = searched.get("n_features"), searched.get("d_in")
        total = sum(observed)
        chance = None
        if n and d and d >= 2:
            cdf = [chance_cdf(x, n, d) for x in edges]
            chance = [total * (cdf[i + 1] - cdf[i]) for i in range(HISTOGRAM_BINS)]
        res = saes.get((layer, RESIDUAL.name), {})
        out.append({"layer": layer, "place": place, "bin_edges": edges, "observed": observed,
                    "chance": chance, "threshold": res.get(f"t_{place}"), "chance_level": res.get(f"chance_{place}")})
    return out


def label_coverage(db, pack: str) -> list[dict]:
    """Per module, features with a label, and explanations by source."""
    rows = db.read(
        "MATCH (f:Feature {pack: $pack}) "
        "WITH f.module AS module, count(f) AS features, count(f.label) AS labelled "
        "CALL (module) { MATCH (e:Explanation)-[:EXPLAINS]->(g:Feature {pack: $pack, module: module}) "
        "  RETURN collect(DISTINCT e.typeName) AS types, count(e) AS explanations } "
        "RETURN module, features, labelled, explanations, types ORDER BY module", pack=pack)
    for row in rows:
        row["sources"] = list(dict.fromkeys(label_source(t) for t in row.pop("types")))
    return rows


# --- features -----------------------------------------------------------------------------

def label_source(type_name: str | None) -> str:
    return "top-contexts" if type_name == "top-contexts" else "neuronpedia"


def feature_detail(db, key: str) -> dict:
    """A feature's labels, category, scores beside its layer's thresholds and chance levels."""
    rows = db.read(
        "MATCH (f:Feature {key: $key}) "
        "OPTIONAL MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/' + f.module}) "
        "OPTIONAL MATCH (r:SAE {key: f.pack + '/' + toString(f.layer) + '/res'}) "
        "RETURN f {.*} AS f, s.np_url AS np_url, r {.t_res, .t_mlp, .t_att, .chance_res, .chance_mlp, "
        "       .chance_att, .threshold_rule} AS thresholds, "
        "COLLECT { MATCH (e:Explanation)-[:EXPLAINS]->(f) "
        "          RETURN e {.description, .typeName, .explanationModelName, .score, .id} AS e "
        "          ORDER BY coalesce(e.score, -1e9) DESC, e.id } AS labels", key=key)
    if not rows:
        from flowdb.store.features import resolve_feature

        resolve_feature(db, key)  # raises, saying what does exist
        raise NotFound(f"no feature {key!r}")
    row = rows[0]
    feature = {name: row["f"].get(name) for name in NODE_FIELDS}
    feature["url"] = _url(row["np_url"], feature["index"])
    labels = [{"text": e["description"], "source": label_source(e["typeName"]),
               "by": e["explanationModelName"] or e["typeName"], "score": e["score"]} for e in row["labels"]]
    thresholds = row["thresholds"] or {}
    scores = [{"place": place, "score": feature.get(f"s_{place}"), "threshold": thresholds.get(f"t_{place}"),
               "chance": thresholds.get(f"chance_{place}")} for place in PLACES]
    return json_ready({"feature": feature, "labels": labels, "scores": scores,
                        "rule": thresholds.get("threshold_rule"), "categories": list(CATEGORIES)}, _pd())


def _url(prefix: str | None, index) -> str | None:
    return f"{prefix}{index}" if prefix and index is not None else None


def _pd():
    import pandas as pd

    return pd


# --- flow graphs and neighbourhoods ---------------------------------------------------------

class Walk:
    """Nodes and edges gathered from one seed, each edge marked against its layer's
    threshold and chance level."""

    def __init__(self, db, pack: str, flt: EdgeFilter):
        self.db, self.pack, self.flt = db, pack, flt
        k, self.saes = _pack_saes(db, pack)
        if k is not None and flt.max_rank > k:
            raise QueryError(f"max_rank {flt.max_rank} is above pack {pack!r}'s k={k}: "
                             f"it stores each feature's top {k} match(es) per module")
        self.edges: dict[tuple[str, str, str], dict] = {}
        self.seen: dict[str, dict] = {}  # node properties met at the ends of edges
        self.more = False

    def step(self, keys: list[str], into: bool, types: list[str] = _EDGE_TYPES, cap: int = EDGE_ROW_CAP) -> list[dict]:
        """The kept edges into (or out of) keys, at most cap of them (self.more when cut)."""
        if not keys:
            return []
        rows = self.db.read(_INTO if into else _OUT_OF, keys=keys, types=types, limit=cap + 1,
                            **self.flt.params())
        if len(rows) > cap:
            self.more, rows = True, rows[:cap]
        edges = []
        for row in rows:
            self.seen[row["source"]] = row.pop("source_node")
            self.seen[row["target"]] = row.pop("target_node")
            self.edges.setdefault((row["source"], row["target"], row["kind"]), row)
            edges.append(row)
        return edges

    def nodes(self, keys) -> list[dict]:
        missing = sorted(set(keys) - set(self.seen))
        if missing:
            for row in self.db.read("UNWIND $keys AS key MATCH (f:Feature {key: key}) RETURN f {.*} AS f",
                                    keys=missing):
                self.seen[row["f"]["key"]] = row["f"]
        for key in set(keys) - set(self.seen):
            from flowdb.store.features import resolve_feature

            resolve_feature(self.db, key)  # raises, saying what does exist
        out = []
        for key in sorted(keys):
            node = {name: self.seen[key].get(name) for name in NODE_FIELDS}
            sae = self.saes.get((node["layer"], node["module"]), {})
            node["url"] = _url(sae.get("np_url"), node["index"])
            out.append(node)
        return out

    def marked_edges(self, edges) -> list[dict]:
        return [{**edge, "status": self.status(edge)} for edge in edges]

    def status(self, edge: dict) -> str:
        """threshold: at or above the cut-off the build set for its layer and place;
        above-chance: below that but above chance; chance: at chance level or below."""
        layer = int(edge["target"].split("/")[-3])
        return edge_status(edge["cosine"], edge["kind"], self.saes.get((layer, RESIDUAL.name), {}))


def flow(db, key: str, flt: EdgeFilter, depth: int = 3) -> dict:
    """The flow graph of one feature (the flow-graph template's graph, cut at `depth` steps
    back and forward), or a summary of it when it has more than marks.FLOW_NODE_CAP nodes.
    key: a stored feature key (flowdb.store.features.resolve_feature gives one)."""
    pack = key.split("/", 1)[0]
    walk = Walk(db, pack, flt)
    chain = {key}
    frontier = [key]
    for _ in range(depth):  # back along the residual chain
        frontier = sorted({e["source"] for e in walk.step(frontier, into=True, types=["RESIDUAL"])} - chain)
        chain.update(frontier)
    frontier = [key]
    for _ in range(depth):  # forward, through any kind of edge
        frontier = sorted({e["target"] for e in walk.step(frontier, into=False)} - chain)
        chain.update(frontier)
    links = [e for e in walk.step(sorted(chain), into=True)
             if e["kind"] != "residual" or e["source"] in chain]
    members = chain | {e["source"] for e in links}
    result = {"seed": key, "pack": pack, "depth": depth, "filter": flt.params(), "more": walk.more}
    if len(members) > marks.FLOW_NODE_CAP:
        return {**result, "too_big": _summary(walk.nodes(members), len(links)), "nodes": [], "edges": []}
    nodes = walk.nodes(members)
    seed_layer = next(n["layer"] for n in nodes if n["key"] == key)
    for node in nodes:
        node["role"] = ("seed" if node["key"] == key else "input" if node["module"] != RESIDUAL.name
                        else "ancestor" if node["layer"] < seed_layer else "descendant")
    return json_ready({**result, "nodes": nodes, "edges": walk.marked_edges(links), "too_big": None}, _pd())


def _summary(nodes: list[dict], n_edges: int) -> dict:
    counts: dict[tuple[int, str], int] = {}
    for node in nodes:
        counts[(node["layer"], node["module"])] = counts.get((node["layer"], node["module"]), 0) + 1
    return {"message": f"{len(nodes)} features and {n_edges} edges: too many to draw readably "
                       f"(at most {marks.FLOW_NODE_CAP}). Lower max_rank or depth, or raise t_res / t_mod.",
            "nodes": len(nodes), "edges": n_edges,
            "counts": [{"layer": layer, "module": module, "features": n}
                       for (layer, module), n in sorted(counts.items())]}


def neighbours(db, key: str, flt: EdgeFilter, cap: int = NEIGHBOUR_CAP) -> dict:
    """One node's kept edges in and out (at most cap each way) and the nodes at their ends."""
    walk = Walk(db, key.split("/", 1)[0], flt)
    into = walk.step([key], into=True, cap=cap)
    out = walk.step([key], into=False, cap=cap)
    edges = into + out
    ends = {key} | {e["source"] for e in edges} | {e["target"] for e in edges}
    return json_ready({"key": key, "nodes": walk.nodes(ends), "edges": walk.marked_edges(edges),
                        "more": walk.more, "cap": cap}, _pd())


def flow_frame(view: dict):
    """A flow view as the flow-graph template's rows, for its downloads (graph JSON, PNG, CSV)."""
    import pandas as pd

    columns = [*get_template("flow-graph").columns, "status"]
    rows = [{"element": "node", **{c: n.get(c) for c in columns if c != "element"}} for n in view["nodes"]]
    rows += [{"element": "edge", "layer": int(e["target"].split("/")[-3]), "source": e["source"],
              "target": e["target"], "kind": e["kind"], "cosine": e["cosine"], "status": e.get("status")}
             for e in view["edges"]]
    return pd.DataFrame(rows, columns=columns)


def mark_flow_frame(db, pack: str, frame):
    """The flow-graph template's rows with a status column: each edge marked as Walk.status
    marks it (the residual SAE nodes of the pack read once), None on node rows."""
    saes = _saes(db, pack)
    marked = frame.copy()
    marked["status"] = [
        edge_status(row.cosine, row.kind, saes.get((int(row.layer), RESIDUAL.name), {}))
        if row.element == "edge" else None for row in frame.itertuples()]
    return marked


