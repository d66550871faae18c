"""Inference by name: resolve a LoRA/model/base, merge LoRA(s) at load, run images.

LoRAs are merged into the weights once (zero per-step overhead); a new scale re-merges from
the saved original weights, so scale 0 is bit-exactly the base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import BaseMismatchError, ConfigError, LoRAError, RangeError, RefError, abbreviate
from lbm_registry.lbm.header import CKPT_SUFFIXES, SafetensorsHeader, config_from_metadata
from lbm_registry.ranges import MAX_SCALE, check_scale, check_seed, check_steps
from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:
    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lbm.config import LBMConfig
    from lbm_registry.lbm.pipeline import LBMPipeline

log = logging.getLogger(__name__)

INFER_DTYPES = ("auto", "fp32", "bf16", "fp16")   # what lbm.model.pick_dtype takes (without torch)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# What an output file name may end in, and the format written (the extension decides).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF"}


@dataclass
class LoadPlan:
    """What will be loaded: the base weights and each LoRA with its scale."""

    base: ResolvedAsset
    loras: list[tuple[ResolvedAsset, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``REF[:SCALE]``: a trailing ``:<number>`` is the scale (``sha256:PREFIX`` alone is not).

    Anything else after a ``:`` is refused here (``relight@1:abc`` is a bad scale, not an alias
    named ``1:abc``), unless the whole spec is an existing file."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and head.lower() != "sha256":
        try:
            value = float(tail)
        except ValueError:
            from lbm_registry.registry.refs import is_dir, is_file

            if is_file(spec) or is_dir(spec):
                return spec, 1.0
            raise LoRAError(f"bad LoRA spec {abbreviate(spec)!r}: write REF or REF:SCALE (a number), "
                            f"got scale {abbreviate(tail, 20)!r}") from None
        try:
            return head, check_scale(value)
        except RangeError:
            raise RangeError(f"bad LoRA spec {abbreviate(spec)!r}: its scale {value:g} is outside "
                             f"0.0-{MAX_SCALE}") from None
    return spec, 1.0


def is_lora_file(path: Path) -> bool:
    """Sniff a weight file: a native LoRA has only ``denoiser.*.lora_down/up/alpha`` keys."""
    if path.suffix in CKPT_SUFFIXES:
        from lbm_registry.lbm.checkpoint import CheckpointReader

        keys = CheckpointReader(path).keys()
    else:  # the header says it all: no torch
        keys = SafetensorsHeader(path).keys()
    return bool(keys) and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)


def _kind(asset: ResolvedAsset) -> str:
    if asset.kind != "file":
        return asset.kind
    return "lora" if is_lora_file(asset.path) else "model"


def _lora_base_sha(asset: ResolvedAsset) -> str | None:
    sha = (asset.facts or {}).get("base_sha256") or ((asset.lineage or {}).get("base") or {}).get("sha256")
    if sha:
        return sha
    from lbm_registry.lora.format import read_lora

    return read_lora(asset.path, check_finite=False).base_sha256


def _lora_base_tensor_sha(asset: ResolvedAsset) -> str | None:
    sha = (asset.facts or {}).get("base_tensor_sha256")
    if sha:
        return sha
    from lbm_registry.lora.format import read_lora

    return read_lora(asset.path, check_finite=False).info.get("base_tensor_sha256")


def plan_load(ref: str, *, base: str | None = None, loras: list[str] | tuple[str, ...] = (),
              scale: float = 1.0, force: bool = False, settings: WorkspaceSettings | None = None) -> LoadPlan:
    """Resolve the references and check that every LoRA was made for the chosen base."""
    from lbm_registry.api.registry import resolve

    settings = settings or WorkspaceSettings.resolve()
    main = resolve(ref, settings)
    lora_assets: list[tuple[ResolvedAsset, float]] = []
    check_scale(scale)
    if _kind(main) == "lora":
        lora_assets.append((main, 1.0))
    for spec in loras:
        r, s = parse_lora_spec(spec)
        a = resolve(r, settings)
        if _kind(a) != "lora":
            raise LoRAError(f"{r} (in loras) is not a LoRA", cli=f"--lora {r}: not a LoRA")
        lora_assets.append((a, s))

    if base is not None:
        base_asset = resolve(base, settings)
    elif _kind(main) != "lora":
        base_asset = main
    else:
        sha = _lora_base_sha(main)
        if not sha:
            raise RefError(f"{ref}: the LoRA records no base; pass base=REF",
                           cli=f"{ref}: the LoRA records no base; pass --base REF")
        try:
            base_asset = resolve(f"sha256:{sha}", settings)
        except RefError:
            from lbm_registry.api.registry import resolve_by_tensor_sha

            found = resolve_by_tensor_sha(_lora_base_tensor_sha(main), settings)
            if found is None:
                msg = f"{ref}: its base sha256:{sha[:12]} is not in this registry"
                raise RefError(f"{msg}; pass base=REF", cli=f"{msg}; pass --base REF") from None
            base_asset = found
    if _kind(base_asset) == "lora":
        raise RefError(f"{base_asset.ref}: is a LoRA, not a base model")

    plan = LoadPlan(base=base_asset, loras=lora_assets)
    for a, _ in lora_assets:
        msg = base_mismatch(a, base_asset)
        if msg:
            if not force:
                raise BaseMismatchError(msg + "; pass force=True to run anyway", cli=msg + "; use --force to run anyway")
            plan.warnings.append(msg)
            log.warning(msg)
    return plan


def base_mismatch(lora: ResolvedAsset, base: ResolvedAsset) -> str | None:
    """Why ``lora`` does not belong to ``base`` (one line), or None when it does (by file or
    tensor hash) or records no base."""
    from lbm_registry.api.registry import lora_fits_base

    want = _lora_base_sha(lora)
    if want and want != base.sha256 and not lora_fits_base(want, _lora_base_tensor_sha(lora), base):
        return (f"LoRA {lora.label} was made for base sha256:{want[:12]}, not {base.label} "
                f"(sha256:{base.sha256[:12]})")
    return None


def config_for(asset: ResolvedAsset) -> LBMConfig:
    """The LBM config of a base/model: from the registry record, else the file's metadata."""
    from lbm_registry.lbm.config import config_from_dict

    if asset.config:
        return config_from_dict(asset.config, asset.label)
    if asset.path.suffix in CKPT_SUFFIXES:
        from lbm_registry.lbm.checkpoint import CheckpointReader

        metadata = CheckpointReader(asset.path).metadata
    else:
        metadata = SafetensorsHeader(asset.path).metadata
    cfg = config_from_metadata(metadata, asset.path)
    if cfg is None:
        msg = f"{asset.label}: no LBM config recorded"
        raise ConfigError(f"{msg}; register it with a config", cli=f"{msg}; import it with --config")
    return cfg


def load(ref: str, *, base: str | None = None, loras: list[str] | tuple[str, ...] = (), scale: float = 1.0,
         device: str = "auto", dtype: str = "auto", force: bool = False,
         settings: WorkspaceSettings | None = None) -> LBMPipeline:
    """A ready pipeline: ``pipe = load("relight-v3@latest"); img = pipe(image, scale=1.0)``.

    ``scale`` multiplies every LoRA (like a global LoRA strength); each ``--lora REF:S`` keeps its
    own strength ``S`` under that multiplier. ``pipe(image, scale=s)`` changes the multiplier.
    The workspace is ``settings``, else the one ``$LBM_REG_HOME`` (default ``./mlruns``) names.
    """
    from lbm_registry.lbm.device import check_device, check_dtype

    check_device(device)  # before resolving or hashing anything (torch only for a cuda request)
    check_dtype(dtype)
    plan = plan_load(ref, base=base, loras=loras, scale=scale, force=force, settings=settings)
    cfg = config_for(plan.base)   # references and configs are checked before torch loads
    info = {"base": plan.base.label, "base_sha256": plan.base.sha256,
            "loras": [{"ref": a.label, "sha256": a.sha256, "scale": s * scale} for a, s in plan.loras],
            "warnings": plan.warnings}
    return pipeline_from_files(plan.base.path, cfg, [(a.path, s) for a, s in plan.loras],
                               scale=scale, device=device, dtype=dtype, info=info)


def pipeline_from_files(base_path: Path, cfg: LBMConfig, loras: list[tuple[Path, float]] | tuple = (), *,
                        scale: float = 1.0, device: str = "auto", dtype: str = "auto",
                        info: dict[str, Any] | None = None) -> LBMPipeline:
    """The pipeline of a base file plus LoRA files (each with its own strength), no registry.

    ``load`` and the MLflow pyfunc model both build their pipeline here, so ``mlflow ...
    predict`` gives the pixels ``lbm-reg infer`` gives."""
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lbm.model import DENOISER_PREFIX, pick_device, pick_dtype
    from lbm_registry.lbm.pipeline import LBMPipeline
    from lbm_registry.lora.apply import MergedLoRAs, check_lora_targets
    from lbm_registry.lora.format import read_lora

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = load_lbm(base_path, cfg, device=dev, dtype=dt)
    merged = None
    if loras:
        from lbm_registry.lbm.model import weight_layers

        shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(model.denoiser).items()}
        files = []
        for path, s in loras:
            lf = read_lora(path)
            check_lora_targets(lf, shapes)
            files.append((lf, s))
        # Re-scaling re-reads the base weights from the (memory-mapped) checkpoint instead of
        # keeping a second copy of every merged layer: that copy is 10 GB for the full model.
        base_reader = CheckpointReader(base_path)
        merged = MergedLoRAs(model.denoiser, files, global_scale=scale,
                             originals=lambda name: base_reader.get(f"{DENOISER_PREFIX}{name}.weight"))
    info = {**(info or {}), "device": str(dev), "dtype": str(dt).replace("torch.", "")}
    return LBMPipeline(model=model, device=dev, dtype=dt, loras=merged, info=info)


def collect_images(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if source.is_file():
        return [source]
    raise ConfigError(f"source not found: {source}")


def plan_outputs(source: Path, output: Path, inputs: list[Path]) -> dict[Path, Path]:
    """Where each input's result goes; refuses what cannot be right before any model loads.

    A folder source needs a folder output (``a.jpg`` -> ``OUT/a.png``; two inputs with the same
    stem keep their whole names, ``a.jpg.png``). A file source writes ``OUTPUT`` in the format
    its extension names (.png, .jpg, .webp, .bmp, .tif), or ``OUTPUT/<stem>.png`` when OUTPUT
    is a folder or has no extension."""
    output = Path(output)
    suffix = output.suffix.lower()
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise ConfigError(f"the source {source} is a folder, but the output {output} is a file: give a folder")
        if not output.exists() and suffix in IMAGE_SUFFIXES:
            raise ConfigError(f"the source {source} is a folder, so the output must be a folder, "
                              f"not an image file name ({output})")
        stems: dict[str, int] = {}
        for p in inputs:
            stems[p.stem] = stems.get(p.stem, 0) + 1
        return _writable({p: output / ((p.name if stems[p.stem] > 1 else p.stem) + ".png") for p in inputs})
    if output.is_dir() or not suffix:
        return _writable({p: output / (p.stem + ".png") for p in inputs})
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"cannot write {output}: {suffix!r} is not an image format this writes "
                          f"(use {', '.join(OUTPUT_FORMATS)})")
    return _writable({p: output for p in inputs})


def _writable(destinations: dict[Path, Path]) -> dict[Path, Path]:
    """Refuse, before any model loads, outputs whose folder cannot exist (a file in the way), and
    outputs that are no regular file to write (a device, a FIFO, a registry's own files)."""
    from lbm_registry.fileio import folder_problem, output_file_problem

    for parent in {d.parent for d in destinations.values()}:
        if (problem := folder_problem(parent)) is not None:
            raise ConfigError(f"cannot write the output: {problem}")
    for dest in destinations.values():
        if (problem := output_file_problem(dest, "--output")) is not None:
            raise ConfigError(problem)
    return destinations


def check_inputs(source: Path, inputs: list[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Header-check every input (no decoding): (readable, skipped with path and reason).

    Nothing readable is an error, raised before any model loads."""
    from lbm_registry.errors import DataError
    from lbm_registry.lbm.imaging import image_problem

    readable, skipped = [], []
    for p in inputs:
        reason = image_problem(p)
        if reason is None:
            readable.append(p)
        else:
            skipped.append({"path": str(p), "reason": reason})
    if not readable:
        if not source.is_dir():
            raise DataError(f"{source}: {skipped[0]['reason']}")
        if not skipped:
            raise DataError(f"no images in {source}: the folder is empty")
        first = skipped[0]
        raise DataError(f"no readable images in {source} ({len(skipped)} file(s) skipped; "
                        f"first: {first['path']}: {first['reason']})")
    return readable, skipped


def run_infer(ref: str, *, source: Path, output: Path, scale: float = 1.0, steps: int | None = None,
              seed: int = 0, base: str | None = None, loras: list[str] | tuple[str, ...] = (),
              device: str = "auto", dtype: str = "auto", force: bool = False, sample_latent: bool = True,
              tiled_decode: bool = True, log_run: bool = False, settings: WorkspaceSettings | None = None,
              progress: Any = None) -> dict[str, Any]:
    """Run a file or a folder. Unreadable files are reported and skipped; the rest still run.

    ``sample_latent`` / ``tiled_decode``: upstream LBM's seeded posterior sample and tiled VAE
    decode (the defaults), or the posterior's mean / a whole-image decode; the result (and the
    MLflow run) records which as ``latent`` and ``decode``.

    Everything that can be checked cheaply (scale, device, dtype, the inputs, where outputs
    go) is checked before the model loads."""
    from lbm_registry.errors import DataError
    from lbm_registry.lbm.device import check_device, check_dtype
    from lbm_registry.lbm.imaging import open_image

    check_scale(scale)
    if steps is not None:
        check_steps(steps)
    check_seed(seed)
    for spec in loras:
        parse_lora_spec(spec)
    check_dtype(dtype)
    check_device(device)
    settings = settings or WorkspaceSettings.resolve()
    source = Path(source)
    inputs = collect_images(source)
    destinations = plan_outputs(source, Path(output), inputs)
    readable, skipped = check_inputs(source, inputs)
    pipe = load(ref, base=base, loras=loras, scale=scale, device=device, dtype=dtype, force=force, settings=settings)
    written = []
    task = progress.add_task("infer", total=len(readable)) if progress is not None else None
    for path in readable:
        try:
            img = open_image(path)
        except DataError as exc:  # passed the header check, failed to decode (truncated...)
            skipped.append({"path": str(path), "reason": getattr(exc, "reason", str(exc))})
        else:
            out_img = pipe(img, steps=steps, seed=seed, sample_latent=sample_latent, tiled_decode=tiled_decode)
            dest = destinations[path]
            _save_image(out_img, dest)
            written.append(str(dest))
        if task is not None:
            progress.advance(task)
    if not written and skipped:  # each passed the header check and failed to decode: say why
        if not source.is_dir():
            raise DataError(f"{source}: {skipped[-1]['reason']}")
        first = skipped[0]
        raise DataError(f"no readable images in {source} ({len(skipped)} skipped; first: {first['path']}: "
                        f"{first['reason']})")
    from lbm_registry.lbm.pipeline import sampling_params

    result = {"outputs": written, "skipped": skipped, **(pipe.info or {}), "scale": scale,
              "steps": steps or pipe.model.config.inference.steps, "seed": seed,
              **sampling_params(sample_latent, tiled_decode)}
    if log_run:
        result["mlflow_run_id"] = _log_to_mlflow(result, inputs, settings)
    return result


def _save_image(img: Any, dest: Path) -> None:
    from lbm_registry.lbm.checkpoint import atomic_path

    fmt = OUTPUT_FORMATS.get(dest.suffix.lower(), "PNG")
    with atomic_path(dest) as tmp:
        img.save(tmp, format=fmt)


def _log_to_mlflow(result: dict[str, Any], inputs: list[Path], settings: WorkspaceSettings) -> str | None:
    """One MLflow run per infer call: the refs as params, inputs and outputs as artifacts."""
    from lbm_registry.registry.runs import MLflowTracker

    tracker = MLflowTracker(settings.effective_tracking_uri, "lbm-registry-infer", home=settings.home,
                            run_name=f"infer {result['base']}", warn=log.warning)
    tracker.log_params({"base": result["base"], "base_sha256": result["base_sha256"],
                        "loras": ",".join(f"{x['ref']}:{x['scale']:g}" for x in result["loras"]) or "-",
                        "steps": result["steps"], "seed": result["seed"], "scale": result["scale"],
                        "latent": result["latent"], "decode": result["decode"]})
    for p in inputs:
        if p.is_file():
            tracker.log_artifact(p, "inputs")
    for p in result["outputs"]:
        tracker.log_artifact(p, "outputs")
    tracker.end()
    return tracker.run_id
