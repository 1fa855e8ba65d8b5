"""The model files steps hand to each other through the run directory, in one place (a step
never imports another step; both sides of a file import this module):

    RUN/train_cam/cam_model.pt            -> infer_cam
    RUN/train_affinity/affinity_model.pt  -> refine (method affinity_rw)
    RUN/train_seg/seg_model.pt            -> predict

Each is a `torch.save` dict of tensors and plain values (weights, the config that rebuilds
the network, the class names), loaded with `weights_only=True`: a model file is data, never
code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weakseg.config import from_mapping, to_dict
from weakseg.models.factory import ModelConfig, SegModelConfig, build_model, build_seg_model
from weakseg.train.trainer import load_model_file, save_checkpoint

CAM_MODEL = Path("train_cam") / "cam_model.pt"
AFFINITY_MODEL = Path("train_affinity") / "affinity_model.pt"
SEG_MODEL = Path("train_seg") / "seg_model.pt"


def _state(model: torch.nn.Module, config_key: str, config, dataset) -> dict:
    return {"model": model.state_dict(), config_key: to_dict(config), "class_names": list(dataset.class_names),
            "background_index": dataset.background_index}


def save_cam_model(path: Path, model: torch.nn.Module, model_config: ModelConfig, dataset) -> None:
    save_checkpoint(path, _state(model, "model_config", model_config, dataset))


def load_cam_model(path: str | Path, device: torch.device):
    """(model in eval mode on `device`, the saved state) from a cam_model.pt."""
    state = load_model_file(path, "model_config", "cam_model.pt written by `weakseg train-cam`")
    config = from_mapping(ModelConfig, state["model_config"], "model")
    model = build_model(config, len(state["class_names"]) - (0 if state["background_index"] is None else 1))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def save_seg_model(path: Path, model: torch.nn.Module, config: SegModelConfig, dataset) -> None:
    save_checkpoint(path, _state(model, "seg_model_config", config, dataset))


def load_seg_model(path: str | Path, device: torch.device):
    """(model in eval mode on `device`, the saved state) from a seg_model.pt."""
    state = load_model_file(path, "seg_model_config", "seg_model.pt written by `weakseg train-seg`")
    config = from_mapping(SegModelConfig, state["seg_model_config"], "model")
    model = build_seg_model(config, len(state["class_names"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def save_affinity_model(path: Path, model, dataset) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config,
                           "class_names": list(dataset.class_names)})


def load_affinity_model(path: str | Path):
    """The AffinityNet (eval mode, CPU) from an affinity_model.pt."""
    from weakseg.refine.affinity import AffinityNet

    state = load_model_file(path, "model_config", "affinity_model.pt written by `weakseg train-affinity`")
    return AffinityNet.from_state(state), state
