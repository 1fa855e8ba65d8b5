"""Step `infer-cam`: a trained CAM model + a dataset -> CAMs, pseudo-labels and CAM metrics.

Reads:   CKPT (cam_model.pt from `train-cam`), a dataset config.
Writes:  OUT/cams/<id>.npz          compressed float16 CAMs of the present classes
                                     (`cams` (P, H, W) in [0, 1], `class_ids` (P,) mask ids;
                                     with `with_probs`, `probs` (1 + P, H, W): the model's own
                                     background + class probabilities, see infer_class_probs)
         OUT/pseudo_labels/<id>.png palette PNGs at the background threshold
         OUT/cam_metrics.json       when the dataset has masks: miou, contour_f, jf,
                                     boundary_iou, best_threshold, per-class values, sweep
The background threshold is the sweep's best when masks exist, else `threshold`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from weakseg.config import from_mapping
from weakseg.data import SegDataset, dataset_from_file
from weakseg.data.io import atomic_path, write_label_png, write_text_atomic
from weakseg.data.tensor import images_to_tensor
from weakseg.errors import DataError
from weakseg.metrics.cam_sweep import ThresholdSweep, cam_to_label
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.models.factory import ModelConfig, build_model
from weakseg.models.fold import inference_copy
from weakseg.models.inference import infer_cams_and_probs
from weakseg.record import dataset_summary, recorded_step
from weakseg.train import distributed
from weakseg.train.trainer import load_model_file, pick_device


def load_cam_model(path: str | Path, device: torch.device):
    state = load_model_file(path, "model_config", "cam_model.pt written by `weakseg train-cam`")
    config = from_mapping(ModelConfig, state["model_config"], "model")
    model = build_model(config, len(state["class_names"]) - (0 if state["background_index"] is None else 1))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def save_cams(path: Path, cams: np.ndarray, class_ids: Sequence[int], probs: np.ndarray | None = None) -> None:
    buffer = io.BytesIO()
    arrays = {"cams": cams.astype(np.float16), "class_ids": np.asarray(class_ids, dtype=np.int64)}
    if probs is not None:
        arrays["probs"] = probs.astype(np.float16)
    np.savez_compressed(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


@recorded_step("infer-cam", lambda a: {
    "checkpoint": str(Path(a["checkpoint"]).resolve()), "scales": list(a["scales"]), "flip": a["flip"],
    "threshold": a["threshold"], "activation": a["activation"], "with_probs": a["with_probs"], "output": a["output"],
    "fold_batchnorm": a["fold_batchnorm"], "channels_last": a["channels_last"],
    "data": dataset_summary(a["data_config"]) if isinstance(a["data_config"], SegDataset)
    else str(Path(a["data_config"]).resolve())})
def run(
    checkpoint: str | Path,
    data_config: str | Path | SegDataset,
    out_dir: str | Path,
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    flip: bool = True,
    threshold: float | None = None,
    device: str = "auto",
    on_image=None,
    activation: str = "relu",
    with_probs: bool = False,
    output: str | None = None,
    fold_batchnorm: bool = True,
    channels_last: bool = True,
) -> dict:
    out = Path(out_dir)
    distributed.setup()  # a no-op unless started by torchrun
    dev = pick_device(device)
    model, state = load_cam_model(checkpoint, dev)
    # The same maths, faster (weakseg.models.fold); CAMs then agree to float rounding.
    model = inference_copy(model, fold_batchnorm, channels_last)
    # A dataset config file (the CLI) or an already built dataset (`weakseg run`).
    dataset = data_config if isinstance(data_config, SegDataset) else dataset_from_file(data_config)
    if list(dataset.class_names) != list(state["class_names"]):
        raise DataError(data_config, "dataset classes differ from the classes the checkpoint was trained on")
    # Sharded across torchrun ranks (all images in one process). CAMs are rounded to float16
    # here, as stored, so the sweep scores exactly the saved CAMs. With `with_probs`, also the
    # model's own [background, classes] probabilities (for refinement), from the same passes.
    mine = distributed.shard(len(dataset))
    sweep = ThresholdSweep(dataset.num_classes, dataset.background_index) if dataset.background_index is not None else None
    kept = []  # (id, class ids, mask) of this rank's images; masks are uint8 and small
    missing_masks = 0
    for done, i in enumerate(mine, 1):
        sample = dataset[i]
        image = images_to_tensor([sample.image], model.input_normalization).to(dev)
        indices = np.flatnonzero(sample.labels > 0.5).tolist()
        cams, probs = infer_cams_and_probs(
            model, image, indices, scales, flip, model.background_channel, activation=activation,
            with_probs=with_probs, output=output or getattr(model, "inference_output", "cams"),
            probs_output=getattr(model, "score_output", "cams"),
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
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index) if has_masks else None
    for sample_id, class_ids, mask in kept:
        with np.load(out / "cams" / f"{sample_id}.npz") as data:
            cams = data["cams"].astype(np.float32)
        label = cam_to_label(cams, class_ids, threshold if threshold is not None else 0.0, dataset.background_index)
        write_label_png(out / "pseudo_labels" / f"{sample_id}.png", label)
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
            write_text_atomic(out / "cam_metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        result.update({k: summary[k] for k in ("miou", "contour_f", "jf", "boundary_iou", "best_threshold")})
    distributed.barrier()
    return result
