"""`flowdb ingest` and `flowdb load`: a build into Neo4j, idempotent, resumable and
atomic per layer.

ingest is match + load: resolve the manifest into a build plan (every source
checked and hashed); take the pack's lock; ask the database whether the pack
exists (refusing other parameters unless replace=True); match and classify every
layer into the build's atlas (flowdb.flow.atlas, kept under FLOWDB_HOME/atlas); only
then write, layer by layer. load does the same from an atlas someone matched
before. A re-run with the same content resumes after the last committed layer,
or does nothing if complete.

A replacement is written beside the stored build, as NAME~next, and swapped in by
one transaction only once complete: a kill at any point leaves the old build
whole, and the next run resumes the replacement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from flowdb._version import __version__
from flowdb.errors import BuildConflict
from flowdb.flow.atlas import Atlas, default_dir, match
from flowdb.flow.layer import PACK_NODES
from flowdb.flow.matching import Matcher
from flowdb.packs.manifest import Manifest
from flowdb.packs.plan import BuildPlan, make_plan
from flowdb.progress import disabled, layer_bar
from flowdb.store import graph
from flowdb.store.database import Database
from flowdb.store.locks import Lease, pack_lock


@dataclass
class IngestReport:
    pack: str
    fingerprint: str
    status: str  # "built", "resumed", "replaced" or "unchanged"
    layers_written: list[int] = field(default_factory=list)
    match_edges: int = 0
    nowhere_marks: int = 0
    features: int = 0
    match_seconds: float = 0.0
    write_seconds: float = 0.0
    categories: dict[str, int] = field(default_factory=dict)
    threshold_rule: str = ""
    layer_rules: dict[int, str] = field(default_factory=dict)  # layer -> what set its thresholds
    above_chance: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> place -> share

    def chance_summary(self) -> str:
        """Per place: the mean share of top-1 matches above chance, with its range over layers."""
        parts = []
        for place in ("res", "mlp", "att"):
            shares = [by_place[place] for by_place in self.above_chance.values() if place in by_place]
            if shares:
                parts.append(f"{place} {sum(shares) / len(shares):.2f} [{min(shares):.2f}-{max(shares):.2f}]")
        return ", ".join(parts)

    @property
    def relationships(self) -> int:
        return self.match_edges + self.nowhere_marks

    @property
    def write_rate(self) -> float:
        """Relationships per second of write time, node creation included."""
        return self.relationships / self.write_seconds if self.write_seconds else 0.0


def ingest(manifest: Manifest, db: Database, replace: bool = False,
           show_progress: bool | None = None, matcher: Matcher | None = None) -> IngestReport:
    plan = make_plan(manifest)
    return ingest_plan(plan, db, replace=replace, show_progress=show_progress, matcher=matcher)


def ingest_plan(plan: BuildPlan, db: Database, replace: bool = False,
                show_progress: bool | None = None, matcher: Matcher | None = None) -> IngestReport:
    """Match the plan into its atlas (what is not there yet), then load that."""
    def matched() -> Atlas:
        return match(plan, default_dir(plan), matcher, progress=layer_bar(
            len(plan.layers), f"matching {plan.name}", show_progress))

    return _store(plan, db, matched, replace, show_progress)


def load(atlas: Atlas, db: Database, replace: bool = False,
         show_progress: bool | None = None) -> IngestReport:
    """Put a complete atlas into Neo4j, as ingest would have."""
    atlas.require_complete()
    return _store(atlas.plan, db, lambda: atlas, replace, show_progress)


def _store(plan: BuildPlan, db: Database, matched, replace: bool,
           show_progress: bool | None) -> IngestReport:
    build_id = plan.fingerprint()
    graph.ensure_schema(db)
    with pack_lock(db, plan.name) as lease:
        if graph.read_pack(db, plan.name + graph.RETIRED_SUFFIX):  # a swap stopped before its clean-up
            graph.drop_pack(db, plan.name + graph.RETIRED_SUFFIX)
        target = _target(db, plan, build_id, replace)
        staged = graph.read_pack(db, plan.name + graph.STAGED_SUFFIX)
        if staged and target != staged.name:  # a replacement abandoned for this build
            graph.drop_pack(db, staged.name)
        report = IngestReport(plan.name, build_id, "built", threshold_rule=plan.thresholds.rule)
        if target is None:
            report.status = "unchanged"
            return report
        started = time.perf_counter()
        atlas = matched()
        report.match_seconds = time.perf_counter() - started
        _write(db, plan, atlas, target, report, show_progress, lease)
        if target != plan.name:
            lease.check()
            graph.swap_in(db, plan.name)
            graph.drop_pack(db, plan.name + graph.RETIRED_SUFFIX)
            report.status = "replaced"
    return report


def _target(db: Database, plan: BuildPlan, build_id: str, replace: bool) -> str | None:
    """The pack name to write into (the pack, or its staged replacement); None: nothing to do."""
    existing = graph.read_pack(db, plan.name)
    if existing and existing.status == "dropping":  # a delete that stopped part way: finish it
        graph.drop_pack(db, plan.name)
        existing = None
    if existing is None or existing.fingerprint == build_id:
        if existing and existing.complete:
            graph.record_plan(db, plan.name, plan.to_json())  # only where the files lie may have changed
            return None
        return plan.name
    if not replace:
        raise BuildConflict(
            f"pack {plan.name!r} is already stored from other SAE files or parameters "
            f"(build {existing.fingerprint}, this manifest gives {build_id}); "
            "pass --replace to swap the old build for this one")
    staged = plan.name + graph.STAGED_SUFFIX
    previous = graph.read_pack(db, staged)
    if previous and (previous.fingerprint != build_id or previous.status == "dropping"):
        graph.drop_pack(db, staged)  # another replacement, or one half deleted: never resumed
    return staged


def _write(db: Database, plan: BuildPlan, atlas: Atlas, target: str, report: IngestReport,
           show_progress: bool | None, lease: Lease) -> None:
    # Everything is checked and matched: from here on the database changes.
    stored = graph.read_pack(db, target)
    done = set(stored.layers_done) if stored else set()
    _require_space(db, atlas, [layer for layer in atlas.layers_done() if layer not in done],
                   0 if stored else PACK_NODES, plan.name, replaces=target != plan.name)
    if stored:
        report.status = "resumed"
    else:
        graph.begin_pack(db, target, plan.to_json(), atlas.fingerprint, __version__, atlas.matchers())
    started = time.perf_counter()
    bar = tqdm(total=atlas.n_edges(), unit="rel", desc=f"writing {plan.name}", disable=disabled(show_progress))
    for layer in atlas.layers():
        if layer.layer not in done:
            lease.check()
            edges, nowhere = graph.write_layer(db, target, layer)
            report.match_edges += edges
            report.nowhere_marks += nowhere
            report.features += sum(layer.widths.values())
            report.layers_written.append(layer.layer)
        bar.update(layer.n_edges())
        for category in layer.categories:
            report.categories[category] = report.categories.get(category, 0) + 1
        report.layer_rules[layer.layer] = layer.thresholds.rule
        report.above_chance[layer.layer] = layer.above_chance()
    bar.close()
    graph.finish_pack(db, target)
    report.write_seconds = time.perf_counter() - started


def delete_pack(db: Database, pack: str) -> graph.Deletion:
    """Delete a stored pack and any replacement of it staged or retired beside it, with its link
    sets (their ALIGNS on the other pack too), under the pack's lock (no ingest of it runs
    meanwhile); returns what it deleted (graph.deletion, counted under the lock). A delete that
    stops part way leaves the pack "dropping": running it again (or an ingest) finishes it."""
    graph.require_pack(db, pack)
    with pack_lock(db, pack) as lease:
        deleted = graph.deletion(db, pack)
        for name in (pack + graph.STAGED_SUFFIX, pack + graph.RETIRED_SUFFIX, pack):
            if graph.read_pack(db, name) is not None:
                lease.check()
                graph.drop_pack(db, name)
    return deleted


def _require_space(db: Database, atlas: Atlas, layers: list[int], pack_nodes: int, pack: str,
                   replaces: bool) -> None:
    """Refuse before writing when the managed server's disk cannot take these layers and,
    for a replacement, the log of deleting the build it replaces. The disk of a server
    flowdb does not manage cannot be seen from here: not checked."""
    if db.server is None or not layers:
        return
    from flowdb.store.server import BOLT_COST, DELETE_COST

    nodes, relationships = atlas.graph_size(layers)
    nodes += pack_nodes
    needed = BOLT_COST.bytes(nodes, relationships)
    what = f"writing pack {pack!r} ({nodes:,} nodes, {relationships:,} relationships"
    if replaces:
        old_nodes, old_relationships = graph.stored_size(db, pack)
        needed += DELETE_COST.bytes(old_nodes, old_relationships)
        what += f", then deleting the {old_nodes:,} nodes of the build it replaces"
    db.server.require_space(needed, what + ")")


def stored_pack(db: Database, pack_or_manifest: str, matcher: Matcher | None = None,
                show_progress: bool | None = None) -> tuple[str, IngestReport | None]:
    """A stored pack's name as given; or a manifest's pack, ingested first (a stored build with
    the same content is left as it is), with its ingest report."""
    if not pack_or_manifest.endswith(".toml") and not Path(pack_or_manifest).is_file():
        return pack_or_manifest, None
    from flowdb.packs.manifest import load_manifest

    report = ingest(load_manifest(pack_or_manifest), db, show_progress=show_progress, matcher=matcher)
    return report.pack, report
