"""What a page draws of a stored attribution graph: a pruned subgraph read from Neo4j in a
few bounded queries, never the whole graph (circuit-tracer #12: a 1.7 GB file crashed the
page that loaded it whole).

    nodes     every input token (embedding) and output logit, and the node_cap most
              influential feature and error nodes. A node's `influence` in circuit-tracer's
              files is the cumulative share of influence of the nodes ranked at or above it
              (prune_graph), so the most influential have the smallest value.
    links     among those nodes, the link_cap strongest by |weight|.
    supernodes  the graph's own (qParams.supernodes), then flowdb's suggestions
              (supernodes.suggest_supernodes) for nodes no stored one holds.

`cut` says how many of each were left out and by which rule, for the page to say so.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from flowdb.circuits.store import require_graph

if TYPE_CHECKING:
    from flowdb.store.database import Database

NODE_CAP = 60  # feature and error nodes drawn by default; a page stays readable
LINK_CAP = 300
MAX_NODE_CAP, MAX_LINK_CAP = 500, 5_000  # what a page may ask for: plotly draws each link as a shape
FEATURE_GRAPHS_CAP = 200  # graphs listed on a feature's page
DRAWN_KINDS = ("feature", "error")  # the kinds node_cap ranks; tokens and logits are always drawn
GRAPH_FIELDS = ("slug", "scan", "prompt", "prompt_tokens", "node_threshold", "pack", "module", "nodes", "links",
                "file", "digest", "imported")

_NODES = """
CALL () {
  MATCH (n:GraphNode {graph: $slug}) WHERE NOT n.kind IN $ranked RETURN n
  UNION
  MATCH (n:GraphNode {graph: $slug}) WHERE n.kind IN $ranked
  WITH n ORDER BY n.influence IS NULL, n.influence, n.ord LIMIT $node_cap RETURN n
}
OPTIONAL MATCH (n)-[:IS]->(f:Feature)
RETURN n {.node_id, .kind, .layer, .ctx_idx, .feature, .feature_type, .influence, .activation, .token_prob,
          .is_target_logit, .clerp, .ord} AS node, f.key AS key, f.label AS label
ORDER BY n.ord
"""
_LINKS = """
UNWIND $ids AS id
MATCH (s:GraphNode {graph: $slug, node_id: id})-[r:ATTRIBUTES]->(t:GraphNode)
WHERE t.node_id IN $ids
WITH s, r, t ORDER BY abs(r.weight) DESC, r.ord
RETURN count(*) AS among, collect({source: s.node_id, target: t.node_id, weight: r.weight})[..$link_cap] AS links
"""


def read_subgraph(db: Database, slug: str, node_cap: int = NODE_CAP, link_cap: int = LINK_CAP,
                  suggest: bool = True) -> dict:
    """The graph's record, its drawn nodes (each with `row`: -1 for tokens, the layer for
    features and errors, one above the highest for logits) and links, its supernodes, and
    `cut`. suggest=False leaves flowdb's suggestions out (they read the other graphs)."""
    graph = require_graph(db, slug)
    ranked = db.read("MATCH (n:GraphNode {graph: $slug}) WHERE n.kind IN $ranked RETURN count(n) AS n",
                     slug=slug, ranked=list(DRAWN_KINDS))[0]["n"]
    nodes = []
    for row in db.read(_NODES, slug=slug, ranked=list(DRAWN_KINDS), node_cap=node_cap):
        nodes.append({**row["node"], "key": row["key"], "label": row["label"]})
    _set_rows(nodes)
    ids = [node["node_id"] for node in nodes]
    found = db.read(_LINKS, slug=slug, ids=ids, link_cap=link_cap)[0]
    drawn = set(ids)
    supernodes = _supernodes(db, graph, drawn, suggest)
    shown_ranked = sum(node["kind"] in DRAWN_KINDS for node in nodes)
    return {
        "graph": {name: graph.get(name) for name in GRAPH_FIELDS},
        "nodes": nodes, "links": found["links"], "supernodes": supernodes,
        "cut": {"nodes": {"shown": shown_ranked, "of": ranked, "cap": node_cap,
                          "always": len(nodes) - shown_ranked},
                "links": {"shown": len(found["links"]), "among": found["among"], "of": graph["links"],
                          "cap": link_cap}},
    }


def _set_rows(nodes: list[dict]) -> None:
    """Tokens at the bottom, then layers, logits on top (circuit-tracer's files give logits a
    layer past the last, or none that is a number)."""
    layers = [_layer_number(node["layer"]) for node in nodes if node["kind"] in DRAWN_KINDS]
    top = max(layers, default=0) + 1
    for node in nodes:
        node["row"] = (-1 if node["kind"] == "embedding" else top if node["kind"] == "logit"
                       else _layer_number(node["layer"]))


def _layer_number(layer: str) -> int:
    try:
        return int(layer)
    except (TypeError, ValueError):
        return 0


def _supernodes(db: Database, graph: dict, drawn: set[str], suggest: bool) -> list[dict]:
    """Stored groups first, then suggestions beside them; each with the members drawn."""
    stored = [entry for entry in json.loads(graph.get("qparams") or "{}").get("supernodes", []) if entry]
    groups = [{"name": entry[0], "origin": "stored", "rules": [], "node_ids": entry[1:]} for entry in stored]
    if suggest:
        from flowdb.circuits.supernodes import beside, suggest_supernodes

        suggestions = suggest_supernodes(db, graph["slug"])
        groups += [{"name": supernode.name, "origin": "suggested", "rules": list(supernode.rules),
                    "node_ids": members} for supernode, members in beside(stored, suggestions)]
    for group in groups:
        group["drawn"] = [node_id for node_id in group["node_ids"] if node_id in drawn]
    return groups


def graphs_of_feature(db: Database, key: str, limit: int = FEATURE_GRAPHS_CAP) -> dict:
    """The stored graphs whose feature nodes are tied to the feature `key`, one row per node
    (a feature active at several positions has a row for each), at most `limit` rows."""
    rows = db.read(
        "MATCH (n:GraphNode)-[:IS]->(:Feature {key: $key}) MATCH (g:AttributionGraph {slug: n.graph}) "
        "RETURN g.slug AS slug, g.prompt AS prompt, n.node_id AS node_id, n.ctx_idx AS position, "
        "g.prompt_tokens[n.ctx_idx] AS token, n.activation AS activation, n.influence AS influence "
        "ORDER BY slug, position LIMIT $limit", key=key, limit=limit + 1)
    return {"key": key, "graphs": rows[:limit], "more": len(rows) > limit, "limit": limit}
