import numpy as np
import pytest

from flowdb.matching import normalise, top_k


def brute_force(queries, base, k):
    cos = normalise(queries) @ normalise(base).T
    order = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cos, order, axis=1), order


@pytest.mark.parametrize("k", [1, 5, 10])
def test_top_k_equals_brute_force(k):
    rng = np.random.default_rng(k)
    queries = rng.standard_normal((700, 96)).astype(np.float32) * rng.uniform(0.1, 5, (700, 1))
    base = rng.standard_normal((300, 96)).astype(np.float32)
    scores, indices = top_k(normalise(queries), normalise(base), k, chunk=128)  # several chunks
    ref_scores, ref_indices = brute_force(queries, base, k)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # Indices may differ only where two cosines tie.
    differ = indices != ref_indices
    assert np.all(np.abs(scores[differ] - ref_scores[differ]) < 1e-6)
    assert differ.mean() < 0.01


def test_normalise_gives_unit_rows():
    x = np.random.default_rng(0).standard_normal((10, 7)) * 9
    np.testing.assert_allclose(np.linalg.norm(normalise(x), axis=1), 1.0, rtol=1e-6)
