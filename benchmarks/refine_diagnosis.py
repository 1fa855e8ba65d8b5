"""Why does refinement help or hurt? Takes a finished `weakseg run` directory (its CAMs and,
for the walk, its trained AffinityNet) and scores, on the same images:

1. the affinity labels the AffinityNet was trained on: the share of pixels labelled confident
   foreground / confident background / ignored, and how often each is right (precision);
2. every combination of a background score (the CAM network's own probabilities, the power
   (1 - max cam)^alpha for several alpha, constants) and a refiner (none, the trained random
   walk, dense CRF, PAMR): J, F, and the share of pixels predicted background against the
   masks' share. A background that grows or shrinks under refinement shows up there.

    python benchmarks/refine_diagnosis.py --run runs/bench_pipeline/voc_hfpl [--limit N] [--threads 1]

Masks are read only to score. Nothing here feeds back into a run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from weakseg.data import build_dataset
from weakseg.labels import IGNORE
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.data.transforms import resize_nearest
from weakseg.refine.affinity import (
    PAIR_BG_POS,
    PAIR_FG_POS,
    PAIR_NEG,
    AffinityNet,
    RandomWalk,
    affinity_labels,
    image_features,
    pair_affinities,
    pair_labels,
)
from weakseg.refine.base import channel_probs
from weakseg.steps.pipeline import load_config
from weakseg.steps.refine import load_cams, load_model_probs


def mask_pair_labels(mask: np.ndarray, background_index: int) -> np.ndarray:
    """A mask as an affinity-label map: 0 background, every class non-zero, void IGNORE."""
    mask = mask.astype(np.int64)
    return np.where(mask == 255, IGNORE, np.where(mask == background_index, 0, mask + 1000))


def add_pair_stats(stats: np.ndarray, aff: np.ndarray, label_map: np.ndarray, stride: int, radius: int,
                   beta: float) -> None:
    """Add to stats (3 kinds x (pairs, sum a, sum a^beta)) the bg-pos, fg-pos and neg pairs
    that `label_map` (image size) defines on the (P, h, w) affinities `aff`. The map is
    edge-padded like `image_features` pads the image, so the grid cells cover the same pixels."""
    pad = ((0, -label_map.shape[0] % stride), (0, -label_map.shape[1] % stride))
    padded = np.pad(label_map.astype(np.int64), pad, mode="edge")
    codes = pair_labels(resize_nearest(padded, *aff.shape[-2:]), radius)
    for row, code in enumerate((PAIR_BG_POS, PAIR_FG_POS, PAIR_NEG)):
        sel = codes == code
        stats[row] += [sel.sum(), aff[sel].sum(), (aff[sel] ** beta).sum()]


def background_variants(args) -> list[tuple[str, dict]]:
    variants = [("model", {"background": "model"})]
    variants += [(f"power a={a:g}", {"background": "power", "alpha": a}) for a in args.alphas]
    variants += [(f"constant {c:g}", {"background": "constant", "constant": c}) for c in args.constants]
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a `weakseg run` output directory")
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--alphas", type=float, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--constants", type=float, nargs="*", default=[0.1, 0.2, 0.3])
    parser.add_argument("--refiners", nargs="*", default=["none", "walk", "crf", "pamr"])
    parser.add_argument("--log-ts", type=int, nargs="*", default=None,
                        help="walk lengths log2 t to compare (default: the run's log_t)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, base_dir = load_config(args.run / "config.yaml")
    dataset = build_dataset(config.dataset, base_dir)
    bg = dataset.background_index
    if bg is None:
        raise SystemExit("this diagnosis needs a dataset with a background class")
    cam_dir = args.run / "infer_cam"

    refiners = {}
    stage = config.refine.walk
    radius = stage.radius
    affinity_net = None
    if "walk" in args.refiners:
        checkpoint = args.run / "train_affinity" / "affinity_model.pt"
        if not checkpoint.exists():
            raise SystemExit(f"{checkpoint}: no trained AffinityNet (run with a train_affinity section)")
        affinity_net = AffinityNet.from_checkpoint(checkpoint)
        for log_t in args.log_ts or [stage.log_t]:
            refiners[f"walk t=2^{log_t}"] = RandomWalk(affinity_net, stage.beta, log_t, radius)
        args.refiners = [r for r in args.refiners if r != "walk"] + [f"walk t=2^{t}" for t in args.log_ts or [stage.log_t]]
    # Mean affinity a and a^beta per pair kind, of the pairs the masks define and of the pairs
    # the affinity labels (the training targets) define: can the network tell them apart?
    pair_stats = {src: np.zeros((3, 3)) for src in ("masks", "affinity labels")}  # kind x (n, sum a, sum a^beta)
    if "crf" in args.refiners:
        from weakseg.refine.crf import DenseCRF

        refiners["crf"] = DenseCRF("psa")
    if "pamr" in args.refiners:
        from weakseg.refine.pamr import PAMR

        refiners["pamr"] = PAMR()
    refiner_names = [r for r in args.refiners if r == "none" or r in refiners]

    if config.train_affinity is None:
        raise SystemExit("the run's config has no train_affinity section: no affinity-label powers to diagnose")
    low, high = config.train_affinity.alphas()
    label_counts = np.zeros((3, 2), dtype=np.int64)  # rows fg/bg/ignored; cols (pixels, right)
    variants = background_variants(args)
    evaluators = {(v, r): SegEvaluator(dataset.class_names, bg) for v, _ in variants for r in refiner_names}
    background_share = {key: [0, 0] for key in evaluators}  # predicted bg pixels, valid pixels
    gt_background = [0, 0]
    seconds = {r: 0.0 for r in refiner_names}

    n = len(dataset) if not args.limit else min(args.limit, len(dataset))
    for i in range(n):
        sample = dataset[i]
        path = cam_dir / "cams" / f"{sample.id}.npz"
        cams, class_ids = load_cams(path)
        model_probs = load_model_probs(path)
        valid = sample.mask != 255
        gt_background[0] += int(((sample.mask == bg) & valid).sum())
        gt_background[1] += int(valid.sum())

        label = affinity_labels(cams, sample.image, low, high)
        ids = np.concatenate([[bg], class_ids])
        fg = (label != IGNORE) & (label > 0) & valid
        bgl = (label == 0) & valid
        ign = (label == IGNORE) & valid
        as_ids = ids[np.where(label == IGNORE, 0, label)]
        if affinity_net is not None:
            with torch.no_grad():
                features = image_features(affinity_net, sample.image)
                aff = pair_affinities(features[None], radius)[0].numpy()
            for src, grid_label in (("masks", mask_pair_labels(sample.mask, bg)), ("affinity labels", label)):
                add_pair_stats(pair_stats[src], aff, grid_label, affinity_net.output_stride, radius, stage.beta)
        label_counts[0] += [fg.sum(), (as_ids[fg] == sample.mask[fg]).sum()]
        label_counts[1] += [bgl.sum(), (sample.mask[bgl] == bg).sum()]
        label_counts[2] += [ign.sum(), 0]

        for name, kw in variants:
            probs, channel_ids = channel_probs(cams, class_ids, bg, model_probs=model_probs, **kw)
            for r in refiner_names:
                refined = probs
                if r != "none" and probs.shape[0] > 1:
                    t0 = time.perf_counter()
                    refined = refiners[r](probs, sample.image)
                    seconds[r] += time.perf_counter() - t0
                pred = channel_ids[refined.argmax(axis=0)].astype(np.uint8)
                evaluators[(name, r)].add(pred, sample.mask)
                share = background_share[(name, r)]
                share[0] += int(((pred == bg) & valid).sum())
                share[1] += int(valid.sum())
        print(f"\r{i + 1}/{n}", end="", flush=True)
    print()

    total = label_counts[:, 0].sum()
    print(f"\n{args.run} on {n} images; affinity labels alpha_low {low:g}, alpha_high {high:g} "
          f"(CAM argmax, no CRF)\n")
    print("| affinity label | share of pixels (%) | precision (%) |\n|---|---|---|")
    for row, name in enumerate(("confident foreground", "confident background", "ignored")):
        share = 100 * label_counts[row, 0] / total
        prec = f"{100 * label_counts[row, 1] / max(label_counts[row, 0], 1):.1f}" if row < 2 else "-"
        print(f"| {name} | {share:.1f} | {prec} |")
    if affinity_net is not None:
        print(f"\n| pairs from | kind | pairs | mean a | mean a^beta (beta {stage.beta:g}) |\n|---|---|---|---|---|")
        for src, stats in pair_stats.items():
            for row, kind in enumerate(("bg-pos", "fg-pos", "neg")):
                n_pairs = max(stats[row, 0], 1)
                print(f"| {src} | {kind} | {int(stats[row, 0])} | {stats[row, 1] / n_pairs:.3f} | {stats[row, 2] / n_pairs:.3f} |")
    print(f"\nmasks: background is {100 * gt_background[0] / gt_background[1]:.1f} % of the labelled pixels\n")
    print("| background score | refiner | J (%) | F (%) | predicted background (%) |\n|---|---|---|---|---|")
    table = {}
    for (name, r), ev in evaluators.items():
        s = ev.summary()
        share = background_share[(name, r)]
        table[f"{name} | {r}"] = {"miou": s["miou"], "contour_f": s["contour_f"],
                                  "background_share": share[0] / max(share[1], 1)}
        print(f"| {name} | {r} | {100 * s['miou']:.1f} | {100 * s['contour_f']:.1f} | "
              f"{100 * share[0] / max(share[1], 1):.1f} |")
    print("\nrefiner seconds per image:", {r: round(s / (n * len(variants)), 3) for r, s in seconds.items() if r != "none"})
    (args.run / "refine_diagnosis.json").write_text(json.dumps(
        {"images": n, "labels": label_counts.tolist(), "gt_background": gt_background, "table": table,
         "pair_stats": {k: v.tolist() for k, v in pair_stats.items()}}, indent=2))


if __name__ == "__main__":
    main()
