"""CAM inference: test-time scales and flips, then per-class max normalisation.

Conventions (per method):
- plain CAM / binomial: the raw class scores of each scale and flip are upsampled
  bilinearly to H x W, passed through ReLU and summed; each class map is then divided by
  its maximum (+1e-5), so values lie in [0, 1).
- multinomial (a model with a background channel, icam eq. 1): the softmax probabilities
  over the C + 1 channels replace the ReLU scores; the foreground channels are then summed
  and max-normalised the same way.
- `activation="sigmoid"` (binomial view, hfpl eq. 14): sigmoid(s) replaces ReLU(s), so
  negative scores keep their order instead of all becoming 0; for ISL-trained models whose
  best threshold under ReLU sits at 0 (see docs/results.md).
Only the classes asked for (those present in the image) are returned.
"""

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
    background_channel: int | None = None,
    output: str = "cams",
    activation: str = "relu",
) -> np.ndarray:
    """CAMs of one normalised image (1, 3, H, W) for the given label-vector indices ->
    (len(class_indices), H, W) float32 in [0, 1)."""
    _, _, h, w = image.shape
    idx = list(class_indices)
    if not idx:
        return np.zeros((0, h, w), dtype=np.float32)
    channels = [i + 1 if background_channel == 0 else i for i in idx] if background_channel is not None else idx
    total = torch.zeros(len(idx), h, w, device=image.device)
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(
            image, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False
        )
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        scores = model(batch)[output]
        if background_channel is not None:
            maps = F.interpolate(torch.softmax(scores, dim=1)[:, channels], size=(h, w), mode="bilinear", align_corners=False)
        elif activation == "sigmoid":
            maps = torch.sigmoid(F.interpolate(scores[:, channels], size=(h, w), mode="bilinear", align_corners=False))
        elif activation != "relu":
            raise ValueError(f"CAM activation must be 'relu' or 'sigmoid', got {activation!r}")
        else:
            maps = F.relu(F.interpolate(scores[:, channels], size=(h, w), mode="bilinear", align_corners=False))
        total += (maps[0] + maps[1].flip(-1)) if flip else maps[0]
    total /= total.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5
    return total.cpu().numpy().astype(np.float32)
