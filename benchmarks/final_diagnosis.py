"""Where the final network loses J on held-back images: the classes it predicts, or where.

    python benchmarks/final_diagnosis.py --run runs/voc_cpu [--seg-model PATH] [--threads 1]

RUN is a pipeline run with an eval_dataset (e.g. configs/voc_cpu.yaml). Its segmentation
network predicts every held-back image (the predict step's scales and flip); the argmax is
scored three ways:

- free: over all classes, as the pipeline's `final` stage (no image-level labels at test time);
- CAM classifier's classes: channels of foreground classes the run's CAM network scores
  below sigmoid 0.5 on the image are dropped first (needs no label and no mask);
- the image's true classes: the same with the image-level labels (an oracle; it is the
  information the CAM stage is given).

The gap between free and the oracle is what wrong classes cost; the oracle's own gap to the
pseudo-label stage is what the localisation costs. Also prints how often the CAM network's
classes and the classes the free prediction paints (any pixel) agree with the true ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from weakseg.data import build_dataset
from weakseg.data.tensor import rgb_batch
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.models.inference import predict_probs
from weakseg.steps import pipeline, predict
from weakseg.steps.model_files import CAM_MODEL, SEG_MODEL, load_cam_model, load_seg_model


def class_counts(predicted: set[int], true: set[int], counts: dict) -> None:
    counts["tp"] += len(predicted & true)
    counts["fp"] += len(predicted - true)
    counts["fn"] += len(true - predicted)


def precision_recall(counts: dict) -> tuple[float, float]:
    return counts["tp"] / max(1, counts["tp"] + counts["fp"]), counts["tp"] / max(1, counts["tp"] + counts["fn"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--seg-model", type=Path, default=None, help="default: RUN/train_seg/seg_model.pt")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run.resolve()
    config, base_dir = pipeline.load_config(run_dir / "config.yaml")
    if config.eval_dataset is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: no eval_dataset to diagnose on")
    heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    background = heldback.background_index
    predict_config = config.predict or predict.PredictConfig()
    seg_model, _ = load_seg_model(args.seg_model or run_dir / SEG_MODEL, torch.device("cpu"))
    cam_model, _ = load_cam_model(run_dir / CAM_MODEL, torch.device("cpu"))
    foreground = np.asarray(heldback.foreground_ids)
    variants = ("free", "CAM classifier's classes", "the image's true classes (oracle)")
    evaluators = {name: SegEvaluator(heldback.class_names, background) for name in variants}
    cam_classes = {"tp": 0, "fp": 0, "fn": 0}
    painted = {"tp": 0, "fp": 0, "fn": 0}
    for i in range(len(heldback)):
        sample = heldback[i]
        rgb = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1)
        with torch.no_grad():
            probs = np.asarray(predict_probs(seg_model, rgb, predict_config.scales, predict_config.flip))
            scores = torch.sigmoid(cam_model(rgb_batch([sample.image]))["logits"][0]).numpy()
        true = set(foreground[sample.labels > 0.5].tolist())
        guessed = set(foreground[scores > 0.5].tolist())
        class_counts(guessed, true, cam_classes)
        for name, keep in (("free", None), (variants[1], guessed), (variants[2], true)):
            masked = probs.copy()
            if keep is not None:
                drop = [c for c in foreground.tolist() if c not in keep]
                masked[drop] = -1.0
            label = masked.argmax(axis=0).astype(np.uint8)
            evaluators[name].add(label, sample.mask)
            if keep is None:
                class_counts(set(np.unique(label).tolist()) - {background}, true, painted)
    print(f"{run_dir.name}: {len(heldback)} held-back images, segmentation network "
          f"{args.seg_model or run_dir / SEG_MODEL}\n")
    print("| prediction | J (%) | F (%) | J&F (%) |\n|---|---|---|---|")
    record = {}
    for name, evaluator in evaluators.items():
        h = evaluator.headline()
        record[name] = {k: h[k] for k in ("miou", "contour_f", "jf", "boundary_iou")}
        print(f"| {name} | {100 * h['miou']:.1f} | {100 * h['contour_f']:.1f} | {100 * h['jf']:.1f} |")
    print("\n| classes of an image | precision (%) | recall (%) |\n|---|---|---|")
    for name, counts in (("CAM classifier (sigmoid > 0.5)", cam_classes), ("painted by the free prediction", painted)):
        p, r = precision_recall(counts)
        record[name] = {"precision": p, "recall": r}
        print(f"| {name} | {100 * p:.1f} | {100 * r:.1f} |")
    out = run_dir / "heldback" / "final_diagnosis.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
