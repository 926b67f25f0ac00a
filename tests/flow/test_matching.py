import numpy as np
import pytest

from flowdb.errors import FlowdbError
from flowdb.flow.matching import (
    BACKENDS,
    CPU_DEFAULT,
    Matcher,
    choose_backend,
    merge_top_k,
    normalise,
    top_k,
    top_k_rows,
)
from helpers import brute_force_top_k as brute_force

CPU_BACKENDS = [b for b in BACKENDS if "cuda" not in b and "gpu" not in b]
GPU_BACKENDS = [b for b in BACKENDS if b not in CPU_BACKENDS]


def assert_exact(found, queries, base, k):
    """Scores equal brute force within 1e-5, and every returned index has that score
    (so indices may differ from brute force only between tied cosines)."""
    scores, indices = found
    ref_scores, ref_indices, cos = brute_force(queries, base, k)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(cos, indices, axis=1), ref_scores, atol=1e-5)
    assert (indices == ref_indices).mean() > 0.99


def planted(n_queries=700, n_base=300, d=96, seed=0):
    """Raw decoder rows of random norms; half the queries lie near a base row, so
    top-1 gaps are large for some rows and tiny (near ties) for others."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, d)).astype(np.float32) * rng.uniform(0.1, 5, (n_base, 1))
    queries = rng.standard_normal((n_queries, d)).astype(np.float32)
    near = rng.integers(0, n_base, n_queries // 2)
    queries[: n_queries // 2] = normalise(base[near]) * 3 + 0.3 * queries[: n_queries // 2] / np.sqrt(d)
    return queries * rng.uniform(0.1, 5, (n_queries, 1)).astype(np.float32), base


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 10])
def test_every_cpu_backend_equals_brute_force(backend, k):
    queries, base = planted(seed=k)
    assert_exact(Matcher(backend).search(queries, base, k), queries, base, k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("query_tile,base_tile", [(128, 37), (700, 64), (1, 300), (999, 1000)])
def test_tiling_the_queries_and_the_base_changes_nothing(backend, query_tile, base_tile):
    queries, base = planted(seed=3)
    matcher = Matcher(backend, query_tile=query_tile, base_tile=base_tile)
    assert_exact(matcher.search(queries, base, 5), queries, base, 5)


def test_base_tiles_smaller_than_k_still_give_the_whole_top_k():
    queries, base = planted(n_queries=50, n_base=40, seed=4)
    assert_exact(Matcher(base_tile=3).search(queries, base, 10), queries, base, 10)


def test_memory_mapped_decoders_are_searched_without_loading_them(tmp_path):
    queries, base = planted(seed=5)
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "b.npy", base)
    q = np.load(tmp_path / "q.npy", mmap_mode="r")
    b = np.load(tmp_path / "b.npy", mmap_mode="r")
    assert_exact(Matcher(query_tile=100, base_tile=50).search(q, b, 3), queries, base, 3)


def test_certified_path_recovers_rows_whose_rounded_candidates_miss():
    # Directions clustered round one centre: cosines 1e-4 apart, well below bfloat16's
    # rounding error, so the rounded GEMM's own top-5 is wrong in many rows; exact
    # re-scoring and the certificate must repair every one.
    import torch

    rng = np.random.default_rng(6)
    centre = normalise(rng.standard_normal((1, 64)))
    base = centre + 0.025 * rng.standard_normal((400, 64)).astype(np.float32)
    queries = centre + 0.025 * rng.standard_normal((64, 64)).astype(np.float32)
    rounded = [torch.from_numpy(normalise(x)).bfloat16().float().numpy() for x in (queries, base)]
    naive = np.sort(np.argsort(-(rounded[0] @ rounded[1].T), axis=1)[:, :5], axis=1)
    truth = np.sort(brute_force(queries, base, 5)[1], axis=1)
    assert (naive != truth).any(axis=1).mean() > 0.2
    assert_exact(Matcher("torch-bf16").search(queries, base, 5), queries, base, 5)


def test_merge_keeps_the_best_and_the_lower_index_on_ties():
    s, i = merge_top_k(np.array([[0.9, 0.5]]), np.array([[7, 2]]),
                       np.array([[0.5, 0.4]]), np.array([[1, 3]]), 3)
    assert s.tolist() == [[0.9, 0.5, 0.5]] and i.tolist() == [[7, 1, 2]]


def test_k_larger_than_the_base_is_refused():
    queries, base = planted(n_base=4)
    with pytest.raises(FlowdbError, match="k=5 exceeds the 4 features"):
        top_k(queries, base, 5)


def test_unknown_device_and_backend_are_refused():
    with pytest.raises(FlowdbError, match="device 'tpu'"):
        choose_backend("tpu")
    with pytest.raises(FlowdbError, match="backend 'blas'"):
        Matcher("blas")


def test_cpu_device_uses_numpys_blas_without_faiss():
    assert choose_backend("cpu") == CPU_DEFAULT == Matcher().backend == "numpy-cpu"


@pytest.mark.parametrize("width", [1, 5, 16, 17, 33, 100, 1000, 4099])
def test_partial_top_k_equals_a_full_sort_with_ties(width):
    # Scores rounded to one decimal: many exact ties, which must go to the lower column
    # exactly as a stable full sort orders them.
    rng = np.random.default_rng(width)
    scores = np.round(rng.standard_normal((60, width)), 1).astype(np.float32)
    for k in sorted({1, 2, 5, min(width, 16), width}):
        if k > width:
            continue
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        values, columns = top_k_rows(scores, k)
        assert columns.tolist() == order.tolist()
        assert values.tolist() == np.take_along_axis(scores, order, axis=1).tolist()


def test_partial_top_k_of_constant_rows_keeps_the_first_columns():
    values, columns = top_k_rows(np.zeros((3, 50), dtype=np.float32), 4)
    assert columns.tolist() == [[0, 1, 2, 3]] * 3 and values.tolist() == [[0.0] * 4] * 3


def test_partial_top_k_refuses_nan():
    scores = np.ones((2, 40), dtype=np.float32)
    scores[1, 7] = np.nan
    with pytest.raises(FlowdbError, match="NaN"):
        top_k_rows(scores, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS[:2])
def test_gpu_backends_equal_brute_force(backend):
    queries, base = planted(n_queries=5000, n_base=20000, d=256, seed=7)
    matcher = Matcher(backend, query_tile=1024, base_tile=6000)
    assert_exact(matcher.search(queries, base, 5), queries, base, 5)


def test_normalise_gives_unit_rows():
    x = np.random.default_rng(0).standard_normal((10, 7)) * 9
    np.testing.assert_allclose(np.linalg.norm(normalise(x), axis=1), 1.0, rtol=1e-6)
