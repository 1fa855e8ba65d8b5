"""Inference-time speed-ups that keep the maths: BatchNorm folded into the convolution
before it, and NHWC (channels_last) memory.

In eval mode a BatchNorm is the affine map y = (x - mean) / sqrt(var + eps) * gamma + beta,
so the convolution before it can absorb it: W' = W * s, b' = (b - mean) * s + beta with
s = gamma / sqrt(var + eps) per output channel. The folded network computes the same
function up to float rounding (max-normalised CAMs of a Lite0 with random BN statistics
moved by at most 2e-5), with one pass over each activation fewer.

A backbone opts in by `conv_bn_pairs()`: the (conv, bn) module pairs where the BN directly
follows the convolution. Folding works on a copy; the trained model is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold `bn` (eval statistics) into `conv` in place; the caller replaces `bn` by Identity."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def _replace(root: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, replacement)


def inference_copy(model: nn.Module, fold_batchnorm: bool = True, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of `model` for inference: BN folded where its backbone lists
    `conv_bn_pairs()`, and channels_last memory when asked."""
    model = copy.deepcopy(model).eval()
    backbone = getattr(model, "backbone", None)
    pairs = getattr(backbone, "conv_bn_pairs", None)
    if fold_batchnorm and pairs is not None:
        for conv, bn in pairs():
            fold_conv_bn(conv, bn)
            _replace(model, bn, nn.Identity())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
