"""Aliases (``relight@prod``): movable names for versions, kept in the catalog and mirrored
to MLflow registered-model aliases (best effort: the catalog is the source of truth)."""

from __future__ import annotations

import difflib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lbm_registry.errors import LBMError, RefError, RegistryError, StorageError
from lbm_registry.registry import catalog, refs
from lbm_registry.registry.db import sqlite_path, with_retries
from lbm_registry.registry.mlflow_sqlite import SqliteMirror
from lbm_registry.registry.workspace import Workspace, actor


def validate_alias(alias: str) -> None:
    """Aliases follow the name rules, and may not shadow ``latest``, ``vN`` or ``N``."""
    if refs.is_reserved_alias(alias or ""):
        raise RegistryError(f"{alias!r} is reserved (latest, vN and numbers already select versions)")
    problem = refs.name_problem(alias or "", "alias")
    if problem:
        raise RegistryError(problem)


def set_alias(ws: Workspace, ref: str, alias: str) -> dict[str, Any]:
    validate_alias(alias)
    res = refs.resolve(ws, str(ref))
    if res.record is None:
        raise RefError(f"{ref} is an unregistered file: aliases name registered versions")
    rec = res.record

    def txn() -> int | None:
        with ws.db.transaction() as tx:
            old = catalog.set_alias(tx, rec, alias)
            catalog.log_event(tx, "alias_set", name=rec.name, number=rec.number, sha256=rec.sha256,
                              actor=actor(), detail={"alias": alias, "previous": old})
            return old

    previous = with_retries(txn, f"setting alias {alias}")
    try:
        with _storage_refusals(ws):
            fast = SqliteMirror.open(ws)
            if fast is None or not fast.set_alias(rec, alias):
                _mirror(ws, lambda t: t.set_alias(rec, alias))
    except StorageError:  # a full disk or a read-only store: nothing changes, one line says why
        _put_back(ws, rec.name, alias, previous)
        raise
    return {"name": rec.name, "alias": alias, "version": rec.number, "previous": previous}


def remove_alias(ws: Workspace, name: str, alias: str) -> dict[str, Any]:
    if catalog.asset(ws.db, name) is None:
        close = difflib.get_close_matches(name, catalog.asset_names(ws.db), n=3, cutoff=0.5)
        raise RefError(f"unknown asset {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))

    def txn() -> int | None:
        with ws.db.transaction() as tx:
            old = catalog.remove_alias(tx, name, alias)
            if old is not None:
                catalog.log_event(tx, "alias_rm", name=name, number=old, actor=actor(), detail={"alias": alias})
            return old

    old = with_retries(txn, f"removing alias {alias}")
    if old is None:
        have = list(catalog.aliases_of_asset(ws.db, name))
        raise RefError(f"{name} has no alias {alias!r}" + (f" (aliases: {', '.join(have)})" if have else ""))
    try:
        with _storage_refusals(ws):
            fast = SqliteMirror.open(ws)
            if fast is not None:
                fast.delete_alias(name, alias)
            else:
                _mirror(ws, lambda t: t.delete_alias(name, alias))
    except StorageError:
        _put_back(ws, name, alias, old)
        raise
    return {"name": name, "alias": alias, "version": old}


@contextmanager
def _storage_refusals(ws: Workspace) -> Iterator[None]:
    """The MLflow store refusing a write (full disk, read-only) is a StorageError naming it."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if any(w in text.lower() for w in ("disk is full", "readonly", "disk i/o error")):
            where = sqlite_path(ws.settings.effective_tracking_uri) or "the MLflow store"
            raise StorageError(f"cannot write {where}: {text}") from None
        raise


def _put_back(ws: Workspace, name: str, alias: str, number: int | None) -> None:
    """Undo an alias change in the catalog (its MLflow copy could not be written), best effort."""
    try:
        def txn() -> None:
            with ws.db.transaction() as tx:
                if number is None:
                    catalog.remove_alias(tx, name, alias)
                    return
                rec = catalog.version(tx, name, number)
                if rec is not None:
                    catalog.set_alias(tx, rec, alias)

        with_retries(txn, f"putting back alias {alias}")
    except LBMError:
        pass


def _mirror(ws: Workspace, fn: Callable[[Any], None]) -> None:
    """The MLflow copy of an alias is a convenience for the UI; failing to write it is not an error.

    A local SQLite store at a known schema is written directly (:mod:`.mlflow_sqlite`: one row,
    no MLflow import); this is the path for everything else."""
    from lbm_registry.registry.tracking import Tracker

    try:
        fn(Tracker(ws))
    except StorageError:  # the machine refused (full disk): the caller puts the catalog back
        raise
    except LBMError:
        pass
