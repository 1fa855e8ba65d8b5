"""Paired augmentation: image, mask and depth stay aligned pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from weakseg.config import from_mapping
from weakseg.data.transforms import (
    IMAGENET_MEAN_255,
    AugmentConfig,
    ColorJitter,
    Compose,
    Paired,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRescale,
    build_augment,
    hflip,
    pad_to,
    resize,
)
from weakseg.errors import ConfigError

BLOCK = 8


def marker_pattern(height: int = 48, width: int = 64):
    """Blocks of BLOCK x BLOCK pixels, each with its own id. The mask holds the id, the
    depth a value derived from it, the image a colour derived from it: after any
    geometric step the three must still agree wherever a pixel is not near a block edge."""
    rows = np.arange(height) // BLOCK
    cols = np.arange(width) // BLOCK
    ids = (rows[:, None] * (width // BLOCK) + cols[None, :]).astype(np.uint8)  # 0..47, no 255
    return ids, colour_of(ids), depth_of(ids)


def colour_of(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids * 5 % 256, (ids * 37 + 11) % 256, 255 - ids * 3], axis=-1).astype(np.uint8)


def depth_of(ids: np.ndarray) -> np.ndarray:
    return (ids.astype(np.float32) * 0.25 + 0.5).astype(np.float32)


def interior(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has one mask value (so bilinear blending there
    only mixes one colour)."""
    h, w = mask.shape
    padded = np.pad(mask.astype(np.int32), radius, constant_values=-1)
    same = np.ones((h, w), dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            same &= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w] == mask
    return same


def assert_aligned(image, mask, depth, fill=IMAGENET_MEAN_255):
    valid = mask != 255
    # depth follows the mask exactly (both nearest): no depth value is invented
    np.testing.assert_array_equal(depth[valid], depth_of(mask[valid]))
    # padding: mask void, depth 0, image the fill colour
    np.testing.assert_array_equal(depth[~valid], 0.0)
    np.testing.assert_array_equal(image[~valid], np.broadcast_to(np.round(fill).astype(np.uint8), image[~valid].shape))
    # image follows the mask away from block edges (bilinear blends only at edges)
    inside = interior(mask, 2) & valid
    assert inside.sum() > 0
    diff = np.abs(image[inside].astype(int) - colour_of(mask[inside]).astype(int))
    assert diff.max() <= 1


@pytest.mark.parametrize("seed", range(12))
def test_full_pipeline_keeps_alignment(seed):
    ids, image, depth = marker_pattern()
    config = AugmentConfig(scale_range=[0.5, 2.0], crop_size=[40, 56], hflip_prob=0.5)
    pipeline = build_augment(config)
    out_image, out_mask, out_depth = pipeline(image, ids, depth, rng=np.random.default_rng(seed))
    assert out_image.shape == (40, 56, 3) and out_mask.shape == out_depth.shape == (40, 56)
    assert out_image.dtype == np.uint8 and out_mask.dtype == np.uint8 and out_depth.dtype == np.float32
    assert_aligned(out_image, out_mask, out_depth)


def test_padding_values():
    ids, image, depth = marker_pattern(16, 16)
    out = pad_to(Paired(image, ids, depth), 20, 24, image_fill=(10, 20, 30))
    assert out.image.shape == (20, 24, 3)
    np.testing.assert_array_equal(out.image[:16, :16], image)  # original at the top left
    assert (out.image[16:] == [10, 20, 30]).all() and (out.image[:, 16:] == [10, 20, 30]).all()
    assert (out.mask[16:] == 255).all() and (out.mask[:, 16:] == 255).all()
    assert (out.depth[16:] == 0).all() and (out.depth[:, 16:] == 0).all()
    np.testing.assert_array_equal(out.mask[:16, :16], ids)
    np.testing.assert_array_equal(out.depth[:16, :16], depth)


def test_crop_larger_than_image_pads_then_crops():
    ids, image, depth = marker_pattern(16, 16)
    step = RandomCrop(24, 24, image_fill=(0, 0, 0))
    for seed in range(5):
        out = step(Paired(image, ids, depth), np.random.default_rng(seed))
        assert out.image.shape == (24, 24, 3)
        assert (out.mask == 255).sum() == 24 * 24 - 16 * 16
        assert_aligned(out.image, out.mask, out.depth, fill=(0, 0, 0))


def test_crop_window_is_exact():
    ids = np.arange(48 * 64, dtype=np.int64).reshape(48, 64)  # every pixel unique
    image, mask, depth = colour_of(ids % 251), (ids % 251).astype(np.uint8), ids.astype(np.float32)
    out = RandomCrop(16, 24)(Paired(image, mask, depth), np.random.default_rng(3))
    top, left = np.argwhere(depth == out.depth[0, 0])[0]  # depth values are unique: find the window
    window = (slice(top, top + 16), slice(left, left + 24))
    np.testing.assert_array_equal(out.depth, depth[window])
    np.testing.assert_array_equal(out.mask, mask[window])
    np.testing.assert_array_equal(out.image, image[window])


@pytest.mark.parametrize(
    "size_in, size_out", [((30, 40), (17, 23)), ((30, 40), (61, 79)), ((7, 9), (20, 3)), ((48, 64), (21, 27))]
)
def test_nearest_uses_the_same_pixel_centres_as_pil(size_in, size_out):
    """The image is resized by PIL (bilinear, pixel-centre sampling); mask and depth must
    sample the same positions, which is what PIL's own nearest does."""
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 255, size=size_in, dtype=np.uint8)
    depth = rng.random(size_in, dtype=np.float32) * 10
    out = resize(Paired(np.zeros(size_in + (3,), np.uint8), mask, depth), *size_out)
    (h, w) = size_out
    # where a centre falls exactly on a source pixel border either neighbour is right, and
    # PIL's answer there depends on its float rounding: compare everywhere else
    def not_tie(n_in, n_out):
        pos = (np.arange(n_out) + 0.5) * n_in / n_out
        return np.abs(pos - np.round(pos)) > 1e-6

    keep = not_tie(size_in[0], h)[:, None] & not_tie(size_in[1], w)[None, :]
    assert keep.mean() > 0.8
    pil_mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    pil_depth = np.asarray(Image.fromarray(depth).resize((w, h), Image.NEAREST))
    np.testing.assert_array_equal(out.mask[keep], pil_mask[keep])
    np.testing.assert_array_equal(out.depth[keep], pil_depth[keep])


def test_hflip_is_exact_and_contiguous():
    ids, image, depth = marker_pattern()
    out = RandomHorizontalFlip(prob=1.0)(Paired(image, ids, depth), np.random.default_rng(0))
    np.testing.assert_array_equal(out.image, image[:, ::-1])
    np.testing.assert_array_equal(out.mask, ids[:, ::-1])
    np.testing.assert_array_equal(out.depth, depth[:, ::-1])
    assert all(a.flags.c_contiguous for a in (out.image, out.mask, out.depth))
    same = RandomHorizontalFlip(prob=0.0)(Paired(image, ids, depth), np.random.default_rng(0))
    np.testing.assert_array_equal(same.mask, ids)


def test_integer_upscale_replicates_mask_and_depth():
    ids, image, depth = marker_pattern(8, 16)
    ids = np.arange(8 * 16, dtype=np.uint8).reshape(8, 16)  # every pixel its own id: the hardest case
    depth = depth_of(ids)
    out = resize(Paired(colour_of(ids), ids, depth), 16, 32)
    np.testing.assert_array_equal(out.mask, np.repeat(np.repeat(ids, 2, 0), 2, 1))
    np.testing.assert_array_equal(out.depth, np.repeat(np.repeat(depth, 2, 0), 2, 1))


def test_downscale_keeps_depth_values_from_the_input():
    rng = np.random.default_rng(0)
    depth = rng.choice(np.array([0.8, 3.5], np.float32), size=(30, 40))
    ids = (depth > 1).astype(np.uint8)
    out = resize(Paired(rgb_like(30, 40), ids, depth), 17, 23)
    assert set(np.unique(out.depth).tolist()) <= {np.float32(0.8).item(), np.float32(3.5).item()}
    np.testing.assert_array_equal(out.depth > 1, out.mask == 1)


def rgb_like(h, w):
    return np.zeros((h, w, 3), np.uint8)


def test_rescale_range_and_determinism():
    ids, image, depth = marker_pattern()
    step = RandomRescale(0.5, 1.5)
    sizes = set()
    for seed in range(20):
        a = step(Paired(image, ids, depth), np.random.default_rng(seed))
        b = step(Paired(image, ids, depth), np.random.default_rng(seed))
        np.testing.assert_array_equal(a.image, b.image)
        h, w = a.mask.shape
        assert 24 <= h <= 72 and 32 <= w <= 96 and abs(h / w - 0.75) < 0.05
        sizes.add((h, w))
        assert_aligned(a.image, a.mask, a.depth)
    assert len(sizes) > 5


def test_colour_jitter_changes_image_only_and_is_seeded():
    ids, image, depth = marker_pattern()
    step = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
    a = step(Paired(image, ids, depth), np.random.default_rng(7))
    b = step(Paired(image, ids, depth), np.random.default_rng(7))
    c = step(Paired(image, ids, depth), np.random.default_rng(8))
    assert a.mask is ids and a.depth is depth
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, image) and not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8


def test_default_config_only_flips():
    pipeline = build_augment(AugmentConfig())
    assert [type(s).__name__ for s in pipeline.steps] == ["RandomHorizontalFlip"]
    ids, image, depth = marker_pattern()
    out_image, out_mask, out_depth = pipeline(image, rng=np.random.default_rng(0))
    assert out_mask is None and out_depth is None and out_image.shape == image.shape


def test_config_from_mapping_and_validation():
    config = from_mapping(AugmentConfig, {"scale_range": [0.7, 1.3], "crop_size": 32, "brightness": 0.3}, "augment")
    steps = [type(s).__name__ for s in build_augment(config).steps]
    assert steps == ["RandomRescale", "RandomCrop", "RandomHorizontalFlip", "ColorJitter"]
    bad = [
        ({"scale_range": [1.5, 0.5]}, "augment.scale_range"),
        ({"scale_range": [1.0]}, "augment.scale_range"),
        ({"hflip_prob": 2.0}, "augment.hflip_prob"),
        ({"contrast": 1.5}, "augment.contrast"),
        ({"crop_size": [0, 8]}, "augment.crop_size"),
        ({"image_fill": [0, 0]}, "augment.image_fill"),
    ]
    for keys, name in bad:
        with pytest.raises(ConfigError, match=name):
            build_augment(from_mapping(AugmentConfig, keys, "augment"))


def test_needs_a_generator_and_matching_sizes():
    ids, image, depth = marker_pattern()
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        Compose([])(image, ids, depth, rng=np.random.RandomState(0))
    with pytest.raises(ValueError, match="mask size"):
        Paired(image, ids[:-1], depth)
    with pytest.raises(ValueError, match="depth size"):
        hflip(Paired(image, ids, depth[:, :-1]))
