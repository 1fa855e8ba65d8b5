"""Layout `voc`: a PASCAL VOC 2012 root (VOCdevkit/VOC2012), optionally with the SBD
augmented masks (SegmentationClassAug) and an image-level labels file.

    VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png       palette PNG: 0 background, 1..20 classes, 255 void
      SegmentationClassAug/<id>.png    optional (SBD), grayscale with the same ids
      ImageSets/Segmentation/<split>.txt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from weakseg.config import resolve_path
from weakseg.data.base import DatasetLayout
from weakseg.data.folder import Entry, FolderDataset, finish, read_id_list, read_labels_file
from weakseg.data.io import resolve_under
from weakseg.errors import ConfigError, DataError
from weakseg.registry import register

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")


# Keys holding paths relative to the config file's folder (weakseg.data.with_absolute_paths).
PATH_KEYS: tuple[str, ...] = ("root",)


@dataclass
class Config:
    """Keys of the `voc` layout (see docs/datasets.md). `ids_file` and `labels_file` are
    relative to `root`; `root` is relative to the config file's folder."""

    root: str
    split: str = "train"  # ids from ImageSets/Segmentation/<split>.txt
    ids_file: str | None = None  # another id list (e.g. train_aug.txt); replaces split
    mask_dir: Literal["auto", "SegmentationClass", "SegmentationClassAug"] = "auto"
    labels_file: str | None = None  # `id c1 c2 ...` with foreground ids 1..20
    require_masks: bool | None = None  # None: true when there is no labels_file


def build(config: Config, base_dir: Path | None, strict: bool) -> FolderDataset:
    root = resolve_path(config.root, base_dir)
    if not root.is_dir():
        raise DataError(root, "VOC root folder does not exist (expected VOCdevkit/VOC2012)")
    if config.ids_file is not None:
        list_path = resolve_path(config.ids_file, root)
    else:
        list_path = resolve_under(root / "ImageSets" / "Segmentation", f"{config.split}.txt", "split")
    labels_path = resolve_path(config.labels_file, root)

    require_masks = config.require_masks if config.require_masks is not None else labels_path is None
    if labels_path is None and not require_masks:
        raise ConfigError(
            "dataset.require_masks: cannot be false without labels_file: image-level labels come from the masks"
        )
    mask_dirs = MASK_DIRS if config.mask_dir == "auto" else (config.mask_dir,)
    mask_roots = [root / name for name in mask_dirs]

    ids, problems = read_id_list(list_path, allow_spaces=False)
    labels: dict[str, tuple[int, ...]] = {}
    broken_labels: set[str] = set()
    if labels_path is not None:
        labels, broken_labels, label_problems = read_labels_file(
            labels_path, len(VOC_CLASSES), first_id=1, hint=" (list foreground ids 1..20; 0 is background)"
        )
        problems += label_problems

    listed_in = f"listed in {list_path.name}"
    kept_ids: list[str] = []
    entries: list[Entry] = []
    for image_id in ids:
        try:
            resolve_under(root, image_id, "id")
        except DataError as exc:
            problems.append(exc)
            continue
        found: list[DataError] = []
        image = root / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            found.append(DataError(image, f"image does not exist ({listed_in})"))
        mask = next((p for p in (d / f"{image_id}.png" for d in mask_roots) if p.is_file()), None)
        if mask is None and require_masks:
            also = f" (nor in {mask_dirs[1]})" if len(mask_dirs) > 1 else ""
            found.append(DataError(mask_roots[0] / f"{image_id}.png", f"mask does not exist{also} ({listed_in})"))
        class_ids = None
        if labels_path is not None:
            if image_id in labels:
                class_ids = labels[image_id]
            elif image_id not in broken_labels:
                found.append(DataError(labels_path, f"no labels line for id {image_id!r}"))
        if found or image_id in broken_labels:
            problems += found
            continue
        kept_ids.append(image_id)
        entries.append(Entry(image=image, mask=mask, class_ids=class_ids))

    dataset = FolderDataset(
        class_names=VOC_CLASSES,
        background_index=0,
        ids=kept_ids,
        name=f"voc dataset {root}",
        entries=entries,
    )
    return finish(dataset, problems, strict)


LAYOUT = register("dataset", "voc")(DatasetLayout(Config, build, PATH_KEYS))
