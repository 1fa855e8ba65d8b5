"""Saliency loss of AuxSegNet+ (eq. 19, the L_sal terms): binary cross-entropy between the
saliency branch's logits (and its two refined versions) and the round's saliency labels.

The labels are 0/1 maps (the round's saliency map binarised at 0.5, as AuxSegNet's data
loader does) with 255 where the crop was padded, which is ignored. As for the segmentation
loss (weakseg.losses.segmentation), the logits are upsampled bilinearly to the label size,
and a batch without a labelled pixel gives 0 with a zero gradient rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.labels import IGNORE
from weakseg.losses.base import LossTerm


def saliency_bce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """logits (B, 1, h, w) before the sigmoid, target (B, H, W) in {0, 1, ignore_index} ->
    mean binary cross-entropy over the labelled pixels at H x W."""
    if logits.dim() != 4 or logits.shape[1] != 1 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, 1, h, w) and target {tuple(target.shape)} (B, H, W)")
    if logits.shape[2:] != target.shape[1:]:
        logits = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
    valid = target != ignore_index
    per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).to(logits.dtype), reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


class SaliencyTerm(LossTerm):
    """BCE of a saliency output against the saliency labels the trainer batches as
    "saliency_mask" (the second channel of a two-channel training target)."""

    name = "sal"

    def __init__(self, weight: float = 1.0, reads: list[str] | str = ("sal",)):
        super().__init__(weight, 0, reads)

    def value(self, scores, batch, background_channel):
        if "saliency_mask" not in batch:
            raise ConfigError("loss.sal: the batch has no saliency labels")
        return saliency_bce(scores, batch["saliency_mask"])
