"""What image-level labels alone score, without looking at the image: every pixel of an image
gets the one present class (from its image-level label) that is listed in the most images of
the dataset. No network and no pixel is involved, so a CAM table row at or below this
reference has learned nothing about where the classes are.

    python benchmarks/label_only_reference.py [--dataset configs/data/nyu_shared.yaml]

The masks are read for scoring only, with the same evaluator as the CAM tables (J, F, J&F).
On a dataset with a background class the reference labels no pixel background, so it is meant
for datasets scored by the argmax over present classes (NYUv2 in docs/results.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from weakseg.data import dataset_from_file
from weakseg.metrics.evaluator import SegEvaluator

ROOT = Path(__file__).resolve().parents[1]


def most_listed_present_class(present: list[int], images_per_class: np.ndarray) -> int:
    """The present class listed in the most images (ties: the lowest class id)."""
    return max(sorted(present), key=lambda c: images_per_class[c])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "configs" / "data" / "nyu_shared.yaml")
    args = parser.parse_args()
    dataset = dataset_from_file(args.dataset)
    # One pass over the samples (each decodes image, mask and depth); the uint8 masks are
    # kept, since the prior needs every image's labels before any image can be labelled.
    images_per_class = np.zeros(len(dataset.class_names), dtype=np.int64)
    present, masks = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        images_per_class[sample.present_class_ids] += 1
        present.append(sample.present_class_ids)
        masks.append(sample.mask)
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    skipped = 0
    for ids, mask in zip(present, masks):
        if not ids:
            skipped += 1  # no image-level label: nothing to predict from
            continue
        label = most_listed_present_class(ids, images_per_class)
        evaluator.add(np.full(mask.shape, label, dtype=np.uint8), mask)
    s = evaluator.summary()
    top = np.argsort(-images_per_class)[:3]
    print(f"{args.dataset.name}: {len(dataset) - skipped} images scored ({skipped} without labels); "
          f"most listed classes: " + ", ".join(f"{dataset.class_names[c]} ({images_per_class[c]})" for c in top) + "\n")
    print("| reference | J (%) | F (%) | J&F (%) |")
    print("|---|---|---|---|")
    print(f"| whole image = most listed present class | {100 * s['miou']:.1f} | {100 * s['contour_f']:.1f} | "
          f"{100 * s['jf']:.1f} |")


if __name__ == "__main__":
    main()
