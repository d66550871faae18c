"""``lbm-reg rm REF [--force]``: delete one version, all or nothing.

1. connect to MLflow first (unreachable: refuse before anything changes);
2. one catalog transaction checks the guards (an alias points at the version, or a ready
   version names it in its lineage: refused unless ``force``), detaches what ``force``
   overrides (aliases deleted, descendants' edges keep the hash and ref but no longer point at
   a row), deletes the version's rows and logs an ``rm`` event. This commit is the moment the
   version disappears;
3. the MLflow model version and run are deleted;
4. the blob is deleted when no other catalog row uses its hash (under the exclusive blob lock,
   so no registration is reusing it at that moment).

A crash between 2 and 4 leaves an orphan MLflow run or blob, which ``doctor --repair`` removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lbm_registry.errors import RefError, RegistryError
from lbm_registry.registry import catalog, refs
from lbm_registry.registry.blobs import blob_path
from lbm_registry.registry.db import with_retries
from lbm_registry.registry.workspace import Workspace, actor


@dataclass
class Removal:
    ref: str
    kind: str
    sha256: str
    aliases_removed: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    mlflow: list[str] = field(default_factory=list)
    blob_deleted: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def remove_version(ws: Workspace, ref: str, *, force: bool = False) -> Removal:
    """Delete the version ``ref`` resolves to (see the module docstring)."""
    res = refs.resolve(ws, ref)
    if res.record is None:
        raise RefError(f"{ref} is an unregistered file, not a registered version")
    target = res.record
    from lbm_registry.registry.tracking import Tracker

    tracker = Tracker(ws)
    out = Removal(ref=target.ref, kind=target.kind, sha256=target.sha256)
    made_from: list[int] = []  # the versions whose pages link this one (made from it, or its children)

    def txn() -> Any:
        with ws.db.transaction() as tx:
            rec = catalog.version_by_id(tx, target.id)
            if rec is None or rec.status != "ready":
                raise RefError(f"{target.ref} no longer exists")
            aliases = [r["alias"] for r in tx.query(
                "SELECT alias FROM aliases WHERE version_id = :v ORDER BY alias", {"v": rec.id})]
            kids = catalog.children(tx, rec.id)
            if not force and (aliases or kids):
                why = []
                if aliases:
                    why.append("alias " + ", ".join(f"{rec.name}@{a}" for a in aliases) + " points at it")
                if kids:
                    shown = ", ".join(f"{k['name']}@{k['number']} ({k['role']})" for k in kids[:3])
                    more = f" and {len(kids) - 3} more" if len(kids) > 3 else ""
                    why.append(f"{shown}{more} name{'s' if len(kids) == 1 else ''} it in lineage")
                msg = f"refusing to remove {rec.ref}: {'; '.join(why)}"
                raise RegistryError(f"{msg} (pass force=True to remove it anyway)",
                                    cli=f"{msg} (use --force to remove it anyway)")
            out.aliases_removed = [f"{rec.name}@{a}" for a in aliases]
            out.detached = [f"{k['name']}@{k['number']}" for k in kids]
            made_from.extend(e["target_version_id"] for e in catalog.edges(tx, rec.id) if e.get("target_version_id"))
            made_from.extend(k["version_id"] for k in kids)  # their lineage row loses its link
            catalog.delete_version(tx, rec.id)  # aliases, lineage, facts, layers, tags; detaches children
            catalog.delete_empty_assets(tx)
            catalog.log_event(tx, "rm", name=rec.name, number=rec.number, sha256=rec.sha256, actor=actor(),
                              detail={"kind": rec.kind, "force": force, "aliases": out.aliases_removed,
                                      "detached": out.detached, "mlflow_run_id": rec.mlflow_run_id,
                                      "mlflow_version": rec.mlflow_version})
            return rec

    with ws.rw_lock("blobs", exclusive=True):
        rec = with_retries(txn, f"removing {target.ref}")
        try:
            if rec.mlflow_run_id or rec.mlflow_version:
                out.mlflow = tracker.discard(rec.name, rec.mlflow_run_id, rec.mlflow_version)
        except Exception as exc:  # the catalog is the truth: doctor --repair removes the orphan
            out.warnings.append(f"MLflow cleanup failed ({type(exc).__name__}: {exc}); run 'lbm-reg doctor --repair'")
        for vid in dict.fromkeys(made_from):
            parent = catalog.version_by_id(ws.db, vid)
            try:
                if parent is not None and parent.status == "ready":
                    tracker.refresh_version(parent)  # no link to the removed version any more
            except Exception:  # noqa: BLE001  (doctor --repair rebuilds a page left behind)
                out.warnings.append(f"the page of {parent.ref if parent else vid} was not updated; "
                                    "run 'lbm-reg doctor --repair'")
        if rec.sha256 not in catalog.referenced_shas(ws.db):
            path = blob_path(ws.blobs_dir, rec.sha256)
            if path.exists():
                path.unlink()
                out.blob_deleted = True
    return out
