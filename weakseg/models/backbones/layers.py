"""Layers and initialisation shared by the backbones written here."""

from __future__ import annotations

from torch import nn


def init_conv_bn(module: nn.Module) -> None:
    """Random initialisation of a backbone without ImageNet weights: Kaiming-normal (fan out)
    convolutions, BatchNorm scale 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
