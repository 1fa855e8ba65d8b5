"""Layout `coco`: a COCO-style instances json plus its image folder, turned into semantic masks.

Class ids are contiguous: 0 is background, 1..N are the json's categories in the order
of their sorted category ids; names come from the json. Each image's mask is painted
from its annotations:

1. crowd annotations (`iscrowd: 1`) are painted void (255) first;
2. the other annotations are painted from the largest to the smallest decoded area
   (ties: lower annotation id first), so a small object lying on a larger one stays
   visible instead of vanishing under it, and an object inside a crowd region keeps its
   class.

The image-level label is the set of categories of the non-crowd annotations. Images with
no non-crowd annotation are kept as background-only samples (all-zero label), unless
`skip_empty` is set. pycocotools (`pip install pycocotools`) decodes polygons and RLE; it
is imported only when this layout is used.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path, PurePosixPath

import numpy as np

from weakseg.config import resolve_path
from weakseg.data.base import DatasetLayout, Sample, SegDataset, multi_hot
from weakseg.data.io import read_image_rgb, resolve_under
from weakseg.errors import ConfigError, DataError
from weakseg.labels import IGNORE
from weakseg.registry import register

MAX_CATEGORIES = 254  # ids 1..254; 0 is background and 255 void


# Keys holding paths relative to the config file's folder (weakseg.data.with_absolute_paths).
PATH_KEYS: tuple[str, ...] = ("annotations", "image_dir")


@dataclass
class Config:
    """Keys of the `coco` layout; both paths are relative to the config file's folder."""

    annotations: str  # instances json
    image_dir: str  # folder the json's file_name entries are relative to
    skip_empty: bool = False  # leave out images without any non-crowd annotation


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError:
        raise ConfigError(
            "dataset.kind: the coco layout needs pycocotools, which is not installed: pip install pycocotools"
        ) from None
    return mask_api


@dataclass
class Shape:
    """One annotation reduced to what painting needs."""

    annotation_id: int
    class_id: int  # contiguous id, 1..N
    crowd: bool
    segmentation: object  # polygons (list of lists) or RLE (dict), checked at build


@dataclass
class CocoImage:
    path: Path
    width: int
    height: int
    shapes: list[Shape] = field(default_factory=list)


@dataclass
class CocoDataset(SegDataset):
    annotations_path: Path | None = None
    images: list[CocoImage] = field(default_factory=list)

    def load(self, index: int) -> Sample:
        entry = self.images[index]
        image = read_image_rgb(entry.path)
        if image.shape[:2] != (entry.height, entry.width):
            raise DataError(
                entry.path,
                f"image size {image.shape[1]}x{image.shape[0]} does not match the size "
                f"{entry.width}x{entry.height} given in {self.annotations_path.name}",
            )
        mask, class_ids = self.paint(entry)
        labels = multi_hot(sorted(class_ids), self.num_classes, self.background_index)
        return self.make_sample(index, image, labels, mask)

    def paint(self, entry: CocoImage) -> tuple[np.ndarray, set[int]]:
        """The semantic mask of one image and the classes of its non-crowd annotations."""
        mask_api = _mask_api()
        mask = np.zeros((entry.height, entry.width), dtype=np.uint8)
        regions = []
        for shape in entry.shapes:
            region = _decode(mask_api, shape, entry.height, entry.width, self.annotations_path)
            regions.append((shape, region))
        for shape, region in regions:
            if shape.crowd:
                mask[region] = IGNORE
        solid = [(s, r, int(r.sum())) for s, r in regions if not s.crowd]
        solid.sort(key=lambda item: (-item[2], item[0].annotation_id))
        for shape, region, _ in solid:
            mask[region] = shape.class_id
        return mask, {s.class_id for s, _, _ in solid}


def _decode(mask_api, shape: Shape, height: int, width: int, where: Path) -> np.ndarray:
    segmentation = shape.segmentation
    try:
        if isinstance(segmentation, list):
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = mask_api.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        with warnings.catch_warnings():
            # pycocotools' own numpy-2 deprecation notice; nothing a user can act on
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            region = mask_api.decode(rle)
    except Exception as exc:  # pycocotools raises assorted types for malformed RLE
        raise DataError(where, f"annotation {shape.annotation_id}: undecodable segmentation ({exc})") from None
    if region.shape[:2] != (height, width):
        raise DataError(
            where,
            f"annotation {shape.annotation_id}: segmentation size {region.shape[1]}x{region.shape[0]} "
            f"does not match its image size {width}x{height}",
        )
    return region.astype(bool)


def _segmentation_problem(segmentation) -> str | None:
    """Why a segmentation cannot be painted, or None. Checked at build so that a bad
    annotation is reported with the index problems, not halfway through training."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty segmentation (an object without a region would be painted as background)"
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(isinstance(v, Real) and not isinstance(v, bool) for v in polygon)
            ):
                return "polygon must be a flat list of at least 3 x,y pairs"
        return None
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (list, str))):
            return "RLE segmentation needs 'size' [h, w] and 'counts'"
        return None
    return "no segmentation (polygons or RLE)"


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "annotations file does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be an object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, f"'{key}' must be a list")
    return data


def build(config: Config, base_dir: Path | None, strict: bool) -> CocoDataset:
    _mask_api()  # fail early, before reading a large json, when pycocotools is missing
    annotations_path = resolve_path(config.annotations, base_dir)
    image_dir = resolve_path(config.image_dir, base_dir)
    data = _load_json(annotations_path)
    if not image_dir.is_dir():
        raise DataError(image_dir, "image folder does not exist")

    categories = {}
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _int(category.get("id")) or not isinstance(category.get("name"), str):
            raise DataError(annotations_path, f"categories[{i}]: needs an integer 'id' and a string 'name'")
        if category["id"] in categories:
            raise DataError(annotations_path, f"categories[{i}]: category id {category['id']} given twice")
        categories[category["id"]] = category["name"]
    if not categories:
        raise DataError(annotations_path, "no categories")
    if len(categories) > MAX_CATEGORIES:
        raise DataError(annotations_path, f"{len(categories)} categories; at most {MAX_CATEGORIES} fit in 8-bit masks")
    contiguous = {cat_id: index + 1 for index, cat_id in enumerate(sorted(categories))}
    class_names = ("background",) + tuple(categories[c] for c in sorted(categories))

    problems: list[DataError] = []
    images: dict[int, tuple[str, CocoImage]] = {}
    seen_ids: dict[str, int] = {}
    for i, record in enumerate(data["images"]):
        if not isinstance(record, dict):
            problems.append(DataError(annotations_path, f"images[{i}]: not an object"))
            continue
        image_id, file_name = record.get("id"), record.get("file_name")
        width, height = record.get("width"), record.get("height")
        if not (_int(image_id) and isinstance(file_name, str) and _int(width) and _int(height)):
            problems.append(
                DataError(annotations_path, f"images[{i}]: needs integer 'id', 'width', 'height' and a 'file_name'")
            )
            continue
        if width <= 0 or height <= 0:
            problems.append(DataError(annotations_path, f"images[{i}]: size {width}x{height} is empty"))
            continue
        try:
            path = resolve_under(image_dir, file_name, "file_name")
        except DataError as exc:
            problems.append(exc)
            continue
        sample_id = str(PurePosixPath(file_name.replace("\\", "/")).with_suffix(""))
        if image_id in images or sample_id in seen_ids:
            problems.append(
                DataError(annotations_path, f"images[{i}]: image id {image_id} or file {file_name!r} given twice")
            )
            continue
        if not path.is_file():
            problems.append(DataError(path, f"image does not exist (listed in {annotations_path.name})"))
            images[image_id] = (sample_id, None)  # known id: its annotations are not "unknown image"
            continue
        seen_ids[sample_id] = image_id
        images[image_id] = (sample_id, CocoImage(path=path, width=width, height=height))

    broken: set[int] = set()
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            problems.append(DataError(annotations_path, f"annotations[{i}]: not an object"))
            continue
        ann_id = annotation.get("id", i)
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        where = f"annotation {ann_id}"
        if image_id not in images:
            problems.append(DataError(annotations_path, f"{where}: image_id {image_id!r} is not in images"))
            continue
        entry = images[image_id][1]
        if entry is None or image_id in broken:
            continue
        if category_id not in contiguous:
            problems.append(DataError(annotations_path, f"{where}: category_id {category_id!r} is not in categories"))
            broken.add(image_id)
            continue
        problem = _segmentation_problem(annotation.get("segmentation"))
        if problem is not None:
            problems.append(DataError(annotations_path, f"{where}: {problem}"))
            broken.add(image_id)
            continue
        entry.shapes.append(
            Shape(
                annotation_id=ann_id if _int(ann_id) else i,
                class_id=contiguous[category_id],
                crowd=bool(annotation.get("iscrowd", 0)),
                segmentation=annotation["segmentation"],
            )
        )

    ids: list[str] = []
    kept: list[CocoImage] = []
    for image_id in sorted(images):
        sample_id, entry = images[image_id]
        if entry is None or image_id in broken:
            continue
        if config.skip_empty and not any(not s.crowd for s in entry.shapes):
            continue
        ids.append(sample_id)
        kept.append(entry)

    dataset = CocoDataset(
        class_names=class_names,
        background_index=0,
        ids=ids,
        index_problems=problems,
        name=f"coco dataset {annotations_path}",
        annotations_path=annotations_path,
        images=kept,
    )
    if strict:
        dataset.raise_index_problems()
    return dataset


LAYOUT = register("dataset", "coco")(DatasetLayout(Config, build, PATH_KEYS))
