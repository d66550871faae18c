"""Whitened truncation (lora/whiten.py): optimal on the output error, damped, never worse than plain."""

from __future__ import annotations

import math

import pytest
import torch

from lbm_registry.lora import whiten
from lbm_registry.lora.extract import factorize
from lbm_registry.lora.stream import LayerDelta
from lbm_registry.lora.svd import SVDSettings
from lbm_registry.lora.whiten import (
    InputStats,
    Whitener,
    estimate_out_sq_norm,
    prepare_layer,
    whitened_factors,
    whitened_svd,
    whitening,
)

EXACT = SVDSettings(method="exact")
pytestmark = pytest.mark.usefixtures("torch_single_thread")


class MemoryStats:
    """A StatsSource holding one statistic per module."""

    def __init__(self, stats: dict[str, InputStats]) -> None:
        self._stats = stats

    def group_of(self, module: str) -> str | None:
        return module if module in self._stats else None

    def stats(self, group: str) -> InputStats:
        return self._stats[group]


def out_err(dw: torch.Tensor, rec: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((dw - rec) @ x))


def als_best(dw: torch.Tensor, c: torch.Tensor, rank: int, starts: int = 6, iters: int = 200) -> float:
    """Brute force: alternating least squares for min ||(dW - BA) L||_F over rank-r BA, from many
    random starts; returns the best tr(R C R^T) found."""
    g = torch.Generator().manual_seed(0)
    best = math.inf
    m, n = dw.shape
    for _ in range(starts):
        a = torch.randn(rank, n, generator=g, dtype=torch.float64)
        for _ in range(iters):
            b = dw @ c @ a.T @ torch.linalg.inv(a @ c @ a.T)     # the best B for this A
            a = torch.linalg.pinv(b) @ dw                        # the best A for this B (C full rank)
        r = dw - b @ a
        best = min(best, float(torch.trace(r @ c @ r.T)))
    return best


def _delta(module: str, a: torch.Tensor, shape: tuple[int, ...] | None = None) -> LayerDelta:
    return LayerDelta(module, shape or tuple(a.shape), a, float(torch.linalg.vector_norm(a)) ** 2)


@pytest.mark.parametrize("m,n,rank,samples", [(6, 5, 2, 40), (8, 12, 3, 30), (10, 4, 1, 7)])
def test_whitened_truncation_equals_brute_force(m, n, rank, samples):
    g = torch.Generator().manual_seed(m * 100 + n)
    dw = torch.randn(m, n, generator=g, dtype=torch.float64)
    # correlated inputs with very different scales per channel: plain SVD is far from optimal
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = mix @ torch.randn(n, samples, generator=g, dtype=torch.float64)
    c = x @ x.T / samples
    for damping in (1e-9, 0.3):
        w = whitening(InputStats("full", c.float(), samples), damping)
        assert w is not None
        cd = c + w.delta * torch.eye(n, dtype=torch.float64)
        f = whitened_factors(dw.float(), float(dw.norm()) ** 2, (m, n), w, rank, dtype=torch.float32,
                             settings=EXACT)
        rec = (f.up.double() @ f.down.double()) * (f.alpha / f.rank)
        got = float(torch.trace((dw - rec) @ cd @ (dw - rec).T))
        brute = als_best(dw, cd, rank)
        assert got == pytest.approx(brute, rel=1e-4, abs=1e-9), damping
    # and strictly better than plain SVD on the output error (with negligible damping)
    w = whitening(InputStats("full", c.float(), samples), 1e-9)
    f = whitened_factors(dw.float(), float(dw.norm()) ** 2, (m, n), w, rank, dtype=torch.float32, settings=EXACT)
    p = factorize(dw.float(), (m, n), rank, dtype=torch.float32, settings=EXACT)
    white = out_err(dw, (f.up.double() @ f.down.double()), x)
    plain = out_err(dw, (p.up.double() @ p.down.double()), x)
    assert white < plain


def test_diagonal_statistics_are_the_weighted_optimum():
    """``diag`` mode = per-input-channel scaling: optimal for the diagonal metric."""
    g = torch.Generator().manual_seed(3)
    dw = torch.randn(7, 9, generator=g, dtype=torch.float64)
    d = torch.logspace(1, -2, 9, dtype=torch.float64)
    w = whitening(InputStats("diag", d.float(), 100), 1e-9)
    f = whitened_factors(dw.float(), float(dw.norm()) ** 2, (7, 9), w, 2, dtype=torch.float32, settings=EXACT)
    rec = f.up.double() @ f.down.double()
    got = float(torch.trace((dw - rec) @ torch.diag(d) @ (dw - rec).T))
    assert got == pytest.approx(als_best(dw, torch.diag(d + w.delta), 2), rel=1e-4)


def test_conv_layers_use_their_unfolded_shape():
    g = torch.Generator().manual_seed(4)
    shape = (6, 3, 3, 3)
    a = torch.randn(6, 27, generator=g)
    x = torch.randn(27, 200, generator=g)
    st = InputStats("full", x @ x.T / 200, 200)
    wh = Whitener(MemoryStats({"conv": st}))
    f = wh.factorize(_delta("conv", a, shape), 2, alpha=None, dtype=torch.float32, settings=EXACT, generator=None)
    assert tuple(f.down.shape) == (2, 3, 3, 3) and tuple(f.up.shape) == (6, 2, 1, 1)
    assert f.method.startswith("whitened") and f.out_error < f.plain_out_error


@pytest.fixture(params=["dense", "operator"])
def m_form(request, monkeypatch):
    """Run a test with M = dW L formed (small layers) and as an operator (large layers)."""
    if request.param == "operator":
        monkeypatch.setattr(whiten, "DENSE_MAX_FLOPS", 0)
    return request.param


def test_never_worse_than_plain_and_full_rank_stays_exact(m_form):
    g = torch.Generator().manual_seed(5)
    layers = {}
    for i in range(12):
        m, n = 16 + i, 24 - i
        x = torch.randn(n, 3 + i, generator=g) * torch.rand(n, 1, generator=g)
        layers[f"l{i}"] = (torch.randn(m, n, generator=g), InputStats("full", x @ x.T / x.shape[1], x.shape[1]))
    wh = Whitener(MemoryStats({k: s for k, (_, s) in layers.items()}))
    for name, (a, _) in layers.items():
        d = _delta(name, a)
        for rank in (1, 3, 5):
            f = wh.factorize(d, rank, alpha=None, dtype=torch.bfloat16, settings=SVDSettings(), generator=None)
            assert f.out_error <= f.plain_out_error, (name, rank)
            assert math.isfinite(f.rel_error)
        full = wh.factorize(d, 999, alpha=None, dtype=torch.float32, settings=SVDSettings(), generator=None)
        rec = full.up.reshape(full.up.shape[0], -1) @ full.down.reshape(full.down.shape[0], -1)
        assert torch.equal(rec * (full.alpha / full.rank), a) and full.method == "full"


@pytest.mark.parametrize("case", ["dead_channels", "few_samples", "huge_condition", "all_zero", "nan", "tiny_values"])
def test_ill_conditioned_statistics(case, m_form):
    """Singular, nearly singular, empty or broken statistics: finite factors, never worse than
    plain SVD on the calibration statistics, or a plain fallback."""
    g = torch.Generator().manual_seed(6)
    m, n = 20, 30
    a = torch.randn(m, n, generator=g)
    x = torch.randn(n, 200, generator=g)
    if case == "dead_channels":
        x[::3] = 0
    elif case == "few_samples":
        x = x[:, :2]
    elif case == "huge_condition":
        x = x * torch.logspace(0, -12, n)[:, None]
    elif case == "all_zero":
        x = torch.zeros_like(x)
    elif case == "tiny_values":
        x = x * 1e-15   # C ~ 1e-30: near the bottom of fp32
    c = x @ x.T / x.shape[1]
    if case == "nan":
        c[0, 1] = float("nan")
    wh = Whitener(MemoryStats({"l": InputStats("full", c, x.shape[1])}))
    f = wh.factorize(_delta("l", a), 4, alpha=None, dtype=torch.bfloat16, settings=SVDSettings(), generator=None)
    assert torch.isfinite(f.up.float()).all() and torch.isfinite(f.down.float()).all()
    assert math.isfinite(f.rel_error)
    if case in ("all_zero", "nan"):
        assert "no stats" in f.method and f.out_error is None   # plain SVD: nothing to weight by
        assert wh.counts == {"plain: no usable statistics": 1}
    else:
        assert f.out_error is not None and f.out_error <= f.plain_out_error
    if case in ("dead_channels", "few_samples"):
        assert f.method.startswith("whitened") and f.out_error < 0.95 * f.plain_out_error
    if case == "few_samples":   # 2 input vectors: rank 4 holds all of their output, up to the damping
        assert f.out_error < 0.2 * f.plain_out_error


def test_damping_must_be_positive():
    with pytest.raises(ValueError):
        Whitener(MemoryStats({}), damping=0.0)
    with pytest.raises(ValueError):
        whitening(InputStats("full", torch.eye(3), 3), damping=float("nan"))


@pytest.mark.parametrize("m,n", [(40, 90), (90, 40)])
def test_operator_form_matches_the_dense_one(m, n, monkeypatch):
    """Large layers never form M = dW L: the randomized SVD from products and the estimate of
    ||dW X||^2 agree with the dense computation."""
    g = torch.Generator().manual_seed(m + n)
    a = torch.randn(m, n, generator=g) @ torch.diag(torch.logspace(0, -1, n))
    x = torch.randn(n, 3 * n, generator=g) * torch.logspace(0, -2, n)[:, None]
    w = whitening(InputStats("full", x @ x.T / x.shape[1], x.shape[1]), 0.01)
    sq = float(a.norm()) ** 2
    dense = prepare_layer("l", a, sq, w)
    monkeypatch.setattr(whiten, "DENSE_MAX_FLOPS", 0)
    op = prepare_layer("l", a, sq, w)
    assert dense.dense is not None and op.dense is None
    settings = SVDSettings(n_iter=4, small_n_iter=4)
    ref, _ = whitened_svd(dense, 6, EXACT, None)
    got, sketch = whitened_svd(op, 6, settings, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.s[:6], ref.s[:6], rtol=2e-3, atol=1e-6)
    est = estimate_out_sq_norm(op, sketch, torch.Generator().manual_seed(1))
    assert est == pytest.approx(dense.out_sq_norm, rel=0.05)


def test_whitening_leaves_the_statistics_undamped_and_factors_in_either_precision(monkeypatch):
    """The damping goes into the factor only: C itself (what every output error is measured in)
    stays as measured, whether the Cholesky ran in fp32 (the default) or fell back to fp64 at the
    same damping (before any raise of the damping). A damped C in place once made the reported
    output errors of a full-size run noise."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 200, generator=g)
    c = x @ x.T / 200
    stats = InputStats("full", c.clone(), 200)
    w = whitening(stats, 0.05)
    assert torch.equal(stats.moment, c) and torch.equal(w.moment, c)
    damped = c.double() + w.delta * torch.eye(40, dtype=torch.float64)
    torch.testing.assert_close(w.factor.double() @ w.factor.double().T, damped, rtol=1e-5, atol=1e-6)

    real = torch.linalg.cholesky_ex
    seen = []

    def fp32_fails(a, *args, **kw):   # as on a matrix whose fp32 rounding makes a pivot negative
        seen.append(a.dtype)
        out = real(a, *args, **kw)
        return (out[0], torch.ones_like(out[1])) if a.dtype == torch.float32 else out

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fp32_fails)
    w64 = whitening(stats, 0.05)
    assert seen == [torch.float32, torch.float64] and w64.damping == 0.05 and torch.equal(stats.moment, c)
    torch.testing.assert_close(w64.factor, w.factor, rtol=1e-4, atol=1e-5)


def test_output_terms_are_exact_in_fp32_at_full_size_widths():
    """tr((dW - Z) C (dW - Z)^T) - tr(dW C dW^T) from output_terms matches fp64 brute force on a
    2880-wide layer (a 320-channel 3x3 conv) whose whitened error is ~1e-3 of its output energy."""
    g = torch.Generator().manual_seed(4)
    m, n, r = 64, 2880, 8
    x = torch.randn(n, 600, generator=g) * torch.logspace(0, -3, n)[:, None]
    c = x @ x.T / 600
    a = torch.randn(m, n, generator=g) * 1e-2
    w = whitening(InputStats("full", c, 600), 0.01)
    f = whitened_factors(a, float(a.norm()) ** 2, (m, n), w, r, dtype=torch.float32,
                         settings=EXACT, generator=None)
    up, down, scale = f.up.double(), f.down.double(), f.alpha / f.rank
    resid = a.double() - scale * up @ down
    cd = c.double()
    want = float(torch.trace(resid @ cd @ resid.T) - torch.trace(a.double() @ cd @ a.double().T))
    got = whiten.output_terms(a, w, f.up, f.down, scale)
    total = float(torch.trace(a.double() @ cd @ a.double().T))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5 * total)
