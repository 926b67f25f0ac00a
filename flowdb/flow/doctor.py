"""What this machine gives flowdb's matching: the BLAS each library loaded, the fp32
GEMM rate, and each CPU backend's search rate as a share of it (`flowdb doctor`).

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

# A Gemma-Scope-like search, small enough to time in about a second per backend.
QUERIES, BASE, D_MODEL, K = 2048, 8192, 2304, 5
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

    def describe(self, default: str) -> str:
        """One line: the rate, its share of the GEMM's, and a verdict when it is slow."""
        role = " (the CPU default)" if self.backend == default else ""
        verdict = f"; slow: under {SLOW_SHARE:.0%}, its BLAS above may not know this CPU" if self.slow else ""
        return (f"matching {self.backend}{role}: top-{K} of {SHAPE}: {self.gflops:,.0f} GFLOP/s = "
                f"{self.share:.0%} of the GEMM rate{verdict}")


def report(measure: bool = True) -> Iterator[str]:
    """`flowdb doctor`'s lines, each as soon as it is known (a measured rate takes about a second)."""
    import os

    from flowdb._version import __version__
    from flowdb.flow.matching import CPU_DEFAULT, choose_backend

    backends = cpu_backends()
    yield (f"flowdb {__version__}, Python {platform.python_version()}, numpy {np.__version__}; "
           f"CPU: {cpu_model()}, {os.cpu_count()} cores; --device auto searches with {choose_backend('auto')}")
    for lib in blas_libraries(backends):
        yield f"loaded by {lib.package}: {lib.describe()}"
    if not measure:
        return
    gemm = gemm_rate()
    yield f"fp32 GEMM, numpy ({SHAPE}): {gemm:,.0f} GFLOP/s"
    for backend in backends:
        gflops = search_rate(backend)
        yield BackendRate(backend, gflops, gflops / gemm).describe(CPU_DEFAULT)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_backends() -> list[str]:
    """The CPU backends whose libraries are installed here, the default first."""
    from flowdb.flow.matching import CPU_DEFAULT

    found = [CPU_DEFAULT]
    if importlib.util.find_spec("faiss") is not None:
        found.append("faiss-cpu")
    if importlib.util.find_spec("torch") is not None:
        found.append("torch-cpu")
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


def search_rate(backend: str) -> float:
    """One exact top-k search of QUERIES x BASE in D_MODEL dimensions, in GFLOP/s."""
    from flowdb.flow.matching import Matcher

    rng = np.random.default_rng(1)
    queries = rng.standard_normal((QUERIES, D_MODEL), dtype=np.float32)
    base = rng.standard_normal((BASE, D_MODEL), dtype=np.float32)
    matcher = Matcher(backend)
    matcher.search(queries[:256], base, K)  # warm up thread pools and caches
    started = time.perf_counter()
    matcher.search(queries, base, K)
    return 2 * QUERIES * BASE * D_MODEL / (time.perf_counter() - started) / 1e9
