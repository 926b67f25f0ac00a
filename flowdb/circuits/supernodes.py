"""Supernode suggestions: a stored attribution graph's feature nodes grouped for the reader.

A unit is one feature of the graph (its layer and feature id) with every position it is
active at. Rules propose pairs of units, each compared with what chance gives:

    same-feature   one feature at several positions: its nodes always form one unit
    lineage        tied features ((:GraphNode)-[:IS]->(:Feature)) on one translated chain of
                   the pack: the same chain origin, walking back rank-1 residual edges while
                   the feature is 'translated' (and to the MLP or attention feature a newborn
                   origin was born from). The categories come from the build's chance thresholds.
    family         tied features that both match one feature of another pack above its link's
                   chance threshold (ALIGNS {above: true} in one link set, e.g. split children)
    co-activation  two features found together in more of the other stored graphs of the same
                   model than chance predicts: hypergeometric tail p, accepted at a false
                   discovery rate alpha over the graph's feature pairs (Benjamini-Hochberg)
    label          TF-IDF cosine of the units' labels (clerp, else the tied feature's label)
                   at least label_similarity and above the label_quantile of the similarities
                   of random label pairs in the same graph

Accepted pairs are joined into connected components, strongest rule first (the order
above, then the pair's strength), and a join is refused when the group would span more
than max_layer_span layers or hold more than max_share of the graph's features (at least
two). A supernode is a group of two or more nodes; its name comes from its members' labels
(the informative words most of them share) followed by the rules that grouped it.

qParams.supernodes in circuit-tracer's frontend (and Neuronpedia's) is a list of
[name, node_id, node_id, ...]; the subgraph draws only pinned nodes, so an export pins the
members too.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from flowdb.circuits.store import export_graph, require_graph, write_document

if TYPE_CHECKING:
    from pathlib import Path

    from flowdb.store.database import Database

RULES = ("same-feature", "lineage", "family", "co-activation", "label")
WORD = re.compile(r"[a-z][a-z0-9']*")
# Words that say how a label is phrased, not what the feature is about.
STOPWORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or that the this to with "
    "about after before like such than then there these those via when where which while "
    "word words token tokens text mention mentions mentioning reference references referring "
    "related feature features concept concepts context contexts phrase phrases output input "
    "say says said p".split())
MAX_NAME = 48


@dataclass(frozen=True)
class SupernodeSpec:
    """The chance levels and bounds of the rules (see the module's docstring)."""

    alpha: float = 0.05  # co-activation's false discovery rate over the feature pairs tested
    min_shared_graphs: int = 2  # co-activation needs at least this many other graphs holding both
    label_similarity: float = 0.5
    label_quantile: float = 0.99
    null_pairs: int = 20_000  # random label pairs sampled when the graph has more pairs than this
    max_layer_span: int = 8
    max_share: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class Supernode:
    name: str
    rules: tuple[str, ...]  # in RULES order
    node_ids: tuple[str, ...]  # in the graph's node order
    layers: tuple[int, int]  # lowest and highest

    def as_qparam(self) -> list[str]:
        """[name, node_id, ...]: one entry of circuit-tracer's qParams.supernodes."""
        return [self.name, *self.node_ids]


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    tested: int  # unit pairs the rule scored
    accepted: int  # pairs it accepted
    chance: str  # what it was compared with; or why it was not used


@dataclass(frozen=True)
class Suggestions:
    slug: str
    supernodes: tuple[Supernode, ...]
    outcomes: tuple[RuleOutcome, ...]
    refused: int  # joins refused by the bounds

    def __iter__(self):
        return iter(self.supernodes)

    def __len__(self) -> int:
        return len(self.supernodes)

    def count(self, rule: str) -> int:
        return sum(rule in supernode.rules for supernode in self.supernodes)

    def summary_lines(self, spec: SupernodeSpec | None = None) -> list[str]:
        """One line per rule: how many supernodes it grouped, and against what chance."""
        spec = spec or SupernodeSpec()
        lines = []
        for outcome in self.outcomes:
            n = self.count(outcome.rule)
            lines.append(f"{outcome.rule}: {n} supernode{'s' * (n != 1)} ({outcome.accepted} of "
                         f"{outcome.tested} feature pairs accepted; {outcome.chance})")
        if self.refused:
            lines.append(f"bounds: {self.refused} joins refused (a supernode spans at most "
                         f"{spec.max_layer_span} layers and holds at most {spec.max_share:.0%} of the "
                         "graph's features)")
        return lines


@dataclass
class _Unit:
    layer: str
    feature: object
    node_ids: list[str] = field(default_factory=list)
    label: str = ""
    key: str | None = None  # the tied pack feature
    # circuit-tracer's influence is a cumulative share: the smaller, the more influential
    influence: float = math.inf

    @property
    def layer_number(self) -> int:
        try:
            return int(self.layer)
        except ValueError:
            return 0


@dataclass(frozen=True)
class _Pair:
    a: int
    b: int
    rule: str
    strength: float


def suggest_supernodes(db: Database, slug: str, spec: SupernodeSpec | None = None) -> Suggestions:
    """Group the feature nodes of the stored graph `slug` into supernodes (see the module)."""
    spec = spec or SupernodeSpec()
    graph = require_graph(db, slug)
    units = _units(db, slug)
    pairs: list[_Pair] = []
    outcomes = [RuleOutcome("same-feature", 0, 0, "one feature at several positions; no score")]
    for finder in (_lineage, _family, _co_activation, _label):
        found, outcome = finder(db, graph, units, spec)
        pairs.extend(found)
        outcomes.append(outcome)
    groups, refused = _join(units, pairs, spec)
    return Suggestions(slug, tuple(_named(units, groups)), tuple(outcomes), refused)


def _units(db: Database, slug: str) -> list[_Unit]:
    units: dict[tuple, _Unit] = {}
    for row in db.read(
            "MATCH (n:GraphNode {graph: $slug, kind: 'feature'}) OPTIONAL MATCH (n)-[:IS]->(f:Feature) "
            "RETURN n.node_id AS id, n.layer AS layer, n.feature AS feature, n.clerp AS clerp, "
            "n.influence AS influence, f.key AS key, f.label AS label ORDER BY n.ord", slug=slug):
        feature = row["feature"] if row["feature"] is not None else row["id"]
        unit = units.setdefault((row["layer"], feature), _Unit(row["layer"], feature))
        unit.node_ids.append(row["id"])
        unit.label = unit.label or (row["clerp"] or "").strip() or (row["label"] or "").strip()
        unit.key = unit.key or row["key"]
        if row["influence"] is not None:
            unit.influence = min(unit.influence, row["influence"])
    return list(units.values())


def _tied(units: list[_Unit]) -> dict[str, list[int]]:
    tied: dict[str, list[int]] = {}
    for i, unit in enumerate(units):
        if unit.key:
            tied.setdefault(unit.key, []).append(i)
    return tied


def _tied_pairs(tied: dict[str, list[int]]) -> int:
    return math.comb(sum(map(len, tied.values())), 2)


def _not_tied(rule: str, graph: dict) -> tuple[list[_Pair], RuleOutcome]:
    return [], RuleOutcome(rule, 0, 0, f"not used: graph {graph['slug']!r} is tied to no pack "
                                       "(flowdb circuits import --pack)")


def _pairs_within(groups: dict, tied: dict[str, list[int]], rule: str) -> list[_Pair]:
    """Every pair of units whose tied features fall in one group (group -> feature keys)."""
    pairs = []
    for keys in groups.values():
        members = sorted({i for key in keys for i in tied.get(key, [])})
        pairs.extend(_Pair(a, b, rule, 1.0) for n, a in enumerate(members) for b in members[n + 1:])
    return pairs


# The origin of a tied feature's translated chain: back along rank-1 residual edges while the
# feature is 'translated', then to the module feature a newborn origin was born from.
CHAIN_ORIGINS = """
UNWIND $keys AS key
MATCH (f:Feature {{key: key}})
CALL (f) {{
  MATCH p = (s:Feature)-[rs:RESIDUAL*0..{span}]->(f)
  WHERE all(r IN rs WHERE r.rank = 1) AND all(n IN tail(nodes(p)) WHERE n.category = 'translated')
  RETURN s ORDER BY length(p) DESC LIMIT 1
}}
RETURN key, coalesce(
  COLLECT {{ MATCH (m:Feature)-[e:MLP|ATTENTION {{rank: 1}}]->(s) WHERE s.category = 'newborn' AND e.above
            RETURN m.key ORDER BY e.cosine DESC LIMIT 1 }}[0], s.key) AS origin
"""


def _lineage(db: Database, graph: dict, units: list[_Unit], spec: SupernodeSpec):
    tied = _tied(units)
    if not graph.get("pack"):
        return _not_tied("lineage", graph)
    origins: dict[str, list[str]] = {}
    for row in db.read(CHAIN_ORIGINS.format(span=int(spec.max_layer_span)), keys=sorted(tied)):
        origins.setdefault(row["origin"], []).append(row["key"])
    pairs = _pairs_within(origins, tied, "lineage")
    return pairs, RuleOutcome("lineage", _tied_pairs(tied), len(pairs),
                              f"one translated chain in pack {graph['pack']!r}, its categories set by "
                              "the build's chance thresholds")


def _family(db: Database, graph: dict, units: list[_Unit], spec: SupernodeSpec):
    tied = _tied(units)
    if not graph.get("pack"):
        return _not_tied("family", graph)
    relatives: dict[str, list[str]] = {}
    for row in db.read(
            "UNWIND $keys AS key MATCH (f:Feature {key: key})-[a:ALIGNS]->(g:Feature)<-[b:ALIGNS]-(h:Feature) "
            "WHERE a.link = b.link AND a.above AND b.above AND h.key IN $keys AND f.key < h.key "
            "RETURN DISTINCT a.link + ' ' + g.key AS relative, f.key AS a, h.key AS b", keys=sorted(tied)):
        relatives.setdefault(row["relative"], []).extend((row["a"], row["b"]))
    pairs = _pairs_within(relatives, tied, "family")
    links = db.read("MATCH (l:LinkSet) WHERE $pack IN [l.a, l.b] RETURN count(l) AS n", pack=graph["pack"])[0]["n"]
    note = (f"one relative in a linked pack, both matched above the link's chance threshold "
            f"({links} link set{'s' * (links != 1)} of pack {graph['pack']!r})")
    return pairs, RuleOutcome("family", _tied_pairs(tied), len(pairs), note)


def _co_activation(db: Database, graph: dict, units: list[_Unit], spec: SupernodeSpec):
    from scipy.sparse import csr_matrix
    from scipy.stats import hypergeom

    rows = db.read(
        "MATCH (o:AttributionGraph) WHERE o.scan = $scan AND o.slug <> $slug WITH collect(o.slug) AS others "
        "UNWIND range(0, size($units) - 1) AS i "
        "MATCH (n:GraphNode {kind: 'feature', layer: $units[i].layer, feature: $units[i].feature}) "
        "WHERE n.graph IN others RETURN i, collect(DISTINCT n.graph) AS graphs",
        scan=graph["scan"], slug=graph["slug"],
        units=[{"layer": u.layer, "feature": u.feature} for u in units])
    n_graphs = db.read("MATCH (o:AttributionGraph) WHERE o.scan = $scan AND o.slug <> $slug RETURN count(o) AS n",
                       scan=graph["scan"], slug=graph["slug"])[0]["n"]
    tested = math.comb(len(units), 2)
    chance = (f"hypergeometric p over the {n_graphs} other graphs of scan {graph['scan']!r}, false discovery "
              f"rate {spec.alpha:g} over {tested} pairs (Benjamini-Hochberg), at least {spec.min_shared_graphs} "
              "shared")
    if not rows or n_graphs == 0:
        return [], RuleOutcome("co-activation", tested, 0, chance)
    index = {slug: j for j, slug in enumerate(sorted({g for row in rows for g in row["graphs"]}))}
    entries = [(row["i"], index[g]) for row in rows for g in row["graphs"]]
    found = csr_matrix((np.ones(len(entries)), ([i for i, _ in entries], [j for _, j in entries])),
                       shape=(len(units), len(index)))
    shared = (found @ found.T).tocoo()
    counts = np.asarray(found.sum(axis=1)).ravel()
    scored = sorted((hypergeom.sf(k - 1, n_graphs, counts[a], counts[b]), int(a), int(b))  # P(X >= k)
                    for a, b, k in zip(shared.row, shared.col, shared.data) if a < b and k >= spec.min_shared_graphs)
    # Benjamini-Hochberg: the pairs up to the last rank r whose p <= r / tested * alpha; pairs
    # shared in fewer graphs count among those tested, with p = 1.
    cut = max((r for r, (p, _, _) in enumerate(scored, start=1) if p <= r / tested * spec.alpha), default=0)
    pairs = [_Pair(a, b, "co-activation", -math.log10(max(p, 1e-300))) for p, a, b in scored[:cut]]
    return pairs, RuleOutcome("co-activation", tested, len(pairs), chance)


def words(label: str) -> list[str]:
    """The informative words of a label, lower-cased, in order."""
    return [w for w in WORD.findall(label.lower()) if w not in STOPWORDS and len(w) > 1]


def _idf(labels: list[list[str]]) -> dict[str, float]:
    frequency = Counter(w for label in labels for w in set(label))
    return {w: math.log((1 + len(labels)) / (1 + df)) + 1 for w, df in frequency.items()}


def _label(db: Database, graph: dict, units: list[_Unit], spec: SupernodeSpec):
    labelled = [i for i, unit in enumerate(units) if words(unit.label)]
    tested = math.comb(len(labelled), 2)
    if tested == 0:
        return [], RuleOutcome("label", 0, 0, "fewer than two labelled features")
    texts = [words(units[i].label) for i in labelled]
    idf = _idf(texts)
    vocabulary = {w: j for j, w in enumerate(sorted(idf))}
    vectors = np.zeros((len(texts), len(vocabulary)))
    for row, text in enumerate(texts):
        for w, tf in Counter(text).items():
            vectors[row, vocabulary[w]] = tf * idf[w]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors.T
    upper = np.triu_indices(len(texts), k=1)
    if tested > spec.null_pairs:  # a sample of random pairs, drawn the same way each time
        pick = np.random.default_rng(spec.seed).choice(tested, size=spec.null_pairs, replace=False)
        null = similarity[upper[0][pick], upper[1][pick]]
    else:
        null = similarity[upper]
    pairs = [_Pair(labelled[a], labelled[b], "label", float(similarity[a, b])) for a, b in zip(*upper)
             if similarity[a, b] >= spec.label_similarity and _rare(null, similarity[a, b], spec)]
    chance = (f"TF-IDF cosine >= {spec.label_similarity:g}, reached by at most {1 - spec.label_quantile:.0%} "
              f"of {len(null)} random label pairs of this graph")
    return pairs, RuleOutcome("label", tested, len(pairs), chance)


def _rare(null: np.ndarray, value: float, spec: SupernodeSpec) -> bool:
    """At most 1 - label_quantile of the random pairs are this similar (the pair among them)."""
    return (1 + np.count_nonzero(null >= value)) / (1 + len(null)) <= 1 - spec.label_quantile + 1e-12


def _join(units: list[_Unit], pairs: list[_Pair], spec: SupernodeSpec) -> tuple[list[tuple[list[int], set]], int]:
    """Connected components of the accepted pairs, strongest rule first, within the bounds."""
    parent = list(range(len(units)))
    members = {i: [i] for i in range(len(units))}
    rules: dict[int, set] = {i: {"same-feature"} if len(u.node_ids) > 1 else set() for i, u in enumerate(units)}
    cap = max(2, int(spec.max_share * len(units)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    refused = 0
    for pair in sorted(pairs, key=lambda p: (RULES.index(p.rule), -p.strength, p.a, p.b)):
        a, b = root(pair.a), root(pair.b)
        if a == b:
            rules[a].add(pair.rule)  # a second rule that supports the group
            continue
        joined = members[a] + members[b]
        layers = [units[i].layer_number for i in joined]
        if len(joined) > cap or max(layers) - min(layers) > spec.max_layer_span:
            refused += 1
            continue
        parent[b] = a
        members[a] = joined
        rules[a] |= rules.pop(b) | {pair.rule}
        del members[b]
    groups = [(sorted(m), rules[r]) for r, m in members.items()
              if sum(len(units[i].node_ids) for i in m) > 1]
    return groups, refused


def _named(units: list[_Unit], groups: list[tuple[list[int], set]]) -> list[Supernode]:
    idf = _idf([words(unit.label) for unit in units])
    order = {node_id: n for n, node_id in enumerate(node_id for unit in units for node_id in unit.node_ids)}
    supernodes, taken = [], Counter()
    for group, rules in sorted(groups, key=lambda g: g[0][0]):  # units come in graph order
        base = _name(units, group, idf)
        ruled = [rule for rule in RULES if rule in rules]
        name = f"{base} ({'+'.join(ruled)})"
        taken[name] += 1
        if taken[name] > 1:
            name = f"{name} #{taken[name]}"  # the frontend keys a supernode by its name
        node_ids = sorted((node_id for i in group for node_id in units[i].node_ids), key=order.__getitem__)
        layers = [units[i].layer_number for i in group]
        supernodes.append(Supernode(name, tuple(ruled), tuple(node_ids), (min(layers), max(layers))))
    return supernodes


def _name(units: list[_Unit], group: list[int], idf: dict[str, float]) -> str:
    """The words most members' labels share (up to three), else the most influential member's
    label, else where the group is."""
    counts = Counter(w for i in group for w in set(words(units[i].label)))
    if counts and max(counts.values()) >= 2:
        top = max(counts.values())
        shared = sorted((w for w, n in counts.items() if n == top), key=lambda w: (-idf.get(w, 0), w))[:3]
        return " ".join(shared)
    lead = min(group, key=lambda i: (units[i].influence, i))
    label = " ".join(units[lead].label.split())
    if label:
        return label if len(label) <= MAX_NAME else label[:MAX_NAME - 3] + "..."
    layers = sorted({units[i].layer_number for i in group})
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
    return f"{where} {units[lead].node_ids[0]}"


def write_with_supernodes(db: Database, slug: str, out: str | Path,
                          spec: SupernodeSpec | None = None) -> tuple[dict, Suggestions]:
    """The graph exported as store.export_graph gives it, with the suggestions added to
    qParams.supernodes (after any the file had; a node already in one is left out of them)
    and their members added to pinnedIds (the frontend's subgraph draws pinned nodes only)."""
    document = export_graph(db, slug)
    suggestions = suggest_supernodes(db, slug, spec)
    qparams = document["qParams"]
    kept = list(qparams.get("supernodes", []))
    kept += [[supernode.name, *members] for supernode, members in beside(kept, suggestions)]
    pinned = list(qparams.get("pinnedIds", []))
    pinned += [node_id for entry in kept for node_id in entry[1:] if node_id not in set(pinned)]
    document["qParams"] = {**qparams, "supernodes": kept, "pinnedIds": list(dict.fromkeys(pinned))}
    write_document(document, out)
    return document, suggestions


def beside(stored: list[list[str]], suggestions: Suggestions) -> list[tuple[Supernode, list[str]]]:
    """Each suggestion with its members that no stored qParams.supernodes entry ([name,
    node_id, ...]) holds, where two or more remain: the stored groups are the reader's and win."""
    grouped = {node_id for entry in stored for node_id in entry[1:]}
    out = []
    for supernode in suggestions:
        members = [node_id for node_id in supernode.node_ids if node_id not in grouped]
        if len(members) > 1:
            out.append((supernode, members))
    return out
