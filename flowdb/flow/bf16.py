"""Certified bf16 matching: the `torch-bf16` backend (CPU or CUDA).

A real bf16 GEMM (torch.matmul on bfloat16 tensors) proposes each query row's
top-(k + EXTRA) candidates; the candidates are re-scored exactly in fp32; a rigorous
per-row bound on the bf16 GEMM's error then decides whether the candidates must hold
the row's true top-k. Rows it cannot certify are searched again in fp32. The answer is
the fp32 top-k of every row, whatever the data (ties at the k-th place included).

Why the bound holds. Let q and b be fp32 rows (nothing below needs unit length),
q^ = bf16(q) and b^ = bf16(b) their roundings, and dq = q - q^, db = b - b^ (exact
in fp32: a number and its bf16 rounding are within a factor two, Sterbenz). Then

    q.b = q^.b^ + q^.db + dq.b^ + dq.db, so by Cauchy-Schwarz
    |q.b - q^.b^| <= |q^| |db| + |dq| |b^| + |dq| |db|.                        (1)

A bf16 number has an 8-bit significand, so every product q^_l b^_l (16 bits) is exact
in fp32, and the GEMM only adds d exact products in fp32. In any order or blocking,

    |acc - q^.b^| <= gamma_d sum_l |q^_l b^_l| <= gamma_d |q^| |b^|,            (2)

gamma_d = d u / (1 - d u) (Higham, Accuracy and Stability, eq. 3.5). u is taken as
2^-23, twice fp32's unit roundoff, so an accumulator that truncates instead of
rounding (some tensor cores) is covered too; on CUDA the block also switches off
torch's reduced-precision (bf16) split-K reductions. torch stores the product in bf16
(on the CPU an fp32 output is not implemented): out = acc (1 + e), |e| <= 2^-8, so

    |acc - out| <= |out| 2^-8 / (1 - 2^-8) = |out| rho.                         (3)

Adding (1)-(3): |q.b - out| <= E_i + |out| rho, where E_i takes row i's norms and the
largest |b^| and |db| of the base tile (one pass per tile bounds every pair), plus an
absolute d 2^-126 for products that underflow. The norms are computed in fp32 and
inflated by 1 + (d + 4) 2^-22, more than their own rounding error. The fp32
re-scoring errs by at most R_i = gamma_d |q_i| max |b| by the argument of (2).

The certificate. Every column j outside row i's candidates has out_j <= out_last (the
(k + EXTRA)-th bf16 score), and out + |out| rho grows with out, so its exact score is
at most T_i = out_last + |out_last| rho + E_i. When T_i + R_i < s_k, the k-th largest
re-scored candidate, every non-candidate lies below k candidates both exactly and as
fp32 computes it: the candidates' top-k is the row's. Otherwise the row takes a longer
list, k + WIDER x EXTRA candidates of the same bf16 scores, and the same test; a row
that fails it again is searched in fp32. Ties go to the lower column, as in every
other backend.

Only a prefix of the candidates is re-scored: L_i, the k-th largest of
out_j - |out_j| rho - E_i, is below the row's k-th exact score, so a candidate with
out_j + |out_j| rho + E_i < L_i - 2 R_i can neither be in the top-k nor outrank one
there in fp32. The bounds grow with out_j and topk lists candidates best first, so
the ones kept are a prefix, usually k and a few more.

Re-scoring never gathers [rows x candidates x d] at once: RESCORE_ROWS rows at a time
gather their kept candidates' rows (a block that stays in cache) and multiply. On a
shared 2-core AVX2 machine, 2,048 rows x 21 candidates at d 2,304 took 51 ms this way
(numpy), 745 ms as one whole gather, 1.0 s with torch.bmm in chunks, and 1.5 to 4.2 s
as a GEMM against the union of a chunk's candidates (the union gathers the same rows
when candidates rarely repeat, and multiplies every row of the chunk by all of them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flowdb.errors import FlowdbError
from flowdb.flow.calibration import usable_cores
from flowdb.flow.ranking import top_k_rows

EXTRA_CANDIDATES = 16  # candidates beyond k taken from the bf16 GEMM
WIDER = 4  # rows the first list cannot settle get k + WIDER x EXTRA candidates before fp32
RESCORE_ROWS = 32  # query rows per gathered block in the exact re-scoring (numpy, CPU)
RESCORE_ROWS_CUDA = 1024
NORM_CHUNK = 256  # rows per pass when measuring rounding residuals: the fp32 scratch stays in cache
U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8-bit significand, round to nearest)
U_SUM = 2.0 ** -23  # per addition in fp32 sums: twice fp32's unit roundoff, see the module docstring
RHO = U_BF16 / (1 - U_BF16)  # output rounding, relative to the stored bf16 value
TINY = 2.0 ** -126  # underflow, per product
NAN_MESSAGE = "a cosine is NaN: a decoder row is all zeros or not finite"


def gamma(d: int) -> float:
    """Relative error bound of a sum of d terms in fp32 (with U_SUM per addition)."""
    return d * U_SUM / (1 - d * U_SUM)


@dataclass(frozen=True)
class Rounded:
    """fp32 rows, their bf16 rounding, and upper bounds on the norms the bound needs."""

    exact: object  # torch fp32 [n, d]
    rounded: object  # torch bf16 [n, d]
    norm: np.ndarray  # |x|, float64 [n]
    norm_rounded: np.ndarray  # |x^| (bounded by |x| + |x - x^|)
    norm_residual: np.ndarray  # |x - x^|

    @classmethod
    def of(cls, rows: np.ndarray, device: str = "cpu", buffers: dict | None = None, role: str = "rows") -> Rounded:
        """buffers: tensors kept from an earlier call (by role) and reused, since fresh
        ones pay their page faults on every tile (several times the arithmetic here)."""
        import torch

        if not np.isfinite(rows).all():
            raise FlowdbError(NAN_MESSAGE)
        buffers = {} if buffers is None else buffers
        n, d = rows.shape
        exact = torch.from_numpy(rows).to(device)
        rounded = _buffer(buffers, role, n * d, torch.bfloat16, device).view(n, d)
        scratch = _buffer(buffers, "scratch", NORM_CHUNK * d, torch.float32, device)
        norm, residual = (torch.empty(n, device=device) for _ in range(2))
        for start in range(0, n, NORM_CHUNK):
            part = slice(start, start + NORM_CHUNK)
            rounded[part].copy_(exact[part])
            delta = scratch[:rounded[part].numel()].view(-1, d)
            delta.copy_(rounded[part]).sub_(exact[part])  # x^ - x, exact in fp32
            torch.linalg.vector_norm(delta, dim=1, out=residual[part])
            torch.linalg.vector_norm(exact[part], dim=1, out=norm[part])
        slack = 1 + (d + 4) * 2.0 ** -22
        norm, residual = (x.cpu().numpy().astype(np.float64) * slack + 2.0 ** -60 for x in (norm, residual))
        return cls(exact, rounded, norm, norm + residual, residual)  # |x^| <= |x| + |x - x^|


def _buffer(buffers: dict, name: str, numel: int, dtype, device):
    import torch

    found = buffers.get(name)
    if found is None or found.numel() < numel:
        found = buffers[name] = torch.empty(numel, dtype=dtype, device=device)
    return found[:numel]


def error_bound(queries: Rounded, base: Rounded) -> tuple[np.ndarray, np.ndarray]:
    """Per query row i, (E_i, R_i): for every row b of base, |q_i.b - out| <= E_i + |out| RHO,
    where out is the bf16 GEMM's stored score, and fp32 re-scoring of q_i.b errs by <= R_i."""
    d = queries.exact.shape[1]
    g = gamma(d)
    b_hat, b_res, b_norm = (float(x.max()) for x in (base.norm_rounded, base.norm_residual, base.norm))
    q_hat, q_res = queries.norm_rounded, queries.norm_residual
    tiny = (d + 2) * TINY + 2.0 ** -40  # underflow, and float64 arithmetic in the comparisons
    inputs = q_hat * b_res + q_res * b_hat + q_res * b_res
    return inputs + g * q_hat * b_hat + tiny, g * queries.norm * b_norm + tiny


class CertifiedSearch:
    """One query block against one base tile (both unit rows, float32): exact top-k via
    the bf16 GEMM and the certificate. Keeps the last base tile rounded, since the
    matcher searches every query block against the same tile before moving on."""

    def __init__(self, device: str = "cpu", extra: int = EXTRA_CANDIDATES):
        self.device, self.extra = device, extra
        self.tile = self.base = None
        self.buffers = {}  # bf16 copies, scratch and the score block, reused across blocks
        # rows searched, rows given a longer candidate list, and rows searched again in fp32
        self.rows = self.rows_widened = self.rows_redone = 0

    def __call__(self, block: np.ndarray, tile: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if tile is not self.tile:
            self.base, self.tile = Rounded.of(tile, self.device, self.buffers, "tile"), tile
        queries = Rounded.of(block, self.device, self.buffers, "block")
        n, m = block.shape[0], tile.shape[0]
        bounds = error_bound(queries, self.base)
        with _exact_sums(torch):
            out = self._scores(torch, queries.rounded, self.base.rounded)
        scores, indices, unsure = self._certified(torch, out, queries, bounds, None, k, min(m, k + self.extra))
        wide = min(m, k + WIDER * self.extra)
        if unsure.size and wide > k + self.extra:  # a longer candidate list settles most of the rest
            found = self._certified(torch, out[torch.from_numpy(unsure).to(out.device)], queries, bounds,
                                    unsure, k, wide)
            scores[unsure], indices[unsure] = found[0], found[1]
            self.rows_widened += unsure.size
            unsure = unsure[found[2]]
        if unsure.size:
            scores[unsure], indices[unsure] = self._fp32(torch, block[unsure], queries.exact[unsure], k)
            self.rows_redone += unsure.size
        self.rows += n
        return scores, indices

    def _certified(self, torch, out, queries: Rounded, bounds, rows: np.ndarray | None, k: int, width: int):
        """The top-k among each row's `width` best bf16 candidates, re-scored exactly, and
        the positions (within these rows) of those the certificate cannot settle."""
        with _exact_sums(torch):
            approx, candidates = torch.topk(out, width, dim=1)
        approx = approx.float().cpu().numpy().astype(np.float64)
        candidates = candidates.cpu().numpy()
        e, r = (x if rows is None else x[rows] for x in bounds)
        upper = approx + np.abs(approx) * RHO + e[:, None]
        lower = approx - np.abs(approx) * RHO - e[:, None]
        keep = (upper >= (lower[:, k - 1] - 2 * r)[:, None]).sum(axis=1)  # a prefix of >= k
        if self.device == "cpu":
            block = queries.exact.numpy()
            exact = rescore_numpy(block if rows is None else block[rows], self.tile, candidates, keep)
        else:
            chosen = queries.exact if rows is None else queries.exact[torch.from_numpy(rows).to(out.device)]
            exact = rescore_torch(chosen, self.base.exact, candidates, keep, RESCORE_ROWS_CUDA)
        order = np.lexsort((candidates, -exact), axis=1)[:, :k]
        scores = np.take_along_axis(exact, order, axis=1)
        indices = np.take_along_axis(candidates, order, axis=1)
        if width == self.tile.shape[0]:  # every column was a candidate
            return scores, indices, np.empty(0, dtype=np.int64)
        unsure = np.flatnonzero(upper[:, -1] + r >= scores[:, k - 1])
        return scores, indices, unsure

    def _scores(self, torch, q_hat, b_hat):
        """The bf16 GEMM, into a reused buffer on the CPU."""
        if self.device != "cpu":
            return q_hat @ b_hat.T
        n, m = q_hat.shape[0], b_hat.shape[0]
        out = _buffer(self.buffers, "scores", n * m, torch.bfloat16, "cpu").view(n, m)
        return torch.matmul(q_hat, b_hat.T, out=out)

    def _fp32(self, torch, block: np.ndarray, rows, k: int):
        """Rows the certificate could not settle: an fp32 search against the whole tile."""
        if self.device == "cpu":
            return top_k_rows(block @ self.tile.T, k)
        with _exact_sums(torch):
            return top_k_rows((rows @ self.base.exact.T).cpu().numpy(), k)


def rescore_numpy(block: np.ndarray, tile: np.ndarray, candidates: np.ndarray, keep: np.ndarray,
                  rows: int = RESCORE_ROWS) -> np.ndarray:
    """fp32 block_i . tile_c for each row's first keep_i candidates c; -inf past them.
    The gathers are bound by memory, and numpy releases the GIL in them: one thread per
    core, each on its own rows, nearly doubles the rate on two cores."""
    exact = np.full(candidates.shape, -np.inf, dtype=np.float32)

    def rescore(part: range) -> None:
        for start in part:
            stop = min(start + rows, part.stop)
            width = int(keep[start:stop].max())
            gathered = tile[candidates[start:stop, :width]]  # [rows, width, d]
            exact[start:stop, :width] = np.matmul(gathered, block[start:stop, :, None])[..., 0]

    n, threads = block.shape[0], usable_cores()
    bounds = [n * t // threads for t in range(threads + 1)]
    parts = [range(lo, hi, rows) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    run = _pool().map if len(parts) > 1 else map  # one part: no hand-off to a thread
    list(run(rescore, parts))
    return _past_prefix(exact, keep)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(usable_cores(), thread_name_prefix="flowdb-rescore")


def rescore_torch(queries, base, candidates: np.ndarray, keep: np.ndarray, rows: int) -> np.ndarray:
    """rescore_numpy on the tensors' device (CUDA), in full fp32."""
    import torch

    exact = np.full(candidates.shape, -np.inf, dtype=np.float32)
    chosen = torch.from_numpy(candidates).to(base.device)
    with _exact_sums(torch):
        for start in range(0, candidates.shape[0], rows):
            stop = start + rows
            width = int(keep[start:stop].max())
            gathered = base[chosen[start:stop, :width]]
            found = torch.bmm(gathered, queries[start:stop, :, None])[..., 0]
            exact[start:stop, :width] = found.cpu().numpy()
    return _past_prefix(exact, keep)


def _past_prefix(exact: np.ndarray, keep: np.ndarray) -> np.ndarray:
    exact[np.arange(exact.shape[1]) >= keep[:, None]] = -np.inf
    return exact


class _exact_sums:
    """Within the block, CUDA matmuls keep full fp32 sums: no TF32 inputs for fp32
    tensors and no reduced-precision reductions for bf16 ones (no-ops on the CPU)."""

    def __init__(self, torch):
        self.flags = torch.backends.cuda.matmul

    def __enter__(self):
        self.previous = self.flags.allow_tf32, self.flags.allow_bf16_reduced_precision_reduction
        self.flags.allow_tf32 = self.flags.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        self.flags.allow_tf32, self.flags.allow_bf16_reduced_precision_reduction = self.previous
