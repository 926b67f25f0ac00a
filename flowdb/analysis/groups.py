"""Activation-based groups (Laptev et al., experiments; docs/explanation/method.md).

On real text, at randomly chosen non-first tokens, every active residual feature f
at layer L is put in a group by which of its matched predecessors (top-1, or any
of the top-k) are active on the same token: in R_{L-1} ("RES"), M_L ("MLP") or
A_L ("ATT"). The 7 non-empty combinations are "From RES", ..., "From RES & MLP &
ATT"; none active is "From nowhere". "Active" means SAE activation > 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from flowdb.analysis.specs import GroupsSpec
from flowdb.modules import MODULES, NAMES
from flowdb.progress import disabled
from flowdb.store import graph
from flowdb.store.database import Database

# Group code = 1·RES + 2·MLP + 4·ATT; the names in code order.
GROUPS = ("From nowhere", "From RES", "From MLP", "From RES & MLP", "From ATT",
          "From RES & ATT", "From MLP & ATT", "From RES & MLP & ATT")


def token_activity(pack, model, tokenizer, spec: GroupsSpec, progress=lambda it: it) -> dict:
    """(layer, module) -> bool [tokens, width]: which features are active at the sampled tokens."""
    from flowdb.analysis.pack_model import feature_codes
    from flowdb.lm.texts import sample_tokens

    windows, positions = sample_tokens(tokenizer, spec.texts, spec.samples, spec.context,
                                       spec.tokens_per_sample, spec.seed, np.random.default_rng(spec.seed))
    slots = [(layer, module) for layer in pack.layers for module in NAMES
             if pack.has(layer, module)]
    codes = feature_codes(pack, model, windows, positions, slots, progress)
    return {slot: c > 0 for slot, c in codes.items()}


def group_codes(active: dict, preds: dict, layer: int, top_k: int) -> np.ndarray:
    """int [tokens, width]: each residual feature's group code on each token."""
    codes = np.zeros(active[(layer, "res")].shape, dtype=np.int64)
    for bit, module in zip((1, 2, 4), MODULES.values()):  # GROUPS' bit order: RES, MLP, ATT
        place = module.name
        source = active.get((module.predecessor_layer(layer), place))
        if source is None:
            continue
        table = preds[place][:, :top_k]  # [width, top_k], -1 where none
        hit = np.zeros_like(codes, dtype=bool)
        for j in range(top_k):
            valid = table[:, j] >= 0
            hit[:, valid] |= source[:, table[valid, j]]
        codes += bit * hit
    return codes


def activation_groups(db: Database, pack_name: str, spec: GroupsSpec = GroupsSpec(),
                      model_and_tokenizer=None, progress=None) -> pd.DataFrame:
    """Group shares per layer and top-k, also stored on the graph:
    residual Feature.groups_top{k} (8 counts, GROUPS order) and SAE.groups_top{k} (8 shares)."""
    from tqdm.auto import tqdm

    from flowdb.analysis.pack_model import open_pack, predecessor_table
    from flowdb.lm.loader import load_model

    pack = open_pack(db, pack_name)
    ks = sorted({k for k in spec.top_k if k <= pack.k})
    if not ks:
        raise ValueError(f"top-k {spec.top_k} exceeds the pack's k={pack.k}")
    model, tokenizer = model_and_tokenizer or load_model(pack.model)
    bar = (lambda it: tqdm(it, desc="tokens", disable=disabled(progress)))
    active = token_activity(pack, model, tokenizer, spec, bar)
    rows = []
    for layer in pack.layers:
        width = active[(layer, "res")].shape[1]
        preds = predecessor_table(db, pack_name, layer, width, max(ks))
        is_active = active[(layer, "res")]
        for k in ks:
            codes = group_codes(active, preds, layer, k)
            per_feature = np.zeros((width, len(GROUPS)), dtype=np.int64)
            token_idx, feature_idx = np.nonzero(is_active)
            np.add.at(per_feature, (feature_idx, codes[token_idx, feature_idx]), 1)
            totals = per_feature.sum(0)
            shares = totals / max(totals.sum(), 1)
            for group, count, share in zip(GROUPS, totals, shares):
                rows.append({"layer": layer, "top_k": k, "group": group, "count": int(count), "share": float(share)})
            _store(db, pack_name, layer, k, per_feature, shares)
    return pd.DataFrame(rows)


def _store(db: Database, pack: str, layer: int, k: int, per_feature: np.ndarray, shares: np.ndarray) -> None:
    used = np.flatnonzero(per_feature.sum(1))
    graph.store_groups(db, pack, layer, k, {int(i): per_feature[i].tolist() for i in used},
                       [float(x) for x in shares])
