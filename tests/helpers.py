"""Reference computations for tests, written independently of flowdb's code paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

PLACE_KIND = {"res": "residual", "mlp": "mlp", "att": "attention"}


def unit_decoder(pack_dir: Path, module: str, layer: int) -> np.ndarray:
    w = load_file(str(pack_dir / "saes" / module / f"layer_{layer}" / "sae_weights.safetensors"))["W_dec"]
    w = w.astype(np.float64)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def brute_force_edges(pack_dir: Path, layers: int, k: int) -> pd.DataFrame:
    """Every top-k match by dense float64 cosines and a full sort."""
    rows = []
    for layer in range(layers):
        queries = unit_decoder(pack_dir, "res", layer)
        for place in ("res", "mlp", "att"):
            src_layer = layer - 1 if place == "res" else layer
            if src_layer < 0:
                continue
            cos = queries @ unit_decoder(pack_dir, place, src_layer).T
            order = np.argsort(-cos, axis=1)[:, :k]
            for dst, preds in enumerate(order):
                for rank, src in enumerate(preds, start=1):
                    rows.append((src_layer, place, int(src), layer, "res", dst, PLACE_KIND[place],
                                 float(cos[dst, src]), rank))
    columns = ["src_layer", "src_module", "src_index", "dst_layer", "dst_module", "dst_index",
               "kind", "cosine", "rank"]
    return pd.DataFrame(rows, columns=columns)


def sort_edges(frame: pd.DataFrame) -> pd.DataFrame:
    keys = ["dst_layer", "dst_index", "kind", "rank"]
    return frame.sort_values(keys).reset_index(drop=True)
