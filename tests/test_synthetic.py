"""The embedded synthetic RGB-D dataset: reproducible, labels consistent with masks, and the
depth properties the depth-based losses rely on."""

from __future__ import annotations

import numpy as np
import pytest

from weakseg.data import build_dataset
from weakseg.data.synthetic import Config, SyntheticDataset, generate


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate(Config(seed=3), 7), generate(Config(seed=3), 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = generate(Config(seed=4), 7)
    assert not np.array_equal(a[0], c[0])


def test_sample_interface_and_labels_match_masks():
    ds = build_dataset({"kind": "synthetic", "num_images": 40, "image_size": 48, "num_classes": 5})
    assert ds.class_names[0] == "background" and ds.num_classes == 6 and ds.background_index == 0
    multi_class = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (48, 48) and s.depth.shape == (48, 48) and s.depth.dtype == np.float32
        present = sorted(set(np.unique(s.mask).tolist()) - {0})
        assert s.present_class_ids == present and 1 <= len(present) <= 3
        multi_class += len(present) >= 2
    assert multi_class >= 8  # a good share of images hold 2-3 classes


def test_objects_are_nearer_than_the_background():
    """Across every object/background contour the object side is nearer (by >= 0.2 m), and
    the background slopes (farther at the top, like a floor seen at an angle)."""
    cfg = Config(num_images=20, image_size=64)
    for i in range(cfg.num_images):
        _, mask, depth = generate(cfg, i)
        for axis in (0, 1):
            a = np.moveaxis(mask, axis, 0)
            d = np.moveaxis(depth, axis, 0)
            obj_then_bg = (a[:-1] > 0) & (a[1:] == 0)
            bg_then_obj = (a[:-1] == 0) & (a[1:] > 0)
            assert (d[1:][obj_then_bg] - d[:-1][obj_then_bg] > 0.2).all()
            assert (d[:-1][bg_then_obj] - d[1:][bg_then_obj] > 0.2).all()
        background = mask == 0
        rows = np.where(background.any(axis=1))[0]
        assert depth[rows[0]][background[rows[0]]].mean() > depth[rows[-1]][background[rows[-1]]].mean()


def test_depth_has_edges_at_object_contours():
    _, mask, depth = generate(Config(image_size=64), 0)
    fg = mask > 0
    edge = fg[:, 1:] != fg[:, :-1]
    jump = np.abs(np.diff(depth, axis=1))
    assert jump[edge].mean() > 5 * jump[~edge].mean()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataset(Config(num_classes=20))
