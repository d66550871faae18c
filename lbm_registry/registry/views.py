"""Read models for humans and scripts: asset lists, one version's full story, lineage trees.

Plain dicts (JSON-ready) built from catalog rows; the CLI renders them as Rich tables/trees
or prints them with ``--json``. No MLflow, no SQLAlchemy: these back the fast commands.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from lbm_registry.registry import catalog
from lbm_registry.registry.blobs import blob_path
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.db import mask_url
from lbm_registry.registry.workspace import Workspace

LORA_FACT_KEYS = ("rank", "conv_rank", "policy", "alpha", "mean_error", "max_error", "functional_error")


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def _target_ref(e: dict[str, Any]) -> str | None:
    if e.get("target_name"):
        return f"{e['target_name']}@{e['target_number']}"
    return e.get("ref")


def lineage_of(edges: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """``{"base": {"sha256", "ref", "registered"}, "tuned": ..., "parent": ..., "datasets": [...]}``."""
    out: dict[str, Any] = {}
    for e in edges:
        if e["role"] == "dataset":
            out.setdefault("datasets", []).append({"path": e.get("path"), "sha256": e.get("sha256")})
            continue
        node = {"sha256": e.get("sha256"), "ref": _target_ref(e), "registered": e.get("target_version_id") is not None}
        if e["role"] == "parent":  # a merge has several: "parent" is the first, "parents" all of them
            out.setdefault("parents", []).append(node)
            out.setdefault("parent", node)
            continue
        out[e["role"]] = node
    if facts.get("training_config") is not None:
        out["training_config"] = facts["training_config"]
    return out


def facts_of(rec: VersionRecord, edges: list[dict[str, Any]], lora: dict[str, Any] | None) -> dict[str, Any]:
    """Stored facts + LoRA summary columns + lineage hashes (``base_sha256``, ``tuned_sha256``...)."""
    facts = rec.facts
    if lora:
        for k in LORA_FACT_KEYS:
            if lora.get(k) is not None:
                facts[k] = lora[k]
    for e in edges:
        if e["role"] != "dataset" and e.get("sha256"):
            facts[f"{e['role']}_sha256"] = e["sha256"]
    facts.setdefault("size", rec.size)
    if rec.dtype:
        facts.setdefault("dtype", rec.dtype)
    return facts


def list_assets(ws: Workspace | None, kind: str | None = None) -> list[dict[str, Any]]:
    if ws is None:
        return []
    rows = catalog.list_latest(ws.db, kind)
    alias_rows = ws.db.query("""
        SELECT a.name, al.alias, v.number FROM aliases al JOIN assets a ON a.id = al.asset_id
        JOIN versions v ON v.id = al.version_id WHERE v.status = 'ready' ORDER BY al.alias""")
    aliases: dict[str, dict[str, int]] = {}
    for r in alias_rows:
        aliases.setdefault(r["name"], {})[r["alias"]] = r["number"]
    lora = {r["version_id"]: r for r in ws.db.query(
        "SELECT version_id, rank, conv_rank, policy, mean_error FROM lora_facts")}
    latest_ids = {r["version_id"] for r in rows}
    ranges: dict[int, dict[str, list[int]]] = {}
    for r in ws.db.query("SELECT version_id, kind, MIN(rank) AS lo, MAX(rank) AS hi FROM layer_errors "
                         "WHERE rank IS NOT NULL GROUP BY version_id, kind"):
        if r["version_id"] in latest_ids:
            key = "linear" if r["kind"] == "linear" else "conv"
            lo_hi = ranges.setdefault(r["version_id"], {}).setdefault(key, [r["lo"], r["hi"]])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], r["lo"]), max(lo_hi[1], r["hi"])
    out = []
    for r in rows:
        lf = lora.get(r["version_id"]) or {}
        out.append({
            "name": r["name"], "kind": r["kind"], "latest": r["number"], "versions": r["n_versions"],
            "ref": f"{r['name']}@{r['number']}", "sha256": r["sha256"], "size": r["size"], "dtype": r["dtype"],
            "created_at": iso(r["created_at"]), "aliases": aliases.get(r["name"], {}),
            "rank": lf.get("rank"), "conv_rank": lf.get("conv_rank"), "policy": lf.get("policy"),
            "mean_error": lf.get("mean_error"),
            "rank_range": ranges.get(r["version_id"], {}),  # {"linear"|"conv": [min, max]} per layer
            "quality": _quality(ws, r["version_id"]),
        })
    return out


def _quality(ws: Workspace, version_id: int) -> dict[str, Any] | None:
    """The one quality number of a version (see pages.quality_figure): ``{"metric", "value"}``."""
    from lbm_registry.registry.pages import quality_figure

    rec = catalog.version_by_id(ws.db, version_id)
    if rec is None:
        return None
    found = quality_figure(rec, catalog.lora_facts(ws.db, version_id))
    return {"metric": found[0], "value": found[1]} if found else None


def show_version(ws: Workspace, rec: VersionRecord, *, tracking_uri: str) -> dict[str, Any]:
    edges = catalog.edges(ws.db, rec.id)
    lora = catalog.lora_facts(ws.db, rec.id)
    asset_aliases = catalog.aliases_of_asset(ws.db, rec.name)
    return {
        "ref": rec.ref, "name": rec.name, "kind": rec.kind, "version": rec.number,
        "sha256": rec.sha256, "size": rec.size, "dtype": rec.dtype, "created_at": iso(rec.created_at),
        "tool_version": rec.tool_version, "file_name": rec.file_name,
        "path": str(blob_path(ws.blobs_dir, rec.sha256)),
        "cached": blob_path(ws.blobs_dir, rec.sha256).is_file(), "integrity": rec.integrity,
        "aliases": sorted(a for a, n in asset_aliases.items() if n == rec.number),
        "asset_aliases": asset_aliases,
        "versions": catalog.ready_numbers(ws.db, rec.name),
        "quality": _quality(ws, rec.id),
        "mlflow": {"tracking_uri": mask_url(tracking_uri), "experiment": "lbm-registry",
                   "run_id": rec.mlflow_run_id, "model_version": rec.mlflow_version},
        "facts": facts_of(rec, edges, lora),
        "lora": lora,
        "lineage": lineage_of(edges, rec.facts),
        "descendants": [{"ref": f"{c['name']}@{c['number']}", "kind": c["kind"], "role": c["role"],
                         "sha256": c["sha256"]} for c in catalog.children(ws.db, rec.id)],
        "layers": catalog.layers(ws.db, rec.id),
        "tags": catalog.tags(ws.db, rec.id),
        "params": rec.params, "metrics": rec.metrics,
        "config": rec.config,
        "history": [{**e, "at": iso(e["at"]), "detail": json.loads(e["detail"]) if e["detail"] else None}
                    for e in catalog.events(ws.db, rec.name, limit=20)],
    }


def _node(rec: VersionRecord) -> dict[str, Any]:
    return {"ref": rec.ref, "name": rec.name, "version": rec.number, "kind": rec.kind, "sha256": rec.sha256}


def _up(ws: Workspace, rec: VersionRecord, seen: frozenset[int]) -> list[dict[str, Any]]:
    out = []
    for e in catalog.edges(ws.db, rec.id):
        item: dict[str, Any] = {"role": e["role"], "sha256": e.get("sha256"), "ref": _target_ref(e),
                                "registered": e.get("target_version_id") is not None}
        if e["role"] == "dataset":
            item["path"] = e.get("path")
        tid = e.get("target_version_id")
        target = catalog.version_by_id(ws.db, tid) if tid is not None else None
        if target is not None and target.status == "ready":
            item.update(_node(target))
            item["up"] = _up(ws, target, seen | {target.id}) if target.id not in seen else []
        out.append(item)
    return out


def _down(ws: Workspace, rec: VersionRecord, seen: frozenset[int]) -> list[dict[str, Any]]:
    """Descendants. A LoRA fine-tuned from a parent LoRA shows under that parent only, not
    again under the base they share."""
    out = []
    for c in catalog.children(ws.db, rec.id):
        if c["role"] != "parent":
            has_parent = ws.db.scalar("SELECT count(*) FROM lineage WHERE version_id = :v AND role = 'parent' "
                                      "AND target_version_id IS NOT NULL", {"v": c["version_id"]})
            if has_parent:
                continue
        child = catalog.version_by_id(ws.db, c["version_id"])
        if child is None:
            continue
        item = {"role": c["role"], **_node(child)}
        item["down"] = _down(ws, child, seen | {child.id}) if child.id not in seen else []
        out.append(item)
    return out


def lineage_tree(ws: Workspace, rec: VersionRecord) -> dict[str, Any]:
    """``{"node": {...}, "up": [edges towards the base, recursively], "down": [descendants]}``."""
    return {"node": _node(rec), "up": _up(ws, rec, frozenset({rec.id})),
            "down": _down(ws, rec, frozenset({rec.id}))}
