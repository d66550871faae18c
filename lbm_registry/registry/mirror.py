"""What a version's MLflow mirror holds, computed once for both writers.

Registration mirrors a version either through the MLflow client
(:class:`~lbm_registry.registry.tracking.Tracker`: any store) or straight into a workspace's own
SQLite store (:class:`~lbm_registry.registry.mlflow_sqlite.SqliteMirror`: no MLflow import).
Both write the same run (params, metrics, tags, artifacts) and the same model version (tags,
description); this module builds that content from catalog data only, so ``doctor --repair``
can rebuild a lost mirror exactly. Nothing here imports MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbm_registry.registry import catalog, pages
from lbm_registry.registry.blobs import link_or_copy
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.workspace import Workspace

TAG_PREFIX = "lbm."
#: Run tag naming the catalog that mirrored it (registries may share a server); model versions
#: carry it as ``x-lbm.catalog_id`` (pages.ID_PREFIX), or ``lbm.catalog_id`` when mirrored earlier.
CATALOG_TAG = "lbm.catalog_id"
MV_CATALOG_TAG = f"{pages.ID_PREFIX}catalog_id"


def version_sha256(tags: Mapping[str, str] | None) -> str | None:
    """The sha256 a model version's tags record (``x-lbm.sha256``, or the older ``lbm.sha256``)."""
    tags = tags or {}
    return tags.get(f"{pages.ID_PREFIX}sha256") or tags.get("lbm.sha256")
LAYER_FIELDS = ("module", "kind", "shape", "rank", "rel_error", "energy")
_PARAM_MAX = 6000
_TAG_MAX = 5000


def describe(rec: VersionRecord, edges: list[dict[str, Any]], lora: dict[str, Any] | None,
             user_tags: Mapping[str, str]) -> tuple[dict[str, str], dict[str, float], dict[str, str], str]:
    """(params, metrics, tags, markdown summary) of a version's run, from catalog data only."""
    params: dict[str, Any] = {k: v for k, v in rec.params.items()}
    params.update(kind=rec.kind, name=rec.name, version=rec.number, sha256=rec.sha256, size=rec.size,
                  dtype=rec.dtype or "", tool_version=rec.tool_version, file_name=rec.file_name or "")
    cfg = rec.config
    if cfg and isinstance(cfg.get("name"), str):
        params["config_name"] = cfg["name"]
    metrics: dict[str, float] = {}
    for k, v in rec.metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            metrics[k] = float(v)
    metrics["size_bytes"] = float(rec.size)
    metrics["size_mb"] = rec.size / 1e6
    if lora:
        for k in ("rank", "conv_rank", "policy", "alpha"):
            if lora.get(k) is not None:
                params[k] = lora[k]
        for k in ("mean_error", "max_error", "functional_error", "n_layers", "n_skipped"):
            if lora.get(k) is not None:
                metrics[k] = float(lora[k])
    tags: dict[str, str] = {str(k): str(v) for k, v in user_tags.items()}
    tags.update({
        "lbm.sha256": rec.sha256, "lbm.kind": rec.kind, "lbm.name": rec.name,
        "lbm.version": str(rec.number), "lbm.version_id": str(rec.id), "lbm.size": str(rec.size),
    })
    if rec.dtype:
        tags["lbm.dtype"] = rec.dtype
    lines = [f"**{rec.ref}** ({rec.kind}), sha256 `{rec.sha256}`, {rec.size:,} bytes"]
    datasets = []
    for e in edges:
        role = e["role"]
        ref = f"{e['target_name']}@{e['target_number']}" if e.get("target_name") else (e.get("ref") or "")
        if role == "dataset":
            datasets.append(e)
            continue
        if e.get("sha256"):
            tags[f"lbm.{role}_sha256"] = e["sha256"]
            params[f"{role}_sha256"] = e["sha256"]
        if ref:
            tags[f"lbm.{role}_ref"] = ref
            params[role] = ref
        lines.append(f"- {role}: {ref or '?'} (sha256 `{(e.get('sha256') or '?')[:16]}`)")
    if datasets:
        tags["lbm.datasets"] = ",".join((d.get("sha256") or "?")[:16] for d in datasets)[:_TAG_MAX]
        params["n_datasets"] = len(datasets)
        lines.append(f"- trained on {len(datasets)} dataset shard(s)")
    description = "\n".join(lines)
    tags["mlflow.note.content"] = description
    str_params = {k: str(v)[:_PARAM_MAX] for k, v in params.items()}
    return str_params, metrics, {k: v[:_TAG_MAX] for k, v in tags.items()}, description


def layer_files(layers: list[dict[str, Any]]) -> dict[str, str]:
    """The per-layer table as CSV, JSON and a plain module list (artifact name -> text)."""
    if not layers:
        return {}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LAYER_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in layers:
        w.writerow(row)
    return {"layers.csv": buf.getvalue(), "layers.json": json.dumps(layers, indent=1, default=str),
            "layers.txt": "".join(f"{r['module']}\n" for r in layers)}


TRAIN_RUN_TAG = "lbm.train_run_id"


def shown_user_tags(user_tags: Mapping[str, str]) -> dict[str, str]:
    """User tags for the version page; ids that the description links instead are left out."""
    return {k: v for k, v in user_tags.items() if k not in (TRAIN_RUN_TAG,)}


@dataclass
class MirrorContent:
    """Everything of one version's mirror that does not depend on the run id.

    ``run_tags``: what ``log_batch`` writes (the ``lbm.*`` subset, ``create_tags``, is given to
    ``create_run``); ``texts``/``files``: artifacts (artifact path -> text / file to link);
    ``version_tags``: the model version's tags. :meth:`finish` adds the run-dependent parts."""

    rec: VersionRecord
    edges: list[dict[str, Any]]
    lora: dict[str, Any] | None
    user_tags: Mapping[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    run_tags: dict[str, str]
    texts: dict[str, str]
    files: dict[str, Path]
    version_tags: dict[str, str]
    probe: str | None  # the probe picture's tile names ("" unknown), None: no picture
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def create_tags(self) -> dict[str, str]:
        return {k: v for k, v in self.run_tags.items() if k.startswith(TAG_PREFIX)}

    @property
    def train_run(self) -> str | None:
        """The training run that produced the version (linked both ways by the mirror)."""
        return self.user_tags.get(TRAIN_RUN_TAG) or None

    def finish(self, description: str, started: float | None) -> None:
        """The version page (known once the run id is) and the total registration time."""
        self.description = description
        self.run_tags["mlflow.note.content"] = description
        if started is not None:
            self.metrics["register_seconds"] = time.time() - started


def run_times(started: float | None, work_started: float | None) -> int:
    """The start time (ms) of a version's run: when the work that made the file began (extraction,
    conversion...), else when its registration began, else now. Its end is when it is mirrored."""
    t = work_started if work_started is not None else started
    return int((t if t is not None else time.time()) * 1000)


def logged_model_tags(rec: VersionRecord, version: str | int, run_id: str) -> dict[str, str]:
    """The tags of a logged model standing for the registered version: ``mlflow.modelVersions``
    (what MLflow 3's UI reads to show the registered version in a run's Models column and on its
    page) and the ids that find it again (``lbm.run_id``: the version's own run)."""
    return {"mlflow.modelVersions": json.dumps([{"name": rec.name, "version": str(version)}]),
            "lbm.sha256": rec.sha256, "lbm.ref": rec.ref, "lbm.run_id": run_id}


def logged_model_type(rec: VersionRecord) -> str:
    return f"lbm-{rec.kind}"


def page_difference(description: str, tags: Mapping[str, str], want_description: str,
                    want_tags: Mapping[str, str], linked: bool) -> str | None:
    """Why a version's page (as stored) is not the one the catalog gives, or None (``doctor``)."""
    if description != want_description:
        return "its page is out of date (description)"
    if any(tags.get(k) != v for k, v in want_tags.items()) or any(
            pages.managed_tag(k) and k not in want_tags for k in tags):
        return "its page is out of date (tags)"
    if not linked:
        return "its run does not link it (no logged model)"
    return None


def mirror_content(ws: Workspace, rec: VersionRecord, *, weights: Path, edges: list[dict[str, Any]],
                   lora: dict[str, Any] | None, layers: list[dict[str, Any]], user_tags: Mapping[str, str],
                   extra_artifacts: Mapping[str, Path] | None, catalog_id: str) -> MirrorContent:
    params, metrics, tags, _ = describe(rec, edges, lora, user_tags)
    tags[CATALOG_TAG] = catalog_id
    texts: dict[str, str] = {
        "facts.json": json.dumps(rec.facts, indent=1, sort_keys=True, default=str),
        "lineage.json": json.dumps(edges, indent=1, default=str),
    }
    if rec.config is not None:
        texts["config.json"] = json.dumps(rec.config, indent=1)
    texts.update(layer_files(layers))
    weight_name = rec.file_name or f"{rec.name}-v{rec.number}.safetensors"
    files = {f"weights/{weight_name}": Path(weights), **{k: Path(v) for k, v in (extra_artifacts or {}).items()}}
    return MirrorContent(rec=rec, edges=edges, lora=lora, user_tags=user_tags, params=params, metrics=metrics,
                         run_tags=tags, texts=texts, files=files,
                         version_tags=pages.version_tags(rec, edges, lora, shown_user_tags(user_tags), catalog_id),
                         probe=probe_caption((extra_artifacts or {}).get(pages.PROBE_IMAGE)))


def probe_caption(path: Path | str | None) -> str | None:
    """The tile names of a probe picture file ("" when it names none), None without a picture."""
    if path is None:
        return None
    return pages.probe_tiles(Path(path)) or ""


def model_texts(ws: Workspace, rec: VersionRecord, run_id: str | None) -> dict[str, str]:
    """The MLflow model files of the version's ``weights/`` folder (see registry/mlmodel.py)."""
    from lbm_registry.registry.mlmodel import model_files

    return {f"weights/{k}": v for k, v in model_files(ws, rec, run_id=run_id).items()}


def write_local(folder: Path, texts: Mapping[str, str], files: Mapping[str, Path]) -> None:
    """Artifacts into a local run folder: texts written, files hard-linked (or copied). A full
    disk is one StorageError naming the file being written."""
    from lbm_registry.fileio import refusals_named

    for rel, text in texts.items():
        dest = folder / rel
        with refusals_named(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    for rel, src in files.items():
        with refusals_named(folder / rel):
            link_or_copy(Path(src), folder / rel)


def replace_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` atomically (temp file in the same folder + rename), so a reader
    never sees half a file; the umask's permissions are kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while chunk := inp.read(1 << 20):
                out.write(chunk)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VersionPages:
    """The version page's markdown, with links to the runs it names. The store-specific lookups
    (:meth:`_experiment_of`, :meth:`_compare_runs`) come from the subclass."""

    ws: Workspace
    experiment_id: str

    def version_description(self, rec: VersionRecord, edges: list[dict[str, Any]], lora: dict[str, Any] | None,
                            run_id: str | None, user_tags: Mapping[str, str], *, probe: str | None) -> str:
        """The markdown of the version page (see registry/pages.py), with the runs it links to."""
        extra: list[tuple[str, str | None]] = []
        train_run = user_tags.get(TRAIN_RUN_TAG)
        if train_run:
            extra.append((f"training run:{training_label(rec)}", pages.run_link(self._experiment_of(train_run),
                                                                                train_run)))
        for label, exp_id, rid in self._compare_runs(rec):
            extra.append((f"compared:{label}", pages.run_link(exp_id, rid)))
        return pages.version_description(self.ws, rec, edges, lora, run_id=run_id, experiment_id=self.experiment_id,
                                         probe=probe, extra_runs=extra)

    def _experiment_of(self, run_id: str) -> str | None:
        raise NotImplementedError

    def _compare_runs(self, rec: VersionRecord) -> list[tuple[str, str, str]]:
        raise NotImplementedError


def training_label(rec: VersionRecord) -> str:
    """The link text of a version's training run: what it trained, not a hex id."""
    steps = (rec.facts or {}).get("steps")
    return f"training of {rec.ref}" + (f" ({steps} steps)" if isinstance(steps, int) else "")


def training_run_name(rec: VersionRecord) -> str:
    """A training run that registered its LoRA is named after the version it produced."""
    return rec.ref


class CatalogOwnership:
    """Which MLflow runs/model versions belong to this workspace's catalog. Shared by
    :class:`~lbm_registry.registry.mlflow_sqlite.SqliteMirror` and
    :class:`~lbm_registry.registry.tracking.Tracker` (both set ``ws`` and ``_catalog_id = None``);
    it lives here, below both, so neither imports the other for it."""

    ws: Workspace
    _catalog_id: str | None

    @property
    def catalog_id(self) -> str:
        if self._catalog_id is None:
            self._catalog_id = catalog.catalog_id(self.ws.db)
        return self._catalog_id

    def owns(self, tags: Mapping[str, str] | None) -> bool:
        """Was this run/model version mirrored by our catalog? Untagged ones (made before
        catalog ids existed, or by hand) count as ours; another catalog's never do."""
        owner = (tags or {}).get(MV_CATALOG_TAG) or (tags or {}).get(CATALOG_TAG)
        return owner is None or owner == self.catalog_id
