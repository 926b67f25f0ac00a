"""Top-k cosine matching of decoder directions (Laptev et al., section 3.2).

Every search is exact: the stored top-k equals brute force within 1e-5. Both the
queries and the base are cut into tiles, each tile is normalised as it is read
(so a lazily read 1M-wide decoder is never whole in memory), each base tile is
read once, and every query keeps a running top-k merged over the base tiles.
Memory is bounded by query_tile x d + base_tile x d + query_tile x base_tile
plus the [n_queries, k] results, whatever the widths.

Backends:
  numpy-cpu   one fp32 GEMM per tile pair through numpy's own BLAS, then an exact
              partial top-k (the CPU default: it runs at the rate numpy's current
              BLAS reaches on this CPU, with no CPU-type guess, see top_k_rows);
  faiss-cpu   faiss.knn, exact fp32 (its bundled OpenBLAS can be older than the
              CPU: on a CPU it does not know it falls back to generic kernels);
  faiss-gpu   faiss.knn_gpu, exact fp32 (needs faiss-gpu and a CUDA GPU);
  torch-cuda  candidates from a TF32 GEMM, then exact fp32 re-scoring: a row is
              certified when no non-candidate can beat its k-th exact score given
              the TF32 error bound, and rows that are not are searched again in fp32;
  torch-cpu   one fp32 GEMM on the CPU (a baseline);
  torch-bf16  candidates from a real bf16 GEMM (on CUDA when torch sees a GPU, else on
              the CPU), exact fp32 re-scoring, and a per-row certificate from the
              rounding residuals' norms (see flowdb.flow.bf16, which proves it).

Devices: `--device cpu` is numpy-cpu; `--device cuda` is faiss-gpu where installed,
else torch-cuda; `--device auto` is the fastest exact backend here, measured once and
cached (see flowdb.flow.calibration): numpy-cpu on a CPU without bf16 instructions,
and for a build of less than SMALL_WORK_GFLOP of matching.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowdb.errors import FlowdbError
from flowdb.flow import calibration
from flowdb.flow.calibration import Calibration, cpu_flags, has_bf16
from flowdb.flow.ranking import merge_top_k, normalise, top_k_rows

if TYPE_CHECKING:
    from flowdb.flow.bf16 import CertifiedSearch

QUERY_TILE = 8192
BASE_TILE = 65536
SCORE_BLOCK_QUERY_TILE = 2048  # numpy and torch materialise the score block: 2048 x 65536 fp32 is 512 MB
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("numpy-cpu", "faiss-cpu", "faiss-gpu", "torch-cpu", "torch-cuda", "torch-bf16")
CPU_DEFAULT = "numpy-cpu"
EXTRA_CANDIDATES = 16  # candidates beyond k taken from a rounded (TF32 or bf16) GEMM
# Below this much matching, auto keeps numpy-cpu: bf16 saves about half the fp32 time
# (4 s of 1,000 GFLOP at 250 GFLOP/s), which torch's import (about 2 s) and the first
# calibration would eat. Gemma-2-2B's pack is 95,000 GFLOP; a tiny demo pack, 1.
SMALL_WORK_GFLOP = 1000.0


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


def choose_backend(device: str = "auto", work_gflop: float | None = None) -> str:
    """The backend for a device: numpy's BLAS on the CPU; on CUDA faiss-gpu when installed,
    else torch; auto: the fastest exact one here, measured once (flowdb.flow.calibration),
    for work of work_gflop or more (or of unknown size); below SMALL_WORK_GFLOP the first
    candidate, since another would cost more to start (torch's import) than it saves."""
    if device not in DEVICES:
        raise FlowdbError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if work_gflop is not None and work_gflop < SMALL_WORK_GFLOP:
            return auto_candidates()[0]
        found = auto_calibration()
        return found.chosen if found else auto_candidates()[0]
    if device == "cpu":
        return CPU_DEFAULT
    if _faiss_gpus():
        return "faiss-gpu"
    if _torch_cuda():
        return "torch-cuda"
    raise FlowdbError("--device cuda: no CUDA GPU is visible to faiss-gpu or torch")


def auto_candidates() -> list[str]:
    """The backends --device auto measures, its default first: the fp32 one of the GPU or
    the CPU, and torch-bf16 where the hardware has bf16 (on the CPU, the flags say so:
    elsewhere torch emulates bf16 far below the fp32 rate, so it is not even measured)."""
    if _faiss_gpus() or _torch_cuda():
        return [choose_backend("cuda"), *(["torch-bf16"] if _torch_cuda() and _cuda_bf16() else [])]
    bf16 = has_bf16(cpu_flags()) and importlib.util.find_spec("torch") is not None
    return [CPU_DEFAULT, *(["torch-bf16"] if bf16 else [])]


def auto_calibration() -> Calibration | None:
    """--device auto's measurement (from the cache when it fits this machine), or None
    where there is only one candidate and nothing is measured."""
    candidates = auto_candidates()
    if len(candidates) == 1:
        return None
    return calibration.auto(candidates, lambda backend: Matcher(backend).search, gpu=_gpu_name())


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _gpu_name() -> str | None:
    if not _torch_cuda():
        return None
    import torch

    return torch.cuda.get_device_name()


@dataclass(frozen=True)
class Matcher:
    """One backend with its tile sizes; search() is the exact top-k."""

    backend: str = CPU_DEFAULT
    query_tile: int = QUERY_TILE
    base_tile: int = BASE_TILE
    extra_candidates: int = EXTRA_CANDIDATES  # torch-cuda and torch-bf16: beyond k, from the rounded GEMM
    # The tile search and the normalised tiles' memory, kept from one search to the next: a
    # build searches each layer's modules with one matcher, and fresh buffers of hundreds of
    # MB pay their page faults on every search (a third of a bf16 search's time).
    workspace: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def for_device(cls, device: str = "auto", work_gflop: float | None = None, **tiles) -> Matcher:
        return cls(choose_backend(device, work_gflop), **tiles)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise FlowdbError(f"matcher backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.query_tile < 1 or self.base_tile < 1:
            raise FlowdbError("matcher tiles must hold at least one row")
        if self.extra_candidates < 0:
            raise FlowdbError("matcher extra_candidates must be 0 or more")

    def search(self, queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query row, the k base rows of highest cosine, best first.

        Rows need not be unit length (each tile is normalised as read); either array
        may be a memory map. Returns (cosines float32 [n, k], indices int64 [n, k]).
        """
        n_base = base.shape[0]
        if k > n_base:
            raise FlowdbError(f"k={k} exceeds the {n_base} features it would search")
        tile_search = self.workspace.get("search")
        if tile_search is None:
            tile_search = self.workspace["search"] = _TILE_SEARCHES[self.backend](self)
        query_tile = self.query_tile if self.backend.startswith("faiss") \
            else min(self.query_tile, SCORE_BLOCK_QUERY_TILE)
        n_queries = queries.shape[0]
        scores = indices = None  # every query's running top-k over the base tiles searched so far
        # Base tiles outer: each is read and normalised once (a lazily read decoder wider than a
        # tile would otherwise be read again for every query tile); queries are read once per base tile.
        for offset in range(0, n_base, self.base_tile):
            # Each tile is a new array object, even where its memory is the last one's:
            # tile searches that keep a tile's derived data (bf16's rounding) go by identity.
            rows = base[offset:offset + self.base_tile]
            tile = normalise(rows, self._scratch("tile", rows.shape))
            width = min(k, tile.shape[0])
            found_s = np.empty((n_queries, width), dtype=np.float32)
            found_i = np.empty((n_queries, width), dtype=np.int64)
            for start in range(0, n_queries, query_tile):
                rows = queries[start:start + query_tile]
                block = normalise(rows, self._scratch("block", rows.shape))
                s, i = tile_search(block, tile, width)
                found_s[start:start + query_tile], found_i[start:start + query_tile] = s, i + offset
            scores, indices = merge_top_k(scores, indices, found_s, found_i, k)
        return scores, indices

    def _scratch(self, role: str, shape: tuple[int, int]) -> np.ndarray:
        """A float32 array of this shape in the role's memory, which grows when too small;
        each call gives a new array object."""
        n = shape[0] * shape[1]
        found = self.workspace.get(role)
        if found is None or found.size < n:
            found = self.workspace[role] = np.empty(n, dtype=np.float32)
        return found[:n].reshape(shape)


def top_k(queries: np.ndarray, base: np.ndarray, k: int,
          matcher: Matcher | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine search with the given matcher (default: numpy's BLAS on the CPU)."""
    return (matcher or Matcher()).search(queries, base, k)


# --- one tile against one tile ------------------------------------------------------------

class _BlasSearch:
    """fp32 GEMM through numpy's BLAS into one score buffer reused across tiles (a fresh
    512 MB block per tile would cost its page faults every time), then top_k_rows."""

    def __init__(self):
        self.buffer = np.empty(0, dtype=np.float32)

    def __call__(self, block: np.ndarray, tile: np.ndarray, k: int):
        size = block.shape[0] * tile.shape[0]
        if self.buffer.size < size:
            self.buffer = np.empty(size, dtype=np.float32)
        scores = self.buffer[:size].reshape(block.shape[0], tile.shape[0])
        np.matmul(block, tile.T, out=scores)
        return top_k_rows(scores, k)


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
    rounded with this unit roundoff and whose products were summed in fp32 (torch-cuda's
    TF32 certificate; torch-bf16 has a tighter per-row one, see flowdb.flow.bf16)."""
    return 2 * unit_roundoff + unit_roundoff ** 2 + d * 2.0 ** -24


def _torch_search(device: str, rounding: str | None, extra: int = EXTRA_CANDIDATES) -> Callable:
    """rounding None: one fp32 search. "tf32" (CUDA tensor cores): candidates from the
    TF32 GEMM, exact fp32 re-scoring, and a certificate per row."""
    unit_roundoff = {"tf32": 2.0 ** -11}.get(rounding)

    def search(block: np.ndarray, tile: np.ndarray, k: int):
        import torch

        q = torch.from_numpy(block).to(device)
        b = torch.from_numpy(tile).to(device)
        if rounding is None:
            with _exact_fp32(torch):
                found = torch.topk(q @ b.T, k, dim=1)
            return found.values.cpu().numpy(), found.indices.cpu().numpy()
        m = min(tile.shape[0], k + extra)
        with _tf32(torch):
            approx, candidates = torch.topk(q @ b.T, m, dim=1)
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


def _bf16_search(matcher: Matcher) -> CertifiedSearch:
    from flowdb.flow.bf16 import CertifiedSearch

    return CertifiedSearch("cuda" if _torch_cuda() else "cpu", matcher.extra_candidates)


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


_TILE_SEARCHES = {"numpy-cpu": lambda _: _BlasSearch(), "faiss-cpu": lambda _: _faiss_cpu,
                  "faiss-gpu": lambda _: _faiss_gpu,
                  "torch-cpu": lambda _: _torch_search("cpu", None),
                  "torch-cuda": lambda matcher: _torch_search("cuda", "tf32", matcher.extra_candidates),
                  "torch-bf16": _bf16_search}
