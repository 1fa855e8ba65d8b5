"""Step `predict` (`weakseg predict CONFIG`): the trained segmentation network + the
evaluation images -> label maps (scored by the evaluate step).

Config:  `predict: PredictConfig` (scales, flip, crf, min_class_area, device, fold_batchnorm,
         channels_last).
Reads:   RUN/train_seg/seg_model.pt (or RUN/label_rounds/auxsegnet_model.pt with network:
         label_rounds, RUN/train_cam/cam_model.pt with network: train_cam for a single-stage
         method such as shape_cues), the eval_dataset's images (the dataset's when unset)
Writes:  RUN/predict/pred/<id>.png  palette PNGs, the argmax of the multi-scale + flip
                                    softmax (classes under min_class_area of the image
                                    dropped first; after a dense CRF when `crf` names a preset)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weakseg.data.base import SegDataset
from weakseg.data.io import write_label_png
from weakseg.errors import ConfigError, DataError
from weakseg.models.fold import inference_copy
from weakseg.models.inference import classes_by_area, predict_probs
from weakseg.steps.base import Step
from weakseg.steps.model_files import CAM_MODEL, SEG_MODEL, load_cam_model, load_seg_model
from weakseg.train.trainer import pick_device

NAME = "predict"
LABEL_ROUNDS_MODEL = Path("label_rounds") / "auxsegnet_model.pt"
MODEL_FILES = {"train_seg": SEG_MODEL, "label_rounds": LABEL_ROUNDS_MODEL, "train_cam": CAM_MODEL}
NETWORKS = tuple(MODEL_FILES)


@dataclass
class PredictConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    crf: str | None = None  # a dense-CRF preset (weakseg.refine.crf) applied to the predictions
    device: str = "auto"
    # Inference speed-ups with the same maths (weakseg.models.fold): BN folded into the
    # convolutions, NHWC memory. Predictions agree with them off to float rounding.
    fold_batchnorm: bool = True
    channels_last: bool = True
    # The network that segments: train_seg's (the final DeepLab), label_rounds' (AuxSegNet+
    # segments itself: its segmentation refined by the cross-task pairwise affinity, §III-C) or
    # train_cam's (a single-stage method, e.g. shape_cues: its decoder's prediction, §3.3).
    network: str = "train_seg"
    # Drop foreground classes whose argmax region covers less than this fraction of the image
    # (weakseg.models.inference.classes_by_area); before the CRF. 0 keeps every class.
    min_class_area: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.min_class_area < 1.0:
            raise ConfigError(f"predict.min_class_area: {self.min_class_area!r} must be in [0, 1)")
        if self.network not in NETWORKS:
            raise ConfigError(f"predict.network: {self.network!r} is not allowed; allowed values: {', '.join(NETWORKS)}")

    def extra_reads(self) -> tuple[str, ...]:
        return (self.network,)


# Channels whose probability never reaches this in an image are left out of the CRF.
CRF_MIN_PROB = 1e-3


def label_map(probs: np.ndarray, keep: np.ndarray, image: np.ndarray, crf=None) -> np.ndarray:
    """(H, W) uint8 label map of (C, H, W) class probabilities over the channels `keep`: their
    argmax, or with `crf` (a weakseg.refine.crf.DenseCRF) the argmax of the CRF over them,
    renormalised, leaving out channels that never reach CRF_MIN_PROB in the image."""
    keep = np.asarray(keep)
    if crf is None:
        return keep[probs[keep].argmax(axis=0)].astype(np.uint8)
    keep = keep[probs[keep].reshape(len(keep), -1).max(axis=1) >= CRF_MIN_PROB]
    sub = probs[keep] / np.maximum(probs[keep].sum(axis=0, keepdims=True), 1e-8)
    return keep[crf(sub.astype(np.float32), image).argmax(axis=0)].astype(np.uint8)


def predict(checkpoint: str | Path, dataset: SegDataset, out_dir: str | Path, config: PredictConfig,
            on_image=None) -> dict:
    """Label maps of every image of `dataset` into out_dir/pred."""
    out = Path(out_dir)
    dev = pick_device(config.device)
    if config.network in ("label_rounds", "train_cam"):
        model, state = load_cam_model(checkpoint, dev)
        output = getattr(model, "segmentation_output", None)
        # train_cam trains a segmentation only for single-stage methods (AuxSegNet+'s train_cam
        # trains its classification branch alone: its segmentation comes from label_rounds).
        if output is None or (config.network == "train_cam" and not getattr(model, "single_stage", False)):
            raise ConfigError(f"predict.network: {config.network}: its method ({type(model).__name__}) does not "
                              "segment after that step; segment with train_seg's (or label_rounds') network")
    else:
        model, state = load_seg_model(checkpoint, dev)
        output = "seg"
    model = inference_copy(model, config.fold_batchnorm, config.channels_last)
    if list(dataset.class_names) != list(state["class_names"]):
        raise DataError(checkpoint, "the dataset's classes differ from the classes the model was trained on")
    crf = None
    if config.crf:
        from weakseg.refine.crf import DenseCRF

        crf = DenseCRF(config.crf)
    for i in range(len(dataset)):
        sample = dataset[i]
        # uint8 RGB as it comes (np.require copies read-only cached images, which torch may not wrap)
        rgb = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1).to(dev)
        probs = predict_probs(model, rgb, config.scales, config.flip, output=output)
        probs = probs.cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
        keep = classes_by_area(probs, config.min_class_area, dataset.background_index)
        label = label_map(probs, keep, sample.image, crf)
        write_label_png(out / "pred" / f"{sample.id}.png", label)
        if on_image is not None:
            on_image(i + 1, len(dataset))
    return {"num_images": len(dataset)}


def run(config: PredictConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    return predict(Path(run_dir) / MODEL_FILES[config.network], dataset, Path(run_dir) / NAME, config, on_image=progress)


STEP = Step(NAME, PredictConfig, run, "Segment every evaluation image with the trained network (multi-scale + flip "
            "softmax, optional dense CRF); label maps in pred/.", dataset="eval",
            rank_zero=True)
