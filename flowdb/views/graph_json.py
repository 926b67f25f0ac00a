"""A flow graph in Neuronpedia's graph JSON: what its graph viewer shows and circuit-tracer writes.

The format (Neuronpedia's `apps/webapp/app/api/graph/graph-schema.json`, the schema its
upload checks) describes an attribution graph over one prompt: `metadata`, `qParams`
(the viewer's saved state), `nodes` (a feature at a layer and token position) and
`links` (weighted edges between node ids). A flowdb flow graph has no prompt and no
token positions, so some fields carry values chosen to render in the viewer
(`apps/webapp/app/[modelId]/graph/`, read for these choices):

- **Positions are modules.** The viewer draws layers bottom to top and token
  positions left to right. Each module gets a position of its own (`ctx_idx`
  0 attention, 1 MLP, 2 residual), so a layer's row shows its attention and MLP
  inputs to the left of the residual chain, and `prompt_tokens` holds one placeholder
  per position naming the module. This also keeps nodes apart where the viewer
  merges them: it keys a feature on (layer, feature, ctx_idx), and `3/res/5` and
  `3/mlp/5` share layer and index.
- **`feature` is the Cantor pairing of layer and index** with `schema_version` 1,
  as circuit-tracer writes it: the viewer decodes the index from it to fetch a
  Neuronpedia dashboard from `{layer}-{source set}`.
- **One source set per graph** (plus one for attention). The viewer looks every
  ordinary node up in `feature_details.neuronpedia_source_set` and nodes of type
  `lorsa` (its attention features) in `neuronpedia_lorsa_source_set`. A module's
  set comes from its nodes' Neuronpedia URLs, and only when all of them share one
  set whose layer is the flowdb layer. The residual set is the graph's set, else
  the MLP one; attention uses the lorsa slot. A node whose module cannot be looked
  up gets `feature_type` "unknown" (drawn "?", never looked up), so the viewer
  shows no dashboard rather than another module's feature of the same index.
  Without any set nothing is looked up, and residual and MLP nodes are drawn as
  ordinary features ("cross layer transcoder", ●), attention as `lorsa` (▴).
- **No influence, no activation.** Both are per-prompt attribution quantities a
  flow graph does not have, so nodes carry neither and `node_threshold` is left
  out (the viewer then prunes nothing). Link weights are the cosines.
- The seed is pinned and clicked (`qParams`); `clerp`, the label the viewer
  shows, is the feature's Neuronpedia label or "".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from flowdb.errors import FlowdbError
from flowdb.writes import atomic_write

SCHEMA_VERSION = 1  # features are Cantor-paired (layer, index), as circuit-tracer writes them
POSITION = {"att": 0, "mlp": 1, "res": 2}  # ctx_idx of each module's features
PROMPT_TOKENS = ["[attention]", "[MLP]", "[residual]"]  # one placeholder per position
FEATURE = "cross layer transcoder"  # the viewer's ordinary feature node (dashboard from the source set)
ATTENTION = "lorsa"  # the viewer's attention feature node (dashboard from the lorsa source set)
NO_DASHBOARD = "unknown"  # drawn as "?", never looked up
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")  # what Neuronpedia refuses in a slug or scan
_SOURCE = re.compile(r"^(\d+)-(.+)$")  # a Neuronpedia source id: {layer}-{source set}


def cantor(layer: int, index: int) -> int:
    """The Cantor pairing of (layer, index): circuit-tracer's `feature` of a node."""
    return (layer + index) * (layer + index + 1) // 2 + index


def slug_for(feature: str) -> str:
    """A Neuronpedia slug (letters, digits, _ . -) for the flow graph of feature."""
    return "flowdb-" + _NAME.sub("-", feature).strip("-")


def _text(value: Any) -> str:
    """A string value, or "" for None, NaN and NA."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value)


def _source_set(url: str, layer: int) -> str | None:
    """The Neuronpedia source set in a feature URL .../{model}/{layer}-{set}/{index}, when its layer is layer."""
    parts = url.rstrip("/").split("/")
    match = _SOURCE.match(parts[-2]) if len(parts) >= 2 else None
    if match is None or int(match.group(1)) != layer:
        return None
    return match.group(2)


def module_source_sets(nodes: pd.DataFrame) -> dict[str, str | None]:
    """Per module, the one Neuronpedia source set all its nodes' URLs name, else None."""
    found: dict[str, str | None] = {}
    for module, group in nodes.groupby("module"):
        sets = {_source_set(_text(row["url"]), int(row["layer"])) if _text(row["url"]) else None
                for row in group.to_dict("records")}
        found[module] = sets.pop() if len(sets) == 1 else None
    return found


def _feature_types(sets: dict[str, str | None]) -> tuple[dict[str, str], dict[str, str]]:
    """feature_type per module, and the feature_details naming the source sets the viewer will use."""
    primary = sets.get("res") or sets.get("mlp")
    lorsa = sets.get("att")
    types = {module: FEATURE if primary is None or sets.get(module) == primary else NO_DASHBOARD
             for module in ("res", "mlp")}
    types["att"] = ATTENTION if lorsa or primary is None else NO_DASHBOARD
    details = {}
    if primary:
        details["neuronpedia_source_set"] = primary
    if lorsa:
        details["neuronpedia_lorsa_source_set"] = lorsa
    return types, details


def _node_id(layer: int, index: int, module: str) -> str:
    return f"{layer}_{index}_{POSITION[module]}"  # circuit-tracer's "layer_feature_position"


def flow_graph_json(graph: pd.DataFrame, model: str, *, slug: str | None = None,
                    settings: dict[str, Any] | None = None, created_ms: int | None = None) -> dict:
    """The flow-graph template's rows (nodes and edges) as a Neuronpedia graph JSON document.

    model is the pack's model id (the graph's `scan`, Neuronpedia's modelId); settings
    are the template parameters used (t_res, t_mod, max_rank), recorded in the metadata;
    created_ms, when given, is the creation time in ms since the epoch.
    """
    from flowdb._version import __version__

    nodes = graph[graph["element"] == "node"]
    edges = graph[graph["element"] == "edge"]
    if nodes.empty:
        raise FlowdbError("the flow graph is empty: is the feature reference right?")
    if int(nodes["layer"].max()) == 0:
        # The viewer takes the top layer as "no layer found" when it is 0 and stops.
        raise FlowdbError("every node of this flow graph is at layer 0, which Neuronpedia's viewer cannot show")
    seeds = nodes.loc[nodes["role"] == "seed", "key"]
    seed = str(seeds.iloc[0]) if len(seeds) else str(nodes["key"].iloc[0])
    slug = slug if slug is not None else slug_for(seed)
    if not slug or _NAME.search(slug):
        raise FlowdbError(f"slug {slug!r}: Neuronpedia takes only letters, digits, '_', '.' and '-'")
    sets = module_source_sets(nodes)
    types, details = _feature_types(sets)

    ids: dict[str, str] = {}
    out_nodes = []
    for row in nodes.sort_values(["layer", "module", "index"]).to_dict("records"):
        layer, index, module = int(row["layer"]), int(row["index"]), str(row["module"])
        node_id = _node_id(layer, index, module)
        ids[row["key"]] = node_id
        node = {
            "node_id": node_id,
            "feature": cantor(layer, index),
            "layer": str(layer),
            "ctx_idx": POSITION[module],
            "feature_type": types[module],
            "jsNodeId": f"{layer}_{index}-{POSITION[module]}",
            "clerp": _text(row["label"]),
            # circuit-tracer's node fields for prompts and logits, at its defaults
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
        }
        if _text(row["url"]):
            node["vis_link"] = _text(row["url"])  # the feature's Neuronpedia page
        out_nodes.append(node)
    links = [{"source": ids[e["source"]], "target": ids[e["target"]], "weight": float(e["cosine"])}
             for e in edges.to_dict("records") if e["source"] in ids and e["target"] in ids]

    settings = dict(settings or {})
    cutoffs = ", ".join(f"{name} {value}" for name, value in settings.items())
    description = (
        f"flowdb flow graph of {seed} (Laptev et al., ICML 2025): its residual chain and the MLP "
        f"and attention features feeding each step{f' ({cutoffs})' if cutoffs else ''}. Link weights "
        "are decoder cosines, not attributions. There is no prompt: the three positions are the "
        "modules (attention, MLP, residual), and rows are layers.")
    metadata: dict[str, Any] = {
        "slug": slug,
        "scan": model,
        "prompt_tokens": list(PROMPT_TOKENS),
        "prompt": f"flow graph of {seed}",
        "transcoder_list": [],  # circuit-tracer's metadata lists its transcoders here; flowdb has none
        "schema_version": SCHEMA_VERSION,
        "info": {
            "description": description,
            "generator": {"name": "flowdb", "version": __version__},
        },
        "generation_settings": {"method": "flowdb flow-graph", **settings},
    }
    if created_ms is not None:
        metadata["info"]["create_time_ms"] = created_ms
    if details:
        metadata["feature_details"] = details
    seed_id = ids[seed]
    return {
        "metadata": metadata,
        "qParams": {"pinnedIds": [seed_id], "supernodes": [], "linkType": "both",
                    "clickedId": seed_id, "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }


def json_target(out: str | Path) -> Path:
    """The output path, checked for a .json suffix."""
    out = Path(out)
    if out.suffix != ".json":
        raise FlowdbError(f"{out}: graph JSON is written to a .json file")
    return out


def write_graph_json(document: dict, out: str | Path) -> Path:
    """Write document as JSON to out atomically: a failed write leaves no half file."""
    out = json_target(out)
    text = json.dumps(document, indent=1, allow_nan=False, ensure_ascii=False)
    with atomic_write(out) as partial:
        partial.write_text(text + "\n", encoding="utf-8")
    return out
