"""flowdb link: exact matches both ways, categories by their rule, and the link set in Neo4j."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowdb.flow.link_atlas import link_place
from flowdb.flow.link_spec import LinkSpec
from flowdb.flow.matching import BACKENDS, Matcher
from flowdb.store.links import link_packs
from tests.helpers import assert_one_line_error, brute_force_top_k, run_flowdb, unit_decoder

CPU_BACKENDS = [b for b in BACKENDS if "cuda" not in b and "gpu" not in b]
TIE = 1e-6


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_links_equal_brute_force_on_every_cpu_backend(backend):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 64)).astype(np.float32) * rng.uniform(0.5, 2, (300, 1)).astype(np.float32)
    b = rng.standard_normal((450, 64)).astype(np.float32)
    place = link_place(a, b, 0, "res", LinkSpec(k=4), Matcher(backend, query_tile=128, base_tile=200))
    for found_s, found_i, (want_s, want_i, cos) in (
            (place.ab_scores, place.ab_indices, brute_force_top_k(a, b, 4)),
            (place.ba_scores[:, None], place.ba_indices[:, None], brute_force_top_k(b, a, 1))):
        exact_of_found = np.take_along_axis(cos, found_i, axis=1)
        assert np.allclose(found_s, exact_of_found, atol=1e-5)  # each stored cosine is its own
        assert np.allclose(exact_of_found, want_s, atol=TIE)  # and the k best, in order (ties either way)
        assert (found_i == want_i).mean() > 0.99


def _family(seed=0, d=256):
    """A and B with every category planted, and the truth per feature."""
    rng = np.random.default_rng(seed)
    a = _unit(rng.standard_normal((60, d)))
    b_rows, truth_a, truth_b = [], {}, {}

    def add_b(row, category):
        b_rows.append(row)
        truth_b[len(b_rows) - 1] = category

    for i in range(10):  # split into two: a = normalised sum of the children exactly
        u = rng.standard_normal(d)
        u = _unit(u - (u @ a[i]) * a[i])
        for sign in (1, -1):
            add_b(_unit(a[i] + sign * 1.1 * u), "kept")
        truth_a[i] = "split"
    for i in range(10, 20):  # kept, with noise
        add_b(_unit(a[i] + 0.45 * _unit(rng.standard_normal(d))), "kept")
        truth_a[i] = "kept"
    for i in range(20, 30):  # rotated to cosine 0.4: above chance (~0.3 here), below t = 0.5
        u = rng.standard_normal(d)
        u = _unit(u - (u @ a[i]) * a[i])
        add_b(0.4 * a[i] + np.sqrt(1 - 0.16) * u, "shifted")
        truth_a[i] = "shifted"
    for i in range(30, 40):  # gone: no relative in B
        truth_a[i] = "gone"
    for i in range(40, 60, 2):  # two features of A merged into one of B
        add_b(_unit(a[i] + a[i + 1]), "merged")
        truth_a[i] = truth_a[i + 1] = "kept"
    for _ in range(10):
        add_b(_unit(rng.standard_normal(d)), "new")
    b = np.array(b_rows)
    order = rng.permutation(len(b))  # index order carries no truth
    inverse = np.argsort(order)
    return (a.astype(np.float32), b[order].astype(np.float32), truth_a,
            {int(inverse[j]): category for j, category in truth_b.items()})


def test_categories_recover_every_planted_kind():
    a, b, truth_a, truth_b = _family()
    place = link_place(a, b, 0, "res", LinkSpec(), Matcher())
    assert place.chance_ab < 0.4 < place.t_ab == 0.5  # the shifted band exists at this width and d
    assert list(place.a_categories) == [truth_a[i] for i in range(len(a))]
    assert list(place.b_categories) == [truth_b[j] for j in range(len(b))]


def test_chance_matches_are_gone_and_new_at_the_calibrated_rate():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2000, 64)), rng.standard_normal((1500, 64))
    place = link_place(a.astype(np.float32), b.astype(np.float32), 0, "res", LinkSpec(), Matcher())
    # p99.9 of chance: about 2 of 2000 random features reach it; 0.5 here is below chance, so auto uses chance.
    assert place.t_ab == place.chance_ab > 0.5 and place.rule == "auto: chance p99.9"
    assert (place.a_categories == "gone").sum() >= 1990
    assert (place.b_categories == "new").sum() >= 1492


def _write_companion(root, base_dir, layers, seed=0):
    """A residual-only pack B from the base pack's residual rows: half kept (noisy), a fifth
    split in two, the rest gone; plus new random features."""
    from flowdb.lm.hooks import hook_point
    from flowdb.packs.synth import write_sae

    rng = np.random.default_rng(seed)
    for layer in range(layers):
        a = unit_decoder(base_dir, "res", layer)
        n, d = a.shape
        rows = [_unit(a[i] + 0.3 * _unit(rng.standard_normal(d))) for i in range(n // 2)]
        for i in range(n // 2, n // 2 + n // 5):
            u = rng.standard_normal(d)
            u = _unit(u - (u @ a[i]) * a[i])
            rows += [_unit(a[i] + 1.1 * u), _unit(a[i] - 1.1 * u)]
        rows += list(_unit(rng.standard_normal((n // 10, d))))
        write_sae(root / "saes" / "res" / f"layer_{layer}", np.array(rows, dtype=np.float32),
                  hook_point("res", layer), "planted-model")
    (root / "manifest.toml").write_text(
        f'name = "wide"\nmodel = "planted-model"\nlayers = [0, {layers - 1}]\n\n'
        '[modules.res]\npath = "saes/res/layer_{layer}"\n')


@pytest.fixture
def two_packs(db, planted_pack, tmp_path):
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    base_dir, _ = planted_pack
    _write_companion(tmp_path / "wide", base_dir, 2)
    ingest(load_manifest(base_dir / "manifest.toml"), db)
    ingest(load_manifest(tmp_path / "wide" / "manifest.toml"), db)
    return base_dir, tmp_path / "wide"


def test_link_set_in_neo4j_equals_brute_force_and_is_idempotent(db, two_packs, monkeypatch):
    from flowdb.store import graph

    base_dir, wide_dir = two_packs
    calls = {"n": 0}
    real = graph.write_link_place

    def dies_on_second_place(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(graph, "write_link_place", dies_on_second_place)
    with pytest.raises(RuntimeError):
        link_packs(db, "planted", "wide", LinkSpec(k=3, modules=("res", "mlp", "att")))
    monkeypatch.setattr(graph, "write_link_place", real)
    resumed = link_packs(db, "planted", "wide", LinkSpec(k=3, modules=("res", "mlp", "att")))
    assert resumed.status == "resumed" and resumed.places_written == ["1-res"]
    assert link_packs(db, "planted", "wide", LinkSpec(k=3)).status == "unchanged"

    stored = pd.DataFrame(db.read(
        "MATCH (s:Feature)-[r:ALIGNS {link: 'planted--wide'}]->(t:Feature) "
        "RETURN s.pack AS side, s.layer AS layer, s.index AS index, t.index AS other, r.rank AS rank, "
        "r.cosine AS cosine, r.category AS category"))
    for layer in range(2):
        a, b = unit_decoder(base_dir, "res", layer), unit_decoder(wide_dir, "res", layer)
        for side, queries, base, k in (("planted", a, b, 3), ("wide", b, a, 1)):
            part = stored[(stored.side == side) & (stored.layer == layer)].sort_values(["index", "rank"])
            assert len(part) == len(queries) * k  # every match once: the resumed place wrote no twin
            cos = queries @ base.T
            want = np.sort(cos, axis=1)[:, ::-1][:, :k].reshape(-1)
            got_exact = cos[part["index"].to_numpy(), part["other"].to_numpy()]
            assert np.allclose(part["cosine"], got_exact, atol=1e-5)
            assert np.allclose(got_exact, want, atol=TIE)
        # Planted: half of A kept, a fifth split; the rest has no copy in B, and is gone unless
        # a near twin in A (the planted pack has them) left one above chance.
        cats = stored[(stored.side == "planted") & (stored.layer == layer) & (stored["rank"] == 1)]
        cats = cats.set_index("index")["category"].sort_index()
        n = len(a)
        assert (cats.iloc[:n // 2] == "kept").all()
        assert (cats.iloc[n // 2:n // 2 + n // 5] == "split").all()
        chance = db.read("MATCH (p:LinkPlace {link: 'planted--wide', layer: $layer}) RETURN p.chance_ab AS c",
                         layer=layer)[0]["c"]
        rest = np.arange(n // 2 + n // 5, n)
        assert ((cats.iloc[rest] == "gone").to_numpy() == ((a[rest] @ b.T).max(axis=1) <= chance)).all()
        assert (cats.iloc[rest] == "gone").mean() > 0.7
    places = db.read("MATCH (:LinkSet {name: 'planted--wide', status: 'complete'})-[:HAS_PLACE]->(p:LinkPlace) "
                     "RETURN p.layer AS layer, p.a_split AS split ORDER BY layer")
    first = stored[(stored.side == "planted") & (stored["rank"] == 1)]
    assert [p["split"] for p in places] == pytest.approx(
        [(first[first.layer == layer].category == "split").mean() for layer in range(2)])


def test_link_refusals_are_one_line(db, two_packs, tmp_path):
    from flowdb.packs.synth import SynthSpec, synthesize

    synthesize(tmp_path / "wider", SynthSpec(name="wider", layers=2, d_model=128, width=64))
    assert_one_line_error(run_flowdb("link", "planted", tmp_path / "wider" / "manifest.toml"),
                          "read different spaces at layer 0", "d_in 256", "d_in 128")
    assert_one_line_error(run_flowdb("link", "planted", "planted"), "two different packs")
    assert_one_line_error(run_flowdb("link", "planted", "nosuch"), "no pack named 'nosuch'")
    assert run_flowdb("link", "planted", "wide", "--no-progress").code == 0
    assert_one_line_error(run_flowdb("link", "planted", "wide", "--k", "2"), "pass --replace")
    replaced = run_flowdb("link", "planted", "wide", "--k", "2", "--replace", "--no-progress")
    assert replaced.code == 0 and "replaced link set" in replaced.stdout
    assert db.read("MATCH ()-[r:ALIGNS]->() RETURN max(r.rank) AS k")[0]["k"] == 2
    listed = run_flowdb("links")
    assert listed.code == 0 and "planted--wide\tplanted -> wide\tk=2\tt=0.5 (auto)\t2 places\tcomplete" in listed.stdout


def test_deleting_a_pack_deletes_its_link_sets(db, two_packs):
    import flowdb
    from flowdb.store.ingest import delete_pack

    shares = flowdb.link("planted", "wide", db=db, k=1)  # the notebook form
    assert list(shares["layer"]) == [0, 1] and list(shares["module"]) == ["res", "res"]
    sides = shares.filter(regex="^a_").sum(axis=1), shares.filter(regex="^b_(kept|merged|shifted|new)").sum(axis=1)
    assert np.allclose(sides[0], 1) and np.allclose(sides[1], 1)
    delete_pack(db, "wide")
    assert db.read("MATCH (l:LinkSet) RETURN count(l) AS n")[0]["n"] == 0
    assert db.read("MATCH (p:LinkPlace) RETURN count(p) AS n")[0]["n"] == 0
    assert db.read("MATCH ()-[r:ALIGNS]->() RETURN count(r) AS n")[0]["n"] == 0


def test_a_replaced_pack_leaves_its_link_set_stale_and_the_next_link_redoes_it(db, two_packs, tmp_path):
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    base_dir, _ = two_packs
    link_packs(db, "planted", "wide", LinkSpec(k=1))
    _write_companion(tmp_path / "wide2", base_dir, 2, seed=1)
    ingest(load_manifest(tmp_path / "wide2" / "manifest.toml"), db, replace=True)  # pack "wide", new content
    assert db.read("MATCH (l:LinkSet) RETURN l.status AS s")[0]["s"] == "stale"
    assert db.read("MATCH ()-[r:ALIGNS]->() RETURN count(r) AS n")[0]["n"] == 0  # left with the old build
    again = link_packs(db, "planted", "wide", LinkSpec(k=1))
    assert again.status == "replaced"
    n_b = len(unit_decoder(tmp_path / "wide2", "res", 0)) + len(unit_decoder(tmp_path / "wide2", "res", 1))
    assert db.read("MATCH ()-[r:ALIGNS]->() RETURN count(r) AS n")[0]["n"] == 2 * 512 + n_b
