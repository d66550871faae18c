"""``lbm-reg import FILE --kind lora --name NAME --base REF``: any LoRA in, checked and recorded.

Reads the file or folder with :mod:`lbm_registry.lora.convert`, checks every module against the
base's architecture, writes our native file (plain low-rank layers kept exactly; LoHa, LoKr,
DoRA and full-diff layers turned into dense deltas and re-factored with the extraction
policies, their errors measured) and registers it with its source format, the original file's
sha256 and its ``ss_*`` / ``modelspec.*`` metadata. Nothing is written or registered unless
every check passes.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import LoRAError, RegistryError
from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:
    import torch

ProgressFn = Callable[[str, int, int], None]
NATIVE_META_KEY = "lbm_registry"   # lora.format.META_KEY, named without importing torch
#: storage name of a dtype (torch imported lazily: the refusals of an import need no torch)
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp32"}


@dataclass
class ImportReport:
    ref: str
    path: str
    sha256: str
    source_format: str
    source_sha256: str
    layers: int
    converted: int
    mean_error: float
    max_error: float
    policy: str | None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    kind: str = "lora"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _already(settings: WorkspaceSettings, sha: str) -> str | None:
    """The ref of a ready version with these bytes, or imported from them, else None."""
    from lbm_registry.registry import catalog
    from lbm_registry.registry.workspace import Workspace

    ws = Workspace.open_existing(settings)
    if ws is None:
        return None
    try:
        recs = catalog.versions_by_sha(ws.db, sha) or catalog.versions_by_fact(ws.db, "source_sha256", sha)
        return recs[0].ref if recs else None
    finally:
        ws.close()


def import_lora(path: str | Path, *, name: str, base: str | None, rank: int | None = None,
                conv_rank: int | None = None, energy: float | None = None, budget: str | int | None = None,
                max_rank: int | None = None, allow_duplicate: bool = False,
                settings: WorkspaceSettings | None = None, progress: ProgressFn | None = None,
                probe: str | None = None, fix_alpha: bool = False) -> ImportReport:
    """Register a LoRA from any supported format (see :mod:`lbm_registry.lora.convert`).
    ``probe``: the version's probe picture, wait|auto|off (see api/probe.py).

    Layers whose alpha exceeds their rank clipped to the layer's smallest side (the original
    ``extract_lora_native.py``'s bug, see :mod:`lbm_registry.lora.alpha`) are named in one note;
    ``fix_alpha`` registers the file with alpha = rank on those layers (a new file; the fix and
    the source's sha256 are recorded on the version)."""
    from lbm_registry.api.registry import check_name_free, resolve
    from lbm_registry.api.run.probe import probe_mode
    from lbm_registry.lora.ranks import RankPolicy

    timings: dict[str, float] = {}
    t0, started = time.perf_counter(), time.time()
    check_name_free(name, "lora", settings)   # the cheap refusals come before torch is imported
    mode = probe_mode(probe)
    policy = RankPolicy.from_options(rank=rank, conv_rank=conv_rank, energy=energy, budget=budget, max_rank=max_rank)
    settings = settings if settings is not None else WorkspaceSettings.resolve()
    base_note = None
    if base is None:  # a file of ours records its base: registered here, it is the base
        base, base_note = _recorded_base(Path(path), settings)
    base_asset = resolve(base, settings, ("base", "model"))

    from lbm_registry.api.assets.lora import PREFIX, denoiser_layers, tensor_sha_of
    from lbm_registry.api.registry import register_asset
    from lbm_registry.api.run.probe import after_registration
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.loading import config_from_checkpoint
    from lbm_registry.lora.convert import check_against_base, read_foreign
    from lbm_registry.registry.blobs import sha256_file

    base_reader = CheckpointReader(base_asset.path)
    modules, _ = denoiser_layers(base_reader)
    if not modules:
        raise LoRAError(f"{base_asset.label}: not an LBM checkpoint (no {PREFIX}* weight layers)")
    foreign = read_foreign(Path(path), modules)
    check_against_base(foreign, modules)
    if base_note:
        foreign.notes.append(base_note)
    timings["read_check_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    source_sha = sha256_file(foreign.weights_path)
    timings["hash_s"] = time.perf_counter() - t1
    if not allow_duplicate:
        prior = _already(settings, source_sha)
        if prior:
            msg = f"{foreign.weights_path.name}: already registered as {prior} (sha256:{source_sha[:12]})"
            raise RegistryError(f"{msg}; pass allow_duplicate=True to register it again",
                                cli=f"{msg}; pass --allow-duplicate to register it again")
    cfg = base_asset.config.get("name") if base_asset.config else None
    if cfg is None:
        c = config_from_checkpoint(base_reader)
        cfg = c.name if c is not None else None
    base_tensor = tensor_sha_of(base_asset)
    _check_recorded_base(foreign, base_asset)   # any format that records its base: ours, and our exports
    if foreign.source_format == "native":
        from lbm_registry.lora.format import read_lora

        lora = read_lora(foreign.weights_path)
    else:
        lora = None
    meta_keep = capped_metadata({k: v for k, v in foreign.metadata.items()
                                 if k.startswith(("ss_", "sshs_", "modelspec."))})
    facts_extra = {"source_format": foreign.source_format, "source_sha256": source_sha,
                   "source_file": foreign.weights_path.name, "source_metadata": meta_keep, "notes": foreign.notes,
                   "layer_formats": foreign.formats()}

    clipped = None
    if lora is not None:
        from lbm_registry.lora.alpha import clipped_alpha_of

        clipped = clipped_alpha_of(lora)
        if clipped:
            foreign.notes.append(clipped.line(None if fix_alpha else "import it with --fix-alpha to use alpha = rank"))
        elif fix_alpha:
            foreign.notes.append("--fix-alpha: no layer has alpha above a clipped rank; registered as it is")
    if lora is not None and clipped:
        facts_extra["alpha_fixed" if fix_alpha else "alpha_clipped"] = clipped.to_dict()
    if lora is not None and clipped and fix_alpha:
        return _register_alpha_fixed(lora, clipped, foreign, base_asset, base_tensor, cfg, source_sha, facts_extra,
                                     name, settings, allow_duplicate, mode, timings, t0)
    if lora is not None:  # our own format: register the bytes as they are
        from lbm_registry.lora.format import factor_dtype

        rows = _native_rows(lora)
        errs = [r["rel_error"] for r in rows]
        facts = {"rank": lora.info.get("rank") or max((r["rank"] for r in rows if r["kind"] == "linear"), default=0),
                 "conv_rank": lora.info.get("conv_rank")
                 or max((r["rank"] for r in rows if r["kind"] != "linear"), default=0),
                 "policy": "import native", "alpha": lora.info.get("alpha"), "dtype": factor_dtype(lora),
                 "mean_error": sum(errs) / len(errs), "max_error": max(errs), "layers": rows, "skipped": [],
                 **facts_extra}
        from lbm_registry.api.run.probe import lora_probe

        with tempfile.TemporaryDirectory(prefix="lbm-probe-") as probe_dir:
            asset = after_registration(register_asset(
                foreign.weights_path, name=name, kind="lora", settings=settings, facts=facts,
                lineage={"base": base_asset}, params={"source_format": "native"}, refuse_duplicate=not allow_duplicate,
                work_started=started,
                artifacts=lora_probe(Path(probe_dir), foreign.weights_path, base_asset, settings,
                                     draw=mode == "wait")), settings, mode)
        timings["total_s"] = time.perf_counter() - t0
        return ImportReport(ref=asset.ref, path=str(asset.path), sha256=asset.sha256, source_format="native",
                            source_sha256=source_sha, layers=len(rows), converted=0, mean_error=facts["mean_error"],
                            max_error=facts["max_error"], policy=None, notes=foreign.notes, seconds=timings)

    from lbm_registry.api.run.probe import lora_probe

    staging = Path(tempfile.mkdtemp(prefix="lbm-import-"))
    try:
        t2 = time.perf_counter()
        dest = staging / f"{name}.safetensors"
        info = {"base_sha256": base_asset.sha256, "base_tensor_sha256": base_tensor, "base_ref": base_asset.label,
                "base_config": cfg, "source_format": foreign.source_format, "source_sha256": source_sha,
                "title": name}
        rows, dtype_name, clipped = write_native(foreign, modules, base_reader, dest, policy, info, progress,
                                                 fix_alpha=fix_alpha)
        if clipped:
            foreign.notes.append(clipped.line(None if fix_alpha else "import it with --fix-alpha to use alpha = rank"))
            facts_extra["alpha_fixed" if fix_alpha else "alpha_clipped"] = clipped.to_dict()
        elif fix_alpha:
            foreign.notes.append("--fix-alpha: no layer has alpha above a clipped rank; nothing changed")
        timings["convert_s"] = time.perf_counter() - t2
        dense = [r for r in rows if r["converted"]]
        errs = [r["rel_error"] for r in rows]   # a budget's rank-0 layers count as 1.0
        kept = [r for r in rows if not r.get("dropped")]
        facts = {"rank": max((r["rank"] for r in kept if r["kind"] == "linear"), default=0),
                 "conv_rank": max((r["rank"] for r in kept if r["kind"] != "linear"), default=0),
                 "policy": f"import {foreign.source_format}" + (f"; dense layers {policy.describe()}" if dense else "")
                 + (f"; {_fix_text(clipped)}" if clipped and fix_alpha else ""),
                 "alpha": None, "dtype": dtype_name, "mean_error": sum(errs) / len(errs), "max_error": max(errs),
                 "layers": [{k: r[k] for k in ("module", "kind", "shape", "rank", "rel_error", "energy")} for r in kept],
                 "skipped": [{"module": r["module"], "reason": "budget: no component worth its bytes", "rel_error": 1.0}
                             for r in rows if r.get("dropped")], **facts_extra}
        t3 = time.perf_counter()
        asset = register_asset(dest, name=name, kind="lora", settings=settings, facts=facts, link=True,
                               lineage={"base": base_asset, **_exported_from(foreign.metadata)},
                               params={"source_format": foreign.source_format, "policy": policy.describe(),
                                       **({"alpha_fix": _fix_text(clipped)} if clipped and fix_alpha else {})},
                               metrics={"mean_error": facts["mean_error"], "max_error": facts["max_error"],
                                        "converted_layers": len(dense)},
                               refuse_duplicate=not allow_duplicate, work_started=started,
                               artifacts=lora_probe(staging / "probe", dest, base_asset, settings,
                                                    draw=mode == "wait"))
        after_registration(asset, settings, mode)
        timings["register_s"] = time.perf_counter() - t3
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t0
    return ImportReport(ref=asset.ref, path=str(asset.path), sha256=asset.sha256, source_format=foreign.source_format,
                        source_sha256=source_sha, layers=len(kept), converted=len([r for r in dense if r in kept]),
                        mean_error=facts["mean_error"], max_error=facts["max_error"],
                        policy=policy.describe() if dense else None, notes=foreign.notes, seconds=timings)


#: Foreign metadata kept on a version (catalog, ``show``, MLflow): each value up to this many
#: characters, all of it up to ``METADATA_TOTAL_CAP``; the original file keeps every byte.
METADATA_VALUE_CAP = 2000
METADATA_TOTAL_CAP = 32_000
METADATA_KEY_CAP = 200


def capped_metadata(meta: dict[str, str]) -> dict[str, str]:
    """``meta`` with long values cut (and said so) and at most ``METADATA_TOTAL_CAP`` characters in
    all, the shortest entries kept first (they are the informative ones: base model, rank,
    resolution...): a kohya file may carry megabytes (``ss_tag_frequency``), which the catalog,
    ``show`` and MLflow must not."""
    entries = []
    for key in meta:
        value = str(meta[key])
        if len(value) > METADATA_VALUE_CAP:
            value = (value[:METADATA_VALUE_CAP // 4] + f"... [{len(value):,} characters in all, cut here; "
                     "the original file keeps them]")
        name = key if len(key) <= METADATA_KEY_CAP else key[:METADATA_KEY_CAP] + "..."
        entries.append((len(name) + len(value), name, value))
    kept: dict[str, str] = {}
    total = 0
    for i, (size, name, value) in enumerate(sorted(entries)):
        if total + size > METADATA_TOTAL_CAP:
            kept["..."] = f"{len(entries) - i} more metadata keys not stored (the original file keeps them)"
            break
        kept[name] = value
        total += size
    return dict(sorted(kept.items()))


def _check_recorded_base(foreign: Any, base: Any) -> None:
    """A file that records the base it was made for (our ``lbm_registry`` metadata entry: native
    files, and our kohya and PEFT exports, which keep it) is refused on another base, whatever its
    format. Files that record nothing are taken on the caller's word (``--base``)."""
    import json

    from lbm_registry.api.registry import lora_fits_base

    raw = foreign.metadata.get(NATIVE_META_KEY)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        raise LoRAError(f"{foreign.weights_path}: corrupt {NATIVE_META_KEY} metadata") from None
    if not isinstance(info, dict):
        raise LoRAError(f"{foreign.weights_path}: corrupt {NATIVE_META_KEY} metadata (not a JSON object)")
    made_for = info.get("base_sha256") if isinstance(info.get("base_sha256"), str) else None
    tensor = info.get("base_tensor_sha256") if isinstance(info.get("base_tensor_sha256"), str) else None
    if not lora_fits_base(made_for, tensor, base):
        raise LoRAError(f"{foreign.weights_path.name} was made for base sha256:{(made_for or tensor or '?')[:12]}, "
                        f"not {base.label} (sha256:{base.sha256[:12]})")


def _native_rows(lora: Any) -> list[dict[str, Any]]:
    """Per-layer rows of a native file: ranks from its tensors, errors from its own record."""
    recorded = lora.info.get("layers") or {}
    rows = []
    for m, la in lora.layers.items():
        err = recorded.get(m, [None, 0.0])[1] if isinstance(recorded, dict) else 0.0
        err = float(err or 0.0)
        rows.append({"module": m, "kind": la.kind, "shape": list(la.weight_shape), "rank": la.rank,
                     "rel_error": err, "energy": 1.0 - err**2})
    return rows


def _exported_from(metadata: dict[str, str]) -> dict[str, Any]:
    """``{"parent": {"sha256", "ref"}}`` when the file is an export of ours (``lbm-reg export``
    records the LoRA it was made from), so the import links the version it came from."""
    import json

    from lbm_registry.lora.export import EXPORTED_FROM, META_KEY

    try:
        src = json.loads(metadata.get(META_KEY) or "{}").get(EXPORTED_FROM) or {}
    except (ValueError, AttributeError):
        return {}
    sha = src.get("sha256") if isinstance(src, dict) else None
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        return {}
    return {"parent": {"sha256": sha, "ref": str(src.get("ref") or "")[:200] or None}}


def _recorded_base(path: Path, settings: WorkspaceSettings) -> tuple[str, str]:
    """``(sha256:..., note)`` of the base a LoRA file records (ours: ``base_sha256`` in its
    metadata), when that base is registered here; else the one-line refusal asking for one."""
    import json

    from lbm_registry.api.registry import resolve
    from lbm_registry.errors import LBMError
    from lbm_registry.lbm.header import SafetensorsHeader

    sha = None
    try:
        raw = SafetensorsHeader(path).metadata.get(NATIVE_META_KEY) if path.is_file() else None
        sha = json.loads(raw).get("base_sha256") if raw else None
    except (LBMError, ValueError, AttributeError):
        sha = None
    need = "import --kind lora needs {} (the base the LoRA is applied to)"
    if not isinstance(sha, str) or len(sha) != 64:
        raise LoRAError(need.format("a base"), cli=need.format("--base REF"))
    try:
        asset = resolve(f"sha256:{sha}", settings, ("base", "model"))
    except LBMError:
        why = f"; the file records base sha256 {sha[:12]}, which is not registered here"
        raise LoRAError(need.format("a base") + why, cli=need.format("--base REF") + why) from None
    return f"sha256:{sha}", f"base {asset.label}: the one the file records (sha256 {sha[:12]})"


def _dtype_of(foreign: Any) -> torch.dtype:
    import torch

    for layer in foreign.layers.values():
        for t in layer.parts.values():
            if t.is_floating_point():
                return t.dtype if t.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.float32


def write_native(foreign: Any, modules: dict[str, tuple[int, ...]], base_reader: Any, dest: Path, policy: Any,
                 info: dict[str, Any], progress: ProgressFn | None = None,
                 fix_alpha: bool = False) -> tuple[list[dict[str, Any]], str, Any]:
    """Write ``foreign`` as a native LoRA at ``dest``; returns per-layer rows, the dtype name and
    the plain layers whose alpha exceeds their clipped rank (:class:`~lbm_registry.lora.alpha.ClippedAlpha`).

    Plain layers: factors as they are (error = storage rounding only; with ``fix_alpha``, alpha =
    rank where it exceeds a clipped rank). Dense layers: factored under ``policy``; under
    ``--budget`` the budget left after the plain layers is allocated over the dense layers'
    spectra (the same greedy knapsack as extraction).
    """
    import torch

    from lbm_registry.lbm.threads import single_thread_below
    from lbm_registry.lora.alpha import ClippedAlpha, clipped_alpha
    from lbm_registry.lora.convert import dense_delta, plain_factors
    from lbm_registry.lora.extract import choose_energy_rank, factorize
    from lbm_registry.lora.format import LoRALayer, LoRAWriter, layer_kind
    from lbm_registry.lora.ranks import DTYPE_BYTES, LayerSpectrum, allocate_budget, lora_header_overhead
    from lbm_registry.lora.svd import SVDSettings, top_singular_values

    dtype = _dtype_of(foreign)
    dtype_name = _SHORT[str(dtype).removeprefix("torch.")]
    settings = SVDSettings()
    src = foreign.weights_path

    def delta(m: str) -> torch.Tensor:
        return dense_delta(foreign.layers[m], modules[m], lambda: base_reader.get(f"denoiser.{m}.weight"), src)

    planned: dict[str, int] | None = None
    dense = foreign.dense_modules
    if policy.kind == "budget" and dense:
        plain_bytes = 0
        for m, la in foreign.layers.items():
            if not la.dense:
                d, u, _ = plain_factors(la, modules[m], src)
                plain_bytes += (d.numel() + u.numel()) * DTYPE_BYTES[dtype_name]
        left = int(policy.budget_bytes) - plain_bytes - lora_header_overhead({m: modules[m] for m in foreign.layers})
        if left <= 0:
            raise LoRAError(f"--budget leaves no room for the {len(dense)} converted layers after the plain ones")
        spectra = {}
        for m in dense:
            mat = delta(m).reshape(modules[m][0], -1)
            vals, complete = top_singular_values(mat, min(policy.limit(modules[m]), 256), settings,
                                                 settings.generator(m))
            spectra[m] = LayerSpectrum(vals, sum(mat.shape), policy.limit(modules[m]),
                                       complete or len(vals) >= policy.limit(modules[m]))
        planned = allocate_budget(spectra, left // DTYPE_BYTES[dtype_name]).ranks
    rows: list[dict[str, Any]] = []
    clipped = ClippedAlpha()
    total = len(foreign.layers)
    with LoRAWriter(dest, dtype) as writer:
        for i, (m, la) in enumerate(foreign.layers.items(), 1):
            shape = tuple(modules[m])
            if not la.dense:
                down, up, alpha = plain_factors(la, shape, src)
                found = clipped_alpha([(m, int(down.shape[0]), alpha, shape)])
                if found:
                    clipped.layers.update(found.layers)
                    alpha = float(down.shape[0]) if fix_alpha else alpha
                stored = LoRALayer(m, down.to(dtype), up.to(dtype), alpha)
                err = _rounding_error(down, up, stored)
                writer.add(stored, reference=True)   # views of the mapped source file, or small copies
                rows.append({"module": m, "kind": layer_kind(shape), "shape": list(shape), "rank": stored.rank,
                             "rel_error": err, "energy": 1.0 - err**2, "converted": False})
            else:
                mat = delta(m).reshape(shape[0], -1).contiguous()
                sq = float(torch.linalg.vector_norm(mat)) ** 2
                if sq == 0.0:
                    continue
                svd = None
                with single_thread_below(mat.numel()):
                    if planned is not None:
                        r = planned.get(m, 0)
                        if r == 0:  # left out by the budget: counts as 1.0, as extract and resize count it
                            rows.append({"module": m, "kind": layer_kind(shape), "shape": list(shape), "rank": 0,
                                         "rel_error": 1.0, "energy": 0.0, "converted": True, "dropped": True})
                            continue
                    elif policy.kind == "energy":
                        r, svd = choose_energy_rank(mat, sq, float(policy.energy), policy.limit(shape), settings,
                                                    settings.generator(m))
                    else:
                        r = policy.fixed_rank(shape)
                    f = factorize(mat, shape, r, sq_norm=sq, dtype=dtype, settings=settings,
                                  generator=settings.generator(m), svd=svd)
                writer.add(LoRALayer(m, f.down, f.up, f.alpha))
                rows.append({"module": m, "kind": layer_kind(shape), "shape": list(shape), "rank": f.rank,
                             "rel_error": f.rel_error, "energy": 1.0 - f.rel_error**2, "converted": True,
                             "adapter": la.kind})
            if progress:
                progress("convert", i, total)
        if not [r for r in rows if not r.get("dropped")]:
            raise LoRAError(f"{src}: every layer is zero: nothing to import")
        errs = [r["rel_error"] for r in rows]
        meta = dict(info)
        meta.update({"mean_error": sum(errs) / len(errs), "max_error": max(errs),
                     "layers": {r["module"]: [r["rank"], float(f"{r['rel_error']:.4g}")] for r in rows
                                if not r.get("dropped")},
                     "rank": max((r["rank"] for r in rows if r["kind"] == "linear"), default=0),
                     "conv_rank": max((r["rank"] for r in rows if r["kind"] != "linear"), default=0)})
        if any(r["converted"] for r in rows):
            meta["policy"] = policy.to_dict()
        if clipped and fix_alpha:
            meta["alpha_fixed"] = clipped.to_dict()
        writer.finish(meta)
    return rows, dtype_name, clipped


def _fix_text(clipped: Any) -> str:
    n = len(clipped.layers)
    return f"alpha = rank on {n} layer{'s' if n != 1 else ''} (was up to {clipped.max_scale:.4g}x)"


def _register_alpha_fixed(lora: Any, clipped: Any, foreign: Any, base_asset: Any, base_tensor: str | None,
                          cfg: str | None, source_sha: str, facts_extra: dict[str, Any], name: str,
                          settings: WorkspaceSettings, allow_duplicate: bool, mode: str,
                          timings: dict[str, float], t0: float) -> ImportReport:
    """``import --fix-alpha`` of a native file: the same factors with alpha = rank on the
    clipped layers, written as our file and registered (the fix recorded in the version's
    facts, its policy tag and its MLflow params; the source file's sha256 as ``source_sha256``)."""
    from lbm_registry.api.registry import register_asset
    from lbm_registry.api.run.probe import after_registration, lora_probe
    from lbm_registry.lora.alpha import with_alpha_at_rank
    from lbm_registry.lora.format import SHORT_DTYPE_NAMES, write_lora

    fixed = with_alpha_at_rank(lora, clipped.layers)
    first = next(iter(fixed.layers.values()))
    dtype = first.down.dtype
    rows = _native_rows(fixed)
    fixed.info = {"base_sha256": base_asset.sha256, "base_tensor_sha256": base_tensor, "base_ref": base_asset.label,
                  "base_config": cfg, "source_format": foreign.source_format, "source_sha256": source_sha,
                  "title": name, "alpha_fixed": clipped.to_dict(),
                  "rank": max((r["rank"] for r in rows if r["kind"] == "linear"), default=0),
                  "conv_rank": max((r["rank"] for r in rows if r["kind"] != "linear"), default=0)}
    staging = Path(tempfile.mkdtemp(prefix="lbm-import-"))
    try:
        dest = write_lora(fixed, staging / f"{name}.safetensors", dtype=dtype)
        facts = {"rank": fixed.info["rank"], "conv_rank": fixed.info["conv_rank"],
                 "policy": f"import {foreign.source_format}; {_fix_text(clipped)}", "alpha": None,
                 "dtype": SHORT_DTYPE_NAMES.get(dtype, "fp32"), "mean_error": 0.0, "max_error": 0.0, "layers": rows,
                 "skipped": [], **facts_extra}
        asset = register_asset(dest, name=name, kind="lora", settings=settings, facts=facts, link=True,
                               lineage={"base": base_asset},
                               params={"source_format": foreign.source_format, "alpha_fix": _fix_text(clipped)},
                               refuse_duplicate=not allow_duplicate,
                               artifacts=lora_probe(staging / "probe", dest, base_asset, settings,
                                                    draw=mode == "wait"))
        after_registration(asset, settings, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t0
    return ImportReport(ref=asset.ref, path=str(asset.path), sha256=asset.sha256, source_format=foreign.source_format,
                        source_sha256=source_sha, layers=len(rows), converted=0, mean_error=0.0, max_error=0.0,
                        policy=None, notes=foreign.notes, seconds=timings)


def _rounding_error(down: torch.Tensor, up: torch.Tensor, stored: Any) -> float:
    """Relative error of the stored factors vs the source ones (0 when the dtype is kept)."""
    if down.dtype == stored.down.dtype and up.dtype == stored.up.dtype:
        return 0.0
    from lbm_registry.lora.algebra import gram_sq_distance

    r = stored.rank
    a = (up.float().reshape(up.shape[0], r), down.float().reshape(r, -1))
    b = (stored.up.float().reshape(up.shape[0], r), stored.down.float().reshape(r, -1))
    sq, norm2 = gram_sq_distance(a, b)
    return math.sqrt(sq / norm2) if norm2 > 0 else 0.0
