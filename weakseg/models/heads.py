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


# DeepLab v3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image
# Segmentation", §3.3): rates (6, 12, 18) at output stride 16.
ASPP_RATES_OS16 = (6, 12, 18)


def aspp_rates(output_stride: int, base: tuple[int, ...] = ASPP_RATES_OS16) -> tuple[int, ...]:
    """The atrous rates for a backbone of `output_stride`: `base` (given for stride 16) scaled
    by 16 / output_stride, so (6, 12, 18) at 16 and (12, 24, 36) at 8.

    Why: a rate counts feature-grid cells. At stride 8 a cell covers half as many input pixels
    as at stride 16, so doubling the rate keeps each branch's field of view in the image the
    same (DeepLab v3 §3.3 doubles the rates when training or evaluating at output stride 8).
    """
    scaled = [r * 16 / output_stride for r in base] if output_stride > 0 else [0.5]
    if any(s != int(s) for s in scaled):
        raise ValueError(f"ASPP rates {base} (given for output stride 16) do not scale to output stride {output_stride}")
    return tuple(int(s) for s in scaled)


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv (with bias) -> ReLU, broadcast back to the grid.

    No normalisation layer here, unlike the other branches: after pooling every image is one
    vector, so a BatchNorm would average over only B values (undefined for B = 1 at train time,
    where torch raises, and very noisy for small B), and a GroupNorm over a single pixel would
    normalise across channels, erasing the overall strength of the image context. The
    projection's BatchNorm after the concatenation normalises this branch together with the
    others over B x h x w positions, which is defined for B = 1.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        # Bilinear upsampling of a 1x1 map is a constant map: expand gives it without copies.
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab v3 (Chen et al. 2017, §3.3, Fig. 5).

    Five parallel branches on the backbone features: a 1x1 conv, three 3x3 convs with atrous
    rates `rates`, and image-level pooling; each gives `channels` maps (256 in the paper). They
    are concatenated and projected by a 1x1 conv to `channels`, with BN + ReLU, then dropout.

    The image-pooling branch is there because a 3x3 filter whose rate approaches the feature
    map size degenerates to its centre tap (the others fall in the zero padding): the paper adds
    global context explicitly instead. See `_ImagePooling` for why it has no BatchNorm.
    Note that the projection's BatchNorm still needs more than one value per channel at train
    time (B x h x w > 1).

    `branches[0]` is the 1x1 conv, `branches[1:4]` the atrous convs, `branches[4]` the pooling.
    """

    def __init__(self, in_channels: int, rates: tuple[int, ...] = ASPP_RATES_OS16, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)]
            + [conv_bn_relu(in_channels, channels, 3, dilation=r) for r in self.rates]
            + [_ImagePooling(in_channels, channels)]
        )
        self.project = nn.Sequential(
            nn.Conv2d(channels * len(self.branches), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            # 0.1: the keep probability 0.9 of the reference TensorFlow DeepLab implementation.
            nn.Dropout(dropout),
        )
        self.out_channels = channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(features) for branch in self.branches], dim=1))


class DeepLabHead(nn.Module):
    """ASPP followed by a 1x1 classifier (with bias): per-pixel class logits on the feature grid
    (DeepLab v3, Chen et al. 2017). The rates follow the backbone's output stride, see
    :func:`aspp_rates`, unless given."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        output_stride: int = 16,
        channels: int = 256,
        dropout: float = 0.1,
        rates: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.aspp = ASPP(in_channels, aspp_rates(output_stride) if rates is None else rates, channels, dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aspp(features))
