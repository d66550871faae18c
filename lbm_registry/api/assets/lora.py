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

from lbm_registry.api.assets._report import WrittenLoRAReport
from lbm_registry.api.registry import (  # base identity, re-exported here
    lora_fits_base,
    tensor_sha_of,
)
from lbm_registry.errors import ArchitectureError, LoRAError, RefError
from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:  # pragma: no cover
    from lbm_registry.api.registry import PendingHashes, ResolvedAsset
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
    hashes: PendingHashes | None = None   # plain files' hashes, still running: see settle()

    def settle(self, settings: WorkspaceSettings) -> None:
        """Wait for the inputs' hashes (started by :func:`open_pair`) and fill them in: before
        anything reads ``base.sha256``/``tuned.sha256`` or the base's tensor hash. Two copies of
        one file are refused here."""
        if self.hashes is not None:
            self.hashes.settle(settings)
        if self.base.sha256 == self.tuned.sha256:
            raise LoRAError(f"base and tuned are the same file (sha256 {self.base.sha256[:12]}): nothing to extract")

    def close(self) -> None:
        """Stop hashes still running (the work failed before it needed them)."""
        if self.hashes is not None:
            self.hashes.cancel()


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

    Plain files are not hashed here: their hashes (both files and the base's tensor bytes, its
    second identity, :func:`tensor_sha_of`) start on low-priority threads (stopped if a check
    fails) and run beside torch's import, the checks and the caller's work, which calls
    :meth:`ModelPair.settle` before it records them. Hashing first used to be a third of a
    full-size extraction (8 s of its ~25 on two cores).
    """
    from lbm_registry.api.registry import hash_in_background, resolve

    base = resolve(base_ref, settings, MODEL_KINDS, hash_file=False)
    tuned = resolve(tuned_ref, settings, MODEL_KINDS, hash_file=False)
    if base.path.resolve() == tuned.path.resolve() or (base.sha256 and base.sha256 == tuned.sha256):
        raise LoRAError(f"base and tuned are the same file ({base.label}): nothing to extract")
    hashes = hash_in_background([base, tuned], tensor_sha_for=base, settings=settings)   # torch loads meanwhile
    try:
        from lbm_registry.lbm.checkpoint import CheckpointReader

        base_reader = CheckpointReader(base.path)
        config = config_of(base, base_reader)
        tuned_reader = CheckpointReader(tuned.path)
        expected = _expected_denoiser(config)
        check_lbm_pair(base_reader, tuned_reader, config, expected)
        modules, others = denoiser_layers(base_reader)
    except BaseException:
        hashes.cancel()
        raise
    return ModelPair(base, tuned, base_reader, tuned_reader, config, modules, others, hashes)


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
    calibration: dict[str, Any] | None = None   # provenance and per-layer outcome of --calibrate

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        extra = {"calibration": self.calibration} if self.calibration is not None else {}
        return self._to_dict(layers, base=self.base, tuned=self.tuned, **extra)


def extract(base: str, tuned: str, *, rank: int | None = None, conv_rank: int | None = None,
            energy: float | None = None, budget: str | int | None = None, max_rank: int | None = None,
            alpha: float | None = None, dtype: str = "bf16", output: str | Path | None = None,
            register: str | None = None, settings: WorkspaceSettings | None = None,
            progress: ProgressFn | None = None, svd: SVDSettings | None = None,
            calibrate: str | list[str] | None = None, calibration_samples: int | None = None,
            calibration_stats: str | None = None, calibration_resolution: int | None = None,
            calibration_memory: str | int | None = None, damping: float | None = None,
            stats_output: str | Path | None = None, calibration_model: str = "tuned") -> ExtractReport:
    """Extract a LoRA of ``tuned - base`` over every denoiser weight layer.

    Writes ``output`` (atomically, at the end) and/or registers the LoRA as ``register`` with
    its lineage, per-layer facts and a spectrum plot. Every bad input raises one LBMError
    before anything is written.

    ``calibrate`` (images, folders, shards) or ``calibration_stats`` (a statistics file, or a
    LoRA extracted with them) make the extraction activation-aware: each layer keeps what
    matters for its output on real inputs (see :mod:`lbm_registry.lora.whiten` and
    :mod:`lbm_registry.api.assets.calibration`).
    """
    import tempfile

    from lbm_registry.lora.ranks import RankPolicy
    from lbm_registry.version import __version__

    # Every check that needs no torch comes first: a wrong option answers in a fraction of a second.
    policy = RankPolicy.from_options(rank=rank, conv_rank=conv_rank, energy=energy, budget=budget, max_rank=max_rank)
    check_lora_dtype(dtype)
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise LoRAError(f"--alpha must be positive, got {alpha}")
    if output is None and register is None:
        raise LoRAError("give output=FILE and/or register=NAME", cli="give --output FILE and/or --register NAME")
    from lbm_registry.fileio import check_output_file

    check_output_file(output, LoRAError)
    from lbm_registry.api.assets.calibration import CalibrationPlan

    calib = CalibrationPlan.from_options(calibrate, samples=calibration_samples, stats=calibration_stats,
                                         resolution=calibration_resolution, memory=calibration_memory,
                                         damping=damping, stats_output=stats_output, model=calibration_model)
    settings = _settings(settings)
    if register is not None:
        from lbm_registry.api.registry import check_name_free

        check_name_free(register, "lora", settings)
    t0, started = time.perf_counter(), time.time()
    pair = open_pair(base, tuned, settings)

    from lbm_registry.lora.extract import extract_lora
    from lbm_registry.lora.svd import SVDSettings
    timings = {"resolve_and_check_s": time.perf_counter() - t0}

    tmpdir = None
    if output is not None:
        dest = Path(output)
    else:
        tmpdir = Path(tempfile.mkdtemp(prefix="lbm-extract-"))
        dest = tmpdir / f"{register}.safetensors"
    info: dict[str, Any] = {   # the hashes are filled in by identities(), at the end
        "base_sha256": None, "tuned_sha256": None,
        "base_ref": pair.base.label, "tuned_ref": pair.tuned.label,
        "tool": f"lbm-registry {__version__}",
        "base_tensor_sha256": None,
        "base_config": pair.config.name if pair.config is not None else None,
    }
    if register is not None:
        info["title"] = register

    def identities() -> dict[str, Any]:
        """The metadata, with the inputs' hashes: asked for once every layer is done."""
        pair.settle(settings)
        timings["hash_wait_s"] = pair.hashes.waited_s if pair.hashes is not None else 0.0
        info.update(base_sha256=pair.base.sha256, tuned_sha256=pair.tuned.sha256,
                    base_tensor_sha256=tensor_sha_of(pair.base))
        return info

    scratch = Path(tempfile.mkdtemp(prefix="lbm-calib-")) if calib is not None else None
    try:
        whitener, header_bytes, stats_path = None, 0, None
        if calib is not None and scratch is not None:
            from lbm_registry.lora.calibrate import StatsFile
            from lbm_registry.lora.whiten import Whitener

            run = calib.prepare(pair, scratch, settings, progress)   # settles the hashes when it needs them
            if calib.sources is not None:   # the model ran (reused statistics cost a read)
                timings["calibrate_s"] = run.seconds
            stats_path = run.path
            info["calibration"] = {**run.info, "damping": calib.damping}
            header_bytes = len(json.dumps(info["calibration"]))
            whitener = Whitener(StatsFile(stats_path), calib.damping)
        result = extract_lora(pair.base_reader, pair.tuned_reader, pair.modules, dest, policy=policy, alpha=alpha,
                              dtype=dtype, settings=svd or SVDSettings(), info=identities, other_keys=pair.other_keys,
                              prefix=PREFIX, progress=progress, whitener=whitener, header_bytes=header_bytes)
        timings["extract_s"] = result.seconds
        report = ExtractReport(result=result, base=_asset_dict(pair.base), tuned=_asset_dict(pair.tuned),
                               timings=timings)
        if whitener is not None:
            outs = [(r.out_error, r.plain_out_error or 0.0) for r in result.layers if r.out_error is not None]
            report.calibration = {**info["calibration"], "outcome": dict(sorted(whitener.counts.items())),
                                  "mean_out_error": sum(o for o, _ in outs) / max(len(outs), 1),
                                  "mean_plain_out_error": sum(p for _, p in outs) / max(len(outs), 1)}
        if register is not None:
            t1 = time.perf_counter()
            asset = _register_extraction(result, register, pair, settings, stats_path, report.calibration, started)
            report.ref = asset.ref
            report.registered_path = str(asset.path)
            timings["register_s"] = time.perf_counter() - t1
    finally:
        import shutil

        pair.close()
        for folder in (tmpdir, scratch):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    return report


def _layer_facts(result: ExtractionResult) -> list[dict[str, Any]]:
    return [{"module": r.module, "kind": r.kind, "shape": list(r.shape), "rank": r.rank,
             "rel_error": r.rel_error, "energy": r.energy} for r in result.layers]


def _register_extraction(result: ExtractionResult, name: str, pair: ModelPair,
                         settings: WorkspaceSettings, stats_path: Path | None = None,
                         calibration: dict[str, Any] | None = None, started: float | None = None) -> ResolvedAsset:
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
    if calibration is not None:
        facts["calibration"] = calibration
    params = {"policy": policy.kind, **{k: v for k, v in policy.to_dict().items() if k != "kind"},
              "alpha": result.alpha if result.alpha is not None else "rank", "dtype": result.dtype}
    metrics = {"mean_error": result.mean_error, "max_error": result.max_error, "size_bytes": result.size_bytes,
               "layers": len(result.layers), "skipped": len(result.skipped), "extract_seconds": result.seconds}
    if calibration is not None:   # the per-layer output errors, and what plain SVD would have had
        metrics["mean_out_error"] = calibration["mean_out_error"]
        metrics["mean_plain_out_error"] = calibration["mean_plain_out_error"]
    with tempfile.TemporaryDirectory(prefix="lbm-lora-art-") as tmp:
        artifacts: dict[str, Path] = {}
        png = plot_spectra(result.layers, Path(tmp) / "spectrum.png", title=f"{name}: {policy.describe()}")
        if png is not None:
            artifacts["spectrum.png"] = png
        table = Path(tmp) / "extraction.json"
        table.write_text(json.dumps({"layers": [r.to_dict(spectrum=True) for r in result.layers],
                                     "skipped": facts["skipped"], "uncaptured": result.uncaptured}, indent=1))
        artifacts["extraction.json"] = table
        if stats_path is not None:
            from lbm_registry.api.assets.calibration import STATS_ARTIFACT

            artifacts[STATS_ARTIFACT] = stats_path
        from lbm_registry.api.run.probe import probe_artifacts

        artifacts.update(probe_artifacts(Path(tmp), base_path=pair.base.path, config=pair.config,
                                         lora_path=result.path, tuned_path=pair.tuned.path, kind="lora"))
        return register_asset(result.path, name=name, kind="lora", settings=settings, facts=facts,
                              lineage={"base": pair.base, "tuned": pair.tuned}, params=params, metrics=metrics,
                              artifacts=artifacts, work_started=started)


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
    held_out: dict[str, Any] | None = None      # validate --images: base + LoRA vs tuned on real images
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
             progress: ProgressFn | None = None, images: str | list[str] | None = None,
             samples: int | None = None, resolution: int | None = None) -> ValidateReport:
    """Check base + LoRA against the tuned model, per layer and on denoiser outputs.

    Without a tuned model (e.g. a trained LoRA) only coverage and fit are checked. When the
    LoRA is a registered version, the results are recorded on it. ``images`` (files, folders,
    shards) adds the check on real images, held out: images the LoRA was calibrated on are left
    out (a note says how many), and only calibration images is refused.
    """
    from lbm_registry.api.assets.calibration import check_resolution, check_samples, list_inputs
    from lbm_registry.api.registry import resolve
    from lbm_registry.fileio import check_output_file

    check_output_file(layers_file, LoRAError, "--layers-file")
    settings = _settings(settings)
    heldout_inputs = None
    if images is not None and images != []:
        check_samples(samples, "--samples")
        check_resolution(resolution, None, "--resolution")
        heldout_inputs = list_inputs(images, what="--images")
    elif samples is not None or resolution is not None:
        raise LoRAError(("--samples" if samples is not None else "--resolution") + " applies to --images")
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
    from lbm_registry.lora.alpha import clipped_alpha_of

    clipped = clipped_alpha_of(lora)

    if heldout_inputs is not None and (tuned_asset is None or config is None):
        raise LoRAError("--images compares base + LoRA with the tuned model: it needs --tuned (or a LoRA that "
                        "records it) and an LBM config")

    checks = None
    summary: dict[str, Any] = {}
    func = None
    if tuned_asset is not None:
        checks = layer_checks(base_reader, tuned_reader, lora, modules, prefix=PREFIX, progress=progress,
                              alpha_at_rank=clipped.layers)
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
            "worst": [{"module": c.module, "rel_error": c.rel_error, **_alpha_cause(c, clipped)}
                      for c in sorted(counted, key=lambda c: -c.rel_error)[:5]],
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
    if clipped:
        notes.append(_alpha_note(clipped, checks))
    held = None
    if heldout_inputs is not None:
        assert tuned_asset is not None and config is not None
        held = _held_out(heldout_inputs, lora, base_asset, tuned_asset, config, samples, resolution, notes, progress)
    elif (lora.info.get("calibration") or {}).get("images"):
        notes.append("this LoRA was calibrated on images: pass --images with other images to measure it on held-out data")
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
        layers=[{**c.to_dict(), **_alpha_cause(c, clipped)} for c in checks] if checks is not None else [],
        summary=summary, functional=func, held_out=held, notes=notes, layers_file=written,
    )
    if lora_asset.kind == "lora" and lora_asset.version is not None:
        from lbm_registry.registry.workspace import read_only_home

        if read_only_home(settings.home):  # a shared, read-only registry: the check still runs
            report.notes.append(f"not recorded on {lora_asset.label}: the registry at {settings.home} is read-only")
        else:
            _record_validation(lora_asset, report, settings)
            report.recorded = True
    return report


def _alpha_cause(check: Any, clipped: Any) -> dict[str, str]:
    """``{"cause": ...}`` for a layer whose alpha exceeds its clipped rank, else nothing."""
    if check.module not in clipped.layers:
        return {}
    r, a = clipped.layers[check.module]
    at_rank = check.rel_error_alpha_at_rank
    tail = f"; with alpha = rank its error is {at_rank:.4g}" if at_rank is not None else ""
    return {"cause": f"alpha {a:g} > its clipped rank {r}: the layer is scaled {a / r:.4g}x{tail}"}


def _alpha_note(clipped: Any, checks: list[Any] | None) -> str:
    """The note naming alpha as the cause of the clipped layers' error."""
    line = clipped.line("re-import with --fix-alpha to use alpha = rank")
    rows = [c for c in checks or [] if c.module in clipped.layers and c.rel_error_alpha_at_rank is not None]
    if not rows:
        return line
    now = sum(c.rel_error for c in rows) / len(rows)
    fixed = sum(c.rel_error_alpha_at_rank for c in rows) / len(rows)
    return f"{line}. Their error is alpha's: mean {now:.4g} as stored, {fixed:.4g} with alpha = rank"


def _held_out(inputs: list[Any], lora: Any, base: ResolvedAsset, tuned: ResolvedAsset, config: LBMConfig,
              samples: int | None, resolution: int | None, notes: list[str],
              progress: ProgressFn | None) -> dict[str, Any]:
    """The held-out image check: calibration images (by content hash) left out first."""
    from lbm_registry.api.assets.calibration import DEFAULT_SAMPLES, check_resolution, image_tensor, take
    from lbm_registry.lora.validate import heldout_check

    check_resolution(resolution, config, "--resolution")
    calibration = set((lora.info.get("calibration") or {}).get("images") or [])
    chosen, excluded = take(inputs, samples or DEFAULT_SAMPLES, frozenset(calibration))
    if not chosen:
        raise LoRAError(f"all {excluded} image(s) given are calibration images of this LoRA: pass held-out images")
    if excluded:
        notes.append(f"{excluded} of the images given were calibration images of this LoRA: left out")
    tensors = [image_tensor(data, item.label, config, resolution) for item, data in chosen]
    if progress:
        progress("held-out", 0, 1)
    hc = heldout_check(base.path, tuned.path, lora, config, tensors, labels=[item.label for item, _ in chosen])
    if progress:
        progress("held-out", 1, 1)
    out = asdict(hc)
    out.update(resolution=resolution or config.inference.base_resolution, calibration_images_excluded=excluded,
               images_sha256=[item.sha256 for item, _ in chosen])
    return out


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
        "held_out": ({k: v for k, v in report.held_out.items() if k != "per_image"}
                     if report.held_out is not None else None),
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
    if report.held_out is not None:
        metrics["held_out_functional_error"] = report.held_out["functional_error"]
        metrics["held_out_psnr"] = report.held_out["psnr"]
        metrics["held_out_base_psnr"] = report.held_out["base_psnr"]
        metrics["held_out_recovered"] = report.held_out["recovered"]
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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layers(ref: str, *, settings: WorkspaceSettings | None = None) -> LayersReport:
    """A LoRA's modules with rank, alpha, weight shape and kind (in file order)."""
    from lbm_registry.api.registry import resolve

    asset = resolve(ref, _settings(settings), ("lora",))
    from lbm_registry.lora.format import read_lora

    lora = read_lora(asset.path)
    from lbm_registry.lora.alpha import clipped_alpha_of

    clipped = clipped_alpha_of(lora)
    rows = [{"module": m, "kind": la.kind, "rank": la.rank, "alpha": la.alpha, "shape": list(la.weight_shape),
             "params": la.num_params(), **({"alpha_above_clipped_rank": True} if m in clipped.layers else {})}
            for m, la in lora.layers.items()]
    info = {k: v for k, v in lora.info.items() if k not in ("layers", "skipped")}
    notes = [clipped.line("re-import it with --fix-alpha to use alpha = rank")] if clipped else []
    return LayersReport(lora=_asset_dict(asset), layers=rows, info=info, notes=notes)


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
    from lbm_registry.fileio import check_output_file, check_output_folder

    (check_output_folder if fmt == "peft" else check_output_file)(output, LoRAError)
    asset = resolve(ref, _settings(settings), ("lora",))
    from lbm_registry.lora.export import export_lora
    from lbm_registry.lora.format import read_lora

    lora = read_lora(asset.path)
    paths = export_lora(lora, fmt, output, source={"sha256": asset.sha256, "ref": asset.label})
    return ExportReport(lora=_asset_dict(asset), format=fmt, paths=[str(p) for p in paths], layers=len(lora.layers))
