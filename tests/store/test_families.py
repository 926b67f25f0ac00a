"""Feature families across linked packs (flowdb link): the family, splits, new-features and
lineage-across templates, their pictures and the explorer's family API, over a real Neo4j.

Pack A is the planted pack; pack B ("fam") is written here from A's residual rows with known
parts: split children of some features (a + beta u and a - beta u: their sum is 2a), near copies,
merges of two, rotated ones (cosine 0.4, between chance and t) and random new ones. Pack C
("cee") holds near copies of other A features, linked with A on its B side. Expected answers
come from the link atlas Parquet (pandas) and cosines from numpy over the rows written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from starlette.testclient import TestClient

from conftest import XSS_LABEL, wipe
from flowdb.errors import FlowdbError, NotFound
from flowdb.explorer.app import create_app
from flowdb.flow.link_spec import LinkSpec
from flowdb.lm.hooks import hook_point
from flowdb.packs.manifest import load_manifest
from flowdb.packs.synth import write_sae
from flowdb.store.ingest import ingest
from flowdb.store.links import link_packs
from flowdb.store.templates import run_template
from helpers import ReferenceGraph, brute_force_edges, unit_decoder

LAYERS = 4
SPLIT_PARENTS = list(range(0, 8))
COPIED = list(range(8, 40))
MERGED = [(40, 41), (42, 43), (44, 45)]
SHIFTED = list(range(46, 52))
N_NEW = 40
C_COPIED = list(range(100, 120))
LINKS = {"planted--fam": ("planted", "fam"), "cee--planted": ("cee", "planted")}


def _orthogonal(rng, a: np.ndarray) -> np.ndarray:
    u = rng.standard_normal(a.shape)
    u -= (u @ a) * a
    return u / np.linalg.norm(u)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def family_rows(rng, a: np.ndarray) -> np.ndarray:
    """B's unit rows at one layer, from A's unit rows a."""
    rows = []
    for p in SPLIT_PARENTS:
        u = _orthogonal(rng, a[p])
        rows += [_unit(a[p] + 0.8 * u), _unit(a[p] - 0.8 * u)]  # the parts sum to 2 a[p]
    rows += [_unit(a[i] + 0.2 * _orthogonal(rng, a[i])) for i in COPIED]
    rows += [_unit(a[i] + a[j]) for i, j in MERGED]
    rows += [0.4 * a[i] + np.sqrt(1 - 0.16) * _orthogonal(rng, a[i]) for i in SHIFTED]
    rows += list(_unit(rng.standard_normal((N_NEW, a.shape[1]))))
    return np.array(rows)


def write_pack(out, name: str, rows_of_layer) -> None:
    """A residual-only pack in sae-lens format whose rows (random norms) come from rows_of_layer(layer)."""
    rng = np.random.default_rng(5)
    for layer in range(LAYERS):
        rows = rows_of_layer(layer)
        scale = rng.uniform(0.5, 2.0, size=(len(rows), 1))
        write_sae(out / "saes" / "res" / f"layer_{layer}", (rows * scale).astype(np.float32),
                  hook_point("res", layer), "planted-model")
    (out / "manifest.toml").write_text(
        f'name = "{name}"\nmodel = "planted-model"\nlayers = [0, {LAYERS - 1}]\n\n[match]\nk = 1\n\n'
        '[modules.res]\npath = "saes/res/layer_{layer}"\n')


@pytest.fixture(scope="module")
def linked(neo4j_settings, planted_pack, tmp_path_factory):
    """(db, atlas matches per link as one frame, unit rows per pack and layer, pack dir) with A, B, C
    stored and linked, and labels on some of B's features (one of them markup)."""
    from flowdb.modules import sae_key
    from flowdb.store.connection import connect

    pack_dir = planted_pack[0]
    folder = tmp_path_factory.mktemp("families")
    a_rows = {layer: unit_decoder(pack_dir, "res", layer) for layer in range(LAYERS)}
    rng = np.random.default_rng(11)
    b_rows = {layer: family_rows(rng, a_rows[layer]) for layer in range(LAYERS)}
    c_rows = {layer: np.array([_unit(a_rows[layer][i] + 0.1 * _orthogonal(rng, a_rows[layer][i]))
                               for i in C_COPIED] + list(_unit(rng.standard_normal((10, 256)))))
              for layer in range(LAYERS)}
    write_pack(folder / "fam", "fam", b_rows.get)
    write_pack(folder / "cee", "cee", c_rows.get)
    with connect(neo4j_settings) as db:
        wipe(db)
        for manifest in (pack_dir / "manifest.toml", folder / "fam" / "manifest.toml",
                         folder / "cee" / "manifest.toml"):
            ingest(load_manifest(manifest), db, show_progress=False)
        db.write("MATCH (s:SAE {pack: 'fam'}) SET s.np_url = 'https://www.neuronpedia.org/fam/' + "
                 "toString(s.layer) + '-res/'")
        db.write("MATCH (f:Feature {pack: 'fam', module: 'res'}) WHERE f.index < 4 "
                 "SET f.label = CASE f.index WHEN 0 THEN $xss ELSE 'part ' + toString(f.index) END", xss=XSS_LABEL)
        frames = []
        for name, (a, b) in LINKS.items():
            report = link_packs(db, a, b, LinkSpec(modules=("res",)), show_progress=False)
            frames.append(pd.read_parquet(report.atlas / "matches").assign(link=name, a=a, b=b))
        matches = pd.concat(frames, ignore_index=True)
        matches["layer"] = matches["layer"].astype(int)
        rows = {"planted": a_rows, "fam": b_rows, "cee": c_rows}
        assert sae_key("fam", 0, "res")  # the keys below follow graph.feature_key's form
        yield db, matches, rows, pack_dir


def key(pack: str, layer: int, index: int) -> str:
    return f"{pack}/{layer}/res/{index}"


def categories(matches: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(link, feature key) -> the feature's category in that link, from the atlas."""
    own = matches.drop_duplicates(["link", "side", "layer", "index"])
    return {(r.link, key(r.a if r.side == "a" else r.b, r.layer, r.index)): r.category for r in own.itertuples()}


def expected_family(matches: pd.DataFrame, feature: str) -> pd.DataFrame:
    """A feature's relatives from the atlases: its own matches and those that match it, one row per relative."""
    pack, layer, _, index = feature.split("/")
    layer, index = int(layer), int(index)
    found: dict[tuple[str, str], dict] = {}
    for r in matches[matches["layer"] == layer].itertuples():
        own, other = (r.a, r.b) if r.side == "a" else (r.b, r.a)
        if own == pack and r.index == index:  # the feature's match of the relative
            entry = found.setdefault((r.link, key(other, layer, r.other)), {})
            entry.update(rank=r.rank, above_out=r.above)
        if other == pack and r.other == index:  # the relative's match of the feature
            entry = found.setdefault((r.link, key(own, layer, r.index)), {})
            entry.update(back_rank=r.rank, above_back=r.above)
    rows = [{"link": link, "relative_key": relative, "rank": v.get("rank"), "back_rank": v.get("back_rank"),
             "above": bool(v.get("above_out", False) or v.get("above_back", False))}
            for (link, relative), v in found.items()]
    return pd.DataFrame(rows, columns=["link", "relative_key", "rank", "back_rank", "above"])


def cosine(rows, a_key: str, b_key: str) -> float:
    (pa, layer, _, ia), (pb, _, _, ib) = a_key.split("/"), b_key.split("/")
    return float(rows[pa][int(layer)][int(ia)] @ rows[pb][int(layer)][int(ib)])


def _nullable(value):
    return None if pd.isna(value) else int(value)


FEATURES = ["planted/2/res/0", "planted/1/res/41", "planted/3/res/100", "planted/0/res/47", "fam/2/res/1",
            "fam/1/res/16", "cee/3/res/5"]


def test_the_fixture_plants_what_it_says(linked):
    """A guard on the data, not on the code under test: the planted parts come out as planted."""
    _, matches, _, _ = linked
    cat = categories(matches)
    for layer in range(LAYERS):
        assert all(cat["planted--fam", key("planted", layer, p)] == "split" for p in SPLIT_PARENTS)
        first_new = 16 + len(COPIED) + len(MERGED) + len(SHIFTED)
        new = range(first_new, first_new + N_NEW)
        assert all(cat["planted--fam", key("fam", layer, i)] == "new" for i in new)
        merges = range(16 + len(COPIED), 16 + len(COPIED) + len(MERGED))
        assert any(cat["planted--fam", key("fam", layer, i)] == "merged" for i in merges)


@pytest.mark.parametrize("above_only", [False, True])
@pytest.mark.parametrize("feature", FEATURES)
def test_family_is_every_match_both_ways_in_every_link(linked, feature, above_only):
    db, matches, rows, _ = linked
    frame = run_template(db, "family", {"feature": feature, "above_only": above_only, "limit": 1000})
    expected = expected_family(matches, feature)
    if above_only:
        expected = expected[expected["above"]]
    got = {(r.link, r.relative_key, _nullable(r.rank), _nullable(r.back_rank), bool(r.above))
           for r in frame.itertuples()}
    assert got == {(r.link, r.relative_key, _nullable(r.rank), _nullable(r.back_rank), r.above)
                   for r in expected.itertuples()}
    assert len(frame) == len(expected)  # one row per relative and link
    cat = categories(matches)
    own_pack = feature.split("/")[0]
    for r in frame.itertuples():
        assert r.cosine == pytest.approx(cosine(rows, feature, r.relative_key), abs=1e-5)
        assert r.relative_category == cat[r.link, r.relative_key]
        assert r.category == cat[r.link, feature]
        assert r.side == ("a" if LINKS[r.link][0] == own_pack else "b")
    for _, part in frame.groupby("link", sort=False):
        assert part["cosine"].is_monotonic_decreasing


def test_family_carries_labels_and_urls_and_limits(linked):
    db, matches, _, _ = linked
    frame = run_template(db, "family", {"feature": "planted/2/res/0", "above_only": True})
    children = frame[frame["link"] == "planted--fam"]
    assert set(children["relative_key"]) == {"fam/2/res/0", "fam/2/res/1"}
    labels = dict(zip(children["relative_key"], children["relative_label"]))
    assert labels == {"fam/2/res/0": XSS_LABEL, "fam/2/res/1": "part 1"}
    assert set(children["relative_url"]) == {"https://www.neuronpedia.org/fam/2-res/0",
                                             "https://www.neuronpedia.org/fam/2-res/1"}
    one = run_template(db, "family", {"feature": "planted/2/res/0", "limit": 1})
    assert len(one) == 1


def test_splits_are_the_atlas_split_parents_with_their_children(linked):
    db, matches, rows, _ = linked
    link = matches[(matches["link"] == "planted--fam") & (matches["side"] == "a")]
    children = link[(link["category"] == "split") & link["above"]]
    answers = {layer: run_template(db, "splits", {"link": "planted--fam", "layer": layer, "limit": 1000})
               for layer in (None, 2)}
    for layer, frame in answers.items():
        part = children if layer is None else children[children["layer"] == layer]
        assert set(zip(frame["parent_key"], frame["child_key"])) == {
            (key("planted", r.layer, r.index), key("fam", r.layer, r.other)) for r in part.itertuples()}
        sums = part.groupby(["layer", "index"])["cosine"].sum()
        for r in frame.itertuples():
            assert r.children_cosine == pytest.approx(sums[r.layer, r.parent_index], abs=1e-5)
            assert r.cosine == pytest.approx(cosine(rows, r.parent_key, r.child_key), abs=1e-5)
        parents = frame.drop_duplicates("parent_key")
        assert parents["children_cosine"].is_monotonic_decreasing
    top = run_template(db, "splits", {"link": "planted--fam", "limit": 2})
    assert top["parent_key"].nunique() == 2
    assert list(top.drop_duplicates("parent_key")["parent_key"]) == \
        list(answers[None].drop_duplicates("parent_key")["parent_key"][:2])


def test_new_features_are_the_atlas_new_ones(linked):
    db, matches, rows, _ = linked
    side_b = matches[(matches["link"] == "planted--fam") & (matches["side"] == "b")]
    for layer in (None, 1):
        frame = run_template(db, "new-features", {"link": "planted--fam", "layer": layer, "limit": 1000})
        new = side_b[(side_b["category"] == "new") & ((side_b["layer"] == layer) if layer is not None else True)]
        assert set(frame["key"]) == {key("fam", r.layer, r.index) for r in new.itertuples()}
        for r in frame.itertuples():
            fam_layer, _, index = r.key.split("/")[1:]
            best = int(np.argmax(rows["planted"][r.layer] @ rows["fam"][int(fam_layer)][int(index)]))
            assert r.nearest_key == key("planted", r.layer, best)
            assert r.cosine == pytest.approx(cosine(rows, r.key, r.nearest_key), abs=1e-5)
            assert r.cosine <= r.chance
        assert frame["layer"].is_monotonic_increasing


def test_lineage_across_is_the_lineage_with_each_steps_relatives(linked):
    db, matches, _, pack_dir = linked
    reference = ReferenceGraph("planted", brute_force_edges(pack_dir, layers=LAYERS, k=1), t_res=0.5, t_mod=0.5)
    linked_rows = set(range(52)) | set(C_COPIED)  # A's features with relatives above threshold

    def has_linked_ancestor(feature):
        return any(int(step.split("/")[3]) in linked_rows for step in reference.ancestors(feature, 0.5, 1) - {feature})

    seeds = sorted(k for k in reference.category if k.startswith("planted/3/") and has_linked_ancestor(k))[:3]
    assert len(seeds) == 3
    for feature in seeds + ["planted/3/res/100"]:
        for link in (None, "planted--fam"):
            frame = run_template(db, "lineage-across", {"feature": feature, "link": link, "t_res": 0.5})
            steps = reference.ancestors(feature, 0.5, 1)
            assert set(frame["step_key"]) == steps
            expected = set()
            for step in steps:
                family = expected_family(matches, step)
                family = family[family["above"] & ((family["link"] == link) if link else True)]
                expected |= {(step, r.link, r.relative_key) for r in family.itertuples()}
            got = {(r.step_key, r.link, r.relative_key) for r in frame.itertuples() if isinstance(r.relative_key, str)}
            assert got == expected and (expected or link)
            assert (frame["depth"] == 3 - frame["step_layer"]).all()
            # a step with no relative has one row, without one
            for step in steps - {s for s, _, _ in expected}:
                assert frame.loc[frame["step_key"] == step, "relative_key"].isna().all()


def test_an_unknown_link_is_refused_naming_the_stored_ones(linked):
    db, _, _, _ = linked
    with pytest.raises(NotFound, match="stored link sets: cee--planted, planted--fam"):
        run_template(db, "splits", {"link": "nope"})


def test_family_api_is_the_template(linked):
    db, _, _, _ = linked
    with TestClient(create_app(lambda: db, token="t"), base_url="http://127.0.0.1:8047") as client:
        answer = client.get("/api/family/planted/2/res/0?above_only=true").json()
        frame = run_template(db, "family", {"feature": "planted/2/res/0", "above_only": True})
        assert answer["columns"] == list(frame.columns)
        assert [r["relative_key"] for r in answer["rows"]] == list(frame["relative_key"])
        assert XSS_LABEL in [r["relative_label"] for r in answer["rows"]]
        page = client.get("/feature/planted/2/res/0")
        assert page.status_code == 200 and 'id="family-table"' in page.text
        assert XSS_LABEL not in page.text  # labels reach the page as JSON, written as text by explorer.js
        bad = client.get("/api/family/planted/2/res/0?limit=0")
        assert bad.status_code == 400 and "limit" in bad.json()["error"]


def test_family_tree_is_the_family_twice(linked):
    """Relatives at or above threshold of the feature (column 1) and of each relative (column 2)."""
    from flowdb.store.links import family_tree

    db, matches, _, _ = linked
    feature = "planted/0/res/40"
    nodes, edges = family_tree(db, feature)
    first = expected_family(matches, feature)
    first = set(first.loc[first["above"], "relative_key"])
    assert set(nodes.loc[nodes["column"] == 1, "key"]) == first
    second = set()
    for relative in first:
        family = expected_family(matches, relative)
        second |= set(family.loc[family["above"], "relative_key"])
    assert set(nodes.loc[nodes["column"] == 2, "key"]) == second - first - {feature}
    assert set(edges["target"]) == set(nodes["key"]) - {feature}


def test_family_and_link_pictures(linked, tmp_path):
    from flowdb.store.links import family_tree, graph_link_records
    from flowdb.views.plots import plot_family, plot_link

    db, matches, _, _ = linked
    nodes, edges = family_tree(db, "planted/2/res/0")
    assert plot_family(nodes, edges, tmp_path / "f.png", "t").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    places = pd.DataFrame(graph_link_records(db, "planted--fam"))
    side_b = matches[(matches["link"] == "planted--fam") & (matches["side"] == "b")]
    shares = side_b.groupby("layer")["category"].value_counts(normalize=True).unstack(fill_value=0.0)
    for row in places.itertuples():
        assert row.b_new == pytest.approx(shares.loc[row.layer, "new"])
        assert row.b_merged == pytest.approx(shares.loc[row.layer].get("merged", 0.0))
    html = plot_link(places, tmp_path / "l.html", "planted--fam").read_text()
    assert "planted--fam" in html and "merged" in html
    assert plot_link(places, tmp_path / "l.png", "planted--fam").stat().st_size > 10_000
    with pytest.raises(FlowdbError, match="no mlp places"):
        plot_link(places, tmp_path / "m.png", "planted--fam", module="mlp")
