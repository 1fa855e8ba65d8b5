"""Datasets: one `Sample` interface over several on-disk layouts.

Each layout lives in its own module, which registers a `DatasetLayout` (its `Config`
dataclass of keys, see docs/datasets.md; `build(config, base_dir, strict) -> SegDataset`; its
path keys) as ``@register("dataset", kind)``. A dataset config is a mapping with `kind:` plus
that layout's keys; relative paths resolve against `base_dir` (the config file's folder).
Any layout also takes `holdout: {every, part}` (weakseg.data.holdout): one part of a
held-back split; and `boundary_dilation_ratio` (default 0.02): the band of the boundary IoU
every step scores this dataset with, as a fraction of the image diagonal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from weakseg.config import from_mapping, load_yaml, resolve_path
from weakseg.data.base import DatasetLayout, SegDataset, Sample
from weakseg.data.holdout import HoldoutConfig, take_part
from weakseg.errors import ConfigError
from weakseg.registry import available, lookup


def layout(kind: str, prefix: str = "dataset") -> DatasetLayout:
    """The registered layout `kind`; one ConfigError naming `<prefix>.kind` otherwise."""
    return lookup("dataset", kind, f"{prefix}.kind" if prefix else "kind")


def check_dataset_mapping(mapping: Any, prefix: str = "dataset") -> None:
    """Refuse a dataset mapping with no or an unknown `kind`, or a key its layout does not
    have, before any file is read or written (configs check this when they load)."""
    if not isinstance(mapping, Mapping) or "kind" not in mapping:
        key = f"{prefix}.kind" if prefix else "kind"
        raise ConfigError(f"{key}: required key is missing; allowed values: {', '.join(available('dataset'))}")
    options = dict(mapping)
    _holdout(options, prefix)
    _boundary_ratio(options, prefix)
    from_mapping(layout(options.pop("kind"), prefix).config, options, prefix)


def _boundary_ratio(options: dict, prefix: str) -> float | None:
    """Pops and checks the `boundary_dilation_ratio` key every layout accepts."""
    value = options.pop("boundary_dilation_ratio", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        key = f"{prefix}.boundary_dilation_ratio" if prefix else "boundary_dilation_ratio"
        raise ConfigError(f"{key}: a fraction of the image diagonal in (0, 1), got {value!r}")
    return float(value)


def _holdout(options: dict, prefix: str) -> HoldoutConfig | None:
    """Pops and checks the `holdout` key every layout accepts."""
    value = options.pop("holdout", None)
    if value is None:
        return None
    key = f"{prefix}.holdout" if prefix else "holdout"
    return from_mapping(HoldoutConfig, value, key).check(key)


def build_dataset(
    mapping: Mapping[str, Any], base_dir: str | Path | None = None, strict: bool = True, prefix: str = "dataset"
) -> SegDataset:
    """Build a dataset from a config mapping (`kind` + the layout's keys)."""
    check_dataset_mapping(mapping, prefix)
    options = dict(mapping)
    holdout = _holdout(options, prefix)
    ratio = _boundary_ratio(options, prefix)
    kind = options.pop("kind")
    found = layout(kind, prefix)
    config = from_mapping(found.config, options, prefix)
    dataset = found.build(config, Path(base_dir) if base_dir is not None else None, strict)
    if ratio is not None:
        dataset.boundary_dilation_ratio = ratio
    return dataset if holdout is None else take_part(dataset, holdout)


def with_absolute_paths(mapping: Mapping[str, Any], base_dir: str | Path | None) -> dict:
    """A copy of a dataset mapping whose config-relative paths (the layout's PATH_KEYS) are
    absolute, so a config saved into a run folder still finds its data from there."""
    options = dict(mapping)
    if base_dir is None or "kind" not in options:
        return options
    for key in layout(options["kind"]).path_keys:
        if isinstance(options.get(key), str):
            options[key] = str(resolve_path(options[key], base_dir).resolve())
    return options


def load_dataset_config(path: str | Path) -> dict:
    """A dataset config file holds the dataset keys at top level or under `dataset:`."""
    data = load_yaml(path)
    if "dataset" in data and isinstance(data["dataset"], dict):
        return data["dataset"]
    return data


def dataset_from_file(path: str | Path, strict: bool = True) -> SegDataset:
    """The dataset of a config file; a config error names the file and the key as the file
    spells it (`dataset.x` under `dataset:`, plain `x` at the top level)."""
    nested = isinstance(load_yaml(path).get("dataset"), dict)
    try:
        return build_dataset(load_dataset_config(path), Path(path).parent, strict, prefix="dataset" if nested else "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


__all__ = ["Sample", "SegDataset", "build_dataset", "dataset_from_file", "load_dataset_config", "with_absolute_paths", "layout"]
