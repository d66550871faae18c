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
calibration set never excited are not thrown away for free. If the Cholesky still fails (a
matrix that is not positive definite in floating point), the damping is raised 10x, up to
three times; a layer whose inputs were all zero, or whose result is not finite, falls back to
plain SVD.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from lbm_registry.lora.extract import LayerFactors, factorize
from lbm_registry.lora.stream import LayerDelta
from lbm_registry.lora.svd import SVDResult, SVDSettings, truncated_svd

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
    """``L`` of ``C + delta I = L L^T`` (lower triangular, or a vector for ``diag``)."""

    mode: StatsMode
    factor: torch.Tensor       # (d, d) lower triangular, fp32; or (d,) for diag
    delta: float               # the damping actually added (absolute)
    damping: float             # relative to mean(diag C), after any retries

    def right(self, a: torch.Tensor) -> torch.Tensor:
        """``a @ L``."""
        return a * self.factor if self.mode == "diag" else a @ self.factor

    def solve_right(self, b: torch.Tensor) -> torch.Tensor:
        """``b @ L^-1``."""
        if self.mode == "diag":
            return b / self.factor
        return torch.linalg.solve_triangular(self.factor, b, upper=False, left=False)


def whitening(stats: InputStats, damping: float = DEFAULT_DAMPING) -> Whitening | None:
    """The damped whitening factor of ``stats``, or None when the layer saw no signal at all."""
    if damping <= 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be positive, got {damping}")
    moment = stats.moment
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
            return Whitening("diag", (moment.double().clamp_min(0) + delta).sqrt().float(), delta, lam)
        c = moment.double()   # the factorisation in fp64: the damped matrix may still have a condition of d / damping
        c.diagonal().add_(delta)
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:    # finite input, successful factorisation: finite factor
            return Whitening("full", chol.float(), delta, lam)
        lam *= 10
    return None


# -- one layer --------------------------------------------------------------------------------
@dataclass
class OutputErrors:
    """Relative output errors ``||(dW - BA) X|| / ||dW X||`` of stored factors, on the
    calibration statistics (undamped)."""

    whitened: float | None
    plain: float


def output_sq_error(a: torch.Tensor, m_mat: torch.Tensor, w: Whitening, up: torch.Tensor, down: torch.Tensor,
                    scale: float) -> float:
    """``tr(R C R^T)`` for ``R = a - scale * up @ down``, from ``||R L||^2 - delta ||R||^2``.

    Both terms are norms of residuals (no expanded squares), so no cancellation until the
    damping term dominates; ``m_mat`` is ``a @ L`` (already computed for the SVD). Costs
    ``r d^2 + m d r``, far less than forming ``R C``.
    """
    rl = torch.addmm(m_mat, up, w.right(down), alpha=-scale)
    resid = torch.addmm(a, up, down, alpha=-scale)
    out = float(torch.linalg.vector_norm(rl.double())) ** 2 - w.delta * float(torch.linalg.vector_norm(resid.double())) ** 2
    return max(out, 0.0)


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


def whitened_factors(a: torch.Tensor, sq_norm: float, shape: tuple[int, ...], w: Whitening, rank: int, *,
                     m_mat: torch.Tensor | None = None, alpha: float | None = None,
                     dtype: torch.dtype = torch.bfloat16, settings: SVDSettings = SVDSettings(),
                     generator: torch.Generator | None = None, svd: SVDResult | None = None) -> LayerFactors | None:
    """Stored factors of the whitened truncation of ``a`` at ``rank`` (< the smaller side), or
    None when they are not finite. ``rel_error`` is the weight error ``||a - BA|| / ||a||``, as for
    plain factors; ``svd`` may reuse a decomposition of ``m_mat = a @ L``."""
    m_mat = w.right(a) if m_mat is None else m_mat
    res = svd if svd is not None else truncated_svd(m_mat, rank, settings, generator)
    al = float(alpha) if alpha is not None else float(rank)
    up, down = _balanced(res.u[:, :rank], res.s[:rank], res.vh[:rank], w, rank, al)
    up, down = up.to(dtype), down.to(dtype)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        return None
    resid = torch.addmm(a, up.float(), down.float(), alpha=-al / rank)
    err = float(torch.linalg.vector_norm(resid)) / math.sqrt(sq_norm) if sq_norm > 0 else 0.0
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return LayerFactors(down, up, al, rank, err, f"whitened-{res.method}", res.spectrum)


def _matrix_factors(f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor, float]:
    up = f.up.reshape(f.up.shape[0], -1).float()
    down = f.down.reshape(f.down.shape[0], -1).float()
    return up, down, f.alpha / f.rank


# -- the extraction hook ----------------------------------------------------------------------
@dataclass
class WhitenedLayer:
    module: str
    whitening: Whitening
    matrix: torch.Tensor       # M = dW L
    sq_norm: float             # ||M||^2 = tr(dW (C + delta I) dW^T)
    out_sq_norm: float         # tr(dW C dW^T): the output energy of the delta (undamped)


class Whitener:
    """The per-layer hook :func:`lbm_registry.lora.extract.extract_lora` calls with calibration
    statistics: ``spectral`` gives the matrix whose spectrum the rank policies read (``dW L``),
    ``factorize`` the stored factors, checked against plain SVD (see the module docstring).

    Factors ``L`` are cached for the few layers that share an input; the current layer's ``M``
    is kept between ``spectral`` and ``factorize``. ``counts`` tallies the outcome per layer.
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
                raise ValueError(f"calibration statistics of {module} have {stats.dim} inputs, the layer {dim}")
            self._factors[group] = whitening(stats, self.damping)
            while len(self._factors) > CACHE_GROUPS:
                self._factors.popitem(last=False)
        self._factors.move_to_end(group)
        w = self._factors[group]
        if w is not None:
            self.max_damping = max(self.max_damping, w.damping)
        return w

    def prepare(self, d: LayerDelta) -> WhitenedLayer | None:
        if self._current is not None and self._current.module == d.module:
            return self._current
        self._current = None
        w = self._whitening(d.module, d.matrix.shape[1])
        if w is None:
            return None
        m_mat = w.right(d.matrix)
        sq = float(torch.linalg.vector_norm(m_mat.double())) ** 2
        out_sq = max(sq - w.delta * d.sq_norm, 0.0)
        if not math.isfinite(sq):
            return None
        self._current = WhitenedLayer(d.module, w, m_mat, sq, out_sq)
        return self._current

    def spectral(self, d: LayerDelta) -> tuple[torch.Tensor, float]:
        """The matrix the rank policies decompose and its squared norm: ``dW L`` (or ``dW``
        when this layer has no usable statistics)."""
        wl = self.prepare(d)
        return (d.matrix, d.sq_norm) if wl is None else (wl.matrix, wl.sq_norm)

    def factorize(self, d: LayerDelta, rank: int, *, alpha: float | None, dtype: torch.dtype,
                  settings: SVDSettings, generator: torch.Generator | None, svd: SVDResult | None = None,
                  scratch: torch.Tensor | None = None,
                  plain: Callable[[], LayerFactors] | None = None) -> LayerFactors:
        """Stored factors for ``d`` at ``rank``: whitened, unless plain SVD is as good on the
        calibration statistics. ``svd`` is a decomposition of ``spectral(d)``'s matrix."""
        wl = self.prepare(d)

        def plain_factors() -> LayerFactors:
            if plain is not None:
                return plain()
            return factorize(d.matrix, d.shape, rank, sq_norm=d.sq_norm, alpha=alpha, dtype=dtype,
                             settings=settings, generator=settings.generator(d.module), scratch=scratch)

        if wl is None:
            self._tally("plain: no usable statistics")
            f = factorize(d.matrix, d.shape, rank, sq_norm=d.sq_norm, alpha=alpha, dtype=dtype, settings=settings,
                          generator=generator, svd=svd, scratch=scratch) if plain is None else plain()
            f.method = f"{f.method} (no stats)"
            return f
        small = min(d.matrix.shape)
        if rank >= small:
            self._tally("full rank (exact)")
            f = plain_factors()
            f.out_error = 0.0 if f.rel_error == 0.0 else self._out_rel(d, wl, f)
            return f
        pf = plain_factors()
        plain_out = self._out_rel(d, wl, pf)
        wf = whitened_factors(d.matrix, d.sq_norm, d.shape, wl.whitening, rank, m_mat=wl.matrix, alpha=alpha,
                              dtype=dtype, settings=settings, generator=generator, svd=svd)
        white_out = self._out_rel(d, wl, wf) if wf is not None else math.inf
        if wf is None or not math.isfinite(white_out) or white_out >= plain_out:
            self._tally("plain: whitened not better")
            pf.method = f"{pf.method} (calibrated fallback)"
            pf.out_error, pf.plain_out_error = plain_out, plain_out
            return pf
        self._tally(f"whitened ({wl.whitening.mode})")
        wf.out_error, wf.plain_out_error = white_out, plain_out
        return wf

    def _out_rel(self, d: LayerDelta, wl: WhitenedLayer, f: LayerFactors) -> float:
        if wl.out_sq_norm <= 0:
            return 0.0
        up, down, scale = _matrix_factors(f)
        return math.sqrt(output_sq_error(d.matrix, wl.matrix, wl.whitening, up, down, scale) / wl.out_sq_norm)

    def _tally(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
