"""benchmarks/device_check.py cannot rot: its ``--tiny`` run goes through every section on CPU.

No timing is checked (budgets are scaled up so a busy machine cannot cut a section short); what
is checked is that each section ran its code paths and produced sane figures.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("lbm_bench_device_check", ROOT / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_tiny_run_covers_every_section(device_check, tmp_path, torch_single_thread):
    rc = device_check.main(["--tiny", "--out", str(tmp_path), "--budget-scale", "20"])
    res = json.loads((tmp_path / "device_check.json").read_text())
    table = (tmp_path / "device_check.md").read_text()
    assert rc == 0, {k: v.get("error") for k, v in res["sections"].items()}
    sec = res["sections"]
    assert set(sec) == {"extract", "relight", "serve", "train"} and all(s["ok"] for s in sec.values())
    ext = sec["extract"]
    assert ext["device"]["error_ratio_max"] <= 1.01 and ext["cpu"]["layers_measured"] >= 2
    rel = sec["relight"]["steps_2"]
    assert rel["ours"]["seconds"] > 0 and rel["plain"]["seconds"] > 0 and 0 <= rel["max_pixel_diff"] <= 255
    srv = sec["serve"]
    assert srv["auto_took"] in ("loop", "batched") and srv["merge_per_request_s"] > 0
    assert {"inline", "loader"} <= set(srv["loads"]) and srv["loads"]["loader"]["warm_during_load_n"] >= 0
    assert sec["train"]["adamw_ckpt"]["loss"] > 0 and "skipped" in sec["train"]["adamw8bit_ckpt"]  # no CUDA here
    for row in ("extraction", "relight", "different LoRAs mixed", "first request for a new", "training step"):
        assert row in table, row


def test_tiled_decode_and_upstream_bucket(device_check):
    """The plain loop's upstream arithmetic that the tiny run does not reach: a latent larger than
    a tile is decoded in overlapping tiles, blended back to the full image; buckets match ours."""
    import torch

    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.imaging import nearest_bucket
    from lbm_registry.lbm.model import build_vae

    torch.manual_seed(0)
    vae = build_vae(load_config("lbm-tiny")).eval()
    z = torch.randn(2, 4, 10, 14)
    with torch.no_grad():
        tiled = device_check.decode_tiled(vae, z, tile=6, overlap=2)
        whole = device_check.decode_tiled(vae, z, tile=16, overlap=2)
    assert tiled.shape == whole.shape == (2, 3, 80, 112) and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, whole)      # really tiled (the random VAE is not local)
    for h, w in ((768, 1024), (1024, 768), (1000, 1000), (600, 2000)):
        uw, uh = device_check.upstream_bucket(w, h, 1024)
        assert (uh, uw) == nearest_bucket(h, w, 1024, 32)
