"""Every registered version is an MLflow model: pyfunc load by version and alias, serving, repair."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SERVE_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def models_ws(tmp_path_factory, mlflow_template, tiny_base_path, make_tuned):
    """A workspace with tiny-base@1 (base), tiny-tuned@1 (model), relight@1 (LoRA extracted from
    them, alias prod) and relight@2 (another extraction), registered through the real API."""
    from lbm_registry.api.assets.lora import extract
    from lbm_registry.api.assets.models import import_model
    from lbm_registry.api.registry import init_workspace, set_alias
    from lbm_registry.settings import WorkspaceSettings

    s = WorkspaceSettings(home=tmp_path_factory.mktemp("models") / "home")
    s.home.mkdir(parents=True)
    shutil.copyfile(mlflow_template, s.home / "mlflow.db")
    init_workspace(s)
    import_model(tiny_base_path, name="tiny-base", kind="base", settings=s)
    import_model(make_tuned(rank=4, scale=0.3), name="tiny-tuned", kind="model", settings=s)
    extract("tiny-base", "tiny-tuned", rank=4, conv_rank=4, dtype="fp32", register="relight", settings=s)
    extract("tiny-base", "tiny-tuned", rank=2, conv_rank=2, dtype="fp32", register="relight", settings=s)
    set_alias("relight@1", "prod", s)
    return s


@pytest.fixture
def mlflow_env(models_ws, monkeypatch, tmp_path):
    """MLflow (and the registry, for the base) pointed at the workspace, a private cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", models_ws.effective_tracking_uri)
    monkeypatch.setenv("LBM_REG_HOME", str(models_ws.home))
    monkeypatch.setenv("LBM_REG_CACHE", str(tmp_path / "cache"))
    return models_ws


@pytest.fixture(scope="module")
def source_image(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("probe") / "src.png"
    Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")).save(path)
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _infer(settings, ref: str, source: Path, dest: Path, **kw) -> np.ndarray:
    from lbm_registry.api.run.infer import run_infer

    run_infer(ref, source=source, output=dest, settings=settings, **kw)
    return np.asarray(Image.open(dest).convert("RGB"), dtype=np.int16)


def _weights_dir(settings, ref: str) -> Path:
    from lbm_registry.api.registry import show

    run_id = show(ref, settings)["mlflow"]["run_id"]
    return settings.home / "artifacts" / run_id / "artifacts" / "weights"


def test_pyfunc_by_version_and_alias_equals_infer(mlflow_env, source_image, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    expected = _infer(mlflow_env, "relight@prod", source_image, tmp_path / "infer.png", seed=2)
    by_alias = mlflow.pyfunc.load_model("models:/relight@prod")
    by_version = mlflow.pyfunc.load_model("models:/relight/1")
    df = pd.DataFrame({"image": [_b64(source_image)], "seed": [2]})
    for model in (by_alias, by_version):
        out = model.predict(df)
        assert list(out.columns) == ["image"] and len(out) == 1
        got = _decode(out["image"][0])
        assert got.shape == expected.shape == (70, 90, 3)
        assert np.abs(got - expected).max() <= 1  # within 1/255
    # the optional columns: a LoRA strength, and rows without them get the defaults
    half = _infer(mlflow_env, "relight@1", source_image, tmp_path / "half.png", scale=0.5)
    out = by_alias.predict(pd.DataFrame({"image": [_b64(source_image)] * 2, "scale": [0.5, None]}))
    assert np.abs(_decode(out["image"][0]) - half).max() <= 1
    plain = _infer(mlflow_env, "relight@1", source_image, tmp_path / "plain.png")
    assert np.abs(_decode(out["image"][1]) - plain).max() <= 1
    # the ranges of every surface (issue 22, item 8): steps=0 was accepted (a black image); the
    # refusal is MLflow's INVALID_PARAMETER_VALUE with the ranges' line (issue 23, item 9)
    from mlflow.exceptions import MlflowException

    for row, needle in (({"steps": [0]}, "row 0: steps must be from 1 to 1000"), ({"scale": [float("inf")]}, "scale"),
                        ({"seed": [-1]}, "row 0: seed")):
        with pytest.raises(MlflowException, match=needle):
            by_alias.predict(pd.DataFrame({"image": [_b64(source_image)], **row}))


def test_pyfunc_refuses_bad_rows_in_one_line_and_loads_without_warnings(mlflow_env, source_image):
    """Bad input is MLflow's INVALID_PARAMETER_VALUE (a 400 when served) with our one line, found
    before any image is made; loading prints no "Add type hints" warning."""
    import warnings

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model("models:/relight@prod")
    assert not [w for w in caught if "type hint" in str(w.message).lower()], [str(w.message) for w in caught]
    good = _b64(source_image)
    for rows, message in (({"image": ["bm90IGFuIGltYWdl"]}, "row 0: "),
                          ({"image": [good, good], "scale": [1.0, 9.0]}, "row 1: scale 9 is outside")):
        with pytest.raises(MlflowException) as info:
            model.predict(pd.DataFrame(rows))
        assert info.value.error_code == "INVALID_PARAMETER_VALUE" and info.value.get_http_status_code() == 400
        assert message in info.value.message and "\n" not in info.value.message, info.value.message


def test_pyfunc_of_base_and_model_versions(mlflow_env, source_image, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    for ref, uri in (("tiny-base@1", "models:/tiny-base/1"), ("tiny-tuned@1", "models:/tiny-tuned/1")):
        expected = _infer(mlflow_env, ref, source_image, tmp_path / f"{ref}.png")
        out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [_b64(source_image)]}))
        assert np.abs(_decode(out["image"][0]) - expected).max() <= 1


def test_model_folder_is_the_weights_folder(mlflow_env):
    """The version's source is <run>/weights: its weights (a hard link to the blob), MLmodel with
    a signature and the base referenced by sha256 and models:/ URI, pinned requirements."""
    from mlflow import MlflowClient
    from mlflow.models import Model

    from lbm_registry.api.registry import resolve

    lora = resolve("relight@1", mlflow_env)
    folder = _weights_dir(mlflow_env, "relight@1")
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    # (loading a models:/ URI from a local store also leaves MLflow's registered_model_meta there)
    assert {"MLmodel", "conda.yaml", "pyfunc_model.py", "python_env.yaml", "requirements.txt",
            weights.name} <= {p.name for p in folder.iterdir()}
    assert weights.stat().st_ino == lora.path.stat().st_ino  # linked, never copied
    mv = MlflowClient().get_model_version("relight", "1")
    assert mv.source.endswith("/weights")
    model = Model.load(str(folder))
    flavor = model.flavors["python_function"]
    assert flavor["model_code_path"] == "pyfunc_model.py" and "python_model" not in flavor  # no pickle
    assert flavor["artifacts"]["weights"]["path"] == weights.name
    config = flavor["config"]
    base = resolve("tiny-base@1", mlflow_env)
    assert config["base"]["sha256"] == base.sha256 and config["base"]["models_uri"] == "models:/tiny-base/1"
    assert model.signature.inputs.input_names() == ["image", "scale", "steps", "seed"]
    assert model.signature.outputs.input_names() == ["image"]
    reqs = (folder / "requirements.txt").read_text().split()
    assert any(r.startswith("lbm-registry==") for r in reqs) and any(r.startswith("torch==") for r in reqs)


def test_base_found_through_its_models_uri_without_the_registry(mlflow_env, source_image, tmp_path, monkeypatch):
    """No workspace at hand (LBM_REG_HOME elsewhere): the LoRA's base comes from the base
    version's own models:/ URI, sha-verified, not copied."""
    import mlflow.pyfunc
    import pandas as pd

    expected = _infer(mlflow_env, "relight@2", source_image, tmp_path / "infer.png")
    monkeypatch.setenv("LBM_REG_HOME", str(tmp_path / "no-registry-here"))
    out = mlflow.pyfunc.load_model("models:/relight/2").predict(pd.DataFrame({"image": [_b64(source_image)]}))
    assert np.abs(_decode(out["image"][0]) - expected).max() <= 1
    assert not (tmp_path / "no-registry-here").exists()
    assert not (tmp_path / "cache" / "blobs").exists()  # a local artifact store is read in place


def test_tampered_base_is_refused(mlflow_env, tmp_path, monkeypatch):
    from lbm_registry.api.serve.pyfunc import resolve_base
    from lbm_registry.errors import RefError

    monkeypatch.setenv("LBM_REG_HOME", str(tmp_path / "nothing"))
    with pytest.raises(RefError, match="neither in this registry"):
        resolve_base({"sha256": "0" * 64, "ref": "tiny-base@1", "models_uri": "models:/tiny-base/1"})


def test_doctor_repair_makes_an_old_version_a_model(mlflow_env, source_image, tmp_path):
    """A version registered before versions were MLflow models (no MLmodel next to its weights):
    doctor finds it, --repair adds the files only (the weights stay the same hard link)."""
    import mlflow.pyfunc
    import pandas as pd

    from lbm_registry.api.registry import doctor
    from lbm_registry.registry.mlmodel import MODEL_FILES

    folder = _weights_dir(mlflow_env, "relight@2")
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    inode = weights.stat().st_ino
    for name in MODEL_FILES:
        (folder / name).unlink()
    with pytest.raises(Exception, match="MLmodel"):
        mlflow.pyfunc.load_model("models:/relight/2")
    report = doctor(mlflow_env)
    assert [(i["kind"], i["subject"]) for i in report["issues"]] == [("mlflow_model", "relight@2")]
    fixed = doctor(mlflow_env, repair=True)
    assert fixed["fixed"] == 1 and fixed["ok"]
    assert {*MODEL_FILES, weights.name} <= {p.name for p in folder.iterdir()}
    assert weights.stat().st_ino == inode
    out = mlflow.pyfunc.load_model("models:/relight/2").predict(pd.DataFrame({"image": [_b64(source_image)]}))
    assert out["image"][0]
    assert doctor(mlflow_env)["ok"]


def test_mlflow_models_serve_answers_invocations(mlflow_env, source_image, tmp_path):
    """A real ``mlflow models serve --env-manager local`` on 127.0.0.1, started and stopped here,
    through ``lbm-reg mlflow-serve`` from a shell with no activated venv and no MLflow settings:
    MLflow starts ``uvicorn`` by name, and the command puts this environment's bin on PATH."""
    from fixtures.servers import _stop, _tail, free_port

    expected = _infer(mlflow_env, "relight@prod", source_image, tmp_path / "infer.png", seed=4)
    port = free_port()
    log = tmp_path / "serve.log"
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LBM_REG_HOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve()) or "/usr/bin:/bin"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbm_registry.cli.main", "--home", str(mlflow_env.home), "mlflow-serve",
             "relight@prod", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + SERVE_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"mlflow models serve exited: {_tail(log)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"not up after {SERVE_TIMEOUT_S:.0f} s: {_tail(log)}"
            time.sleep(0.5)
        body = json.dumps({"dataframe_records": [{"image": _b64(source_image), "seed": 4}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        rows = answer["predictions"]
        assert len(rows) == 1
        assert np.abs(_decode(rows[0]["image"]) - expected).max() <= 1
        # bad input: a 400 with our one line, no stack trace (in the answer or the server's log)
        for record, line in (({"image": "bm90IGFuIGltYWdl"}, "row 0: "),
                             ({"image": _b64(source_image), "scale": 9}, "row 0: scale 9 is outside")):
            body = json.dumps({"dataframe_records": [record]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=120)
            assert err.value.code == 400
            refusal = json.loads(err.value.read())
            assert refusal["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in refusal
            assert refusal["message"].splitlines()[-1].startswith(f"Error: {line}"), refusal["message"]
        assert "Traceback" not in _tail(log, 100_000)
    finally:
        _stop(proc, signal.SIGTERM)
