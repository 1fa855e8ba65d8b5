"""Region metrics from a confusion matrix: J (IoU), precision, recall. Pure numpy, no I/O.

Conventions (also in docs/metrics.md):
- Ground-truth pixels equal to `ignore_index` (255) are left out entirely.
- A *predicted* 255 (an unconfident pseudo-label pixel) is "no prediction": it counts as a
  miss for the ground-truth class (lowers recall and IoU) but as a false positive for no class.
- A class absent from both ground truth and prediction over the whole evaluated set has an
  undefined IoU (NaN); it is left out of the mean ("nanmean"). Absent from one side only
  gives IoU 0 and counts.
"""

from __future__ import annotations

import numpy as np

from weakseg.labels import IGNORE



def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """(K, K+1) int64 counts: rows = ground truth class, columns = predicted class, and a last
    column for pixels predicted `ignore_index` (no prediction).

    Predicted ids >= num_classes other than `ignore_index` raise ValueError: a wrong class
    range must never be silently folded into the counts.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    keep = gt != ignore_index
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if g.size and g.max() >= num_classes:
        raise ValueError(f"ground truth has class id {int(g.max())} >= num_classes {num_classes}")
    unlabelled = p == ignore_index
    if p.size and ((p[~unlabelled] >= num_classes) | (p[~unlabelled] < 0)).any():
        bad = int(p[~unlabelled].max())
        raise ValueError(f"prediction has class id {bad} outside 0..{num_classes - 1} (and not {ignore_index})")
    p = np.where(unlabelled, num_classes, p)
    counts = np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def true_positives(cm: np.ndarray) -> np.ndarray:
    k = cm.shape[0]
    return np.diagonal(cm[:, :k]).astype(np.float64)


def gt_totals(cm: np.ndarray) -> np.ndarray:
    """Ground-truth pixels per class (including those predicted 'no prediction')."""
    return cm.sum(axis=1).astype(np.float64)


def pred_totals(cm: np.ndarray) -> np.ndarray:
    """Pixels predicted as each class (the no-prediction column excluded)."""
    k = cm.shape[0]
    return cm[:, :k].sum(axis=0).astype(np.float64)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full_like(num, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU_k = TP / (GT_k + Pred_k - TP); NaN where the class is absent from both."""
    tp = true_positives(cm)
    return _safe_ratio(tp, gt_totals(cm) + pred_totals(cm) - tp)


def per_class_precision(cm: np.ndarray) -> np.ndarray:
    """TP / predicted pixels of the class; NaN where the class is never predicted."""
    return _safe_ratio(true_positives(cm), pred_totals(cm))


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """TP / ground-truth pixels of the class; NaN where the class is absent from ground truth."""
    return _safe_ratio(true_positives(cm), gt_totals(cm))


def nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_iou(cm: np.ndarray) -> float:
    """J: the mean IoU over classes present in ground truth or prediction."""
    return nanmean(per_class_iou(cm))
