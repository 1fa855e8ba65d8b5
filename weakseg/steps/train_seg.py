"""Step `train_seg` (`weakseg train-seg CONFIG`): pseudo-labels -> a trained DeepLab-style
segmentation network.

Config:  `train_seg: {model, train}` (SegModelConfig, TrainConfig).
Reads:   RUN/pseudo_labels/labels/<id>.png  (255 is not trained on)
         the dataset (images only: its masks never reach training)
Writes:  RUN/train_seg/checkpoint.pt (per epoch, for resuming), log.csv, seg_model.pt (final
         weights + model config + class names, for predict)

The network (ASPP head on any backbone of the factory) and its cross-entropy live in
weakseg.models.methods.deeplab and weakseg.losses.segmentation; the loop is the one trainer
the CAM methods use (weakseg.train.trainer), given the pseudo-labels as per-sample targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weakseg.data.base import SegDataset
from weakseg.data.io import read_label_map
from weakseg.errors import DataError
from weakseg.losses.segmentation import SegmentationTerm
from weakseg.models.factory import SegModelConfig, build_seg_model
from weakseg.train import distributed
from weakseg.steps.base import Step
from weakseg.steps.model_files import SEG_MODEL, save_seg_model
from weakseg.train.trainer import TrainConfig, train

NAME = "train_seg"


class PseudoLabelReader:
    """sample id -> its pseudo-label map, checked against the dataset's class count. A class,
    not a closure, so DataLoader workers started by spawn (macOS, Windows) can receive it."""

    def __init__(self, labels_dir: Path, dataset: SegDataset):
        self.labels_dir, self.num_classes = Path(labels_dir), int(dataset.num_classes)

    def __call__(self, sample_id: str) -> np.ndarray:
        path = self.labels_dir / "labels" / f"{sample_id}.png"
        if not path.is_file():
            raise DataError(path, "pseudo-label missing: run `weakseg pseudo-labels` first")
        label = read_label_map(path)
        bad = np.unique(label[(label != 255) & (label >= self.num_classes)])
        if bad.size:
            raise DataError(path, f"label ids {bad.tolist()} outside the {self.num_classes} classes")
        return label


@dataclass
class TrainSegConfig:
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def train_seg(
    dataset: SegDataset,
    labels_dir: str | Path,
    out_dir: str | Path,
    model_config: SegModelConfig,
    train_config: TrainConfig,
    on_step=None,
    on_epoch=None,
) -> dict:
    out = Path(out_dir)
    torch.manual_seed(train_config.seed)
    model = build_seg_model(model_config, dataset.num_classes)
    history = train(
        model,
        dataset,
        [SegmentationTerm()],
        train_config,
        out,
        on_step=on_step,
        masks=PseudoLabelReader(Path(labels_dir), dataset),
        on_epoch=on_epoch,
    )
    if distributed.is_main():  # under torchrun, one writer
        save_seg_model(out / SEG_MODEL.name, model.cpu(), model_config, dataset)
    distributed.barrier()
    return {"out": str(out), "seg_model": str(out / SEG_MODEL.name), **history}


def run(config: TrainSegConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    history = train_seg(dataset, Path(run_dir) / "pseudo_labels", Path(run_dir) / NAME, config.model, config.train,
                        on_step=progress, on_epoch=getattr(progress, "note", None))
    return {"final_loss": history["epoch_losses"][-1], "epoch_losses": history["epoch_losses"],
            "steps": history["steps"]}


STEP = Step(NAME, TrainSegConfig, run, "Train the DeepLab-style segmentation network (ASPP on any backbone) on the "
            "pseudo-labels, 255 ignored; writes seg_model.pt, a checkpoint per epoch and log.csv.",
            reads=("pseudo_labels",))
