"""Overlay panels for looking at results: image | CAM | pseudo-label | ground truth."""

from __future__ import annotations

import numpy as np
from PIL import Image

from weakseg.data.io import voc_palette

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colorize_labels(label: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) RGB with the VOC palette (void 255 is cream white)."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) RGB, blue (0) through green and yellow to red (1)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + overlay.astype(np.float32) * alpha).astype(np.uint8)


def overlay_panel(image: np.ndarray, cams: np.ndarray, pseudo_label: np.ndarray, gt: np.ndarray | None, scale: int = 1) -> np.ndarray:
    """One row: the image, the strongest present-class CAM over it, the pseudo-label, the GT."""
    cam = cams.max(axis=0) if len(cams) else np.zeros(image.shape[:2], np.float32)
    tiles = [image, blend(image, heatmap(cam)), colorize_labels(pseudo_label)]
    if gt is not None:
        tiles.append(colorize_labels(gt))
    gap = np.full((image.shape[0], 2, 3), 255, dtype=np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    if scale > 1:
        row = np.asarray(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST))
    return row
