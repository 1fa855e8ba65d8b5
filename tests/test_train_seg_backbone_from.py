"""train_seg.backbone_from: train_cam starts the final network from the CAM network's backbone."""

from __future__ import annotations

import pytest
import torch

from weakseg.data import build_dataset
from weakseg.errors import ConfigError, DataError
from weakseg.models.factory import ModelConfig, SegModelConfig, build_model, build_seg_model
from weakseg.steps.model_files import save_cam_model
from weakseg.steps.train_seg import TrainSegConfig, copy_cam_backbone


def test_copies_every_backbone_tensor_and_nothing_else(tmp_path):
    dataset = build_dataset({"kind": "synthetic", "num_images": 4, "image_size": 32})
    torch.manual_seed(0)
    cam_config = ModelConfig(backbone="tiny_cnn", backbone_args={"width": 8})
    cam = build_model(cam_config, len(dataset.foreground_ids))
    with torch.no_grad():
        for p in cam.parameters():
            p.add_(torch.randn_like(p))  # weights no fresh network has
    save_cam_model(tmp_path / "cam_model.pt", cam, cam_config, dataset)
    seg = build_seg_model(SegModelConfig(backbone="tiny_cnn", backbone_args={"width": 8}), dataset.num_classes)
    head_before = {k: v.clone() for k, v in seg.head.state_dict().items()}
    copy_cam_backbone(seg, tmp_path / "cam_model.pt")
    source = cam.backbone.state_dict()
    for key, value in seg.backbone.state_dict().items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=0)
    for key, value in seg.head.state_dict().items():
        torch.testing.assert_close(value, head_before[key], rtol=0, atol=0)

    other = build_seg_model(SegModelConfig(backbone="tiny_cnn", backbone_args={"width": 16}), dataset.num_classes)
    with pytest.raises(DataError, match="cam_model.pt.*backbone_from: train_cam needs the CAM network's backbone"):
        copy_cam_backbone(other, tmp_path / "cam_model.pt")


def test_config_reads_train_cam_only_when_asked():
    assert TrainSegConfig().extra_reads() == ()
    assert TrainSegConfig(backbone_from="train_cam").extra_reads() == ("train_cam",)
    with pytest.raises(ConfigError, match="train_seg.backbone_from: 'imagenet' is not allowed"):
        TrainSegConfig(backbone_from="imagenet")
