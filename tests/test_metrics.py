"""Metrics against independent references: per-class boolean loops for J, a pixel-rule
boundary and brute-force distance matching for contour F, hand-computed cases, and the
DAVIS empty-boundary rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from weakseg.metrics import boundary_iou, cam_sweep, confusion, contour
from weakseg.metrics.evaluator import SegEvaluator

# ----------------------------------------------------------------------------- references


def ref_iou(preds, gts, num_classes):
    """Per-class IoU by boolean masks summed over images; pred 255 is a miss, GT 255 ignored."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        valid = gt != 255
        for k in range(num_classes):
            p = (pred == k) & valid
            g = (gt == k) & valid
            inter[k] += np.logical_and(p, g).sum()
            union[k] += np.logical_or(p, g).sum()
    return np.array([inter[k] / union[k] if union[k] else np.nan for k in range(num_classes)])


def ref_boundary(mask):
    """Boundary by the neighbour rule written pixel by pixel (outside the image = 0)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape

    def at(i, j):
        return m[i, j] if (i < h and j < w) else False

    out = np.zeros_like(m)
    for i in range(h):
        for j in range(w):
            if i == h - 1 and j == w - 1:
                continue
            if i == h - 1:
                out[i, j] = m[i, j] != at(i, j + 1)
            elif j == w - 1:
                out[i, j] = m[i, j] != at(i + 1, j)
            else:
                out[i, j] = (m[i, j] != at(i, j + 1)) or (m[i, j] != at(i + 1, j)) or (m[i, j] != at(i + 1, j + 1))
    return out


def ref_boundary_fast(mask):
    """Same rule, vectorised differently (padding instead of overwrites), for big masks."""
    m = np.pad(np.asarray(mask, dtype=bool), ((0, 1), (0, 1)))
    core = m[:-1, :-1]
    east, south, se = m[:-1, 1:], m[1:, :-1], m[1:, 1:]
    b = (core != east) | (core != south) | (core != se)
    b[-1, :] = core[-1, :] != east[-1, :]
    b[:, -1] = core[:, -1] != south[:, -1]
    b[-1, -1] = False
    return b


def ref_counts(pred_mask, gt_mask, radius, boundary=ref_boundary_fast):
    pb = np.argwhere(boundary(pred_mask))
    gb = np.argwhere(boundary(gt_mask))
    if len(pb) == 0 or len(gb) == 0:
        return np.array([0, len(pb), 0, len(gb)])
    # matched: nearest boundary pixel of the other mask within Euclidean distance r
    d_pred, _ = cKDTree(gb).query(pb)
    d_gt, _ = cKDTree(pb).query(gb)
    eps = 1e-9
    return np.array([(d_pred <= radius + eps).sum(), len(pb), (d_gt <= radius + eps).sum(), len(gb)])


def ref_f(counts):
    mp, npred, mg, ngt = counts
    if npred == 0 and ngt == 0:
        return 1.0
    if npred == 0 or ngt == 0:
        return 0.0  # P=1,R=0 or P=0,R=1
    p, r = mp / npred, mg / ngt
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


# ----------------------------------------------------------------------------- J


def test_confusion_matrix_hand_case():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [255, 2, 2]])
    cm = confusion.confusion_matrix(pred, gt, 3)
    expected = np.zeros((3, 4), dtype=int)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 1
    expected[1, 3] = 1  # predicted 255: a miss
    expected[2, 2] = 1
    np.testing.assert_array_equal(cm, expected)
    iou = confusion.per_class_iou(cm)
    # class 0: TP1 / (GT2 + P1 - 1) = 1/2; class 1: 1 / (2 + 2 - 1) = 1/3; class 2: 1/1
    np.testing.assert_allclose(iou, [1 / 2, 1 / 3, 1.0])
    np.testing.assert_allclose(confusion.per_class_precision(cm), [1.0, 0.5, 1.0])
    np.testing.assert_allclose(confusion.per_class_recall(cm), [0.5, 0.5, 1.0])


def test_absent_class_is_nan_and_left_out_of_mean():
    gt = np.array([[0, 1]])
    cm = confusion.confusion_matrix(gt, gt, 4)
    iou = confusion.per_class_iou(cm)
    assert iou[0] == 1 and iou[1] == 1 and np.isnan(iou[2]) and np.isnan(iou[3])
    assert confusion.mean_iou(cm) == 1.0


def test_out_of_range_prediction_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion.confusion_matrix(np.array([[7]]), np.array([[0]]), 3)


def test_iou_matches_boolean_reference_random():
    rng = np.random.default_rng(0)
    k = 6
    preds, gts = [], []
    for _ in range(5):
        gt = rng.integers(0, k, (40, 50))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, k, (40, 50))
        pred[rng.random(pred.shape) < 0.05] = 255
        preds.append(pred)
        gts.append(gt)
    cm = sum(confusion.confusion_matrix(p, g, k) for p, g in zip(preds, gts))
    np.testing.assert_allclose(confusion.per_class_iou(cm), ref_iou(preds, gts, k), atol=1e-12)


# ----------------------------------------------------------------------------- contour F


def test_seg2bmap_matches_pixel_rule_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = rng.integers(1, 12, size=2)
        mask = rng.random((h, w)) < 0.5
        np.testing.assert_array_equal(contour.seg2bmap(mask), ref_boundary(mask))
        np.testing.assert_array_equal(ref_boundary_fast(mask), ref_boundary(mask))


def test_full_and_empty_masks_have_no_boundary():
    assert not contour.seg2bmap(np.ones((7, 9), bool)).any()
    assert not contour.seg2bmap(np.zeros((7, 9), bool)).any()


def test_tolerance_radius_values():
    # ceil(0.008 * diagonal): VOC 500x375 has diagonal 625 exactly -> 5; NYU 640x480 -> 6.4 -> 7
    assert contour.tolerance_radius((375, 500)) == 5
    assert contour.tolerance_radius((480, 640)) == 7
    assert contour.tolerance_radius((100, 100)) == 2
    assert contour.tolerance_radius((10, 10), bound_th=3) == 3


def test_disk_is_euclidean():
    d = contour.disk(2)
    assert d.shape == (5, 5) and d.sum() == 13  # 1 + 4 + 4 + 4 lattice points with x^2+y^2 <= 4


def test_gt_vs_gt_is_one():
    gt = np.zeros((60, 80), dtype=np.uint8)
    gt[10:40, 20:60] = 1
    gt[30:50, 5:25] = 2
    ev = SegEvaluator(["bg", "a", "b"])
    ev.add(gt, gt)
    s = ev.summary()
    assert s["miou"] == 1.0 and s["contour_f"] == 1.0 and s["jf"] == 1.0 and s["boundary_iou"] == 1.0


def test_known_shift_hand_computed():
    """100x100 image -> radius ceil(0.008 * 141.42) = 2. GT: left half (columns 0..49), so its
    boundary is column 49 (100 pixels). A shift of the whole edge by <= 2 columns is fully
    matched (F = 1), by 3 not at all (F = 0)."""
    gt = np.zeros((100, 100), dtype=bool)
    gt[:, :50] = True
    for shift, expected in [(1, 1.0), (2, 1.0), (3, 0.0), (-3, 0.0)]:
        pred = np.zeros_like(gt)
        pred[:, : 50 + shift] = True
        assert contour.f_measure(pred, gt) == expected, shift


def test_partial_shift_hand_computed():
    """Prediction = GT's left half on rows 0..49, shifted right by 3 on rows 50..99.
    Prediction boundary: column 49 on rows 0..49 (50 px), the step (49, 50..52) (3 px), column 52
    on rows 50..99 (50 px) = 103. Matched within r=2 of GT column 49: the 50 upper pixels and
    (49,50), (49,51) -> 52. GT boundary (100 px) matched within r=2 of the prediction boundary:
    rows 0..51 (row 50 via (49,50) at sqrt 2, row 51 via (49,49) at 2) -> 52."""
    gt = np.zeros((100, 100), dtype=bool)
    gt[:, :50] = True
    pred = np.zeros_like(gt)
    pred[:50, :50] = True
    pred[50:, :53] = True
    counts = contour.boundary_counts(pred, gt, contour.tolerance_radius(gt.shape))
    np.testing.assert_array_equal(counts, [52, 103, 52, 100])
    p, r = 52 / 103, 52 / 100
    assert contour.f_measure(pred, gt) == pytest.approx(2 * p * r / (p + r), abs=1e-15)


def test_davis_empty_cases():
    empty = np.zeros((20, 20), bool)
    square = np.zeros((20, 20), bool)
    square[5:10, 5:10] = True
    assert contour.precision_recall_from_counts(contour.boundary_counts(empty, square, 1)) == (1.0, 0.0)
    assert contour.precision_recall_from_counts(contour.boundary_counts(square, empty, 1)) == (0.0, 1.0)
    assert contour.precision_recall_from_counts(contour.boundary_counts(empty, empty, 1)) == (1.0, 1.0)
    assert contour.f_measure(empty, square) == 0.0
    assert contour.f_measure(square, empty) == 0.0
    assert contour.f_measure(empty, empty) == 1.0


def test_void_counts_as_background_for_f():
    gt = np.zeros((50, 50), dtype=np.uint8)
    gt[10:30, 10:30] = 1
    gt_with_void = gt.copy()
    gt_with_void[9, 9:31] = 255  # a void rim, as VOC draws around objects
    a = SegEvaluator(["bg", "obj"])
    a.add(gt, gt_with_void)
    b = SegEvaluator(["bg", "obj"])
    b.add(gt, np.where(gt_with_void == 255, 0, gt_with_void))
    assert a.summary()["per_class_f"] == b.summary()["per_class_f"]


def test_f_matches_brute_force_random_blobs():
    rng = np.random.default_rng(2)
    for _ in range(10):
        gt = np.zeros((48, 64), bool)
        pred = np.zeros((48, 64), bool)
        for m in (gt, pred):
            for _ in range(rng.integers(0, 4)):
                y, x = rng.integers(0, 48), rng.integers(0, 64)
                m[y : y + rng.integers(2, 20), x : x + rng.integers(2, 20)] ^= True
        radius = int(rng.integers(1, 5))
        np.testing.assert_array_equal(contour.boundary_counts(pred, gt, radius), ref_counts(pred, gt, radius))


# ----------------------------------------------------------------------------- boundary IoU


def ref_band(mask, width):
    """Pixels of the mask with a non-mask pixel (outside counts as non-mask) within
    chessboard distance `width`, by an explicit scan of all offsets."""
    m = np.asarray(mask, bool)
    padded = np.pad(m, width, constant_values=False)
    h, w = m.shape
    all_in = np.ones_like(m)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            all_in &= padded[width + dy : width + dy + h, width + dx : width + dx + w]
    return m & ~all_in


def test_boundary_band_matches_offset_scan():
    rng = np.random.default_rng(3)
    for i in range(20):
        mask = rng.random((30, 40)) < 0.7
        if i >= 10:  # a small blob (the transform runs on its bounding box), some at an edge
            y, x = int(rng.integers(-3, 25)), int(rng.integers(-3, 35))
            blob = np.zeros_like(mask)
            blob[max(0, y) : y + 8, max(0, x) : x + 9] = True
            mask &= blob
        width = int(rng.integers(1, 4))
        np.testing.assert_array_equal(boundary_iou.inner_boundary(mask, width), ref_band(mask, width))


def test_boundary_iou_hand_case():
    # 50x50 -> width max(1, round(0.02 * 70.7)) = 1. GT square 10..29 (20x20): band = 76 px.
    gt = np.zeros((50, 50), np.uint8)
    gt[10:30, 10:30] = 1
    pred = np.zeros_like(gt)
    pred[10:30, 11:31] = 1  # shifted right by one column
    counts = boundary_iou.class_boundary_iou_counts(pred, gt, 2)
    gt_band = ref_band(gt == 1, 1)
    pred_band = ref_band(pred == 1, 1)
    assert gt_band.sum() == 76
    assert counts[1, 0] == (gt_band & pred_band).sum()
    assert counts[1, 1] == (gt_band | pred_band).sum()


# ----------------------------------------------------------------------------- CAM sweep


def test_threshold_sweep_matches_per_threshold_loop():
    rng = np.random.default_rng(4)
    k = 5
    thresholds = np.round(np.arange(0.0, 1.0, 0.05), 2)
    sweep = cam_sweep.ThresholdSweep(k, 0, thresholds)
    data = []
    for _ in range(6):
        ids = sorted(rng.choice(np.arange(1, k), size=rng.integers(0, 3), replace=False).tolist())
        cams = rng.random((len(ids), 20, 30)).astype(np.float32)
        cams[:, :2] = 0.35  # exact ties with a grid threshold
        gt = rng.integers(0, k, (20, 30))
        gt[0, :5] = 255
        sweep.add(cams, ids, gt)
        data.append((cams, ids, gt))
    for j, t in enumerate(thresholds):
        cm = sum(confusion.confusion_matrix(cam_sweep.cam_to_label(c, i, t), g, k) for c, i, g in data)
        np.testing.assert_array_equal(sweep.cms[j], cm, err_msg=f"threshold {t}")
    best_t, best_j = sweep.best()
    assert best_j == pytest.approx(max(sweep.mious()))


def test_cam_to_label_background_on_ties():
    cams = np.array([[[0.5, 0.6]]], dtype=np.float32)
    np.testing.assert_array_equal(cam_sweep.cam_to_label(cams, [3], 0.5), [[0, 3]])


# ----------------------------------------------------------------------------- real masks


def _perturb(gt, rng):
    """Shift, erode at random, flip a block's class: realistic segmentation errors."""
    pred = np.roll(gt, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1)).copy()
    pred[pred == 255] = 0
    h, w = pred.shape
    y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
    pred[y : y + 40, x : x + 40] = rng.integers(0, 21)
    return pred.astype(np.uint8)


def test_real_voc_masks_against_reference(voc_root):
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:25]
    rng = np.random.default_rng(5)
    ev = SegEvaluator([str(i) for i in range(21)])
    preds, gts = [], []
    ref_contour = np.zeros((21, 4))
    for image_id in ids:
        gt = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png"))
        pred = _perturb(gt, rng)
        ev.add(pred, gt)
        preds.append(pred)
        gts.append(gt)
        radius = math.ceil(0.008 * math.hypot(*gt.shape))
        g0 = np.where(gt == 255, 0, gt)
        for k in range(21):
            ref_contour[k] += ref_counts(pred == k, g0 == k, radius)
    s = ev.summary()
    iou = ref_iou(preds, gts, 21)
    assert s["miou"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    present = ~np.isnan(iou)
    ref_f_per_class = np.array([ref_f(c) for c in ref_contour])
    assert s["contour_f"] == pytest.approx(np.mean(ref_f_per_class[1:][present[1:]]), abs=1e-6)
    assert 0.2 < s["miou"] < 0.95 and 0.05 < s["contour_f"] < 0.95  # the perturbation really hurt


def test_real_voc_gt_as_prediction_is_perfect(voc_root):
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:40]
    ev = SegEvaluator([str(i) for i in range(21)])
    for image_id in ids:
        gt = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png"))
        ev.add(gt, gt)
    s = ev.summary()
    assert s["miou"] == 1.0 and s["contour_f"] == 1.0 and s["boundary_iou"] == 1.0


# --- all classes at once vs one class at a time -----------------------------------------


def contour_counts_by_class(pred, gt, num_classes, bound_th, ignore_index, background_index):
    """Reference: one class at a time, with the per-mask distance transforms."""
    if background_index is not None:
        pred = np.where(pred == ignore_index, background_index, pred)
        gt = np.where(gt == ignore_index, background_index, gt)
    radius = contour.tolerance_radius(gt.shape, bound_th)
    counts = np.zeros((num_classes, 4), dtype=np.int64)
    for k in range(num_classes):
        counts[k] = contour.boundary_counts(pred == k, gt == k, radius)
    return counts


def boundary_iou_counts_by_class(pred, gt, num_classes, ratio, ignore_index=255):
    """Reference: one class at a time, with the per-mask distance-transform bands."""
    width = boundary_iou.band_width(gt.shape, ratio)
    valid = gt != ignore_index
    counts = np.zeros((num_classes, 2), dtype=np.int64)
    for k in range(num_classes):
        g = boundary_iou.inner_boundary(gt == k, width) & valid
        p = boundary_iou.inner_boundary(pred == k, width) & valid
        counts[k] = [(g & p).sum(), (g | p).sum()]
    return counts


def _blocky_pair(rng, h, w, k, block=4):
    base = rng.integers(0, k, size=(h // block + 1, w // block + 1))
    lab = np.kron(base, np.ones((block, block), int))[:h, :w]
    pred, gt = lab.copy(), np.roll(lab, 1 + int(rng.integers(0, 3)), axis=int(rng.integers(0, 2)))
    pred[rng.random((h, w)) < 0.05] = 255
    gt[rng.random((h, w)) < 0.05] = 255
    pred[rng.random((h, w)) < 0.02] = 250  # an id beyond every class count used here
    return pred.astype(np.uint8), gt.astype(np.uint8)


@pytest.mark.parametrize("num_classes", [2, 9, 21, 70, 130])
def test_contour_counts_of_all_classes_equal_the_per_class_distance_transforms(num_classes):
    rng = np.random.default_rng(num_classes)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 48, size=2))
        pred, gt = _blocky_pair(rng, h, w, num_classes)
        th = float(rng.choice([0.008, 0.05, 0.3, 4]))
        background = None if trial % 3 == 0 else 0
        fast = contour.class_boundary_counts(pred, gt, num_classes, th, 255, background)
        slow = contour_counts_by_class(pred, gt, num_classes, th, 255, background)
        np.testing.assert_array_equal(fast, slow)


def test_sparse_and_dense_matching_give_the_same_bits():
    rng = np.random.default_rng(3)
    pred, gt = _blocky_pair(rng, 60, 50, 21, block=2)  # boundaries almost everywhere
    bits_p, bits_g = contour.class_boundary_bits(pred, 21), contour.class_boundary_bits(gt, 21)
    for radius in (0, 1, 3, 7):
        dense = bits_p & contour.dilate_bits(bits_g, radius)
        np.testing.assert_array_equal(contour.matched_bits(bits_p, bits_g, radius), dense)
        # Brute force: bit k at p iff some pixel of gt's class-k boundary lies within r.
        for k in (0, 5):
            ys, xs = np.nonzero((bits_g[0] >> np.uint32(k)) & 1)
            py, px = np.nonzero((bits_p[0] >> np.uint32(k)) & 1)
            near = ((py[:, None] - ys[None]) ** 2 + (px[:, None] - xs[None]) ** 2 <= radius * radius).any(axis=1)
            np.testing.assert_array_equal((dense[0][py, px] >> np.uint32(k)) & 1, near.astype(np.uint32))


@pytest.mark.parametrize("num_classes", [2, 21, 130])
def test_boundary_iou_of_all_classes_equals_the_per_class_bands(num_classes):
    rng = np.random.default_rng(10 + num_classes)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 64, size=2))
        pred, gt = _blocky_pair(rng, h, w, num_classes, block=6)
        ratio = float(rng.choice([0.001, 0.02, 0.05, 0.3]))
        fast = boundary_iou.class_boundary_iou_counts(pred, gt, num_classes, ratio)
        slow = boundary_iou_counts_by_class(pred, gt, num_classes, ratio)
        np.testing.assert_array_equal(fast, slow)


def test_parallel_eval_equals_one_process(tmp_path):
    from weakseg.data.io import write_label_png
    from weakseg.steps import evaluate

    rng = np.random.default_rng(0)
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for i in range(20):
        pred, gt = _blocky_pair(rng, 40, 50, 6)
        pred[pred == 250] = 3
        write_label_png(tmp_path / "p" / f"{i}.png", pred)
        write_label_png(tmp_path / "g" / f"{i}.png", gt)
    one = evaluate.run(tmp_path / "p", tmp_path / "g", workers=1)
    two = evaluate.run(tmp_path / "p", tmp_path / "g", workers=2)
    assert one == two and one["num_images"] == 20
