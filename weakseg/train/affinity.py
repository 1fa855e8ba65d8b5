"""Training loop of the AffinityNet (psa §3.3) on the CAMs written by `weakseg infer-cam`.

Per image: the CAMs (``cam_dir/cams/<id>.npz``: ``cams`` (P, H, W) float16 in [0, 1] at image
size, ``class_ids`` (P,) mask ids of the present classes) give a confident-region label map
(`affinity_labels`, cached as a PNG under ``out_dir/labels_...``). Image and label map are
augmented together (the mask path of `build_augment`: nearest resampling, 255 padding), the
label map is sampled onto the feature grid (nearest, at pixel centres) and turned into pair
labels; the loss is psa's (`affinity_loss`).

Defaults follow SEAM's ``train_aff.py``: 8 epochs, batch 8, SGD lr 0.01 (new layers x10),
momentum 0.9, weight decay 5e-4, poly power 0.9, 448 crops, colour jitter 0.3, flips,
radius 5. The loop is the one trainer's (`weakseg.train.trainer.fit`: seeding, DataLoader,
checkpoints, resume, NonFiniteLoss, log.csv), with `weakseg.losses.affinity.AffinityTerm`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weakseg.data.base import SegDataset
from weakseg.data.io import read_arrays, read_label_map, write_label_png
from weakseg.data.transforms import AugmentConfig
from weakseg.errors import DataError
from weakseg.losses.affinity import AffinityTerm
from weakseg.refine.affinity import AffinityNet, ProbsRefiner, affinity_labels
from weakseg.train.trainer import AugmentedDataset, TrainConfig, fit


@dataclass
class AffinityTrainConfig(TrainConfig):
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_size=448, brightness=0.3, contrast=0.3, saturation=0.3)
    )


def load_cams(cam_dir: str | Path, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(cams (P, H, W) float32, class_ids (P,) int64) written by `weakseg infer-cam`."""
    path = Path(cam_dir) / "cams" / f"{sample_id}.npz"
    cams, class_ids = read_arrays(path, ("cams", "class_ids"), "CAM file", "run `weakseg infer-cam` on this dataset first")
    return cams.astype(np.float32), class_ids.astype(np.int64)


class AffinityLabels:
    """Label map of (index) from its CAMs, computed once and cached as a PNG.

    The cache folder is named after the background powers and the CRF (its `name` and a hash
    of its repr, which for `DenseCRF` holds the parameters); a CAM file newer than its cached
    label is read again."""

    def __init__(self, dataset: SegDataset, cam_dir, cache_dir: Path, alpha_low: float, alpha_high: float,
                 crf: ProbsRefiner | None = None):
        self.dataset, self.cam_dir, self.crf = dataset, Path(cam_dir), crf
        self.alphas = (alpha_low, alpha_high)
        if crf is None:
            tag = "argmax"
        else:  # the repr carries the CRF's settings (DenseCRF prints its parameters)
            tag = f"{getattr(crf, 'name', type(crf).__name__)}-{hashlib.sha1(repr(crf).encode()).hexdigest()[:8]}"
        self.cache_dir = cache_dir / f"labels_low{alpha_low:g}_high{alpha_high:g}_{tag}"

    def __call__(self, index: int, sample=None) -> np.ndarray:
        sample = self.dataset[index] if sample is None else sample
        path = self.cache_dir / f"{sample.id}.png"
        where = self.cam_dir / "cams" / f"{sample.id}.npz"
        if path.is_file() and where.is_file() and path.stat().st_mtime >= where.stat().st_mtime:
            return read_label_map(path)
        cams, class_ids = load_cams(self.cam_dir, sample.id)
        if cams.shape[1:] != sample.image.shape[:2]:
            size = f"{sample.image.shape[0]}x{sample.image.shape[1]}"
            raise DataError(where, f"CAMs are {cams.shape[1]}x{cams.shape[2]} (H x W), the image {size}")
        if list(class_ids) != list(sample.present_class_ids):
            # Stale or foreign CAMs: the channels would not be this image's classes.
            found, wanted = list(class_ids), sample.present_class_ids
            raise DataError(where, f"class_ids {found} differ from the image's classes {wanted}")
        label = affinity_labels(cams, sample.image, *self.alphas, crf=self.crf)
        write_label_png(path, label)
        return label


def train_affinity(
    model: AffinityNet,
    dataset: SegDataset,
    cam_dir: str | Path,
    config: AffinityTrainConfig,
    out_dir: str | Path,
    radius: int = 5,
    alphas: tuple[float, float] = (4.0, 24.0),
    pairs: str = "psa",
    crf: ProbsRefiner | None = None,
    on_step=None,
    on_epoch=None,
) -> AffinityNet:
    """Train `model` on `dataset` with affinity labels from the CAMs in `cam_dir`, by the one
    trainer (`weakseg.train.trainer.fit`) with the AffinityNet's loss term; writes
    ``out_dir/checkpoint.pt`` (with "model_config", so `AffinityNet.from_state` rebuilds it)
    and ``out_dir/log.csv`` after every epoch. `radius`: pairs 0 < |i - j| < radius (psa: 5);
    `alphas`: the background powers (alpha_low, alpha_high) of the labels. Returns the trained model in eval mode."""
    out_dir = Path(out_dir)
    labels = AffinityLabels(dataset, cam_dir, out_dir, alphas[0], alphas[1], crf)
    data = AugmentedDataset(dataset, config.augment, config.seed, need_depth=False, target=labels)
    fit(model, data, [AffinityTerm(radius, pairs=pairs)], config, out_dir, on_step=on_step,
        checkpoint_extra={"model_config": model.config}, on_epoch=on_epoch)
    return model.eval()
