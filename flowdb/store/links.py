"""Link sets in Neo4j: a link atlas (flowdb.flow.link_atlas) stored one place per
transaction, resumable, under a lock per link set; and the families read back from it.

  (:LinkSet {name, a, b, a_fingerprint, b_fingerprint, fingerprint, k, t, rule,
             q_chance, matcher, status, places_done})-[:HAS_PLACE]->
      (:LinkPlace {link, layer, module, n_a, n_b, d_in, t_ab, t_ba, chance_ab,
                   chance_ba, threshold_rule, a_<category>, b_<category> shares})
  (a:Feature)-[:ALIGNS {link, cosine, rank, above, category}]->(b:Feature)  A's top-k
  (b:Feature)-[:ALIGNS {link, cosine, rank: 1, above, category}]->(a:Feature)  B's top-1
category on an ALIGNS relationship is the category of the feature it starts from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flowdb.flow.link_atlas import (
    LinkPlan,
    check_link_name,
    default_link_dir,
    link_atlas,
    link_name,
    link_set_properties,
)
from flowdb.flow.link_spec import LinkError, LinkSpec
from flowdb.flow.matching import Matcher
from flowdb.packs.plan import BuildPlan
from flowdb.progress import layer_bar
from flowdb.store import graph
from flowdb.store.graph import ensure_schema
from flowdb.store.locks import pack_lock
from flowdb.store.templates import run_template


@dataclass
class LinkReport:
    name: str
    fingerprint: str
    status: str  # "built", "resumed", "replaced" or "unchanged"
    atlas: Path
    records: list[dict]
    places_written: list[str] = field(default_factory=list)
    relationships: int = 0
    seconds: float = 0.0


def stored_plan(db, pack: str) -> BuildPlan:
    """The build plan of a complete stored pack, its SAE files checked against their digests."""

    record = graph.require_pack(db, pack)
    if not record.complete:
        raise LinkError(f"pack {pack!r} is {record.status}: finish its ingest before linking it")
    plan = BuildPlan.from_json(record.plan)
    plan.verify()
    return plan


def link_packs(db, a: str, b: str, spec: LinkSpec = LinkSpec(), name: str | None = None, replace: bool = False,
               matcher: Matcher | None = None, show_progress: bool | None = None) -> LinkReport:
    """Link two stored packs: match into the link atlas (what is not there yet), then store
    it, one place per transaction; a re-run resumes, or does nothing if complete."""

    if a == b:
        raise LinkError(f"link needs two different packs, got {a!r} twice")
    plans = stored_plan(db, a), stored_plan(db, b)  # a pack that is not there is named before any name is made of it
    name = check_link_name(name or link_name(a, b))
    matcher = matcher or Matcher()
    plan = LinkPlan(name, *plans, spec)
    places = plan.places()
    ensure_schema(db)
    started = time.perf_counter()
    with pack_lock(db, name, kind="link") as lease:
        existing = graph.read_link(db, name)
        status = "built"
        if existing is not None and existing["status"] in ("stale", "dropping"):
            # A pack it linked was replaced or deleted (its ALIGNS went with it), or a drop stopped.
            graph.drop_link(db, name)
            existing, status = None, "replaced"
        elif existing is not None and existing["fingerprint"] != plan.fingerprint:
            if not replace:
                raise LinkError(f"link set {name!r} is stored from other builds or parameters "
                                f"({existing['fingerprint']}; this one is {plan.fingerprint}); "
                                "pass --replace to link again")
            graph.drop_link(db, name)
            existing, status = None, "replaced"
        if existing is not None and existing["status"] == "complete":
            return LinkReport(name, plan.fingerprint, "unchanged", default_link_dir(plan),
                              graph_link_records(db, name))
        atlas = link_atlas(plan, matcher=matcher,
                           progress=layer_bar(len(places), f"linking {name}", show_progress))
        if existing is None:
            graph.begin_link(db, link_set_properties(plan.info(), matcher.backend))
        else:
            status = "resumed"
        done = set(existing["places_done"]) if existing else set()
        report = LinkReport(name, plan.fingerprint, status, atlas.root, [])
        for key in atlas.places_done():
            if key not in done:  # a place stored before is not read back from its Parquet again
                lease.check()
                place = atlas.read_place(key)
                report.relationships += graph.write_link_place(db, name, plan.a.name, plan.b.name, place)
                report.places_written.append(key)
        graph.finish_link(db, name)
    report.records = atlas.records()
    report.seconds = time.perf_counter() - started
    return report


def graph_link_records(db, name: str) -> list[dict]:
    """The LinkPlace records of a stored link set."""
    return [row["p"] for row in db.read("MATCH (:LinkSet {name: $name})-[:HAS_PLACE]->(p:LinkPlace) "
                                        "RETURN properties(p) AS p ORDER BY p.layer, p.module", name=name)]


# --- reading families ---------------------------------------------------------------------

def family_tree(db, feature: str, limit: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A feature's relatives at or above threshold in every linked pack, and theirs back (the family
    template, at most `limit` relatives each): (nodes, edges) as flowdb.views.plots.plot_family draws them."""

    def relatives(key: str) -> pd.DataFrame:
        return run_template(db, "family", {"feature": key, "above_only": True, "limit": limit})

    first = relatives(feature)
    if first.empty:
        raise LinkError(f"{feature} has no relative at or above threshold in any link set "
                        "(flowdb query family -p feature=... shows every match)")
    pack, layer, module, index = feature.split("/")
    own = set(first["category"].dropna())  # its category in each link: shown when the links agree
    nodes = {feature: {"key": feature, "column": 0, "pack": pack, "layer": int(layer), "module": module,
                       "index": int(index), "category": own.pop() if len(own) == 1 else None,
                       "label": first["label"].iloc[0]}}
    edges = []

    def add(frame: pd.DataFrame, source: str, column: int) -> list[str]:
        added = []
        for row in frame.itertuples():
            if row.relative_key not in nodes:
                nodes[row.relative_key] = {
                    "key": row.relative_key, "column": column, "pack": row.relative_pack,
                    "layer": row.relative_layer, "module": row.relative_module, "index": row.relative_index,
                    "category": row.relative_category, "label": row.relative_label}
                added.append(row.relative_key)
            if nodes[row.relative_key]["column"] == column:  # a tree: no edge back to where it came from
                edges.append({"source": source, "target": row.relative_key, "link": row.link,
                              "cosine": row.cosine})
        return added

    for relative in add(first, feature, 1):
        add(relatives(relative), relative, 2)
    return pd.DataFrame(list(nodes.values())), pd.DataFrame(edges, columns=["source", "target", "link", "cosine"])
