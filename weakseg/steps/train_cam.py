"""Step `train_cam` (`weakseg train-cam CONFIG`): the images and their image-level labels ->
a trained CAM network.

Config:  `train_cam: {model, loss, train}` (ModelConfig, LossConfig, TrainConfig).
Reads:   the dataset (images, labels, depth when a loss term needs it; never its masks).
Writes:  RUN/train_cam/checkpoint.pt (per epoch, for resuming), log.csv (every loss term per
         step), cam_model.pt (final weights plus what infer_cam needs to rebuild the model:
         model config, class names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from weakseg.errors import ConfigError
from weakseg.losses.terms import LossConfig
from weakseg.models.factory import ModelConfig, build_model
from weakseg.steps.model_files import CAM_MODEL, save_cam_model
from weakseg.steps.base import Step
from weakseg.train import distributed
from weakseg.train.trainer import TrainConfig, train

NAME = "train_cam"


@dataclass
class TrainCamConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model.method == "seam" and self.loss.seam is None:
            # Without them the PCM is never trained, and inference reads the PCM-revised CAM.
            raise ConfigError("train_cam.model.method: seam needs train_cam.loss.seam, SEAM's equivariance terms "
                              "(`seam: {}` gives SEAM's weights: er 1, ecr 1, min_pool 1)")


def train_cam(config: TrainCamConfig, dataset, out: Path, on_step=None, on_epoch=None) -> dict:
    """Train into `out`; returns the trainer's history and the model file's path."""
    out = Path(out)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, len(dataset.foreground_ids))
    history = train(model, dataset, config.loss, config.train, out, background_channel=model.background_channel,
                    on_step=on_step, on_epoch=on_epoch)
    if distributed.is_main():  # under torchrun, one writer
        save_cam_model(out / CAM_MODEL.name, model.cpu(), config.model, dataset)
    distributed.barrier()
    return {"cam_model": str(out / CAM_MODEL.name), **history}


def run(config: TrainCamConfig, dataset, run_dir: Path, progress=None) -> dict:
    history = train_cam(config, dataset, Path(run_dir) / NAME, on_step=progress, on_epoch=getattr(progress, "note", None))
    return {"final_loss": history["epoch_losses"][-1], "epoch_losses": history["epoch_losses"],
            "steps": history["steps"]}


STEP = Step(NAME, TrainCamConfig, run, "Train a CAM network with the configured loss terms (GAP, ISL, FSL, DEAL, "
            "SEAM); writes cam_model.pt, a checkpoint per epoch and log.csv with every loss term.")
