"""The MLflow mirror: every catalog version is a registered-model version whose run tells the story.

The run holds params (rank, policy, hashes...), metrics (errors, size, time), tags (sha256 and
lineage: base, tuned, parent) and artifacts (the weights as a hard link to the blob, the
per-layer error table as CSV/JSON, the layer list, config/facts/lineage JSON, extras). So the
MLflow UI alone shows what each version is and where it came from.

Everything here imports MLflow (~1.3-2 s) and is only reached from registration, doctor,
alias changes and ``ui``; never from ``list``/``show``/``resolve``. A workspace's own SQLite
store at a known schema is written without it (registry/mlflow_sqlite.py: the same rows, checked
against this class by tests/test_mlflow_sqlite.py); this class serves everything else.

MLflow facts this relies on (3.x): the file store needs an opt-in, so a workspace uses
``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/artifacts``; creating a new
MLflow DB from several processes at once crashes, so it is created under a file lock (and
writes to the SQLite backend are serialised by another lock, which costs ~0.2 s per
registration and removes "database is locked" failures); ``create_model_version(source=...,
run_id=...)`` needs no MLmodel file.

A remote tracking server (``--tracking-uri http://host:5000``) needs neither lock. Its runs'
artifact URIs are not local folders (``mlflow-artifacts:/...`` when the server proxies
artifacts), so weights and tables are uploaded through the client instead of hard-linked, and
``doctor`` downloads the weights artifact when it restores a blob from MLflow. A server that does
not answer fails in seconds (the client alone would retry for about four minutes), and MLflow's
"View run at" lines stay off stdout, where ``--json`` output goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lbm_registry.errors import LBMError, RegistryError, StorageError
from lbm_registry.fileio import storage_error
from lbm_registry.registry import catalog, mirror, pages
from lbm_registry.registry.blobs import link_or_copy
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.db import damaged_mlflow_error, damaged_mlflow_store, mask_url, sqlite_path
from lbm_registry.registry.workspace import Workspace

EXPERIMENT = "lbm-registry"
TAG_PREFIX = mirror.TAG_PREFIX
LAYER_FIELDS = mirror.LAYER_FIELDS
CONNECT_TIMEOUT_S = 5.0


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def _local_dir(uri: str) -> Path | None:
    """The folder behind a ``file:`` (or bare path) artifact URI; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def mlflow_environment() -> None:
    """Process-wide MLflow defaults (a user's own setting wins): no telemetry, and no
    "View run at" lines printed to stdout after each run against a server."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when an ``http(s)://`` tracking server does not accept connections.

    The MLflow client retries a refused connection with exponential backoff for ~4 minutes
    before it gives up; one TCP connect tells the same in milliseconds. Skipped behind an HTTP
    proxy (only the proxy can tell) and for other URI schemes."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    proxies = urllib.request.getproxies()
    if proxies.get(parsed.scheme) and not urllib.request.proxy_bypass(parsed.hostname):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RegistryError(f"cannot reach the MLflow tracking server {mask_url(uri)}: {reason}") from None


@contextlib.contextmanager
def mlflow_errors(what: str, store: Path | None = None) -> Iterator[None]:
    """MLflow raises its own exception zoo; users see one line. A write the machine refused (a
    full disk, a read-only folder) is a StorageError (exit 1) naming the file: the one the OS
    named, else ``store`` (the SQLite store being written), not a bad-input error."""
    try:
        yield
    except LBMError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and (refused := storage_error(exc, store or what)) is not None:
            raise refused from None
        text = _one_line(exc)
        if any(w in text.lower() for w in ("disk is full", "readonly database", "read-only file system")):
            raise StorageError(f"MLflow {what} failed: cannot write {store or 'the MLflow store'}: {text}") from None
        raise RegistryError(f"MLflow {what} failed: {text}") from exc


def tidy_experiments(client: Any, home: Path | None, uri: str, *, lock: Callable[[], Any],
                     names: tuple[str, ...] = ()) -> None:
    """Nothing outside the workspace, and every experiment says what it holds.

    A new SQLite MLflow DB gets a ``Default`` experiment whose artifact location is
    ``<current folder>/mlruns/0``, wherever the command ran: for a workspace's own DB (``home``)
    it is moved to ``<home>/artifacts/0`` (MLflow has no API for that: one UPDATE, under the write
    lock). ``names`` (and Default) get a description (``mlflow.note.content``) when they have none.
    Best effort: a failure here never fails the command."""
    with contextlib.suppress(Exception):
        want = (home / "artifacts" / "0").as_uri() if home is not None else None
        default = client.get_experiment("0")
        path = sqlite_path(uri) if uri.startswith("sqlite:") else None
        if want and path is not None and default is not None and default.artifact_location != want:
            loc = _local_dir(default.artifact_location)
            if loc is None or not loc.resolve().is_relative_to(home.resolve()):
                with lock(), contextlib.closing(sqlite3.connect(str(path), timeout=30)) as conn:
                    conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (want,))
                    conn.commit()
        for exp in [default, *(client.get_experiment_by_name(n) for n in names)]:
            if exp is None or exp.tags.get("mlflow.note.content"):
                continue
            note = pages.EXPERIMENT_NOTES.get(exp.name)
            if note:
                client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", note)


class Tracker(mirror.CatalogOwnership, mirror.VersionPages):
    """An MLflow client bound to one workspace and the ``lbm-registry`` experiment."""

    def __init__(self, ws: Workspace) -> None:
        mlflow_environment()
        self.ws = ws
        self._catalog_id: str | None = None
        self.uri = ws.settings.effective_tracking_uri
        self.is_sqlite = self.uri.startswith("sqlite:")
        check_reachable(self.uri)
        if self.is_sqlite and (damaged := damaged_mlflow_store(self.uri)) is not None:
            raise damaged_mlflow_error(*damaged)  # one line naming the file, not SQLAlchemy's traceback
        with mlflow_errors(f"connection to {mask_url(self.uri)}"):
            from mlflow import MlflowClient

            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            ws.home.mkdir(parents=True, exist_ok=True)
            # Creating (migrating) a new MLflow DB concurrently crashes: do it under a lock. Once
            # our experiment exists the DB is complete, and opening it needs no lock.
            with contextlib.nullcontext() if self._ready() else self._init_lock():
                self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                self.experiment_id = self._experiment()
            tidy_experiments(self.client, ws.home if self.is_sqlite else None, self.uri,
                             lock=self.write_lock, names=(EXPERIMENT,))

    def _experiment(self) -> str:
        """Our experiment's id, created on first use. Against a server several processes may
        create it at once (no lock spans machines): the losers read the winner's."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = self.ws.artifacts_dir.as_uri() if self.is_sqlite else None  # a server: its default root
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def _ready(self) -> bool:
        """A SQLite MLflow DB that already holds our experiment (created last, under the lock).
        Remote servers need no lock at all."""
        if not self.is_sqlite:
            return True
        path = sqlite_path(self.uri)
        if path is None or not path.is_file():
            return False
        try:
            with contextlib.closing(sqlite3.connect(str(path), timeout=30)) as conn:
                row = conn.execute("SELECT count(*) FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
                return bool(row and row[0])
        except sqlite3.Error:
            return False

    def _init_lock(self) -> Any:
        return self.ws.lock("mlflow") if self.is_sqlite else contextlib.nullcontext()

    def write_lock(self) -> Any:
        """Serialise writes to a SQLite MLflow backend across processes (a server needs none)."""
        return self.ws.lock("mlflow-write") if self.is_sqlite else contextlib.nullcontext()

    # -- describing a version (shared with SqliteMirror: registry/mirror.py) ----------------
    describe = staticmethod(mirror.describe)
    layer_files = staticmethod(mirror.layer_files)

    # -- writing ---------------------------------------------------------------------------
    def mirror(self, rec: VersionRecord, *, weights: Path, edges: list[dict[str, Any]],
               lora: dict[str, Any] | None, layers: list[dict[str, Any]], user_tags: Mapping[str, str],
               extra_artifacts: Mapping[str, Path] | None = None, started: float | None = None,
               on_run: Callable[[str], None] | None = None, work_started: float | None = None) -> tuple[str, str]:
        """Create the run (params, metrics, tags, artifacts, start/end = the work's), the model
        version, and the links from the runs that made it (:meth:`_link_runs`).

        ``on_run(run_id)`` is called as soon as the run exists, so the catalog can record it
        before anything else can fail. Returns (run id, model version)."""
        from mlflow.entities import Metric, Param, RunTag

        c = mirror.mirror_content(self.ws, rec, weights=weights, edges=edges, lora=lora, layers=layers,
                                  user_tags=user_tags, extra_artifacts=extra_artifacts, catalog_id=self.catalog_id)
        with self.write_lock(), mlflow_errors(f"mirror of {rec.ref}", sqlite_path(self.uri) if self.is_sqlite else None):
            run = self.client.create_run(self.experiment_id, start_time=mirror.run_times(started, work_started),
                                         run_name=rec.ref, tags=c.create_tags)
            run_id = run.info.run_id
            if on_run is not None:
                on_run(run_id)
            c.finish(self.version_description(rec, edges, lora, run_id, user_tags, probe=c.probe), started)
            ts = int(time.time() * 1000)
            self._log_batch(run_id, [Metric(k, v, ts, 0) for k, v in c.metrics.items()],
                            [Param(k, v) for k, v in c.params.items()], [RunTag(k, v) for k, v in c.run_tags.items()])
            self.write_artifacts(run_id, run.info.artifact_uri, {**c.texts, **self.model_texts(rec, run_id)}, c.files)
            self._ensure_registered_model(rec)
            mv = self.client.create_model_version(
                rec.name, source=f"{run.info.artifact_uri}/weights", run_id=run_id, tags=c.version_tags,
                description=c.description, await_creation_for=0)
            self._link_runs(rec, run_id, str(mv.version), c.train_run)
            self.client.set_terminated(run_id, "FINISHED")
            self._describe_model(rec.name, extra_ready=rec.number)
        return run_id, str(mv.version)

    # -- runs <-> versions, the MLflow 3 way ------------------------------------------------
    def _link_runs(self, rec: VersionRecord, run_id: str, version: str, train_run: str | None) -> None:
        """The version's own run, and its training run when it has one, each get a logged model
        standing for the registered version (tag ``mlflow.modelVersions``, the run's output): the
        UI then shows the version in the run's **Models** column and on the run page. The
        training run is also named after the version and described with links to it."""
        self._ensure_logged_model(self.experiment_id, run_id, rec, version, run_id)
        exp = self._experiment_of(train_run) if train_run else None
        if train_run and exp is not None and self._active(train_run):
            self._ensure_logged_model(exp, train_run, rec, version, run_id)
            note = pages.training_run_note(rec, pages.model_link(rec.name, version),
                                           pages.run_link(self.experiment_id, run_id))
            self.client.set_tag(train_run, "mlflow.runName", mirror.training_run_name(rec))
            self._log_batch(train_run, [], [], [_tag("mlflow.note.content", note), _tag("lbm.registered_as", rec.ref)])

    def _active(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def _logged_models(self, experiment_id: str, source_run: str) -> list[Any]:
        return list(self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{source_run}'",
                                                     max_results=100))

    def _ensure_logged_model(self, experiment_id: str, source_run: str, rec: VersionRecord, version: str,
                             run_id: str) -> None:
        """A READY logged model of ``source_run`` for the version whose own run is ``run_id``
        (created once: a rebuild finds it by its ``lbm.run_id`` tag)."""
        from mlflow.entities import LoggedModelOutput

        if any(m.tags.get("lbm.run_id") == run_id for m in self._logged_models(experiment_id, source_run)):
            return
        model = self.client.create_logged_model(experiment_id, name=pages.logged_model_name(rec),
                                                source_run_id=source_run, model_type=mirror.logged_model_type(rec),
                                                tags=mirror.logged_model_tags(rec, version, run_id))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(source_run, [LoggedModelOutput(model.model_id, 0)])

    def _discard_logged_models(self, run_id: str) -> list[str]:
        """Delete the logged models standing for the version of run ``run_id`` (its own run's and
        its training run's)."""
        done = []
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return done
        sources = [(run.info.experiment_id, run_id)]
        train = run.data.tags.get(mirror.TRAIN_RUN_TAG)
        exp = self._experiment_of(train) if train else None
        if train and exp is not None:
            sources.append((exp, train))
        for exp_id, source in sources:
            for m in self._logged_models(exp_id, source):
                if m.tags.get("lbm.run_id") == run_id:
                    self.client.delete_logged_model(m.model_id)
                    done.append(f"deleted MLflow logged model {m.name} ({m.model_id})")
        return done

    def _experiment_of(self, run_id: str) -> str | None:
        try:
            return self.client.get_run(run_id).info.experiment_id
        except Exception:
            return None

    def _compare_runs(self, rec: VersionRecord) -> list[tuple[str, str, str]]:
        """(label, experiment id, run id) of the compare runs that name this version (newest first)."""
        try:
            exp = self.client.get_experiment_by_name(pages.COMPARE_EXPERIMENT)
            if exp is None:
                return []
            found = self.client.search_runs([exp.experiment_id], f"tags.`lbm.compared` LIKE '%{rec.sha256[:16]}%'",
                                            max_results=10, order_by=["attributes.start_time DESC"])
        except Exception:
            return []
        return [(r.data.tags.get("mlflow.runName") or r.info.run_id[:12], exp.experiment_id, r.info.run_id)
                for r in found]

    def page(self, rec: VersionRecord) -> tuple[str, dict[str, str]]:
        """(description, model version tags) the version's page should have, from the catalog and
        the run's artifacts (the probe picture names its tiles)."""
        edges, lora, _, user_tags = mirror_inputs(self.ws, rec)
        with mlflow_errors(f"page of {rec.ref}"):
            names = {Path(a.path).name for a in self.client.list_artifacts(rec.mlflow_run_id)}
            probe = self._probe_caption(rec.mlflow_run_id) if pages.PROBE_IMAGE in names else None
            description = self.version_description(rec, edges, lora, rec.mlflow_run_id, user_tags, probe=probe)
        return description, pages.version_tags(rec, edges, lora, mirror.shown_user_tags(user_tags), self.catalog_id)

    def _probe_caption(self, run_id: str) -> str:
        """The tile names of the run's probe picture: read in place from a local store, else from
        a downloaded copy (a few kB)."""
        import tempfile

        local = _local_dir(self.client.get_run(run_id).info.artifact_uri)
        if local is not None:
            return mirror.probe_caption(local / pages.PROBE_IMAGE) or ""
        with tempfile.TemporaryDirectory(prefix="lbm-page-") as tmp:
            return mirror.probe_caption(self.client.download_artifacts(run_id, pages.PROBE_IMAGE, tmp)) or ""

    def page_problem(self, rec: VersionRecord) -> str | None:
        """Why the version's page differs from what the catalog says it should be, or None."""
        if not rec.mlflow_run_id or not rec.mlflow_version:
            return None
        description, tags = self.page(rec)
        with mlflow_errors(f"page of {rec.ref}"):
            mv = self.client.get_model_version(rec.name, rec.mlflow_version)
            models = self._logged_models(self.experiment_id, rec.mlflow_run_id)
        return mirror.page_difference(mv.description or "", dict(mv.tags or {}), description, tags,
                                      any(m.tags.get("lbm.run_id") == rec.mlflow_run_id for m in models))

    def refresh_version(self, rec: VersionRecord) -> None:
        """Rebuild a mirrored version's page (description, tags: stale ones of ours dropped) and its
        model's description from the catalog, e.g. after ``validate`` recorded new errors, a compare
        run judged it or a version made from it was registered; and make sure its runs link it."""
        if not rec.mlflow_run_id or not rec.mlflow_version:
            return
        description, tags = self.page(rec)
        user_tags = catalog.tags(self.ws.db, rec.id)
        with self.write_lock(), mlflow_errors(f"update of {rec.ref}"):
            current = self.client.get_model_version(rec.name, rec.mlflow_version)
            self.client.update_model_version(rec.name, rec.mlflow_version, description=description)
            for k, v in tags.items():
                if current.tags.get(k) != v:
                    self.client.set_model_version_tag(rec.name, rec.mlflow_version, k, v)
            for k in sorted(set(current.tags or {}) - set(tags)):
                if pages.managed_tag(k):
                    self.client.delete_model_version_tag(rec.name, rec.mlflow_version, k)
            self._log_batch(rec.mlflow_run_id, [], [], [_tag("mlflow.note.content", description)])
            self._link_runs(rec, rec.mlflow_run_id, str(rec.mlflow_version), user_tags.get(mirror.TRAIN_RUN_TAG))

    def _describe_model(self, name: str, extra_ready: int | None = None) -> None:
        """The registered model's description (kind, base, versions, aliases). Best effort."""
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            self.client.update_registered_model(name, description=pages.registered_model_description(
                self.ws, name, extra_ready=extra_ready))

    def model_texts(self, rec: VersionRecord, run_id: str | None) -> dict[str, str]:
        """The MLflow model files of the version's ``weights/`` folder (see registry/mlmodel.py)."""
        return mirror.model_texts(self.ws, rec, run_id)

    def model_folder_problem(self, rec: VersionRecord) -> str | None:
        """Why the version's model folder is not a loadable MLflow model, or None."""
        from lbm_registry.registry.mlmodel import folder_problem

        if not rec.mlflow_run_id:
            return "no MLflow run recorded"
        with mlflow_errors(f"artifacts of {rec.ref}"):
            run = self.client.get_run(rec.mlflow_run_id)
            local = _local_dir(run.info.artifact_uri)
            if local is not None:
                have = {p.name for p in (local / "weights").iterdir()} if (local / "weights").is_dir() else set()
            else:
                have = {Path(a.path).name for a in self.client.list_artifacts(rec.mlflow_run_id, "weights")}
        return folder_problem(have)

    def add_model_files(self, rec: VersionRecord) -> None:
        """Write the MLflow model files next to the weights (adds files only; weights untouched)."""
        assert rec.mlflow_run_id
        with self.write_lock(), mlflow_errors(f"MLflow model of {rec.ref}"):
            self.write_artifacts(rec.mlflow_run_id, None, self.model_texts(rec, rec.mlflow_run_id), {})

    def _log_batch(self, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        """``log_batch`` takes at most 1000 metrics, 100 params and 100 tags per call."""
        step = 100
        for i in range(0, max(len(metrics), len(params), len(tags), 1), step):
            self.client.log_batch(run_id, metrics=metrics[i:i + step], params=params[i:i + step],
                                  tags=tags[i:i + step])

    def _ensure_registered_model(self, rec: VersionRecord) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(rec.name, tags={"lbm.kind": rec.kind},
                                                description=pages.registered_model_description(
                                                    self.ws, rec.name, extra_ready=rec.number))
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise

    def write_artifacts(self, run_id: str, artifact_uri: str | None, texts: Mapping[str, str],
                        files: Mapping[str, Path]) -> None:
        """Local stores: write/link straight into the run's folder (weights are hard links to
        the blob). Remote stores: upload through MLflow."""
        if artifact_uri is None:
            artifact_uri = self.client.get_run(run_id).info.artifact_uri
        local = _local_dir(artifact_uri)
        if local is not None:
            mirror.write_local(local, texts, files)
            return
        staging = self.ws.staging_dir / f"upload-{run_id}"
        try:
            for rel, text in texts.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_text(text)
            for rel, src in files.items():
                link_or_copy(Path(src), staging / rel)
            self.client.log_artifacts(run_id, str(staging))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def log_update(self, rec: VersionRecord, metrics: Mapping[str, float], texts: Mapping[str, str],
                   files: Mapping[str, Path]) -> None:
        """Validation results and the like: metrics on the version's run, extra artifacts."""
        from mlflow.entities import Metric

        if not rec.mlflow_run_id:
            raise RegistryError(f"{rec.ref} has no MLflow run (run 'lbm-reg doctor --repair')")
        with self.write_lock(), mlflow_errors(f"update of {rec.ref}"):
            ts = int(time.time() * 1000)
            if metrics:
                self._log_batch(rec.mlflow_run_id, [Metric(k, float(v), ts, 0) for k, v in metrics.items()], [], [])
            if texts or files:
                self.write_artifacts(rec.mlflow_run_id, None, texts, files)

    def set_alias(self, rec: VersionRecord, alias: str) -> None:
        if rec.mlflow_version:
            with self.write_lock(), mlflow_errors(f"alias {alias!r}"):
                self.client.set_registered_model_alias(rec.name, alias, rec.mlflow_version)
                self._describe_model(rec.name)

    def delete_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        with self.write_lock(), mlflow_errors(f"alias {alias!r}"):
            try:
                self.client.delete_registered_model_alias(name, alias)
            except MlflowException:
                pass  # not mirrored (e.g. set while MLflow was down): nothing to remove
            self._describe_model(name)

    # -- cleanup and checks (doctor) -------------------------------------------------------
    def discard(self, name: str, run_id: str | None, mlflow_version: str | None) -> list[str]:
        """Remove what a failed registration left in MLflow: model versions, run, artifacts.

        ``name`` may be empty when only the run is known (model versions are then found by run)."""
        from mlflow.exceptions import MlflowException

        done: list[str] = []
        with self.write_lock():
            versions: set[tuple[str, str]] = set()
            if mlflow_version and name:
                versions.add((name, str(mlflow_version)))
            if run_id:
                with contextlib.suppress(MlflowException):
                    for mv in self.client.search_model_versions(f"run_id = '{run_id}'"):
                        if not name or mv.name == name:
                            versions.add((mv.name, str(mv.version)))
            for model, v in sorted(versions):
                with contextlib.suppress(MlflowException):
                    self.client.delete_model_version(model, v)
                    done.append(f"deleted MLflow model version {model}/{v}")
            if run_id:
                with contextlib.suppress(MlflowException):
                    done += self._discard_logged_models(run_id)
                run_found = False
                with contextlib.suppress(MlflowException):
                    run = self.client.get_run(run_id)
                    run_found = True
                    local = _local_dir(run.info.artifact_uri)
                    self.client.delete_run(run_id)
                    done.append(f"deleted MLflow run {run_id}")
                    # <artifact root>/<run id>/artifacts: remove the run's folder, nothing above it
                    folder = None
                    if local is not None:
                        if local.name == run_id:
                            folder = local
                        elif local.parent.name == run_id:
                            folder = local.parent
                    if folder is not None and folder.is_dir():
                        shutil.rmtree(folder, ignore_errors=True)
                # a fast-path mirror killed before its transaction committed leaves only its
                # artifact folder (<home>/artifacts/<run id>), no run
                orphan = self.ws.artifacts_dir / run_id
                if not run_found and self.is_sqlite and len(run_id) == 32 and run_id.isalnum() and orphan.is_dir():
                    shutil.rmtree(orphan, ignore_errors=True)
                    done.append(f"removed the artifact folder of unrecorded MLflow run {run_id}")
        return done

    def check(self, rec: VersionRecord) -> str | None:
        """Why the mirror of a ready version is broken, or None when it is fine."""
        from mlflow.exceptions import MlflowException

        if not rec.mlflow_run_id or not rec.mlflow_version:
            return "no MLflow run/model version recorded"
        try:
            mv = self.client.get_model_version(rec.name, rec.mlflow_version)
        except MlflowException:
            return f"MLflow model version {rec.name}/{rec.mlflow_version} is missing"
        if mirror.version_sha256(mv.tags) != rec.sha256:
            return f"MLflow model version {rec.name}/{rec.mlflow_version} has another sha256"
        try:
            run = self.client.get_run(rec.mlflow_run_id)
        except MlflowException:
            return f"MLflow run {rec.mlflow_run_id} is missing"
        if run.info.lifecycle_stage != "active":
            return f"MLflow run {rec.mlflow_run_id} is deleted"
        return None

    def weight_copies(self, rec: VersionRecord, scratch: Path) -> Iterator[Path]:
        """Candidate copies of a version's weights from its run's ``weights/`` artifact (same
        size as the version; the caller checks the hash). A local artifact folder is read in
        place; a server's artifacts are downloaded into ``scratch``, one file at a time."""
        if not rec.mlflow_run_id:
            return
        with mlflow_errors(f"artifacts of {rec.ref}"):
            run = self.client.get_run(rec.mlflow_run_id)
            local = _local_dir(run.info.artifact_uri)
            if local is not None:
                folder = local / "weights"
                files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
                remote = []
            else:
                files = []
                remote = [a for a in self.client.list_artifacts(rec.mlflow_run_id, "weights")
                          if not a.is_dir and a.file_size in (None, rec.size)]
        yield from files
        for art in remote:
            scratch.mkdir(parents=True, exist_ok=True)
            with mlflow_errors(f"download of {art.path} ({rec.ref})"):
                got = self.client.download_artifacts(rec.mlflow_run_id, art.path, str(scratch))
            yield Path(got)

    def runs(self) -> list[Any]:
        """Every live run of the lbm-registry experiment (paged)."""
        out: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def model_versions(self, name: str) -> list[Any]:
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            return []


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)


def mirror_inputs(ws: Workspace, rec: VersionRecord) -> tuple[list[dict[str, Any]], dict[str, Any] | None,
                                                             list[dict[str, Any]], dict[str, str]]:
    """(edges, lora facts, layers, tags) of a version as the mirror wants them."""
    return (catalog.edges(ws.db, rec.id), catalog.lora_facts(ws.db, rec.id), catalog.layers(ws.db, rec.id),
            catalog.tags(ws.db, rec.id))
