"""The MLflow model files of a version: its run's ``weights/`` folder becomes an MLflow model.

A version's weights stay at ``<run artifacts>/weights/<file_name>`` (a hard link to the blob in
a local store); next to them this module writes

- ``MLmodel``: a ``python_function`` flavor, models from code (``pyfunc_model.py``, copied from
  :mod:`lbm_registry.api.pyfunc_model`; no pickle), the weights file as the artifact
  ``weights``, a signature (input ``image`` = base64 of any PIL-readable image, optional
  ``scale``/``steps``/``seed``; output ``image`` = base64 PNG at the input's size) and a
  ``model_config`` with what loading needs: the version's identity and LBM config and, for a
  LoRA, its base by sha256 with the base version's own ``models:/`` URI (the base is referenced,
  never copied);
- ``requirements.txt``, ``python_env.yaml``, ``conda.yaml``: the pinned packages of the
  environment that registered it, so ``mlflow models serve`` (or a fresh virtualenv) can rebuild it.

Only files are added, so ``doctor --repair`` can turn a version registered before this existed
into a loadable model without touching its weights. Everything here is built from catalog data.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from lbm_registry.registry import catalog
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.workspace import Workspace
from lbm_registry.version import __version__

MLMODEL = "MLmodel"
CODE_FILE = "pyfunc_model.py"
#: model_config format (bump when load_context must read it differently).
FORMAT = 1
#: Files this module writes into the model folder (besides the weights).
MODEL_FILES = (MLMODEL, CODE_FILE, "requirements.txt", "python_env.yaml", "conda.yaml")
#: The packages a loaded model imports (pinned at their installed versions when known).
REQUIREMENTS = ("lbm-registry", "mlflow", "torch", "diffusers", "safetensors", "pillow", "numpy", "pandas",
                "pyyaml", "pydantic", "sqlalchemy", "alembic", "filelock", "psutil")


def code_source() -> Path:
    """The models-from-code file shipped in the package."""
    return Path(__file__).resolve().parents[1] / "api" / CODE_FILE


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name if name != "lbm-registry" else f"lbm-registry=={__version__}")
    return out


def models_uri(name: str, mlflow_version: str | int | None) -> str | None:
    return f"models:/{name}/{mlflow_version}" if mlflow_version else None


def model_config(ws: Workspace, rec: VersionRecord) -> dict[str, Any]:
    """What :class:`lbm_registry.api.serve.pyfunc.LBMPyfuncModel` needs to load the version."""
    cfg: dict[str, Any] = {"format": FORMAT, "kind": rec.kind, "ref": rec.ref, "name": rec.name,
                           "version": rec.number, "sha256": rec.sha256, "size": rec.size,
                           "file_name": rec.file_name or f"{rec.name}-v{rec.number}.safetensors"}
    if rec.config is not None:
        cfg["config"] = json.dumps(rec.config, sort_keys=True)
    if rec.kind == "lora":
        for e in catalog.edges(ws.db, rec.id):
            if e["role"] != "base":
                continue
            base: dict[str, Any] = {"sha256": e.get("sha256")}
            target = catalog.version_by_id(ws.db, e["target_version_id"]) if e.get("target_version_id") else None
            if target is not None:
                base["ref"] = target.ref
                base["size"] = target.size
                uri = models_uri(target.name, target.mlflow_version)
                if uri:
                    base["models_uri"] = uri
                if target.config is not None:
                    base["config"] = json.dumps(target.config, sort_keys=True)
            elif e.get("ref"):
                base["ref"] = e["ref"]
            cfg["base"] = base
    return cfg


#: The model signature's columns (MLflow ``ColSpec`` JSON): input ``image`` (base64 of any image)
#: with optional ``scale``/``steps``/``seed``; output ``image`` (base64 PNG).
SIGNATURE_INPUTS = ({"type": "string", "name": "image", "required": True},
                    {"type": "double", "name": "scale", "required": False},
                    {"type": "long", "name": "steps", "required": False},
                    {"type": "long", "name": "seed", "required": False})
SIGNATURE_OUTPUTS = ({"type": "string", "name": "image", "required": True},)


def signature() -> Any:
    """The signature as an MLflow object (imports MLflow; the files below do not need it)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    def schema(cols: tuple[dict[str, Any], ...]) -> Any:
        return Schema([ColSpec(c["type"], c["name"], required=c["required"]) for c in cols])

    return ModelSignature(inputs=schema(SIGNATURE_INPUTS), outputs=schema(SIGNATURE_OUTPUTS))


def mlmodel_text(flavor: dict[str, Any], *, run_id: str | None, size: int, mlflow_version: str | None) -> str:
    """The ``MLmodel`` YAML exactly as ``mlflow.models.Model(artifact_path="weights", run_id=...,
    signature=signature()).add_flavor("python_function", **flavor)`` + ``to_yaml()`` writes it
    (checked against the installed MLflow by tests/test_mlflow_sqlite.py), without importing
    MLflow (which costs seconds at registration)."""
    import uuid
    from datetime import UTC, datetime

    import yaml

    doc: dict[str, Any] = {
        "run_id": run_id, "artifact_path": "weights",
        "utc_time_created": str(datetime.now(UTC).replace(tzinfo=None)),
        "flavors": {"python_function": flavor}, "model_uuid": uuid.uuid4().hex, "mlflow_version": mlflow_version,
        "prompts": None, "model_id": None,
        "signature": {"inputs": json.dumps(list(SIGNATURE_INPUTS)), "outputs": json.dumps(list(SIGNATURE_OUTPUTS)),
                      "params": None},
        "is_signature_from_type_hint": False, "type_hint_from_example": False, "model_size_bytes": size,
    }
    if run_id is None:
        doc.pop("run_id")
    if mlflow_version is None:
        doc.pop("mlflow_version")
    return yaml.safe_dump(doc, default_flow_style=False)


def model_flavor(ws: Workspace, rec: VersionRecord) -> dict[str, Any]:
    """The ``python_function`` flavor of a version's model (models from code, no pickle)."""
    cfg = model_config(ws, rec)
    return {"loader_module": "mlflow.pyfunc.loaders.code_model", "python_version": platform.python_version(),
            "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}, "config": cfg,
            "model_code_path": CODE_FILE, "artifacts": {"weights": {"path": cfg["file_name"], "uri": cfg["file_name"]}},
            "streamable": False}


def model_files(ws: Workspace, rec: VersionRecord, *, run_id: str | None = None) -> dict[str, str]:
    """``{file name: text}`` of the model folder (the weights file itself is not among them)."""
    import yaml

    reqs = requirements()
    py = platform.python_version()
    try:
        mlflow_version: str | None = metadata.version("mlflow")
    except metadata.PackageNotFoundError:  # pragma: no cover
        mlflow_version = None
    conda = {"name": "mlflow-env", "channels": ["conda-forge"],
             "dependencies": [f"python={py}", "pip", {"pip": reqs}]}
    python_env = {"python": py, "build_dependencies": ["pip", "setuptools", "wheel"],
                  "dependencies": ["-r requirements.txt"]}
    return {
        MLMODEL: mlmodel_text(model_flavor(ws, rec), run_id=run_id, size=rec.size, mlflow_version=mlflow_version),
        CODE_FILE: code_source().read_text(),
        "requirements.txt": "\n".join(reqs) + "\n",
        "python_env.yaml": yaml.safe_dump(python_env, sort_keys=False, default_flow_style=False),
        "conda.yaml": yaml.safe_dump(conda, sort_keys=False, default_flow_style=False),
    }


def folder_problem(have: set[str]) -> str | None:
    """Why a version's ``weights/`` folder holding the files ``have`` is not a loadable MLflow
    model, or None (the same answer for a local folder and a server's artifact listing)."""
    missing = [f for f in MODEL_FILES if f not in have]
    if not missing:
        return None
    if MLMODEL in missing:
        return "its model folder has no MLmodel: not loadable with mlflow.pyfunc (registered before models)"
    return f"its model folder lacks {', '.join(missing)}"
