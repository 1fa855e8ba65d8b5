"""The best J and F a CAM can reach at a given output stride: the ground-truth masks, averaged
onto the CAM grid (one cell per stride x stride pixels), upsampled bilinearly as CAM inference
does, then labelled by argmax. No network is involved; it measures what the grid resolution
alone allows, so the CAM tables can be read against it.

    python benchmarks/cam_resolution_ceiling.py [--dataset configs/data/voc_shared.yaml] [--strides 4 8 16 32]

Void (255) pixels are left out of the averages (they belong to no class) and ignored by J, as
everywhere else (docs/metrics.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data import dataset_from_file
from weakseg.metrics.evaluator import SegEvaluator

ROOT = Path(__file__).resolve().parents[1]


def grid_limited_label(mask: np.ndarray, classes: list[int], stride: int) -> np.ndarray:
    """The argmax of the per-class masks after a stride x stride average and bilinear upsampling."""
    h, w = mask.shape
    onehot = torch.from_numpy(np.stack([(mask == c) for c in classes]).astype(np.float32))[None]
    grid = (-(-h // stride), -(-w // stride))
    pad = (0, grid[1] * stride - w, 0, grid[0] * stride - h)
    valid = F.pad(torch.from_numpy((mask != 255).astype(np.float32))[None, None], pad)
    summed = F.avg_pool2d(F.pad(onehot, pad), stride)
    cells = summed / F.avg_pool2d(valid, stride).clamp_min(1e-6)  # share of each class among valid pixels
    up = F.interpolate(cells, size=(grid[0] * stride, grid[1] * stride), mode="bilinear", align_corners=False)
    return np.asarray(classes, dtype=np.uint8)[up[0, :, :h, :w].argmax(0).numpy()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "configs" / "data" / "voc_shared.yaml")
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    dataset = dataset_from_file(args.dataset)
    evaluators = {s: SegEvaluator(dataset.class_names, dataset.background_index) for s in args.strides}
    for i in range(len(dataset)):
        mask = dataset[i].mask
        classes = sorted(int(c) for c in np.unique(mask) if c != 255)
        for stride, evaluator in evaluators.items():
            evaluator.add(grid_limited_label(mask, classes, stride), mask)
    print(f"{args.dataset.name}: {len(dataset)} images; ground truth limited to the CAM grid\n")
    print("| output stride | J (%) | F (%) | J&F (%) | boundary IoU (%) |")
    print("|---|---|---|---|---|")
    for stride, evaluator in evaluators.items():
        s = evaluator.summary()
        print(f"| {stride} | {100 * s['miou']:.1f} | {100 * s['contour_f']:.1f} | {100 * s['jf']:.1f} | "
              f"{100 * s['boundary_iou']:.1f} |")


if __name__ == "__main__":
    main()
