"""One layer of a build: its SAEs loaded, searched and classified.

Nothing here touches the database or the disk beyond reading SAEs: a layer in
memory holds only R_{L-1}, R_L, M_L and A_L. flowdb.flow.atlas stores layers (so a
resumed build does not search again) and flowdb.store.ingest writes them to Neo4j.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import lru_cache

import numpy as np

from flowdb.classify import classify
from flowdb.errors import PackError
from flowdb.flow.layer import LayerBuild
from flowdb.flow.matching import Matcher
from flowdb.modules import NAMES, RESIDUAL
from flowdb.packs.plan import BuildPlan, PlannedSae
from flowdb.packs.sources import SaeInfo, check_decoder, check_same_space, load_decoder, load_encoder


def match_layer(plan: BuildPlan, layer: int, matcher: Matcher) -> LayerBuild:
    """One layer's searches: R_L against R_{L-1}, M_L and A_L (where the pack has them).

    Self-contained (it loads its own SAEs), so layers can run in any order, in other
    processes or on other machines, and give the same result. With plan.score "encoder"
    the queries are R_L's encoder columns instead of its decoder rows; the base and the
    chance level (its width and d) are the same."""
    res_info, res_w = load_rows(plan.sae(layer, RESIDUAL.name), None)
    if plan.score == "encoder":
        res_w = load_encoder(plan.sae(layer, RESIDUAL.name).ref)[1]
    current = LayerBuild(layer, {RESIDUAL.name: res_w.shape[0]}, matcher=matcher.backend)
    current.saes[RESIDUAL.name] = _provenance(res_info, plan.model, plan.sae(layer, RESIDUAL.name))
    for module, planned in plan.predecessors(layer):
        info, base = load_rows(planned, res_info.d_in)
        if module is not RESIDUAL:
            current.widths[module.name] = base.shape[0]
            current.saes[module.name] = _provenance(info, plan.model, plan.sae(layer, module.name))
        if plan.k > base.shape[0]:
            raise PackError(f"{info.where()}: k={plan.k} exceeds its {base.shape[0]} features")
        started = time.perf_counter()
        scores, indices = matcher.search(res_w, base, plan.k)
        current.search_seconds += time.perf_counter() - started
        current.scores[module.name], current.indices[module.name] = scores, indices.astype(np.int32)
        current.searched[module.name] = tuple(base.shape)
    return current


def load_rows(planned: PlannedSae, residual_d_in: int | None) -> tuple[SaeInfo, np.ndarray]:
    """An SAE's decoder rows in the residual space (hook_z SAEs projected through W_O), as
    stored: the matcher normalises them a tile at a time, so no second full copy is made."""
    info, w_dec = load_decoder(planned.ref)
    if planned.ref.project_model:
        from flowdb.packs.projection import project_hook_z

        attention = _attention_output(planned.ref.project_model, planned.ref.layer)
        if residual_d_in is not None:
            attention.check_space(info, residual_d_in)
        w_dec = project_hook_z(w_dec, attention)  # reads the hook_z decoder whole: the projection is a new array
        check_decoder(w_dec, planned.ref)
        info = replace(info, d_in=attention.d_model, projection=attention.describe())
    elif residual_d_in is not None:
        check_same_space(info, residual_d_in)
    return info, w_dec


@lru_cache(maxsize=4)
def _attention_output(model: str, layer: int):
    from flowdb.packs.projection import load_attention_output

    return load_attention_output(model, layer)


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


def classified(layer: LayerBuild, plan: BuildPlan) -> LayerBuild:
    """The layer with its thresholds and categories, from its top-1 scores."""
    s = {place: layer.top1(place) for place in NAMES}
    layer.thresholds = plan.thresholds.for_layer(layer.layer, s, layer.searched)
    layer.categories = classify(*(s[place] for place in NAMES), layer.thresholds)
    return layer
