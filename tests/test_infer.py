"""Inference: LoRA merged at load equals the tuned model; scales; stacking; images; errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lbm_registry.errors import LoRAError


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    arr = (rng.random((70, 90, 3)) * 255).astype("uint8")
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def lora_pair(make_tuned, make_exact_lora):
    t1, t2 = make_tuned(rank=4, seed=1, scale=0.3), make_tuned(rank=4, seed=2, scale=0.3)
    return t1, t2, make_exact_lora(t1), make_exact_lora(t2)


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def test_full_rank_lora_matches_tuned_model(lora_pair, image, tiny_base_path, workspace):
    from lbm_registry.api.run.infer import load

    tuned, _, lora_a, _ = lora_pair
    out_lora = load(str(lora_a), base=str(tiny_base_path), device="cpu", dtype="fp32", settings=workspace)(image, seed=3)
    out_tuned = load(str(tuned), device="cpu", dtype="fp32", settings=workspace)(image, seed=3)
    assert out_lora.size == image.size == out_tuned.size
    assert np.abs(_arr(out_lora) - _arr(out_tuned)).max() <= 1


def test_scale_zero_is_base_and_scale_changes_output(lora_pair, image, tiny_base_path, workspace):
    from lbm_registry.api.run.infer import load

    _, _, lora_a, _ = lora_pair
    base_img = load(str(tiny_base_path), device="cpu", dtype="fp32", settings=workspace)(image)
    pipe = load(str(lora_a), base=str(tiny_base_path), scale=0.0, device="cpu", dtype="fp32", settings=workspace)
    assert np.array_equal(_arr(pipe(image)), _arr(base_img))
    assert not np.array_equal(_arr(pipe(image, scale=1.0)), _arr(base_img))
    assert np.array_equal(_arr(pipe(image, scale=0.0)), _arr(base_img))


def test_two_stacked_loras_at_half_equal_average_delta(lora_pair, image, tiny_base_path, tiny_config, workspace):
    from lbm_registry.api.run.infer import load
    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lbm.pipeline import LBMPipeline

    t1, t2, lora_a, lora_b = lora_pair
    stacked = load(str(tiny_base_path), loras=[f"{lora_a}:0.5", f"{lora_b}:0.5"], device="cpu",
                   dtype="fp32", settings=workspace)
    m1, m2 = load_lbm(t1, tiny_config), load_lbm(t2, tiny_config)
    avg = load_lbm(tiny_base_path, tiny_config)
    with torch.no_grad():
        for p, p1, p2 in zip(avg.denoiser.parameters(), m1.denoiser.parameters(),
                             m2.denoiser.parameters(), strict=True):
            p.copy_((p1 + p2) / 2)
    ref = LBMPipeline(avg, torch.device("cpu"), torch.float32)
    assert np.abs(_arr(stacked(image)) - _arr(ref(image))).max() <= 1


def test_lora_for_another_base_is_refused_unless_forced(lora_pair, make_tuned, image, workspace):
    from lbm_registry.api.run.infer import load

    _, _, lora_a, _ = lora_pair
    other_base = make_tuned(rank=2, seed=9, scale=0.01)
    with pytest.raises(LoRAError, match="force=True"):
        load(str(lora_a), base=str(other_base), device="cpu", settings=workspace)
    pipe = load(str(lora_a), base=str(other_base), force=True, device="cpu", settings=workspace)
    assert pipe.info["warnings"] and pipe(image).size == image.size


def test_scale_out_of_range(lora_pair, tiny_base_path, workspace):
    from lbm_registry.api.run.infer import load
    from lbm_registry.errors import RangeError

    with pytest.raises(RangeError, match="outside"):
        load(str(lora_pair[2]), base=str(tiny_base_path), scale=2.5, device="cpu", settings=workspace)


def test_unregistered_lora_without_known_base(lora_pair, workspace):
    from lbm_registry.api.run.infer import load
    from lbm_registry.errors import RefError

    with pytest.raises(RefError, match="base=REF"):
        load(str(lora_pair[2]), device="cpu", settings=workspace)


def test_images_any_format_and_batch_dir(tmp_path, tiny_base_path, workspace):
    from lbm_registry.api.run.infer import run_infer

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    rgb = Image.fromarray((rng.random((64, 100, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    rgb.save(buf, format="WEBP")
    (src / "webp_named.jpg").write_bytes(buf.getvalue())  # the extension lies
    rgba = Image.fromarray((rng.random((50, 40, 4)) * 255).astype("uint8"), "RGBA")
    rgba.save(src / "alpha.png")
    rgb.convert("L").save(src / "gray.png")
    exif_img = Image.fromarray((rng.random((30, 60, 3)) * 255).astype("uint8"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 60x30 -> 30 wide, 60 high
    exif_img.save(src / "rotated.jpg", exif=exif)
    (src / "broken.png").write_bytes(b"not an image")
    result = run_infer(str(tiny_base_path), source=src, output=tmp_path / "out", device="cpu", settings=workspace)
    assert len(result["outputs"]) == 4
    assert [s["path"].endswith("broken.png") for s in result["skipped"]] == [True]
    sizes = {p.split("/")[-1]: Image.open(p).size for p in result["outputs"]}
    assert sizes == {"webp_named.png": (100, 64), "alpha.png": (40, 50), "gray.png": (100, 64),
                     "rotated.png": (30, 60)}


def test_seeded_and_deterministic(tiny_base_path, image, workspace):
    from lbm_registry.api.run.infer import load

    pipe = load(str(tiny_base_path), device="cpu", settings=workspace)
    a, b = pipe(image, steps=2, seed=1), pipe(image, steps=2, seed=1)
    assert np.array_equal(_arr(a), _arr(b))


def test_cli_infer_single_file(tmp_path, lora_pair, image, tiny_base_path, workspace):
    from typer.testing import CliRunner

    from lbm_registry.cli.main import app

    src = tmp_path / "x.png"
    image.save(src)
    out = tmp_path / "y.png"
    res = CliRunner().invoke(app, ["--home", str(workspace.home), "infer", str(lora_pair[2]), "--source", str(src),
                                   "--output", str(out), "--scale", "0.7", "--device", "cpu",
                                   "--base", str(tiny_base_path), "--log"])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == image.size
    # --log: one MLflow run with the refs as params and the input/output images as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace.effective_tracking_uri)
    exp = client.get_experiment_by_name("lbm-registry-infer")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["scale"] == "0.7" and run.data.params["base_sha256"]
    assert run.data.params["loras"].endswith(":0.7") and run.info.status == "FINISHED"
    assert (run.data.params["latent"], run.data.params["decode"]) == ("sample", "tiled")   # upstream's defaults
    logged = {a.path for d in ("inputs", "outputs") for a in client.list_artifacts(run.info.run_id, d)}
    assert logged == {"inputs/x.png", "outputs/y.png"}
    res = CliRunner().invoke(app, ["--home", str(workspace.home), "infer", str(lora_pair[2]), "--source", str(src),
                                   "--output", str(out), "--scale", "3"])
    assert res.exit_code != 0


def test_python_api_load(lora_pair, image, tiny_base_path, workspace, monkeypatch):
    import lbm_registry

    monkeypatch.setenv("LBM_REG_HOME", str(workspace.home))
    pipe = lbm_registry.load(str(lora_pair[2]), base=str(tiny_base_path), device="cpu")
    assert pipe(image, scale=1.0).size == image.size


def test_registered_lora_runs_by_name_with_base_from_lineage(reg_settings, lora_pair, tiny_base_path, image,
                                                             tiny_config):
    """relight@latest resolves to the LoRA and, through its lineage, to the base it was made for."""
    from lbm_registry.api.registry import register_asset, resolve
    from lbm_registry.api.run.infer import load

    base = register_asset(tiny_base_path, name="infer-base", kind="base", settings=reg_settings,
                          config=tiny_config.to_dict())
    register_asset(lora_pair[2], name="infer-relight", kind="lora", settings=reg_settings,
                   facts={"rank": 9999, "conv_rank": 9999, "policy": "exact", "alpha": 1.0},
                   lineage={"base": base})
    lora = resolve("infer-relight@latest", reg_settings)
    assert lora.lineage["base"]["sha256"] == base.sha256
    pipe = load("infer-relight@latest", device="cpu", dtype="fp32", settings=reg_settings)
    assert pipe.info["base"] == "infer-base@1"
    tuned = load(str(lora_pair[0]), device="cpu", dtype="fp32", settings=reg_settings)
    assert np.abs(_arr(pipe(image)) - _arr(tuned(image))).max() <= 1


# -- refusals before any model loads (issue 11, items 2-4) ------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if inference gets as far as loading a model."""
    import lbm_registry.api.run.infer as infer_mod

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(infer_mod, "load", refuse)


@pytest.fixture
def one_image(tmp_path, image):
    path = tmp_path / "in.png"
    image.save(path)
    return path


def test_unavailable_or_unknown_device_is_one_line(cli, no_model, one_image, tiny_base_path, tmp_path):
    rc, _, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", one_image, "--output",
                     tmp_path / "o.png", "--device", "tpu")
    assert rc == 2 and err.strip() == "error: unknown --device 'tpu': use auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        rc, _, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", one_image, "--output",
                         tmp_path / "o.png", "--device", "cuda")
        assert rc == 2 and err.strip() == "error: CUDA is not available here; use --device cpu"
    rc, _, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", one_image, "--output",
                     tmp_path / "o.png", "--dtype", "int4")
    assert rc == 2 and "unknown --dtype 'int4'" in err


def test_pick_device_refuses_unknown_names():
    from lbm_registry.errors import ConfigError
    from lbm_registry.lbm.model import pick_device

    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        pick_device("tpu")
    assert pick_device("cpu").type == "cpu"


def test_empty_or_unreadable_source_is_refused_before_loading(no_model, tiny_base_path, tmp_path, workspace):
    from lbm_registry.api.run.infer import run_infer
    from lbm_registry.errors import DataError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images in .*empty: the folder is empty"):
        run_infer(str(tiny_base_path), source=empty, output=tmp_path / "out", settings=workspace)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notimage.png").write_text("hi")
    with pytest.raises(DataError) as info:
        run_infer(str(tiny_base_path), source=junk, output=tmp_path / "out", settings=workspace)
    msg = str(info.value)
    assert "notimage.png: not an image format PIL can read" in msg and "BufferedReader" not in msg
    assert not (tmp_path / "out").exists()


def test_skipped_file_message_names_path_and_reason(cli, tiny_base_path, image, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    image.save(src / "good.png")
    (src / "notimage.png").write_text("hi")
    rc, out, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", src, "--output",
                       tmp_path / "out", "--device", "cpu")
    assert rc == 0, err
    assert f"skipped {src / 'notimage.png'}: not an image format PIL can read" in err
    assert "BufferedReader" not in err and (tmp_path / "out" / "good.png").is_file()


@pytest.mark.parametrize(("source_kind", "output", "message"), [
    ("file", "x.txt", "'.txt' is not an image format"),
    ("file", "x.gif", "'.gif' is not an image format"),
    ("dir", "single.png", "must be a folder, not an image file name"),
    ("dir", "existing-file", "is a file: give a folder"),
])
def test_output_that_cannot_be_right_is_refused(no_model, cli, one_image, tiny_base_path, tmp_path,
                                                source_kind, output, message):
    (tmp_path / "existing-file").write_text("keep me")
    source = one_image if source_kind == "file" else one_image.parent
    rc, _, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", source, "--output",
                     tmp_path / output)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "single.png").exists() and (tmp_path / "existing-file").read_text() == "keep me"


def test_output_extension_picks_the_format(tiny_base_path, one_image, tmp_path, workspace):
    from lbm_registry.api.run.infer import run_infer

    for name, fmt in (("o.jpg", "JPEG"), ("o.webp", "WEBP"), ("o.bmp", "BMP"), ("o.tif", "TIFF")):
        run_infer(str(tiny_base_path), source=one_image, output=tmp_path / name, device="cpu", settings=workspace)
        assert Image.open(tmp_path / name).format == fmt


def test_same_stem_inputs_do_not_overwrite_each_other(tmp_path):
    from lbm_registry.api.run.infer import plan_outputs

    src = tmp_path / "in"
    src.mkdir()
    inputs = [src / "a.jpg", src / "a.png", src / "b.png"]
    for p in inputs:
        p.write_bytes(b"")
    dest = plan_outputs(src, tmp_path / "out", inputs)
    assert sorted(p.name for p in dest.values()) == ["a.jpg.png", "a.png.png", "b.png"]


def test_bad_lora_scale_suffix_is_named(no_model, tmp_path, workspace, one_image, tiny_base_path):
    from lbm_registry.api.run.infer import parse_lora_spec, run_infer
    from lbm_registry.errors import RangeError

    with pytest.raises(LoRAError, match="bad LoRA spec 'relight@1:abc'.*scale 'abc'"):
        parse_lora_spec("relight@1:abc")
    assert parse_lora_spec("relight@1:0.5") == ("relight@1", 0.5)
    with pytest.raises(RangeError, match=r"bad LoRA spec 'relight@1:9': its scale 9 is outside 0.0-2.0"):
        parse_lora_spec("relight@1:9")
    assert parse_lora_spec("sha256:abcdef12") == ("sha256:abcdef12", 1.0)
    with pytest.raises(LoRAError, match="bad LoRA spec"):
        run_infer(str(tiny_base_path), source=one_image, output=tmp_path / "o.png", loras=["relight@1:abc"],
                  settings=workspace)


# -- one set of range rules for every surface (issue 22, items 8 and 13) -----------------------
@pytest.mark.parametrize("kw", [{"scale": float("nan")}, {"scale": 1e6}, {"scale": -0.5}, {"steps": 0},
                                {"steps": -3}, {"steps": 100_000}, {"steps": 1.5}, {"seed": -1}, {"seed": 10**23},
                                {"seed": "3"}, {"scale": "1"}, {"steps": True}],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_a_pipeline_call_checks_the_shared_ranges(kw, base_pipe, image):
    """``load(ref)(img, scale=nan)`` acted as 1.0, ``scale=1e6`` and ``steps=0`` gave black images,
    ``steps=-3`` a bare ValueError: now one RangeError (an LBMError) before any pixel is drawn."""
    from lbm_registry.errors import LBMError, RangeError

    with pytest.raises(RangeError) as exc:
        base_pipe(image, **kw)
    assert isinstance(exc.value, LBMError) and "\n" not in str(exc.value)
    assert next(iter(kw)) in str(exc.value)


@pytest.fixture(scope="module")
def base_pipe(tiny_base_path, tmp_path_factory):
    from lbm_registry.api.run.infer import load
    from lbm_registry.settings import WorkspaceSettings

    return load(str(tiny_base_path), device="cpu", dtype="fp32",
                settings=WorkspaceSettings.resolve(home=tmp_path_factory.mktemp("ranges") / "home"))


def test_the_edges_themselves_pass():
    import numpy as np

    from lbm_registry import ranges

    assert ranges.check_scale(2.0) == 2.0 and ranges.check_scale(np.float32(0.0)) == 0.0
    assert ranges.check_steps(1000) == 1000 and ranges.check_steps(np.int64(1)) == 1 and ranges.check_steps(2.0) == 2
    assert ranges.check_seed(2**63 - 1) == 2**63 - 1 and ranges.check_seed(0) == 0
    assert ranges.check_weight(-100) == -100.0 and ranges.check_resolution(4096) == 4096


@pytest.mark.parametrize(("args", "needle"), [
    (["--seed", "-1"], "seed must be from 0 to 2**63-1, got -1"),
    (["--seed", str(10**23)], "seed must be from 0 to 2**63-1"),
    (["--steps", "100000"], "steps must be from 1 to 1000, got 100000"),
    (["--scale", "nan"], "scale must be a finite number"),
    (["--scale", "1e308"], "outside 0.0-2.0"),
    (["--lora", "x@1:inf"], "bad LoRA spec 'x@1:inf'"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_cli_infer_refuses_what_the_server_refuses(cli, no_model, one_image, tiny_base_path, tmp_path, args, needle):
    """``infer --seed -1`` and ``--steps 100000`` passed the CLI while the server refused them;
    ``--seed 1e23`` (as an integer) was a traceback. One line, exit 2, nothing written."""
    out = tmp_path / "out.png"
    rc, stdout, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", one_image, "--output", out,
                          *args)
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "h").exists()
