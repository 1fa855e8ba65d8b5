"""Importance sampling loss (ISL): a stochastic image-level prediction read at pixels drawn
from the class-wise distribution the CAM itself induces, mixed with the GAP prediction.

Two posteriors:
- multinomial (icam eq. 1-8): a = softmax over the K = C + 1 channels (background
  included) of the class scores s; p_k(i, j) = a_k(i, j) / sum a_k (eq. 5); the sampled
  prediction is a_k at the drawn pixel (eq. 6); defaults N = 100, lambda = 0.8 (icam §4.2).
- binomial (hfpl eq. 14-18): b = sigmoid(s) per class, p_c = b_c / sum b_c (eq. 15), the
  sampled prediction is b_c at the drawn pixel; defaults N = 10, lambda = 0.2 (hfpl §5).

Both: L_cls = (1 - lambda) L_ce(y, GAP prediction) + lambda (1/N) sum_n L_ce(y, sampled_n)
(icam eq. 7-8, hfpl eq. 16-18), with L_ce the class-averaged binary cross-entropy. The GAP
prediction is sigmoid(mean_ij s_k) (icam eq. 2-3, hfpl eq. 17). The pixel draws are not
differentiated; the gradient flows through the activation read at the drawn pixel.
All log-probabilities are computed from the scores in log space, so probabilities of
exactly 0 or 1 (saturated scores) give finite losses and gradients.

Multinomial variants (`variant`): "official" (default) is what icam's public code computes
(arvijj/icam train_cam.py with tool/probutils.py): both the GAP term and the sampled term
on the foreground channels only (the pixels are drawn on all K channels, the background
draws unused), and the sampled probabilities smoothed, a' = (a (1 - 1e-3) + 1e-3) / (1 + 1e-3)
(the sigmoid of its `probs_to_logits(a, eps=1e-3)`). "paper": icam eq. 7-8 as written, K
including the background (label 1 in every image), unsmoothed. With eps = 0 and all K
channels the two agree to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_pixels(probabilities: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) non-negative weights -> (B, C, N) flat pixel indices drawn with replacement,
    each pixel with probability proportional to its weight (icam eq. 5, hfpl eq. 15).

    A map whose weights are all zero (possible only for an underflowed multinomial) is
    sampled uniformly rather than failing."""
    b, c, h, w = probabilities.shape
    flat = probabilities.detach().reshape(b * c, h * w).double()
    empty = flat.sum(dim=1) <= 0
    if empty.any():
        flat[empty] = 1.0
    drawn = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
    return drawn.view(b, c, num_samples)


def _bce_from_logs(labels: torch.Tensor, log_p: torch.Tensor, log_not_p: torch.Tensor) -> torch.Tensor:
    """-(y log p + (1 - y) log(1 - p)), averaged over everything (classes, samples, batch)."""
    return -(labels * log_p + (1.0 - labels) * log_not_p).mean()


def gap_bce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ce(y, sigmoid(GAP of scores)) averaged over classes and images (icam eq. 2-3, 7)."""
    logits = scores.mean(dim=(2, 3))
    return F.binary_cross_entropy_with_logits(logits, labels)


def binomial_isl(
    scores: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int = 10,
    lam: float = 0.2,
    generator: torch.Generator | None = None,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """hfpl eq. 14-18. scores: (B, C, H, W) foreground class scores; labels: (B, C) multi-hot.
    `pixels` (B, C, N) fixes the draws (tests); otherwise they are sampled from b + 1e-5, as
    hfpl's train_cam_voc.py weighs them (so a map of saturated negatives is drawn from, not
    refused; the draws change by at most 1e-5 of weight per pixel)."""
    b_post = torch.sigmoid(scores)
    if pixels is None:
        pixels = sample_pixels(b_post + 1e-5, num_samples, generator)
    picked = scores.flatten(2).gather(2, pixels)  # (B, C, N) scores at the drawn pixels
    y = labels.unsqueeze(-1).expand_as(picked)
    sampled = _bce_from_logs(y, F.logsigmoid(picked), F.logsigmoid(-picked))
    return (1.0 - lam) * gap_bce(scores, labels) + lam * sampled


def multinomial_isl(
    scores: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int = 100,
    lam: float = 0.8,
    generator: torch.Generator | None = None,
    pixels: torch.Tensor | None = None,
    background_channel: int = 0,
    variant: str = "official",
    smoothing: float = 1e-3,
) -> torch.Tensor:
    """icam eq. 1-8. scores: (B, K, H, W) with K = C + 1 channels, background at
    `background_channel`; labels: (B, C) multi-hot over the foreground classes (the
    background label is 1 in every image). `pixels` (B, K, N) fixes the draws (tests).
    `variant`/`smoothing`: see the module docstring."""
    bsz, k, _, _ = scores.shape
    fg = [c for c in range(k) if c != background_channel]
    full_labels = torch.ones(bsz, k, dtype=scores.dtype, device=scores.device)
    full_labels[:, fg] = labels.to(scores.dtype)
    log_a = F.log_softmax(scores, dim=1)  # eq. 1 in log space
    if pixels is None:
        pixels = sample_pixels(log_a.exp(), num_samples, generator)
    if variant == "official":
        y = labels.to(scores.dtype)
        a = log_a.exp()[:, fg].flatten(2).gather(2, pixels[:, fg])  # (B, C, N): a_k at k's draws
        keep = 1.0 - smoothing
        log_p = torch.log(a * keep + smoothing) - math.log1p(smoothing)
        log_not_p = torch.log1p(-a * keep) - math.log1p(smoothing)
        sampled = _bce_from_logs(y.unsqueeze(-1).expand_as(a), log_p, log_not_p)
        return (1.0 - lam) * gap_bce(scores[:, fg], y) + lam * sampled
    if variant != "paper":
        raise ValueError(f"multinomial ISL variant must be 'official' or 'paper', got {variant!r}")
    n = pixels.shape[-1]
    flat_scores = scores.flatten(2)  # (B, K, HW)
    # log(1 - a_k) = logsumexp_{t != k} s_t - logsumexp_t s_t: finite even when a_k -> 1.
    log_a_picked = log_a.flatten(2).gather(2, pixels)  # (B, K, N)
    logs_not = []
    for ch in range(k):
        others = [t for t in range(k) if t != ch]
        at_pixels = flat_scores.gather(2, pixels[:, ch : ch + 1].expand(bsz, k, n))  # all channels at k's draws
        logs_not.append(torch.logsumexp(at_pixels[:, others], dim=1) - torch.logsumexp(at_pixels, dim=1))
    log_not_picked = torch.stack(logs_not, dim=1)
    y = full_labels.unsqueeze(-1).expand_as(log_a_picked)
    sampled = _bce_from_logs(y, log_a_picked, log_not_picked)
    return (1.0 - lam) * gap_bce(scores, full_labels) + lam * sampled
