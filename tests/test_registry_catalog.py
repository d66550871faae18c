"""Catalog schema: Alembic migrations from empty, idempotence, models == migrations."""

from __future__ import annotations

import sqlite3

import pytest

from lbm_registry.registry import schema
from lbm_registry.registry.workspace import Workspace
from lbm_registry.settings import WorkspaceSettings

TABLES = {"assets", "versions", "lineage", "lora_facts", "layer_errors", "aliases", "tags", "events", "registry_info",
          "file_hashes", "alembic_version"}


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_migrations_from_empty_and_idempotent(tmp_path):
    s = WorkspaceSettings(home=tmp_path / "home")
    assert Workspace.open_existing(s) is None  # reads never create a workspace
    assert not s.home.exists()
    with Workspace.open(s) as ws:
        assert schema.current_revision(ws.db) == schema.SCHEMA_HEAD
    db = s.home / "catalog.db"
    assert TABLES <= _tables(db)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    before = db.stat().st_mtime_ns
    for _ in range(2):  # idempotent: opening again neither migrates nor fails
        with Workspace.open(s) as ws:
            assert schema.current_revision(ws.db) == schema.SCHEMA_HEAD
            ws.db.query("SELECT count(*) FROM versions")
    assert TABLES <= _tables(db)
    assert s.blobs_dir.is_dir()
    assert db.stat().st_mtime_ns >= before


def test_upgrade_runs_when_database_is_behind(tmp_path):
    s = WorkspaceSettings(home=tmp_path / "home")
    Workspace.open(s).close()
    with sqlite3.connect(s.home / "catalog.db") as c:  # simulate an empty DB from another tool
        for t in TABLES:
            c.execute(f"DROP TABLE IF EXISTS {t}")
    with Workspace.open(s) as ws:
        assert schema.current_revision(ws.db) == schema.SCHEMA_HEAD
    assert TABLES <= _tables(s.home / "catalog.db")


def test_schema_head_constant_matches_alembic():
    assert schema.alembic_head() == schema.SCHEMA_HEAD


def test_models_match_migrations(tmp_path):
    """The SQLAlchemy models and the Alembic scripts describe the same schema."""
    from fixtures.registry import schema_diff

    s = WorkspaceSettings(home=tmp_path / "home")
    Workspace.open(s).close()
    assert schema_diff(s.effective_catalog_url) == []


def test_concurrent_first_open_migrates_once(tmp_path):
    """Several processes opening a fresh workspace at once: one migrates, none crash."""
    import subprocess
    import sys

    home = tmp_path / "home"
    code = ("from lbm_registry.settings import WorkspaceSettings as S;"
            "from lbm_registry.registry.workspace import Workspace as W;"
            f"W.open(S(home=__import__('pathlib').Path({str(home)!r}))).close()")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    with sqlite3.connect(home / "catalog.db") as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [(schema.SCHEMA_HEAD,)]


@pytest.mark.parametrize("url,expected", [
    ("sqlite:////abs/catalog.db", "/abs/catalog.db"),
    ("sqlite:///rel.db", "rel.db"),
    ("sqlite:///:memory:", None),
    ("postgresql+psycopg://u:p@host/db", None),
])
def test_sqlite_path(url, expected):
    from lbm_registry.registry.db import sqlite_path

    got = sqlite_path(url)
    assert (str(got) if got else None) == expected
