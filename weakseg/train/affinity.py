"""Training loop of the AffinityNet (psa §3.3) on the CAMs written by `weakseg infer-cam`.

Per image: the CAMs (``cam_dir/cams/<id>.npz``: ``cams`` (P, H, W) float16 in [0, 1] at image
size, ``class_ids`` (P,) mask ids of the present classes) give a confident-region label map
(`affinity_labels`, cached as a PNG under ``out_dir/labels_...``). Image and label map are
augmented together (the mask path of `build_augment`: nearest resampling, 255 padding), the
label map is sampled onto the feature grid (nearest, at pixel centres) and turned into pair
labels; the loss is psa's (`affinity_loss`).

Defaults follow SEAM's ``train_aff.py``: 8 epochs, batch 8, SGD lr 0.01 (new layers x10),
momentum 0.9, weight decay 5e-4, poly power 0.9, 448 crops, colour jitter 0.3, flips,
radius 5. Seeded like `weakseg.train.trainer` (sample order per (seed, epoch), augmentation per
(seed, epoch, index)); a checkpoint is written atomically after every epoch and a run directory
holding one resumes from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weakseg.data.base import SegDataset
from weakseg.data.io import read_arrays, read_label_map, write_label_png
from weakseg.data.transforms import AugmentConfig, build_augment, resize_nearest
from weakseg.errors import ConfigError, DataError, NonFiniteLoss
from weakseg.refine.affinity import (
    AffinityNet,
    ProbsRefiner,
    affinity_labels,
    affinity_loss,
    pair_affinities,
    pair_labels,
)
from weakseg.train.trainer import (
    TrainConfig,
    build_optimizer,
    epoch_batches,
    global_rng_state,
    pick_device,
    restore_global_rng,
    resume_from,
    save_checkpoint,
    schedule_length,
    set_poly_lr,
)


@dataclass
class AffinityTrainConfig(TrainConfig):
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_size=448, brightness=0.3, contrast=0.3, saturation=0.3)
    )
    radius: int = 5
    alpha_low: float = 4.0  # SEAM; see AFFINITY_ALPHA_PRESETS
    alpha_high: float = 24.0


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
    crf: ProbsRefiner | None = None,
    on_step=None,
) -> AffinityNet:
    """Train `model` on `dataset` with affinity labels from the CAMs in `cam_dir`; writes
    ``out_dir/checkpoint.pt`` ({"model", "model_config", "optimizer", "epoch", "epoch_losses"})
    after every epoch and returns the trained model in eval mode."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    optimizer = build_optimizer(model, [], config)
    pipeline = build_augment(config.augment, "train.augment")
    labels = AffinityLabels(dataset, cam_dir, out_dir, config.alpha_low, config.alpha_high, crf)

    steps_per_epoch, total_steps = schedule_length(len(dataset), config)

    checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch, epoch_losses = 0, []
    state = resume_from(checkpoint_path, model, optimizer)
    if state is not None:
        start_epoch, epoch_losses = int(state["epoch"]), list(state["epoch_losses"])
        restore_global_rng(state)

    def item(index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        sample = dataset[index]
        rng = np.random.default_rng([config.seed, epoch, index])
        image, label, _ = pipeline(sample.image, labels(index, sample), None, rng=rng)
        return image, label

    for epoch in range(start_epoch, config.epochs):
        model.train()
        running, seen = 0.0, 0
        for step_in_epoch, idx in enumerate(epoch_batches(len(dataset), config, epoch, steps_per_epoch)):
            images, label_maps = zip(*(item(i, epoch) for i in idx))
            if len({im.shape for im in images}) > 1:
                raise ConfigError("train.augment.crop_size: images differ in size; set a crop size to batch them")
            batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device)
            step = epoch * steps_per_epoch + step_in_epoch
            set_poly_lr(optimizer, config, step, total_steps)
            features = model(model.input_norm(batch))
            grid = features.shape[-2:]
            codes = np.stack([pair_labels(resize_nearest(lab, *grid), config.radius) for lab in label_maps])
            loss = affinity_loss(pair_affinities(features, config.radius), torch.from_numpy(codes))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"non-finite loss (term affinity: {loss.item()}) at epoch {epoch + 1}, step {step + 1}; "
                    f"last good checkpoint: {checkpoint_path if checkpoint_path.exists() else 'none (first epoch)'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if on_step is not None:
                on_step(step + 1, total_steps)
        epoch_losses.append(running / max(1, seen))
        save_checkpoint(
            checkpoint_path,
            {
                "model": model.state_dict(),
                "model_config": model.config,
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "epoch_losses": epoch_losses,
                **global_rng_state(),
            },
        )
    return model.eval()
