"""Array <-> tensor conversion with the normalisation the networks expect."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# ImageNet statistics: the default for timm models and from-scratch networks.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(rgb: torch.Tensor, mean_std: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (rgb - mean) / std; a backbone declares its own pair
    (EfficientNet-Lite: (x*255 - 127)/128), otherwise ImageNet statistics apply."""
    mean, std = mean_std if mean_std is not None else (IMAGENET_MEAN, IMAGENET_STD)
    mean_t = torch.as_tensor(mean, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean_t) / std_t


def images_to_tensor(images: np.ndarray | list[np.ndarray], mean_std=None) -> torch.Tensor:
    """(N, H, W, 3) or a list of same-size (H, W, 3) uint8 arrays -> (N, 3, H, W) float32, normalised."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)) if isinstance(images, list) else images))
    return normalize(batch.permute(0, 3, 1, 2).float().div_(255.0), mean_std)
