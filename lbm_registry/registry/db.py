"""A thin SQL executor over the catalog: stdlib ``sqlite3`` for SQLite, SQLAlchemy for the rest.

Why not SQLAlchemy everywhere: on the 2-core machines this runs on, ``import sqlalchemy``
alone takes ~0.45 s and ``sqlalchemy.orm`` ~0.55 s, which would eat the whole 0.7 s budget
of ``lbm-reg list``. The catalog therefore speaks portable SQL with ``:named`` parameters
(understood by both ``sqlite3`` and ``sqlalchemy.text``): SQLite URLs go through ``sqlite3``
(~10 ms to import), any other URL (PostgreSQL) through a SQLAlchemy engine. The schema itself
is owned by the SQLAlchemy models and the Alembic migrations.

Write transactions on SQLite start with ``BEGIN IMMEDIATE`` (the write lock is taken up front,
so two registrations serialise instead of deadlocking) and wait on a busy timeout; the file is
in WAL mode so readers never block writers. A transaction that lost a race (unique violation,
lock or busy timeout, deadlock, serialization failure) surfaces as :class:`Retryable` so callers
can retry it whole; any other database error is a bug or a real failure and is raised as is.
A catalog server that cannot be reached, or whose driver is not installed, is a one-line
:class:`~lbm_registry.errors.RegistryError` (with the password masked).
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lbm_registry.errors import LBMError, RegistryError, StorageError

BUSY_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 60
CONNECT_TIMEOUT_S = 10

Params = Mapping[str, Any] | None

#: PostgreSQL SQLSTATEs of a lost race: unique_violation, serialization_failure,
#: deadlock_detected, lock_not_available.
RACE_SQLSTATES = {"23505", "40001", "40P01", "55P03"}
_RACE_WORDS = ("unique constraint", "locked", "busy", "deadlock", "could not serialize")


_DAMAGE_WORDS = ("not a database", "malformed", "unsupported file format", "database corrupt")


def sqlite_damage(exc: BaseException) -> str | None:
    """The first line of a SQLite error that says the file itself is damaged (not a database,
    malformed), else None: a damaged store gets its own one-line refusal, never a traceback."""
    if not isinstance(exc, sqlite3.DatabaseError):
        orig = getattr(exc, "orig", None)
        if not isinstance(orig, sqlite3.DatabaseError):
            return None
        exc = orig
    text = str(exc).strip()
    return text.splitlines()[0] if any(w in text.lower() for w in _DAMAGE_WORDS) else None


def damaged_sqlite_file(path: Path) -> str | None:
    """Why the SQLite file at ``path`` cannot be read as a database (one line), else None.
    Cheap (one query on a read-only connection); a missing file is not damaged."""
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error:
        return None
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        return sqlite_damage(exc)
    finally:
        conn.close()
    return None


def damaged_mlflow_store(uri: str) -> tuple[Path, str] | None:
    """(file, why) when ``uri`` is a local SQLite MLflow store that is not a readable database."""
    path = sqlite_path(uri) if uri.startswith("sqlite") else None
    damage = damaged_sqlite_file(path) if path is not None else None
    return (path, damage) if path is not None and damage is not None else None


def damaged_mlflow_error(path: Path, damage: str) -> StorageError:
    """The one line for a damaged MLflow store: the file, and the way out."""
    return StorageError(f"the MLflow store {path} is damaged ({damage}): 'lbm-reg doctor --repair' sets it "
                        "aside and rebuilds it from the catalog")


#: Less free space than this and a failing SQLite open is taken for a full disk.
FULL_BELOW_BYTES = 1 << 20


def disk_full(folder: Path) -> bool:
    """Is the file system of ``folder`` (all but) full?"""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def _wal_pending(path: Path) -> bool:
    """Does the database have a write-ahead log with frames not yet in the main file? (Then a
    reader that ignores the log, an immutable one, would see old data.)"""
    wal = Path(f"{path}-wal")
    try:
        return wal.stat().st_size > 0
    except OSError:
        return False


def writable(path: Path) -> bool:
    """Can this process write the SQLite file at ``path`` and create its journal files next to it?
    (False on a read-only mount, and for a folder the user may not write: root may write anyway.)"""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


class Retryable(Exception):
    """A transaction lost a race (unique violation, lock timeout): retry it from the start."""


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///path`` URL, or None for other databases / in-memory."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix):].split("?", 1)[0]
            return Path(rest) if rest and rest != ":memory:" else None
    return None


def mask_url(url: str) -> str:
    """Hide a password in a database/tracking URL."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def normalize_url(url: str) -> str:
    """``postgres://`` (common in ``DATABASE_URL``-style settings) is ``postgresql://`` to SQLAlchemy."""
    return "postgresql://" + url[len("postgres://"):] if url.startswith("postgres://") else url


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]


def _is_db_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded whenever SQLAlchemy ran the statement
    return sa_exc is not None and isinstance(exc, sa_exc.DBAPIError)


def lost_race(exc: BaseException) -> bool:
    """Did this database error come from a concurrent transaction (so a retry can succeed)?

    PostgreSQL says so with a SQLSTATE; SQLite (stdlib or under SQLAlchemy) only in words."""
    if not _is_db_error(exc):
        return False
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state:
        return state in RACE_SQLSTATES
    text = str(orig).lower()
    return any(word in text for word in _RACE_WORDS)


@contextmanager
def races_retryable() -> Iterator[None]:
    """The one place database errors are translated: lost races become :class:`Retryable`."""
    try:
        yield
    except Retryable:
        raise
    except Exception as exc:
        if lost_race(exc):
            raise Retryable(_first_line(exc)) from exc
        raise


class Tx:
    """One open transaction (or autocommit reads outside one)."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def query(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        return self._run(sql, params, "all")

    def first(self, sql: str, params: Params = None) -> dict[str, Any] | None:
        rows = self._run(sql, params, "all")
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Params = None) -> Any:
        row = self.first(sql, params)
        return None if row is None else next(iter(row.values()))

    def execute(self, sql: str, params: Params = None) -> int:
        """Run a statement; returns the affected row count."""
        return self._run(sql, params, "count")

    def executemany(self, sql: str, rows: Iterable[Mapping[str, Any]]) -> None:
        self._run(sql, list(rows), "many")


class Database:
    """Open lazily, close explicitly. One instance per workspace handle; never shared globally."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.path = sqlite_path(self.url)
        self._conn: sqlite3.Connection | None = None
        self._engine: Any = None
        #: the SQLite catalog was opened read-only (a read-only home, or a full disk: ``full``):
        #: reads work, writes are refused in one line
        self.read_only = False
        self.full = False

    @property
    def is_sqlite(self) -> bool:
        return self.path is not None

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    # -- connections -----------------------------------------------------------------------
    def _sqlite(self) -> sqlite3.Connection:
        if self._conn is None:
            assert self.path is not None
            with self._translated():
                try:
                    self._conn = self._sqlite_connect(str(self.path), uri=False)
                except sqlite3.OperationalError:
                    if not self.path.is_file():
                        raise
                    if not writable(self.path):
                        self._conn = self._read_only_connection()
                    elif disk_full(self.path.parent) and not _wal_pending(self.path):
                        # no room for the WAL index a reader needs: reads still work, writes say why
                        self._conn = self._sqlite_connect(f"{self.path.absolute().as_uri()}?immutable=1", uri=True)
                        self.read_only, self.full = True, True
                    else:
                        raise
        return self._conn

    @staticmethod
    def _sqlite_connect(target: str, *, uri: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the file (and its WAL) now
        except BaseException:
            conn.close()
            raise
        return conn

    def _read_only_connection(self) -> sqlite3.Connection:
        """A catalog in a folder this process may not write (a shared, mounted registry). A WAL
        database needs its ``-shm`` index: read-only mode uses the writer's when there is one; with
        none (nobody writes there, nor can) the file is opened as immutable."""
        assert self.path is not None
        uri = self.path.absolute().as_uri()
        try:
            conn = self._sqlite_connect(f"{uri}?mode=ro", uri=True)
        except sqlite3.OperationalError:
            conn = self._sqlite_connect(f"{uri}?immutable=1", uri=True)
        self.read_only = True
        return conn

    def read_only_error(self) -> StorageError:
        """The refusal of a write to a catalog opened read-only."""
        if self.full:
            return StorageError(f"cannot write the catalog {self.path}: No space left on device")
        home = self.path.parent if self.path is not None else "?"
        return StorageError(f"the registry at {home} is read-only ({self.path} cannot be written): "
                            "this command needs to write there")

    def _sqlite_problem(self, exc: sqlite3.DatabaseError) -> LBMError | None:
        """One line for what is wrong with the catalog file itself (damaged, disk full, read-only)."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        low = text.lower()
        if (damage := sqlite_damage(exc)) is not None:
            return StorageError(f"the catalog {self.path} is damaged ({damage}): restore it from a backup, "
                                f"then run 'lbm-reg doctor'")
        if "disk is full" in low or ("disk i/o error" in low and self.path is not None
                                     and disk_full(self.path.parent)):
            return StorageError(f"cannot write the catalog {self.path}: {text} (no space left on device)")
        if "readonly" in low or "read-only" in low or (
                "unable to open" in low and self.path is not None and not writable(self.path)):
            return self.read_only_error()
        return None

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite errors about the file itself become one-line LBMErrors naming it."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            problem = self._sqlite_problem(exc)
            if problem is None:
                raise
            raise problem from None

    def engine(self) -> Any:
        """The SQLAlchemy engine (non-SQLite catalogs, and Alembic). Imported on demand."""
        if self._engine is None:
            from sqlalchemy import create_engine
            from sqlalchemy.exc import ArgumentError, NoSuchModuleError

            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if self.is_postgres:  # fail in seconds, not after the OS's TCP timeout
                kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
            try:
                self._engine = create_engine(self.url, **kwargs)
            except (ImportError, NoSuchModuleError, ArgumentError) as exc:
                hint = (" (install the driver: pip install 'lbm-registry[postgres]', and use "
                        "postgresql:// or postgresql+psycopg://)") if self.is_postgres else ""
                raise RegistryError(f"cannot use the catalog {mask_url(self.url)}: {_first_line(exc)}{hint}") from None
        return self._engine

    @contextmanager
    def _sa_begin(self) -> Iterator[Any]:
        """A connection in a transaction; a server that cannot be reached is a one-line error."""
        from sqlalchemy import exc as sa_exc

        try:
            conn = self.engine().connect()
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise RegistryError(f"cannot connect to the catalog {mask_url(self.url)}: {_first_line(exc)}") from None
        try:
            with conn.begin():
                yield conn
        finally:
            conn.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- running statements ----------------------------------------------------------------
    def _sqlite_run(self, conn: sqlite3.Connection, sql: str, params: Any, mode: str) -> Any:
        with self._translated(), races_retryable():
            if mode == "many":
                conn.executemany(sql, params)
                return None
            cur = conn.execute(sql, params or {})
            if mode == "count":
                return cur.rowcount
            return [dict(r) for r in cur.fetchall()]

    @staticmethod
    def _sa_run(conn: Any, sql: str, params: Any, mode: str) -> Any:
        from sqlalchemy import text

        with races_retryable():
            if mode == "many":
                if params:
                    conn.execute(text(sql), params)
                return None
            res = conn.execute(text(sql), dict(params or {}))
            if mode == "count":
                return res.rowcount
            return [dict(r) for r in res.mappings().all()] if res.returns_rows else []

    # -- public ----------------------------------------------------------------------------
    def reader(self) -> Tx:
        """Autocommit reads (each statement sees the latest committed state)."""
        if self.is_sqlite:
            conn = self._sqlite()
            return Tx(lambda sql, p, mode: self._sqlite_run(conn, sql, p, mode))

        def run(sql: str, p: Any, mode: str) -> Any:
            with self._sa_begin() as c:
                return self._sa_run(c, sql, p, mode)

        return Tx(run)

    def query(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        return self.reader().query(sql, params)

    def first(self, sql: str, params: Params = None) -> dict[str, Any] | None:
        return self.reader().first(sql, params)

    def scalar(self, sql: str, params: Params = None) -> Any:
        return self.reader().scalar(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """All-or-nothing: commit when the block ends, roll back on any exception."""
        if not self.is_sqlite:
            with races_retryable(), self._sa_begin() as c:  # commit-time conflicts are races too
                yield Tx(lambda sql, p, mode: self._sa_run(c, sql, p, mode))
            return
        conn = self._sqlite()
        if self.read_only:
            raise self.read_only_error()
        with self._translated(), races_retryable():
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield Tx(lambda sql, p, mode: self._sqlite_run(conn, sql, p, mode))
        except BaseException:
            _rollback(conn)
            raise
        try:
            with self._translated(), races_retryable():
                conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back what is open; SQLite may have done it already (a full disk, an I/O error)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def with_retries(fn: Any, what: str) -> Any:
    """Run a transaction function until it does not lose a race (busy DB, taken number)."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return fn()
        except Retryable as exc:
            last = exc
            time.sleep(min(0.5, 0.01 * (attempt + 1)) * (0.5 + random.random()))
    raise RegistryError(f"{what}: the catalog stayed busy ({last})")
