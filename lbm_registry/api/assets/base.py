"""Create the exact LBM base checkpoint (optionally registering it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:
    from lbm_registry.lbm.config import LBMConfig


STORAGE_DTYPES = ("fp32", "bf16", "fp16")
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _preflight(config: str | Path, *, sdxl_unet: str | Path | None, vae: str | Path | None, dtype: str,
               output: str | Path | None, register: str | None, settings: WorkspaceSettings | None) -> LBMConfig:
    """Every check that needs no torch and no model: options, the config, the name, and the
    key/shape tables of the SDXL UNet and VAE files (their headers), so a wrong input is refused
    in well under a second instead of after the model is built."""
    from lbm_registry.errors import CheckpointError, ConfigError
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.header import CKPT_SUFFIXES, SafetensorsHeader, check_architecture
    from lbm_registry.lbm.unet_shapes import denoiser_shapes, vae_shapes

    if _DTYPE_ALIASES.get(dtype, dtype) not in STORAGE_DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}: use {', '.join(STORAGE_DTYPES[:-1])} or {STORAGE_DTYPES[-1]}")
    if output is None and register is None:
        raise ConfigError("give --register NAME or --output FILE")
    from lbm_registry.fileio import check_output_file

    check_output_file(output, ConfigError)
    cfg = load_config(config)
    if register:
        from lbm_registry.api.registry import check_name_free

        check_name_free(register, "base", settings)
    if sdxl_unet is not None:
        from lbm_registry.lbm.exact_base import check_sdxl_shapes, locate_sdxl_unet, strip_denoiser_prefix

        unet_file = locate_sdxl_unet(sdxl_unet)
        target = denoiser_shapes(cfg.denoiser)
        if unet_file.suffix not in CKPT_SUFFIXES:
            shapes = strip_denoiser_prefix(SafetensorsHeader(unet_file).shapes())
            if target is not None:
                check_sdxl_shapes(shapes, target, str(sdxl_unet))  # type: ignore[arg-type]
    if vae is not None:
        if not Path(vae).is_file():
            raise CheckpointError(f"--vae: file not found: {vae}" if not Path(vae).exists()
                                  else f"--vae {vae} is a folder, expected a weight file")
        want = vae_shapes(cfg.vae)
        if Path(vae).suffix not in CKPT_SUFFIXES and want is not None:
            have = SafetensorsHeader(vae).shapes()
            for prefix in ("vae.vae_model.", "vae."):
                if have and all(k.startswith(prefix) for k in have):
                    have = {k[len(prefix):]: v for k, v in have.items()}
                    break
            check_architecture(have, want, vae, "AutoencoderKL VAE")
    return cfg


def create_base(config: str | Path, *, sdxl_unet: str | Path | None = None, vae: str | Path | None = None,
                seed: int = 0, dtype: str = "fp32", output: str | Path | None = None,
                register: str | None = None, settings: WorkspaceSettings | None = None) -> dict[str, Any]:
    """Build the exact base and write it to ``output`` and/or register it as ``register``.

    Without ``sdxl_unet`` the denoiser is a seeded random init (tests, demo). Without ``vae`` the
    VAE is a seeded random init too. ``config`` is ours or upstream LBM's model config (translated;
    ``notes`` in the result say how). Returns counts of copied/sliced/padded/dropped tensors.
    """
    import tempfile
    import time

    from lbm_registry.ranges import check_seed

    check_seed(seed)
    started = time.time()
    cfg = _preflight(config, sdxl_unet=sdxl_unet, vae=vae, dtype=dtype, output=output, register=register,
                     settings=settings)

    import torch

    from lbm_registry.lbm.checkpoint import CheckpointReader, check_finite
    from lbm_registry.lbm.exact_base import BaseReport, adapt_sdxl_unet, read_sdxl_unet
    from lbm_registry.lbm.loading import save_lbm
    from lbm_registry.lbm.model import DENOISER_PREFIX, build_model, pick_dtype

    model = build_model(cfg, seed=seed)
    report = BaseReport()
    target = {k: tuple(v.shape) for k, v in model.denoiser.state_dict().items()}
    if sdxl_unet is not None:
        sdxl = read_sdxl_unet(sdxl_unet)
        for k, t in sdxl.items():
            check_finite(k, t, sdxl_unet)
        adapted, report = adapt_sdxl_unet(sdxl, target, str(sdxl_unet))
        model.denoiser.load_state_dict(adapted, strict=True)
    else:
        report.initialised.extend(DENOISER_PREFIX + k for k in target)
    if vae is not None:
        from lbm_registry.lbm.checkpoint import check_architecture

        reader = CheckpointReader(vae)
        sd = reader.state_dict()
        for prefix in ("vae.vae_model.", "vae."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                break
        want = {k: tuple(v.shape) for k, v in model.vae.vae_model.state_dict().items()}
        check_architecture({k: tuple(v.shape) for k, v in sd.items()}, want, vae, "AutoencoderKL VAE")
        model.vae.vae_model.load_state_dict(sd, strict=True)
        report.copied.extend("vae.vae_model." + k for k in sd)
    else:
        report.initialised.extend("vae.vae_model." + k for k in model.vae.vae_model.state_dict())

    store_dtype = pick_dtype(_DTYPE_ALIASES.get(dtype, dtype), torch.device("cpu"))
    meta = {"lbm_registry_base": "exact", "seed": str(seed),
            "sdxl_unet": str(sdxl_unet or ""), "base_report": str(report.summary())}
    if output is not None:
        out_path = save_lbm(model, output, dtype=store_dtype, metadata=meta)
    else:
        tmpdir = Path(tempfile.mkdtemp(prefix="lbm-base-"))
        out_path = save_lbm(model, tmpdir / f"{register}.safetensors", dtype=store_dtype, metadata=meta)

    examples = {
        "copied": [k for k in report.copied[:3]],
        "sliced": [f"{k} {a}->{b}" for k, a, b in report.sliced],
        "padded": [f"{k} {a}->{b}" for k, a, b in report.padded],
        "dropped": list(report.dropped),
        "initialised": report.initialised[:3],
    }
    result: dict[str, Any] = {"path": str(out_path), "size": out_path.stat().st_size,
                              "counts": report.summary(), "examples": examples, "config": cfg.name,
                              "notes": list(cfg.notes)}
    if register:
        from lbm_registry.api.registry import register_asset
        from lbm_registry.api.run.probe import probe_artifacts

        with tempfile.TemporaryDirectory(prefix="lbm-probe-") as probe_dir:
            probe = probe_artifacts(Path(probe_dir), base_path=out_path, config=cfg, kind="base", base_model=model,
                                    label="this base")
            asset = register_asset(out_path, name=register, kind="base", link=output is None,
                                   settings=settings or WorkspaceSettings.resolve(),
                                   config=cfg.to_dict(), facts={"base_report": report.summary(), "seed": seed,
                                                                "sdxl_unet": str(sdxl_unet or "")}, artifacts=probe,
                                   work_started=started)
        result.update(ref=f"{asset.name}@{asset.version}", sha256=asset.sha256)
        if output is None:
            out_path.unlink(missing_ok=True)
            out_path.parent.rmdir()
            result["path"] = str(asset.path)
    else:
        from lbm_registry.registry.blobs import sha256_file

        result["sha256"] = sha256_file(out_path)
    return result
