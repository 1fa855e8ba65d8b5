"""SEAM's own losses (Wang et al., "Self-supervised Equivariant Attention Mechanism for Weakly
Supervised Semantic Segmentation", CVPR 2020, §3.2 and §3.4; public code
github.com/YudeWang/SEAM, train_SEAM.py). Section numbers are the SEAM paper's (its text is
not in ../shared/papers, so no equation numbers are cited).

SEAM trains a siamese network: branch o sees the image I, branch t the image rescaled by A
(bilinear, factor 0.3). yhat are the CAMs, y the CAMs revised by the pixel correlation module
(PCM). Its total loss (§3.4) is

    L = L_cls + L_ER + L_ECR

- L_cls: multi-label soft margin on GAP of yhat, averaged over the two branches. Not here: the
  package's `ClassificationTerm` reading ["cams", "cams_scaled"] computes it.
- L_ER = || A(yhat^o) - yhat^t ||_1 (equivariant regularisation, §3.2 and §3.4):
  :func:`er_loss`, term `EquivariantTerm` ("er").
- L_ECR = || A(y^o) - yhat^t ||_1 + || A(yhat^o) - y^t ||_1 (equivariant cross regularisation,
  §3.4): :func:`ecr_loss`, term `CrossEquivariantTerm` ("ecr").
- Not in the paper but in SEAM's public training script, added to L_cls there: a min-pooling
  loss on the revised CAMs (the mean of the smallest quarter of the per-pixel maxima over the
  labelled classes; it pushes the least active pixels of the revised CAM to 0; the code's
  comment says it shifts the best background threshold rather than the best score):
  :func:`min_pool_loss`, term `PCMMinPoolTerm` ("min_pool"), averaged over the two branches.

With every weight 1 (`SEAMLossConfig` defaults) the sum of these terms and the classification
term equals SEAM's training loss. How SEAM's code computes each, which we follow:

- Before comparing, each CAM goes through SEAM's normalisation :func:`seam_max_norm`:
  p = ReLU(s); ReLU(p - min p - eps) / (max p - min p + eps), per image and channel, eps = 1e-5.
  Then it is multiplied by the image labels (absent classes become 0); the background channel
  (when there is one) has label 1.
- ER: mean absolute difference over images, foreground classes and pixels (absent classes count
  as zeros in the mean, as in SEAM).
- ECR: the target is the other branch's CAM, detached, with the background channel
  1 - max_c (normalised, label-masked CAM) prepended and, at each pixel, every foreground class
  but the largest set to 0. The prediction is the normalised revised CAM (background channel
  included). Of the |target - prediction| values of each image (C + 1 channels x pixels), only
  the largest 20 % (`top_fraction`) enter the mean; the two directions are summed, not averaged.

Deviations from SEAM (and why):

- Resolution. SEAM upsamples every CAM to the input size of its branch and compares at the
  size of the rescaled image. Here the outputs stay on the feature grid: branch o's maps are
  resized bilinearly to branch t's grid and compared there (the top 20 % and the min-pooling
  quarter are fractions, so they carry over). Cost drops by the output stride squared; the
  maps compared are the same up to the interpolation of maps that SEAM only upsamples.
- Resizing uses align_corners=False (the package's convention; SEAM uses True).
- k = max(1, int(fraction * n)) so that tiny maps still select at least one value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.losses.base import LossTerm, foreground_channels
from weakseg.registry import register

# SEAM's epsilon in its CAM normalisation.
SEAM_EPS = 1e-5


# --------------------------------------------------------------------------------------
# Pure functions (tensor in, tensor out)
# --------------------------------------------------------------------------------------


def seam_max_norm(maps: torch.Tensor, eps: float = SEAM_EPS) -> torch.Tensor:
    """SEAM's CAM normalisation of (B, K, h, w) maps, per image and channel:
    p = ReLU(s), then ReLU(p - min p - eps) / (max p - min p + eps), values in [0, 1)."""
    p = F.relu(maps)
    flat = p.flatten(2)
    low = flat.amin(dim=2)[..., None, None]
    high = flat.amax(dim=2)[..., None, None]
    return F.relu(p - low - eps) / (high - low + eps)


def resize(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) maps to `size` (align_corners=False); same size: as is."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _mask(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return labels.to(like.dtype)[..., None, None]


def er_loss(cams: torch.Tensor, cams_scaled: torch.Tensor, labels: torch.Tensor, eps: float = SEAM_EPS) -> torch.Tensor:
    """L_ER = mean | A(norm(yhat^o)) - norm(yhat^t) | (SEAM §3.2 and §3.4), label-masked.

    cams: (B, C, h, w) foreground scores of the original image; cams_scaled: (B, C, h', w') of
    the rescaled one; A = bilinear resize to (h', w'); norm = :func:`seam_max_norm`; labels
    (B, C). The mean runs over B x C x h' x w'.
    """
    mask = _mask(labels, cams)
    original = resize(seam_max_norm(cams, eps), cams_scaled.shape[-2:]) * mask
    transformed = seam_max_norm(cams_scaled, eps) * mask
    return (original - transformed).abs().mean()


def with_background(foreground: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) normalised foreground maps -> (B, 1 + C, h, w), channel 0 = 1 - max_c."""
    return torch.cat([1.0 - foreground.amax(dim=1, keepdim=True), foreground], dim=1)


def max_onehot(maps: torch.Tensor) -> torch.Tensor:
    """(B, 1 + C, h, w) with background channel 0: each foreground channel is kept where it is
    the largest foreground value of its pixel (ties all kept) and set to 0 elsewhere; the
    background channel is unchanged."""
    foreground = maps[:, 1:]
    top = foreground.amax(dim=1, keepdim=True)
    return torch.cat([maps[:, :1], torch.where(foreground >= top, foreground, torch.zeros_like(foreground))], dim=1)


def top_fraction_mean(errors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean over the batch of the mean of each image's k largest values, k = max(1,
    int(fraction * values per image)) (SEAM keeps the top 20 % of the ECR errors)."""
    flat = errors.flatten(1)
    k = max(1, int(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean()


def ecr_loss(
    cams: torch.Tensor,
    cams_scaled: torch.Tensor,
    pcm: torch.Tensor,
    pcm_scaled: torch.Tensor,
    labels: torch.Tensor,
    top_fraction: float = 0.2,
    eps: float = SEAM_EPS,
) -> torch.Tensor:
    """L_ECR = ||A(y^o) - yhat^t||_1 + ||A(yhat^o) - y^t||_1 (SEAM §3.4), as SEAM's code computes it.

    cams (B, C, h, w), cams_scaled (B, C, h', w'): raw CAMs yhat of the two branches;
    pcm (B, 1 + C, h, w), pcm_scaled (B, 1 + C, h', w'): revised CAMs y, background channel 0;
    labels (B, C). Everything is compared on the (h', w') grid of the rescaled branch:

        target^t = max_onehot(with_background(norm(yhat^t) * y)), detached
        target^o = max_onehot(with_background(A(norm(yhat^o)) * y)), detached
        L = top(|target^t - A(norm(y^o)) * [1, y]|) + top(|target^o - norm(y^t) * [1, y]|)

    with norm = :func:`seam_max_norm` and top = :func:`top_fraction_mean`.
    """
    size = cams_scaled.shape[-2:]
    mask = _mask(labels, cams)
    mask_bg = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    with torch.no_grad():
        target_t = max_onehot(with_background(seam_max_norm(cams_scaled, eps) * mask))
        target_o = max_onehot(with_background(resize(seam_max_norm(cams, eps), size) * mask))
    revised_o = resize(seam_max_norm(pcm, eps), size) * mask_bg
    revised_t = seam_max_norm(pcm_scaled, eps) * mask_bg
    return top_fraction_mean((target_t - revised_o).abs(), top_fraction) + top_fraction_mean(
        (target_o - revised_t).abs(), top_fraction
    )


def min_pool_loss(pcm: torch.Tensor, labels: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """SEAM's min-pooling loss on revised foreground CAMs (B, C, h, w) (train_SEAM.py, not in
    the paper): m = max_c (y_c * label_c) per pixel; the mean over the batch of the sum of
    ReLU of each image's k smallest m, divided by k, k = max(1, int(fraction * h * w))."""
    top = (pcm * _mask(labels, pcm)).amax(dim=1).flatten(1)
    k = max(1, int(fraction * top.shape[1]))
    return F.relu(top.topk(k, dim=1, largest=False).values).mean()


# --------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------


class EquivariantTerm(LossTerm):
    """L_ER. reads = (original CAMs, rescaled-branch CAMs); the model's background channel, if
    any, is dropped from both."""

    name = "er"

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0, reads: Sequence[str] = ("cams", "cams_scaled")):
        super().__init__(weight, warmup_epochs, reads)
        if len(self.reads) != 2:
            raise ConfigError(f"loss.{self.name}.reads: name the original and the rescaled CAMs, got {list(self.reads)}")

    def loss(self, outputs: dict, batch: dict, background_channel: int | None = None) -> torch.Tensor:
        self.check_reads(outputs)
        original, scaled = (foreground_channels(outputs[key], background_channel) for key in self.reads)
        return er_loss(original, scaled, batch["labels"])


class CrossEquivariantTerm(LossTerm):
    """L_ECR. Reads six outputs: the raw CAMs of both branches (`cams`), the revised
    foreground CAMs (`pcm`) and the revised background channel (`pcm_background`) of both
    branches, each given as (original, rescaled). The model's background channel, if any, is
    dropped from `cams`; the revised maps are foreground-only by SEAMNet's convention."""

    name = "ecr"

    def __init__(
        self,
        weight: float = 1.0,
        warmup_epochs: int = 0,
        top_fraction: float = 0.2,
        cams: Sequence[str] = ("cams", "cams_scaled"),
        pcm: Sequence[str] = ("cams_pcm", "cams_pcm_scaled"),
        pcm_background: Sequence[str] = ("cams_pcm_background", "cams_pcm_background_scaled"),
    ):
        if any(len(pair) != 2 for pair in (cams, pcm, pcm_background)):
            raise ConfigError(f"loss.{self.name}: each of cams, pcm, pcm_background names (original, rescaled)")
        super().__init__(weight, warmup_epochs, (*cams, *pcm, *pcm_background))
        self.top_fraction = _fraction(top_fraction, f"loss.{self.name}.top_fraction")

    def loss(self, outputs: dict, batch: dict, background_channel: int | None = None) -> torch.Tensor:
        self.check_reads(outputs)
        cams, cams_scaled, pcm, pcm_scaled, bg, bg_scaled = (outputs[key] for key in self.reads)
        return ecr_loss(
            foreground_channels(cams, background_channel),
            foreground_channels(cams_scaled, background_channel),
            torch.cat([bg, pcm], dim=1),
            torch.cat([bg_scaled, pcm_scaled], dim=1),
            batch["labels"],
            self.top_fraction,
        )


class PCMMinPoolTerm(LossTerm):
    """SEAM's min-pooling loss on the revised foreground CAMs, averaged over `reads` (the two
    branches, as SEAM averages them)."""

    name = "min_pool"

    def __init__(
        self,
        weight: float = 1.0,
        warmup_epochs: int = 0,
        reads: Sequence[str] = ("cams_pcm", "cams_pcm_scaled"),
        fraction: float = 0.25,
    ):
        super().__init__(weight, warmup_epochs, reads)
        self.fraction = _fraction(fraction, f"loss.{self.name}.fraction")

    def value(self, scores: torch.Tensor, batch: dict, background_channel: int | None) -> torch.Tensor:
        return min_pool_loss(scores, batch["labels"], self.fraction)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _fraction(value: float, key: str) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{key}: must be in (0, 1], got {value}")
    return float(value)


@dataclass
class SEAMLossConfig:
    """Weights of SEAM's terms (1 each in SEAM); a weight of 0 leaves the term out."""

    er: float = 1.0
    ecr: float = 1.0
    min_pool: float = 1.0
    warmup_epochs: int = 0
    ecr_top_fraction: float = 0.2  # SEAM keeps the largest 20 % of the ECR errors
    min_pool_fraction: float = 0.25  # SEAM pools the smallest quarter of the pixels


@register("loss_term", "seam")
def build_seam_terms(config: SEAMLossConfig, reads: list[str] | None = None, generator=None) -> list[LossTerm]:
    """The SEAM terms with non-zero weight, reading SEAMNet's own output names (`reads` of the
    loss section does not apply: each term compares two named branches)."""
    for key in ("er", "ecr", "min_pool"):
        if getattr(config, key) < 0:
            raise ConfigError(f"loss.seam.{key}: must be >= 0, got {getattr(config, key)}")
    _fraction(config.ecr_top_fraction, "loss.seam.ecr_top_fraction")
    _fraction(config.min_pool_fraction, "loss.seam.min_pool_fraction")
    terms: list[LossTerm] = []
    if config.er:
        terms.append(EquivariantTerm(config.er, config.warmup_epochs))
    if config.ecr:
        terms.append(CrossEquivariantTerm(config.ecr, config.warmup_epochs, config.ecr_top_fraction))
    if config.min_pool:
        terms.append(PCMMinPoolTerm(config.min_pool, config.warmup_epochs, fraction=config.min_pool_fraction))
    return terms
