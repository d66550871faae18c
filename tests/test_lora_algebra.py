"""resize and merge from the factors alone, checked against independent dense SVDs."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def rank16(varied_tuned, extract_tiny):
    return extract_tiny(varied_tuned, rank=16, conv_rank=8, dtype="fp32")


def _deltas(path):
    from lbm_registry.lora.format import read_lora

    return {m: la.delta().reshape(la.weight_shape[0], -1).double() for m, la in read_lora(path).layers.items()}


def test_factored_svd_is_exact():
    from lbm_registry.lora.algebra import factored_svd, gram_sq_distance

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(96, 12, generator=g), torch.randn(12, 300, generator=g)
    u, s, vh = factored_svd(up, down)
    dense = (up @ down).double()
    assert torch.allclose(s.double(), torch.linalg.svdvals(dense)[:12], rtol=1e-5)
    assert torch.allclose((u * s) @ vh, up @ down, atol=1e-3)
    sq, norm2 = gram_sq_distance((up, down), (u * s, vh))
    assert math.sqrt(sq / norm2) < 1e-5
    assert norm2 == pytest.approx(float((dense**2).sum()), rel=1e-9)


def test_factored_svd_of_rank_deficient_factors_is_exact():
    """Repeated columns make the Gram singular: the Cholesky route declines, the eigh route
    drops the null directions, and the SVD is still the dense one."""
    from lbm_registry.lora.algebra import _cholesky_factors, factored_svd

    g = torch.Generator().manual_seed(1)
    base = torch.randn(96, 6, generator=g)
    up, down = torch.cat([base, base[:, :2]], 1), torch.randn(8, 300, generator=g)
    gu = up.double().T @ up.double()
    gd = down.double() @ down.double().T
    assert not bool(_cholesky_factors(gu[None], gd[None])[2][0])
    u, s, vh = factored_svd(up, down)
    dense = (up @ down).double()
    assert s.shape[0] == 6
    assert torch.allclose(s.double(), torch.linalg.svdvals(dense)[:6], rtol=1e-5)
    assert torch.allclose(((u * s) @ vh).double(), dense, atol=1e-3)


def test_batched_factored_svd_is_each_layers_svd():
    """``FactoredSVD.many`` (batched by rank, rank-deficient pairs sent the eigh way) gives
    each layer the spectrum and best rank-k truncation of its dense product, alone or batched."""
    from lbm_registry.lora.algebra import FactoredSVD

    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(64, r, generator=g), torch.randn(r, 90, generator=g)) for r in (4, 8, 4, 8, 4)]
    base = torch.randn(64, 3, generator=g)
    pairs.append((torch.cat([base, base[:, :1]], 1), torch.randn(4, 90, generator=g)))   # singular Gram
    for (up, down), f in zip(pairs, FactoredSVD.many(pairs), strict=True):
        dense = (up.double() @ down.double())
        u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
        k = min(3, len(f.s))
        assert torch.allclose(f.s, sv[: len(f.s)], rtol=1e-8)
        assert float(sv[len(f.s):].sum()) < 1e-8 * float(sv[0])  # only null directions dropped
        a = f.top(k, up.double(), down.double())
        assert torch.allclose(a[0] @ a[1], (u[:, :k] * sv[:k]) @ vh[:k], atol=1e-8)
        assert torch.allclose(FactoredSVD.of(up, down).s, f.s, rtol=1e-10)


def test_resize_error_is_the_optimal_truncation(tmp_path, rank16, lora_settings):
    from lbm_registry.api.assets.algebra import resize
    from lbm_registry.lora.format import read_lora

    rep = resize(rank16.path, rank=4, conv_rank=2, dtype="fp32", output=tmp_path / "r4.safetensors",
                 settings=lora_settings)
    src = _deltas(rank16.path)
    out = read_lora(tmp_path / "r4.safetensors")
    rows = {la.module: la for la in rep.result.layers}
    assert set(rows) == set(src)
    for m, d in src.items():
        k = 2 if out.layers[m].is_conv else 4
        s = torch.linalg.svdvals(d)
        k = min(k, int((s > s[0] * 1e-7).sum()))
        optimal = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
        assert out.layers[m].rank == k
        actual = float(torch.linalg.vector_norm(d - out.layers[m].delta().reshape(d.shape).double())
                       / torch.linalg.vector_norm(d))
        assert actual == pytest.approx(optimal, rel=1e-3, abs=1e-6)
        assert rows[m].rel_error == pytest.approx(actual, rel=1e-3, abs=2e-6)
    assert read_lora(tmp_path / "r4.safetensors").info["base_sha256"] == read_lora(rank16.path).info["base_sha256"]


def test_resize_energy_and_budget(tmp_path, rank16, lora_settings):
    from lbm_registry.api.assets.algebra import resize

    e = resize(rank16.path, energy=0.9, dtype="fp32", output=tmp_path / "e.safetensors", settings=lora_settings)
    assert all(la.energy >= 0.9 - 1e-4 for la in e.result.layers)
    size = int(rank16.result.size_bytes * 0.4)
    b = resize(rank16.path, budget=size, dtype="fp32", output=tmp_path / "b.safetensors", settings=lora_settings)
    assert b.result.size_bytes <= size


def test_merge_half_half_is_the_average(tmp_path, tiny_base_path, make_tuned, extract_tiny, lora_settings):
    from lbm_registry.api.assets.algebra import merge
    from lbm_registry.lora.format import read_lora

    a = extract_tiny(make_tuned(rank=4, seed=1), rank=4, conv_rank=4, dtype="fp32")
    b = extract_tiny(make_tuned(rank=4, seed=2), rank=4, conv_rank=4, dtype="fp32")
    da, db = _deltas(a.path), _deltas(b.path)
    exact = merge([f"{a.path}:0.5", f"{b.path}:0.5"], dtype="fp32", output=tmp_path / "m.safetensors",
                  settings=lora_settings)
    m = read_lora(tmp_path / "m.safetensors")
    for name in da:
        want = 0.5 * (da[name] + db[name])
        got = m.layers[name].delta().reshape(want.shape).double()
        assert float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)) < 1e-5
        assert m.layers[name].rank <= 8
    assert exact.result.max_error < 1e-5
    # compressed to rank 4: the optimal truncation of the average
    comp = merge([f"{a.path}:0.5", f"{b.path}:0.5"], rank=4, conv_rank=4, dtype="fp32",
                 output=tmp_path / "m4.safetensors", settings=lora_settings)
    name = next(iter(da))
    want = 0.5 * (da[name] + db[name])
    s = torch.linalg.svdvals(want)
    k = min(4, len(s))
    row = next(la for la in comp.result.layers if la.module == name)
    assert row.rel_error == pytest.approx(math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum())), rel=1e-3, abs=1e-6)


def test_merge_refuses_loras_of_two_bases(tmp_path, tiny_base_path, make_tuned, extract_tiny, lora_settings):
    from lbm_registry.api.assets.algebra import merge
    from lbm_registry.errors import LoRAError

    tuned = make_tuned(rank=4, seed=1)
    a = extract_tiny(tuned, rank=4, conv_rank=4)
    b = extract_tiny(tiny_base_path, base=tuned, rank=4, conv_rank=4)  # "base" = tuned: another base
    with pytest.raises(LoRAError, match="different bases"):
        merge([str(a.path), str(b.path)], output=tmp_path / "x.safetensors", settings=lora_settings)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_merge_and_resize_register_parents(cli, tmp_path, tiny_base_path, make_tuned, reg_settings):
    import json

    home = ["--home", str(reg_settings.home)]

    def reg(*args: str) -> str:
        rc, out, err = cli(*home, *args)
        assert rc == 0, err
        return out

    reg("import", str(tiny_base_path), "--name", "alg-base", "--kind", "base")
    for i, seed in enumerate((1, 2)):
        reg("extract", "--base", "alg-base", "--tuned", str(make_tuned(rank=4, seed=seed)), "--rank", "4",
            "--conv-rank", "4", "--register", f"alg{i}")
    d = json.loads(reg("merge", "alg0:0.5", "alg1@1:0.5", "--register", "alg-avg", "--json"))
    assert d["ref"] == "alg-avg@1" and [i["weight"] for i in d["inputs"]] == [0.5, 0.5]
    shown = json.loads(reg("show", "alg-avg", "--json"))
    assert sorted(p["ref"] for p in shown["facts"]["parents"]) == ["alg0@1", "alg1@1"]
    lineage = reg("lineage", "alg-avg")
    assert "alg0@1" in lineage and "alg1@1" in lineage and "alg-base@1" in lineage
    rs = json.loads(reg("resize", "alg-avg", "--rank", "2", "--register", "alg-small", "--json"))
    assert rs["ref"] == "alg-small@1" and rs["rank_histogram"] == {"2": len(rs["layers"])}
    assert "alg-avg@1" in reg("lineage", "alg-small")
    rc, out, err = cli(*home, "resize", "alg-avg", "--output", str(tmp_path / "r.safetensors"))
    assert rc != 0 and "needs a target" in err and "Traceback" not in err
    assert not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize(("specs", "needle"), [
    (["lo@1:1e308", "lo@2:1e308"], "bad merge input 'lo@1:1e308': weight 1e+308 is outside -100 to 100"),
    (["lo@1:nan", "lo@2"], "bad merge input 'lo@1:nan': weight must be a finite number"),
    (["lo@1:abc", "lo@2"], "bad merge input 'lo@1:abc': write REF or REF:WEIGHT (a number), got weight 'abc'"),
])
def test_cli_merge_weights_are_checked_before_anything(cli, tmp_path, specs, needle):
    """``merge A:1e308 B:1e308`` was a traceback (inf factors); ``lo@1:abc`` said "no alias '1:abc'"
    although the weight is what is wrong. One line, exit 2, nothing created."""
    out = tmp_path / "m.safetensors"
    rc, _, err = cli("--home", tmp_path / "h", "merge", *specs, "--output", out)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "h").exists()
