"""Top-k cosine matching of decoder directions (Laptev et al., section 3.2).

Rows of W_dec are normalised to unit length, so the inner product is the cosine;
FAISS searches exactly (no approximate index). Queries go in chunks so memory
stays bounded by chunk x base, whatever the SAE width. On a machine with a CUDA
GPU and faiss-gpu installed, the same search runs through faiss.knn_gpu.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from flowdb.errors import FlowdbError

QUERY_CHUNK = 8192


def normalise(w_dec: np.ndarray) -> np.ndarray:
    """Unit-length rows as C-contiguous float32 (what FAISS takes)."""
    w = np.ascontiguousarray(w_dec, dtype=np.float32)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.ascontiguousarray(w / norms)


@lru_cache(maxsize=1)
def _faiss():
    try:
        import faiss
    except ImportError:
        raise FlowdbError("FAISS is not installed: pip install 'flowdb[cpu]' "
                          "(or 'flowdb[gpu]' on a CUDA machine)") from None
    return faiss


@lru_cache(maxsize=1)
def _gpu_resources():
    faiss = _faiss()
    if hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def backend() -> str:
    return "faiss-gpu" if _gpu_resources() is not None else "faiss-cpu"


def top_k(queries: np.ndarray, base: np.ndarray, k: int,
          chunk: int = QUERY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """For each (unit) query row, the k base rows of highest cosine, best first.

    Returns (cosines float32 [n, k], indices int64 [n, k]).
    """
    faiss = _faiss()
    if k > base.shape[0]:
        raise FlowdbError(f"k={k} exceeds the {base.shape[0]} features it would search")
    resources = _gpu_resources()
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start:start + chunk]
        if resources is not None:
            found = faiss.knn_gpu(resources, block, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            found = faiss.knn(block, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        scores[start:start + chunk], indices[start:start + chunk] = found
    return scores, indices
