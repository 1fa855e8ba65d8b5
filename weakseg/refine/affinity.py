"""AffinityNet and the random walk (Ahn & Kwak, CVPR 2018, "Learning Pixel-level Semantic
Affinity with Image-level Supervision"; below "psa"), as SEAM, ICAM and hfpl use it.

Pipeline
--------
1. Affinity labels from CAMs (psa §3.2): the background score (1 - max_c cam_c)^alpha is
   computed with two powers. ``alpha_low`` (small power -> *strong* background) leaves a pixel
   to a class only where the class beats a strong background: confident **foreground**.
   ``alpha_high`` (large power -> *weak* background) leaves a pixel to the background only
   where even a weak background wins: confident **background**. The label is the class of
   the low-alpha argmax; 255 (ignore) where the low-alpha argmax is background; 0 where the
   high-alpha argmax is background (this rule wins, as in the public psa/SEAM code). Each
   argmax may be taken after a dense CRF (``crf``, a callable ``crf(probs, image) -> probs``
   like every refiner), as psa does; default None is the plain argmax.
2. Pair labels (psa eq. 4-5, §3.2): on the feature grid, every pixel pair (i, j) with
   0 < |i - j| < radius is bg-pos (both background), fg-pos (same foreground class) or neg
   (different labels); a pair with a 255 pixel is ignored. Each unordered pair appears once
   (one-directional "half window" offsets, as psa's ``get_indices_of_pairs``); the distance is
   strictly below the radius as in psa, so radius 5 gives psa's 34 offsets. By default
   (`pairs="psa"`) the pair set is psa's too: no pair starts in the bottom radius-1 rows or the
   left/right radius-1 columns (on a 56x56 grid, 84,864 of the 99,128 in-grid pairs);
   `pairs="all"` keeps every in-grid pair. Training and the walk use the same set.
3. Affinity (psa eq. 3): a_ij = exp(-||f_i - f_j||_1) on the feature map f of the AffinityNet.
   The public psa/SEAM code takes the *mean* over channels, i.e. the L1 norm divided by the
   feature dimension D; we do the same, so a_ij does not shrink as D grows.
4. Loss (psa eq. 6-7; combination of the public code):
   L = L_bg+/4 + L_fg+/4 + L_neg/2 with L_bg+ = mean over bg-pos pairs of -log a_ij,
   L_fg+ likewise over fg-pos pairs, L_neg = mean over neg pairs of -log(1 - a_ij).
5. Random walk (psa eq. 8-10): A_ij = a_ij^beta for 0 < |i - j| < radius (both directions),
   A_ii = 1 (the self-loop of the public code), T = D^-1 A with D_ii = sum_j A_ij. T is
   **row-stochastic**; the refined scores are vec(M*_c) = T^t vec(M_c) with t = 2^log_t
   (psa eq. 10), applied to every channel *including* the background one. So each refined
   score is a weighted average of scores: a constant map stays constant, a per-pixel
   distribution stays a distribution, and the degree-weighted mass sum_i D_ii M_c(i) is
   conserved (D T = A is symmetric, so 1^T D T = 1^T D). The public code squares a dense
   (N, N) matrix log_t times; we apply the sparse T t times instead: O(t N radius^2 K)
   operations and O(N radius^2) memory, which is small for a 60x60 grid (3600 pixels).

Background powers of the affinity labels (``AFFINITY_ALPHA_PRESETS``, (alpha_low, alpha_high)):

* ``seam`` (4, 24): SEAM's ``infer_SEAM.py`` (crf_alpha = [4, 24]); hfpl §5.1 "SEAM: ...
  originally 4 and 24".
* ``hfpl`` (1, 24): hfpl §5.1 "We set the background parameter to 1 and 24 (originally 4 and
  24) for AffinityNet, when using ISL"; §5.5 "1 and 24 are used for the binomial".
* ``icam`` (2, 4): icam §4.1 "we modify the background parameter alpha to 2 and 4 when
  amplifying and weakening the background activations respectively" (and hfpl §5.5: "2 and
  4 for the multinomial"). Since (1 - m)^alpha falls with alpha, *amplifying* the background
  is the smaller power (alpha_low = 2) and *weakening* it the larger (alpha_high = 4).

Random-walk defaults follow SEAM's ``infer_aff.py``: beta = 8, log_t = 6 (psa: log_t = 8) and
a background power of 6 for the CAMs being walked (psa: 16); that power belongs to the
caller's ``cams_to_probs(cams, alpha)``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakseg.labels import IGNORE
from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.refine.base import cams_to_probs, check_inputs

# (alpha_low, alpha_high) of the affinity labels; see the module docstring for the sources.
AFFINITY_ALPHA_PRESETS: dict[str, tuple[float, float]] = {"seam": (4, 24), "hfpl": (1, 24), "icam": (2, 4)}

# Pair-label codes of `pair_labels`.
PAIR_BG_POS, PAIR_FG_POS, PAIR_NEG, PAIR_IGNORE = 0, 1, 2, 255

LOG_EPS = 1e-5  # psa/SEAM: log(a + 1e-5) and log(1 + 1e-5 - a), counts + 1e-5

ProbsRefiner = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------
# Affinity labels and pair labels
# --------------------------------------------------------------------------------------


def affinity_labels(
    cams: np.ndarray,
    image: np.ndarray | None,
    alpha_low: float,
    alpha_high: float,
    crf: ProbsRefiner | None = None,
) -> np.ndarray:
    """Confident-region label map from max-normalised CAMs (psa §3.2).

    cams: (C, H, W) CAMs of the present classes in [0, 1]; image: (H, W, 3) uint8 (only the
    CRF reads it). Returns (H, W) uint8: 0 confident background, k in 1..C the k-th present
    class (the CAM channel order), 255 neither. `crf(probs, image) -> probs` refines the
    (1 + C, H, W) probabilities before each argmax; it is called for alpha_low, then alpha_high.
    """
    if alpha_low > alpha_high:
        raise ValueError(f"alpha_low ({alpha_low}) must not exceed alpha_high ({alpha_high})")
    if crf is not None and image is None:
        raise ValueError("the CRF needs the image")

    def argmax(alpha: float) -> np.ndarray:
        probs = cams_to_probs(cams, alpha)
        if crf is not None:
            probs = crf(probs, image)
        return np.argmax(probs, axis=0)

    low = argmax(alpha_low)  # strong background: a class wins only where it is confident
    high = argmax(alpha_high)  # weak background: background wins only where it is confident
    label = low.astype(np.uint8)
    label[low == 0] = IGNORE
    label[high == 0] = 0
    return label


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) with 0 < dy^2 + dx^2 < radius^2, one of each +/- pair (dy > 0, or
    dy == 0 and dx > 0): psa's search window. radius 5 -> 34 offsets."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    return [
        (dy, dx)
        for dy in range(radius)
        for dx in range(-radius + 1, radius)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius
    ]


# Which pairs (pixel i, i + offset) exist, for training labels and the walk:
#   "psa": psa's ``get_indices_of_pairs`` (tool/pyutils.py; SEAM, ICAM and hfpl copy it): the
#          first pixel lies in the grid minus its bottom radius-1 rows and its left and right
#          radius-1 columns; every partner of such a pixel is on the grid. The default.
#   "all": every pair whose two pixels are on the grid (pixels near the border get pairs too).
PAIR_SETS = ("psa", "all")


def pair_region(h: int, w: int, radius: int, pairs: str = "psa") -> np.ndarray:
    """(h, w) bool: the pixels whose pairs exist as the first pixel of a pair (see PAIR_SETS)."""
    if pairs not in PAIR_SETS:
        raise ValueError(f"pairs must be one of {PAIR_SETS}, got {pairs!r}")
    region = np.ones((h, w), dtype=bool)
    if pairs == "psa":
        r = radius - 1
        region[:] = False
        if h > r and w > 2 * r:
            region[: h - r, r : w - r] = True
    return region


def _shifted(x, dy: int, dx: int, fill):
    """y[..., r, c] = x[..., r + dy, c + dx] where that lies inside, else `fill` (numpy or torch)."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill) if isinstance(x, torch.Tensor) else np.full_like(x, fill)
    rows_out, rows_in = slice(0, max(h - dy, 0)), slice(min(dy, h), h)
    if dx >= 0:
        cols_out, cols_in = slice(0, max(w - dx, 0)), slice(min(dx, w), w)
    else:
        cols_out, cols_in = slice(min(-dx, w), w), slice(0, max(w + dx, 0))
    out[..., rows_out, cols_out] = x[..., rows_in, cols_in]
    return out


def pair_labels(label: np.ndarray, radius: int, pairs: str = "psa") -> np.ndarray:
    """(h, w) label map on the feature grid (0 bg, 1..C classes, 255 ignore) -> (P, h, w)
    uint8 codes for the pair (pixel, pixel + offset_p), offsets from `pair_offsets`:
    PAIR_BG_POS, PAIR_FG_POS, PAIR_NEG, or PAIR_IGNORE (a 255 pixel, a partner off the grid,
    or a pair outside the pair set `pairs`, see PAIR_SETS)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (h, w), got shape {label.shape}")
    label = label.astype(np.int64)
    outside = ~pair_region(*label.shape, radius, pairs)
    codes = []
    for dy, dx in pair_offsets(radius):
        other = _shifted(label, dy, dx, IGNORE)
        code = np.full(label.shape, PAIR_IGNORE, dtype=np.uint8)
        valid = (label != IGNORE) & (other != IGNORE)
        same = valid & (label == other)
        code[same & (label == 0)] = PAIR_BG_POS
        code[same & (label != 0)] = PAIR_FG_POS
        code[valid & (label != other)] = PAIR_NEG
        code[outside] = PAIR_IGNORE
        codes.append(code)
    return np.stack(codes) if codes else np.zeros((0, *label.shape), dtype=np.uint8)


# --------------------------------------------------------------------------------------
# Affinities and the loss
# --------------------------------------------------------------------------------------


def pair_affinities(features: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, D, h, w) features -> (B, P, h, w) affinities a = exp(-mean_d |f_i - f_j|) (psa eq. 3,
    channel mean as in the public code) between pixel i and i + offset_p. Entries whose
    partner lies off the grid are meaningless (their pair label is PAIR_IGNORE)."""
    out = []
    for dy, dx in pair_offsets(radius):
        partner = _shifted(features, dy, dx, 0.0)
        out.append(torch.exp(-(features - partner).abs().mean(dim=1)))
    return torch.stack(out, dim=1)


def affinity_loss_parts(aff: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg-pos, fg-pos, neg) losses of psa eq. 6-7: each the mean over its pairs (all images
    of the batch together, as the public code counts) of -log a or -log(1 - a)."""
    if aff.shape != codes.shape:
        raise ValueError(f"affinities {tuple(aff.shape)} and pair labels {tuple(codes.shape)} differ in shape")
    codes = codes.to(aff.device)
    terms = []
    for code, value in (
        (PAIR_BG_POS, -torch.log(aff + LOG_EPS)),
        (PAIR_FG_POS, -torch.log(aff + LOG_EPS)),
        (PAIR_NEG, -torch.log(1.0 + LOG_EPS - aff)),
    ):
        mask = (codes == code).to(aff.dtype)
        terms.append((mask * value).sum() / (mask.sum() + LOG_EPS))
    return terms[0], terms[1], terms[2]


def affinity_loss(aff: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """L = L_bg+/4 + L_fg+/4 + L_neg/2 (psa's public code: positives and negatives weigh
    equally, and the two kinds of positive share their half)."""
    bg_pos, fg_pos, neg = affinity_loss_parts(aff, codes)
    return bg_pos / 4 + fg_pos / 4 + neg / 2


# --------------------------------------------------------------------------------------
# The random walk
# --------------------------------------------------------------------------------------


def transition_matrix(features: torch.Tensor, radius: int = 5, beta: float = 8.0, pairs: str = "psa") -> torch.Tensor:
    """(D, h, w) features -> sparse (N, N) row-stochastic T = D^-1 A, N = h w, pixels in
    row-major order (psa eq. 8-9): A_ij = a_ij^beta for the pairs 0 < |i - j| < radius of the
    pair set `pairs` (PAIR_SETS), in both directions, A_ii = 1. psa normalises the columns of
    the symmetric A and multiplies from the left; that is this T applied from the right."""
    _, h, w = features.shape
    n = h * w
    index = torch.arange(n, device=features.device).view(h, w)
    region = torch.from_numpy(pair_region(h, w, radius, pairs)).to(features.device)
    weights = pair_affinities(features[None], radius)[0].pow(beta)  # (P, h, w)
    rows, cols, values = [index.reshape(-1)], [index.reshape(-1)], [features.new_ones(n)]
    for p, (dy, dx) in enumerate(pair_offsets(radius)):
        partner = _shifted(index, dy, dx, -1)
        valid = (partner >= 0) & region
        i, j, a = index[valid], partner[valid], weights[p][valid]
        rows += [i, j]
        cols += [j, i]
        values += [a, a]
    rows_t, cols_t, values_t = torch.cat(rows), torch.cat(cols), torch.cat(values)
    degree = torch.zeros(n, dtype=values_t.dtype, device=features.device).index_add_(0, rows_t, values_t)
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows_t, cols_t]), values_t / degree[rows_t], (n, n), check_invariants=False
    )  # in range by construction
    return matrix.coalesce()


def random_walk(
    scores: torch.Tensor, features: torch.Tensor, radius: int = 5, beta: float = 8.0, log_t: int = 6, pairs: str = "psa"
) -> torch.Tensor:
    """(K, h, w) scores on the feature grid (background channel included) -> T^t applied to
    each channel, t = 2^log_t (psa eq. 10). Row-stochastic T: weighted averages, see the
    module docstring for what is conserved."""
    if scores.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"scores {tuple(scores.shape)} and features {tuple(features.shape)} differ in grid size")
    k, h, w = scores.shape
    transition = transition_matrix(features, radius, beta, pairs).to(scores.dtype)
    if transition.device.type == "cpu":
        with warnings.catch_warnings():  # CSR is "beta" in torch, but 10x faster here than COO
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            transition = transition.to_sparse_csr()
    state = scores.reshape(k, h * w).t().contiguous()  # (N, K)
    for _ in range(2**log_t):
        state = transition @ state
    return state.t().reshape(k, h, w)


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


class AffinityNet(NormalisesInput, nn.Module):
    """Backbone from the factory + a 1x1 head: forward((B, 3, H, W) RGB images) ->
    (B, dim, h, w) affinity features.

    Head: conv1x1 -> ELU -> conv1x1 -> ELU, psa's f8/f9 layers on a single feature level
    (psa concatenates three ResNet-38 levels; the factory exposes one). dim 448 as psa.
    """

    def __init__(self, backbone: str = "tiny_cnn", dim: int = 448, **backbone_kwargs: Any):
        super().__init__()
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, dim, 1, bias=False),
            nn.ELU(),
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.ELU(),
        )
        # psa/SEAM initialisation of their new layers (kaiming, then xavier with gain 4): the
        # large gain spreads the initial feature distances, so affinities do not all start at ~1.
        nn.init.kaiming_normal_(self.head[0].weight)
        nn.init.xavier_uniform_(self.head[2].weight, gain=4)
        self.output_stride = int(self.backbone.output_stride)
        # Enough to rebuild the network around a saved state dict; a weights file or the
        # pretrained flag is not needed then (the state dict holds the trained weights).
        rebuild_kwargs = {k: v for k, v in backbone_kwargs.items() if k not in ("weights", "pretrained")}
        self.config = {"backbone": backbone, "dim": dim, "backbone_kwargs": rebuild_kwargs}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.input_norm(images)))

    @classmethod
    def from_state(cls, state: dict) -> "AffinityNet":
        """Rebuild from {"model_config": ..., "model": state_dict} (what train_affinity saves)."""
        config = dict(state["model_config"])
        model = cls(config["backbone"], config["dim"], **config.get("backbone_kwargs", {}))
        model.load_state_dict(state["model"])
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "AffinityNet":
        # weights_only: a checkpoint is data, never code.
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))


@torch.inference_mode()
def image_features(model: nn.Module, image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (D, h, w) features of `model` (an RGB-in network with `output_stride`).
    The image is edge-padded at the bottom/right to a multiple of the stride, so the grid
    covers ceil(H/s) x ceil(W/s) whole cells (ViTs need it; CNNs then align exactly)."""
    s = int(model.output_stride)
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, -h % s), (0, -w % s), (0, 0)), mode="edge")
    batch = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].to(device)
    return model(batch)[0]


class RandomWalk:
    """Refiner "affinity_rw": the random walk of a trained AffinityNet (psa eq. 8-10).

    `propagate`: scores (K, H, W) -> edge-padded to a multiple of the stride -> averaged onto
    the feature grid -> T^t -> bilinear upsampling -> cropped, not normalised. Calling the
    walker (the Refiner contract) propagates the given probabilities and normalises them per
    pixel. Which scores the refine step walks (psa's raw [(1 - max)^alpha, cams], the
    normalised probabilities, or IRN's CAMs alone) is refine.walk.input
    (weakseg.steps.refine.image_probs; docs/fidelity.md).
    """

    name = "affinity_rw"

    def __init__(
        self, model: nn.Module, beta: float = 8.0, log_t: int = 6, radius: int = 5, device: str | torch.device = "cpu",
        pairs: str = "psa",
    ):
        self.model = model.to(device).eval()
        self.beta, self.log_t, self.radius, self.pairs = beta, log_t, radius, pairs
        self.device = torch.device(device)
        # The last image's features, keyed by its bytes: walking one image several ways
        # (refine.walk.input variants) then costs one forward pass. The model is fixed for
        # the walker's lifetime; build a new walker after training it further.
        self._cached: tuple[tuple, bytes, torch.Tensor] | None = None

    def features(self, image: np.ndarray) -> torch.Tensor:
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        if self._cached is None or self._cached[0] != image.shape or self._cached[1] != digest:
            with torch.no_grad():
                self._cached = (image.shape, digest, image_features(self.model, image, self.device))
        return self._cached[2]

    def __call__(self, probs: np.ndarray, image: np.ndarray) -> np.ndarray:
        check_inputs(probs, image, self.name)
        walked = self.propagate(probs, image)
        return walked / np.maximum(walked.sum(axis=0, keepdims=True), 1e-12)

    def propagate(self, scores: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Any non-negative scores (K, H, W), distributions or not (psa's raw scores, IRN's
        CAMs alone: refine.walk.input) -> T^t applied to each channel, (K, H, W) float32, not
        normalised."""
        h, w = image.shape[:2]
        if scores.ndim != 3 or scores.shape[1:] != (h, w):
            raise ValueError(f"{self.name}: scores must be (K, {h}, {w}) for this image, got {scores.shape}")
        s = int(self.model.output_stride)
        features = self.features(image)
        grid = features.shape[-2:]
        values = torch.from_numpy(np.require(scores, np.float32, ["C", "W"])).to(self.device)
        # Replicate padding gives a padded pixel its neighbour's scores (psa pads zeros, which
        # would leak mass out of a distribution; docs/fidelity.md).
        values = F.pad(values[None], (0, -w % s, 0, -h % s), mode="replicate")
        padded_size = values.shape[-2:]
        values = F.adaptive_avg_pool2d(values, grid)[0]
        with torch.no_grad():
            walked = random_walk(values, features.to(values.dtype), self.radius, self.beta, self.log_t, self.pairs)
        walked = F.interpolate(walked[None], size=padded_size, mode="bilinear", align_corners=False)[0, :, :h, :w]
        return walked.clamp_min(0.0).cpu().numpy().astype(np.float32)


def class_map(
    probs: np.ndarray | torch.Tensor, class_ids: Sequence[int] | None = None, background: int = 0
) -> np.ndarray:
    """Argmax of (K, H, W) refined probabilities; with `class_ids` channel k > 0 becomes the
    mask id class_ids[k - 1] and channel 0 `background`."""
    probs = probs.cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    arg = np.argmax(probs, axis=0)
    if class_ids is None:
        return arg.astype(np.int64)
    lookup = np.asarray([background, *class_ids], dtype=np.int64)
    return lookup[arg]
