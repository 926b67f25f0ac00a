"""A stored pack brought back to life: its build plan, its SAEs and its matches,
for the experiments that run the model (groups, deactivation, steering).

The SAEs come from the plan stored at ingest (absolute paths and content digests),
so an experiment runs from any directory and refuses, naming the file, when an
SAE differs from what the graph was matched on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowdb.errors import FlowdbError
from flowdb.modules import NAMES
from flowdb.packs.plan import BuildPlan
from flowdb.packs.sources import load_sae
from flowdb.store import graph
from flowdb.store.database import Database


@dataclass
class LoadedPack:
    """A stored pack whose SAEs are loaded (lazily) for running on its model."""

    name: str
    model: str
    k: int
    plan: BuildPlan
    saes: dict = field(default_factory=dict)  # (layer, module) -> sae-lens SAE, loaded lazily

    def sae(self, layer: int, module: str):
        if (layer, module) not in self.saes:
            planned = self.plan.sae(layer, module)
            if planned is None:
                raise FlowdbError(f"pack {self.name} has no {module} SAE at layer {layer}")
            self.saes[(layer, module)] = load_sae(planned.ref).eval()
        return self.saes[(layer, module)]

    def has(self, layer: int, module: str) -> bool:
        return self.plan.has(layer, module)

    @property
    def layers(self) -> range:
        return self.plan.layers


def feature_codes(pack: LoadedPack, model, windows, positions, slots, progress=lambda it: it,
                  batch: int = 8) -> dict:
    """SAE activations at chosen tokens: (layer, module) -> float [windows x positions, width],
    from one forward pass per batch of windows for every slot at once."""
    import torch

    from flowdb.lm.hooks import capture, hook_point

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
    """What feature `index` adds to the reconstruction per unit of activation (see
    feature_directions)."""
    return feature_directions(sae, [index])[0]


def feature_directions(sae, indices=None):
    """[len(indices), d] (every feature by default): what each feature adds to the
    reconstruction per unit of activation.

    Taken from the SAE's own decode (decode(e_i) - decode(0)), so it is right for
    every sae-lens architecture: TopK SAEs trained with rescale_acts_by_decoder_norm,
    for one, add a * W_dec[i] / |W_dec[i]|, not a * W_dec[i].
    """
    import torch

    indices = torch.arange(sae.cfg.d_sae) if indices is None else torch.as_tensor(indices)
    with torch.no_grad():
        units = torch.zeros(len(indices) + 1, sae.cfg.d_sae, dtype=sae.W_dec.dtype)
        units[torch.arange(len(indices)), indices] = 1.0
        decoded = sae.decode(units)
    return decoded[:-1] - decoded[-1]


def open_pack(db: Database, name: str) -> LoadedPack:
    """A complete stored pack, its SAE files checked against the digests it was built from."""
    record = graph.require_pack(db, name)
    if not record.complete:
        raise FlowdbError(f"pack {name!r} is {record.status}: finish its ingest first")
    plan = BuildPlan.from_json(record.plan)
    plan.verify()
    return LoadedPack(name, record.model, record.k, plan)


def predecessor_table(db: Database, pack: str, layer: int, width: int, k: int) -> dict[str, np.ndarray]:
    """For each place, an int array [width, k] of the stored top-k predecessors of the
    residual features at `layer` (-1 where none is stored)."""
    table = {place: np.full((width, k), -1, dtype=np.int64) for place in NAMES}
    for row in graph.predecessor_rows(db, pack, layer, k):
        table[row["place"]][row["dst"], row["rank"] - 1] = row["src"]
    return table
