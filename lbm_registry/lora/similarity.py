"""Compare LoRAs through their factors, never materialising the full deltas.

For dA = sa * Ua @ Da and dB = sb * Ub @ Db (U: out x r, D: r x in):
<dA, dB>_F = sa sb * sum((Ua^T Ub) * (Da Db^T)), an (ra x rb) computation.
"""

from __future__ import annotations

import re

import torch

from lbm_registry.lora.format import LoRALayer


def _factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    # float64: the products are small (r x r) and inner products of near-orthogonal deltas cancel
    up = layer.up.double().reshape(layer.up.shape[0], layer.rank)
    down = layer.down.double().reshape(layer.rank, -1)
    return up, down


def inner(a: LoRALayer, b: LoRALayer) -> float:
    """Frobenius inner product of the two reconstructed deltas."""
    ua, da = _factors(a)
    ub, db = _factors(b)
    return float(a.scale * b.scale * ((ua.T @ ub) * (da @ db.T)).sum())


def norm(a: LoRALayer) -> float:
    return max(inner(a, a), 0.0) ** 0.5


def cosine(a: LoRALayer, b: LoRALayer) -> float:
    """Cosine similarity of the two deltas (0 when either is zero)."""
    na, nb = norm(a), norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return inner(a, b) / (na * nb)


def relative_difference(a: LoRALayer, b: LoRALayer) -> float:
    """||dA - dB|| / max(||dA||, ||dB||)."""
    na2, nb2 = inner(a, a), inner(b, b)
    diff2 = max(na2 + nb2 - 2 * inner(a, b), 0.0)
    denom = max(na2, nb2) ** 0.5
    return diff2**0.5 / denom if denom else 0.0


def spectrum(layer: LoRALayer) -> torch.Tensor:
    """Singular values of the reconstructed delta, from two thin QRs and an r x r SVD."""
    up, down = _factors(layer)
    _, ru = torch.linalg.qr(up)
    _, rd = torch.linalg.qr(down.T)
    return (torch.linalg.svdvals(ru @ rd.T) * abs(layer.scale)).float()


_GROUP_PATTERNS = (
    (r"\.attn1\.", "self-attn"), (r"\.attn2\.", "attn2"), (r"\.ff\.", "feed-forward"),
    (r"\.proj_(in|out)$", "proj"), (r"resnets\.\d+\.(conv\d|conv_shortcut)$", "resnet conv"),
    (r"resnets\.\d+\.time_emb_proj$", "time proj"), (r"(down|up)samplers", "resample conv"),
    (r"^(conv_in|conv_out)$", "in/out conv"), (r"^time_embedding", "time embedding"),
)


def layer_group(module: str) -> str:
    """Coarse group of a denoiser module for plots and summaries (e.g. ``down/self-attn``)."""
    stage = module.split(".", 1)[0].replace("_blocks", "").replace("_block", "")
    for pattern, name in _GROUP_PATTERNS:
        if re.search(pattern, module):
            return name if name in ("in/out conv", "time embedding") else f"{stage}/{name}"
    return f"{stage}/other"
