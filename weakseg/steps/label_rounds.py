"""Step `label_rounds` (`weakseg label-rounds CONFIG`): AuxSegNet+'s stage-wise training with
pseudo-label updates (auxsegnet-plus §III-A, §III-C, Algorithm 1).

Config:  `label_rounds: LabelRoundsConfig` (saliency source, stages, patience, CAM scales and
         thresholds, label-update switches, loss weights, train).
Reads:   RUN/train_cam/cam_model.pt  an `auxsegnet` network whose classification branch
                                     train_cam trained first (15 epochs in the paper)
         the dataset (images, labels, depth for saliency.source: depth; masks only for metrics)
Writes:  RUN/label_rounds/round_<r>/labels/<id>.png    segmentation pseudo-labels of round r
         RUN/label_rounds/round_<r>/saliency/<id>.png  saliency labels of round r (0..255)
         RUN/label_rounds/round_<r>/metrics.json       precision, recall, J, F of the labels
                                                       (when the dataset has masks); written
                                                       last, so it marks the round finished
         RUN/label_rounds/stage_<s>/                   checkpoint.pt, log.csv, model.pt
         RUN/label_rounds/auxsegnet_model.pt           the last stage's network (for predict
                                                       with predict.network: label_rounds)

Round 0: CAMs of the trained classification branch at `cam_scales` (each scale's CAM ReLU'd
and divided by its maximum, resized to the image, summed, min-max normalised), seeded with the
saliency source's maps by `weakseg.refine.saliency.saliency_cam_seeds` (0.2 and 0.06).
Stage s trains the whole network on round s's labels (eq. 19: multi-label soft margin on GAP of
the CAMs; BCE on sal, sal_pairwise, sal_dual; cross-entropy with 255 ignored on seg,
seg_pairwise, seg_dual; all weights 1) for at most `train.epochs` epochs, stopping early once
the epoch loss has not improved for `patience` epochs; then round s + 1 is made with stage s's
network: its CAMs refined by its cross-task pairwise affinity (eq. 18), its saliency labels
CRF((previous label + refined saliency prediction) / 2) (eq. 1). A killed run resumes inside
the stage it was training (the trainer's per-epoch checkpoint) and keeps finished rounds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data.base import SegDataset
from weakseg.data.io import read_label_map, write_label_png, write_text_atomic
from weakseg.errors import ConfigError, DataError
from weakseg.labels import IGNORE
from weakseg.losses.classification import ClassificationConfig, ClassificationTerm
from weakseg.losses.saliency import SaliencyTerm
from weakseg.losses.segmentation import SegmentationTerm
from weakseg.metrics.evaluator import SegEvaluator, metrics_json
from weakseg.models.inference import input_multiple
from weakseg.models.methods.auxsegnet import refine_pairwise
from weakseg.refine.saliency import SaliencyConfig, SaliencySource, saliency_cam_seeds, update_saliency
from weakseg.steps.base import Step
from weakseg.steps.model_files import CAM_MODEL, load_cam_model, save_cam_model
from weakseg.data.transforms import AugmentConfig
from weakseg.train.trainer import TrainConfig, patience_stop, pick_device, train

NAME = "label_rounds"
MODEL_FILE = "auxsegnet_model.pt"


@dataclass
class StageLossConfig:
    """Weights of eq. 19's three task losses (the paper: all 1). 0 leaves that task's terms out,
    e.g. classification: 0 for Table IV's "baseline + sal" row."""

    classification: float = 1.0
    saliency: float = 1.0
    segmentation: float = 1.0


@dataclass
class StageTrainConfig(TrainConfig):
    """A stage's schedule (§IV-A: SGD, poly LR from 0.001, power 0.9, batch 4; at most 15
    epochs per stage). A subclass rather than a default instance, so that a config giving only
    some keys (`train: {lr: 0.002}`) keeps these defaults for the others."""

    epochs: int = 15
    batch_size: int = 4
    lr: float = 0.001
    weight_decay: float = 1e-5
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_size=321, scale_range=[0.7, 1.3]))


@dataclass
class LabelRoundsConfig:
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    stages: int = 4  # training stages; 1 = no iteration (Table VI's first column)
    patience: int = 5  # early stopping on the stage's epoch loss
    cam_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])  # [1.0]: single-scale (AuxSegNet)
    # After the scales are summed: minmax (the paper's multi-scale CAM) or none (AuxSegNet's
    # code, single scale: the max-normalised, affinity-refined CAM as it is).
    cam_normalisation: Literal["minmax", "none"] = "minmax"
    cam_threshold: float = 0.2
    saliency_threshold: float = 0.06
    refine_cams: bool = True  # eq. 18: later rounds' CAMs refined by the cross-task pairwise affinity
    # previous: eq. 1 (mean of the previous round's label and the refined prediction);
    # initial: AuxSegNet's code (the source's map instead of the previous label); fixed: no update.
    saliency_update: Literal["previous", "initial", "fixed"] = "previous"
    saliency_crf: bool = True  # eq. 1's dense CRF (needs pydensecrf)
    # The saliency BCE's 0/1 labels: the round's saliency map above this. 0.5 is AuxSegNet's
    # (its PoolNet-style maps are near-binary); the built-in OpenCV maps are not calibrated
    # probabilities (spectral residual on VOC: 4 % of the pixels above 0.5, mean 0.11), so
    # their configs set it lower (docs/fidelity.md, "AuxSegNet+").
    saliency_label_threshold: float = 0.5
    loss: StageLossConfig = field(default_factory=StageLossConfig)
    train: StageTrainConfig = field(default_factory=StageTrainConfig)

    def __post_init__(self):
        if self.stages < 1:
            raise ConfigError(f"{NAME}.stages: must be >= 1, got {self.stages}")
        if self.patience < 1:
            raise ConfigError(f"{NAME}.patience: must be >= 1, got {self.patience}")
        if not self.cam_scales or any(s <= 0 for s in self.cam_scales):
            raise ConfigError(f"{NAME}.cam_scales: positive scales, at least one; got {self.cam_scales}")
        for key in ("cam_normalisation", "saliency_update"):
            allowed = {"cam_normalisation": ("minmax", "none"), "saliency_update": ("previous", "initial", "fixed")}[key]
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{NAME}.{key}: {getattr(self, key)!r} is not allowed; allowed values: "
                                  f"{', '.join(allowed)}")


# ----------------------------------------------------------------------------- maps of one image


@torch.inference_mode()
def auxsegnet_maps(model, rgb: torch.Tensor, class_indices: list[int], scales, refine: bool,
                   normalisation: str = "minmax") -> tuple[np.ndarray, np.ndarray | None]:
    """One image (3, H, W) in [0, 1] -> (cams (K, H, W) of `class_indices` in [0, 1], refined
    saliency probability (H, W) or None without a saliency branch).

    Per scale: the CAMs ReLU'd and divided by their spatial maximum (+1e-5), refined on the
    feature grid by the network's cross-task pairwise affinity when `refine` (eq. 18), resized
    to the image; summed over the scales, then min-max normalised per class (`normalisation`).
    The saliency prediction is sigmoid(sal_pairwise), averaged over the scales."""
    _, h, w = rgb.shape
    multiple = input_multiple(model)
    cam_total, sal_total = None, None
    sal_key = "sal_pairwise" if getattr(model, "affinity", "none") in ("pairwise", "dual") else "sal"
    for scale in scales:
        x = rgb[None] if scale == 1.0 else F.interpolate(
            rgb[None], size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False)
        sh, sw = x.shape[-2:]
        x = F.pad(x, (0, -sw % multiple, 0, -sh % multiple), mode="replicate") if multiple > 1 else x
        out = model(x)
        cams = F.relu(out["cams"][:, class_indices])
        cams = cams / (cams.amax(dim=(2, 3), keepdim=True) + 1e-5)
        if refine and "affinity" in out:
            cams = refine_pairwise(cams, out["affinity"])

        def to_image(maps):
            maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :sh, :sw]
            return F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[0]

        cams = to_image(cams)
        cam_total = cams if cam_total is None else cam_total + cams
        if sal_key in out:
            sal = to_image(torch.sigmoid(out[sal_key].float()))[0]
            sal_total = sal if sal_total is None else sal_total + sal
    if normalisation == "minmax" and cam_total.shape[0]:
        low = cam_total.amin(dim=(1, 2), keepdim=True)
        high = cam_total.amax(dim=(1, 2), keepdim=True)
        cam_total = (cam_total - low) / (high - low + 1e-5)
    saliency = None if sal_total is None else (sal_total / len(scales)).cpu().numpy()
    return cam_total.cpu().numpy().astype(np.float32), saliency


# ----------------------------------------------------------------------------- rounds and stages


def _write_saliency_png(path: Path, saliency: np.ndarray) -> None:
    write_label_png(path, np.clip(np.round(saliency * 255.0), 0, 255).astype(np.uint8))


def _read_saliency(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, "saliency label missing: the previous round did not finish")
    return read_label_map(path).astype(np.float32) / 255.0


class RoundTargets:
    """sample id -> (H, W, 2) uint8: the round's segmentation labels and its saliency labels
    binarised at `threshold` (0.5 in AuxSegNet's data loader); the trainer batches them as
    "mask" and "saliency_mask"."""

    def __init__(self, round_dir: Path, num_classes: int, threshold: float = 0.5):
        self.round_dir, self.num_classes, self.threshold = Path(round_dir), int(num_classes), float(threshold)

    def __call__(self, sample_id: str) -> np.ndarray:
        path = self.round_dir / "labels" / f"{sample_id}.png"
        if not path.is_file():
            raise DataError(path, "pseudo-label of this round missing")
        label = read_label_map(path)
        bad = np.unique(label[(label != IGNORE) & (label >= self.num_classes)])
        if bad.size:
            raise DataError(path, f"label ids {bad.tolist()} outside the {self.num_classes} classes")
        saliency = _read_saliency(self.round_dir / "saliency" / f"{sample_id}.png")
        return np.stack([label, (saliency > self.threshold).astype(np.uint8)], axis=-1)


def label_metrics(evaluator: SegEvaluator, correct: int, labelled: int, valid: int) -> dict:
    """The round's label quality: J, F, J&F, boundary IoU with 255 counted as a miss (as for
    any prediction), and pixel precision (correct / labelled pixels) and recall (correct /
    non-void ground-truth pixels), the two numbers of the paper's Fig. 8."""
    summary = evaluator.summary()
    out = {k: summary[k] for k in ("miou", "contour_f", "jf", "boundary_iou")}
    out.update({"precision": correct / max(1, labelled), "recall": correct / max(1, valid),
                "coverage": labelled / max(1, valid)})
    return out


def make_round(model, dataset: SegDataset, round_dir: Path, index: int, previous_dir: Path | None,
               source: SaliencySource, config: LabelRoundsConfig, device, on_image=None) -> dict:
    """Round `index`'s labels of every training image into `round_dir` (see module doc)."""
    model.eval()
    evaluator = SegEvaluator.for_dataset(dataset)
    correct = labelled = valid = 0
    has_masks = True
    for i in range(len(dataset)):
        sample = dataset[i]
        present = [int(j) for j in np.flatnonzero(sample.labels > 0.5)]
        class_ids = np.asarray([dataset.foreground_ids[j] for j in present], dtype=np.int64)
        rgb = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1).float().div(255.0)
        cams, predicted = auxsegnet_maps(model, rgb.to(device), present, config.cam_scales,
                                         refine=index > 0 and config.refine_cams, normalisation=config.cam_normalisation)
        if index == 0 or predicted is None or config.saliency_update == "fixed":
            saliency = source(sample) if previous_dir is None else _read_saliency(previous_dir / "saliency" / f"{sample.id}.png")
        else:
            base = source(sample) if config.saliency_update == "initial" else \
                _read_saliency(previous_dir / "saliency" / f"{sample.id}.png")
            saliency = update_saliency(base, predicted, sample.image if config.saliency_crf else None)
        label = saliency_cam_seeds(cams, class_ids, saliency, config.cam_threshold, config.saliency_threshold,
                                   dataset.background_index)
        write_label_png(round_dir / "labels" / f"{sample.id}.png", label)
        _write_saliency_png(round_dir / "saliency" / f"{sample.id}.png", saliency)
        mask = sample.mask if has_masks else None
        if mask is None:
            has_masks = False
        else:
            evaluator.add(label, mask)
            gt_valid = mask != IGNORE
            correct += int(np.count_nonzero(gt_valid & (label == mask)))
            labelled += int(np.count_nonzero(gt_valid & (label != IGNORE)))
            valid += int(np.count_nonzero(gt_valid))
        if on_image is not None:
            on_image(i + 1, len(dataset))
    result: dict = {"round": index, "num_images": len(dataset)}
    if has_masks:
        result.update(label_metrics(evaluator, correct, labelled, valid))
    write_text_atomic(round_dir / "metrics.json", metrics_json(result))
    return result


def stage_terms(model, weights: StageLossConfig) -> list:
    """Eq. 19 as loss terms, one per supervised output, each with its task's weight."""
    terms = []
    if weights.classification:
        terms.append(ClassificationTerm(ClassificationConfig(kind="gap", weight=weights.classification), ["cams"]))
    for task, weight, make in (("sal", weights.saliency, SaliencyTerm), ("seg", weights.segmentation, SegmentationTerm)):
        if not weight:
            continue
        for output in model.prediction_outputs(task):
            term = make(weight, reads=[output])
            term.name = output
            terms.append(term)
    if not terms:
        raise ConfigError(f"{NAME}.loss: every weight is 0; nothing to train")
    return terms


def check_model(model, state: dict, dataset: SegDataset, path: Path) -> None:
    if not hasattr(model, "prediction_outputs"):
        raise DataError(path, f"{NAME} trains an auxsegnet network; this cam_model.pt holds "
                              f"{state['model_config'].get('method')!r} (set train_cam.model.method: auxsegnet)")
    want_background = dataset.background_index is not None
    if dataset.background_index not in (0, None):
        raise DataError(path, f"{NAME}: the segmentation branch's channel k is label id k; the dataset's background "
                              f"id is {dataset.background_index}, not 0")
    if model.seg_background != want_background:
        raise DataError(path, f"{NAME}: the dataset {'has' if want_background else 'has no'} background class but "
                              f"the network was built with method_args.background: {model.seg_background}")


def label_rounds(config: LabelRoundsConfig, dataset: SegDataset, cam_model_file: Path, out_dir: Path,
                 progress=None, on_epoch=None) -> dict:
    out = Path(out_dir)
    device = pick_device(config.train.device)
    model, state = load_cam_model(cam_model_file, device)
    check_model(model, state, dataset, cam_model_file)
    from weakseg.config import from_mapping
    from weakseg.models.factory import ModelConfig

    model_config = from_mapping(ModelConfig, state["model_config"], "model")
    source = SaliencySource(config.saliency)
    rounds, stages = [], []

    def round_result(index: int, previous: Path | None) -> dict:
        round_dir = out / f"round_{index}"
        done = round_dir / "metrics.json"
        if done.is_file():
            return json.loads(done.read_text())
        if round_dir.exists():  # an interrupted round: made again from the start
            shutil.rmtree(round_dir)
        return make_round(model, dataset, round_dir, index, previous, source, config, device, on_image=progress)

    rounds.append(round_result(0, None))
    for stage in range(config.stages):
        stage_dir = out / f"stage_{stage}"
        model_file = stage_dir / "model.pt"
        if model_file.is_file():
            trained, _ = load_cam_model(model_file, device)
            model.load_state_dict(trained.state_dict())
        else:
            torch.manual_seed(config.train.seed + stage)
            history = train(model, dataset, stage_terms(model, config.loss), config.train, stage_dir,
                            masks=RoundTargets(out / f"round_{stage}", dataset.num_classes, config.saliency_label_threshold), on_step=progress,
                            on_epoch=on_epoch, stop_when=patience_stop(config.patience))
            write_text_atomic(stage_dir / "history.json", json.dumps(
                {"stage": stage, "epoch_losses": history["epoch_losses"], "stopped_epoch": history["stopped_epoch"]}))
            save_cam_model(model_file, model.cpu(), model_config, dataset)  # written last: marks the stage done
            model.to(device)
        stages.append(json.loads((stage_dir / "history.json").read_text()))
        rounds.append(round_result(stage + 1, out / f"round_{stage}"))
    shutil.copyfile(out / f"stage_{config.stages - 1}" / "model.pt", out / (MODEL_FILE + ".tmp"))
    (out / (MODEL_FILE + ".tmp")).replace(out / MODEL_FILE)
    return {"label_rounds": rounds, "stages": stages, "model": str(out / MODEL_FILE)}


def run(config: LabelRoundsConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    return label_rounds(config, dataset, Path(run_dir) / CAM_MODEL, Path(run_dir) / NAME, progress=progress,
                        on_epoch=getattr(progress, "note", None))


STEP = Step(NAME, LabelRoundsConfig, run, "AuxSegNet+: train the whole network in stages on saliency + CAM "
            "pseudo-labels, updating the labels between stages (eq. 1, 18); keeps every round's labels and "
            "their precision, recall, J and F.", reads=("train_cam",))
