"""TinyCNN: a small from-scratch CNN for the demo and the tests (no pretrained weights)."""

from __future__ import annotations

import torch
from torch import nn

from weakseg.errors import ConfigError
from weakseg.models.backbones.norm import IMAGENET_NORM
from weakseg.registry import register


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1, norm: str = "batch") -> nn.Sequential:
    # GroupNorm (4 groups) normalises each image alone: results do not depend on how a batch
    # is split across DDP ranks (BatchNorm's statistics do; SyncBatchNorm is CUDA-only).
    layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(4 if cout % 4 == 0 else 1, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        layer,
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """A small from-scratch CNN with output stride 4 (default), 8 or 16: fast on a laptop CPU.

    At stride 4 the last stage uses dilation instead of a third stride, as WSSS backbones do,
    to keep the CAM grid fine enough for contours. Stride 16 (only for comparisons with the
    large backbones) strides the last two convolutions; the layers are the same at all strides.
    """

    def __init__(self, width: int = 32, output_stride: int = 4, norm: str = "batch"):
        super().__init__()
        if output_stride not in (4, 8, 16):
            raise ValueError(f"TinyCNN output_stride must be 4, 8 or 16, got {output_stride}")
        if norm not in ("batch", "group"):
            raise ValueError(f"TinyCNN norm must be 'batch' or 'group', got {norm!r}")
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, norm=norm),
            _conv_bn(w, 2 * w, stride=2, norm=norm),
            _conv_bn(2 * w, 2 * w, norm=norm),
            _conv_bn(2 * w, 4 * w, stride=2, norm=norm),
            _conv_bn(4 * w, 4 * w, norm=norm),
            _conv_bn(4 * w, 4 * w, stride=2 if output_stride >= 8 else 1, dilation=1 if output_stride >= 8 else 2,
                     norm=norm),
            _conv_bn(4 * w, 4 * w, stride=2 if output_stride == 16 else 1, dilation=1 if output_stride == 16 else 2,
                     norm=norm),
        )
        self.out_channels = 4 * w
        self.output_stride = output_stride
        self.input_norm = IMAGENET_NORM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(convolution, BatchNorm) of each layer, for folding at inference (models.fold)."""
        return [(layer[0], layer[1]) for layer in self.features if isinstance(layer[1], nn.BatchNorm2d)]

    def stages(self) -> list[list[nn.Module]]:
        """Stem, then the three stride levels (for `model.freeze_stages`)."""
        f = self.features
        return [[f[0]], [f[1], f[2]], [f[3], f[4]], [f[5], f[6]]]



@register("backbone", "tiny_cnn")
def build_tiny_cnn(name: str, pretrained: bool = False, output_stride: int | None = None, **kwargs) -> TinyCNN:
    """Output stride 4 by default (the demo's setting); kwargs: ``width``, ``norm``."""
    if pretrained:
        raise ConfigError("tiny_cnn has no pretrained weights; drop pretrained=True or pass weights=PATH")
    return TinyCNN(output_stride=output_stride or 4, **kwargs)
