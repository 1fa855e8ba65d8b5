"""The one plug-in registry: a refiner added with one decorated function is accepted by
the config, built by the refine step and listed; names clash loudly."""

from __future__ import annotations

import numpy as np
import pytest

from weakseg.errors import ConfigError
from weakseg.registry import available, lookup, register


def test_builtins_are_listed():
    assert sorted(available("method")) == ["auxsegnet", "cam", "seam", "shape_cues", "vit_cam"]
    assert {"none", "crf", "pamr", "spr"} <= set(available("refiner"))
    assert {"classification", "deal", "fsl", "online_mask", "seam"} <= set(available("loss_term"))
    assert {"tiny_cnn", "efficientnet_lite0", "resnet38d", "timm:", "resnet50"} <= set(available("backbone"))
    assert {"voc", "folder", "nyu", "coco", "synthetic"} <= set(available("dataset"))


def test_a_new_loss_term_is_a_config_a_term_and_a_registered_builder(monkeypatch, tmp_path):
    """A term added as docs/architecture.md says: its builder registered under the section's
    name, a field of LossConfig; build_terms then builds it, and the trainer logs and trains it."""
    import dataclasses

    import torch

    from weakseg.config import from_mapping
    from weakseg.data import build_dataset
    from weakseg.losses import terms
    from weakseg.losses.base import LossTerm, foreground_channels
    from weakseg.models.factory import ModelConfig, build_model
    from weakseg.train.trainer import TrainConfig, train

    @dataclasses.dataclass
    class EntropyConfig:
        weight: float = 0.5

    class EntropyTerm(LossTerm):
        name = "entropy"

        def value(self, scores, batch, background_channel):
            p = torch.sigmoid(foreground_channels(scores, background_channel))
            return -(p * torch.log(p + 1e-6)).mean()

    register("loss_term", "test_entropy")(lambda config, reads, generator=None: [EntropyTerm(config.weight, 0, reads)])
    table = dataclasses.make_dataclass("LossConfigWithEntropy", [("test_entropy", EntropyConfig | None, None)],
                                       bases=(terms.LossConfig,))
    config = from_mapping(table, {"test_entropy": {"weight": 0.25}}, "loss")
    built = terms.build_terms(config)
    assert [t.name for t in built] == ["cls", "entropy"] and built[1].weight == 0.25
    dataset = build_dataset({"kind": "synthetic", "num_images": 8, "image_size": 32})
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_args={"width": 8}), len(dataset.foreground_ids))
    train(model, dataset, built, from_mapping(TrainConfig, {"epochs": 1, "batch_size": 4, "workers": 0}, "train"),
          tmp_path)
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "epoch,step,lr,total,cls,entropy"


def test_a_new_refiner_is_one_decorated_function(tmp_path):
    from weakseg.data import build_dataset
    from weakseg.steps import refine as refine_step
    from weakseg.steps.refine import RefineConfig

    class Sharpen:
        """probs -> probs ** 2, renormalised: a refiner in a few lines."""

        def __call__(self, probs, image):
            squared = probs**2
            return squared / squared.sum(axis=0, keepdims=True)

    register("refiner", "test_sharpen")(lambda config: Sharpen())
    assert "test_sharpen" in available("refiner")
    config = RefineConfig(method="test_sharpen", background="constant", background_constant=0.5)

    dataset = build_dataset({"kind": "synthetic", "num_images": 2, "image_size": 24})
    from weakseg.steps.infer_cam import save_cams

    for i in range(2):
        sample = dataset[i]
        cams = np.full((len(sample.present_class_ids), 24, 24), 0.8, np.float32)
        save_cams(tmp_path / "infer_cam" / "cams" / f"{sample.id}.npz", cams, sample.present_class_ids)
    result = refine_step.run(config, dataset, tmp_path)  # reads RUN/infer_cam, writes RUN/refine
    assert result["method"] == "test_sharpen"
    with np.load(tmp_path / "refine" / "probs" / f"{dataset.ids[0]}.npz") as data:
        probs = data["probs"].astype(np.float32)
    # Background 0.5 against classes 0.8: squared and renormalised, as the refiner says.
    k = probs.shape[0] - 1
    expected_bg = 0.25 / (0.25 + k * 0.64)
    np.testing.assert_allclose(probs[0], expected_bg, atol=2e-3)


def test_a_new_backbone_is_one_decorated_builder():
    """A backbone added as docs/architecture.md says: every network and step builds it by
    name, and it is handed RGB already normalised with the input_norm it declares."""
    import torch
    from torch import nn

    from weakseg.models.backbones import available_backbones, build_backbone
    from weakseg.models.backbones.norm import InputNorm
    from weakseg.models.factory import ModelConfig, SegModelConfig, build_model, build_seg_model

    class Patches(nn.Module):
        """4x4 average pooling + a 1x1 conv: a stride-4 backbone in a few lines."""

        input_norm = InputNorm("halves", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

        def __init__(self, channels: int = 8, output_stride: int = 4):
            super().__init__()
            self.out_channels, self.output_stride = channels, output_stride
            self.proj = nn.Conv2d(3, channels, 1)
            self.seen = None

        def forward(self, x):
            self.seen = x
            return self.proj(nn.functional.avg_pool2d(x, self.output_stride))

    register("backbone", "test_patches")(lambda name, pretrained=False, output_stride=None, **kw: Patches(**kw))
    assert "test_patches" in available_backbones()
    assert isinstance(build_backbone("test_patches", channels=4), Patches)
    cam = build_model(ModelConfig(backbone="test_patches", backbone_args={"channels": 6}), 3).eval()
    seg = build_seg_model(SegModelConfig(backbone="test_patches", aspp_channels=4), 4).eval()
    pixels = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    with torch.no_grad():
        assert cam(pixels)["cams"].shape == (1, 3, 4, 4)
        assert seg(pixels)["seg"].shape == (1, 4, 4, 4)
    assert torch.equal(seg.backbone.seen, torch.ones(1, 3, 16, 16))  # (1 - 0.5) / 0.5
    with pytest.raises(ConfigError, match="backbone .test_patchez. is not available; available: .*test_patches"):
        build_backbone("test_patchez")


def test_a_new_dataset_layout_is_one_registered_layout(tmp_path):
    """A layout added as docs/architecture.md says: a config accepts `kind:` it, with its own
    keys checked, and its path keys resolve against the config file."""
    import dataclasses

    from weakseg.data import build_dataset, check_dataset_mapping, with_absolute_paths
    from weakseg.data import synthetic
    from weakseg.data.base import DatasetLayout

    @dataclasses.dataclass
    class TinyConfig:
        images: int = 3
        notes: str = "notes.txt"

    def build(config, base_dir, strict):
        return synthetic.build(synthetic.Config(num_images=config.images, image_size=24))

    register("dataset", "test_tiny")(DatasetLayout(TinyConfig, build, ("notes",)))
    assert "test_tiny" in available("dataset")
    assert len(build_dataset({"kind": "test_tiny", "images": 2})) == 2
    with pytest.raises(ConfigError, match="dataset.imgs"):
        check_dataset_mapping({"kind": "test_tiny", "imgs": 2})
    assert with_absolute_paths({"kind": "test_tiny"} | {"notes": "n.txt"}, tmp_path)["notes"] == str(tmp_path / "n.txt")
    with pytest.raises(ConfigError, match="dataset.kind: 'test_tinny' is not allowed; allowed values: .*synthetic"):
        build_dataset({"kind": "test_tinny"})


def test_unknown_names_and_clashes_are_one_clear_error():
    with pytest.raises(ConfigError, match="refine.method: 'blur' is not allowed; allowed values: none, crf"):
        lookup("refiner", "blur", "refine.method")
    register("refiner", "test_once")(print)
    register("refiner", "test_once")(print)  # the same builder again: harmless (module re-import)
    with pytest.raises(ValueError, match="registered twice"):
        register("refiner", "test_once")(len)
    with pytest.raises(ValueError, match="unknown plug-in kind"):
        register("backbone_typo", "x")
