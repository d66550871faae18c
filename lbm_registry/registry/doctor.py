"""``doctor`` (find and optionally repair drift between catalog, blobs and MLflow) and ``gc``.

What can drift, and what ``--repair`` does about it:

- half-finished registrations (``pending`` rows whose process is gone, ``failed`` rows):
  their MLflow run/model version is deleted and the rows removed (they were never visible);
- blobs: missing or corrupt (full sha256 re-check) blobs are *recorded* on their versions even
  without ``--repair``, so ``resolve`` refuses them from then on; repair restores a blob from an
  intact MLflow artifact copy when there is one (downloaded from a tracking server), else it
  stays refused until the original file is registered again. Writable blobs are made read-only;
- in a home that caches a tracking server (``--tracking-uri http://...``, see ``fetch.py``) the
  server's copy is the one that counts: a blob missing here but listed by the server is fine; one
  missing on both is reported, as is one that only this home holds (``unmirrored_blob``); a
  corrupt local copy is fetched again by ``--repair``. Nothing is recorded on the shared catalog
  rows for these (another machine's cache may be fine). ``gc --cache`` drops local copies the
  server holds;
- orphan blobs (no catalog row) and temp files of dead writers are deleted;
- MLflow: a ready version whose run or model version is missing is mirrored again from the
  catalog; one whose ``weights/`` folder is no MLflow model (registered before versions were
  models) gets its ``MLmodel`` and environment files added next to the weights; one whose page
  (description, tags) is not what the catalog gives, or whose runs do not link it (a logged
  model), gets its page rebuilt; MLflow runs
  and model versions the catalog does not know are deleted, except those tagged with another
  catalog's ``lbm.catalog_id`` (registries sharing one tracking server). In the workspace's own
  SQLite store, run folders of the artifact root that no run owns (a mirror killed before its
  transaction committed) are removed too.

Pending rows of live processes (same host, pid alive) are left alone, so doctor and gc are safe
to run while others register.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lbm_registry.errors import LBMError, RegistryError
from lbm_registry.registry import catalog
from lbm_registry.registry.blobs import (
    TMP_PREFIX,
    blob_path,
    iter_blob_files,
    link_or_copy,
    make_read_only,
    sha256_file,
    store_blob,
    tmp_owner_pid,
)
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.db import mask_url, with_retries
from lbm_registry.registry.register import pause
from lbm_registry.registry.workspace import Workspace, actor

STALE_S = 24 * 3600.0
Progress = Callable[[str, int, int], None]


@dataclass
class Issue:
    kind: str
    subject: str
    detail: str
    fixed: bool = False
    action: str | None = None


def _pid_alive(pid: int, since: float | None = None) -> bool:
    """Is ``pid`` running (and, given ``since``, the same process that started before then)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: doing no work
            return False
        if since is not None and proc.create_time() > since + 1.0:  # the pid was reused
            return False
    except Exception:
        pass
    return True


def owner_alive(owner: str | None, since: float) -> bool:
    """Is the process that inserted a pending row (``host:pid``) still at work?"""
    if time.time() - since > STALE_S:
        return False
    if not owner or ":" not in owner:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname()[:200]:
        return True  # another machine's registration: only age can tell
    try:
        return _pid_alive(int(pid), since)
    except ValueError:
        return False


class Doctor:
    """One doctor/gc pass over a workspace."""

    def __init__(self, ws: Workspace, *, repair: bool, progress: Progress | None = None) -> None:
        self.ws = ws
        self.repair = repair
        self.progress = progress
        self.issues: list[Issue] = []
        self._tracker: Any = None
        self._tracker_error: str | None = None
        self.not_cached = 0

    # -- helpers ---------------------------------------------------------------------------
    def tracker(self) -> Any:
        """The MLflow client (Tracker). Without ``repair`` only reads are needed: a local SQLite
        store at a known schema is read directly (:mod:`.mlflow_sqlite`, no MLflow import)."""
        if self._tracker is None and self._tracker_error is None:
            from lbm_registry.registry.tracking import Tracker

            if self.repair:
                self._set_aside_damaged_store()

            if not self.repair:
                from lbm_registry.registry.mlflow_sqlite import SqliteMirror

                self._tracker = SqliteMirror.open(self.ws)
                if self._tracker is not None:
                    return self._tracker
            try:
                self._tracker = Tracker(self.ws)
            except LBMError as exc:
                self._tracker_error = str(exc)
        return self._tracker

    def _set_aside_damaged_store(self) -> None:
        """A workspace's own MLflow store that is no readable database is renamed
        ``mlflow.db.damaged-<time>`` (with its journal files); the tracker then makes a new one and
        every version is mirrored again from the catalog (the source of truth)."""
        from lbm_registry.registry.db import damaged_mlflow_store

        damaged = damaged_mlflow_store(self.ws.settings.effective_tracking_uri)
        if damaged is None:
            return
        path, why = damaged
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for side in ("", "-wal", "-shm", "-journal"):
            src = Path(f"{path}{side}")
            if src.exists():
                os.replace(src, Path(f"{aside}{side}"))
        issue = self.add("mlflow_damaged", str(path), f"the MLflow store is damaged ({why})")
        issue.fixed, issue.action = True, f"set aside as {aside.name}; rebuilt from the catalog"

    def add(self, kind: str, subject: str, detail: str) -> Issue:
        issue = Issue(kind, subject, detail)
        self.issues.append(issue)
        return issue

    def _event(self, action: str, detail: dict[str, Any], rec: VersionRecord | None = None) -> None:
        def txn() -> None:
            with self.ws.db.transaction() as tx:
                catalog.log_event(tx, action, name=rec.name if rec else None, number=rec.number if rec else None,
                                  sha256=rec.sha256 if rec else None, actor=actor(), detail=detail)

        with_retries(txn, "writing the event log")

    # -- abandoned registrations -----------------------------------------------------------
    def check_registrations(self) -> None:
        for rec in catalog.all_versions(self.ws.db, status="pending"):
            if owner_alive(rec.owner, rec.created_at):
                continue
            issue = self.add("pending", rec.ref, f"registration abandoned by {rec.owner or 'unknown process'} "
                                                  f"(never became visible)")
            if self.repair:
                issue.action = self._drop(rec)
                issue.fixed = True
        for rec in catalog.all_versions(self.ws.db, status="failed"):
            issue = self.add("failed", rec.ref, f"failed registration: {(rec.error or '?')[:120]}")
            if self.repair:
                issue.action = self._drop(rec)
                issue.fixed = True

    def _drop(self, rec: VersionRecord) -> str:
        """Remove a never-visible version: its MLflow leftovers, then its rows."""
        done: list[str] = []
        tracker = self.tracker() if (rec.mlflow_run_id or rec.mlflow_version) else None
        if tracker is not None:
            done += tracker.discard(rec.name, rec.mlflow_run_id, rec.mlflow_version)

        def txn() -> None:
            with self.ws.db.transaction() as tx:
                if tx.execute("UPDATE versions SET status = 'failed' WHERE id = :id AND status <> 'ready'",
                              {"id": rec.id}) == 0:
                    return  # became ready meanwhile: not ours to drop
                catalog.delete_version(tx, rec.id)
                catalog.delete_empty_assets(tx)
                catalog.log_event(tx, "drop_registration", name=rec.name, number=rec.number, sha256=rec.sha256,
                                  actor=actor(), detail={"status": rec.status, "mlflow": done})

        with_retries(txn, f"dropping {rec.ref}")
        return "removed" + (f" ({'; '.join(done)})" if done else "")

    # -- blobs -----------------------------------------------------------------------------
    def check_blobs(self, *, verify: bool) -> None:
        versions = catalog.all_versions(self.ws.db)
        by_sha: dict[str, list[VersionRecord]] = {}
        for rec in versions:  # in-flight registrations may not have stored their blob yet
            if rec.status == "ready":
                by_sha.setdefault(rec.sha256, []).append(rec)
        if verify:
            total = len(by_sha)
            for i, (sha, recs) in enumerate(sorted(by_sha.items())):
                if self.progress:
                    self.progress(f"verifying {recs[0].ref}", i, total)
                self._check_blob(sha, recs)
            if self.progress:
                self.progress("verified", total, total)
        if self.repair:
            # Exclusive against registrations between their pending row and their stored blob
            # (see register.register): an orphan they are about to reuse is not deleted.
            with self.ws.rw_lock("blobs", exclusive=True):
                self._check_unreferenced()
        else:
            self._check_unreferenced()

    def _check_unreferenced(self) -> None:
        files = list(iter_blob_files(self.ws.blobs_dir))  # list files before reading rows
        referenced = catalog.referenced_shas(self.ws.db)
        pause("gc_scan")
        for path in files:
            name = path.name
            if name.startswith(TMP_PREFIX):
                pid = tmp_owner_pid(path)
                age = time.time() - path.stat().st_mtime if path.exists() else 0
                if (pid is not None and _pid_alive(pid)) and age < STALE_S:
                    continue
                issue = self.add("temp_file", str(path), "temp file of an interrupted blob write")
                if self.repair:
                    path.unlink(missing_ok=True)
                    issue.fixed, issue.action = True, "deleted"
            elif name not in referenced and path.exists():
                if path.parent.name != name[:2]:
                    self.add("unknown_file", str(path), "not a blob (left alone)")
                    continue
                issue = self.add("orphan_blob", name[:16], f"blob referenced by no version ({path.stat().st_size:,} "
                                                           f"bytes)")
                if self.repair:
                    path.unlink(missing_ok=True)
                    issue.fixed, issue.action = True, "deleted"

    def _server_size(self, rec: VersionRecord) -> int | None | str:
        """Size of the tracking server's copy of ``rec``'s weights, None when it has none, or a
        one-line reason when the server cannot tell."""
        from lbm_registry.registry import fetch

        try:
            return fetch.server_size(self.ws, rec)
        except LBMError as exc:
            return str(exc)

    def _check_cached_blob(self, sha: str, recs: list[VersionRecord]) -> None:
        """A home that caches a tracking server: the server's copy is the one that counts.

        Missing here but on the server: fine (fetched on first use). Missing on the server: the
        local copy is the only one (reported), or there is none (reported, not fixable here).
        A corrupt local copy is fetched again with ``--repair``. Nothing is recorded on the
        shared catalog rows: another machine's cache is not this machine's business."""
        from lbm_registry.registry import fetch

        path = blob_path(self.ws.blobs_dir, sha)
        refs = ", ".join(r.ref for r in recs[:4]) + (" ..." if len(recs) > 4 else "")
        rec = recs[0]
        sizes = [self._server_size(r) for r in recs]
        on_server = any(sz == rec.size for sz in sizes)
        unknown = next((sz for sz in sizes if isinstance(sz, str)), None)
        if not path.is_file():
            self.not_cached += 1
            if not on_server:
                self.add("missing_blob", sha[:16], f"blob of {refs} is missing here and on the tracking server"
                         + (f" ({unknown})" if unknown else ""))
            return
        if path.stat().st_size == rec.size and sha256_file(path) == sha:
            if os.stat(path).st_mode & 0o222:
                issue = self.add("writable_blob", sha[:16], f"blob of {refs} is writable")
                if self.repair:
                    make_read_only(path)
                    issue.fixed, issue.action = True, "made read-only"
            if not on_server:
                issue = self.add("unmirrored_blob", sha[:16], f"the tracking server has no copy of {refs}: this "
                                 f"home holds the only one" + (f" ({unknown})" if unknown else ""))
                if self.repair and unknown is None:
                    issue.action = self._upload(recs, path)
                    issue.fixed = issue.action.startswith("uploaded")
            return
        if not on_server:
            self.add("corrupt_blob", sha[:16], f"blob of {refs} is corrupt here and the tracking server has "
                     f"no copy" + (f" ({unknown})" if unknown else ""))
            return
        issue = self.add("corrupt_cached_blob", sha[:16], f"this home's copy of {refs} is corrupt")
        if self.repair:
            with self.ws.rw_lock("blobs", exclusive=True):
                path.unlink(missing_ok=True)
            try:
                fetch.ensure_local(self.ws, rec, progress=None)
                issue.fixed, issue.action = True, "fetched again from the tracking server"
            except LBMError as exc:
                issue.action = f"dropped; fetching it again failed: {exc}"

    def _upload(self, recs: list[VersionRecord], blob: Path) -> str:
        """Give the server back its copy: upload the verified local blob as each run's weight file."""
        from lbm_registry.registry import fetch

        tracker = self.tracker()
        if tracker is None:
            return f"cannot upload: {self._tracker_error}"
        done = []
        for rec in recs:
            if not rec.mlflow_run_id:
                continue
            folder, _, name = fetch.weight_artifact(rec).rpartition("/")
            staging = self.ws.staging_dir / f"upload-{rec.sha256[:16]}-{os.getpid()}"
            try:
                link_or_copy(blob, staging / name)
                try:
                    tracker.client.log_artifact(rec.mlflow_run_id, str(staging / name), folder)
                except Exception as exc:  # MLflow's exception zoo: one line
                    return f"upload failed: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc}"
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if self._server_size(rec) == rec.size:
                done.append(rec.ref)
        return f"uploaded to the tracking server ({', '.join(done)})" if done else "upload did not complete"

    def _check_blob(self, sha: str, recs: list[VersionRecord]) -> None:
        from lbm_registry.registry.fetch import is_cache_home

        if is_cache_home(self.ws):
            self._check_cached_blob(sha, recs)
            return
        path = blob_path(self.ws.blobs_dir, sha)
        refs = ", ".join(r.ref for r in recs[:4]) + (" ..." if len(recs) > 4 else "")
        state = "ok"
        if not path.is_file():
            state = "missing"
        elif path.stat().st_size != recs[0].size or sha256_file(path) != sha:
            state = "corrupt"
        if state == "ok":
            if any(r.integrity != "ok" for r in recs):
                self._set_integrity(sha, "ok", recs[0])
            if os.stat(path).st_mode & 0o222:
                issue = self.add("writable_blob", sha[:16], f"blob of {refs} is writable")
                if self.repair:
                    make_read_only(path)
                    issue.fixed, issue.action = True, "made read-only"
            return
        issue = self.add(f"{state}_blob", sha[:16], f"blob of {refs} is {state}")
        # Recorded whether or not we repair: from now on resolve refuses these versions.
        if any(r.integrity != state for r in recs):
            self._set_integrity(sha, state, recs[0])
        if self.repair:
            scratch = self.ws.staging_dir / f"restore-{sha[:16]}-{os.getpid()}"
            try:
                source = self._intact_copy(sha, recs, path, scratch)
                if source is not None:
                    store_blob(source, sha, recs[0].size, self.ws.blobs_dir, replace=True)
                    self._set_integrity(sha, "ok", recs[0])
                    where = "the MLflow server" if source.is_relative_to(scratch) else str(source)
                    issue.fixed, issue.action = True, f"restored from {where}"
                else:
                    issue.action = "cannot restore: register the original file again"
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def _intact_copy(self, sha: str, recs: list[VersionRecord], blob: Path, scratch: Path) -> Path | None:
        """An MLflow artifact copy of the weights with the right hash (a copy, not a link).

        The workspace's own artifact folder is looked at first (no MLflow needed); then, when
        the tracking store is elsewhere (a server), its copy is downloaded into ``scratch``."""
        try:
            blob_ino = blob.stat().st_ino if blob.exists() else None
        except OSError:
            blob_ino = None

        def intact(cand: Path, rec: VersionRecord) -> bool:
            try:
                st = cand.stat()
            except OSError:
                return False
            return st.st_ino != blob_ino and st.st_size == rec.size and sha256_file(cand) == sha

        for rec in recs:
            folder = self.ws.artifacts_dir / (rec.mlflow_run_id or "-") / "artifacts" / "weights"
            if rec.mlflow_run_id and folder.is_dir():
                for cand in folder.iterdir():
                    if intact(cand, rec):
                        return cand
        if self.ws.settings.effective_tracking_uri.startswith("sqlite:"):
            return None
        tracker = self.tracker()
        if tracker is None:
            return None
        for rec in recs:
            try:
                for cand in tracker.weight_copies(rec, scratch):
                    if intact(cand, rec):
                        return cand
            except LBMError:
                continue
        return None

    def _set_integrity(self, sha: str, state: str, rec: VersionRecord) -> None:
        if self.ws.read_only:  # a read-only registry: reported, not recorded (its owner's doctor records it)
            return

        def txn() -> None:
            with self.ws.db.transaction() as tx:
                tx.execute("UPDATE versions SET integrity = :i WHERE sha256 = :s", {"i": state, "s": sha})
                catalog.log_event(tx, "blob_state", name=rec.name, number=rec.number, sha256=sha, actor=actor(),
                                  detail={"integrity": state})

        with_retries(txn, "recording blob state")

    def drop_cached(self) -> dict[str, Any]:
        """``gc --cache``: delete this home's copies of ready versions' blobs that the tracking
        server holds (checked by size in its listing; the sha256 was checked when the blob was
        fetched or uploaded). A blob the server lacks is the only copy and is kept."""
        ready: dict[str, list[VersionRecord]] = {}
        for rec in catalog.all_versions(self.ws.db, status="ready"):
            ready.setdefault(rec.sha256, []).append(rec)
        busy = {r.sha256 for r in catalog.all_versions(self.ws.db, status="pending")}
        dropped = kept = freed = 0
        with self.ws.rw_lock("blobs", exclusive=True):  # no fetch or registration in flight
            for path in list(iter_blob_files(self.ws.blobs_dir)):
                recs = ready.get(path.name)
                if not recs or path.name in busy or path.name.startswith(TMP_PREFIX):
                    continue
                sizes = [self._server_size(r) for r in recs]
                label = ", ".join(r.ref for r in recs[:3])
                if any(sz == recs[0].size for sz in sizes):
                    size = path.stat().st_size
                    path.unlink(missing_ok=True)
                    dropped, freed = dropped + 1, freed + size
                    issue = self.add("cached_blob", path.name[:16], f"local copy of {label} ({size:,} bytes)")
                    issue.fixed, issue.action = True, "dropped (the tracking server holds it)"
                else:
                    kept += 1
                    why = next((sz for sz in sizes if isinstance(sz, str)), "the tracking server has no copy")
                    self.add("only_copy", path.name[:16], f"kept {label}: {why}")
        return {"cache_dropped": dropped, "cache_bytes_freed": freed, "cache_kept_only_copies": kept}

    # -- MLflow ----------------------------------------------------------------------------
    def check_mlflow(self) -> None:
        tracker = self.tracker()
        if tracker is None:
            from lbm_registry.registry.db import damaged_mlflow_store

            damaged = damaged_mlflow_store(self.ws.settings.effective_tracking_uri)
            self.add("mlflow_damaged" if damaged else "mlflow_unreachable",
                     mask_url(self.ws.settings.effective_tracking_uri), self._tracker_error or "?")
            return
        ready = catalog.all_versions(self.ws.db, status="ready")
        for rec in ready:
            problem = tracker.check(rec)
            if problem is None:
                self._check_model_folder(tracker, rec)
                self._check_page(tracker, rec)
                continue
            issue = self.add("mlflow_missing", rec.ref, problem)
            if self.repair:
                issue.action = self._remirror(tracker, rec)
                issue.fixed = issue.action.startswith("mirrored")
        known: dict[str, set[str]] = {}
        for rec in catalog.all_versions(self.ws.db):
            if rec.status in ("ready", "pending") and rec.mlflow_version:
                known.setdefault(rec.name, set()).add(str(rec.mlflow_version))
        in_flight = {r.mlflow_run_id for r in catalog.all_versions(self.ws.db, status="pending") if r.mlflow_run_id}
        for name in catalog.asset_names(self.ws.db):
            for mv in tracker.model_versions(name):
                if str(mv.version) in known.get(name, set()) or mv.run_id in in_flight:
                    continue
                if not tracker.owns(mv.tags):  # another registry's, sharing this MLflow server
                    continue
                if "lbm.version_id" in (mv.tags or {}) and self._in_flight_version(mv.tags["lbm.version_id"]):
                    continue
                issue = self.add("mlflow_orphan", f"{name}/{mv.version}", "MLflow model version unknown to the catalog")
                if self.repair:
                    done = tracker.discard(name, mv.run_id, str(mv.version))
                    issue.fixed, issue.action = True, "; ".join(done) or "deleted"

        referenced_runs = {r.mlflow_run_id for r in catalog.all_versions(self.ws.db) if r.mlflow_run_id}
        for run in tracker.runs():
            run_id = run.info.run_id
            if run_id in referenced_runs or not tracker.owns(run.data.tags):
                continue
            vid = run.data.tags.get("lbm.version_id")
            if vid and self._in_flight_version(vid):
                continue
            issue = self.add("mlflow_orphan_run", run_id, f"MLflow run {run.info.run_name or ''} unknown to the catalog")
            if self.repair:
                done = tracker.discard(run.data.tags.get("lbm.name", ""), run_id, None)
                issue.fixed, issue.action = True, "; ".join(done) or "deleted"
        from lbm_registry.registry.mlflow_sqlite import SqliteMirror

        store = tracker if isinstance(tracker, SqliteMirror) else SqliteMirror.open(self.ws)
        if store is not None:  # the workspace's own SQLite store: its artifact root is ours
            for folder in store.unrecorded_run_folders():
                if folder.name in referenced_runs:  # a pending registration's: check_registrations' job
                    continue
                issue = self.add("mlflow_orphan_folder", folder.name,
                                 f"artifact folder of no MLflow run ({folder})")
                if self.repair:
                    shutil.rmtree(folder, ignore_errors=True)
                    issue.fixed, issue.action = not folder.exists(), "removed"

    def _check_model_folder(self, tracker: Any, rec: VersionRecord) -> None:
        """A mirrored version whose ``weights/`` folder is not (yet) an MLflow model: add the
        MLmodel and its environment files next to the weights (nothing else changes)."""
        # the repair is looked up only when needed: a fast-path mirror that reports no problem has none
        self._check_and_repair("mlflow_model", rec, tracker.model_folder_problem, lambda r: tracker.add_model_files(r),
                               done="added MLmodel, pyfunc_model.py and environment files",
                               failed="cannot add the MLflow model files")

    def _check_page(self, tracker: Any, rec: VersionRecord) -> None:
        """A version page that is not what the catalog says (written by an older version of this
        tool, or a page a registration could not update): rebuilt from the catalog."""
        self._check_and_repair("mlflow_page", rec, tracker.page_problem, lambda r: tracker.refresh_version(r),
                               done="page rebuilt from the catalog", failed="cannot rebuild the page")

    def _check_and_repair(self, kind: str, rec: VersionRecord, problem_of: Callable[[VersionRecord], str | None],
                          repair: Callable[[VersionRecord], Any], *, done: str, failed: str) -> None:
        """Record ``problem_of(rec)`` (an LBMError counts as the problem) and, with ``--repair``,
        run ``repair(rec)``: the issue says ``done``, or ``failed: <error>`` if it raised."""
        try:
            problem = problem_of(rec)
        except LBMError as exc:
            problem = str(exc)
        if problem is None:
            return
        issue = self.add(kind, rec.ref, problem)
        if self.repair:
            try:
                repair(rec)
            except LBMError as exc:
                issue.action = f"{failed}: {exc}"
                return
            issue.fixed, issue.action = True, done

    def _in_flight_version(self, version_id: str) -> bool:
        try:
            rec = catalog.version_by_id(self.ws.db, int(version_id))
        except ValueError:
            return False
        return rec is not None and rec.status == "pending" and owner_alive(rec.owner, rec.created_at)

    def _remirror(self, tracker: Any, rec: VersionRecord) -> str:
        from lbm_registry.registry import fetch
        from lbm_registry.registry.tracking import mirror_inputs

        path = blob_path(self.ws.blobs_dir, rec.sha256)
        fresh = catalog.version_by_id(self.ws.db, rec.id)
        if fresh is not None and not path.is_file() and fetch.is_cache_home(self.ws):
            try:  # the old run's artifact may still be there: the new mirror needs the bytes
                fetch.ensure_local(self.ws, fresh, progress=None)
            except LBMError:
                pass
        if fresh is None or fresh.integrity != "ok" or not path.is_file():
            return "cannot mirror: the blob is not intact"
        old_run = fresh.mlflow_run_id
        edges, lora, layers, tags = mirror_inputs(self.ws, fresh)
        run_id, mv = tracker.mirror(fresh, weights=path, edges=edges, lora=lora, layers=layers, user_tags=tags)

        def txn() -> None:
            with self.ws.db.transaction() as tx:
                tx.execute("UPDATE versions SET mlflow_run_id = :r, mlflow_version = :mv WHERE id = :id",
                           {"r": run_id, "mv": mv, "id": rec.id})
                catalog.log_event(tx, "remirror", name=rec.name, number=rec.number, sha256=rec.sha256,
                                  actor=actor(), detail={"mlflow_run_id": run_id, "mlflow_version": mv})

        with_retries(txn, f"re-mirroring {rec.ref}")
        for alias, number in catalog.aliases_of_asset(self.ws.db, rec.name).items():
            if number == rec.number:
                fresh.mlflow_version = mv
                tracker.set_alias(fresh, alias)
        if old_run and old_run != run_id:
            tracker.discard(rec.name, old_run, None)
        from lbm_registry.registry.register import refresh_lineage_pages

        fresh = catalog.version_by_id(self.ws.db, rec.id) or fresh
        refresh_lineage_pages(self.ws, tracker, fresh, children=True)  # they link its new model version
        return f"mirrored again (run {run_id[:12]}, model version {mv}; extra artifacts of the first run are lost)"

    # -- entry points ----------------------------------------------------------------------
    def report(self, checked: dict[str, Any]) -> dict[str, Any]:
        unfixed = [i for i in self.issues if not i.fixed and i.kind != "unknown_file"]
        return {"home": str(self.ws.home), "repair": self.repair, "checked": checked,
                "issues": [asdict(i) for i in self.issues], "fixed": sum(i.fixed for i in self.issues),
                "remaining": len(unfixed), "ok": not unfixed}


def doctor(ws: Workspace, *, repair: bool = False, mlflow: bool = True,
           progress: Progress | None = None) -> dict[str, Any]:
    """Check (and with ``repair``, fix) the workspace. Returns a JSON-ready report."""
    d = Doctor(ws, repair=repair, progress=progress)
    d.check_registrations()
    d.check_blobs(verify=True)
    if mlflow:
        d.check_mlflow()
    n_versions = ws.db.scalar("SELECT count(*) FROM versions WHERE status = 'ready'")
    result = d.report({"versions": n_versions, "blobs": sum(1 for _ in iter_blob_files(ws.blobs_dir)),
                       "not_cached": d.not_cached, "mlflow": mlflow and d._tracker is not None})
    if repair:
        d._event("doctor_repair", {"fixed": result["fixed"], "remaining": result["remaining"]})
    return result


def gc(ws: Workspace, *, cache: bool = False) -> dict[str, Any]:
    """Remove failed/abandoned registrations and unreferenced blobs (no hashing, no MLflow audit);
    with ``cache``, also drop local copies of blobs the tracking server holds."""
    d = Doctor(ws, repair=True)
    if cache:
        from lbm_registry.registry.fetch import is_cache_home

        if not is_cache_home(ws):
            raise RegistryError(f"gc --cache: {ws.home} is not a cache of a tracking server (its tracking store "
                                f"is {mask_url(ws.settings.effective_tracking_uri)}): its blobs are the only copy")
    d.check_registrations()
    d.check_blobs(verify=False)
    freed = sum(1 for issue in d.issues if issue.kind == "orphan_blob")
    checked: dict[str, Any] = {"blobs_removed": freed}
    if cache:
        checked.update(d.drop_cached())
    result = d.report(checked)
    result.pop("repair", None)  # gc always removes what it finds; "repair" is doctor's option
    result["removed"] = sum(1 for i in d.issues if i.fixed)
    d._event("gc", {"removed": [f"{i.kind}:{i.subject}" for i in d.issues if i.fixed], "cache": cache})
    return result
