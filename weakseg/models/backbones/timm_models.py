"""timm models as dense backbones: ``timm:<name>`` or an alias (``resnet18/34/50/101``,
``deit_tiny/small/base``), randomly initialised (timm's hub downloads are not reachable
offline; pass ``weights=PATH``). CNNs reach output stride 8 or 16 by dilating their last
stages (timm's ``output_stride``); vision transformers return their patch tokens as a map,
with the class (and distillation) tokens dropped."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from weakseg.errors import ConfigError
from weakseg.models.backbones.norm import IMAGENET_MEAN, IMAGENET_NORM, IMAGENET_STD, InputNorm
from weakseg.registry import register


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



# The family is registered once, as "timm:"; `build_backbone` routes every "timm:<name>" to it.
@register("backbone", "timm:")
def build_timm(name: str, pretrained: bool = False, output_stride: int | None = None, **kwargs) -> TimmBackbone:
    """Output stride 16 by default; kwargs: timm ``create_model`` options (``drop_path_rate``, ...)."""
    if pretrained:
        raise ConfigError(
            f"{name}: pretrained timm weights cannot be downloaded here (no hub access); "
            "pass weights=PATH to a local .safetensors/.pth file"
        )
    timm_name = name[len("timm:") :] if name.startswith("timm:") else _TIMM_ALIASES[name]
    return TimmBackbone(timm_name, output_stride=output_stride or 16, **kwargs)


for _alias in _TIMM_ALIASES:
    register("backbone", _alias)(build_timm)
