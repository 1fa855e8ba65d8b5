"""Step `infer_cam` (`weakseg infer-cam CONFIG`): the trained CAM network + the images ->
CAMs, CAM label maps and CAM metrics.

Config:  `infer_cam: InferCamConfig` (scales, flip, threshold, activation, output,
         with_probs, fold_batchnorm, channels_last).
Reads:   RUN/train_cam/cam_model.pt, the dataset (masks, when it has them, for the metrics
         and the background-threshold sweep only).
Writes:  RUN/infer_cam/cams/<id>.npz   compressed float16 CAMs of the present classes
                                       (`cams` (P, H, W) in [0, 1], `class_ids` (P,) mask ids;
                                       with `with_probs`, `probs` (1 + P, H, W): the model's own
                                       background + class probabilities, see infer_class_probs)
         RUN/infer_cam/cam_labels/<id>.png  palette PNGs at the background threshold
         RUN/infer_cam/cam_metrics.json     when the dataset has masks: miou, contour_f, jf,
                                       boundary_iou, best_threshold, per-class values, sweep
The background threshold is the sweep's best when masks exist, else `threshold` (0.25 when
unset).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from weakseg.data import SegDataset
from weakseg.data.io import atomic_path, write_label_png, write_text_atomic
from weakseg.data.tensor import rgb_batch
from weakseg.errors import DataError
from weakseg.metrics.cam_sweep import ThresholdSweep, cam_to_label
from weakseg.metrics.evaluator import SegEvaluator, metrics_json
from weakseg.models.fold import inference_copy
from weakseg.models.inference import infer_cams_and_probs
from weakseg.steps.base import Step
from weakseg.steps.model_files import CAM_MODEL, load_cam_model
from weakseg.train import distributed
from weakseg.train.trainer import pick_device

NAME = "infer_cam"


def save_cams(path: Path, cams: np.ndarray, class_ids: Sequence[int], probs: np.ndarray | None = None) -> None:
    buffer = io.BytesIO()
    arrays = {"cams": cams.astype(np.float16), "class_ids": np.asarray(class_ids, dtype=np.int64)}
    if probs is not None:
        arrays["probs"] = probs.astype(np.float16)
    np.savez_compressed(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


@dataclass
class InferCamConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    threshold: float | None = None  # background threshold when there are no masks to sweep
    # relu: the CAM convention; sigmoid: the binomial posterior (hfpl eq. 14) on the class scores.
    activation: Literal["relu", "sigmoid"] = "relu"
    # Order of ReLU, upsampling and normalisation (weakseg.models.inference): auto = the
    # method's official code (cam, vit_cam: IRN's; seam: SEAM's), or irn, seam, upsample_relu.
    order: Literal["auto", "irn", "seam", "upsample_relu"] = "auto"
    # The model output read as CAMs; null: the method's inference_output (SEAM: cams_pcm;
    # `cams` reads SEAM's raw CAM).
    output: str | None = None
    # Also save the model's own [background, classes] probabilities (`probs` in the npz),
    # which refine.background: model starts from.
    with_probs: bool = False
    device: str = "auto"
    # Inference speed-ups with the same maths (weakseg.models.fold): BN folded into the
    # convolutions, NHWC memory. CAMs agree with them off to float rounding.
    fold_batchnorm: bool = True
    channels_last: bool = True


def infer_cams(checkpoint: str | Path, dataset: SegDataset, out_dir: str | Path, config: InferCamConfig,
               on_image=None) -> dict:
    """CAMs, CAM labels and metrics of every image of `dataset` into `out_dir`."""
    out = Path(out_dir)
    scales, flip, threshold = config.scales, config.flip, config.threshold
    activation, with_probs, output = config.activation, config.with_probs, config.output
    distributed.setup()  # a no-op unless started by torchrun
    dev = pick_device(config.device)
    model, state = load_cam_model(checkpoint, dev)
    # The same maths, faster (weakseg.models.fold); CAMs then agree to float rounding.
    model = inference_copy(model, config.fold_batchnorm, config.channels_last)
    if list(dataset.class_names) != list(state["class_names"]):
        raise DataError(checkpoint, f"trained on classes {state['class_names']}, the dataset has {list(dataset.class_names)}")
    # Sharded across torchrun ranks (all images in one process). CAMs are rounded to float16
    # here, as stored, so the sweep scores exactly the saved CAMs. With `with_probs`, also the
    # model's own [background, classes] probabilities (for refinement), from the same passes.
    mine = distributed.shard(len(dataset))
    sweep = ThresholdSweep(dataset.num_classes, dataset.background_index) if dataset.background_index is not None else None
    kept = []  # (id, class ids, mask) of this rank's images; masks are uint8 and small
    missing_masks = 0
    for done, i in enumerate(mine, 1):
        sample = dataset[i]
        image = rgb_batch([sample.image]).to(dev)
        indices = np.flatnonzero(sample.labels > 0.5).tolist()
        cams, probs = infer_cams_and_probs(
            model, image, indices, scales, flip, model.background_channel, activation=activation,
            with_probs=with_probs, output=output or getattr(model, "inference_output", "cams"),
            probs_output=getattr(model, "score_output", "cams"), order=config.order,
        )
        cams = cams.astype(np.float16).astype(np.float32)
        class_ids = sample.present_class_ids
        save_cams(out / "cams" / f"{sample.id}.npz", cams, class_ids, probs)
        kept.append((sample.id, class_ids, sample.mask))
        if sample.mask is None:
            missing_masks += 1
        elif sweep is not None:
            sweep.add(cams, class_ids, sample.mask)
        if on_image is not None:
            on_image(done, len(mine))

    # The sweep's confusion counts summed over the ranks: the threshold is chosen on every
    # image, the same on each rank.
    has_masks = distributed.summed(missing_masks) == 0
    if sweep is not None:
        distributed.sum_counts(sweep, ["cms"])
    result: dict = {"num_images": len(dataset)}
    if has_masks and sweep is not None:
        threshold, _ = sweep.best()
    elif threshold is None and dataset.background_index is not None:
        threshold = 0.25
    evaluator = SegEvaluator.for_dataset(dataset) if has_masks else None
    for sample_id, class_ids, mask in kept:
        with np.load(out / "cams" / f"{sample_id}.npz") as data:
            cams = data["cams"].astype(np.float32)
        label = cam_to_label(cams, class_ids, threshold if threshold is not None else 0.0, dataset.background_index)
        write_label_png(out / "cam_labels" / f"{sample_id}.png", label)
        if evaluator is not None:
            evaluator.add(label, mask)
    if evaluator is not None:
        distributed.sum_counts(evaluator, SegEvaluator.COUNTS)
    result["threshold"] = threshold
    if evaluator is not None:
        summary = evaluator.summary()
        summary["best_threshold"] = threshold
        if sweep is not None:
            summary["threshold_sweep"] = {f"{t:.2f}": float(j) for t, j in zip(sweep.thresholds, sweep.mious())}
        if distributed.is_main():
            write_text_atomic(out / "cam_metrics.json", metrics_json(summary))
        result.update({k: summary[k] for k in ("miou", "contour_f", "jf", "boundary_iou", "best_threshold")})
    distributed.barrier()
    return result


def run(config: InferCamConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    checkpoint = Path(run_dir) / CAM_MODEL
    return infer_cams(checkpoint, dataset, Path(run_dir) / NAME, config, on_image=progress)


STEP = Step(NAME, InferCamConfig, run, "Multi-scale + flip CAMs of every image, CAM label maps at the best background "
            "threshold, and CAM metrics (J, F, J&F, best threshold) when the dataset has masks.",
            reads=("train_cam",), stage="cam")
