"""What the MLflow UI shows for a version: its tags, its description, its registered model's.

The model version page is where people judge a version, so it carries the quality story:

- **tags** that matter (rank, conv_rank, policy, alpha, size, dtype, mean/max/functional error
  or, for trained versions, the validation loss before/after), plus the few machine ids that
  searches and ``doctor`` need (``lbm.sha256``, ``lbm.catalog_id``, lineage hashes). Name,
  version, kind and run id are on the page already, so they are not repeated as tags;
- a **description**: a short markdown table of facts with links (the UI's own ``#/models/..``
  and ``#/experiments/../runs/..`` URLs) to the base, tuned and parent versions, to the source
  run (the one behind the version), the training run and the compare runs that judged it, and
  the probe picture (``source | base | this version | tuned``) when the run has one.

The registered model's description says what the model is: kind, base, how many versions, what
the aliases point at and how to load it.

Built from catalog data (and, for links, MLflow ids) only, so ``doctor --repair`` rebuilds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lbm_registry.registry import catalog
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.workspace import Workspace
from lbm_registry.units import format_size

#: Artifact names of the pictures the description embeds (first found wins).
PROBE_IMAGE = "probe.png"
COMPARE_EXPERIMENT = "lbm-registry-compare"
EXPERIMENT_NOTES = {
    "lbm-registry": "One run per registered version (base, model, LoRA): params, metrics, per-layer "
                    "tables, plots, the probe picture and the weights as an MLflow model "
                    "(`weights/`). Browse the versions under **Models**.",
    "lbm-registry-infer": "One run per `lbm-reg infer --log` call: references as params, input and "
                          "output images as artifacts.",
    "lbm-registry-compare": "One run per `lbm-reg compare A B --report DIR`: similarity metrics, the "
                            "HTML report, grid and energy plots; tagged and linked with both versions.",
    "lbm-registry-train": "Training runs of `lbm-reg train`: losses per step, validation losses, sample grids.",
    "Default": "Unused by lbm-registry (its runs live in the lbm-registry* experiments); its "
               "artifact location lies inside the workspace.",
}


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def quality(rec: VersionRecord, lora: Mapping[str, Any] | None) -> dict[str, str]:
    """The tags that tell how good a version is, as strings (ordered as the description shows them)."""
    out: dict[str, str] = {}
    facts = rec.facts or {}
    lora = dict(lora or {})
    if rec.kind == "lora":
        for k in ("rank", "conv_rank", "policy", "alpha"):
            v = lora.get(k) if lora.get(k) is not None else facts.get(k)
            if v is not None:
                out[k] = _num(v)
        out.setdefault("alpha", "= rank")  # no alpha stored: scale 1 (kohya's convention)
    out["size"] = format_size(rec.size)
    if rec.dtype:
        out["dtype"] = rec.dtype
    for k in ("mean_error", "max_error", "functional_error"):
        v = lora.get(k) if lora.get(k) is not None else facts.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = _num(float(v))
    for src, key in (("initial_val_loss", "val_loss_before"), ("val_loss", "val_loss_after")):
        v = facts.get(src)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = _num(float(v))
    val = facts.get("validation") or {}
    if isinstance(val, dict) and isinstance(val.get("total_energy"), int | float):
        out["energy_kept"] = _num(float(val["total_energy"]))
    return out


def quality_figure(rec: VersionRecord, lora: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """The one number ``list``/``show`` print for every kind: (what it is, value)."""
    q = quality(rec, lora)
    for key in ("functional_error", "mean_error", "val_loss_after"):
        if key in q:
            try:
                return key, float(q[key])
            except ValueError:
                continue
    return None


def version_tags(rec: VersionRecord, edges: list[dict[str, Any]], lora: Mapping[str, Any] | None,
                 user_tags: Mapping[str, str], catalog_id: str) -> dict[str, str]:
    """The model version's tags: quality first, then machine ids, then the user's own."""
    tags = dict(quality(rec, lora))
    tags["lbm.sha256"] = rec.sha256
    tags["lbm.catalog_id"] = catalog_id
    for e in edges:
        if e["role"] != "dataset" and e.get("sha256"):
            tags[f"lbm.{e['role']}_sha256"] = e["sha256"]
        ref = f"{e['target_name']}@{e['target_number']}" if e.get("target_name") else e.get("ref")
        if e["role"] != "dataset" and ref:
            tags[f"lbm.{e['role']}_ref"] = ref
    for k, v in user_tags.items():
        tags.setdefault(str(k), str(v))
    return {k: v[:5000] for k, v in tags.items()}


def model_link(name: str, mlflow_version: str | int | None) -> str | None:
    return f"#/models/{name}/versions/{mlflow_version}" if mlflow_version else None


def run_link(experiment_id: str | None, run_id: str | None) -> str | None:
    return f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id and run_id else None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def version_description(ws: Workspace, rec: VersionRecord, edges: list[dict[str, Any]],
                        lora: Mapping[str, Any] | None, *, run_id: str | None, experiment_id: str | None,
                        has_probe: bool = False, extra_runs: list[tuple[str, str | None]] | None = None) -> str:
    """Markdown: a headline, a facts table with links, the probe picture."""
    q = quality(rec, lora)
    kind = {"lora": "LoRA", "base": "base model", "model": "fine-tuned model"}.get(rec.kind, rec.kind)
    rows: list[tuple[str, str]] = []
    if rec.kind == "lora":
        rank = f"{q.get('rank', '?')} / {q.get('conv_rank', '?')}"
        alpha = "alpha = rank" if q.get("alpha", "= rank") == "= rank" else f"alpha {q['alpha']}"
        rows.append(("rank / conv rank", f"**{rank}** ({q.get('policy', '?')}), {alpha}"))
    rows.append(("size", f"{q['size']}" + (f", {q['dtype']}" if "dtype" in q else "")))
    if "mean_error" in q:
        rows.append(("per-layer error (mean / max)", f"**{q['mean_error']}** / {q.get('max_error', '?')}"))
    if "functional_error" in q:
        rows.append(("functional error (denoiser output)", f"**{q['functional_error']}**"))
    if "energy_kept" in q:
        rows.append(("energy kept", q["energy_kept"]))
    if "val_loss_before" in q or "val_loss_after" in q:
        rows.append(("validation loss (before → after)",
                     f"{q.get('val_loss_before', '?')} → **{q.get('val_loss_after', '?')}**"))
    for e in edges:
        if e["role"] == "dataset":
            continue
        target = catalog.version_by_id(ws.db, e["target_version_id"]) if e.get("target_version_id") else None
        ref = target.ref if target is not None else (e.get("ref") or "?")
        link = model_link(target.name, target.mlflow_version) if target is not None else None
        sha = (e.get("sha256") or "?")[:12]
        rows.append((e["role"], (f"[{ref}]({link})" if link else ref) + f" `{sha}`"))
    datasets = [e for e in edges if e["role"] == "dataset"]
    if datasets:
        rows.append(("trained on", f"{len(datasets)} shard(s)"))
    src = run_link(experiment_id, run_id)
    if src:
        rows.append(("source run", f"[{rec.ref}]({src}) (params, metrics, per-layer table, plots)"))
    for label, link in extra_runs or []:
        rows.append((label.partition(":")[0], f"[{label.partition(':')[2] or label}]({link})" if link else label))
    rows.append(("sha256", f"`{rec.sha256}`"))
    lines = [f"**{rec.ref}**: {kind}" + (f" of {_base_of(ws, edges)}" if rec.kind == "lora" else ""), "",
             "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    if has_probe and run_id:
        lines += ["", f"![source | base | this version | tuned](get-artifact?path={PROBE_IMAGE}&run_uuid={run_id})",
                  "", "*Probe: source | base | this version | tuned (when known).*"]
    return "\n".join(lines)


def _base_of(ws: Workspace, edges: list[dict[str, Any]]) -> str:
    for e in edges:
        if e["role"] == "base":
            return f"{e['target_name']}@{e['target_number']}" if e.get("target_name") else (e.get("ref") or "?")
    return "?"


def registered_model_description(ws: Workspace, name: str, *, extra_ready: int | None = None) -> str:
    """What the model is: kind, base(s), how many versions, aliases and how to load it.

    ``extra_ready``: a version being registered right now (still pending) counts too."""
    a = catalog.asset(ws.db, name)
    if a is None:
        return f"lbm-registry '{name}'"
    numbers = set(catalog.ready_numbers(ws.db, name))
    if extra_ready is not None:
        numbers.add(extra_ready)
    kind = {"lora": "LoRA", "base": "base model", "model": "fine-tuned LBM model"}.get(a["kind"], a["kind"])
    lines = [f"**{name}**: an LBM {kind} in lbm-registry, {len(numbers)} version(s)."]
    latest = (catalog.version(ws.db, name, max(numbers), ready_only=False) if numbers else None)
    if latest is not None and a["kind"] == "lora":
        lines.append(f"Latest (v{latest.number}) is a LoRA of {_base_of(ws, catalog.edges(ws.db, latest.id))}.")
    aliases = catalog.aliases_of_asset(ws.db, name)
    if aliases:
        lines.append("")
        lines.append("Aliases (set with `lbm-reg alias set`): " + ", ".join(
            f"`@{al}` → v{n}" for al, n in sorted(aliases.items())) + ". Load one with "
            f"`mlflow.pyfunc.load_model(\"models:/{name}@{sorted(aliases)[0]}\")`.")
    lines += ["", "Every version is an MLflow `python_function` model: input column `image` (base64 "
              "of any image), optional `scale`, `steps`, `seed`; output `image` (base64 PNG). "
              f"`lbm-reg show {name}@N` prints the full record."]
    return "\n".join(lines)
