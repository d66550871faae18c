"""Rank policies: option validation, sizes, energy rank, the greedy budget allocation."""

from __future__ import annotations

import itertools

import pytest
import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lora.ranks import (
    LayerSpectrum,
    RankPolicy,
    allocate_budget,
    energy_rank,
    lora_header_overhead,
    parse_size,
)


def test_parse_size():
    assert parse_size("200MB") == 200_000_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    assert parse_size(" 2 kb ") == 2000
    for bad in ("", "abc", "-5MB", "0", "3 parsecs"):
        with pytest.raises(LoRAError):
            parse_size(bad)


def test_policy_options_and_errors():
    p = RankPolicy.from_options()
    assert (p.kind, p.rank, p.conv_rank) == ("fixed", 32, 16)
    assert p.fixed_rank((64, 32)) == 32 and p.fixed_rank((64, 32, 3, 3)) == 16
    assert p.fixed_rank((4, 32, 3, 3)) == 4                          # capped by the smaller side
    assert RankPolicy.from_options(rank=9999).fixed_rank((96, 384)) == 96  # full rank
    assert RankPolicy.from_options(rank=64, max_rank=8).fixed_rank((96, 384)) == 8
    assert RankPolicy.from_options(energy=0.9).kind == "energy"
    b = RankPolicy.from_options(budget="2MB", max_rank=16)
    assert (b.kind, b.budget_bytes, b.max_rank) == ("budget", 2_000_000, 16)
    assert "budget" in b.describe() and b.to_dict()["budget_bytes"] == 2_000_000
    bad = [dict(rank=0), dict(rank=-3), dict(conv_rank=0), dict(max_rank=0), dict(energy=0.0), dict(energy=1.5),
           dict(energy=0.9, budget="1MB"), dict(rank=8, energy=0.9), dict(conv_rank=8, budget="1MB")]
    for kw in bad:
        with pytest.raises(LoRAError) as exc:
            RankPolicy.from_options(**kw)
        assert "\n" not in str(exc.value)


def test_energy_rank():
    s = torch.tensor([1.0, 0.5, 0.25, 0.125])
    total = float((s**2).sum())
    assert energy_rank(s, total, 0.5) == 1
    assert energy_rank(s, total, 0.9) == 2
    assert energy_rank(s, total, 1.0) == 4
    assert energy_rank(s[:2], total, 0.99) is None   # the partial spectrum cannot tell yet
    assert energy_rank(s, 0.0, 0.9) == 0


def _brute_force(spectra, budget):
    """Best total kept energy over all rank combinations (small cases only)."""
    names = list(spectra)
    best = (-1.0, None)
    for combo in itertools.product(*[range(min(len(spectra[n].values), spectra[n].limit) + 1) for n in names]):
        cost = sum(r * spectra[n].cost for r, n in zip(combo, names, strict=True))
        if cost <= budget:
            kept = sum(float((spectra[n].values[:r] ** 2).sum()) for r, n in zip(combo, names, strict=True))
            best = max(best, (kept, combo), key=lambda x: x[0])
    return best


def test_budget_greedy_is_optimal_with_equal_costs_and_respects_budget():
    g = torch.Generator().manual_seed(0)
    spectra = {f"l{i}": LayerSpectrum(torch.sort(torch.rand(5, generator=g) * (i + 1), descending=True).values,
                                      cost=10, limit=5, complete=True) for i in range(3)}
    for budget in (0, 10, 35, 70, 150):
        alloc = allocate_budget(spectra, budget)
        assert alloc.used_params <= budget
        kept = sum(float((spectra[n].values[:r] ** 2).sum()) for n, r in alloc.ranks.items())
        assert kept == pytest.approx(_brute_force(spectra, budget)[0])
        assert alloc.saturated == []


def test_budget_prefers_cheap_energy_and_reports_saturation():
    spectra = {
        "steep": LayerSpectrum(torch.tensor([1.0, 0.01, 0.001]), cost=100, limit=3, complete=True),
        "flat": LayerSpectrum(torch.tensor([0.5, 0.5, 0.5]), cost=100, limit=64, complete=False),
    }
    alloc = allocate_budget(spectra, 400)
    assert alloc.ranks == {"steep": 1, "flat": 3}
    assert alloc.saturated == ["flat"]  # it took every known value and could take more
    assert allocate_budget(spectra, 50).ranks == {"steep": 0, "flat": 0}


def test_header_overhead_bound_is_positive_and_grows():
    a = lora_header_overhead({"x.y": (4, 4)})
    b = lora_header_overhead({"x.y": (4, 4), "x.z": (4, 4)})
    assert 0 < a < b
