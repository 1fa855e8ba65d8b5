"""Step `pseudo_labels` (`weakseg pseudo-labels CONFIG`): refined probabilities -> label maps
for the segmentation network.

Config:  `pseudo_labels: PseudoLabelConfig` (confidence, or the adaptive rule of single-stage
         methods).
Reads:   RUN/refine/probs/<id>.npz  (`probs` (K, H, W) float16, `class_ids` (K,) the label
                                      id of each channel)
         the dataset (masks, when it has them, for the metrics only)
Writes:  RUN/pseudo_labels/labels/<id>.png  palette PNGs: argmax class, 255 where the top
                                      probability is below `confidence` (not trained on); with
                                      `adaptive`, the rule of weakseg.losses.region.pseudo_mask
                                      (SSSS / shape cues: above 60 % of the class's maximum)
         RUN/pseudo_labels/pseudo_label_metrics.json  when masks exist, two views:
             miou, contour_f, jf, boundary_iou: 255 counts as a miss (as for any prediction)
             labelled_miou, labelled_precision, labelled_recall: on the labelled pixels only
             (what the segmentation network is actually trained on), and `coverage`, the
             share of non-void ground-truth pixels that carry a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weakseg.data.base import SegDataset
from weakseg.data.io import read_arrays, write_label_png, write_text_atomic
from weakseg.errors import ConfigError
from weakseg.labels import IGNORE
from weakseg.losses.region import pseudo_mask
from weakseg.metrics.evaluator import SegEvaluator, metrics_json
from weakseg.steps.base import Step
from weakseg.train import distributed

NAME = "pseudo_labels"



@dataclass
class AdaptiveRule:
    cutoff: float = 0.6
    low: float = 0.2
    background_cutoff: float | None = None  # SSSS's code: 0.7 (applies to channel 0, the background)


@dataclass
class PseudoLabelConfig:
    # Pixels whose highest refined probability is below this are left out (255). 0 labels
    # every pixel. psa/SEAM leave out pixels where the low- and high-alpha CRFs disagree;
    # with one refinement the probability margin is the equivalent knob.
    confidence: float = 0.0
    # The online pseudo-mask rule of single-stage methods (shape cues §4.1.3, SSSS): class c
    # where its probability exceeds max(cutoff x its maximum in the image, low); pixels with
    # no class or several: 255. {} takes cutoff 0.6, low 0.2; replaces `confidence`.
    adaptive: AdaptiveRule | None = None

    def __post_init__(self):
        if self.adaptive is not None and self.confidence > 0:
            raise ConfigError("pseudo_labels: set confidence or adaptive, not both")


def load_probs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    probs, class_ids = read_arrays(path, ("probs", "class_ids"), "refined-probabilities file", "run `weakseg refine` first")
    return probs.astype(np.float32), class_ids.astype(np.int64)


def probs_to_label(probs: np.ndarray, class_ids: np.ndarray, confidence: float) -> np.ndarray:
    """Argmax over the K channels mapped to label ids; 255 below `confidence`."""
    if probs.shape[0] == 0:
        raise ValueError("no channel to label: an image with neither background nor classes")
    label = class_ids[probs.argmax(axis=0)].astype(np.uint8)
    if confidence > 0:
        label[probs.max(axis=0) < confidence] = IGNORE
    return label


def adaptive_label(probs: np.ndarray, class_ids: np.ndarray, rule: AdaptiveRule, background: bool) -> np.ndarray:
    """The pseudo-mask rule the single-stage training uses (weakseg.losses.region.pseudo_mask),
    on one image's refined probabilities; channel ids mapped to label ids, 255 ignored."""
    mask = pseudo_mask(torch.from_numpy(probs)[None], rule.cutoff, rule.low,
                       rule.background_cutoff if background else None)[0].numpy()
    return np.where(mask == IGNORE, IGNORE, class_ids[np.minimum(mask, len(class_ids) - 1)]).astype(np.uint8)


def make_pseudo_labels(dataset: SegDataset, probs_dir: str | Path, out_dir: str | Path, config: PseudoLabelConfig,
                       on_image=None) -> dict:
    probs_dir, out = Path(probs_dir), Path(out_dir)
    # Sharded across torchrun ranks (all images in one process): this rank's label maps and
    # their metric counts, summed over the ranks below (exact: integer counts).
    distributed.setup()
    everything = SegEvaluator.for_dataset(dataset)
    labelled = SegEvaluator.for_dataset(dataset)
    missing_masks, covered, valid = 0, 0, 0
    mine = distributed.shard(len(dataset))
    for done, i in enumerate(mine, 1):
        sample_id = dataset.ids[i]
        probs, class_ids = load_probs(probs_dir / "probs" / f"{sample_id}.npz")
        if config.adaptive is not None:
            first_is_background = dataset.background_index is not None and int(class_ids[0]) == dataset.background_index
            label = adaptive_label(probs, class_ids, config.adaptive, first_is_background)
        else:
            label = probs_to_label(probs, class_ids, config.confidence)
        write_label_png(out / "labels" / f"{sample_id}.png", label)
        # After one image without a mask there are no metrics: stop decoding masks.
        mask = dataset[i].mask if missing_masks == 0 else None
        if mask is None:
            missing_masks += 1
        else:
            everything.add(label, mask)
            # On the labelled pixels only: void the ground truth where the label is void.
            labelled.add(label, np.where(label == IGNORE, IGNORE, mask).astype(np.uint8))
            valid_gt = mask != IGNORE
            covered += int(np.count_nonzero(valid_gt & (label != IGNORE)))
            valid += int(np.count_nonzero(valid_gt))
        if on_image is not None:
            on_image(done, len(mine))
    has_masks = distributed.summed(missing_masks) == 0
    if has_masks:
        distributed.sum_counts(everything, SegEvaluator.COUNTS)
        distributed.sum_counts(labelled, SegEvaluator.COUNTS)
        covered, valid = distributed.summed(covered), distributed.summed(valid)
    result: dict = {"num_images": len(dataset), "confidence": config.confidence}
    if has_masks:
        summary = everything.summary()
        part = labelled.summary()
        result.update({k: summary[k] for k in ("miou", "contour_f", "jf", "boundary_iou")})
        result.update(
            {
                "labelled_miou": part["miou"],
                "labelled_precision": part["precision"],
                "labelled_recall": part["recall"],
                "coverage": covered / max(1, valid),
                "per_class_iou": summary["per_class_iou"],
            }
        )
        if distributed.is_main():
            write_text_atomic(out / "pseudo_label_metrics.json", metrics_json(result))
    distributed.barrier()
    return result


def run(config: PseudoLabelConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    return make_pseudo_labels(dataset, Path(run_dir) / "refine", Path(run_dir) / NAME, config, on_image=progress)


STEP = Step(NAME, PseudoLabelConfig, run, "Label maps for the segmentation network: the argmax of the refined "
            "probabilities, 255 below pseudo_labels.confidence; their metrics when the dataset has masks.",
            reads=("refine",), stage="pseudo_labels")
