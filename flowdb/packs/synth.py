"""`flowdb synth`: a planted SAE pack with known lineage, for tests and demos.

Per layer L, the MLP and attention SAEs have random decoder directions; each
residual feature at L is planted as one of:
  translated    R_{L-1}[p] plus noise                (cosine ~0.9 to its parent)
  processed     R_{L-1}[p] + M_L[q] (or A_L[q]), plus noise (~0.7 to each)
  newborn       M_L[q] or A_L[q] plus noise          (~0.9)
  from-nowhere  a random direction
Random directions in d_model dimensions score far below the planted ones, so
the manifest's thresholds (0.5) separate planted from chance. Decoder rows get
random norms, so matching must normalise. Written in sae-lens's on-disk format
(cfg.json + sae_weights.safetensors), with the truth in truth.csv.

With companions (`--companions`), two residual-only packs at the same layers and
hooks are planted against the base pack's residual features a, for `flowdb link`:
  OUT/split  split 0.2 (2 or 3 children a + beta*u_i, the u_i a centred simplex
             orthogonal to a, so the children's normalised sum is a; cosine to a
             0.65 / 0.6), kept 0.7 (~0.9), gone 0.1; plus 0.1 new (random)
  OUT/drift  kept 0.7, shifted 0.15 (rotated to exactly the midpoint of chance
             and 0.5), gone 0.15; plus 0.15 new
Rows are shuffled; truth.csv per companion lists both sides (side a: the base).
The base pack's parents and module sources are then drawn without replacement:
two features translated from one parent are near-twins, and a companion feature
near twins would be kept, split or merged by noise rather than by planting.
Chance (p99.9 top-1 cosine of random vectors) must clear the shifted band, so
too small a --d-model for the widths is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flowdb.classify import chance_cosine
from flowdb.errors import FlowdbError
from flowdb.lm.hooks import MODULE_HOOKS, hook_point
from flowdb.packs.manifest import check_pack_name

# Shares of planted categories among residual features (layer 0 has no R_{L-1}).
SHARES = {"translated": 0.35, "processed": 0.25, "newborn": 0.25, "from-nowhere": 0.15}
FIRST_LAYER_SHARES = {"newborn": 0.7, "from-nowhere": 0.3}
PLANTED_NOISE = 0.45  # cosine to a single planted source ~ 1/sqrt(1 + 0.45^2) = 0.91
THRESHOLD = 0.5
SAE_LENS_FORMAT = "6.0.0"  # the cfg.json layout written here (sae-lens reads older ones differently)

# Companion packs: shares of the base's residual features by planted category, and
# new features as a share of the base width.
SPLIT_SHARES = {"split": 0.2, "kept": 0.7, "gone": 0.1}
DRIFT_SHARES = {"kept": 0.7, "shifted": 0.15, "gone": 0.15}
COMPANION_NEW = {"split": 0.1, "drift": 0.15}
SPLIT_COSINE = {2: 0.65, 3: 0.6}  # child to parent, by number of children
MAX_CHILDREN = max(SPLIT_COSINE)
CHANCE_QUANTILE = 0.999
CHANCE_MARGIN = 0.05  # the shifted cosine clears chance by at least this
COMPANION_K = MAX_CHILDREN  # top-k that link needs to see every planted child


@dataclass(frozen=True)
class SynthSpec:
    name: str = "planted"
    model: str = "planted-model"
    layers: int = 4
    d_model: int = 256
    width: int = 512
    seed: int = 0
    companions: bool = False

    def check(self) -> None:
        check_pack_name(self.name)
        if self.layers < 1 or self.width < 8 or self.d_model < 64:
            raise FlowdbError("synth needs --layers >= 1, --width >= 8 and --d-model >= 64 "
                              "(smaller spaces make chance cosines as high as planted ones)")
        if self.companions:
            for kind in COMPANION_NEW:
                check_pack_name(f"{self.name}-{kind}")
            if not shifted_band_clears_chance(self.width, self.d_model):
                d_needed = next(d for d in range(self.d_model, 1 << 16, 16)
                                if shifted_band_clears_chance(self.width, d))
                raise FlowdbError(
                    f"synth --companions needs --d-model >= {d_needed} for width {self.width}: chance "
                    f"(p99.9 top-1 cosine) is {companion_chance(self.width, self.d_model):.3f} in "
                    f"d_model {self.d_model}, too close to the threshold {THRESHOLD} for a shifted band")


def companion_chance(width: int, d: int) -> float:
    """Chance for the widest search a companion link makes: a split companion with every
    feature split into the most children, plus its new features."""
    widest = width * MAX_CHILDREN + round(max(COMPANION_NEW.values()) * width)
    return chance_cosine(CHANCE_QUANTILE, widest, d)


def shifted_band_clears_chance(width: int, d: int) -> bool:
    return shifted_cosine(width, d) - companion_chance(width, d) >= CHANCE_MARGIN


def shifted_cosine(width: int, d: int) -> float:
    """The exact cosine of a rotated (shifted) feature: midway between chance and the threshold."""
    return (companion_chance(width, d) + THRESHOLD) / 2


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plant_layer(rng, layer: int, prev_res: np.ndarray | None, mlp: np.ndarray, att: np.ndarray,
                width: int, distinct: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Unit residual directions for one layer and each feature's planted truth; distinct
    draws each parent and each module source at most once."""
    d, n_module = mlp.shape[1], mlp.shape[0]
    shares = SHARES if prev_res is not None else FIRST_LAYER_SHARES
    categories = rng.choice(list(shares), size=width, p=list(shares.values()))
    parents = iter(rng.permutation(prev_res.shape[0]).tolist()) if distinct and prev_res is not None else None
    slots = iter(rng.permutation(2 * n_module).tolist()) if distinct else None
    rows, truth = np.empty((width, d), dtype=np.float32), []
    for i, category in enumerate(categories):
        res_pred = mlp_pred = att_pred = -1
        if slots is None:
            module = rng.choice(["mlp", "att"])
            q = int(rng.integers(n_module))
        else:
            slot = next(slots)
            module, q = ("mlp", slot) if slot < n_module else ("att", slot - n_module)
        source = mlp[q] if module == "mlp" else att[q]
        if category in ("translated", "processed"):
            res_pred = next(parents) if parents is not None else int(rng.integers(prev_res.shape[0]))
        if category == "translated":
            v = prev_res[res_pred] + PLANTED_NOISE * _unit(rng, 1, d)[0]
        elif category == "processed":
            v = prev_res[res_pred] + source + PLANTED_NOISE * _unit(rng, 1, d)[0]
        elif category == "newborn":
            v = source + PLANTED_NOISE * _unit(rng, 1, d)[0]
        else:
            v = _unit(rng, 1, d)[0]
        if category in ("processed", "newborn"):
            mlp_pred, att_pred = (q, -1) if module == "mlp" else (-1, q)
        rows[i] = v / np.linalg.norm(v)
        truth.append({"layer": layer, "index": i, "category": str(category), "res_pred": res_pred,
                      "mlp_pred": mlp_pred, "att_pred": att_pred})
    return rows, truth


def write_sae(directory: Path, w_dec: np.ndarray, hook_name: str, model: str,
              neuronpedia_id: str | None = None) -> None:
    """One SAE in sae-lens's on-disk format (a standard ReLU SAE, encoder tied)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = w_dec.shape
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": "standard",
           "metadata": {"sae_lens_version": SAE_LENS_FORMAT, "model_name": model,
                        "hook_name": hook_name, "neuronpedia_id": neuronpedia_id}}
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
    save_file({"W_enc": np.ascontiguousarray(w_dec.T), "W_dec": np.ascontiguousarray(w_dec),
               "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(d_in, np.float32)},
              str(directory / "sae_weights.safetensors"))


def synthesize(out_dir: str | Path, spec: SynthSpec = SynthSpec()) -> pd.DataFrame:
    """Write the planted pack (and with spec.companions its companions) under out_dir;
    returns the base pack's truth table."""
    spec.check()
    out = Path(out_dir)
    rng = np.random.default_rng(spec.seed)
    prev_res, truth, residuals = None, [], []
    for layer in range(spec.layers):
        mlp, att = _unit(rng, spec.width, spec.d_model), _unit(rng, spec.width, spec.d_model)
        res, planted = plant_layer(rng, layer, prev_res, mlp, att, spec.width, distinct=spec.companions)
        truth.extend(planted)
        for module, unit in (("res", res), ("mlp", mlp), ("att", att)):
            write_sae(out / "saes" / module / f"layer_{layer}", _random_norms(rng, unit),
                      hook_point(module, layer), spec.model)
        prev_res = res
        residuals.append(res)
    table = pd.DataFrame(truth)
    table.to_csv(out / "truth.csv", index=False)
    (out / "manifest.toml").write_text(_manifest(spec.name, spec.model, spec.layers, MODULE_HOOKS, k=1,
                                                 note=f"a planted pack written by `flowdb synth` (seed {spec.seed})"))
    if spec.companions:
        for number, kind in enumerate(COMPANION_NEW, start=1):
            write_companion(out / kind, kind, spec, residuals, np.random.default_rng([spec.seed, number]))
    return table


def _random_norms(rng, unit: np.ndarray) -> np.ndarray:
    # Random row norms: real decoders are not unit length, matching must normalise.
    return unit * rng.uniform(0.5, 2.0, size=(unit.shape[0], 1)).astype(np.float32)


def write_companion(out: Path, kind: str, spec: SynthSpec, residuals: list[np.ndarray], rng) -> pd.DataFrame:
    """A residual-only companion pack ("split" or "drift") planted against the base's residuals."""
    shares = SPLIT_SHARES if kind == "split" else DRIFT_SHARES
    model = spec.model if kind == "split" else f"{spec.model}-drift"
    truth = []
    for layer, base in enumerate(residuals):
        rows, planted = plant_companion(rng, layer, base, shares, round(COMPANION_NEW[kind] * spec.width),
                                        shifted_cosine(spec.width, spec.d_model))
        truth.extend(planted)
        write_sae(out / "saes" / "res" / f"layer_{layer}", _random_norms(rng, rows),
                  hook_point("res", layer), model)
    table = pd.DataFrame(truth, columns=["side", "layer", "index", "category", "relative", "children"])
    table.to_csv(out / "truth.csv", index=False)
    name = f"{spec.name}-{kind}"
    (out / "manifest.toml").write_text(_manifest(
        name, model, spec.layers, ["res"], k=COMPANION_K,
        note=f"a {kind} companion of {spec.name} written by `flowdb synth --companions` (seed {spec.seed}); "
             f"link it with `flowdb link {spec.name} {name}`"))
    return table


def plant_companion(rng, layer: int, base: np.ndarray, shares: dict[str, float], n_new: int,
                    shifted: float) -> tuple[np.ndarray, list[dict]]:
    """Unit rows of a companion SAE at one layer, shuffled, and the truth of both sides."""
    width, d = base.shape
    categories = rng.choice(list(shares), size=width, p=list(shares.values()))
    rows, parent_of = [], []  # B rows before shuffling, and the base feature each comes from
    for a, category in enumerate(categories):
        if category == "kept":
            planted = [base[a] + PLANTED_NOISE * _unit(rng, 1, d)[0]]
        elif category == "split":
            planted = split_children(rng, base[a], int(rng.choice(list(SPLIT_COSINE))))
        elif category == "shifted":
            u = _orthonormal_to(rng, base[a], 1)[0]
            planted = [shifted * base[a] + np.sqrt(1 - shifted ** 2) * u]
        else:  # gone: nothing in B
            planted = []
        rows.extend(planted)
        parent_of.extend([a] * len(planted))
    rows.extend(_unit(rng, n_new, d))
    parent_of.extend([-1] * n_new)
    order = rng.permutation(len(rows))  # B index i holds row order[i]: index order carries no truth
    b_index = np.argsort(order)
    unit = np.asarray(rows, dtype=np.float32)[order]
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    children = [[] for _ in range(width)]
    for row, a in enumerate(parent_of):
        if a >= 0:
            children[a].append(int(b_index[row]))
    truth = []
    for a, category in enumerate(categories):
        single = category in ("kept", "shifted")
        truth.append({"side": "a", "layer": layer, "index": a, "category": str(category),
                      "relative": children[a][0] if single else -1,
                      "children": ";".join(map(str, sorted(children[a]))) if category == "split" else ""})
    for b in range(len(rows)):
        a = parent_of[order[b]]
        category = "new" if a < 0 else "shifted" if categories[a] == "shifted" else "kept"
        truth.append({"side": "b", "layer": layer, "index": b, "category": category,
                      "relative": a, "children": ""})
    return unit, truth


def split_children(rng, parent: np.ndarray, n: int) -> list[np.ndarray]:
    """n children a + beta*u_i with the u_i a centred regular simplex orthogonal to a, so
    their normalised sum is a and each is at SPLIT_COSINE[n] to it."""
    simplex = np.eye(n) - 1.0 / n  # vertices minus their centroid: they sum to zero
    simplex /= np.linalg.norm(simplex, axis=1, keepdims=True)
    directions = simplex @ _orthonormal_to(rng, parent, n)
    beta = np.sqrt(1 / SPLIT_COSINE[n] ** 2 - 1)  # cos(a, a + beta*u) = 1 / sqrt(1 + beta^2)
    return [(parent + beta * u) / np.sqrt(1 + beta ** 2) for u in directions]


def _orthonormal_to(rng, direction: np.ndarray, n: int) -> np.ndarray:
    """n orthonormal rows spanning a random subspace orthogonal to a unit direction."""
    basis, _ = np.linalg.qr(np.column_stack([direction, rng.standard_normal((direction.shape[0], n))]))
    return basis[:, 1:].T


def _manifest(name: str, model: str, layers: int, modules, *, k: int, note: str) -> str:
    tables = "\n".join(f'[modules.{m}]\npath = "saes/{m}/layer_{{layer}}"\n' for m in modules)
    thresholds = "\n".join(f"t_{m} = {THRESHOLD}" for m in modules)
    return (f'# {note[0].upper()}{note[1:]}; truth in truth.csv.\n'
            f'name = "{name}"\nmodel = "{model}"\nlayers = [0, {layers - 1}]\n\n'
            f'[match]\nk = {k}\n\n[classify]\n{thresholds}\n\n{tables}')
