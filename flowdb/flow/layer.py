"""One layer of a build in memory (LayerBuild: its top-k matches, thresholds and categories),
and what it adds to the graph: node and relationship counts and its SAE nodes' properties,
read alike by the flow atlas, Bolt writes and the bulk import."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowdb.classify import LayerThresholds
from flowdb.modules import RESIDUAL, sae_key


@dataclass
class LayerBuild:
    """One layer's residual features with their top-k predecessors and categories."""

    layer: int
    widths: dict[str, int]  # module -> number of features at this layer
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # predecessor place -> [n_res, k]
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    saes: dict[str, dict] = field(default_factory=dict)  # module -> provenance
    searched: dict[str, tuple[int, int]] = field(default_factory=dict)  # place -> (width, d_in) searched
    thresholds: LayerThresholds | None = None
    categories: np.ndarray | None = None
    matcher: str = ""  # the backend that searched this layer
    search_seconds: float = 0.0  # time inside the matcher's searches (not reading SAEs)

    def above(self, place: str) -> np.ndarray:
        """Which stored matches [n_res, k] reach the layer's threshold for their place."""
        return self.scores[place] >= self.thresholds.for_place(place)

    def above_chance(self) -> dict[str, float]:
        """Per place, the share of top-1 matches above the chance level."""
        chance = dict(self.thresholds.chance)
        return {place: float(np.mean(self.scores[place][:, 0] >= chance[place]))
                for place in self.scores if place in chance}

    def top1(self, place: str) -> np.ndarray:
        """s(P) for every residual feature; NaN where the place has no SAE."""
        if place in self.scores:
            return self.scores[place][:, 0].astype(np.float64)
        return np.full(self.widths["res"], np.nan)

    def n_edges(self) -> int:
        return sum(int(v.size) for v in self.indices.values())

    def search_flops(self) -> float:
        """The searches' arithmetic: 2 n m d for n residual features against m of width d."""
        return sum(2.0 * self.widths[RESIDUAL.name] * width * d for width, d in self.searched.values())


PACK_NODES = 2  # a pack's own nodes beside its layers': the Pack node and its Nowhere node


def layer_size(widths: dict[str, int], n_saes: int, match_edges: int, from_nowhere: int) -> tuple[int, int]:
    """The nodes and relationships one layer adds to the graph: its features and SAE
    nodes; its match edges, FROM_NOWHERE marks and HAS_SAE links."""
    return sum(int(w) for w in widths.values()) + n_saes, match_edges + from_nowhere + n_saes


def built_layer_size(layer: LayerBuild) -> tuple[int, int]:
    """layer_size of a classified layer in memory."""
    marks = int(np.count_nonzero(np.asarray(layer.categories) == "from-nowhere"))
    return layer_size(layer.widths, len(layer.saes), layer.n_edges(), marks)


def sae_properties(pack: str, layer: LayerBuild) -> list[dict]:
    """The SAE nodes of one layer, one property map each (None: no such property): the
    provenance, where it sits and its width; the residual SAE also its thresholds."""
    return [{**meta, "key": sae_key(pack, layer.layer, module), "pack": pack, "layer": layer.layer,
             "module": module, "n_features": layer.widths[module],
             **(threshold_properties(layer) if module == RESIDUAL.name else {})}
            for module, meta in layer.saes.items()]


def threshold_properties(layer: LayerBuild) -> dict:
    """What the residual SAE node of a layer records about its cut-offs: the values,
    the rule that set them, chance per place and the share of top-1 matches above it."""
    t = layer.thresholds
    props = {"t_res": _finite(t.t_res), "t_mlp": _finite(t.t_mlp), "t_att": _finite(t.t_att),
             "threshold_rule": t.rule}
    props.update({f"chance_{place}": value for place, value in t.chance})
    props.update({f"above_chance_{place}": share for place, share in layer.above_chance().items()})
    return props


def _finite(value: float) -> float | None:
    return None if value != value else float(value)
