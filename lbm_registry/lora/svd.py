"""Truncated SVDs for LoRA extraction: randomized when the rank is small next to the matrix,
exact thin SVD otherwise. Never ``full_matrices=True``.

Why randomized: LoRA keeps the top 16-64 components of matrices up to 1280 x 23040. A full SVD
(what kohya's and the original LBM scripts do) computes all min(m, n) components and, with
``full_matrices=True``, a square basis of the larger side: seconds to minutes per layer. The
randomized range finder of Halko, Martinsson & Tropp (2011, Alg. 4.4) needs ``2 * n_iter + 2``
passes of ``A`` against ``k = rank + oversample`` columns plus a few skinny QRs.

Accuracy: with ``oversample = max(12, rank / 2)`` and ``n_iter = 2`` the Frobenius error of the
rank-``r`` truncation stays within ~0.8% of the exact truncation's (~0.5% for ranks >= 16) on
power-law spectra with a noise floor. Flat spectra (noise-like deltas, as full fine-tunes give)
are harder, and the smaller the matrix the worse: at rank 32 on a 320 x 1280 layer two
iterations were 1.1-1.2% off, three 0.7%. So matrices whose smaller side is under
``SVDSettings.small_side`` (1024) get three iterations; on those the products are cheap and the
sketch-side QRs dominate anyway. Measured in tests/test_lora_svd.py, tests/test_lora_extract.py
and benchmarks/extract.py. ``n_iter = 1`` was up to 1.4% worse, and an oversampling of 8 up to
1.1% at rank 8: too close to a 1% target.

Our own implementation rather than ``torch.svd_lowrank``: it takes a seeded
``torch.Generator`` (deterministic output, no global RNG state) and returns the sketch's extra
singular values, which the rank policies use as a spectrum estimate.

Low-precision sketch: where bf16 matrix products are several times faster than fp32 (CPUs with
AVX512-BF16 or AMX, GPUs with bf16 tensor cores), the range finder's early products use a bf16
copy of ``A``: on this project's 2-core CPU a 10240 x 1280 product against 48 columns took 4 ms
in bf16 against 21 ms in fp32. Only the *search* for the subspace is rounded (bf16 keeps 8 bits,
a relative perturbation of ~0.2% per entry, far below the ~1% the sketch itself concedes on flat
spectra); the last power iteration's product and the final projection ``Q^T A`` use the exact
fp32 ``A``, so the columns of ``Q`` lie in the range of ``A`` (an exactly low-rank delta is still
recovered to fp32 accuracy) and the factors are those of the exact matrix projected on ``Q``.
``SVDSettings.sketch`` = ``fp32`` turns it off; the choice depends only on the machine (never on
timings), so a machine always writes the same bytes for the same inputs.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from lbm_registry.lbm.threads import single_thread_below


@dataclass(frozen=True)
class SVDSettings:
    """Knobs of the truncated SVD.

    ``method``: ``auto`` (randomized unless the sketch would cover at least ``exact_ratio`` of
    the smaller side, where the exact thin SVD is about as cheap and exact), ``randomized`` or
    ``exact``. ``seed`` makes the random test matrices reproducible (mixed with the layer name).
    ``sketch``: the dtype of the range finder's early products (see the module docstring):
    ``auto`` (bf16 where :func:`fast_bf16_matmul` says so, else fp32), ``bf16`` or ``fp32``.
    """

    method: Literal["auto", "randomized", "exact"] = "auto"
    oversample_ratio: float = 0.5
    min_oversample: int = 12
    n_iter: int = 2
    small_side: int = 1024
    small_n_iter: int = 3
    exact_ratio: float = 0.5
    seed: int = 0
    sketch: Literal["auto", "bf16", "fp32"] = "auto"

    def sketch_size(self, rank: int, min_side: int) -> int:
        extra = max(self.min_oversample, math.ceil(rank * self.oversample_ratio))
        return min(min_side, rank + extra)

    def power_iterations(self, m: int, n: int) -> int:
        """``n_iter``, or ``small_n_iter`` when the smaller side is under ``small_side``."""
        return self.small_n_iter if min(m, n) < self.small_side else self.n_iter

    def use_exact(self, rank: int, m: int, n: int) -> bool:
        if self.method != "auto":
            return self.method == "exact"
        small = min(m, n)
        return self.sketch_size(rank, small) >= self.exact_ratio * small or m * n <= 16384

    def sketch_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 for the early range-finder products, or None for fp32 throughout."""
        if self.sketch == "fp32" or (self.sketch == "auto" and not fast_bf16_matmul(device)):
            return None
        return torch.bfloat16

    def generator(self, name: str) -> torch.Generator:
        """A generator seeded from ``seed`` and the layer name: results don't depend on layer order."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))


@dataclass
class SVDResult:
    """The top ``rank`` components ``u (m, r)``, ``s (r,)``, ``vh (r, n)``.

    ``spectrum``: every singular value the method produced (all of them for ``exact``, the
    ``k >= rank`` sketch values for ``randomized``; the ones past ``rank`` are less accurate).
    ``complete``: ``spectrum`` is the whole spectrum.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    spectrum: torch.Tensor
    method: str
    complete: bool


def fast_bf16_matmul(device: torch.device | str) -> bool:
    """Whether bf16 matrix products run several times faster than fp32 on ``device``: a CUDA GPU
    with bf16 tensor cores (compute capability 8.0+), or a CPU with AVX512-BF16 or AMX-BF16
    under oneDNN. Elsewhere bf16 products are emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and _cpu_has_bf16_dot()
    return False


@functools.cache
def _cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``y``'s columns (QR), on one thread when ``y`` is small."""
    with single_thread_below(y.numel()):
        return torch.linalg.qr(y).Q


def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, computed on the tall orientation.

    LAPACK's divide-and-conquer SVD is several times slower on wide matrices (e.g. a 96 x 864
    conv weight) than on their transpose, and LoRA weights are often wide.
    """
    with single_thread_below(a.numel()):
        if a.shape[0] >= a.shape[1]:
            return torch.linalg.svd(a, full_matrices=False)
        u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
    return vh.T, s, u.T


def randomized_svd(a: torch.Tensor, k: int, *, n_iter: int = 2, generator: torch.Generator | None = None,
                   sketch_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``k`` SVD of ``a`` from a randomized range finder with ``n_iter`` power iterations.

    Returns ``u (m, k)``, ``s (k,)``, ``vh (k, n)``. ``u @ diag(s) @ vh`` is the projection
    ``Q Q^T a`` onto the sketched range, so ``||a - u_r s_r vh_r||^2 = ||a||^2 - sum(s_r^2)``
    holds exactly (in exact arithmetic) for every truncation ``r <= k``. ``sketch_dtype``
    (bf16): the products before the last power iteration's use a copy of ``a`` in that dtype.
    """
    m, n = a.shape
    if m > n:
        # Sketch on the smaller side: the QRs are then of (small x k) matrices. Same result by
        # symmetry (the SVD of a.T), ~25% less time on the small layers where QR dominates.
        u, s, vh = randomized_svd(a.T, k, n_iter=n_iter, generator=generator, sketch_dtype=sketch_dtype)
        return vh.T, s, u.T
    omega = torch.randn(n, k, generator=generator, dtype=a.dtype).to(a.device)
    low = a.to(sketch_dtype) if sketch_dtype is not None and n_iter > 0 else None
    q = orth(a @ omega if low is None else (low @ omega.to(low.dtype)).to(a.dtype))   # (m, k), m <= n
    for i in range(n_iter):
        # Re-orthonormalise after every a a^T product: without it the columns collapse onto the
        # top singular vector in fp32 after a couple of iterations. (Directions whose singular
        # value is below ~1e-4 of the top one may still blur; they carry < 1e-8 of the energy.)
        if low is None:
            q = orth(a @ (a.T @ q))
            continue
        z = (low.T @ q.to(low.dtype)).to(a.dtype)
        # The last product uses the exact matrix: Q's columns then lie in its range.
        q = orth(a @ z if i == n_iter - 1 else (low @ z.to(low.dtype)).to(a.dtype))
    bt = a.T @ q                                   # (n, k) = (Q^T a)^T
    w, s, zt = tall_skinny_svd(bt)                # bt = w diag(s) zt -> Q^T a = zt^T diag(s) w^T
    return q @ zt.T, s, w.T


def tall_skinny_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a tall ``b`` (n, k), k small, from the eigen-decomposition of ``b^T b`` in fp64.

    Why: the k x k Gram matrix costs one small product and its ``eigh`` is microseconds, where
    LAPACK's SVD of the n x k matrix was the largest cost after the products on small layers.
    Forming the Gram in fp64 keeps every singular value above ~1e-7 of the largest accurate;
    components below that (numerically zero) are returned as exact zeros with zero vectors.
    """
    bd = b.double()
    evals, z = torch.linalg.eigh(bd.T @ bd)                    # ascending
    evals, z = evals.flip(0).clamp_min(0), z.flip(1)
    s = evals.sqrt()
    keep = s > s[0] * 1e-7 if len(s) and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    w = (bd @ z) / torch.where(keep, s, torch.ones_like(s))
    w[:, ~keep] = 0
    s = torch.where(keep, s, torch.zeros_like(s))
    return w.to(b.dtype), s.to(b.dtype), z.T.to(b.dtype)


def truncated_svd(a: torch.Tensor, rank: int, settings: SVDSettings = SVDSettings(),
                  generator: torch.Generator | None = None) -> SVDResult:
    """The top-``rank`` SVD of a 2-d fp32 matrix, randomized or exact per ``settings``."""
    m, n = a.shape
    small = min(m, n)
    rank = max(1, min(rank, small))
    if settings.use_exact(rank, m, n):
        u, s, vh = thin_svd(a)
        return SVDResult(u[:, :rank], s[:rank], vh[:rank], s, "exact", True)
    k = settings.sketch_size(rank, small)
    u, s, vh = randomized_svd(a, k, n_iter=settings.power_iterations(m, n), generator=generator,
                              sketch_dtype=settings.sketch_dtype(a.device))
    return SVDResult(u[:, :rank], s[:rank], vh[:rank], s, "randomized", k >= small)


def top_singular_values(a: torch.Tensor, depth: int, settings: SVDSettings = SVDSettings(),
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, bool]:
    """The ``depth`` largest singular values (estimates when randomized) and whether that is
    the whole spectrum. Exact ``svdvals`` when the sketch would cover much of the matrix."""
    m, n = a.shape
    small = min(m, n)
    depth = max(1, min(depth, small))
    if settings.use_exact(depth, m, n):
        with single_thread_below(a.numel()):
            return torch.linalg.svdvals(a if a.shape[0] >= a.shape[1] else a.T), True
    k = settings.sketch_size(depth, small)
    _, s, _ = randomized_svd(a, k, n_iter=settings.power_iterations(m, n), generator=generator,
                             sketch_dtype=settings.sketch_dtype(a.device))
    return s[:depth], depth >= small


def sq_norm(t: torch.Tensor) -> float:
    """``||t||_F^2`` to ~1e-8 relative: fp32 norms of short rows, added in fp64.

    Why not ``vector_norm(t) ** 2``: in fp32 over a whole 10240 x 1280 layer it is off by ~1e-3
    (one long fp32 accumulation), enough to move a reported error ratio in its third decimal;
    norms of rows are short sums, and this costs the same single pass. A NaN/Inf in ``t`` gives
    a non-finite result, as ``vector_norm`` does."""
    if t.numel() == 0:
        return 0.0
    if t.ndim == 2 and t.shape[1] <= 65536:
        rows = t
    else:
        flat = t.reshape(-1)
        width = 4096
        full = flat.numel() // width * width
        head = float(torch.linalg.vector_norm(flat[:full].view(-1, width), dim=1).double().square().sum()) if full else 0.0
        tail = float(torch.linalg.vector_norm(flat[full:]).double() ** 2) if full < flat.numel() else 0.0
        return head + tail
    return float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation, from the full spectrum."""
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    return math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0
