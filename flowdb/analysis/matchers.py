"""The predecessor matchers the deactivation experiment compares besides top-k cosine
(Laptev et al., Table 1): the data-free one-to-one SAE Match and encoder-aware
match, and data-based Pearson correlation of activations."""

from __future__ import annotations

import numpy as np


def folded_decoder(sae) -> np.ndarray:
    """Decoder rows [width, d] scaled by each feature's JumpReLU threshold, as SAE Match
    folds them (a feature's typical contribution starts at its threshold). SAEs with no
    threshold (TopK, ReLU) keep their decoder rows."""
    import torch

    with torch.no_grad():
        decoder = sae.W_dec.detach().float()
        threshold = getattr(sae, "threshold", None)
        if isinstance(threshold, torch.Tensor) and threshold.shape == (decoder.shape[0],):
            decoder = decoder * threshold.detach().float().unsqueeze(1)
    return decoder.cpu().numpy()


def sae_match(target_folded: np.ndarray, source_folded: np.ndarray) -> np.ndarray:
    """SAE Match (Balagansky et al.): the one-to-one assignment of source features to
    target features minimising the summed squared distance of folded decoder rows.
    Returns, per target feature, its source feature (-1 where widths leave it unmatched)."""
    from scipy.optimize import linear_sum_assignment

    t = target_folded.astype(np.float64)
    s = source_folded.astype(np.float64)
    cost = (t * t).sum(1)[:, None] + (s * s).sum(1)[None, :] - 2 * t @ s.T
    rows, cols = linear_sum_assignment(cost)
    match = np.full(len(t), -1, dtype=np.int64)
    match[rows] = cols
    return match


def pearson_top1(target_codes: np.ndarray, source_codes: np.ndarray) -> np.ndarray:
    """Per target feature, the source feature whose activations over the same tokens
    correlate best with its own (Pearson); -1 where either side never varies."""
    def standardised(codes):
        centred = codes - codes.mean(0)
        spread = np.sqrt((centred ** 2).sum(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return centred / spread, spread > 0

    t, t_ok = standardised(target_codes.astype(np.float64))
    s, s_ok = standardised(source_codes.astype(np.float64))
    correlation = np.where(t_ok[:, None] & s_ok[None, :], np.nan_to_num(t.T @ s), -np.inf)
    best = correlation.argmax(1)
    return np.where(t_ok & s_ok.any(), best, -1)


def encoder_top1(target_sae, source_sae) -> np.ndarray:
    """Per target feature, the source feature whose unit decoder row the target's unit
    encoder column (W_enc[:, f]) reads most: the predecessor the target's own detector
    responds to, rather than the one its output direction resembles (exact top-1)."""
    from flowdb.flow.matching import top_k

    queries = target_sae.W_enc.detach().float().T.numpy()
    return top_k(queries, source_sae.W_dec.detach().float().numpy(), 1)[1][:, 0].astype(np.int64)
