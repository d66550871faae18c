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

import random
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lbm_registry.errors import RegistryError

BUSY_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 60
CONNECT_TIMEOUT_S = 10

Params = Mapping[str, Any] | None

#: PostgreSQL SQLSTATEs of a lost race: unique_violation, serialization_failure,
#: deadlock_detected, lock_not_available.
RACE_SQLSTATES = {"23505", "40001", "40P01", "55P03"}
_RACE_WORDS = ("unique constraint", "locked", "busy", "deadlock", "could not serialize")


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

    @property
    def is_sqlite(self) -> bool:
        return self.path is not None

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    # -- connections -----------------------------------------------------------------------
    def _sqlite(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            self._conn = conn
        return self._conn

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
    @staticmethod
    def _sqlite_run(conn: sqlite3.Connection, sql: str, params: Any, mode: str) -> Any:
        with races_retryable():
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
        with races_retryable():
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield Tx(lambda sql, p, mode: self._sqlite_run(conn, sql, p, mode))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            with races_retryable():
                conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def with_retries(fn: Any, what: str) -> Any:
    """Run a transaction function until it does not lose a race (busy DB, taken number)."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return fn()
        except Retryable as exc:
            last = exc
            time.sleep(min(0.5, 0.01 * (attempt + 1)) * (0.5 + random.random()))
    raise RegistryError(f"{what}: the catalog stayed busy ({last})")
