"""Top-k cosine matching of decoder directions (Laptev et al., section 3.2).

Every search is exact: the stored top-k equals brute force within 1e-5. Both the
queries and the base are cut into tiles, each tile is normalised as it is read
(so a memory-mapped 1M-wide decoder is never whole in memory), and each query
tile keeps a running top-k merged over the base tiles. Memory is bounded by
query_tile x d + base_tile x d + query_tile x base_tile, whatever the widths.

Backends (`--device auto|cpu|cuda`):
  faiss-cpu   faiss.knn, exact fp32 (the CPU default: it runs at the GEMM rate);
  faiss-gpu   faiss.knn_gpu, exact fp32 (needs faiss-gpu and a CUDA GPU);
  torch-cuda  candidates from a TF32 GEMM, then exact fp32 re-scoring: a row is
              certified when no non-candidate can beat its k-th exact score given
              the TF32 error bound, and rows that are not are searched again in fp32;
  torch-cpu   one fp32 GEMM on the CPU (a baseline);
  torch-cpu-bf16  candidates from inputs rounded to bfloat16, then the same exact
              re-scoring and certificate as torch-cuda: that path, testable on a CPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from flowdb.errors import FlowdbError

QUERY_TILE = 8192
BASE_TILE = 65536
TORCH_QUERY_TILE = 2048  # torch materialises the score block: 2048 x 65536 fp32 is 512 MB
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("faiss-cpu", "faiss-gpu", "torch-cpu", "torch-cuda", "torch-cpu-bf16")
EXTRA_CANDIDATES = 16  # candidates beyond k taken from the rounded GEMM


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
def _faiss_gpus() -> int:
    try:
        faiss = _faiss()
    except FlowdbError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "knn_gpu") else 0


@lru_cache(maxsize=1)
def _torch_cuda() -> bool:
    # Importing torch takes seconds: only where an NVIDIA driver shows a GPU and torch is there.
    gpus = Path("/proc/driver/nvidia/gpus")
    if not (gpus.is_dir() and any(gpus.iterdir())) or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose_backend(device: str = "auto") -> str:
    """The backend for a device: faiss on the CPU; on CUDA faiss-gpu when installed, else torch."""
    if device not in DEVICES:
        raise FlowdbError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if _faiss_gpus() or _torch_cuda() else "cpu"
    if device == "cpu":
        return "faiss-cpu"
    if _faiss_gpus():
        return "faiss-gpu"
    if _torch_cuda():
        return "torch-cuda"
    raise FlowdbError("--device cuda: no CUDA GPU is visible to faiss-gpu or torch")


@dataclass(frozen=True)
class Matcher:
    """One backend with its tile sizes; search() is the exact top-k."""

    backend: str = "faiss-cpu"
    query_tile: int = QUERY_TILE
    base_tile: int = BASE_TILE

    @classmethod
    def for_device(cls, device: str = "auto", **tiles) -> Matcher:
        return cls(choose_backend(device), **tiles)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise FlowdbError(f"matcher backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.query_tile < 1 or self.base_tile < 1:
            raise FlowdbError("matcher tiles must hold at least one row")

    def search(self, queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query row, the k base rows of highest cosine, best first.

        Rows need not be unit length (each tile is normalised as read); either array
        may be a memory map. Returns (cosines float32 [n, k], indices int64 [n, k]).
        """
        n_base = base.shape[0]
        if k > n_base:
            raise FlowdbError(f"k={k} exceeds the {n_base} features it would search")
        tile_search = _TILE_SEARCHES[self.backend]
        query_tile = min(self.query_tile, TORCH_QUERY_TILE) if self.backend.startswith("torch") \
            else self.query_tile
        scores = np.empty((queries.shape[0], k), dtype=np.float32)
        indices = np.empty((queries.shape[0], k), dtype=np.int64)
        base_tiles = [(start, None) for start in range(0, n_base, self.base_tile)]
        if len(base_tiles) == 1:  # read and normalise a base that fits once, not per query tile
            base_tiles = [(0, normalise(base))]
        for start in range(0, queries.shape[0], query_tile):
            block = normalise(queries[start:start + query_tile])
            best_s = best_i = None
            for offset, ready in base_tiles:
                tile = ready if ready is not None else normalise(base[offset:offset + self.base_tile])
                s, i = tile_search(block, tile, min(k, tile.shape[0]))
                best_s, best_i = merge_top_k(best_s, best_i, s, i + offset, k)
            scores[start:start + query_tile], indices[start:start + query_tile] = best_s, best_i
        return scores, indices


def merge_top_k(scores_a, indices_a, scores_b, indices_b, k: int):
    """The k best of two partial top-k lists per row (either may be None), best first;
    equal scores keep the lower base index, as one search over the whole base would."""
    if scores_a is None:
        return scores_b, indices_b
    scores = np.concatenate([scores_a, scores_b], axis=1)
    indices = np.concatenate([indices_a, indices_b], axis=1)
    order = np.lexsort((indices, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def top_k(queries: np.ndarray, base: np.ndarray, k: int,
          matcher: Matcher | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine search with the given matcher (default: faiss on the CPU)."""
    return (matcher or Matcher()).search(queries, base, k)


# --- one tile against one tile ------------------------------------------------------------

def _faiss_cpu(block: np.ndarray, tile: np.ndarray, k: int):
    faiss = _faiss()
    return faiss.knn(block, tile, k, metric=faiss.METRIC_INNER_PRODUCT)


@lru_cache(maxsize=1)
def _gpu_resources():
    return _faiss().StandardGpuResources()


def _faiss_gpu(block: np.ndarray, tile: np.ndarray, k: int):
    faiss = _faiss()
    return faiss.knn_gpu(_gpu_resources(), block, tile, k, metric=faiss.METRIC_INNER_PRODUCT)


def _rounding_error(unit_roundoff: float, d: int) -> float:
    """Worst-case |approximate - exact| cosine of unit vectors whose components were
    rounded with this unit roundoff and whose products were summed in fp32."""
    return 2 * unit_roundoff + unit_roundoff ** 2 + d * 2.0 ** -24


def _torch_search(device: str, rounding: str | None) -> Callable:
    """rounding None: one fp32 search. "tf32" (CUDA tensor cores) or "bf16" (inputs
    rounded to bfloat16, which exercises the same path on a CPU): candidates from the
    rounded GEMM, exact fp32 re-scoring, and a certificate per row."""
    unit_roundoff = {"tf32": 2.0 ** -11, "bf16": 2.0 ** -8}.get(rounding)

    def search(block: np.ndarray, tile: np.ndarray, k: int):
        import torch

        q = torch.from_numpy(block).to(device)
        b = torch.from_numpy(tile).to(device)
        if rounding is None:
            with _exact_fp32(torch):
                found = torch.topk(q @ b.T, k, dim=1)
            return found.values.cpu().numpy(), found.indices.cpu().numpy()
        m = min(tile.shape[0], k + EXTRA_CANDIDATES)
        if rounding == "tf32":
            with _tf32(torch):
                approx, candidates = torch.topk(q @ b.T, m, dim=1)
        else:
            approx, candidates = torch.topk(q.bfloat16().float() @ b.bfloat16().float().T, m, dim=1)
        with _exact_fp32(torch):
            exact = torch.einsum("nd,nmd->nm", q, b[candidates])
            exact, order = torch.sort(exact, dim=1, descending=True)
            chosen = torch.gather(candidates, 1, order)
            # Any row outside the candidates scores at most approx[:, -1] + error exactly;
            # where that could reach the k-th exact score, search the row again in fp32.
            if m < tile.shape[0]:
                error = _rounding_error(unit_roundoff, tile.shape[1])
                uncertain = (approx[:, -1] + error >= exact[:, k - 1]).nonzero().squeeze(1)
                if uncertain.numel():
                    redo = torch.topk(q[uncertain] @ b.T, k, dim=1)
                    exact[uncertain, :k], chosen[uncertain, :k] = redo.values, redo.indices
        return exact[:, :k].cpu().numpy(), chosen[:, :k].cpu().numpy()

    return search


class _matmul_precision:
    """Within the block, fp32 matmuls on CUDA use TF32 (allow=True) or full fp32."""

    def __init__(self, torch, allow_tf32: bool):
        self.flags, self.allow = torch.backends.cuda.matmul, allow_tf32

    def __enter__(self):
        self.previous = self.flags.allow_tf32
        self.flags.allow_tf32 = self.allow

    def __exit__(self, *exc):
        self.flags.allow_tf32 = self.previous


def _tf32(torch):
    return _matmul_precision(torch, True)


def _exact_fp32(torch):
    return _matmul_precision(torch, False)


_TILE_SEARCHES = {"faiss-cpu": _faiss_cpu, "faiss-gpu": _faiss_gpu,
                  "torch-cpu": _torch_search("cpu", None), "torch-cuda": _torch_search("cuda", "tf32"),
                  "torch-cpu-bf16": _torch_search("cpu", "bf16")}
