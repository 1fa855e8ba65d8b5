"""Can the AffinityNet of a run tell pixel pairs apart at all? Trains it afresh on the run's CAMs
(the pipeline's affinity labels) or, as an oracle, on labels made from the masks, then prints
its training losses, the mean affinity a and a^beta of same-class and different-class pairs
(pairs defined by the masks), and J of the random walk from the run's starting probabilities.

    python benchmarks/affinity_fit.py --run runs/bench_pipeline/voc_hfpl --labels cams  [key=value ...]
    python benchmarks/affinity_fit.py --run runs/bench_pipeline/voc_hfpl --labels masks [key=value ...]

key=value overrides apply to the run's `refine.affinity.train` (e.g. epochs=8 optimizer=adamw
lr=0.001). The oracle labels are a diagnostic only: they tell a network or schedule limit from
a label-noise limit, and are never what a run trains on.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from weakseg.config import parse_override
from weakseg.data import build_dataset
from weakseg.data.io import write_label_png
from weakseg.labels import IGNORE
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.refine.affinity import (
    AffinityNet,
    RandomWalk,
    image_features,
    pair_affinities,
)
from weakseg.refine.base import channel_probs
from weakseg.steps.pipeline import load_config
from weakseg.steps.refine import load_cams, load_model_probs
from weakseg.train.affinity import AffinityLabels, train_affinity

from refine_diagnosis import add_pair_stats, mask_pair_labels  # the same pair statistics (benchmarks/)


def write_mask_labels(dataset, cache_dir: Path) -> None:
    """Affinity labels from the masks: 0 background, k the k-th present class, 255 void."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        sample = dataset[i]
        label = np.full(sample.mask.shape, IGNORE, np.uint8)
        label[sample.mask == dataset.background_index] = 0
        for k, class_id in enumerate(sample.present_class_ids):
            label[sample.mask == class_id] = k + 1
        write_label_png(cache_dir / f"{sample.id}.png", label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `weakseg run` directory (with infer_cam/ and a train_affinity section)")
    parser.add_argument("--labels", choices=["cams", "masks"], default="cams")
    parser.add_argument("--out", type=Path, default=None, help="where to train (default RUN/affinity_fit_LABELS)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of train_affinity.train")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, base_dir = load_config(args.run / "config.yaml")
    dataset = build_dataset(config.dataset, base_dir)
    stage, walk_config = config.train_affinity, config.refine.walk
    train_config = stage.train
    low, high = stage.alphas()
    for text in args.overrides:
        (key,), value = parse_override(text)
        train_config = dataclasses.replace(train_config, **{key: type(getattr(train_config, key))(value)})
    out = args.out or args.run / f"affinity_fit_{args.labels}"
    shutil.rmtree(out, ignore_errors=True)
    if args.labels == "masks":
        # Written where train_affinity's label cache looks, newer than the CAM files.
        cache = AffinityLabels(dataset, args.run / "infer_cam", out, low, high).cache_dir
        write_mask_labels(dataset, cache)

    torch.manual_seed(train_config.seed)
    model = AffinityNet(stage.backbone, stage.dim, **stage.backbone_args)
    started = time.perf_counter()
    model = train_affinity(model, dataset, args.run / "infer_cam", train_config, out, radius=stage.radius,
                           alphas=(low, high))
    seconds = time.perf_counter() - started
    losses = torch.load(out / "checkpoint.pt", weights_only=True)["epoch_losses"]

    walk = RandomWalk(model, walk_config.beta, walk_config.log_t, walk_config.radius)
    stats = np.zeros((3, 3))  # kind x (pairs, sum a, sum a^beta)
    evaluators = {name: SegEvaluator(dataset.class_names, dataset.background_index) for name in ("start", "walk")}
    bg = dataset.background_index
    for i in range(len(dataset)):
        sample = dataset[i]
        with torch.no_grad():
            features = image_features(model, sample.image)
            aff = pair_affinities(features[None], walk_config.radius)[0].numpy()
        add_pair_stats(stats, aff, mask_pair_labels(sample.mask, bg), model.output_stride, walk_config.radius,
                       walk_config.beta)
        path = args.run / "infer_cam" / "cams" / f"{sample.id}.npz"
        cams, class_ids = load_cams(path)
        model_probs = load_model_probs(path) if config.refine.background == "model" else None
        probs, ids = channel_probs(cams, class_ids, bg, config.refine.background, config.refine.background_alpha,
                                   config.refine.background_constant, model_probs)
        evaluators["start"].add(ids[probs.argmax(axis=0)].astype(np.uint8), sample.mask)
        refined = walk(probs, sample.image) if probs.shape[0] > 1 else probs
        evaluators["walk"].add(ids[refined.argmax(axis=0)].astype(np.uint8), sample.mask)

    print(f"\nAffinityNet ({stage.backbone}, stride {model.output_stride}) trained on {args.labels} labels, "
          f"{train_config.epochs} epochs, {train_config.optimizer} lr {train_config.lr:g}: {seconds:.0f} s")
    print("epoch losses: " + ", ".join(f"{v:.3f}" for v in losses) + "  (all affinities 0.5 would give 0.693)\n")
    print(f"| pairs (from the masks) | mean a | mean a^{walk_config.beta:g} |\n|---|---|---|")
    for row, kind in enumerate(("same class, background", "same class, object", "different classes")):
        n = max(stats[row, 0], 1)
        print(f"| {kind} | {stats[row, 1] / n:.3f} | {stats[row, 2] / n:.3f} |")
    start, walked = (evaluators[k].summary() for k in ("start", "walk"))
    print(f"\nJ of the start probabilities ({config.refine.background} background): {100 * start['miou']:.1f} %, "
          f"after the walk (log t {walk_config.log_t}): {100 * walked['miou']:.1f} %; "
          f"F {100 * start['contour_f']:.1f} -> {100 * walked['contour_f']:.1f} %")


if __name__ == "__main__":
    main()
