"""compare: facts, per-layer similarity via factors, outputs and the HTML report."""

from __future__ import annotations

import html as html_lib
import json
import re

import pytest
import torch

from lbm_registry.lora.format import LoRALayer


def test_factor_similarity_matches_dense():
    from lbm_registry.lora.similarity import cosine, inner, relative_difference, spectrum

    g = torch.Generator().manual_seed(0)
    a = LoRALayer("x", torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g), 6.0)
    b = LoRALayer("x", torch.randn(5, 10, generator=g), torch.randn(7, 5, generator=g), 5.0)
    da, db = a.delta(torch.float64), b.delta(torch.float64)
    assert inner(a, b) == pytest.approx(float((da * db).sum()), rel=1e-5)
    assert cosine(a, b) == pytest.approx(float((da * db).sum() / da.norm() / db.norm()), rel=1e-5)
    assert cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    assert relative_difference(a, b) == pytest.approx(float((da - db).norm() / max(da.norm(), db.norm())), rel=1e-4)
    assert torch.allclose(spectrum(a), torch.linalg.svdvals(da)[:3].float(), rtol=1e-4)
    from lbm_registry.lora.similarity import cosine_and_difference

    assert cosine_and_difference(a, b) == pytest.approx((cosine(a, b), relative_difference(a, b)), rel=1e-9)
    full = LoRALayer("f", torch.randn(40, 10, generator=g), torch.randn(7, 40, generator=g), 40.0)  # r > sides
    assert inner(full, a) == pytest.approx(float((full.delta(torch.float64) * da).sum()), rel=1e-5)
    assert torch.allclose(spectrum(full), torch.linalg.svdvals(full.delta(torch.float64)).float(), rtol=1e-4)
    assert cosine_and_difference(full, a) == pytest.approx((cosine(full, a), relative_difference(full, a)), rel=1e-9)
    wide = LoRALayer("w", torch.randn(12, 40, generator=g), torch.randn(30, 12, generator=g), 3.0)
    assert torch.allclose(spectrum(wide), torch.linalg.svdvals(wide.delta(torch.float64))[:12].float(), rtol=1e-4)
    conv = LoRALayer("c", torch.randn(2, 4, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g), 2.0)
    assert cosine(conv, conv) == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def registered(reg_settings, make_tuned, make_exact_lora, tiny_base_path, tiny_config):
    """Two LoRA versions of one name on a registered base, and one LoRA on another base."""
    from lbm_registry.api.registry import register_asset

    cfg = tiny_config.to_dict()
    base = register_asset(tiny_base_path, name="cmp-base", kind="base", settings=reg_settings, config=cfg)
    facts = {"rank": 9999, "conv_rank": 9999, "policy": "exact", "alpha": 1.0}
    for seed in (1, 2):
        register_asset(make_exact_lora(make_tuned(rank=4, seed=seed, scale=0.3)), name="cmp", kind="lora",
                       settings=reg_settings, facts=facts, lineage={"base": base})
    other_path = make_tuned(rank=2, seed=7, scale=0.01)
    other = register_asset(other_path, name="cmp-other-base", kind="base", settings=reg_settings, config=cfg)
    register_asset(make_exact_lora(make_tuned(rank=4, seed=1, scale=0.3), base_path=other_path), name="cmp-c",
                   kind="lora", settings=reg_settings, facts=facts, lineage={"base": other})
    return reg_settings


@pytest.fixture(scope="module")
def reported(registered, tmp_path_factory):
    """(compare result, report folder) of cmp@1 vs cmp@2 with an HTML report."""
    from lbm_registry.api.run.compare import compare

    folder = tmp_path_factory.mktemp("compare") / "report"
    return compare("cmp@1", "v2", report=folder, settings=registered, device="cpu"), folder


def test_compare_same_base_with_report(reported):
    res, report = reported
    tmp_path = report.parent
    assert (res["a"]["ref"], res["b"]["ref"]) == ("cmp@1", "cmp@2")
    assert res["same_base"] is True
    assert len(res["layers"]) == 792
    assert -0.5 < res["mean_cosine"] < 0.5  # independent random deltas are nearly orthogonal
    assert {m["pair"] for m in res["output_metrics"]} >= {"A vs B", "A vs base", "B vs base"}
    files = res["report"]["files"]
    assert {"index.html", "grid.png", "energy.png", "compare.json"} <= set(files)
    html = (tmp_path / "report" / "index.html").read_text()
    # self-contained: images embedded as data URIs (MLflow's artifact preview shows it whole),
    # and any other link points at a file of the report
    refs = set(re.findall(r'(?:src|href)="([^"]+)"', html))
    images = set(re.findall(r'<img[^>]*src="([^"]+)"', html))
    assert images and all(i.startswith("data:image/png;base64,") for i in images), images
    links = {r for r in refs if not r.startswith(("data:", "#"))}
    assert links <= set(files), links
    assert all((tmp_path / "report" / f).is_file() for f in links)


def test_compare_identical_and_different_base(registered):
    from lbm_registry.api.run.compare import compare

    same = compare("cmp@1", "cmp@1", settings=registered, outputs=False)
    assert same["identical"] and same["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    res = compare("cmp@1", "cmp-c", settings=registered, device="cpu")
    assert res["same_base"] is False and "base_sha256" in res["different_facts"]
    assert res["output_columns"] == ["A", "base", "B", "base B"]


def test_compare_cli_json(registered):
    import json

    from typer.testing import CliRunner

    from lbm_registry.cli.main import app

    res = CliRunner().invoke(app, ["--home", str(registered.home), "compare", "cmp@2", "cmp@1", "--no-outputs",
                                   "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["same_base"] is True and len(data["most_different"]) == 10
    bad = CliRunner().invoke(app, ["--home", str(registered.home), "compare", "cmp@1", "cmpp@1"])
    assert bad.exit_code != 0


def test_report_tables_fit_the_artifact_pane(reported, tmp_path, browser):
    """MLflow shows an HTML artifact in a pane about 790 px wide: the report's tables (the
    "layers that differ most" one has long module names) wrap instead of running off its edge."""
    page = (reported[1] / "index.html").read_text()
    probe = ("<script>window.addEventListener('load',function(){var w=document.documentElement.clientWidth;"
             "var t=[].map.call(document.querySelectorAll('table'),function(e){return Math.ceil("
             "e.getBoundingClientRect().right)});document.body.setAttribute('data-fit',JSON.stringify({w:w,t:t}))"
             "})</script></body>")
    (tmp_path / "measured.html").write_text(page.replace("</body>", probe))
    dom = browser((tmp_path / "measured.html").as_uri(), width=790, height=900, wait_ms=3000)
    fit = json.loads(html_lib.unescape(re.search(r'data-fit="([^"]+)"', dom).group(1)))
    assert len(fit["t"]) >= 2 and max(fit["t"]) <= fit["w"], fit
