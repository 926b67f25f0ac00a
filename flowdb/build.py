"""A build of a pack: every source checked, every layer matched and classified.

Nothing here touches the database, so a pack that fails any check has written
nothing. Layers are streamed: at any time only R_{L-1}, R_L, M_L and A_L are in
memory. Each layer's matches are cached on disk under the build's fingerprint,
so a resumed ingest does not search again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from flowdb.classify import LayerThresholds, classify
from flowdb.errors import PackError
from flowdb.manifest import MODULES, Manifest, SourceRef
from flowdb.matching import normalise, top_k
from flowdb.settings import flowdb_home
from flowdb.sources import SaeInfo, check_same_space, inspect, load_decoder

SCHEMA_VERSION = 1
# Predecessor places of a residual feature at layer L, keyed by where they live.
PREDECESSORS = ("res", "mlp", "att")  # R_{L-1}, M_L, A_L


def fingerprint(manifest: Manifest) -> str:
    """A hash of everything that decides the stored graph (sources, k, thresholds)."""
    sources = []
    for ref in manifest.sources():
        entry = {"module": ref.module, "layer": ref.layer, "kind": ref.kind,
                 "location": ref.location, "sae_id": ref.sae_id, "neuronpedia": ref.neuronpedia}
        if ref.kind != "release":
            entry["bytes"] = _source_bytes(Path(ref.location))
        sources.append(entry)
    spec = {"schema": SCHEMA_VERSION, "model": manifest.model, "layers": list(manifest.layers),
            "k": manifest.k, "thresholds": manifest.thresholds.spec(), "sources": sources}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size if path.exists() else -1


@dataclass
class LayerBuild:
    """One layer's residual features with their top-k predecessors and categories."""

    layer: int
    widths: dict[str, int]  # module -> number of features at this layer
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # predecessor place -> [n_res, k]
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    saes: dict[str, dict] = field(default_factory=dict)  # module -> provenance
    thresholds: LayerThresholds | None = None
    categories: np.ndarray | None = None

    def top1(self, place: str) -> np.ndarray:
        """s(P) for every residual feature; NaN where the place has no SAE."""
        if place in self.scores:
            return self.scores[place][:, 0].astype(np.float64)
        return np.full(self.widths["res"], np.nan)

    def n_edges(self) -> int:
        return sum(int(v.size) for v in self.indices.values())


def preflight(manifest: Manifest) -> dict[tuple[int, str], SaeInfo]:
    """Check every source exists and agrees in shape before any weight is read."""
    infos = {(ref.layer, ref.module): inspect(ref) for ref in manifest.sources()}
    residual = infos[(manifest.first_layer, "res")]
    for info in infos.values():
        if residual.d_in is not None:
            check_same_space(info, residual.d_in)
    return infos


def build_layers(manifest: Manifest, build_id: str, progress=None) -> Iterator[LayerBuild]:
    """Match and classify layer by layer (cached), yielding each layer in order."""
    cache_dir = flowdb_home() / "cache" / "matches" / f"{manifest.name}-{build_id}"
    previous_res: tuple[SaeInfo, np.ndarray] | None = None
    residual_d_in: int | None = None
    for layer in manifest.layers:
        cached = _load_cached(cache_dir / f"layer_{layer}.npz", layer)
        if cached is not None:
            previous_res = None  # reloaded only if the next layer is not cached
            yield _classified(cached, manifest)
            if progress:
                progress(layer)
            continue
        if previous_res is None and layer > manifest.first_layer:
            previous_res = _load(manifest.source("res", layer - 1), residual_d_in)
        res_info, res_w = _load(manifest.source("res", layer), residual_d_in)
        residual_d_in = res_info.d_in
        bases = {"res": previous_res}
        for module in ("mlp", "att"):
            ref = manifest.source(module, layer)
            bases[module] = _load(ref, residual_d_in) if ref else None
        current = LayerBuild(layer, {"res": res_w.shape[0]})
        current.saes["res"] = _provenance(res_info, manifest.model)
        for module in ("mlp", "att"):
            if bases[module] is not None:
                current.widths[module] = bases[module][1].shape[0]
                current.saes[module] = _provenance(bases[module][0], manifest.model)
        for place, base in bases.items():
            if base is None:
                continue
            current.scores[place], current.indices[place] = _search(res_w, base, manifest.k)
        _store_cached(cache_dir / f"layer_{layer}.npz", current)
        previous_res = (res_info, res_w)
        yield _classified(current, manifest)
        if progress:
            progress(layer)


def _load(ref: SourceRef, residual_d_in: int | None) -> tuple[SaeInfo, np.ndarray]:
    info, w_dec = load_decoder(ref)
    if residual_d_in is not None:
        check_same_space(info, residual_d_in)
    return info, normalise(w_dec)


def _search(queries: np.ndarray, base: tuple[SaeInfo, np.ndarray], k: int):
    info, vectors = base
    if k > vectors.shape[0]:
        raise PackError(f"{info.where()}: k={k} exceeds its {vectors.shape[0]} features")
    scores, indices = top_k(queries, vectors, k)
    return scores, indices.astype(np.int32)


NEURONPEDIA = "https://www.neuronpedia.org"


def _provenance(info: SaeInfo, model: str) -> dict:
    ref = info.ref
    source = ref.neuronpedia or _np_source(info)
    return {"source": ref.describe(), "kind": ref.kind, "d_in": info.d_in, "d_sae": info.d_sae,
            "hook_name": info.hook_name, "neuronpedia": source,
            # A feature's page is this prefix plus its index.
            "np_url": f"{NEURONPEDIA}/{model}/{source}/" if source else None}


def _np_source(info: SaeInfo) -> str | None:
    # sae-lens neuronpedia ids are "modelId/source"; the pack's model names the modelId.
    return info.neuronpedia_id.split("/", 1)[1] if info.neuronpedia_id and "/" in info.neuronpedia_id else None


def _classified(layer: LayerBuild, manifest: Manifest) -> LayerBuild:
    s = [layer.top1(place) for place in PREDECESSORS]
    layer.thresholds = manifest.thresholds.for_layer(layer.layer, *s)
    layer.categories = classify(*s, layer.thresholds)
    return layer


def _store_cached(path: Path, layer: LayerBuild) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"scores_{p}": v for p, v in layer.scores.items()}
    arrays.update({f"indices_{p}": v for p, v in layer.indices.items()})
    meta = json.dumps({"widths": layer.widths, "saes": layer.saes})
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, meta=np.array(meta), **arrays)
    os.replace(partial, path)  # a killed run never leaves a half-written cache entry


def _load_cached(path: Path, layer: int) -> LayerBuild | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        built = LayerBuild(layer, meta["widths"], saes=meta["saes"])
        for place in PREDECESSORS:
            if f"scores_{place}" in data:
                built.scores[place] = data[f"scores_{place}"]
                built.indices[place] = data[f"indices_{place}"]
    return built


__all__ = ["MODULES", "LayerBuild", "build_layers", "fingerprint", "preflight"]
