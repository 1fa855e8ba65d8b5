"""Plain CAM network: backbone -> 1x1 class scores s (the CAMs) -> global average pooling."""

from __future__ import annotations

import torch
from torch import nn

from weakseg.models.backbones import build_backbone
from weakseg.models.heads import CAMHead


class CAMNet(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "tiny_cnn", **backbone_kwargs):
        super().__init__()
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        self.head = CAMHead(self.backbone.out_channels, num_classes)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.head(self.backbone(images))  # (B, C, h, w)
        return {"cams": scores, "logits": scores.mean(dim=(2, 3))}
