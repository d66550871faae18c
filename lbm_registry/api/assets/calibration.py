"""Calibration inputs and statistics for ``extract --calibrate`` and ``validate --images``.

Joins the data readers (webdataset shards from :mod:`lbm_registry.train.data`, image folders)
with the statistics math (:mod:`lbm_registry.lora.calibrate`) and the registry (a LoRA's
statistics are an artifact of its version).

Why an artifact of the LoRA version and not a new asset kind: statistics are a by-product of
one extraction, only valid for the model that produced them (the tuned one), and no user runs
or serves them. Attached to the LoRA version (``calibration/stats.safetensors``, its sha256 and
the hash of the calibration inputs in the version's facts and in the LoRA file's own metadata),
they travel with it to a team's tracking server, ``lbm-reg pull``/``rm``/``doctor`` need no new
rules, and ``--calibration-stats relight@3`` reads them back (sha-verified) for a second
extraction at another rank. An unregistered run writes them with ``--stats-output FILE``.

Image identity: the sha256 of the image's bytes (the file, or the shard entry). The list of
calibration images' hashes is recorded, so ``validate --images`` can leave them out: the gain is
never measured on the data that produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import DataError, LoRAError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lbm.config import LBMConfig
    from lbm_registry.settings import WorkspaceSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SHARD_SUFFIXES = {".tar", ".tgz"}
DEFAULT_SAMPLES = 32
STATS_ARTIFACT = "calibration/stats.safetensors"
DEFAULT_MEMORY = 3 * 10**9   # lora.calibrate.DEFAULT_MEMORY, named without importing torch
DEFAULT_DAMPING = 0.01       # lora.whiten.DEFAULT_DAMPING
SOURCE_KEY = "source.jpg"


@dataclass
class ImageInput:
    """One calibration / held-out image: where it came from, its bytes' sha256, and a reader."""

    label: str
    sha256: str
    read: Callable[[], bytes] = field(repr=False)


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _shard_images(shards: list[Path], source_key: str) -> list[ImageInput]:
    from lbm_registry.train.data import CorruptShard, index_shard

    out = []
    for shard in shards:
        try:
            samples = index_shard(shard)
        except CorruptShard as exc:
            raise DataError(f"{shard}: corrupt shard ({exc.reason})") from None
        for s in samples:
            if source_key not in s.members:
                have = ", ".join(sorted(s.members)) or "nothing"
                raise DataError(f"{shard.name}: sample {s.key!r} lacks {source_key!r} (has: {have})")
            out.append(ImageInput(f"{shard.name}:{s.key}", "", (lambda s=s: s.read(source_key))))
    return out


def list_inputs(sources: str | Sequence[str], *, what: str = "--calibrate",
                source_key: str = SOURCE_KEY) -> list[ImageInput]:
    """Every image named by ``sources`` (image files, folders of images or shards, ``.tar``
    shards, brace patterns such as ``shards/train-{000..003}.tar``), in order, hashes not yet
    computed. A missing path is a one-line :class:`DataError` naming ``what``."""
    from lbm_registry.train.data import expand_shards

    items = [sources] if isinstance(sources, str | Path) else list(sources)
    if not items:
        raise DataError(f"{what}: no images given")
    out: list[ImageInput] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if "{" in str(item) and not p.exists():
            try:
                out += _shard_images(expand_shards([str(item)]), source_key)
            except DataError as exc:
                raise DataError(f"{what}: {exc}") from None
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            shards = [f for f in files if f.suffix.lower() in SHARD_SUFFIXES]
            out += _shard_images(shards, source_key)
            out += [ImageInput(str(f), "", _file_reader(f)) for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file():
            if p.suffix.lower() in SHARD_SUFFIXES:
                out += _shard_images([p], source_key)
            else:
                out.append(ImageInput(str(p), "", _file_reader(p)))
        else:
            raise DataError(f"{what}: not found: {item}")
    if not out:
        raise DataError(f"{what}: no images in {', '.join(map(str, items))} (image files or webdataset .tar shards)")
    return out


def check_samples(samples: int | None, what: str = "--calibration-samples") -> None:
    if samples is not None and samples < 1:
        raise LoRAError(f"{what} must be a positive integer, got {samples}")


def take(inputs: list[ImageInput], n: int | None, exclude: set[str] | frozenset[str] = frozenset()) -> tuple[list[tuple[ImageInput, bytes]], int]:
    """The first ``n`` distinct images (by content) not in ``exclude``, with their bytes, and how
    many were left out because ``exclude`` holds them."""
    chosen: list[tuple[ImageInput, bytes]] = []
    seen: set[str] = set()
    excluded = 0
    for item in inputs:
        if n is not None and len(chosen) >= n:
            break
        data = item.read()
        sha = hashlib.sha256(data).hexdigest()
        if sha in exclude:
            excluded += 1
            continue
        if sha in seen:
            continue
        seen.add(sha)
        item.sha256 = sha
        chosen.append((item, data))
    return chosen, excluded


def image_tensor(data: bytes, label: str, config: LBMConfig, resolution: int | None) -> torch.Tensor:
    """Decode and bucket an image as inference does (``resolution`` replaces the config's
    ``inference.base_resolution``)."""
    from lbm_registry.lbm.imaging import nearest_bucket, open_image, to_tensor

    try:
        img = open_image(data)
    except DataError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise DataError(f"unreadable image {label}: {reason}") from None
    base = resolution or config.inference.base_resolution
    h, w = nearest_bucket(img.height, img.width, base, config.pixel_multiple)
    return to_tensor(img, (h, w))


def inputs_sha256(images: Sequence[str], *, resolution: int | None, steps: int, seed: int) -> str:
    """The hash of the calibration inputs: the images' hashes in order, and how they were run."""
    blob = json.dumps({"images": list(images), "resolution": resolution, "steps": steps, "seed": seed},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def check_resolution(resolution: int | None, config: LBMConfig | None, what: str) -> None:
    if resolution is None:
        return
    multiple = config.pixel_multiple if config is not None else 8
    if resolution < multiple or resolution % multiple:
        raise LoRAError(f"{what} must be a positive multiple of {multiple}, got {resolution}")


# -- computing statistics ---------------------------------------------------------------------
@dataclass
class StatsRun:
    """Statistics computed (or read back) for one extraction, with their provenance."""

    path: Path
    info: dict[str, Any]
    seconds: float = 0.0


def compute_stats(model_path: Path, model_sha256: str | Callable[[], str], config: LBMConfig,
                  inputs: list[ImageInput], dest: Path, *,
                  samples: int | None, resolution: int | None, memory: int, role: str = "tuned",
                  device: str = "auto", progress: Callable[[str, int, int], None] | None = None) -> StatsRun:
    """Run ``model_path`` on up to ``samples`` calibration images and write their statistics to ``dest``.

    ``model_sha256`` may be a function giving the model's hash, asked for only when the statistics
    are saved: a plain file's hash then runs beside the forward passes instead of before them."""
    import time

    import torch

    from lbm_registry.lbm.device import release_freed_memory
    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lbm.model import pick_device, pick_dtype
    from lbm_registry.lora.calibrate import collect_stats

    t0 = time.perf_counter()
    chosen, _ = take(inputs, samples or DEFAULT_SAMPLES)
    tensors = [image_tensor(data, item.label, config, resolution) for item, data in chosen]
    dev = pick_device(device)
    dtype = pick_dtype("auto", dev)
    # fp32 on a CPU: weights stay as stored (a bf16 file stays 4.85 GB of mapped pages, not
    # 9.7 GB of copies) and each module computes with fp32 copies of its own: the same numbers
    # (widening is exact), a third of the peak memory (see lbm.upcast).
    keep_stored = dev.type == "cpu" and dtype == torch.float32
    model = load_lbm(model_path, config, device=dev, dtype=None if keep_stored else dtype)
    steps = config.inference.steps
    shas = [item.sha256 for item, _ in chosen]
    info = {
        "model": role, "model_sha256": None, "images": shas, "samples": len(shas),
        "inputs_sha256": inputs_sha256(shas, resolution=resolution, steps=steps, seed=0),
        "resolution": resolution or config.inference.base_resolution, "steps": steps, "seed": 0,
        "memory_bytes": memory, "config": config.name,
    }

    def tick(i: int) -> None:
        if progress:
            progress("calibrate", i, len(tensors))

    from contextlib import nullcontext

    from lbm_registry.lbm.upcast import compute_in

    with compute_in(model, dtype) if keep_stored else nullcontext():
        stats = collect_stats(model, (t.to(dev, dtype) for t in tensors), steps=steps, memory=memory, info=info,
                              progress=tick, dtype=dtype)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    release_freed_memory()   # the model's freed layers go back to the OS before the extraction streams
    info["model_sha256"] = stats.info["model_sha256"] = model_sha256() if callable(model_sha256) else model_sha256
    path = stats.save(dest)
    from lbm_registry.registry.blobs import sha256_file

    info = {**info, "stats_sha256": sha256_file(path), "modes": stats.modes()}
    return StatsRun(path, info, time.perf_counter() - t0)


def reuse_stats(ref: str, tuned: ResolvedAsset, scratch: Path, settings: WorkspaceSettings) -> StatsRun:
    """``--calibration-stats REF|FILE``: a statistics file, or the statistics a registered LoRA
    was extracted with (its artifact, sha-verified). Statistics of another tuned model are refused:
    they describe that model's activations."""
    from lbm_registry.lora.calibrate import StatsFile
    from lbm_registry.registry.blobs import sha256_file

    p = Path(ref).expanduser()
    if p.is_file():
        path, label = p, str(p)
    else:
        from lbm_registry.api.registry import fetch_artifact, resolve

        lora = resolve(ref, settings, ("lora",))
        recorded = (lora.facts or {}).get("calibration") or {}
        if not recorded.get("stats_sha256"):
            raise LoRAError(f"{lora.label} was not extracted with calibration statistics")
        path = fetch_artifact(lora, STATS_ARTIFACT, scratch, settings)
        if sha256_file(path) != recorded["stats_sha256"]:
            raise LoRAError(f"the calibration statistics of {lora.label} do not match their recorded sha256")
        label = lora.label
    sf = StatsFile(path)
    made_from = sf.info.get("model_sha256")
    if made_from and made_from != tuned.sha256:
        raise LoRAError(f"{label}: statistics of model sha256:{str(made_from)[:12]}, not of the tuned model "
                        f"{tuned.label} (sha256:{tuned.sha256[:12]})")
    info = {k: v for k, v in sf.info.items()}
    info.update(stats_sha256=sha256_file(path), modes=sf.modes(), reused_from=label)
    return StatsRun(Path(path), info)


# -- options of `extract` ---------------------------------------------------------------------
@dataclass
class CalibrationPlan:
    """``extract``'s calibration options, checked without torch (see :meth:`from_options`)."""

    sources: list[str] | None
    stats_ref: str | None
    samples: int | None
    resolution: int | None
    memory: int
    damping: float
    stats_output: Path | None
    model: str = "tuned"

    @classmethod
    def from_options(cls, calibrate: str | Sequence[str] | None, *, samples: int | None, stats: str | None,
                     resolution: int | None, memory: str | int | None, damping: float | None,
                     stats_output: str | Path | None, model: str = "tuned") -> CalibrationPlan | None:
        """None without calibration (then every other calibration option is refused)."""
        import math

        from lbm_registry.fileio import check_output_file
        from lbm_registry.lora.ranks import parse_size

        sources = None if calibrate is None else ([calibrate] if isinstance(calibrate, str | Path)
                                                  else [str(c) for c in calibrate])
        if sources is not None and not sources:
            sources = None
        if sources is not None and stats is not None:
            raise LoRAError("--calibrate and --calibration-stats are exclusive: compute statistics or reuse them")
        if sources is None and stats is None:
            given = [name for name, v in (("--calibration-samples", samples), ("--calibration-resolution", resolution),
                                          ("--calibration-memory", memory), ("--damping", damping),
                                          ("--stats-output", stats_output)) if v is not None]
            if given:
                raise LoRAError(f"{given[0]} needs --calibrate or --calibration-stats")
            return None
        if sources is None:
            extra = [name for name, v in (("--calibration-samples", samples), ("--calibration-resolution", resolution),
                                          ("--calibration-memory", memory), ("--stats-output", stats_output))
                     if v is not None]
            if extra:
                raise LoRAError(f"{extra[0]} applies to --calibrate (reused statistics are used as they are)")
        check_samples(samples)
        check_resolution(resolution, None, "--calibration-resolution")
        if damping is not None and (not math.isfinite(damping) or damping <= 0):
            raise LoRAError(f"--damping must be a positive number, got {damping}")
        if model not in ("tuned", "base"):
            raise LoRAError(f"calibration model must be 'tuned' or 'base', got {model!r}")
        mem = parse_size(memory) if memory is not None else DEFAULT_MEMORY
        check_output_file(stats_output, LoRAError, "--stats-output")
        plan = cls(sources, stats, samples, resolution, mem, damping if damping is not None else DEFAULT_DAMPING,
                   Path(stats_output) if stats_output is not None else None, model)
        if sources is not None:
            list_inputs(sources)   # a missing path is refused before any model loads
        return plan

    def prepare(self, pair: Any, scratch: Path, settings: WorkspaceSettings,
                progress: Callable[[str, int, int], None] | None = None) -> StatsRun:
        """Compute the statistics (running the tuned model) or read them back."""
        if self.sources is None:
            assert self.stats_ref is not None
            pair.settle(settings)   # the statistics must be of this tuned model: its hash decides
            return reuse_stats(self.stats_ref, pair.tuned, scratch, settings)
        if pair.config is None:
            raise LoRAError("--calibrate needs the model's LBM config (a registered base, or a file with "
                            "lbm_config metadata) to run it")
        check_resolution(self.resolution, pair.config, "--calibration-resolution")
        asset = pair.tuned if self.model == "tuned" else pair.base
        dest = self.stats_output or scratch / "calibration-stats.safetensors"
        def model_sha() -> str:
            pair.settle(settings)
            return str(asset.sha256)

        return compute_stats(asset.path, model_sha, pair.config, list_inputs(self.sources), dest,
                             samples=self.samples, resolution=self.resolution, memory=self.memory,
                             role=self.model, progress=progress)
