"""The deactivation experiment (Laptev et al., section 4; method.md).

For a residual feature f at layer L that is active on a token, and a place P in
{R_{L-1}, M_L, A_L} where f's top-1 match is active on that token too, remove the
matched predecessor(s) at that token only (h_P <- h_P - a·v, with a the
predecessor's activation and v its decoder row) and read f again at R_L.
success: f's activation falls to zero; activation change: 1 - z_new / z_old.
Matchers: top-1 (remove the best match), top-5 (remove every active one of the
five best), random-top-5 (remove one of the five best, picked at random: the control).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from flowdb.database import Database
from flowdb.modules import MODULES, RESIDUAL

MATCHERS = ("top-1", "top-5", "random-top-5")
PLACE_NAME = {"res": "RES", "mlp": "MLP", "att": "ATT"}
PAPER = {"top-1": {"success_rate": 0.65, "activation_change": 0.75}}  # Laptev et al., top-1 cosine


@dataclass(frozen=True)
class DeactivationSpec:
    layers: tuple[int, ...] = (6, 12, 18)
    texts: str = "python-stdlib"
    samples: int = 40
    tokens_per_sample: int = 3
    context: int = 64
    max_trials: int = 150  # per layer, over all places
    seed: int = 0


def _trials(codes, preds, layer, spec, rng):
    """(token, feature, place, matcher, [(predecessor, activation)]) for eligible pairs."""
    target = codes[(layer, "res")]
    trials = []
    for token, feature in zip(*np.nonzero(target > 0)):
        for module in MODULES.values():
            place = module.name
            source = codes.get((module.predecessor_layer(layer), place))
            if source is None:
                continue
            top = [int(p) for p in preds[place][feature, :5] if p >= 0]
            if not top or source[token, top[0]] <= 0:
                continue  # eligible only when the top-1 match is active on this token
            choices = {"top-1": [top[0]], "top-5": [p for p in top if source[token, p] > 0],
                       "random-top-5": [top[int(rng.integers(len(top)))]]}
            for matcher in MATCHERS:
                removed = [(p, float(source[token, p])) for p in choices[matcher]]
                trials.append((int(token), int(feature), place, matcher, removed))
    return trials


def deactivation_experiment(db: Database, pack_name: str, spec: DeactivationSpec = DeactivationSpec(),
                            model_and_tokenizer=None, progress=None) -> pd.DataFrame:
    """One row per trial: layer, place, matcher, z_old, z_new, success, activation_change."""
    import torch
    from tqdm.auto import tqdm

    from flowdb.groups import group_codes
    from flowdb.hooks import capture, hook_point, intervene
    from flowdb.models import load_model
    from flowdb.pack_model import feature_codes, feature_direction, open_pack, predecessor_table
    from flowdb.texts import sample_tokens

    pack = open_pack(db, pack_name)
    model, tokenizer = model_and_tokenizer or load_model(pack.model)
    rng = np.random.default_rng(spec.seed)
    windows, positions = sample_tokens(tokenizer, spec.texts, spec.samples, spec.context,
                                       spec.tokens_per_sample, spec.seed, rng)
    needed = {(src, m) for layer in spec.layers
              for src, m in [(layer, RESIDUAL.name)] + [(mod.predecessor_layer(layer), mod.name)
                                                        for mod in MODULES.values()]
              if pack.has(src, m)}
    all_codes = feature_codes(pack, model, windows, positions, sorted(needed))  # one pass for every layer
    rows = []
    for layer in spec.layers:
        codes = {slot: c for slot, c in all_codes.items() if slot[0] in (layer - 1, layer)}
        width = codes[(layer, "res")].shape[1]
        preds = predecessor_table(db, pack_name, layer, width, min(5, pack.k))
        groups = group_codes({slot: c > 0 for slot, c in codes.items()}, preds, layer, 1)
        trials = _trials(codes, preds, layer, spec, rng)
        eligible = sorted({(t, f, p) for t, f, p, _, _ in trials})
        if len(eligible) > spec.max_trials:
            keep = {eligible[i] for i in rng.choice(len(eligible), spec.max_trials, replace=False)}
            trials = [trial for trial in trials if trial[:3] in keep]
        target_sae = pack.sae(layer, "res")
        for token, feature, place, matcher, removed in tqdm(
                trials, desc=f"layer {layer}", disable=None if progress is None else not progress):
            sample, position = divmod(token, spec.tokens_per_sample)
            position = int(positions[sample, position])
            source_sae = pack.sae(layer - 1 if place == "res" else layer, place)
            delta = sum(a * feature_direction(source_sae, p) for p, a in removed)

            def remove(h, delta=delta, position=position):
                h = h.clone()
                h[:, position] -= delta
                return h

            hook = hook_point(place, layer - 1 if place == "res" else layer)
            window = windows[sample:sample + 1, :position + 1]  # later tokens cannot matter
            with torch.no_grad(), intervene(model, {hook: remove}), \
                    capture(model, [hook_point("res", layer)]) as acts:
                model(window)
                z_new = float(target_sae.encode(acts[hook_point("res", layer)][:, position])[0, feature])
            z_old = float(codes[(layer, "res")][token, feature])
            rows.append({"layer": layer, "place": PLACE_NAME[place], "matcher": matcher,
                         "group": int(groups[token, feature]), "z_old": z_old, "z_new": z_new,
                         "success": z_new <= 0, "activation_change": 1 - z_new / z_old})
    return pd.DataFrame(rows)


def summarise(trials: pd.DataFrame, by=("layer", "matcher")) -> pd.DataFrame:
    return (trials.groupby(list(by)).agg(trials=("success", "size"), success_rate=("success", "mean"),
                                         activation_change=("activation_change", "mean")).reset_index())
