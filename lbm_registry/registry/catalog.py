"""Catalog queries: versions, lineage, LoRA facts, layers, aliases, tags, events, hash cache.

Plain portable SQL over :class:`~lbm_registry.registry.db.Database` (see that module for why).
Every read that users can see filters on ``status = 'ready'``: pending and failed rows are
invisible except to doctor/gc.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from lbm_registry.errors import RegistryError
from lbm_registry.registry.db import Database, Tx

KINDS = ("base", "model", "lora")
ROLES = ("base", "tuned", "parent", "dataset")

VERSION_SELECT = """
SELECT v.id, v.asset_id, a.name, a.kind, v.number, v.status, v.sha256, v.size, v.dtype, v.blob_path,
       v.file_name, v.mlflow_run_id, v.mlflow_version, v.created_at, v.tool_version, v.config_json,
       v.facts_json, v.params_json, v.metrics_json, v.owner, v.integrity, v.error
FROM versions v JOIN assets a ON a.id = v.asset_id
"""


def now() -> float:
    return time.time()


def dumps(obj: Any) -> str:
    """JSON for the catalog: sorted keys, and anything odd (Paths, numpy scalars) as str."""
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    for attr in ("item", "tolist"):  # numpy / torch scalars and arrays
        fn = getattr(obj, attr, None)
        if callable(fn):
            try:
                return fn()
            except (TypeError, ValueError):
                pass
    return str(obj)


@dataclass
class VersionRecord:
    """One row of ``versions`` joined with its asset."""

    id: int
    asset_id: int
    name: str
    kind: str
    number: int
    status: str
    sha256: str
    size: int
    dtype: str | None
    blob_path: str
    file_name: str | None
    mlflow_run_id: str | None
    mlflow_version: str | None
    created_at: float
    tool_version: str
    config_json: str | None
    facts_json: str
    params_json: str
    metrics_json: str
    owner: str | None
    integrity: str
    error: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"

    @property
    def config(self) -> dict[str, Any] | None:
        return json.loads(self.config_json) if self.config_json else None

    @property
    def facts(self) -> dict[str, Any]:
        return json.loads(self.facts_json or "{}")

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json or "{}")

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_json or "{}")


def _record(row: dict[str, Any] | None) -> VersionRecord | None:
    return VersionRecord(**row) if row else None


# -- the catalog itself --------------------------------------------------------------------
def catalog_id(db: Database | Tx) -> str:
    """This catalog's identity (a UUID made by migration 0002), tagged on its MLflow mirror."""
    value = db.scalar("SELECT value FROM registry_info WHERE key = 'catalog_id'")
    if not value:
        raise RegistryError("the catalog has no catalog_id (registry_info): run 'lbm-reg init' to upgrade it")
    return value


# -- assets and versions -------------------------------------------------------------------
def asset(db: Database | Tx, name: str) -> dict[str, Any] | None:
    return db.first("SELECT id, name, kind, created_at FROM assets WHERE name = :n", {"n": name})


def asset_names(db: Database | Tx) -> list[str]:
    return [r["name"] for r in db.query("SELECT name FROM assets ORDER BY name")]


def version_by_id(db: Database | Tx, version_id: int) -> VersionRecord | None:
    return _record(db.first(VERSION_SELECT + " WHERE v.id = :id", {"id": version_id}))


def version(db: Database | Tx, name: str, number: int, *, ready_only: bool = True) -> VersionRecord | None:
    sql = VERSION_SELECT + " WHERE a.name = :n AND v.number = :num"
    if ready_only:
        sql += " AND v.status = 'ready'"
    return _record(db.first(sql, {"n": name, "num": number}))


def latest(db: Database | Tx, name: str) -> VersionRecord | None:
    return _record(db.first(
        VERSION_SELECT + " WHERE a.name = :n AND v.status = 'ready' ORDER BY v.number DESC LIMIT 1", {"n": name}))


def ready_numbers(db: Database | Tx, name: str) -> list[int]:
    rows = db.query("SELECT v.number FROM versions v JOIN assets a ON a.id = v.asset_id "
                    "WHERE a.name = :n AND v.status = 'ready' ORDER BY v.number", {"n": name})
    return [r["number"] for r in rows]


def versions_by_sha_prefix(db: Database | Tx, prefix: str) -> list[VersionRecord]:
    rows = db.query(VERSION_SELECT + " WHERE v.sha256 LIKE :p AND v.status = 'ready' ORDER BY v.created_at, v.id",
                    {"p": prefix + "%"})
    return [VersionRecord(**r) for r in rows]


def versions_by_sha(db: Database | Tx, sha256: str) -> list[VersionRecord]:
    rows = db.query(VERSION_SELECT + " WHERE v.sha256 = :s AND v.status = 'ready' ORDER BY v.created_at, v.id",
                    {"s": sha256})
    return [VersionRecord(**r) for r in rows]


def versions_by_fact(db: Database | Tx, key: str, value: str) -> list[VersionRecord]:
    """Ready versions whose top-level fact ``key`` is the string ``value`` (hashes: exact text
    match on the sorted-keys JSON that :func:`dumps` writes)."""
    pattern = "%" + json.dumps({key: value})[1:-1] + "%"
    rows = db.query(VERSION_SELECT + " WHERE v.facts_json LIKE :p AND v.status = 'ready' "
                    "ORDER BY v.created_at, v.id", {"p": pattern})
    return [VersionRecord(**r) for r in rows]


def versions_by_tensor_sha(db: Database | Tx, tensor_sha256: str) -> list[VersionRecord]:
    """Ready versions whose tensor bytes have this sha256 (``facts.tensor_sha256``)."""
    return versions_by_fact(db, "tensor_sha256", tensor_sha256)


def all_versions(db: Database | Tx, *, status: str | None = None) -> list[VersionRecord]:
    sql = VERSION_SELECT
    params: dict[str, Any] = {}
    if status:
        sql += " WHERE v.status = :st"
        params["st"] = status
    rows = db.query(sql + " ORDER BY a.name, v.number", params)
    return [VersionRecord(**r) for r in rows]


def list_latest(db: Database | Tx, kind: str | None = None) -> list[dict[str, Any]]:
    """Each asset with its latest ready version and version count (assets with none are hidden)."""
    sql = """
    SELECT a.name, a.kind, v.number, v.sha256, v.size, v.dtype, v.created_at, v.id AS version_id,
           (SELECT count(*) FROM versions v2 WHERE v2.asset_id = a.id AND v2.status = 'ready') AS n_versions
    FROM assets a JOIN versions v ON v.asset_id = a.id
    WHERE v.status = 'ready' AND v.number = (
        SELECT max(v3.number) FROM versions v3 WHERE v3.asset_id = a.id AND v3.status = 'ready')
    """
    params: dict[str, Any] = {}
    if kind:
        sql += " AND a.kind = :k"
        params["k"] = kind
    return db.query(sql + " ORDER BY a.kind, a.name", params)


# -- lineage, facts, layers, tags ----------------------------------------------------------
def edges(db: Database | Tx, version_id: int) -> list[dict[str, Any]]:
    """Outgoing lineage edges of a version (what it was made from), with the target's ref."""
    return db.query("""
    SELECT l.role, l.sha256, l.ref, l.path, l.target_version_id, a.name AS target_name, a.kind AS target_kind,
           v.number AS target_number, v.status AS target_status
    FROM lineage l LEFT JOIN versions v ON v.id = l.target_version_id LEFT JOIN assets a ON a.id = v.asset_id
    WHERE l.version_id = :id ORDER BY l.id""", {"id": version_id})


def children(db: Database | Tx, version_id: int) -> list[dict[str, Any]]:
    """Ready versions that name this one in their lineage, with the role they use it in."""
    return db.query("""
    SELECT l.role, v.id AS version_id, a.name, a.kind, v.number, v.sha256
    FROM lineage l JOIN versions v ON v.id = l.version_id JOIN assets a ON a.id = v.asset_id
    WHERE l.target_version_id = :id AND v.status = 'ready' ORDER BY a.name, v.number""", {"id": version_id})


def lora_facts(db: Database | Tx, version_id: int) -> dict[str, Any] | None:
    row = db.first("SELECT rank, conv_rank, policy, alpha, file_size, mean_error, max_error, functional_error, "
                   "n_layers, n_skipped FROM lora_facts WHERE version_id = :id", {"id": version_id})
    return row


def layers(db: Database | Tx, version_id: int) -> list[dict[str, Any]]:
    return db.query("SELECT module, kind, shape, rank, rel_error, energy FROM layer_errors "
                    "WHERE version_id = :id ORDER BY id", {"id": version_id})


def tags(db: Database | Tx, version_id: int) -> dict[str, str]:
    return {r["key"]: r["value"] for r in db.query(
        "SELECT key, value FROM tags WHERE version_id = :id ORDER BY key", {"id": version_id})}


# -- aliases -------------------------------------------------------------------------------
def aliases_of_asset(db: Database | Tx, name: str) -> dict[str, int]:
    rows = db.query("""
    SELECT al.alias, v.number FROM aliases al JOIN assets a ON a.id = al.asset_id
    JOIN versions v ON v.id = al.version_id WHERE a.name = :n AND v.status = 'ready' ORDER BY al.alias""",
                    {"n": name})
    return {r["alias"]: r["number"] for r in rows}


def alias_target(db: Database | Tx, name: str, alias: str) -> int | None:
    return db.scalar("""
    SELECT v.number FROM aliases al JOIN assets a ON a.id = al.asset_id JOIN versions v ON v.id = al.version_id
    WHERE a.name = :n AND al.alias = :al AND v.status = 'ready'""", {"n": name, "al": alias})


def set_alias(tx: Tx, rec: VersionRecord, alias: str) -> int | None:
    """Point ``alias`` at ``rec``; returns the version number it pointed at before."""
    old = tx.first("SELECT al.id, v.number FROM aliases al JOIN versions v ON v.id = al.version_id "
                   "WHERE al.asset_id = :a AND al.alias = :al", {"a": rec.asset_id, "al": alias})
    if old:
        tx.execute("UPDATE aliases SET version_id = :v, updated_at = :t WHERE id = :id",
                   {"v": rec.id, "t": now(), "id": old["id"]})
        return old["number"]
    tx.execute("INSERT INTO aliases (asset_id, alias, version_id, updated_at) VALUES (:a, :al, :v, :t)",
               {"a": rec.asset_id, "al": alias, "v": rec.id, "t": now()})
    return None


def remove_alias(tx: Tx, name: str, alias: str) -> int | None:
    row = tx.first("SELECT al.id, v.number FROM aliases al JOIN assets a ON a.id = al.asset_id "
                   "JOIN versions v ON v.id = al.version_id WHERE a.name = :n AND al.alias = :al",
                   {"n": name, "al": alias})
    if not row:
        return None
    tx.execute("DELETE FROM aliases WHERE id = :id", {"id": row["id"]})
    return row["number"]


# -- events --------------------------------------------------------------------------------
def log_event(tx: Tx, action: str, *, name: str | None = None, number: int | None = None,
              sha256: str | None = None, actor: str | None = None, detail: Any = None) -> None:
    """Append to the audit log (never updated or deleted)."""
    tx.execute("INSERT INTO events (at, action, name, number, sha256, actor, detail) "
               "VALUES (:at, :ac, :n, :num, :s, :who, :d)",
               {"at": now(), "ac": action, "n": name, "num": number, "s": sha256, "who": actor,
                "d": None if detail is None else dumps(detail)})


def events(db: Database | Tx, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    sql = "SELECT at, action, name, number, sha256, actor, detail FROM events"
    params: dict[str, Any] = {"lim": limit}
    if name:
        sql += " WHERE name = :n"
        params["n"] = name
    return db.query(sql + " ORDER BY id DESC LIMIT :lim", params)


# -- deletion (doctor / gc only) -----------------------------------------------------------
def delete_version(tx: Tx, version_id: int) -> None:
    """Remove a never-visible (pending/failed) version and everything hanging off it."""
    for table in ("lineage", "lora_facts", "layer_errors", "tags", "aliases"):
        tx.execute(f"DELETE FROM {table} WHERE version_id = :id", {"id": version_id})
    tx.execute("UPDATE lineage SET target_version_id = NULL WHERE target_version_id = :id", {"id": version_id})
    tx.execute("DELETE FROM versions WHERE id = :id", {"id": version_id})


def delete_empty_assets(tx: Tx) -> int:
    return tx.execute("DELETE FROM assets WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.asset_id = assets.id)")


def referenced_shas(db: Database | Tx) -> set[str]:
    """Hashes any catalog row (of any status) still points at: blobs gc must keep."""
    return {r["sha256"] for r in db.query("SELECT DISTINCT sha256 FROM versions")}


# -- hash cache ----------------------------------------------------------------------------
def cached_hash(db: Database | Tx, path: str, size: int, mtime_ns: int) -> str | None:
    return db.scalar("SELECT sha256 FROM file_hashes WHERE path = :p AND size = :s AND mtime_ns = :m",
                     {"p": path, "s": size, "m": mtime_ns})


def remember_hash(tx: Tx, path: str, size: int, mtime_ns: int, sha256: str) -> None:
    tx.execute("DELETE FROM file_hashes WHERE path = :p", {"p": path})
    tx.execute("INSERT INTO file_hashes (path, size, mtime_ns, sha256, checked_at) VALUES (:p, :s, :m, :h, :t)",
               {"p": path, "s": size, "m": mtime_ns, "h": sha256, "t": now()})
