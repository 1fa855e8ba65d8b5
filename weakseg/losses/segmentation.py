"""Fully supervised segmentation loss for the final network, trained on pseudo-labels.

Per-pixel cross-entropy with the void label 255 ignored, averaged over the labelled pixels.
The logits are upsampled bilinearly to the label size before the loss, rather than the labels
downsampled to the logit grid: DeepLab v3 (Chen et al. 2017, §4.1, "Upsampling logits")
reports that downsampling the ground truth removes fine annotations, so no detail is
back-propagated. Pseudo-labels mark uncertain pixels 255, so an image (or batch) may have no
labelled pixel at all; the loss is then 0 with a zero gradient instead of 0/0 = NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.labels import IGNORE
from weakseg.losses.base import LossTerm


def segmentation_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """logits (B, K, h, w), target (B, H, W) class indices (any integer dtype; `ignore_index`
    marks void) -> scalar mean cross-entropy over the non-ignored pixels at H x W."""
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, K, h, w) and target {tuple(target.shape)} (B, H, W)")
    if logits.shape[2:] != target.shape[1:]:
        logits = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
    target = target.long()
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    # Divide by the labelled count ourselves: reduction="mean" gives NaN when it is 0.
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


class SegmentationTerm(LossTerm):
    """Cross-entropy of the segmentation network's logits against the per-sample training
    targets (pseudo-labels) the trainer batches as "mask"; 255 is ignored."""

    name = "seg"

    def __init__(self, weight: float = 1.0, reads: list[str] | str = ("seg",)):
        super().__init__(weight, 0, reads)

    def value(self, scores, batch, background_channel):
        if "mask" not in batch:
            raise ConfigError("loss.seg: the batch has no training targets (pseudo-labels)")
        return segmentation_ce(scores, batch["mask"])
