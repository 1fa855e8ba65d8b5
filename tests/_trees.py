"""Writers for tiny dataset trees used by the layout tests (every file made with PIL/numpy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from weakseg.data.io import write_label_png


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_png(path: Path, image: np.ndarray | Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    pil.save(path, format="PNG")
    return path


def save_jpeg(path: Path, image: np.ndarray | Image.Image, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    pil.save(path, format="JPEG", quality=quality)
    return path


def save_label(path: Path, label: np.ndarray) -> Path:
    """A palette PNG of class ids, as VOC stores them."""
    write_label_png(path, label)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file short, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def corrupt(path: Path) -> Path:
    """Keep the name, replace the content with bytes no decoder accepts."""
    path.write_bytes(b"this is not an image at all" * 8)
    return path


def block_mask(height: int, width: int, ids: list[int], block: int = 1) -> np.ndarray:
    """A mask made of vertical stripes of `block` pixels cycling through `ids`."""
    columns = np.arange(width) // block
    row = np.asarray(ids, dtype=np.uint8)[columns % len(ids)]
    return np.repeat(row[None, :], height, axis=0)


# ----------------------------------------------------------------------------- layouts


def make_folder_tree(
    root: Path,
    samples: dict[str, dict],
    classes: list[str] | None = ("background", "cat", "dog"),
    labels: list[str] | None = None,
) -> Path:
    """samples: id -> {"image": array (saved as PNG unless "image_ext" says otherwise),
    "mask": array (PNG), "depth": uint16 array (PNG) or float array (.npy)}."""
    root.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        write_lines(root / "classes.txt", list(classes))
    for sample_id, files in samples.items():
        if "image" in files:
            ext = files.get("image_ext", ".png")
            path = root / "images" / f"{sample_id}{ext}"
            if ext in (".jpg", ".jpeg"):
                save_jpeg(path, files["image"])
            else:
                save_png(path, files["image"])
        if "mask" in files:
            save_png(root / "masks" / f"{sample_id}.png", files["mask"].astype(np.uint8))
        if "depth" in files:
            depth = files["depth"]
            if np.issubdtype(depth.dtype, np.floating):
                (root / "depth").mkdir(parents=True, exist_ok=True)
                np.save(root / "depth" / f"{sample_id}.npy", depth)
            else:
                save_png(root / "depth" / f"{sample_id}.png", depth)
    if labels is not None:
        write_lines(root / "labels.csv", labels)
    return root


def make_voc_tree(root: Path, samples: dict[str, dict], split: str = "train", listed: list[str] | None = None) -> Path:
    """samples: id -> {"image": array (JPEG), "mask": array (palette PNG), "aug": bool}."""
    for sample_id, files in samples.items():
        if "image" in files:
            save_jpeg(root / "JPEGImages" / f"{sample_id}.jpg", files["image"])
        if "mask" in files:
            folder = "SegmentationClassAug" if files.get("aug") else "SegmentationClass"
            save_label(root / folder / f"{sample_id}.png", files["mask"])
    write_lines(root / "ImageSets" / "Segmentation" / f"{split}.txt", listed if listed is not None else list(samples))
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    return root


def rectangle(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """COCO polygon covering columns x0..x1-1 and rows y0..y1-1 (as pycocotools rasterises it)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
