"""Issue 16, items 5-7 and 9: every bad input is refused in one line of its own, before
anything is written, and no answer is silently empty or silently different."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import flowdb
from flowdb.cli import cli
from flowdb.errors import QueryError
from flowdb.store import graph
from flowdb.store.templates import run_template
from helpers import graph_dump


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def refused(result, *fragments):
    """Exit 1, one line on stderr that says what, nothing on stdout, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert not lines[0].startswith("Error: unexpected"), lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- environment variables ------------------------------------------------------------------

@pytest.mark.parametrize("name, value, allowed", [
    ("FLOWDB_NEO4J_PORT", "abc", "whole number from 1 to 65535"),
    ("FLOWDB_NEO4J_PORT", "70000", "whole number from 1 to 65535"),
    ("FLOWDB_NEO4J_PORT", "-1", "whole number from 1 to 65535"),
    ("FLOWDB_NEO4J_PORT", "1e3", "whole number from 1 to 65535"),
    ("FLOWDB_NEO4J_PAGECACHE_MB", "xyz", "whole number from 8"),
    ("FLOWDB_NEO4J_PAGECACHE_MB", "0", "whole number from 8"),
    ("FLOWDB_QUERY_TIMEOUT", "abc", "number from 0.1 to 86400"),
    ("FLOWDB_QUERY_TIMEOUT", "nan", "number from 0.1 to 86400"),
    ("FLOWDB_QUERY_TIMEOUT", "-5", "number from 0.1 to 86400"),
    ("FLOWDB_IMPORT_THREADS", "0", "whole number from 1 to 1024"),
    ("FLOWDB_IMPORT_THREADS", "four", "whole number from 1 to 1024"),
    ("FLOWDB_IMPORT_MEMORY", "lots", "a size such as 4g"),
    ("FLOWDB_IMPORT_MEMORY", "150%", "a size such as 4g"),
    ("FLOWDB_NEO4J_HEAP", "4 GB", "Java heap size"),
    ("FLOWDB_NEO4J_ADMIN_HEAP", "-2g", "Java heap size"),
])
def test_a_bad_environment_variable_is_named_before_any_work(tmp_path, name, value, allowed):
    out = tmp_path / "pack"
    result = run("synth", out, "--layers", 1, "--width", 8, "--d-model", 64, env={name: value})
    refused(result, f"{name}={value!r}", allowed)
    assert not out.exists()


def test_good_environment_values_pass(tmp_path):
    env = {"FLOWDB_NEO4J_PORT": "7699", "FLOWDB_NEO4J_PAGECACHE_MB": "64", "FLOWDB_QUERY_TIMEOUT": "2.5",
           "FLOWDB_IMPORT_THREADS": "2", "FLOWDB_IMPORT_MEMORY": "80%", "FLOWDB_NEO4J_HEAP": "512m",
           "FLOWDB_NEO4J_ADMIN_HEAP": "1G"}
    result = run("synth", tmp_path / "pack", "--layers", 1, "--width", 8, "--d-model", 64, env=env)
    assert result.exit_code == 0, result.output


# --- pack names ------------------------------------------------------------------------------

def _renamed(pack_dir: Path, name: str) -> Path:
    manifest = pack_dir / "manifest.toml"
    text = manifest.read_text().replace('name = "planted"', f"name = {json.dumps(name)}")
    manifest.write_text(text)
    return manifest


@pytest.mark.parametrize("name", ["n" * 101, "n" * 300, "../x", "a/b", "-lead", "a b", "", "p~next", "é"])
def test_a_pack_name_outside_the_rule_is_refused(pack_copy, tmp_path, name):
    out = tmp_path / "atlas"
    line = refused(run("match", _renamed(pack_copy, name), "--out", out, "--device", "cpu"))
    assert "at most 100 characters: letters, digits" in line
    assert not out.exists()


def test_the_longest_pack_name_fits_every_file_flowdb_makes(pack_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    name = "n" * 100
    result = run("match", _renamed(pack_copy, name), "--out", tmp_path / "atlas", "--device", "cpu")
    assert result.exit_code == 0, result.output
    from flowdb.flow.atlas import default_dir
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.plan import make_plan

    assert len(default_dir(make_plan(load_manifest(pack_copy / "manifest.toml"))).name) < 255


def test_synth_refuses_a_pack_name_outside_the_rule(tmp_path):
    refused(run("synth", tmp_path / "p", "--name", "x" * 256), "at most 100 characters")
    assert not (tmp_path / "p").exists()


# --- cfg.json and the decoder's dtype ---------------------------------------------------------

CFG_SHAPES = [
    ("[1, 2]", "holds a JSON list, not an object"),
    ('"cfg"', "holds a JSON string, not an object"),
    ("3", "holds a JSON number, not an object"),
    ("null", "holds a JSON null, not an object"),
    ('{"d_in": "256", "d_sae": 512}', "key d_in must be a positive integer, got '256'"),
    ('{"d_in": 256.0, "d_sae": 512}', "key d_in must be a positive integer, got 256.0"),
    ('{"d_in": 256, "d_sae": true}', "key d_sae must be a positive integer, got True"),
    ('{"d_in": 256, "d_sae": 0}', "key d_sae must be a positive integer, got 0"),
    ('{"d_in": 256, "d_sae": 512, "metadata": [1]}', "key metadata must be an object, got a JSON list"),
    ('{"d_in": 256, "d_sae": 512, "metadata": {"hook_name": 5}}', "key metadata.hook_name must be a string"),
    ('{"d_in": 256, "d_sae": 512, "hook_point": {"a": 1}}', "key hook_point must be a string"),
    ('{"d_in": 256, "d_sae": 512, "dtype": 32}', "key dtype must be a string"),
    ("[" * 100_000 + "]" * 100_000, "unreadable cfg.json (RecursionError"),
]


@pytest.mark.parametrize("text, message", CFG_SHAPES)
def test_a_cfg_json_of_the_wrong_shape_is_named(pack_copy, tmp_path, text, message):
    (pack_copy / "saes" / "mlp" / "layer_2" / "cfg.json").write_text(text)
    out = tmp_path / "atlas"
    refused(run("match", pack_copy / "manifest.toml", "--out", out, "--device", "cpu"),
            "layer 2 module mlp", message)
    assert not out.exists()


def _rewrite_decoder(sae_dir: Path, dtype, cfg_dtype: str | None) -> None:
    weights = sae_dir / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_dec"] = (tensors["W_dec"] * (100 if np.dtype(dtype).kind == "i" else 1)).astype(dtype)
    save_file(tensors, str(weights))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg.pop("dtype", None)
    if cfg_dtype is not None:
        cfg["dtype"] = cfg_dtype
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("dtype, cfg_dtype, message", [
    (np.float16, "float32", "W_dec is stored as float16 but cfg.json says dtype 'float32'"),
    (np.float64, "torch.float32", "W_dec is stored as float64 but cfg.json says dtype 'torch.float32'"),
    (np.float32, "bfloat16", "W_dec is stored as float32 but cfg.json says dtype 'bfloat16'"),
    (np.int8, "float32", "W_dec is stored as I8; a decoder must be floating point"),
    (np.int8, None, "W_dec is stored as I8; a decoder must be floating point"),
])
def test_a_decoder_dtype_other_than_cfg_json_says_is_refused(pack_copy, tmp_path, dtype, cfg_dtype, message):
    _rewrite_decoder(pack_copy / "saes" / "res" / "layer_1", dtype, cfg_dtype)
    out = tmp_path / "atlas"
    refused(run("match", pack_copy / "manifest.toml", "--out", out, "--device", "cpu"), message)
    assert not out.exists()


@pytest.mark.parametrize("dtype, cfg_dtype", [(np.float16, "float16"), (np.float16, "torch.float16"),
                                               (np.float32, None)])
def test_a_decoder_of_the_dtype_cfg_json_says_passes(pack_copy, dtype, cfg_dtype):
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.sources import inspect, load_decoder

    _rewrite_decoder(pack_copy / "saes" / "res" / "layer_1", dtype, cfg_dtype)
    ref = load_manifest(pack_copy / "manifest.toml").source("res", 1)
    info, w_dec = load_decoder(ref)
    assert inspect(ref).d_sae == info.d_sae == 512 and w_dec.dtype == np.float32


# --- thresholds, max_rank, limits -------------------------------------------------------------

@pytest.mark.parametrize("classify, message", [
    ("t_res = nan", "t_res in [classify]: input should be a finite number"),
    ("t_mlp = -1.5", "t_mlp in [classify]: input should be greater than or equal to -1"),
    ("t_att = inf", "t_att in [classify]: input should be a finite number"),
    ("[classify.layer.2]\nt_res = nan", "t_res in [classify.layer.2]: input should be a finite number"),
    ("q_res = nan", "q_res in [classify]: input should be a finite number"),
])
def test_manifest_thresholds_must_be_finite_cosines(pack_copy, tmp_path, classify, message):
    manifest = pack_copy / "manifest.toml"
    text = manifest.read_text()
    manifest.write_text(text[:text.index("[classify]")] + "[classify]\n" + classify + "\n\n"
                        + text[text.index("[modules"):])
    out = tmp_path / "atlas"
    refused(run("match", manifest, "--out", out, "--device", "cpu"), message)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--t-res", "nan"), ("--t-mlp", "-2"), ("--t-att", "1.01")])
def test_threshold_options_must_be_finite_cosines(pack_copy, tmp_path, flag, value):
    out = tmp_path / "atlas"
    refused(run("match", pack_copy / "manifest.toml", "--out", out, flag, value), "must be a cosine in [-1, 1]")
    assert not out.exists()


@pytest.mark.parametrize("template, params, message", [
    ("lineage", ("max_rank=0",), "parameter max_rank must be from 1 to 10, got 0"),
    ("lineage", ("max_rank=-1",), "parameter max_rank must be from 1 to 10, got -1"),
    ("lineage", ("max_rank=100000000000000000000000",), "max_rank must be from 1 to 10"),
    ("lineage", ("max_rank=10**23",), "parameter max_rank must be int, got '10**23'"),
    ("lineage", ("t_res=nan",), "parameter t_res must be a finite number"),
    ("lineage", ("t_mod=-inf",), "parameter t_mod must be a finite number"),
    ("lineage", ("t_res=-1.5",), "parameter t_res must be from -1 to 1, got -1.5"),
    ("flow-graph", ("t_mod=2",), "parameter t_mod must be from -1 to 1, got 2"),
    ("chains", ("limit=0",), "parameter limit must be from 1 to 1000000, got 0"),
    ("newborn", ("layer=-1",), "parameter layer must be from 0 to 1000000, got -1"),
    ("circuit", ("last_layer=99999999999999999999",), "parameter last_layer must be from 0 to 1000000"),
])
def test_query_parameters_out_of_range_are_refused_before_connecting(template, params, message):
    required = {"lineage": "feature=x", "flow-graph": "feature=x", "chains": "pack=x",
                "newborn": "pack=x", "circuit": "source=x"}
    args = ["-p", required[template], *(arg for p in params for arg in ("-p", p))]
    if template == "newborn":
        args += ["-p", "layer=0"] if "layer" not in params[0] else []
    if template == "circuit":
        args += ["-p", "target=y"]
    # A URI nobody answers on: the refusal must come first, not "no Neo4j answers".
    refused(run("query", template, *args, "--uri", "bolt://127.0.0.1:1"), message)


def test_python_query_parameters_are_checked_alike():
    for params, message in (({"max_rank": 10**23}, "max_rank must be from 1 to 10"),
                            ({"t_res": float("nan")}, "t_res must be a finite number"),
                            ({"max_rank": True}, "max_rank must be int")):
        with pytest.raises(QueryError, match=message):
            run_template(None, "lineage", {"feature": "x", **params})
    with pytest.raises(QueryError, match="timeout_s must be a number of seconds"):
        flowdb.query("origins", db=object(), pack="x", timeout_s=-1)


# --- answers that name what exists instead of "(no rows)" ----------------------------------------

@pytest.fixture
def stored(db, planted_pack):
    """The planted pack (layers 0-3, k 1) ingested as "planted"."""
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db, show_progress=False)
    return db


def test_unknown_packs_layers_modules_and_features_are_named(stored):
    before = graph.count_nodes(stored)
    for args, fragments in [
        (("origins", "-p", "pack=nope"), ("no pack named 'nope'", "stored packs: planted")),
        (("origins", "-p", "pack=../x"), ("no pack named '../x'", "stored packs: planted")),
        (("origins", "-p", "pack=planted~next"), ("no pack named 'planted~next'", "stored packs: planted")),
        (("chains", "-p", "pack=nope"), ("no pack named 'nope'", "stored packs: planted")),
        (("newborn", "-p", "pack=nope", "-p", "layer=1"), ("no pack named 'nope'", "stored packs: planted")),
        (("label-search", "-p", "text=a", "-p", "pack=nope"), ("stored packs: planted",)),
        (("newborn", "-p", "pack=planted", "-p", "layer=7"), ("pack 'planted' has layers 0-3; layer 7",)),
        (("newborn", "-p", "pack=planted", "-p", "layer=1", "-p", "module=res"),
         ("module 'res' is not one residual features are born in; pack 'planted' has mlp, att",)),
        (("lineage", "-p", "feature=planted/3/mlp/0"),
         ("template lineage starts at a res feature, and planted/3/mlp/0 is of module mlp",)),
        (("lineage", "-p", "feature=planted/3/res/0", "-p", "max_rank=2"),
         ("max_rank 2 is above pack 'planted''s k=1", "--k 2 --replace")),
        (("flow-graph", "-p", "feature=planted/3/res/0", "-p", "max_rank=10"), ("k=1",)),
    ]:
        refused(run("query", *args), *fragments)
    assert graph.count_nodes(stored) == before


def test_what_does_exist_still_answers(stored):
    newborn = run("query", "newborn", "-p", "pack=planted", "-p", "layer=2", "-p", "module=mlp", "--format", "json")
    assert newborn.exit_code == 0, newborn.output
    rows = json.loads(newborn.stdout)
    assert rows and all(row["kind"] == "mlp" and row["born_in"].startswith("planted/2/mlp/") for row in rows)


def test_the_readme_python_query_with_a_time_limit(stored):
    limited = flowdb.query("origins", db=stored, pack="planted", timeout_s=30)
    assert limited.equals(flowdb.query("origins", db=stored, pack="planted"))
    assert list(limited["layer"]) == [0, 1, 2, 3] and (limited["total"] == 512).all()


def test_tables_show_every_missing_value_alike_and_csv_writes_lists_as_json(stored):
    table = run("query", "lineage", "-p", "feature=planted/3/res/0", "-p", "every_edge=true")
    assert table.exit_code == 0, table.output
    frame = run_template(stored, "lineage", {"feature": "planted/3/res/0", "every_edge": True})
    assert frame["step_label"].isna().all() and frame["pred_url"].isna().all()  # nothing is labelled
    cells = table.stdout.split()
    assert "null" in cells and not {"None", "NaN", "<NA>", "nan"} & set(cells)
    as_json = json.loads(run("query", "chains", "-p", "pack=planted", "--format", "json").stdout)
    as_csv = pd.read_csv(pd.io.common.StringIO(run("query", "chains", "-p", "pack=planted", "--format", "csv").stdout))
    assert len(as_json) == len(as_csv) > 0
    assert [json.loads(cell) for cell in as_csv["keys"]] == [row["keys"] for row in as_json]


def test_export_writes_the_atlas_edge_schema(stored, planted_pack, tmp_path):
    from flowdb.flow.atlas import default_dir
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.plan import make_plan

    atlas = pd.read_parquet(default_dir(make_plan(load_manifest(planted_pack[0] / "manifest.toml"))) / "edges")
    atlas["layer"] = atlas["layer"].astype("int64")
    for suffix, reader in ((".parquet", pd.read_parquet), (".csv", pd.read_csv)):
        out = tmp_path / f"edges{suffix}"
        assert run("export", "planted", "--out", out).exit_code == 0
        exported = reader(out)
        assert list(exported.columns) == list(atlas.columns)
        order = ["target", "kind", "rank"]
        left = exported.sort_values(order).reset_index(drop=True)
        right = atlas.sort_values(order).reset_index(drop=True)
        if suffix == ".parquet":
            pd.testing.assert_frame_equal(left, right, check_categorical=False)
        else:  # text: the same values, types as CSV reads them
            assert (left["kind"] == right["kind"]).all() and (left["above"] == right["above"]).all()
            assert np.allclose(left["cosine"], right["cosine"], atol=1e-7)


# --- flowdb delete -----------------------------------------------------------------------------

def test_delete_needs_yes_and_removes_one_pack_whole(stored, planted_pack, pack_copy):
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    ingest(load_manifest(_renamed(pack_copy, "other")), stored, show_progress=False)
    kept = graph_dump(stored, "planted")
    features = stored.read("MATCH (f:Feature {pack: 'other'}) RETURN count(f) AS n")[0]["n"]
    refused(run("delete", "other"), f"this deletes pack 'other' ({features:,} features, ", "--yes")
    assert graph.read_pack(stored, "other") is not None
    refused(run("delete", "nope", "--yes"), "no pack named 'nope'", "stored packs: other, planted")
    deleted = run("delete", "other", "--yes")
    assert deleted.exit_code == 0 and f"deleted pack 'other': {features:,} features" in deleted.output
    left = stored.read("MATCH (n) WHERE n.pack = 'other' OR n.name = 'other' RETURN count(n) AS n")[0]["n"]
    assert left == 0 and graph.read_pack(stored, "other") is None
    assert graph_dump(stored, "planted") == kept
    assert run("packs").output.startswith("planted\t")


# --- more cases of the same kind ----------------------------------------------------------

@pytest.mark.parametrize("uri", ["bolt://127.0.0.1:abc", "neo4j+ssc://[::1", "bolt://127.0.0.1:99999",
                                 "bolt://127.0.0.1:0"])
def test_a_uri_whose_host_or_port_does_not_parse_is_named(uri):
    refused(run("packs", "--uri", uri), f"cannot connect to {uri!r}: not a Neo4j URI")


def test_match_under_a_regular_file_is_refused(planted_pack, tmp_path):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "atlas"
    refused(run("match", planted_pack[0] / "manifest.toml", "--out", out, "--device", "cpu"),
            f"cannot write an atlas in {out} (Not a directory)")
    assert (tmp_path / "file").read_text() == "mine"


# --- load refuses a damaged atlas before writing any layer ----------------------------------

@pytest.fixture(scope="module")
def matched_atlas(tmp_path_factory, planted_pack):
    out = tmp_path_factory.mktemp("matched") / "atlas"
    result = run("match", planted_pack[0] / "manifest.toml", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _drop_a_row(path: Path) -> None:
    pd.read_parquet(path).iloc[1:].to_parquet(path, index=False)


DAMAGE = [
    ("residual/layer=2/part.parquet", _truncate, "residual/layer=2/part.parquet is unreadable"),
    ("edges/layer=3/part.parquet", _truncate, "edges/layer=3/part.parquet is unreadable"),
    ("edges/layer=1/part.parquet", lambda p: p.write_bytes(b""), "edges/layer=1/part.parquet is unreadable"),
    ("edges/layer=2/part.parquet", lambda p: p.write_bytes(b"PAR1" + bytes(500) + b"PAR1"),
     "edges/layer=2/part.parquet is unreadable"),
    ("edges/layer=3/part.parquet", lambda p: p.unlink(), "edges/layer=3/part.parquet is missing"),
    ("edges/layer=2/part.parquet", _drop_a_row, "holds 1535 rows, layers/2.json records 1536"),
    ("residual/layer=3/part.parquet", _drop_a_row, "holds 511 rows, layers/3.json records 512"),
    ("layers/2.json", lambda p: p.write_text("[]"), "layers/2.json is not a layer record"),
    ("layers/3.json", lambda p: p.write_text("{"), "layers/3.json is unreadable"),
    ("layers/1.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "widths": {"res": 0}})),
     "layers/1.json is not a layer record"),  # no residual features: nothing to divide the edges among
    ("atlas.json", lambda p: p.write_text("[1]"), "atlas.json is not an atlas record"),
    ("atlas.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "plan": {"version": 2}})),
     "atlas.json holds no readable build plan (KeyError"),
]


@pytest.mark.parametrize("part, damage, message", DAMAGE, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(DAMAGE)])
def test_load_refuses_a_damaged_atlas_before_writing(db, matched_atlas, tmp_path, part, damage, message):
    atlas = tmp_path / "atlas"
    shutil.copytree(matched_atlas, atlas)
    damage(atlas / part)
    for args in (("load", atlas), ("load", atlas, "--bulk", "--import-dir", tmp_path / "import")):
        refused(run(*args), f"atlas {atlas} is damaged", message)
    assert graph.count_nodes(db) == 0 and not (tmp_path / "import").exists()


# --- FLOWDB_HOME and its folders are private ------------------------------------------------

def _private_tree(home: Path) -> list[str]:
    """Folders from home down that group or others may enter."""
    return [str(p) for p in (home, *home.rglob("*")) if p.is_dir() and stat.S_IMODE(p.stat().st_mode) & 0o077]


def _open_parent(tmp_path: Path) -> Path:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o755)  # pytest's own folders are 0700: a test from one proves nothing
    return parent


def test_match_makes_flowdb_home_private(planted_pack, tmp_path):
    home = _open_parent(tmp_path) / "home"
    result = run("match", planted_pack[0] / "manifest.toml", "--out", tmp_path / "atlas", "--device", "cpu",
                 env={"FLOWDB_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert (home / "cache").is_dir() and _private_tree(home) == []


def test_ingest_to_a_server_of_ones_own_makes_flowdb_home_private(db, neo4j_settings, planted_pack, tmp_path):
    from flowdb.store.server import ManagedServer

    if neo4j_settings.managed:
        server = ManagedServer.default()
        uri, password = server.uri, server.auth()[1]
    else:
        uri, password = neo4j_settings.uri, neo4j_settings.password
    home = _open_parent(tmp_path) / "home"
    result = run("ingest", planted_pack[0] / "manifest.toml", "--uri", uri, "--password", password,
                 "--no-progress", env={"FLOWDB_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert (home / "atlas").is_dir() and len(tree(home / "atlas")) > 10 and _private_tree(home) == []
