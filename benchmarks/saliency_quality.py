"""How well a saliency source finds the objects: foreground IoU of its maps, thresholded,
against the masks' foreground (every non-background, non-void pixel), on a dataset's images.

    python benchmarks/saliency_quality.py configs/voc_auxsegnet.yaml \
        [--sources spectral_residual fine_grained] [--thresholds 0.06 0.1 0.2 0.3 0.5] \
        [--first 60] [--every 1]

The dataset is the config's `dataset` (its holdout applies). IoU is pooled over the images
(intersection and union summed, as J pools its counts); void pixels (255) count for neither.
Besides each threshold it prints the share of pixels above it, and the map's mean, which tell
whether the source is calibrated like the salient-object networks AuxSegNet+ assumes (near 0
on the background, near 1 on objects; its label thresholds 0.06 and 0.5 are set for those).
Masks are read only here, to score; nothing is trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from weakseg.data import build_dataset
from weakseg.labels import IGNORE
from weakseg.refine.saliency import SOURCES, SaliencyConfig, SaliencySource
from weakseg.steps.pipeline import load_config


def foreground_iou(saliency_maps, masks, background_index, thresholds) -> dict[float, tuple[float, float]]:
    """threshold -> (pooled IoU of saliency > threshold with the mask's foreground, share of
    valid pixels above the threshold)."""
    inter = {t: 0 for t in thresholds}
    union = {t: 0 for t in thresholds}
    above = {t: 0 for t in thresholds}
    valid_total = 0
    for saliency, mask in zip(saliency_maps, masks):
        valid = mask != IGNORE
        foreground = valid & (mask != background_index)
        valid_total += int(valid.sum())
        for t in thresholds:
            predicted = valid & (saliency > t)
            inter[t] += int((predicted & foreground).sum())
            union[t] += int((predicted | foreground).sum())
            above[t] += int(predicted.sum())
    return {t: (inter[t] / max(1, union[t]), above[t] / max(1, valid_total)) for t in thresholds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--sources", nargs="+", default=["spectral_residual", "fine_grained"], choices=SOURCES)
    parser.add_argument("--folder", default=None, help="for --sources folder")
    parser.add_argument("--model", default=None, help="for --sources model (TorchScript or ONNX)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.06, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--first", type=int, default=None, help="only the first N images (after --every)")
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    config, base_dir = load_config(args.config)
    dataset = build_dataset(config.dataset, base_dir)
    indices = list(range(0, len(dataset), args.every))[: args.first]
    samples = [dataset[i] for i in indices]
    if any(s.mask is None for s in samples):
        raise SystemExit(f"{args.config}: the dataset has images without masks; nothing to score against")
    masks = [s.mask for s in samples]
    foreground = sum(int(((m != IGNORE) & (m != dataset.background_index)).sum()) for m in masks)
    valid = sum(int((m != IGNORE).sum()) for m in masks)
    print(f"{len(samples)} images of {args.config}; foreground is {100 * foreground / max(1, valid):.1f} % "
          f"of the valid pixels")
    print("\n| source | threshold | foreground IoU (%) | pixels above (%) | map mean |")
    print("|---|---|---|---|---|")
    for source in args.sources:
        maps = [SaliencySource(SaliencyConfig(source=source, folder=args.folder, model=args.model))(s) for s in samples]
        mean = float(np.mean([m.mean() for m in maps]))
        for t, (iou, share) in foreground_iou(maps, masks, dataset.background_index, args.thresholds).items():
            print(f"| {source} | {t:g} | {100 * iou:.1f} | {100 * share:.1f} | {mean:.3f} |")


if __name__ == "__main__":
    main()
