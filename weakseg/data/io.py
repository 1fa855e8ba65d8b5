"""Reading and writing images, label maps and depth maps, with one clear error per bad file.

Every reader here either returns an array in the documented format or raises
`DataError(path, problem)`. Every writer writes to a temporary file in the target folder
and renames it into place, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from weakseg.errors import DataError


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), flattened to 768 ints for PIL."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write an (H, W) label map with values in 0..255 as a VOC-palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"{path}: label values must lie in 0..255")
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_rgb_png(path: str | Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(tmp, format="PNG")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()  # decode now: truncated or corrupt data fails here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise DataError(path, f"corrupt or truncated image ({exc})") from None
    return image


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB.

    Converted because the conversion loses nothing the network would use: grayscale
    (L, 1), palette (P) and CMYK images, and RGBA/LA whose alpha is fully opaque.
    Refused: transparency (no safe background to composite on) and 16/32-bit or float
    images (the bit depth used inside the container is unknown, so any rescale is a guess).
    """
    path = Path(path)
    image = _open(path)
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha != 255).any():
            raise DataError(path, f"{mode} image with transparent pixels: cannot convert to RGB safely")
        return np.asarray(rgba.convert("RGB"), dtype=np.uint8)
    if mode in ("L", "1", "P", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise DataError(
        path, f"unsupported image mode {mode} (16-bit, 32-bit or float): convert it to 8-bit RGB first"
    )


def read_label_map(path: str | Path) -> np.ndarray:
    """Read a single-channel label map (palette or grayscale PNG) as (H, W) uint8 class ids.

    A palette PNG's indices are the ids (its colours are ignored). 16-bit label maps are
    accepted when every value fits in 0..255; RGB colour masks are refused, because
    mapping colours back to ids needs a palette the file does not carry.
    """
    path = Path(path)
    image = _open(path)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DataError(path, f"label map has values up to {int(values.max())}; ids must lie in 0..255")
        return values.astype(np.uint8)
    raise DataError(path, f"label map must be a single-channel (palette or grayscale) PNG, got mode {image.mode}")


def read_depth(path: str | Path, scale: float) -> np.ndarray:
    """Read a depth map as (H, W) float32 metres: stored value x `scale`.

    PNG (8- or 16-bit, single channel) or .npy (numeric, loaded without pickle).
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise DataError(path, "file does not exist")
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(path, f"unreadable depth array ({exc})") from None
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.number):
            raise DataError(path, f"depth array must be 2-D numeric, got {values.dtype} {values.shape}")
    else:
        image = _open(path)
        if image.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
            raise DataError(path, f"depth map must be single-channel, got mode {image.mode}")
        values = np.asarray(image)
    depth = values.astype(np.float32) * np.float32(scale)
    if not np.isfinite(depth).all():
        raise DataError(path, "depth map has non-finite values")
    return depth


def resolve_under(root: str | Path, relative: str, what: str = "id") -> Path:
    """Join `relative` under `root`, refusing absolute paths and anything that escapes `root`."""
    root_path = Path(root).resolve()
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or relative.strip() == "":
        raise DataError(Path(root) / relative, f"{what} {relative!r} would escape the dataset root {root}")
    candidate = (root_path / pure).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise DataError(Path(root) / relative, f"{what} {relative!r} would escape the dataset root {root}")
    return Path(root) / pure


def read_arrays(path: str | Path, names: Sequence[str], what: str, missing_hint: str = "") -> list[np.ndarray]:
    """The named arrays of an .npz file written by a step (no pickles). A missing file or
    array raises one DataError naming the file; `missing_hint` says which step makes it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} does not exist" + (f"; {missing_hint}" if missing_hint else ""))
    try:
        with np.load(path, allow_pickle=False) as data:
            return [np.asarray(data[name]) for name in names]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(path, f"not a {what} ({exc})") from None
