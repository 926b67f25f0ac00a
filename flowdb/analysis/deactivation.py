"""The deactivation experiment (Laptev et al., section 4 and Table 1; docs/explanation/method.md).

For a residual feature f at layer L active on a token, and a place P in
{R_{L-1}, M_L, A_L}, remove a predecessor chosen by a matcher at that token only
(h_P <- h_P - a·v, with a its activation and v what it adds to the SAE's
reconstruction) and read f again at R_L.
success: f's activation falls to zero; activation change: 1 - z_new / z_old.
A matcher's trial counts when its chosen predecessor is active on the token.

Matchers:
  top-1          the best cosine match (flowdb's stored rank-1 edge)
  encoder        the feature of P whose unit decoder row the target's unit encoder column
                 reads most (data-free, computed here from the SAEs, exact)
  top-5          every active one of the five best cosine matches, removed together
  random-top-5   one of the five best cosine matches, picked at random (a control)
  random-active  a uniformly random active feature of P (a control)
  permutation    SAE Match: one-to-one assignment on threshold-folded decoders (R only)
  pearson        the feature of P whose activations correlate best with f's over the
                 sampled windows (data-based)
  exhaustive     the active feature of P whose removal lowers f most (the upper bound)

The ceiling control (--ceiling): the same trials with R_{L-1} read by R_L's own SAE
(its codes, directions, and decoder-cosine predecessors among its own features, so a
feature's top-1 is itself); M_L and A_L as they are. It shows what a matcher could
reach if consecutive dictionaries shared their features. Nothing is stored.

Speed: a removal at a token of layer L changes nothing before block L, and R_L at
that token depends only on block L's inputs. So the model runs once to block L on
the clean windows, and every removal is a row of one batched call of block L alone
on the recorded inputs (checked against the clean pass on every run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flowdb.analysis.specs import DeactivationSpec
from flowdb.errors import FlowdbError
from flowdb.modules import MODULES, RESIDUAL
from flowdb.progress import disabled
from flowdb.store.database import Database

MATCHERS = ("top-1", "encoder", "top-5", "random-top-5", "random-active", "permutation", "pearson", "exhaustive")
PLACE_NAME = {"res": "RES", "mlp": "MLP", "att": "ATT"}
# Laptev et al., Table 1 (Gemma 2 2B, Gemma Scope, 1,894 features over two layers).
PAPER = {"top-1": {"success_rate": 0.65, "activation_change": 0.75},
         "pearson": {"success_rate": 0.65, "activation_change": 0.74},
         "exhaustive": {"success_rate": 0.73, "activation_change": 0.83}}





def default_layers(layers: range) -> tuple[int, ...]:
    usable = [layer for layer in layers if layer - 1 in layers]  # R_{L-1} must be in the pack
    if not usable:
        raise FlowdbError("the deactivation experiment needs a pack of at least two consecutive layers")
    picks = {usable[len(usable) // 3], usable[(2 * len(usable)) // 3]}
    return tuple(sorted(picks))


def _select_rows(value, index, batch: int):
    """value with every tensor whose first dimension is the clean batch indexed by index."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _select_rows(v, index, batch) for k, v in value.items()}
    return value


class BlockReplay:
    """Block L of the model, run again on recorded inputs with per-row removals."""

    def __init__(self, model, layer: int, windows):
        import torch

        from flowdb.lm.hooks import blocks, capture, forward_until, hook_point

        self.model, self.layer, self.block = model, layer, blocks(model)[layer]
        recorded = {}

        def record(_module, args, kwargs):
            recorded["args"], recorded["kwargs"] = args, kwargs

        self.hooks = {name: hook_point(name, layer if name != RESIDUAL.name else layer - 1) for name in MODULES}
        self.target_hook = hook_point(RESIDUAL.name, layer)
        handle = self.block.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad(), capture(model, [*self.hooks.values(), self.target_hook]) as acts:
                forward_until(model, windows, layer)
        finally:
            handle.remove()
        self.activations = dict(acts)  # hook -> [windows, T, d]
        self.args, self.kwargs = recorded["args"], recorded["kwargs"]
        self.batch = windows.shape[0]

    def run(self, window, position, deltas: dict[str, np.ndarray]):
        """R_L at (window[n], position[n]) after subtracting deltas[place][n] there, per row n."""
        import torch

        from flowdb.lm.hooks import intervene

        index = torch.as_tensor(window)
        rows = torch.arange(len(index))
        pos = torch.as_tensor(position)
        hidden = self.args[0][index].clone()
        edits = {}
        for place, delta in deltas.items():
            delta = torch.as_tensor(delta, dtype=hidden.dtype)
            if place == RESIDUAL.name:
                hidden[rows, pos] -= delta
            else:
                def edit(h, delta=delta):
                    h = h.clone()
                    h[rows, pos] -= delta
                    return h
                edits[self.hooks[place]] = edit
        args = (hidden, *_select_rows(self.args[1:], index, self.batch))
        kwargs = _select_rows(self.kwargs, index, self.batch)
        with torch.no_grad(), intervene(self.model, edits):
            out = self.block(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out[rows, pos]


def _encode(sae, activations) -> np.ndarray:
    import torch

    with torch.no_grad():
        return sae.encode(activations).numpy()


@dataclass
class _Reading:
    """How the trials read one place P: its SAE's codes at every non-sink token, what
    each of its features adds, and each matcher's predecessors of every target feature."""

    codes: np.ndarray  # [tokens, width of P's SAE]
    directions: np.ndarray  # [width, d]
    preds: np.ndarray  # [target width, k]: cosine top-k, -1 where none
    picks: dict  # matcher -> [target width]: its one predecessor, -1 where none


def _reading(target_sae, sae, codes, preds, target_every, permutation: bool) -> _Reading:
    from flowdb.analysis.matchers import encoder_top1, folded_decoder, pearson_top1, sae_match
    from flowdb.analysis.pack_model import feature_directions

    picks = {"encoder": encoder_top1(target_sae, sae), "pearson": pearson_top1(target_every, codes)}
    if permutation:
        picks["permutation"] = sae_match(folded_decoder(target_sae), folded_decoder(sae))
    return _Reading(codes, feature_directions(sae).numpy(), preds, picks)


def own_predecessors(sae, k: int) -> np.ndarray:
    """[width, k]: each feature's top-k cosine matches among the same SAE's decoder rows
    (itself first): the R-place table of the ceiling control."""
    from flowdb.flow.matching import top_k

    w_dec = sae.W_dec.detach().float().numpy()
    return top_k(w_dec, w_dec, k)[1].astype(np.int64)


def _layer_trials(db, pack_name, pack, model, layer, windows, positions, spec, rng, progress) -> tuple[list, dict]:
    from flowdb.analysis.groups import group_codes
    from flowdb.analysis.pack_model import predecessor_table

    replay = BlockReplay(model, layer, windows)
    places = [m.name for m in MODULES.values() if pack.has(m.predecessor_layer(layer), m.name)]
    target_sae = pack.sae(layer, RESIDUAL.name)
    acts = replay.activations
    d_model = acts[replay.target_hook].shape[-1]

    def every(sae, hook):  # codes at every non-sink token (Pearson, groups) and so at the sampled ones
        return _encode(sae, acts[hook][:, 1:].reshape(-1, d_model))

    target_every = every(target_sae, replay.target_hook)
    width = target_every.shape[1]
    k = min(5, pack.k)
    stored = predecessor_table(db, pack_name, layer, width, k)
    real = {}
    for place in places:
        sae = pack.sae(MODULES[place].predecessor_layer(layer), place)
        real[place] = _reading(target_sae, sae, every(sae, replay.hooks[place]), stored[place], target_every,
                               place == RESIDUAL.name)
    # reading -> (how each place is read, the places its trials run at, its random generator)
    readings = {"real": (real, places, rng)}
    if spec.ceiling and RESIDUAL.name in places:
        # The control: R_{L-1} read by the target's own SAE, so a feature's top-1 is itself.
        # Its own generator keeps the real trials what they are without --ceiling.
        own = _reading(target_sae, target_sae, every(target_sae, replay.hooks[RESIDUAL.name]),
                       own_predecessors(target_sae, k), target_every, True)
        readings["ceiling"] = ({**real, RESIDUAL.name: own}, [RESIDUAL.name],
                               np.random.default_rng([spec.seed, layer]))

    t_minus_1 = windows.shape[1] - 1
    def at(codes, w, p):  # row of the flattened non-sink codes
        return codes[w * t_minus_1 + p - 1]

    occurrences = [(w, int(p), int(f)) for w in range(len(windows)) for p in positions[w]
                   for f in np.flatnonzero(at(target_every, w, p) > 0)]
    if len(occurrences) > spec.max_targets:
        occurrences = [occurrences[i] for i in sorted(rng.choice(len(occurrences), spec.max_targets, replace=False))]

    # Each matcher's removal, and (for the exhaustive search) every active feature of P alone:
    # each distinct removal is one row of the batched replay.
    plans = []  # (reading, occurrence, place, {matcher: removed features}, active features)
    needed: dict = {}  # (reading, occurrence, place, removed) -> row
    groups = {}
    for name, (read, run_at, generator) in readings.items():
        # The target's activation group (top-1 predecessors active on the token) at every token.
        groups[name] = group_codes({(MODULES[place].predecessor_layer(layer), place): read[place].codes > 0
                                    for place in places} | {(layer, RESIDUAL.name): target_every > 0},
                                   {place: read[place].preds for place in places}, layer, 1)
        for o, (w, p, f) in enumerate(occurrences):
            for place in run_at:
                codes = at(read[place].codes, w, p)
                active = [int(j) for j in np.flatnonzero(codes > 0)]
                if not active:
                    continue
                top = [int(j) for j in read[place].preds[f] if j >= 0]
                chosen = {"top-1": top[:1], "top-5": top,
                          "random-top-5": [top[int(generator.integers(len(top)))]] if top else [],
                          "random-active": [active[int(generator.integers(len(active)))]]}
                for matcher, pick in read[place].picks.items():
                    chosen[matcher] = [int(pick[f])] if pick[f] >= 0 else []
                # A matcher whose predecessor is not active here has no trial.
                removals = {m: tuple(j for j in js if codes[j] > 0) for m, js in chosen.items()}
                removals = {m: r for m, r in removals.items() if r}
                for removed in [*removals.values(), *([(j,) for j in active] if spec.exhaustive else [])]:
                    needed.setdefault((name, o, place, removed), len(needed))
                plans.append((name, o, place, removals, active))
    rows = list(needed)
    z_new = np.empty(len(rows))
    started = time.perf_counter()
    for start in progress(range(0, len(rows), spec.batch_rows)):
        chunk = rows[start:start + spec.batch_rows]
        deltas = {place: np.zeros((len(chunk), d_model), dtype=np.float32) for place in places}
        for n, (name, o, place, removed) in enumerate(chunk):
            w, p, _ = occurrences[o]
            read = readings[name][0][place]
            codes = at(read.codes, w, p)
            for j in removed:
                deltas[place][n] += codes[j] * read.directions[j]
        out = replay.run([occurrences[o][0] for _, o, _, _ in chunk],
                         [occurrences[o][1] for _, o, _, _ in chunk], deltas)
        encoded = _encode(target_sae, out)
        z_new[start:start + len(chunk)] = [encoded[n, occurrences[o][2]] for n, (_, o, _, _) in enumerate(chunk)]
    seconds = time.perf_counter() - started
    _check_replay(replay, target_sae, occurrences, target_every, at)

    results = {row: float(z) for row, z in zip(rows, z_new)}
    trials = []
    for name, o, place, removals, active in plans:
        w, p, f = occurrences[o]
        if spec.exhaustive:
            removals["exhaustive"] = (min(active, key=lambda j: results[(name, o, place, (j,))]),)
        z_old = float(at(target_every, w, p)[f])
        group = int(at(groups[name], w, p)[f])
        for matcher in MATCHERS:
            removed = removals.get(matcher)
            if removed:
                z = results[(name, o, place, removed)]
                trials.append({"layer": layer, "place": PLACE_NAME[place], "matcher": matcher, "feature": f,
                               "window": w, "position": p, "removed": removed, "group": group,
                               "z_old": z_old, "z_new": z, "success": z <= 0, "activation_change": 1 - z / z_old,
                               "reading": name})
    return trials, {"layer": layer, "targets": len(occurrences), "removals": len(rows), "seconds": seconds}


def _check_replay(replay, target_sae, occurrences, target_every, at) -> None:
    """Block L alone on the recorded inputs, with nothing removed, must give the clean
    pass's target activations: else the replay does not stand for the model."""
    sample = occurrences[:64]
    if not sample:
        return
    out = replay.run([w for w, _, _ in sample], [p for _, p, _ in sample], {})
    encoded = _encode(target_sae, out)
    again = np.array([encoded[n, f] for n, (_, _, f) in enumerate(sample)])
    clean = np.array([at(target_every, w, p)[f] for w, p, f in sample])
    if not np.allclose(again, clean, rtol=1e-3, atol=1e-3):
        raise FlowdbError(f"replaying block {replay.layer} does not reproduce the model's own forward pass "
                          f"(largest difference {np.abs(again - clean).max():.3g}); the deactivation figures "
                          "would be wrong for this architecture")


def deactivation_experiment(db: Database, pack_name: str, spec: DeactivationSpec = DeactivationSpec(),
                            model_and_tokenizer=None, progress=None, timings: list | None = None) -> pd.DataFrame:
    """One row per trial: layer, place, matcher, feature, window, position, removed (the
    predecessors removed), group, z_old, z_new, success, activation_change, reading
    ("real", or "ceiling" for the control's trials at place RES when spec.ceiling).
    `timings`, when given, receives per layer the number of removals and the seconds they took."""
    from tqdm.auto import tqdm

    from flowdb.analysis.pack_model import open_pack
    from flowdb.lm.loader import load_model
    from flowdb.lm.texts import sample_tokens

    pack = open_pack(db, pack_name)
    layers = spec.layers or default_layers(pack.layers)
    for layer in layers:
        if not (pack.has(layer, RESIDUAL.name) and layer - 1 in pack.layers):
            raise FlowdbError(f"layer {layer}: pack {pack_name} needs layers {layer - 1} and {layer} "
                              f"(it has {pack.layers.start}-{pack.layers.stop - 1})")
    model, tokenizer = model_and_tokenizer or load_model(pack.model)
    rng = np.random.default_rng(spec.seed)
    windows, positions = sample_tokens(tokenizer, spec.texts, spec.samples, spec.context,
                                       spec.tokens_per_sample, spec.seed, rng)
    rows = []
    for layer in layers:
        bar = lambda it, layer=layer: tqdm(it, desc=f"layer {layer} removals",  # noqa: E731
                                           disable=disabled(progress))
        trials, timing = _layer_trials(db, pack_name, pack, model, layer, windows, positions, spec, rng, bar)
        rows += trials
        if timings is not None:
            timings.append(timing)
    return pd.DataFrame(rows)


def summarise(trials: pd.DataFrame, by=("layer", "matcher"), seed: int = 0) -> pd.DataFrame:
    """Trials, success rate and activation change with 95% bootstrap intervals per group."""
    from flowdb.analysis.stats import mean_interval

    rng = np.random.default_rng(seed)
    rows = []
    for keys, part in trials.groupby(list(by), sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        success = part["success"].to_numpy(dtype=float)
        change = part["activation_change"].to_numpy(dtype=float)
        s_lo, s_hi = mean_interval(success, rng)
        c_lo, c_hi = mean_interval(change, rng)
        rows.append({**dict(zip(by, keys)), "trials": len(part), "success_rate": success.mean(),
                     "success_lo": s_lo, "success_hi": s_hi, "activation_change": change.mean(),
                     "change_lo": c_lo, "change_hi": c_hi})
    table = pd.DataFrame(rows)
    if "matcher" in table:
        table["matcher"] = pd.Categorical(table["matcher"], MATCHERS, ordered=True)
        table = table.sort_values([*[b for b in by if b != "matcher"], "matcher"]).reset_index(drop=True)
        table["matcher"] = table["matcher"].astype(str)
    return table


SUMMARY_FIGURES = ("trials", "success_rate", "success_lo", "success_hi",
                   "activation_change", "change_lo", "change_hi")


def control_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The ceiling control as a whole: its own trials at RES, the real ones at M and A
    (which it leaves as they are)."""
    real = trials[trials["reading"] == "real"]
    return pd.concat([trials[trials["reading"] == "ceiling"], real[real["place"] != PLACE_NAME[RESIDUAL.name]]],
                     ignore_index=True)


def with_ceiling(trials: pd.DataFrame, by=("layer", "matcher"), seed: int = 0) -> pd.DataFrame:
    """summarise() of the real trials with the ceiling control's figures beside them
    (ceiling_*), and the real success rate and activation change as fractions of them."""
    real = summarise(trials[trials["reading"] == "real"], by, seed)
    control = summarise(control_trials(trials), by, seed)
    control = control[[*by, *SUMMARY_FIGURES]].rename(columns={c: f"ceiling_{c}" for c in SUMMARY_FIGURES})
    table = real.merge(control, on=list(by), how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        table["fraction_of_ceiling"] = table["success_rate"] / table["ceiling_success_rate"]
        table["change_fraction_of_ceiling"] = table["activation_change"] / table["ceiling_activation_change"]
    return table


def with_paper(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with the paper's figures beside each matcher it reports."""
    return summary.assign(
        paper_success=summary["matcher"].map(lambda m: PAPER.get(m, {}).get("success_rate", np.nan)),
        paper_change=summary["matcher"].map(lambda m: PAPER.get(m, {}).get("activation_change", np.nan)))


def pack_facts(db: Database, pack_name: str) -> dict:
    """Training tokens, mean residual explained variance and L0 of a demo pack (from the
    spec.json and quality.csv beside its SAEs); NaN for packs trained elsewhere."""
    import json
    from pathlib import Path

    from flowdb.analysis.pack_model import open_pack

    pack = open_pack(db, pack_name)
    planted = pack.plan.sae(pack.layers.start, RESIDUAL.name)
    home = Path(planted.ref.location).parents[2] if planted is not None and planted.ref.kind == "path" else None
    facts = {"train_tokens": np.nan, "residual_ev": np.nan, "residual_l0": np.nan, "architecture": ""}
    if home is not None and (home / "spec.json").is_file() and (home / "quality.csv").is_file():
        spec = json.loads((home / "spec.json").read_text())
        residual = pd.read_csv(home / "quality.csv").query("module == 'res'")
        facts.update(train_tokens=spec["train_tokens"], architecture=spec["architecture"],
                     residual_ev=float(residual["explained_variance"].mean()), residual_l0=float(residual["l0"].mean()))
    return facts


CEILING_COLUMNS = ["trials", "success_rate", "ceiling_success_rate", "ceiling_success_lo", "ceiling_success_hi",
                   "fraction_of_ceiling", "activation_change", "ceiling_activation_change", "ceiling_change_lo",
                   "ceiling_change_hi", "change_fraction_of_ceiling"]


@dataclass
class DeactivationReport:
    """What `flowdb validate deactivation` shows: titled tables in reading order (a title with no
    table is a line of its own), and the per-matcher summary its CSV and picture take."""

    sections: list[tuple[str, pd.DataFrame | None]]
    overall: pd.DataFrame


def deactivation_report(trials: pd.DataFrame, ceiling: bool = False) -> DeactivationReport:
    """The real trials summarised per layer and place, overall beside the paper's Table 1, and
    by the target's activation group; with ceiling, the ceiling control beside them."""
    from flowdb.analysis.groups import GROUPS

    real = trials[trials["reading"] == "real"]
    overall = with_paper(summarise(real, ("matcher",)))
    named = real[real["matcher"] == "top-1"].assign(group=lambda t: t["group"].map(lambda code: GROUPS[code]))
    sections = [("per layer, place and matcher (95% bootstrap intervals):",
                 summarise(real, ("layer", "place", "matcher"))),
                ("all layers and places, beside the paper (Gemma 2 2B, Gemma Scope; Table 1):", overall),
                ("by activation group of the target (top-1):", summarise(named, ("group",)))]
    if not ceiling:
        return DeactivationReport(sections, overall)
    if trials[trials["reading"] == "ceiling"].empty:
        sections.append(("ceiling: no trials (no residual SAE at L-1, or no active target)", None))
        return DeactivationReport(sections, overall)
    whole = with_ceiling(trials, ("matcher",))
    sections += [
        ("ceiling control: R_{L-1} read by R_L's own SAE (its top-1 is the feature itself); "
         "M and A as they are. Place RES, per layer:",
         with_ceiling(trials[trials["place"] == "RES"], ("layer", "matcher"))[["layer", "matcher", *CEILING_COLUMNS]]),
        ("ceiling, all layers, per place:",
         with_ceiling(trials, ("place", "matcher"))[["place", "matcher", *CEILING_COLUMNS]]),
        ("ceiling, all layers and places (control: RES read by R_L's SAE, M and A unchanged):",
         whole[["matcher", *CEILING_COLUMNS]])]
    added = [c for c in whole if c.startswith("ceiling_") or c.endswith("fraction_of_ceiling")]
    return DeactivationReport(sections, overall.merge(whole[["matcher", *added]], on="matcher", how="left"))
