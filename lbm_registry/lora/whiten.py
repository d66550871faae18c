"""Activation-aware (whitened) truncation: the rank-r LoRA that keeps the most of a layer's OUTPUT.

Every plain extractor minimises ``||dW - BA||_F``. What a user sees is the layer's output on its
real inputs ``X`` (d x n columns): ``||(dW - BA) X||_F``. With ``C = X X^T / n = L L^T``,
``||(dW - BA) X||_F^2 / n = ||(dW - BA) L||_F^2``, so the best rank-r ``BA`` is the truncated SVD
of the whitened delta ``M = dW L``, mapped back: ``B = U_r sqrt(S_r)``,
``A = sqrt(S_r) V_r^T L^-1`` (Eckart-Young on ``M``; SVD-LLM's construction).

Regularisation (stated, always on): ``C`` is damped to ``C + delta I`` with
``delta = damping * mean(diag C)`` (``damping`` 0.01 by default, GPTQ's ``percdamp``) before the
Cholesky factorisation. Why: dead channels and few samples make ``C`` singular (``L^-1`` would
not exist), and calibration data never cover every input a layer will see: the damping keeps a
share of the plain weight-error objective (``delta -> inf`` is plain SVD), so directions the
calibration set never excited are not thrown away for free. The Cholesky runs in fp32 (the
damping keeps the condition number near ``d / damping``, well within its reach), then in fp64
if fp32 fails; if that fails too (a matrix that is not positive definite in floating point),
the damping is raised 10x, up to three times; a layer whose inputs were all zero, or whose
result is not finite, falls back to plain SVD.

Never worse than plain SVD on the calibration set: for the exact damped truncation ``W`` and
the plain truncation ``P`` at the same rank, ``e_C(W) = e_damped(W) - delta ||R_W||^2 <=
e_damped(P) - delta ||R_W||^2 <= e_C(P)`` (``W`` is optimal for the damped metric, ``P`` for the
weight error). Randomized SVDs and bf16 rounding can break that by a hair, so every layer is
checked on its stored factors and falls back to the plain factors when they are not better.

Full rank stays exact: a layer at full rank is stored as ``dW`` itself (no whitening needed).

Statistics modes (see :mod:`lbm_registry.lora.calibrate`): ``full`` (the d x d second moment)
and ``diag`` (its diagonal: per-input-channel scaling, ASVD-like; per channel and kernel tap for
convolutions). With ``diag`` the output error is measured in the diagonal metric, the only one
known.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lora.extract import LayerFactors, choose_energy_rank, factorize, stored_error
from lbm_registry.lora.stream import LayerDelta
from lbm_registry.lora.svd import (
    SVDResult,
    SVDSettings,
    orth,
    tall_skinny_svd,
    top_singular_values,
    truncated_svd,
)

DEFAULT_DAMPING = 0.01
MAX_DAMPING_RETRIES = 3
CACHE_GROUPS = 4
"""Whitening factors kept for the next layers (the layers sharing one input, e.g. ``to_q``,
``to_k`` and ``to_v`` of an attention block, come within a few layers of each other)."""

StatsMode = Literal["full", "diag"]


@dataclass
class InputStats:
    """Second moment of one layer's inputs: ``full`` (d, d) or ``diag`` (d,), already divided by
    the number of input vectors ``n`` (tokens, or conv patches)."""

    mode: StatsMode
    moment: torch.Tensor
    n: int

    @property
    def dim(self) -> int:
        return int(self.moment.shape[0])


class StatsSource(Protocol):
    """Where :class:`Whitener` gets each layer's statistics (a stats file, or memory)."""

    def group_of(self, module: str) -> str | None: ...

    def stats(self, group: str) -> InputStats: ...


@dataclass
class Whitening:
    """``L`` of ``C + delta I = L L^T`` (lower triangular, or a vector for ``diag``), with ``C``."""

    mode: StatsMode
    factor: torch.Tensor       # (d, d) lower triangular, fp32; or (d,) for diag
    moment: torch.Tensor       # C itself (undamped), (d, d) or (d,), fp32
    delta: float               # the damping actually added (absolute)
    damping: float             # relative to mean(diag C), after any retries
    _low: torch.Tensor | None = field(default=None, repr=False)

    def right(self, a: torch.Tensor) -> torch.Tensor:
        """``a @ L``."""
        return a * self.factor if self.mode == "diag" else a @ self.factor

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """``L @ x``."""
        return self.factor[:, None] * x if self.mode == "diag" else self.factor @ x

    def left_t(self, x: torch.Tensor) -> torch.Tensor:
        """``L^T @ x``."""
        return self.factor[:, None] * x if self.mode == "diag" else self.factor.T @ x

    def solve_right(self, b: torch.Tensor) -> torch.Tensor:
        """``b @ L^-1``."""
        if self.mode == "diag":
            return b / self.factor
        return torch.linalg.solve_triangular(self.factor, b, upper=False, left=False)

    def cov_right(self, g: torch.Tensor) -> torch.Tensor:
        """``g @ C`` (undamped)."""
        return g * self.moment if self.mode == "diag" else g @ self.moment

    def lowered(self, dtype: torch.dtype) -> torch.Tensor:
        """``L`` in ``dtype`` (the range finder's early products), made once per factor."""
        low = self._low
        if low is None or low.dtype != dtype:
            low = self._low = self.factor.to(dtype)
        return low


def whitening(stats: InputStats, damping: float = DEFAULT_DAMPING) -> Whitening | None:
    """The damped whitening factor of ``stats``, or None when the layer saw no signal at all."""
    if damping <= 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be positive, got {damping}")
    moment = stats.moment.float()
    if not math.isfinite(float(moment.sum(dtype=torch.float64))):   # one NaN/Inf anywhere shows in the sum
        return None
    diag = moment if stats.mode == "diag" else torch.diagonal(moment)
    mean = float(diag.double().mean()) if diag.numel() else 0.0
    if mean <= 0:
        return None   # every input was zero: nothing to weight by
    lam = damping
    for _ in range(MAX_DAMPING_RETRIES + 1):
        delta = lam * mean
        if stats.mode == "diag":
            return Whitening("diag", (moment.double().clamp_min(0) + delta).sqrt().float(), moment, delta, lam)
        # fp32 first (2.5x faster than fp64; measured 9 vs 23 ms at d = 1280, 512 factorisations
        # a full-size extraction): the damping bounds the condition number by ~d / damping (1e5-
        # 6e5 here), far inside fp32 Cholesky's reach. Its rounding makes L L^T = C + delta I + E
        # with ||E|| ~1% of delta on the full-size statistics: a damping of 0.0099-0.0101 instead
        # of 0.01; L and L^-1 are applied consistently, and the check against plain SVD uses the
        # true C. fp64 if fp32 fails.
        for dt in (torch.float32, torch.float64):
            c = moment.to(dt, copy=True)   # never damp C itself: output errors are measured in it
            c.diagonal().add_(delta)
            chol, info = torch.linalg.cholesky_ex(c)
            if int(info) == 0:    # finite input, successful factorisation: finite factor
                return Whitening("full", chol.float(), moment, delta, lam)
        lam *= 10
    return None


# -- the whitened matrix M = dW L, dense or as an operator -------------------------------------
DENSE_MAX_FLOPS = 2e8
"""Full statistics: ``M = dW L`` is formed only when its product (m d^2) costs less than this;
above, the randomized SVD works with ``M x = dW (L x)`` and ``M^T y = L^T (dW^T y)``: (m + d) d k
per product instead of m d^2 once (for a 1280 x 1280 layer at rank 32, ~10x less)."""
TRACE_PROBES = 16


@dataclass
class WhitenedLayer:
    """One layer's delta with its whitening: ``dense`` is ``M = dW L`` when it was formed."""

    module: str
    a: torch.Tensor
    sq_norm: float             # ||dW||^2
    whitening: Whitening
    dense: torch.Tensor | None
    out_sq_norm: float | None = None   # tr(dW C dW^T) = ||dW X||^2 / n; None until known
    estimated: bool = False            # out_sq_norm is a randomized estimate (operator layers)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.a.shape[1]))

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``M @ x``."""
        return self.dense @ x if self.dense is not None else self.a @ self.whitening.left(x)

    def rmul(self, y: torch.Tensor) -> torch.Tensor:
        """``M^T @ y``."""
        return self.dense.T @ y if self.dense is not None else self.whitening.left_t(self.a.T @ y)


class _LowOperator:
    """``M = dW L`` as an operator in a low precision (bf16): the range finder's early products.

    Why: as for plain SVD (:mod:`lora.svd`, "Low-precision sketch"), bf16 products are several
    times faster than fp32 where the CPU has AVX512-BF16/AMX; only the search for the subspace
    is rounded, and the last product and the final projection use the exact fp32 operator."""

    def __init__(self, wl: WhitenedLayer, dtype: torch.dtype) -> None:
        self.a = wl.a.to(dtype)
        self.factor = wl.whitening.lowered(dtype)
        self.out = wl.a.dtype

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a @ (self.factor @ x.to(self.a.dtype))).to(self.out)

    def rmul(self, y: torch.Tensor) -> torch.Tensor:
        return (self.factor.T @ (self.a.T @ y.to(self.a.dtype))).to(self.out)


@dataclass
class Sketch:
    """The range a randomized SVD of ``M`` found: ``M ~ Q Q^T M`` (``side`` left, Q is m x k) or
    ``M ~ M Q Q^T`` (right, n x k), with ``captured`` = the squared norm of that part, exactly."""

    q: torch.Tensor
    side: str
    captured: float


def operator_svd(wl: WhitenedLayer, k: int, n_iter: int, generator: torch.Generator | None,
                 sketch_dtype: torch.dtype | None = None) -> tuple[SVDResult, Sketch]:
    """Rank-``k`` randomized SVD of ``M`` from products only (Halko et al., Alg. 4.4, sketched on
    the smaller side and re-orthonormalised after every product pair, as :mod:`lora.svd` does).
    ``sketch_dtype`` (bf16): the products before the last power iteration's are in that dtype."""
    m, n = wl.shape
    low = _LowOperator(wl, sketch_dtype) if sketch_dtype is not None and n_iter > 0 else None
    early = low if low is not None else wl
    if m <= n:
        q = orth(early.mul(torch.randn(n, k, generator=generator, dtype=wl.a.dtype)))
        for i in range(n_iter):
            z = early.rmul(q)
            q = orth(wl.mul(z) if i == n_iter - 1 else early.mul(z))
        w_, s, zt = tall_skinny_svd(wl.rmul(q))                             # M^T Q = W S Z^T
        u, vh, side = q @ zt.T, w_.T, "left"
    else:
        q = orth(early.rmul(torch.randn(m, k, generator=generator, dtype=wl.a.dtype)))
        for i in range(n_iter):
            y = early.mul(q)
            q = orth(wl.rmul(y) if i == n_iter - 1 else early.rmul(y))
        u, s, zt = tall_skinny_svd(wl.mul(q))                               # M Q = U S Z^T
        vh, side = zt @ q.T, "right"
    captured = float((s.double() ** 2).sum())
    return SVDResult(u, s, vh, s, "randomized", k >= min(m, n)), Sketch(q, side, captured)


def whitened_svd(wl: WhitenedLayer, rank: int, settings: SVDSettings,
                 generator: torch.Generator | None) -> tuple[SVDResult, Sketch | None]:
    """The top-``rank`` SVD of ``M``: :func:`truncated_svd` on the dense matrix, else from
    products (then also the sketch, for :func:`estimate_out_sq_norm`)."""
    if wl.dense is not None:
        return truncated_svd(wl.dense, rank, settings, generator), None
    m, n = wl.shape
    small = min(m, n)
    rank = max(1, min(rank, small))
    res, sketch = operator_svd(wl, settings.sketch_size(rank, small), settings.power_iterations(m, n), generator,
                               settings.sketch_dtype(wl.a.device))
    return SVDResult(res.u[:, :rank], res.s[:rank], res.vh[:rank], res.s, "randomized", res.complete), sketch


def estimate_out_sq_norm(wl: WhitenedLayer, sketch: Sketch, generator: torch.Generator) -> float:
    """``tr(dW C dW^T)`` of an operator layer: the energy the sketch captured (exact) plus the
    rest, ``||M||^2 - captured``, from :data:`TRACE_PROBES` Gaussian probes of the residual
    operator (Hutchinson), minus the damping's share. Within a few percent; used only to REPORT
    relative output errors (the choice between whitened and plain factors never uses it)."""
    m, n = wl.shape
    z = torch.randn(n, TRACE_PROBES, generator=generator, dtype=wl.a.dtype)
    if sketch.side == "left":
        y = wl.mul(z)
        y = y - sketch.q @ (sketch.q.T @ y)
    else:
        y = wl.mul(z - sketch.q @ (sketch.q.T @ z))
    tail = float(torch.linalg.vector_norm(y)) ** 2 / TRACE_PROBES
    return max(sketch.captured + tail - wl.whitening.delta * wl.sq_norm, 0.0)


# -- factors and their errors -----------------------------------------------------------------
def _balanced(u: torch.Tensor, s: torch.Tensor, vh_w: torch.Tensor, w: Whitening,
              rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``up = U sqrt(S)``, ``down = sqrt(S) V^T L^-1``, each component rescaled so that its up and
    down vectors have the same norm (bf16/fp16 storage keeps both in range), and both times
    ``sqrt(rank / alpha)`` so that ``(alpha / rank) up @ down`` is the truncation."""
    root = torch.sqrt(s.clamp_min(0) * (rank / alpha))
    up = u * root
    down = w.solve_right(root[:, None] * vh_w)
    nu = torch.linalg.vector_norm(up, dim=0)
    nd = torch.linalg.vector_norm(down, dim=1)
    ok = (nu > 0) & (nd > 0)
    c = torch.where(ok, torch.sqrt(nd / torch.where(ok, nu, torch.ones_like(nu))), torch.ones_like(nu))
    return up * c, down / c[:, None]


def output_terms(a: torch.Tensor, w: Whitening, up: torch.Tensor, down: torch.Tensor, scale: float) -> float:
    """``tr(Z C Z^T) - 2 tr(dW C Z^T)`` for ``Z = scale * up @ down``: the output error
    ``tr((dW - Z) C (dW - Z)^T)`` up to the constant ``tr(dW C dW^T)``, exact, in
    ``m n r + r n^2`` (no m x n residual, no m n^2 product: ``A C`` serves both terms)."""
    b = up * scale
    g = b.T @ a                                  # (r, n) = B^T dW
    ac = w.cov_right(down)                       # (r, n) = A C
    cross = float((g.double() * ac.double()).sum())   # tr(dW C A^T B^T) = <B^T dW, A C>, C symmetric
    quad = float(((b.T @ b).double() * (ac @ down.T).double()).sum())
    return quad - 2 * cross


def whitened_factors(a: torch.Tensor, sq_norm: float, shape: tuple[int, ...], w: Whitening, rank: int, *,
                     layer: WhitenedLayer | None = None, alpha: float | None = None,
                     dtype: torch.dtype = torch.bfloat16, settings: SVDSettings = SVDSettings(),
                     generator: torch.Generator | None = None, svd: SVDResult | None = None,
                     scratch: torch.Tensor | None = None) -> LayerFactors | None:
    """Stored factors of the whitened truncation of ``a`` at ``rank`` (< the smaller side), or
    None when they are not finite. ``rel_error`` is the weight error ``||a - BA|| / ||a||`` (on
    the stored factors, as for plain ones); ``svd`` may reuse a decomposition of ``a @ L``."""
    wl = layer if layer is not None else prepare_layer("", a, sq_norm, w)
    res = svd if svd is not None else whitened_svd(wl, rank, settings, generator)[0]
    al = float(alpha) if alpha is not None else float(rank)
    up, down = _balanced(res.u[:, :rank], res.s[:rank], res.vh[:rank], w, rank, al)
    up, down = up.to(dtype), down.to(dtype)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        return None
    err = stored_error(a, sq_norm, up.float(), down.float(), al / rank, scratch)
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return LayerFactors(down, up, al, rank, err, f"whitened-{res.method}", res.spectrum)


def _matrix_factors(f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor, float]:
    up = f.up.reshape(f.up.shape[0], -1).float()
    down = f.down.reshape(f.down.shape[0], -1).float()
    return up, down, f.alpha / f.rank


def prepare_layer(module: str, a: torch.Tensor, sq_norm: float, w: Whitening) -> WhitenedLayer:
    """``a`` with its whitening; ``M`` formed when cheap (diagonal statistics, small layers),
    and then ``tr(dW C dW^T)`` known exactly."""
    m, n = a.shape
    if w.mode == "diag" or m * n * n <= DENSE_MAX_FLOPS:
        dense = w.right(a)
        out_sq = max(float(torch.linalg.vector_norm(dense)) ** 2 - w.delta * sq_norm, 0.0)
        return WhitenedLayer(module, a, sq_norm, w, dense, out_sq)
    return WhitenedLayer(module, a, sq_norm, w, None)


# -- the extraction hook ----------------------------------------------------------------------
class Whitener:
    """The per-layer hook :func:`lbm_registry.lora.extract.extract_lora` calls with calibration
    statistics: the spectra the rank policies read (of ``dW L``) and the stored factors, checked
    against plain SVD (see the module docstring).

    Factors ``L`` are cached for the few layers that share an input; the current layer's
    whitened form is kept between calls. ``counts`` tallies the outcome per layer.
    """

    def __init__(self, source: StatsSource, damping: float = DEFAULT_DAMPING) -> None:
        if damping <= 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be positive, got {damping}")
        self.source = source
        self.damping = damping
        self._factors: OrderedDict[str, Whitening | None] = OrderedDict()
        self._current: WhitenedLayer | None = None
        self.counts: dict[str, int] = {}
        self.max_damping = damping

    def _whitening(self, module: str, dim: int) -> Whitening | None:
        group = self.source.group_of(module)
        if group is None:
            return None
        if group not in self._factors:
            stats = self.source.stats(group)
            if stats.dim != dim:
                raise LoRAError(f"calibration statistics of {module} have {stats.dim} inputs, the layer has {dim}: "
                                "statistics of another architecture")
            self._factors[group] = whitening(stats, self.damping)
            while len(self._factors) > CACHE_GROUPS:
                self._factors.popitem(last=False)
        self._factors.move_to_end(group)
        w = self._factors[group]
        if w is not None:
            self.max_damping = max(self.max_damping, w.damping)
        return w

    def prepare(self, d: LayerDelta) -> WhitenedLayer | None:
        if self._current is not None and self._current.module == d.module and self._current.a is d.matrix:
            return self._current
        self._current = None
        w = self._whitening(d.module, d.matrix.shape[1])
        if w is None:
            return None
        self._current = prepare_layer(d.module, d.matrix, d.sq_norm, w)
        return self._current

    # -- what the rank policies read ---------------------------------------------------------
    def top_values(self, d: LayerDelta, depth: int, settings: SVDSettings,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, bool]:
        """The ``depth`` largest singular values of ``dW L`` (``--budget``: output error per byte)."""
        wl = self.prepare(d)
        if wl is None:
            return top_singular_values(d.matrix, depth, settings, generator)
        if wl.dense is not None:
            return top_singular_values(wl.dense, depth, settings, generator)
        res, _ = whitened_svd(wl, depth, settings, generator)
        return res.s[:depth], res.complete

    def energy_rank(self, d: LayerDelta, fraction: float, limit: int, settings: SVDSettings,
                    generator: torch.Generator | None) -> tuple[int, SVDResult | None]:
        """Smallest rank keeping ``fraction`` of the layer's output energy ``||dW L||^2``
        (``M`` is formed for this: an m d^2 product on large layers)."""
        wl = self.prepare(d)
        if wl is None:
            return choose_energy_rank(d.matrix, d.sq_norm, fraction, limit, settings, generator)
        if wl.dense is None:
            wl.dense = wl.whitening.right(wl.a)
            wl.out_sq_norm = max(float(torch.linalg.vector_norm(wl.dense)) ** 2 - wl.whitening.delta * wl.sq_norm, 0.0)
        return choose_energy_rank(wl.dense, float(torch.linalg.vector_norm(wl.dense)) ** 2, fraction, limit,
                                  settings, generator)

    # -- the factors -------------------------------------------------------------------------
    def factorize(self, d: LayerDelta, rank: int, *, alpha: float | None, dtype: torch.dtype,
                  settings: SVDSettings, generator: torch.Generator | None, svd: SVDResult | None = None,
                  scratch: torch.Tensor | None = None) -> LayerFactors:
        """Stored factors for ``d`` at ``rank``: whitened, unless plain SVD is as good on the
        calibration statistics. ``svd`` is a decomposition from :meth:`energy_rank`."""
        wl = self.prepare(d)
        plain_kw = {"sq_norm": d.sq_norm, "alpha": alpha, "dtype": dtype, "settings": settings, "scratch": scratch}
        if wl is None:
            self._tally("plain: no usable statistics")
            f = factorize(d.matrix, d.shape, rank, generator=generator, svd=svd, **plain_kw)
            f.method = f"{f.method} (no stats)"
            return f
        full = rank >= min(d.matrix.shape)
        pf = factorize(d.matrix, d.shape, rank, generator=settings.generator(d.module), measure=False, **plain_kw)
        if full:
            self._tally("full rank (exact)")
            if wl.out_sq_norm is not None:   # dW itself, up to the storage dtype
                pf.out_error = pf.plain_out_error = self._relative(wl, output_terms(d.matrix, wl.whitening,
                                                                                     *_matrix_factors(pf)))
            return pf
        res, sketch = (svd, None) if svd is not None else whitened_svd(wl, rank, settings, generator)
        wf = whitened_factors(d.matrix, d.sq_norm, d.shape, wl.whitening, rank, layer=wl, alpha=alpha, dtype=dtype,
                              settings=settings, generator=generator, svd=res, scratch=scratch)
        plain_terms = output_terms(d.matrix, wl.whitening, *_matrix_factors(pf))
        white_terms = output_terms(d.matrix, wl.whitening, *_matrix_factors(wf)) if wf is not None else math.inf
        if wl.out_sq_norm is None and sketch is not None:
            wl.out_sq_norm = estimate_out_sq_norm(wl, sketch, settings.generator(d.module + "#trace"))
            wl.estimated = True
        plain_out = self._relative(wl, plain_terms)
        if wf is None or not math.isfinite(white_terms) or white_terms >= plain_terms:
            self._tally("plain: whitened not better")
            up, down, scale = _matrix_factors(pf)   # kept: its weight error is measured now
            pf.rel_error = stored_error(d.matrix, d.sq_norm, up, down, scale, scratch)
            pf.method = f"{pf.method} (calibrated fallback)"
            pf.out_error, pf.plain_out_error = plain_out, plain_out
            return pf
        self._tally(f"whitened ({wl.whitening.mode})")
        wf.out_error, wf.plain_out_error = self._relative(wl, white_terms), plain_out
        return wf

    @staticmethod
    def _relative(wl: WhitenedLayer, terms: float) -> float:
        """``||(dW - BA) X|| / ||dW X||`` from :func:`output_terms` (estimated denominator on
        operator layers: clamped to [0, 1.5])."""
        total = wl.out_sq_norm or 0.0
        if total <= 0:
            return 0.0
        return math.sqrt(min(max(total + terms, 0.0) / total, 2.25))

    def _tally(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
