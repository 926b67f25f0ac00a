"""A pack whose MLP module is a transcoder set, ingested and linked in a real Neo4j: its
flow edges are the brute-force cosines of the decoder rows, its chance thresholds those of
SAEs of that width and dimension, and `flowdb link` pairs it with MLP SAEs of that space."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_transcoder_sets import REFUSALS
from transcoder_sets import transcoder_manifest, write_transcoder_set

from flowdb.classify import chance_cosine
from flowdb.cli import cli
from flowdb.packs.manifest import load_manifest
from flowdb.store.ingest import ingest
from helpers import assert_edges_equal_brute_force

LAYERS = 4


def test_flow_edges_thresholds_and_link_as_for_mlp_saes(db, planted_pack, tmp_path):
    pack_dir = planted_pack[0]
    set_dir = write_transcoder_set(pack_dir, tmp_path / "set", LAYERS)
    ingest(load_manifest(transcoder_manifest(pack_dir, set_dir, tmp_path / "tc.toml")), db)
    ingest(load_manifest(pack_dir / "manifest.toml"), db)
    # The set's W_dec rows are the planted MLP SAEs': the SAE files are the reference.
    assert assert_edges_equal_brute_force(db, "planted-tc", pack_dir, LAYERS, 1) > 0

    def residual_saes(pack):
        return {row["layer"]: row["p"] for row in db.read(
            "MATCH (s:SAE {pack: $pack, module: 'res'}) RETURN s.layer AS layer, "
            "s {.t_res, .t_mlp, .t_att, .chance_res, .chance_mlp, .chance_att, .threshold_rule} AS p", pack=pack)}

    assert residual_saes("planted-tc") == residual_saes("planted")
    assert residual_saes("planted-tc")[1]["chance_mlp"] == pytest.approx(chance_cosine(0.999, 512, 256))
    mlp = db.read("MATCH (s:SAE {pack: 'planted-tc', module: 'mlp'}) RETURN s.kind AS kind, "
                  "s.hook_name AS hook, s.d_sae AS d_sae ORDER BY s.layer")
    assert mlp == [{"kind": "transcoders", "hook": f"blocks.{layer}.hook_mlp_out", "d_sae": 512}
                   for layer in range(LAYERS)]

    result = CliRunner().invoke(cli, ["link", "planted-tc", "planted", "--modules", "mlp", "--k", "1"])
    assert result.exit_code == 0, result.output
    aligned = db.read("MATCH (a:Feature {pack: 'planted-tc', module: 'mlp'})-[r:ALIGNS]->(b:Feature {pack: 'planted'}) "
                      "RETURN a.layer AS layer, a.index AS a, b.index AS b, r.cosine AS cosine, r.category AS category")
    assert len(aligned) == LAYERS * 512
    assert all(row["a"] == row["b"] and row["cosine"] == pytest.approx(1, abs=1e-5) and row["category"] == "kept"
               for row in aligned)


@pytest.mark.parametrize("case", ["cross-layer", "output hook", "missing layer", "W_enc transposed", "d_model"])
def test_a_refused_set_stores_nothing(db, planted_pack, tmp_path, case):
    damage, message = REFUSALS[case]
    set_dir = write_transcoder_set(planted_pack[0], tmp_path / "set", LAYERS)
    damage(set_dir, planted_pack[0])
    manifest = transcoder_manifest(planted_pack[0], set_dir, tmp_path / "m.toml")
    result = CliRunner().invoke(cli, ["ingest", str(manifest)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0], lines[0]
    assert db.read("MATCH (n) WHERE NOT n:Lock RETURN count(n) AS n")[0]["n"] == 0
