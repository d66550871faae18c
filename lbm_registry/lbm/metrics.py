"""Image metrics for comparisons: MAE, PSNR, and LPIPS when its backbone is cached locally."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def mae(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 255]."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where torchvision caches the LPIPS backbone weights (never downloaded by us)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]


def lpips_available(net: str = "alex") -> bool:
    return lpips_backbone_path(net).is_file()


class LPIPSMetric:
    """LPIPS with a locally cached backbone; ``random_backbone`` is for tests only (no download)."""

    def __init__(self, net: str = "alex", random_backbone: bool = False) -> None:
        import contextlib
        import io

        import lpips

        from lbm_registry.errors import ConfigError

        if not random_backbone and not lpips_available(net):
            raise ConfigError(f"LPIPS needs the {net} backbone cached at {lpips_backbone_path(net)}; "
                              "nothing is downloaded at run time")
        with contextlib.redirect_stdout(io.StringIO()):
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False).eval()

    def __call__(self, a: Image.Image, b: Image.Image) -> float:
        import torch

        from lbm_registry.lbm.imaging import to_tensor

        with torch.no_grad():
            return float(self.model(to_tensor(a), to_tensor(b.resize(a.size))).item())
