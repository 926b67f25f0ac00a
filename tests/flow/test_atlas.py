"""The flow atlas: match -> Parquet -> load gives what ingest gives, resumably."""

import fcntl
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import wipe
from flowdb.cli import cli
from flowdb.errors import BusyError, FlowdbError
from flowdb.flow.atlas import Atlas, match
from flowdb.flow.matching import choose_backend
from flowdb.packs.manifest import load_manifest
from flowdb.packs.plan import make_plan
from flowdb.store import graph
from flowdb.store.ingest import ingest, load
from helpers import brute_force_edges, graph_dump


def mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture
def planted_plan(planted_pack):
    return make_plan(load_manifest(planted_pack[0] / "manifest.toml", k=3))


def test_atlas_edges_equal_brute_force(planted_pack, planted_plan, tmp_path):
    match(planted_plan, tmp_path / "atlas")
    edges = pd.read_parquet(tmp_path / "atlas" / "edges")
    truth = brute_force_edges(planted_pack[0], layers=4, k=3)
    got = edges.assign(dst_layer=edges["layer"].astype(int)).sort_values(
        ["dst_layer", "target_index", "kind", "rank"])
    want = truth.assign(kind=truth["kind"].str.upper()).sort_values(["dst_layer", "dst_index", "kind", "rank"])
    assert len(got) == len(want)
    assert got["source_index"].tolist() == want["src_index"].tolist()
    np.testing.assert_allclose(got["cosine"].to_numpy(), want["cosine"].to_numpy(), atol=1e-5)
    assert got["source"].iloc[0] == f"planted/{want['src_layer'].iloc[0]}/{want['src_module'].iloc[0]}/" \
                                    f"{want['src_index'].iloc[0]}"


def test_match_then_load_equals_ingest(db, planted_pack, planted_plan, tmp_path):
    ingest(load_manifest(planted_pack[0] / "manifest.toml", k=3), db)
    reference = graph_dump(db, "planted")
    wipe(db)
    atlas = match(planted_plan, tmp_path / "atlas")
    report = load(Atlas.open(atlas.root), db)
    assert report.status == "built" and report.match_edges == atlas.n_edges()
    assert graph_dump(db, "planted") == reference
    assert reference["nodes"] and reference["relationships"]
    stored = db.read("MATCH (p:Pack {name: 'planted'}) RETURN p.matcher AS m")[0]["m"]
    assert stored == choose_backend("auto", planted_plan.matching_gflop()) == "numpy-cpu"  # a small build
    assert load(atlas, db).status == "unchanged"


def test_a_second_match_searches_nothing_and_a_lost_layer_is_redone(planted_plan, tmp_path):
    atlas = match(planted_plan, tmp_path / "atlas")
    before = mtimes(atlas.root)
    match(planted_plan, atlas.root)
    assert mtimes(atlas.root) == before  # idempotent: nothing rewritten
    edges_2 = pd.read_parquet(atlas.root / "edges" / "layer=2" / "part.parquet")
    (atlas.root / "layers" / "2.json").unlink()  # as if killed before layer 2 was marked done
    (atlas.root / "edges" / "layer=2" / "part.parquet").unlink()
    with pytest.raises(FlowdbError, match="lacks layers 2; run flowdb match"):
        atlas.require_complete()
    redone = []
    match(planted_plan, atlas.root, progress=redone.append)
    assert redone == [2]
    after = mtimes(atlas.root)
    assert {p for p in after if after[p] != before.get(p)} == {
        atlas.root / "layers" / "2.json", atlas.root / "edges" / "layer=2" / "part.parquet",
        atlas.root / "residual" / "layer=2" / "part.parquet",
        atlas.root / "saes.parquet", atlas.root / "thresholds.parquet"}
    pd.testing.assert_frame_equal(pd.read_parquet(atlas.root / "edges" / "layer=2" / "part.parquet"), edges_2)


def test_an_atlas_of_another_build_is_never_overwritten(planted_pack, planted_plan, tmp_path):
    atlas = match(planted_plan, tmp_path / "atlas")
    before = mtimes(atlas.root)
    other = make_plan(load_manifest(planted_pack[0] / "manifest.toml", k=1))
    with pytest.raises(FlowdbError, match="holds the atlas of another build"):
        match(other, atlas.root)
    assert mtimes(atlas.root) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FlowdbError, match="is not empty and holds no atlas"):
        match(planted_plan, tmp_path / "busy")


def test_two_writers_of_one_atlas_are_refused(planted_plan, tmp_path):
    root = tmp_path / "atlas"
    root.mkdir()
    with open(root / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BusyError, match="being written by another flowdb command"):
            match(planted_plan, root)


def test_a_damaged_atlas_is_refused_by_name(planted_plan, tmp_path):
    atlas = match(planted_plan, tmp_path / "atlas")
    path = atlas.root / "residual" / "layer=1" / "part.parquet"
    residual = pd.read_parquet(path)
    residual["category"] = "translated"
    residual.to_parquet(path, index=False)
    with pytest.raises(FlowdbError, match="layer 1's stored categories differ"):
        list(atlas.layers())
    with pytest.raises(FlowdbError, match="is not a flow atlas"):
        Atlas.open(tmp_path)


def test_cli_match_and_load_from_another_directory(db, planted_pack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    matched = runner.invoke(cli, ["match", str(planted_pack[0] / "manifest.toml"), "--out", "atlas",
                                  "--k", "2", "--device", "cpu"])
    assert matched.exit_code == 0, matched.output
    assert re.search(r"layers 0-3, 11264 edges, matched by numpy-cpu at [\d.,]+ GFLOP/s", matched.output)
    loaded = runner.invoke(cli, ["load", "atlas"])
    assert loaded.exit_code == 0, loaded.output
    assert "planted: built build" in loaded.output and "11264 match edges" in loaded.output
    assert graph.read_pack(db, "planted").k == 2
    missing = runner.invoke(cli, ["load", "nowhere"])
    assert missing.exit_code == 1 and "is not a flow atlas" in missing.output
    shutil.rmtree(tmp_path / "atlas" / "layers")
    partial = runner.invoke(cli, ["load", "atlas"])
    assert partial.exit_code == 1 and "lacks layers 0-3" in partial.output
