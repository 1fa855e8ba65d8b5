"""Step `predict`: a trained segmentation network + a dataset -> label maps and metrics.

Reads:   CKPT (seg_model.pt from train-seg), the dataset
Writes:  OUT/pred/<id>.png     palette PNGs, the argmax of the multi-scale + flip softmax
                                (after a dense CRF when `crf` names a preset)
         OUT/metrics.json      when the dataset has masks: miou, contour_f, jf, boundary_iou
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weakseg.config import from_mapping, to_dict
from weakseg.data.base import SegDataset
from weakseg.data.io import write_label_png, write_text_atomic
from weakseg.errors import DataError
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.models.factory import SegModelConfig, build_seg_model
from weakseg.models.fold import inference_copy
from weakseg.models.inference import predict_probs
from weakseg.train.trainer import load_model_file, pick_device
from weakseg.record import dataset_summary, recorded_step

@dataclass
class SegInferConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    crf: str | None = None  # a dense-CRF preset (weakseg.refine.crf) applied to the predictions
    # Inference speed-ups with the same maths (weakseg.models.fold): BN folded into the
    # convolutions, NHWC memory. Predictions agree with them off to float rounding.
    fold_batchnorm: bool = True
    channels_last: bool = True


# Channels whose probability never reaches this in an image are left out of the CRF.
CRF_MIN_PROB = 1e-3


def load_seg_model(path: str | Path, device: torch.device):
    state = load_model_file(path, "seg_model_config", "seg_model.pt written by `weakseg train-seg`")
    config = from_mapping(SegModelConfig, state["seg_model_config"], "model")
    model = build_seg_model(config, len(state["class_names"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


@recorded_step("predict", lambda a: {
    "checkpoint": str(Path(a["checkpoint"]).resolve()), "infer": to_dict(a["config"]), "dataset": dataset_summary(a["dataset"])})
def run(
    checkpoint: str | Path,
    dataset: SegDataset,
    out_dir: str | Path,
    config: SegInferConfig,
    device: str = "auto",
    on_image=None,
) -> dict:
    out = Path(out_dir)
    dev = pick_device(device)
    model, state = load_seg_model(checkpoint, dev)
    model = inference_copy(model, config.fold_batchnorm, config.channels_last)
    if list(dataset.class_names) != list(state["class_names"]):
        raise DataError(checkpoint, "the dataset's classes differ from the classes the model was trained on")
    crf = None
    if config.crf:
        from weakseg.refine.crf import DenseCRF

        crf = DenseCRF(config.crf)
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    has_masks = True
    for i in range(len(dataset)):
        sample = dataset[i]
        # np.require copies read-only images (cached samples), which torch may not wrap.
        rgb = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1).float().div(255.0).to(dev)
        probs = predict_probs(model, rgb, config.scales, config.flip)
        probs = probs.cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
        if crf is not None:
            keep = np.flatnonzero(probs.reshape(probs.shape[0], -1).max(axis=1) >= CRF_MIN_PROB)
            sub = probs[keep] / np.maximum(probs[keep].sum(axis=0, keepdims=True), 1e-8)
            label = keep[crf(sub.astype(np.float32), sample.image).argmax(axis=0)].astype(np.uint8)
        else:
            label = probs.argmax(axis=0).astype(np.uint8)
        write_label_png(out / "pred" / f"{sample.id}.png", label)
        if sample.mask is None:
            has_masks = False
        elif has_masks:
            evaluator.add(label, sample.mask)
        if on_image is not None:
            on_image(i + 1, len(dataset))
    result: dict = {"num_images": len(dataset)}
    if has_masks:
        result.update(evaluator.headline())
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
