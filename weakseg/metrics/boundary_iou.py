"""Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021), per class and accumulated over a dataset.

For a binary mask M, its inner boundary band is M minus M eroded by a (2d+1) x (2d+1)
square (d erosions by a 3x3 square), with pixels outside the image counting as 0, so a
mask touching the image edge has a band along the edge too; d = max(1, round(ratio x
image diagonal)), ratio 0.02 by default. Boundary IoU of a class =
|G_d ∩ P_d| / |G_d ∪ P_d| with G_d, P_d the bands of ground truth and prediction. Over a
dataset, intersections and unions are summed per class before dividing; the reported
value is the mean over classes present in ground truth or prediction (as for J).
Ground-truth void pixels (255) are removed from both bands, as J ignores them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_DILATION_RATIO = 0.02


def band_width(shape: tuple[int, int], dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    diagonal = float(np.hypot(shape[0], shape[1]))
    return max(1, int(round(dilation_ratio * diagonal)))


def inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` (chessboard distance) of a non-mask pixel or the image edge."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    # Chessboard distance to the nearest non-mask pixel, with a one-pixel zero frame so the
    # image edge counts as non-mask; equals eroding by a (2w+1)^2 square, at O(HW) cost.
    # Only the mask's bounding box is transformed: the frame around it is non-mask either
    # way (pixels outside the box, or beyond the image edge), so the distances are the same.
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    padded = np.pad(mask[box], 1, constant_values=False)
    dist = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    band = np.zeros_like(mask)
    band[box] = mask[box] & (dist <= width)
    return band


def class_boundary_iou_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    dilation_ratio: float = DEFAULT_DILATION_RATIO,
    ignore_index: int = 255,
) -> np.ndarray:
    """(K, 2) [intersection, union] of boundary bands per class for one label map pair.

    All classes at once: every pixel belongs to exactly one mask (its label), and it lies in
    that mask's inner band exactly when the (2w+1)^2 square around it holds another label or
    reaches beyond the image (`label_band`). So one min and one max filter per map give every
    class's band, and the counts are bincounts of the labels over the band pixels."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    width = band_width(gt.shape, dilation_ratio)
    valid = gt != ignore_index
    gt_band = label_band(gt, width) & valid
    pred_band = label_band(pred, width) & valid

    def per_class(labels: np.ndarray, where: np.ndarray) -> np.ndarray:
        values = labels[where].astype(np.int64)
        values = values[(values < num_classes) & (values != ignore_index)]
        return np.bincount(values, minlength=num_classes)[:num_classes]

    both = gt_band & pred_band & (gt == pred)
    inter = per_class(gt, both)
    union = per_class(gt, gt_band) + per_class(pred, pred_band) - inter
    return np.stack([inter, union], axis=1).astype(np.int64)


def label_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within chessboard distance `width` of a pixel of another label or of the image
    edge: the union over classes of `inner_boundary(label == k, width)`."""
    label = np.asarray(label)
    size = 2 * int(width) + 1
    band = ndimage.maximum_filter(label, size=size, mode="nearest") != ndimage.minimum_filter(label, size=size, mode="nearest")
    # The frame beyond the image is "another label": pixels closer than `width + 1` to it.
    w = int(width)
    band[:w] = True
    band[-w:] = True
    band[:, :w] = True
    band[:, -w:] = True
    return band


def per_class_boundary_iou(counts: np.ndarray) -> np.ndarray:
    """Intersection / union per class; NaN where both bands are empty over the dataset."""
    inter = counts[:, 0].astype(np.float64)
    union = counts[:, 1].astype(np.float64)
    out = np.full(len(counts), np.nan)
    np.divide(inter, union, out=out, where=union > 0)
    return out
