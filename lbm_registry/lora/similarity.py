"""Compare LoRAs through their factors, never materialising the full deltas.

For dA = sa * Ua @ Da and dB = sb * Ub @ Db (U: out x r, D: r x in):
<dA, dB>_F = sa sb * sum((Ua^T Ub) * (Da Db^T)), an (ra x rb) computation. A full-rank LoRA
(rank >= the smaller side) is compared through its dense delta instead, which is then smaller.
"""

from __future__ import annotations

import re

import torch

from lbm_registry.lbm.threads import one_thread, single_thread_below
from lbm_registry.lora.format import LoRALayer


def _factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    # float64: the products are small (r x r) and inner products of near-orthogonal deltas cancel
    up = layer.up.double().reshape(layer.up.shape[0], layer.rank)
    down = layer.down.double().reshape(layer.rank, -1)
    return up, down


def _full_rank(layer: LoRALayer) -> bool:
    """Is the rank at least the delta's smaller side? Then the dense delta is the cheaper form
    (a full-rank LoRA may even store more components than that, e.g. r = in * k * k)."""
    return layer.rank >= min(layer.up.shape[0], layer.down[0].numel())


def _dense(layer: LoRALayer) -> torch.Tensor:
    return layer.delta(torch.float64).reshape(layer.up.shape[0], -1)


def _forms(a: LoRALayer, b: LoRALayer) -> tuple[object, object]:
    """Both deltas as dense fp64 matrices when either is full rank, else as (up, down, scale)."""
    if _full_rank(a) or _full_rank(b):
        return _dense(a), _dense(b)
    return (*_factors(a), a.scale), (*_factors(b), b.scale)


def _dot(x: object, y: object) -> float:
    if isinstance(x, torch.Tensor):
        return float((x * y).sum())
    (ua, da, sa), (ub, db, sb) = x, y
    return float(sa * sb * ((ua.T @ ub) * (da @ db.T)).sum())


def inner(a: LoRALayer, b: LoRALayer) -> float:
    """Frobenius inner product of the two reconstructed deltas."""
    return _dot(*_forms(a, b))


def norm(a: LoRALayer) -> float:
    return max(inner(a, a), 0.0) ** 0.5


def cosine_and_difference(a: LoRALayer, b: LoRALayer) -> tuple[float, float]:
    """Cosine similarity of the two deltas (0 when either is zero) and their relative difference
    ||dA - dB|| / max(||dA||, ||dB||), from one set of three inner products; on one thread, as
    every product here is small."""
    with one_thread():
        fa, fb = _forms(a, b)
        aa, bb, ab = _dot(fa, fa), _dot(fb, fb), _dot(fa, fb)
    na, nb = max(aa, 0.0) ** 0.5, max(bb, 0.0) ** 0.5
    cos = ab / (na * nb) if na and nb else 0.0
    denom = max(na, nb)
    diff = max(aa + bb - 2 * ab, 0.0) ** 0.5 / denom if denom else 0.0
    return cos, diff


def cosine(a: LoRALayer, b: LoRALayer) -> float:
    """Cosine similarity of the two deltas (0 when either is zero)."""
    return cosine_and_difference(a, b)[0]


def relative_difference(a: LoRALayer, b: LoRALayer) -> float:
    """||dA - dB|| / max(||dA||, ||dB||)."""
    return cosine_and_difference(a, b)[1]


def spectrum(layer: LoRALayer) -> torch.Tensor:
    """Singular values of the reconstructed delta ``s * U @ D``, descending, from r x r Gram matrices.

    sigma^2 are the eigenvalues of (U^T U)(D D^T) = V L V^T (D D^T): those of the symmetric
    L^1/2 V^T (D D^T) V L^1/2. Two small products and two r x r ``eigh`` instead of two thin QRs
    (LAPACK's QR of a skinny fp64 matrix was ~10x slower). fp64 keeps every value above ~1e-7 of
    the largest accurate, plenty for energy curves.
    """
    if _full_rank(layer):
        d = _dense(layer)
        with single_thread_below(d.numel()):
            return torch.linalg.svdvals(d if d.shape[0] >= d.shape[1] else d.T).float()
    up, down = _factors(layer)
    with one_thread():
        lam, v = torch.linalg.eigh(up.T @ up)
        half = v * lam.clamp_min(0).sqrt()
        s2 = torch.linalg.eigvalsh(half.T @ (down @ down.T) @ half).flip(0).clamp_min(0)
    return (s2.sqrt() * abs(layer.scale)).float()


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
