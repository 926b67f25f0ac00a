"""What this machine gives flowdb's matching: the BLAS each library loaded, the fp32
GEMM rate, each CPU backend's search rate as a share of it, and which backend
`--device auto` chose, with the rates it measured to choose (`flowdb doctor`).

A BLAS older than the CPU falls back to generic kernels without a word (faiss-cpu's
bundled OpenBLAS reads many virtual CPUs as "Prescott" and searches at a fifth of
the GEMM rate); here that shows as a low share beside the library's architecture.
"""

from __future__ import annotations

import importlib.util
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowdb.flow.calibration import cpu_flags, cpu_model, has_bf16

# A Gemma-Scope-like search, small enough to time in about a second per backend, and square
# as a build's searches are (a base wider than the queries weighs bf16's rounding of it more).
QUERIES, BASE, D_MODEL, K = 4096, 4096, 2304, 5
SHAPE = f"{QUERIES:,} x {BASE:,}, d {D_MODEL}"
SLOW_SHARE = 0.5  # below this share of the GEMM rate, a backend is called slow


@dataclass(frozen=True)
class BlasLibrary:
    package: str  # the wheel that carries it, e.g. "numpy", "faiss_cpu", "torch"
    api: str  # openblas, mkl, blis, openmp
    version: str | None
    architecture: str | None  # the kernels it chose for this CPU, e.g. "Haswell", "Prescott"
    threads: int

    def describe(self) -> str:
        """e.g. "openblas 0.3.31, Haswell kernels, 2 threads" or "openmp, 2 threads"."""
        parts = [" ".join(filter(None, (self.api, self.version)))]
        if self.architecture:
            parts.append(f"{self.architecture} kernels")
        return ", ".join([*parts, f"{self.threads} threads"])


@dataclass(frozen=True)
class BackendRate:
    backend: str
    gflops: float
    share: float  # of numpy's fp32 GEMM rate, measured in the same run

    @property
    def slow(self) -> bool:
        return self.share < SLOW_SHARE

    def describe(self, default: str, chosen: str | None = None, queries: int = QUERIES) -> str:
        """One line: the rate, its share of the GEMM's, and a verdict when it is slow."""
        roles = [role for role, backend in (("the CPU default", default), ("auto's choice", chosen))
                 if backend == self.backend]
        role = f" ({', '.join(roles)})" if roles else ""
        shape = SHAPE if queries == QUERIES else f"{queries:,} x {BASE:,}, d {D_MODEL}"
        verdict = ""
        if self.slow:
            verdict = (f"; slow: under {SLOW_SHARE:.0%}, " + ("this CPU has no bf16 instructions: torch emulates them"
                       if self.backend == "torch-bf16" else "its BLAS above may not know this CPU"))
        return (f"matching {self.backend}{role}: top-{K} of {shape}: {self.gflops:,.0f} GFLOP/s = "
                f"{self.share:.0%} of the GEMM rate{verdict}")


def report(measure: bool = True) -> Iterator[str]:
    """`flowdb doctor`'s lines, each as soon as it is known (a measured rate takes about a second)."""
    import os

    from flowdb._version import __version__
    from flowdb.flow.matching import CPU_DEFAULT

    backends = cpu_backends()
    bf16 = has_bf16(cpu_flags())
    yield (f"flowdb {__version__}, Python {platform.python_version()}, numpy {np.__version__}; "
           f"CPU: {cpu_model()}, {os.cpu_count()} cores, {'with' if bf16 else 'no'} bf16 instructions")
    chosen, line = auto_choice(measure)
    yield line
    for lib in blas_libraries(backends):
        yield f"loaded by {lib.package}: {lib.describe()}"
    if not measure:
        return
    gemm = gemm_rate()
    yield f"fp32 GEMM, numpy ({SHAPE}): {gemm:,.0f} GFLOP/s"
    for backend in backends:
        # Emulated bf16 runs at a few GFLOP/s: a smaller search keeps its line to about a second.
        queries = QUERIES // 8 if backend == "torch-bf16" and not bf16 else QUERIES
        gflops = search_rate(backend, queries)
        yield BackendRate(backend, gflops, gflops / gemm).describe(CPU_DEFAULT, chosen, queries)


def auto_choice(measure: bool = True) -> tuple[str | None, str]:
    """(the backend --device auto searches with, a line saying why). Without measure only
    a cached calibration is read, and nothing is timed."""
    from flowdb.flow.calibration import cache_path, cached, machine_key
    from flowdb.flow.matching import _gpu_name, auto_calibration, auto_candidates

    candidates = auto_candidates()
    if len(candidates) == 1:
        why = ("no bf16 instructions on this CPU (avx512_bf16, amx_bf16) or no torch: auto keeps "
               "numpy's fp32 GEMM and measures nothing") if candidates[0] == "numpy-cpu" else \
            "the only candidate on this GPU: nothing measured"
        return candidates[0], f"--device auto searches with {candidates[0]}: {why}"
    found = auto_calibration() if measure else cached(machine_key(candidates, _gpu_name()))
    if found is None:
        return None, (f"--device auto: not measured on this machine yet; its first search times "
                      f"{', '.join(candidates)} (a few hundred ms) and keeps the fastest exact one")
    return found.chosen, (f"--device auto searches with {found.chosen}, measured {found.measured_at}: "
                          f"{found.describe()}; cached in {cache_path()}")


def cpu_backends() -> list[str]:
    """The CPU backends whose libraries are installed here, the default first."""
    from flowdb.flow.matching import CPU_DEFAULT

    found = [CPU_DEFAULT]
    if importlib.util.find_spec("faiss") is not None:
        found.append("faiss-cpu")
    if importlib.util.find_spec("torch") is not None:
        found += ["torch-cpu", "torch-bf16"]
    return found


def blas_libraries(backends: list[str]) -> list[BlasLibrary]:
    """The BLAS and thread pools loaded once the backends' libraries are imported."""
    from threadpoolctl import threadpool_info

    for backend in backends:
        if backend == "faiss-cpu":
            import faiss  # noqa: F401
        elif backend.startswith("torch"):
            import torch  # noqa: F401
    return [BlasLibrary(_package(info["filepath"]), info["internal_api"], info.get("version"),
                        info.get("architecture"), info["num_threads"])
            for info in threadpool_info()]


def _package(filepath: str) -> str:
    """The site-packages folder a shared library came from: numpy.libs -> numpy."""
    parts = Path(filepath).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".libs")
    return Path(filepath).name


def gemm_rate(repeats: int = 3) -> float:
    """numpy's fp32 GEMM in GFLOP/s, on the shape of one search."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((QUERIES, D_MODEL), dtype=np.float32)
    b = rng.standard_normal((D_MODEL, BASE), dtype=np.float32)
    a @ b  # warm the thread pool
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * QUERIES * BASE * D_MODEL / (time.perf_counter() - started) / 1e9


def search_rate(backend: str, n_queries: int = QUERIES) -> float:
    """One exact top-k search of n_queries x BASE in D_MODEL dimensions, in GFLOP/s."""
    from flowdb.flow.matching import Matcher

    rng = np.random.default_rng(1)
    queries = rng.standard_normal((n_queries, D_MODEL), dtype=np.float32)
    base = rng.standard_normal((BASE, D_MODEL), dtype=np.float32)
    matcher = Matcher(backend)
    matcher.search(queries[:n_queries // 8], base, K)  # warm up thread pools and caches
    started = time.perf_counter()
    matcher.search(queries, base, K)
    return 2 * n_queries * BASE * D_MODEL / (time.perf_counter() - started) / 1e9
