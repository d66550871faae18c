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
import math
import posixpath
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlparse

from lbm_registry.registry import catalog
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.db import sqlite_path
from lbm_registry.registry.mirror import CatalogOwnership, VersionPages
from lbm_registry.registry.workspace import Workspace

#: MLflow SQL-store schema revisions whose tables this module reads and writes (MLflow 3.17).
KNOWN_REVISIONS = frozenset({"dc11669786a5"})
EXPERIMENT = "lbm-registry"
DELETED_STAGE = "Deleted_Internal"
WORKSPACE = "default"


@dataclass
class _ModelVersion:
    version: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


class SqliteMirror(CatalogOwnership, VersionPages):
    """A local MLflow SQLite store read and written without importing MLflow: doctor's reads,
    aliases, and registration's mirror (run + model version) and page refreshes."""

    def __init__(self, ws: Workspace, path: Path, experiment_id: str) -> None:
        self.ws = ws
        self.path = path
        self.experiment_id = experiment_id
        self._catalog_id: str | None = None
        self._conn: Any = None

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
            sha = conn.execute("SELECT value FROM model_version_tags WHERE workspace = ? AND name = ? AND version = ? "
                               "AND key IN ('x-lbm.sha256', 'lbm.sha256') ORDER BY key DESC",
                               (WORKSPACE, rec.name, version)).fetchone()
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
        from lbm_registry.registry.mlmodel import folder_problem
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
        return folder_problem(have)

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

    def _describe_model(self, conn: sqlite3.Connection, name: str, extra_ready: int | None = None,
                        now: int | None = None) -> None:
        """The registered model's description (kind, versions, aliases), as
        ``Tracker._describe_model`` writes it through the client (``update_registered_model``),
        in the caller's transaction."""
        from lbm_registry.registry.pages import registered_model_description

        conn.execute("UPDATE registered_models SET description = ?, last_updated_time = ? "
                     "WHERE workspace = ? AND name = ?",
                     (registered_model_description(self.ws, name, extra_ready=extra_ready),
                      _now_ms() if now is None else now, WORKSPACE, name))

    # -- registration (what Tracker.mirror writes through the client) ------------------------
    def write_lock(self) -> Any:
        return self.ws.lock("mlflow-write")

    def _artifact_root(self, conn: sqlite3.Connection) -> str | None:
        """Our experiment's artifact location when it is a plain local folder (``file:///...``)."""
        row = conn.execute("SELECT artifact_location FROM experiments WHERE experiment_id = ?",
                           (int(self.experiment_id),)).fetchone()
        return _plain_file_uri((row[0] if row else None) or "")

    def mirror(self, rec: VersionRecord, *, weights: Path, edges: list[dict[str, Any]],
               lora: dict[str, Any] | None, layers: list[dict[str, Any]], user_tags: Mapping[str, str],
               extra_artifacts: Mapping[str, Path] | None = None, started: float | None = None,
               on_run: Callable[[str], None] | None = None, work_started: float | None = None) -> tuple[str, str]:
        """:meth:`Tracker.mirror <lbm_registry.registry.tracking.Tracker.mirror>` in one SQLite
        transaction: the same rows MLflow's SQL stores write for ``create_run``, ``log_batch``,
        ``create_registered_model``, ``create_model_version``, ``create_logged_model``,
        ``finalize_logged_model``, ``log_outputs``, ``set_tag``, ``set_terminated`` and
        ``update_registered_model`` (mlflow/store/{tracking,model_registry}/sqlalchemy_store.py),
        and the same artifact files. Content MLflow would change or refuse (odd keys, over-long
        values, an artifact location that is not a local folder) goes through the Tracker
        instead. If anything fails, neither rows nor artifacts of the run remain."""
        from lbm_registry.registry import mirror as m
        from lbm_registry.registry.tracking import Tracker, mlflow_errors

        c = m.mirror_content(self.ws, rec, weights=weights, edges=edges, lora=lora, layers=layers,
                             user_tags=user_tags, extra_artifacts=extra_artifacts, catalog_id=self.catalog_id)
        run_id = uuid.uuid4().hex
        with self._connect(self.path) as conn:
            root = self._artifact_root(conn)
            c.finish(self._page(conn, rec, edges, lora, run_id, user_tags, probe=c.probe), started)
            train_ok = self._train_link(conn, c.train_run) is not False
        if root is None or not train_ok or not _fits(rec.name, c):
            return Tracker(self.ws).mirror(rec, weights=weights, edges=edges, lora=lora, layers=layers,
                                           user_tags=user_tags, extra_artifacts=extra_artifacts, started=started,
                                           on_run=on_run, work_started=work_started)
        if on_run is not None:
            on_run(run_id)
        artifact_uri = f"{root}/{run_id}/artifacts"
        local = Path(unquote(urlparse(artifact_uri).path))
        with self.write_lock(), mlflow_errors(f"mirror of {rec.ref}", self.path), self._connect(self.path) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                version = self._write_version(conn, rec, c, run_id, artifact_uri,
                                              m.run_times(started, work_started))
                m.write_local(local, {**c.texts, **m.model_texts(self.ws, rec, run_id)}, c.files)
                conn.commit()
            except BaseException:
                conn.rollback()
                shutil.rmtree(local.parent, ignore_errors=True)
                raise
        return run_id, str(version)

    def _write_version(self, conn: sqlite3.Connection, rec: VersionRecord, c: Any, run_id: str,
                       artifact_uri: str, start: int) -> int:
        from lbm_registry.registry.pages import registered_model_description

        # create_run: the run (RUNNING, user "unknown": no mlflow.user tag) and its name tag
        conn.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                     "start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id, "
                     "deleted_time) VALUES (?, ?, 'UNKNOWN', '', '', 'unknown', 'RUNNING', ?, NULL, '', 'active', "
                     "?, ?, NULL)", (run_id, rec.ref, start, artifact_uri, int(self.experiment_id)))
        tags = {**c.run_tags, "mlflow.runName": rec.ref}
        conn.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                         [(k, v, run_id) for k, v in tags.items()])
        # log_batch: params, metrics (step 0, one timestamp) and their latest values
        conn.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                         [(k, v, run_id) for k, v in c.params.items()])
        ts = _now_ms()
        rows = [(k, *_metric_value(v), ts, run_id) for k, v in c.metrics.items()]
        conn.executemany("INSERT INTO metrics (key, is_nan, value, timestamp, run_uuid, step) "
                         "VALUES (?, ?, ?, ?, ?, 0)", rows)
        conn.executemany("INSERT INTO latest_metrics (key, is_nan, value, timestamp, run_uuid, step) "
                         "VALUES (?, ?, ?, ?, ?, 0)", rows)
        # create_registered_model (once per name) with its kind tag
        now = _now_ms()
        if conn.execute("SELECT 1 FROM registered_models WHERE workspace = ? AND name = ?",
                        (WORKSPACE, rec.name)).fetchone() is None:
            conn.execute("INSERT INTO registered_models (name, creation_time, last_updated_time, description, "
                         "workspace) VALUES (?, ?, ?, ?, ?)",
                         (rec.name, now, now, registered_model_description(self.ws, rec.name, extra_ready=rec.number),
                          WORKSPACE))
            conn.execute("INSERT INTO registered_model_tags (key, value, name, workspace) VALUES (?, ?, ?, ?)",
                         ("lbm.kind", rec.kind, rec.name, WORKSPACE))
        # create_model_version: the next number (deleted versions keep theirs), READY, stage "None"
        now = _now_ms()
        (top,) = conn.execute("SELECT MAX(version) FROM model_versions WHERE workspace = ? AND name = ?",
                              (WORKSPACE, rec.name)).fetchone()
        version = (top or 0) + 1
        conn.execute("UPDATE registered_models SET last_updated_time = ? WHERE workspace = ? AND name = ?",
                     (now, WORKSPACE, rec.name))
        source = f"{artifact_uri}/weights"
        conn.execute("INSERT INTO model_versions (name, version, creation_time, last_updated_time, description, "
                     "user_id, current_stage, source, run_id, status, status_message, run_link, storage_location, "
                     "workspace) VALUES (?, ?, ?, ?, ?, NULL, 'None', ?, ?, 'READY', NULL, NULL, ?, ?)",
                     (rec.name, version, now, now, c.description, source, run_id, source, WORKSPACE))
        conn.executemany("INSERT INTO model_version_tags (key, value, name, version, workspace) VALUES (?, ?, ?, ?, ?)",
                         [(k, v, rec.name, version, WORKSPACE) for k, v in c.version_tags.items()])
        self._link_runs(conn, rec, run_id, version, c.train_run)
        # set_terminated, then the registered model's description
        conn.execute("UPDATE runs SET status = 'FINISHED', end_time = ? WHERE run_uuid = ?", (_now_ms(), run_id))
        self._describe_model(conn, rec.name, extra_ready=rec.number)
        return version

    def discard(self, name: str, run_id: str | None, mlflow_version: str | None) -> list[str]:
        """Undo a registration's mirror. A run that never reached the store (the transaction
        did not commit) leaves at most its artifact folder, removed here; anything committed is
        removed through the Tracker, exactly as before."""
        with self._connect(self.path) as conn:
            known = bool(run_id and conn.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone())
            if not known and name and mlflow_version and str(mlflow_version).isdigit():
                known = bool(conn.execute("SELECT 1 FROM model_versions WHERE workspace = ? AND name = ? AND "
                                          "version = ?", (WORKSPACE, name, int(mlflow_version))).fetchone())
            root = self._artifact_root(conn)
        if known:
            from lbm_registry.registry.tracking import Tracker

            return Tracker(self.ws).discard(name, run_id, mlflow_version)
        if run_id and root is not None and re.fullmatch(r"[0-9a-f]{32}", run_id):
            shutil.rmtree(Path(unquote(urlparse(root).path)) / run_id, ignore_errors=True)
        return []

    def unrecorded_run_folders(self) -> list[Path]:
        """Run folders under our artifact root that no run of the store owns (any lifecycle
        stage): what a fast-path mirror killed between writing its files and committing leaves
        when no catalog row remembers its run id. Taken under the mirror's write lock, so a
        registration in the middle of its transaction is never listed (no lock, and none needed,
        in a read-only home: nothing registers there)."""
        lock = contextlib.nullcontext() if self.ws.read_only else self.write_lock()
        with lock, self._connect(self.path) as conn:
            root = self._artifact_root(conn)
            if root is None:
                return []
            folder = Path(unquote(urlparse(root).path))
            if not folder.is_dir():
                return []
            candidates = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{32}", p.name)]
            known = {r for (r,) in conn.execute("SELECT run_uuid FROM runs")}
        return sorted(p for p in candidates if p.name not in known)

    def artifact_folder(self, run_id: str) -> Path | None:
        """The local folder of a live run's artifacts (None: no such run, or not a local store)."""
        from lbm_registry.registry.tracking import _local_dir

        with self._connect(self.path) as conn:
            row = conn.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ? AND lifecycle_stage = 'active'",
                               (run_id,)).fetchone()
        return _local_dir(row[0] or "") if row is not None else None

    # -- runs <-> versions (Tracker._link_runs) ------------------------------------------------
    def _train_link(self, conn: sqlite3.Connection, train_run: str | None) -> tuple[str, str] | None | bool:
        """(experiment id, artifact root) of the training run to link, None when there is none to
        link (no such run, or not active), False when its experiment's artifact location is not a
        plain local folder (the client must write it)."""
        if not train_run:
            return None
        row = conn.execute("SELECT r.experiment_id, r.lifecycle_stage, e.artifact_location FROM runs r JOIN "
                           "experiments e ON e.experiment_id = r.experiment_id WHERE r.run_uuid = ?",
                           (train_run,)).fetchone()
        if row is None or row[1] != "active":
            return None
        root = _plain_file_uri(row[2] or "")
        return (str(row[0]), root) if root is not None else False

    def _link_runs(self, conn: sqlite3.Connection, rec: VersionRecord, run_id: str, version: int | str,
                   train_run: str | None) -> None:
        """What ``Tracker._link_runs`` writes, in the caller's transaction."""
        from lbm_registry.registry import pages
        from lbm_registry.registry.mirror import training_run_name

        root = self._artifact_root(conn)
        assert root is not None
        self._ensure_logged_model(conn, self.experiment_id, root, run_id, rec, version, run_id)
        train = self._train_link(conn, train_run)
        if not train or not train_run:
            return
        exp_id, train_root = train
        self._ensure_logged_model(conn, exp_id, train_root, train_run, rec, version, run_id)
        note = pages.training_run_note(rec, pages.model_link(rec.name, version), pages.run_link(self.experiment_id,
                                                                                                   run_id))
        conn.execute("UPDATE runs SET name = ? WHERE run_uuid = ?", (training_run_name(rec), train_run))
        conn.executemany("INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                         [("mlflow.runName", training_run_name(rec), train_run),
                          ("mlflow.note.content", note, train_run), ("lbm.registered_as", rec.ref, train_run)])

    @staticmethod
    def _ensure_logged_model(conn: sqlite3.Connection, experiment_id: str, root: str, source_run: str,
                             rec: VersionRecord, version: int | str, run_id: str) -> None:
        """``create_logged_model`` (PENDING), ``finalize_logged_model`` (READY) and ``log_outputs``
        of ``Tracker._ensure_logged_model``, unless the run has that logged model already."""
        from lbm_registry.registry import pages
        from lbm_registry.registry.mirror import logged_model_tags, logged_model_type

        found = conn.execute("SELECT 1 FROM logged_models m JOIN logged_model_tags t ON t.model_id = m.model_id "
                             "AND t.tag_key = 'lbm.run_id' WHERE m.experiment_id = ? AND m.source_run_id = ? AND "
                             "m.lifecycle_stage = 'active' AND t.tag_value = ?",
                             (int(experiment_id), source_run, run_id)).fetchone()
        if found:
            return
        model_id = f"m-{uuid.uuid4().hex}"
        now = _now_ms()
        conn.execute("INSERT INTO logged_models (model_id, experiment_id, name, artifact_location, "
                     "creation_timestamp_ms, last_updated_timestamp_ms, status, lifecycle_stage, model_type, "
                     "source_run_id, status_message) VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, NULL)",
                     (model_id, int(experiment_id), pages.logged_model_name(rec), f"{root}/models/{model_id}/artifacts",
                      now, now, LOGGED_MODEL_PENDING, logged_model_type(rec), source_run))
        conn.executemany("INSERT INTO logged_model_tags (model_id, experiment_id, tag_key, tag_value) "
                         "VALUES (?, ?, ?, ?)", [(model_id, int(experiment_id), k, v)
                                                 for k, v in logged_model_tags(rec, version, run_id).items()])
        conn.execute("UPDATE logged_models SET status = ?, last_updated_timestamp_ms = ? WHERE model_id = ?",
                     (LOGGED_MODEL_READY, _now_ms(), model_id))
        conn.execute("INSERT INTO inputs (input_uuid, source_type, source_id, destination_type, destination_id, step) "
                     "VALUES (?, 'RUN_OUTPUT', ?, 'MODEL_OUTPUT', ?, 0)", (uuid.uuid4().hex, source_run, model_id))

    # -- the version page (Tracker.refresh_version) ----------------------------------------------
    def _page(self, conn: sqlite3.Connection, rec: VersionRecord, edges: list[dict[str, Any]],
              lora: dict[str, Any] | None, run_id: str | None, user_tags: Mapping[str, str], *,
              probe: str | None) -> str:
        self._conn = conn
        try:
            return self.version_description(rec, edges, lora, run_id, user_tags, probe=probe)
        finally:
            self._conn = None

    def _experiment_of(self, run_id: str) -> str | None:
        row = self._conn.execute("SELECT experiment_id FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        return None if row is None else str(row[0])

    def _compare_runs(self, rec: VersionRecord) -> list[tuple[str, str, str]]:
        """(label, experiment id, run id) of the live compare runs naming this version, newest
        first (``search_runs`` with a LIKE on the ``lbm.compared`` tag, at most 10)."""
        from lbm_registry.registry.pages import COMPARE_EXPERIMENT

        exp = self._conn.execute("SELECT experiment_id FROM experiments WHERE workspace = ? AND name = ?",
                                 (WORKSPACE, COMPARE_EXPERIMENT)).fetchone()
        if exp is None:
            return []
        rows = self._conn.execute(
            "SELECT r.run_uuid, (SELECT value FROM tags n WHERE n.run_uuid = r.run_uuid AND n.key = 'mlflow.runName') "
            "FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'lbm.compared' "
            "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.value LIKE ? "
            "ORDER BY r.start_time DESC, r.run_uuid LIMIT 10", (exp[0], f"%{rec.sha256[:16]}%")).fetchall()
        return [(name or rid[:12], str(exp[0]), rid) for rid, name in rows]

    def _page_state(self, conn: sqlite3.Connection, rec: VersionRecord) -> tuple[str, dict[str, str]] | None:
        """(description, model version tags) the version's page should have, or None when this
        store cannot tell (its run or model version is gone, or its artifacts are not local)."""
        from lbm_registry.registry import pages
        from lbm_registry.registry.mirror import probe_caption, shown_user_tags
        from lbm_registry.registry.tracking import _local_dir, mirror_inputs

        if not rec.mlflow_run_id or not rec.mlflow_version:
            return None
        run = conn.execute("SELECT artifact_uri, lifecycle_stage FROM runs WHERE run_uuid = ?",
                           (rec.mlflow_run_id,)).fetchone()
        mv = conn.execute("SELECT 1 FROM model_versions WHERE workspace = ? AND name = ? AND version = ? AND "
                          "current_stage <> ?", (WORKSPACE, rec.name, int(rec.mlflow_version), DELETED_STAGE)).fetchone()
        local = _local_dir(run[0] or "") if run is not None else None
        if local is None or mv is None or run[1] != "active":
            return None
        edges, lora, _, user_tags = mirror_inputs(self.ws, rec)
        picture = local / pages.PROBE_IMAGE
        description = self._page(conn, rec, edges, lora, rec.mlflow_run_id, user_tags,
                                 probe=probe_caption(picture if picture.is_file() else None))
        tags = pages.version_tags(rec, edges, lora, shown_user_tags(user_tags), self.catalog_id)
        return description, tags

    def page_problem(self, rec: VersionRecord) -> str | None:
        """Why the version's page differs from what the catalog says (as ``Tracker.page_problem``)."""
        from lbm_registry.registry.mirror import page_difference

        if not rec.mlflow_run_id or not rec.mlflow_version:
            return None
        with self._connect(self.path) as conn:
            want = self._page_state(conn, rec)
            if want is None:
                from lbm_registry.registry.tracking import Tracker

                return Tracker(self.ws).page_problem(rec)
            row = conn.execute("SELECT description FROM model_versions WHERE workspace = ? AND name = ? AND "
                               "version = ?", (WORKSPACE, rec.name, int(rec.mlflow_version))).fetchone()
            tags = dict(conn.execute("SELECT key, value FROM model_version_tags WHERE workspace = ? AND name = ? AND "
                                     "version = ?", (WORKSPACE, rec.name, int(rec.mlflow_version))).fetchall())
            linked = conn.execute("SELECT 1 FROM logged_models m JOIN logged_model_tags t ON t.model_id = m.model_id "
                                  "AND t.tag_key = 'lbm.run_id' WHERE m.source_run_id = ? AND m.lifecycle_stage = "
                                  "'active' AND t.tag_value = ?", (rec.mlflow_run_id, rec.mlflow_run_id)).fetchone()
        return page_difference((row[0] if row else "") or "", tags, want[0], want[1], bool(linked))

    def refresh_version(self, rec: VersionRecord) -> None:
        """Rebuild a mirrored version's page (description, model version tags with stale ones of
        ours dropped, the run's note) from the catalog and the run's artifact folder, and make
        sure its runs link it, as ``Tracker.refresh_version`` does."""
        from lbm_registry.registry import pages
        from lbm_registry.registry.mirror import TRAIN_RUN_TAG
        from lbm_registry.registry.tracking import Tracker

        if not rec.mlflow_run_id or not rec.mlflow_version:
            return
        version = int(rec.mlflow_version)
        fallback = True
        with self.write_lock(), self._connect(self.path) as conn:
            want = self._page_state(conn, rec)
            train = catalog.tags(self.ws.db, rec.id).get(TRAIN_RUN_TAG)
            if want is not None and self._train_link(conn, train) is not False and self._artifact_root(conn):
                description, tags = want
                if _fits(rec.name, None, [("mlflow.note.content", description, 8000)]
                         + [(k, v, 100_000) for k, v in tags.items()]):
                    fallback = False
                    current = dict(conn.execute("SELECT key, value FROM model_version_tags WHERE workspace = ? AND "
                                                "name = ? AND version = ?", (WORKSPACE, rec.name, version)).fetchall())
                    with conn:
                        conn.execute("UPDATE model_versions SET description = ?, last_updated_time = ? WHERE "
                                     "workspace = ? AND name = ? AND version = ?",
                                     (description, _now_ms(), WORKSPACE, rec.name, version))
                        changed = [(k, v) for k, v in tags.items() if current.get(k) != v]
                        for k, v in changed:  # set_model_version_tag: each one touches the version
                            conn.execute("INSERT OR REPLACE INTO model_version_tags (key, value, name, version, "
                                         "workspace) VALUES (?, ?, ?, ?, ?)", (k, v, rec.name, version, WORKSPACE))
                        stale = [k for k in sorted(set(current) - set(tags)) if pages.managed_tag(k)]
                        conn.executemany("DELETE FROM model_version_tags WHERE workspace = ? AND name = ? AND "
                                         "version = ? AND key = ?", [(WORKSPACE, rec.name, version, k) for k in stale])
                        if changed or stale:
                            conn.execute("UPDATE model_versions SET last_updated_time = ? WHERE workspace = ? AND "
                                         "name = ? AND version = ?", (_now_ms(), WORKSPACE, rec.name, version))
                        conn.execute("INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                                     ("mlflow.note.content", description, rec.mlflow_run_id))
                        self._link_runs(conn, rec, rec.mlflow_run_id, rec.mlflow_version, train)
        if fallback:
            Tracker(self.ws).refresh_version(rec)


LOGGED_MODEL_PENDING, LOGGED_MODEL_READY = 1, 2  # LoggedModelStatus.to_int()


def _plain_file_uri(loc: str) -> str | None:
    """``loc`` without a trailing slash when it is a plain local ``file:///`` URI, else None."""
    parsed = urlparse(loc)
    if parsed.scheme != "file" or parsed.netloc or parsed.query or parsed.params or parsed.fragment:
        return None
    return loc.rstrip("/")


_KEY_RE = re.compile(r"^[/\w.\- :]*$")


def _key_ok(key: str) -> bool:
    """MLflow's rule for param, metric and tag keys (mlflow/utils/validation.py, POSIX)."""
    norm = posixpath.normpath(key)
    return (bool(_KEY_RE.match(key)) and len(key) <= 250 and norm == key and norm != "."
            and not norm.startswith("..") and not norm.startswith("/"))


def _fits(name: str, c: Any, extra: list[tuple[str, str, int]] = ()) -> bool:
    """Would MLflow store this content unchanged? (Else the Tracker writes it, and MLflow
    truncates or refuses it as it always did.)"""
    if not name.strip() or "/" in name or ":" in name or posixpath.normpath(name) != name:
        return False
    items: list[tuple[str, str, int]] = list(extra)
    if c is not None:
        items += [(k, v, 6000) for k, v in c.params.items()]
        items += [(k, "", 0) for k in c.metrics]
        items += [(k, v, 8000) for k, v in c.run_tags.items()]
        items += [(k, v, 100_000) for k, v in c.version_tags.items()]
        if "mlflow.runName" in c.run_tags:
            return False  # log_batch would rename the run
    for key, value, limit in items:
        if not _key_ok(key) or key.startswith("mlflow.prompt") or len(value) > limit:
            return False
    return True


def _metric_value(v: float) -> tuple[int, float]:
    """(is_nan, stored value) as MLflow's SQL store keeps them: NaN as 0, +-Inf as +-max double."""
    if math.isnan(v):
        return 1, 0.0
    if math.isinf(v):
        return 0, 1.7976931348623157e308 if v > 0 else -1.7976931348623157e308
    return 0, float(v)


def _now_ms() -> int:
    return int(time.time() * 1000)
