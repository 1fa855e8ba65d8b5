"""The one sample interface every dataset returns, and the base class datasets share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from weakseg.errors import DataError, DatasetProblems
from weakseg.labels import IGNORE


@dataclass(frozen=True)
class DatasetLayout:
    """An on-disk layout, registered as ``@register("dataset", kind)``: its config dataclass
    (the keys under `dataset:`), its builder ``build(config, base_dir, strict) -> SegDataset``,
    and the keys that hold paths relative to the config file."""

    config: type
    build: Callable
    path_keys: tuple[str, ...] = ()


@dataclass
class Sample:
    """One image of a WSSS dataset.

    image:       (H, W, 3) uint8 RGB.
    labels:      (F,) float32 multi-hot over the dataset's *foreground* classes, in the
                 order of `SegDataset.foreground_ids` (what a CAM network is trained on).
    mask:        (H, W) uint8 class ids, 255 = void; None when the dataset has no masks.
                 For evaluation only: training never reads it.
    depth:       (H, W) float32 metres (larger = farther); None when absent.
    id:          the sample id as listed in the dataset index.
    class_names: names of all classes, indexed by mask id.
    foreground_ids: mask ids of the classes `labels` refers to, in order.
    """

    image: np.ndarray
    labels: np.ndarray
    id: str
    class_names: tuple[str, ...]
    foreground_ids: tuple[int, ...]
    mask: np.ndarray | None = None
    depth: np.ndarray | None = None

    @property
    def present_class_ids(self) -> list[int]:
        """Mask ids of the foreground classes in the image-level label."""
        return [self.foreground_ids[i] for i in np.flatnonzero(self.labels > 0.5)]


def foreground_ids(num_classes: int, background_index: int | None) -> list[int]:
    return [c for c in range(num_classes) if c != background_index]


def labels_from_mask(mask: np.ndarray, num_classes: int, background_index: int | None) -> np.ndarray:
    """Multi-hot image-level label over foreground classes from a mask (void 255 excluded)."""
    present = np.zeros(num_classes, dtype=bool)
    values = np.unique(mask)
    values = values[values != IGNORE]
    present[values[values < num_classes]] = True
    fg = foreground_ids(num_classes, background_index)
    return present[fg].astype(np.float32)


def validate_mask(mask: np.ndarray, num_classes: int, path) -> None:
    """Raise DataError if the mask has ids outside 0..num_classes-1 other than 255."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        raise DataError(path, f"label ids outside 0..{num_classes - 1} (and not void 255): {shown}")


def check_same_size(image: np.ndarray, other: np.ndarray, path, what: str) -> None:
    if other.shape[:2] != image.shape[:2]:
        raise DataError(
            path,
            f"{what} size {other.shape[1]}x{other.shape[0]} does not match image size "
            f"{image.shape[1]}x{image.shape[0]}",
        )


@dataclass
class SegDataset:
    """Base class: a list of ids, class names, and `load(index) -> Sample`.

    Subclasses fill `ids`, `class_names`, `background_index`, and implement `load`.
    Problems with the index itself (listed ids with missing files, ids that would escape
    the root) are collected in `index_problems` at construction; `strict=True` datasets
    raise them all at once. `check()` additionally loads every sample.
    """

    class_names: tuple[str, ...] = ()
    background_index: int | None = 0
    ids: list[str] = field(default_factory=list)
    index_problems: list[DataError] = field(default_factory=list)
    name: str = "dataset"
    # How its predictions are scored: the boundary IoU's band, x the image diagonal (the
    # dataset key `boundary_dilation_ratio`, any layout; Cheng et al. 0.02, shape cues 0.05).
    boundary_dilation_ratio: float = 0.02
    # Masks the layout expected but did not find (a mask folder without every image's
    # mask, allowed when labels come from a labels file): no metrics can be computed then.
    absent_masks: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def foreground_ids(self) -> list[int]:
        return foreground_ids(self.num_classes, self.background_index)

    @property
    def foreground_names(self) -> list[str]:
        return [self.class_names[c] for c in self.foreground_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        return self.load(index)

    def load(self, index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_sample(self, index: int, image, labels, mask=None, depth=None) -> Sample:
        return Sample(
            image=image,
            labels=labels,
            id=self.ids[index],
            class_names=tuple(self.class_names),
            foreground_ids=tuple(self.foreground_ids),
            mask=mask,
            depth=depth,
        )

    def raise_index_problems(self) -> None:
        if self.index_problems:
            raise DatasetProblems(self.index_problems, self.name)

    def check(self, progress=None, counts: dict | None = None) -> list[DataError]:
        """Every problem of the dataset: index problems, then each sample loaded in full.
        `counts`, when given, receives how many loaded samples have a mask and a depth map."""
        problems = list(self.index_problems)
        bad_ids = {p.path for p in problems}
        if counts is not None:
            counts.update(masks=0, depth=0)
        for i in range(len(self.ids)):
            try:
                sample = self.load(i)
            except DataError as exc:
                if exc.path not in bad_ids:
                    problems.append(exc)
            else:
                if counts is not None:
                    counts["masks"] += sample.mask is not None
                    counts["depth"] += sample.depth is not None
            if progress is not None:
                progress(i + 1, len(self.ids))
        return problems


def multi_hot(class_ids: Sequence[int], num_classes: int, background_index: int | None) -> np.ndarray:
    present = np.zeros(num_classes, dtype=bool)
    present[list(class_ids)] = True
    return present[foreground_ids(num_classes, background_index)].astype(np.float32)
