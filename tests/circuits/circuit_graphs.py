"""Small synthetic attribution graphs in circuit-tracer 0.5.0's graph JSON, and what the
tests compute from the files alone (no flowdb code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_LAYERS = 4
POOL = [(layer, index) for layer in range(N_LAYERS) for index in (3, 7, 11, 19, 42)]


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def make_graph(slug: str, seed: int, int_layers: bool = False) -> dict:
    """Embeddings, transcoder features at several layers and positions, error nodes, logits
    at the last position (one the target), and links from lower to higher layers."""
    rng = np.random.default_rng(seed)
    n_pos = int(rng.integers(3, 6))
    tokens = [f"t{int(v)}" for v in rng.integers(0, 50, n_pos)]
    nodes, depth = [], {}

    def add(node, level):
        if int_layers and node["layer"] != "E":
            node["layer"] = int(node["layer"])
        nodes.append(node)
        depth[node["node_id"]] = (level, node["ctx_idx"])

    for pos in range(n_pos):
        vocab = int(rng.integers(0, 1000))
        add({"node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
             "feature_type": "embedding", "jsNodeId": f"E_{vocab}-{pos}", "clerp": "",
             "influence": None, "activation": None}, -1)
    chosen = rng.choice(len(POOL), size=int(rng.integers(5, 10)), replace=False)
    for i in chosen:
        layer, index = POOL[i]
        for pos in sorted(rng.choice(n_pos, size=int(rng.integers(1, 3)), replace=False)):
            add({"node_id": f"{layer}_{index}_{pos}", "feature": cantor(layer, index), "layer": str(layer),
                 "ctx_idx": int(pos), "feature_type": "cross layer transcoder",
                 "jsNodeId": f"{layer}_{index}-0", "clerp": f"feature {layer}/{index}",
                 "influence": float(rng.random()), "activation": float(rng.random() * 10)}, layer)
    for layer in sorted(rng.choice(N_LAYERS, size=2, replace=False)):
        pos = int(rng.integers(0, n_pos))
        add({"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
             "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}",
             "influence": float(rng.random())}, int(layer))
    last = n_pos - 1
    target_vocab = int(rng.choice([5, 6]))  # few target tokens, so graphs share target logits
    for j, vocab in enumerate([target_vocab, 900 + int(rng.integers(0, 3))]):
        prob = float(rng.random())
        add({"node_id": f"{N_LAYERS + 1}_{vocab}_{last}", "feature": vocab, "layer": str(N_LAYERS + 1),
             "ctx_idx": last, "feature_type": "logit", "token_prob": prob, "is_target_logit": j == 0,
             "jsNodeId": f"L_{vocab}-{last}", "clerp": f'Output "v{vocab}" (p={prob:.3f})'}, N_LAYERS + 1)
    links = []
    ids = [n["node_id"] for n in nodes]
    for source in ids:
        for target in ids:
            (ls, ps), (lt, pt) = depth[source], depth[target]
            if ls < lt and ps <= pt and rng.random() < 0.45:
                links.append({"source": source, "target": target, "weight": float(rng.normal() * 3)})
    return {
        "metadata": {"slug": slug, "scan": "synth-model", "transcoder_list": [f"tc/{i}" for i in range(N_LAYERS)],
                     "prompt_tokens": tokens, "prompt": "".join(tokens), "node_threshold": 0.8,
                     "schema_version": 1, "info": {"description": f"synthetic {seed}"}},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def write_graphs(folder: Path, n: int, seed: int = 0) -> dict[str, dict]:
    """n graphs as circuit-tracer's create_graph_files writes them: {slug}.json plus
    graph-metadata.json in one folder. Returns slug -> document."""
    folder.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for i in range(n):
        slug = f"g{i:02d}"
        graphs[slug] = make_graph(slug, seed * 1000 + i, int_layers=i == 1)
        (folder / f"{slug}.json").write_text(json.dumps(graphs[slug]))
    (folder / "graph-metadata.json").write_text(json.dumps({"graphs": [g["metadata"] for g in graphs.values()]}))
    return graphs


def circuit_tracer_model():
    """circuit-tracer 0.5.0's own pydantic model of a graph file. scripts/setup.sh full installs
    circuit-tracer with --no-deps: its graph models need pydantic alone, and its dependencies
    would pull transformers back below 4.58."""
    try:
        from circuit_tracer.frontend.graph_models import Model
    except ImportError:
        import pytest

        pytest.fail("circuit-tracer is not installed; bash scripts/setup.sh full installs it "
                    "(pip install --no-deps circuit-tracer==0.5.0)")
    return Model


def broken_copies(document: dict) -> dict[str, dict]:
    """Copies of a valid graph document, each broken in one way circuit-tracer's model refuses:
    they show that the validation bites."""
    cases = {}

    def broken(why: str) -> dict:
        cases[why] = json.loads(json.dumps(document))
        return cases[why]

    del broken("qParams.linkType missing")["qParams"]["linkType"]
    broken("qParams.supernodes of strings")["qParams"]["supernodes"] = ["texas 20_15589_3"]
    broken("a supernode member not a string")["qParams"]["supernodes"].append(["name", 7])
    del broken("nodes[0].feature missing")["nodes"][0]["feature"]
    broken("nodes[-1].ctx_idx a word")["nodes"][-1]["ctx_idx"] = "last"
    del broken("metadata.transcoder_list missing")["metadata"]["transcoder_list"]
    broken("links an object")["links"] = {"0": document["links"][0]}
    return cases
