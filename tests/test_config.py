"""Typed config: key checking, Literal values, overrides, safe YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from weakseg.config import apply_overrides, from_mapping, load_yaml
from weakseg.errors import ConfigError


@dataclass
class Inner:
    lr: float = 0.1
    optimizer: Literal["sgd", "adamw"] = "sgd"


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    scales: list[float] = field(default_factory=lambda: [1.0])
    limit: int | None = None


def test_values_and_nested():
    cfg = from_mapping(Outer, {"name": "x", "inner": {"lr": 1, "optimizer": "adamw"}, "scales": [0.5, 1]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float) and cfg.inner.optimizer == "adamw"
    assert cfg.scales == [0.5, 1.0] and cfg.limit is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"lrr": 1}}, "inner.lrr: unknown key; allowed keys: lr, optimizer"),
        ({"name": "x", "inner": {"optimizer": "adam"}}, "inner.optimizer: 'adam' is not allowed; allowed values: sgd, adamw"),
        ({"name": "x", "limit": "many"}, "limit: expected an integer"),
        ({"name": "x", "limit": True}, "limit: expected an integer"),
        ({}, "name: required key is missing"),
    ],
)
def test_errors_name_key_and_allowed_values(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_mapping(Outer, data)


def test_overrides():
    data = apply_overrides({"inner": {"lr": 0.1}}, ["inner.lr=0.5", "scales=[0.5, 2]", "name=run1"])
    cfg = from_mapping(Outer, data)
    assert cfg.inner.lr == 0.5 and cfg.scales == [0.5, 2.0] and cfg.name == "run1"
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["nonsense"])


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("a: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_base_files_merge_and_loops_are_refused(tmp_path):
    (tmp_path / "paper.yaml").write_text(
        "model: {method: seam, backbone: resnet38d, backbone_args: {output_stride: 8}}\n"
        "loss: {classification: {kind: gap}, fsl: {weight: 1.0}, seam: {}}\n"
        "train: {epochs: 8, lr: 0.01}\n"
    )
    (tmp_path / "cpu.yaml").write_text(
        "base: paper.yaml\n"
        "model: {backbone: efficientnet_lite0, backbone_args: {pretrained: true}}\n"
        "loss: {fsl: null}\n"
        "train: {epochs: 4}\n"
    )
    data = load_yaml(tmp_path / "cpu.yaml")
    assert data == {
        "model": {"method": "seam", "backbone": "efficientnet_lite0",
                  "backbone_args": {"output_stride": 8, "pretrained": True}},  # mappings merge
        "loss": {"classification": {"kind": "gap"}, "seam": {}},  # null removes the key
        "train": {"epochs": 4, "lr": 0.01},
    }
    assert load_yaml(tmp_path / "paper.yaml")["train"]["epochs"] == 8  # the base is untouched
    # A mapping of another kind replaces the base's whole: an nyu dataset keeps no voc `split`.
    (tmp_path / "voc.yaml").write_text("dataset: {kind: voc, root: v, split: train}\nloss: {classification: {kind: gap}}\n")
    (tmp_path / "nyu.yaml").write_text("base: voc.yaml\ndataset: {kind: nyu, root: n}\n"
                                       "loss: {classification: {kind: gap, focal_gamma: 2}}\n")
    assert load_yaml(tmp_path / "nyu.yaml") == {
        "dataset": {"kind": "nyu", "root": "n"},
        "loss": {"classification": {"kind": "gap", "focal_gamma": 2}},  # same kind: merged
    }
    (tmp_path / "a.yaml").write_text("base: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match="loop"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_yaml(tmp_path / "c.yaml")
