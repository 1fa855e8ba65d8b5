"""Model recipes shared by the steps: a `model:` config section -> a network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from weakseg.errors import ConfigError
from weakseg.models.methods.cam import CAMNet


@dataclass
class ModelConfig:
    method: Literal["cam"] = "cam"
    backbone: str = "tiny_cnn"
    background_channel: bool = False  # C+1 outputs, channel 0 background (multinomial ISL)
    backbone_args: dict[str, Any] = field(default_factory=dict)  # e.g. pretrained, weights, output_stride


def build_model(model: ModelConfig, num_classes: int) -> CAMNet:
    if model.method != "cam":
        raise ConfigError(f"model.method: {model.method!r} is not available yet; allowed values: cam")
    return CAMNet(num_classes, model.backbone, model.background_channel, **model.backbone_args)


@dataclass
class SegModelConfig:
    """The final segmentation network: an ASPP head on any backbone of the factory."""

    backbone: str = "tiny_cnn"
    backbone_args: dict[str, Any] = field(default_factory=dict)  # pretrained, output_stride, ...
    aspp_channels: int = 256


def build_seg_model(config: SegModelConfig, num_classes: int):
    from weakseg.models.methods.deeplab import DeepLabNet

    return DeepLabNet(num_classes, config.backbone, aspp_channels=config.aspp_channels, **config.backbone_args)
