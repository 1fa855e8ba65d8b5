"""Where the final network loses J on held-back images: the classes it predicts, or where.

    python benchmarks/final_diagnosis.py --run runs/voc_cpu [--seg-model PATH] [--threads 1]
        [--thresholds 0.5 ...] [--min-areas 0.01 ...] [--crf PRESET] [--output-stride 8]
        [--images heldback|training]

RUN is a pipeline run with an eval_dataset (e.g. configs/voc_cpu.yaml). Its segmentation
network predicts every held-back image (the predict step's scales and flip; `--images
training` scores the run's training images instead); the argmax is scored several ways:

- free: over all classes, as the pipeline's `final` stage (no image-level labels at test time);
- CAM classifier > t: channels of foreground classes the run's CAM network scores below
  sigmoid t on the image are dropped first (needs no label and no mask), one row per
  `--thresholds` value;
- classes under a of the image dropped: foreground classes whose free argmax covers less than
  the fraction a of the image are dropped (`predict.min_class_area`, the background and the
  largest other class always kept; needs no label), one row per `--min-areas` value;
- the image's true classes: the same with the image-level labels (an oracle; it is the
  information the CAM stage is given).

`--crf PRESET` adds each row again after a dense CRF (weakseg.refine.crf presets) over the
channels the row keeps, with the predict step's own code (weakseg.steps.predict.label_map).
`--output-stride 8` rebuilds the network at
that stride with the same weights (the ASPP rates follow the stride), for inference only.

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
from weakseg.config import from_mapping
from weakseg.models.factory import SegModelConfig, build_seg_model
from weakseg.models.inference import classes_by_area, predict_probs
from weakseg.refine.crf import DenseCRF
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
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5],
                        help="CAM-classifier sigmoid thresholds for the class filter (default 0.5)")
    parser.add_argument("--min-areas", type=float, nargs="+", default=[],
                        help="rows dropping classes under these fractions of the image (predict.min_class_area)")
    parser.add_argument("--crf", default=None, help="also score every row after this dense-CRF preset")
    parser.add_argument("--output-stride", type=int, default=None, help="rebuild the network at this stride")
    parser.add_argument("--images", choices=("heldback", "training"), default="heldback")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run.resolve()
    config, base_dir = pipeline.load_config(run_dir / "config.yaml")
    if config.eval_dataset is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: no eval_dataset to diagnose on")
    if args.images == "heldback":
        heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    else:
        heldback = build_dataset(config.dataset, base_dir, prefix="dataset")
    background = heldback.background_index
    predict_config = config.predict or predict.PredictConfig()
    seg_model, seg_state = load_seg_model(args.seg_model or run_dir / SEG_MODEL, torch.device("cpu"))
    if args.output_stride:
        model_config = from_mapping(SegModelConfig, seg_state["seg_model_config"], "model")
        model_config.backbone_args = {**model_config.backbone_args, "pretrained": False,
                                      "output_stride": args.output_stride}
        strided = build_seg_model(model_config, len(seg_state["class_names"]))
        strided.load_state_dict(seg_state["model"])  # dilation changes no parameter
        seg_model = strided.eval()
    crf = DenseCRF(args.crf) if args.crf else None
    cam_model, _ = load_cam_model(run_dir / CAM_MODEL, torch.device("cpu"))
    foreground = np.asarray(heldback.foreground_ids)
    filters = (["free"] + [f"CAM classifier > {t:g}" for t in args.thresholds]
               + [f"classes under {100 * a:g} % of the image dropped" for a in args.min_areas]
               + ["the image's true classes (oracle)"])
    variants = filters + ([f"{name} + CRF {args.crf}" for name in filters] if crf else [])
    evaluators = {name: SegEvaluator(heldback.class_names, background) for name in variants}
    cam_classes = {"tp": 0, "fp": 0, "fn": 0}
    painted = {name: {"tp": 0, "fp": 0, "fn": 0} for name in filters}
    for i in range(len(heldback)):
        sample = heldback[i]
        rgb = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1)
        with torch.no_grad():
            probs = np.asarray(predict_probs(seg_model, rgb, predict_config.scales, predict_config.flip))
            scores = torch.sigmoid(cam_model(rgb_batch([sample.image]))["logits"][0]).numpy()
        true = set(foreground[sample.labels > 0.5].tolist())
        class_counts(set(foreground[scores > 0.5].tolist()), true, cam_classes)
        by_area = [set(classes_by_area(probs, a, background).tolist()) for a in args.min_areas]
        keeps = [None] + [set(foreground[scores > t].tolist()) for t in args.thresholds] + by_area + [true]
        for name, keep in zip(filters, keeps):
            kept = np.arange(probs.shape[0]) if keep is None else np.asarray(
                [c for c in range(probs.shape[0]) if c not in foreground or c in keep])
            label = predict.label_map(probs, kept, sample.image)
            evaluators[name].add(label, sample.mask)
            class_counts(set(np.unique(label).tolist()) - {background}, true, painted[name])
            if crf is not None:
                refined = predict.label_map(probs, kept, sample.image, crf)
                evaluators[f"{name} + CRF {args.crf}"].add(refined, sample.mask)
    print(f"{run_dir.name}: {len(heldback)} {'held-back' if args.images == 'heldback' else 'training'} images, "
          f"segmentation network {args.seg_model or run_dir / SEG_MODEL}"
          f"{f' at output stride {args.output_stride}' if args.output_stride else ''}\n")
    print("| prediction | J (%) | F (%) | J&F (%) |\n|---|---|---|---|")
    record = {}
    for name, evaluator in evaluators.items():
        h = evaluator.headline()
        record[name] = {k: h[k] for k in ("miou", "contour_f", "jf", "boundary_iou")}
        print(f"| {name} | {100 * h['miou']:.1f} | {100 * h['contour_f']:.1f} | {100 * h['jf']:.1f} |")
    print("\n| classes of an image | precision (%) | recall (%) |\n|---|---|---|")
    rows = [("CAM classifier (sigmoid > 0.5)", cam_classes)] + [
        (f"painted by the prediction: {name}", counts) for name, counts in painted.items()]
    for name, counts in rows:
        p, r = precision_recall(counts)
        record[name] = {"precision": p, "recall": r}
        print(f"| {name} | {100 * p:.1f} | {100 * r:.1f} |")
    suffix = "".join(f"_{part}" for part in (
        args.seg_model.parent.name if args.seg_model else "", "training" if args.images == "training" else "", f"os{args.output_stride}" if args.output_stride else "",
        f"crf_{args.crf}" if args.crf else "") if part)
    out = run_dir / "heldback" / f"final_diagnosis{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
