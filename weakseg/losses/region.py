"""Self-supervision from online pseudo-masks: `loss.online_mask` of a train_cam config, the
mask loss of single-stage methods (shape cues, ../shared/papers/shape-cues-single-stage.txt
§3.2; SSSS, github.com/visinf/1-stage-wseg models/stage_net.py).

    online_mask:
      reads: [cams]            # a (B, K + 1, h, w) score map with background channel 0
      refiner: spr             # spr (eq. 5-6) | pamr (= spr with alpha 1) | none
      alpha: 0.8
      dilations: [1, 2, 4, 8, 12, 24]
      iterations: 10
      cutoff: 0.6              # theta: a fraction of each class's maximum score (§4.1.3)
      background_cutoff: null  # null: cutoff; SSSS's code uses 0.7 for the background
      low: 0.2                 # scores below it are never labelled (§4.1.3)
      pixel: {weight: 1.0, balance: ssss, warmup_epochs: 0}         # eq. 7
      region: {weight: 1.0, radius: 3, margin: 3.0, ramp: linear}   # eq. 8, lambda of eq. 9

Every training step, per image (`OnlineMasks`):
1. m = softmax(S) (the network's M, detached), restricted to the background and the classes
   of the image label (the others set to 0, §3.2.1 footnote 3: "the object and the background
   classes present in the image");
2. refined by SPR on the score grid, with the image resized to it (as SSSS runs PAMR), the
   semantic kernel on the scores S (eq. 5);
3. the pseudo mask (`pseudo_mask`): class c where the refined score exceeds
   max(cutoff * its maximum over the image, low); a pixel with no class or more than one is
   ignored (255) ("we ignore conflicting pixels and less confident pixels with the lower
   bound of 0.2"; SSSS's pseudo_gtmask).
The pixel term (eq. 7) compares the scores, upsampled to the image, with the pseudo mask of
the refined scores upsampled to the image (SSSS); the region term (eq. 8) works on the score
grid (49 neighbours per pixel at full resolution would not fit a CPU batch).

Both terms read the same masks: one `OnlineMasks` object, shared, computes them once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.losses.base import LossTerm
from weakseg.refine.pamr import DEFAULT_DILATIONS, SPR_ALPHA, spr
from weakseg.registry import register

IGNORE = 255


# ----------------------------------------------------------------------------- the formulas


def present_class_probs(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(S) over the K + 1 channels with the channels of classes absent from the image
    label set to 0 (background, channel 0, always kept). (B, K + 1, h, w), (B, K) -> same."""
    keep = torch.cat([torch.ones_like(labels[:, :1]), (labels > 0).to(labels.dtype)], dim=1)
    return torch.softmax(scores, dim=1) * keep[:, :, None, None].to(scores.dtype)


def pseudo_mask(probs: torch.Tensor, cutoff: float = 0.6, low: float = 0.2,
                background_cutoff: float | None = None) -> torch.Tensor:
    """(B, K + 1, h, w) refined scores -> (B, h, w) int64 labels, 255 where ignored.

    Pixel i gets class c when m_i^c > max(cutoff * max_j m_j^c, low), the maximum taken over
    the image; pixels with zero or several such classes are ignored. `background_cutoff`
    replaces `cutoff` for channel 0 (SSSS: 0.7)."""
    peak = probs.flatten(2).amax(dim=2)  # (B, K + 1)
    factor = torch.full_like(peak[:1], cutoff)
    if background_cutoff is not None:
        factor[:, 0] = background_cutoff
    threshold = torch.maximum(peak * factor, torch.full_like(peak, low))
    hits = probs > threshold[:, :, None, None]
    count = hits.sum(dim=1)
    labels = hits.to(torch.int64).argmax(dim=1)
    return torch.where(count == 1, labels, torch.full_like(labels, IGNORE))


def balanced_pixel_ce(scores: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                      balance: str = "ssss") -> torch.Tensor:
    """Eq. 7: cross-entropy of softmax(scores) (B, K + 1, H, W) against `target` (B, H, W),
    255 ignored, over the valid pixels V, "normalized class-wise to handle the class imbalance".

    balance:
    - "ssss" (SSSS's balanced_mask_loss_ce, the code this paper's pipeline builds on): a pixel
      of class c weighs (N - N_c) / (1 + N), N_c its class's pixel count, N = |V|; each image's
      loss is the mean over all its H W pixels; an image whose pseudo mask lacks a class of its
      label (or the background) contributes 0; the mean over the batch.
    - "class_mean": per image, the mean CE of each class's valid pixels, averaged over the
      classes in the mask; the mean over images with a valid pixel.
    - "none": the mean CE over all valid pixels of the batch (eq. 7 as printed)."""
    ce = F.cross_entropy(scores, target.clamp(max=scores.shape[1] - 1), reduction="none")  # (B, H, W)
    valid = target != IGNORE
    ce = ce * valid
    if balance == "none":
        return ce.sum() / valid.sum().clamp_min(1)
    onehot = F.one_hot(torch.where(valid, target, 0), scores.shape[1]).permute(0, 3, 1, 2) * valid[:, None]
    counts = onehot.flatten(2).sum(dim=2).to(ce.dtype)  # (B, K + 1)
    if balance == "class_mean":
        per_class = (onehot * ce[:, None]).flatten(2).sum(dim=2) / counts.clamp_min(1)
        present = counts > 0
        per_image = per_class.sum(dim=1) / present.sum(dim=1).clamp_min(1)
        has = present.any(dim=1)
        return (per_image * has).sum() / has.sum().clamp_min(1)
    if balance != "ssss":
        raise ConfigError(f"online_mask.pixel.balance: {balance!r} is not allowed; allowed: ssss, class_mean, none")
    total = counts.sum(dim=1, keepdim=True)
    class_weight = (total - counts) / (1.0 + total)  # (B, K + 1)
    pixel_weight = (onehot * class_weight[:, :, None, None]).sum(dim=1)
    per_image = (pixel_weight * ce).flatten(1).mean(dim=1)
    complete = ((counts > 0).sum(dim=1) == (labels > 0).sum(dim=1) + 1).to(ce.dtype)
    return (complete * per_image).mean()


def window_offsets(radius: int) -> list[tuple[int, int]]:
    """The (2r + 1)^2 - 1 neighbours of the square window of radius r, centre excluded."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy or dx]


def region_loss(scores: torch.Tensor, target: torch.Tensor, radius: int = 3, margin: float = 3.0) -> torch.Tensor:
    """Eq. 8 on the score grid: for every valid pixel i, the mean over its valid in-image
    neighbours j (the (2 R3 + 1)^2 - 1 window, centre excluded) of
        KL(m_j || m_i)                   if the pseudo mask gives j the class of i,
        max(0, gamma - KL(m_j || m_i))   otherwise (a boundary pair),
    m = softmax(scores); then the mean over the valid pixels with at least one such neighbour.
    (Eq. 8's leading minus is read as a typo: the loss pulls non-boundary pairs together.)"""
    logp = F.log_softmax(scores, dim=1)
    p = logp.exp()
    h, w = target.shape[-2:]
    valid = target != IGNORE
    total = torch.zeros_like(scores[:, 0])
    count = torch.zeros_like(scores[:, 0])
    r = radius
    logp_pad = F.pad(logp, [r] * 4)
    p_pad = F.pad(p, [r] * 4)
    tgt_pad = F.pad(target, [r] * 4, value=IGNORE)
    for dy, dx in window_offsets(radius):
        sl = (..., slice(r + dy, r + dy + h), slice(r + dx, r + dx + w))
        tj = tgt_pad[sl]
        both = valid & (tj != IGNORE)
        kl = (p_pad[sl] * (logp_pad[sl] - logp)).sum(dim=1)  # KL(m_j || m_i)
        term = torch.where(tj == target, kl, F.relu(margin - kl))
        total = total + term * both
        count = count + both
    has = count > 0
    per_pixel = total / count.clamp_min(1)
    return (per_pixel * has).sum() / has.sum().clamp_min(1)


# ----------------------------------------------------------------------------- config and terms


@dataclass
class PixelConfig:
    weight: float = 1.0
    balance: Literal["ssss", "class_mean", "none"] = "ssss"
    warmup_epochs: int = 0  # SSSS enables its mask loss after 5 of 24 epochs (TRAIN.PRETRAIN)


@dataclass
class RegionConfig:
    weight: float = 1.0
    radius: int = 3  # R3
    margin: float = 3.0  # gamma
    ramp: Literal["linear", "none"] = "linear"  # eq. 9: lambda rises from 0 to weight over training


@dataclass
class OnlineMaskConfig:
    reads: list[str] = field(default_factory=lambda: ["cams"])
    refiner: Literal["spr", "pamr", "none"] = "spr"
    alpha: float = SPR_ALPHA
    dilations: list[int] = field(default_factory=lambda: list(DEFAULT_DILATIONS))
    iterations: int = 10
    cutoff: float = 0.6
    background_cutoff: float | None = None
    low: float = 0.2
    pixel: PixelConfig | None = field(default_factory=PixelConfig)
    region: RegionConfig | None = field(default_factory=RegionConfig)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.online_mask.alpha: must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.cutoff <= 1.0 or not 0.0 <= self.low < 1.0:
            raise ConfigError(f"loss.online_mask: cutoff must be in (0, 1] and low in [0, 1), got {self.cutoff}, {self.low}")
        if len(self.reads) != 1:
            raise ConfigError(f"loss.online_mask.reads: name one score map, got {self.reads}")
        if self.region is not None and self.region.radius < 1:
            raise ConfigError(f"loss.online_mask.region.radius: must be >= 1, got {self.region.radius}")


class OnlineMasks:
    """The pseudo masks of one training step, made once and read by both terms: refined
    scores on the score grid, and the masks at the score grid and at the image size."""

    def __init__(self, config: OnlineMaskConfig):
        self.config = config
        self._key = None
        self._value: dict | None = None

    def refine(self, scores: torch.Tensor, rgb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.config
        s = scores.detach().float()
        probs = present_class_probs(s, labels.float())
        if c.refiner == "none":
            return probs
        image = F.interpolate(rgb.float(), size=s.shape[-2:], mode="bilinear", align_corners=False)
        alpha = 1.0 if c.refiner == "pamr" else c.alpha
        return spr(probs, image, alpha, c.dilations, c.iterations, scores=s)

    def __call__(self, scores: torch.Tensor, batch: dict) -> dict:
        key = (id(scores), scores._version, id(batch["rgb"]))
        if key != self._key:
            c = self.config
            refined = self.refine(scores, batch["rgb"], batch["labels"])
            full = F.interpolate(refined, size=batch["rgb"].shape[-2:], mode="bilinear", align_corners=False)
            self._value = {"grid": pseudo_mask(refined, c.cutoff, c.low, c.background_cutoff),
                           "image": pseudo_mask(full, c.cutoff, c.low, c.background_cutoff)}
            self._key = key
        return self._value


def _check_background(background_channel: int | None) -> None:
    if background_channel != 0:
        raise ConfigError("loss.online_mask: the score map needs a background channel 0 (K + 1 channels, e.g. "
                          f"method shape_cues, or cam with background_channel: true); this method has {background_channel}")


class PixelTerm(LossTerm):
    name = "pixel"

    def __init__(self, config: PixelConfig, masks: OnlineMasks, reads: list[str]):
        super().__init__(config.weight, config.warmup_epochs, reads)
        self.masks = masks
        self.balance = config.balance

    def value(self, scores, batch, background_channel):
        _check_background(background_channel)
        target = self.masks(scores, batch)["image"]
        up = F.interpolate(scores, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return balanced_pixel_ce(up, target, batch["labels"], self.balance)


class RegionTerm(LossTerm):
    name = "region"

    def __init__(self, config: RegionConfig, masks: OnlineMasks, reads: list[str]):
        super().__init__(config.weight, 0, reads)
        self.masks = masks
        self.radius, self.margin, self.ramp = config.radius, config.margin, config.ramp

    def weight_at(self, epoch: int, progress: float = 1.0) -> float:
        """Eq. 9's lambda: `weight` * the fraction of training done (ramp linear)."""
        return self.weight * (min(1.0, max(0.0, progress)) if self.ramp == "linear" else 1.0)

    def value(self, scores, batch, background_channel):
        _check_background(background_channel)
        return region_loss(scores, self.masks(scores, batch)["grid"], self.radius, self.margin)


@register("loss_term", "online_mask")
def build_online_mask(config: OnlineMaskConfig, reads: list[str], generator=None) -> list[LossTerm]:
    masks = OnlineMasks(config)
    terms: list[LossTerm] = []
    if config.pixel is not None:
        terms.append(PixelTerm(config.pixel, masks, config.reads))
    if config.region is not None:
        terms.append(RegionTerm(config.region, masks, config.reads))
    if not terms:
        raise ConfigError("loss.online_mask: set pixel, region or both (or drop the section)")
    return terms
