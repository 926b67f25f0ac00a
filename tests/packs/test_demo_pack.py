import json

import pytest
import torch
from sae_lens import SAE

from flowdb.errors import FlowdbError
from flowdb.lm.hooks import capture
from flowdb.lm.texts import token_windows
from flowdb.packs.demo_pack import BUDGETS, budget_spec, build_demo_pack, manifest_text, sae_quality
from flowdb.packs.manifest import load_manifest
from flowdb.store.ingest import ingest
from helpers import ROOT

SPEC = BUDGETS["tiny"]


def test_pack_is_saelens_format_with_quality(tiny_pack):
    out, quality = tiny_pack
    assert len(quality) == 9 and set(quality["module"]) == {"res", "mlp", "att"}
    assert (quality["dead_fraction"] < 0.9).all() and (quality["l0"] < SPEC.width / 2).all()
    assert (quality["explained_variance"] > 0.5).all(), quality
    sae = SAE.load_from_disk(str(out / "saes" / "mlp" / "layer_3"))
    assert type(sae).__name__ == "JumpReLUSAE" and (sae.threshold > 0).all()  # Gemma Scope's architecture
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_mlp_out" and sae.W_dec.shape == (512, 576)
    assert json.loads((out / "spec.json").read_text())["width"] == 512
    assert (out / "manifest.toml").read_text() == manifest_text(SPEC)
    assert not (out / "activations").exists() and not list(out.parent.glob(".*partial*"))
    again_out, again = build_demo_pack(SPEC, show_progress=False)  # cached: no model needed
    assert again.equals(quality)


def test_a_built_pack_is_never_overwritten(tiny_pack):
    """Other settings under the same name are refused, and the pack's files stay as they were."""
    out, _ = tiny_pack
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(FlowdbError, match="another --name"):
        build_demo_pack(budget_spec("tiny", width=256), show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_each_sae_reconstructs_its_own_hook_best(tiny_pack, smollm2):
    """The mapping test: an SAE explains activations at its hook far better than at the
    neighbouring hook points of the same layer."""
    out, _ = tiny_pack
    model, tokenizer = smollm2
    windows = token_windows(tokenizer, "python-docs", 6, 64, seed=99)  # texts not trained on
    points = {"res": "blocks.3.hook_resid_post", "mlp": "blocks.3.hook_mlp_out",
              "att": "blocks.3.hook_attn_out", "pre": "blocks.3.hook_resid_pre"}
    with torch.no_grad(), capture(model, list(points.values())) as acts:
        model(windows)
    flat = {name: acts[hook][:, 1:].reshape(-1, 576) for name, hook in points.items()}
    for module, own in (("res", "res"), ("mlp", "mlp"), ("att", "att")):
        sae = SAE.load_from_disk(str(out / "saes" / module / "layer_3"))
        scores = {name: sae_quality(sae, x)["explained_variance"] for name, x in flat.items()}
        # One layer changes the residual stream little (that is what makes features
        # "translated"), so resid_pre is no foil for the residual SAE: the module
        # outputs are.
        others = [v for name, v in scores.items() if name != own and not (own == "res" and name == "pre")]
        assert scores[own] > max(others) + 0.2, (module, scores)


def test_demo_pack_ingests_from_its_own_manifest(tiny_pack, db):
    out, _ = tiny_pack
    manifest = load_manifest(out / "manifest.toml")
    report = ingest(manifest, db, show_progress=False)
    assert report.match_edges == 512 * 5 * 8  # layer 2: mlp, att; layers 3 and 4: res, mlp, att
    assert sum(report.categories.values()) == 3 * 512


def test_shipped_manifest_is_the_default_budgets():
    import tomllib

    shipped = ROOT / "ingest" / "smollm2-135m-demo.toml"
    assert tomllib.loads(shipped.read_text()) == tomllib.loads(manifest_text(BUDGETS["default"]))


def test_build_cli_reuses_the_pack_and_refuses_other_settings(tiny_pack):
    from click.testing import CliRunner

    from flowdb.cli import cli

    out, quality = tiny_pack
    result = CliRunner().invoke(cli, ["demo-pack", "build", "--budget", "tiny", "--no-progress"])
    assert result.exit_code == 0, result.output
    residual = quality.loc[quality["module"] == "res", "explained_variance"].mean()
    assert f"residual mean {residual:.3f}" in result.output and str(out / "manifest.toml") in result.output
    result = CliRunner().invoke(cli, ["demo-pack", "build", "--budget", "tiny", "--l0", "8"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "another --name" in result.output
