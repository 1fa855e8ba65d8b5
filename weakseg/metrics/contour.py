"""Contour F-score (F) as the DAVIS benchmark defines it (Perazzi et al. 2016) and as the
ICAM paper applies it to semantic segmentation (icam §4.1, "Evaluation metrics").

Per binary mask:
- boundary map: a pixel is on the boundary when it differs from its east, south or
  south-east neighbour, pixels beyond the image counting as 0; on the last row only the
  east rule applies, on the last column only the south rule, and the bottom-right pixel is
  never a boundary (DAVIS `seg2bmap` for an unresized mask).
- tolerance: a boundary pixel is matched when a boundary pixel of the other mask lies
  within a disk of radius ceil(0.008 x image diagonal) (x^2 + y^2 <= r^2).
- precision = matched predicted / predicted boundary pixels, recall = matched GT / GT
  boundary pixels; empty cases: no prediction boundary but some GT boundary -> P=1, R=0;
  prediction boundary but no GT boundary -> P=0, R=1; neither -> P=R=1.
For a dataset (ICAM): per class, the four counts are summed over all images and one F is
computed per class from the sums (DAVIS's empty rules applied to the sums); the reported F
is the mean over foreground classes. Void (255) counts as background.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DEFAULT_BOUND_TH = 0.008


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """Boundary map of a binary mask by the east / south / south-east neighbour rule."""
    seg = np.asarray(mask, dtype=bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def tolerance_radius(shape: tuple[int, int], bound_th: float = DEFAULT_BOUND_TH) -> int:
    """ceil(bound_th x diagonal) pixels; a bound_th >= 1 is taken as a radius in pixels."""
    if bound_th >= 1:
        return int(bound_th)
    # Same float expression as DAVIS so that the radius agrees bit-for-bit at exact cases
    # such as 500x375 (diagonal 625 -> radius 5, not 6).
    return int(math.ceil(bound_th * float(np.linalg.norm(shape))))


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element: x^2 + y^2 <= r^2."""
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def boundary_counts(pred_mask: np.ndarray, gt_mask: np.ndarray, radius: int) -> np.ndarray:
    """[matched_pred, total_pred, matched_gt, total_gt] boundary pixel counts for one mask pair."""
    pred_b = seg2bmap(pred_mask)
    gt_b = seg2bmap(gt_mask)
    n_pred = int(pred_b.sum())
    n_gt = int(gt_b.sum())
    if n_pred == 0 or n_gt == 0:
        return np.array([0, n_pred, 0, n_gt], dtype=np.int64)
    # Dilating by a disk of radius r == "Euclidean distance to the nearest boundary pixel
    # <= r". The exact distance transform gives that in O(HW) whatever r (a dilation costs
    # O(HW r^2)); sqrt of an integer is correctly rounded, so `<= r` is exact.
    # Distances are only read at boundary pixels and measured to boundary pixels, so the
    # bounding box of both boundaries holds every pixel that matters: the transform on that
    # crop is exact, and much cheaper for objects smaller than the image.
    rows = np.flatnonzero((pred_b | gt_b).any(axis=1))
    cols = np.flatnonzero((pred_b | gt_b).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pred_b, gt_b = pred_b[box], gt_b[box]
    gt_dist = ndimage.distance_transform_edt(~gt_b)
    pred_dist = ndimage.distance_transform_edt(~pred_b)
    matched_pred = int((gt_dist[pred_b] <= radius).sum())
    matched_gt = int((pred_dist[gt_b] <= radius).sum())
    return np.array([matched_pred, n_pred, matched_gt, n_gt], dtype=np.int64)


def precision_recall_from_counts(counts: np.ndarray) -> tuple[float, float]:
    """DAVIS precision and recall, including its rules for empty boundaries."""
    matched_pred, n_pred, matched_gt, n_gt = (float(c) for c in counts)
    if n_pred == 0 and n_gt > 0:
        return 1.0, 0.0
    if n_pred > 0 and n_gt == 0:
        return 0.0, 1.0
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0
    return matched_pred / n_pred, matched_gt / n_gt


def f_from_counts(counts: np.ndarray) -> float:
    precision, recall = precision_recall_from_counts(counts)
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def f_measure(pred_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = DEFAULT_BOUND_TH) -> float:
    """DAVIS F for one binary mask pair."""
    return f_from_counts(boundary_counts(pred_mask, gt_mask, tolerance_radius(np.shape(gt_mask), bound_th)))


def class_boundary_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    bound_th: float = DEFAULT_BOUND_TH,
    ignore_index: int = 255,
    background_index: int | None = 0,
) -> np.ndarray:
    """(K, 4) boundary counts of every class for one label map pair: what `boundary_counts`
    gives for each binary pair (pred == k, gt == k), computed for all classes at once.

    Void (255) in either map counts as background (icam §4.1); in a dataset without a
    background class it belongs to no class (its neighbours still see a change of label).

    All classes at once: a pixel's boundary classes are a bit set (`class_boundary_bits`).
    Dilating every class's boundary by the disk of radius r is one OR over the disk's
    offsets of the shifted bit sets (`dilate_bits`), so the matched counts are bit counts of
    `pred_bits & dilate(gt_bits)` and `gt_bits & dilate(pred_bits)`. The same integers as the
    per-class distance transforms (`boundary_counts` per class, the tests' reference), at a
    fraction of the cost for many classes.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if background_index is not None:
        pred = np.where(pred == ignore_index, background_index, pred)
        gt = np.where(gt == ignore_index, background_index, gt)
    radius = tolerance_radius(gt.shape, bound_th)
    pred_bits = class_boundary_bits(pred, num_classes)
    gt_bits = class_boundary_bits(gt, num_classes)
    counts = np.zeros((num_classes, 4), dtype=np.int64)
    counts[:, 1] = count_bits(pred_bits, num_classes)
    counts[:, 3] = count_bits(gt_bits, num_classes)
    counts[:, 0] = count_bits(matched_bits(pred_bits, gt_bits, radius), num_classes)
    counts[:, 2] = count_bits(matched_bits(gt_bits, pred_bits, radius), num_classes)
    return counts


def _bit_dtype(num_classes: int):
    bits = min(64, num_classes)
    return np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.uint64


def class_boundary_bits(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(W, H, w) bit sets, W = ceil(K / 64) words of up to 64 bits: bit k of a pixel is set
    when the pixel is on the `seg2bmap` boundary of the mask (label == k).

    A pixel p is on class k's boundary by a neighbour rule (east, south, south-east) exactly
    when p and that neighbour carry different labels and one of the two is k. So each rule
    whose two labels differ sets the bits of both labels at p. The edge rules of `seg2bmap`
    (last row: east only; last column: south only; bottom-right: never) never reach beyond
    the image, so no outside label is needed. Labels outside 0..K-1 set no bit."""
    lab = np.asarray(label)
    h, w = lab.shape
    dtype = _bit_dtype(num_classes)
    words = max(1, -(-num_classes // 64))
    # Per word, each label's bit (0 for labels outside this word or outside 0..K-1).
    table = np.zeros((words, 256 if lab.dtype == np.uint8 else int(lab.max(initial=0)) + 1), dtype=dtype)
    for k in range(min(num_classes, table.shape[1])):
        table[k // 64, k] = dtype(1) << dtype(k % 64)
    safe = lab if lab.dtype == np.uint8 else np.clip(lab, 0, table.shape[1] - 1)
    out = np.zeros((words, h, w), dtype=dtype)
    rules = [
        ((slice(0, h - 1), slice(0, w - 1)), (slice(0, h - 1), slice(1, w))),  # east, rows above the last
        ((slice(0, h - 1), slice(0, w - 1)), (slice(1, h), slice(0, w - 1))),  # south, columns left of the last
        ((slice(0, h - 1), slice(0, w - 1)), (slice(1, h), slice(1, w))),  # south-east
        ((slice(h - 1, h), slice(0, w - 1)), (slice(h - 1, h), slice(1, w))),  # last row: east
        ((slice(0, h - 1), slice(w - 1, w)), (slice(1, h), slice(w - 1, w))),  # last column: south
    ]
    for word in range(words):
        bit = table[word][safe]
        if lab.dtype != np.uint8:
            bit[(lab < 0) | (lab >= num_classes)] = 0
        plane = out[word]
        for here, there in rules:
            differs = lab[here] != lab[there]
            plane[here] |= (bit[here] | bit[there]) * differs
    return out


def disk_offsets(radius: int) -> np.ndarray:
    """(n, 2) integer (dy, dx) with dy^2 + dx^2 <= r^2."""
    r = int(radius)
    dy, dx = np.nonzero(disk(r))
    return np.stack([dy - r, dx - r], axis=1)


def matched_bits(bits: np.ndarray, other: np.ndarray, radius: int) -> np.ndarray:
    """`bits & dilate(other, disk(r))`: the boundary bits of `bits` with a boundary pixel of
    the same class in `other` within distance r.

    Read only where `bits` has a boundary pixel (a few per cent of the image): OR `other`
    over the disk's offsets at those pixels, or, when that would cost more than dilating the
    whole map, dilate it (`dilate_bits`). The two give the same bits."""
    r = int(radius)
    _, h, w = bits.shape
    where = np.nonzero(bits.any(axis=0))
    offsets = disk_offsets(r)
    if len(where[0]) * len(offsets) > 3 * (r + 1) * h * w:
        return bits & dilate_bits(other, r)
    padded = np.pad(other, ((0, 0), (r, r), (r, r)))
    ys, xs = where[0] + r, where[1] + r
    found = np.zeros((bits.shape[0], len(ys)), dtype=bits.dtype)
    for dy, dx in offsets:
        found |= padded[:, ys + dy, xs + dx]
    out = np.zeros_like(bits)
    out[:, where[0], where[1]] = bits[:, where[0], where[1]] & found
    return out


def dilate_bits(bits: np.ndarray, radius: int) -> np.ndarray:
    """OR of `bits` (W, H, w) over the disk x^2 + y^2 <= r^2: for each row offset dy, the
    horizontal dilation by floor(sqrt(r^2 - dy^2)), shifted by dy (pixels beyond the image
    contribute nothing)."""
    r = int(radius)
    _, h, w = bits.shape
    horizontal = [bits]
    for dx in range(1, r + 1):
        grown = horizontal[-1].copy()
        if dx < w:
            grown[:, :, dx:] |= bits[:, :, : w - dx]
            grown[:, :, : w - dx] |= bits[:, :, dx:]
        horizontal.append(grown)
    out = np.zeros_like(bits)
    for dy in range(-r, r + 1):
        if abs(dy) >= h:
            continue
        source = horizontal[math.isqrt(r * r - dy * dy)]
        if dy >= 0:
            out[:, dy:, :] |= source[:, : h - dy, :]
        else:
            out[:, : h + dy, :] |= source[:, -dy:, :]
    return out


def count_bits(bits: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) how many pixels have bit k set, from (W, H, w) bit sets."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for word in range(bits.shape[0]):
        values = bits[word][bits[word] != 0]
        if values.size == 0:
            continue
        # Little-endian bytes of each uint64, bits unpacked low first: column j is bit j.
        size = values.dtype.itemsize
        unpacked = np.unpackbits(values.astype(f"<u{size}").view(np.uint8).reshape(-1, size), axis=1,
                                 bitorder="little")
        column = unpacked.sum(axis=0)
        k = min(unpacked.shape[1], num_classes - 64 * word)
        counts[64 * word : 64 * word + k] = column[:k]
    return counts


def per_class_f(counts: np.ndarray) -> np.ndarray:
    """F per class from (K, 4) dataset-summed counts."""
    return np.array([f_from_counts(c) for c in counts], dtype=np.float64)
