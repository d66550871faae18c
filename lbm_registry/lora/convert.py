"""Read LoRAs written by other tools into our layers (pure math and key mapping, no registry).

Formats (DESIGN.md, "Interop"):
- native: ``denoiser.<module>.lora_down/lora_up/alpha``;
- kohya / ComfyUI / LyCORIS LoCon: ``lora_unet_<module path with '_'>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (optional: alpha = rank), and ``.lora_mid.weight`` (LoCon's
  Tucker convs: 1x1 down, k x k mid, 1x1 up), folded exactly into a plain k x k conv LoRA:
  ``down'[a, i, h, w] = sum_b mid[a, b, h, w] down[b, i]``;
- PEFT / diffusers: ``<module>.lora_A.weight`` / ``.lora_B.weight`` with a ``unet.``,
  ``base_model.model.`` or no prefix, alpha from ``adapter_config.json`` (``lora_alpha``,
  ``rank_pattern``, ``alpha_pattern``, ``use_rslora``) or diffusers' ``lora_adapter_metadata``;
- not low rank, turned into a dense delta against the base (re-factored by the caller with the
  extraction policies): LyCORIS LoHa (``hada_*``, Tucker ``hada_t*`` too), LoKr (``lokr_*``),
  DoRA (``dora_scale`` / PEFT ``lora_magnitude_vector``) and full ``.diff`` layers.

kohya names are mapped back to module paths through the base's own module list (an underscore
in ``to_q`` and a dot in ``down_blocks.0`` look the same), so any name the base lacks is caught.
Every module is checked against the base architecture before anything is written.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lbm.checkpoint import all_finite

KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "base_model.model.text_encoder",
                         "unet.text_encoder", "cond_stage_model", "conditioner.")
PEFT_PREFIXES = ("base_model.model.unet.", "base_model.model.", "unet.", "denoiser.", "transformer.")
PEFT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PLAIN_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
                  ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
                  ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
                  ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
                  ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
                  ".diff": "diff", ".diff_b": "diff_b", ".dora_scale": "dora_scale", ".bias": "bias",
                  ".lora.down.weight": "down", ".lora.up.weight": "up",
                  ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_A.default.weight": "down",
                  ".lora_B.default.weight": "up", ".lora_magnitude_vector": "magnitude",
                  ".lora_magnitude_vector.weight": "magnitude", ".lora_magnitude_vector.default.weight": "magnitude"}
IGNORED_PARTS = ("diff_b", "bias")
#: The ranks a part may have (parts not named here, ``diff`` and DoRA magnitudes, are checked by
#: their element count): anything else is refused naming it instead of failing inside torch.
PART_NDIMS = {"down": (2, 4), "up": (2, 4), "mid": (4,), "hada_w1_a": (2,), "hada_w1_b": (2,), "hada_w2_a": (2,),
              "hada_w2_b": (2,), "hada_t1": (4,), "hada_t2": (4,), "lokr_w1": (2,), "lokr_w1_a": (2,),
              "lokr_w1_b": (2,), "lokr_w2": (2, 4), "lokr_w2_a": (2,), "lokr_w2_b": (2,), "lokr_t2": (4,)}


@dataclass
class ForeignLayer:
    """One module of a foreign LoRA: its raw tensors by part name (``down``, ``hada_w1_a``...)."""

    module: str
    parts: dict[str, torch.Tensor]
    alpha: float | None = None

    @functools.cached_property
    def kind(self) -> str:
        """Asked for several times per tensor on import: computed once (parts are fixed by then)."""
        p = self.parts
        if any(k.startswith("hada_") for k in p):
            return "loha"
        if any(k.startswith("lokr_") for k in p):
            return "lokr"
        if "diff" in p:
            return "full"
        if "dora_scale" in p or "magnitude" in p:
            return "dora"
        return "lora"

    @property
    def dense(self) -> bool:
        return self.kind != "lora"


@dataclass
class ForeignLoRA:
    """A foreign file read: its format, layers keyed by *base* module name, metadata, notes."""

    source_format: str
    layers: dict[str, ForeignLayer]
    metadata: dict[str, str]
    weights_path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def dense_modules(self) -> list[str]:
        return [m for m, la in self.layers.items() if la.dense]

    def formats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for la in self.layers.values():
            out[la.kind] = out.get(la.kind, 0) + 1
        return out


# -- reading --------------------------------------------------------------------------------
def _weights_file(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The safetensors file to read and, for a PEFT folder, its ``adapter_config.json``."""
    if path.is_dir():
        for name in PEFT_FILES:
            if (path / name).is_file():
                cfg = None
                if (path / PEFT_CONFIG).is_file():
                    try:
                        cfg = json.loads((path / PEFT_CONFIG).read_text())
                    except (OSError, json.JSONDecodeError):
                        raise LoRAError(f"{path / PEFT_CONFIG}: not valid JSON") from None
                return path / name, cfg
        raise LoRAError(f"{path}: a folder without {' or '.join(PEFT_FILES)} (not a PEFT/diffusers LoRA)")
    if not path.is_file():
        raise LoRAError(f"file not found: {path}")
    cfg = None
    side = path.parent / PEFT_CONFIG
    if side.is_file() and path.name in PEFT_FILES:
        try:
            cfg = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            cfg = None
    return path, cfg


def _split(key: str) -> tuple[str, str] | None:
    for suffix in sorted(PLAIN_SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], PLAIN_SUFFIXES[suffix]
    return None


def read_foreign(path: str | Path, base_modules: Mapping[str, tuple[int, ...]]) -> ForeignLoRA:
    """Read any supported LoRA file or folder, mapping its module names onto ``base_modules``
    (module name -> weight shape). Raises LoRAError naming the first text-encoder, unknown or
    unparseable keys; shapes are checked by :func:`check_against_base`."""
    from lbm_registry.lbm.checkpoint import CheckpointReader

    path = Path(path)
    weights, peft_cfg = _weights_file(path)
    reader = CheckpointReader(weights)
    keys = reader.keys()
    if not keys:
        raise LoRAError(f"{weights}: empty file, not a LoRA")
    metadata = dict(reader.metadata)
    te = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)]
    if te:
        raise LoRAError(f"{weights}: {len(te)} text-encoder tensors (e.g. {te[0]}): an SDXL text-to-image LoRA? "
                        "LBM has no text encoder")
    if all(k.startswith("denoiser.") for k in keys) and all(k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                        ".alpha")) for k in keys):
        fmt = "native"
    elif any(k.startswith(KOHYA_PREFIX) for k in keys):
        fmt = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k for k in keys):
        fmt = "diffusers" if DIFFUSERS_METADATA_KEY in metadata or weights.name == PEFT_FILES[1] else "peft"
    else:
        raise LoRAError(f"{weights}: not a LoRA format we read (first key {keys[0]!r}; expected lora_unet_*, "
                        "*.lora_A/lora_B or denoiser.*.lora_down)")
    kohya_names = {m.replace(".", "_"): m for m in base_modules} if fmt == "kohya" else {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    ignored: list[str] = []
    for key in keys:
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        raw, part = split
        if fmt == "kohya":
            if not raw.startswith(KOHYA_PREFIX):
                unknown.append(key)
                continue
            module = kohya_names.get(raw[len(KOHYA_PREFIX):])
        elif fmt == "native":
            module = raw[len("denoiser."):]
        else:
            module = _strip_peft(raw)
        if module is None or module not in base_modules:
            unknown.append(key)
            continue
        if part in IGNORED_PARTS:
            ignored.append(key)
            continue
        groups.setdefault(module, {})[part] = reader.get(key)
    if unknown:
        raise LoRAError(f"{weights}: {len(unknown)} tensors for modules the base lacks or keys we cannot read "
                        f"(e.g. {', '.join(unknown[:3])})")
    if not groups:
        raise LoRAError(f"{weights}: no LoRA layers found")
    layers: dict[str, ForeignLayer] = {}
    peft_source = weights.parent / PEFT_CONFIG if peft_cfg is not None else weights
    alpha_for = _peft_alphas(peft_cfg, metadata, peft_source) if fmt in ("peft", "diffusers") else None
    for module in [m for m in base_modules if m in groups]:  # base order: deterministic output
        parts = groups[module]
        alpha_t = parts.pop("alpha", None)
        if alpha_t is not None and alpha_t.numel() != 1:
            raise LoRAError(f"{weights}: module {module!r} alpha must be a scalar, got shape {tuple(alpha_t.shape)}")
        alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else None
        layer = ForeignLayer(module, parts, alpha)
        _check_parts(layer, weights)   # shapes first: the PEFT alpha needs the rank
        if alpha_for is not None and layer.kind in ("lora", "dora") and "down" in parts:
            layer.alpha = alpha_for(module, int(parts["down"].shape[0]))
        layers[module] = layer
    out = ForeignLoRA(fmt, layers, metadata, weights)
    kinds = out.formats()
    if fmt == "kohya":
        extra = sorted(k for k in kinds if k != "lora")
        has_mid = any("mid" in la.parts for la in layers.values())
        out.source_format = "kohya" + ("-locon-tucker" if has_mid else "") + "".join(f"+{k}" for k in extra)
    if ignored:
        out.notes.append(f"{len(ignored)} bias tensors ignored (a LoRA cannot carry them), e.g. {ignored[0]}")
    return out


def _strip_peft(raw: str) -> str:
    for prefix in PEFT_PREFIXES:
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


def _alpha_value(value: Any, what: str, source: Path | str) -> float:
    """A PEFT alpha from its config: a positive, finite number (not a string, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{source}: {what} must be a positive number, got {json.dumps(value)[:40]}")
    return float(value)


def _peft_alphas(cfg: Any, metadata: Mapping[str, str], source: Path | str) -> Callable[[str, int], float]:
    """``alpha(module, rank)`` as PEFT would scale: ``alpha_pattern`` / ``lora_alpha`` (default:
    the rank, scale 1), with ``use_rslora`` (scale alpha / sqrt(r)) folded into an alpha. The config
    is checked first: a value PEFT could not use is one LoRAError naming it."""
    where = source
    if cfg is None and metadata.get(DIFFUSERS_METADATA_KEY):
        where = f"{source} ({DIFFUSERS_METADATA_KEY} metadata)"
        try:
            cfg = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError:
            raise LoRAError(f"{where}: not valid JSON") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise LoRAError(f"{where}: the adapter config is not a JSON object")
    default = cfg.get("lora_alpha")
    if default is not None:
        default = _alpha_value(default, "lora_alpha", where)
    raw_patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(raw_patterns, dict):
        raise LoRAError(f"{where}: alpha_pattern must be an object of pattern -> alpha")
    patterns: list[tuple[re.Pattern[str], float]] = []
    for key, value in raw_patterns.items():
        try:
            patterns.append((re.compile(rf"(.*\.)?({key})$"), _alpha_value(value, f"alpha_pattern[{key!r}]", where)))
        except re.error:
            raise LoRAError(f"{where}: alpha_pattern key {key!r} is not a valid pattern") from None
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise LoRAError(f"{where}: use_rslora must be true or false")

    def alpha(module: str, rank: int) -> float:
        a = next((value for pattern, value in patterns if pattern.match(module)), None)
        if a is None:
            a = default if default is not None else float(rank)
        return a * math.sqrt(rank) if rslora else a

    return alpha


def _check_parts(layer: ForeignLayer, source: Path) -> None:
    p, m = layer.parts, layer.module
    need = {"lora": ("down", "up"), "dora": ("down", "up"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "full": ("diff",), "lokr": ()}[layer.kind]
    missing = [k for k in need if k not in p]
    if layer.kind == "lokr":
        if "lokr_w1" not in p and not {"lokr_w1_a", "lokr_w1_b"} <= set(p):
            missing.append("lokr_w1")
        if "lokr_w2" not in p and not {"lokr_w2_a", "lokr_w2_b"} <= set(p):
            missing.append("lokr_w2")
    if missing:
        raise LoRAError(f"{source}: module {m!r} lacks {', '.join(missing)}")
    from lbm_registry.lora.format import check_float_factor

    for name, t in p.items():
        check_float_factor(t, source, m, name)
        allowed = PART_NDIMS.get(name)
        if allowed is not None and t.ndim not in allowed:
            raise LoRAError(f"{source}: module {m!r} {name} has shape {tuple(t.shape)}: expected "
                            f"{' or '.join(f'{n}-D' for n in allowed)}")
        if 0 in t.shape:
            raise LoRAError(f"{source}: module {m!r} {name} is empty (shape {tuple(t.shape)})")
        if not all_finite(t):
            raise LoRAError(f"{source}: module {m!r} {name} contains NaN or Inf")
    if layer.alpha is not None and (not math.isfinite(layer.alpha)):
        raise LoRAError(f"{source}: module {m!r} alpha is not finite")


# -- plain low rank -------------------------------------------------------------------------
def plain_factors(layer: ForeignLayer, shape: tuple[int, ...], source: Path | str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, alpha)`` in our layout for a plain (or LoCon Tucker) layer of weight ``shape``;
    the Tucker ``lora_mid`` is folded into ``down`` exactly."""
    down, up = layer.parts["down"], layer.parts["up"]
    r = int(down.shape[0])
    if r == 0 or up.ndim < 2 or int(up.shape[1]) != r:
        raise LoRAError(f"{source}: module {layer.module!r} has inconsistent shapes down {tuple(down.shape)} "
                        f"up {tuple(up.shape)}")
    mid = layer.parts.get("mid")
    if mid is not None:
        if len(shape) != 4 or mid.ndim != 4 or tuple(mid.shape[:2]) != (int(up.shape[1]), r):
            raise LoRAError(f"{source}: module {layer.module!r}: lora_mid {tuple(mid.shape)} does not fit "
                            f"down {tuple(down.shape)} / up {tuple(up.shape)}")
        d2 = down.float().reshape(r, -1)                      # (r, in): a 1x1 conv
        folded = torch.einsum("abhw,bi->aihw", mid.float(), d2)
        down = folded.to(down.dtype)
        r = int(mid.shape[0])
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:]) if down.numel() == r * math.prod(shape[1:]) else down
        up = up.reshape(int(up.shape[0]), r, 1, 1) if up.numel() == int(up.shape[0]) * r else up
    else:
        down = down.reshape(r, -1) if down.ndim != 2 else down
        up = up.reshape(int(up.shape[0]), r) if up.ndim != 2 else up
    got = (int(up.shape[0]), *down.shape[1:])
    if tuple(got) != tuple(shape) or (len(shape) == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoRAError(f"{source}: module {layer.module!r}: the LoRA makes a {tuple(got)} delta, the base weight is "
                        f"{tuple(shape)}")
    alpha = layer.alpha if layer.alpha is not None else float(r)
    if alpha <= 0:
        raise LoRAError(f"{source}: module {layer.module!r} alpha must be positive, got {alpha}")
    bound = float(torch.linalg.vector_norm(up.double())) * float(torch.linalg.vector_norm(down.double())) * alpha / r
    _check_delta_norm(bound, layer.module, source)
    return down, up, float(alpha)


#: Frobenius norm above which a delta is refused: far beyond any real weight change, and below
#: what fp32 arithmetic on it (its square, an SVD) can hold without overflowing to inf/NaN.
MAX_DELTA_NORM = 1e15


def _check_delta_norm(norm: float, module: str, source: Path | str) -> None:
    if not math.isfinite(norm) or norm > MAX_DELTA_NORM:
        raise LoRAError(f"{source}: module {module!r}: its delta is implausibly large (norm up to {norm:.3g}): "
                        "not a LoRA for weights of this scale")


# -- dense deltas ---------------------------------------------------------------------------
def _tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: ``einsum('ijkl,jr,ip->prkl', t, wb, wa)``."""
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), wb.float(), wa.float())


def dense_delta(layer: ForeignLayer, shape: tuple[int, ...], base_weight: Callable[[], torch.Tensor],
                source: Path | str) -> torch.Tensor:
    """The fp32 delta (shaped as the weight) of a LoHa / LoKr / DoRA / full-diff layer.

    ``base_weight()`` gives the base's weight (read only for DoRA, whose delta depends on it).
    """
    try:
        d = _dense(layer, shape, base_weight, source)
    except (RuntimeError, IndexError, ValueError) as exc:  # factors that do not fit together
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LoRAError(f"{source}: module {layer.module!r}: its {layer.kind} factors do not fit together "
                        f"({first})") from None
    if d.numel() != math.prod(shape):
        raise LoRAError(f"{source}: module {layer.module!r}: the adapter makes a {tuple(d.shape)} delta, the base "
                        f"weight is {tuple(shape)}")
    if layer.kind in ("full", "lokr", "loha") and tuple(d.shape) != tuple(shape) and d.ndim == len(shape):
        raise LoRAError(f"{source}: module {layer.module!r}: the adapter makes a {tuple(d.shape)} delta, the base "
                        f"weight is {tuple(shape)}")
    if not all_finite(d):
        raise LoRAError(f"{source}: module {layer.module!r}: the delta overflows")
    _check_delta_norm(float(torch.linalg.vector_norm(d.double())), layer.module, source)
    return d.reshape(shape)


def _dense(layer: ForeignLayer, shape: tuple[int, ...], base_weight: Callable[[], torch.Tensor],
           source: Path | str) -> torch.Tensor:
    p, kind = layer.parts, layer.kind
    if kind == "full":
        d = p["diff"].float()
    elif kind == "loha":
        r = int(p["hada_w1_b"].shape[0])
        if "hada_t1" in p and "hada_t2" in p:
            w1 = _tucker(p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            w2 = _tucker(p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            w1 = p["hada_w1_a"].float() @ p["hada_w1_b"].float().reshape(r, -1)
            w2 = p["hada_w2_a"].float() @ p["hada_w2_b"].float().reshape(int(p["hada_w2_b"].shape[0]), -1)
        if w1.shape != w2.shape:
            raise LoRAError(f"{source}: module {layer.module!r}: LoHa halves differ ({tuple(w1.shape)} vs {tuple(w2.shape)})")
        scale = (layer.alpha / r) if layer.alpha is not None else 1.0
        d = w1 * w2 * scale
    elif kind == "lokr":
        w1 = p["lokr_w1"].float() if "lokr_w1" in p else p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
        r = None
        if "lokr_w2" in p:
            w2 = p["lokr_w2"].float()
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
            r = int(p["lokr_w2_b"].shape[0])
        else:
            b = p["lokr_w2_b"].float()
            r = int(b.shape[0])
            w2 = p["lokr_w2_a"].float() @ b.reshape(r, -1)
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        if r is None and "lokr_w1_a" in p:
            r = int(p["lokr_w1_a"].shape[1])
        scale = (layer.alpha / r) if (r and layer.alpha is not None) else 1.0
        if w2.ndim == 4:
            d = torch.kron(w1.reshape(*w1.shape[:2], 1, 1), w2) * scale
        else:
            d = torch.kron(w1, w2) * scale
    elif kind == "dora":
        down, up, alpha = plain_factors(ForeignLayer(layer.module, {"down": p["down"], "up": p["up"]}, layer.alpha),
                                        shape, source)
        r = int(down.shape[0])
        w0 = base_weight().float().reshape(shape[0], -1)
        merged = w0 + (alpha / r) * (up.float().reshape(shape[0], r) @ down.float().reshape(r, -1))
        mag = (p["magnitude"] if "magnitude" in p else p["dora_scale"]).float().reshape(-1)
        if mag.numel() == shape[0]:            # per output row (PEFT; LyCORIS wd_on_output)
            norm = torch.linalg.vector_norm(merged, dim=1).clamp_min(1e-12)
            new = merged * (mag / norm)[:, None]
        elif mag.numel() == merged.shape[1]:   # per input column (LyCORIS default)
            norm = torch.linalg.vector_norm(merged, dim=0).clamp_min(1e-12)
            new = merged * (mag / norm)[None, :]
        else:
            raise LoRAError(f"{source}: module {layer.module!r}: DoRA magnitude of {mag.numel()} values fits "
                            f"neither side of {tuple(shape)}")
        d = new - w0
    else:  # pragma: no cover - plain layers never come here
        raise LoRAError(f"{source}: module {layer.module!r} is plain low rank")
    return d


def check_against_base(lora: ForeignLoRA, base_modules: Mapping[str, tuple[int, ...]]) -> None:
    """Every plain layer's factors fit its base weight (dense layers are checked as they are
    built, still before anything is written). Raises naming the first offender."""
    for m, layer in lora.layers.items():
        if not layer.dense:
            plain_factors(layer, tuple(base_modules[m]), lora.weights_path)
