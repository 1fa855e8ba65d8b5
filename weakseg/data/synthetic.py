"""A seeded generator of an RGB-D WSSS dataset: the embedded default for the demo and tests.

Each of the K object classes has its own shape family (disc, box, triangle, ring, cross,
star, ...) and its own colour and texture statistics. Classes' colour distributions overlap
and the background is cluttered with distractor blobs drawn from the same colour range, so
colour alone does not identify a class: a network has to use shape and texture. An image
holds 1-3 objects (often of 2-3 classes; objects may overlap, later ones in front). The
depth map is a sloped, textured background plane with every object nearer than the
background behind it, and a later (occluding) object nearer than what it covers.

Every image is a pure function of (seed, index), so a dataset of any size is reproducible
and can be generated lazily.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakseg.data.base import DatasetLayout, SegDataset, labels_from_mask
from weakseg.registry import register

SHAPES = ("disc", "box", "triangle", "ring", "cross", "star", "crescent", "diamond")


# Keys holding paths relative to the config file's folder (weakseg.data.with_absolute_paths).
PATH_KEYS: tuple[str, ...] = ()


@dataclass
class Config:
    num_images: int = 300
    image_size: int = 80
    num_classes: int = 4  # object classes; class 0 is background
    seed: int = 0
    max_objects: int = 3
    clutter: int = 4  # distractor blobs in the background per image
    noise: float = 8.0  # std of per-pixel colour noise (0..255 scale)


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    hue: float  # mean hue in [0, 1)
    hue_spread: float
    texture: str  # "stripes", "checker", "speckle", "smooth"
    texture_period: float  # pixels


def class_styles(num_classes: int) -> list[ClassStyle]:
    """Fixed per-class appearance; hues are spaced but spreads make neighbours overlap."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"synthetic num_classes must lie in 1..{len(SHAPES)}, got {num_classes}")
    textures = ("stripes", "checker", "speckle", "smooth")
    styles = []
    for k in range(num_classes):
        styles.append(
            ClassStyle(
                shape=SHAPES[k],
                hue=(k / num_classes + 0.07) % 1.0,
                hue_spread=0.6 / num_classes,
                texture=textures[k % len(textures)],
                texture_period=4.0 + 2.0 * (k % 3),
            )
        )
    return styles


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float, rng) -> np.ndarray:
    """Binary mask of one object of radius ~r centred at (cy, cx), rotated by `angle`."""
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / r  # rotated, normalised coordinates
    v = (-(xx - cx) * s + (yy - cy) * c) / r
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if shape == "disc":
        aspect = rng.uniform(0.75, 1.0)
        return (u / 1.0) ** 2 + (v / aspect) ** 2 <= 1.0
    if shape == "box":
        aspect = rng.uniform(0.5, 0.9)
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9 * aspect)
    if shape == "triangle":
        # equilateral-ish triangle: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return inside
    if shape == "ring":
        inner = rng.uniform(0.45, 0.6)
        return (rho <= 1.0) & (rho >= inner)
    if shape == "cross":
        arm = rng.uniform(0.25, 0.35)
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if shape == "star":
        return rho <= 0.55 + 0.45 * np.cos(5 * theta) ** 2
    if shape == "crescent":
        return (rho <= 1.0) & (np.hypot(u - 0.45, v) >= 0.75)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) * 1.4 <= 1.0
    raise ValueError(f"unknown shape {shape}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _texture(style: ClassStyle, yy, xx, rng) -> np.ndarray:
    """Brightness modulation in [-1, 1] specific to the class's texture."""
    phase = rng.uniform(0, 2 * np.pi)
    angle = rng.uniform(0, np.pi)
    p = style.texture_period * rng.uniform(0.85, 1.15)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if style.texture == "stripes":
        return np.sign(np.sin(2 * np.pi * along / p + phase)).astype(np.float32)
    if style.texture == "checker":
        across = -xx * np.sin(angle) + yy * np.cos(angle)
        return np.sign(np.sin(2 * np.pi * along / p + phase) * np.sin(2 * np.pi * across / p)).astype(np.float32)
    if style.texture == "speckle":
        return (rng.random(yy.shape) < 0.3).astype(np.float32) * 2 - 1
    return np.sin(2 * np.pi * along / (6 * p) + phase).astype(np.float32)  # smooth


def generate(config: Config, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, mask uint8 HxW, depth float32 HxW metres) for one index."""
    rng = np.random.default_rng([config.seed, index])
    size = config.image_size
    styles = class_styles(config.num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: a random hue field, smooth colour gradients, and distractor blobs.
    bg_hue = rng.uniform(0, 1)
    base = _hsv_to_rgb(bg_hue, rng.uniform(0.1, 0.4), rng.uniform(0.35, 0.75))
    gradient = (xx / size - 0.5)[..., None] * rng.uniform(-60, 60, size=3) + (yy / size - 0.5)[..., None] * rng.uniform(
        -60, 60, size=3
    )
    image = base + gradient
    for _ in range(config.clutter):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(0.05, 0.15) * size
        blob = np.hypot((yy - cy) / rng.uniform(0.6, 1.6), xx - cx) <= r
        image[blob] = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))

    # Depth: a sloped plane (floor/wall seen at an angle) with a fine texture, in metres.
    far = rng.uniform(4.0, 7.0)
    slope = rng.uniform(1.0, 2.5)
    depth = far - slope * (yy / size) + 0.05 * np.sin(2 * np.pi * xx / rng.uniform(6, 12)) * np.cos(
        2 * np.pi * yy / rng.uniform(6, 12)
    )

    mask = np.zeros((size, size), dtype=np.uint8)
    num_objects = int(rng.integers(1, config.max_objects + 1))
    num_distinct = int(rng.integers(1, min(num_objects, config.num_classes) + 1))
    classes = rng.choice(config.num_classes, size=num_distinct, replace=False)
    object_classes = list(classes) + list(rng.choice(classes, size=num_objects - num_distinct))
    rng.shuffle(object_classes)
    for order, k in enumerate(object_classes):
        style = styles[int(k)]
        r = rng.uniform(0.16, 0.3) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        shape = _shape_mask(style.shape, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi), rng)
        if shape.sum() < 20:
            continue
        hue = style.hue + rng.normal(0, style.hue_spread)
        colour = _hsv_to_rgb(hue, rng.uniform(0.5, 0.95), rng.uniform(0.45, 0.95))
        texture = _texture(style, yy, xx, rng)[..., None]
        shade = 1.0 + 0.25 * texture + 0.15 * ((yy - cy) / r)[..., None] * rng.uniform(-1, 1)
        image[shape] = (colour * shade)[shape]
        mask[shape] = int(k) + 1
        # Nearer than the background behind it, and than every earlier object.
        object_depth = np.min(depth[shape]) - rng.uniform(0.4, 1.2) + 0.1 * (yy - cy) / r
        depth[shape] = object_depth[shape]

    image = image + rng.normal(0, config.noise, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    depth = np.clip(depth, 0.3, None).astype(np.float32)
    return image, mask, depth


class SyntheticDataset(SegDataset):
    def __init__(self, config: Config):
        super().__init__(
            class_names=("background",) + tuple(s.shape for s in class_styles(config.num_classes)),
            background_index=0,
            ids=[f"syn_{config.seed}_{i:05d}" for i in range(config.num_images)],
            name=f"synthetic(seed={config.seed})",
        )
        self.config = config

    def load(self, index: int):
        image, mask, depth = generate(self.config, index)
        labels = labels_from_mask(mask, self.num_classes, self.background_index)
        return self.make_sample(index, image, labels, mask=mask, depth=depth)


def build(config: Config, base_dir: Path | None = None, strict: bool = True) -> SyntheticDataset:
    if config.num_images < 1 or config.image_size < 16:
        from weakseg.errors import ConfigError

        raise ConfigError("dataset: synthetic needs num_images >= 1 and image_size >= 16")
    return SyntheticDataset(config)


LAYOUT = register("dataset", "synthetic")(DatasetLayout(Config, build, PATH_KEYS))
