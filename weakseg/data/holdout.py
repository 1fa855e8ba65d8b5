"""A held-back split of any dataset, by config: `holdout: {every: K, part: kept|heldback}`.

The shared VOC and NYUv2 data have one split each, so a result measured on the images a
network trained on says little about generalisation. `holdout` splits any layout in two
without writing an id list: the ids sorted, position n is held back when n % K == K - 1
(every K-th image, the last of each group of K), the rest kept. A run trains on
`part: kept` and evaluates on `part: heldback` (its `eval_dataset`); the two never share
an image, and the split does not depend on the order of the layout's id list. The
benchmarks' `--holdout K` (benchmarks/cam_real_data.py) make the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weakseg.data.base import Sample, SegDataset
from weakseg.errors import ConfigError


@dataclass
class HoldoutConfig:
    every: int = 3
    part: Literal["kept", "heldback"] = "kept"

    def check(self, key: str) -> "HoldoutConfig":
        if self.every < 2:
            raise ConfigError(f"{key}.every: {self.every!r}; must be at least 2 (every K-th image held back)")
        return self


def holdout_positions(ids: list[str], every: int, part: str) -> list[int]:
    """Indices into `ids` of the chosen part: ids sorted, the n-th (0-based) held back when
    n % every == every - 1."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    held = {order[n] for n in range(len(order)) if n % every == every - 1}
    return [i for i in order if (i in held) == (part == "heldback")]


@dataclass
class HoldoutPart(SegDataset):
    """The chosen part of `source`: same classes, sample i is source sample positions[i]."""

    source: SegDataset | None = None
    positions: tuple[int, ...] = ()

    def load(self, index: int) -> Sample:
        return self.source[self.positions[index]]


def take_part(dataset: SegDataset, config: HoldoutConfig) -> SegDataset:
    positions = holdout_positions(dataset.ids, config.every, config.part)
    chosen = {dataset.ids[i] for i in positions}
    absent = [p for p in dataset.absent_masks if getattr(p, "stem", str(p)) in chosen]
    return HoldoutPart(
        class_names=dataset.class_names, background_index=dataset.background_index,
        ids=[dataset.ids[i] for i in positions], index_problems=list(dataset.index_problems),
        name=f"{dataset.name} ({config.part}, holdout 1 in {config.every})", absent_masks=absent,
        source=dataset, positions=tuple(positions), boundary_dilation_ratio=dataset.boundary_dilation_ratio,
    )
