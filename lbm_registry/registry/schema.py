"""Catalog schema version: a cheap check on every open, Alembic only when an upgrade is due.

The database's revision (``alembic_version`` table) is compared with :data:`SCHEMA_HEAD` using
the connection we already have; Alembic and SQLAlchemy (~0.6 s of imports) are loaded only
when the catalog is new or behind. Upgrades run under a file lock in the workspace, so several
processes opening a fresh workspace at once migrate it exactly once; on PostgreSQL also under a
transaction-level advisory lock, because machines sharing one catalog server do not share that
file lock.
"""

from __future__ import annotations

from pathlib import Path

from lbm_registry.errors import RegistryError
from lbm_registry.registry.db import Database

#: The newest revision in ``lbm_registry/registry/migrations/versions``. Bump it with every new migration script
#: (``tests/test_registry_catalog.py`` checks it equals Alembic's head).
SCHEMA_HEAD = "0002"

#: ``pg_advisory_xact_lock`` key held while migrating a PostgreSQL catalog (any fixed number).
PG_MIGRATION_LOCK = 0x4C424D52  # "LBMR"


def migrations_dir() -> Path:
    """The Alembic scripts, shipped inside the package (``lbm_registry/registry/migrations``), so
    a plain ``pip install`` can create and upgrade a catalog, not only an editable checkout."""
    path = Path(__file__).resolve().parent / "migrations"
    if not (path / "env.py").is_file():
        raise RegistryError(f"Alembic migrations not found at {path} (a broken install: reinstall lbm-registry)")
    return path


def current_revision(db: Database) -> str | None:
    """The revision the catalog is at; None for an empty (or missing) database."""
    if db.is_sqlite:
        if not db.path.exists() or db.path.stat().st_size == 0:
            return None
        has = db.scalar("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='alembic_version'")
        if not has:
            return None
        return db.scalar("SELECT version_num FROM alembic_version")
    try:
        return db.scalar("SELECT version_num FROM alembic_version")
    except Exception as exc:
        if _missing_table(exc):  # a fresh, empty database
            return None
        raise


def _missing_table(exc: BaseException) -> bool:
    """``alembic_version`` does not exist (PostgreSQL: SQLSTATE 42P01; SQLite: 'no such table')."""
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "sqlstate", None) == "42P01" or getattr(orig, "pgcode", None) == "42P01":
        return True
    text = str(orig).lower()
    return "no such table" in text or ("alembic_version" in text and "does not exist" in text)


def upgrade(db: Database) -> None:
    """Run ``alembic upgrade head`` on the catalog (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    engine = db.engine()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Held until this transaction ends; Alembic then reads alembic_version afresh, so a
            # process that waited here finds the work done (DDL is transactional on PostgreSQL).
            from sqlalchemy import text

            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    if db.is_sqlite:
        # WAL: readers never block the writer and vice versa. Persistent, so set once here.
        db.reader().query("PRAGMA journal_mode=WAL")


def alembic_head() -> str | None:
    """Alembic's own idea of the head revision (used by tests to guard SCHEMA_HEAD)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(cfg).get_current_head()
