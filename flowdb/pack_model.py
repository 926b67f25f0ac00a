"""A stored pack brought back to life: its manifest, its SAEs and its matches,
for the experiments that run the model (groups, deactivation, steering)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowdb.database import Database
from flowdb.errors import FlowdbError
from flowdb.manifest import Manifest, load_manifest
from flowdb.sources import load_sae

PLACES = ("res", "mlp", "att")  # predecessor places of R_L: R_{L-1}, M_L, A_L


@dataclass
class StoredPack:
    name: str
    model: str
    k: int
    manifest: Manifest
    saes: dict = field(default_factory=dict)  # (layer, module) -> sae-lens SAE, loaded lazily

    def sae(self, layer: int, module: str):
        if (layer, module) not in self.saes:
            ref = self.manifest.source(module, layer)
            if ref is None:
                raise FlowdbError(f"pack {self.name} has no {module} SAEs")
            self.saes[(layer, module)] = load_sae(ref).eval()
        return self.saes[(layer, module)]

    def has(self, layer: int, module: str) -> bool:
        return module in self.manifest.modules and layer in self.manifest.layers


def feature_codes(pack: "StoredPack", model, windows, positions, slots, progress=lambda it: it,
                  batch: int = 8) -> dict:
    """SAE activations at chosen tokens: (layer, module) -> float [windows x positions, width],
    from one forward pass per batch of windows for every slot at once."""
    import torch

    from flowdb.hooks import capture, hook_point

    hooks = {slot: hook_point(slot[1], slot[0]) for slot in slots}
    gathered = {slot: [] for slot in slots}
    with torch.no_grad():
        for start in progress(range(0, len(windows), batch)):
            chunk = windows[start:start + batch]
            rows = torch.arange(len(chunk)).unsqueeze(1)
            cols = torch.as_tensor(positions[start:start + batch])
            with capture(model, list(hooks.values())) as acts:
                model(chunk)
            for (layer, module), hook in hooks.items():
                picked = acts[hook][rows, cols].reshape(-1, acts[hook].shape[-1])
                gathered[(layer, module)].append(pack.sae(layer, module).encode(picked).numpy())
    return {slot: np.concatenate(parts) for slot, parts in gathered.items()}


def feature_direction(sae, index: int):
    """What feature `index` adds to the reconstruction per unit of activation.

    Taken from the SAE's own decode (decode(e_i) - decode(0)), so it is right for
    every sae-lens architecture: TopK SAEs trained with rescale_acts_by_decoder_norm,
    for one, add a * W_dec[i] / |W_dec[i]|, not a * W_dec[i].
    """
    import torch

    with torch.no_grad():
        unit = torch.zeros(2, sae.cfg.d_sae, dtype=sae.W_dec.dtype)
        unit[0, index] = 1.0
        decoded = sae.decode(unit)
    return decoded[0] - decoded[1]


def open_pack(db: Database, name: str) -> StoredPack:
    rows = db.read("MATCH (p:Pack {name: $name}) RETURN p.model AS model, p.k AS k, "
                   "p.manifest AS manifest, p.status AS status", name=name)
    if not rows:
        raise FlowdbError(f"no pack named {name!r} in {db.uri}")
    row = rows[0]
    if row["status"] != "complete":
        raise FlowdbError(f"pack {name!r} is {row['status']}: finish its ingest first")
    if not Path(row["manifest"]).exists():
        raise FlowdbError(f"pack {name!r} was built from {row['manifest']}, which is gone")
    return StoredPack(name, row["model"], row["k"], load_manifest(row["manifest"], k=row["k"]))


def predecessor_table(db: Database, pack: str, layer: int, width: int, k: int) -> dict[str, np.ndarray]:
    """For each place, an int array [width, k] of the stored top-k predecessors of the
    residual features at `layer` (-1 where none is stored)."""
    rows = db.read(
        "MATCH (s:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(d:Feature {pack: $pack, layer: $layer, module: 'res'}) "
        "WHERE e.rank <= $k RETURN d.index AS dst, s.module AS place, s.index AS src, e.rank AS rank",
        pack=pack, layer=layer, k=k)
    table = {place: np.full((width, k), -1, dtype=np.int64) for place in PLACES}
    for row in rows:
        table[row["place"]][row["dst"], row["rank"] - 1] = row["src"]
    return table
