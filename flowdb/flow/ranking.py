"""Exact ranking of cosine blocks: unit rows, each row's top-k of a score block, and
the merge of two partial top-k lists. Equal scores always go to the lower column, as
one stable sort of the whole row would order them, so every backend ranks ties alike."""

from __future__ import annotations

import numpy as np

from flowdb.errors import FlowdbError

GROUP_SIZE = 16  # columns per group in top_k_rows: one max per group, then only the best groups are read


def normalise(w_dec: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unit-length rows as C-contiguous float32 (what FAISS takes), into `out` (float32,
    w_dec's shape) when given, else into a new array."""
    w = np.ascontiguousarray(w_dec, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", w, w))[:, None]  # one pass; np.linalg.norm takes three
    return np.divide(w, norms, out=np.empty_like(w) if out is None else out)


def merge_top_k(scores_a, indices_a, scores_b, indices_b, k: int):
    """The k best of two partial top-k lists per row (either may be None), best first;
    equal scores keep the lower base index, as one search over the whole base would."""
    if scores_a is None:
        return scores_b, indices_b
    scores = np.concatenate([scores_a, scores_b], axis=1)
    indices = np.concatenate([indices_a, indices_b], axis=1)
    order = np.lexsort((indices, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest scores and their columns, best first, equal scores by lower
    column: exactly what a full sort gives, at about one streaming pass over the block.

    The columns are cut into groups (column c belongs to group c mod G, so each group's
    max is an elementwise maximum of contiguous slices, which numpy vectorises). Let t
    be a row's k-th largest group max: k distinct entries are >= t, so the row's k-th
    largest score is >= t, and every entry of its top-k (ties included) is >= t and
    lies in a group whose max is >= t. Only those groups, usually k of them, are read
    again and sorted. argpartition over the whole block costs several times more.
    """
    n, m = scores.shape
    if k > m:
        raise FlowdbError(f"k={k} exceeds the {m} columns it would search")
    size = max(1, min(GROUP_SIZE, m // k))  # at least k groups
    groups = m // size
    grouped = groups * size
    maxima = scores[:, :grouped].reshape(n, size, groups).max(axis=1)
    if grouped < m:  # the last columns are groups of one
        maxima = np.concatenate([maxima, scores[:, grouped:]], axis=1)
    if np.isnan(maxima).any():
        raise FlowdbError("a cosine is NaN: a decoder row is all zeros or not finite")
    kth = maxima.shape[1] - k
    threshold = np.partition(maxima, kth, axis=1)[:, kth]
    rows, group = np.nonzero(maxima >= threshold[:, None])
    members = np.full((maxima.shape[1], size), -1, dtype=np.int64)
    members[:groups] = np.arange(groups)[:, None] + groups * np.arange(size)
    members[groups:, 0] = np.arange(grouped, m)
    columns = members[group]
    values = scores[rows[:, None], np.maximum(columns, 0)]
    keep = (columns >= 0) & (values >= threshold[rows][:, None])
    rows = np.broadcast_to(rows[:, None], columns.shape)[keep]
    columns, values = columns[keep], values[keep]
    order = np.lexsort((columns, -values, rows))
    rows, columns, values = rows[order], columns[order], values[order]
    counts = np.bincount(rows, minlength=n)  # >= k in every row, by the argument above
    pick = (np.cumsum(counts) - counts)[:, None] + np.arange(k)
    return values[pick], columns[pick]
