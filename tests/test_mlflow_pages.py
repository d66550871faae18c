"""What the MLflow UI shows: the probe picture's layout and caption, version pages (plain first
line, few readable tags with ids last, exact imports, lineage both ways, run times), the
registered model's wording. Read back through the MLflow client, as the UI reads them."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image


def _tiles(img: Image.Image, n: int, pad: int) -> list[np.ndarray]:
    w = img.width // n
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return [a[pad:, i * w:(i + 1) * w] for i in range(n)]


@pytest.mark.parametrize("case", ["trained", pytest.param("extracted", marks=pytest.mark.slow)])
def test_probe_strip_is_one_row_of_equal_tiles_named_by_its_caption(case, tiny_base_path, make_tuned,
                                                                    make_exact_lora, tmp_path):
    """Every tile sits on one row below the titles, all the same size and in order (a trained
    version's target too: it used to sit 18 px higher, in a strip nested in a strip, with the
    right third blank), and the picture names exactly its tiles."""
    from lbm_registry.api.run.probe import PROBE_SIZE, TITLE_PAD, draw_probe, probe_source
    from lbm_registry.registry.pages import probe_tiles

    tuned = make_tuned(rank=2, scale=0.2)
    lora = make_exact_lora(tuned)
    rng = np.random.default_rng(3)
    target = Image.fromarray((rng.random((PROBE_SIZE[1], PROBE_SIZE[0], 3)) * 255).astype("uint8"))
    kw = {"reference": target} if case == "trained" else {"tuned_path": tuned}
    png = draw_probe(tmp_path, base_path=tiny_base_path, config=None, lora_path=lora, kind="lora", **kw)
    last = "target" if case == "trained" else "tuned"
    assert probe_tiles(png) == f"source | base | this version | {last}"
    img = Image.open(png)
    w, h = PROBE_SIZE
    assert img.size == (4 * w, h + TITLE_PAD)
    tiles = _tiles(img, 4, TITLE_PAD)
    assert np.array_equal(tiles[0], np.asarray(probe_source(), dtype=np.int16))  # the source, exactly in place
    if case == "trained":
        assert np.array_equal(tiles[3], np.asarray(target, dtype=np.int16))  # not shifted, not shrunk
    strip = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert all((strip[:TITLE_PAD, i * w:(i + 1) * w] != 255).any() for i in range(4))  # each tile titled
    for t in tiles[1:]:
        assert (t != 255).any(axis=2).mean() > 0.9  # a picture, not blank


def test_probe_tiles_of_other_pictures(tmp_path):
    from lbm_registry.registry.pages import probe_tiles

    old = tmp_path / "old.png"
    Image.new("RGB", (8, 4), "red").save(old)
    assert probe_tiles(old) is None and probe_tiles(tmp_path / "missing.png") is None
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert probe_tiles(tmp_path / "junk.png") is None


def _client(s):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=s.effective_tracking_uri, registry_uri=s.effective_tracking_uri)


def _mv(s, ref):
    from lbm_registry.api.registry import show

    info = show(ref, s)
    return _client(s).get_model_version(info["name"], info["mlflow"]["model_version"])


def test_version_pages_read_well_and_link_both_ways(fresh_settings, make_weights, tmp_path):
    """First line plain text; quality tags first, ids (x-lbm.*) last in the UI's name order; an
    exact import says so instead of "0 / 0"; a version lists what was made from it, updated when
    one is registered or removed; the run spans the real work; the model's wording."""
    from fixtures.registry import lora_facts

    from lbm_registry.api.registry import register_asset, remove

    s = fresh_settings()
    base = register_asset(make_weights(), name="pg-base", kind="base", settings=s, config={"name": "lbm-tiny"})
    tuned = register_asset(make_weights(), name="pg-tuned", kind="model", settings=s, lineage={"base": base})
    began = time.time() - 4.2  # an extraction that took 4.2 s before registering
    lora = register_asset(make_weights(), name="pg-lora", kind="lora", settings=s, facts=lora_facts(8, alpha=None),
                          lineage={"base": base, "tuned": tuned}, work_started=began)
    exact = register_asset(make_weights(), name="pg-kohya", kind="lora", settings=s,
                           facts={**lora_facts(8, mean_error=0.0, max_error=0.0), "source_format": "kohya",
                                  "policy": "import kohya"}, lineage={"base": base, "parent": lora})

    mv = _mv(s, "pg-lora@1")
    first = mv.description.splitlines()[0]
    assert first == "pg-lora@1: LoRA of pg-base@1 extracted from pg-tuned@1, rank 8/4, mean per-layer error 0.08"
    assert not any(c in first for c in "*[]`|#")
    keys = sorted(mv.tags)  # the UI's order
    ids = [k for k in keys if k.startswith("x-lbm.")]
    assert keys[-len(ids):] == ids and "x-lbm.sha256" in ids and "x-lbm.catalog_id" in ids
    assert not [k for k in keys if k.startswith("lbm.")]
    assert mv.tags["rank"] == "8" and "alpha" not in mv.tags  # alpha = rank: said in the description only
    assert len(keys) - len(ids) <= 8
    assert "| made from this | [pg-kohya@1](#/models/pg-kohya/versions/1) (re-imported export) |" in mv.description

    ex = _mv(s, "pg-kohya@1")
    assert ex.description.splitlines()[0] == ("pg-kohya@1: LoRA of pg-base@1 imported from pg-lora@1 (kohya), "
                                              "rank 8/4, exact")
    assert "| per-layer error | **exact** (imported as is) |" in ex.description
    assert "0 / 0" not in ex.description and "mean_error" not in ex.tags
    assert exact.sha256 == ex.tags["x-lbm.sha256"]

    base_page = _mv(s, "pg-base@1").description
    assert base_page.splitlines()[0] == "pg-base@1: LBM base model (lbm-tiny), 4.8 KB"
    assert ("| made from this | [pg-kohya@1](#/models/pg-kohya/versions/1) (LoRA), [pg-lora@1]"
            "(#/models/pg-lora/versions/1) (LoRA), [pg-tuned@1](#/models/pg-tuned/versions/1) (fine-tuned model) |"
            ) in base_page
    tuned_page = _mv(s, "pg-tuned@1").description
    assert tuned_page.splitlines()[0].startswith("pg-tuned@1: fine-tuned LBM model of pg-base@1")
    assert "| base | [pg-base@1](#/models/pg-base/versions/1)" in tuned_page
    assert "[pg-lora@1](#/models/pg-lora/versions/1) (extracted)" in tuned_page

    client = _client(s)
    run = client.get_run(mv.run_id)
    assert run.info.end_time - run.info.start_time >= 4200  # the run spans the extraction
    described = client.get_registered_model("pg-tuned").description
    assert described.startswith("pg-tuned: a fine-tuned LBM model in lbm-registry, 1 version(s).")
    assert "LBM fine-tuned LBM" not in described

    remove("pg-kohya@1", settings=s)  # what was made from it no longer lists the removed version
    assert "pg-kohya" not in _mv(s, "pg-lora@1").description
    assert "pg-kohya" not in _mv(s, "pg-base@1").description


def test_doctor_rebuilds_an_old_page(fresh_settings, make_weights):
    """A page written by an older version of the tool (ids among the quality tags, markdown first
    line) is reported by doctor and rebuilt from the catalog by --repair."""
    from lbm_registry.api.registry import doctor, register_asset

    s = fresh_settings()
    register_asset(make_weights(), name="old-base", kind="base", settings=s)
    mv = _mv(s, "old-base@1")
    client = _client(s)
    client.update_model_version(mv.name, mv.version, description="**old-base@1**: base model")
    client.set_model_version_tag(mv.name, mv.version, "lbm.sha256", mv.tags["x-lbm.sha256"])
    report = doctor(s)
    assert [i["kind"] for i in report["issues"]] == ["mlflow_page"] and not report["ok"]
    assert doctor(s, repair=True)["remaining"] == 0
    fixed = _mv(s, "old-base@1")
    assert fixed.description.startswith("old-base@1: LBM base model") and "lbm.sha256" not in fixed.tags
    assert doctor(s)["ok"]
