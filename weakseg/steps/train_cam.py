"""Step `train-cam`: a training YAML (+ key=value overrides) -> a trained CAM network.

Reads:   the config file and its dataset.
Writes:  OUT/config.yaml (resolved config), OUT/checkpoint.pt (per epoch, for resuming),
         OUT/log.csv (every loss term per step), OUT/cam_model.pt (final weights plus what
         `infer-cam` needs to rebuild the model: model config, class names).
`out` in the config is relative to the current directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from weakseg.config import apply_overrides, from_mapping, load_yaml, to_dict
from weakseg.data import build_dataset, check_dataset_mapping, with_absolute_paths
from weakseg.data.io import write_text_atomic
from weakseg.errors import ConfigError
from weakseg.losses.terms import LossConfig
from weakseg.models.factory import ModelConfig, build_model
from weakseg.record import run_record
from weakseg.train import distributed
from weakseg.train.trainer import TrainConfig, save_checkpoint, train


@dataclass
class InferConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    threshold: float | None = None  # background threshold when there are no masks to sweep
    # Inference speed-ups with the same maths (weakseg.models.fold): BN folded into the
    # convolutions, NHWC memory. CAMs agree with them off to float rounding.
    fold_batchnorm: bool = True
    channels_last: bool = True


@dataclass
class CAMRunConfig:
    dataset: dict[str, Any]
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    out: str = "runs/cam"


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[CAMRunConfig, Path]:
    data = apply_overrides(load_yaml(path), overrides or [])
    config = from_mapping(CAMRunConfig, data)
    check_dataset_mapping(config.dataset)
    return config, Path(path).resolve().parent


def save_cam_model(path: Path, model: torch.nn.Module, model_config: ModelConfig, dataset) -> None:
    state = {
        "model": model.state_dict(),
        "model_config": to_dict(model_config),
        "class_names": list(dataset.class_names),
        "background_index": dataset.background_index,
    }
    save_checkpoint(path, state)


def run(config_path: str | Path, overrides: list[str] | None = None, on_step=None) -> dict:
    config, base_dir = load_config(config_path, overrides)
    return run_config(config, base_dir, on_step)


def run_config(config: CAMRunConfig, base_dir: Path | None, on_step=None) -> dict:
    """Train from a config object; dataset paths resolve against `base_dir`."""
    if config.model.method == "seam" and config.loss.seam is None:
        # Without them the PCM is never trained, and inference reads the PCM-revised CAM.
        raise ConfigError("model.method: seam needs loss.seam, SEAM's equivariance terms "
                          "(`seam: {}` gives SEAM's weights: er 1, ecr 1, min_pool 1)")
    out = Path(config.out)
    saved = to_dict(config)
    saved["dataset"] = with_absolute_paths(config.dataset, base_dir)  # runnable from OUT too
    with run_record(out, "train-cam", saved) as record:
        result = _train(config, saved, base_dir, on_step)
        record["result"] = {"epoch_losses": result["epoch_losses"], "steps": result["steps"]}
    return result


def _train(config: CAMRunConfig, saved: dict, base_dir: Path | None, on_step) -> dict:
    out = Path(config.out)
    if distributed.is_main():
        write_text_atomic(out / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    dataset = build_dataset(config.dataset, base_dir)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, len(dataset.foreground_ids))
    history = train(
        model,
        dataset,
        config.loss,
        config.train,
        out,
        background_channel=model.background_channel,
        on_step=on_step,
    )
    if distributed.is_main():  # under torchrun, one writer
        save_cam_model(out / "cam_model.pt", model.cpu(), config.model, dataset)
    distributed.barrier()
    return {"out": str(out), "cam_model": str(out / "cam_model.pt"), **history}
