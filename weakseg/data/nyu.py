"""Layout `nyu`: NYU Depth v2 as prepared in ../shared/data/nyu-depth-v2, a preset of `folder`.

    nyu-depth-v2/
      images/<id>.jpg      640x480 RGB
      depth/<id>.png       8-bit, metres = value / 25.5 (10 m = 255)
      labels40/<id>.png    0 unlabelled (-> void 255), 1..40 NYU40 classes (-> ids 0..39)
      train.txt            the ids

There is no background class: every one of the 40 classes is a foreground class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weakseg.data import folder
from weakseg.data.base import DatasetLayout
from weakseg.registry import register

NYU40_CLASSES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)

DEPTH_SCALE = 1.0 / 25.5  # metres per stored 8-bit unit


# Keys holding paths relative to the config file's folder (weakseg.data.with_absolute_paths).
PATH_KEYS: tuple[str, ...] = ("root",)


@dataclass
class Config:
    """Keys of the `nyu` layout; everything else is fixed by the preset."""

    root: str
    ids_file: str | None = "train.txt"  # relative to root; null: every image, sorted
    require_depth: bool = True
    labels_file: str | None = None  # optional image-level labels (folder format); default: from masks
    require_masks: bool | None = None  # None: true when there is no labels_file


def folder_config(config: Config) -> folder.Config:
    """The `folder` keys this preset stands for (also what docs/datasets.md shows)."""
    return folder.Config(
        root=config.root,
        image_dir="images",
        mask_dir="labels40",
        depth_dir="depth" if config.require_depth else None,
        classes=list(NYU40_CLASSES),
        labels_file=config.labels_file,
        ids_file=config.ids_file,
        background=None,
        require_masks=config.require_masks,
        require_depth=config.require_depth,
        depth_scale=DEPTH_SCALE,
        void_values=[0],
        mask_offset=-1,
    )


def build(config: Config, base_dir: Path | None, strict: bool) -> folder.FolderDataset:
    return folder.build_folder(folder_config(config), base_dir, strict, kind="nyu")


LAYOUT = register("dataset", "nyu")(DatasetLayout(Config, build, PATH_KEYS))
