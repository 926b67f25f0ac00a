"""Transcoder sets in circuit-tracer's on-disk layout, for tests: config.yaml and
layer_{i}.safetensors (W_enc and W_dec [d_transcoder, d_model], b_enc, b_dec,
activation_function.threshold), as TranscoderSet.to_safetensors and
save_transcoders_to_cache write them. Written with safetensors and yaml alone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file, save_file

SCAN = "planted/transcoders"


def planted_decoder(pack_dir: Path, module: str, layer: int) -> np.ndarray:
    return load_file(str(pack_dir / "saes" / module / f"layer_{layer}" / "sae_weights.safetensors"))["W_dec"]


def write_transcoder_set(pack_dir: Path, out: Path, layers: int, *, scan: str | None = SCAN,
                         seed: int = 0, **config) -> Path:
    """The planted pack's MLP decoders as a transcoder set: layer i's W_dec is exactly the
    planted MLP SAE's W_dec at layer i; the encoder and JumpReLU thresholds are seeded noise
    (flowdb does not read them). config: config.yaml keys to set (None drops one)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for layer in range(layers):
        w_dec = planted_decoder(pack_dir, "mlp", layer)
        d_transcoder, d_model = w_dec.shape
        save_file({"W_enc": rng.standard_normal((d_transcoder, d_model)).astype(np.float32),
                   "W_dec": np.ascontiguousarray(w_dec),
                   "b_enc": np.zeros(d_transcoder, np.float32), "b_dec": np.zeros(d_model, np.float32),
                   "activation_function.threshold": rng.uniform(0, 0.1, d_transcoder).astype(np.float32)},
                  str(out / f"layer_{layer}.safetensors"))
    settings = {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out", "model_name": "planted-model", "scan": scan}
    settings.update(config)
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}))
    return out


def transcoder_manifest(pack_dir: Path, set_dir: Path, path: Path, name: str = "planted-tc") -> Path:
    """A synth pack's manifest, renamed, with its MLP SAEs swapped for the transcoder set."""
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', (pack_dir / "manifest.toml").read_text())
    text = text.replace('path = "saes/mlp/layer_{layer}"', f'transcoders = "{set_dir}"')
    text = text.replace('path = "saes/', f'path = "{pack_dir}/saes/')
    path.write_text(text)
    return path
