"""Depth Edge Alignment Loss (DEAL): CAM edges should lie on depth edges.

Equation numbers refer to the DEAL paper (Schmidt, Belagiannis, Nalpantidis), section III-B,
and to the ICAM paper for the activation it borrows (icam eq. 12).

Per image, with CAM scores s (K, Hc, Wc), depth D (1, H, W) and labels y in {0, 1}^K:

1. D' = bicubic(D) at H' x W' (eq. 1); s' = bicubic(s) at H' x W' (eq. 2).
2. Sobel magnitudes a = |G * s'| per class (eq. 3-4) and d = |G * D'| (eq. 5).
3. Map both into [0, 1] (the paper leaves this step implicit, see `unit_edges`), then
   a' = eta(a), d' = eta(d) with eta(t) = tanh(mu + log(t / (1 - t))), mu = 2.5 (eq. 6-7).
4. L_edge = -(1/H'W') sum_ij (1 / sum_k y_k) sum_k y_k a'_kij d'_ij (eq. 8).

a' and d' lie in [-1, 1]; -1 is "no edge", +1 "strong edge". The product a'd' is +1 where
CAM and depth agree (edge on edge, or flat on flat) and -1 where they disagree, and eq. 8
negates its mean: CAM edges lying on depth edges LOWER the loss; its range is [-1, 1].

Choices the paper does not pin down (also in docs/losses.md):

- Resolution H' x W' (eq. 1-2): the paper only says depth is *downsampled* to a lower
  resolution and CAMs are *upsampled* to it if they differ. `deal_loss(size=None)` uses the
  CAM's own resolution (depth goes down to it, eq. 2 is then the identity); `DEALTerm` with
  size=None uses the largest CAM resolution among the outputs it reads, so that in the
  two-CAM setups (eq. 14-15) the smaller CAM is upsampled as eq. 2 describes. Bicubic uses
  PyTorch's convention (align_corners=False, Keys cubic with a = -0.75, border samples
  replicated), no antialiasing unless asked for.
- Padding of the Sobel filter: replicate. A constant map then has zero gradient up to and
  including the border; zero padding would invent a frame-shaped edge of height "value at
  the border" (metres of depth!) around every map, which would dominate the per-map maximum
  and pull CAM edges to the image border.
- Convolution vs correlation: eq. 4-5 write a convolution; flipping the kernel only flips
  the sign of the x and y responses, so the magnitude is the same. We correlate (conv2d).
- The magnitude sqrt(gx^2 + gy^2) is computed with a zero (sub)gradient where gx = gy = 0,
  so flat CAMs (e.g. all 0 or all 1) give finite gradients instead of 0/0.
- Mapping magnitudes into [0, 1] before eq. 6-7 (a Sobel magnitude is unbounded, the logit
  needs [0, 1]): default "max" divides each map by its own maximum (per image and class for
  a, per image for d), max(., eps) in the denominator, so the strongest edge of each map is
  1 and an edgeless map is all 0. This is scale-free: depth in metres or any relative unit,
  and raw CAM scores of any scale, give the same loss. "fixed" divides by given bounds and
  clamps to [0, 1] (2 * sqrt(5) is the largest Sobel magnitude of a map with values in
  [0, 1]).
- Finiteness of eq. 6-7 at t = 0 and t = 1: we evaluate the algebraically identical form
  eta(t) = (c t^2 - (1 - t)^2) / (c t^2 + (1 - t)^2), c = exp(2 mu), which follows from
  tanh(z) = (e^{2z} - 1) / (e^{2z} + 1) with e^z = e^mu t / (1 - t). Its denominator is > 0 on
  all of [0, 1], so it is finite, with finite derivative, on the closed interval, and it
  equals the limits of eq. 6-7: eta(0) = -1, eta(1) = +1. No eps clamp is needed.
- CAM normalisation before eq. 2 (`cam_norm`): the paper feeds "the CAMs s" without saying
  which. "none" = raw scores (WeakTr, whose coarse and fine CAMs are raw class scores);
  "max" = ReLU then per-class division by the spatial maximum (SEAM's normalised CAM);
  "sigmoid". With edge_norm="max", "none" is invariant to any positive scale and offset of
  the scores, so "none" and "max" differ only through the ReLU.
- Classes: only classes with y_k = 1 enter (eq. 8 weights by y_k, divides by sum y_k);
  soft labels in [0, 1] act as weights. An image with sum_k y_k = 0 has no defined eq. 8
  term and is left out; the batch loss is the mean over the images that have a present
  class, and 0 (still attached to the graph) when none has.

Where depth comes from: `Sample.depth` of the dataset layouts (docs/datasets.md), an (H, W)
float32 map in metres, aligned with the image by the paired transforms, batched as
(B, 1, H, W). The NYU layout and folder layouts with a depth folder provide real or stored
depth; for RGB-only datasets (VOC, COCO) the paper uses monocular estimates (Depth Anything
V2 Base), which would be stored as a depth folder beforehand. Caveat: by the repository's
convention a depth of 0 means "no measurement" and augmentation pads depth with 0; the
paper does not preprocess depth, so such holes and padded borders produce depth edges that
DEAL will reward CAM edges for following. Crop without padding, or fill holes, when that
matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from weakseg.losses.base import LossTerm, foreground_channels
from weakseg.registry import register

CamNorm = Literal["none", "max", "sigmoid"]
EdgeNorm = Literal["max", "fixed"]

# Sobel kernels of eq. 3; G_x responds to vertical edges, G_y to horizontal ones.
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))

# Largest Sobel magnitude a map with values in [0, 1] can have (reached on a 3x3 0/1 corner
# pattern); a natural `cam_edge_scale` for edge_norm="fixed" with cam_norm="max"/"sigmoid".
MAX_SOBEL_MAGNITUDE_UNIT_RANGE = 2.0 * math.sqrt(5.0)


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def sobel_xy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> the G_x and G_y responses (eq. 3-5), each channel filtered on its own,
    with replicate padding so the output has the input's size."""
    _check_4d(x, "sobel_xy")
    b, c, h, w = x.shape
    kernels = torch.tensor((SOBEL_X, SOBEL_Y), dtype=x.dtype, device=x.device).unsqueeze(1)  # (2, 1, 3, 3)
    padded = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    responses = F.conv2d(padded, kernels)  # (B*C, 2, H, W); cross-correlation, see module doc
    return responses[:, 0].reshape(b, c, h, w), responses[:, 1].reshape(b, c, h, w)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """sqrt(G_x^2 + G_y^2) per channel (eq. 4 for CAMs, eq. 5 for depth), replicate padding.

    Where both responses are exactly 0 the value is 0 and the gradient is 0 (a subgradient)
    rather than the 0/0 of differentiating sqrt at 0."""
    gx, gy = sobel_xy(x)
    squared = gx * gx + gy * gy
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, torch.sqrt(safe), torch.zeros_like(squared))


def unit_edges(
    magnitude: torch.Tensor,
    mode: EdgeNorm = "max",
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Map non-negative edge magnitudes (B, C, H, W) into [0, 1], the domain of eq. 6-7.

    mode="max": t = m / max(max_ij m, eps), each (image, channel) map by its own maximum, so
    its strongest edge is exactly 1 and a map without edges is exactly 0 everywhere.
    mode="fixed": t = clamp(m / scale, 0, 1) with a given bound `scale`.
    Both end points are allowed: `edge_activation` is finite there."""
    _check_4d(magnitude, "unit_edges")
    if mode == "max":
        peak = magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(eps)
        return magnitude / peak
    if mode == "fixed":
        if scale is None or not scale > 0:
            raise ValueError(f"unit_edges: mode='fixed' needs a positive scale, got {scale}")
        return (magnitude / scale).clamp(0.0, 1.0)
    raise ValueError(f"unit_edges: mode must be 'max' or 'fixed', got {mode!r}")


def edge_activation(t: torch.Tensor, mu: float = 2.5) -> torch.Tensor:
    """eta(t) = tanh(mu + log(t / (1 - t))) for t in [0, 1] (eq. 6-7, icam eq. 12).

    Evaluated as (c t^2 - (1 - t)^2) / (c t^2 + (1 - t)^2) with c = exp(2 mu): the same
    function on (0, 1), and its continuous extension eta(0) = -1, eta(1) = +1 at the ends;
    value and derivative are finite on the whole closed interval (the denominator is at
    least c / (1 + c) > 0). The crossover eta = 0 is at t = 1 / (1 + e^mu) (0.076 for 2.5)."""
    if not math.isfinite(mu):
        raise ValueError(f"edge_activation: mu must be finite, got {mu}")
    c = math.exp(2.0 * mu)
    on = c * t * t
    off = (1.0 - t) * (1.0 - t)
    return (on - off) / (on + off)


def normalise_cams(cams: torch.Tensor, mode: CamNorm = "none", eps: float = 1e-5) -> torch.Tensor:
    """The CAM fed to eq. 2. "none": raw scores; "max": relu(s) / max(max_ij relu(s), eps)
    per image and class; "sigmoid": sigmoid(s)."""
    if mode == "none":
        return cams
    if mode == "max":
        r = F.relu(cams)
        return r / r.amax(dim=(2, 3), keepdim=True).clamp_min(eps)
    if mode == "sigmoid":
        return torch.sigmoid(cams)
    raise ValueError(f"cam_norm must be 'none', 'max' or 'sigmoid', got {mode!r}")


def _resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=antialias)


def deal_per_image(
    cams: torch.Tensor,
    depth: torch.Tensor,
    labels: torch.Tensor,
    mu: float = 2.5,
    size: tuple[int, int] | None = None,
    cam_norm: CamNorm = "none",
    edge_norm: EdgeNorm = "max",
    cam_edge_scale: float | None = None,
    depth_edge_scale: float | None = None,
    antialias: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-8 per image. Returns (loss (B,), valid (B,) bool); loss is 0 where not valid
    (no present class). Arguments as in `deal_loss`."""
    _check_4d(cams, "cams")
    _check_4d(depth, "depth")
    b, k = cams.shape[:2]
    if depth.shape[0] != b or depth.shape[1] != 1:
        raise ValueError(f"depth: expected ({b}, 1, H, W) for cams {tuple(cams.shape)}, got {tuple(depth.shape)}")
    if labels.shape != (b, k):
        raise ValueError(f"labels: expected ({b}, {k}) for cams {tuple(cams.shape)}, got {tuple(labels.shape)}")
    target = tuple(cams.shape[-2:]) if size is None else (int(size[0]), int(size[1]))

    depth_small = _resize(depth.to(cams.dtype), target, antialias)  # eq. 1
    cams_up = _resize(normalise_cams(cams, cam_norm), target, antialias)  # eq. 2
    a = sobel_magnitude(cams_up)  # eq. 3-4, (B, K, H', W'), one class at a time
    d = sobel_magnitude(depth_small)  # eq. 3, 5, (B, 1, H', W')
    a_act = edge_activation(unit_edges(a, edge_norm, cam_edge_scale, eps), mu)  # eq. 6
    d_act = edge_activation(unit_edges(d, edge_norm, depth_edge_scale, eps), mu)  # eq. 7

    y = labels.to(cams.dtype)
    present = y.sum(dim=1)  # sum_k y_k
    valid = present > 0
    weights = y / torch.where(valid, present, torch.ones_like(present)).unsqueeze(1)  # y_k / sum_c y_c
    # eq. 8: -(1/H'W') sum_ij sum_k (y_k / sum y) a'_kij d'_ij
    alignment = (a_act * d_act).mean(dim=(2, 3))  # (B, K): (1/H'W') sum_ij a'_kij d'_ij
    loss = -(weights * alignment).sum(dim=1)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def deal_loss(
    cams: torch.Tensor,
    depth: torch.Tensor,
    labels: torch.Tensor,
    mu: float = 2.5,
    size: tuple[int, int] | None = None,
    cam_norm: CamNorm = "none",
    edge_norm: EdgeNorm = "max",
    cam_edge_scale: float | None = None,
    depth_edge_scale: float | None = None,
    antialias: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DEAL L_edge (eq. 1-8), averaged over the images of the batch that have a present class.

    cams:   (B, K, Hc, Wc) class activation maps (channels in the order of `labels`).
    depth:  (B, 1, H, W) depth (metres in this package; any unit gives the same loss with
            edge_norm="max").
    labels: (B, K) image-level labels, 1 = present. Absent classes do not contribute.
    size:   H' x W' of eq. 1-2; None = the CAM's resolution.
    cam_norm / edge_norm / *_edge_scale / eps: see the module docstring.
    antialias: antialiased bicubic when downsampling (off: plain bicubic as in eq. 1).

    Returns a scalar: lower when CAM edges lie on depth edges (range [-1, 1]); 0, attached
    to the graph, when no image has a present class."""
    loss, valid = deal_per_image(
        cams, depth, labels, mu, size, cam_norm, edge_norm, cam_edge_scale, depth_edge_scale, antialias, eps
    )
    count = valid.sum()
    return loss.sum() / count.clamp_min(1).to(loss.dtype)


@dataclass
class DEALConfig:
    weight: float = 0.04
    warmup_epochs: int = 0  # presets: 20 of 60 epochs (WeakTr), 3 of 8 (SEAM)
    mu: float = 2.5
    cam_norm: Literal["none", "max", "sigmoid"] = "none"
    size: list[int] | None = None  # H' x W' of deal eq. 1-2; None: the largest CAM grid read
    reads: list[str] | None = None  # None: loss.reads


class DEALTerm(LossTerm):
    """L_edge as a training loss term (deal eq. 14-15: L_total = L_method + w_edge L_edge).

    reads: the model outputs (each (B, K[+1], h, w) CAMs) DEAL is applied to; with several,
           all are brought to one resolution (the largest, or `size`) and the losses averaged.
    Needs "depth" (B, 1, H, W) metres and "labels" (B, K) in the batch. Epochs count from 0:
    `weight_at(e)` is 0 for e < warmup_epochs and `weight` after.
    """

    name = "deal"
    needs_depth = True
    needs: ClassVar[tuple[str, ...]] = ("depth", "labels")

    def __init__(
        self,
        weight: float = 0.04,
        warmup_epochs: int = 0,
        reads: tuple[str, ...] | str = ("cams",),
        mu: float = 2.5,
        size: tuple[int, int] | None = None,
        cam_norm: CamNorm = "none",
        edge_norm: EdgeNorm = "max",
        cam_edge_scale: float | None = None,
        depth_edge_scale: float | None = None,
        antialias: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__(weight, warmup_epochs, reads)
        self.mu, self.size, self.cam_norm, self.edge_norm = mu, size, cam_norm, edge_norm
        self.cam_edge_scale, self.depth_edge_scale = cam_edge_scale, depth_edge_scale
        self.antialias, self.eps = antialias, eps

    def resolution(self, outputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """H' x W': `size` if given, else the largest CAM resolution among `reads`."""
        if self.size is not None:
            return (int(self.size[0]), int(self.size[1]))
        shapes = [tuple(outputs[name].shape[-2:]) for name in self.reads]
        return max(shapes, key=lambda hw: (hw[0] * hw[1], hw))

    def loss(self, outputs: dict, batch: dict, background_channel: int | None = None) -> torch.Tensor:
        """Unweighted L_edge averaged over `reads` (eq. 14-15)."""
        self.check_reads(outputs)
        target = self.resolution(outputs)
        terms = [
            deal_loss(
                foreground_channels(outputs[name], background_channel),
                batch["depth"],
                batch["labels"],
                mu=self.mu,
                size=target,
                cam_norm=self.cam_norm,
                edge_norm=self.edge_norm,
                cam_edge_scale=self.cam_edge_scale,
                depth_edge_scale=self.depth_edge_scale,
                antialias=self.antialias,
                eps=self.eps,
            )
            for name in self.reads
        ]
        return torch.stack(terms).mean()


@register("loss_term", "deal")
def build_deal(config: DEALConfig, reads: list[str], generator=None) -> list[LossTerm]:
    return [DEALTerm(weight=config.weight, warmup_epochs=config.warmup_epochs, reads=config.reads or reads,
                     mu=config.mu, cam_norm=config.cam_norm, size=tuple(config.size) if config.size else None)]
