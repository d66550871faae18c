"""Export a native LoRA for other tools: PEFT / diffusers, and kohya.

PEFT / diffusers (a folder, like ``PeftModel.save_pretrained``):
- ``adapter_model.safetensors`` with ``<module>.lora_A.weight`` (= lora_down, ``(r, in[, k, k])``)
  and ``<module>.lora_B.weight`` (= lora_up, ``(out, r[, 1, 1])``): PEFT's Conv2d LoRA uses the
  same layout (``lora_A`` a k x k conv to r channels, ``lora_B`` a 1x1 conv), so no reshaping.
- ``adapter_config.json``: a ``LoraConfig`` with the most common rank/alpha as ``r`` /
  ``lora_alpha``, and per-module ``rank_pattern`` / ``alpha_pattern`` for the rest (PEFT scales
  by ``lora_alpha / r`` like we do). Pattern keys are ``^`` + the escaped module name, so a
  name never matches a longer one (PEFT matches patterns as regexes on the module path).
- the same config in the safetensors metadata under ``lora_adapter_metadata``, which
  diffusers' ``load_lora_adapter(path, prefix=None)`` reads to build the ``LoraConfig``.

kohya: ``lora_unet_<module path with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``, one safetensors file with the ``ss_*`` metadata.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lora.format import LoRAFile

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
META_KEY = "lbm_registry"
#: Key of our metadata entry naming the file an export was made from.
EXPORTED_FROM = "exported_from"
KOHYA_PREFIX = "lora_unet_"
FORMATS = ("peft", "kohya")


def peft_state_dict(lora: LoRAFile) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
        out[f"{name}.lora_A.weight"] = layer.down.contiguous()
        out[f"{name}.lora_B.weight"] = layer.up.contiguous()
    return out


def _pattern(module: str) -> str:
    return "^" + re.escape(module)


def peft_config(lora: LoRAFile) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments reproducing every layer's rank and alpha."""
    ranks = {m: layer.rank for m, layer in lora.layers.items()}
    alphas = {m: float(layer.alpha) for m, layer in lora.layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_pattern(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern(m): (int(v) if v.is_integer() else v) for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(lora.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def kohya_state_dict(lora: LoRAFile) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
        key = KOHYA_PREFIX + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.down.contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out


def write_peft(lora: LoRAFile, out_dir: str | Path, source: dict[str, str] | None = None) -> list[Path]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir`` (each atomically).
    ``source``: see :func:`export_lora`."""
    from lbm_registry.lbm.checkpoint import atomic_path, save_safetensors

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LoRAError(f"{out_dir} exists and is not a folder (PEFT exports are a folder)")
    cfg = peft_config(lora)
    meta = {DIFFUSERS_METADATA_KEY: json.dumps({k: v for k, v in cfg.items() if k != "peft_type"}, sort_keys=True),
            "format": "pt"}
    weights = save_safetensors(peft_state_dict(lora), out_dir / PEFT_WEIGHTS, _interop_metadata(lora, meta, source),
                               hash_metadata=_hash_metadata(lora))
    with atomic_path(out_dir / PEFT_CONFIG) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return [weights, out_dir / PEFT_CONFIG]


def write_kohya(lora: LoRAFile, dest: str | Path, source: dict[str, str] | None = None) -> list[Path]:
    """One kohya-style safetensors file (atomic), keeping the ``ss_*`` metadata. ``source``: see
    :func:`export_lora`."""
    from lbm_registry.lbm.checkpoint import save_safetensors

    dest = Path(dest)
    if dest.is_dir():
        raise LoRAError(f"{dest} is a folder: give a .safetensors file name for a kohya export")
    meta = {k: v for k, v in lora.raw_metadata.items() if k.startswith("ss_") or k == "lbm_registry"}
    meta["format"] = "pt"
    return [save_safetensors(kohya_state_dict(lora), dest, _interop_metadata(lora, meta, source),
                             hash_metadata=_hash_metadata(lora))]


def _interop_metadata(lora: LoRAFile, meta: dict[str, str], source: dict[str, str] | None = None) -> dict[str, str]:
    """The kohya ``ss_*`` keys (and our entry) of the source LoRA on every exported file; our
    entry also names the file it was exported from (``exported_from``), when known."""
    out = {k: v for k, v in lora.raw_metadata.items() if k.startswith("ss_") or k == META_KEY}
    out.update(meta)
    if source and source.get("sha256"):
        try:
            entry = json.loads(out.get(META_KEY) or "{}")
        except ValueError:
            entry = {}
        if isinstance(entry, dict):
            entry[EXPORTED_FROM] = {k: str(v) for k, v in sorted(source.items()) if v}
            out[META_KEY] = json.dumps(entry, separators=(",", ":"), sort_keys=True, default=str)
    return out


def _hash_metadata(lora: LoRAFile) -> Any:
    """ModelSpec + ``sshs_*`` keys for the exported tensor bytes (title/architecture kept)."""
    from lbm_registry.lora.format import architecture_id, modelspec_metadata

    title = lora.raw_metadata.get("modelspec.title") or "LBM LoRA"
    arch = lora.raw_metadata.get("modelspec.architecture") or architecture_id(lora.info.get("base_config"))

    def fn(sha: str, legacy: str) -> dict[str, str]:
        return {**modelspec_metadata(title, arch, sha), "sshs_model_hash": sha, "sshs_legacy_hash": legacy}

    return fn


def export_lora(lora: LoRAFile, fmt: str, output: str | Path, source: dict[str, str] | None = None) -> list[Path]:
    """Write ``lora`` as ``fmt`` (``peft`` folder or ``kohya`` file); returns the paths written.
    ``source`` (``{"sha256", "ref"}`` of the file ``lora`` was read from) is recorded in the
    export's ``lbm_registry`` entry, so importing the export back links the version it came from."""
    if fmt == "peft":
        return write_peft(lora, output, source)
    if fmt == "kohya":
        return write_kohya(lora, output, source)
    raise LoRAError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
