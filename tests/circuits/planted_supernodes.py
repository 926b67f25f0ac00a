"""A planted world for supernode suggestions: one target graph whose feature nodes hold
four known groups among distractors, and background graphs of the same model that make
one group co-activate. The truth is computed here from the planting and the synthetic
pack's truth.csv alone (no flowdb code).

Planted groups in the target graph (each four nodes):
  same      one feature at four positions
  chain     four residual features on one planted translated chain (layers 0 to 3)
  label     four features whose labels name Texas
  coact     four features found together in 15 of the 40 background graphs (and
            each alone in 5% of the others)
Distractors: 36 features, each with a unique chain origin, a label of one shared generic
word and a unique word, and found in background graphs at random (p = 0.25); two more
found in every background graph (co-occurring always, so never more than chance).
"""

from __future__ import annotations

import zlib
from itertools import combinations

import numpy as np
import pandas as pd
from circuit_graphs import cantor

PACK, SCAN = "sn", "sn-model"
N_BACKGROUND, N_POSITIONS = 40, 6
COACT_GRAPHS = 15
TEXAS = ["Texas", "references to Texas", "Texas state", "Texas cities and Texas towns"]
GENERIC = ["numbers", "names", "code", "colours", "sports", "music"]


def chain_origins(truth: pd.DataFrame) -> dict[tuple[int, int], tuple]:
    """Each residual feature's planted origin: back through translated parents, then the MLP
    or attention feature a newborn was planted from."""
    rows = {(r.layer, r.index): r for r in truth.itertuples()}
    origins = {}
    for layer, index in rows:
        at = (layer, index)
        while rows[at].category == "translated":
            at = (at[0] - 1, int(rows[at].res_pred))
        row = rows[at]
        if row.category == "newborn":
            module, source = ("mlp", row.mlp_pred) if row.mlp_pred >= 0 else ("att", row.att_pred)
            origins[(layer, index)] = (module, at[0], source)
        else:
            origins[(layer, index)] = ("res", *at)
    return origins


def longest_chain(truth: pd.DataFrame) -> list[tuple[int, int]]:
    rows = {(r.layer, r.index): r for r in truth.itertuples()}
    last = int(truth["layer"].max())
    best: list[tuple[int, int]] = []
    for index in range(int((truth["layer"] == last).sum())):
        chain = [(last, index)]
        while rows[chain[-1]].category == "translated":
            chain.append((chain[-1][0] - 1, int(rows[chain[-1]].res_pred)))
        best = max(best, chain[::-1], key=len)
    return best


class Words:
    """Made-up words, each used once."""

    def __init__(self, rng):
        self.rng, self.used = rng, set()

    def __call__(self) -> str:
        while True:
            word = "".join(self.rng.choice(list("bdfgklmnprstvz")) + self.rng.choice(list("aeiou"))
                           for _ in range(3))
            if word not in self.used:
                self.used.add(word)
                return word


def _node(layer: int, index: int, pos: int, clerp: str, rng) -> dict:
    return {"node_id": f"{layer}_{index}_{pos}", "feature": cantor(layer, index), "layer": str(layer),
            "ctx_idx": pos, "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{index}-0",
            "clerp": clerp, "influence": float(rng.random()), "activation": float(rng.random() * 10)}


def _graph(slug: str, features: list[dict], scan: str = SCAN) -> dict:
    """Features as {layer, index, positions, clerp}; an embedding feeds each, each feeds a logit."""
    rng = np.random.default_rng(zlib.crc32(slug.encode()))
    tokens = [f"t{i}" for i in range(N_POSITIONS)]
    nodes = [{"node_id": "E_1_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
              "jsNodeId": "E_1-0", "clerp": "", "influence": None, "activation": None}]
    for f in features:
        nodes += [_node(f["layer"], f["index"], pos, f["clerp"], rng) for pos in f["positions"]]
    nodes.append({"node_id": f"9_5_{N_POSITIONS - 1}", "feature": 5, "layer": "9", "ctx_idx": N_POSITIONS - 1,
                  "feature_type": "logit", "token_prob": 0.5, "is_target_logit": True, "jsNodeId": "L_5-5",
                  "clerp": 'Output "v5" (p=0.500)'})
    features_ids = [n["node_id"] for n in nodes[1:-1]]
    links = [{"source": "E_1_0", "target": i, "weight": 1.0} for i in features_ids]
    links += [{"source": i, "target": nodes[-1]["node_id"], "weight": 0.5} for i in features_ids]
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": tokens,
                         "prompt": "".join(tokens), "node_threshold": 0.8},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def plant(truth: pd.DataFrame, seed: int = 0) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """slug -> graph document ('target' and 'bg00'... for seed 0, else 's1-target', 's1-bg00'...,
    each seed a model of its own), and group -> the target's node ids."""
    prefix, scan = ("", SCAN) if seed == 0 else (f"s{seed}-", f"{SCAN}-{seed}")
    rng = np.random.default_rng(seed)
    word = Words(rng)
    origins = chain_origins(truth)
    chain = longest_chain(truth)
    assert len(chain) >= 3, "the planted pack needs a translated chain over three layers"
    taken = {origins[chain[-1]]}
    layers = int(truth["layer"].max()) + 1
    width = int((truth["layer"] == 0).sum())

    def fresh() -> tuple[int, int]:
        while True:
            at = (int(rng.integers(layers)), int(rng.integers(width)))
            if origins[at] not in taken:
                taken.add(origins[at])
                return at

    def one(at, clerp, positions=None):
        positions = positions or [int(rng.integers(N_POSITIONS))]
        return {"layer": at[0], "index": at[1], "positions": positions, "clerp": clerp}

    groups = {
        "same": [one(fresh(), f"{word()} {word()}", [0, 2, 3, 5])],
        "chain": [one(at, f"{word()} {word()}", [pos]) for pos, at in enumerate(chain[-4:], start=1)],
        "label": [one(fresh(), clerp) for clerp in TEXAS],
        "coact": [one(fresh(), f"{word()} {word()}") for _ in range(4)],
    }
    distractors = [one(fresh(), f"{GENERIC[i % len(GENERIC)]} {word()}") for i in range(36)]
    ubiquitous = [one(fresh(), f"{word()} {word()}") for _ in range(2)]
    target = [f for group in groups.values() for f in group] + distractors + ubiquitous
    graphs = {f"{prefix}target": _graph(f"{prefix}target", target, scan)}
    together = set(rng.choice(N_BACKGROUND, size=COACT_GRAPHS, replace=False).tolist())
    for g in range(N_BACKGROUND):
        present = [f for f in target if f not in groups["coact"] and f not in ubiquitous and rng.random() < 0.25]
        present += ubiquitous
        present += [f for f in groups["coact"] if g in together or rng.random() < 0.05]
        fillers = [{"layer": int(rng.integers(layers)), "index": 100 + int(rng.integers(100)), "clerp": word()}
                   for _ in range(5)]
        features = [{**f, "positions": [int(rng.integers(N_POSITIONS))]} for f in present + fillers]
        features = list({(f["layer"], f["index"]): f for f in features}.values())
        graphs[f"{prefix}bg{g:02d}"] = _graph(f"{prefix}bg{g:02d}", features, scan)
    node_ids = {name: [f"{f['layer']}_{f['index']}_{pos}" for f in group for pos in f["positions"]]
                for name, group in groups.items()}
    return graphs, node_ids


def samey_graph(seed: int = 1) -> dict:
    """20 features labelled by two words drawn at random from five: a tenth of the pairs have
    the same label by chance, so no pair is more alike than the graph's random pairs are."""
    rng = np.random.default_rng(seed)
    features = [{"layer": i % 4, "index": 200 + i, "positions": [i % N_POSITIONS],
                 "clerp": " ".join(rng.choice(GENERIC[:5], size=2, replace=False))} for i in range(20)]
    return _graph("samey", features, scan="samey-model")


def pairs(groups) -> set[frozenset]:
    """Unordered node pairs within each group."""
    return {frozenset(pair) for group in groups for pair in combinations(sorted(group), 2)}
