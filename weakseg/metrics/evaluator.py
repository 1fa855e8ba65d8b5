"""`SegEvaluator`: accumulate label-map pairs over a dataset, then report J, F, J&F,
boundary IoU, precision and recall. The maths lives in the small pure modules beside it."""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from weakseg.metrics import boundary_iou, confusion, contour

CONVENTIONS = {
    "ignore": "ground-truth pixels 255 are ignored by J, precision, recall and boundary IoU; "
    "a predicted 255 is 'no prediction' (a miss for the GT class, a false positive for none)",
    "absent_classes": "a class absent from both ground truth and prediction over the whole set "
    "is left out of every mean (reported as null)",
    "miou": "J = mean over classes (background included) of TP / (TP + FP + FN), counts summed over all images",
    "contour_f": "DAVIS boundary F per class with tolerance ceil(0.008 x diagonal), matched and total "
    "boundary pixels summed over all images, mean over foreground classes; void counts as background",
    "contour_f_without_background": "DAVIS boundary F per class with tolerance ceil(0.008 x diagonal), matched and "
    "total boundary pixels summed over all images, mean over all classes (no background class); void belongs to "
    "no class",
    "jf": "(J + F) / 2",
    "boundary_iou": "Cheng et al. 2021, inner band of width max(1, round(0.02 x diagonal)), "
    "intersections and unions summed over images, mean over classes",
}


def conventions(background_name: str | None, boundary_dilation_ratio: float = boundary_iou.DEFAULT_DILATION_RATIO) -> dict:
    """The conventions text of a summary; the F line says how background was treated, the
    boundary IoU line which band width was used."""
    texts = {k: v for k, v in CONVENTIONS.items() if k != "contour_f_without_background"}
    if background_name is None:
        texts["contour_f"] = CONVENTIONS["contour_f_without_background"]
    texts["boundary_iou"] = texts["boundary_iou"].replace("0.02 x", f"{boundary_dilation_ratio:g} x")
    return texts


def metrics_json(summary: dict) -> str:
    """A summary as the JSON files hold it: keys in the summary's own order, so per-class
    values read in class order (sorting would put them alphabetically)."""
    return json.dumps(summary, indent=2) + "\n"


def _none_if_nan(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class SegEvaluator:
    """Accumulates per-class counts; `summary()` turns them into metrics."""

    # Every accumulated count: evaluators of disjoint image sets merge by summing these.
    COUNTS = ("cm", "contour_counts", "biou_counts", "num_images")

    @classmethod
    def for_dataset(cls, dataset) -> "SegEvaluator":
        """The evaluator a dataset is scored with: its classes, background and boundary-IoU band."""
        return cls(dataset.class_names, dataset.background_index,
                   boundary_dilation_ratio=getattr(dataset, "boundary_dilation_ratio", boundary_iou.DEFAULT_DILATION_RATIO))

    def __init__(
        self,
        class_names: Sequence[str],
        background_index: int | None = 0,
        bound_th: float = contour.DEFAULT_BOUND_TH,
        boundary_dilation_ratio: float = boundary_iou.DEFAULT_DILATION_RATIO,
        ignore_index: int = confusion.IGNORE,
    ):
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.background_index = background_index
        self.bound_th = bound_th
        self.boundary_dilation_ratio = boundary_dilation_ratio
        self.ignore_index = ignore_index
        self.cm = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        self.contour_counts = np.zeros((self.num_classes, 4), dtype=np.int64)
        self.biou_counts = np.zeros((self.num_classes, 2), dtype=np.int64)
        self.num_images = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        k = self.num_classes
        self.cm += confusion.confusion_matrix(pred, gt, k, self.ignore_index)
        # Void counts as background for F (icam §4.1): map 255 to "no class" in both maps.
        self.contour_counts += contour.class_boundary_counts(
            pred, gt, k, self.bound_th, self.ignore_index, self.background_index
        )
        self.biou_counts += boundary_iou.class_boundary_iou_counts(
            pred, gt, k, self.boundary_dilation_ratio, self.ignore_index
        )
        self.num_images += 1

    def present(self) -> np.ndarray:
        """Classes seen in ground truth or prediction anywhere in the set."""
        return (
            (confusion.gt_totals(self.cm) + confusion.pred_totals(self.cm) > 0)
            | (self.contour_counts[:, [1, 3]].sum(axis=1) > 0)
        )

    def per_class_f(self) -> np.ndarray:
        f = contour.per_class_f(self.contour_counts)
        f[~self.present()] = np.nan
        return f

    def headline(self) -> dict:
        """The four stage metrics (J, F, J&F, boundary IoU) and per-class IoU."""
        summary = self.summary()
        keys = ("miou", "contour_f", "jf", "boundary_iou", "per_class_iou")
        return {k: summary[k] for k in keys}

    def summary(self) -> dict:
        iou = confusion.per_class_iou(self.cm)
        f = self.per_class_f()
        fg = np.ones(self.num_classes, dtype=bool)
        if self.background_index is not None:
            fg[self.background_index] = False
        miou = confusion.nanmean(iou)
        contour_f = confusion.nanmean(f[fg])
        biou = confusion.nanmean(boundary_iou.per_class_boundary_iou(self.biou_counts))
        precision = confusion.per_class_precision(self.cm)
        recall = confusion.per_class_recall(self.cm)

        def by_name(values: np.ndarray) -> dict:
            return {name: _none_if_nan(float(v)) for name, v in zip(self.class_names, values)}

        return {
            "miou": _none_if_nan(miou),
            "contour_f": _none_if_nan(contour_f),
            "jf": _none_if_nan((miou + contour_f) / 2.0),
            "boundary_iou": _none_if_nan(biou),
            "precision": _none_if_nan(confusion.nanmean(precision)),
            "recall": _none_if_nan(confusion.nanmean(recall)),
            "per_class_iou": by_name(iou),
            "per_class_f": by_name(f),
            "per_class_precision": by_name(precision),
            "per_class_recall": by_name(recall),
            "num_images": self.num_images,
            # The class left out of the mean F, by name (null: none; every class counts).
            "background_class": None if self.background_index is None else self.class_names[self.background_index],
            "conventions": conventions(None if self.background_index is None else self.class_names[self.background_index],
                                       self.boundary_dilation_ratio),
        }
