"""Write a small `folder` dataset with no background class, for the worked example in
docs/datasets.md: 24 images of 64x64 px, each split into two regions of two of the classes
road, grass and sky (every pixel is a class, the top two rows are void), as PNG masks and as
a labels.csv.

    python docs/examples/no_background_dataset.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["road", "grass", "sky"]
COLOURS = np.array([[170, 80, 70], [70, 170, 80], [80, 110, 190]], np.uint8)


def main(out: Path, count: int = 24, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels = ["id,classes"]
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        split = int(rng.integers(16, size - 16))
        a, b = (int(c) for c in rng.choice(3, 2, replace=False))
        mask[:, :split], mask[:, split:] = a, b
        mask[:2] = 255  # void
        noise = rng.integers(0, 40, (size, size, 3))
        image = np.clip(COLOURS[np.minimum(mask, 2)].astype(int) + noise, 0, 255).astype(np.uint8)
        sample_id = f"field_{i:03d}"
        Image.fromarray(image).save(out / "images" / f"{sample_id}.png")
        Image.fromarray(mask).save(out / "masks" / f"{sample_id}.png")
        labels.append(f"{sample_id},{' '.join(str(c) for c in sorted({a, b}))}")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "labels.csv").write_text("\n".join(labels) + "\n")
    print(f"wrote {count} images, masks, classes.txt and labels.csv to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
