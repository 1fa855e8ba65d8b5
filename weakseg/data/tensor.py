"""Array <-> tensor conversion with the normalisation the networks expect."""

from __future__ import annotations

import numpy as np
import torch

# ImageNet statistics; from-scratch networks are indifferent, pretrained ones need them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) or a list of same-size (H, W, 3) uint8 arrays -> (N, 3, H, W) float32, normalised."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)) if isinstance(images, list) else images))
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std
