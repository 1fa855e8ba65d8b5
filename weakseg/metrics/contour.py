"""Contour F-score (F) as the DAVIS benchmark defines it (Perazzi et al. 2016) and as the
ICAM paper applies it to semantic segmentation (icam §4.1, "Evaluation metrics").

Per binary mask:
- boundary map: a pixel is on the boundary when it differs from its east, south or
  south-east neighbour, pixels beyond the image counting as 0; on the last row only the
  east rule applies, on the last column only the south rule, and the bottom-right pixel is
  never a boundary (DAVIS `seg2bmap` for an unresized mask).
- tolerance: a boundary pixel is matched when a boundary pixel of the other mask lies
  within a disk of radius ceil(0.008 x image diagonal) (x^2 + y^2 <= r^2).
- precision = matched predicted / predicted boundary pixels, recall = matched GT / GT
  boundary pixels; empty cases: no prediction boundary but some GT boundary -> P=1, R=0;
  prediction boundary but no GT boundary -> P=0, R=1; neither -> P=R=1.
For a dataset (ICAM): per class, the four counts are summed over all images and one F is
computed per class from the sums (DAVIS's empty rules applied to the sums); the reported F
is the mean over foreground classes. Void (255) counts as background.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DEFAULT_BOUND_TH = 0.008


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """Boundary map of a binary mask by the east / south / south-east neighbour rule."""
    seg = np.asarray(mask, dtype=bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def tolerance_radius(shape: tuple[int, int], bound_th: float = DEFAULT_BOUND_TH) -> int:
    """ceil(bound_th x diagonal) pixels; a bound_th >= 1 is taken as a radius in pixels."""
    if bound_th >= 1:
        return int(bound_th)
    # Same float expression as DAVIS so that the radius agrees bit-for-bit at exact cases
    # such as 500x375 (diagonal 625 -> radius 5, not 6).
    return int(math.ceil(bound_th * float(np.linalg.norm(shape))))


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element: x^2 + y^2 <= r^2."""
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def boundary_counts(pred_mask: np.ndarray, gt_mask: np.ndarray, radius: int) -> np.ndarray:
    """[matched_pred, total_pred, matched_gt, total_gt] boundary pixel counts for one mask pair."""
    pred_b = seg2bmap(pred_mask)
    gt_b = seg2bmap(gt_mask)
    n_pred = int(pred_b.sum())
    n_gt = int(gt_b.sum())
    if n_pred == 0 or n_gt == 0:
        return np.array([0, n_pred, 0, n_gt], dtype=np.int64)
    # Dilating by a disk of radius r == "Euclidean distance to the nearest boundary pixel
    # <= r". The exact distance transform gives that in O(HW) whatever r (a dilation costs
    # O(HW r^2)); sqrt of an integer is correctly rounded, so `<= r` is exact.
    # Distances are only read at boundary pixels and measured to boundary pixels, so the
    # bounding box of both boundaries holds every pixel that matters: the transform on that
    # crop is exact, and much cheaper for objects smaller than the image.
    rows = np.flatnonzero((pred_b | gt_b).any(axis=1))
    cols = np.flatnonzero((pred_b | gt_b).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pred_b, gt_b = pred_b[box], gt_b[box]
    gt_dist = ndimage.distance_transform_edt(~gt_b)
    pred_dist = ndimage.distance_transform_edt(~pred_b)
    matched_pred = int((gt_dist[pred_b] <= radius).sum())
    matched_gt = int((pred_dist[gt_b] <= radius).sum())
    return np.array([matched_pred, n_pred, matched_gt, n_gt], dtype=np.int64)


def precision_recall_from_counts(counts: np.ndarray) -> tuple[float, float]:
    """DAVIS precision and recall, including its rules for empty boundaries."""
    matched_pred, n_pred, matched_gt, n_gt = (float(c) for c in counts)
    if n_pred == 0 and n_gt > 0:
        return 1.0, 0.0
    if n_pred > 0 and n_gt == 0:
        return 0.0, 1.0
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0
    return matched_pred / n_pred, matched_gt / n_gt


def f_from_counts(counts: np.ndarray) -> float:
    precision, recall = precision_recall_from_counts(counts)
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def f_measure(pred_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = DEFAULT_BOUND_TH) -> float:
    """DAVIS F for one binary mask pair."""
    return f_from_counts(boundary_counts(pred_mask, gt_mask, tolerance_radius(np.shape(gt_mask), bound_th)))


def class_boundary_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    bound_th: float = DEFAULT_BOUND_TH,
    ignore_index: int = 255,
    background_index: int | None = 0,
) -> np.ndarray:
    """(K, 4) boundary counts of every class for one label map pair.

    Void (255) in either map counts as background (icam §4.1); in a dataset without a
    background class it belongs to no class. Classes absent from both maps contribute
    zeros, so only present classes are computed.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if background_index is not None:
        pred = np.where(pred == ignore_index, background_index, pred)
        gt = np.where(gt == ignore_index, background_index, gt)
    radius = tolerance_radius(gt.shape, bound_th)
    counts = np.zeros((num_classes, 4), dtype=np.int64)
    present = np.union1d(np.unique(pred), np.unique(gt))
    for k in present:
        if k == ignore_index or k >= num_classes:
            continue
        counts[k] = boundary_counts(pred == k, gt == k, radius)
    return counts


def per_class_f(counts: np.ndarray) -> np.ndarray:
    """F per class from (K, 4) dataset-summed counts."""
    return np.array([f_from_counts(c) for c in counts], dtype=np.float64)
