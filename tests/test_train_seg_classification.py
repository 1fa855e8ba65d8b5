"""train_seg.classification: an image-level term on the final network's pooled logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weakseg.config import from_mapping
from weakseg.data import build_dataset
from weakseg.data.io import write_label_png
from weakseg.errors import ConfigError
from weakseg.losses.classification import ClassificationConfig
from weakseg.models.factory import SegModelConfig
from weakseg.steps import train_seg
from weakseg.steps.train_seg import TrainSegConfig
from weakseg.train.trainer import TrainConfig


def soft_margin_by_hand(pooled: list[list[float]], labels: list[list[int]]) -> float:
    """Mean over images and classes of -[y log s(x) + (1 - y) log(1 - s(x))], s the sigmoid."""
    total, count = 0.0, 0
    for row, targets in zip(pooled, labels):
        for x, y in zip(row, targets):
            s = 1.0 / (1.0 + math.exp(-x))
            total -= y * math.log(s) + (1 - y) * math.log(1 - s)
            count += 1
    return total / count


@pytest.mark.parametrize("kind", ["gap", "gmp"])
def test_term_pools_the_foreground_logits_and_leaves_out_the_background(kind):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)  # channel 2 is the background
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    config = TrainSegConfig(classification=ClassificationConfig(kind=kind, weight=0.5))
    terms = train_seg.loss_terms(config)
    assert [t.name for t in terms] == ["seg", "cls"] and terms[1].weight == 0.5
    value = terms[1].loss({"seg": logits}, {"labels": labels}, background_channel=2)
    pooled = []
    for b in range(2):
        row = []
        for c in (0, 1, 3):
            cells = [float(logits[b, c, i, j]) for i in range(3) for j in range(5)]
            row.append(sum(cells) / len(cells) if kind == "gap" else max(cells))
        pooled.append(row)
    assert float(value) == pytest.approx(soft_margin_by_hand(pooled, labels.int().tolist()), rel=1e-5)


def test_default_is_cross_entropy_only_and_other_kinds_are_refused():
    assert [t.name for t in train_seg.loss_terms(TrainSegConfig())] == ["seg"]
    with pytest.raises(ConfigError, match="train_seg.classification.kind: 'isl_binomial' is not allowed"):
        TrainSegConfig(classification=ClassificationConfig(kind="isl_binomial"))
    config = from_mapping(TrainSegConfig, {"classification": {"kind": "gmp", "weight": 0.2}}, "train_seg")
    assert config.classification.kind == "gmp" and config.classification.weight == 0.2


def test_term_trains_the_absent_classes_down_where_no_pixel_is_labelled(tmp_path):
    """Pseudo-labels all void: the cross-entropy has no pixel, so only the term can move the
    absent classes' logits; with it they fall below those of the network trained without it."""
    dataset = build_dataset({"kind": "synthetic", "num_images": 8, "image_size": 32})
    for i in range(len(dataset)):
        write_label_png(tmp_path / "labels" / "labels" / f"{dataset.ids[i]}.png", np.full((32, 32), 255, np.uint8))
    model_config = SegModelConfig(backbone="tiny_cnn", backbone_args={"width": 8}, aspp_channels=8)
    train_config = TrainConfig(epochs=3, batch_size=4, lr=0.05, weight_decay=0.0, workers=0,
                               augment={"crop_size": 32, "scale_range": [1.0, 1.0], "hflip_prob": 0.0})
    absent_mean = {}
    for name, classification in (("without", None), ("with", ClassificationConfig(kind="gap"))):
        config = from_mapping(TrainSegConfig, {"model": model_config.__dict__, "train": train_config.__dict__,
                                               "classification": classification and classification.__dict__},
                              "train_seg")
        model = train_seg.build_network(config, dataset)
        train_seg.fit(model, config, dataset, tmp_path / "labels", tmp_path / name)
        model.eval()
        values = []
        with torch.no_grad():
            for i in range(len(dataset)):
                sample = dataset[i]
                rgb = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)[None].float() / 255
                pooled = model(rgb)["seg"].mean(dim=(2, 3))[0]
                fg = [c for c in range(dataset.num_classes) if c != dataset.background_index]
                absent = [c for k, c in enumerate(fg) if sample.labels[k] < 0.5]
                values.append(float(pooled[absent].mean() - pooled[dataset.background_index]))
        absent_mean[name] = float(np.mean(values))
    assert absent_mean["with"] < absent_mean["without"] - 0.1, absent_mean
