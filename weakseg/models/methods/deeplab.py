"""DeepLab v3 segmentation network (Chen et al. 2017, "Rethinking Atrous Convolution for
Semantic Image Segmentation"): backbone at output stride 8 or 16 -> ASPP -> 1x1 classifier.

This is the final network of the WSSS pipeline, trained fully supervised on pseudo-labels
with :func:`weakseg.losses.segmentation.segmentation_ce`. Its K outputs include the
background (channel 0 by the datasets' convention). ``forward`` returns the logits on the
feature grid (input / output stride); the loss and :func:`weakseg.models.inference.predict_probs`
upsample them to the image size.
"""

from __future__ import annotations

import torch
from torch import nn

from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.models.heads import DeepLabHead


class DeepLabNet(NormalisesInput, nn.Module):
    """backbone -> :class:`~weakseg.models.heads.DeepLabHead`; outputs {"seg": (B, K, h, w)}.

    num_classes_with_background: K, the classes including background.
    output_stride: passed to the backbone factory (DeepLab v3 trains at 16 and evaluates at 8
    or 16); the ASPP rates follow the stride the backbone reports ((6, 12, 18) at 16,
    (12, 24, 36) at 8).
    aspp_channels, aspp_dropout, aspp_rates: head options (256, 0.1, derived from the stride).
    backbone_kwargs: passed to :func:`~weakseg.models.backbones.build_backbone` (``width``,
    ``pretrained``, ``weights``, ...).

    Parameter names start with ``backbone.`` or ``head.``, the split the trainer uses for the
    head's learning-rate multiplier.
    """

    def __init__(
        self,
        num_classes_with_background: int,
        backbone: str = "tiny_cnn",
        *,
        output_stride: int = 16,
        aspp_channels: int = 256,
        aspp_dropout: float = 0.1,
        aspp_rates: tuple[int, ...] | None = None,
        **backbone_kwargs,
    ):
        super().__init__()
        if num_classes_with_background < 2:
            raise ValueError(f"a segmentation network needs at least 2 classes (background + 1), got {num_classes_with_background}")
        self.backbone = build_backbone(backbone, output_stride=output_stride, **backbone_kwargs)
        self.output_stride = int(self.backbone.output_stride)
        self.head = DeepLabHead(
            self.backbone.out_channels,
            num_classes_with_background,
            output_stride=self.output_stride,
            channels=aspp_channels,
            dropout=aspp_dropout,
            rates=aspp_rates,
        )
        self.num_classes = num_classes_with_background

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": self.head(self.backbone(self.input_norm(images)))}  # (B, K, h, w), h = ceil(H / stride)
