"""Held-back CAMs of a pipeline run at several inference scale sets, with the image's true
classes and with the classes the CAM network itself predicts (no label at all).

    python benchmarks/cam_heldback_scales.py --run runs/voc_cpu [--threads 1]
        [--scale-sets 1.0 0.5,1.0,1.5,2.0] [--classifier-threshold 0.5]

RUN is a pipeline run with an eval_dataset and a background class (e.g. configs/voc_cpu.yaml).
For every scale set (each with flip, as the run's infer_cam), its CAM network's CAMs are made
the way `weakseg infer-cam` makes them (weakseg.models.inference.infer_cams_and_probs):

- on the run's training images, to sweep the background threshold a user can choose without
  held-back masks;
- on the held-back images, scored at that training threshold and at the threshold swept on
  the held-back masks (what infer_cam reports on any dataset with masks).

Two class sets per held-back image: its true image-level classes (what the CAM stage is
given; the pipeline's `cam` row), and the foreground classes whose sigmoid score of the CAM
network (one pass, the full image) exceeds `--classifier-threshold`: what a user gets from
the CAM network on a new image with no label, the information the final network has.
Issue 18 asks for scales 0.5, 1, 1.5, 2 measured against scale 1 alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from weakseg.data import build_dataset
from weakseg.data.tensor import rgb_batch
from weakseg.metrics.cam_sweep import ThresholdSweep, cam_to_label
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.models.fold import inference_copy
from weakseg.models.inference import infer_cams_and_probs
from weakseg.steps import pipeline
from weakseg.steps.model_files import CAM_MODEL, load_cam_model


def cams_of(model, dataset, infer_config, scales, classes_of) -> list[tuple[np.ndarray, list[int], np.ndarray]]:
    """(CAMs of the chosen classes, their class ids, mask) of every image, as infer_cam stores
    them (float16-rounded)."""
    out = []
    for i in range(len(dataset)):
        sample = dataset[i]
        indices = classes_of(sample)
        with torch.no_grad():
            cams, _ = infer_cams_and_probs(
                model, rgb_batch([sample.image]), indices, scales, infer_config.flip, model.background_channel,
                activation=infer_config.activation, with_probs=False,
                output=infer_config.output or getattr(model, "inference_output", "cams"), order=infer_config.order)
        class_ids = [dataset.foreground_ids[k] for k in indices]
        out.append((np.asarray(cams).astype(np.float16).astype(np.float32), class_ids, sample.mask))
    return out


def swept(dataset, cams) -> tuple[float, float]:
    sweep = ThresholdSweep(dataset.num_classes, dataset.background_index)
    for c, ids, mask in cams:
        sweep.add(c, ids, mask)
    return sweep.best()


def scored(dataset, cams, threshold: float) -> dict:
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    for c, ids, mask in cams:
        evaluator.add(cam_to_label(c, ids, threshold, dataset.background_index), mask)
    return evaluator.headline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scale-sets", nargs="+", default=["1.0", "0.5,1.0,1.5,2.0"],
                        help="comma-separated scales, one set per argument")
    parser.add_argument("--classifier-threshold", type=float, default=0.5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run.resolve()
    config, base_dir = pipeline.load_config(run_dir / "config.yaml")
    if config.eval_dataset is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: no eval_dataset (held-back images) to score")
    training = build_dataset(config.dataset, base_dir, prefix="dataset")
    heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    if heldback.background_index is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: the eval_dataset has no background class to threshold")
    model, _ = load_cam_model(run_dir / CAM_MODEL, torch.device("cpu"))
    model = inference_copy(model, config.infer_cam.fold_batchnorm, config.infer_cam.channels_last)

    def true_classes(sample):
        return np.flatnonzero(sample.labels > 0.5).tolist()

    def predicted_classes(sample):
        with torch.no_grad():
            scores = torch.sigmoid(model(rgb_batch([sample.image]))["logits"][0]).numpy()
        return np.flatnonzero(scores > args.classifier_threshold).tolist()

    print(f"{run_dir.name}: CAM network {run_dir / CAM_MODEL}, {len(training)} training and "
          f"{len(heldback)} held-back images, flip {config.infer_cam.flip}\n")
    print("| scales | classes | training threshold | J at it (%) | F at it (%) | held-back best threshold "
          "| J at it (%) | F at it (%) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    record = {}
    for text in args.scale_sets:
        scales = [float(s) for s in text.split(",")]
        started = time.perf_counter()
        train_threshold, train_j = swept(training, cams_of(model, training, config.infer_cam, scales, true_classes))
        for name, classes_of in (("true", true_classes), (f"CAM classifier > {args.classifier_threshold:g}",
                                                          predicted_classes)):
            cams = cams_of(model, heldback, config.infer_cam, scales, classes_of)
            at_train = scored(heldback, cams, train_threshold)
            best_threshold, _ = swept(heldback, cams)
            at_best = scored(heldback, cams, best_threshold)
            seconds = time.perf_counter() - started
            record[f"{text} {name}"] = {"scales": scales, "classes": name, "train_threshold": train_threshold,
                                         "train_miou": train_j, "at_train_threshold": at_train,
                                         "heldback_best_threshold": best_threshold, "at_best": at_best}
            print(f"| {text} | {name} | {train_threshold:.2f} | {100 * at_train['miou']:.1f} | "
                  f"{100 * at_train['contour_f']:.1f} | {best_threshold:.2f} | {100 * at_best['miou']:.1f} | "
                  f"{100 * at_best['contour_f']:.1f} | {seconds:.0f} |", flush=True)
    out = run_dir / "heldback" / "cam_heldback_scales.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
