"""A thin SQL executor over the catalog: stdlib ``sqlite3`` for SQLite, SQLAlchemy for the rest.

Why not SQLAlchemy everywhere: on the 2-core machines this runs on, ``import sqlalchemy``
alone takes ~0.45 s and ``sqlalchemy.orm`` ~0.55 s, which would eat the whole 0.7 s budget
of ``lbm-reg list``. The catalog therefore speaks portable SQL with ``:named`` parameters
(understood by both ``sqlite3`` and ``sqlalchemy.text``): SQLite URLs go through ``sqlite3``
(~10 ms to import), any other URL (PostgreSQL) through a SQLAlchemy engine. The schema itself
is owned by the SQLAlchemy models and the Alembic migrations.

Write transactions on SQLite start with ``BEGIN IMMEDIATE`` (the write lock is taken up front,
so two registrations serialise instead of deadlocking) and wait on a busy timeout; the file is
in WAL mode so readers never block writers. Lock and uniqueness failures surface as
:class:`Retryable` so callers can retry the whole transaction.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lbm_registry.errors import RegistryError

BUSY_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 60

Params = Mapping[str, Any] | None


class Retryable(Exception):
    """A transaction lost a race (unique violation, lock timeout): retry it from the start."""


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///path`` URL, or None for other databases / in-memory."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix):].split("?", 1)[0]
            return Path(rest) if rest and rest != ":memory:" else None
    return None


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text or "deadlock" in text or "could not serialize" in text


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
        self.url = url
        self.path = sqlite_path(url)
        self._conn: sqlite3.Connection | None = None
        self._engine: Any = None

    @property
    def is_sqlite(self) -> bool:
        return self.path is not None

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

            self._engine = create_engine(self.url, pool_pre_ping=True)
        return self._engine

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- sqlite3 ---------------------------------------------------------------------------
    @staticmethod
    def _sqlite_run(conn: sqlite3.Connection, sql: str, params: Any, mode: str) -> Any:
        try:
            if mode == "many":
                conn.executemany(sql, params)
                return None
            cur = conn.execute(sql, params or {})
            if mode == "count":
                return cur.rowcount
            return [dict(r) for r in cur.fetchall()]
        except sqlite3.IntegrityError as exc:
            raise Retryable(str(exc)) from exc
        except sqlite3.OperationalError as exc:
            if _is_lock_error(exc):
                raise Retryable(str(exc)) from exc
            raise

    # -- SQLAlchemy ------------------------------------------------------------------------
    @staticmethod
    def _sa_run(conn: Any, sql: str, params: Any, mode: str) -> Any:
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        try:
            if mode == "many":
                if params:
                    conn.execute(text(sql), params)
                return None
            res = conn.execute(text(sql), dict(params or {}))
            if mode == "count":
                return res.rowcount
            return [dict(r) for r in res.mappings().all()] if res.returns_rows else []
        except sa_exc.IntegrityError as exc:
            raise Retryable(str(exc.orig)) from exc
        except sa_exc.OperationalError as exc:
            if _is_lock_error(exc):
                raise Retryable(str(exc.orig)) from exc
            raise

    # -- public ----------------------------------------------------------------------------
    def reader(self) -> Tx:
        """Autocommit reads (each statement sees the latest committed state)."""
        if self.is_sqlite:
            conn = self._sqlite()
            return Tx(lambda sql, p, mode: self._sqlite_run(conn, sql, p, mode))

        def run(sql: str, p: Any, mode: str) -> Any:
            with self.engine().begin() as c:
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
        if self.is_sqlite:
            conn = self._sqlite()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_lock_error(exc):
                    raise Retryable(str(exc)) from exc
                raise
            try:
                yield Tx(lambda sql, p, mode: self._sqlite_run(conn, sql, p, mode))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                conn.execute("ROLLBACK")
                if _is_lock_error(exc):
                    raise Retryable(str(exc)) from exc
                raise
            return
        from sqlalchemy import exc as sa_exc

        try:
            with self.engine().begin() as c:
                yield Tx(lambda sql, p, mode: self._sa_run(c, sql, p, mode))
        except sa_exc.IntegrityError as exc:
            raise Retryable(str(exc.orig)) from exc
        except sa_exc.OperationalError as exc:
            if _is_lock_error(exc):
                raise Retryable(str(exc.orig)) from exc
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
