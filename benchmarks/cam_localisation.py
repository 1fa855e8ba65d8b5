"""Do CAMs localise their classes? For each CAM folder (infer-cam output): the mean CAM value
of a present class on its own ground-truth pixels and on background pixels, averaged over
(image, class) pairs. A CAM that localises is clearly higher on its class.

    python benchmarks/cam_localisation.py runs/bench_cam/voc/baseline_GAP/seed0/infer \\
        runs/bench_cam/voc/pFSL/seed0/infer [--data configs/data/voc_shared.yaml] [--every 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from weakseg.data import dataset_from_file
from weakseg.data.io import read_arrays

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cam_dirs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, default=ROOT / "configs" / "data" / "voc_shared.yaml")
    parser.add_argument("--every", type=int, default=1, help="use every n-th image")
    args = parser.parse_args()
    dataset = dataset_from_file(args.data)
    if dataset.background_index is None:
        raise SystemExit("the dataset has no background class to compare against")
    print("| CAM folder | mean CAM on its class | mean CAM on background | ratio |")
    print("|---|---|---|---|")
    for cam_dir in args.cam_dirs:
        on_class, on_background = [], []
        for i in range(0, len(dataset), args.every):
            sample = dataset[i]
            cams, class_ids = read_arrays(cam_dir / "cams" / f"{sample.id}.npz", ("cams", "class_ids"), "CAM file")
            background = sample.mask == dataset.background_index
            for cam, class_id in zip(cams.astype(np.float32), class_ids):
                own = sample.mask == class_id
                if own.any() and background.any():
                    on_class.append(float(cam[own].mean()))
                    on_background.append(float(cam[background].mean()))
        a, b = np.mean(on_class), np.mean(on_background)
        print(f"| {cam_dir} | {a:.3f} | {b:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
