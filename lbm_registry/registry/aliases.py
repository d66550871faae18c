"""Aliases (``relight@prod``): movable names for versions, kept in the catalog and mirrored
to MLflow registered-model aliases (best effort: the catalog is the source of truth)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from lbm_registry.errors import LBMError, RefError, RegistryError
from lbm_registry.registry import catalog, refs
from lbm_registry.registry.db import with_retries
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
    fast = SqliteMirror.open(ws)
    if fast is None or not fast.set_alias(rec, alias):
        _mirror(ws, lambda t: t.set_alias(rec, alias))
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
    fast = SqliteMirror.open(ws)
    if fast is not None:
        fast.delete_alias(name, alias)
    else:
        _mirror(ws, lambda t: t.delete_alias(name, alias))
    return {"name": name, "alias": alias, "version": old}


def _mirror(ws: Workspace, fn: Callable[[Any], None]) -> None:
    """The MLflow copy of an alias is a convenience for the UI; failing to write it is not an error.

    A local SQLite store at a known schema is written directly (:mod:`.mlflow_sqlite`: one row,
    no MLflow import); this is the path for everything else."""
    from lbm_registry.registry.tracking import Tracker

    try:
        fn(Tracker(ws))
    except LBMError:
        pass
