"""What decides a link set's content besides its two builds (LinkSpec), light enough for the
command line to take its defaults from."""

from __future__ import annotations

from dataclasses import dataclass

from flowdb.errors import FlowdbError
from flowdb.modules import NAMES

LINK_RULES = ("auto", "fixed", "chance")


class LinkError(FlowdbError):
    """Two packs that cannot be linked, or a link set that cannot be read or written."""


@dataclass(frozen=True)
class LinkSpec:
    """What decides a link set's content besides the two builds."""

    k: int = 5
    t: float = 0.5
    rule: str = "auto"
    q_chance: float = 0.999
    modules: tuple[str, ...] = NAMES  # the modules to link where both packs have them

    def __post_init__(self):
        from flowdb.packs.manifest import MAX_K  # as a build's: no link stores more matches per feature

        if not 1 <= self.k <= MAX_K:
            raise LinkError(f"link k must be 1 to {MAX_K}, got {self.k}")
        if not -1.0 <= self.t <= 1.0:
            raise LinkError(f"link threshold must be a cosine in [-1, 1], got {self.t}")
        if self.rule not in LINK_RULES:
            raise LinkError(f"link rule must be one of {', '.join(LINK_RULES)}, got {self.rule!r}")
        if not 0.0 < self.q_chance < 1.0:
            raise LinkError(f"q_chance must be in (0, 1), got {self.q_chance}")
        unknown = [m for m in self.modules if m not in NAMES]
        if unknown or not self.modules:
            raise LinkError(f"link modules must be among {', '.join(NAMES)}, got {', '.join(self.modules) or 'none'}")

    def to_json(self) -> dict:
        return {"k": self.k, "t": self.t, "rule": self.rule, "q_chance": self.q_chance,
                "modules": list(self.modules)}

    def threshold(self, n_searched: int, d: int) -> tuple[float, float, str]:
        """(threshold, chance, what set the threshold) for a search of n_searched rows in d dimensions."""
        from flowdb.classify import chance_cosine

        chance = chance_cosine(self.q_chance, n_searched, d)
        chance_name = f"chance p{100 * self.q_chance:g}"
        if self.rule == "fixed":
            return self.t, chance, "fixed"
        if self.rule == "chance":
            return chance, chance, chance_name
        return (chance, chance, f"auto: {chance_name}") if chance > self.t else (self.t, chance, "auto: fixed")
