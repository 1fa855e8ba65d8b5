"""Images to tensors: the networks take RGB as it comes (see weakseg.models.backbones.norm)."""

from __future__ import annotations

import numpy as np
import torch


def rgb_batch(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) or a list of same-size (H, W, 3) uint8 arrays -> (N, 3, H, W) float32 RGB
    in 0..1, what every network's forward takes (it normalises the batch itself)."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)) if isinstance(images, list) else images))
    return batch.permute(0, 3, 1, 2).float().div_(255.0)
