"""Truncated SVD: randomized within 1% of the exact truncation, exact thin SVD, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from lbm_registry.lora.svd import (
    SVDSettings,
    randomized_svd,
    sq_norm,
    thin_svd,
    top_singular_values,
    truncated_svd,
    truncation_error,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def spectrum_matrix(m: int, n: int, exponent: float, noise: float, seed: int = 0) -> torch.Tensor:
    """Power-law spectrum s_i = (i+1)^-exponent plus a Gaussian noise floor: the hard case for
    sketching (slow decay, no gap)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -exponent
    a = (u * s) @ v.T
    if noise:
        a += noise * torch.randn(m, n, generator=g) * a.norm() / math.sqrt(m * n)
    return a


@pytest.mark.parametrize(("shape", "exponent", "noise", "rank"), [
    ((640, 640), 0.3, 0.3, 32),
    ((640, 640), 1.0, 0.3, 16),
    ((1280, 320), 0.6, 0.0, 32),
    ((256, 2304), 0.6, 0.3, 16),   # a wide 3x3-conv-like matrix
    ((320, 1280), 0.0, 0.5, 32),   # flat spectrum + noise on a small layer: the hardest case
    ((1280, 320), 0.0, 1.0, 32),   # same, tall
])
def test_randomized_within_one_percent_of_exact(shape, exponent, noise, rank):
    a = spectrum_matrix(*shape, exponent, noise)
    settings = SVDSettings(method="randomized")
    res = truncated_svd(a, rank, settings, settings.generator("layer"))
    assert res.method == "randomized"
    err = float((a - (res.u * res.s) @ res.vh).norm() / a.norm())
    exact = truncation_error(torch.linalg.svdvals(a.double()), rank)
    assert err <= 1.01 * exact, (err, exact)
    assert err >= exact * (1 - 1e-4)  # nothing beats the optimum


def test_randomized_recovers_low_rank_exactly():
    a = spectrum_matrix(500, 300, 1.0, 0.0)[:, :300]
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    low = (u[:, :6] * s[:6]) @ vh[:6]
    uu, ss, vv = randomized_svd(low, 14, n_iter=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ss[:6], s[:6], rtol=1e-4)
    assert float(((uu[:, :6] * ss[:6]) @ vv[:6] - low).norm() / low.norm()) < 1e-5


@pytest.mark.parametrize("shape", [(300, 90), (90, 300)])
def test_randomized_on_exactly_rank_deficient_matrix(shape):
    """More sketch columns than the matrix's rank: the extra components come back as exact
    zeros (not NaN/garbage from dividing by a zero singular value)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    u, s, vh = randomized_svd(a, 12, n_iter=2, generator=g)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert (s[3:] <= s[0] * 1e-6).all()
    assert float(((u[:, :3] * s[:3]) @ vh[:3] - a).norm() / a.norm()) < 1e-5
    assert float(((u * s) @ vh - a).norm() / a.norm()) < 1e-5


def test_exact_path_and_thin_svd_orientation():
    a = torch.randn(40, 300)
    u, s, vh = thin_svd(a)
    assert u.shape == (40, 40) and vh.shape == (40, 300)
    assert torch.allclose((u * s) @ vh, a, atol=1e-4)
    assert torch.allclose(s, torch.linalg.svdvals(a), rtol=1e-4)
    res = truncated_svd(a, 30)   # sketch would cover most of the 40 rows: exact
    assert res.method == "exact" and res.complete and len(res.spectrum) == 40


def test_deterministic_per_layer_name():
    a = spectrum_matrix(600, 500, 0.5, 0.2)
    st = SVDSettings(method="randomized")
    r1 = truncated_svd(a, 16, st, st.generator("down_blocks.1.x"))
    r2 = truncated_svd(a, 16, st, st.generator("down_blocks.1.x"))
    assert torch.equal(r1.s, r2.s) and torch.equal(r1.u, r2.u)


def test_top_singular_values_estimates_and_exact():
    a = spectrum_matrix(800, 600, 0.8, 0.1)
    exact = torch.linalg.svdvals(a)
    est, complete = top_singular_values(a, 20, SVDSettings(), torch.Generator().manual_seed(1))
    assert not complete and len(est) == 20
    assert torch.allclose(est[:10], exact[:10], rtol=0.01)   # estimates: accurate at the top,
    assert torch.allclose(est, exact[:20], rtol=0.05)         # a little low near the sketch's end
    vals, complete = top_singular_values(a[:, :30], 20)
    assert complete and torch.allclose(vals, torch.linalg.svdvals(a[:, :30]), rtol=1e-4)


def test_truncation_error_is_tail_energy():
    s = torch.tensor([1.0, 0.5, 0.25, 0.125])
    assert truncation_error(s, 2) == pytest.approx(math.sqrt((0.25**2 + 0.125**2) / float((s**2).sum())))
    assert truncation_error(s, 4) == 0.0


@pytest.mark.parametrize(("shape", "exponent", "noise", "rank"), [
    ((640, 640), 0.3, 0.3, 32),
    ((320, 1280), 0.0, 0.5, 32),   # flat spectrum + noise: the hardest case
    ((1280, 320), 0.6, 0.0, 32),
])
def test_bf16_sketch_is_as_accurate_as_fp32(shape, exponent, noise, rank):
    """The range finder's early products in bf16 (fast on CPUs with AVX512-BF16/AMX and on GPUs)
    find the same subspace: the error matches the fp32 sketch's to 1e-4 and stays within 1%."""
    a = spectrum_matrix(*shape, exponent, noise, seed=2)
    exact = truncation_error(torch.linalg.svdvals(a.double()), rank)
    errs = {}
    for sketch in ("fp32", "bf16"):
        st = SVDSettings(method="randomized", sketch=sketch)
        res = truncated_svd(a, rank, st, st.generator("layer"))
        errs[sketch] = float((a - (res.u * res.s) @ res.vh).norm() / a.norm())
    assert errs["bf16"] <= 1.01 * exact
    assert abs(errs["bf16"] - errs["fp32"]) <= 1e-4 * exact


def test_bf16_sketch_still_recovers_an_exactly_low_rank_delta():
    """The last power iteration and the projection use the exact fp32 matrix, so a rank-6 delta
    (a LoRA merged into a model) comes back to fp32 accuracy, not bf16's 1e-3."""
    a = spectrum_matrix(1200, 400, 1.0, 0.0)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    low = (u[:, :6] * s[:6]) @ vh[:6]
    st = SVDSettings(method="randomized", sketch="bf16")
    res = truncated_svd(low, 6, st, st.generator("merged"))
    assert float(((res.u * res.s) @ res.vh - low).norm() / low.norm()) < 1e-5
    assert torch.allclose(res.s, s[:6], rtol=1e-4)


def test_sq_norm_is_accurate_where_an_fp32_vector_norm_is_not():
    """Squared Frobenius norms of full-size layers (13 M entries) to 1e-8, not fp32's ~1e-3."""
    g = torch.Generator().manual_seed(4)
    for t in (torch.randn(10240, 1280, generator=g), torch.randn(3, 5000, 7, generator=g), torch.randn(70001, generator=g)):
        exact = float(t.double().square().sum())
        assert abs(sq_norm(t) - exact) <= 1e-7 * exact
    assert sq_norm(torch.zeros(0)) == 0.0
    assert not math.isfinite(sq_norm(torch.tensor([[1.0, float("nan")]])))
