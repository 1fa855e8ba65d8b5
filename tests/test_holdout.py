"""The `holdout` dataset key: a held-back split of any layout (weakseg.data.holdout)."""

import numpy as np
import pytest

from weakseg.data import build_dataset
from weakseg.data.holdout import holdout_positions
from weakseg.errors import ConfigError
from weakseg.steps import pipeline

SYNTHETIC = {"kind": "synthetic", "num_images": 10, "image_size": 32}


def test_positions_hold_back_every_kth_sorted_id():
    # Ids given out of order: the split follows the sorted ids, so the list's order does not matter.
    ids = ["e", "a", "d", "b", "c", "g", "f"]
    # sorted: a b c d e f g -> held back (n % 3 == 2): c, f
    held = holdout_positions(ids, 3, "heldback")
    kept = holdout_positions(ids, 3, "kept")
    assert [ids[i] for i in held] == ["c", "f"]
    assert [ids[i] for i in kept] == ["a", "b", "d", "e", "g"]
    shuffled = list(reversed(ids))
    assert sorted(shuffled[i] for i in holdout_positions(shuffled, 3, "heldback")) == ["c", "f"]


@pytest.mark.parametrize("every", [2, 3, 5])
def test_parts_are_disjoint_and_cover_the_dataset(every):
    full = build_dataset(SYNTHETIC)
    kept = build_dataset(dict(SYNTHETIC, holdout={"every": every, "part": "kept"}))
    held = build_dataset(dict(SYNTHETIC, holdout={"every": every, "part": "heldback"}))
    assert not set(kept.ids) & set(held.ids)
    assert sorted(kept.ids + held.ids) == sorted(full.ids)
    assert len(held) == len(full) // every
    assert kept.class_names == full.class_names and kept.background_index == full.background_index
    # Each sample is the source's sample of the same id, image and mask alike.
    by_id = {full.ids[i]: i for i in range(len(full))}
    for i in range(len(held)):
        sample, source = held[i], full[by_id[held.ids[i]]]
        assert sample.id == source.id
        assert np.array_equal(sample.image, source.image) and np.array_equal(sample.mask, source.mask)


@pytest.mark.parametrize("bad, message", [
    ({"every": 1}, "dataset.holdout.every: 1; must be at least 2"),
    ({"every": "x"}, "dataset.holdout.every: expected an integer"),
    ({"part": "test"}, "dataset.holdout.part: 'test' is not allowed"),
    ({"evry": 3}, "dataset.holdout.evry: unknown key"),
])
def test_bad_holdout_is_one_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_dataset(dict(SYNTHETIC, holdout=bad))


def test_pipeline_config_accepts_holdout_in_both_datasets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "dataset: {kind: synthetic, num_images: 9, image_size: 32, holdout: {every: 3, part: kept}}\n"
        "eval_dataset: {kind: synthetic, num_images: 9, image_size: 32, holdout: {every: 3, part: heldback}}\n"
        "train_cam: {}\n"
    )
    config, _ = pipeline.load_config(path)
    assert config.dataset["holdout"] == {"every": 3, "part": "kept"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("part: heldback", "part: held"))
    with pytest.raises(ConfigError, match="eval_dataset.holdout.part"):
        pipeline.load_config(bad)
