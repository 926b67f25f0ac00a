import json

import pandas as pd
import pytest
from click.testing import CliRunner

from flowdb.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_command(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    for command in ("neo4j", "synth", "ingest", "export", "query", "packs"):
        assert command in result.output


def test_synth_writes_pack_manifest_and_truth(runner, tmp_path):
    result = invoke(runner, "synth", tmp_path / "p", "--layers", 2, "--width", 64, "--d-model", 64)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "manifest.toml").exists()
    truth = pd.read_csv(tmp_path / "p" / "truth.csv")
    assert len(truth) == 2 * 64 and set(truth["layer"]) == {0, 1}
    for module in ("res", "mlp", "att"):
        assert (tmp_path / "p" / "saes" / module / "layer_1" / "sae_weights.safetensors").exists()


def test_synth_companions_writes_split_and_drift_packs(runner, tmp_path):
    result = invoke(runner, "synth", tmp_path / "p", "--layers", 2, "--width", 64, "--d-model", 128,
                    "--name", "base", "--companions")
    assert result.exit_code == 0, result.output
    for kind in ("split", "drift"):
        assert f"(base-{kind})" in result.output
        truth = pd.read_csv(tmp_path / "p" / kind / "truth.csv")
        assert (truth["side"] == "a").sum() == 2 * 64  # every base residual feature, at both layers
        assert (tmp_path / "p" / kind / "saes" / "res" / "layer_1" / "sae_weights.safetensors").exists()
        assert not (tmp_path / "p" / kind / "saes" / "mlp").exists()


def test_synth_companions_refuses_a_small_d_model(runner, tmp_path):
    result = invoke(runner, "synth", tmp_path / "p", "--d-model", 64, "--companions")
    assert result.exit_code == 1 and "--d-model >= " in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_synth_rejects_tiny_space(runner, tmp_path):
    result = invoke(runner, "synth", tmp_path / "p", "--d-model", 8)
    assert result.exit_code == 2 and "--d-model" in result.output


def test_ingest_export_and_query(runner, db, planted_pack, tmp_path):
    manifest = planted_pack[0] / "manifest.toml"
    result = invoke(runner, "ingest", manifest, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "planted: built build" in result.output and "5632 match edges + " in result.output
    again = invoke(runner, "ingest", manifest, "--no-progress")
    assert again.exit_code == 0 and "nothing to do" in again.output
    conflict = invoke(runner, "ingest", manifest, "--k", 2)
    assert conflict.exit_code == 1
    assert conflict.output.startswith("Error: pack 'planted' is already stored from other SAE files or parameters")
    assert conflict.output.count("\n") == 1
    for suffix, reader in ((".csv", pd.read_csv), (".parquet", pd.read_parquet)):
        out = tmp_path / f"edges{suffix}"
        result = invoke(runner, "export", "planted", "--out", out)
        assert result.exit_code == 0, result.output
        edges = reader(out)
        assert list(edges.columns) == ["source", "target", "kind", "cosine", "rank", "above", "source_layer",
                                       "source_module", "source_index", "target_index", "layer"]
        assert len(edges) == 5632 and set(edges["kind"]) == {"RESIDUAL", "MLP", "ATTENTION"}
    lineage = invoke(runner, "query", "lineage", "-p", "feature=planted/3/res/0", "--format", "json")
    assert lineage.exit_code == 0, lineage.output
    rows = json.loads(lineage.stdout)  # stderr says which thresholds applied
    assert rows and {row["step_key"] for row in rows} >= {"planted/3/res/0"}
    listed = invoke(runner, "packs")
    assert "planted\tplanted-model\tlayers 0-3\tk=1\tthresholds auto\tcomplete" in listed.output


def test_threshold_flags_change_the_build(runner, db, planted_pack):
    manifest = planted_pack[0] / "manifest.toml"
    assert invoke(runner, "ingest", manifest).exit_code == 0
    result = invoke(runner, "ingest", manifest, "--t-res", 0.9, "--replace")
    assert result.exit_code == 0 and "replaced build" in result.output
    stored = db.read("MATCH (s:SAE {pack: 'planted', module: 'res'}) RETURN DISTINCT s.t_res AS t")
    assert stored == [{"t": 0.9}]


@pytest.mark.parametrize("args, message", [
    (("query", "nosuch"), "Error: no query template named 'nosuch'; known:"),
    (("query", "lineage"), "Error: template lineage needs parameter feature"),
    (("query", "lineage", "-p", "feature=x", "-p", "colour=red"), "has no parameter(s) colour"),
    (("query", "lineage", "-p", "feature=x", "-p", "max_rank=two"), "max_rank must be int"),
])
def test_query_errors_are_one_line(runner, args, message):
    result = invoke(runner, *args)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1


def test_query_list_and_explain(runner):
    listed = invoke(runner, "query", "--list")
    assert listed.exit_code == 0 and "lineage" in listed.output and "edges" in listed.output
    explained = invoke(runner, "query", "lineage", "--explain")
    assert explained.exit_code == 0 and "// param: feature string required" in explained.output


def test_export_errors(runner, db, tmp_path):
    missing = invoke(runner, "export", "nosuch", "--out", tmp_path / "x.csv")
    assert missing.exit_code == 1 and "Error: no pack named 'nosuch'" in missing.output
    wrong = invoke(runner, "export", "nosuch", "--out", tmp_path / "x.txt")
    assert wrong.exit_code == 1 and ".csv or .parquet" in wrong.output


def test_bad_manifest_is_one_line_and_exit_1(runner, tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('name = "x"\nmodel = "m"\nlayers = [0, 1]\ncolour = 1\n[modules.res]\npath = "a"\n')
    result = invoke(runner, "ingest", path)
    assert result.exit_code == 1
    assert "unknown key(s) 'colour' in the manifest" in result.output and result.output.count("\n") == 1


def test_unreachable_neo4j_is_a_clear_error(runner, planted_pack):
    result = invoke(runner, "ingest", planted_pack[0] / "manifest.toml", "--uri", "bolt://127.0.0.1:1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: no Neo4j answers at bolt://127.0.0.1:1")


def test_neo4j_status(runner, neo4j_settings, monkeypatch):
    if neo4j_settings.managed:  # the session's server is flowdb's own
        result = invoke(runner, "neo4j", "status")
        assert result.exit_code == 0 and result.output.startswith("running: bolt://127.0.0.1:")
    from conftest import _free_port

    monkeypatch.setenv("FLOWDB_NEO4J_PORT", str(_free_port()))
    result = invoke(runner, "neo4j", "status")
    assert result.exit_code == 1 and "not answering" in result.output


def test_a_closed_output_pipe_ends_quietly():
    """`flowdb ... | head` closes the pipe early: no error line, no traceback."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "flowdb.cli", "query", "--list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr
