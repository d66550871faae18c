"""A home's ``blobs/`` as a sha-verified cache of the tracking server's artifact store.

Machines that share a catalog and a tracking server share no disk (DESIGN.md "Shared
registry"). Every registered version's weights are an artifact of its MLflow run
(``weights/<file_name>``; the folder may also hold an MLmodel and friends, so exactly that one
file is fetched). When a version's blob is not in this home, or has the wrong size, it is
fetched:

- streamed in 1 MB chunks into a temp file next to the blob (``.tmp-<pid>-<token>``, so doctor
  can clean up after a crash), sha256 computed while the bytes arrive, never the whole file in
  memory;
- checked against the catalog's size and sha256: a server copy with other bytes is an error that
  names the version, and nothing is stored;
- fsynced, made read-only and renamed into place;
- once per home, however many processes ask at the same moment: a per-blob file lock, the
  waiters find the finished blob when they get it.

Where the bytes come from, by the run's artifact URI: ``mlflow-artifacts:`` (a server proxying
its ``--artifacts-destination``: the ``/api/2.0/mlflow-artifacts/artifacts/...`` endpoint,
streamed here with our own HTTP client and the same ``MLFLOW_TRACKING_*`` credentials the MLflow
client uses), ``http(s)://`` (the same, directly), a local folder (read in place) or anything
else MLflow can read (``s3://`` with the machine's own credentials: downloaded by MLflow into the
home's staging folder, then verified the same way).

Nothing here imports MLflow unless the tracking store is not an HTTP server or the artifact
store is not an HTTP one; ``requests`` (an MLflow dependency) carries the HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse, urlunparse

from lbm_registry.errors import RegistryError
from lbm_registry.registry.blobs import TMP_PREFIX, _fsync_dir, blob_path, make_read_only
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.db import mask_url
from lbm_registry.registry.workspace import Workspace

CHUNK = 1024 * 1024
#: How long a process waits for another one fetching the same blob (the kernel drops the lock
#: of a process that dies, so this only bounds a fetch that hangs).
WAIT_S = 6 * 3600.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"

#: ``progress(done_bytes, total_bytes)``; called with done == 0 first.
Progress = Callable[[int, int], None]
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Progress]]


def is_http(uri: str | None) -> bool:
    return bool(uri) and urlparse(uri).scheme in ("http", "https")


def is_cache_home(ws: Workspace) -> bool:
    """Is this home's ``blobs/`` a cache of a tracking *server* (whose artifact store holds the
    authoritative copy), rather than the registry's own store?"""
    return is_http(ws.settings.effective_tracking_uri)


def weight_artifact(rec: VersionRecord) -> str:
    """The weight file's path inside its run's artifacts (as the mirror writes it)."""
    return f"weights/{rec.file_name or f'{rec.name}-v{rec.number}.safetensors'}"


def local_blob(ws: Workspace, rec: VersionRecord) -> Path:
    """Where this home keeps the version's bytes (from the hash, whatever home wrote the row)."""
    return blob_path(ws.blobs_dir, rec.sha256)


def has_intact_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


# -- HTTP ----------------------------------------------------------------------------------
def http_session(tracking_uri: str) -> Any:
    """A ``requests`` session with MLflow's client settings: ``MLFLOW_TRACKING_TOKEN`` (bearer),
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (basic; a ``user:pw@`` in the URI works too),
    ``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH`` and
    ``MLFLOW_TRACKING_CLIENT_CERT_PATH``."""
    import requests

    s = requests.Session()
    env = os.environ
    if env.get("MLFLOW_TRACKING_TOKEN"):
        s.headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    elif env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD"):
        s.auth = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true", "yes"):
        s.verify = False
    elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        s.verify = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    if env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        s.cert = env["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
    s.headers["Accept-Encoding"] = "identity"  # the bytes as stored: we hash them
    return s


def _http_error(exc: BaseException, what: str, url: str) -> RegistryError:
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return RegistryError(f"{what}: cannot reach the tracking server ({mask_url(url)}): {reason}")


def _get_json(session: Any, url: str, params: dict[str, str], what: str) -> dict[str, Any]:
    import requests

    try:
        r = session.get(url, params=params, timeout=(CONNECT_TIMEOUT_S, 60))
    except requests.RequestException as exc:
        raise _http_error(exc, what, url) from None
    if r.status_code != 200:
        try:
            msg = r.json().get("message") or r.text
        except ValueError:
            msg = r.text
        raise RegistryError(f"{what}: the tracking server answered {r.status_code}: {str(msg).strip()[:200]}")
    return r.json()


def run_artifact_uri(ws: Workspace, rec: VersionRecord) -> str:
    """The artifact root of the version's MLflow run (``mlflow-artifacts:/<exp>/<run>/artifacts``)."""
    if not rec.mlflow_run_id:
        raise RegistryError(f"{rec.ref}: no MLflow run is recorded, so its weights cannot be fetched "
                            f"(run 'lbm-reg doctor --repair' where the blob is)")
    uri = ws.settings.effective_tracking_uri
    if is_http(uri):
        data = _get_json(http_session(uri), f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get",
                         {"run_id": rec.mlflow_run_id}, f"fetching {rec.ref}")
        return str(data["run"]["info"]["artifact_uri"])
    from lbm_registry.registry.tracking import Tracker, mlflow_errors

    with mlflow_errors(f"lookup of the run of {rec.ref}"):
        return str(Tracker(ws).client.get_run(rec.mlflow_run_id).info.artifact_uri)


@dataclass
class ServerCopy:
    """Where the authoritative copy of a version's weights is: one of ``url`` (streamed over
    HTTP), ``path`` (a local file) or ``uri`` (anything else, read through MLflow)."""

    url: str | None = None
    path: Path | None = None
    uri: str | None = None

    def describe(self) -> str:
        return mask_url(self.url) if self.url else str(self.path) if self.path else mask_url(self.uri or "?")


def artifact_url(artifact_uri: str, tracking_uri: str, rel: str) -> ServerCopy:
    """Turn a run's artifact root plus a relative path into something we can read."""
    parsed = urlparse(artifact_uri)
    rel = rel.strip("/")
    if parsed.scheme == "mlflow-artifacts":
        track = urlparse(tracking_uri)
        if track.scheme not in ("http", "https"):
            raise RegistryError(f"artifacts at {artifact_uri} need an http(s) tracking URI, not "
                                f"{mask_url(tracking_uri)}")
        path = f"{track.path.rstrip('/')}{ARTIFACTS_API}/{parsed.path.strip('/')}/{quote(rel)}"
        return ServerCopy(url=urlunparse((track.scheme, parsed.netloc or track.netloc, path, "", "", "")))
    if parsed.scheme in ("http", "https"):
        return ServerCopy(url=f"{artifact_uri.rstrip('/')}/{quote(rel)}")
    if parsed.scheme == "file":
        return ServerCopy(path=Path(unquote(parsed.path)) / rel)
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return ServerCopy(path=Path(artifact_uri) / rel)
    return ServerCopy(uri=f"{artifact_uri.rstrip('/')}/{rel}")


def server_copy(ws: Workspace, rec: VersionRecord) -> ServerCopy:
    return artifact_url(run_artifact_uri(ws, rec), ws.settings.effective_tracking_uri, weight_artifact(rec))


def server_size(ws: Workspace, rec: VersionRecord) -> int | None:
    """Size of the server's copy of the weights (None when it has none). Cheap: one listing."""
    copy = server_copy(ws, rec)
    if copy.path is not None:
        return copy.path.stat().st_size if copy.path.is_file() else None
    if copy.url is not None and ARTIFACTS_API in copy.url:
        root, _, tail = copy.url.partition(ARTIFACTS_API)
        folder, _, name = unquote(tail).strip("/").rpartition("/")
        data = _get_json(http_session(ws.settings.effective_tracking_uri), root + ARTIFACTS_API,
                         {"path": folder}, f"listing the weights of {rec.ref}")
        for f in data.get("files", []):
            if f.get("path") == name and not f.get("is_dir"):
                return int(f["file_size"]) if f.get("file_size") is not None else None
        return None
    from lbm_registry.registry.tracking import Tracker, mlflow_errors

    folder, _, name = weight_artifact(rec).rpartition("/")
    with mlflow_errors(f"listing the weights of {rec.ref}"):
        for a in Tracker(ws).client.list_artifacts(rec.mlflow_run_id, folder):
            if a.path.rsplit("/", 1)[-1] == name and not a.is_dir:
                return a.file_size
    return None


# -- streaming into the store --------------------------------------------------------------
def _chunks_http(ws: Workspace, rec: VersionRecord, url: str) -> Iterator[bytes]:
    import requests

    session = http_session(ws.settings.effective_tracking_uri)
    try:
        with session.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as r:
            if r.status_code == 404:
                raise RegistryError(f"{rec.ref}: the tracking server has no copy of its weights "
                                    f"({weight_artifact(rec)} of run {rec.mlflow_run_id})")
            if r.status_code != 200:
                raise RegistryError(f"fetching {rec.ref}: the tracking server answered {r.status_code} "
                                    f"for {mask_url(url)}")
            yield from r.iter_content(CHUNK)
    except requests.RequestException as exc:
        raise _http_error(exc, f"fetching {rec.ref}", url) from None


def _chunks_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


@contextlib.contextmanager
def _mlflow_download(ws: Workspace, rec: VersionRecord, uri: str) -> Iterator[Path]:
    """Any other store (s3:, gs:, ...): MLflow downloads it into the home's staging folder."""
    from lbm_registry.registry.tracking import mlflow_environment, mlflow_errors

    mlflow_environment()
    tmpdir = Path(tempfile.mkdtemp(prefix="fetch-", dir=ws.staging_dir))
    try:
        import mlflow.artifacts

        with mlflow_errors(f"download of the weights of {rec.ref}"):
            got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmpdir),
                                                      tracking_uri=ws.settings.effective_tracking_uri)
        yield Path(got)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class _HashingWriter:
    """Hash and write chunks on a second thread while the caller keeps reading the socket.

    ``hashlib`` and file writes release the GIL, so receiving, hashing and writing overlap (curl
    only receives and writes). At most ``QUEUE_CHUNKS`` chunks wait in memory; dirty pages are
    flushed every ``SYNC_EVERY`` bytes so the final fsync does not wait for a whole file."""

    QUEUE_CHUNKS = 16
    SYNC_EVERY = 64 * 1024 * 1024

    def __init__(self, out: Any) -> None:
        import queue
        import threading

        self.out, self.h = out, hashlib.sha256()
        self.q: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_CHUNKS)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lbm-fetch-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        unsynced = 0
        try:
            while (chunk := self.q.get()) is not None:
                if self.error is not None:
                    continue  # drain: the reader is told at its next put
                self.h.update(chunk)
                self.out.write(chunk)
                unsynced += len(chunk)
                if unsynced >= self.SYNC_EVERY:
                    self.out.flush()
                    os.fdatasync(self.out.fileno())
                    unsynced = 0
            self.out.flush()
            os.fsync(self.out.fileno())
        except BaseException as exc:
            self.error = exc
            while self.q.get() is not None:  # let the reader finish its puts
                pass

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(chunk)

    def finish(self) -> str:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.h.hexdigest()

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            self.q.put(None)
            self.thread.join()


def _write_verified(rec: VersionRecord, chunks: Iterator[bytes], dest: Path, progress: Progress | None,
                    source: str) -> None:
    """Stream ``chunks`` into a temp file beside ``dest``, check size and sha256, rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    done = 0
    try:
        with open(tmp, "wb") as out:
            writer = _HashingWriter(out)
            try:
                if progress:
                    progress(0, rec.size)
                for chunk in chunks:
                    done += len(chunk)
                    if done > rec.size:
                        break
                    writer.put(chunk)
                    if progress:
                        progress(done, rec.size)
                digest = writer.finish()
            except BaseException:
                writer.abort()
                raise
        got = digest if done == rec.size else None
        if got != rec.sha256:
            what = (f"sha256 {got[:12]}, expected {rec.sha256[:12]}" if got else
                    f"{'more than ' if done > rec.size else ''}{done:,} bytes, expected {rec.size:,}")
            raise RegistryError(f"{rec.ref}: the tracking server's copy of its weights is corrupt ({what}; "
                                f"{source}): refused")
        make_read_only(tmp)  # the umask decides who may read it
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def rich_progress(label: str, total: int) -> contextlib.AbstractContextManager[Progress]:
    """A Rich progress bar with bytes and bytes/s on stderr (one final line when not a terminal)."""
    return _RichProgress(label, total)


class _RichProgress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total

    def __enter__(self) -> Progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True, highlight=False))
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total)
        last = [0.0]

        def update(done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or now - last[0] > 0.1:  # Rich's own cost stays off the hot loop
                last[0] = now
                self.bar.update(self.task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def _log_fetch(ws: Workspace, rec: VersionRecord, seconds: float, source: str) -> None:
    """Audit log entry (who fetched what); best effort: a read-only catalog does not fail a fetch."""
    from lbm_registry.registry import catalog
    from lbm_registry.registry.workspace import actor

    try:
        with ws.db.transaction() as tx:
            catalog.log_event(tx, "blob_fetched", name=rec.name, number=rec.number, sha256=rec.sha256,
                              actor=actor(), detail={"size": rec.size, "seconds": round(seconds, 3),
                                                     "home": str(ws.home), "source": source})
    except Exception:
        pass


@dataclass
class FetchResult:
    path: Path
    fetched: bool
    seconds: float = 0.0


def ensure_local(ws: Workspace, rec: VersionRecord, *,
                 progress: ProgressFactory | None = rich_progress) -> FetchResult:
    """The version's blob in this home, fetched from the tracking server first when it is missing
    or has the wrong size (a truncated or half-copied cache entry). The single place where a
    version becomes a readable local file."""
    path = local_blob(ws, rec)
    if has_intact_size(path, rec.size):
        return FetchResult(path, False)
    with ws.lock(f"fetch-{rec.sha256[:40]}", timeout=WAIT_S):
        if has_intact_size(path, rec.size):  # another process fetched it while we waited
            return FetchResult(path, False)
        # Shared side of the blob store lock: 'gc' (exclusive) never deletes under a fetch.
        with ws.rw_lock("blobs", exclusive=False):
            t0 = time.time()
            copy = server_copy(ws, rec)
            source = copy.describe()
            label = f"fetching {rec.ref}"
            with contextlib.ExitStack() as stack:
                bar = stack.enter_context(progress(label, rec.size)) if progress else None
                if copy.url is not None:
                    chunks = _chunks_http(ws, rec, copy.url)
                elif copy.path is not None:
                    if not copy.path.is_file():
                        raise RegistryError(f"{rec.ref}: its blob is missing from {ws.blobs_dir} and from the "
                                            f"tracking store ({copy.path})")
                    chunks = _chunks_file(copy.path)
                else:
                    chunks = _chunks_file(stack.enter_context(_mlflow_download(ws, rec, copy.uri or "")))
                _write_verified(rec, chunks, path, bar, source)
            seconds = time.time() - t0
    _log_fetch(ws, rec, seconds, source)
    return FetchResult(path, True, seconds)

