"""SEAM: a siamese CAM network with a pixel correlation module (Wang, Zhang, Kan, Shan, Chen,
"Self-supervised Equivariant Attention Mechanism for Weakly Supervised Semantic
Segmentation", CVPR 2020; public code github.com/YudeWang/SEAM). Section numbers below are
the SEAM paper's; its text is not in ../shared/papers, so no equation numbers are cited.

What the network computes (`SEAMNet.forward`)
---------------------------------------------
One pass on images I (B, 3, H, W), features x = backbone(I) on the h x w grid:

- ``cams``   (B, C, h, w): raw class scores, a 1x1 convolution without bias on x (the CAM
  head of §3.1). C foreground channels only, so ``background_channel`` is None. SEAM's public
  head has C + 1 outputs, but its background output is never used: every loss and the PCM
  overwrite it with 1 - max_c of the normalised foreground CAMs, which is what we compute.
- ``logits`` (B, C): global average pooling of ``cams``.
- ``cams_pcm`` (B, C, h, w) and ``cams_pcm_background`` (B, 1, h, w): the CAM revised by the
  pixel correlation module (PCM, §3.3), foreground and background channels:

      y_j = sum_i A_ji yhat_i,   A_ji = ReLU(cos(theta_j, theta_i)) / sum_k ReLU(cos(theta_j, theta_k))

  * yhat = :func:`pcm_input` of the detached CAM: ReLU, divided per image and class by its
    spatial maximum; background 1 - max_c (channel 0 of yhat, the datasets' convention); at
    each pixel only the strongest foreground class is kept, the others set to 0 (as SEAM's
    public code does). The foreground channels of every class enter, not just the labelled
    ones: the network sees no labels, and inference must work the same way.
  * theta = W9 [down(I), ReLU(W8 x)] (1x1 convolutions without bias): the embedding of the
    image downsampled bilinearly to h x w and of the backbone features (detached by default,
    as SEAM detaches its backbone features before the PCM).

  Scale of the output: each y_j is a convex combination of yhat values, so ``cams_pcm`` lies
  in [0, 1], like SEAM's revised CAM before its max normalisation. Readers that normalise a CAM
  by its maximum (CAM inference with ReLU, DEAL with ``cam_norm: max`` or ``none``, FSL with
  ``gate: r``) therefore read it like ``cams``; it is not a logit, so terms that apply a
  sigmoid or GAP to it (classification, ISL, FSL ``gate: b``) should read ``cams`` instead.
  SEAM itself trains no classifier on the revised CAM.

Training mode (``self.training``) runs the siamese second branch inside ``forward``, because
the trainer calls the model once per step: the image rescaled by ``scale`` (SEAM: 0.3,
bilinear) goes through the same network and every output above is returned again with the
suffix ``_scaled``: ``cams_scaled``, ``logits_scaled``, ``cams_pcm_scaled``,
``cams_pcm_background_scaled``. Eval mode runs one pass; CAM inference reads ``cams_pcm``
(``SEAMNet.inference_output``), as SEAM's inference script reads the revised CAM.

Deviations from SEAM (and why)
------------------------------
- PCM features: SEAM embeds two intermediate ResNet-38 stages (conv4 -> 64, conv5 -> 128
  channels) next to the image. Our backbone factory exposes one feature map, so the PCM
  embeds the final features (``pcm_dim`` channels, default 192 = 64 + 128) plus the image.
- Resolution: SEAM upsamples ``cams`` and the revised CAM to the input size inside the
  network; ours stay on the feature grid (the package's convention: losses and inference
  upsample when they need to). The PCM itself works on the feature grid in both.
- Resizing uses ``align_corners=False`` (the rest of the package; SEAM uses True). The
  scaled image has each side round(scale * side) (at least 1), as the CAM inference scales
  it; SEAM's ``scale_factor`` floors.
- Normalisation without epsilons: the cosine divides by max(|theta|, 1e-12) and the
  similarity of a pixel with itself is defined as 1 (cos(v, v) = 1), so every row of A has
  a positive sum and is divided by it exactly. A constant CAM therefore stays constant and
  rows sum to 1 exactly; SEAM adds 1e-5 to both denominators (rows sum to 1 - O(1e-5)).
  The max normalisation of yhat divides by max + 1e-5 (SEAM also subtracts 1e-5 first).
- Dropout before the CAM head: SEAM's ResNet-38 has Dropout2d(0.5) there (``dropout=0.5``
  reproduces it); the default 0.0 matches the package's other CAM networks, whose backbones
  (tiny CNN, EfficientNet-Lite, timm) were not trained with that layer.
- Initialisation as in SEAM's code: Xavier-uniform CAM head, Kaiming-normal W8,
  Xavier-uniform W9 with gain 4.

Parameter names: ``backbone.*`` (the trainer's base LR), ``head.*`` and ``pcm.*`` (10x LR,
as SEAM gives its from-scratch layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.models.heads import CAMHead
from weakseg.registry import register

# The max normalisation of the PCM input divides by (max + NORM_EPS).
NORM_EPS = 1e-5


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) -> the size of the rescaled image: each side round(scale * side), at least 1."""
    return tuple(max(1, round(s * scale)) for s in size)  # type: ignore[return-value]


def pcm_input(cams: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """SEAM's PCM input yhat from raw foreground scores (B, C, h, w) -> (B, 1 + C, h, w).

    n_c = ReLU(s_c) / (max_hw ReLU(s_c) + eps) per image and class; channel 0 is the background
    1 - max_c n_c; channel 1 + c is n_c where it is the largest class at that pixel, else 0.
    The caller detaches: the PCM input carries no gradient (SEAM computes it under no_grad).
    """
    positive = F.relu(cams)
    norm = positive / (positive.flatten(2).amax(dim=2)[..., None, None] + eps)
    top = norm.amax(dim=1, keepdim=True)
    kept = torch.where(norm >= top, norm, torch.zeros_like(norm))
    return torch.cat([1.0 - top, kept], dim=1)


def pcm_affinity(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) pixel embeddings theta -> (B, N, N) affinities A, N = h * w (SEAM §3.3).

    A_ji = ReLU(cos(theta_j, theta_i)) / sum_k ReLU(cos(theta_j, theta_k)): rows (target pixel
    j) are non-negative and sum to 1. cos(theta_j, theta_j) is defined as 1, also for a zero
    embedding, so no row is empty.
    """
    b, d, h, w = embedding.shape
    unit = embedding.flatten(2)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    similarity = F.relu(unit.transpose(1, 2) @ unit)  # (B, N, N), symmetric
    ones = torch.ones(b, h * w, dtype=similarity.dtype, device=similarity.device)
    similarity = torch.diagonal_scatter(similarity, ones, dim1=1, dim2=2)
    return similarity / similarity.sum(dim=2, keepdim=True)


def pcm_refine(cams: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """y_j = sum_i A_ji yhat_i: (B, K, h, w) maps and (B, N, N) affinities -> (B, K, h, w)."""
    b, k, h, w = cams.shape
    return (cams.flatten(2) @ affinity.transpose(1, 2)).view(b, k, h, w)


class PixelCorrelationModule(nn.Module):
    """SEAM's PCM (§3.3): theta = W9 [image, ReLU(W8 features)], then the PCM revision on the CAM."""

    def __init__(self, feature_channels: int, dim: int = 192, image_channels: int = 3):
        super().__init__()
        self.embed = nn.Conv2d(feature_channels, dim, 1, bias=False)  # SEAM's f8_3 / f8_4
        self.project = nn.Conv2d(dim + image_channels, dim, 1, bias=False)  # SEAM's f9
        nn.init.kaiming_normal_(self.embed.weight)
        nn.init.xavier_uniform_(self.project.weight, gain=4)

    def embedding(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) features and (B, 3, H, W) image -> (B, dim, h, w) theta."""
        small = F.interpolate(image, size=features.shape[2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([small, F.relu(self.embed(features))], dim=1))

    def forward(self, cams: torch.Tensor, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Revise `cams` (B, K, h, w) with the affinities of (features, image)."""
        return pcm_refine(cams, pcm_affinity(self.embedding(features, image)))


@register("method", "seam")
class SEAMNet(NormalisesInput, nn.Module):
    """SEAM's siamese CAM network with PCM; see the module docstring for outputs and deviations.

    num_classes: C foreground classes. scale: the rescaling of the second branch in training
    (SEAM: 0.3). pcm_dim: PCM embedding channels. dropout: Dropout2d before the CAM head (SEAM
    0.5). detach_pcm_features: the PCM embeds detached backbone features (SEAM), so the PCM
    losses train only the PCM layers. backbone_kwargs: passed to ``build_backbone``.
    """

    inference_output = "cams_pcm"  # what CAM inference reads (SEAM's revised CAM)
    score_output = "cams"  # raw class scores (logit-like): the model's probabilities
    cam_order = "seam"  # CAM inference order of its official code (weakseg.models.inference)
    branch_suffix = "_scaled"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tiny_cnn",
        scale: float = 0.3,
        pcm_dim: int = 192,
        dropout: float = 0.0,
        detach_pcm_features: bool = True,
        **backbone_kwargs,
    ):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"SEAM scale must be > 0, got {scale}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SEAM dropout must be in [0, 1), got {dropout}")
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        self.background_channel = None
        self.num_classes = num_classes
        self.scale = float(scale)
        self.detach_pcm_features = bool(detach_pcm_features)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = CAMHead(self.backbone.out_channels, num_classes)
        nn.init.xavier_uniform_(self.head.classifier.weight)
        self.pcm = PixelCorrelationModule(self.backbone.out_channels, pcm_dim)

    def branch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass of the siamese network on normalised images (the PCM sees them too, as
        SEAM's does): {cams, logits, cams_pcm, cams_pcm_background}."""
        features = self.backbone(images)
        cams = self.head(self.dropout(features))
        pcm_features = features.detach() if self.detach_pcm_features else features
        revised = self.pcm(pcm_input(cams.detach()), pcm_features, images)
        return {
            "cams": cams,
            "logits": cams.mean(dim=(2, 3)),
            "cams_pcm": revised[:, 1:],
            "cams_pcm_background": revised[:, :1],
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = self.input_norm(images)  # RGB in; the scaled branch resizes the normalised batch, as SEAM does
        outputs = self.branch(images)
        if self.training:
            size = scaled_size(tuple(images.shape[2:]), self.scale)
            small = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            outputs.update({name + self.branch_suffix: value for name, value in self.branch(small).items()})
        return outputs
