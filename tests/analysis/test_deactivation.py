"""The deactivation experiment (Table 1) on the tiny demo pack."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from flowdb.analysis.deactivation import (
    MATCHERS,
    BlockReplay,
    DeactivationSpec,
    deactivation_experiment,
    summarise,
    with_ceiling,
)
from flowdb.analysis.pack_model import feature_direction, open_pack
from flowdb.cli import cli
from flowdb.lm.hooks import capture, hook_point, intervene
from flowdb.lm.texts import sample_tokens, token_windows

SPEC = DeactivationSpec(layers=(3,), samples=8, tokens_per_sample=3, context=40, max_targets=25, seed=1,
                        ceiling=True)


def test_block_replay_is_the_whole_model(ingested, smollm2):
    """Removals replayed through block 3 alone give R_3 as the whole model does with the
    same edit made by a hook (computed window by window, no batching)."""
    model, tokenizer = smollm2
    windows = token_windows(tokenizer, "mixed", 3, 24, seed=2)
    replay = BlockReplay(model, 3, windows)
    rng = np.random.default_rng(0)
    rows = [(0, 5, "res"), (1, 9, "att"), (2, 23, "mlp"), (2, 4, "res"), (0, 17, "att")]
    deltas = {place: np.zeros((len(rows), 576), dtype=np.float32) for place in ("res", "mlp", "att")}
    for n, (_, _, place) in enumerate(rows):
        deltas[place][n] = rng.normal(scale=2.0, size=576)
    replayed = replay.run([w for w, _, _ in rows], [p for _, p, _ in rows], deltas)
    for n, (w, p, place) in enumerate(rows):
        hook = hook_point(place, 2 if place == "res" else 3)
        delta = torch.as_tensor(deltas[place][n])

        def edit(h, p=p, delta=delta):
            h = h.clone()
            h[:, p] -= delta
            return h

        with torch.no_grad(), intervene(model, {hook: edit}), capture(model, ["blocks.3.hook_resid_post"]) as acts:
            model(windows[w:w + 1])
        torch.testing.assert_close(replayed[n], acts["blocks.3.hook_resid_post"][0, p], rtol=1e-4, atol=1e-4)


def test_table1_trials(ingested, smollm2):
    """One run of the experiment with its ceiling control, checked six ways (helpers below);
    without --ceiling the real trials are the same."""
    trials = deactivation_experiment(ingested, "tiny", SPEC, model_and_tokenizer=smollm2)
    _consistent(trials)
    _exhaustive_is_the_upper_bound(trials)
    real = trials[trials["reading"] == "real"]
    _top1_and_permutation_picks_from_the_sae_files(real, ingested)
    _summary_intervals(real)
    _ceiling_reads_r_with_the_target_sae(trials, ingested, smollm2)
    _ceiling_summary(trials)
    # The ceiling control leaves the real trials as they are: on a smaller run, with and without it.
    small = replace(SPEC, samples=2, max_targets=6)
    both = deactivation_experiment(ingested, "tiny", small, model_and_tokenizer=smollm2)
    alone = deactivation_experiment(ingested, "tiny", replace(small, ceiling=False), model_and_tokenizer=smollm2)
    assert set(alone["reading"]) == {"real"} and len(alone) > 0
    pd.testing.assert_frame_equal(alone, both[both["reading"] == "real"].reset_index(drop=True))


def _consistent(trials):
    assert not trials.empty and set(trials["matcher"]) == set(MATCHERS)
    assert set(trials["reading"]) == {"real", "ceiling"}
    assert set(trials.loc[trials["reading"] == "ceiling", "place"]) == {"RES"}
    assert set(trials.loc[trials["matcher"] == "permutation", "place"]) == {"RES"}
    assert (trials["z_old"] > 0).all()
    assert (trials["success"] == (trials["z_new"] <= 0)).all()
    np.testing.assert_allclose(trials["activation_change"], 1 - trials["z_new"] / trials["z_old"])


def _exhaustive_is_the_upper_bound(trials):
    """No single removal lowers a target more than the exhaustive search's."""
    keys = ["window", "position", "feature", "place", "reading"]
    best = trials[trials["matcher"] == "exhaustive"].set_index(keys)["z_new"]
    singles = trials[(trials["matcher"] != "exhaustive") & (trials["removed"].map(len) == 1)]
    joined = singles.join(best.rename("z_best"), on=keys)
    assert joined["z_best"].notna().all()
    assert (joined["z_best"] <= joined["z_new"] + 1e-6).all()


def _top1_and_permutation_picks_from_the_sae_files(trials, db):
    """top-1 removes the best cosine match of unit decoder rows; permutation removes the
    partner of scipy's assignment on threshold-folded decoders (computed here from the SAEs)."""
    pack = open_pack(db, "tiny")
    target = pack.sae(3, "res").W_dec.detach().numpy()
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    for place, layer in (("RES", 2), ("MLP", 3), ("ATT", 3)):
        source = pack.sae(layer, place.lower()).W_dec.detach().numpy()
        best = (unit(target) @ unit(source).T).argmax(1)
        top1 = trials[(trials["matcher"] == "top-1") & (trials["place"] == place)]
        assert len(top1) and all(removed == (best[f],) for f, removed in zip(top1["feature"], top1["removed"]))
        # encoder: the best cosine of the target's unit encoder column with unit decoder rows
        reads = (unit(pack.sae(3, "res").W_enc.detach().numpy().T) @ unit(source).T).argmax(1)
        enc = trials[(trials["matcher"] == "encoder") & (trials["place"] == place)]
        assert len(enc) and all(removed == (reads[f],) for f, removed in zip(enc["feature"], enc["removed"]))
    res_target, res_source = pack.sae(3, "res"), pack.sae(2, "res")
    fold = lambda sae: sae.W_dec.detach().numpy() * sae.threshold.detach().numpy()[:, None]  # noqa: E731
    rows, cols = linear_sum_assignment(cdist(fold(res_target), fold(res_source), "sqeuclidean"))
    partner = dict(zip(rows, cols))
    perm = trials[trials["matcher"] == "permutation"]
    assert len(perm) and all(removed == (partner[f],) for f, removed in zip(perm["feature"], perm["removed"]))


def _summary_intervals(trials):
    summary = summarise(trials, ("matcher",))
    assert summary["trials"].sum() == len(trials)
    assert list(summary["matcher"]) == [m for m in MATCHERS if m in set(trials["matcher"])]
    assert (summary["success_lo"] <= summary["success_rate"]).all()
    assert (summary["success_rate"] <= summary["success_hi"]).all()
    top1 = trials[trials["matcher"] == "top-1"]
    assert summary.set_index("matcher").loc["top-1", "success_rate"] == pytest.approx(top1["success"].mean())


def _ceiling_reads_r_with_the_target_sae(trials, db, smollm2):
    """In the control a feature's R-place top-1 is itself, its encoder pick is read from the
    target SAE alone, and a top-1 removal equals the whole model's with R_2 edited by a hook:
    R_2 minus (the target SAE's code of f on R_2) x (f's direction)."""
    model, tokenizer = smollm2
    control = trials[trials["reading"] == "ceiling"]
    top1 = control[control["matcher"] == "top-1"]
    assert len(top1) and all(removed == (f,) for f, removed in zip(top1["feature"], top1["removed"]))
    sae = open_pack(db, "tiny").sae(3, "res")
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    reads = (unit(sae.W_enc.detach().numpy().T) @ unit(sae.W_dec.detach().numpy()).T).argmax(1)
    enc = control[control["matcher"] == "encoder"]
    assert len(enc) and all(removed == (reads[f],) for f, removed in zip(enc["feature"], enc["removed"]))
    windows, _ = sample_tokens(tokenizer, SPEC.texts, SPEC.samples, SPEC.context, SPEC.tokens_per_sample,
                               SPEC.seed, np.random.default_rng(SPEC.seed))
    for row in top1.head(4).itertuples():
        with torch.no_grad(), capture(model, ["blocks.2.hook_resid_post"]) as acts:
            model(windows[row.window:row.window + 1])
        code = sae.encode(acts["blocks.2.hook_resid_post"][0, row.position][None])[0, row.feature].detach()
        assert code > 0
        delta = code * feature_direction(sae, row.feature)

        def edit(h, p=row.position, delta=delta):
            h = h.clone()
            h[:, p] -= delta
            return h

        with torch.no_grad(), intervene(model, {"blocks.2.hook_resid_post": edit}), \
                capture(model, ["blocks.3.hook_resid_post"]) as acts:
            model(windows[row.window:row.window + 1])
            z = float(sae.encode(acts["blocks.3.hook_resid_post"][0, row.position][None])[0, row.feature])
        assert z == pytest.approx(row.z_new, abs=1e-3)


def _ceiling_summary(trials):
    """with_ceiling against pandas means: the control is its RES trials plus the real M and A ones."""
    table = with_ceiling(trials, ("matcher",)).set_index("matcher")
    real = trials[trials["reading"] == "real"]
    control = pd.concat([trials[trials["reading"] == "ceiling"], real[real["place"] != "RES"]])
    for matcher in ("top-1", "encoder", "exhaustive"):
        mine, theirs = real[real["matcher"] == matcher], control[control["matcher"] == matcher]
        assert table.loc[matcher, "success_rate"] == pytest.approx(mine["success"].mean())
        assert table.loc[matcher, "ceiling_success_rate"] == pytest.approx(theirs["success"].mean())
        assert table.loc[matcher, "ceiling_activation_change"] == pytest.approx(theirs["activation_change"].mean())
        assert table.loc[matcher, "ceiling_trials"] == len(theirs)
        if theirs["success"].any():
            assert table.loc[matcher, "fraction_of_ceiling"] == pytest.approx(
                mine["success"].mean() / theirs["success"].mean())


def test_deactivation_and_curve_cli(ingested, tmp_path):
    out, table = tmp_path / "table1.png", tmp_path / "table1.csv"
    result = CliRunner().invoke(cli, ["validate", "deactivation", "tiny", "--layers", "3", "--samples", "4",
                                      "--max-targets", "6", "--csv", str(table), "--out", str(out), "--ceiling"])
    assert result.exit_code == 0, result.output
    assert "paper_success" in result.output and "removals in" in result.output and out.exists()
    assert "ceiling control" in result.output and "fraction_of_ceiling" in result.output
    written = pd.read_csv(table)
    assert set(written["matcher"]) <= set(MATCHERS) and written["train_tokens"].iloc[0] == 12_000
    assert {"ceiling_success_rate", "ceiling_activation_change", "fraction_of_ceiling"} <= set(written)
    top1 = written.set_index("matcher").loc["top-1"]
    assert 0 <= top1["ceiling_success_rate"] <= 1 and written["ceiling_success_rate"].dropna().between(0, 1).all()
    curve = tmp_path / "curve.png"
    result = CliRunner().invoke(cli, ["validate", "curve", str(table), "--out", str(curve)])
    assert result.exit_code == 0, result.output
    assert curve.exists()


def test_a_layer_without_its_predecessor_is_refused(ingested):
    result = CliRunner().invoke(cli, ["validate", "deactivation", "tiny", "--layers", "2"])
    assert result.exit_code == 1 and "needs layers 1 and 2" in result.output


def test_feature_direction_is_what_decode_adds(ingested):
    """Removing a * direction for every active feature leaves exactly b_dec: the
    directions are the SAE's own, whatever its decoder-norm convention."""
    from flowdb.analysis.pack_model import feature_direction

    sae = open_pack(ingested, "tiny").sae(3, "res")
    codes = sae.encode(torch.randn(2, 576) * 10).detach()
    recon = sae.decode(codes).detach()
    for row in range(2):
        total = sum(codes[row, i] * feature_direction(sae, int(i)) for i in torch.nonzero(codes[row]).flatten())
        torch.testing.assert_close(recon[row] - total, sae.b_dec.detach(), rtol=1e-4, atol=1e-4)
