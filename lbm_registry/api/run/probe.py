"""The probe picture every version gets at registration: ``source | base | this version | tuned``.

Run on one fixed image (a seeded synthetic picture, or the first validation pair's source when
training has one) so versions can be compared by eye on their MLflow page. Kept cheap: one
image, the configured number of steps, at most :data:`MAX_RESOLUTION` (the pipeline's aspect
buckets scaled down), the LoRA merged into the already loaded base (no second load), and models
the caller already has in memory are reused.

When: commands that hold the model in memory anyway (extract, train, base create) draw it in
process. Registrations that do not (import of any kind, resize, merge) take a mode
(:data:`PROBE_MODES`): ``wait`` draws it before registering, as part of the version;
``auto`` registers first and draws it in a detached child process
(:mod:`lbm_registry.api.run.probe_job`), which adds it to the version's run and page when done, so
the command returns as soon as the version is ready (the CLI's default; the Python API's is
``wait``); ``off`` draws none. ``$LBM_REG_PROBE`` (``0``/``off``, ``wait``, ``auto``) is the default
when a command is not told (``--probe``). A probe that fails never fails or changes a
registration: the version simply has no picture, and the reason is logged (the background
job's one line goes to ``<home>/logs/probe.log``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from lbm_registry.lbm.config import LBMConfig

log = logging.getLogger(__name__)

PROBE_ENV = "LBM_REG_PROBE"
PROBE_FILE = "probe.png"
MAX_RESOLUTION = 512
PROBE_SIZE = (160, 128)  # (width, height) of the synthetic probe
TITLE_PAD = 18  # px above the tiles for their titles


def first_pair(shards: list[Path], *, source_key: str, target_key: str,
               resolution: int) -> tuple[Image.Image, Image.Image] | None:
    """(source, target) of the first readable pair of ``shards`` (None when there is none)."""
    try:
        from lbm_registry.lbm.imaging import to_pil
        from lbm_registry.train.data import PairStream

        stream = PairStream(list(shards), shuffle=False, source_key=source_key, target_key=target_key,
                            resolution=resolution, on_bad_sample="skip")
        for _, _, src, tgt in stream.pairs(limit=1):
            return to_pil(src), to_pil(tgt)
    except Exception as exc:
        log.warning("probe: no validation pair (%s)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return None


def lora_probe(dest_dir: Path, lora_path: Path, base: Any, settings: Any, *, tuned: Any = None,
               draw: bool | None = None) -> dict[str, Path]:
    """The probe of a LoRA whose base is a ResolvedAsset or a ``{"sha256", "ref"}`` mapping
    (looked up in the registry; no probe when it is not there). ``draw``: see :func:`probe_artifacts`."""
    if not (enabled() if draw is None else draw):
        return {}
    try:
        if isinstance(base, dict):
            from lbm_registry.api.registry import resolve

            base = resolve(f"sha256:{base['sha256']}", settings, ("base", "model"))
    except Exception as exc:
        log.warning("probe image skipped: base not found (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        return {}
    return probe_artifacts(dest_dir, base_path=base.path, config=base.config, lora_path=lora_path,
                           tuned_path=getattr(tuned, "path", None), kind="lora", draw=True)


PROBE_MODES = ("auto", "wait", "off")
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """Should a command that probes in process draw the picture? (``$LBM_REG_PROBE`` not off.)"""
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in _OFF


def probe_mode(option: str | None = None, *, default: str = "wait") -> str:
    """auto | wait | off: the command's own ``--probe``, else ``$LBM_REG_PROBE``, else ``default``.

    ``$LBM_REG_PROBE`` may say ``0``/``off``/``false``/``no`` (off), ``wait``, ``auto`` or ``1``/``on``
    (the caller's default)."""
    if option is not None:
        mode = str(option).strip().lower()
        if mode not in PROBE_MODES:
            from lbm_registry.errors import LBMError

            raise LBMError(f"unknown --probe {option!r}: use {', '.join(PROBE_MODES)}")
        return mode
    env = os.environ.get(PROBE_ENV, "").strip().lower()
    if env in _OFF:
        return "off"
    if env in ("wait", "auto"):
        return env
    return default


def start_background(settings: Any, ref: str, sha256: str) -> Path:
    """Draw the probe of the registered version ``ref`` in a detached child process (see
    :mod:`lbm_registry.api.run.probe_job`); returns the log it reports to. The child gets this
    workspace's settings through its environment and never touches the caller's terminal.
    Never raises: a child that cannot start is one line in the log."""
    import subprocess
    import sys
    import time

    log_path = Path(settings.home) / "logs" / "probe.log"
    env = {**os.environ, PROBE_ENV: "wait", "LBM_REG_HOME": str(settings.home)}
    for key, value in (("LBM_REG_CATALOG_URL", settings.catalog_url), ("MLFLOW_TRACKING_URI", settings.tracking_uri)):
        if value:
            env[key] = str(value)
        else:
            env.pop(key, None)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "lbm_registry.api.run.probe_job", ref, sha256],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True,
                             close_fds=True)
    except OSError as exc:
        with contextlib.suppress(OSError), open(log_path, "a") as out:
            out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} probe of {ref}: not started: {exc}\n")
    return log_path


def probe_source(image: Image.Image | None = None) -> Image.Image:
    from lbm_registry.api.run.compare import synthetic_source

    return image.convert("RGB") if image is not None else synthetic_source(size=PROBE_SIZE, seed=0)


def _probe_config(cfg: LBMConfig) -> LBMConfig:
    """The config with the inference resolution capped (the probe is for eyes, not for numbers)."""
    inf = cfg.inference
    if inf.base_resolution <= MAX_RESOLUTION:
        return cfg
    return cfg.model_copy(update={"inference": inf.model_copy(update={"base_resolution": MAX_RESOLUTION})})


def strip(columns: list[tuple[str, Image.Image]]) -> Image.Image:
    """One row of equal tiles, each titled above it: every tile takes the first one's size (the
    pipeline's outputs already have the source's), so no tile sits higher or leaves a gap."""
    from PIL import Image, ImageDraw

    w, h = columns[0][1].size
    pad = TITLE_PAD
    out = Image.new("RGB", (w * len(columns), h + pad), "white")
    draw = ImageDraw.Draw(out)
    for i, (title, img) in enumerate(columns):
        tile = img.convert("RGB")
        if tile.size != (w, h):
            tile = tile.resize((w, h))
        out.paste(tile, (i * w, pad))
        draw.text((i * w + 4, 3), title, fill="black")
    return out


def save_strip(columns: list[tuple[str, Image.Image]], path: Path) -> Path:
    """:func:`strip` saved as a PNG that names its tiles (text chunk
    :data:`~lbm_registry.registry.pages.PROBE_TILES_KEY`, ``"source | base | this version | tuned"``):
    the version page captions the picture with it."""
    from PIL.PngImagePlugin import PngInfo

    from lbm_registry.registry.pages import PROBE_TILES_KEY

    info = PngInfo()
    info.add_text(PROBE_TILES_KEY, " | ".join(title for title, _ in columns))
    strip(columns).save(path, format="PNG", pnginfo=info)
    return path


def probe_artifacts(dest_dir: Path, *, base_path: Path, config: LBMConfig | dict[str, Any] | None,
                    lora_path: Path | None = None, model_path: Path | None = None, tuned_path: Path | None = None,
                    kind: str = "lora", source: Image.Image | None = None, base_model: Any = None,
                    label: str = "this version", reference: Image.Image | None = None,
                    draw: bool | None = None) -> dict[str, Path]:
    """``{"probe.png": path}`` (or ``{}`` when disabled or impossible), written into ``dest_dir``.

    kind ``lora``: source | base | base + LoRA | tuned (when ``tuned_path``);
    kind ``model``: source | base (when known) | the model; kind ``base``: source | the base.
    ``base_model``: an LBMModel of ``base_path`` already in memory (used instead of loading it;
    its weights are restored afterwards). ``reference``: the ground truth (a validation pair's
    target) shown last, as "target", when there is no tuned model. ``draw``: False for none,
    True to draw whatever ``$LBM_REG_PROBE`` says (the caller decided), None: as it says."""
    if not (enabled() if draw is None else draw):
        return {}
    try:
        path = draw_probe(dest_dir, base_path=base_path, config=config, lora_path=lora_path, model_path=model_path,
                          tuned_path=tuned_path, kind=kind, source=source, base_model=base_model, label=label,
                          reference=reference)
    except Exception as exc:  # a picture is a nicety: never lose a registration for it
        log.warning("probe image skipped: %s", one_line(exc))
        return {}
    return {PROBE_FILE: path}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def draw_probe(dest_dir: Path, *, base_path: Path, config: Any, lora_path: Path | None = None,
               model_path: Path | None = None, tuned_path: Path | None = None, kind: str = "lora",
               source: Image.Image | None = None, base_model: Any = None, label: str = "this version",
               reference: Image.Image | None = None) -> Path:
    """Draw the strip into ``dest_dir/probe.png`` (see :func:`probe_artifacts`); raises on failure."""
    columns = _probe(base_path=base_path, config=config, lora_path=lora_path, model_path=model_path,
                     tuned_path=tuned_path, kind=kind, source=source, base_model=base_model, label=label)
    if reference is not None and tuned_path is None:
        columns.append(("target", reference.convert("RGB")))
    dest_dir.mkdir(parents=True, exist_ok=True)
    return save_strip(columns, dest_dir / PROBE_FILE)


def _probe(*, base_path: Path, config: Any, lora_path: Path | None, model_path: Path | None,
           tuned_path: Path | None, kind: str, source: Image.Image | None, base_model: Any,
           label: str) -> list[tuple[str, Image.Image]]:
    """The titled tiles: source, then each model's output on it."""
    import torch

    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.config import config_from_dict
    from lbm_registry.lbm.loading import config_from_checkpoint, load_lbm
    from lbm_registry.lbm.model import DENOISER_PREFIX
    from lbm_registry.lbm.pipeline import LBMPipeline

    if isinstance(config, dict):
        config = config_from_dict(config, "probe")
    if config is None:
        config = config_from_checkpoint(CheckpointReader(base_path))
    if config is None:
        raise ValueError("no LBM config")
    cfg = _probe_config(config)
    src = probe_source(source)
    cpu = torch.device("cpu")

    def run(model: Any) -> Image.Image:
        old = model.config
        model.config = cfg
        try:
            return LBMPipeline(model=model, device=next(model.parameters()).device,
                               dtype=next(model.parameters()).dtype)(src, seed=0)
        finally:
            model.config = old

    columns: list[tuple[str, Image.Image]] = [("source", src)]
    model = base_model if base_model is not None else load_lbm(base_path, config, device=cpu, dtype=torch.float32)
    alone = kind in ("base", "model") and (model_path is None or Path(model_path) == Path(base_path))
    columns.append((label if alone else "base", run(model)))
    if kind == "lora" and lora_path is not None:
        from lbm_registry.lora.apply import MergedLoRAs
        from lbm_registry.lora.format import read_lora

        reader = CheckpointReader(base_path)
        merged = MergedLoRAs(model.denoiser, [(read_lora(lora_path), 1.0)],
                             originals=lambda name: reader.get(f"{DENOISER_PREFIX}{name}.weight"))
        try:
            columns.append((label, run(model)))
        finally:
            merged.restore()
    elif kind == "model" and not alone and model_path is not None:
        columns.append((label, run(load_lbm(model_path, config, device=cpu, dtype=torch.float32))))
    if tuned_path is not None:
        columns.append(("tuned", run(load_lbm(tuned_path, config, device=cpu, dtype=torch.float32))))
    return columns


def after_registration(asset: Any, settings: Any, probe_mode: str) -> Any:
    """Start the background probe of a just-registered version when its mode is ``auto``; returns
    ``asset``. The registering callers (api/assets, api/train) call it: the registry floor below
    draws no pictures."""
    if probe_mode == "auto":
        start_background(settings, asset.ref, asset.sha256)
    return asset
