"""The few MLflow operations that are cheap in SQL, done on a workspace's own ``mlflow.db`` with
``sqlite3`` instead of the MLflow client.

Why: ``import mlflow`` plus opening its SQLAlchemy store costs 1.5-3 s on a 2-core machine, while
``alias set`` needs one row written and ``doctor`` (without ``--repair``) a handful of reads.
This module does exactly what MLflow's own SQL store does for those operations (see
``mlflow/store/model_registry/sqlalchemy_store.py``: ``set_registered_model_alias`` merges one
``registered_model_aliases`` row for an existing, not deleted model version; deleted versions
have ``current_stage = 'Deleted_Internal'``; ``search_runs`` shows ``lifecycle_stage = 'active'``
runs).

It is used only where it is known to be right: a local SQLite tracking store whose Alembic
revision is in :data:`KNOWN_REVISIONS` (checked against the installed MLflow by
tests/test_startup.py) and that already holds our experiment. Anything else (a tracking
server, another MLflow schema, a store not created yet) returns None from :meth:`open`, and
callers use :class:`~lbm_registry.registry.tracking.Tracker`. Writes take the same
``mlflow-write`` lock as the Tracker's.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lbm_registry.registry import catalog
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.db import sqlite_path
from lbm_registry.registry.workspace import Workspace

#: MLflow SQL-store schema revisions whose tables this module reads and writes (MLflow 3.17).
KNOWN_REVISIONS = frozenset({"dc11669786a5"})
EXPERIMENT = "lbm-registry"
DELETED_STAGE = "Deleted_Internal"
WORKSPACE = "default"
#: Run/model-version tag naming the catalog that mirrored it (registries may share a server).
CATALOG_TAG = "lbm.catalog_id"


class CatalogOwnership:
    """Which MLflow runs/model versions belong to this workspace's catalog. Shared by
    :class:`SqliteMirror` and :class:`~lbm_registry.registry.tracking.Tracker` (both set ``ws``
    and ``_catalog_id = None``)."""

    ws: Workspace
    _catalog_id: str | None

    @property
    def catalog_id(self) -> str:
        if self._catalog_id is None:
            self._catalog_id = catalog.catalog_id(self.ws.db)
        return self._catalog_id

    def owns(self, tags: Mapping[str, str] | None) -> bool:
        """Was this run/model version mirrored by our catalog? Untagged ones (made before
        catalog ids existed, or by hand) count as ours; another catalog's never do."""
        owner = (tags or {}).get(CATALOG_TAG)
        return owner is None or owner == self.catalog_id


@dataclass
class _ModelVersion:
    version: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


class SqliteMirror(CatalogOwnership):
    """Read and alias-write access to a local MLflow SQLite store, without importing MLflow."""

    def __init__(self, ws: Workspace, path: Path, experiment_id: str) -> None:
        self.ws = ws
        self.path = path
        self.experiment_id = experiment_id
        self._catalog_id: str | None = None

    @classmethod
    def open(cls, ws: Workspace) -> SqliteMirror | None:
        """The fast path for this workspace, or None when the MLflow client must be used."""
        uri = ws.settings.effective_tracking_uri
        if not uri.startswith("sqlite:"):
            return None
        path = sqlite_path(uri)
        if path is None or not path.is_file():
            return None
        try:
            with cls._connect(path) as conn:
                rev = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                if not rev or rev[0] not in KNOWN_REVISIONS:
                    return None
                row = conn.execute("SELECT experiment_id FROM experiments WHERE name = ? AND workspace = ? "
                                   "AND lifecycle_stage = 'active'", (EXPERIMENT, WORKSPACE)).fetchone()
        except sqlite3.Error:
            return None
        if not row:
            return None
        return cls(ws, path, str(row[0]))

    @staticmethod
    @contextlib.contextmanager
    def _connect(path: Path) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(str(path), timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    # -- what Tracker offers doctor (catalog_id and owns come from CatalogOwnership) -------

    def check(self, rec: VersionRecord) -> str | None:
        """Why the mirror of a ready version is broken, or None (same answers as Tracker.check)."""
        if not rec.mlflow_run_id or not rec.mlflow_version:
            return "no MLflow run/model version recorded"
        try:
            version = int(rec.mlflow_version)
        except ValueError:
            return f"MLflow model version {rec.name}/{rec.mlflow_version} is missing"
        with self._connect(self.path) as conn:
            mv = conn.execute("SELECT 1 FROM model_versions WHERE workspace = ? AND name = ? AND version = ? "
                              "AND current_stage <> ?", (WORKSPACE, rec.name, version, DELETED_STAGE)).fetchone()
            if mv is None:
                return f"MLflow model version {rec.name}/{rec.mlflow_version} is missing"
            sha = conn.execute("SELECT value FROM model_version_tags WHERE workspace = ? AND name = ? "
                               "AND version = ? AND key = 'lbm.sha256'", (WORKSPACE, rec.name, version)).fetchone()
            if not sha or sha[0] != rec.sha256:
                return f"MLflow model version {rec.name}/{rec.mlflow_version} has another sha256"
            run = conn.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (rec.mlflow_run_id,)).fetchone()
        if run is None:
            return f"MLflow run {rec.mlflow_run_id} is missing"
        if run[0] != "active":
            return f"MLflow run {rec.mlflow_run_id} is deleted"
        return None

    def model_versions(self, name: str) -> list[Any]:
        """Live model versions of ``name`` with their tags (like ``search_model_versions``)."""
        with self._connect(self.path) as conn:
            rows = conn.execute("SELECT version, run_id FROM model_versions WHERE workspace = ? AND name = ? "
                                "AND current_stage <> ? ORDER BY version", (WORKSPACE, name, DELETED_STAGE)).fetchall()
            out = [_ModelVersion(str(v), run_id) for v, run_id in rows]
            by_version = {mv.version: mv for mv in out}
            for v, key, value in conn.execute("SELECT version, key, value FROM model_version_tags "
                                              "WHERE workspace = ? AND name = ?", (WORKSPACE, name)):
                if str(v) in by_version:
                    by_version[str(v)].tags[key] = value
        return out

    def runs(self) -> list[Any]:
        """Active runs of our experiment, shaped like MLflow's (``.info.run_id``, ``.info.run_name``,
        ``.data.tags``) for doctor."""
        with self._connect(self.path) as conn:
            rows = conn.execute("SELECT run_uuid, name FROM runs WHERE experiment_id = ? AND lifecycle_stage = "
                                "'active'", (int(self.experiment_id),)).fetchall()
            tags: dict[str, dict[str, str]] = {r[0]: {} for r in rows}
            for run_id, key, value in conn.execute(
                    "SELECT t.run_uuid, t.key, t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                    "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'", (int(self.experiment_id),)):
                tags[run_id][key] = value
        return [SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name),
                                data=SimpleNamespace(tags=tags[run_id])) for run_id, name in rows]

    def model_folder_problem(self, rec: VersionRecord) -> str | None:
        """Why the version's model folder is not a loadable MLflow model, or None (same answers
        as Tracker.model_folder_problem for a local artifact store; other stores ask the client)."""
        from lbm_registry.errors import RegistryError
        from lbm_registry.registry.mlmodel import MLMODEL, MODEL_FILES
        from lbm_registry.registry.tracking import _local_dir

        if not rec.mlflow_run_id:
            return "no MLflow run recorded"
        with self._connect(self.path) as conn:
            row = conn.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (rec.mlflow_run_id,)).fetchone()
        if row is None:
            raise RegistryError(f"MLflow artifacts of {rec.ref} failed: Run '{rec.mlflow_run_id}' not found")
        local = _local_dir(row[0] or "")
        if local is None:
            from lbm_registry.registry.tracking import Tracker

            return Tracker(self.ws).model_folder_problem(rec)
        folder = local / "weights"
        have = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        missing = [f for f in MODEL_FILES if f not in have]
        if not missing:
            return None
        if MLMODEL in missing:
            return "its model folder has no MLmodel: not loadable with mlflow.pyfunc (registered before models)"
        return f"its model folder lacks {', '.join(missing)}"

    # -- aliases ---------------------------------------------------------------------------
    def set_alias(self, rec: VersionRecord, alias: str) -> bool:
        """Point the MLflow alias at the version's model version. False when that model version
        does not exist (then nothing is written, as MLflow would refuse it too)."""
        if not rec.mlflow_version:
            return False
        version = int(rec.mlflow_version)
        with self.ws.lock("mlflow-write"), self._connect(self.path) as conn, conn:
            exists = conn.execute("SELECT 1 FROM model_versions WHERE workspace = ? AND name = ? AND version = ? "
                                  "AND current_stage <> ?", (WORKSPACE, rec.name, version, DELETED_STAGE)).fetchone()
            if exists is None:
                return False
            conn.execute("INSERT OR REPLACE INTO registered_model_aliases (workspace, name, alias, version) "
                         "VALUES (?, ?, ?, ?)", (WORKSPACE, rec.name, alias, version))
            self._describe_model(conn, rec.name)
        return True

    def delete_alias(self, name: str, alias: str) -> None:
        with self.ws.lock("mlflow-write"), self._connect(self.path) as conn, conn:
            conn.execute("DELETE FROM registered_model_aliases WHERE workspace = ? AND name = ? AND alias = ?",
                         (WORKSPACE, name, alias))
            self._describe_model(conn, name)

    def _describe_model(self, conn: sqlite3.Connection, name: str) -> None:
        """The registered model's description lists its aliases (as ``Tracker._describe_model``
        does through the client): rewrite it in the same transaction as the alias row."""
        import time

        from lbm_registry.registry.pages import registered_model_description

        conn.execute("UPDATE registered_models SET description = ?, last_updated_time = ? "
                     "WHERE workspace = ? AND name = ?",
                     (registered_model_description(self.ws, name)[:5000], int(time.time() * 1000), WORKSPACE, name))
