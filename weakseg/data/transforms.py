"""Paired augmentation for image + mask + depth: numpy in, numpy out, seeded by the caller.

Every geometric step moves the three arrays together so that a pixel of the image keeps
its mask id and its depth. Resampling differs by kind on purpose:

- image: bilinear (PIL), because colours may be blended;
- mask: nearest, because a blend of two class ids is a third, wrong class;
- depth: nearest too, because averaging across an object edge invents a depth that lies
  on neither surface.

All three use the same pixel-centre convention, so they stay aligned. Padding (when a
crop is larger than the image) goes to the bottom and right: the image gets `image_fill`
(default the ImageNet mean, which normalisation turns into ~0), the mask gets void 255
(ignored by losses and metrics) and depth gets 0 (meaning "no measurement").

Colour jitter changes the image only. Randomness comes only from the `numpy.random.Generator`
passed in, so the same seed gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from weakseg.errors import ConfigError
from weakseg.labels import IGNORE

IMAGENET_MEAN_255 = (124.0, 116.0, 104.0)  # rounded ImageNet RGB mean, 0..255 scale
DEPTH_FILL = 0.0  # depth padding: no measurement


@dataclass
class Paired:
    """An image with its optional mask and depth, as the transforms pass them along."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W) uint8, 255 void
    depth: np.ndarray | None = None  # (H, W) float32 metres

    def __post_init__(self):
        height, width = self.image.shape[:2]
        for name in ("mask", "depth"):
            other = getattr(self, name)
            if other is not None and other.shape[:2] != (height, width):
                raise ValueError(
                    f"{name} size {other.shape[1]}x{other.shape[0]} differs from image size {width}x{height}"
                )


# ----------------------------------------------------------------------------- deterministic ops


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel, sampling at pixel centres (as PIL does)."""
    centres = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out)
    return np.minimum(centres.astype(np.int64), size_in - 1)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = _nearest_index(array.shape[0], height)
    cols = _nearest_index(array.shape[1], width)
    return array[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), dtype=np.uint8)


def resize(sample: Paired, height: int, width: int) -> Paired:
    if sample.image.shape[:2] == (height, width):
        return sample
    return Paired(
        image=resize_image(sample.image, height, width),
        mask=None if sample.mask is None else resize_nearest(sample.mask, height, width),
        depth=None if sample.depth is None else resize_nearest(sample.depth, height, width),
    )


def pad_to(sample: Paired, height: int, width: int, image_fill: Sequence[float] = IMAGENET_MEAN_255) -> Paired:
    """Pad at the bottom and right to at least height x width (see module doc for fills)."""
    h, w = sample.image.shape[:2]
    if h >= height and w >= width:
        return sample
    out_h, out_w = max(h, height), max(w, width)
    image = np.empty((out_h, out_w, 3), dtype=np.uint8)
    image[...] = np.clip(np.round(np.asarray(image_fill, dtype=np.float64)), 0, 255).astype(np.uint8)
    image[:h, :w] = sample.image
    mask = depth = None
    if sample.mask is not None:
        # A target may carry channels after (H, W) (AuxSegNet's labels + saliency): each padded void.
        mask = np.full((out_h, out_w) + sample.mask.shape[2:], IGNORE, dtype=sample.mask.dtype)
        mask[:h, :w] = sample.mask
    if sample.depth is not None:
        depth = np.full((out_h, out_w), DEPTH_FILL, dtype=sample.depth.dtype)
        depth[:h, :w] = sample.depth
    return Paired(image, mask, depth)


def crop(sample: Paired, top: int, left: int, height: int, width: int) -> Paired:
    window = (slice(top, top + height), slice(left, left + width))
    return Paired(
        image=np.ascontiguousarray(sample.image[window]),
        mask=None if sample.mask is None else np.ascontiguousarray(sample.mask[window]),
        depth=None if sample.depth is None else np.ascontiguousarray(sample.depth[window]),
    )


def hflip(sample: Paired) -> Paired:
    # copies, so the result has positive strides (torch.from_numpy refuses negative ones)
    return Paired(
        image=np.ascontiguousarray(sample.image[:, ::-1]),
        mask=None if sample.mask is None else np.ascontiguousarray(sample.mask[:, ::-1]),
        depth=None if sample.depth is None else np.ascontiguousarray(sample.depth[:, ::-1]),
    )


# ----------------------------------------------------------------------------- random steps


class RandomRescale:
    """Scale both sides by one factor drawn uniformly from [low, high]."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, sample: Paired, rng: np.random.Generator) -> Paired:
        factor = rng.uniform(self.low, self.high) if self.high > self.low else self.low
        if factor == 1.0:
            return sample
        h, w = sample.image.shape[:2]
        return resize(sample, max(1, round(h * factor)), max(1, round(w * factor)))


class RandomCrop:
    """Pad to at least the crop size, then cut a window at a uniformly drawn position."""

    def __init__(self, height: int, width: int, image_fill: Sequence[float] = IMAGENET_MEAN_255):
        self.height, self.width = height, width
        self.image_fill = tuple(image_fill)

    def __call__(self, sample: Paired, rng: np.random.Generator) -> Paired:
        sample = pad_to(sample, self.height, self.width, self.image_fill)
        h, w = sample.image.shape[:2]
        top = int(rng.integers(0, h - self.height + 1))
        left = int(rng.integers(0, w - self.width + 1))
        return crop(sample, top, left, self.height, self.width)


class RandomHorizontalFlip:
    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, sample: Paired, rng: np.random.Generator) -> Paired:
        return hflip(sample) if rng.random() < self.prob else sample


class ColorJitter:
    """Brightness, contrast, then saturation, each by a factor drawn from [1-x, 1+x].
    Image only: mask and depth pass through untouched."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    @staticmethod
    def _factor(amount: float, rng: np.random.Generator) -> float:
        return float(rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount))

    def __call__(self, sample: Paired, rng: np.random.Generator) -> Paired:
        if not (self.brightness or self.contrast or self.saturation):
            return sample
        image = sample.image.astype(np.float32)
        if self.brightness:
            image *= self._factor(self.brightness, rng)
        if self.contrast:
            mean = float(_luma(np.clip(image, 0, 255)).mean())
            image = (image - mean) * self._factor(self.contrast, rng) + mean
        if self.saturation:
            gray = _luma(np.clip(image, 0, 255))[..., None]
            image = (image - gray) * self._factor(self.saturation, rng) + gray
        out = np.clip(np.round(image), 0, 255).astype(np.uint8)
        return Paired(out, sample.mask, sample.depth)


def _luma(image: np.ndarray) -> np.ndarray:
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


# ----------------------------------------------------------------------------- pipeline


@dataclass
class AugmentConfig:
    """Training augmentation; the defaults do nothing but a 50% horizontal flip."""

    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # rescale factor [low, high]
    crop_size: int | list[int] | None = None  # square side, or [height, width]; None: no crop
    image_fill: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN_255))  # RGB padding (~0 after ImageNet normalisation)
    hflip_prob: float = 0.5
    brightness: float = 0.0  # factor range [1-x, 1+x]
    contrast: float = 0.0
    saturation: float = 0.0


class Compose:
    """Apply steps in order: `image, mask, depth = pipeline(image, mask, depth, rng=rng)`."""

    def __init__(self, steps: Sequence):
        self.steps = list(steps)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        depth: np.ndarray | None = None,
        *,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed))")
        sample = Paired(image, mask, depth)
        for step in self.steps:
            sample = step(sample, rng)
        return sample.image, sample.mask, sample.depth

    def __repr__(self) -> str:
        return f"Compose({[type(s).__name__ for s in self.steps]})"


def build_augment(config: AugmentConfig, prefix: str = "augment") -> Compose:
    """Check the values (errors name the key) and build rescale -> crop -> flip -> jitter."""
    if len(config.scale_range) != 2:
        raise ConfigError(f"{prefix}.scale_range: expected [low, high], got {config.scale_range}")
    low, high = config.scale_range
    if not 0 < low <= high:
        raise ConfigError(f"{prefix}.scale_range: need 0 < low <= high, got {config.scale_range}")
    if not 0.0 <= config.hflip_prob <= 1.0:
        raise ConfigError(f"{prefix}.hflip_prob: must lie in 0..1, got {config.hflip_prob}")
    for name in ("brightness", "contrast", "saturation"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{prefix}.{name}: must lie in [0, 1), got {value}")
    if len(config.image_fill) != 3 or not all(0 <= v <= 255 for v in config.image_fill):
        raise ConfigError(f"{prefix}.image_fill: expected three RGB values in 0..255, got {config.image_fill}")

    steps: list = []
    if (low, high) != (1.0, 1.0):
        steps.append(RandomRescale(low, high))
    if config.crop_size is not None:
        size = [config.crop_size] * 2 if isinstance(config.crop_size, int) else list(config.crop_size)
        if len(size) != 2 or any(s <= 0 for s in size):
            raise ConfigError(
                f"{prefix}.crop_size: expected a positive side or [height, width], got {config.crop_size}"
            )
        steps.append(RandomCrop(size[0], size[1], config.image_fill))
    if config.hflip_prob > 0:
        steps.append(RandomHorizontalFlip(config.hflip_prob))
    if config.brightness or config.contrast or config.saturation:
        steps.append(ColorJitter(config.brightness, config.contrast, config.saturation))
    return Compose(steps)
