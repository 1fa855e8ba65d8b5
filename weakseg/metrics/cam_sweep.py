"""CAM evaluation by a background-threshold sweep.

A CAM pseudo-label at threshold t: background where the highest foreground score is <= t,
else the foreground class with the highest score (only classes present in the image
carry scores; ties between classes go to the lower class id). For every threshold of a
grid, the confusion matrix over the whole set is accumulated in one pass per image: each
pixel's (gt, best class, number of thresholds below its score) is histogrammed once, and a
reverse cumulative sum yields all thresholds' counts. The best threshold maximises J.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from weakseg.metrics import confusion

DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)


def cam_to_label(
    cams: np.ndarray, class_ids: Sequence[int], threshold: float, background_index: int | None = 0
) -> np.ndarray:
    """(P, H, W) scores of the present classes -> (H, W) label map at a background threshold.

    Datasets without a background class take the argmax over present classes (no threshold).
    """
    cams = np.asarray(cams, dtype=np.float32)
    ids = np.asarray(class_ids, dtype=np.int64)
    if cams.shape[0] != len(ids):
        raise ValueError(f"{cams.shape[0]} CAM channels for {len(ids)} class ids")
    if len(ids) == 0:
        if background_index is None:
            raise ValueError("no present class and no background class: nothing to label")
        return np.full(cams.shape[1:], background_index, dtype=np.uint8)
    best = ids[np.argmax(cams, axis=0)]
    if background_index is None:
        return best.astype(np.uint8)
    # Compare in float64, as ThresholdSweep does, so both agree exactly at the grid values.
    score = cams.max(axis=0).astype(np.float64)
    return np.where(score > float(threshold), best, background_index).astype(np.uint8)


class ThresholdSweep:
    """Accumulates, for each threshold, the confusion matrix of CAM pseudo-labels."""

    def __init__(self, num_classes: int, background_index: int = 0, thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
        self.num_classes = num_classes
        self.background_index = background_index
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be strictly increasing")
        t = len(self.thresholds)
        self.cms = np.zeros((t, num_classes, num_classes + 1), dtype=np.int64)

    def add(self, cams: np.ndarray, class_ids: Sequence[int], gt: np.ndarray, ignore_index: int = 255) -> None:
        k, t = self.num_classes, len(self.thresholds)
        gt = np.asarray(gt)
        keep = gt != ignore_index
        g = gt[keep].astype(np.int64)
        if g.size and g.max() >= k:
            raise ValueError(f"ground truth has class id {int(g.max())} >= num_classes {k}")
        if len(class_ids) == 0:
            np.add.at(self.cms[:, :, self.background_index], (slice(None), g), 1)
            return
        cams = np.asarray(cams, dtype=np.float64)
        best = np.asarray(class_ids, dtype=np.int64)[np.argmax(cams, axis=0)][keep]
        score = cams.max(axis=0)[keep]
        # n_below[i] = number of thresholds strictly below the pixel's score: the pixel is
        # foreground exactly for thresholds with index < n_below[i].
        n_below = np.searchsorted(self.thresholds, score, side="left")
        hist = np.bincount((g * k + best) * (t + 1) + n_below, minlength=k * k * (t + 1)).reshape(k, k, t + 1)
        # fg_counts[j, g, c] = pixels of gt g, best class c, foreground at threshold j.
        fg_counts = np.cumsum(hist[:, :, ::-1], axis=2)[:, :, ::-1][:, :, 1:]  # index j -> sum over n_below > j
        fg_counts = np.moveaxis(fg_counts, 2, 0)
        totals = hist.sum(axis=2)  # (g, c)
        self.cms[:, :, :k] += fg_counts
        bg_counts = (totals[None] - fg_counts).sum(axis=2)  # (t, g)
        self.cms[:, :, self.background_index] += bg_counts

    def mious(self) -> np.ndarray:
        return np.array([confusion.mean_iou(cm) for cm in self.cms])

    def best(self) -> tuple[float, float]:
        """(best threshold, its J); the lowest threshold wins ties."""
        scores = self.mious()
        j = int(np.nanargmax(scores))
        return float(self.thresholds[j]), float(scores[j])
