"""Latent and pixel losses. LPIPS is built without any network access.

LPIPS uses VGG unless told otherwise: upstream builds ``lpips.LPIPS(net="vgg")`` and the original
configs train with it; AlexNet (the ``lpips`` package's default) is a different metric, used only
when a config names it, never as a fallback.

Why the care with LPIPS: ``lpips.LPIPS()`` silently downloads the torchvision backbone on first
use. We build its trunk randomly initialised and load the ImageNet weights ourselves from the
torch hub cache, so a missing file is a clear start-up error instead of a download (or a hang
on an offline machine) hours into a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lbm_registry.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def latent_loss_fn(kind: str) -> LossFn:
    """``l2`` (mean squared error) or ``l1`` (mean absolute error), computed in fp32."""
    if kind == "l2":
        return lambda pred, target: F.mse_loss(pred.float(), target.float())
    if kind == "l1":
        return lambda pred, target: F.l1_loss(pred.float(), target.float())
    raise ConfigError(f"unknown loss {kind!r}: use l2 or l1")


def lpips_backbone_file(net: str) -> Path:
    """Where torchvision caches the ImageNet weights of LPIPS's trunk (alexnet or vgg16)."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    url = {"alex": AlexNet_Weights.IMAGENET1K_V1.url, "vgg": VGG16_Weights.IMAGENET1K_V1.url}[net]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between images in [-1, 1]; frozen, no gradients into its weights."""

    def __init__(self, net: str = "vgg", random_backbone: bool = False) -> None:
        super().__init__()
        import lpips

        if not random_backbone:
            path = lpips_backbone_file(net)
            if not path.is_file():
                other = "alex" if net == "vgg" else "vgg"
                raise ConfigError(
                    f"pixel_loss lpips needs the {net} backbone weights cached at {path} (nothing is downloaded); "
                    f"copy the torchvision file there, set pixel_loss.lpips_net: {other} if that one is cached "
                    "(a different metric), or use pixel_loss kind l1/l2"
                )
        # pnet_rand=True: torchvision builds the trunk without downloading; the LPIPS linear
        # heads ship inside the lpips package and load from disk.
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if not random_backbone:
            self._load_backbone(lpips_backbone_file(net))
        self.model.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        """Map torchvision's ``features.<i>.*`` onto LPIPS's ``slice<k>.<i>.*``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        mapped: dict[str, torch.Tensor] = {}
        for slice_name, block in self.model.net.named_children():
            for idx, _ in block.named_children():
                for pname, _ in block.get_submodule(idx).named_parameters():
                    src = f"features.{idx}.{pname}"
                    if src not in state:
                        raise ConfigError(f"{path}: not a torchvision {self.model.pnet_type} checkpoint (no {src})")
                    mapped[f"{slice_name}.{idx}.{pname}"] = state[src]
        self.model.net.load_state_dict(mapped, strict=True)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(pred.float(), target.float()).mean()


def build_pixel_loss(kind: str, *, lpips_net: str = "vgg", lpips_random_backbone: bool = False,
                     device: torch.device | str = "cpu") -> LossFn:
    """The pixel-space loss on decoded predictions. Raises :class:`ConfigError` at start-up if
    LPIPS weights are not available locally."""
    if kind in ("l1", "l2"):
        return latent_loss_fn(kind)
    if kind == "lpips":
        return LPIPSLoss(lpips_net, random_backbone=lpips_random_backbone).to(device)
    raise ConfigError(f"unknown pixel loss {kind!r}: use l1, l2 or lpips")
