import numpy as np
import torch
from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.deactivation import MATCHERS, DeactivationSpec, deactivation_experiment, summarise
from flowdb.hooks import capture
from flowdb.pack_model import open_pack

SPEC = DeactivationSpec(layers=(3,), samples=6, tokens_per_sample=3, context=48, max_trials=12, seed=1)


def test_deactivation_trials(ingested, smollm2):
    trials = deactivation_experiment(ingested, "tiny", SPEC, model_and_tokenizer=smollm2)
    assert not trials.empty and set(trials["matcher"]) == set(MATCHERS)
    assert (trials["z_old"] > 0).all()
    assert (trials["success"] == (trials["z_new"] <= 0)).all()
    np.testing.assert_allclose(trials["activation_change"], 1 - trials["z_new"] / trials["z_old"])
    summary = summarise(trials)
    assert summary["trials"].sum() == len(trials)
    assert ((summary["success_rate"] >= 0) & (summary["success_rate"] <= 1)).all()


def test_removing_nothing_changes_nothing(ingested, smollm2):
    """The no-edit forward pass on a cut window reproduces the recorded activation, so every
    change measured comes from the removal itself."""
    model, tokenizer = smollm2
    pack = open_pack(ingested, "tiny")
    from flowdb.texts import token_windows

    window = token_windows(tokenizer, "python-stdlib", 1, 48, seed=1)
    with torch.no_grad(), capture(model, ["blocks.3.hook_resid_post"]) as full:
        model(window)
    with torch.no_grad(), capture(model, ["blocks.3.hook_resid_post"]) as cut:
        model(window[:, :21])
    sae = pack.sae(3, "res")
    torch.testing.assert_close(sae.encode(cut["blocks.3.hook_resid_post"][:, 20]),
                               sae.encode(full["blocks.3.hook_resid_post"][:, 20]), rtol=1e-4, atol=1e-4)


def test_deactivation_cli(ingested, tmp_path):
    out = tmp_path / "deact.png"
    result = CliRunner().invoke(cli, ["validate", "deactivation", "tiny", "--layers", "3", "--samples", "4",
                                      "--max-trials", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "success_rate" in result.output and "paper (Gemma 2 2B" in result.output and out.exists()
    assert "by activation group of the target" in result.output and "From " in result.output


def test_feature_direction_is_what_decode_adds(ingested):
    """Removing a * direction for every active feature leaves exactly b_dec: the
    directions are the SAE's own, whatever its decoder-norm convention."""
    from flowdb.pack_model import feature_direction

    sae = open_pack(ingested, "tiny").sae(3, "res")
    assert sae.cfg.rescale_acts_by_decoder_norm  # the case where a * W_dec[i] would be wrong
    codes = sae.encode(torch.randn(2, 576) * 10).detach()
    recon = sae.decode(codes).detach()
    for row in range(2):
        total = sum(codes[row, i] * feature_direction(sae, int(i)) for i in torch.nonzero(codes[row]).flatten())
        torch.testing.assert_close(recon[row] - total, sae.b_dec.detach(), rtol=1e-4, atol=1e-4)
