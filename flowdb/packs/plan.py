"""A build plan: a manifest resolved once into the SAEs it names, checked and hashed.

Ingest makes the plan, matches from it and stores it on the Pack node (as JSON);
the experiments reload a pack's SAEs from the stored plan, never from the
manifest file, and refuse when a file's content differs from what was matched.

The fingerprint hashes what decides the stored graph: the model, layers, k, the
match score (only when not the default, so older fingerprints stand), the threshold
rule and each SAE's content digest and Neuronpedia source. Where the
files lie does not enter it: a moved pack with the same content is the same build.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flowdb.classify import Thresholds
from flowdb.errors import FlowdbError, PackError, StaleBuildError
from flowdb.modules import MODULES, NAMES, RESIDUAL, Module
from flowdb.packs.manifest import DEFAULT_SCORE, Manifest, SourceRef
from flowdb.packs.sources import SaeInfo, check_same_space, content_digest, inspect

PLAN_VERSION = 2  # bump when the stored graph of the same inputs would differ


@dataclass(frozen=True)
class PlannedSae:
    """One SAE of the plan: where it is, what it is, and a digest of its content."""

    info: SaeInfo
    digest: str

    @property
    def ref(self) -> SourceRef:
        return self.info.ref

    def to_json(self) -> dict:
        ref = self.ref
        row = {"layer": ref.layer, "module": ref.module, "kind": ref.kind, "location": ref.location,
               "sae_id": ref.sae_id, "neuronpedia": ref.neuronpedia,
               "project_model": ref.project_model, "d_in": self.info.d_in,
               "d_sae": self.info.d_sae, "hook_name": self.info.hook_name,
               "neuronpedia_id": self.info.neuronpedia_id, "digest": self.digest}
        if self.info.scan is not None:  # transcoder sets only: SAE plans stay as they were
            row["scan"] = self.info.scan
        return row

    @classmethod
    def from_json(cls, row: dict) -> PlannedSae:
        ref = SourceRef(row["module"], row["layer"], row["kind"], row["location"],
                        row.get("sae_id"), row.get("neuronpedia"), row.get("project_model"))
        info = SaeInfo(ref, row.get("d_in"), row.get("d_sae"), row.get("hook_name"),
                       row.get("neuronpedia_id"), scan=row.get("scan"))
        return cls(info, row["digest"])


@dataclass(frozen=True)
class BuildPlan:
    name: str
    model: str
    first_layer: int
    last_layer: int
    k: int
    thresholds: Thresholds
    manifest: str  # absolute path of the manifest it came from
    saes: tuple[PlannedSae, ...]
    manifest_digest: str = ""  # SHA-256 of the manifest's text when the build was made
    score: str = DEFAULT_SCORE  # what R_L's features are matched by: "decoder" rows or "encoder" columns

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

    @property
    def modules(self) -> list[str]:
        present = {sae.ref.module for sae in self.saes}
        return [name for name in NAMES if name in present]

    def sae(self, layer: int, module: str) -> PlannedSae | None:
        return self._by_slot().get((layer, module))

    def source(self, module: str, layer: int) -> SourceRef | None:
        planned = self.sae(layer, module)
        return planned.ref if planned else None

    def has(self, layer: int, module: str) -> bool:
        return (layer, module) in self._by_slot()

    def _by_slot(self) -> dict[tuple[int, str], PlannedSae]:
        return {(s.ref.layer, s.ref.module): s for s in self.saes}

    def predecessors(self, layer: int) -> Iterator[tuple[Module, PlannedSae]]:
        """The SAEs R_layer is matched against: R_(layer-1), M_layer and A_layer, where planned."""
        for module in MODULES.values():
            planned = self.sae(module.predecessor_layer(layer), module.name)
            if planned is not None:
                yield module, planned

    def matching_gflop(self, layers: Iterable[int] | None = None) -> float | None:
        """The GEMM work of matching these layers (default: all), in GFLOP: each residual
        SAE's rows against each predecessor's; None where an SAE's size is not known."""
        work = 0.0
        for layer in self.layers if layers is None else layers:
            residual = self.sae(layer, RESIDUAL.name)
            if residual is None:
                continue
            for _, base in self.predecessors(layer):
                sizes = (residual.info.d_sae, base.info.d_sae, residual.info.d_in)
                if None in sizes:
                    return None
                work += 2 * sizes[0] * sizes[1] * sizes[2] / 1e9
        return work

    def fingerprint(self) -> str:
        sources = [{"layer": s.ref.layer, "module": s.ref.module, "digest": s.digest,
                    "neuronpedia": s.ref.neuronpedia, "project_model": s.ref.project_model}
                   for s in self.saes]
        spec = {"plan": PLAN_VERSION, "model": self.model, "layers": [self.first_layer, self.last_layer],
                "k": self.k, "thresholds": self.thresholds.spec(), "sources": sources}
        if self.score != DEFAULT_SCORE:
            spec["score"] = self.score
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "name": self.name, "model": self.model,
                "first_layer": self.first_layer, "last_layer": self.last_layer, "k": self.k,
                "score": self.score, "thresholds": self.thresholds.spec(), "manifest": self.manifest,
                "manifest_digest": self.manifest_digest,
                "modules": self.modules, "saes": [s.to_json() for s in self.saes]}

    @classmethod
    def from_json(cls, data: dict) -> BuildPlan:
        if data.get("version") != PLAN_VERSION:
            raise FlowdbError(f"pack {data.get('name')!r} was stored by an older flowdb without a "
                              "build plan; ingest it again with --replace")
        return cls(data["name"], data["model"], data["first_layer"], data["last_layer"], data["k"],
                   Thresholds.from_mapping(data["thresholds"]), data["manifest"],
                   tuple(PlannedSae.from_json(row) for row in data["saes"]), data.get("manifest_digest", ""),
                   data.get("score", DEFAULT_SCORE))

    def verify(self) -> None:
        """Refuse, naming the file, when an SAE's content differs from what was matched, or
        the manifest (where it still is) says something else now. A manifest that is gone
        is no obstacle: the plan holds everything the SAEs are reloaded from."""
        manifest = Path(self.manifest)
        if self.manifest_digest and manifest.is_file() and _text_digest(manifest) != self.manifest_digest:
            raise StaleBuildError(f"manifest {manifest} changed since pack {self.name!r} was built; "
                                  "run flowdb ingest on it again (an unchanged build only records it; "
                                  "other SAEs or parameters need --replace)")
        for planned in self.saes:
            try:
                found = content_digest(planned.ref)
            except PackError as exc:
                raise StaleBuildError(f"pack {self.name!r} was built from {exc}") from None
            if found != planned.digest:
                raise StaleBuildError(
                    f"{planned.ref.describe()} (layer {planned.ref.layer} {planned.ref.module}) "
                    f"changed since pack {self.name!r} was built; ingest it again with --replace")


def make_plan(manifest: Manifest, progress=None) -> BuildPlan:
    """Resolve every source once, check shapes and spaces (headers only), hash contents."""
    infos = []
    for ref in manifest.sources():
        infos.append(inspect(ref))
        if progress:
            progress(ref)
    residual = next(i for i in infos if i.ref.module == RESIDUAL.name and i.ref.layer == manifest.first_layer)
    if residual.d_in is not None:
        for info in infos:
            # A projected SAE's width is W_O's input; the build checks W_O's output.
            projected_from = info.d_in if info.ref.project_model else None
            check_same_space(info, residual.d_in, projected_from=projected_from)
    saes = tuple(PlannedSae(info, content_digest(info.ref)) for info in infos)
    path = Path(manifest.path).resolve()
    return BuildPlan(manifest.name, manifest.model, manifest.first_layer, manifest.last_layer,
                     manifest.k, manifest.thresholds, str(path), saes,
                     _text_digest(path) if path.is_file() else "", manifest.score)


def _text_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def layer_ranges(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> "2-4, 7"; [] -> "none"."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts) or "none"
