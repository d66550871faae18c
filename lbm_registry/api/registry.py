"""Facade over the registry used by every other API module and by the CLI (contract).

    resolve(ref, settings=None, kinds=None, relative_to=None) -> ResolvedAsset
    register_asset(path, *, name, kind, settings, config=None, facts=None, lineage=None,
                   params=None, metrics=None, artifacts=None, tags=None) -> ResolvedAsset
    update_facts(asset, facts, settings, metrics=None, artifacts=None) -> None
    validate_name(name) -> None
    list_assets(settings, kind=None) -> list[dict]
    show(ref, settings) -> dict
    lineage_tree(ref, settings) -> dict
    layer_table(asset, settings) -> list[dict]
    set_alias(ref, alias, settings) -> dict / remove_alias(name, alias, settings) -> dict
    attach_artifact(asset, path, settings) -> None   (e.g. a probe picture drawn afterwards)
    init_workspace(settings) -> dict / doctor(settings, repair=False) -> dict / gc(settings, cache=False) -> dict
    pull(ref, settings) -> dict   (fetch a version and its base from the tracking server)

    tensor_sha_of(asset) -> str | None / lora_fits_base(sha, tensor_sha, base) -> bool   (base identity)
    hash_in_background(assets, tensor_sha_for=None) -> PendingHashes   (resolve(..., hash_file=False), then .settle())

Each call opens the workspace, does its work and closes it again (no global state). Nothing
here imports torch (a ``.ckpt`` base's tensor hash aside) nor any other API module: this is the
API's bottom floor. Importing files (:mod:`lbm_registry.api.assets.models`) and the probe picture
drawn after registration (:func:`lbm_registry.api.run.probe.after_registration`) live above it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbm_registry.errors import RefError, RegistryError
from lbm_registry.settings import WorkspaceSettings


@dataclass
class ResolvedAsset:
    """What a reference points at. ``kind`` is base|model|lora, or ``file`` for an unregistered path.

    For registered versions ``path`` is the (read-only) blob, ``ref`` is canonical ``name@N``,
    ``facts`` includes ``base_sha256``/``tuned_sha256`` when known, ``size``, ``dtype``,
    ``created_at`` and, for LoRAs, ``layers`` (the per-layer table), and ``lineage`` has
    ``{"base"|"tuned"|"parent": {"sha256", "ref", "registered"}, "datasets": [...],
    "training_config": {...}}`` for what is recorded.
    """

    ref: str
    path: Path
    sha256: str
    kind: str
    name: str | None = None
    version: int | None = None
    config: dict[str, Any] | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.name else str(self.path)




def validate_name(name: str) -> None:
    """Names are path- and URL-safe, and never look like a version (``v2``, ``12``), which
    would be ambiguous in ``compare A v2``."""
    from lbm_registry.registry.refs import name_problem

    problem = name_problem(name or "")
    if problem:
        raise RegistryError(problem)


def _settings(settings: WorkspaceSettings | None) -> WorkspaceSettings:
    return settings if settings is not None else WorkspaceSettings.resolve()


def open_existing(settings: WorkspaceSettings | None) -> Any:
    """The workspace, opened for reading and maintenance; refused when there is none.

    Only ``init`` and registering calls create a workspace: a typo in a home must not make a
    new, empty registry that then reports "no problems"."""
    from lbm_registry.fileio import folder_problem
    from lbm_registry.registry.db import mask_url, sqlite_path
    from lbm_registry.registry.workspace import Workspace

    s = _settings(settings)
    ws = Workspace.open_existing(s)
    if ws is None:
        if s.catalog_url:  # the catalog named by a URL is what is missing, not the home
            where = sqlite_path(s.catalog_url) or mask_url(s.catalog_url)
            raise RegistryError(f"no catalog at {where} (catalog_url): nothing was initialised there",
                                cli=f"no catalog at {where}: check --catalog-url / $LBM_REG_CATALOG_URL, "
                                    "or create one with 'lbm-reg init'")
        why = folder_problem(s.home)
        if why:
            raise RegistryError(f"no registry at {s.home}: {why}",
                                cli=f"no registry at {s.home}: {why}; check --home / $LBM_REG_HOME")
        raise RegistryError(f"no registry at {s.home}: nothing was initialised or registered there",
                            cli=f"no registry at {s.home}: check --home / $LBM_REG_HOME, "
                                "or create one with 'lbm-reg init'")
    return ws


def _to_asset(ws: Any, rec: Any, *, layers: bool = True) -> ResolvedAsset:
    from lbm_registry.registry import catalog, refs, views

    path = refs.check_blob(ws, rec)
    edges = catalog.edges(ws.db, rec.id)
    lora = catalog.lora_facts(ws.db, rec.id)
    facts = views.facts_of(rec, edges, lora)
    facts.setdefault("created_at", views.iso(rec.created_at))
    if rec.kind == "lora" and layers:
        facts["layers"] = catalog.layers(ws.db, rec.id)
    return ResolvedAsset(ref=rec.ref, path=path, sha256=rec.sha256, kind=rec.kind, name=rec.name,
                         version=rec.number, config=rec.config, facts=facts,
                         lineage=views.lineage_of(edges, rec.facts))


def _check_kind(asset: ResolvedAsset, ref: str, kinds: tuple[str, ...] | None) -> ResolvedAsset:
    if kinds and asset.kind != "file" and asset.kind not in kinds:
        raise RefError(f"{ref} is a {asset.kind} ({asset.ref}), expected a {' or '.join(kinds)}")
    return asset


def resolve(ref: str, settings: WorkspaceSettings | None = None, kinds: tuple[str, ...] | None = None,
            relative_to: ResolvedAsset | None = None, *, layers: bool = True,
            hash_file: bool = True) -> ResolvedAsset:
    """Resolve a reference (see DESIGN.md "References") to a readable weight file.

    ``relative_to``: a bare ``vN``/``N`` means version N of that asset (``compare A v2``);
    without it, of the only LoRA asset. Registered blobs are size-checked and refused when
    doctor found them damaged. Unregistered files are hashed (cached by path/size/mtime).
    ``layers=False`` leaves out a LoRA's per-layer table (792 rows at full size), which a server
    resolving every request does not need. ``hash_file=False``: an unregistered file's
    ``sha256`` is its cached hash or ``""``, for :func:`hash_in_background` to fill in.
    """
    from lbm_registry.registry import refs
    from lbm_registry.registry.workspace import Workspace

    ws = Workspace.open_existing(_settings(settings))
    try:
        rel = relative_to.name if relative_to is not None and relative_to.kind != "file" else None
        res = refs.resolve(ws, str(ref), relative_to=rel, home=_settings(settings).home, hash_files=hash_file)
        if res.record is not None:
            return _check_kind(_to_asset(ws, res.record, layers=layers), str(ref), kinds)
        size = res.path.stat().st_size
        from lbm_registry.registry.blobs import sniff_dtype

        facts = {"size": size}
        dtype = sniff_dtype(res.path)
        if dtype:
            facts["dtype"] = dtype
        return ResolvedAsset(ref=res.ref, path=res.path, sha256=res.sha256 or "", kind="file", facts=facts)
    finally:
        if ws is not None:
            ws.close()


@dataclass
class PendingHashes:
    """Hashes plain-file inputs still owe, running on low-priority threads while the caller
    works (:class:`~lbm_registry.registry.blobs.BackgroundDigest`): :meth:`settle` waits and
    writes them into the assets (``sha256``, the base's ``facts["tensor_sha256"]``)."""

    jobs: list[tuple[ResolvedAsset, str, Any]] = field(default_factory=list)
    waited_s: float = 0.0

    def settle(self, settings: WorkspaceSettings | None = None) -> None:
        """Wait for every hash and fill it in; the file hashes go to the registry's hash cache.
        An input that became unreadable meanwhile raises one RefError; idempotent."""
        import time

        from lbm_registry.registry import refs
        from lbm_registry.registry.workspace import Workspace

        t0 = time.perf_counter()
        jobs, self.jobs = self.jobs, []
        done = []
        try:
            for i, (asset, what, digest) in enumerate(jobs):
                try:
                    sha = digest.result()
                except OSError as exc:
                    if what == "tensor_sha256":   # as tensor_sha_of: unknown, not an error
                        continue
                    for _, _, rest in jobs[i + 1:]:
                        rest.cancel()
                    raise RefError(f"cannot read {asset.path}: {exc.strerror or exc}") from None
                if what == "tensor_sha256":
                    asset.facts = {**(asset.facts or {}), "tensor_sha256": sha}
                else:
                    asset.sha256 = sha
                done.append((asset.path, digest.stat, sha, what == "tensor_sha256"))
        finally:
            self.waited_s += time.perf_counter() - t0
        ws = Workspace.open_existing(_settings(settings)) if done else None
        if ws is not None:
            try:
                for path, stamp, sha, tensors in done:
                    refs.remember_file_sha256(ws, path, stamp, sha, tensors=tensors)
            finally:
                ws.close()

    def cancel(self) -> None:
        """Stop every hash still running (an input was refused, or the work failed)."""
        for _, _, digest in self.jobs:
            digest.cancel()
        self.jobs = []


def hash_in_background(assets: list[ResolvedAsset], tensor_sha_for: ResolvedAsset | None = None,
                       settings: WorkspaceSettings | None = None) -> PendingHashes:
    """Start hashing the plain files among ``assets`` that have no (cached) hash yet, and the
    tensor bytes of ``tensor_sha_for`` (a safetensors base) when neither the registry nor the
    hash cache knows them."""
    from lbm_registry.registry.blobs import BackgroundDigest
    from lbm_registry.safetensors_layout import data_start

    pending = PendingHashes()
    try:
        for asset in assets:
            if asset.kind == "file" and not asset.sha256:
                pending.jobs.append((asset, "sha256", BackgroundDigest(asset.path)))
        t = tensor_sha_for
        if t is not None and t.kind == "file" and not (t.facts or {}).get("tensor_sha256"):
            from lbm_registry.lbm.header import CKPT_SUFFIXES

            if t.path.suffix not in CKPT_SUFFIXES:
                if cached := _cached_tensor_sha(t.path, settings):
                    t.facts = {**(t.facts or {}), "tensor_sha256": cached}
                    return pending
                try:
                    start = data_start(t.path)
                except (OSError, ValueError):
                    start = None
                if start is not None:
                    pending.jobs.append((t, "tensor_sha256", BackgroundDigest(t.path, offset=start)))
    except OSError as exc:
        pending.cancel()
        raise RefError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    return pending


def _cached_tensor_sha(path: Path, settings: WorkspaceSettings | None) -> str | None:
    from lbm_registry.registry import refs
    from lbm_registry.registry.workspace import Workspace

    ws = Workspace.open_existing(_settings(settings))
    if ws is None:
        return None
    try:
        return refs.cached_file_sha256(ws, path, tensors=True)
    finally:
        ws.close()


def resolve_by_tensor_sha(tensor_sha256: str | None, settings: WorkspaceSettings | None = None) -> ResolvedAsset | None:
    """The first registered base/model whose tensor bytes hash to ``tensor_sha256``, or None."""
    if not tensor_sha256 or not re.fullmatch(r"[0-9a-f]{64}", tensor_sha256):
        return None
    from lbm_registry.registry import catalog
    from lbm_registry.registry.workspace import Workspace

    ws = Workspace.open_existing(_settings(settings))
    if ws is None:
        return None
    try:
        recs = [r for r in catalog.versions_by_tensor_sha(ws.db, tensor_sha256) if r.kind in ("base", "model")]
        return _to_asset(ws, recs[0]) if recs else None
    finally:
        ws.close()


def register_asset(path: str | Path, *, name: str, kind: str, settings: WorkspaceSettings,
                   config: dict[str, Any] | None = None, facts: Mapping[str, Any] | None = None,
                   lineage: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, Any] | None = None, artifacts: Any = None,
                   tags: Mapping[str, Any] | None = None, refuse_duplicate: bool = False,
                   link: bool = False, work_started: float | None = None) -> ResolvedAsset:
    """Register ``path`` as the next version of ``name`` (all-or-nothing; see registry/register.py).

    kind ``lora``: ``facts`` has rank, conv_rank, policy, alpha, dtype, mean_error, max_error,
    optional functional_error, ``layers`` (list of {module, kind, shape, rank, rel_error,
    energy}) and ``skipped``; ``lineage`` must have ``base``. ``lineage`` values for base/tuned/
    parent are a ResolvedAsset, a sha256 string or a reference; ``datasets`` is a list of
    {"path", "sha256"}; ``training_config`` a dict. ``artifacts``: {artifact path: file} or a
    list of files, logged to the MLflow run next to the weights. ``link``: ``path`` is a
    temporary file the caller wrote and will not touch again, so the blob may be a hard link to
    it instead of a copy (a user's own file is never linked: the blob is read-only).
    ``work_started``: when the work that made the file began (``time.time()``): the version's MLflow
    run spans it (default: the registration).
    """
    from lbm_registry.registry.register import register
    from lbm_registry.registry.workspace import Workspace

    validate_name(name)
    with Workspace.open(_settings(settings)) as ws:
        rec = register(ws, path, name=name, kind=kind, config=config, facts=facts, lineage=lineage,
                       params=params, metrics=metrics, artifacts=artifacts, tags=tags,
                       refuse_duplicate=refuse_duplicate, link=link, work_started=work_started)
        return _to_asset(ws, rec)


def update_facts(asset: ResolvedAsset, facts: Mapping[str, Any], settings: WorkspaceSettings | None = None,
                 metrics: Mapping[str, Any] | None = None, artifacts: Any = None) -> None:
    """Merge ``facts`` (e.g. validation results) into a registered version.

    Top-level numeric facts and ``metrics`` are logged as metrics on the version's MLflow run,
    ``artifacts`` are added to it, the catalog facts are merged (LoRA summary columns such as
    ``functional_error`` follow; a ``layers`` list replaces the per-layer table) and an event is
    appended to the log. ``asset.facts`` is updated in place too.
    """
    from lbm_registry.registry.register import update_version_facts
    from lbm_registry.registry.workspace import Workspace

    if asset.kind == "file" or not asset.name or asset.version is None:
        raise RegistryError(f"{asset.ref} is not a registered version: register it first to record facts")
    with Workspace.open(_settings(settings)) as ws:
        new = update_version_facts(ws, asset.name, asset.version, facts, metrics=metrics, artifacts=artifacts)
    asset.facts.update(new)


def refresh_pages(refs: list[str], settings: WorkspaceSettings | None = None) -> None:
    """Rebuild the MLflow pages (tags, description) of registered versions, e.g. after a compare
    run judged them. Best effort: unregistered files and MLflow failures are skipped."""
    from lbm_registry.errors import LBMError
    from lbm_registry.registry import refs as _refs
    from lbm_registry.registry.tracking import Tracker
    from lbm_registry.registry.workspace import Workspace

    ws = Workspace.open_existing(_settings(settings))
    if ws is None:
        return
    try:
        tracker = None
        for ref in dict.fromkeys(refs):
            try:
                rec = _refs.resolve(ws, str(ref)).record
                if rec is None:
                    continue
                tracker = tracker or Tracker(ws)
                tracker.refresh_version(rec)
            except LBMError:
                continue
    finally:
        ws.close()


def attach_artifact(asset: ResolvedAsset, path: str | Path, settings: WorkspaceSettings | None = None) -> None:
    """Add a file (e.g. a probe picture drawn after registration) to a registered version's
    MLflow run, under its own name, and rebuild the version page. See
    :func:`lbm_registry.registry.register.attach_artifact`."""
    from lbm_registry.registry import catalog
    from lbm_registry.registry.register import attach_artifact as _attach

    if asset.kind == "file" or not asset.name or asset.version is None:
        raise RegistryError(f"{asset.ref} is not a registered version")
    with open_existing(settings) as ws:
        rec = catalog.version(ws.db, asset.name, asset.version)
        if rec is None or rec.sha256 != asset.sha256:
            raise RefError(f"{asset.ref} is no longer registered")
        _attach(ws, rec, Path(path))


def fetch_artifact(asset: ResolvedAsset, rel: str, scratch: str | Path,
                   settings: WorkspaceSettings | None = None) -> Path:
    """One file of a registered version's MLflow run (e.g. a LoRA's calibration statistics):
    read in place from a local artifact store, downloaded into ``scratch`` from a server."""
    from lbm_registry.registry import catalog
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.tracking import Tracker, _local_dir, mlflow_errors

    if asset.kind == "file" or not asset.name or asset.version is None:
        raise RegistryError(f"{asset.ref} is not a registered version")
    with open_existing(settings) as ws:
        rec = catalog.version(ws.db, asset.name, asset.version)
        if rec is None or not rec.mlflow_run_id:
            raise RegistryError(f"{asset.ref} has no MLflow run (run 'lbm-reg doctor --repair')")
        fast = SqliteMirror.open(ws)
        folder = fast.artifact_folder(rec.mlflow_run_id) if fast is not None else None
        if folder is None:
            tracker = Tracker(ws)
            with mlflow_errors(f"artifacts of {rec.ref}"):
                folder = _local_dir(tracker.client.get_run(rec.mlflow_run_id).info.artifact_uri)
                if folder is None:
                    Path(scratch).mkdir(parents=True, exist_ok=True)
                    return Path(tracker.client.download_artifacts(rec.mlflow_run_id, rel, str(scratch)))
        path = folder / rel
        if not path.is_file():
            raise RegistryError(f"{rec.ref} has no artifact {rel}")
        return path


def list_assets(settings: WorkspaceSettings | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """Every asset with its latest ready version (name, kind, latest, versions, sha256, size,
    dtype, created_at, aliases, and LoRA rank/policy/mean_error)."""
    from lbm_registry.registry import views
    from lbm_registry.registry.catalog import KINDS

    if kind is not None and kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    with open_existing(settings) as ws:
        return views.list_assets(ws, kind)


def _with_record(ref: str, settings: WorkspaceSettings | None, fn: Callable[[Any, Any], Any],
                 on_file: Callable[[Any], Any] | None = None) -> Any:
    from lbm_registry.registry import refs
    from lbm_registry.registry.workspace import Workspace

    s = _settings(settings)
    ws = Workspace.open_existing(s)
    try:
        res = refs.resolve(ws, str(ref), home=s.home)
        if res.record is None:
            if on_file is None:
                raise RefError(f"{ref} is an unregistered file")
            return on_file(res)
        return fn(ws, res.record)
    finally:
        if ws is not None:
            ws.close()


def show(ref: str, settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """All facts of one version: hashes, sizes, LoRA facts, per-layer table, lineage,
    descendants, aliases, tags, MLflow ids, config. An unregistered file shows its hash."""
    from lbm_registry.registry import views
    from lbm_registry.registry.blobs import sniff_dtype

    s = _settings(settings)

    def on_file(res: Any) -> dict[str, Any]:
        return {"ref": res.ref, "kind": "file", "path": str(res.path), "sha256": res.sha256,
                "size": res.path.stat().st_size, "dtype": sniff_dtype(res.path)}

    return _with_record(ref, s, lambda ws, rec: views.show_version(ws, rec, tracking_uri=s.effective_tracking_uri),
                        on_file)


def lineage_tree(ref: str, settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """``{"node": {...}, "up": [...], "down": [...]}``: up to the base, down to descendants."""
    from lbm_registry.registry import views

    return _with_record(ref, settings, views.lineage_tree)


def layer_table(asset: ResolvedAsset | str, settings: WorkspaceSettings | None = None) -> list[dict[str, Any]]:
    """The per-layer rows (module, kind, shape, rank, rel_error, energy) of a LoRA version."""
    from lbm_registry.registry import catalog

    ref = asset.ref if isinstance(asset, ResolvedAsset) else asset
    return _with_record(ref, settings, lambda ws, rec: catalog.layers(ws.db, rec.id))


def set_alias(ref: str, alias: str, settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """Point ``alias`` at the version ``ref`` resolves to (mirrored as an MLflow alias).
    Returns {"name", "alias", "version", "previous"}."""
    from lbm_registry.registry import aliases

    aliases.validate_alias(alias)
    with open_existing(settings) as ws:
        return aliases.set_alias(ws, ref, alias)


def remove_alias(name: str, alias: str, settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """Remove ``NAME@ALIAS``. Returns {"name", "alias", "version"} (where it pointed)."""
    from lbm_registry.registry import aliases

    with open_existing(settings) as ws:
        return aliases.remove_alias(ws, name, alias)


def check_name_free(name: str, kind: str, settings: WorkspaceSettings | None = None) -> None:
    """Refuse, before any work, a name already used by an asset of another kind, and a registry
    this process cannot write (registration checks both again; this is the early, cheap answer)."""
    from lbm_registry.registry import catalog
    from lbm_registry.registry.workspace import Workspace, check_writable_home

    validate_name(name)
    check_writable_home(_settings(settings).home)
    ws = Workspace.open_existing(_settings(settings))
    if ws is None:
        return
    try:
        a = catalog.asset(ws.db, name)
    finally:
        ws.close()
    if a is not None and a["kind"] != kind:
        raise RegistryError(f"{name!r} is a {a['kind']}: it cannot get a {kind} version (choose another name)")


def undone_if_new(home: Path | None, errors: tuple[type[BaseException], ...] = (Exception,)) -> Any:
    """A block that may create the workspace ``home`` and leaves nothing there if it fails with
    one of ``errors`` (see :func:`lbm_registry.registry.workspace.undone_if_new`); for the CLI."""
    from lbm_registry.registry.workspace import undone_if_new as undone

    return undone(home, errors)


def init_workspace(settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """Create or upgrade the workspace: catalog (Alembic), MLflow DB + experiment, blob store."""
    from lbm_registry.registry import schema
    from lbm_registry.registry.db import mask_url
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.tracking import Tracker
    from lbm_registry.registry.workspace import Workspace, undone_if_new

    s = _settings(settings)
    with undone_if_new(s.home), Workspace.open(s) as ws:
        # An MLflow store that is already set up is read with sqlite3 (no MLflow import);
        # creating one runs MLflow's own migrations.
        tracker = SqliteMirror.open(ws) or Tracker(ws)
        return {"home": str(ws.home), "catalog": mask_url(s.effective_catalog_url), "schema": schema.SCHEMA_HEAD,
                "tracking_uri": mask_url(s.effective_tracking_uri), "experiment_id": tracker.experiment_id,
                "blobs": str(ws.blobs_dir)}


def doctor(settings: WorkspaceSettings | None = None, repair: bool = False,
           progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Catalog vs blobs vs MLflow. See :mod:`lbm_registry.registry.doctor`."""
    from lbm_registry.registry import doctor as _doctor

    with open_existing(settings) as ws:
        return _doctor.doctor(ws, repair=repair, progress=progress)


def gc(settings: WorkspaceSettings | None = None, cache: bool = False) -> dict[str, Any]:
    """Remove failed/abandoned registrations and blobs no version references; with ``cache``,
    also drop this home's copies of blobs the tracking server holds (never the only copy)."""
    from lbm_registry.registry import doctor as _doctor

    with open_existing(settings) as ws:
        return _doctor.gc(ws, cache=cache)


def pull(ref: str, settings: WorkspaceSettings | None = None, progress: Any = "default") -> dict[str, Any]:
    """Fetch a version's weights, and its base's, into this home ahead of time.

    Returns ``{"ref", "home", "blobs": [{"ref", "role", "sha256", "size", "path", "status",
    "seconds"}]}`` where status is ``fetched``, ``cached`` (already here) or ``local`` (this home
    is the registry's own store, nothing to fetch). ``progress``: a fetch progress factory, None
    for no bar, or the default Rich bar on stderr."""
    from lbm_registry.registry import catalog, fetch, refs

    with open_existing(settings) as ws:
        res = refs.resolve(ws, str(ref))
        if res.record is None:
            raise RefError(f"{ref} is an unregistered file: there is nothing to pull")
        todo = [("version", res.record)]
        for edge in catalog.edges(ws.db, res.record.id):
            if edge["role"] != "base":
                continue
            base = (catalog.version(ws.db, edge["target_name"], edge["target_number"])
                    if edge.get("target_name") else None)
            if base is None or base.status != "ready":
                candidates = catalog.versions_by_sha(ws.db, edge["sha256"]) if edge.get("sha256") else []
                base = candidates[0] if candidates else None
            if base is None:
                raise RegistryError(f"{res.record.ref}: its base {(edge.get('sha256') or '?')[:12]} is not a "
                                    f"registered version, so it cannot be pulled")
            todo.append(("base", base))
        out = []
        for role, rec in todo:
            if not fetch.is_cache_home(ws):
                path, status, seconds = refs.check_blob(ws, rec), "local", 0.0
            else:
                if rec.integrity != "ok":
                    refs.check_blob(ws, rec)  # raises the one-line refusal
                kw = {} if progress == "default" else {"progress": progress}
                got = fetch.ensure_local(ws, rec, **kw)
                path, status, seconds = got.path, ("fetched" if got.fetched else "cached"), got.seconds
            out.append({"ref": rec.ref, "role": role, "sha256": rec.sha256, "size": rec.size, "path": str(path),
                        "status": status, "seconds": round(seconds, 3)})
        return {"ref": res.record.ref, "home": str(ws.home), "blobs": out}


def registered_since(settings: WorkspaceSettings, since: float) -> list[str]:
    """``name@N`` of the versions this process registered since ``since`` (a ``time.time()``).

    Read from the audit log (each ``register`` event names its ``host:pid``), so a Ctrl-C can
    say exactly what it left registered. Opens nothing that does not exist yet.
    """
    from lbm_registry.registry.workspace import Workspace, actor

    ws = Workspace.open_existing(settings)
    if ws is None:
        return []
    with ws:
        rows = ws.db.query("SELECT name, number FROM events WHERE action = 'register' AND actor = :a "
                           "AND at >= :t ORDER BY id", {"a": actor(), "t": since})
    return [f"{r['name']}@{r['number']}" for r in rows]


def ui_command(settings: WorkspaceSettings | None = None, host: str = "127.0.0.1", port: int = 5000,
               open_browser: bool = False) -> list[str]:
    """The command line serving this workspace's MLflow UI (after creating it if needed): MLflow's
    own app in one process, no workers or job executor (see :mod:`lbm_registry.registry.ui`).
    ``open_browser``: the server opens :func:`ui_url` once it accepts connections."""
    import sys

    s = _settings(settings)
    if s.tracking_uri and not s.effective_tracking_uri.startswith("sqlite:"):
        from lbm_registry.registry.db import mask_url

        raise RegistryError(f"this workspace tracks to {mask_url(s.effective_tracking_uri)}: "
                            "open that server's UI instead")
    open_existing(s).close()  # a UI on a typo'd home would show a new, empty registry
    from lbm_registry.net import check_bindable

    check_bindable(host, port)  # a taken port: one line, and the workspace is left as it was
    init_workspace(s)
    cmd = [sys.executable, "-m", "lbm_registry.registry.ui", "--backend-store-uri", s.effective_tracking_uri,
           "--default-artifact-root", (s.home / "artifacts").as_uri(), "--host", host, "--port", str(port)]
    return [*cmd, "--open", ui_url(host, port)] if open_browser else cmd


def mlflow_serve_command(ref: str, settings: WorkspaceSettings | None = None, host: str = "127.0.0.1",
                         port: int = 5001, workers: int = 1) -> tuple[list[str], dict[str, str], str]:
    """``mlflow models serve`` of a registered version, runnable from any shell: (command line,
    environment, the version's ``models:/`` URI).

    MLflow starts its scoring server as ``uvicorn ...`` by name, so a plain ``mlflow models serve``
    fails with ``uvicorn: not found`` unless this environment's ``bin`` folder is on ``PATH`` (an
    activated virtualenv). The environment returned here puts it there, and points MLflow and the
    registry (which finds a LoRA's base) at this workspace."""
    import os
    import sys

    s = _settings(settings)
    info = show(ref, s)
    if info.get("kind") == "file" or not (info.get("mlflow") or {}).get("model_version"):
        raise RegistryError(f"{ref} is not a registered version mirrored to MLflow"
                            + (" (run 'lbm-reg doctor --repair')" if info.get("kind") != "file" else ""))
    from lbm_registry.net import check_bindable

    check_bindable(host, port)
    uri = f"models:/{info['name']}/{info['mlflow']['model_version']}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": s.effective_tracking_uri, "LBM_REG_HOME": str(s.home),
           "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}
    if s.catalog_url:
        env["LBM_REG_CATALOG_URL"] = str(s.catalog_url)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--host", host,
           "--port", str(port), "--workers", str(workers)]
    return cmd, env, uri


def ui_url(host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where ``lbm-reg ui`` lands: the model registry, in MLflow's machine-learning mode."""
    from lbm_registry.registry.ui import landing_url

    return landing_url(host, port)


def remove(ref: str, *, force: bool = False, settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """Delete a version: catalog rows, MLflow model version and run, and its blob when no other
    version uses it. Refused while an alias points at it or a ready version names it in its
    lineage, unless ``force``. See :mod:`lbm_registry.registry.remove`."""
    from lbm_registry.registry.remove import remove_version

    with open_existing(settings) as ws:
        return remove_version(ws, ref, force=force).to_dict()


# -- base identity (which LoRA fits which base) -------------------------------------------
def tensor_sha_of(asset: ResolvedAsset) -> str | None:
    """The sha256 of a base's tensor bytes: recorded for registered versions, else computed
    (for a pickle checkpoint: those of its conversion to safetensors, which ``import`` registers).
    Identifies a base whatever metadata a re-save gave it."""
    recorded = (asset.facts or {}).get("tensor_sha256")
    if recorded:
        return str(recorded)
    from lbm_registry.lbm.checkpoint import CKPT_SUFFIXES

    if asset.kind != "file":
        return None
    if asset.path.suffix in CKPT_SUFFIXES:
        from lbm_registry.errors import LBMError
        from lbm_registry.lbm.checkpoint import CheckpointReader

        try:
            with CheckpointReader(asset.path) as reader:
                return reader.tensor_sha256()
        except LBMError:
            return None
    from lbm_registry.safetensors_layout import tensor_sha256

    try:
        return tensor_sha256(asset.path)
    except (OSError, ValueError):
        return None


def lora_fits_base(base_sha256: str | None, base_tensor_sha256: str | None, base: ResolvedAsset) -> bool:
    """Was a LoRA recorded for ``base``? Either hash matching is enough: the file sha256, or
    the tensor-bytes sha256 (a re-saved identical base). A LoRA that records no base fits."""
    if not base_sha256 and not base_tensor_sha256:
        return True
    if base_sha256 and base_sha256 == base.sha256:
        return True
    return bool(base_tensor_sha256) and base_tensor_sha256 == tensor_sha_of(base)
