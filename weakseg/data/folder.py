"""Layout `folder`: bring your own data as plain folders, any number of classes, no code.

    root/
      classes.txt            one class name per line; line i (counting from 0) is class id i
      images/<id>.<ext>      .jpg .jpeg .png .bmp .tif .tiff .webp
      masks/<id>.png         optional: single-channel class ids, 255 = void
      depth/<id>.png|.npy    optional: stored value x depth_scale = metres
      labels.csv             optional: image-level labels, `<id>,<class ids separated by spaces>`

The list and labels readers here are shared with the `voc` layout. Problems with the
index (missing files, ids escaping the root, bad label lines) are collected at build, one
`DataError` per file or line; the ids they concern are left out of `ids`, so a non-strict
dataset only lists samples whose files exist. Content problems (corrupt files, bad mask
ids, size mismatches) surface when a sample is loaded, or all at once through `check()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from weakseg.config import resolve_path
from weakseg.data.base import DatasetLayout, Sample, SegDataset, check_same_size, labels_from_mask, multi_hot
from weakseg.data.io import read_depth, read_image_rgb, read_label_map, resolve_under
from weakseg.errors import ConfigError, DataError
from weakseg.labels import IGNORE
from weakseg.registry import register

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEPTH_EXTENSIONS = (".png", ".npy", ".tif", ".tiff")
MAX_CLASSES = 255  # id 255 is void, so real classes are 0..254


# Keys holding paths relative to the config file's folder (weakseg.data.with_absolute_paths).
PATH_KEYS: tuple[str, ...] = ("root",)


@dataclass
class Config:
    """Keys of the `folder` layout (see docs/datasets.md). Paths other than `root` are
    relative to `root`; `root` is relative to the config file's folder."""

    root: str
    image_dir: str = "images"
    mask_dir: str | None = None  # None: `masks` when that folder exists
    depth_dir: str | None = None  # None: `depth` when that folder exists
    classes_file: str = "classes.txt"
    classes: list[str] | None = None  # inline class names; replaces classes_file
    labels_file: str | None = None  # None: `labels.csv` when that file exists
    ids_file: str | None = None  # None: every image in image_dir, sorted by id
    background: int | str | None = "auto"  # "auto": class 0 when it is named "background"
    require_masks: bool | None = None  # None: true exactly when labels come from masks
    require_depth: bool = False
    depth_scale: float | None = None  # metres per stored unit; required when depth is used
    void_values: list[int] = field(default_factory=list)  # raw mask values that mean void
    mask_offset: int = 0  # added to raw mask values (NYU: -1 turns 1..40 into 0..39)
    mask_mapping: dict[int, int] | None = None  # raw value -> class id; replaces mask_offset


# ----------------------------------------------------------------------------- list files


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(path, f"{what} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM left by spreadsheets
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable {what} ({exc})") from None


def read_id_list(path: Path, allow_spaces: bool = True) -> tuple[list[str], list[DataError]]:
    """One id per line (blank lines skipped). Returns the ids in order and the problems
    (duplicates, and with `allow_spaces=False` lines holding more than one field)."""
    ids: list[str] = []
    problems: list[DataError] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_read_text(path, "id list").splitlines(), 1):
        item = line.strip()
        if not item:
            continue
        if not allow_spaces and len(item.split()) > 1:
            problems.append(DataError(path, f"line {number}: expected one id per line, got {item!r}"))
            continue
        if item in seen:
            problems.append(DataError(path, f"line {number}: id {item!r} already listed on line {seen[item]}"))
            continue
        seen[item] = number
        ids.append(item)
    if not ids and not problems:
        raise DataError(path, "id list is empty")
    return ids, problems


def read_labels_file(
    path: Path, num_classes: int, first_id: int = 0, hint: str = "", classes_source: str | Path | None = None
) -> tuple[dict[str, tuple[int, ...]], set[str], list[DataError]]:
    """Image-level labels, one image per line: `<id>,<class ids separated by spaces>`.

    Without a comma the id ends at the first whitespace (`2007_000032 1 15`), so VOC-style
    lists read as they are. A first line whose id field is `id` is a header. An id with
    no class ids has no foreground class. Class ids must lie in first_id..num_classes-1.

    Returns (labels by id, ids whose line is broken, problems): a broken line is reported
    once here, and its id is then left out by the caller rather than given wrong labels.
    Class ids past the last class, given `classes_source` (where the names come from), are one
    problem blamed on that source (too few names), not one per line. A file with no label
    line at all (empty, or a header only) is one DataError.
    """
    labels: dict[str, tuple[int, ...]] = {}
    broken: set[str] = set()
    problems: list[DataError] = []
    lines_of: dict[str, int] = {}
    too_high: list[tuple[int, int]] = []  # (line, class id) past the last class
    first_line = True
    for number, line in enumerate(_read_text(path, "labels file").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if "," in text:
            image_id, rest = (part.strip() for part in text.split(",", 1))
        else:
            image_id, *tail = text.split(None, 1)
            rest = tail[0] if tail else ""
        if first_line and image_id.lower() == "id":
            first_line = False
            continue
        first_line = False
        if not image_id:
            problems.append(DataError(path, f"line {number}: empty id"))
            continue
        if image_id in lines_of:
            problems.append(
                DataError(path, f"line {number}: id {image_id!r} already has labels on line {lines_of[image_id]}")
            )
            broken.add(image_id)
            continue
        lines_of[image_id] = number
        class_ids = []
        for token in rest.split():
            try:
                value = int(token)
            except ValueError:
                problems.append(
                    DataError(
                        path,
                        f"line {number}: {token!r} is not an integer class id "
                        f"(write `id,c1 c2 ...` with class ids separated by spaces)",
                    )
                )
                broken.add(image_id)
                break
            if value >= num_classes and classes_source is not None and value <= 254:
                too_high.append((number, value))
                broken.add(image_id)
                break
            if not first_id <= value < num_classes:
                problems.append(
                    DataError(
                        path,
                        f"line {number}: class id {value} for id {image_id!r} is outside "
                        f"{first_id}..{num_classes - 1}{hint}",
                    )
                )
                broken.add(image_id)
                break
            class_ids.append(value)
        if image_id not in broken:
            labels[image_id] = tuple(sorted(set(class_ids)))
    if not lines_of and not problems:
        raise DataError(path, "labels file has no label line (it is empty or holds only a header); "
                              "write one line per image: `id,c1 c2 ...`")
    if too_high:
        largest = max(value for _, value in too_high)
        problems.insert(0, DataError(
            classes_source,
            f"{num_classes} class names (ids 0..{num_classes - 1}), but {path.name} uses class ids up to {largest} "
            f"on {len(too_high)} line(s), first line {too_high[0][0]}: are names missing here (or is that id wrong)?",
        ))
    return labels, broken, problems


def read_class_names(path: Path) -> list[str]:
    """classes.txt: line i is the name of class id i. Blank lines inside would shift every
    later id, so they are refused; trailing blank lines are fine."""
    lines = _read_text(path, "classes file").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise DataError(path, f"line {number}: blank line (line i names class id i-1, so ids would shift)")
        names.append(name)
    return names


def _check_class_names(names: list[str], where: str | Path) -> None:
    if not names:
        raise DataError(where, "no class names given")
    if len(names) > MAX_CLASSES:
        raise DataError(where, f"{len(names)} classes; at most {MAX_CLASSES} (id 255 is void)")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise DataError(where, f"class name {name!r} given twice (ids {seen[name]} and {index})")
        seen[name] = index


# ----------------------------------------------------------------------------- masks


def mask_lookup_table(
    num_classes: int, void_values=(), offset: int = 0, mapping: dict[int, int] | None = None
) -> np.ndarray | None:
    """Raw mask value -> class id as a 256-entry table (255 void, -1 invalid), or None when
    raw values already are class ids. Raw 255 is always void."""
    if not void_values and offset == 0 and mapping is None:
        return None
    if mapping is not None:
        table = np.full(256, -1, dtype=np.int16)
        for raw, target in mapping.items():
            table[raw] = target
    else:
        table = np.arange(256, dtype=np.int16) + offset
    table[(table >= num_classes) & (table != IGNORE)] = -1
    table[table < 0] = -1
    for raw in void_values:
        table[raw] = IGNORE
    table[IGNORE] = IGNORE
    return table


def read_mask(path: Path, num_classes: int, table: np.ndarray | None, rule: str = "") -> np.ndarray:
    """Read a mask and turn it into class ids; any value that is neither a class id nor
    void is an error naming the file, never clipped or dropped."""
    raw = read_label_map(path)
    counts = np.bincount(raw.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    if table is None:
        bad = present[(present >= num_classes) & (present != IGNORE)]
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:8])
            raise DataError(path, f"label ids outside 0..{num_classes - 1} (and not void 255): {shown}")
        return raw
    bad = present[table[present] < 0]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        raise DataError(
            path,
            f"raw mask values {shown} map to no class id in 0..{num_classes - 1}{rule}; "
            f"list them in void_values if they mean void",
        )
    return table[raw].astype(np.uint8)


# ----------------------------------------------------------------------------- dataset


@dataclass
class Entry:
    """The files of one sample, found at build. `class_ids` None: labels come from the mask."""

    image: Path
    mask: Path | None = None
    depth: Path | None = None
    class_ids: tuple[int, ...] | None = None


@dataclass
class FolderDataset(SegDataset):
    """A dataset whose samples are files on disk (`folder`, `voc` and `nyu` layouts)."""

    entries: list[Entry] = field(default_factory=list)
    mask_table: np.ndarray | None = None  # see mask_lookup_table
    mask_rule: str = ""  # how raw mask values were mapped, for error messages
    depth_scale: float = 1.0

    def load(self, index: int) -> Sample:
        entry = self.entries[index]
        image = read_image_rgb(entry.image)
        mask = None
        if entry.mask is not None:
            mask = read_mask(entry.mask, self.num_classes, self.mask_table, self.mask_rule)
            check_same_size(image, mask, entry.mask, "mask")
        depth = None
        if entry.depth is not None:
            depth = read_depth(entry.depth, self.depth_scale)
            check_same_size(image, depth, entry.depth, "depth")
        if entry.class_ids is not None:
            labels = multi_hot(entry.class_ids, self.num_classes, self.background_index)
        else:
            labels = labels_from_mask(mask, self.num_classes, self.background_index)
        return self.make_sample(index, image, labels, mask, depth)


def finish(dataset: FolderDataset, problems: list[DataError], strict: bool) -> FolderDataset:
    """Attach the index problems; a strict build raises them all at once."""
    dataset.index_problems = list(problems)
    if strict:
        dataset.raise_index_problems()
    return dataset


class _FileIndex:
    """Files of a folder by name stem, one directory listing per folder, so finding an
    image by id costs no stat per extension even for ten thousand ids."""

    def __init__(self, folder: Path, extensions: tuple[str, ...]):
        self.folder = folder
        self.extensions = extensions
        self._listings: dict[Path, dict[str, list[Path]]] = {}

    def _listing(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._listings:
            by_stem: dict[str, list[Path]] = {}
            try:
                with os.scandir(folder) as entries:
                    for item in entries:
                        name = item.name
                        if name.startswith("."):
                            continue
                        stem, ext = os.path.splitext(name)
                        if ext.lower() in self.extensions and item.is_file():
                            by_stem.setdefault(stem, []).append(folder / name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            for paths in by_stem.values():
                paths.sort()
            self._listings[folder] = by_stem
        return self._listings[folder]

    def all_ids(self) -> list[str]:
        return sorted(self._listing(self.folder))

    def find(self, image_id: str) -> list[Path]:
        relative = PurePosixPath(image_id)
        folder = self.folder.joinpath(*relative.parts[:-1])
        return self._listing(folder).get(relative.name, [])


def _optional(value: str | None, conventional: str, root: Path, what: str, folder: bool) -> Path | None:
    """A path key whose default means "the conventional name, when it exists"; a path the
    user names explicitly must exist."""
    if value is None:
        path = root / conventional
        present = path.is_dir() if folder else path.is_file()
        return path if present else None
    path = resolve_path(value, root)
    present = path.is_dir() if folder else path.is_file()
    if not present:
        raise DataError(path, f"{what} does not exist")
    return path


def _background_index(value: int | str | None, names: list[str], where) -> int | None:
    if value is None:
        return None
    if value == "auto":
        return 0 if names[0].lower() == "background" else None
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ConfigError(f"dataset.background: class id {value} is outside 0..{len(names) - 1}")
        return value
    if value not in names:
        raise ConfigError(f"dataset.background: no class named {value!r} in {where}")
    return names.index(value)


def _mask_rule(config: Config, num_classes: int) -> tuple[np.ndarray | None, str]:
    for i, raw in enumerate(config.void_values):
        if not 0 <= raw <= 255:
            raise ConfigError(f"dataset.void_values[{i}]: {raw} is not a mask value in 0..255")
    if config.mask_mapping is not None:
        if config.mask_offset != 0:
            raise ConfigError("dataset.mask_mapping: give either mask_mapping or mask_offset, not both")
        mapping = {}
        for raw, target in config.mask_mapping.items():
            if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 254:
                raise ConfigError(f"dataset.mask_mapping: key {raw!r} is not a raw mask value in 0..254")
            if isinstance(target, bool) or not isinstance(target, int) or not (
                0 <= target < num_classes or target == IGNORE
            ):
                raise ConfigError(
                    f"dataset.mask_mapping.{raw}: {target!r} is not a class id in 0..{num_classes - 1} or 255"
                )
            mapping[raw] = target
        table = mask_lookup_table(num_classes, config.void_values, 0, mapping)
        return table, " (mask_mapping)"
    table = mask_lookup_table(num_classes, config.void_values, config.mask_offset)
    rule = f" (mask_offset {config.mask_offset:+d})" if config.mask_offset else ""
    return table, rule


def build(config: Config, base_dir: Path | None, strict: bool) -> FolderDataset:
    return build_folder(config, base_dir, strict, kind="folder")


def build_folder(config: Config, base_dir: Path | None, strict: bool, kind: str = "folder") -> FolderDataset:
    """Find every sample's files and collect the index problems (presets call this too)."""
    root = resolve_path(config.root, base_dir)
    if not root.is_dir():
        raise DataError(root, "dataset root folder does not exist")

    if config.classes is not None:
        names = [str(n).strip() for n in config.classes]
        names_from: str | Path = "dataset.classes"
    else:
        names_from = resolve_path(config.classes_file, root)
        names = read_class_names(names_from)
    _check_class_names(names, names_from)
    num_classes = len(names)
    background = _background_index(config.background, names, names_from)
    table, rule = _mask_rule(config, num_classes)

    image_dir = resolve_path(config.image_dir, root)
    if not image_dir.is_dir():
        raise DataError(image_dir, "image folder does not exist")
    mask_dir = _optional(config.mask_dir, "masks", root, "mask folder", folder=True)
    depth_dir = _optional(config.depth_dir, "depth", root, "depth folder", folder=True)
    labels_path = _optional(config.labels_file, "labels.csv", root, "labels file", folder=False)

    require_masks = config.require_masks if config.require_masks is not None else labels_path is None
    if labels_path is None and not require_masks:
        raise ConfigError(
            "dataset.require_masks: cannot be false without a labels file: image-level labels come from the masks"
        )
    if require_masks and mask_dir is None:
        reason = "there is no labels file, so labels come from the masks" if labels_path is None else "require_masks"
        raise DataError(resolve_path(config.mask_dir or "masks", root), f"mask folder does not exist ({reason})")
    if config.require_depth and depth_dir is None:
        raise DataError(resolve_path(config.depth_dir or "depth", root), "depth folder does not exist (require_depth)")
    if depth_dir is not None and config.depth_scale is None:
        raise ConfigError(
            f"dataset.depth_scale: required because depth maps are used ({depth_dir}); give metres per "
            "stored unit, e.g. 0.001 for millimetre PNGs or 1.0 for .npy files in metres"
        )
    if config.depth_scale is not None and not config.depth_scale > 0:
        raise ConfigError(f"dataset.depth_scale: must be positive, got {config.depth_scale}")

    problems: list[DataError] = []
    images = _FileIndex(image_dir, IMAGE_EXTENSIONS)
    if config.ids_file is not None:
        list_path = resolve_path(config.ids_file, root)
        ids, problems = read_id_list(list_path)
        listed_in = f" (listed in {list_path.name})"
    else:
        ids = images.all_ids()
        if not ids:
            raise DataError(image_dir, f"no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        listed_in = ""

    labels: dict[str, tuple[int, ...]] = {}
    broken_labels: set[str] = set()
    if labels_path is not None:
        labels, broken_labels, label_problems = read_labels_file(labels_path, num_classes, classes_source=names_from)
        problems += label_problems
        if config.ids_file is None:
            # Every image of the folder is a sample, so a labels line whose id has no image is
            # a mismatch (a renamed or deleted file), not another split's line.
            for image_id in sorted(set(labels) - set(ids)):
                problems.append(DataError(labels_path, f"labels line for id {image_id!r}, but {image_dir} has no image with that id"))
    depths = _FileIndex(depth_dir, DEPTH_EXTENSIONS) if depth_dir is not None else None

    kept_ids: list[str] = []
    entries: list[Entry] = []
    absent_masks: list[Path] = []
    for image_id in ids:
        try:
            resolve_under(root, image_id, "id")
        except DataError as exc:
            problems.append(exc)
            continue
        found: list[DataError] = []
        candidates = images.find(image_id)
        image = candidates[0] if candidates else None
        if not candidates:
            hint = " (ids are file names without extension)" if image_id.lower().endswith(IMAGE_EXTENSIONS) else ""
            found.append(DataError(image_dir / image_id, f"no image for id {image_id!r}{listed_in}{hint}"))
        elif len(candidates) > 1:
            shown = ", ".join(p.name for p in candidates)
            found.append(DataError(candidates[0], f"several images for id {image_id!r} ({shown}); keep one"))
        mask = None
        if mask_dir is not None:
            mask = mask_dir / f"{image_id}.png"
            if not mask.is_file():
                if require_masks:
                    found.append(DataError(mask, f"mask does not exist{listed_in}"))
                else:
                    absent_masks.append(mask)
                mask = None
        depth = None
        if depths is not None:
            depth_files = depths.find(image_id)
            if len(depth_files) > 1:
                shown = ", ".join(p.name for p in depth_files)
                found.append(DataError(depth_files[0], f"several depth maps for id {image_id!r} ({shown}); keep one"))
            elif depth_files:
                depth = depth_files[0]
            elif config.require_depth:
                missing = depth_dir / f"{image_id}.png"
                found.append(DataError(missing, f"depth map does not exist (require_depth){listed_in}"))
        class_ids = None
        if labels_path is not None:
            if image_id in labels:
                class_ids = labels[image_id]
            elif image_id not in broken_labels:  # a broken line is already reported
                found.append(DataError(labels_path, f"no labels line for id {image_id!r}"))
        if found or image_id in broken_labels:
            problems += found
            continue
        kept_ids.append(image_id)
        entries.append(Entry(image=image, mask=mask, depth=depth, class_ids=class_ids))

    dataset = FolderDataset(
        class_names=tuple(names),
        background_index=background,
        ids=kept_ids,
        name=f"{kind} dataset {root}",
        entries=entries,
        mask_table=table,
        mask_rule=rule,
        depth_scale=config.depth_scale if config.depth_scale is not None else 1.0,
        absent_masks=absent_masks,
    )
    return finish(dataset, problems, strict)


__all__ = [
    "Config",
    "Entry",
    "FolderDataset",
    "build",
    "build_folder",
    "read_id_list",
    "read_labels_file",
    "read_class_names",
    "read_mask",
    "mask_lookup_table",
]


LAYOUT = register("dataset", "folder")(DatasetLayout(Config, build, PATH_KEYS))
