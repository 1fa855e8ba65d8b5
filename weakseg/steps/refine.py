"""Step `refine`: CAMs + images -> refined per-pixel probabilities, and how good their argmax is.

Reads:   CAM_DIR/cams/<id>.npz   (from infer-cam: max-normalised CAMs of the present classes)
         the dataset (images; masks, when it has them, for the metrics only)
Writes:  OUT/probs/<id>.npz      `probs` (K, H, W) float16, `class_ids` (K,) the label id of
                                  each channel (background first when the dataset has one)
         OUT/refined_metrics.json  argmax of the refined probabilities against the masks
         OUT/affinity/            the trained affinity network (method affinity_rw only)

CAMs become probabilities by `weakseg.refine.base.channel_probs`, with the background score
`refine.background` picks (power, constant, or the CAM network's own probabilities); a
dataset without a background class (NYUv2) uses its present classes normalised per pixel.
`method: none` keeps those probabilities, so its metrics are their plain argmax.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from weakseg.config import to_dict
from weakseg.data.base import SegDataset
from weakseg.data.io import atomic_path, read_arrays, write_text_atomic
from weakseg.errors import ConfigError, DataError
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.record import dataset_summary, recorded_step
from weakseg.registry import available, lookup
from weakseg.refine.base import channel_probs
from weakseg.train.affinity import AffinityTrainConfig, train_affinity
from weakseg.train.trainer import pick_device


@dataclass
class AffinityStageConfig:
    """AffinityNet (Ahn & Kwak 2018) trained on the CAMs, then its random walk (psa eq. 8-10)."""

    # Background powers (alpha_low, alpha_high) of the affinity labels: seam (4, 24),
    # hfpl (1, 24), icam (2, 4) (weakseg.refine.affinity); null: train.alpha_low/high.
    preset: str | None = "seam"
    backbone: str = "tiny_cnn"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    dim: int = 448
    crf_labels: bool = False  # refine the two confident-region maps with the psa CRF, as psa does
    train: AffinityTrainConfig = field(default_factory=AffinityTrainConfig)
    beta: float = 8.0
    log_t: int = 6


@dataclass
class RefineConfig:
    method: str = "crf"  # a registered refiner (weakseg.refine.builders) or affinity_rw
    # Where the background score comes from:
    #   power:    (1 - max cam)^background_alpha (psa, SEAM)
    #   constant: background_constant everywhere (IRN, SEAM's evaluation: a CAM threshold)
    #   model:    the CAM network's own probabilities (infer_class_probs: its background
    #             channel, or prod (1 - sigmoid) of the binomial view); no threshold at all.
    # None of them is taken from infer-cam's best threshold: that one is chosen on the masks.
    background: Literal["power", "constant", "model"] = "power"
    background_alpha: float = 1.0
    background_constant: float = 0.25
    crf_preset: Literal["psa", "label"] = "psa"
    pamr_iterations: int = 10
    spr_alpha: float = 0.8  # shape-cues eq. 5-6; 1.0 is PAMR
    affinity: AffinityStageConfig = field(default_factory=AffinityStageConfig)

    def __post_init__(self):
        # Checked when the config loads, not when the step runs after hours of training.
        allowed = available("refiner") + ["affinity_rw"]
        if self.method not in allowed:
            raise ConfigError(f"refine.method: {self.method!r} is not allowed; allowed values: {', '.join(allowed)}")


def load_cams(path: Path) -> tuple[np.ndarray, np.ndarray]:
    cams, class_ids = read_arrays(path, ("cams", "class_ids"), "CAM file", "run infer-cam first")
    return cams.astype(np.float32), class_ids.astype(np.int64)


def load_model_probs(path: Path) -> np.ndarray:
    (probs,) = read_arrays(path, ("probs",), "CAM file with the model's probabilities",
                           "refine.background: model needs infer-cam run with probabilities")
    return probs.astype(np.float32)


def build_refiner(config: RefineConfig, dataset: SegDataset, cam_dir: Path, out: Path, on_step=None):
    """The configured refiner (an object following weakseg.refine.base.Refiner) or None:
    a refiner registered by name (weakseg.refine.builders), or the affinity random walk."""
    if config.method == "affinity_rw":
        return _affinity_refiner(config, dataset, cam_dir, out / "affinity", on_step)
    # RefineConfig checked the name when it was built.
    return lookup("refiner", config.method, "refine.method")(config)


def _affinity_refiner(config: RefineConfig, dataset: SegDataset, cam_dir: Path, out: Path, on_step):
    from weakseg.refine.affinity import AFFINITY_ALPHA_PRESETS, AffinityNet, RandomWalk

    if dataset.background_index is None:
        raise ConfigError("refine.method: affinity_rw needs a dataset with a background class (its labels are "
                          "confident foreground / confident background regions); use crf, pamr or spr")
    stage = config.affinity
    train_config = stage.train
    if stage.preset is not None:
        if stage.preset not in AFFINITY_ALPHA_PRESETS:
            raise ConfigError(f"refine.affinity.preset: {stage.preset!r}; allowed values: "
                              f"{', '.join(AFFINITY_ALPHA_PRESETS)} or null")
        low, high = AFFINITY_ALPHA_PRESETS[stage.preset]
        train_config = dataclasses.replace(train_config, alpha_low=low, alpha_high=high)
    crf = None
    if stage.crf_labels:
        from weakseg.refine.crf import DenseCRF

        crf = DenseCRF("psa")
    torch.manual_seed(train_config.seed)
    model = AffinityNet(stage.backbone, stage.dim, **stage.backbone_args)
    model = train_affinity(model, dataset, cam_dir, train_config, out, crf=crf, on_step=on_step)
    return RandomWalk(model, stage.beta, stage.log_t, train_config.radius, device=pick_device(train_config.device))


def save_probs(path: Path, probs: np.ndarray, class_ids: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probs=probs.astype(np.float16), class_ids=class_ids.astype(np.int64))
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


@recorded_step("refine", lambda a: {
    "cam_dir": str(Path(a["cam_dir"]).resolve()), "refine": to_dict(a["config"]), "dataset": dataset_summary(a["dataset"])})
def run(
    dataset: SegDataset, cam_dir: str | Path, out_dir: str | Path, config: RefineConfig, on_image=None, on_step=None
) -> dict:
    cam_dir, out = Path(cam_dir), Path(out_dir)
    refiner = build_refiner(config, dataset, cam_dir, out, on_step)
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    has_masks = True
    for i in range(len(dataset)):
        sample = dataset[i]
        cams, class_ids = load_cams(cam_dir / "cams" / f"{sample.id}.npz")
        if cams.shape[1:] != sample.image.shape[:2]:
            raise DataError(cam_dir / "cams" / f"{sample.id}.npz", f"CAMs {cams.shape[1:]} do not match the image {sample.image.shape[:2]}")
        cam_path = cam_dir / "cams" / f"{sample.id}.npz"
        model_probs = load_model_probs(cam_path) if config.background == "model" else None
        probs, channel_ids = channel_probs(
            cams, class_ids, dataset.background_index, config.background, config.background_alpha,
            config.background_constant, model_probs,
        )
        if refiner is not None and probs.shape[0] > 1:  # one channel: nothing to decide
            probs = refiner(probs, sample.image)
        # Rounded to float16 here, as stored, so the metrics are those of the saved file.
        probs = probs.astype(np.float16).astype(np.float32)
        save_probs(out / "probs" / f"{sample.id}.npz", probs, channel_ids)
        if sample.mask is None:
            has_masks = False
        elif has_masks:
            evaluator.add(channel_ids[probs.argmax(axis=0)].astype(np.uint8), sample.mask)
        if on_image is not None:
            on_image(i + 1, len(dataset))
    result: dict = {"num_images": len(dataset), "method": config.method}
    if has_masks:
        result.update(evaluator.headline())
        write_text_atomic(out / "refined_metrics.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
