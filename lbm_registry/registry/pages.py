"""What the MLflow UI shows for a version: its tags, its description, its registered model's.

The model version page is where people judge a version, so it carries the quality story:

- **tags**: a few readable quality figures (rank, conv_rank, policy, alpha when it is set, size,
  the errors or, for trained versions, the validation loss before/after), then the machine ids
  that searches and ``doctor`` need (``x-lbm.sha256``, ``x-lbm.catalog_id``, lineage hashes and
  refs), prefixed with ``x-lbm.`` so that the UI (which sorts tags by name) lists them after the
  quality tags. Name, version, kind and run id are on the page already, so they are not repeated;
- a **description** whose first line reads as plain text (the versions table shows it), then a
  markdown table of facts with links (the UI's own ``#/models/..`` and ``#/experiments/../runs/..``
  URLs) to the base, tuned and parent versions, to what was **made from this** version (LoRAs on a
  base, LoRAs extracted from a model, children of a LoRA), to the source run (the one behind the
  version), the training run and the compare runs that judged it, and the probe picture with a
  caption naming exactly its tiles (read from the picture itself, :data:`PROBE_TILES_KEY`).

The registered model's description says what the model is: kind, base, how many versions, what
the aliases point at and how to load it.

Built from catalog data (and, for links, MLflow ids) only, so ``doctor --repair`` rebuilds them.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lbm_registry.registry import catalog
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.workspace import Workspace
from lbm_registry.units import format_size

#: Artifact names of the pictures the description embeds (first found wins).
PROBE_IMAGE = "probe.png"
#: PNG text chunk of the probe picture naming its tiles, e.g. ``source | base | this version | tuned``.
PROBE_TILES_KEY = "lbm.probe.tiles"
#: Prefix of the machine ids among a model version's tags (sorts after the quality tags).
ID_PREFIX = "x-lbm."
#: At most this many versions are linked under "made from this" (then "and N more").
MADE_FROM_SHOWN = 12
COMPARE_EXPERIMENT = "lbm-registry-compare"
EXPERIMENT_NOTES = {
    "lbm-registry": "One run per registered version (base, model, LoRA): params, metrics, per-layer "
                    "tables, plots, the probe picture and the weights as an MLflow model "
                    "(`weights/`). Each run's **Models** column links the version it registered; browse "
                    "them all in the **Model registry**.",
    "lbm-registry-infer": "One run per `lbm-reg infer --log` call: references as params, input and "
                          "output images as artifacts.",
    "lbm-registry-compare": "One run per `lbm-reg compare A B --report DIR`: similarity metrics, the "
                            "HTML report, grid and energy plots; tagged and linked with both versions.",
    "lbm-registry-train": "Training runs of `lbm-reg train`: losses per step, validation losses, sample grids. "
                          "A run that registered its LoRA is named after the version (**Models** links it).",
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


def exact_import(rec: VersionRecord, lora: Mapping[str, Any] | None) -> bool:
    """A LoRA imported from another tool's layout without any re-factoring: its per-layer
    "error" of 0 is not a measurement but the conversion being exact."""
    facts = rec.facts or {}
    lora = dict(lora or {})
    err = lora.get("max_error") if lora.get("max_error") is not None else facts.get("max_error")
    return (rec.kind == "lora" and bool(facts.get("source_format")) and facts.get("source_format") != "native"
            and isinstance(err, int | float) and err == 0)


def quality(rec: VersionRecord, lora: Mapping[str, Any] | None) -> dict[str, str]:
    """The figures that tell how good a version is, as strings (ordered as the description shows
    them). ``alpha`` is left out when the file stores none (scale 1: alpha = rank), and the
    per-layer errors of an exact import (0 by construction)."""
    out: dict[str, str] = {}
    facts = rec.facts or {}
    lora = dict(lora or {})
    if rec.kind == "lora":
        for k in ("rank", "conv_rank", "policy", "alpha"):
            v = lora.get(k) if lora.get(k) is not None else facts.get(k)
            if v is not None:
                out[k] = _num(v)
    out["size"] = format_size(rec.size)
    if rec.dtype:
        out["dtype"] = rec.dtype
    exact = exact_import(rec, lora)
    for k in ("mean_error", "max_error", "functional_error"):
        if exact and k != "functional_error":
            continue
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


#: Quality figures shown as tags, per kind (the description has the rest: dtype, max error...).
TAG_KEYS = {"lora": ("rank", "conv_rank", "policy", "alpha", "size", "functional_error", "mean_error", "energy_kept",
                     "val_loss_before", "val_loss_after"),
            "base": ("size", "dtype"), "model": ("size", "dtype")}


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
    """The model version's tags: a few quality figures, the user's own, then the machine ids
    (:data:`ID_PREFIX`, sorted last by the UI)."""
    q = quality(rec, lora)
    tags = {k: q[k] for k in TAG_KEYS.get(rec.kind, ()) if k in q}
    for k, v in user_tags.items():
        tags.setdefault(str(k), str(v))
    tags[f"{ID_PREFIX}sha256"] = rec.sha256
    tags[f"{ID_PREFIX}catalog_id"] = catalog_id
    for e in edges:
        if e["role"] != "dataset" and e.get("sha256"):
            tags[f"{ID_PREFIX}{e['role']}_sha256"] = e["sha256"]
        ref = f"{e['target_name']}@{e['target_number']}" if e.get("target_name") else e.get("ref")
        if e["role"] != "dataset" and ref:
            tags[f"{ID_PREFIX}{e['role']}_ref"] = ref
    return {k: v[:5000] for k, v in tags.items()}


def managed_tag(key: str) -> bool:
    """Is this model version tag one the registry writes (and may replace or drop on a rebuild)?
    Quality keys, our ids, and the ``lbm.*`` ids of pages written before :data:`ID_PREFIX`."""
    return key.startswith((ID_PREFIX, "lbm.")) or key in {k for keys in TAG_KEYS.values() for k in keys} \
        or key in ("dtype", "max_error")


def model_link(name: str, mlflow_version: str | int | None) -> str | None:
    return f"#/models/{name}/versions/{mlflow_version}" if mlflow_version else None


def run_link(experiment_id: str | None, run_id: str | None) -> str | None:
    return f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id and run_id else None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def probe_tiles(path: Path) -> str | None:
    """The tile names a probe picture records (``source | base | this version | tuned``), or None
    (an older picture, or not a PNG). Read from its text chunks without an image library."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None  # text chunks written by PIL come first
                data = f.read(length)
                f.read(4)  # CRC
                if kind == b"tEXt":
                    key, _, value = data.partition(b"\0")
                elif kind == b"zTXt":
                    key, _, rest = data.partition(b"\0")
                    value = zlib.decompress(rest[1:])
                elif kind == b"iTXt":
                    key, _, rest = data.partition(b"\0")
                    compressed, rest = rest[0], rest[2:]
                    _, _, rest = rest.partition(b"\0")  # language
                    _, _, value = rest.partition(b"\0")  # translated keyword
                    value = zlib.decompress(value) if compressed else value
                else:
                    continue
                if key == PROBE_TILES_KEY.encode():
                    return value.decode("utf-8", "replace").strip() or None
    except (OSError, ValueError, zlib.error, struct.error):
        return None


def _ref_of(e: Mapping[str, Any]) -> str:
    return f"{e['target_name']}@{e['target_number']}" if e.get("target_name") else (e.get("ref") or "?")


def _refs(edges: list[dict[str, Any]], role: str) -> list[str]:
    return [_ref_of(e) for e in edges if e["role"] == role]


def headline(rec: VersionRecord, edges: list[dict[str, Any]], lora: Mapping[str, Any] | None) -> str:
    """The description's first line: plain text (no markdown), what the version is and its one
    telling figure, e.g. ``relight@3: LoRA of tiny-base@1 fine-tuned from relight@1, rank 16/8,
    validation loss 0.0369 → 0.0285``."""
    q = quality(rec, lora)
    facts = rec.facts or {}
    bases = _refs(edges, "base")
    parents = _refs(edges, "parent")
    tuned = _refs(edges, "tuned")
    if rec.kind == "base":
        cfg = (rec.config or {}).get("name") if isinstance(rec.config, dict) else None
        return f"{rec.ref}: LBM base model" + (f" ({cfg})" if cfg else "") + f", {q['size']}"
    if rec.kind == "model":
        return f"{rec.ref}: fine-tuned LBM model" + (f" of {bases[0]}" if bases else "") + f", {q['size']}"
    text = f"{rec.ref}: LoRA of {bases[0] if bases else '?'}"
    op = str(facts.get("operation") or "")
    if facts.get("policy") == "trained" or any(e["role"] == "dataset" for e in edges):
        text += f" fine-tuned from {parents[0]}" if parents else " trained"
    elif tuned:
        text += f" extracted from {tuned[0]}"
    elif op == "merge" or len(parents) > 1:
        text += f" merged from {', '.join(parents)}"
    elif op == "resize" and parents:
        text += f" resized from {parents[0]}"
    elif facts.get("source_format"):
        text += f" imported from {parents[0]} ({facts['source_format']})" if parents \
            else f" imported ({facts['source_format']})"
    text += f", rank {q.get('rank', '?')}/{q.get('conv_rank', '?')}"
    if "val_loss_after" in q:
        text += f", validation loss {q.get('val_loss_before', '?')} → {q['val_loss_after']}"
    elif "functional_error" in q:
        text += f", functional error {q['functional_error']}"
    elif exact_import(rec, lora):
        text += ", exact"
    elif "mean_error" in q:
        text += f", mean per-layer error {q['mean_error']}"
    return text


def version_description(ws: Workspace, rec: VersionRecord, edges: list[dict[str, Any]],
                        lora: Mapping[str, Any] | None, *, run_id: str | None, experiment_id: str | None,
                        probe: str | None = None, extra_runs: list[tuple[str, str | None]] | None = None) -> str:
    """Plain first line, a facts table with links (both ways along the lineage), the probe
    picture. ``probe``: None when the run has no picture, else its tile names (``""``: unknown)."""
    q = quality(rec, lora)
    rows: list[tuple[str, str]] = []
    if rec.kind == "lora":
        rank = f"{q.get('rank', '?')} / {q.get('conv_rank', '?')}"
        alpha = f"alpha {q['alpha']}" if "alpha" in q else "alpha = rank"
        rows.append(("rank / conv rank", f"**{rank}** ({q.get('policy', '?')}), {alpha}"))
    rows.append(("size", f"{q['size']}" + (f", {q['dtype']}" if "dtype" in q else "")))
    if exact_import(rec, lora):
        rows.append(("per-layer error", "**exact** (imported as is)"))
    elif "mean_error" in q:
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
    made = made_from(ws, rec)
    if made:
        rows.append(("made from this", made))
    src = run_link(experiment_id, run_id)
    if src:
        what = "params, metrics, per-layer table, plots" if rec.kind == "lora" else "params, metrics, the weights"
        rows.append(("source run", f"[{rec.ref}]({src}) ({what})"))
    for label, link in extra_runs or []:
        rows.append((label.partition(":")[0], f"[{label.partition(':')[2] or label}]({link})" if link else label))
    rows.append(("sha256", f"`{rec.sha256}`"))
    lines = [headline(rec, edges, lora), "", "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    if probe is not None and run_id:
        tiles = probe or "probe picture"
        caption = f"*Probe: {probe}.*" if probe else "*Probe picture (each tile is titled).*"
        lines += ["", f"![{tiles}](get-artifact?path={PROBE_IMAGE}&run_uuid={run_id})", "", caption]
    return "\n".join(lines)


def made_from(ws: Workspace, rec: VersionRecord) -> str:
    """Links to the ready versions that name ``rec`` in their lineage ("made from this"), each
    with how: the LoRAs on a base and the models fine-tuned from it, the LoRAs extracted from a
    model, a LoRA's fine-tunes, resizes, merges and re-imported exports."""
    kids = catalog.children(ws.db, rec.id)
    out = []
    for k in kids[:MADE_FROM_SHOWN]:
        kid = catalog.version_by_id(ws.db, k["version_id"])
        if kid is None:
            continue
        link = model_link(kid.name, kid.mlflow_version)
        out.append((f"[{kid.ref}]({link})" if link else kid.ref) + f" ({_how(k['role'], kid)})")
    if len(kids) > MADE_FROM_SHOWN:
        out.append(f"and {len(kids) - MADE_FROM_SHOWN} more (`lbm-reg lineage {rec.ref}`)")
    return ", ".join(out)


def _how(role: str, kid: VersionRecord) -> str:
    """How ``kid`` was made from a version it names as ``role``, in a word or two."""
    facts = kid.facts or {}
    if role == "tuned":
        return "extracted"
    if role == "base":
        return "fine-tuned model" if kid.kind == "model" else "LoRA" if kid.kind == "lora" else kid.kind
    if facts.get("policy") == "trained" or facts.get("training_config"):
        return "fine-tuned"
    if facts.get("operation") in ("resize", "merge"):
        return {"resize": "resized", "merge": "merged"}[facts["operation"]]
    if facts.get("source_format"):
        return "re-imported export"
    return role


def _base_of(ws: Workspace, edges: list[dict[str, Any]]) -> str:
    for e in edges:
        if e["role"] == "base":
            return _ref_of(e)
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
    kind = {"lora": "an LBM LoRA", "base": "an LBM base model", "model": "a fine-tuned LBM model"}.get(
        a["kind"], a["kind"])
    lines = [f"{name}: {kind} in lbm-registry, {len(numbers)} version(s)."]
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


def training_run_note(rec: VersionRecord, version_link: str | None, source_link: str | None) -> str:
    """The description of the training run that produced ``rec`` (it links the version back)."""
    ref = f"[{rec.ref}]({version_link})" if version_link else rec.ref
    src = f" Its registration run: [{rec.ref}]({source_link})." if source_link else ""
    return (f"Training run of {rec.ref}.\n\nRegistered as {ref}: losses per step and validation losses here; the "
            f"version's page has the quality story and the probe picture.{src}")


def logged_model_name(rec: VersionRecord) -> str:
    """The name of the version's MLflow logged model (MLflow refuses ``/ : . % " '`` in it)."""
    return "".join("-" if c in "/:.%\"'" else c for c in rec.ref)
