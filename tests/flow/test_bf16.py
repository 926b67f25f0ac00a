"""torch-bf16: the rounding bound, the certificate, its fp32 fallback, and exactness.

Expected values come from float64 numpy, independently of flowdb's search."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flowdb.errors import FlowdbError  # noqa: E402
from flowdb.flow.bf16 import RHO, CertifiedSearch, Rounded, error_bound, rescore_numpy, rescore_torch  # noqa: E402
from flowdb.flow.matching import Matcher  # noqa: E402
from helpers import brute_force_top_k as brute_force  # noqa: E402


def unit(x):
    return (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def assert_exact(found, queries, base, k):
    """Scores equal float64 brute force within 1e-5; each index has its rank's score
    (indices may differ only between tied cosines); no index twice in a row."""
    scores, indices = found
    ref_scores, ref_indices, cos = brute_force(queries, base, k)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(cos, indices, axis=1), ref_scores, atol=1e-5)
    assert all(len(set(row)) == k for row in indices.tolist())


def clustered(n_queries, n_base, d, spread=0.025, seed=0):
    """Directions round one centre: cosines 1e-4 apart, far below bf16's rounding, so
    the bf16 order differs from the exact one in most rows."""
    rng = np.random.default_rng(seed)
    centre = unit(rng.standard_normal((1, d)))
    base = centre + spread * rng.standard_normal((n_base, d)).astype(np.float32)
    queries = centre + spread * rng.standard_normal((n_queries, d)).astype(np.float32)
    return queries, base


def tied_at_k(n_queries, n_base, d, k, seed=0):
    """Each query's k-th and (k+1)-th places are two copies of one base row, far apart
    in the base (so one copy can fall outside the candidates): q = 2 (u_1 + ... + u_(k-1))
    + u_c over orthonormal rows u, above every random row's cosine."""
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((n_base, d)))
    base[:20 + 2 * k] = np.linalg.qr(rng.standard_normal((d, 20 + 2 * k)))[0].T
    half = n_base // 2
    base[half:half + 20] = base[:20]
    top = np.stack([rng.choice(np.arange(20, 20 + 2 * k), k - 1, replace=False) for _ in range(n_queries)])
    queries = 2 * base[top].sum(axis=1) + base[np.arange(n_queries) % 20]
    return queries.astype(np.float32), base


@pytest.mark.parametrize("d", [37, 64, 300, 2304])
@pytest.mark.parametrize("scale", ["unit", "raw"])
def test_the_bound_holds_where_bf16_and_exact_orders_differ(d, scale):
    queries, base = clustered(48, 500, d, seed=d)
    if scale == "raw":  # non-unit rows: the bound is in their norms
        rng = np.random.default_rng(1)
        queries = queries * rng.uniform(0.05, 20, (48, 1)).astype(np.float32)
        base = base * rng.uniform(0.05, 20, (500, 1)).astype(np.float32)
    else:
        queries, base = unit(queries), unit(base)
    q, b = Rounded.of(queries), Rounded.of(base)
    out = (q.rounded @ b.rounded.T).float().numpy().astype(np.float64)  # the real bf16 GEMM
    exact = queries.astype(np.float64) @ base.astype(np.float64).T
    e, r = error_bound(q, b)
    assert np.all(np.abs(exact - out) <= e[:, None] + np.abs(out) * RHO)
    # The orders really differ, and the bound is the tight one (~0.0025 for unit rows).
    assert (np.argsort(-out, axis=1, kind="stable")[:, :5] != np.argsort(-exact, axis=1)[:, :5]).any()
    if scale == "unit":
        assert e.max() < 0.005 and r.max() < 3e-4  # the simulated bound was 0.008


@pytest.mark.parametrize("d", [37, 61, 128])
@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("extra", [2, 16])
def test_near_ties_are_exact_and_some_rows_go_on_to_longer_lists_or_fp32(d, k, extra):
    # Half the rows clustered (their top-k within the bound of each other), half random.
    queries, base = clustered(80, 600, d, seed=k)
    rng = np.random.default_rng(d)
    queries[40:], base[300:] = rng.standard_normal((40, d)), rng.standard_normal((300, d))
    search = CertifiedSearch(extra=extra)
    assert_exact(search(unit(queries), unit(base), k), queries, base, k)
    assert 0 < search.rows_widened < search.rows == 80
    assert search.rows_redone <= search.rows_widened
    if extra == 2:  # k + 8 candidates cannot settle a cluster of 300 within the bound: fp32 does
        assert search.rows_redone > 0


def test_with_no_extra_candidates_every_row_falls_back_to_fp32_and_is_right():
    queries, base = clustered(64, 300, 48, spread=0.3, seed=2)
    search = CertifiedSearch(extra=0)
    assert_exact(search(unit(queries), unit(base), 5), queries, base, 5)
    assert search.rows_redone == search.rows == 64
    assert_exact(Matcher("torch-bf16", extra_candidates=0, base_tile=70).search(queries, base, 5),
                 queries, base, 5)


@pytest.mark.parametrize("extra", [0, 3, 16])
def test_ties_at_the_kth_place_across_the_candidate_boundary(extra):
    k = 5
    queries, base = tied_at_k(60, 1000, 997, k)
    ref_scores, _, cos = brute_force(queries, base, k + 1)
    assert np.all(np.abs(ref_scores[:, k - 1] - ref_scores[:, k]) < 1e-6)  # planted: places k and k+1 tie
    assert np.all(ref_scores[:, k] - np.sort(cos, axis=1)[:, -k - 2] > 0.01)  # and nothing else near
    search = CertifiedSearch(extra=extra)
    found = search(unit(queries), base, k)
    assert_exact(found, queries, base, k)
    # Which copy is the k-th: the lower index, as a stable sort of the fp32 scores has it
    # (identical rows give identical fp32 scores), unless the two copies differ in fp32.
    fp32 = unit(queries) @ base.T
    copies = np.arange(60) % 20
    same = fp32[np.arange(60), copies] == fp32[np.arange(60), copies + 500]
    assert np.all(found[1][same, k - 1] == copies[same])
    if extra == 0:
        assert search.rows_redone == 60


@pytest.mark.parametrize("scale", [0.01, 1.0, 300.0])
def test_non_unit_rows_of_any_scale_match_brute_force(scale):
    rng = np.random.default_rng(3)
    queries, base = clustered(90, 400, 77, spread=0.2, seed=3)
    queries = queries * rng.uniform(0.1, 10, (90, 1)).astype(np.float32) * scale
    base = base * rng.uniform(0.1, 10, (400, 1)).astype(np.float32) / scale
    assert_exact(Matcher("torch-bf16", query_tile=33, base_tile=150).search(queries, base, 7), queries, base, 7)


def test_exact_rescoring_on_the_torch_path_equals_numpys_and_float64():
    queries, base = unit(clustered(50, 200, 70, seed=4)[0]), unit(clustered(50, 200, 70, seed=5)[1])
    rng = np.random.default_rng(0)
    candidates = np.stack([rng.choice(200, 12, replace=False) for _ in range(50)])
    keep = rng.integers(1, 13, 50)
    by_numpy = rescore_numpy(queries, base, candidates, keep, rows=7)
    by_torch = rescore_torch(torch.from_numpy(queries), torch.from_numpy(base), candidates, keep, rows=9)
    want = np.einsum("nd,nmd->nm", queries.astype(np.float64), base.astype(np.float64)[candidates])
    past = np.arange(12) >= keep[:, None]
    assert np.all(np.isneginf(by_numpy[past])) and np.all(np.isneginf(by_torch[past]))
    np.testing.assert_allclose(by_numpy[~past], want[~past], atol=1e-6)
    np.testing.assert_allclose(by_torch[~past], want[~past], atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_zero_row_is_refused_as_for_every_backend():
    queries, base = clustered(5, 40, 16)
    base[7] = 0
    with pytest.raises(FlowdbError, match="NaN"):
        Matcher("torch-bf16").search(queries, base, 3)
    with pytest.raises(FlowdbError, match="extra_candidates"):
        Matcher("torch-bf16", extra_candidates=-1)
