"""Data-free categories of residual features (Laptev et al., section 3.3).

From the top-1 cosine scores s(R), s(M), s(A) of a residual feature at layer L
against R_{L-1}, M_L and A_L:
  translated    high s(R), low s(M) and s(A)   carried over from R_{L-1}
  processed     high s(R), high s(M) or s(A)   refined by the MLP or attention
  newborn       low s(R),  high s(M) or s(A)   created by the MLP or attention
  from-nowhere  all low
"High" means score >= the layer's threshold. A module with no SAE (R_{-1} at the
first layer, say) scores NaN, which counts as low.

Thresholds (the paper gives none for this; defaults are its flow-graph cut-offs):
  rule = "fixed":    t_res (0.5), t_mlp and t_att (0.15) at every layer;
  rule = "quantile": per layer, the q_res / q_mod quantile of that layer's own
                     scores, for when score scales drift with depth;
  [classify.layer.N] tables pin t_res / t_mlp / t_att at layer N under either rule.
The thresholds actually used at each layer are recorded with the build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CATEGORIES = ("translated", "processed", "newborn", "from-nowhere")
RULES = ("fixed", "quantile")
_KEYS = {"t_res", "t_mlp", "t_att", "rule", "q_res", "q_mod", "layer"}
_LAYER_KEYS = {"t_res", "t_mlp", "t_att"}


@dataclass(frozen=True)
class LayerThresholds:
    t_res: float
    t_mlp: float
    t_att: float


@dataclass(frozen=True)
class Thresholds:
    t_res: float = 0.5
    t_mlp: float = 0.15
    t_att: float = 0.15
    rule: str = "fixed"
    q_res: float = 0.5
    q_mod: float = 0.5
    per_layer: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = field(default=())

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name in ("t_res", "t_mlp", "t_att"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a cosine in [-1, 1], got {value}")
        for name in ("q_res", "q_mod"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a quantile level in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, table: dict[str, Any]) -> "Thresholds":
        unknown = sorted(set(table) - _KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"valid keys: {', '.join(sorted(_KEYS))}")
        per_layer = []
        for layer, values in table.get("layer", {}).items():
            if not str(layer).isdigit() or not isinstance(values, dict):
                raise ValueError(f"[classify.layer.{layer}] must be a table keyed by a layer number")
            bad = sorted(set(values) - _LAYER_KEYS)
            if bad:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, bad))} in [classify.layer.{layer}]; "
                                 f"valid keys: {', '.join(sorted(_LAYER_KEYS))}")
            per_layer.append((int(layer), tuple(sorted((k, float(v)) for k, v in values.items()))))
        scalars = {k: v for k, v in table.items() if k != "layer"}
        for key, value in scalars.items():
            if key != "rule" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key} must be a number, got {value!r}")
        return cls(**{k: (float(v) if k != "rule" else v) for k, v in scalars.items()},
                   per_layer=tuple(sorted(per_layer)))

    def spec(self) -> dict[str, Any]:
        """The parameters, as recorded with a build and hashed into its fingerprint."""
        return {"t_res": self.t_res, "t_mlp": self.t_mlp, "t_att": self.t_att, "rule": self.rule,
                "q_res": self.q_res, "q_mod": self.q_mod,
                "layer": {str(layer): dict(values) for layer, values in self.per_layer}}

    def for_layer(self, layer: int, s_res: np.ndarray, s_mlp: np.ndarray,
                  s_att: np.ndarray) -> LayerThresholds:
        if self.rule == "quantile":
            values = {"t_res": _quantile(s_res, self.q_res), "t_mlp": _quantile(s_mlp, self.q_mod),
                      "t_att": _quantile(s_att, self.q_mod)}
        else:
            values = {"t_res": self.t_res, "t_mlp": self.t_mlp, "t_att": self.t_att}
        values.update(dict(self.per_layer).get(layer, ()))
        return LayerThresholds(**values)


def _quantile(scores: np.ndarray, q: float) -> float:
    finite = scores[np.isfinite(scores)]
    return float(np.quantile(finite, q)) if finite.size else float("nan")


def classify(s_res: np.ndarray, s_mlp: np.ndarray, s_att: np.ndarray,
             t: LayerThresholds) -> np.ndarray:
    """Category names (an object array) for each residual feature of one layer."""
    with np.errstate(invalid="ignore"):  # NaN (no such module) compares as low
        high_res = s_res >= t.t_res
        high_mod = (s_mlp >= t.t_mlp) | (s_att >= t.t_att)
    codes = np.where(high_res, np.where(high_mod, 1, 0), np.where(high_mod, 2, 3))
    return np.asarray(CATEGORIES, dtype=object)[codes]
