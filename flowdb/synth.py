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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flowdb.errors import FlowdbError
from flowdb.hooks import MODULE_HOOKS, hook_point
from flowdb.manifest import check_pack_name

# Shares of planted categories among residual features (layer 0 has no R_{L-1}).
SHARES = {"translated": 0.35, "processed": 0.25, "newborn": 0.25, "from-nowhere": 0.15}
FIRST_LAYER_SHARES = {"newborn": 0.7, "from-nowhere": 0.3}
PLANTED_NOISE = 0.45  # cosine to a single planted source ~ 1/sqrt(1 + 0.45^2) = 0.91
THRESHOLD = 0.5
SAE_LENS_FORMAT = "6.0.0"  # the cfg.json layout written here (sae-lens reads older ones differently)


@dataclass(frozen=True)
class SynthSpec:
    name: str = "planted"
    model: str = "planted-model"
    layers: int = 4
    d_model: int = 256
    width: int = 512
    seed: int = 0

    def check(self) -> None:
        check_pack_name(self.name)
        if self.layers < 1 or self.width < 8 or self.d_model < 64:
            raise FlowdbError("synth needs --layers >= 1, --width >= 8 and --d-model >= 64 "
                              "(smaller spaces make chance cosines as high as planted ones)")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plant_layer(rng, layer: int, prev_res: np.ndarray | None, mlp: np.ndarray, att: np.ndarray,
                width: int) -> tuple[np.ndarray, list[dict]]:
    """Unit residual directions for one layer and each feature's planted truth."""
    d = mlp.shape[1]
    shares = SHARES if prev_res is not None else FIRST_LAYER_SHARES
    categories = rng.choice(list(shares), size=width, p=list(shares.values()))
    rows, truth = np.empty((width, d), dtype=np.float32), []
    for i, category in enumerate(categories):
        res_pred = mlp_pred = att_pred = -1
        module = rng.choice(["mlp", "att"])
        q = int(rng.integers(mlp.shape[0]))
        source = mlp[q] if module == "mlp" else att[q]
        if category in ("translated", "processed"):
            res_pred = int(rng.integers(prev_res.shape[0]))
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
    """Write the planted pack under out_dir; returns the truth table."""
    spec.check()
    out = Path(out_dir)
    rng = np.random.default_rng(spec.seed)
    prev_res, truth = None, []
    for layer in range(spec.layers):
        mlp, att = _unit(rng, spec.width, spec.d_model), _unit(rng, spec.width, spec.d_model)
        res, planted = plant_layer(rng, layer, prev_res, mlp, att, spec.width)
        truth.extend(planted)
        for module, unit in (("res", res), ("mlp", mlp), ("att", att)):
            # Random row norms: real decoders are not unit length, matching must normalise.
            scale = rng.uniform(0.5, 2.0, size=(unit.shape[0], 1)).astype(np.float32)
            write_sae(out / "saes" / module / f"layer_{layer}", unit * scale,
                      hook_point(module, layer), spec.model)
        prev_res = res
    table = pd.DataFrame(truth)
    table.to_csv(out / "truth.csv", index=False)
    (out / "manifest.toml").write_text(_manifest(spec))
    return table


def _manifest(spec: SynthSpec) -> str:
    modules = "\n".join(f'[modules.{m}]\npath = "saes/{m}/layer_{{layer}}"\n' for m in MODULE_HOOKS)
    return (f'# A planted pack written by `flowdb synth` (seed {spec.seed}); truth in truth.csv.\n'
            f'name = "{spec.name}"\nmodel = "{spec.model}"\nlayers = [0, {spec.layers - 1}]\n\n'
            f'[match]\nk = 1\n\n'
            f'[classify]\nt_res = {THRESHOLD}\nt_mlp = {THRESHOLD}\nt_att = {THRESHOLD}\n\n{modules}')
