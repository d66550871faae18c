"""All-or-nothing registration of a file as a new version.

1. hash the file (outside any transaction: hashing 5 GB takes a while);
2. one transaction allocates the next version number and inserts the version as ``pending``
   with its lineage, facts, layers and tags (retried when another process won the race);
3. store the blob (temp file, fsync, rename, 0444; a hard link when possible);
4. mirror to MLflow (run + model version; the run id is recorded as soon as it exists): in one
   SQLite transaction when the workspace's own MLflow store allows it (registry/mlflow_sqlite.py),
   through the MLflow client otherwise;
5. one transaction flips the version to ``ready``.

Only ready versions are visible, so a crash or ``kill -9`` anywhere leaves nothing half-made
in sight; what it leaves behind (a pending row, a blob, an MLflow run) is found and removed
by ``lbm-reg doctor --repair``. An exception (Ctrl-C included) marks the version ``failed``
and removes its MLflow run on the way out.

``$LBM_REG_DEBUG_PAUSE_AT`` (pending|blob|mlflow_run|mlflow_version|ready) makes the process print
``lbm-reg: paused at <stage>`` on stderr and sleep there: the crash tests kill (or Ctrl-C) it at that
point; ``ready`` is just after the version became visible.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbm_registry.errors import LBMError, RefError, RegistryError
from lbm_registry.fileio import refusals_named
from lbm_registry.registry import catalog, refs
from lbm_registry.registry.blobs import blob_path, blob_relpath, sniff_dtype, store_blob
from lbm_registry.registry.catalog import KINDS, VersionRecord, dumps
from lbm_registry.registry.db import with_retries
from lbm_registry.registry.workspace import Workspace, actor
from lbm_registry.version import __version__

PAUSE_ENV = "LBM_REG_DEBUG_PAUSE_AT"
SHA_RE = re.compile(r"[0-9a-f]{64}")
LINEAGE_KEYS = {"base", "tuned", "parent", "datasets", "training_config"}
ROLE_KIND = {"base": "base", "tuned": "model", "parent": "lora"}
LORA_COLUMNS = ("rank", "conv_rank", "policy", "alpha", "mean_error", "max_error", "functional_error")


@dataclass
class Edge:
    role: str
    sha256: str | None
    ref: str | None = None
    path: str | None = None
    target_version_id: int | None = None


def pause(stage: str) -> None:
    """Test hook: stop at ``stage`` so a test can SIGKILL this process there."""
    if os.environ.get(PAUSE_ENV) == stage:
        sys.stderr.write(f"lbm-reg: paused at {stage}\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get("LBM_REG_DEBUG_PAUSE_S", "3600")))


# -- normalising inputs --------------------------------------------------------------------
def _edge_from_sha(ws: Workspace, role: str, sha: str, ref: str | None, path: str | None = None) -> Edge:
    recs = catalog.versions_by_sha(ws.db, sha)
    want = ROLE_KIND.get(role)
    recs.sort(key=lambda r: r.kind != want)  # prefer a version of the kind the role implies
    if recs:
        return Edge(role, sha, ref=recs[0].ref, path=path, target_version_id=recs[0].id)
    return Edge(role, sha, ref=ref, path=path)


def lineage_edges(ws: Workspace, lineage: Mapping[str, Any] | None) -> tuple[list[Edge], Any]:
    """Edges from the facade's lineage dict; returns (edges, training_config)."""
    lineage = dict(lineage or {})
    unknown = set(lineage) - LINEAGE_KEYS
    if unknown:
        raise RegistryError(f"unknown lineage key(s): {', '.join(sorted(unknown))} "
                            f"(expected {', '.join(sorted(LINEAGE_KEYS))})")
    out: list[Edge] = []
    for role in ("base", "tuned", "parent"):
        value = lineage.get(role)
        if value is None:
            continue
        # ``parent`` may be a list: a merge has several (each recorded as its own edge)
        for item in (value if role == "parent" and isinstance(value, list | tuple) else [value]):
            out.append(_edge(ws, role, item))
    for d in lineage.get("datasets") or []:
        if isinstance(d, str | Path):
            d = {"path": str(d)}
        sha = d.get("sha256")
        if sha is None and d.get("path") and Path(d["path"]).is_file():
            sha = refs.file_sha256(ws, Path(d["path"]))
        out.append(Edge("dataset", sha, ref=d.get("ref") or (str(d["path"]) if d.get("path") else None),
                        path=str(d["path"]) if d.get("path") else None))
    return out, lineage.get("training_config")


def _edge(ws: Workspace, role: str, value: Any) -> Edge:
    if isinstance(value, Mapping):
        sha, ref = value.get("sha256"), value.get("ref")
        if not sha:
            raise RegistryError(f"lineage {role!r} needs a sha256")
        return _edge_from_sha(ws, role, str(sha).lower(), ref)
    if isinstance(value, str):
        if SHA_RE.fullmatch(value.lower()):
            return _edge_from_sha(ws, role, value.lower(), None)
        res = refs.resolve(ws, value)  # a reference such as "sdxl-base@2" or a path
        value = res.record if res.record is not None else res
        if isinstance(value, refs.Resolution):
            return _edge_from_sha(ws, role, value.sha256, value.ref, str(value.path))
    if isinstance(value, VersionRecord):
        return Edge(role, value.sha256, ref=value.ref, target_version_id=value.id)
    sha = getattr(value, "sha256", None)
    if not sha:
        raise RegistryError(f"lineage {role!r}: expected a resolved asset or a sha256, got {type(value).__name__}")
    name, number = getattr(value, "name", None), getattr(value, "version", None)
    if name and number is not None:
        rec = catalog.version(ws.db, name, int(number))
        if rec is not None and rec.sha256 == sha:
            return Edge(role, sha, ref=rec.ref, target_version_id=rec.id)
    path = getattr(value, "path", None)
    return _edge_from_sha(ws, role, sha, getattr(value, "ref", None), str(path) if path else None)


def _shape(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return "x".join(str(int(d)) for d in value)


def layer_rows(layers: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for layer in layers:
        if "module" not in layer:
            raise RegistryError("each entry of facts['layers'] needs a 'module'")
        rows.append({
            "module": str(layer["module"]), "kind": layer.get("kind"), "shape": _shape(layer.get("shape")),
            "rank": None if layer.get("rank") is None else int(layer["rank"]),
            "rel_error": None if layer.get("rel_error") is None else float(layer["rel_error"]),
            "energy": None if layer.get("energy") is None else float(layer["energy"]),
        })
    return rows


def artifact_files(artifacts: Any) -> dict[str, Path]:
    """Extra artifacts: a mapping {artifact path: file} or an iterable of files (kept by name)."""
    if not artifacts:
        return {}
    if isinstance(artifacts, Mapping):
        items = {str(k): Path(v) for k, v in artifacts.items()}
    else:
        items = {Path(p).name: Path(p) for p in artifacts}
    for rel, p in items.items():
        if not p.is_file():
            raise RegistryError(f"artifact {rel!r}: file not found: {p}")
    return items


def metric_numbers(values: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (values or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[str(k)] = float(v)
        elif hasattr(v, "item"):
            out[str(k)] = float(v.item())
        else:
            raise RegistryError(f"metric {k!r} is not a number: {v!r}")
    return out


# -- the transactions ----------------------------------------------------------------------
def insert_lora_facts(tx: Any, version_id: int, facts: Mapping[str, Any], size: int, n_layers: int) -> None:
    row = {k: facts.get(k) for k in LORA_COLUMNS}
    skipped = facts.get("skipped") or []
    tx.execute("DELETE FROM lora_facts WHERE version_id = :v", {"v": version_id})
    tx.execute(
        "INSERT INTO lora_facts (version_id, rank, conv_rank, policy, alpha, file_size, mean_error, max_error, "
        "functional_error, n_layers, n_skipped) VALUES (:v, :rank, :conv_rank, :policy, :alpha, :size, "
        ":mean_error, :max_error, :functional_error, :n_layers, :n_skipped)",
        {"v": version_id, **{k: _scalar(row[k]) for k in LORA_COLUMNS}, "size": size,
         "n_layers": n_layers or facts.get("n_layers"), "n_skipped": len(skipped)})


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, str | int | float):
        return v
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def insert_layers(tx: Any, version_id: int, rows: list[dict[str, Any]]) -> None:
    tx.execute("DELETE FROM layer_errors WHERE version_id = :v", {"v": version_id})
    tx.executemany("INSERT INTO layer_errors (version_id, module, kind, shape, rank, rel_error, energy) "
                   "VALUES (:v, :module, :kind, :shape, :rank, :rel_error, :energy)",
                   [{"v": version_id, **r} for r in rows])


def _insert_pending(ws: Workspace, *, name: str, kind: str, sha: str, size: int, dtype: str | None,
                    file_name: str, config: Any, facts: dict[str, Any], params: Mapping[str, Any],
                    metrics: Mapping[str, float], edges: list[Edge], layers: list[dict[str, Any]],
                    tags: Mapping[str, str]) -> int:
    def txn() -> int:
        with ws.db.transaction() as tx:
            a = catalog.asset(tx, name)
            if a is None:
                asset_id = tx.scalar("INSERT INTO assets (name, kind, created_at) VALUES (:n, :k, :t) RETURNING id",
                                     {"n": name, "k": kind, "t": catalog.now()})
            elif a["kind"] != kind:
                raise RegistryError(f"{name!r} is a {a['kind']}: it cannot get a {kind} version "
                                    f"(choose another name)")
            else:
                asset_id = a["id"]
            number = tx.scalar("SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE asset_id = :a",
                               {"a": asset_id})
            vid = tx.scalar(
                "INSERT INTO versions (asset_id, number, status, sha256, size, dtype, blob_path, file_name, "
                "created_at, tool_version, config_json, facts_json, params_json, metrics_json, owner, integrity) "
                "VALUES (:a, :num, 'pending', :sha, :size, :dtype, :blob, :fname, :t, :tool, :cfg, :facts, "
                ":params, :metrics, :owner, 'ok') RETURNING id",
                {"a": asset_id, "num": number, "sha": sha, "size": size, "dtype": dtype,
                 "blob": blob_relpath(sha), "fname": file_name, "t": catalog.now(), "tool": __version__,
                 "cfg": None if config is None else dumps(config), "facts": dumps(facts),
                 "params": dumps({str(k): str(v) for k, v in params.items()}), "metrics": dumps(metrics),
                 "owner": actor()})
            tx.executemany(
                "INSERT INTO lineage (version_id, role, target_version_id, sha256, ref, path) "
                "VALUES (:v, :role, :t, :sha, :ref, :path)",
                [{"v": vid, "role": e.role, "t": e.target_version_id, "sha": e.sha256, "ref": e.ref,
                  "path": e.path} for e in edges])
            if kind == "lora":
                insert_lora_facts(tx, vid, facts, size, len(layers))
            if layers:
                insert_layers(tx, vid, layers)
            tx.executemany("INSERT INTO tags (version_id, key, value) VALUES (:v, :k, :val)",
                           [{"v": vid, "k": str(k), "val": str(v)} for k, v in tags.items()])
            catalog.log_event(tx, "register_started", name=name, number=number, sha256=sha, actor=actor(),
                              detail={"kind": kind, "size": size})
            return vid

    return with_retries(txn, f"registering {name}")


def register(ws: Workspace, path: str | Path, *, name: str, kind: str, config: Any = None,
             facts: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
             params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
             artifacts: Any = None, tags: Mapping[str, Any] | None = None,
             refuse_duplicate: bool = False, link: bool = False, work_started: float | None = None) -> VersionRecord:
    """Register ``path`` as the next version of ``name`` (see the module docstring).

    ``work_started``: when the work that made the file began (``time.time()``), e.g. an
    extraction: the version's MLflow run starts then, so its duration is the real work's.

    ``link``: ``path`` is a temporary file of ours, so the blob may be a hard link to it; a
    user's file is copied (see registry/blobs.py: the blob is read-only).

    ``refuse_duplicate``: bytes already registered (any name) raise "already registered as
    NAME@N" before anything is written (``import`` without ``--allow-duplicate``). Base and
    model versions also record ``tensor_sha256`` (the sha256 of their tensor bytes)."""
    started = time.time()
    problem = refs.name_problem(name or "")
    if problem:
        raise RegistryError(problem)
    if kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"file not found: {path}")
    facts = json.loads(dumps(dict(facts or {})))  # plain JSON types from here on
    layers = layer_rows(facts.pop("layers", None) or [])
    edges, training_config = lineage_edges(ws, lineage)
    if kind == "lora" and not any(e.role == "base" for e in edges):
        raise RegistryError("a LoRA must name its base: pass lineage={'base': <asset or sha256>}")
    if training_config is not None:
        facts["training_config"] = training_config
    extra = artifact_files(artifacts)
    metric_values = metric_numbers(metrics)
    size = path.stat().st_size
    t0 = time.time()
    tensor_future = None
    if kind in ("base", "model") and "tensor_sha256" not in facts:
        from concurrent.futures import ThreadPoolExecutor

        from lbm_registry.safetensors_layout import tensor_sha256

        pool = ThreadPoolExecutor(max_workers=1)  # hashlib releases the GIL: both hashes in parallel
        tensor_future = pool.submit(tensor_sha256, path)
        pool.shutdown(wait=False)
    sha = refs.file_sha256(ws, path)
    if tensor_future is not None:
        try:
            facts["tensor_sha256"] = tensor_future.result()
        except (OSError, ValueError):
            pass  # not a safetensors file: identified by its file hash only
    if refuse_duplicate:
        same = catalog.versions_by_sha(ws.db, sha)
        if same:
            msg = f"{path.name}: already registered as {same[0].ref} (sha256:{sha[:12]})"
            raise RegistryError(f"{msg}; pass allow_duplicate=True to register it again",
                                cli=f"{msg}; pass --allow-duplicate to register it again")
    damaged = _damaged(ws, sha)
    if damaged:  # restoring a damaged blob: trust the bytes, not the hash cache
        sha = refs.file_sha256(ws, path, fresh=True)
        damaged = _damaged(ws, sha)
    metric_values.setdefault("hash_seconds", time.time() - t0)
    dtype = str(facts.get("dtype") or sniff_dtype(path) or "")[:16] or None

    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.tracking import Tracker, mirror_inputs

    # A workspace's own SQLite MLflow store (known schema, experiment made) is written directly
    # (registry/mlflow_sqlite.py: the same rows, no MLflow import); anything else through the
    # client, connected first so that an unreachable MLflow fails before anything is written.
    tracker: Any = SqliteMirror.open(ws) or Tracker(ws)
    state: dict[str, str | None] = {"run_id": None, "mv": None}
    # Shared blob lock from the pending row (which makes gc keep the hash) to the stored blob: gc
    # takes it exclusively, so it cannot delete an orphan blob of these bytes that store_blob has
    # just found in place and reused.
    failure: BaseException | None = None
    with ws.rw_lock("blobs", exclusive=False):
        vid = _insert_pending(ws, name=name, kind=kind, sha=sha, size=size, dtype=dtype, file_name=path.name,
                              config=config, facts=facts, params=dict(params or {}), metrics=metric_values,
                              edges=edges, layers=layers, tags={str(k): str(v) for k, v in (tags or {}).items()})
        rec = catalog.version_by_id(ws.db, vid)
        try:
            pause("pending")
            with refusals_named(blob_path(ws.blobs_dir, sha)):  # a full disk: one line naming the blob
                blob, how = store_blob(path, sha, size, ws.blobs_dir, replace=damaged, link=link)
        except BaseException as exc:  # cleaned up below, once this shared lock is released
            failure = exc
    if failure is not None:
        _abort(ws, tracker, rec, state, failure)
        raise failure
    try:
        if damaged:  # the bytes were just re-hashed from the source: the blob is whole again
            with_retries(lambda: _mark_integrity(ws, sha, "ok"), "restoring blob state")
        pause("blob")

        def on_run(run_id: str) -> None:
            state["run_id"] = run_id
            with_retries(lambda: _set_run(ws, vid, run_id), "recording the MLflow run")
            pause("mlflow_run")

        edge_rows, lora, layer_table, tag_map = mirror_inputs(ws, rec)
        state["run_id"], state["mv"] = tracker.mirror(
            rec, weights=blob, edges=edge_rows, lora=lora, layers=layer_table, user_tags=tag_map,
            extra_artifacts=extra, started=started, on_run=on_run, work_started=work_started)
        pause("mlflow_version")
        _check_uploaded(ws, rec, state["run_id"])
        with_retries(lambda: _flip_ready(ws, rec, state["run_id"], state["mv"], how), f"registering {rec.ref}")
    except BaseException as exc:
        _abort(ws, tracker, rec, state, exc)
        raise
    pause("ready")
    out = catalog.version_by_id(ws.db, vid)
    assert out is not None
    refresh_lineage_pages(ws, tracker, out)
    return out


def refresh_lineage_pages(ws: Workspace, tracker: Any, rec: VersionRecord, *, children: bool = False) -> None:
    """The pages of the versions ``rec`` was made from (its base, tuned model, parents) list what
    was made from them: rebuild them now that ``rec`` is (or no longer is) there; with
    ``children``, the pages of the versions made from ``rec`` too (they link it: after a re-mirror
    its model version number changed). Best effort: the version is registered either way, and
    ``doctor --repair`` rebuilds a page left behind."""
    done: set[int] = set()
    targets = [e.get("target_version_id") for e in catalog.edges(ws.db, rec.id)] \
        if catalog.version_by_id(ws.db, rec.id) else []
    if children:
        targets += [k["version_id"] for k in catalog.children(ws.db, rec.id)]
    for target in targets:
        if not target or target in done:
            continue
        done.add(target)
        parent = catalog.version_by_id(ws.db, target)
        if parent is None or parent.status != "ready":
            continue
        try:
            tracker.refresh_version(parent)
        except Exception:  # noqa: BLE001  (a page is a nicety: never fail the registration for it)
            continue


def _check_uploaded(ws: Workspace, rec: VersionRecord, run_id: str | None) -> None:
    """Against a tracking server, other machines will fetch the weights from its artifact store:
    the version becomes visible only once the server lists the whole file."""
    from dataclasses import replace

    from lbm_registry.registry import fetch

    if not fetch.is_cache_home(ws) or not run_id:
        return
    got = fetch.server_size(ws, replace(rec, mlflow_run_id=run_id))
    if got != rec.size:
        raise RegistryError(f"{rec.ref}: the tracking server holds {'no' if got is None else f'{got:,} bytes of'} "
                            f"{fetch.weight_artifact(rec)} ({rec.size:,} bytes uploaded): not registered")


def _damaged(ws: Workspace, sha: str) -> bool:
    """Has doctor found the blob of this hash missing or corrupt?"""
    return bool(ws.db.scalar("SELECT count(*) FROM versions WHERE sha256 = :s AND integrity <> 'ok'", {"s": sha}))


def _mark_integrity(ws: Workspace, sha: str, value: str) -> None:
    with ws.db.transaction() as tx:
        tx.execute("UPDATE versions SET integrity = :i WHERE sha256 = :s", {"i": value, "s": sha})


def _set_run(ws: Workspace, vid: int, run_id: str) -> None:
    with ws.db.transaction() as tx:
        tx.execute("UPDATE versions SET mlflow_run_id = :r WHERE id = :id", {"r": run_id, "id": vid})


def _flip_ready(ws: Workspace, rec: VersionRecord, run_id: str | None, mv: str | None, how: str) -> None:
    with ws.db.transaction() as tx:
        n = tx.execute("UPDATE versions SET status = 'ready', mlflow_run_id = :r, mlflow_version = :mv, "
                       "owner = NULL WHERE id = :id AND status = 'pending'", {"r": run_id, "mv": mv, "id": rec.id})
        if n != 1:
            raise RegistryError(f"{rec.ref} was rolled back while it was being registered (by doctor --repair?)")
        catalog.log_event(tx, "register", name=rec.name, number=rec.number, sha256=rec.sha256, actor=actor(),
                          detail={"kind": rec.kind, "size": rec.size, "blob": how, "mlflow_run_id": run_id,
                                  "mlflow_version": mv})


def failure_message(exc: BaseException) -> str:
    """What the event log says about a registration that did not finish."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, LBMError):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _abort(ws: Workspace, tracker: Any, rec: VersionRecord, state: Mapping[str, str | None],
           exc: BaseException) -> None:
    """Best effort: a registration that failed (or was interrupted) cleans up after itself. The
    version is marked failed (the event log keeps why), its MLflow run is dropped, then its rows and
    its blob when no other version has these bytes (:func:`_drop_unfinished`), so ``doctor`` finds
    nothing. Never raises: whatever is left (a crash in here) is doctor's, as after a kill -9.
    Called without the shared blob lock held (the blob is removed under the exclusive one)."""
    message = failure_message(exc)
    try:
        def txn() -> None:
            with ws.db.transaction() as tx:
                tx.execute("UPDATE versions SET status = 'failed', error = :e, owner = NULL "
                           "WHERE id = :id AND status = 'pending'", {"e": message[:2000], "id": rec.id})
                catalog.log_event(tx, "register_failed", name=rec.name, number=rec.number, sha256=rec.sha256,
                                  actor=actor(), detail={"error": message[:2000]})

        with_retries(txn, "marking a failed registration")
        run_id = state.get("run_id") or (catalog.version_by_id(ws.db, rec.id) or rec).mlflow_run_id
        if run_id or state.get("mv"):
            tracker.discard(rec.name, run_id, state.get("mv"))
        _drop_unfinished(ws, rec)
    except BaseException:  # the original error matters more; doctor cleans up the rest
        pass


#: How long a failed registration waits for the blob store (busy with other registrations) to
#: remove its own blob; past that, the blob stays for ``doctor --repair`` / ``gc``.
DROP_LOCK_TIMEOUT_S = 10.0


def _drop_unfinished(ws: Workspace, rec: VersionRecord) -> None:
    """Remove a failed version's rows, and its blob when no other row has these bytes, under the
    exclusive blob lock (as gc deletes): another registration of the same bytes holds the shared
    side from its pending row to its stored blob, so a blob it is about to reuse is never deleted."""
    with ws.rw_lock("blobs", exclusive=True, timeout=DROP_LOCK_TIMEOUT_S):
        def txn() -> bool:
            with ws.db.transaction() as tx:
                if tx.execute("UPDATE versions SET status = 'failed' WHERE id = :id AND status <> 'ready'",
                              {"id": rec.id}) == 0:
                    return False  # became ready (cannot happen here) or already dropped
                catalog.delete_version(tx, rec.id)
                catalog.delete_empty_assets(tx)
                return True

        if with_retries(txn, f"dropping {rec.ref}") and rec.sha256 not in catalog.referenced_shas(ws.db):
            blob_path(ws.blobs_dir, rec.sha256).unlink(missing_ok=True)


def update_version_facts(ws: Workspace, name: str, number: int, facts: Mapping[str, Any], *,
                         metrics: Mapping[str, Any] | None = None, artifacts: Any = None) -> dict[str, Any]:
    """Merge ``facts`` into a ready version; returns the (JSON-normalised) new facts.

    MLflow first (metrics: ``metrics`` plus top-level numeric facts; artifacts; facts.json), then
    one catalog transaction (facts, LoRA summary columns, per-layer table if ``layers`` is
    given, event). If MLflow fails nothing is recorded and the caller can simply retry.
    """
    from lbm_registry.registry.tracking import Tracker

    new = json.loads(dumps(dict(facts)))
    layers = new.pop("layers", None)
    metric_values = metric_numbers(metrics)
    for k, v in new.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            metric_values.setdefault(k, float(v))
    files = artifact_files(artifacts)
    rec = catalog.version(ws.db, name, number)
    if rec is None:
        raise RefError(f"unknown version {name}@{number}")
    merged = {**rec.facts, **new}
    texts = {"facts.json": json.dumps(merged, indent=1, sort_keys=True, default=str)}
    rows = layer_rows(layers) if layers is not None else None
    if rows is not None:
        texts.update(Tracker.layer_files(rows))
    tracker = Tracker(ws)
    tracker.log_update(rec, metric_values, texts, files)

    def txn() -> None:
        with ws.db.transaction() as tx:
            tx.execute("UPDATE versions SET facts_json = :f WHERE id = :id", {"f": dumps(merged), "id": rec.id})
            cols = [k for k in LORA_COLUMNS if k in new]
            if rec.kind == "lora" and cols:
                sets = ", ".join(f"{k} = :{k}" for k in cols)
                tx.execute(f"UPDATE lora_facts SET {sets} WHERE version_id = :id",
                           {"id": rec.id, **{k: _scalar(new[k]) for k in cols}})
            if rows is not None:
                insert_layers(tx, rec.id, rows)
            catalog.log_event(tx, "update_facts", name=rec.name, number=rec.number, sha256=rec.sha256,
                              actor=actor(), detail={"keys": sorted(new), "metrics": sorted(metric_values)})

    with_retries(txn, f"updating {rec.ref}")
    fresh = catalog.version_by_id(ws.db, rec.id)
    if fresh is not None:
        try:  # the version page shows the new numbers; the facts are recorded either way
            tracker.refresh_version(fresh)
        except LBMError:
            pass
    return new


def attach_artifact(ws: Workspace, rec: VersionRecord, path: Path, rel: str | None = None) -> None:
    """Add one file to a ready version's MLflow run (e.g. the probe picture drawn after it was
    registered) and rebuild its page, which links pictures it finds among the run's artifacts.

    A local artifact folder gets the file atomically (temp file + rename: a reader never sees
    half of it); a server's store gets it uploaded. The catalog is not changed."""
    from lbm_registry.registry.mirror import replace_file
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.tracking import Tracker, _local_dir, mlflow_errors

    rel = rel or Path(path).name
    if not rec.mlflow_run_id or not rec.mlflow_version:
        raise RegistryError(f"{rec.ref} has no MLflow run (run 'lbm-reg doctor --repair')")
    fast = SqliteMirror.open(ws)
    local = fast.artifact_folder(rec.mlflow_run_id) if fast is not None else None
    if fast is not None and local is not None:
        with fast.write_lock():
            replace_file(Path(path), local / rel)
        fast.refresh_version(rec)
        return
    tracker = Tracker(ws)
    with tracker.write_lock(), mlflow_errors(f"artifacts of {rec.ref}"):
        uri = tracker.client.get_run(rec.mlflow_run_id).info.artifact_uri
        folder = _local_dir(uri)
        if folder is not None:
            replace_file(Path(path), folder / rel)
        else:
            tracker.write_artifacts(rec.mlflow_run_id, uri, {}, {rel: Path(path)})
    tracker.refresh_version(rec)
