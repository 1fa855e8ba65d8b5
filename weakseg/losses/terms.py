"""The configured loss terms of a CAM training run (interface: `weakseg.losses.base`).

Config (`loss:` in a training YAML):

    classification: {kind: gap | gmp | isl_binomial | isl_multinomial, lam: ..., num_samples: ...}
    fsl:  {weight: 1.0, gate: r, mu: 2.5, sigma: 5.0, metric: l1, upsample: 1, ...}   # optional
    deal: {weight: 0.04, warmup_epochs: 3, ...}                                        # optional
    seam: {er: 1.0, ecr: 1.0, min_pool: 1.0}     # SEAM's own terms (model.method: seam)
    reads: [cams]

`reads` names the model outputs every term is applied to (averaged over them); a term's own
`reads` overrides it. E.g. SEAM: classification reads [cams, cams_scaled] (both siamese
branches), DEAL [cams, cams_pcm] (deal eq. 15); WeakTr: [cams_coarse, cams_fine] (deal eq. 13-14).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.losses import fsl as fsl_lib
from weakseg.losses.classification import multilabel_soft_margin
from weakseg.losses.segmentation import segmentation_ce
from weakseg.losses.base import LossTerm, foreground_channels as _foreground
from weakseg.losses import isl as isl_lib
from weakseg.losses.seam import SEAMLossConfig, build_seam_terms


@dataclass
class ClassificationConfig:
    kind: Literal["gap", "gmp", "isl_binomial", "isl_multinomial"] = "gap"
    lam: float | None = None  # None: the paper default (0.2 binomial, 0.8 multinomial)
    num_samples: int | None = None  # None: 10 binomial (hfpl), 100 multinomial (icam)
    weight: float = 1.0
    reads: list[str] | None = None  # None: loss.reads


@dataclass
class FSLConfig:
    weight: float = 1.0
    warmup_epochs: int = 0
    gate: Literal["r", "b", "s", "a"] = "r"
    mu: float = 2.5
    sigma: float = 5.0
    metric: Literal["l1", "l2"] = "l1"
    radius: int | None = None
    upsample: int = 1
    learnable: bool = False
    reads: list[str] | None = None  # None: loss.reads


@dataclass
class DEALConfig:
    weight: float = 0.04
    warmup_epochs: int = 0  # presets: 20 of 60 epochs (WeakTr), 3 of 8 (SEAM)
    mu: float = 2.5
    cam_norm: Literal["none", "max", "sigmoid"] = "none"
    size: list[int] | None = None  # H' x W' of deal eq. 1-2; None: the largest CAM grid read
    reads: list[str] | None = None  # None: loss.reads


@dataclass
class LossConfig:
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    fsl: FSLConfig | None = None
    deal: DEALConfig | None = None
    seam: SEAMLossConfig | None = None
    reads: list[str] = field(default_factory=lambda: ["cams"])


class ClassificationTerm(LossTerm):
    name = "cls"

    def __init__(self, config: ClassificationConfig, reads: list[str], generator: torch.Generator | None = None):
        super().__init__(config.weight, 0, reads)
        self.kind = config.kind
        defaults = {"gap": (0.0, 0), "gmp": (0.0, 0), "isl_binomial": (0.2, 10), "isl_multinomial": (0.8, 100)}[config.kind]
        self.lam = defaults[0] if config.lam is None else config.lam
        self.num_samples = defaults[1] if config.num_samples is None else config.num_samples
        self.generator = generator

    def value(self, scores, batch, background_channel):
        labels = batch["labels"]
        if self.kind == "isl_multinomial":
            if background_channel is None:
                raise ConfigError("loss.classification.kind: isl_multinomial needs model.background_channel: true")
            return isl_lib.multinomial_isl(
                scores, labels, self.num_samples, self.lam, self.generator, background_channel=background_channel
            )
        fg = _foreground(scores, background_channel)
        if self.kind == "gap":
            # Multi-label soft margin on GAP logits (SEAM, WeakTr, deal eq. 9).
            return multilabel_soft_margin(fg.mean(dim=(2, 3)), labels)
        if self.kind == "gmp":
            # Global max pooling: the logit of a class is its single strongest cell (Oquab et al.
            # 2015); the gradient reaches one cell per class, so CAMs stay small.
            return multilabel_soft_margin(fg.amax(dim=(2, 3)), labels)
        return isl_lib.binomial_isl(fg, labels, self.num_samples, self.lam, self.generator)


class FSLTerm(LossTerm):
    name = "fsl"

    def __init__(self, config: FSLConfig, reads: list[str]):
        super().__init__(config.weight, config.warmup_epochs, reads)
        self.config = config
        if config.learnable:
            self.mu = torch.nn.Parameter(torch.tensor(float(config.mu)))
            self.sigma = torch.nn.Parameter(torch.tensor(float(config.sigma)))
        else:
            self.mu, self.sigma = config.mu, config.sigma

    def value(self, scores, batch, background_channel):
        cfg = self.config
        if cfg.upsample > 1:
            scores = F.interpolate(scores, scale_factor=cfg.upsample, mode="bilinear", align_corners=False)
        if cfg.gate == "a":
            p = fsl_lib.gate_input(scores, "a", background_channel)
            mask = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)  # icam: every channel
        else:
            p = fsl_lib.gate_input(_foreground(scores, background_channel), cfg.gate)
            mask = batch["labels"].to(p.dtype)  # hfpl §4.3: only present classes
        rgb = F.interpolate(batch["rgb"], size=p.shape[2:], mode="bilinear", align_corners=False)
        return fsl_lib.feature_similarity_loss(p, rgb, mask, self.mu, self.sigma, cfg.radius, cfg.metric)


def build_terms(config: LossConfig, generator: torch.Generator | None = None) -> list[LossTerm]:
    terms: list[LossTerm] = [ClassificationTerm(config.classification, config.classification.reads or config.reads, generator)]
    if config.fsl is not None:
        terms.append(FSLTerm(config.fsl, config.fsl.reads or config.reads))
    if config.deal is not None:
        from weakseg.losses.deal import DEALTerm

        deal = config.deal
        terms.append(
            DEALTerm(
                weight=deal.weight,
                warmup_epochs=deal.warmup_epochs,
                reads=deal.reads or config.reads,
                mu=deal.mu,
                cam_norm=deal.cam_norm,
                size=tuple(deal.size) if deal.size else None,
            )
        )
    if config.seam is not None:
        terms += build_seam_terms(config.seam)  # they read SEAMNet's outputs by name
    return terms


class SegmentationTerm(LossTerm):
    """Cross-entropy of the segmentation network's logits against the per-sample training
    targets (pseudo-labels) the trainer batches as "mask"; 255 is ignored."""

    name = "seg"

    def __init__(self, weight: float = 1.0, reads: list[str] | str = ("seg",)):
        super().__init__(weight, 0, reads)

    def value(self, scores, batch, background_channel):
        if "mask" not in batch:
            raise ConfigError("loss.seg: the batch has no training targets (pseudo-labels)")
        return segmentation_ce(scores, batch["mask"])
