"""Wide ResNet-38 ("model A1", Wu, Shen & van den Hengel, *Wider or Deeper: Revisiting the
ResNet Model for Visual Recognition*, Pattern Recognition 2019) with dilated last stages:
the backbone of psa (AffinityNet), SEAM, ICAM and hfpl.

Layout
------
Pre-activation residual units (BN -> ReLU -> conv), no max pooling; the stem is a single
stride-1 3x3 convolution, so every stride comes from the first unit of a stage::

    name            unit          channels in -> mid -> out   units  native stride
    conv1a          3x3 conv      3 -> 64                      1      1
    b2, b2_1, b2_2  two 3x3       64/128 -> 128 -> 128         3      2
    b3 ... b3_2     two 3x3       128/256 -> 256 -> 256        3      2
    b4 ... b4_5     two 3x3       256/512 -> 512 -> 512        6      2
    b5 ... b5_2     two 3x3       512/1024 -> 512 -> 1024      3      2
    b6              1x1-3x3-1x1   1024 -> 512 -> 1024 -> 2048  1      2
    b7              1x1-3x3-1x1   2048 -> 1024 -> 2048 -> 4096 1      1
    bn7             BN + ReLU on the 4096 channels

The first unit of each stage changes the width or the resolution and therefore has a
projection shortcut (``conv_branch1``, a strided 1x1 convolution applied to the unit's
BN-ReLU'd input, as in pre-activation ResNets); the other units add the identity. b6 and b7
apply channel dropout (``Dropout2d``, 0.3 in b6 and 0.5 in b7) before their 3x3 and their last
1x1 convolution, as psa and SEAM train them; the ImageNet model itself used no dropout.

The ImageNet network has output stride 32. Output stride 8 (psa, SEAM: the default here) and
16 follow the authors' own dense variants (``rna_feat_a1(inv_resolution)`` in their ademxapp
code): a stage whose stride would overshoot keeps stride 1, its strided convolution keeps the
previous dilation and every later 3x3 convolution doubles it. At stride 8 that gives b5 (2,
first convolution 1), b6 (4) and b7 (4), exactly psa's ``resnet38d``; at stride 16, b6 and
b7 use dilation 2. All strides use padding ``dilation``, so an H x W input gives
ceil(H / s) x ceil(W / s) features at output stride s. The weights are the same for every
output stride.

Parameter names
---------------
Module names follow psa's ``network/resnet38d.py`` (copied by SEAM and its successors), which
is what their ``convert_mxnet_to_torch`` produces from the authors' MXNet file
``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``: ``conv1a.weight``; per unit ``<unit>.bn_branch2a``,
``<unit>.conv_branch2a``, ``<unit>.bn_branch2b1``, ``<unit>.conv_branch2b1``, for b6/b7 also
``<unit>.bn_branch2b2`` and ``<unit>.conv_branch2b2``, and ``<unit>.conv_branch1`` for the
projection shortcuts (b2, b3, b4, b5, b6, b7); ``bn7``. BN layers hold ``weight``, ``bias``,
``running_mean`` and ``running_var``. The conversion drops the 1000-class classifier
(``linear1000``) and PyTorch's ``num_batches_tracked`` never existed in the MXNet file, so this
module's state dict has no ``num_batches_tracked`` either (the counter is kept as a
non-persistent buffer; it only matters for ``momentum=None``, which is not used). A converted
file therefore loads key for key with ``build_backbone("resnet38d", weights=PATH)``; a file that
still carries ``linear1000.*`` keys loads with ``allow_head_mismatch=True``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.errors import ConfigError
from weakseg.models.backbones.layers import init_conv_bn
from weakseg.models.backbones.norm import IMAGENET_NORM
from weakseg.registry import register

# Stage widths: (unit name prefix, units, in channels of the first unit, mid, out).
_PLAIN_STAGES = (
    ("b2", 3, 64, 128, 128),
    ("b3", 3, 128, 256, 256),
    ("b4", 6, 256, 512, 512),
    ("b5", 3, 512, 512, 1024),
)
_STEM_CHANNELS = 64
_OUT_CHANNELS = 4096
_DROPOUT = (0.3, 0.5)  # b6, b7 (psa / SEAM)
# Units frozen by SEAM's `not_training` list (``freeze_stem=True``).
STEM_UNITS = ("conv1a", "b2", "b2_1", "b2_2")


class _BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose state dict matches the converted MXNet weights: no ``num_batches_tracked``.

    The counter stays a (non-persistent) buffer. Loading tolerates a state dict with or without
    it, also through ``load_state_dict(strict=True)`` on a plain dict without PyTorch metadata.
    """

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("num_batches_tracked", self.num_batches_tracked, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args: Any) -> None:
        # `state_dict` is load_state_dict's own shallow copy: dropping a key here is local.
        state_dict.pop(prefix + "num_batches_tracked", None)
        # Version 2 stops _NormBase from inserting a default counter for version-less dicts.
        super()._load_from_state_dict(state_dict, prefix, {**local_metadata, "version": 2}, *args)


class ResidualUnit(nn.Module):
    """Pre-activation unit with two 3x3 convolutions (b2 ... b5).

    bn_branch2a -> ReLU -> conv_branch2a (3x3, stride, dilation `first_dilation`)
    -> bn_branch2b1 -> ReLU -> conv_branch2b1 (3x3, dilation `dilation`), plus the input, or
    ``conv_branch1`` (1x1, stride) of the BN-ReLU'd input when width or stride change.
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, first_dilation: int = 1, dilation: int = 1):
        super().__init__()
        self.bn_branch2a = _BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(
            cin, mid, 3, stride=stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = _BatchNorm2d(mid)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.projects = cin != cout or stride != 1
        if self.projects:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, BN-ReLU'd input): the latter is what psa/SEAM call conv3/conv4/conv5."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(pre) if self.projects else x
        residual = self.conv_branch2a(pre)
        residual = self.conv_branch2b1(F.relu(self.bn_branch2b1(residual)))
        return shortcut + residual, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_preact(x)[0]


class BottleneckUnit(nn.Module):
    """Pre-activation bottleneck 1x1 -> 3x3 -> 1x1 (cout/4 -> cout/2 -> cout), b6 and b7.

    The stride sits in the first 1x1 convolution and in the 1x1 projection shortcut (always
    present: these units widen). Channel dropout precedes the 3x3 and the last 1x1 convolution.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        quarter, half = cout // 4, cout // 2
        self.bn_branch2a = _BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, quarter, 1, stride=stride, bias=False)
        self.bn_branch2b1 = _BatchNorm2d(quarter)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(quarter, half, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = _BatchNorm2d(half)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(half, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        residual = self.conv_branch2a(pre)
        residual = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(residual))))
        residual = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(residual))))
        return self.conv_branch1(pre) + residual, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_preact(x)[0]


class ResNet38d(nn.Module):
    """Wide ResNet-38 (A1) as a dense backbone: (B, 3, H, W) -> (B, 4096, ceil(H/s), ceil(W/s)).

    output_stride: 8 (psa/SEAM; default), 16 or 32 (the ImageNet network); see the module
    docstring for the dilation scheme.
    freeze_stem: SEAM's choice. SEAM sets ``requires_grad=False`` on ``conv1a`` and the whole
    b2 stage (``b2``, ``b2_1``, ``b2_2``, their BN affine parameters included), keeping these
    early, generic filters at their ImageNet values. SEAM gives no reason; the usual ones are
    that low-level filters transfer as they are, that the stem runs at full and half
    resolution (the largest activations, so skipping its weight gradients saves time), and
    that fewer trainable weights overfit the ~10k VOC images less. (psa froze only ``conv1a``.)
    freeze_bn: put every BatchNorm in eval mode (running statistics fixed, also during
    ``train()``) and freeze its weight and bias, as psa and SEAM do: with a few large crops
    per GPU, batch statistics are too noisy, so the ImageNet statistics are kept. Default: the
    value of ``freeze_stem``, so ``freeze_stem=True`` alone reproduces SEAM's setting.
    dropout: channel-dropout rates of b6 and b7 (psa/SEAM: 0.3 and 0.5); active in train mode.
    width_divisor: divide every channel count by this (1, the default, is the real network and
    the only width the ImageNet weights fit; larger values give a structurally identical,
    same-named small network for tests and quick CPU experiments).

    ``forward_dict`` also returns the intermediate features SEAM's PCM reads; ``state_dict``
    keys are those of the converted ImageNet file (see the module docstring).
    """

    def __init__(
        self,
        output_stride: int = 8,
        freeze_stem: bool = False,
        freeze_bn: bool | None = None,
        dropout: tuple[float, float] = _DROPOUT,
        width_divisor: int = 1,
    ):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"resnet38d: output_stride must be 8, 16 or 32, got {output_stride}")
        if width_divisor not in (1, 2, 4, 8, 16, 32, 64):
            raise ConfigError(f"resnet38d: width_divisor must be a power of two up to 64, got {width_divisor}")
        w = int(width_divisor)
        if len(tuple(dropout)) != 2 or not all(0.0 <= float(p) < 1.0 for p in dropout):
            raise ConfigError(f"resnet38d: dropout must be two rates in [0, 1) for b6 and b7, got {dropout!r}")
        self.output_stride = output_stride
        self.out_channels = _OUT_CHANNELS // w
        self.width_divisor = w
        self.input_norm = IMAGENET_NORM
        self.classifier_prefixes = ("linear1000.",)  # the MXNet ImageNet classifier, if a file kept it
        self.freeze_stem = bool(freeze_stem)
        self.freeze_bn = self.freeze_stem if freeze_bn is None else bool(freeze_bn)

        stride_so_far, dilation = 1, 1

        def stage_geometry() -> tuple[int, int, int]:
            """(stride, dilation of the strided conv, dilation after it) for a stride-2 stage."""
            nonlocal stride_so_far, dilation
            first = dilation
            if stride_so_far * 2 <= output_stride:
                stride_so_far *= 2
                return 2, first, dilation
            dilation *= 2
            return 1, first, dilation

        self.conv1a = nn.Conv2d(3, _STEM_CHANNELS // w, 3, padding=1, bias=False)
        self.unit_names: list[str] = []
        for prefix, units, cin, mid, cout in _PLAIN_STAGES:
            cin, mid, cout = cin // w, mid // w, cout // w
            stride, first, dil = stage_geometry()
            for i in range(units):
                name = prefix if i == 0 else f"{prefix}_{i}"
                if i == 0:
                    unit = ResidualUnit(cin, mid, cout, stride=stride, first_dilation=first, dilation=dil)
                else:
                    unit = ResidualUnit(cout, mid, cout, first_dilation=dil, dilation=dil)
                self.add_module(name, unit)
                self.unit_names.append(name)
        stride, _, dil = stage_geometry()  # b6: its stride sits in a 1x1 conv, dilation only matters for the 3x3
        self.b6 = BottleneckUnit(1024 // w, 2048 // w, stride=stride, dilation=dil, dropout=float(dropout[0]))
        self.b7 = BottleneckUnit(2048 // w, 4096 // w, dilation=dil, dropout=float(dropout[1]))
        self.unit_names += ["b6", "b7"]
        self.bn7 = _BatchNorm2d(self.out_channels)
        self._init_weights()
        self._apply_freezing()

    def _init_weights(self) -> None:
        init_conv_bn(self)

    def _apply_freezing(self) -> None:
        if self.freeze_stem:
            for name in STEM_UNITS:
                getattr(self, name).requires_grad_(False)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
                    m.eval()

    def train(self, mode: bool = True) -> "ResNet38d":
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features by psa/SEAM's names (channels and stride at output stride 8):

        ``conv3``: BN-ReLU of b3's output (256, /4), ``conv4``: of b4's output (512, /8),
        ``conv5``: of b5's output (1024, /8), ``conv6``: the final BN-ReLU (4096, /8).
        """
        x = self.conv1a(x)
        taps = {"b4": "conv3", "b5": "conv4", "b6": "conv5"}
        out: dict[str, torch.Tensor] = {}
        for name in self.unit_names:
            unit = getattr(self, name)
            if name in taps:
                x, out[taps[name]] = unit.forward_with_preact(x)
            else:
                x = unit(x)
        out["conv6"] = F.relu(self.bn7(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1a(x)
        for name in self.unit_names:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))


@register("backbone", "resnet38d")
def build_resnet38d(name: str, pretrained: bool = False, output_stride: int | None = None, **kwargs) -> ResNet38d:
    """Output stride 8 by default (psa, SEAM); weights=PATH: the converted MXNet ImageNet file."""
    if pretrained:
        raise ConfigError("resnet38d: pass weights=PATH to the converted ilsvrc-cls_rna-a1_cls1000_ep-0001 file")
    return ResNet38d(output_stride=output_stride or 8, **kwargs)
