"""Data-free categories of residual features (Laptev et al., section 3.3).

From the top-1 cosine scores s(R), s(M), s(A) of a residual feature at layer L
against R_{L-1}, M_L and A_L:
  translated    high s(R), low s(M) and s(A)   carried over from R_{L-1}
  processed     high s(R), high s(M) or s(A)   refined by the MLP or attention
  newborn       low s(R),  high s(M) or s(A)   created by the MLP or attention
  from-nowhere  all low
"High" means score >= the layer's threshold for that place. A module with no SAE
(R_{-1} at the first layer, say) scores NaN, which counts as low.

Thresholds (the paper gives no numbers for this):
  rule = "auto" (default): per layer and place, the larger of the paper's fixed
                     cut-off (t_res 0.5, t_mlp and t_att 0.15) and chance;
  rule = "fixed":    t_res, t_mlp, t_att at every layer, whatever chance is;
  rule = "chance":   the q_chance quantile of chance at every layer and place;
  rule = "quantile": per layer, the q_res / q_mod quantile of that layer's own scores;
  [classify.layer.N] tables pin t_res / t_mlp / t_att at layer N under any rule.
"Chance" is the null distribution of a top-1 score: the largest cosine between a
unit vector and N random unit vectors in d dimensions, N the width of the SAE
searched and d its d_in (`chance_cosine`, exact). The paper's t_mod = 0.15 is
above chance for Gemma Scope 16k in d 2304 (p99.9 0.110) but not for 2,048
features in d 576 (0.202). The thresholds used at each layer, the rule that set
them and the chance levels are recorded with the build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from flowdb.modules import BY_KIND
from flowdb.schema import Cosine, Level, Strict

CATEGORIES = ("translated", "processed", "newborn", "from-nowhere")
RULES = ("auto", "fixed", "chance", "quantile")
PLACES = ("res", "mlp", "att")  # R_{L-1}, M_L, A_L, as in flowdb.modules.NAMES
EDGE_STATUSES = ("threshold", "above-chance", "chance", "unknown")


def chance_cosine(q: float, n: int, d: int) -> float:
    """The q-quantile of the largest cosine between a unit vector and n independent
    uniformly random unit vectors in d dimensions.

    One cosine c has c^2 ~ Beta(1/2, (d-1)/2) with a symmetric sign, so
    P(c <= t) = 1/2 + 1/2 I_{t^2}(1/2, (d-1)/2) for t >= 0, and the maximum of n has
    P(max <= t) = P(c <= t)^n; inverting that gives the quantile exactly."""
    from scipy.special import betaincinv

    if n < 1 or d < 2 or not 0.0 < q < 1.0:
        raise ValueError(f"chance_cosine needs n >= 1, d >= 2 and 0 < q < 1, got {n}, {d}, {q}")
    per_vector = q ** (1.0 / n)  # P(c <= t) that gives P(max <= t) = q
    if per_vector <= 0.5:
        return -math.sqrt(float(betaincinv(0.5, (d - 1) / 2, 1.0 - 2.0 * per_vector)))
    return math.sqrt(float(betaincinv(0.5, (d - 1) / 2, 2.0 * per_vector - 1.0)))


def chance_cdf(t: float, n: int, d: int) -> float:
    """P(largest of n random cosines in d dimensions <= t): the distribution chance_cosine
    inverts, for drawing it beside observed top-1 scores."""
    from scipy.special import betainc

    t = min(max(t, -1.0), 1.0)
    tail = 0.5 * float(betainc(0.5, (d - 1) / 2, t * t))
    per_vector = 0.5 + tail if t >= 0 else 0.5 - tail
    return per_vector ** n


class LayerTable(Strict):
    """[classify.layer.N]: thresholds pinned at layer N."""

    t_res: Cosine | None = None
    t_mlp: Cosine | None = None
    t_att: Cosine | None = None


class ClassifyTable(Strict):
    """[classify] of a manifest, and the thresholds spec stored with a build."""

    t_res: Cosine = 0.5
    t_mlp: Cosine = 0.15
    t_att: Cosine = 0.15
    rule: Literal["auto", "fixed", "chance", "quantile"] = "auto"
    q_res: Level = 0.5
    q_mod: Level = 0.5
    q_chance: Annotated[float, Field(strict=True, gt=0.0, lt=1.0)] = 0.999
    layer: dict[str, LayerTable] = {}


@dataclass(frozen=True)
class LayerThresholds:
    t_res: float
    t_mlp: float
    t_att: float
    rule: str = "fixed"  # what set these values at this layer, e.g. "auto: chance p99.9 for mlp, att"
    chance: tuple[tuple[str, float], ...] = ()  # place -> chance level of a top-1 score

    def for_place(self, place: str) -> float:
        return {"res": self.t_res, "mlp": self.t_mlp, "att": self.t_att}[place]


@dataclass(frozen=True)
class Thresholds:
    t_res: float = 0.5
    t_mlp: float = 0.15
    t_att: float = 0.15
    rule: str = "auto"
    q_res: float = 0.5
    q_mod: float = 0.5
    q_chance: float = 0.999
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
        if not 0.0 < self.q_chance < 1.0:
            raise ValueError(f"q_chance must be in (0, 1), got {self.q_chance}")

    @property
    def chance_name(self) -> str:
        return f"chance p{100 * self.q_chance:g}"

    @classmethod
    def from_mapping(cls, table: Any) -> Thresholds:
        """From a [classify] table (or a stored spec); ValueError names what is wrong."""
        from pydantic import ValidationError

        from flowdb.schema import explain

        try:
            parsed = ClassifyTable.model_validate(table)
        except ValidationError as exc:
            raise ValueError(explain(exc, ClassifyTable, "[classify]")) from None
        per_layer = []
        for layer, values in parsed.layer.items():
            if not layer.isdigit():
                raise ValueError(f"[classify.layer.{layer}] must be keyed by a layer number")
            pinned = {k: v for k, v in values.model_dump().items() if v is not None}
            per_layer.append((int(layer), tuple(sorted((k, float(v)) for k, v in pinned.items()))))
        scalars = parsed.model_dump(exclude={"layer"})
        return cls(**{k: (float(v) if k != "rule" else v) for k, v in scalars.items()},
                   per_layer=tuple(sorted(per_layer)))

    def spec(self) -> dict[str, Any]:
        """The parameters, as recorded with a build and hashed into its fingerprint."""
        return {"t_res": self.t_res, "t_mlp": self.t_mlp, "t_att": self.t_att, "rule": self.rule,
                "q_res": self.q_res, "q_mod": self.q_mod, "q_chance": self.q_chance,
                "layer": {str(layer): dict(values) for layer, values in self.per_layer}}

    def for_layer(self, layer: int, scores: dict[str, np.ndarray],
                  searched: dict[str, tuple[int, int]]) -> LayerThresholds:
        """The cut-offs at one layer, from its top-1 scores per place and the (width,
        d_in) of the SAE searched at each place."""
        chance = {place: chance_cosine(self.q_chance, n, d) for place, (n, d) in searched.items()}
        fixed = {"res": self.t_res, "mlp": self.t_mlp, "att": self.t_att}
        if self.rule == "quantile":
            values = {"res": _quantile(scores["res"], self.q_res), "mlp": _quantile(scores["mlp"], self.q_mod),
                      "att": _quantile(scores["att"], self.q_mod)}
            rule = f"quantile q_res {self.q_res:g}, q_mod {self.q_mod:g}"
        elif self.rule == "chance":
            values = {place: chance.get(place, fixed[place]) for place in PLACES}
            rule = self.chance_name
        elif self.rule == "auto":
            values = {place: max(fixed[place], chance.get(place, -1.0)) for place in PLACES}
            raised = [place for place in PLACES if values[place] > fixed[place]]
            rule = f"auto: {self.chance_name} for {', '.join(raised)}" if raised else "auto: fixed"
        else:
            values, rule = dict(fixed), "fixed"
        pinned = dict(dict(self.per_layer).get(layer, ()))
        if pinned:
            rule += f"; pinned {', '.join(sorted(pinned))} at layer {layer}"
        values.update({key[2:]: value for key, value in pinned.items()})
        return LayerThresholds(values["res"], values["mlp"], values["att"], rule,
                               tuple(sorted(chance.items())))


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


def edge_status(cosine: float, kind: str, levels: Mapping[str, Any]) -> str:
    """Where an edge into a residual feature stands against its layer's build.

    threshold: cosine at or above the cut-off the build set for the target's layer and the
    edge's place (residual -> res, mlp -> mlp, attention -> att); above-chance: below that
    but above chance; chance: at chance level or below; unknown: no chance level stored.
    levels: the properties of the target layer's residual SAE node (t_res, chance_res, ...)."""
    place = BY_KIND[kind].name
    threshold, chance = levels.get(f"t_{place}"), levels.get(f"chance_{place}")
    if threshold is not None and cosine >= threshold:
        return "threshold"
    if chance is None:
        return "unknown"
    return "above-chance" if cosine > chance else "chance"
