"""The image contract: every network takes RGB images as they come from the dataset, a
(B, 3, H, W) batch of uint8 0..255 or float 0..1, and normalises them itself with its
backbone's `input_norm`; callers never normalise.

Pretrained networks expect the statistics they were trained with: ImageNet mean/std for
timm's ResNets and DeiTs and for ResNet-38d, ``(pixel - 127) / 128`` on 0..255 pixels for
EfficientNet-Lite. Each backbone declares its :class:`InputNorm`; a network with a
`backbone` gets `input_norm` from :class:`NormalisesInput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# ImageNet statistics on the 0..1 scale: the default for timm models and from-scratch networks.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A float batch may overshoot 0..1 by rounding in resizes; beyond this it is not RGB in 0..1
# (most likely an already normalised batch, which would be normalised twice).
_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class InputNorm:
    """Per-channel normalisation a backbone expects: ``(x - mean) / std`` with x in 0..1 (RGB)."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 in 0..255, or float in 0..1 -> normalised float32 (B, 3, H, W).
        A float batch outside 0..1 is refused: it is not RGB as the contract defines it."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) RGB batch, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float().div(255.0)
        else:
            x = images.float()
            low, high = torch.aminmax(x)
            if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
                raise ValueError(
                    f"expected RGB in 0..1 (or uint8 0..255), got values in [{float(low):.3g}, {float(high):.3g}]: "
                    "pass images unnormalised, the network normalises them itself (its input_norm)"
                )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


IMAGENET_NORM = InputNorm("imagenet", IMAGENET_MEAN, IMAGENET_STD)
# EfficientNet-Lite (TF-Lite models): (pixel - 127) / 128 on the 0..255 scale.
EFFICIENTNET_LITE_NORM = InputNorm("efficientnet_lite", (127 / 255,) * 3, (128 / 255,) * 3)


def input_norm_of(backbone: nn.Module) -> InputNorm:
    """The backbone's `input_norm`, ImageNet statistics for modules that declare none."""
    return getattr(backbone, "input_norm", IMAGENET_NORM)


class NormalisesInput:
    """Mixin for a network with a `backbone`: `input_norm` is the backbone's, and the
    network's forward starts with ``self.input_norm(images)``."""

    @property
    def input_norm(self) -> InputNorm:
        return input_norm_of(self.backbone)
