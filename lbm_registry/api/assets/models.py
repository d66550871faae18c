"""Importing a base or full model file into the registry (``lbm-reg import --kind base|model``).

Here, not in api/registry, because it may draw the version's probe picture (api/run/probe) before
registering: the registry floor draws no pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lbm_registry.api.registry import (
    ResolvedAsset,
    _settings,
    check_name_free,
    register_asset,
    resolve,
    validate_name,
)
from lbm_registry.api.run.probe import after_registration
from lbm_registry.errors import RegistryError
from lbm_registry.settings import WorkspaceSettings


def import_model(path: str | Path, *, name: str, kind: str, settings: WorkspaceSettings | None = None,
                 config: str | Path | None = None, allow_duplicate: bool = False,
                 probe: str | None = None, base: str | None = None) -> ResolvedAsset:
    """Register an existing full LBM checkpoint as a ``base`` or ``model``.

    ``base`` (a model only): the registered base it was fine-tuned from, recorded as its lineage
    (its page links it, the base's page lists the model) and drawn in its probe picture.

    The file must match the architecture of its config (``config`` or the ``lbm_config``
    metadata that ``save_lbm`` embeds) key for key and shape for shape, with finite weights.
    Pickle checkpoints (the original scripts' ``exact_base.ckpt``, Lightning ``.ckpt``; read
    with ``weights_only`` and memory-mapped) are converted to safetensors first (blobs have no
    suffix and must be safetensors to be readable); the pickle's own sha256 is recorded as
    ``source_sha256``. ``config`` may be upstream LBM's model config (translated, ``notes``).

    ``probe`` (see api/probe.py): ``wait`` draws the probe picture before registering (the
    default here, else ``$LBM_REG_PROBE``), ``auto`` draws it in a background process once the
    version is ready (the CLI's default), ``off`` draws none.
    """
    import time

    from lbm_registry.api.run.probe import probe_mode
    from lbm_registry.errors import ConfigError

    started = time.time()
    mode = probe_mode(probe)

    if kind not in ("base", "model"):
        raise RegistryError(f"import --kind must be base, model or lora, not {kind!r}")
    validate_name(name)
    path = Path(path)
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.header import (
        CKPT_SUFFIXES,
        CONFIG_METADATA_KEY,
        SafetensorsHeader,
        config_from_metadata,
        verify_shapes,
    )

    s = _settings(settings)
    check_name_free(name, kind, s)   # before reading gigabytes
    if base is not None and kind != "model":
        raise RegistryError("--base is for model and lora imports (the base a model was fine-tuned from)")
    base_asset = resolve(base, s, ("base", "model")) if base is not None else None
    lineage = {"base": base_asset} if base_asset is not None else None
    cfg = load_config(config) if config is not None else None
    if path.suffix in CKPT_SUFFIXES:   # a pickle: torch reads it (and it is converted below)
        from lbm_registry.lbm.checkpoint import CheckpointReader, check_finite

        reader: Any = CheckpointReader(path)
    else:   # safetensors: header and numpy only, no torch and no model
        reader = SafetensorsHeader(path)
    cfg = cfg or config_from_metadata(reader.metadata, path)
    if cfg is None:
        msg = f"{path} carries no '{CONFIG_METADATA_KEY}' metadata"
        raise ConfigError(f"{msg}: pass config=CFG", cli=f"{msg}: pass --config CFG")
    verify_shapes(reader.shapes(), cfg, path)
    if isinstance(reader, SafetensorsHeader):
        reader.check_finite()
        dtypes = reader.dtype_counts()
    else:
        dtypes: dict[str, int] = {}
        for key, tensor in reader.items():
            check_finite(key, tensor, path)
            dname = str(tensor.dtype).replace("torch.", "")
            dtypes[dname] = dtypes.get(dname, 0) + 1
    facts = {"source": str(path.absolute()), "config_name": cfg.name, "tensors": len(reader),
             "dtypes": dtypes}
    notes = list(cfg.notes) if config is not None else list(getattr(reader, "notes", []))
    if notes:   # an upstream LBM config, translated (the CLI prints these)
        facts["notes"] = notes
    if path.suffix in CKPT_SUFFIXES:
        import json
        import shutil
        import tempfile

        from lbm_registry.registry.workspace import Workspace

        with Workspace.open(s) as ws:
            tmpdir = Path(tempfile.mkdtemp(prefix="import-", dir=ws.staging_dir))
        from lbm_registry.lbm.checkpoint import save_safetensors

        try:
            converted = save_safetensors(reader.state_dict(), tmpdir / f"{path.stem}.safetensors",
                                         {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), "format": "pt"})
            reader.close()
            facts["converted_from"] = path.name
            from lbm_registry.registry.blobs import sha256_file

            facts["source_sha256"] = sha256_file(path)
            return after_registration(register_asset(
                converted, name=name, kind=kind, settings=s, config=cfg.to_dict(), facts=facts, lineage=lineage,
                refuse_duplicate=not allow_duplicate, link=True, work_started=started,
                artifacts=_import_probe(converted, cfg, kind, tmpdir / "probe", mode, base_asset)), s, mode)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    import shutil
    import tempfile

    probe_dir = Path(tempfile.mkdtemp(prefix="lbm-probe-"))
    try:
        return after_registration(register_asset(
            path, name=name, kind=kind, settings=s, config=cfg.to_dict(), facts=facts, lineage=lineage,
            refuse_duplicate=not allow_duplicate, work_started=started,
            artifacts=_import_probe(path, cfg, kind, probe_dir, mode, base_asset)), s, mode)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def _import_probe(path: Path, cfg: Any, kind: str, folder: Path, mode: str,
                  base: ResolvedAsset | None = None) -> dict[str, Path]:
    """The probe picture of an imported base/model when it is drawn before registering (``wait``):
    ``source | this base``, or ``source | base | this model`` when the model names its base."""
    if mode != "wait":  # no torch import at all
        return {}
    from lbm_registry.api.run.probe import probe_artifacts

    return probe_artifacts(folder, base_path=base.path if base is not None else path, config=cfg, kind=kind,
                           model_path=path, label="this base" if kind == "base" else "this model", draw=True)
