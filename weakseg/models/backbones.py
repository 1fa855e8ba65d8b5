"""Backbone factory. A backbone maps (B, 3, H, W) normalised images to (B, C, H/s, W/s)
features and declares `out_channels` and `output_stride`.

Only the tiny CNN (demo and tests) lives here for now; timm models and EfficientNet-Lite
with real ImageNet weights join the same factory (issue 3).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """A small from-scratch CNN with output stride 4 (or 8): fast on a laptop CPU.

    The last stage uses dilation instead of a third stride, as WSSS backbones do, to keep
    the CAM grid fine enough for contours.
    """

    def __init__(self, width: int = 32, output_stride: int = 4):
        super().__init__()
        if output_stride not in (4, 8):
            raise ValueError(f"TinyCNN output_stride must be 4 or 8, got {output_stride}")
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w, stride=2),
            _conv_bn(2 * w, 2 * w),
            _conv_bn(2 * w, 4 * w, stride=2),
            _conv_bn(4 * w, 4 * w),
            _conv_bn(4 * w, 4 * w, stride=2 if output_stride == 8 else 1, dilation=1 if output_stride == 8 else 2),
            _conv_bn(4 * w, 4 * w, dilation=2),
        )
        self.out_channels = 4 * w
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name == "tiny_cnn":
        return TinyCNN(**kwargs)
    raise ValueError(f"backbone {name!r} is not available; available: tiny_cnn")
