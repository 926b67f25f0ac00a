"""`flowdb ingest`: a manifest into Neo4j, idempotent, resumable and atomic per layer.

Order of work: parse the manifest; ask the database whether the pack exists
(refusing other parameters unless replace=True); check every source; match and
classify every layer; only then write, layer by layer. A re-run with the same
parameters resumes after the last committed layer, or does nothing if complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from flowdb import __version__
from flowdb.build import build_layers, fingerprint, preflight
from flowdb.database import Database
from flowdb.errors import BuildConflict
from flowdb.graph_writer import begin_pack, drop_pack, finish_pack, stored_pack, write_layer
from flowdb.manifest import Manifest
from flowdb.matching import backend


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

    @property
    def relationships(self) -> int:
        return self.match_edges + self.nowhere_marks

    @property
    def write_rate(self) -> float:
        """Relationships per second of write time, node creation included."""
        return self.relationships / self.write_seconds if self.write_seconds else 0.0


def ingest(manifest: Manifest, db: Database, replace: bool = False,
           show_progress: bool | None = None) -> IngestReport:
    build_id = fingerprint(manifest)
    db.ensure_schema()
    existing = stored_pack(db, manifest.name)
    if existing and existing.fingerprint != build_id and not replace:
        raise BuildConflict(
            f"pack {manifest.name!r} is already stored with other parameters "
            f"(build {existing.fingerprint}, this manifest gives {build_id}); "
            "pass --replace to swap the old build for this one")
    if existing and existing.status == "dropping" and not replace:
        raise BuildConflict(f"pack {manifest.name!r} was being replaced when a run stopped; "
                            "run again with --replace")
    report = IngestReport(manifest.name, build_id, "built")
    if existing and existing.fingerprint == build_id and existing.status == "complete":
        report.status = "unchanged"
        return report

    preflight(manifest)
    started = time.perf_counter()
    layers = list(build_layers(manifest, build_id, progress=_bar(
        len(manifest.layers), f"matching {manifest.name}", show_progress)))
    report.match_seconds = time.perf_counter() - started

    # Everything is checked and matched: from here on the database changes.
    done: set[int] = set()
    if existing and (existing.fingerprint != build_id or existing.status == "dropping"):
        drop_pack(db, manifest.name)
        report.status = "replaced"
    elif existing:
        done = set(existing.layers_done)
        report.status = "resumed"
    if not existing or report.status == "replaced":
        begin_pack(db, manifest, build_id, __version__, backend())

    started = time.perf_counter()
    bar = tqdm(total=sum(layer.n_edges() for layer in layers), unit="rel",
               desc=f"writing {manifest.name}", disable=_disabled(show_progress))
    for layer in layers:
        if layer.layer in done:
            bar.update(layer.n_edges())
            continue
        edges, nowhere = write_layer(db, manifest.name, layer)
        report.match_edges += edges
        report.nowhere_marks += nowhere
        report.features += sum(layer.widths.values())
        report.layers_written.append(layer.layer)
        bar.update(layer.n_edges())
    bar.close()
    finish_pack(db, manifest.name)
    report.write_seconds = time.perf_counter() - started
    for layer in layers:
        for category in layer.categories:
            report.categories[category] = report.categories.get(category, 0) + 1
    return report


def _disabled(show_progress: bool | None) -> bool | None:
    return None if show_progress is None else not show_progress  # None: only on a terminal


def _bar(total: int, desc: str, show_progress: bool | None):
    bar = tqdm(total=total, unit="layer", desc=desc, disable=_disabled(show_progress))

    def advance(_layer: int) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return advance
