"""Step `train_seg` (`weakseg train-seg CONFIG`): pseudo-labels -> a trained DeepLab-style
segmentation network.

Config:  `train_seg: {model, train, backbone_from, classification}` (SegModelConfig, TrainConfig;
         classification: an optional image-level term on the network's pooled scores).
Reads:   RUN/pseudo_labels/labels/<id>.png  (255 is not trained on)
         RUN/train_cam/cam_model.pt         (only with backbone_from: train_cam)
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
from weakseg.errors import ConfigError, DataError
from weakseg.losses.base import LossTerm
from weakseg.losses.classification import ClassificationConfig, ClassificationTerm
from weakseg.losses.segmentation import SegmentationTerm
from weakseg.models.factory import SegModelConfig, build_seg_model
from weakseg.train import distributed
from weakseg.steps.base import Step
from weakseg.steps.model_files import CAM_MODEL, SEG_MODEL, load_cam_model, save_seg_model
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
    # Where the backbone's starting weights come from: null = model.backbone_args (ImageNet
    # with pretrained: true); "train_cam" = the run's trained CAM network's backbone (the same
    # backbone name; the output stride may differ, dilation has no parameters). On 220 VOC
    # images it starts the network from features that already separate the run's classes
    # (docs/results.md, "VOC pipeline, every stage on held-back images").
    backbone_from: str | None = None
    # An image-level term beside the cross-entropy: the multi-label soft margin of the image's
    # labels on the foreground channels of the network's logits, pooled over the image (kind
    # gap: mean, gmp: max; weakseg.losses.classification). The pseudo-labels say nothing
    # about classes absent from an image except where they mark other classes; the term
    # penalises painting an absent class anywhere. null = cross-entropy only (the papers' final
    # networks). On 220 VOC images half the classes the final network paints are not in the
    # image (docs/results.md, "Small-class filter").
    classification: ClassificationConfig | None = None

    def __post_init__(self):
        if self.backbone_from not in (None, "train_cam"):
            raise ConfigError(f"{NAME}.backbone_from: {self.backbone_from!r} is not allowed; allowed values: "
                              "null, train_cam")
        if self.classification is not None and self.classification.kind not in ("gap", "gmp"):
            raise ConfigError(f"{NAME}.classification.kind: {self.classification.kind!r} is not allowed; "
                              "allowed values: gap, gmp (pooled segmentation logits)")

    def extra_reads(self) -> tuple[str, ...]:
        return ("train_cam",) if self.backbone_from == "train_cam" else ()


def copy_cam_backbone(model, cam_model_file: Path) -> None:
    """The CAM network's backbone weights from `cam_model_file` into `model.backbone`
    (strict: the same backbone, key for key and shape for shape)."""
    cam_model, _ = load_cam_model(cam_model_file, torch.device("cpu"))
    source, target = cam_model.backbone.state_dict(), model.backbone.state_dict()
    if source.keys() != target.keys() or any(source[k].shape != target[k].shape for k in source):
        raise DataError(cam_model_file, f"train_seg.backbone_from: train_cam needs the CAM network's backbone "
                                        f"({type(cam_model.backbone).__name__}, {len(source)} tensors) to equal "
                                        f"train_seg.model's ({type(model.backbone).__name__}, {len(target)} tensors)")
    model.backbone.load_state_dict(source)


def build_network(config: TrainSegConfig, dataset: SegDataset, cam_model_file: Path | None = None):
    """The untrained final network, seeded by train.seed; `cam_model_file`: its backbone
    starts from that CAM network's (backbone_from: train_cam)."""
    torch.manual_seed(config.train.seed)
    model = build_seg_model(config.model, dataset.num_classes)
    if cam_model_file is not None:
        copy_cam_backbone(model, cam_model_file)
    return model


def loss_terms(config: TrainSegConfig) -> list[LossTerm]:
    """The cross-entropy on the pseudo-labels, and the classification term if configured."""
    terms: list[LossTerm] = [SegmentationTerm()]
    if config.classification is not None:
        terms.append(ClassificationTerm(config.classification, config.classification.reads or ["seg"]))
    return terms


def fit(model, config: TrainSegConfig, dataset: SegDataset, labels_dir: Path, out_dir: Path, on_step=None,
        on_epoch=None) -> dict:
    """Train `model` on the pseudo-labels in `labels_dir` with the config's terms (the
    dataset's background index is the logits' background channel, which the classification
    term leaves out)."""
    return train(model, dataset, loss_terms(config), config.train, out_dir, background_channel=dataset.background_index,
                 on_step=on_step, masks=PseudoLabelReader(Path(labels_dir), dataset), on_epoch=on_epoch)


def train_seg(
    dataset: SegDataset,
    labels_dir: str | Path,
    out_dir: str | Path,
    model_config: SegModelConfig,
    train_config: TrainConfig,
    on_step=None,
    on_epoch=None,
    cam_model_file: Path | None = None,
    classification: ClassificationConfig | None = None,
) -> dict:
    """`cam_model_file`: start the backbone from that CAM network's (backbone_from: train_cam)."""
    out = Path(out_dir)
    config = TrainSegConfig(model=model_config, train=train_config, classification=classification,
                            backbone_from="train_cam" if cam_model_file is not None else None)
    model = build_network(config, dataset, cam_model_file)
    history = fit(model, config, dataset, Path(labels_dir), out, on_step=on_step, on_epoch=on_epoch)
    if distributed.is_main():  # under torchrun, one writer
        save_seg_model(out / SEG_MODEL.name, model.cpu(), model_config, dataset)
    distributed.barrier()
    return {"out": str(out), "seg_model": str(out / SEG_MODEL.name), **history}


def run(config: TrainSegConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    cam_model_file = Path(run_dir) / CAM_MODEL if config.backbone_from == "train_cam" else None
    history = train_seg(dataset, Path(run_dir) / "pseudo_labels", Path(run_dir) / NAME, config.model, config.train,
                        on_step=progress, on_epoch=getattr(progress, "note", None), cam_model_file=cam_model_file,
                        classification=config.classification)
    return {"final_loss": history["epoch_losses"][-1], "epoch_losses": history["epoch_losses"],
            "steps": history["steps"]}


STEP = Step(NAME, TrainSegConfig, run, "Train the DeepLab-style segmentation network (ASPP on any backbone) on the "
            "pseudo-labels, 255 ignored; writes seg_model.pt, a checkpoint per epoch and log.csv.",
            reads=("pseudo_labels",))
