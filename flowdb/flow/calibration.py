"""`--device auto`: the fastest exact matching backend on this machine, by measurement.

The candidates (matching.auto_candidates): on a CPU, numpy's fp32 GEMM (numpy-cpu),
and torch-bf16 only where the CPU multiplies bf16 natively (avx512_bf16 or amx_bf16
among its flags; bf16 on aarch64) and torch is installed: elsewhere torch emulates
bf16 far below the fp32 rate, so it is not even measured. On a GPU, the fp32 CUDA
backend (faiss-gpu or torch-cuda) and torch-bf16 where the GPU has bf16. The other
fp32 CPU backends run the same fp32 GEMM as numpy-cpu at best (`flowdb doctor` shows
their rates); measuring them would only let a busy machine flip auto between equal
fp32 paths from one build to the next.

With one candidate nothing is measured. With several, each searches one problem
(QUERIES x BASE, d D_MODEL, with exact ties planted at the k-th place), its answer is
checked against float64 brute force (a candidate that errs or fails is never chosen),
and its rate is timed beside numpy's fp32 GEMM on the same shape: about a second on a
2-core CPU with bf16, plus torch's import. The fastest wins, if it beats the first
candidate by MARGIN (noise must not flip the choice). The result is cached in FLOWDB_HOME/cache/backend.json under a key
of the CPU model and flags, the core count, the numpy/torch/faiss versions, the GPU
and the candidates; a cache with any other key is measured again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from flowdb.errors import FlowdbError
from flowdb.settings import home_dir

# Square, as a build's searches are (width x width): a search's fixed costs (normalising
# and rounding the base) weigh as they do there. At 1,024 x 4,096 they hid bf16's 2.3x.
QUERIES, BASE, D_MODEL, K = 4096, 4096, 2304, 5
CHECKED = 128  # query rows checked against float64 brute force
MARGIN = 1.1  # another candidate replaces the first only when this much faster
VERSION = 2  # of the measurement: a change here remeasures every cache
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 / AMX, aarch64
Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]

_memo: dict[str, Calibration] = {}  # per process: a file that cannot be written is measured once


@dataclass(frozen=True)
class Calibration:
    chosen: str
    gemm: float  # numpy's fp32 GEMM on the same shape, GFLOP/s
    rates: dict[str, float | None]  # GFLOP/s per candidate; None: its answer was not exact (or it failed)
    key: dict
    measured_at: str

    def share(self, backend: str) -> float | None:
        rate = self.rates.get(backend)
        return None if rate is None else rate / self.gemm

    def describe(self) -> str:
        """e.g. "torch-bf16 310%, numpy-cpu 97% of numpy's fp32 GEMM (1,024 x 4,096, d 2304)"."""
        shares = [f"{b} {self.share(b):.0%}" if self.rates[b] is not None else f"{b} not exact"
                  for b in self.rates]
        return f"{', '.join(shares)} of numpy's fp32 GEMM ({QUERIES:,} x {BASE:,}, d {D_MODEL})"


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features")."""
    return frozenset((_cpuinfo("flags") or _cpuinfo("Features") or "").split())


def has_bf16(flags: frozenset[str]) -> bool:
    return any(flag in flags for flag in BF16_FLAGS)


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def library_versions() -> dict[str, str | None]:
    """numpy, torch and faiss as installed (read from their metadata: nothing is imported)."""
    found = {}
    for name, distributions in (("numpy", ("numpy",)), ("torch", ("torch",)),
                                ("faiss", ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"))):
        found[name] = None
        for distribution in distributions:
            try:
                found[name] = f"{distribution} {metadata.version(distribution)}"
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_key(candidates: list[str], gpu: str | None = None) -> dict:
    """What a cached choice depends on; any change is measured again."""
    return {"version": VERSION, "cpu": cpu_model(), "flags": " ".join(sorted(cpu_flags())), "cores": usable_cores(),
            **library_versions(), "gpu": gpu, "candidates": list(candidates)}


def cache_path() -> Path:
    return home_dir("cache") / "backend.json"


def cached(key: dict) -> Calibration | None:
    """The cached calibration when its key is this one, else None (nothing is measured)."""
    try:
        found = Calibration(**json.loads(cache_path().read_text()))
    except (OSError, ValueError, TypeError, FlowdbError):
        return None
    return found if found.key == key else None


def auto(candidates: list[str], search: Callable[[str], Search], gpu: str | None = None) -> Calibration:
    """The calibration for these candidates: from the cache when its key matches, else
    measured now and cached. search(backend) gives that backend's exact top-k."""
    key = machine_key(candidates, gpu)
    memo = json.dumps(key, sort_keys=True)
    found = _memo.get(memo) or cached(key)
    if found is None:
        found = calibrate(candidates, search, key)
        _write(found)
    _memo[memo] = found
    return found


def calibrate(candidates: list[str], search: Callable[[str], Search], key: dict) -> Calibration:
    queries, base = planted_problem(QUERIES, BASE, D_MODEL)
    reference = brute_force(queries[:CHECKED], base, K)
    flops = 2 * QUERIES * BASE * D_MODEL
    queries @ base[:256].T  # warm the BLAS thread pool
    started = time.perf_counter()
    queries @ base.T
    gemm = flops / (time.perf_counter() - started) / 1e9
    rates: dict[str, float | None] = {}
    for backend in candidates:
        run = search(backend)
        try:
            run(queries[:64], base, K)  # warm up thread pools, caches, a GPU context
            started = time.perf_counter()
            found = run(queries, base, K)
            seconds = time.perf_counter() - started
        except Exception:  # a backend that fails here (no kernel, no memory) is simply not chosen
            rates[backend] = None
            continue
        exact = agrees((found[0][:CHECKED], found[1][:CHECKED]), reference)
        rates[backend] = flops / seconds / 1e9 if exact else None
    return Calibration(choose(rates), gemm, rates, key, time.strftime("%Y-%m-%d %H:%M:%S"))


def choose(rates: dict[str, float | None]) -> str:
    """The fastest exact candidate; the first one unless another beats it by MARGIN."""
    exact = {b: r for b, r in rates.items() if r is not None}
    if not exact:
        raise FlowdbError("no matching backend gave the exact answer in calibration: "
                          "pin one with --device cpu and report this machine (flowdb doctor)")
    first = next(iter(exact))
    best = max(exact, key=exact.get)
    return best if exact[best] > MARGIN * exact[first] else first


def _write(found: Calibration) -> None:
    """Cache atomically; a home that cannot be written only costs a measurement per process."""
    try:
        path = cache_path()
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(asdict(found), indent=1))
        os.replace(partial, path)
    except (OSError, FlowdbError):
        pass


# --- the problem, and what exact means -----------------------------------------------------

def planted_problem(n_queries: int, n_base: int, d: int, k: int = K, seed: int = 0):
    """Unit rows (float32) with exact ties planted at the k-th place: the base's last
    rows copy its first ones, and a quarter of the queries are 2 (u_1 + ... + u_(k-1))
    + u_c for base rows u, with u_c one that has a copy, so places k and k+1 tie exactly.
    Another quarter lie near a base row (a large top-1 gap); the rest are random."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, d), dtype=np.float32)
    copies = max(1, n_base // 64)
    base[n_base - copies:] = base[:copies]
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, d), dtype=np.float32)
    tied = n_queries // 4
    others = rng.integers(copies, n_base - copies, (tied, k - 1))
    queries[:tied] = 2 * base[others].sum(axis=1) + base[rng.integers(0, copies, tied)]
    near = slice(tied, 2 * tied)
    queries[near] = base[rng.integers(0, n_base, tied)] + 0.5 * queries[near] / np.sqrt(d)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries, base


def brute_force(queries: np.ndarray, base: np.ndarray, k: int):
    """Top-k cosines in float64 (rows normalised again in float64), and all cosines."""
    q = queries.astype(np.float64)
    b = base.astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    order = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cos, order, axis=1), order, cos


def agrees(found, reference, atol: float = 1e-5) -> bool:
    """Scores equal brute force's within atol, and every returned index has that score
    (indices may differ from brute force only between tied cosines), no index twice."""
    scores, indices = found
    ref_scores, _, cos = reference
    return (scores.shape == ref_scores.shape
            and bool(np.all(np.abs(scores - ref_scores) <= atol))
            and bool(np.all(np.abs(np.take_along_axis(cos, indices, axis=1) - ref_scores) <= atol))
            and all(len(set(row)) == len(row) for row in indices.tolist()))
