"""An opened registry workspace: the catalog connection, the blob store and the locks.

Opening is cheap when the workspace is up to date (one ``SELECT`` on ``alembic_version``), so
every facade call opens its own handle and closes it: no module-level state, and a process
can work with several workspaces at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lbm_registry.errors import RegistryError, StorageError
from lbm_registry.fileio import refusals_named
from lbm_registry.registry import schema
from lbm_registry.registry.db import Database, mask_url
from lbm_registry.settings import WorkspaceSettings

LOCK_TIMEOUT_S = 300.0


def actor() -> str:
    """``host:pid`` of this process, stored on pending rows so doctor can tell dead from busy."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}"


class Workspace:
    """Use as a context manager; :meth:`open` creates/upgrades, :meth:`open_existing` never writes."""

    def __init__(self, settings: WorkspaceSettings) -> None:
        self.settings = settings
        self.home = settings.home
        self.db = Database(settings.effective_catalog_url)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: WorkspaceSettings) -> Workspace:
        """Open for writing: create the folders and migrate the catalog to head if needed.
        A home this process may not write (a read-only mount) is refused in one line."""
        from lbm_registry.fileio import folder_problem

        if (why := folder_problem(settings.home)) is not None:  # a usage error, not a refusal of the machine
            raise RegistryError(f"cannot make a registry at {settings.home}: {why}")
        ws = cls(settings)
        try:
            ws.check_writable()
            with refusals_named(ws.home):
                ws.home.mkdir(parents=True, exist_ok=True)
                ws.settings.blobs_dir.mkdir(parents=True, exist_ok=True)
            ws.ensure_schema()
        except BaseException:
            ws.close()
            raise
        return ws

    @classmethod
    def open_existing(cls, settings: WorkspaceSettings) -> Workspace | None:
        """Open for reading, or None when there is no catalog yet (nothing is created).

        A catalog at an older revision is upgraded (reads must see the current schema)."""
        ws = cls(settings)
        if ws.db.is_sqlite and not ws.db.path.exists():
            return None
        try:
            ws.ensure_schema()
        except BaseException:
            ws.close()
            raise
        return ws

    @property
    def read_only(self) -> bool:
        """May this process not write the home (a read-only mount, a shared folder of another
        user)? Reading commands still work there; writing ones are refused in one line."""
        return read_only_home(self.home)

    def check_writable(self) -> None:
        """Refuse (StorageError, exit 1) to write to a home this process may not write: reading
        commands work on a read-only registry (a shared mount), writing ones stop here, first."""
        check_writable_home(self.home)

    def ensure_schema(self) -> None:
        if schema.current_revision(self.db) == schema.SCHEMA_HEAD:
            return
        self.home.mkdir(parents=True, exist_ok=True)
        with self.lock("catalog"):
            rev = schema.current_revision(self.db)  # someone may have migrated while we waited
            if rev == schema.SCHEMA_HEAD:
                return
            try:
                schema.upgrade(self.db)
            except RegistryError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RegistryError(
                    f"cannot migrate the catalog {mask_url(self.db.url)} from revision "
                    f"{rev or 'empty'} to {schema.SCHEMA_HEAD}: {first}") from None
            finally:
                # Alembic used a SQLAlchemy engine; the sqlite3 fast path reconnects on its own.
                if self.db.is_sqlite and self.db._engine is not None:
                    self.db._engine.dispose()
                    self.db._engine = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and locks -------------------------------------------------------------------
    @property
    def blobs_dir(self) -> Path:
        return self.settings.blobs_dir

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def staging_dir(self) -> Path:
        """Scratch space on the workspace's file system (so renames and hard links work)."""
        path = self.home / ".staging"
        with refusals_named(path):
            path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, name: str, timeout: float = LOCK_TIMEOUT_S) -> Any:
        """An inter-process file lock ``<home>/.locks/<name>.lock``."""
        from filelock import FileLock

        path = self.home / ".locks"
        self._lock_folder(path)
        return FileLock(str(path / f"{name}.lock"), timeout=timeout)

    def _lock_folder(self, path: Path) -> None:
        """``<home>/.locks``, made if needed; a read-only home is one StorageError, not a wait
        (a lock file that cannot be created looks like a lock held by someone else)."""
        with refusals_named(path):
            path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            self.check_writable()
            raise StorageError(f"cannot write {path}: permission denied")

    @contextmanager
    def rw_lock(self, name: str, *, exclusive: bool, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """A readers-writer inter-process lock ``<home>/.locks/<name>.rwlock`` (``flock``).

        Many processes may hold the shared side at once, the exclusive side waits for all of
        them. Used for the blob store: registrations hold it shared from their pending row to
        their stored blob, gc/doctor --repair hold it exclusively while they delete unreferenced
        blobs, so a blob another process is about to reuse is never deleted under it. The kernel
        releases the lock when its holder dies (kill -9 included).
        """
        import fcntl
        import time

        path = self.home / ".locks" / f"{name}.rwlock"
        self._lock_folder(path.parent)
        with refusals_named(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, op)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RegistryError(f"timed out after {timeout:.0f} s waiting for {path}") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def abspath(self, rel: str) -> Path:
        """Catalog paths are stored relative to the home so a workspace can be moved."""
        p = Path(rel)
        return p if p.is_absolute() else self.home / p


def read_only_home(home: Path) -> bool:
    """Is ``home`` (or, when it does not exist yet, the folder it would be made in) unwritable?"""
    for folder in (home, *home.parents):
        if folder.exists():
            return not (folder.is_dir() and os.access(folder, os.W_OK))
    return False


def check_writable_home(home: Path) -> None:
    """One StorageError (exit 1) naming the path when ``home`` cannot be written: checked before
    any long work by everything that registers or records."""
    if read_only_home(home):
        where = home if home.exists() else next(f for f in home.parents if f.exists())
        raise StorageError(f"the registry at {home} is read-only ({where} cannot be written): "
                           "this command needs to write there")


@contextmanager
def undone_if_new(home: Path | None, errors: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Run a block that may create the workspace ``home``; if it fails with one of ``errors``
    and ``home`` did not exist before (or was an empty folder), remove what it made there, so
    a failed first command (``init`` against an unreachable tracking server, a refused first
    registration) leaves no half-made workspace. Anything else in ``home`` is never touched."""
    existed: bool | None = None
    if home is not None:
        try:
            if not home.exists():
                existed = False
            elif home.is_dir() and not any(home.iterdir()):
                existed = True
        except OSError:
            existed = None
    try:
        yield
    except errors:
        if existed is not None and home is not None and home.is_dir():
            _empty(home, remove=not existed)
        raise


def _empty(home: Path, *, remove: bool) -> None:
    import shutil

    try:
        if remove:
            shutil.rmtree(home, ignore_errors=True)
            return
        for child in home.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    except OSError:
        pass
