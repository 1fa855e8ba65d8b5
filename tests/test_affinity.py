"""AffinityNet and the random walk (psa = Ahn & Kwak, CVPR 2018): affinity labels and pair
labels against hand counts and brute force, the loss by hand, the transition matrix against a
looped construction from psa eq. 8-9, what the walk conserves, the walk on a hand-made two-region
scene, and a few training steps on synthetic images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from weakseg.data import build_dataset
from weakseg.data.transforms import AugmentConfig
from weakseg.models.backbones.norm import InputNorm
from weakseg.refine.affinity import (
    AFFINITY_ALPHA_PRESETS,
    PAIR_BG_POS,
    PAIR_FG_POS,
    PAIR_IGNORE,
    PAIR_NEG,
    AffinityNet,
    RandomWalk,
    affinity_labels,
    affinity_loss,
    affinity_loss_parts,
    class_map,
    pair_affinities,
    pair_labels,
    pair_offsets,
    pair_region,
    random_walk,
    transition_matrix,
)
from weakseg.refine.base import cams_to_probs

# ----------------------------------------------------------------------------- pair labels


def test_offsets_are_psa_half_window():
    assert pair_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]  # the 8-neighbourhood, halved
    assert len(pair_offsets(5)) == 34  # psa's search_dst at radius 5
    # every unordered pair with 0 < d^2 < r^2 exactly once
    full = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 16}
    half = pair_offsets(4)
    assert len(half) == len(set(half)) == len(full) // 2
    assert {o for dy, dx in half for o in ((dy, dx), (-dy, -dx))} == full


def test_pair_labels_counted_by_hand():
    # a b c     0 0 1      8-neighbour pairs (radius 2): 4 horizontal, 3 vertical, 4 diagonal.
    # d e f  =  0 1 1      bg-pos: a-b a-d b-d; fg-pos: e-f c-f c-e;
    #                      neg: b-c d-e b-e a-e b-f
    codes = pair_labels(np.array([[0, 0, 1], [0, 1, 1]], dtype=np.uint8), radius=2, pairs="all")
    assert codes.shape == (4, 2, 3)
    assert (codes == PAIR_BG_POS).sum() == 3
    assert (codes == PAIR_FG_POS).sum() == 3
    assert (codes == PAIR_NEG).sum() == 5
    assert (codes == PAIR_IGNORE).sum() == 4 * 6 - 11  # pairs whose partner is off the grid


def brute_force_pairs(label, radius):
    """Every unordered pixel pair within the radius, classified from the definition."""
    h, w = label.shape
    result = {}
    for i in range(h * w):
        for j in range(i + 1, h * w):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            if not 0 < (yi - yj) ** 2 + (xi - xj) ** 2 < radius**2:
                continue
            li, lj = int(label[yi, xi]), int(label[yj, xj])
            if li == 255 or lj == 255:
                kind = PAIR_IGNORE
            elif li != lj:
                kind = PAIR_NEG
            else:
                kind = PAIR_BG_POS if li == 0 else PAIR_FG_POS
            result[(i, j)] = kind
    return result


def test_pair_labels_equal_brute_force_with_ignored_pixels():
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 255, 2, 2], [0, 0, 2, 255]], dtype=np.uint8)
    radius = 3
    codes = pair_labels(label, radius, pairs="all")
    ours = {}
    h, w = label.shape
    for p, (dy, dx) in enumerate(pair_offsets(radius)):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + x + dx
                    ours[(min(i, j), max(i, j))] = int(codes[p, y, x])
                else:
                    assert codes[p, y, x] == PAIR_IGNORE
    assert ours == brute_force_pairs(label, radius)
    counts = {k: sum(v == k for v in ours.values()) for k in (PAIR_BG_POS, PAIR_FG_POS, PAIR_NEG)}
    assert all(c > 0 for c in counts.values()), counts  # the map exercises every kind


# ----------------------------------------------------------------------------- affinity labels


def test_alpha_presets_are_low_then_high():
    assert AFFINITY_ALPHA_PRESETS == {"seam": (4, 24), "hfpl": (1, 24), "icam": (2, 4)}
    assert all(low < high for low, high in AFFINITY_ALPHA_PRESETS.values())


def test_affinity_labels_hand_made_cam():
    # One class, alphas (2, 4) (icam). Peak m -> low-alpha bg (1-m)^2, high-alpha bg (1-m)^4:
    #  m=0.9: 0.01 / 1e-4  -> class 1 in both          -> 1
    #  m=0.5: 0.25 / 0.0625 -> class 1 in both         -> 1
    #  m=0.3: 0.49 > 0.3 bg / 0.2401 < 0.3 class       -> 255 (confident in neither)
    #  m=0.1: 0.81 bg / 0.6561 bg                      -> 0
    #  m=0.0: bg in both                               -> 0
    cam = np.array([[0.9, 0.5, 0.3, 0.1, 0.0]], dtype=np.float32)[None]
    label = affinity_labels(cam, None, 2, 4)
    np.testing.assert_array_equal(label, [[1, 1, 255, 0, 0]])
    # Two classes: the channel index of the winner, 1-based.
    cams = np.stack([np.full((1, 2), 0.6), np.array([[0.8, 0.1]])]).astype(np.float32)
    np.testing.assert_array_equal(affinity_labels(cams, None, 4, 24), [[2, 1]])
    # No class present: confident background everywhere.
    np.testing.assert_array_equal(affinity_labels(np.zeros((0, 2, 2), np.float32), None, 4, 24), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="alpha_low"):
        affinity_labels(cam, None, 24, 4)


def test_affinity_labels_crf_hook_order_and_background_precedence():
    cams = np.array([[[0.9, 0.9, 0.9, 0.9]]], dtype=np.float32)
    image = np.zeros((1, 4, 3), np.uint8)
    seen = []
    class_everywhere = np.stack([np.zeros((1, 4)), np.ones((1, 4))]).astype(np.float32)
    bg_left = np.stack([np.array([[1.0, 1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0, 1.0]])]).astype(np.float32)

    def fake_crf(probs, img):
        seen.append(probs.copy())
        return class_everywhere if len(seen) == 1 else bg_left

    label = affinity_labels(cams, image, 4, 24, crf=fake_crf)
    np.testing.assert_allclose(seen[0], cams_to_probs(cams, 4))
    np.testing.assert_allclose(seen[1], cams_to_probs(cams, 24))
    # low-alpha CRF says class 1 everywhere, high-alpha CRF says background on the left:
    # the confident-background rule wins (psa applies it last).
    np.testing.assert_array_equal(label, [[0, 0, 1, 1]])


# ----------------------------------------------------------------------------- loss


def test_loss_by_hand():
    aff = torch.tensor([0.5, 0.25, 0.8, 0.9, 0.6, 0.1], dtype=torch.float64).view(1, 6, 1, 1)
    codes = torch.tensor([PAIR_BG_POS, PAIR_BG_POS, PAIR_FG_POS, PAIR_NEG, PAIR_NEG, PAIR_IGNORE]).view(1, 6, 1, 1)
    eps = 1e-5
    bg = (-math.log(0.5 + eps) - math.log(0.25 + eps)) / (2 + eps)
    fg = -math.log(0.8 + eps) / (1 + eps)
    neg = (-math.log(1 + eps - 0.9) - math.log(1 + eps - 0.6)) / (2 + eps)
    parts = affinity_loss_parts(aff, codes)
    assert [p.item() for p in parts] == pytest.approx([bg, fg, neg], rel=1e-12)
    assert affinity_loss(aff, codes).item() == pytest.approx(bg / 4 + fg / 4 + neg / 2, rel=1e-12)


def test_pair_affinities_equal_definition():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    aff = pair_affinities(f, radius=3)
    for p, (dy, dx) in enumerate(pair_offsets(3)):
        for y in range(4 - dy):
            for x in range(max(0, -dx), min(6, 6 - dx)):
                expected = torch.exp(-(f[:, :, y, x] - f[:, :, y + dy, x + dx]).abs().mean(dim=1))
                torch.testing.assert_close(aff[:, p, y, x], expected)


def test_loss_lower_for_features_that_agree_with_labels():
    label = np.zeros((8, 8), np.uint8)
    label[2:6, 1:4] = 1
    label[4:8, 5:8] = 2
    label[0, :] = 255
    codes = torch.from_numpy(pair_labels(label, 5, pairs="all"))[None]
    agreeing = 10.0 * F.one_hot(torch.from_numpy(label.astype(np.int64)) % 255, 3).permute(2, 0, 1)[None].double()
    random = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    good = affinity_loss(pair_affinities(agreeing, 5), codes).item()
    bad = affinity_loss(pair_affinities(random, 5), codes).item()
    assert good < 1e-3 < 0.1 < bad


# ----------------------------------------------------------------------------- random walk


def brute_force_transition(f, radius, beta):
    """Dense T from psa eq. 8-9 with a double loop: A_ii = 1, A_ij = exp(-mean|f_i-f_j|)^beta
    within the radius, then every row divided by its sum."""
    d, h, w = f.shape
    n = h * w
    a = torch.zeros(n, n, dtype=f.dtype)
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            d2 = (yi - yj) ** 2 + (xi - xj) ** 2
            if i == j:
                a[i, j] = 1.0
            elif d2 < radius**2:
                a[i, j] = torch.exp(-(f[:, yi, xi] - f[:, yj, xj]).abs().mean()) ** beta
    return a / a.sum(dim=1, keepdim=True)


def test_transition_matrix_equals_brute_force_on_4x5():
    f = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = transition_matrix(f, radius=3, beta=2.0, pairs="all").to_dense()
    ref = brute_force_transition(f, radius=3, beta=2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(20, dtype=torch.float64))  # row-stochastic


def test_random_walk_equals_dense_power_and_conserves():
    """T is row-stochastic (rows sum to 1), so T^t maps the constant map to itself; and with
    D the degrees of A, D T = A is symmetric, so sum_i D_i (T^t v)_i = sum_i D_i v_i."""
    g = torch.Generator().manual_seed(2)
    f = torch.rand(4, 5, 6, generator=g, dtype=torch.float64)
    scores = torch.rand(3, 5, 6, generator=g, dtype=torch.float64)
    log_t, radius, beta = 3, 3, 8.0
    walked = random_walk(scores, f, radius, beta, log_t, pairs="all")
    t_dense = brute_force_transition(f, radius, beta)
    expected = torch.linalg.matrix_power(t_dense, 2**log_t) @ scores.reshape(3, -1).t()
    torch.testing.assert_close(walked.reshape(3, -1).t(), expected, rtol=1e-10, atol=1e-12)
    constant = random_walk(torch.full((1, 5, 6), 0.7, dtype=torch.float64), f, radius, beta, log_t, pairs="all")
    torch.testing.assert_close(constant, torch.full_like(constant, 0.7))
    a = t_dense * 0  # degrees of A from the unnormalised brute-force weights
    n = 30
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, 6), divmod(j, 6)
            if i == j:
                a[i, j] = 1.0
            elif (yi - yj) ** 2 + (xi - xj) ** 2 < radius**2:
                a[i, j] = torch.exp(-(f[:, yi, xi] - f[:, yj, xj]).abs().mean()) ** beta
    degree = a.sum(dim=1)
    torch.testing.assert_close((walked.reshape(3, -1) * degree).sum(dim=1), (scores.reshape(3, -1) * degree).sum(dim=1))
    # the plain pixel sum is *not* conserved by this (averaging) convention
    assert not torch.allclose(walked.sum(dim=(1, 2)), scores.sum(dim=(1, 2)))


def test_random_walk_on_60x60_grid_keeps_distributions():
    g = torch.Generator().manual_seed(3)
    f = torch.rand(16, 60, 60, generator=g)
    probs = torch.softmax(torch.randn(4, 60, 60, generator=g), dim=0)
    walked = random_walk(probs, f, radius=5, beta=8.0, log_t=6)
    torch.testing.assert_close(walked.sum(dim=0), torch.ones(60, 60), rtol=0, atol=1e-4)
    assert walked.min() >= 0
    assert walked.std() < probs.std()  # it smooths


def two_region_scores(height=8, width=8):
    """Left half one object (class 1), right half background. The CAM covers the top half of
    the object at 1 and its bottom half weakly at 0.2; with alpha 2 the bottom half is
    background before the walk (0.64 bg vs 0.2 class)."""
    cams = np.zeros((1, height, width), np.float32)
    cams[0, : height // 2, : width // 2] = 1.0
    cams[0, height // 2 :, : width // 2] = 0.2
    return cams, cams_to_probs(cams, alpha=2)


def test_walk_spreads_the_class_over_its_region_but_not_across_the_edge():
    cams, probs = two_region_scores()
    assert (np.argmax(probs, 0)[4:, :4] == 0).all()  # the bottom of the object starts as background
    features = torch.zeros(2, 8, 8, dtype=torch.float64)
    features[:, :, 4:] = 10.0  # identical within a region, far apart across the edge
    walked = random_walk(torch.from_numpy(probs).double(), features, radius=5, beta=8.0, log_t=6, pairs="all")
    pred = walked.argmax(0).numpy()
    assert (pred[:, :4] == 1).all()  # the whole object
    assert (pred[:, 4:] == 0).all()
    assert walked[1, :, 4:].max() < 1e-12  # no class mass leaks across the edge


class ColourFeatures(torch.nn.Module):
    """Affinity features = mean colour per 4x4 cell, scaled: identical within a flat region.
    RGB in, as every network (it normalises with its own, identity, statistics)."""

    output_stride = 4
    input_norm = InputNorm("unit", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def forward(self, x):
        return 20.0 * F.avg_pool2d(self.input_norm(x), 4)


def test_refiner_on_two_flat_regions():
    h, w = 32, 30  # width not a multiple of the stride: exercises the padding
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :16] = (200, 30, 30)
    image[:, 16:] = (30, 30, 200)
    cams = np.zeros((1, h, w), np.float32)
    cams[0, :16, :16] = 1.0
    cams[0, 16:, :16] = 0.2
    probs = cams_to_probs(cams, alpha=2)
    refiner = RandomWalk(ColourFeatures(), pairs="all")  # an 8x8 grid: psa's pair set is empty there
    assert refiner.name == "affinity_rw"
    refined = refiner(probs, image)
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    pred = refined.argmax(0)
    # Bilinear upsampling from the stride-4 grid blends the two cells at the edge (x = 14..17).
    assert (pred[:, :14] == 1).all()
    assert (pred[:, 18:] == 0).all()
    assert refined[1, :, 18:].max() < 1e-6


# ----------------------------------------------------------------------------- training


def write_fake_cams(dataset, cam_dir):
    """Blurred ground-truth masks as CAMs in infer-cam's format (an ignore band at edges)."""
    from weakseg.steps.infer_cam import save_cams

    for i in range(len(dataset)):
        s = dataset[i]
        cams = [ndimage.uniform_filter((s.mask == c).astype(np.float32), size=5) for c in s.present_class_ids]
        cams = np.stack([c / max(c.max(), 1e-5) for c in cams])
        save_cams(cam_dir / "cams" / f"{s.id}.npz", cams, s.present_class_ids)


def eval_loss(model, dataset, label_maps, radius):
    with torch.no_grad():
        images = torch.from_numpy(np.stack([dataset[i].image for i in range(len(dataset))])).permute(0, 3, 1, 2)
        features = model.eval()(images)
        from weakseg.data.transforms import resize_nearest

        codes = np.stack([pair_labels(resize_nearest(l, *features.shape[-2:]), radius, "all") for l in label_maps])
        return affinity_loss(pair_affinities(features, radius), torch.from_numpy(codes)).item()


def test_label_source_refuses_missing_or_foreign_cams(tmp_path):
    from weakseg.errors import DataError
    from weakseg.steps.infer_cam import save_cams
    from weakseg.train.affinity import AffinityLabels

    dataset = build_dataset({"kind": "synthetic", "num_images": 2, "image_size": 16})
    labels = AffinityLabels(dataset, tmp_path / "infer", tmp_path / "out", 4, 24)
    with pytest.raises(DataError, match="infer-cam"):
        labels(0)
    s = dataset[0]
    wrong = [c + 1 for c in s.present_class_ids]
    save_cams(tmp_path / "infer" / "cams" / f"{s.id}.npz", np.zeros((len(wrong), 16, 16)), wrong)
    with pytest.raises(DataError, match="class_ids"):
        labels(0)
    save_cams(tmp_path / "infer" / "cams" / f"{s.id}.npz", np.zeros((len(wrong), 8, 16)), s.present_class_ids)
    with pytest.raises(DataError, match="CAMs are 8x16"):
        labels(0)


def test_class_map_uses_mask_ids():
    probs = np.array([[[0.6, 0.1, 0.2]], [[0.3, 0.8, 0.1]], [[0.1, 0.1, 0.7]]])
    np.testing.assert_array_equal(class_map(probs), [[0, 1, 2]])
    np.testing.assert_array_equal(class_map(probs, class_ids=[7, 3]), [[0, 7, 3]])


def test_training_lowers_the_loss_and_resumes(tmp_path):
    from weakseg.train.affinity import AffinityTrainConfig, train_affinity

    dataset = build_dataset({"kind": "synthetic", "num_images": 4, "image_size": 32})
    write_fake_cams(dataset, tmp_path / "infer")
    config = AffinityTrainConfig(
        epochs=6, batch_size=4, optimizer="adamw", lr=0.01, device="cpu",
        augment=AugmentConfig(crop_size=None, hflip_prob=0.5),
    )
    pairs = {"radius": 5, "alphas": (2, 4), "pairs": "all"}  # an 8x8 grid: psa's pair set is empty there
    label_maps = []
    for i in range(len(dataset)):
        s = dataset[i]
        with np.load(tmp_path / "infer" / "cams" / f"{s.id}.npz") as d:
            label_maps.append(affinity_labels(d["cams"].astype(np.float32), s.image, 2, 4))
    assert any((lab == 255).any() for lab in label_maps)  # the blur leaves an ignore band
    assert any(((lab > 0) & (lab < 255)).any() for lab in label_maps)

    def fresh():
        torch.manual_seed(0)
        return AffinityNet("tiny_cnn", dim=16, width=8)

    before = eval_loss(fresh(), dataset, label_maps, 5)
    model = train_affinity(fresh(), dataset, tmp_path / "infer", config, tmp_path / "a", **pairs)
    after = eval_loss(model, dataset, label_maps, 5)
    assert after < 0.8 * before, (before, after)
    # cached labels equal the labels computed here
    from weakseg.data.io import read_label_map

    for i, lab in enumerate(label_maps):
        cached = tmp_path / "a" / "labels_low2_high4_argmax" / f"{dataset.ids[i]}.png"
        np.testing.assert_array_equal(read_label_map(cached), lab)

    # Interrupted after epoch 3 (a step of epoch 4 ran, its checkpoint was not written), then resumed.
    class Stop(Exception):
        pass

    def stop_at(step, total):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train_affinity(fresh(), dataset, tmp_path / "infer", config, tmp_path / "b", on_step=stop_at, **pairs)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3
    resumed = train_affinity(fresh(), dataset, tmp_path / "infer", config, tmp_path / "b", **pairs)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    loaded = AffinityNet.from_checkpoint(tmp_path / "a" / "checkpoint.pt")
    image = dataset[0].image
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    probs = cams_to_probs(np.load(tmp_path / "infer" / "cams" / f"{dataset[0].id}.npz")["cams"].astype(np.float32), 6)
    refined = RandomWalk(loaded, log_t=4)(probs, image)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)


def test_label_cache_is_keyed_by_the_crf_settings(tmp_path):
    from weakseg.train.affinity import AffinityLabels

    class FakeCRF:
        name = "crf"

        def __init__(self, strength):
            self.strength = strength

        def __repr__(self):
            return f"FakeCRF({self.strength})"

        def __call__(self, probs, image):
            return probs

    dataset = build_dataset({"kind": "synthetic", "num_images": 1, "image_size": 16})
    dirs = {
        AffinityLabels(dataset, tmp_path, tmp_path, 4, 24, crf).cache_dir
        for crf in (None, FakeCRF(1), FakeCRF(2), FakeCRF(1))
    }
    assert len(dirs) == 3
    assert len({AffinityLabels(dataset, tmp_path, tmp_path, *a).cache_dir for a in ((4, 24), (1, 24))}) == 2


def test_affinity_labels_with_the_dense_crf_follow_the_colour_edge():
    pytest.importorskip("pydensecrf")
    from weakseg.refine.crf import DenseCRF

    image = np.zeros((20, 20, 3), np.uint8)
    image[:, 10:] = 200
    cam = np.zeros((1, 20, 20), np.float32)
    cam[0, :, 10:] = 0.8
    cam[0, :, 8:10] = 0.3  # spills two columns over the edge
    plain = affinity_labels(cam, image, 4, 24)
    assert (plain[:, 8:10] == 1).all()  # (1-0.3)^4 = 0.24 < 0.3: the spill counts as object
    with_crf = affinity_labels(cam, image, 4, 24, crf=DenseCRF("psa"))
    expected = np.zeros((20, 20), np.uint8)
    expected[:, 10:] = 1
    np.testing.assert_array_equal(with_crf, expected)


# ----------------------------------------------------------------------------- psa's pair set

OFFICIAL = Path(__file__).parent / "fixtures" / "official"


def test_psa_pair_set_counts_and_region():
    """psa's get_indices_of_pairs: first pixels in the grid minus the bottom r-1 rows and the
    left/right r-1 columns, each with all its 34 offsets (radius 5)."""
    fixture = json.loads((OFFICIAL / "psa_random_walk.json").read_text())
    codes = pair_labels(np.zeros((56, 56), np.uint8), 5)  # all background: every existing pair is bg-pos
    assert int((codes == PAIR_BG_POS).sum()) == fixture["pairs_56x56_radius5"] == 84864
    assert int((pair_labels(np.zeros((56, 56), np.uint8), 5, pairs="all") == PAIR_BG_POS).sum()) == 99128
    region = pair_region(7, 12, 3)
    expected = np.zeros((7, 12), bool)
    expected[:5, 2:10] = True  # rows 0..h-r, columns r-1..w-r (r - 1 = 2)
    np.testing.assert_array_equal(region, expected)


def test_walk_equals_psa_official_walk():
    """psa's own walk (jiwoon-ahn/psa 9493e59, run outside this repository; fixture holds its
    output) on seeded features and CAMs, float64."""
    fx = json.loads((OFFICIAL / "psa_random_walk.json").read_text())
    g = torch.Generator().manual_seed(fx["seed"])
    features = torch.rand(1, fx["d"], fx["h"], fx["w"], generator=g, dtype=torch.float64)[0]
    cams = torch.rand(fx["k"], fx["h"], fx["w"], generator=g, dtype=torch.float64)
    walked = random_walk(cams, features, fx["radius"], fx["beta"], fx["log_t"])
    expected = torch.tensor(fx["walked"], dtype=torch.float64).view(fx["k"], fx["h"], fx["w"])
    torch.testing.assert_close(walked, expected, rtol=0, atol=1e-6)
    all_pairs = random_walk(cams, features, fx["radius"], fx["beta"], fx["log_t"], pairs="all")
    assert (all_pairs - expected).abs().max() > 1e-3  # the pair set matters


def test_an_empty_pair_set_is_one_clear_error():
    from weakseg.errors import ConfigError
    from weakseg.losses.affinity import AffinityTerm

    features = torch.rand(1, 4, 8, 8)
    batch = {"mask": torch.zeros(1, 32, 32, dtype=torch.uint8)}
    with pytest.raises(ConfigError, match="8x8 feature grid has no pairs of the 'psa' set"):
        AffinityTerm(5)({"features": features}, batch, None)
    assert torch.isfinite(AffinityTerm(5, pairs="all")({"features": features}, batch, None))


# ----------------------------------------------------------------------------- walk inputs


def two_region_case():
    """Two flat colour regions; one class whose CAM is weak everywhere in the left region
    (0.3 in its top half, 0.1 in its bottom half) and 0 in the right one. The walk cannot
    cross the colour edge, so it replaces each cell by the degree-weighted mean of its region,
    which the top/bottom mirror symmetry makes the plain mean."""
    h, w = 32, 30
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :16] = (200, 30, 30)
    image[:, 16:] = (30, 30, 200)
    cams = np.zeros((1, h, w), np.float32)
    cams[0, :16, :16] = 0.3
    cams[0, 16:, :16] = 0.1
    return image, cams


@pytest.mark.parametrize("walk_input, class_prob_left", [
    # per-pixel [0.25, cam] / sum first: mean of 0.3/0.55 and 0.1/0.35
    ("probs", 0.5 * (0.3 / 0.55) + 0.5 * (0.1 / 0.35)),
    # psa: raw scores walk: background 0.25, class mean 0.2 -> 0.2 / 0.45
    ("scores", 0.2 / 0.45),
    # IRN: the CAM walks alone to 0.2 everywhere on the left, over its max -> 1, then 0.25
    ("cams", 1.0 / 1.25),
])
def test_walk_inputs_by_hand(walk_input, class_prob_left):
    from weakseg.steps.refine import RefineConfig, WalkConfig, image_probs

    image, cams = two_region_case()
    config = RefineConfig(method="affinity_rw", background="constant", background_constant=0.25,
                          walk=WalkConfig(pairs="all", input=walk_input))
    walker = RandomWalk(ColourFeatures(), pairs="all")
    probs, ids = image_probs(cams, np.array([7]), image, 0, config, walker)
    assert ids.tolist() == [0, 7]
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # Columns 0..13 lie between left cell centres only (bilinear blending starts at 14).
    np.testing.assert_allclose(probs[1, :, :14], class_prob_left, atol=1e-4)
    assert probs[1, :, 18:].max() < 1e-4  # nothing crosses the edge
    # Only IRN's order keeps the weak object: the other two hand it to the background.
    assert ((probs[1, :, :14] > 0.5).all()) == (walk_input == "cams")


def test_walker_reuses_features_of_the_same_image_only():
    calls = []

    class Counting(ColourFeatures):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    image, cams = two_region_case()
    walker = RandomWalk(Counting(), pairs="all")
    first = walker.propagate(cams, image)
    np.testing.assert_array_equal(walker.propagate(cams, image.copy()), first)
    assert len(calls) == 1
    other = image.copy()
    other[:, :16] = (30, 200, 30)
    walker.propagate(cams, other)
    assert len(calls) == 2


def test_walk_input_needs_cam_scores():
    from weakseg.errors import ConfigError
    from weakseg.steps.refine import RefineConfig, WalkConfig

    with pytest.raises(ConfigError, match="refine.walk.input: cams walks the CAMs before the background"):
        RefineConfig(method="affinity_rw", background="model", walk=WalkConfig(input="cams"))
    for walk_input in ("scores", "probs"):
        RefineConfig(method="affinity_rw", background="model", walk=WalkConfig(input=walk_input))
    assert WalkConfig().input == "scores"  # psa's and SEAM's infer_aff.py (docs/fidelity.md)


def test_scores_and_probs_walk_the_same_with_the_network_probabilities():
    from weakseg.steps.refine import RefineConfig, WalkConfig, image_probs

    image, cams = two_region_case()
    model_probs = np.stack([1.0 - cams[0], cams[0]])
    walker = RandomWalk(ColourFeatures(), pairs="all")
    out = [image_probs(cams, np.array([3]), image, 0, RefineConfig(method="affinity_rw", background="model",
                       walk=WalkConfig(pairs="all", input=i)), walker, model_probs)[0] for i in ("scores", "probs")]
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(out[0][1, :, :14], 0.2, atol=1e-4)  # the mean of 0.3 and 0.1
