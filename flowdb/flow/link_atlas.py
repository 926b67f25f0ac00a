"""`flowdb link A B`: feature families across two SAE sets that read the same space
(two widths of one release, a base and an instruct model's SAEs, two trainings).

At every layer and module both packs have, where their SAEs read the same hook with
the same d_in (anything else is refused), the normalised decoder rows are searched
both ways, exactly, by the same matcher as flow edges (flowdb.flow.matching):
  A -> B   each feature of A: its top-k features of B (default k 5)
  B -> A   each feature of B: its top-1 feature of A
Calibrated against chance as flow edges are: "chance" is the q_chance quantile
(p99.9) of the largest cosine between a unit vector and N random unit vectors in d
dimensions, N the width searched and d the SAEs' d_in. The threshold t of each
direction follows `rule`: auto (default) the larger of the fixed cut-off (0.5) and
chance, fixed, or chance alone.

Categories, per feature (the rule is printed with every result):
  A   split    two or more matches in B at or above t (its children), each closer
               to the parent than to any other child, and their normalised sum closer
               to the parent than the best child alone (so they are parts of it, not
               one copy with near neighbours)
      kept     otherwise, a match at or above t
      shifted  its top-1 is above chance but below t (moved, not gone)
      gone     its top-1 is at or below chance
  B   merged   two or more features of A have it among their matches at or above t,
               parts of it by the same rule (the mirror of split)
      kept     otherwise, its top-1 in A at or above t, or one feature of A has it
      shifted  its top-1 above chance but below t
      new      its top-1 at or below chance
"shifted" is the band between chance and t that the issue's three categories per
side leave unnamed: a rotated feature is neither the same nor absent.

Stored as a link atlas: Parquet under FLOWDB_HOME/links/NAME-FINGERPRINT/, resumable (a
place is done once places/L-MODULE.json is there). flowdb.store.links writes it to Neo4j.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flowdb._version import __version__
from flowdb.files import regular_file
from flowdb.flow.link_spec import LinkError, LinkSpec
from flowdb.flow.matching import Matcher, normalise
from flowdb.packs.manifest import MAX_PACK_NAME, PACK_NAME, PACK_NAME_RULE
from flowdb.packs.plan import BuildPlan, PlannedSae
from flowdb.settings import home_dir
from flowdb.writes import atomic_write, writer_lock

FORMAT = 1
A_CATEGORIES = ("kept", "split", "shifted", "gone")
B_CATEGORIES = ("kept", "merged", "shifted", "new")
CATEGORY_RULE = ("A: split = >=2 matches >= t, each closer to the parent than to its siblings, their normalised sum "
                 "closer than the best one; kept = a match >= t; "
                 "shifted = top-1 above chance, below t; gone = top-1 at or below chance. "
                 "B: merged = >=2 features of A match it >= t, parts of it by the same rule; "
                 "kept = top-1 >= t or one parent; shifted; new = top-1 at or below chance")


def link_name(a: str, b: str) -> str:
    """The default name of the link set of A and B (cut to a name's length)."""
    return f"{a}--{b}"[:MAX_PACK_NAME]


def check_link_name(name: str) -> str:
    """A link set's name goes into file names, as a pack's does: the same rule."""
    if len(name) > MAX_PACK_NAME or not PACK_NAME.match(name):
        raise LinkError(f"link name {name!r}: {PACK_NAME_RULE}")
    return name


# --- which places the two packs share --------------------------------------------------

def common_places(a: BuildPlan, b: BuildPlan, modules: tuple[str, ...]) -> list[tuple[int, str]]:
    """The (layer, module) slots both plans have SAEs at, among `modules`; refused in one line
    when a shared slot's SAEs read another hook or d_in, or when no slot is shared."""
    places = []
    for layer in sorted(set(a.layers) & set(b.layers)):
        for module in modules:
            sa, sb = a.sae(layer, module), b.sae(layer, module)
            if sa is None or sb is None:
                continue
            space_a, space_b = _space(sa), _space(sb)
            if space_a != space_b:
                raise LinkError(f"packs {a.name!r} and {b.name!r} read different spaces at layer {layer} {module}: "
                                f"{_describe(space_a)} against {_describe(space_b)}; only SAEs of one hook "
                                "and d_in can be linked (choose --modules or other packs)")
            places.append((layer, module))
    if not places:
        raise LinkError(f"packs {a.name!r} (layers {a.first_layer}-{a.last_layer}, {', '.join(a.modules)}) and "
                        f"{b.name!r} (layers {b.first_layer}-{b.last_layer}, {', '.join(b.modules)}) have no "
                        f"layer and module in common among {', '.join(modules)}")
    return places


def _space(planned: PlannedSae) -> tuple:
    info = planned.info
    return (info.hook_name, info.d_in, "projected through W_O" if planned.ref.project_model else "")


def _describe(space: tuple) -> str:
    hook, d_in, projected = space
    return f"hook {hook or '(unnamed)'}, d_in {d_in}" + (f", {projected}" if projected else "")


# --- one place ------------------------------------------------------------------------

@dataclass
class PlaceLink:
    """One layer and module linked both ways, with thresholds and categories."""

    layer: int
    module: str
    ab_scores: np.ndarray  # [n_a, k] cosines, best first
    ab_indices: np.ndarray  # [n_a, k] rows of B
    ba_scores: np.ndarray  # [n_b] top-1 cosine in A
    ba_indices: np.ndarray  # [n_b] row of A
    d_in: int
    t_ab: float
    t_ba: float
    chance_ab: float
    chance_ba: float
    rule: str  # what set the thresholds, e.g. "auto: fixed"
    a_categories: np.ndarray = field(default=None)
    b_categories: np.ndarray = field(default=None)
    matcher: str = ""
    search_seconds: float = 0.0

    @property
    def n_a(self) -> int:
        return len(self.ab_scores)

    @property
    def n_b(self) -> int:
        return len(self.ba_scores)

    @property
    def key(self) -> str:
        return f"{self.layer}-{self.module}"

    def search_flops(self) -> float:
        return search_flops(self.n_a, self.n_b, self.d_in)

    def shares(self) -> dict[str, float]:
        """Share of each category per side, keyed a_<category> and b_<category>."""
        return {**{f"a_{c}": float(np.mean(self.a_categories == c)) for c in A_CATEGORIES},
                **{f"b_{c}": float(np.mean(self.b_categories == c)) for c in B_CATEGORIES}}

    def directions(self) -> dict[str, dict[str, np.ndarray]]:
        """Its matches by the side they start from: "a" (A's top-k in B) and "b" (B's top-1
        in A), each as columns index (on that side), rank, other (the index matched on the
        other side), cosine, above (at or above that direction's threshold) and category
        (of the feature at index): the atlas's rows and the ALIGNS relationships."""
        n_a, k = self.ab_indices.shape
        return {"a": {"index": np.repeat(np.arange(n_a), k), "rank": np.tile(np.arange(1, k + 1), n_a),
                      "other": self.ab_indices.reshape(-1), "cosine": self.ab_scores.reshape(-1),
                      "above": (self.ab_scores >= self.t_ab).reshape(-1),
                      "category": np.repeat(self.a_categories, k)},
                "b": {"index": np.arange(self.n_b), "rank": np.ones(self.n_b, dtype=np.int64),
                      "other": self.ba_indices, "cosine": self.ba_scores, "above": self.ba_scores >= self.t_ba,
                      "category": self.b_categories}}

    def record(self) -> dict:
        return {"layer": self.layer, "module": self.module, "n_a": self.n_a, "n_b": self.n_b,
                "d_in": self.d_in, "k": int(self.ab_scores.shape[1]), "t_ab": self.t_ab, "t_ba": self.t_ba,
                "chance_ab": self.chance_ab, "chance_ba": self.chance_ba, "threshold_rule": self.rule,
                "matcher": self.matcher, "search_seconds": self.search_seconds, **self.shares()}


def link_place(a_rows, b_rows, layer: int, module: str, spec: LinkSpec, matcher: Matcher) -> PlaceLink:
    """Search both ways and categorise. a_rows and b_rows: decoder rows [n, d] (any norms;
    numpy arrays or lazily read rows, as flowdb.packs.sources gives them)."""
    n_a, d = a_rows.shape
    n_b = b_rows.shape[0]
    k = min(spec.k, n_b)
    started = time.perf_counter()
    ab_scores, ab_indices = matcher.search(a_rows, b_rows, k)
    ba_scores, ba_indices = matcher.search(b_rows, a_rows, 1)
    seconds = time.perf_counter() - started
    t_ab, chance_ab, rule_ab = spec.threshold(n_b, d)
    t_ba, chance_ba, rule_ba = spec.threshold(n_a, d)
    rule = rule_ab if rule_ab == rule_ba else f"A->B {rule_ab}; B->A {rule_ba}"
    place = PlaceLink(layer, module, ab_scores, ab_indices.astype(np.int64), ba_scores[:, 0],
                      ba_indices[:, 0].astype(np.int64), d, t_ab, t_ba, chance_ab, chance_ba, rule,
                      matcher=matcher.backend, search_seconds=seconds)
    place.a_categories, place.b_categories = categorise(place, lambda rows: unit_rows(a_rows, rows),
                                                        lambda rows: unit_rows(b_rows, rows))
    return place


def unit_rows(w, rows: np.ndarray) -> np.ndarray:
    """Normalised rows of w at these indices; lazily read decoders are read a row at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return np.zeros((0, w.shape[1]), np.float32)
    if isinstance(w, np.ndarray):
        return normalise(w[rows])
    return normalise(np.stack([np.asarray(w[int(i):int(i) + 1])[0] for i in rows]))


def categorise(place: PlaceLink, a_unit: Callable, b_unit: Callable) -> tuple[np.ndarray, np.ndarray]:
    """Categories of A's and B's features (module docstring). a_unit / b_unit give the
    normalised decoder rows of A / B at given indices, for the sibling rule."""
    above = place.ab_scores >= place.t_ab  # [n_a, k]
    n_children = above.sum(axis=1)
    a_cat = np.where(place.ab_scores[:, 0] > place.chance_ab, "shifted", "gone").astype(object)
    a_cat[n_children >= 1] = "kept"
    for a in np.flatnonzero(n_children >= 2):
        children = place.ab_indices[a, above[a]]
        if _parts(a_unit([a])[0], b_unit(children)):
            a_cat[a] = "split"

    parents: dict[int, list[int]] = {}
    for a, r in zip(*np.nonzero(above)):
        parents.setdefault(int(place.ab_indices[a, r]), []).append(int(a))
    b_cat = np.where(place.ba_scores > place.chance_ba, "shifted", "new").astype(object)
    b_cat[place.ba_scores >= place.t_ba] = "kept"
    for b, found in parents.items():
        b_cat[b] = "kept"
        if len(found) >= 2:
            if _parts(b_unit([b])[0], a_unit(found)):
                b_cat[b] = "merged"
    return a_cat, b_cat


def _parts(whole: np.ndarray, parts: np.ndarray) -> bool:
    """Whether unit vectors `parts` are parts of the unit vector `whole`: each closer to the
    whole than to any other part, and their normalised sum closer to the whole than the
    best part alone (else the whole is one part with near neighbours, not split)."""
    to_whole = parts @ whole
    between = parts @ parts.T
    np.fill_diagonal(between, -np.inf)
    together = parts.sum(axis=0)
    together_cos = float(together @ whole) / max(float(np.linalg.norm(together)), 1e-30)
    return bool(np.all(to_whole > between.max(axis=1)) and together_cos > to_whole.max())


# --- the link atlas -------------------------------------------------------------------

def link_fingerprint(a_fingerprint: str, b_fingerprint: str, spec: LinkSpec) -> str:
    spec_json = {"format": FORMAT, "a": a_fingerprint, "b": b_fingerprint, "spec": spec.to_json()}
    return hashlib.sha256(json.dumps(spec_json, sort_keys=True).encode()).hexdigest()[:20]


class LinkAtlas:
    """A link set on disk:
        DIR/link.json                       name, both packs and builds, spec, fingerprint
        DIR/matches/layer=L/module=M/part.parquet   side (a|b), index, rank, other, cosine,
                                            above, category (of the feature on `side`)
        DIR/places/L-M.json                 written last: the place is complete
    pandas.read_parquet("DIR/matches") reads every place with layer and module columns."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    @property
    def info(self) -> dict:
        try:
            info = json.loads(regular_file(self.root / "link.json", "link atlas").read_text())
        except (OSError, ValueError) as exc:
            raise LinkError(f"{self.root / 'link.json'} is unreadable ({exc}); link again into a new --out") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise LinkError(f"{self.root} is not a link atlas this flowdb reads (format {FORMAT}); link again")
        return info

    def places_done(self) -> list[str]:
        folder = self.root / "places"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def place_record(self, key: str) -> dict:
        try:
            return json.loads(regular_file(self.root / "places" / f"{key}.json", "link atlas").read_text())
        except (OSError, ValueError) as exc:
            raise LinkError(f"link atlas {self.root}: places/{key}.json is unreadable ({exc}); "
                            "delete it and link again") from None

    def records(self) -> list[dict]:
        return [self.place_record(key) for key in self.places_done()]

    def matchers(self) -> str:
        """The backends that searched its places, e.g. "faiss-cpu"."""
        return ",".join(sorted({record["matcher"] for record in self.records()}))

    def claim(self, info: dict) -> None:
        """Start the atlas of this link, or check the one there is of the same link."""
        if (self.root / "link.json").exists():
            found = self.info
            if found["fingerprint"] != info["fingerprint"]:
                raise LinkError(f"{self.root} holds another link ({found['fingerprint']}; this one is "
                                f"{info['fingerprint']}); choose another directory or delete it")
            return
        with atomic_write(self.root / "link.json", private=True) as partial:
            partial.write_text(json.dumps(info, indent=1))

    def _part(self, layer: int, module: str) -> Path:
        return self.root / "matches" / f"layer={layer}" / f"module={module}" / "part.parquet"

    def write_place(self, place: PlaceLink) -> None:
        with atomic_write(self._part(place.layer, place.module), private=True) as partial:
            matches_frame(place).to_parquet(partial, index=False)
        with atomic_write(self.root / "places" / f"{place.key}.json", private=True) as partial:
            partial.write_text(json.dumps(place.record(), indent=1))

    def read_place(self, key: str) -> PlaceLink:
        record = self.place_record(key)
        layer, module = record["layer"], record["module"]
        try:
            frame = pd.read_parquet(regular_file(self._part(layer, module), "link atlas"))
        except (OSError, ValueError) as exc:
            raise LinkError(f"link atlas {self.root}: layer {layer} {module} is unreadable ({exc}); "
                            "delete the atlas and link again") from None
        a = frame[frame["side"] == "a"].sort_values(["index", "rank"])
        b = frame[frame["side"] == "b"].sort_values("index")
        n_a, n_b, k = record["n_a"], record["n_b"], record["k"]
        if len(a) != n_a * k or len(b) != n_b:
            raise LinkError(f"link atlas {self.root}: layer {layer} {module} holds {len(a)} + {len(b)} matches, "
                            f"its record says {n_a * k} + {n_b}; delete the atlas and link again")
        place = PlaceLink(layer, module, a["cosine"].to_numpy(np.float32).reshape(n_a, k),
                          a["other"].to_numpy(np.int64).reshape(n_a, k), b["cosine"].to_numpy(np.float32),
                          b["other"].to_numpy(np.int64), record["d_in"], record["t_ab"], record["t_ba"],
                          record["chance_ab"], record["chance_ba"], record["threshold_rule"],
                          matcher=record["matcher"], search_seconds=record["search_seconds"])
        place.a_categories = a["category"].to_numpy(object)[::k]
        place.b_categories = b["category"].to_numpy(object)
        return place

    def places(self) -> Iterator[PlaceLink]:
        for key in self.places_done():
            yield self.read_place(key)


def matches_frame(place: PlaceLink) -> pd.DataFrame:
    frame = pd.concat([pd.DataFrame({"side": side, **columns}) for side, columns in place.directions().items()],
                      ignore_index=True)
    return frame.astype({"index": np.int32, "rank": np.int16, "other": np.int32, "cosine": np.float32})


# --- linking two plans ------------------------------------------------------------------

@dataclass(frozen=True)
class LinkPlan:
    name: str
    a: BuildPlan
    b: BuildPlan
    spec: LinkSpec

    @property
    def fingerprint(self) -> str:
        return link_fingerprint(self.a.fingerprint(), self.b.fingerprint(), self.spec)

    def places(self) -> list[tuple[int, str]]:
        return common_places(self.a, self.b, self.spec.modules)

    def info(self) -> dict:
        return {"format": FORMAT, "name": self.name, "a": self.a.name, "b": self.b.name,
                "a_fingerprint": self.a.fingerprint(), "b_fingerprint": self.b.fingerprint(),
                "a_model": self.a.model, "b_model": self.b.model, "spec": self.spec.to_json(),
                "fingerprint": self.fingerprint, "flowdb_version": __version__}


def link_set_properties(info: dict, matcher: str) -> dict:
    """The LinkSet node of a link atlas's info (link.json, LinkPlan.info): its fields and the
    spec's, the matcher and the flowdb that writes the node."""
    return ({key: value for key, value in info.items() if key not in ("spec", "format")} | info["spec"]
            | {"matcher": matcher, "flowdb_version": __version__})


def default_link_dir(plan: LinkPlan) -> Path:
    return home_dir("links") / f"{plan.name}-{plan.fingerprint}"


def link_atlas(plan: LinkPlan, out: str | Path | None = None, matcher: Matcher | None = None,
               progress: Callable[[str], None] | None = None) -> LinkAtlas:
    """Write (or finish) the link atlas of a plan; places already there are kept."""
    from flowdb.flow.build import load_rows

    places = plan.places()
    atlas = LinkAtlas(out or default_link_dir(plan))
    matcher = matcher or Matcher()
    with writer_lock(atlas.root):
        atlas.claim(plan.info())
        done = set(atlas.places_done())
        for layer, module in places:
            if f"{layer}-{module}" not in done:
                _, a_rows = load_rows(plan.a.sae(layer, module), None)
                _, b_rows = load_rows(plan.b.sae(layer, module), None)
                atlas.write_place(link_place(a_rows, b_rows, layer, module, plan.spec, matcher))
            if progress:
                progress(f"{layer}-{module}")
    return atlas


def search_flops(n_a: int, n_b: int, d: int) -> float:
    """A link's search arithmetic: 2 n_a n_b d in each direction."""
    return 2 * 2.0 * n_a * n_b * d


def link_rate(records: list[dict]) -> float | None:
    """GFLOP/s of the link searches that recorded their time."""
    seconds = sum(r["search_seconds"] for r in records)
    flops = sum(search_flops(r["n_a"], r["n_b"], r["d_in"]) for r in records if r["search_seconds"] > 0)
    return flops / seconds / 1e9 if seconds else None


def shares_table(records: list[dict]) -> pd.DataFrame:
    """Per layer and module: widths, thresholds with their rule, and each category's share."""
    columns = ["layer", "module", "n_a", "n_b", "t_ab", "chance_ab", "t_ba", "chance_ba",
               *(f"a_{c}" for c in A_CATEGORIES), *(f"b_{c}" for c in B_CATEGORIES), "threshold_rule"]
    return pd.DataFrame(records, columns=columns).sort_values(["layer", "module"], ignore_index=True)
