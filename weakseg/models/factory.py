"""Model recipes shared by the steps: a `model:` config section -> a network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import inspect

from weakseg.errors import ConfigError
from weakseg.models.freeze import freeze_stages
from weakseg.registry import lookup


@dataclass
class ModelConfig:
    method: str = "cam"  # a registered CAM method: cam, seam, vit_cam (registry.available("method"))
    backbone: str = "tiny_cnn"
    background_channel: bool = False  # C+1 outputs, channel 0 background (multinomial ISL; cam only)
    backbone_args: dict[str, Any] = field(default_factory=dict)  # e.g. pretrained, weights, output_stride
    # Options of the method's own class (see its docstring), e.g. seam: {scale: 0.3, pcm_dim:
    # 192, dropout: 0.5}; vit_cam: {class_tokens: false, reduction: 8, pool: max, detach: true}.
    method_args: dict[str, Any] = field(default_factory=dict)
    # The first N backbone stages (stem = 1) keep their weights and BN statistics and are
    # detached from autograd (IRN's frozen conv1 + layer1: 2); weakseg.models.freeze.
    freeze_stages: int = 0

    def __post_init__(self):
        method_class(self.method)  # an unknown method is one error when the config loads


def method_class(method: str):
    """The network class registered as `method` (`@register("method", name)` in its file)."""
    return lookup("method", method, "model.method")


def build_model(model: ModelConfig, num_classes: int):
    network = _build_method(model, num_classes)
    freeze_stages(network.backbone, model.freeze_stages)
    return network


def _build_method(model: ModelConfig, num_classes: int):
    cls = method_class(model.method)
    if model.method == "cam":
        if model.method_args:
            raise ConfigError(f"model.method_args: the plain CAM method takes none, got {sorted(model.method_args)}")
        return cls(num_classes, model.backbone, model.background_channel, **model.backbone_args)
    if model.background_channel:
        raise ConfigError(f"model.background_channel: only the cam method has one (multinomial ISL); "
                          f"{model.method} models the background as 1 - max of its class maps")
    # The method's own options, checked against its signature so a typo is one clear error
    # rather than a backbone complaint.
    allowed = [name for name, p in inspect.signature(cls.__init__).parameters.items()
               if name not in ("self", "num_classes", "backbone") and p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(model.method_args) - set(allowed))
    if unknown:
        raise ConfigError(f"model.method_args: {unknown} not allowed for {model.method}; allowed keys: {', '.join(allowed)}")
    clash = sorted(set(model.method_args) & set(model.backbone_args))
    if clash:
        raise ConfigError(f"model: {clash} given in both method_args and backbone_args")
    return cls(num_classes, model.backbone, **model.method_args, **model.backbone_args)


@dataclass
class SegModelConfig:
    """The final segmentation network: an ASPP head on any backbone of the factory."""

    backbone: str = "tiny_cnn"
    backbone_args: dict[str, Any] = field(default_factory=dict)  # pretrained, output_stride, ...
    aspp_channels: int = 256
    freeze_stages: int = 0  # as ModelConfig.freeze_stages


def build_seg_model(config: SegModelConfig, num_classes: int):
    from weakseg.models.methods.deeplab import DeepLabNet

    network = DeepLabNet(num_classes, config.backbone, aspp_channels=config.aspp_channels, **config.backbone_args)
    freeze_stages(network.backbone, config.freeze_stages)
    return network
