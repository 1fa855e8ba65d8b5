"""PAMR and SPR: iterative refinement with local, image-adaptive affinities (PyTorch, batched,
CPU or CUDA).

PAMR, pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation
from Image Labels", CVPR 2020, Sec. 3). The paper's text is not in ../shared/papers, so its
equation numbers are not cited; the details below are those of the authors' public code
(visinf/1-stage-wseg, models/mods/pamr.py), re-implemented here:

    neighbours  N_i: for each dilation d in (1, 2, 4, 8, 12, 24), the 8 pixels of the 3x3
                window around i at spacing d, i.e. 8 * len(dilations) = 48 neighbours. The
                centre is EXCLUDED from N_i (it never propagates to itself); image borders are
                handled by replicate padding (a neighbour outside the image is the nearest
                border pixel, so near a border the centre can still come back as a clamped
                neighbour).
    sigma_i^c:  local standard deviation of colour channel c over the 3x3 window at every
                dilation, centre included once per dilation (9 * len(dilations) samples, the
                centre counted len(dilations) times), with the unbiased (n - 1) estimator.
    kernel:     k(i, j) = -1/3 sum_c |x_i^c - x_j^c| / (eps + lam * sigma_i^c),  lam = 0.1, eps = 1e-8
                (colour differences in units of the local contrast, averaged over channels).
    affinity:   a_ij = softmax_{j in N_i} k(i, j)   (one softmax over all 48 neighbours).
    iteration:  p_i <- sum_{j in N_i} a_ij p_j,   T = 10 times, affinities fixed.

Both run under torch.no_grad(): they make pseudo labels and post-process CAMs, and neither
method back-propagates through the refinement.

Because each a_i. is a distribution shared by all classes, every iteration is a convex
combination of probability vectors, so probabilities stay normalised (the result is divided
by its per-pixel sum once at the end only to remove float rounding drift). Dividing by
lam * sigma_i^c makes the kernel invariant to a per-channel affine change of the image
(uint8 vs [0, 1] vs ImageNet-normalised) up to eps.

SPR, semantics-augmented pixel refinement (Kho, Lee, Lee, Ki & Byun, "Exploiting Shape Cues for Weakly
Supervised Semantic Segmentation", ../shared/papers/shape-cues-single-stage.txt, Sec. 3.2.1):

    k^c(i, j)   = -alpha ||x_i - x_j|| / sigma_x^2 - (1 - alpha) |s_i^c - s_j^c| / (sigma_s^c)^2   (eq. 5)
    delta^c_j->i = softmax_{j in N_i} k^c(i, j)
    m^c_{i;t}   = sum_{j in N_i} delta^c_j->i m^c_{j;t-1},   m_{;0} = m,  T = 10                  (eq. 6)

with alpha = 0.8 and R_2 = {1, 2, 4, 8, 12, 24} 3x3 windows (Sec. 4.1.3). Our reading where the
text is ambiguous:

  * The colour term is exactly the PAMR kernel above. The paper says that with alpha = 1 SPR
    "relies exclusively on pixel intensities, which is what the previous methods do" and cites
    PAMR [12]; so ||x_i - x_j|| / sigma_x^2 is read as PAMR's contrast-normalised colour
    distance (per-channel |.| / (lam * local std), averaged over channels), not a literal
    Euclidean norm over a squared global std. This makes spr(alpha=1) == pamr (tested).
  * The semantic term is normalised the same way: |s_i^c - s_j^c| / (eps + lam * sigma_s^c,i)
    with sigma_s^c,i the local std of class c's score over the same samples as sigma_i.
  * s: eq. 5 uses the scores s (the paper's S, before its softmax); a refiner only receives
    probabilities, so by default s = m_0, the input probabilities. `scores=` accepts other
    per-class maps (e.g. the network's logits). Affinities are computed once from the inputs
    and kept fixed over the T iterations (the paper computes them "with the defined kernel in
    Eq. 5" and then "repeatedly refines" M).
  * The affinities now differ per class, so eq. 6 does not keep sum_c m^c_i = 1. We iterate
    eq. 6 as written and divide by the per-pixel sum once at the end (the refiner interface
    needs probabilities; the argmax that makes the pseudo mask is unchanged by it). The
    paper's pseudo-mask thresholding (60 % of the max) is not part of the refiner.
  * Like PAMR, the centre pixel is excluded from N_i (the paper's "pixels in the window" could
    include it; excluding it is what makes alpha = 1 coincide with PAMR).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from weakseg.refine.base import check_inputs

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
DEFAULT_ITERATIONS = 10
SPR_ALPHA = 0.8
STD_SCALE = 0.1  # lam: the public PAMR divides colour differences by 0.1 * local std
STD_EPS = 1e-8


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 non-centre pixels of the 3x3 window at each dilation, in order."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


class _Shifter:
    """Replicate-pads once by the largest offset; `shifted(dy, dx)` is then a view whose pixel
    (y, x) holds the input at (clamp(y + dy), clamp(x + dx)), i.e. replicate padding at any
    dilation without padding again per offset."""

    def __init__(self, x: torch.Tensor, reach: int) -> None:
        self.h, self.w, self.r = x.shape[-2], x.shape[-1], reach
        self.padded = torch.nn.functional.pad(x, [reach] * 4, mode="replicate") if reach else x

    def shifted(self, dy: int, dx: int) -> torch.Tensor:
        r = self.r
        return self.padded[..., r + dy : r + dy + self.h, r + dx : r + dx + self.w]


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    dil = tuple(dilations)
    if not dil or any(int(d) != d or d < 1 for d in dil):
        raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {dilations!r}")
    return tuple(int(d) for d in dil)


def _check_tensors(probs: torch.Tensor, image: torch.Tensor, who: str) -> None:
    if not isinstance(probs, torch.Tensor) or not isinstance(image, torch.Tensor):
        raise ValueError(f"{who}: probs and image must be torch tensors, got {type(probs)} and {type(image)}")
    if probs.ndim != 4 or probs.shape[1] < 1 or not probs.is_floating_point():
        raise ValueError(f"{who}: probs must be a float tensor (B, K, H, W), got {probs.dtype} {tuple(probs.shape)}")
    if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"{who}: image must be a float tensor (B, 3, H, W), got {image.dtype} {tuple(image.shape)}")
    if image.shape[0] != probs.shape[0] or image.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"{who}: image {tuple(image.shape)} and probs {tuple(probs.shape)} differ in batch size or spatial size"
        )
    if image.device != probs.device:
        raise ValueError(f"{who}: image is on {image.device} but probs on {probs.device}")


def local_std(x: torch.Tensor, offsets: list[tuple[int, int]], num_dilations: int) -> torch.Tensor:
    """Per-channel std over the centre (counted once per dilation) and its neighbours, unbiased.
    Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels
    catastrophically in flat regions of a uint8-range image."""
    sh = _Shifter(x, max(max(abs(dy), abs(dx)) for dy, dx in offsets))
    n = len(offsets) + num_dilations
    total = x * num_dilations
    for dy, dx in offsets:
        total = total + sh.shifted(dy, dx)
    mean = total / n
    sq = (x - mean).square() * num_dilations
    for dy, dx in offsets:
        sq = sq + (sh.shifted(dy, dx) - mean).square()
    return (sq / (n - 1)).sqrt()


def contrast_kernel(x: torch.Tensor, offsets: list[tuple[int, int]], num_dilations: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, P, H, W): -|x_i^c - x_j^c| / (eps + lam sigma_i^c) for the P
    neighbours, per channel (the caller averages channels for colour)."""
    denom = STD_EPS + STD_SCALE * local_std(x, offsets, num_dilations)
    sh = _Shifter(x, max(max(abs(dy), abs(dx)) for dy, dx in offsets))
    return torch.stack([-(x - sh.shifted(dy, dx)).abs() / denom for dy, dx in offsets], dim=2)


def _propagate(probs: torch.Tensor, affinity: torch.Tensor, offsets, iterations: int) -> torch.Tensor:
    """p_i <- sum_j a_ij p_j, `iterations` times; affinity (B, 1 or K, P, H, W)."""
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    p = probs
    for _ in range(iterations):
        sh = _Shifter(p, reach)
        out = torch.zeros_like(p)
        for n, (dy, dx) in enumerate(offsets):
            out.addcmul_(affinity[:, :, n], sh.shifted(dy, dx))
        p = out
    return p


def _normalise(p: torch.Tensor) -> torch.Tensor:
    """Divide by the per-pixel sum over K. For PAMR the sum is already 1 in exact arithmetic;
    in float32 ten iterations of 48-term sums drift by ~1e-6, which this removes."""
    return p / p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS) -> torch.Tensor:
    """Image (B, 3, H, W) float -> PAMR affinities (B, 1, P, H, W), softmax over the P = 8 *
    len(dilations) neighbours of `neighbour_offsets(dilations)`."""
    dil = _check_dilations(dilations)
    offsets = neighbour_offsets(dil)
    k = contrast_kernel(image, offsets, len(dil)).mean(dim=1, keepdim=True)
    return torch.softmax(k, dim=2)


@torch.no_grad()
def pamr(
    probs: torch.Tensor,
    image: torch.Tensor,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    iterations: int = DEFAULT_ITERATIONS,
) -> torch.Tensor:
    """PAMR: probs (B, K, H, W), image (B, 3, H, W) float (any per-channel scale) -> refined
    probs (B, K, H, W) in probs' dtype."""
    _check_tensors(probs, image, "pamr")
    if iterations < 0:
        raise ValueError(f"pamr: iterations must be >= 0, got {iterations}")
    dil = _check_dilations(dilations)
    aff = pamr_affinity(image.to(probs.dtype), dil)
    refined = _propagate(probs, aff, neighbour_offsets(dil), iterations)
    return _normalise(refined)


@torch.no_grad()
def spr(
    probs: torch.Tensor,
    image: torch.Tensor,
    alpha: float = SPR_ALPHA,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    iterations: int = DEFAULT_ITERATIONS,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPR (eq. 5-6): like `pamr`, with per-class affinities mixing the colour kernel (weight
    alpha) and a kernel on `scores` (default: the input probs; weight 1 - alpha). The result
    is normalised per pixel once at the end."""
    _check_tensors(probs, image, "spr")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"spr: alpha must be in [0, 1], got {alpha}")
    if iterations < 0:
        raise ValueError(f"spr: iterations must be >= 0, got {iterations}")
    if scores is None:
        scores = probs
    elif scores.shape != probs.shape or not scores.is_floating_point():
        raise ValueError(f"spr: scores must be a float tensor shaped like probs {tuple(probs.shape)}, "
                         f"got {scores.dtype} {tuple(scores.shape)}")
    dil = _check_dilations(dilations)
    offsets = neighbour_offsets(dil)
    k_colour = contrast_kernel(image.to(probs.dtype), offsets, len(dil)).mean(dim=1, keepdim=True)  # (B,1,P,H,W)
    k_sem = contrast_kernel(scores.to(probs.dtype), offsets, len(dil))  # (B,K,P,H,W)
    aff = torch.softmax(alpha * k_colour + (1.0 - alpha) * k_sem, dim=2)
    refined = _propagate(probs, aff, offsets, iterations)
    # eq. 6 with per-class affinities does not preserve sum_c m^c; renormalise once at the end.
    return _normalise(refined)


def _to_torch(probs: np.ndarray, image: np.ndarray, who: str, device: str | torch.device):
    probs = np.asarray(probs)
    image = np.asarray(image)
    check_inputs(probs, image, who)
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"{who}: probabilities must be floating point, got {probs.dtype}")
    p = torch.from_numpy(np.require(probs, np.float32, ["C", "W"]))[None].to(device)
    # [0, 1] colours; the kernel divides by the local std, so the scale only matters against eps.
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0)[None].to(device)
    return p, x


class PAMR:
    """Refiner: PAMR at full image resolution on `device` (numpy in, numpy out)."""

    name = "pamr"

    def __init__(self, dilations: Sequence[int] = DEFAULT_DILATIONS, iterations: int = DEFAULT_ITERATIONS,
                 device: str | torch.device = "cpu") -> None:
        self.dilations = _check_dilations(dilations)
        self.iterations = int(iterations)
        self.device = torch.device(device)

    def __call__(self, probs: np.ndarray, image: np.ndarray) -> np.ndarray:
        p, x = _to_torch(probs, image, "PAMR", self.device)
        return pamr(p, x, self.dilations, self.iterations)[0].cpu().numpy()


class SPR:
    """Refiner: SPR (alpha = 0.8 by default) at full image resolution on `device`."""

    name = "spr"

    def __init__(self, alpha: float = SPR_ALPHA, dilations: Sequence[int] = DEFAULT_DILATIONS,
                 iterations: int = DEFAULT_ITERATIONS, device: str | torch.device = "cpu") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SPR: alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.dilations = _check_dilations(dilations)
        self.iterations = int(iterations)
        self.device = torch.device(device)

    def __call__(self, probs: np.ndarray, image: np.ndarray) -> np.ndarray:
        p, x = _to_torch(probs, image, "SPR", self.device)
        return spr(p, x, self.alpha, self.dilations, self.iterations)[0].cpu().numpy()
