"""Step `train-seg`: pseudo-labels -> a trained DeepLab-style segmentation network.

Reads:   LABELS_DIR/labels/<id>.png  (from the pseudo-labels step; 255 is not trained on)
         the dataset (images only: its masks never reach training)
Writes:  OUT/checkpoint.pt (per epoch, for resuming), OUT/log.csv, OUT/config.yaml,
         OUT/seg_model.pt (final weights + model config + class names, for `predict`)

The network (ASPP head on any backbone of the factory) and its cross-entropy live in
weakseg.models.methods.deeplab and weakseg.losses.segmentation; the loop is the one trainer
the CAM methods use (weakseg.train.trainer), given the pseudo-labels as per-sample targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from weakseg.config import apply_overrides, from_mapping, load_yaml, to_dict
from weakseg.data import build_dataset
from weakseg.data.base import SegDataset
from weakseg.data.io import read_label_map, write_text_atomic
from weakseg.errors import DataError
from weakseg.losses.terms import SegmentationTerm
from weakseg.models.factory import SegModelConfig, build_seg_model
from weakseg.train import distributed
from weakseg.train.trainer import TrainConfig, save_checkpoint, train
from weakseg.record import dataset_summary, recorded_step


def label_reader(labels_dir: Path, dataset: SegDataset):
    """sample id -> its pseudo-label map, checked against the dataset's class count."""

    def read(sample_id: str) -> np.ndarray:
        path = labels_dir / "labels" / f"{sample_id}.png"
        if not path.is_file():
            raise DataError(path, "pseudo-label missing: run the pseudo-labels step first")
        label = read_label_map(path)
        bad = np.unique(label[(label != 255) & (label >= dataset.num_classes)])
        if bad.size:
            raise DataError(path, f"label ids {bad.tolist()} outside the {dataset.num_classes} classes")
        return label

    return read


def save_seg_model(path: Path, model: torch.nn.Module, config: SegModelConfig, dataset: SegDataset) -> None:
    state = {
        "model": model.state_dict(),
        "seg_model_config": to_dict(config),
        "class_names": list(dataset.class_names),
        "background_index": dataset.background_index,
    }
    save_checkpoint(path, state)


@recorded_step("train-seg", lambda a: {
    "labels": str(Path(a["labels_dir"]).resolve()), "model": to_dict(a["model_config"]), "train": to_dict(a["train_config"]),
    "dataset": dataset_summary(a["dataset"])}, keep=lambda r: {"epoch_losses": r["epoch_losses"], "steps": r["steps"]})
def run(
    dataset: SegDataset,
    labels_dir: str | Path,
    out_dir: str | Path,
    model_config: SegModelConfig,
    train_config: TrainConfig,
    on_step=None,
) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": to_dict(model_config), "train": to_dict(train_config)}
    if distributed.is_main():
        write_text_atomic(out / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    torch.manual_seed(train_config.seed)
    model = build_seg_model(model_config, dataset.num_classes)
    history = train(
        model,
        dataset,
        [SegmentationTerm()],
        train_config,
        out,
        on_step=on_step,
        masks=label_reader(Path(labels_dir), dataset),
    )
    if distributed.is_main():  # under torchrun, one writer
        save_seg_model(out / "seg_model.pt", model.cpu(), model_config, dataset)
    distributed.barrier()
    return {"out": str(out), "seg_model": str(out / "seg_model.pt"), **history}


@dataclass
class TrainSegFileConfig:
    """`weakseg train-seg CONFIG`: the step on its own."""

    dataset: dict[str, Any]
    labels: str  # folder holding labels/<id>.png (the pseudo-labels step's output)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/seg"


def run_file(config_path: str | Path, overrides: list[str] | None = None, on_step=None) -> dict:
    data = apply_overrides(load_yaml(config_path), overrides or [])
    config = from_mapping(TrainSegFileConfig, data)
    base_dir = Path(config_path).resolve().parent
    dataset = build_dataset(config.dataset, base_dir)
    return run(dataset, config.labels, config.out, config.model, config.train, on_step)
