"""Plain CAM network: backbone -> 1x1 class scores s (the CAMs) -> global average pooling.

With `background_channel=True` the head has C + 1 outputs, channel 0 being background, as
the multinomial ISL needs (icam eq. 1); foreground channel k + 1 is class k of the labels.
"""

from __future__ import annotations

import torch
from torch import nn

from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.models.heads import CAMHead
from weakseg.registry import register


@register("method", "cam")
class CAMNet(NormalisesInput, nn.Module):
    inference_output = "cams"  # what CAM inference reads
    score_output = "cams"  # raw class scores (logit-like): the model's probabilities
    cam_order = "irn"  # CAM inference order of its official code (weakseg.models.inference)

    def __init__(self, num_classes: int, backbone: str = "tiny_cnn", background_channel: bool = False, **backbone_kwargs):
        super().__init__()
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        self.background_channel = 0 if background_channel else None
        self.head = CAMHead(self.backbone.out_channels, num_classes + (1 if background_channel else 0))
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.head(self.backbone(self.input_norm(images)))  # (B, C[+1], h, w)
        return {"cams": scores, "logits": scores.mean(dim=(2, 3))}
