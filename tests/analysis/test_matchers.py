"""The Table 1 matchers against independent computations."""

import itertools

import numpy as np
import torch

from flowdb.analysis.matchers import folded_decoder, pearson_top1, sae_match
from flowdb.analysis.stats import mean_interval


def test_sae_match_is_the_cheapest_permutation():
    rng = np.random.default_rng(3)
    target, source = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    cost = lambda perm: sum(((target[i] - source[j]) ** 2).sum() for i, j in enumerate(perm))  # noqa: E731
    best = min(itertools.permutations(range(6)), key=cost)
    assert tuple(sae_match(target, source)) == best


def test_sae_match_recovers_a_shuffled_decoder():
    rng = np.random.default_rng(4)
    source = rng.normal(size=(300, 16))
    order = rng.permutation(300)
    target = source[order] + rng.normal(scale=0.01, size=(300, 16))
    np.testing.assert_array_equal(sae_match(target, source), order)


def test_sae_match_leaves_extra_targets_unmatched():
    rng = np.random.default_rng(5)
    match = sae_match(rng.normal(size=(5, 3)), rng.normal(size=(3, 3)))
    assert sorted(match[match >= 0]) == [0, 1, 2] and (match == -1).sum() == 2


def test_pearson_top1_is_numpy_corrcoef_argmax():
    rng = np.random.default_rng(6)
    target = np.maximum(rng.normal(size=(400, 7)), 0)
    source = np.maximum(rng.normal(size=(400, 9)), 0)
    source[:, 2] = target[:, 0] * 2 + 0.1 * rng.normal(size=400)
    source[:, 5] = 0.0  # never varies: never a match
    picks = pearson_top1(target, source)
    full = np.corrcoef(target.T, source.T)[:7, 7:]
    full[:, 5] = -np.inf
    np.testing.assert_array_equal(picks, np.nanargmax(full, axis=1))
    assert picks[0] == 2


def test_pearson_top1_of_a_silent_target_is_none():
    target = np.zeros((50, 2))
    target[:, 1] = np.arange(50)
    picks = pearson_top1(target, np.random.default_rng(1).normal(size=(50, 3)))
    assert picks[0] == -1 and picks[1] >= 0


def test_folded_decoder_scales_rows_by_the_threshold():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=3))
    with torch.no_grad():
        sae.W_dec.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4))
        sae.threshold.copy_(torch.tensor([0.5, 2.0, 0.0]))
    expected = np.arange(12, dtype=np.float32).reshape(3, 4) * np.array([[0.5], [2.0], [0.0]])
    np.testing.assert_allclose(folded_decoder(sae), expected)


def test_mean_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(30) < 0.6, rng.random(3000) < 0.6
    lo, hi = mean_interval(small, np.random.default_rng(1))
    assert lo <= small.mean() <= hi
    lo2, hi2 = mean_interval(large, np.random.default_rng(1))
    assert lo2 <= large.mean() <= hi2 and hi2 - lo2 < (hi - lo) / 4
    # Binomial standard error: the 95% interval is about +-1.96 sigma.
    sigma = np.sqrt(0.6 * 0.4 / 3000)
    assert abs((hi2 - lo2) - 2 * 1.96 * sigma) < 0.01
