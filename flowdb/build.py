"""A build of a pack: every source checked, every layer matched and classified.

Nothing here touches the database, so a pack that fails any check has written
nothing. Layers are streamed: at any time only R_{L-1}, R_L, M_L and A_L are in
memory. Each layer's matches are cached on disk under the build's fingerprint,
so a resumed ingest does not search again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from flowdb.classify import LayerThresholds, classify
from flowdb.errors import PackError
from flowdb.matching import normalise, top_k
from flowdb.modules import MODULES, NAMES, RESIDUAL
from flowdb.plan import BuildPlan, PlannedSae
from flowdb.settings import flowdb_home
from flowdb.sources import SaeInfo, check_decoder, check_same_space, load_decoder


@dataclass
class LayerBuild:
    """One layer's residual features with their top-k predecessors and categories."""

    layer: int
    widths: dict[str, int]  # module -> number of features at this layer
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # predecessor place -> [n_res, k]
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    saes: dict[str, dict] = field(default_factory=dict)  # module -> provenance
    searched: dict[str, tuple[int, int]] = field(default_factory=dict)  # place -> (width, d_in) searched
    thresholds: LayerThresholds | None = None
    categories: np.ndarray | None = None

    def above(self, place: str) -> np.ndarray:
        """Which stored matches [n_res, k] reach the layer's threshold for their place."""
        return self.scores[place] >= self.thresholds.for_place(place)

    def above_chance(self) -> dict[str, float]:
        """Per place, the share of top-1 matches above the chance level."""
        chance = dict(self.thresholds.chance)
        return {place: float(np.mean(self.scores[place][:, 0] >= chance[place]))
                for place in self.scores if place in chance}

    def top1(self, place: str) -> np.ndarray:
        """s(P) for every residual feature; NaN where the place has no SAE."""
        if place in self.scores:
            return self.scores[place][:, 0].astype(np.float64)
        return np.full(self.widths["res"], np.nan)

    def n_edges(self) -> int:
        return sum(int(v.size) for v in self.indices.values())


def build_layers(plan: BuildPlan, build_id: str, progress=None) -> Iterator[LayerBuild]:
    """Match and classify layer by layer (cached), yielding each layer in order."""
    cache_dir = flowdb_home() / "cache" / "matches" / f"{plan.name}-{build_id}"
    previous_res: tuple[SaeInfo, np.ndarray] | None = None
    residual_d_in: int | None = None
    for layer in plan.layers:
        cached = _load_cached(cache_dir / f"layer_{layer}.npz", layer)
        if cached is not None:
            previous_res = None  # reloaded only if the next layer is not cached
            yield _classified(cached, plan)
            if progress:
                progress(layer)
            continue
        if previous_res is None and layer > plan.first_layer:
            previous_res = _load(plan.sae(RESIDUAL.predecessor_layer(layer), RESIDUAL.name), residual_d_in)
        res_info, res_w = _load(plan.sae(layer, RESIDUAL.name), residual_d_in)
        residual_d_in = res_info.d_in
        bases = {RESIDUAL.name: previous_res}
        for module in MODULES.values():
            if module is not RESIDUAL:
                planned = plan.sae(module.predecessor_layer(layer), module.name)
                bases[module.name] = _load(planned, residual_d_in) if planned else None
        current = LayerBuild(layer, {RESIDUAL.name: res_w.shape[0]})
        current.saes[RESIDUAL.name] = _provenance(res_info, plan.model, plan.sae(layer, RESIDUAL.name))
        for name, base in bases.items():
            if base is not None and name != RESIDUAL.name:
                current.widths[name] = base[1].shape[0]
                current.saes[name] = _provenance(base[0], plan.model, plan.sae(layer, name))
        for place, base in bases.items():
            if base is not None:
                current.scores[place], current.indices[place] = _search(res_w, base, plan.k)
                current.searched[place] = tuple(base[1].shape)
        _store_cached(cache_dir / f"layer_{layer}.npz", current)
        previous_res = (res_info, res_w)
        yield _classified(current, plan)
        if progress:
            progress(layer)


def _load(planned: PlannedSae, residual_d_in: int | None) -> tuple[SaeInfo, np.ndarray]:
    """An SAE's unit decoder rows in the residual space (hook_z SAEs projected through W_O)."""
    info, w_dec = load_decoder(planned.ref)
    if planned.ref.project_model:
        from flowdb.projection import project_hook_z

        attention = _attention_output(planned.ref.project_model, planned.ref.layer)
        if residual_d_in is not None:
            attention.check_space(info, residual_d_in)
        w_dec = project_hook_z(w_dec, attention)
        check_decoder(w_dec, planned.ref)
        info = replace(info, d_in=attention.d_model, projection=attention.describe())
    elif residual_d_in is not None:
        check_same_space(info, residual_d_in)
    return info, normalise(w_dec)


@lru_cache(maxsize=4)
def _attention_output(model: str, layer: int):
    from flowdb.projection import load_attention_output

    return load_attention_output(model, layer)


def _search(queries: np.ndarray, base: tuple[SaeInfo, np.ndarray], k: int):
    info, vectors = base
    if k > vectors.shape[0]:
        raise PackError(f"{info.where()}: k={k} exceeds its {vectors.shape[0]} features")
    scores, indices = top_k(queries, vectors, k)
    return scores, indices.astype(np.int32)


NEURONPEDIA = "https://www.neuronpedia.org"


def _provenance(info: SaeInfo, model: str, planned: PlannedSae) -> dict:
    ref = info.ref
    source = ref.neuronpedia or _np_source(info)
    provenance = {"source": ref.describe(), "kind": ref.kind, "digest": planned.digest,
                  "d_in": info.d_in, "d_sae": info.d_sae,
                  "hook_name": info.hook_name, "neuronpedia": source,
                  # A feature's page is this prefix plus its index.
                  "np_url": f"{NEURONPEDIA}/{model}/{source}/" if source else None}
    if info.projection:  # Neo4j properties are flat: one per fact of the projection
        projection = info.projection
        provenance.update({"projection": projection["projection"], "projection_model": projection["model"],
                           "projection_post_norm": projection["post_norm"],
                           "projected_from_d_in": projection["d_in"], "projection_sha256": projection["sha256"]})
    return provenance


def _np_source(info: SaeInfo) -> str | None:
    # sae-lens neuronpedia ids are "modelId/source"; the pack's model names the modelId.
    return info.neuronpedia_id.split("/", 1)[1] if info.neuronpedia_id and "/" in info.neuronpedia_id else None


def _classified(layer: LayerBuild, plan: BuildPlan) -> LayerBuild:
    s = {place: layer.top1(place) for place in NAMES}
    layer.thresholds = plan.thresholds.for_layer(layer.layer, s, layer.searched)
    layer.categories = classify(*(s[place] for place in NAMES), layer.thresholds)
    return layer


def _store_cached(path: Path, layer: LayerBuild) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"scores_{p}": v for p, v in layer.scores.items()}
    arrays.update({f"indices_{p}": v for p, v in layer.indices.items()})
    meta = json.dumps({"widths": layer.widths, "saes": layer.saes, "searched": layer.searched})
    # A private temporary file per process, then an atomic rename: a killed run never
    # leaves a half-written entry, and two runs never write the same file.
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz")
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, meta=np.array(meta), **arrays)
    os.replace(partial, path)


def _load_cached(path: Path, layer: int) -> LayerBuild | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        built = LayerBuild(layer, meta["widths"], saes=meta["saes"],
                           searched={p: tuple(v) for p, v in meta["searched"].items()})
        for place in NAMES:
            if f"scores_{place}" in data:
                built.scores[place] = data[f"scores_{place}"]
                built.indices[place] = data[f"indices_{place}"]
    return built


