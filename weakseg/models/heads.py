"""Heads on top of backbone features."""

from __future__ import annotations

import torch
from torch import nn


class CAMHead(nn.Module):
    """A 1x1 convolution giving one score map per class: the class activation maps.

    Applying the classifier before pooling (rather than after, as in Zhou et al. 2016)
    gives the same image logits under GAP and yields the CAMs directly.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)
