"""Feature similarity loss (FSL): CAM contours should follow colour edges.

icam eq. 9-13, with the binomial adaptations of hfpl §4.3 and the L2 colour distance of
DEAL eq. 11:

    L_fs = -1/(HW) * sum_{i,j} w_ij * g(p_i, p_j) * f(d(x_i, x_j))
    w_ij = exp(-|pos_i - pos_j|^2 / (2 sigma^2)) / (2 pi sigma^2)        (icam eq. 10)
    g    = 1/2 * sum_c m_c (p_ic - p_jc)^2                                 (icam eq. 11)
    f(d) = tanh(mu + log(d / (1 - d)))                                     (icam eq. 12)
    d    = |x_i - x_j|_1 / 3  (icam eq. 13)   or   |x_i - x_j|_2 / 3  (DEAL eq. 11)

Normalisation: icam eq. 9 writes 1/(HW)^2, which is the right scale when every pair has
weight 1/(HW); with the Gaussian w (which sums to ~1 over j) the per-image sum is divided by
HW, as DEAL eq. 11 writes it and as the public ICAM/hfpl code computes it. The loss is
averaged over the batch. m_c masks classes absent from the image (hfpl §4.3); with the
multinomial input every channel counts (icam).

The gate input p is chosen by `gate`: "r" the max-normalised CAM ReLU(s)/max s (hfpl
default, eq. 4), "b" sigmoid(s) (hfpl eq. 14), "s" raw scores, "a" softmax over the C+1
channels with background (icam eq. 1). The image x is RGB in [0, 1], resized to the CAM grid.

Window: pairs farther apart than `radius` (default ceil(4.4 sigma): 22 at sigma 5) are
dropped; the official code sums all pairs. The dropped share of the Gaussian weight around a
pixel is about exp(-radius^2 / (2 sigma^2)) (the 2-D tail outside a disk: 6e-5 at 4.4 sigma,
1.1 % at 3 sigma); since |g f| <= C_present / 2 for p in [0, 1], the absolute truncation
error per image is at most C_present / 2 times that tail. Measured at 56x56, 21 classes: the
windowed loss is 4e-5 of its value away from all pairs at radius 22 (0.8 % at radius 15).
`window_truncation_bound` computes the bound with the exact lattice sum, and the tests check
that the windowed loss stays within it of the all-pairs loss.

Variants (`variant`): "official" (default) is what the public hfpl and ICAM code computes
(hfpl tool/probutils.py feature_similarity_loss and train_cam_voc.py; icam the same function):
f(d) = tanh(mu + log((d + 1e-5) / (1 - d + 1e-5))) with d clamped to [0, 1]; the image resized
to the CAM grid with align_corners=True; for the binomial gates a background channel
1 - max_c p_c (of the label-masked class maps) compared with the present classes, and gate
"r" max-normalised as hfpl's max_norm: relu(s - min s - 1e-5) / (max s - min s + 1e-5) after a
ReLU. "paper": the text (f with d clamped to [1e-5, 1 - 1e-5], align_corners=False, present
foreground classes only, relu(s) / (max s + 1e-5)).

`feature_similarity_loss` visits each window offset once (both orders of a pair share it)
and, with fixed mu and sigma, computes the gradient in the same pass (a custom autograd
function), so memory stays O(B C H W) instead of O(B C (HW)^2) for all pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from weakseg.losses.base import LossTerm, foreground_channels
from weakseg.models.inference import min_max_norm
from weakseg.registry import register

ACTIVATION_EPS = 1e-5
Variant = Literal["official", "paper"]


def _odds_terms(d: torch.Tensor, eps: float, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of the odds inside f: official (hfpl/icam code) d + eps and
    1 - d + eps with d in [0, 1]; paper d and 1 - d with d clamped to [eps, 1 - eps]."""
    if variant == "official":
        d = d.clamp(0.0, 1.0)
        return d + eps, 1.0 - d + eps
    d = d.clamp(eps, 1.0 - eps)
    return d, 1.0 - d


def similarity_activation(d: torch.Tensor, mu: float | torch.Tensor, eps: float = ACTIVATION_EPS,
                          variant: Variant = "official") -> torch.Tensor:
    """f(d) = tanh(mu + log(d/(1-d))) (icam eq. 12), finite at d = 0 (identical colours) and
    d = 1 by the variant's epsilon (see the module docstring)."""
    top, bottom = _odds_terms(d, eps, variant)
    return torch.tanh(mu + torch.log(top) - torch.log(bottom))


def _activation_of_distance(d: torch.Tensor, e_mu_sq: float, eps: float = ACTIVATION_EPS,
                            variant: Variant = "official") -> torch.Tensor:
    """similarity_activation without transcendentals, for the fixed-mu hot loop: with
    x = e^mu a/b (a, b the odds terms), tanh(log x) = (x^2 - 1)/(x^2 + 1) = (e^{2mu} a^2 - b^2)/(e^{2mu} a^2 + b^2).
    Equal to similarity_activation up to rounding (tested)."""
    top, bottom = _odds_terms(d, eps, variant)
    u = top.square().mul_(e_mu_sq)
    v = bottom.square()
    return (u - v).div_(u.add_(v))


def colour_distance(x_a: torch.Tensor, x_b: torch.Tensor, metric: Literal["l1", "l2"] = "l1") -> torch.Tensor:
    """d over the channel dim, divided by 3 (icam eq. 13 for l1; DEAL eq. 11 for l2)."""
    diff = x_a - x_b
    if metric == "l1":
        return diff.abs().sum(dim=1) / 3.0
    if metric == "l2":
        return diff.pow(2).sum(dim=1).sqrt() / 3.0
    raise ValueError(f"colour distance must be 'l1' or 'l2', got {metric!r}")


def default_radius(sigma: float) -> int:
    """ceil(4.4 sigma): the Gaussian tail left out is exp(-4.4^2 / 2) = 6e-5 of the weight."""
    return int(math.ceil(4.4 * float(sigma)))


def window_truncation_bound(sigma: float, radius: int, num_present: int) -> float:
    """Upper bound on |L_window - L_all_pairs| for one image with p in [0, 1]: C_present/2
    times the lattice sum of w over offsets outside the window (computed, not approximated)."""
    reach = int(math.ceil(12 * sigma)) + radius
    ys, xs = torch.meshgrid(torch.arange(-reach, reach + 1), torch.arange(-reach, reach + 1), indexing="ij")
    r2 = (ys * ys + xs * xs).double()
    w = torch.exp(-r2 / (2.0 * sigma**2)) / (2.0 * math.pi * sigma**2)
    return 0.5 * num_present * float(w[r2 > radius * radius].sum())


def half_window_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) with 0 < dy^2 + dx^2 <= radius^2, one of each +/- pair."""
    out = []
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx > radius * radius:
                continue
            out.append((dy, dx))
    return out


def _pair_slices(dy: int, dx: int, h: int, w: int):
    """Slices (rows_a, cols_a, rows_b, cols_b) such that pixel b = a + (dy, dx)."""
    ra = slice(0, h - dy)
    rb = slice(dy, h)
    if dx >= 0:
        ca, cb = slice(0, w - dx), slice(dx, w)
    else:
        ca, cb = slice(-dx, w), slice(0, w + dx)
    return ra, ca, rb, cb


class _WindowedFSL(torch.autograd.Function):
    """Loss and its gradient w.r.t. p in one pass over the window offsets (mu, sigma fixed).

    Why it is fast: only the (image, class) rows whose mask is 1 are computed (VOC: ~1.5 of
    20 per image), and the pair sum is taken in its graph-Laplacian form. With A_ij = w_ij f_ij
    (symmetric) and D_i = sum_j A_ij,

        sum_{i<j} A_ij (p_i - p_j)^2 = sum_i D_i p_i^2 - sum_i p_i (A p)_i,
        d/dp_i                       = 2 (D_i p_i - (A p)_i),

    so each offset costs two fused multiply-adds on the rows (A p, both directions of the
    pair) plus the class-free colour term f on the images, instead of a difference, a square
    and two scatters per class.
    """

    @staticmethod
    def forward(ctx, p, mask, image, mu, sigma, radius, metric, variant):
        b, c, h, w = p.shape
        rows = mask.detach().nonzero(as_tuple=False)  # (N, 2): (image, class) pairs that count
        n = rows.shape[0]
        # One extra row of ones per image: A 1 = D, so the degree comes out of the same sums.
        q = torch.cat([p.detach()[rows[:, 0], rows[:, 1]], p.new_ones(b, h, w)])  # (N + B, h, w)
        image_of_row = torch.cat([rows[:, 0], torch.arange(b, device=p.device)])
        a_q = torch.zeros_like(q)
        e_mu_sq = math.exp(2.0 * mu)
        for dy, dx in half_window_offsets(radius):
            if dy >= h or abs(dx) >= w:
                continue
            weight = math.exp(-(dy * dy + dx * dx) / (2.0 * sigma * sigma)) / (2.0 * math.pi * sigma * sigma)
            ra, ca, rb, cb = _pair_slices(dy, dx, h, w)
            distance = colour_distance(image[:, :, ra, ca], image[:, :, rb, cb], metric)
            a = weight * _activation_of_distance(distance, e_mu_sq, variant=variant)
            a_rows = a.index_select(0, image_of_row)
            a_q[:, ra, ca].addcmul_(a_rows, q[:, rb, cb])
            a_q[:, rb, cb].addcmul_(a_rows, q[:, ra, ca])
        q, a_q, degree = q[:n], a_q[:n], a_q[n:]
        scale = 1.0 / (b * h * w)  # per-image 1/(HW), mean over the batch
        laplacian_q = degree.index_select(0, rows[:, 0]) * q - a_q  # (D - A) q
        total = -scale * (q * laplacian_q).sum()  # both orders of each pair x g's 1/2
        grad = torch.zeros_like(p.detach())
        grad[rows[:, 0], rows[:, 1]] = (-2.0 * scale) * laplacian_q
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None, None, None


def _windowed_autograd(p, mask, image, mu, sigma, radius, metric, variant):
    """The same sum through plain autograd: used when mu or sigma are learnable tensors."""
    b, c, h, w = p.shape
    m = mask.view(b, c, 1, 1).to(p.dtype)
    total = p.new_zeros(())
    for dy, dx in half_window_offsets(radius):
        if dy >= h or abs(dx) >= w:
            continue
        weight = torch.exp(-torch.as_tensor(float(dy * dy + dx * dx), dtype=p.dtype) / (2.0 * sigma**2)) / (
            2.0 * math.pi * sigma**2
        )
        ra, ca, rb, cb = _pair_slices(dy, dx, h, w)
        f = similarity_activation(colour_distance(image[:, :, ra, ca], image[:, :, rb, cb], metric), mu, variant=variant)
        diff = (p[:, :, ra, ca] - p[:, :, rb, cb]) * m
        total = total - weight * (f.unsqueeze(1) * diff * diff).sum()  # 2 (orders) x 1/2 (g)
    return total / (b * h * w)


def feature_similarity_loss(
    p: torch.Tensor,
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    mu: float | torch.Tensor = 2.5,
    sigma: float | torch.Tensor = 5.0,
    radius: int | None = None,
    metric: Literal["l1", "l2"] = "l1",
    variant: Variant = "official",
) -> torch.Tensor:
    """Windowed FSL. p: (B, C, h, w) gate input; image: (B, 3, h, w) RGB in [0, 1] on the
    same grid (no gradient); mask: (B, C) nonzero for classes that count (default all)."""
    if p.dim() != 4 or image.dim() != 4 or image.shape[2:] != p.shape[2:] or image.shape[0] != p.shape[0]:
        raise ValueError(f"p {tuple(p.shape)} and image {tuple(image.shape)} must be (B, C, h, w) on one grid")
    if mask is None:
        mask = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)
    mask = (mask.detach() != 0).to(p.dtype)  # a class counts or it does not (hfpl §4.3)
    # Channels masked out in every image contribute nothing: skip them (VOC: ~2 of 20 present).
    active = mask.detach().bool().any(dim=0)
    if not active.all():
        p, mask = p[:, active], mask[:, active]
    image = image.detach().to(p.dtype)
    learnable = any(isinstance(v, torch.Tensor) and v.requires_grad for v in (mu, sigma))
    sigma_value = float(sigma.detach()) if isinstance(sigma, torch.Tensor) else float(sigma)
    if radius is None:
        radius = default_radius(sigma_value)
    if learnable:
        return _windowed_autograd(p, mask, image, mu, sigma, radius, metric, variant)
    mu_value = float(mu.detach()) if isinstance(mu, torch.Tensor) else float(mu)
    return _WindowedFSL.apply(p, mask.detach(), image, mu_value, sigma_value, radius, metric, variant)


def feature_similarity_loss_all_pairs(
    p: torch.Tensor,
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    mu: float = 2.5,
    sigma: float = 5.0,
    metric: Literal["l1", "l2"] = "l1",
    variant: Variant = "official",
) -> torch.Tensor:
    """The literal all-pairs formula with (HW x HW) matrices: the reference the windowed
    version is benchmarked against (memory O(B C (HW)^2))."""
    b, c, h, w = p.shape
    if mask is None:
        mask = torch.ones(b, c, dtype=p.dtype, device=p.device)
    pts = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).view(-1, 2).to(p)
    dist2 = torch.cdist(pts, pts).pow(2)
    weights = torch.exp(-dist2 / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    x = image.detach().to(p.dtype).flatten(2).transpose(1, 2)  # (B, HW, 3)
    d = torch.cdist(x, x, p=1.0 if metric == "l1" else 2.0) / 3.0
    f = similarity_activation(d, mu, variant=variant)
    q = (p * mask.view(b, c, 1, 1)).flatten(2)  # (B, C, HW)
    g = 0.5 * (q.unsqueeze(-1) - q.unsqueeze(-2)).pow(2).sum(dim=1)  # (B, HW, HW)
    return -(weights * f * g).sum() / (b * h * w)


GateInput = Literal["r", "b", "s", "a"]


def gate_input(scores: torch.Tensor, gate: GateInput, background_channel: int | None = None,
               variant: Variant = "official") -> torch.Tensor:
    """The prediction FSL compares between pixels (hfpl §4.3; icam eq. 1 for "a"); gate "r"
    with the official variant is hfpl's max_norm."""
    if gate == "r":
        if variant == "official":
            return min_max_norm(scores)  # hfpl's max_norm
        pos = F.relu(scores)
        return pos / (pos.flatten(2).amax(dim=2)[..., None, None] + 1e-5)
    if gate == "b":
        return torch.sigmoid(scores)
    if gate == "s":
        return scores
    if gate == "a":
        if background_channel is None:
            raise ValueError("gate 'a' (multinomial) needs scores with a background channel")
        return torch.softmax(scores, dim=1)
    raise ValueError(f"gate must be one of r, b, s, a; got {gate!r}")


@dataclass
class FSLConfig:
    weight: float = 1.0
    warmup_epochs: int = 0
    gate: Literal["r", "b", "s", "a"] = "r"
    mu: float = 2.5
    sigma: float = 5.0
    metric: Literal["l1", "l2"] = "l1"
    radius: int | None = None  # None: ceil(4.4 sigma) (weakseg.losses.fsl.default_radius)
    upsample: int = 1
    learnable: bool = False
    reads: list[str] | None = None  # None: loss.reads
    # "official": the public hfpl/ICAM code (background channel, hfpl's max_norm, epsilon,
    # align_corners); "paper": the text. See the module docstring and docs/fidelity.md.
    variant: Literal["official", "paper"] = "official"


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
        official = cfg.variant == "official"
        if cfg.gate == "a":
            p = gate_input(scores, "a", background_channel)
            mask = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)  # icam: every channel
        else:
            p = gate_input(foreground_channels(scores, background_channel), cfg.gate, variant=cfg.variant)
            mask = batch["labels"].to(p.dtype)  # hfpl §4.3: only present classes
            if official and cfg.gate in ("r", "b"):
                # hfpl train_cam_voc.py: the label-masked maps plus a background channel
                # 1 - max_c of them, which always counts.
                p = p * mask[:, :, None, None]
                p = torch.cat([1.0 - p.amax(dim=1, keepdim=True), p], dim=1)
                mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        rgb = F.interpolate(batch["rgb"], size=p.shape[2:], mode="bilinear", align_corners=official)
        return feature_similarity_loss(p, rgb, mask, self.mu, self.sigma, cfg.radius, cfg.metric, cfg.variant)


@register("loss_term", "fsl")
def build_fsl(config: FSLConfig, reads: list[str], generator=None) -> list[LossTerm]:
    return [FSLTerm(config, config.reads or reads)]
