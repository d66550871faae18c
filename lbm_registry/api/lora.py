"""LoRA services behind ``lbm-reg extract / validate / layers / export``.

The one place where references, the registry and the LoRA math meet: resolve references,
check that the checkpoints are LBM models that fit together, run the math from
:mod:`lbm_registry.lora`, record results in the registry. Every function returns a dataclass
with ``to_dict()``; the CLI only renders it.

    extract(base, tuned, *, rank=None, conv_rank=None, energy=None, budget=None, max_rank=None,
            alpha=None, dtype="bf16", output=None, register=None, settings=None, progress=None,
            svd=None) -> ExtractReport
    validate(ref, *, base=None, tuned=None, layers_file=None, functional=True, latent_size=32,
             settings=None, progress=None) -> ValidateReport
    layers(ref, *, settings=None) -> LayersReport
    export(ref, *, fmt, output, settings=None) -> ExportReport
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.api._report import WrittenLoRAReport
from lbm_registry.errors import ArchitectureError, LoRAError, RefError
from lbm_registry.registry.settings import WorkspaceSettings

if TYPE_CHECKING:  # pragma: no cover
    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.config import LBMConfig
    from lbm_registry.lora.extract import ExtractionResult
    from lbm_registry.lora.svd import SVDSettings

PREFIX = "denoiser."
EXPECTED_LAYERS = 792
MODEL_KINDS = ("base", "model")
ProgressFn = Callable[[str, int, int], None]


def _settings(settings: WorkspaceSettings | None) -> WorkspaceSettings:
    return settings if settings is not None else WorkspaceSettings.resolve()


def _asset_dict(asset: ResolvedAsset) -> dict[str, Any]:
    return {"ref": asset.ref, "label": asset.label, "sha256": asset.sha256, "kind": asset.kind, "path": str(asset.path)}


# -- base identity ----------------------------------------------------------------------------
def tensor_sha_of(asset: ResolvedAsset) -> str | None:
    """The sha256 of a base's tensor bytes: recorded for registered versions, else computed
    (safetensors files only). Identifies a base whatever metadata a re-save gave it."""
    recorded = (asset.facts or {}).get("tensor_sha256")
    if recorded:
        return str(recorded)
    from lbm_registry.lbm.checkpoint import CKPT_SUFFIXES

    if asset.kind != "file" or asset.path.suffix in CKPT_SUFFIXES:
        return None
    from lbm_registry.safetensors_layout import tensor_sha256

    try:
        return tensor_sha256(asset.path)
    except (OSError, ValueError):
        return None


def _tensor_sha_or_none(path: Path) -> str | None:
    from lbm_registry.safetensors_layout import tensor_sha256

    try:
        return tensor_sha256(path)
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


# -- checkpoints -------------------------------------------------------------------------------
@dataclass
class ModelPair:
    """Two resolved, opened, architecture-checked LBM checkpoints."""

    base: ResolvedAsset
    tuned: ResolvedAsset
    base_reader: CheckpointReader
    tuned_reader: CheckpointReader
    config: LBMConfig | None
    modules: dict[str, tuple[int, ...]]   # LoRA-able layers: module name -> weight shape
    other_keys: list[str]                 # the rest of the denoiser (biases, norms...)


def config_of(asset: ResolvedAsset, reader: CheckpointReader) -> LBMConfig | None:
    """The model's config: its registry record, else the ``lbm_config`` file metadata, else None."""
    from lbm_registry.lbm.config import config_from_dict
    from lbm_registry.lbm.loading import config_from_checkpoint

    if asset.config:
        return config_from_dict(asset.config, asset.label)
    return config_from_checkpoint(reader)


def _expected_denoiser(config: LBMConfig | None) -> dict[str, tuple[int, ...]] | None:
    """The denoiser keys/shapes ``config`` describes: from the diffusers-free table when it knows
    the blocks (no 6-8 s diffusers import), else from a model built on the meta device."""
    if config is None:
        return None
    from lbm_registry.lbm.unet_shapes import denoiser_shapes

    table = denoiser_shapes(config.denoiser)
    if table is not None:
        return {PREFIX + k: v for k, v in table.items()}
    from lbm_registry.lbm.model import expected_shapes

    return {k: v for k, v in expected_shapes(config).items() if k.startswith(PREFIX)}


def denoiser_layers(reader: CheckpointReader) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Split a checkpoint's denoiser into LoRA-able layers (``.weight`` with ndim >= 2) and the rest."""
    modules: dict[str, tuple[int, ...]] = {}
    others: list[str] = []
    for key, shape in reader.shapes(PREFIX).items():
        if key.endswith(".weight") and len(shape) >= 2:
            modules[key[len(PREFIX):-len(".weight")]] = tuple(shape)
        else:
            others.append(key)
    return modules, others


def check_lbm_pair(base: CheckpointReader, tuned: CheckpointReader, config: LBMConfig | None,
                   expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Both files are LBM denoisers of the same architecture, or raise ArchitectureError.

    With a config, each file must match it exactly (keys and shapes). Without one, the two
    denoisers must have identical key/shape sets and the 792 LBM weight layers.
    """
    from lbm_registry.lbm.checkpoint import check_architecture

    if config is not None:
        expected = expected if expected is not None else _expected_denoiser(config)
        for reader in (base, tuned):
            check_architecture(reader.shapes(PREFIX), expected or {}, reader.path,
                               f"LBM checkpoint for '{config.name}'")
        return
    base_shapes = base.shapes(PREFIX)
    if not base_shapes:
        raise ArchitectureError(f"{base.path}: not an LBM checkpoint (no {PREFIX}* tensors)")
    modules, _ = denoiser_layers(base)
    if len(modules) != EXPECTED_LAYERS:
        raise ArchitectureError(
            f"{base.path}: not an LBM checkpoint: {len(modules)} denoiser weight layers, expected "
            f"{EXPECTED_LAYERS} (for another architecture, use a file with lbm_config metadata or a registered base)")
    check_architecture(tuned.shapes(PREFIX), base_shapes, tuned.path, "LBM checkpoint with the base's denoiser")


def open_pair(base_ref: str, tuned_ref: str, settings: WorkspaceSettings) -> ModelPair:
    """Resolve both references, open both files, and check they are LBM models that fit together.

    Resolving a plain file hashes it (~1 s/GB), so two plain files are hashed concurrently, and
    with them the base's tensor bytes (its second identity, :func:`tensor_sha_of`), which used to
    be a third full read after the other two (~4 s of a full-size extraction); torch is imported
    meanwhile. Three hashes and an import on two cores instead of three rounds.
    """
    from concurrent.futures import ThreadPoolExecutor

    from lbm_registry.api.registry import resolve

    if Path(base_ref).is_file() and Path(tuned_ref).is_file():
        from lbm_registry.lbm.header import CKPT_SUFFIXES

        with ThreadPoolExecutor(max_workers=3) as pool:
            base_future = pool.submit(resolve, base_ref, settings, MODEL_KINDS)
            tuned_future = pool.submit(resolve, tuned_ref, settings, MODEL_KINDS)
            tensors_future = (None if Path(base_ref).suffix in CKPT_SUFFIXES
                              else pool.submit(_tensor_sha_or_none, Path(base_ref)))
            import lbm_registry.lbm.checkpoint  # noqa: F401  (torch loads while the files hash)

            base, tuned = base_future.result(), tuned_future.result()
            tensor_sha = tensors_future.result() if tensors_future is not None else None
        if tensor_sha and base.kind == "file":
            base.facts = {**(base.facts or {}), "tensor_sha256": tensor_sha}
    else:  # a registered name resolves in milliseconds: an unknown one is refused before torch loads
        base = resolve(base_ref, settings, MODEL_KINDS)
        tuned = resolve(tuned_ref, settings, MODEL_KINDS)
    from lbm_registry.lbm.checkpoint import CheckpointReader

    base_reader = CheckpointReader(base.path)
    config = config_of(base, base_reader)
    tuned_reader = CheckpointReader(tuned.path)
    expected = _expected_denoiser(config)
    check_lbm_pair(base_reader, tuned_reader, config, expected)
    modules, others = denoiser_layers(base_reader)
    return ModelPair(base, tuned, base_reader, tuned_reader, config, modules, others)


# -- extract -----------------------------------------------------------------------------------
LORA_DTYPES = ("bf16", "fp16", "fp32")   # lora.extract.STORAGE_DTYPES, named without importing torch


def check_lora_dtype(dtype: str) -> None:
    """Refuse a LoRA storage dtype other than :data:`LORA_DTYPES`, without importing torch."""
    if dtype not in LORA_DTYPES:
        raise LoRAError(f"unknown --dtype {dtype!r}: use bf16, fp16 or fp32")


@dataclass
class ExtractReport(WrittenLoRAReport):
    result: ExtractionResult
    base: dict[str, Any]
    tuned: dict[str, Any]
    ref: str | None = None          # name@N when registered
    registered_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        return self._to_dict(layers, base=self.base, tuned=self.tuned)


def extract(base: str, tuned: str, *, rank: int | None = None, conv_rank: int | None = None,
            energy: float | None = None, budget: str | int | None = None, max_rank: int | None = None,
            alpha: float | None = None, dtype: str = "bf16", output: str | Path | None = None,
            register: str | None = None, settings: WorkspaceSettings | None = None,
            progress: ProgressFn | None = None, svd: SVDSettings | None = None) -> ExtractReport:
    """Extract a LoRA of ``tuned - base`` over every denoiser weight layer.

    Writes ``output`` (atomically, at the end) and/or registers the LoRA as ``register`` with
    its lineage, per-layer facts and a spectrum plot. Every bad input raises one LBMError
    before anything is written.
    """
    import tempfile

    from lbm_registry import __version__
    from lbm_registry.lora.ranks import RankPolicy

    # Every check that needs no torch comes first: a wrong option answers in a fraction of a second.
    policy = RankPolicy.from_options(rank=rank, conv_rank=conv_rank, energy=energy, budget=budget, max_rank=max_rank)
    check_lora_dtype(dtype)
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise LoRAError(f"--alpha must be positive, got {alpha}")
    if output is None and register is None:
        raise LoRAError("give output=FILE and/or register=NAME", cli="give --output FILE and/or --register NAME")
    from lbm_registry.fileio import check_output_file

    check_output_file(output, LoRAError)
    settings = _settings(settings)
    if register is not None:
        from lbm_registry.api.registry import check_name_free

        check_name_free(register, "lora", settings)
    t0 = time.perf_counter()
    pair = open_pair(base, tuned, settings)

    from lbm_registry.lora.extract import extract_lora
    from lbm_registry.lora.svd import SVDSettings
    timings = {"resolve_and_check_s": time.perf_counter() - t0}
    if pair.base.sha256 == pair.tuned.sha256:
        raise LoRAError(f"base and tuned are the same file (sha256 {pair.base.sha256[:12]}): nothing to extract")

    tmpdir = None
    if output is not None:
        dest = Path(output)
    else:
        tmpdir = Path(tempfile.mkdtemp(prefix="lbm-extract-"))
        dest = tmpdir / f"{register}.safetensors"
    info = {
        "base_sha256": pair.base.sha256, "tuned_sha256": pair.tuned.sha256,
        "base_ref": pair.base.label, "tuned_ref": pair.tuned.label,
        "tool": f"lbm-registry {__version__}",
        "base_tensor_sha256": tensor_sha_of(pair.base),
        "base_config": pair.config.name if pair.config is not None else None,
    }
    if register is not None:
        info["title"] = register
    try:
        result = extract_lora(pair.base_reader, pair.tuned_reader, pair.modules, dest, policy=policy, alpha=alpha,
                              dtype=dtype, settings=svd or SVDSettings(), info=info, other_keys=pair.other_keys,
                              prefix=PREFIX, progress=progress)
        timings["extract_s"] = result.seconds
        report = ExtractReport(result=result, base=_asset_dict(pair.base), tuned=_asset_dict(pair.tuned),
                               timings=timings)
        if register is not None:
            t1 = time.perf_counter()
            asset = _register_extraction(result, register, pair, settings)
            report.ref = asset.ref
            report.registered_path = str(asset.path)
            timings["register_s"] = time.perf_counter() - t1
    finally:
        if tmpdir is not None:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
    return report


def _layer_facts(result: ExtractionResult) -> list[dict[str, Any]]:
    return [{"module": r.module, "kind": r.kind, "shape": list(r.shape), "rank": r.rank,
             "rel_error": r.rel_error, "energy": r.energy} for r in result.layers]


def _register_extraction(result: ExtractionResult, name: str, pair: ModelPair,
                         settings: WorkspaceSettings) -> ResolvedAsset:
    import tempfile

    from lbm_registry.api.registry import register_asset
    from lbm_registry.lora.plot import plot_spectra

    policy = result.policy
    linear = [r.rank for r in result.layers if r.kind == "linear"]
    conv = [r.rank for r in result.layers if r.kind != "linear"]
    facts = {
        "rank": policy.rank if policy.kind == "fixed" else max(linear, default=0),
        "conv_rank": policy.conv_rank if policy.kind == "fixed" else max(conv, default=0),
        "policy": policy.describe(), "alpha": result.alpha, "dtype": result.dtype,
        "mean_error": result.mean_error, "max_error": result.max_error,
        "layers": _layer_facts(result),
        "skipped": [asdict(s) for s in result.skipped],
        "uncaptured": result.uncaptured,
        "rank_histogram": {str(k): v for k, v in result.rank_histogram().items()},
    }
    params = {"policy": policy.kind, **{k: v for k, v in policy.to_dict().items() if k != "kind"},
              "alpha": result.alpha if result.alpha is not None else "rank", "dtype": result.dtype}
    metrics = {"mean_error": result.mean_error, "max_error": result.max_error, "size_bytes": result.size_bytes,
               "layers": len(result.layers), "skipped": len(result.skipped), "extract_seconds": result.seconds}
    with tempfile.TemporaryDirectory(prefix="lbm-lora-art-") as tmp:
        artifacts: dict[str, Path] = {}
        png = plot_spectra(result.layers, Path(tmp) / "spectrum.png", title=f"{name}: {policy.describe()}")
        if png is not None:
            artifacts["spectrum.png"] = png
        table = Path(tmp) / "extraction.json"
        table.write_text(json.dumps({"layers": [r.to_dict(spectrum=True) for r in result.layers],
                                     "skipped": facts["skipped"], "uncaptured": result.uncaptured}, indent=1))
        artifacts["extraction.json"] = table
        from lbm_registry.api.probe import probe_artifacts

        artifacts.update(probe_artifacts(Path(tmp), base_path=pair.base.path, config=pair.config,
                                         lora_path=result.path, tuned_path=pair.tuned.path, kind="lora"))
        return register_asset(result.path, name=name, kind="lora", settings=settings, facts=facts,
                              lineage={"base": pair.base, "tuned": pair.tuned}, params=params, metrics=metrics,
                              artifacts=artifacts)


# -- validate ----------------------------------------------------------------------------------
@dataclass
class ValidateReport:
    lora: dict[str, Any]
    base: dict[str, Any]
    tuned: dict[str, Any] | None
    coverage: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    functional: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    layers_file: str | None = None
    recorded: bool = False

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not layers:
            d.pop("layers")
        return d


def _lineage_ref(asset: ResolvedAsset, role: str) -> str | None:
    entry = (asset.lineage or {}).get(role)
    if isinstance(entry, dict):
        return entry.get("ref") or (f"sha256:{entry['sha256']}" if entry.get("sha256") else None)
    if isinstance(entry, str):
        return entry
    return None


def _resolve_role(explicit: str | None, lora_asset: ResolvedAsset, info: dict[str, Any], role: str,
                  settings: WorkspaceSettings) -> ResolvedAsset | None:
    """``--base``/``--tuned`` if given, else the LoRA's lineage, else the hash in its metadata."""
    from lbm_registry.api.registry import resolve

    if explicit is not None:
        return resolve(explicit, settings, MODEL_KINDS)
    candidates = [r for r in (_lineage_ref(lora_asset, role),) if r]
    entry = (lora_asset.lineage or {}).get(role)
    if isinstance(entry, dict) and entry.get("sha256"):
        candidates.append(f"sha256:{entry['sha256']}")
    if info.get(f"{role}_sha256"):
        candidates.append(f"sha256:{info[f'{role}_sha256']}")
    for ref in dict.fromkeys(candidates):
        try:
            return resolve(ref, settings, MODEL_KINDS)
        except RefError:
            continue
    if candidates and role == "base":
        msg = f"the LoRA's base ({candidates[-1][:19]}...) is not in the registry"
        raise LoRAError(f"{msg}: pass base=REF", cli=f"{msg}: pass --base REF")
    if role == "base":
        raise LoRAError("the LoRA records no base model: pass base=REF",
                        cli="the LoRA records no base model: pass --base REF")
    return None


def validate(ref: str, *, base: str | None = None, tuned: str | None = None, layers_file: str | Path | None = None,
             functional: bool = True, latent_size: int = 32, settings: WorkspaceSettings | None = None,
             progress: ProgressFn | None = None) -> ValidateReport:
    """Check base + LoRA against the tuned model, per layer and on denoiser outputs.

    Without a tuned model (e.g. a trained LoRA) only coverage and fit are checked. When the
    LoRA is a registered version, the results are recorded on it.
    """
    from lbm_registry.api.registry import resolve

    settings = _settings(settings)
    lora_asset = resolve(ref, settings, ("lora",))   # an unknown reference fails before torch loads

    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lora.apply import check_lora_targets
    from lbm_registry.lora.format import read_lora
    from lbm_registry.lora.validate import coverage, functional_check, layer_checks

    lora = read_lora(lora_asset.path)
    base_asset = _resolve_role(base, lora_asset, lora.info, "base", settings)
    assert base_asset is not None
    if not lora_fits_base(lora.base_sha256, lora.info.get("base_tensor_sha256"), base_asset):
        raise LoRAError(f"{lora_asset.label} was extracted from base sha256:{lora.base_sha256[:12]}, "
                        f"not {base_asset.label} (sha256:{base_asset.sha256[:12]})")
    tuned_asset = _resolve_role(tuned, lora_asset, lora.info, "tuned", settings)
    base_reader = CheckpointReader(base_asset.path)
    config = config_of(base_asset, base_reader)
    notes: list[str] = []
    if tuned_asset is not None:
        tuned_reader = CheckpointReader(tuned_asset.path)
        check_lbm_pair(base_reader, tuned_reader, config)
        if lora.info.get("tuned_sha256") and tuned_asset.sha256 != lora.info["tuned_sha256"]:
            notes.append(f"comparing with {tuned_asset.label}, not the model the LoRA was extracted from")
    modules, _ = denoiser_layers(base_reader)
    check_lora_targets(lora, modules)

    checks = None
    summary: dict[str, Any] = {}
    func = None
    if tuned_asset is not None:
        checks = layer_checks(base_reader, tuned_reader, lora, modules, prefix=PREFIX, progress=progress)
        # Every layer the fine-tune changed counts, also those the LoRA leaves out (rel. error 1.0);
        # unchanged layers have no relative error (0/0) and are counted apart.
        counted = [c for c in checks if c.delta_norm > 0]
        errs = [c.rel_error for c in counted]
        summary = {
            "mean_error": sum(errs) / len(errs) if errs else 0.0,
            "max_error": max(errs, default=0.0),
            "mean_energy": sum(c.energy for c in counted) / len(counted) if counted else 0.0,
            "mean_abs_ratio": sum(c.mean_abs_ratio for c in counted) / len(counted) if counted else 0.0,
            "total_energy": _total_energy(checks),
            "layers_counted": len(counted),
            "layers_unchanged": len(checks) - len(counted),
            "worst": [{"module": c.module, "rel_error": c.rel_error} for c in sorted(counted, key=lambda c: -c.rel_error)[:5]],
        }
        if functional and config is not None:
            if progress:
                progress("functional", 0, 1)
            fc = functional_check(base_asset.path, tuned_asset.path, lora, config, latent_size=latent_size)
            func = asdict(fc)
            if progress:
                progress("functional", 1, 1)
        elif functional:
            notes.append("functional check skipped: no LBM config (the base is unregistered and has no "
                         "lbm_config metadata)")
    else:
        notes.append("no tuned model known: per-layer and functional errors need --tuned")
    cov = asdict(coverage(lora, checks, modules))

    written = None
    if layers_file is not None:
        from lbm_registry.lbm.checkpoint import atomic_path

        with atomic_path(Path(layers_file)) as tmp:
            tmp.write_text("".join(f"{m}\n" for m in lora.layers))
        written = str(layers_file)

    report = ValidateReport(
        lora=_asset_dict(lora_asset), base=_asset_dict(base_asset),
        tuned=_asset_dict(tuned_asset) if tuned_asset is not None else None,
        coverage=cov,  # complete lists: JSON readers get every module
        layers=[c.to_dict() for c in checks] if checks is not None else [],
        summary=summary, functional=func, notes=notes, layers_file=written,
    )
    if lora_asset.kind == "lora" and lora_asset.version is not None:
        _record_validation(lora_asset, report, settings)
        report.recorded = True
    return report


def _total_energy(checks: list[Any]) -> float:
    """Share of the whole model's ||dW||^2 the LoRA keeps (layers weighted by their delta)."""
    tot = sum(c.delta_norm**2 for c in checks)
    lost = sum((c.rel_error * c.delta_norm) ** 2 for c in checks if math.isfinite(c.rel_error))
    return 1.0 - lost / tot if tot > 0 else 1.0


def _record_validation(asset: ResolvedAsset, report: ValidateReport, settings: WorkspaceSettings) -> None:
    from datetime import UTC, datetime

    from lbm_registry.api.registry import update_facts

    validation = {
        "base_sha256": report.base["sha256"],
        "tuned_sha256": report.tuned["sha256"] if report.tuned else None,
        "coverage": {k: v for k, v in report.coverage.items() if k != "changed_not_covered"},
        **{k: v for k, v in report.summary.items() if k != "worst"},
        "functional": report.functional,
        "notes": report.notes,
        "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    facts: dict[str, Any] = {"validation": validation}
    metrics: dict[str, float] = {}
    if report.functional is not None:
        facts["functional_error"] = report.functional["functional_error"]
        metrics["functional_recovered"] = report.functional["recovered"]
        metrics["functional_base_error"] = report.functional["base_error"]
        for row in report.functional.get("per_sigma") or []:  # what validate prints, per sigma
            metrics[f"functional_error_sigma_{row['sigma']:.3g}"] = row["error"]
            metrics[f"functional_base_error_sigma_{row['sigma']:.3g}"] = row["base_error"]
    if report.summary:
        metrics["validation_mean_error"] = report.summary["mean_error"]
        metrics["validation_max_error"] = report.summary["max_error"]
        metrics["validation_mean_abs_ratio"] = report.summary["mean_abs_ratio"]
        metrics["validation_mean_energy"] = report.summary["mean_energy"]
        metrics["energy_kept"] = report.summary["total_energy"]
    for k, v in report.coverage.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            metrics[f"coverage_{k}"] = float(v)
    update_facts(asset, facts, settings, metrics=metrics)


# -- layers / export ---------------------------------------------------------------------------
@dataclass
class LayersReport:
    lora: dict[str, Any]
    layers: list[dict[str, Any]]
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layers(ref: str, *, settings: WorkspaceSettings | None = None) -> LayersReport:
    """A LoRA's modules with rank, alpha, weight shape and kind (in file order)."""
    from lbm_registry.api.registry import resolve

    asset = resolve(ref, _settings(settings), ("lora",))
    from lbm_registry.lora.format import read_lora

    lora = read_lora(asset.path)
    rows = [{"module": m, "kind": la.kind, "rank": la.rank, "alpha": la.alpha, "shape": list(la.weight_shape),
             "params": la.num_params()} for m, la in lora.layers.items()]
    info = {k: v for k, v in lora.info.items() if k not in ("layers", "skipped")}
    return LayersReport(lora=_asset_dict(asset), layers=rows, info=info)


EXPORT_FORMATS = ("peft", "kohya")   # lora.export.FORMATS, named without importing torch


@dataclass
class ExportReport:
    lora: dict[str, Any]
    format: str
    paths: list[str]
    layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(ref: str, *, fmt: str, output: str | Path, settings: WorkspaceSettings | None = None) -> ExportReport:
    """Write the LoRA as a PEFT/diffusers folder (``peft``) or a kohya file (``kohya``)."""
    from lbm_registry.api.registry import resolve

    if fmt not in EXPORT_FORMATS:
        raise LoRAError(f"unknown export format {fmt!r}: use {' or '.join(EXPORT_FORMATS)}")
    asset = resolve(ref, _settings(settings), ("lora",))
    from lbm_registry.lora.export import export_lora
    from lbm_registry.lora.format import read_lora

    lora = read_lora(asset.path)
    paths = export_lora(lora, fmt, output)
    return ExportReport(lora=_asset_dict(asset), format=fmt, paths=[str(p) for p in paths], layers=len(lora.layers))
