"""LoRA algebra from the factors alone: resize (lower the rank) and merge (weighted sums).

Why no dense matrix: a layer's delta ``s * up @ down`` has rank ``r`` (tens) while the layer is
``out x in`` (up to 10240 x 1280). With the eigendecompositions of the two ``r x r`` Gram
matrices, ``up = Qu Lu^1/2 Vu^T`` and ``down = Vd Ld^1/2 Qd^T`` (``Qu``, ``Qd`` orthonormal,
never formed), the delta is ``Qu C Qd^T`` for a small core ``C``, so the SVD of ``C`` gives the
delta's exact SVD (:class:`FactoredSVD`). Truncating that is the optimal rank-``k``
approximation (Eckart-Young), at ``O((m + n) r^2)`` per layer instead of ``O(m n min(m, n))``,
in skinny matrix products only (a thin QR of each factor gives the same, at several times the cost).

A weighted merge ``sum_i w_i s_i up_i @ down_i`` is one low-rank product with the factors
concatenated along the rank, so the same decomposition compresses it; uncompressed ("exact")
the concatenation is stored as is (re-factored only if it exceeds the layer's full rank).

Errors are measured on the stored (rounded) factors against the exact delta, also without a
dense matrix: a truncation's error is the exact tail of the spectrum plus the rounding of the
stored factors (:func:`rounding_sq_error`); the exact route uses
``||A - B||^2 = ||A||^2 + ||B||^2 - 2 <A, B>`` with every term a sum over small Gram products
(``<U_a D_a, U_b D_b> = sum((U_a^T U_b) * (D_a D_b^T))``), in float64 so the cancellation stays
harmless at the errors we report. Layers are independent: they are worked on by one thread per
core (each op single-threaded), which keeps both cores busy on layers too small to split.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lbm.checkpoint import all_finite
from lbm_registry.lbm.threads import map_layers, single_thread_below
from lbm_registry.lora.format import LoRAFile, LoRALayer, LoRAWriter, layer_kind, matrix_shape
from lbm_registry.lora.ranks import (
    DTYPE_BYTES,
    LayerSpectrum,
    RankPolicy,
    allocate_budget,
    energy_rank,
    lora_header_overhead,
)
from lbm_registry.units import format_size

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Term:
    """One addend of a layer's delta: ``weight * (alpha / r) * up @ down`` of a stored layer.

    The fp32 matrices are made when asked for (:meth:`matrices`), on the thread that works on
    the layer: building them for every layer up front would hold a full fp32 copy of the LoRA
    and convert it on one thread."""

    layer: LoRALayer
    weight: float = 1.0

    @property
    def rank(self) -> int:
        return self.layer.rank

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up (m, r), down (r, n))`` in fp32, with the weight and scale folded into ``up``."""
        r = self.layer.rank
        up = self.layer.up.reshape(self.layer.up.shape[0], r).to(torch.float32) * (self.weight * self.layer.scale)
        return up, self.layer.down.reshape(r, -1).to(torch.float32)


@dataclass
class LayerSum:
    """A layer's delta as a sum of low-rank terms (one for resize, one per LoRA for merge)."""

    module: str
    shape: tuple[int, ...]
    terms: list[Term]

    @property
    def rank(self) -> int:
        return sum(t.rank for t in self.terms)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The terms concatenated along the rank: ``(m, R)`` and ``(R, n)``, fp32."""
        if len(self.terms) == 1:
            return self.terms[0].matrices()
        ups, downs = zip(*(t.matrices() for t in self.terms), strict=True)
        return torch.cat(ups, 1), torch.cat(downs, 0)


@dataclass
class FactoredSVD:
    """The exact SVD of ``A = up @ down`` kept in factored form (nothing ``m x n`` is formed).

    From the fp64 Gram matrices ``up^T up = Vu Lu Vu^T`` and ``down down^T = Vd Ld Vd^T``:
    ``up = Qu Lu^1/2 Vu^T`` and ``down = Vd Ld^1/2 Qd^T`` with orthonormal ``Qu``, ``Qd``, so
    ``A = Qu C Qd^T`` for the small core ``C = Lu^1/2 Vu^T Vd Ld^1/2``, and its SVD
    ``C = W S Z^T`` is A's: ``U = up (Vu Lu^-1/2 W)``, ``V^T = (Z^T Ld^-1/2 Vd^T) down``.
    Every step on the big factors is one skinny product (no QR), and the top ``k`` components
    cost ``O((m + n) r k)``. Directions whose Gram eigenvalue is below 1e-13 of the largest (a
    rank-deficient factor) are dropped: they carry no part of ``A`` above fp64 rounding.
    Well-conditioned factors (the usual case) take the same route through Cholesky factors of
    the Grams instead (:func:`_cholesky_factors`), which costs a fraction of two ``eigh``.
    """

    s: torch.Tensor        # (K,) fp64, descending
    _tu: torch.Tensor      # (r, K) fp64: U = up @ _tu
    _td: torch.Tensor      # (K, r) fp64: V^T = _td @ down

    @classmethod
    def of(cls, up: torch.Tensor, down: torch.Tensor) -> FactoredSVD:
        return cls.many([(up, down)])[0]

    @classmethod
    def many(cls, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[FactoredSVD]:
        """:meth:`of` for several layers at once: the r x r work (Cholesky, core SVD, triangular
        solves) of layers with equal ranks runs as one batched call each, instead of a few
        hundred microseconds of small calls per layer. Layers the Cholesky route declines
        (:func:`_cholesky_factors`) take the eigh route (:func:`_eigh_route`)."""
        grams = []
        for up, down in pairs:
            upd, downd = up.double(), down.double()
            grams.append((upd.T @ upd, downd @ downd.T))
        out: list[FactoredSVD | None] = [None] * len(pairs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (gu, gd) in enumerate(grams):
            groups.setdefault((gu.shape[0], gd.shape[0]), []).append(i)
        for idx in groups.values():
            lu, ld, ok = _cholesky_factors(*(grams[idx[0]][side][None] if len(idx) == 1 else
                                             torch.stack([grams[i][side] for i in idx]) for side in (0, 1)))
            flags = ok.tolist()
            good = [j for j, accepted in enumerate(flags) if accepted]
            if good:
                glu, gld = (lu, ld) if len(good) == len(idx) else (lu[good], ld[good])
                w, sv, zt = torch.linalg.svd(glu.mT @ gld, full_matrices=False)
                tu = torch.linalg.solve_triangular(glu.mT, w, upper=True)                # U = up Lu^-T W
                td = torch.linalg.solve_triangular(gld.mT, zt.mT, upper=True).mT         # V^T = Z^T Ld^-1 down
                for b, j in enumerate(good):
                    out[idx[j]] = cls(sv[b], tu[b], td[b])
        return [f if f is not None else _eigh_route(*grams[i]) for i, f in enumerate(out)]

    def top(self, k: int, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors of the top-``k`` components, ``U_k S_k^1/2`` ``(m, k)`` and
        ``S_k^1/2 V_k^T`` ``(k, n)``, in ``up``'s dtype."""
        root = self.s[:k].clamp_min(0).sqrt()
        return up @ (self._tu[:, :k] * root).to(up.dtype), (root[:, None] * self._td[:k]).to(down.dtype) @ down

    def tail_energy(self, k: int) -> float:
        """``||A - A_k||^2``: what the optimal rank-``k`` truncation leaves out (exact)."""
        return float((self.s[k:] ** 2).sum())

    @property
    def energy(self) -> float:
        return float((self.s**2).sum())


#: Cholesky of a Gram matrix is used when its diagonal spans less than this ratio (squared
#: condition estimate of the factor, 1e10: a factor conditioned better than 1e5), else eigh.
CHOLESKY_MAX_RATIO = 1e10


def _cholesky_factors(gu: torch.Tensor, gd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cholesky factors of a batch of Grams ``(b, r, r)``, ``up = Qu Lu^T`` and ``down = Ld Qd^T``
    (core ``Lu^T Ld``), and which layers may use them: several times cheaper than two
    eigendecompositions, and as exact in fp64 for a well-conditioned factor. A rank-deficient
    or badly conditioned factor (a failed factorisation, or a diagonal spread over
    ``CHOLESKY_MAX_RATIO``) is declined: ``ok`` is False there."""
    lu, info_u = torch.linalg.cholesky_ex(gu)
    ld, info_d = torch.linalg.cholesky_ex(gd)
    ok = (info_u == 0) & (info_d == 0)
    if gu.shape[-1] == 0 or gd.shape[-1] == 0:
        return lu, ld, torch.zeros_like(ok)
    for lower in (lu, ld):
        d = lower.diagonal(dim1=-2, dim2=-1) ** 2
        ok &= torch.isfinite(d).all(-1) & (d.min(-1).values * CHOLESKY_MAX_RATIO > d.max(-1).values)
    return lu, ld, ok


def _eigh_route(gu: torch.Tensor, gd: torch.Tensor) -> FactoredSVD:
    """The decomposition from eigendecompositions of the two Grams, dropping null directions:
    exact for rank-deficient factors too."""
    vu, ru = _gram_root(gu)
    vd, rd = _gram_root(gd)
    core = ru[:, None] * (vu.T @ vd) * rd[None, :]
    w, s, zt = torch.linalg.svd(core, full_matrices=False)
    return FactoredSVD(s, (vu / ru) @ w, zt @ (vd / rd).T)


def _gram_root(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, sqrt(lambda))`` of a symmetric PSD fp64 Gram matrix, for its non-negligible eigenvalues."""
    lam, v = torch.linalg.eigh(g)
    keep = lam > float(lam[-1].clamp_min(0)) * 1e-13 if len(lam) else lam > 0
    return v[:, keep], lam[keep].sqrt()


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``u (m, K), s (K,), vh (K, n)`` of ``up @ down`` (see :class:`FactoredSVD`);
    ``K`` is the rank of the factors, at most ``min(m, n, R)``. Never forms the ``m x n`` product."""
    with single_thread_below((up.shape[0] + down.shape[1]) * up.shape[1] * 64):
        f = FactoredSVD.of(up, down)
        k = min(up.shape[0], down.shape[1], f.s.shape[0])
        u = up @ f._tu[:, :k].to(up.dtype)
        vh = f._td[:k].to(down.dtype) @ down
    return u, f.s[:k].to(torch.float32), vh


def spectrum_of(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The singular values of ``up @ down`` (exact, descending), from the core alone."""
    with single_thread_below((up.shape[0] + down.shape[1]) * up.shape[1] * 64):
        return FactoredSVD.of(up, down).s.to(torch.float32)


def rounding_sq_error(exact: tuple[torch.Tensor, torch.Tensor], stored: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``||U D - Ur Dr||^2`` for factors ``(U, D)`` and their rounded copies ``(Ur, Dr)``, from
    ``U D - Ur Dr = U (D - Dr) + (U - Ur) Dr``: every Gram product is of small differences, so
    fp32 has no cancellation to lose precision in."""
    u, d = exact
    ur, dr = (t.to(torch.float32) for t in stored)
    du, dd = u - ur, d - dr
    return max(float(((u.T @ u) * (dd @ dd.T)).sum() + ((du.T @ du) * (dr @ dr.T)).sum()
                     + 2 * ((u.T @ du) * (dd @ dr.T)).sum()), 0.0)


def gram_sq_distance(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """``(||A - B||^2, ||A||^2)`` for ``A = a0 @ a1``, ``B = b0 @ b1`` from Gram products (fp64)."""
    ua, da = (t.double() for t in a)
    ub, db = (t.double() for t in b)
    aa = float(((ua.T @ ua) * (da @ da.T)).sum())
    bb = float(((ub.T @ ub) * (db @ db.T)).sum())
    ab = float(((ua.T @ ub) * (da @ db.T)).sum())
    return max(aa + bb - 2 * ab, 0.0), aa


def _stored(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...],
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced ``(m, k)``/``(k, n)`` factors in the storage dtype, shaped for the layer."""
    k = up.shape[1]
    up, down = up.to(dtype), down.to(dtype)
    if not (all_finite(up) and all_finite(down)):
        raise LoRAError(f"factors overflow {str(dtype).replace('torch.', '')}: store as bf16 or fp32")
    if len(shape) == 4:
        return up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    return up, down


# -- results ----------------------------------------------------------------------------------
@dataclass
class AlgebraLayer:
    """One written layer: ``rank_in`` = rank of its (summed) delta's factors, ``rank`` stored;
    ``rel_error`` = ||delta - stored|| / ||delta||, on the stored factors."""

    module: str
    kind: str
    shape: tuple[int, ...]
    rank_in: int
    rank: int
    rel_error: float
    energy: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class AlgebraResult:
    path: Path
    layers: list[AlgebraLayer]
    skipped: list[dict[str, str]]
    policy: RankPolicy | None           # None: exact (merge without compression)
    dtype: str
    size_bytes: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def policy_text(self) -> str:
        return self.policy.describe() if self.policy is not None else "exact (ranks concatenated)"

    def errors(self) -> list[tuple[str, int, float]]:
        """(module, rank, rel_error) of every layer with a delta: those written, and those a budget
        gave rank 0, which count as 1.0 (the LoRA carries none of their delta), as ``extract``
        counts them. Zero deltas have no relative error and are left out."""
        out = [(la.module, la.rank, la.rel_error) for la in self.layers]
        out += [(s["module"], 0, float(s["rel_error"])) for s in self.skipped if s.get("rel_error") is not None]
        return out

    @property
    def mean_error(self) -> float:
        errs = [e for _, _, e in self.errors()]
        return sum(errs) / len(errs) if errs else 0.0

    @property
    def max_error(self) -> float:
        return max((e for _, _, e in self.errors()), default=0.0)

    @property
    def dropped(self) -> int:
        """Layers with a delta that the budget left out (rank 0)."""
        return sum(1 for s in self.skipped if s.get("rel_error") is not None)

    def rank_histogram(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, rank, _ in self.errors():
            out[rank] = out.get(rank, 0) + 1
        return dict(sorted(out.items()))

    def worst(self, n: int = 5) -> list[tuple[str, int, float]]:
        return sorted(self.errors(), key=lambda t: -t[2])[:n]

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": str(self.path), "size_bytes": self.size_bytes, "dtype": self.dtype,
            "policy": self.policy.to_dict() if self.policy is not None else {"kind": "exact"},
            "policy_text": self.policy_text, "layers_written": len(self.layers),
            "mean_error": self.mean_error, "max_error": self.max_error,
            "layers_counted": len(self.errors()), "layers_dropped": self.dropped,
            "rank_histogram": {str(k): v for k, v in self.rank_histogram().items()},
            "skipped": self.skipped, "seconds": self.seconds,
            "worst": [{"module": m, "rank": r, "rel_error": e} for m, r, e in self.worst()],
        }
        if layers:
            d["layers"] = [la.to_dict() for la in self.layers]
        return d


# -- rank planning ----------------------------------------------------------------------------
def plan_ranks(sums: Sequence[LayerSum], policy: RankPolicy, dtype: str) -> dict[str, int] | None:
    """Ranks per module for a ``budget`` policy (allocated across layers from the exact spectra);
    None for ``fixed``/``energy``, which :func:`choose_rank` decides per layer."""
    if policy.kind != "budget":
        return None
    bpp = DTYPE_BYTES[dtype]
    modules = {s.module: s.shape for s in sums}
    budget_params = (int(policy.budget_bytes or 0) - lora_header_overhead(modules)) // bpp
    if budget_params <= 0:
        raise LoRAError(f"--budget {format_size(policy.budget_bytes or 0)} is smaller than the file's header")
    spectra = {}
    for ls, vals in zip(sums, map_layers(lambda ls: spectrum_of(*ls.factors()), sums), strict=True):
        m, n = matrix_shape(ls.shape)
        spectra[ls.module] = LayerSpectrum(vals, m + n, min(policy.limit(ls.shape), len(vals)), True)
    return allocate_budget(spectra, budget_params).ranks


def choose_rank(policy: RankPolicy | None, planned: Mapping[str, int] | None, ls: LayerSum,
                s: torch.Tensor) -> int:
    """The rank a layer keeps, from its exact spectrum ``s`` (never above the rank it has)."""
    m, n = matrix_shape(ls.shape)
    if policy is None:
        return min(m, n)
    if planned is not None:
        return planned.get(ls.module, 0)
    if policy.kind == "fixed":
        return policy.fixed_rank(ls.shape)
    total = float((s.double() ** 2).sum())
    r = energy_rank(s, total, float(policy.energy)) or len(s)
    return max(1, min(r, policy.limit(ls.shape)))


# -- the engine -------------------------------------------------------------------------------
def combine(sums: Sequence[LayerSum], output: str | Path, *, policy: RankPolicy | None, dtype: str = "bf16",
            info: Mapping[str, Any] | None = None, progress: ProgressFn | None = None) -> AlgebraResult:
    """Write the LoRA whose layers are ``sums``: compressed under ``policy`` (optimal truncation
    of each summed delta), or exact (``policy`` None: factors concatenated)."""
    from lbm_registry.lora.extract import storage_dtype

    t0 = time.perf_counter()
    torch_dtype = storage_dtype(dtype)
    planned = plan_ranks(sums, policy, dtype) if policy is not None else None
    results: list[AlgebraLayer] = []
    skipped: list[dict[str, str]] = []
    chunks = [list(sums[i:i + LAYERS_PER_CHUNK]) for i in range(0, len(sums), LAYERS_PER_CHUNK)]
    done = map_layers(lambda chunk: _chunk(chunk, policy, planned, torch_dtype), chunks)
    flat = (layer for chunk_results in done for layer in chunk_results)
    with LoRAWriter(output, torch_dtype) as writer, contextlib.closing(done):
        for i, (ls, layer) in enumerate(zip(sums, flat, strict=True), 1):
            if isinstance(layer, str):
                # a budget's rank 0 leaves a delta out entirely: rel. error 1.0; a zero delta has none
                skipped.append({"module": ls.module, "reason": layer, **({"rel_error": 1.0} if layer == DROPPED else {})})
            else:
                stored, row = layer
                writer.add(stored, reference=True)   # at most the inputs' size, and they are in memory
                results.append(row)
            if progress:
                progress("layers", i, len(sums))
        if not results:
            raise LoRAError("every layer of the result is zero: nothing to write")
        meta = dict(info or {})
        meta.update(summary_info(results, skipped, policy))
        path = writer.finish(meta)
    return AlgebraResult(path=path, layers=results, skipped=skipped, policy=policy, dtype=dtype,
                         size_bytes=path.stat().st_size, seconds=time.perf_counter() - t0, info=meta)


#: Why a layer with a delta is left out of a budgeted result (rank 0).
DROPPED = "budget: no component worth its bytes"
#: Layers handed to one worker at a time: their r x r factorisations run batched.
LAYERS_PER_CHUNK = 16


def _chunk(chunk: Sequence[LayerSum], policy: RankPolicy | None, planned: Mapping[str, int] | None,
           dtype: torch.dtype) -> list[tuple[LoRALayer, AlgebraLayer] | str]:
    """:func:`_one` for consecutive layers, with the SVDs of those that need one batched."""
    pairs = [ls.factors() for ls in chunk]
    need = [i for i, (ls, (up, _)) in enumerate(zip(chunk, pairs, strict=True))
            if not (policy is None and up.shape[1] <= min(matrix_shape(ls.shape)))]
    svds: dict[int, FactoredSVD] = {}
    if need:
        numel = max((pairs[i][0].shape[0] + pairs[i][1].shape[1]) * pairs[i][0].shape[1] for i in need) * 64
        with single_thread_below(numel):
            svds = dict(zip(need, FactoredSVD.many([pairs[i] for i in need]), strict=True))
    return [_one(ls, policy, planned, dtype, pairs[i], svds.get(i)) for i, ls in enumerate(chunk)]


def _one(ls: LayerSum, policy: RankPolicy | None, planned: Mapping[str, int] | None,
         dtype: torch.dtype, factors: tuple[torch.Tensor, torch.Tensor] | None = None,
         svd: FactoredSVD | None = None) -> tuple[LoRALayer, AlgebraLayer] | str:
    m, n = matrix_shape(ls.shape)
    up, down = factors if factors is not None else ls.factors()
    total_rank = up.shape[1]
    with single_thread_below((m + n) * total_rank * 64):
        if policy is None and total_rank <= min(m, n):
            # Exact: the concatenation itself, in the storage dtype (alpha = rank: scale 1).
            su, sd = up.to(dtype), down.to(dtype)
            if not (torch.isfinite(su).all() and torch.isfinite(sd).all()):
                raise LoRAError(f"{ls.module}: factors overflow {str(dtype).replace('torch.', '')}")
            sq, norm2 = gram_sq_distance((up, down), (su.float(), sd.float()))
            if norm2 == 0:
                return "zero delta"
            k = total_rank
            if len(ls.shape) == 4:
                su, sd = su.reshape(ls.shape[0], k, 1, 1), sd.reshape(k, *ls.shape[1:])
        else:
            f = svd if svd is not None else FactoredSVD.of(up, down)
            s = f.s
            nonzero = int((s > s[0] * 1e-7).sum()) if len(s) and float(s[0]) > 0 else 0
            if nonzero == 0:
                return "zero delta"
            want = choose_rank(policy, planned, ls, s)
            if want <= 0:
                return DROPPED
            k = max(1, min(want, nonzero))
            eu, ed = f.top(k, up, down)
            su, sd = _stored(eu, ed, ls.shape, dtype)
            # ||A - B||^2 = ||A - A_k||^2 + ||A_k - B||^2 + 2 <A - A_k, A_k - B>; the last term is
            # second order in the rounding (A - A_k is orthogonal to A_k's rows and columns), so
            # the error is the exact truncation tail plus the rounding of the stored factors.
            norm2 = f.energy
            sq = f.tail_energy(k) + rounding_sq_error((eu, ed), (su.reshape(ls.shape[0], k), sd.reshape(k, -1)))
    err = math.sqrt(sq / norm2) if norm2 > 0 else 0.0
    stored = LoRALayer(ls.module, sd, su, float(k))
    return stored, AlgebraLayer(ls.module, layer_kind(ls.shape), tuple(ls.shape), total_rank, k, err, 1.0 - err**2)


def summary_info(results: list[AlgebraLayer], skipped: list[dict[str, str]], policy: RankPolicy | None) -> dict[str, Any]:
    linear = [r.rank for r in results if r.kind == "linear"]
    conv = [r.rank for r in results if r.kind != "linear"]
    errs = [r.rel_error for r in results] + [float(s["rel_error"]) for s in skipped if s.get("rel_error") is not None]
    return {
        "policy": policy.to_dict() if policy is not None else {"kind": "exact"},
        "rank": max(linear, default=0), "conv_rank": max(conv, default=0), "alpha": None,
        "mean_error": sum(errs) / len(errs), "max_error": max(errs),
        "layers": {r.module: [r.rank, float(f"{r.rel_error:.4g}")] for r in results},
        "skipped": {s["module"]: s["reason"] for s in skipped},
    }


# -- resize / merge ---------------------------------------------------------------------------
def resize_sums(lora: LoRAFile) -> list[LayerSum]:
    return [LayerSum(m, layer.weight_shape, [Term(layer)]) for m, layer in lora.layers.items()]


def merge_sums(loras: Sequence[tuple[LoRAFile, float]], labels: Sequence[str] | None = None) -> list[LayerSum]:
    """Per module, the weighted terms of every LoRA that has it (in first-seen module order).
    A module whose weight shape differs between LoRAs is refused."""
    out: dict[str, LayerSum] = {}
    for i, (lora, w) in enumerate(loras):
        for m, layer in lora.layers.items():
            cur = out.get(m)
            if cur is None:
                out[m] = LayerSum(m, layer.weight_shape, [Term(layer, w)])
                continue
            if tuple(cur.shape) != tuple(layer.weight_shape):
                who = labels[i] if labels else f"LoRA {i + 1}"
                raise LoRAError(f"{who}: module {m!r} has shape {tuple(layer.weight_shape)}, "
                                f"another LoRA has {tuple(cur.shape)}: not LoRAs of one architecture")
            cur.terms.append(Term(layer, w))
    return list(out.values())


def resize_lora(lora: LoRAFile, output: str | Path, *, policy: RankPolicy, dtype: str = "bf16",
                info: Mapping[str, Any] | None = None, progress: ProgressFn | None = None) -> AlgebraResult:
    """The optimal lower-rank LoRA of ``lora`` under ``policy`` (error vs its own delta)."""
    return combine(resize_sums(lora), output, policy=policy, dtype=dtype, info=info, progress=progress)


def merge_loras(loras: Sequence[tuple[LoRAFile, float]], output: str | Path, *, policy: RankPolicy | None = None,
                dtype: str = "bf16", info: Mapping[str, Any] | None = None, labels: Sequence[str] | None = None,
                progress: ProgressFn | None = None) -> AlgebraResult:
    """``sum_i w_i * delta_i``: exact (ranks concatenated) or compressed under ``policy``."""
    if len(loras) < 1:
        raise LoRAError("merge needs at least one LoRA")
    for _, w in loras:
        if not math.isfinite(w):
            raise LoRAError(f"merge weight {w} is not a finite number")
    return combine(merge_sums(loras, labels), output, policy=policy, dtype=dtype, info=info, progress=progress)
