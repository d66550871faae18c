"""LoRA extraction math: ``dW = tuned - base`` per layer -> low-rank factors, streamed to disk.

The registry-free engine behind ``lbm-reg extract`` (see :mod:`lbm_registry.api.assets.lora` for
reference resolution and registration). Memory stays at a few layers whatever the model size:
deltas come from :class:`~lbm_registry.lora.stream.DeltaStream` and factors go straight to a
:class:`~lbm_registry.lora.format.LoRAWriter`. All math is fp32; only the stored factors take the
output dtype, and every reported error is measured on those stored factors.

Factors are balanced, ``up = U sqrt(S)``, ``down = sqrt(S) V^T`` (times ``sqrt(r / alpha)``
each when an ``alpha`` is given, so ``(alpha / r) up @ down`` is still the delta): both
factors then share the dynamic range, which matters for bf16/fp16 storage. A layer at full rank
is stored as ``dW`` times an identity factor: exact up to the storage dtype, and no SVD at all.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lbm.checkpoint import CheckpointReader, check_finite
from lbm_registry.lbm.threads import SMALL_LAYER_NUMEL, single_thread_below
from lbm_registry.lora.format import LoRALayer, LoRAWriter, layer_kind
from lbm_registry.lora.ranks import (
    DTYPE_BYTES,
    LayerSpectrum,
    RankPolicy,
    allocate_budget,
    energy_rank,
    lora_header_overhead,
)
from lbm_registry.lora.stream import DeltaStream, LayerDelta
from lbm_registry.lora.svd import SVDResult, SVDSettings, top_singular_values, truncated_svd
from lbm_registry.lora.svd import sq_norm as frobenius_sq
from lbm_registry.units import format_size

ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phases are ``spectra``, ``refine`` and ``extract``."""

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENERGY_START_DEPTH = 64
BUDGET_START_DEPTH = 64


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise LoRAError(f"unknown --dtype {name!r}: use bf16, fp16 or fp32") from None


# -- results ----------------------------------------------------------------------------------
@dataclass
class LayerResult:
    """One extracted layer. ``rel_error`` = ||dW - BA|| / ||dW|| on the stored factors;
    ``energy`` = 1 - rel_error^2, the share of ||dW||^2 the LoRA keeps."""

    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float
    energy: float
    method: str
    norm: float
    seconds: float
    spectrum: list[float] = field(default_factory=list, repr=False)
    out_error: float | None = None         # calibrated: ||(dW - BA) X|| / ||dW X|| (lora/whiten.py)
    plain_out_error: float | None = None   # the same for plain SVD at this rank

    def to_dict(self, spectrum: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not spectrum:
            d.pop("spectrum")
        if self.out_error is None:
            d.pop("out_error")
            d.pop("plain_out_error")
        return d


@dataclass
class SkippedLayer:
    """A layer the LoRA leaves out. ``rel_error`` is 1.0 for a changed layer dropped by a budget
    (the LoRA carries none of its delta) and None for an unchanged one (no delta: 0/0)."""

    module: str
    reason: str
    rel_error: float | None = None


@dataclass
class ExtractionResult:
    """What :func:`extract_lora` wrote and measured."""

    path: Path
    layers: list[LayerResult]
    skipped: list[SkippedLayer]
    uncaptured: list[dict[str, Any]]
    policy: RankPolicy
    alpha: float | None
    dtype: str
    size_bytes: int
    seconds: float
    info: dict[str, Any]

    def errors(self) -> list[tuple[str, int, float]]:
        """(module, rank, rel_error) of every CHANGED layer: extracted ones, and those a budget
        gave rank 0 (rel. error 1.0). Unchanged layers have no relative error and are left out."""
        out = [(r.module, r.rank, r.rel_error) for r in self.layers]
        out += [(s.module, 0, s.rel_error) for s in self.skipped if s.rel_error is not None]
        return out

    @property
    def mean_error(self) -> float:
        errs = [e for _, _, e in self.errors()]
        return sum(errs) / len(errs) if errs else 0.0

    @property
    def max_error(self) -> float:
        return max((e for _, _, e in self.errors()), default=0.0)

    @property
    def unchanged(self) -> int:
        return sum(1 for s in self.skipped if s.rel_error is None)

    def rank_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(r for _, r, _ in self.errors()).items()))

    def worst(self, n: int = 5) -> list[tuple[str, int, float]]:
        return sorted(self.errors(), key=lambda t: -t[2])[:n]

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": str(self.path), "size_bytes": self.size_bytes, "dtype": self.dtype,
            "policy": self.policy.to_dict(), "policy_text": self.policy.describe(), "alpha": self.alpha,
            "layers_extracted": len(self.layers), "mean_error": self.mean_error, "max_error": self.max_error,
            "layers_counted": len(self.errors()), "layers_unchanged": self.unchanged,
            "rank_histogram": {str(k): v for k, v in self.rank_histogram().items()},
            "skipped": [asdict(s) for s in self.skipped], "uncaptured": self.uncaptured,
            "seconds": self.seconds,
            "worst": [{"module": m, "rank": r, "rel_error": e} for m, r, e in self.worst()],
        }
        if layers:
            d["layers"] = [r.to_dict() for r in self.layers]
        return d


# -- one layer --------------------------------------------------------------------------------
@dataclass
class LayerFactors:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rank: int
    rel_error: float
    method: str
    spectrum: torch.Tensor | None = None   # singular values the SVD produced (None at full rank)
    out_error: float | None = None         # calibrated extraction only (lora/whiten.py)
    plain_out_error: float | None = None


class LayerWhitener(Protocol):
    """Calibrated extraction's per-layer hook (:class:`lbm_registry.lora.whiten.Whitener`):
    the spectra the rank policies read (of ``dW L``: output error) and the stored factors."""

    def top_values(self, d: LayerDelta, depth: int, settings: SVDSettings,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, bool]: ...

    def energy_rank(self, d: LayerDelta, fraction: float, limit: int, settings: SVDSettings,
                    generator: torch.Generator | None) -> tuple[int, SVDResult | None]: ...

    def factorize(self, d: LayerDelta, rank: int, *, alpha: float | None, dtype: torch.dtype,
                  settings: SVDSettings, generator: torch.Generator | None, svd: SVDResult | None = None,
                  scratch: torch.Tensor | None = None) -> LayerFactors: ...


def _shape_factors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(shape) == 4:
        r = down.shape[0]
        return up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    return up, down


def stored_error(a: torch.Tensor, sq_norm: float, up: torch.Tensor, down: torch.Tensor, scale: float,
                 scratch: torch.Tensor | None = None) -> float:
    """``||a - scale * up @ down||_F / ||a||_F`` for the stored (already rounded) factors.

    Measured on the residual itself. Expanding the square (``||a||^2 - 2<up^T a, down> + ...``)
    would avoid the m x n residual, but in fp32 it cancels: off by up to 0.7% at an error of
    0.28 on a 10240 x 1280 layer, too coarse to check a 1% accuracy target.
    """
    if sq_norm <= 0:
        return 0.0
    m, n = a.shape
    if scratch is not None and scratch.numel() >= m * n:
        resid = torch.addmm(a, up, down, alpha=-scale, out=scratch[: m * n].view(m, n))
    else:
        resid = torch.addmm(a, up, down, alpha=-scale)
    return math.sqrt(frobenius_sq(resid) / sq_norm)


def factorize(a: torch.Tensor, shape: tuple[int, ...], rank: int, *, sq_norm: float | None = None,
              alpha: float | None = None, dtype: torch.dtype = torch.bfloat16,
              settings: SVDSettings = SVDSettings(), generator: torch.Generator | None = None,
              svd: SVDResult | None = None, scratch: torch.Tensor | None = None,
              measure: bool = True) -> LayerFactors:
    """Factor one delta matrix ``a`` (out, in*k*k) at ``rank`` into stored LoRA factors.

    ``svd`` reuses a decomposition already computed with at least ``rank`` components (the
    energy policy). ``scratch`` is an fp32 buffer of >= ``a.numel()`` for the residual.
    ``measure=False`` leaves ``rel_error`` NaN below full rank (an m x n residual saved) for a
    caller that may not keep these factors: the activation-aware check compares them on the output
    error only.
    """
    m, n = a.shape
    small = min(m, n)
    if rank <= 0:
        raise LoRAError(f"rank must be positive, got {rank}")
    sq = float(sq_norm) if sq_norm is not None else frobenius_sq(a)
    norm = math.sqrt(sq)
    if rank >= small:
        # Full rank: dW itself times an identity. Exact up to the storage dtype, no SVD.
        r = small
        al = float(alpha) if alpha is not None else float(r)
        scaled = a * (r / al) if al != r else a
        stored = scaled.to(dtype)
        if not torch.isfinite(stored).all():
            raise LoRAError(f"the delta overflows {str(dtype).replace('torch.', '')}: store as bf16/fp32 or raise --alpha")
        eye = torch.eye(r, dtype=dtype)
        up, down = (eye, stored) if m <= n else (stored, eye)
        recon = stored.float() if al == r else stored.float() * (al / r)
        err = math.sqrt(frobenius_sq(a - recon)) / norm if norm > 0 else 0.0
        up, down = _shape_factors(up, down, shape)
        return LayerFactors(down, up, al, r, err, "full")
    res = svd if svd is not None else truncated_svd(a, rank, settings, generator)
    u, s, vh = res.u[:, :rank], res.s[:rank], res.vh[:rank]
    al = float(alpha) if alpha is not None else float(rank)
    root = torch.sqrt(s.clamp_min(0) * (rank / al))
    up = (u * root).to(dtype)
    down = (root[:, None] * vh).to(dtype)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise LoRAError(f"factors overflow {str(dtype).replace('torch.', '')}: store as bf16/fp32 or raise --alpha")
    err = stored_error(a, sq, up.float(), down.float(), al / rank, scratch) if measure else math.nan
    up, down = _shape_factors(up, down, shape)
    return LayerFactors(down, up, al, rank, err, res.method, res.spectrum)


def choose_energy_rank(a: torch.Tensor, sq_norm: float, fraction: float, limit: int,
                       settings: SVDSettings, generator: torch.Generator | None) -> tuple[int, SVDResult | None]:
    """Smallest rank keeping ``fraction`` of ``||a||^2`` (capped at ``limit``), with the SVD that
    found it so the factors need no second decomposition. Sketches deepen 4x until they reach the
    target, so layers with a steep spectrum stay cheap."""
    small = min(a.shape)
    depth = min(limit, ENERGY_START_DEPTH)
    while True:
        res = truncated_svd(a, depth, settings, generator)
        known = res.spectrum if res.complete else res.s
        r = energy_rank(known, sq_norm, fraction)
        if r is None and not res.complete and depth < limit:
            depth = min(limit, depth * 4)   # the sketch did not reach the target: look deeper
            continue
        r = max(1, min(limit, r if r is not None else limit))
        if r >= small:
            return small, None
        return r, (res if r <= len(res.s) else None)


# -- the passes -------------------------------------------------------------------------------
def compare_other_tensors(base: CheckpointReader, tuned: CheckpointReader, keys: Iterable[str]) -> list[dict[str, Any]]:
    """Biases, norms and other non-LoRA-able tensors: refuse NaN/Inf, and list the ones the
    fine-tune changed (a LoRA cannot carry them; the summary says so instead of hiding it)."""
    changed = []
    for key in keys:
        b, t = base.read(key), tuned.read(key)
        check_finite(key, b, base.path)
        check_finite(key, t, tuned.path)
        if tuple(b.shape) != tuple(t.shape):
            continue  # the architecture check reports shapes
        if b.is_floating_point() and not torch.equal(b, t):
            d = t.double() - b.double()
            ref = float(torch.linalg.vector_norm(b.double()))
            changed.append({"key": key, "rel_change": float(torch.linalg.vector_norm(d)) / ref if ref else math.inf})
    return changed


def _spectra_pass(base: CheckpointReader, tuned: CheckpointReader, modules: Mapping[str, tuple[int, ...]],
                  depths: Mapping[str, int], policy: RankPolicy, settings: SVDSettings, prefix: str,
                  phase: str, progress: ProgressFn | None,
                  whitener: LayerWhitener | None = None) -> tuple[dict[str, LayerSpectrum], dict[str, float]]:
    spectra: dict[str, LayerSpectrum] = {}
    norms: dict[str, float] = {}
    with DeltaStream(base, tuned, modules, prefix=prefix) as stream:
        for i, d in enumerate(stream, 1):
            norms[d.module] = d.sq_norm
            if d.sq_norm > 0:
                m, n = d.matrix.shape
                limit = policy.limit(d.shape)
                with single_thread_below(m * n, SMALL_LAYER_NUMEL):
                    if whitener is None:
                        vals, complete = top_singular_values(d.matrix, depths[d.module], settings,
                                                             settings.generator(d.module))
                    else:   # the spectrum of dW L: output error per byte
                        vals, complete = whitener.top_values(d, depths[d.module], settings, settings.generator(d.module))
                spectra[d.module] = LayerSpectrum(vals.cpu(), m + n, limit, complete or len(vals) >= limit)
            if progress:
                progress(phase, i, len(modules))
    return spectra, norms


def plan_budget_ranks(base: CheckpointReader, tuned: CheckpointReader, modules: Mapping[str, tuple[int, ...]],
                      policy: RankPolicy, dtype: str, settings: SVDSettings, prefix: str = "denoiser.",
                      progress: ProgressFn | None = None, whitener: LayerWhitener | None = None,
                      header_bytes: int = 0) -> dict[str, int]:
    """Pass 1 of ``--budget``: per-layer spectra, then the greedy allocation.

    Spectra start as randomized top-64 sketches (exact ``svdvals`` for small layers); a layer
    whose allocation uses up every value it has is re-read and sketched 4x deeper (exact once
    the sketch would cover half the matrix), until no layer is cut short by its sketch. So the
    allocation only ever relies on estimated singular values, never on a truncated spectrum.
    """
    bpp = DTYPE_BYTES[dtype]
    budget_params = (policy.budget_bytes - lora_header_overhead(modules) - header_bytes) // bpp
    if budget_params <= 0:
        raise LoRAError(f"--budget {format_size(policy.budget_bytes or 0)} is smaller than the file's header "
                        f"(~{lora_header_overhead(modules)} bytes for {len(modules)} layers)")
    depths = {m: min(policy.limit(s), BUDGET_START_DEPTH) for m, s in modules.items()}
    spectra, _ = _spectra_pass(base, tuned, modules, depths, policy, settings, prefix, "spectra", progress, whitener)
    alloc = allocate_budget(spectra, budget_params)
    for _ in range(8):
        if not alloc.saturated:
            break
        deeper = {m: modules[m] for m in alloc.saturated}
        for m in deeper:
            depths[m] = min(spectra[m].limit, depths[m] * 4)
        more, _ = _spectra_pass(base, tuned, deeper, depths, policy, settings, prefix, "refine", progress, whitener)
        spectra.update(more)
        alloc = allocate_budget(spectra, budget_params)
    min_cost = min((sp.cost for sp in spectra.values()), default=0)
    if spectra and budget_params < min_cost:
        raise LoRAError(f"--budget {format_size(policy.budget_bytes or 0)} cannot hold a single rank-1 "
                        f"component ({min_cost * bpp} bytes + header)")
    return alloc.ranks


def extract_lora(base: CheckpointReader, tuned: CheckpointReader, modules: Mapping[str, tuple[int, ...]],
                 output: str | Path, *, policy: RankPolicy, alpha: float | None = None, dtype: str = "bf16",
                 settings: SVDSettings = SVDSettings(),
                 info: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                 other_keys: Iterable[str] = (), prefix: str = "denoiser.",
                 progress: ProgressFn | None = None, whitener: LayerWhitener | None = None,
                 header_bytes: int = 0) -> ExtractionResult:
    """Extract a LoRA of ``tuned - base`` over ``modules`` (name -> weight shape) into ``output``.

    The caller has checked that both checkpoints have these layers. Layers whose delta is
    exactly zero are skipped and listed; under ``--budget`` so are layers that get no
    component. NaN/Inf anywhere raises before anything appears at ``output`` (written
    atomically at the end). ``info`` is merged into the file's ``lbm_registry`` metadata; a
    function giving it is called once every layer is done (the caller's inputs' hashes run meanwhile).
    ``whitener`` (calibration statistics, :mod:`lbm_registry.lora.whiten`) makes every policy
    work on the output error ``||(dW - BA) X||`` instead of the weight error. ``header_bytes``:
    metadata in ``info`` beyond what :func:`lora_header_overhead` allows for, held back from a budget.
    """
    t0 = time.perf_counter()
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise LoRAError(f"--alpha must be positive, got {alpha}")
    torch_dtype = storage_dtype(dtype)
    uncaptured = compare_other_tensors(base, tuned, other_keys)
    planned: dict[str, int] | None = None
    if policy.kind == "budget":
        planned = plan_budget_ranks(base, tuned, modules, policy, dtype, settings, prefix, progress, whitener,
                                    header_bytes)
    results: list[LayerResult] = []
    skipped: list[SkippedLayer] = []
    scratch = torch.empty(max((math.prod(s) for s in modules.values()), default=0), dtype=torch.float32)
    with LoRAWriter(output, torch_dtype) as writer:
        with DeltaStream(base, tuned, modules, prefix=prefix) as stream:
            for i, d in enumerate(stream, 1):
                _extract_one(d, policy, planned, alpha, torch_dtype, settings, scratch, writer, results, skipped,
                             whitener)
                if progress:
                    progress("extract", i, len(modules))
        if not results:
            raise LoRAError("base and tuned are identical on every LoRA-able layer: nothing to extract")
        meta = dict((info() if callable(info) else info) or {})
        meta.update(_metadata(results, skipped, policy, alpha, len(uncaptured)))
        path = writer.finish(meta)
    return ExtractionResult(path=path, layers=results, skipped=skipped, uncaptured=uncaptured, policy=policy,
                            alpha=alpha, dtype=dtype, size_bytes=path.stat().st_size,
                            seconds=time.perf_counter() - t0, info=meta)


def _extract_one(d: LayerDelta, policy: RankPolicy, planned: Mapping[str, int] | None, alpha: float | None,
                 dtype: torch.dtype, settings: SVDSettings, scratch: torch.Tensor, writer: LoRAWriter,
                 results: list[LayerResult], skipped: list[SkippedLayer], whitener: LayerWhitener | None = None) -> None:
    if d.sq_norm == 0.0:
        skipped.append(SkippedLayer(d.module, "zero delta (unchanged by the fine-tune)"))
        return
    t = time.perf_counter()
    with single_thread_below(d.matrix.numel(), SMALL_LAYER_NUMEL):
        _extract_layer(d, policy, planned, alpha, dtype, settings, scratch, writer, results, skipped, t, whitener)


def _extract_layer(d: LayerDelta, policy: RankPolicy, planned: Mapping[str, int] | None, alpha: float | None,
                   dtype: torch.dtype, settings: SVDSettings, scratch: torch.Tensor, writer: LoRAWriter,
                   results: list[LayerResult], skipped: list[SkippedLayer], t: float,
                   whitener: LayerWhitener | None = None) -> None:
    gen = settings.generator(d.module)
    svd = None
    if policy.kind == "fixed":
        rank = policy.fixed_rank(d.shape)
    elif policy.kind == "energy":
        if whitener is None:
            rank, svd = choose_energy_rank(d.matrix, d.sq_norm, float(policy.energy), policy.limit(d.shape), settings, gen)
        else:   # a share of the output energy ||dW L||^2
            rank, svd = whitener.energy_rank(d, float(policy.energy), policy.limit(d.shape), settings, gen)
    else:
        rank = (planned or {}).get(d.module, 0)
        if rank == 0:
            skipped.append(SkippedLayer(d.module, "budget: no component worth its bytes", rel_error=1.0))
            return
    if whitener is not None:
        f = whitener.factorize(d, rank, alpha=alpha, dtype=dtype, settings=settings, generator=gen, svd=svd,
                               scratch=scratch)
    else:
        f = factorize(d.matrix, d.shape, rank, sq_norm=d.sq_norm, alpha=alpha, dtype=dtype, settings=settings,
                      generator=gen, svd=svd, scratch=scratch)
    writer.add(LoRALayer(d.module, f.down, f.up, f.alpha))
    results.append(LayerResult(
        module=d.module, kind=layer_kind(d.shape), shape=tuple(d.shape), rank=f.rank, rel_error=f.rel_error,
        energy=1.0 - f.rel_error**2, method=f.method, norm=d.norm, seconds=time.perf_counter() - t,
        spectrum=[] if f.spectrum is None else f.spectrum[:256].tolist(),
        out_error=f.out_error, plain_out_error=f.plain_out_error,
    ))


def _metadata(results: list[LayerResult], skipped: list[SkippedLayer], policy: RankPolicy,
              alpha: float | None, n_uncaptured: int) -> dict[str, Any]:
    """The compact ``lbm_registry`` entry: per-layer [rank, rel_error] keyed by module."""
    linear = [r.rank for r in results if r.kind == "linear"]
    conv = [r.rank for r in results if r.kind != "linear"]
    errs = [r.rel_error for r in results] + [s.rel_error for s in skipped if s.rel_error is not None]
    return {
        "policy": policy.to_dict(),
        "rank": max(linear, default=0),
        "conv_rank": max(conv, default=0),
        "alpha": alpha,
        "mean_error": sum(errs) / len(errs),
        "max_error": max(errs),
        "layers": {r.module: [r.rank, float(f"{r.rel_error:.4g}")] for r in results},
        "skipped": {s.module: s.reason for s in skipped},
        "uncaptured_tensors": n_uncaptured,
    }
