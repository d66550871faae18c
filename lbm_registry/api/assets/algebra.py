"""LoRA algebra services behind ``lbm-reg resize`` and ``lbm-reg merge``.

Resolves the references, checks the LoRAs share a base, runs :mod:`lbm_registry.lora.algebra`
and registers the result with its lineage (resize: the parent; merge: every parent with its
weight). Returns dataclasses with ``to_dict()``; the CLI renders them.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.api.assets._report import WrittenLoRAReport
from lbm_registry.errors import LoRAError, RangeError, abbreviate
from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:  # pragma: no cover
    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lora.algebra import AlgebraResult
    from lbm_registry.lora.format import LoRAFile

ProgressFn = Callable[[str, int, int], None]


@dataclass
class AlgebraReport(WrittenLoRAReport):
    operation: str
    result: AlgebraResult
    inputs: list[dict[str, Any]]
    base: dict[str, Any]
    ref: str | None = None
    registered_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        return self._to_dict(layers, operation=self.operation, inputs=self.inputs, base=self.base)


def parse_weighted(spec: str) -> tuple[str, float]:
    """``REF[:W]``: a trailing ``:<number>`` is the weight (``sha256:PREFIX`` alone is not).

    Anything else after a ``:`` is a bad weight (``relight@1:abc``; names and aliases never hold
    a ``:``), unless the whole spec is an existing file. Weights: :func:`lbm_registry.ranges.check_weight`."""
    from lbm_registry.ranges import check_weight
    from lbm_registry.registry.refs import is_file

    head, sep, tail = spec.rpartition(":")
    if sep and head and head.lower() != "sha256":
        try:
            w = float(tail)
        except ValueError:
            if is_file(spec):
                return spec, 1.0
            raise RangeError(f"bad merge input {abbreviate(spec)!r}: write REF or REF:WEIGHT (a number), "
                             f"got weight {abbreviate(tail, 20)!r}") from None
        try:
            return head, check_weight(w)
        except RangeError as exc:
            raise RangeError(f"bad merge input {abbreviate(spec)!r}: {exc}") from None
    return spec, 1.0


def _base_of(asset: ResolvedAsset, lora: LoRAFile) -> dict[str, Any]:
    base = (asset.lineage or {}).get("base") or {}
    return {
        "sha256": lora.base_sha256 or (asset.facts or {}).get("base_sha256") or base.get("sha256"),
        "tensor_sha256": lora.info.get("base_tensor_sha256"),
        "ref": base.get("ref") or lora.info.get("base_ref"),
        "config": lora.info.get("base_config"),
    }


def _same_base(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """True/False when the records can tell, None when either records no base."""
    if not (a["sha256"] or a["tensor_sha256"]) or not (b["sha256"] or b["tensor_sha256"]):
        return None
    if a["sha256"] and a["sha256"] == b["sha256"]:
        return True
    return bool(a["tensor_sha256"]) and a["tensor_sha256"] == b["tensor_sha256"]


def _resolve_all(refs: Sequence[str], settings: WorkspaceSettings, register: str | None,
                 dtype: str) -> list[ResolvedAsset]:
    """The refusals that need no torch, before it is imported: the dtype, every reference, and
    a ``--register`` name already used by another kind."""
    from lbm_registry.api.assets.lora import check_lora_dtype
    from lbm_registry.api.registry import check_name_free, resolve

    check_lora_dtype(dtype)
    assets = [resolve(r, settings, ("lora",)) for r in refs]
    if register is not None:
        check_name_free(register, "lora", settings)
    return assets


def _open(assets: Sequence[ResolvedAsset]) -> list[tuple[ResolvedAsset, LoRAFile]]:
    from lbm_registry.lora.format import read_lora

    return [(a, read_lora(a.path)) for a in assets]


def _policy(rank: int | None, conv_rank: int | None, energy: float | None, budget: str | int | None,
            max_rank: int | None, required: bool) -> Any:
    from lbm_registry.lora.ranks import RankPolicy

    if not required and rank is None and conv_rank is None and energy is None and budget is None:
        if max_rank is not None:
            return RankPolicy.from_options(rank=max_rank, conv_rank=max_rank, max_rank=max_rank)
        return None
    if required and rank is None and conv_rank is None and energy is None and budget is None:
        raise LoRAError("resize needs a target: --rank R [--conv-rank C], --energy F or --budget SIZE")
    if conv_rank is not None and rank is None and energy is None and budget is None:
        raise LoRAError("--conv-rank needs --rank too (the rank of the linear layers)")
    return RankPolicy.from_options(rank=rank, conv_rank=conv_rank if conv_rank is not None else rank,
                                   energy=energy, budget=budget, max_rank=max_rank)


def _destination(output: str | Path | None, register: str | None) -> tuple[Path, Path | None]:
    if output is None and register is None:
        raise LoRAError("give --output FILE and/or --register NAME")
    from lbm_registry.fileio import check_output_file

    check_output_file(output, LoRAError)
    if register is not None:
        from lbm_registry.api.registry import validate_name

        validate_name(register)
    if output is not None:
        return Path(output), None
    tmpdir = Path(tempfile.mkdtemp(prefix="lbm-algebra-"))
    return tmpdir / f"{register}.safetensors", tmpdir


def _asset_dict(asset: ResolvedAsset, weight: float | None = None) -> dict[str, Any]:
    d = {"ref": asset.ref, "label": asset.label, "sha256": asset.sha256, "kind": asset.kind}
    if weight is not None:
        d["weight"] = weight
    return d


def resize(ref: str, *, rank: int | None = None, conv_rank: int | None = None, energy: float | None = None,
           budget: str | int | None = None, max_rank: int | None = None, dtype: str = "bf16",
           output: str | Path | None = None, register: str | None = None,
           settings: WorkspaceSettings | None = None, progress: ProgressFn | None = None,
           probe: str | None = None) -> AlgebraReport:
    """A smaller LoRA of ``ref`` from its factors alone (optimal truncation of its own delta).
    ``probe``: the registered version's probe picture, wait|auto|off (see api/probe.py)."""
    from lbm_registry.api.run.probe import probe_mode

    mode = probe_mode(probe)
    policy = _policy(rank, conv_rank, energy, budget, max_rank, required=True)
    settings = settings if settings is not None else WorkspaceSettings.resolve()
    assets = _resolve_all([ref], settings, register, dtype)
    dest, tmpdir = _destination(output, register)
    try:
        from lbm_registry.lora.algebra import resize_lora

        t0, report_start = time.perf_counter(), time.time()
        [(asset, lora)] = _open(assets)
        base = _base_of(asset, lora)
        info = _info("resize", base, [(asset, 1.0)], register)
        result = resize_lora(lora, dest, policy=policy, dtype=dtype, info=info, progress=progress)
        report = AlgebraReport("resize", result, [_asset_dict(asset)], base,
                               timings={"resize_s": time.perf_counter() - t0})
        if register is not None:
            _register(report, register, [(asset, 1.0)], settings, mode, report_start)
        return report
    finally:
        _cleanup(tmpdir)


def merge(specs: Sequence[str], *, rank: int | None = None, conv_rank: int | None = None,
          energy: float | None = None, budget: str | int | None = None, max_rank: int | None = None,
          dtype: str = "bf16", output: str | Path | None = None, register: str | None = None,
          settings: WorkspaceSettings | None = None, progress: ProgressFn | None = None,
          probe: str | None = None) -> AlgebraReport:
    """``sum_i w_i * LoRA_i`` for LoRAs on one base: exact by default, compressed with a policy.
    ``probe``: the registered version's probe picture, wait|auto|off (see api/probe.py)."""
    if len(specs) < 2:
        raise LoRAError("merge needs at least two LoRAs (REF[:WEIGHT] REF[:WEIGHT] ...)")
    from lbm_registry.api.run.probe import probe_mode

    mode = probe_mode(probe)
    weighted = [parse_weighted(s) for s in specs]
    policy = _policy(rank, conv_rank, energy, budget, max_rank, required=False)
    settings = settings if settings is not None else WorkspaceSettings.resolve()
    assets = _resolve_all([r for r, _ in weighted], settings, register, dtype)
    from lbm_registry.lora.algebra import merge_loras

    opened = _open(assets)
    bases = [_base_of(a, lo) for a, lo in opened]
    for (asset, _), b in zip(opened[1:], bases[1:], strict=True):
        if _same_base(bases[0], b) is False:
            raise LoRAError(f"{asset.label} was made for base sha256:{(b['sha256'] or '?')[:12]}, but "
                            f"{opened[0][0].label} for sha256:{(bases[0]['sha256'] or '?')[:12]}: "
                            "LoRAs for different bases cannot be merged")
    base = next((b for b in bases if b["sha256"] or b["tensor_sha256"]), bases[0])
    dest, tmpdir = _destination(output, register)
    try:
        t0, report_start = time.perf_counter(), time.time()
        pairs = [(a, w) for (a, _), (_, w) in zip(opened, weighted, strict=True)]
        info = _info("merge", base, pairs, register)
        result = merge_loras([(lo, w) for (_, lo), (_, w) in zip(opened, weighted, strict=True)], dest,
                             policy=policy, dtype=dtype, info=info, labels=[a.label for a, _ in opened],
                             progress=progress)
        report = AlgebraReport("merge", result, [_asset_dict(a, w) for a, w in pairs], base,
                               timings={"merge_s": time.perf_counter() - t0})
        if register is not None:
            _register(report, register, pairs, settings, mode, report_start)
        return report
    finally:
        _cleanup(tmpdir)


def _info(operation: str, base: dict[str, Any], parents: list[tuple[ResolvedAsset, float]],
          register: str | None) -> dict[str, Any]:
    from lbm_registry.version import __version__

    info: dict[str, Any] = {
        "base_sha256": base["sha256"], "base_tensor_sha256": base["tensor_sha256"], "base_ref": base["ref"],
        "base_config": base["config"], "operation": operation, "tool": f"lbm-registry {__version__}",
        "parents": [{"sha256": a.sha256, "ref": a.label, "weight": w} for a, w in parents],
    }
    if register is not None:
        info["title"] = register
    return info


def _register(report: AlgebraReport, name: str, parents: list[tuple[ResolvedAsset, float]],
              settings: WorkspaceSettings, probe: str, started: float | None = None) -> None:
    from lbm_registry.api.registry import register_asset
    from lbm_registry.api.run.probe import after_registration

    r = report.result
    t1 = time.perf_counter()
    facts = {
        "rank": max((la.rank for la in r.layers if la.kind == "linear"), default=0),
        "conv_rank": max((la.rank for la in r.layers if la.kind != "linear"), default=0),
        "policy": f"{report.operation}: {r.policy_text}", "alpha": None, "dtype": r.dtype,
        "mean_error": r.mean_error, "max_error": r.max_error,
        "layers": [{"module": la.module, "kind": la.kind, "shape": list(la.shape), "rank": la.rank,
                    "rel_error": la.rel_error, "energy": la.energy} for la in r.layers],
        "skipped": r.skipped, "operation": report.operation,
        "parents": [{"ref": a.label, "sha256": a.sha256, "weight": w} for a, w in parents],
    }
    base = report.base
    lineage: dict[str, Any] = {"parent": [a for a, _ in parents]}
    if base["sha256"]:
        lineage["base"] = {"sha256": base["sha256"], "ref": base["ref"]}
    else:
        raise LoRAError("the LoRA records no base: it cannot be registered (register it with import --base first)")
    params = {"operation": report.operation, "policy": r.policy_text, "dtype": r.dtype,
              "parents": json.dumps([[a.label, w] for a, w in parents])}
    metrics = {"mean_error": r.mean_error, "max_error": r.max_error, "size_bytes": r.size_bytes,
               "layers": len(r.layers), "seconds": r.seconds}
    with tempfile.TemporaryDirectory(prefix="lbm-algebra-art-") as tmp:
        table = Path(tmp) / f"{report.operation}.json"
        table.write_text(json.dumps(report.to_dict(layers=True), indent=1, default=str))
        from lbm_registry.api.run.probe import lora_probe

        picture = lora_probe(Path(tmp), r.path, lineage["base"], settings, draw=probe == "wait")
        asset = after_registration(register_asset(r.path, name=name, kind="lora", settings=settings, facts=facts,
                                                  lineage=lineage, params=params, metrics=metrics,
                                                  artifacts={table.name: table, **picture}, work_started=started),
                                   settings, probe)
    report.ref = asset.ref
    report.registered_path = str(asset.path)
    report.timings["register_s"] = time.perf_counter() - t1


def _cleanup(tmpdir: Path | None) -> None:
    if tmpdir is not None:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
