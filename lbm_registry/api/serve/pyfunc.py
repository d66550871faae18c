"""Every registered version as an MLflow ``python_function`` model (see DESIGN.md "MLflow models").

    mlflow.pyfunc.load_model("models:/relight@prod").predict(pd.DataFrame({"image": [b64]}))

``load_context`` builds the same pipeline as ``lbm-reg infer`` (:func:`api.infer.pipeline_from_files`)
from the version's own weights (the model folder's ``weights`` artifact) and, for a LoRA, its base,
which is referenced, not copied:

1. through the registry (the workspace of ``$LBM_REG_HOME`` / ``--home`` settings, by sha256);
2. else through the base version's own ``models:/NAME/N`` URI (recorded at registration; or found
   by its ``x-lbm.sha256`` tag), read in place from a local artifact store or downloaded once into
   ``$LBM_REG_CACHE`` (default ``~/.cache/lbm-registry``).

Every weight file is sha256-verified before use; verified hashes are remembered by
(path, size, mtime) so a reload does not re-hash gigabytes.

``predict`` takes a DataFrame with a column ``image`` (base64 of any PIL-readable image) and
optional ``scale`` (LoRA strength, default 1), ``steps`` (default: the config's) and ``seed``
(default 0); it returns one row per input with ``image`` = base64 PNG at the input's size.
Bad input (not an image, ``scale: 9``, ``steps: "x"``) raises ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` and our one line, checked for every row before any image is made:
``mlflow models serve`` answers it with a 400, not with its generic "unexpected error" and a stack.
``predict`` carries type hints (``pd.DataFrame`` in and out) so MLflow does not warn on every load;
the model's signature (registry/mlmodel.py) describes the columns.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import numbers
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from lbm_registry.errors import DataError, LBMError, RefError

CACHE_ENV = "LBM_REG_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lbm-registry").expanduser()


def _sha_memo() -> Path:
    return cache_dir() / "verified.json"


def verify_sha256(path: Path, sha256: str) -> Path:
    """``path`` if its bytes hash to ``sha256`` (remembered by path/size/mtime), else RefError."""
    from lbm_registry.registry.blobs import sha256_file

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = _sha_memo()
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(key) == sha256:
        return path
    got = sha256_file(path)
    if got != sha256:
        raise RefError(f"{path}: sha256 {got[:12]} does not match the recorded {sha256[:12]}")
    memo[key] = sha256
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only home: verify again next time
    return path


def _from_registry(sha256: str) -> tuple[Path, dict[str, Any] | None] | None:
    """The base's blob and config from the workspace of the current settings, if it has it."""
    from lbm_registry.api.registry import resolve
    from lbm_registry.settings import WorkspaceSettings

    try:
        settings = WorkspaceSettings.resolve()
        if settings.catalog_url is None and not (settings.home / "catalog.db").is_file():
            return None
        asset = resolve(f"sha256:{sha256}", settings, ("base", "model"))
    except LBMError:
        return None
    return (asset.path, asset.config) if asset.sha256 == sha256 else None


def _model_uris(base: dict[str, Any]) -> list[str]:
    """The base's recorded ``models:/`` URI, then any model version tagged with its sha256."""
    uris = [base["models_uri"]] if base.get("models_uri") else []
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        name = (base.get("ref") or "").partition("@")[0]
        query = f"name = '{name}'" if name else ""
        for mv in client.search_model_versions(query):
            tags = mv.tags or {}
            if (tags.get("x-lbm.sha256") or tags.get("lbm.sha256")) == base["sha256"]:
                uris.append(f"models:/{mv.name}/{mv.version}")
    except Exception:  # no registry reachable: the recorded URI is all there is
        pass
    return list(dict.fromkeys(uris))


def _from_models_uri(uri: str, sha256: str) -> tuple[Path, dict[str, Any] | None]:
    """The weights of the model version ``uri``: in place when its artifacts are local files,
    else downloaded once into the cache (sha-verified before it is kept)."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    from lbm_registry.registry.tracking import _local_dir

    name, _, version = uri[len("models:/"):].partition("/")
    source = MlflowClient().get_model_version_download_uri(name, version)
    cached = cache_dir() / "blobs" / sha256
    local = _local_dir(source)
    if local is not None:
        flavor = Model.load(str(local)).flavors["python_function"]
        weights = local / flavor["artifacts"]["weights"]["path"]
        return verify_sha256(weights, sha256), _config_of(flavor)
    if not cached.is_file():
        tmp = cache_dir() / "downloads" / f"{sha256}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            mlmodel = download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=str(tmp))
            flavor = Model.load(mlmodel).flavors["python_function"]
            got = Path(download_artifacts(artifact_uri=f"{source}/{flavor['artifacts']['weights']['path']}",
                                          dst_path=str(tmp)))
            verify_sha256(got, sha256)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, cached)
            (cached.parent / f"{sha256}.json").write_text(json.dumps(flavor.get("config") or {}))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        cfg = json.loads((cached.parent / f"{sha256}.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    return verify_sha256(cached, sha256), _config_of({"config": cfg})


def _config_of(flavor: dict[str, Any]) -> dict[str, Any] | None:
    text = (flavor.get("config") or {}).get("config")
    return json.loads(text) if text else None


def resolve_base(base: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """(weights path, LBM config dict or None) of a LoRA's base (see the module docstring)."""
    sha = base.get("sha256")
    if not sha:
        raise RefError("this LoRA records no base sha256: load it with lbm_registry.load(..., base=REF)")
    found = _from_registry(sha)
    if found is not None:
        return found
    errors = []
    for uri in _model_uris(base):
        try:
            return _from_models_uri(uri, sha)
        except Exception as exc:  # try the next way of finding it
            errors.append(f"{uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    where = "; ".join(errors) or "no models:/ URI recorded"
    raise RefError(f"base {base.get('ref') or sha[:12]} (sha256:{sha[:12]}) is neither in this registry "
                   f"(set LBM_REG_HOME) nor loadable from MLflow ({where})")


def _b64_image(value: Any, row: int) -> Any:
    from lbm_registry.lbm.imaging import open_image

    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise DataError(f"row {row}: column 'image' is not base64") from None
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        raise DataError(f"row {row}: column 'image' must be a base64 string, got {type(value).__name__}")
    return open_image(data)


def _opt(row: Any, key: str) -> Any:
    value = row.get(key) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


class LBMPyfuncModel(PythonModel):
    """The ``python_function`` model of one registered version (base, model or LoRA)."""

    def load_context(self, context):  # noqa: ANN001  (MLflow inspects the hints: none)
        from lbm_registry.api.run.infer import pipeline_from_files
        from lbm_registry.lbm.checkpoint import CheckpointReader
        from lbm_registry.lbm.config import config_from_dict
        from lbm_registry.lbm.loading import config_from_checkpoint

        cfg = dict(context.model_config or {})
        weights = verify_sha256(Path(context.artifacts["weights"]), cfg["sha256"])
        self.kind = cfg.get("kind")
        self.ref = cfg.get("ref")
        if self.kind == "lora":
            base = dict(cfg.get("base") or {})
            base_path, base_config = resolve_base(base)
            if base_config is None and base.get("config"):
                base_config = json.loads(base["config"])
            loras = [(weights, 1.0)]
        else:
            base_path, base_config, loras = weights, json.loads(cfg["config"]) if cfg.get("config") else None, []
        lbm_config = (config_from_dict(base_config, self.ref) if base_config
                      else config_from_checkpoint(CheckpointReader(base_path)))
        if lbm_config is None:
            raise RefError(f"{self.ref}: no LBM config recorded for its base")
        device = os.environ.get("LBM_REG_DEVICE", "auto")
        dtype = os.environ.get("LBM_REG_DTYPE", "auto")
        self.pipe = pipeline_from_files(base_path, lbm_config, loras, device=device, dtype=dtype,
                                        info={"ref": self.ref})
        self.scale = 1.0

    def predict(self, context, model_input: pd.DataFrame,  # noqa: ANN001  (context: see load_context)
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            rows = _requests(model_input)
        except LBMError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        out = []
        for img, scale, steps, seed in rows:
            rescale = None if scale == self.scale else scale  # re-merging costs a pass over the weights
            self.scale = scale
            result = self.pipe(img, steps=steps, seed=seed, scale=rescale)
            buf = io.BytesIO()
            result.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame({"image": out})


def _requests(model_input: Any) -> list[tuple[Any, float, int | None, int]]:
    """(image, scale, steps, seed) of every row, all checked before any is run (DataError /
    LoRAError with one line naming the row)."""
    from lbm_registry.ranges import check_scale, check_seed, check_steps

    if not isinstance(model_input, pd.DataFrame):
        model_input = pd.DataFrame(model_input)
    if "image" not in model_input.columns:
        raise DataError("the input needs a column 'image' (base64 of an image)")
    rows = []
    for i, (_, row) in enumerate(model_input.iterrows()):
        try:
            img = _b64_image(row["image"], i)
        except LBMError as exc:
            raise exc if str(exc).startswith(f"row {i}:") else type(exc)(f"row {i}: {exc}") from None
        try:  # the ranges every surface checks (lbm_registry.ranges)
            scale, steps, seed = (_number(row, k, i) for k in ("scale", "steps", "seed"))
            scale = check_scale(scale, f"row {i}: scale") if scale is not None else 1.0
            steps = check_steps(steps, f"row {i}: steps") if steps is not None else None
            seed = check_seed(seed, f"row {i}: seed") if seed is not None else 0
        except LBMError as exc:
            raise exc if str(exc).startswith(f"row {i}:") else type(exc)(f"row {i}: {exc}") from None
        rows.append((img, scale, steps, seed))
    return rows


def _number(row: Any, key: str, i: int) -> int | float | None:
    """The cell as a Python number, exactly (a seed past 2**53 must not round through a float);
    text and booleans are refused: a number in a request is a number, as ``serve`` takes it."""
    value = _opt(row, key)
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"row {i}: column {key!r} must be a number, got {type(value).__name__}")
    return value
