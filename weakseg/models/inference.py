"""CAM inference: test-time scales and flips, ReLU, per-class max normalisation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def infer_cams(
    model: torch.nn.Module,
    image: torch.Tensor,
    class_indices: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
) -> np.ndarray:
    """CAMs of one normalised image (1, 3, H, W) for the given label-vector indices.

    Convention (plain CAM): each scale's (and its flip's) raw class scores are upsampled
    bilinearly to H x W and passed through ReLU, summed over scales and flips, then each
    class map is divided by its maximum (+1e-5), so values lie in [0, 1). Returns
    (len(class_indices), H, W) float32.
    """
    _, _, h, w = image.shape
    idx = list(class_indices)
    if not idx:
        return np.zeros((0, h, w), dtype=np.float32)
    total = torch.zeros(len(idx), h, w)
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(
            image, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False
        )
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        cams = model(batch)["cams"][:, idx]
        cams = F.relu(F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False))
        if flip:
            cams = cams[0] + cams[1].flip(-1)
        else:
            cams = cams[0]
        total += cams
    total /= total.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5
    return total.numpy().astype(np.float32)
