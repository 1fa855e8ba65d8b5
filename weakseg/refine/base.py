"""The one refiner interface and the background-score convention shared by every refiner.

A refiner maps (probabilities, image) to refined probabilities:

    refined = refiner(probs, image)
    probs, refined: float32 (K, H, W), channel 0 background, channels 1..K-1 the classes
                    present in the image (in the order of the CAM file's class_ids);
                    each pixel sums to 1 over K.
    image:          uint8 (H, W, 3) RGB, the image the CAMs were computed for.

CAMs become probabilities with `cams_to_probs`: the background score is (1 - max_c cam_c)^alpha
(psa/SEAM; alpha > 1 shrinks the background, < 1 grows it), then scores are normalised per
pixel. Refiners only see the present classes, so a refiner can never invent an absent one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Refiner(Protocol):
    name: str

    def __call__(self, probs: np.ndarray, image: np.ndarray) -> np.ndarray: ...


def background_score(cams: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - max_c cams_c)^alpha for max-normalised CAMs in [0, 1], shape (C, H, W) -> (H, W).
    With no class present the background is 1 everywhere."""
    if cams.shape[0] == 0:
        return np.ones(cams.shape[1:], dtype=np.float32)
    peak = np.clip(cams.max(axis=0), 0.0, 1.0)
    return np.power(1.0 - peak, alpha, dtype=np.float32)


def cams_to_probs(cams: np.ndarray, alpha: float = 1.0, eps: float = 1e-5) -> np.ndarray:
    """Max-normalised CAMs of the present classes (C, H, W) in [0, 1] -> (1 + C, H, W)
    probabilities: [background_score, cams] divided by their per-pixel sum."""
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    scores = np.concatenate([background_score(cams, alpha)[None], cams], axis=0)
    return scores / np.maximum(scores.sum(axis=0, keepdims=True), eps)


def channel_scores(
    cams: np.ndarray,
    class_ids: np.ndarray,
    background_index: int | None,
    background: str = "power",
    alpha: float = 1.0,
    constant: float = 0.25,
    model_probs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The scores :func:`channel_probs` normalises, before the normalisation: (scores (K, H, W),
    the label id of each channel, whether they are already a per-pixel distribution). psa's
    walk takes these raw [(1 - max)^alpha, cams] (refine.walk.input: scores)."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    if background == "model":
        if model_probs is None or model_probs.shape[0] != 1 + len(class_ids):
            raise ValueError("background 'model' needs the [background, classes] probabilities of infer-cam")
        if background_index is not None:
            return model_probs, np.concatenate([[background_index], class_ids]).astype(np.int64), True
        cams = model_probs[1:]
    elif background not in ("power", "constant"):
        raise ValueError(f"background must be power, constant or model; got {background!r}")
    elif background_index is not None:
        ids = np.concatenate([[background_index], class_ids]).astype(np.int64)
        cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
        score = background_score(cams, alpha) if background == "power" else np.full(cams.shape[1:], constant, np.float32)
        return np.concatenate([score[None].astype(np.float32), cams]), ids, False
    if cams.shape[0] == 0:
        raise ValueError("an image with no class and no background class has nothing to label")
    return np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0), class_ids, False


def channel_probs(
    cams: np.ndarray,
    class_ids: np.ndarray,
    background_index: int | None,
    background: str = "power",
    alpha: float = 1.0,
    constant: float = 0.25,
    model_probs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The refiners' input (K, H, W) and the label id of each channel, from max-normalised CAMs
    (C, H, W) of the present classes `class_ids`. `background`:
      power     (1 - max cam)^alpha (psa, SEAM), then normalised per pixel;
      constant  a constant score (a CAM threshold, IRN), then normalised per pixel;
      model     `model_probs` (1 + C, H, W), the CAM network's own [background, classes]
                probabilities (weakseg.models.inference.infer_class_probs), as they are.
    Without a background class (NYUv2) only the present classes count: the CAMs (or the
    model's class probabilities) normalised per pixel, uniform where all are 0."""
    scores, ids, is_distribution = channel_scores(cams, class_ids, background_index, background, alpha, constant,
                                                  model_probs)
    if is_distribution:
        return scores, ids
    return normalise_scores(scores, uniform_where_empty=background_index is None or background == "model"), ids


def normalise_scores(scores: np.ndarray, uniform_where_empty: bool = False, eps: float = 1e-5) -> np.ndarray:
    """Scores (K, H, W) >= 0 divided by their per-pixel sum (at least eps); with
    `uniform_where_empty`, 1/K where the sum is below eps."""
    total = scores.sum(axis=0, keepdims=True)
    probs = scores / np.maximum(total, eps)
    if uniform_where_empty:
        probs = np.where(total > eps, probs, 1.0 / scores.shape[0])
    return probs.astype(np.float32)


def check_inputs(probs: np.ndarray, image: np.ndarray, who: str) -> None:
    """One clear error for the mistakes a caller can make."""
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"{who}: probabilities must be (K, H, W) with K >= 1, got {probs.shape}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{who}: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"{who}: probabilities {probs.shape[1:]} and image {image.shape[:2]} differ in size")
