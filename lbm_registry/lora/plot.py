"""Spectrum plots for an extraction: singular-value decay and energy kept vs rank, per block.

Logged as an artifact when a LoRA is registered, so whoever picks a rank later can see how fast
each part of the network's fine-tune decays. matplotlib is imported lazily (Agg backend).
Uses the singular values the extraction computed anyway: the whole spectrum for layers done
with an exact SVD, the top ``rank + oversample`` for randomized ones; full-rank layers (no SVD)
are left out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lbm_registry.lora.extract import LayerResult


def network_block(module: str) -> str:
    """``down_blocks.1``, ``mid_block``, ``up_blocks.0`` ... or ``other`` (conv_in, time embedding...).

    By position in the network; :func:`lbm_registry.lora.similarity.layer_group` groups by layer
    type (attention, feed-forward, resnet conv) instead.
    """
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    if parts[0] == "mid_block":
        return "mid_block"
    return "other"


def plot_spectra(layers: Sequence[LayerResult], dest: str | Path, *, title: str = "") -> Path | None:
    """Write a two-panel PNG; returns None when no layer has a spectrum (e.g. all full rank)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[str, list[LayerResult]] = defaultdict(list)
    for r in layers:
        if len(r.spectrum) >= 2 and r.norm > 0:
            groups[network_block(r.module)].append(r)
    if not groups:
        return None
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sorted(groups):
        rs = groups[name]
        depth = min(len(r.spectrum) for r in rs)
        s = np.array([r.spectrum[:depth] for r in rs], dtype=np.float64)
        norms = np.array([r.norm for r in rs], dtype=np.float64)[:, None]
        ranks = np.arange(1, depth + 1)
        ax_s.plot(ranks, np.median(s / s[:, :1].clip(min=1e-30), axis=0), label=f"{name} ({len(rs)})")
        energy = np.cumsum(s**2, axis=1) / norms**2
        med = np.median(energy, axis=0)
        line = ax_e.plot(ranks, med, label=name)[0]
        ax_e.fill_between(ranks, np.percentile(energy, 10, axis=0), np.percentile(energy, 90, axis=0),
                          color=line.get_color(), alpha=0.15)
        chosen = int(np.median([r.rank for r in rs]))
        if chosen <= depth:
            ax_e.plot([chosen], [med[chosen - 1]], "o", color=line.get_color())
    ax_s.set(yscale="log", xlabel="component i", ylabel="sigma_i / sigma_1 (median over layers)",
             title="singular-value decay")
    ax_e.set(xlabel="rank", ylabel="share of ||dW||^2 kept (median, 10-90%)", ylim=(0, 1.02),
             title="energy vs rank (dot: median chosen rank)")
    ax_s.legend(fontsize=7)
    ax_e.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    dest = Path(dest)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest
