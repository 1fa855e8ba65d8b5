"""The image-level classification term of a CAM network: `loss.classification` of a
train_cam config.

    classification: {kind: gap | gmp | logits | isl_binomial | isl_multinomial, lam, num_samples, weight, reads}

gap and gmp: the multi-label soft margin on the spatially pooled class scores (below);
logits: the same loss on the method's own image-level scores (reads: [logits]; e.g. the nGWP
scores of shape_cues, shape-cues eq. 1-2);
isl_binomial (hfpl eq. 5-8) and isl_multinomial (icam eq. 2-6): importance sampling, whose
formulas are in weakseg.losses.isl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.losses import isl as isl_lib
from weakseg.losses.base import LossTerm, foreground_channels
from weakseg.registry import register


def multilabel_soft_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over classes and images of the binary cross-entropy of sigmoid(logits) against the
    multi-hot labels (PyTorch's MultiLabelSoftMarginLoss, the loss of SEAM, WeakTr, DEAL eq. 9)."""
    return F.multilabel_soft_margin_loss(logits, labels)


@dataclass
class ClassificationConfig:
    kind: Literal["gap", "gmp", "logits", "isl_binomial", "isl_multinomial"] = "gap"
    lam: float | None = None  # None: the paper default (0.2 binomial, 0.8 multinomial)
    num_samples: int | None = None  # None: 10 binomial (hfpl), 100 multinomial (icam)
    weight: float = 1.0
    reads: list[str] | None = None  # None: loss.reads
    # isl_multinomial only: "official" = icam's public code (foreground channels only, the
    # sampled probabilities smoothed by 1e-3); "paper" = icam eq. 7-8 (K with the background).
    variant: Literal["official", "paper"] = "official"


class ClassificationTerm(LossTerm):
    name = "cls"

    def __init__(self, config: ClassificationConfig, reads: list[str], generator: torch.Generator | None = None):
        super().__init__(config.weight, 0, reads)
        self.kind = config.kind
        defaults = {"gap": (0.0, 0), "gmp": (0.0, 0), "logits": (0.0, 0), "isl_binomial": (0.2, 10), "isl_multinomial": (0.8, 100)}[config.kind]
        self.lam = defaults[0] if config.lam is None else config.lam
        self.num_samples = defaults[1] if config.num_samples is None else config.num_samples
        self.generator = generator
        self.variant = config.variant

    def value(self, scores, batch, background_channel):
        labels = batch["labels"]
        if self.kind == "logits":
            if scores.ndim != 2 or scores.shape != labels.shape:
                raise ConfigError(f"loss.classification.kind: logits reads image-level scores (B, {labels.shape[1]}); "
                                  f"got {tuple(scores.shape)} (set loss.classification.reads: [logits])")
            return multilabel_soft_margin(scores, labels)  # shape-cues eq. 2: BCE of sigmoid(v^c)
        if self.kind == "isl_multinomial":
            if background_channel is None:
                raise ConfigError("train_cam.loss.classification.kind: isl_multinomial needs train_cam.model.background_channel: true")
            return isl_lib.multinomial_isl(
                scores, labels, self.num_samples, self.lam, self.generator, background_channel=background_channel,
                variant=self.variant,
            )
        fg = foreground_channels(scores, background_channel)
        if self.kind == "gap":
            # Multi-label soft margin on GAP logits (SEAM, WeakTr, deal eq. 9).
            return multilabel_soft_margin(fg.mean(dim=(2, 3)), labels)
        if self.kind == "gmp":
            # Global max pooling: the logit of a class is its single strongest cell (Oquab et al.
            # 2015); the gradient reaches one cell per class, so CAMs stay small.
            return multilabel_soft_margin(fg.amax(dim=(2, 3)), labels)
        return isl_lib.binomial_isl(fg, labels, self.num_samples, self.lam, self.generator)


@register("loss_term", "classification")
def build_classification(config: ClassificationConfig, reads: list[str], generator=None) -> list[LossTerm]:
    return [ClassificationTerm(config, config.reads or reads, generator)]
