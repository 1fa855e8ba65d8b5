"""Shape cues (../shared/papers/shape-cues-single-stage.txt): each formula against a loop
written from its definition (eq. 1, 3, 4, 7, 8, the SCM's sampling and the pseudo-mask rule),
SPR at alpha = 1 equal to PAMR inside the training path, and the single-stage run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from weakseg.config import from_mapping
from weakseg.errors import ConfigError
from weakseg.losses.region import (IGNORE, OnlineMaskConfig, OnlineMasks, RegionConfig, RegionTerm,
                                   balanced_pixel_ce, present_class_probs, pseudo_mask, region_loss)
from weakseg.models.factory import ModelConfig, build_model
from weakseg.models.methods import shape_cues as sc
from weakseg.refine.pamr import pamr


# ----------------------------------------------------------------------------- shape cue module


def test_manhattan_neighbourhood_and_sampling():
    pool = sc.manhattan_offsets(7)
    assert len(pool) == 2 * 7 * 8  # |{(dy, dx) != 0 : |dy| + |dx| <= r}| = 2 r (r + 1)
    assert len(sc.manhattan_offsets(1)) == 4
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        picked = sc.sample_offsets(7, 9, g)
        assert len(set(picked)) == 9 and all(0 < abs(a) + abs(b) <= 7 for a, b in picked)
    seen = {o for _ in range(400) for o in sc.sample_offsets(2, 3, g)}
    assert seen == set(sc.manhattan_offsets(2))  # every neighbour can be drawn
    with pytest.raises(ValueError, match="samples"):
        sc.sample_offsets(1, 5)


def _loop_patch_distance(f: np.ndarray, y: int, x: int, dy: int, dx: int, patch: int = 3) -> float:
    c, h, w = f.shape

    def at(i, j):
        return f[:, i, j] if 0 <= i < h and 0 <= j < w else np.zeros(c)

    half = patch // 2
    return float(sum(((at(y + a, x + b) - at(y + a + dy, x + b + dx)) ** 2).sum()
                     for a in range(-half, half + 1) for b in range(-half, half + 1)))


def test_patch_distances_self_information_and_drop_probabilities_match_loops():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 3, 5, 6)).astype(np.float64)
    offsets = [(1, 0), (-2, 3), (0, -1)]
    d = sc.patch_distances(torch.from_numpy(f), offsets).numpy()
    for b in range(2):
        for y in range(5):
            for x in range(6):
                for s, (dy, dx) in enumerate(offsets):
                    assert d[b, s, y, x] == pytest.approx(_loop_patch_distance(f[b], y, x, dy, dx), rel=1e-9)
    h, tau = 1.0, 0.5
    info = sc.self_information(torch.from_numpy(d), h).numpy()
    mean = d.mean()
    for b, y, x in [(0, 0, 0), (1, 4, 5), (0, 2, 3)]:
        kde = np.mean([math.exp(-d[b, s, y, x] / mean / (2 * h * h)) / (math.sqrt(2 * math.pi) * h) for s in range(3)])
        assert info[b, y, x] == pytest.approx(-math.log(kde), rel=1e-9)  # eq. 3
    raw = sc.self_information(torch.from_numpy(d), h, normalise=False).numpy()
    kde = np.mean([math.exp(-d[0, s, 1, 1] / 2) / math.sqrt(2 * math.pi) for s in range(3)])
    assert raw[0, 1, 1] == pytest.approx(-math.log(kde), rel=1e-9)
    r = sc.drop_probabilities(torch.from_numpy(info), tau).numpy()
    for b in range(2):
        e = np.exp(-info[b] / tau)
        np.testing.assert_allclose(r[b], e / e.sum(), rtol=1e-9)  # eq. 4, normalised


def test_drop_mask_draws_from_the_distribution():
    # One position holds all the mass: it is the only one ever dropped, in every channel.
    p = torch.zeros(1, 4, 4)
    p[0, 2, 1] = 1.0
    keep = sc.texture_drop_mask(p, 3, 1.5, torch.Generator().manual_seed(0))
    assert keep.shape == (1, 3, 4, 4)
    assert (keep[:, :, 2, 1] == 0).all() and keep.sum() == 3 * 15
    # Uniform over n positions, D = round(1.5 n) draws with replacement: a position survives
    # with probability (1 - 1/n)^D, independently per channel.
    n, channels = 16, 4000
    keep = sc.texture_drop_mask(torch.full((1, 4, 4), 1.0 / n), channels, 1.5, torch.Generator().manual_seed(1))
    assert keep.mean().item() == pytest.approx((1 - 1 / n) ** 24, abs=0.01)
    assert sc.texture_drop_mask(p, 2, 0.0).min() == 1  # drop_rate 0: nothing dropped


def test_scm_drops_self_similar_texture_more_than_unique_structure():
    """The point of eq. 3-4: a flat (self-similar) region has low self-information and is
    dropped more often than a region whose patches differ from their neighbours."""
    torch.manual_seed(0)
    f = torch.zeros(1, 4, 24, 24)
    f[..., 12:] = torch.randn(1, 4, 24, 12) * 2.0  # right half: unique patches
    module = sc.ShapeCueModule(4, 4).train()
    keep = torch.stack([module.keep_mask(f) for _ in range(20)]).mean(dim=(0, 1, 2))
    assert keep[:, :10].mean() < keep[:, 14:].mean() - 0.2
    module.eval()  # no dropping at inference
    assert torch.equal(module(f), module(f))


# ----------------------------------------------------------------------------- nGWP and the model


def test_ngwp_matches_a_loop():
    s = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    v = sc.ngwp(s, eps=1.0)
    for b in range(2):
        for c in range(4):
            num = den = 0.0
            for y in range(3):
                for x in range(5):
                    e = [math.exp(s[b, k, y, x].item()) for k in range(4)]
                    m = e[c] / sum(e)
                    num += m * s[b, c, y, x].item()
                    den += m
            assert v[b, c].item() == pytest.approx(num / (1.0 + den), rel=1e-12)


def test_model_outputs_constant_background_and_ngwp_logits():
    torch.manual_seed(0)
    model = build_model(from_mapping(ModelConfig, {"method": "shape_cues", "backbone": "tiny_cnn",
                                                   "backbone_args": {"width": 8, "output_stride": 8},
                                                   "method_args": {"aspp_channels": 16, "decoder_channels": 16}},
                                     "model"), 3).eval()
    out = model(torch.rand(2, 3, 32, 32))
    assert out["cams"].shape == (2, 4, 8, 8)  # the stride-4 skip grid, K + 1 channels
    assert torch.equal(out["cams"][:, 0], torch.ones(2, 8, 8))
    torch.testing.assert_close(out["logits"], sc.ngwp(out["cams"])[:, 1:])
    plain = build_model(ModelConfig(method="shape_cues", backbone="tiny_cnn",
                                    method_args={"shape_cues": False, "aspp_channels": 16}), 3)
    assert plain.scm is None
    with pytest.raises(ValueError, match="skip_stage"):
        build_model(ModelConfig(method="shape_cues", method_args={"skip_stage": 9}), 3)


# ----------------------------------------------------------------------------- pseudo masks and losses


def test_present_class_probs_and_pseudo_mask_rule_by_hand():
    labels = torch.tensor([[1.0, 0.0]])
    probs = present_class_probs(torch.zeros(1, 3, 1, 2), labels)
    torch.testing.assert_close(probs[0, :, 0, 0], torch.tensor([1 / 3, 1 / 3, 0.0]))  # absent class 2 -> 0
    # Channels [bg, a, b] over 4 pixels. Maxima: bg 0.9, a 0.8, b 0.3.
    p = torch.tensor([[[0.9, 0.5, 0.1, 0.5],
                       [0.1, 0.5, 0.8, 0.25],
                       [0.0, 0.0, 0.1, 0.3]]]).view(1, 3, 1, 4)
    # thresholds max(0.6 * max, 0.2): bg 0.54, a 0.48, b 0.2
    # pixel 0: bg only -> 0; pixel 1: a only (bg 0.5 < 0.54) -> 1; pixel 2: a -> 1;
    # pixel 3: b (0.3 > 0.2) only -> 2
    assert pseudo_mask(p).flatten().tolist() == [0, 1, 1, 2]
    # a background cutoff of 0.5 (0.45) makes pixels 1 (bg and a) and 3 (bg and b) conflicting
    assert pseudo_mask(p, background_cutoff=0.5).flatten().tolist() == [0, IGNORE, 1, IGNORE]
    # low = 0.35 lifts b's threshold above its maximum: pixel 3 has no class
    assert pseudo_mask(p, low=0.35).flatten().tolist() == [0, 1, 1, IGNORE]


def _loop_ce(scores, target, b, y, x):
    s = scores[b, :, y, x]
    return float(torch.logsumexp(s, 0) - s[target[b, y, x]])


def test_balanced_pixel_ce_matches_loops():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 0, IGNORE], [1, 1, 0, 0]],
                           [[0, 0, 0, 0], [0, 2, 2, 0], [0, 0, IGNORE, 0]]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # image 1 lacks class 1 in its mask
    pixels = [(b, y, x) for b in range(2) for y in range(3) for x in range(4) if target[b, y, x] != IGNORE]
    ce = {p: _loop_ce(scores, target, *p) for p in pixels}
    # none: mean over the valid pixels (eq. 7 as printed)
    assert balanced_pixel_ce(scores, target, labels, "none").item() == pytest.approx(np.mean(list(ce.values())))
    # class_mean: per image, per class means, averaged over the classes present, then images
    per_image = []
    for b in range(2):
        classes = sorted({int(target[p]) for p in pixels if p[0] == b})
        per_image.append(np.mean([np.mean([ce[p] for p in pixels if p[0] == b and int(target[p]) == c]) for c in classes]))
    assert balanced_pixel_ce(scores, target, labels, "class_mean").item() == pytest.approx(np.mean(per_image))
    # ssss: weight (N - N_c) / (1 + N), mean over all 12 pixels; image 1 is incomplete -> 0
    b = 0
    mine = [p for p in pixels if p[0] == b]
    n = len(mine)
    counts = {c: sum(int(target[p]) == c for p in mine) for c in range(3)}
    total = sum((n - counts[int(target[p])]) / (1 + n) * ce[p] for p in mine) / 12
    assert balanced_pixel_ce(scores, target, labels, "ssss").item() == pytest.approx(total / 2)
    with pytest.raises(ConfigError, match="balance"):
        balanced_pixel_ce(scores, target, labels, "focal")


def test_region_loss_matches_a_loop():
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 5, 6, dtype=torch.float64) * 2
    target = torch.randint(0, 3, (2, 5, 6))
    target[0, 1, 2] = IGNORE
    target[1, 4, :] = IGNORE
    radius, gamma = 2, 3.0
    p = torch.softmax(scores, dim=1)
    per_pixel = []
    for b in range(2):
        for y in range(5):
            for x in range(6):
                if target[b, y, x] == IGNORE:
                    continue
                terms = []
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        j = (y + dy, x + dx)
                        if (dy, dx) == (0, 0) or not (0 <= j[0] < 5 and 0 <= j[1] < 6) or target[b, j[0], j[1]] == IGNORE:
                            continue
                        kl = float((p[b, :, j[0], j[1]] * (p[b, :, j[0], j[1]].log() - p[b, :, y, x].log())).sum())
                        same = target[b, j[0], j[1]] == target[b, y, x]
                        terms.append(kl if same else max(0.0, gamma - kl))
                if terms:
                    per_pixel.append(np.mean(terms))
    assert region_loss(scores, target, radius, gamma).item() == pytest.approx(np.mean(per_pixel), rel=1e-10)


def test_region_lambda_ramps_over_training():
    term = RegionTerm(RegionConfig(weight=2.0), OnlineMasks(OnlineMaskConfig()), ["cams"])
    assert [term.weight_at(0, f) for f in (0.0, 0.25, 1.0)] == [0.0, 0.5, 2.0]
    flat = RegionTerm(RegionConfig(weight=2.0, ramp="none"), OnlineMasks(OnlineMaskConfig()), ["cams"])
    assert flat.weight_at(0, 0.0) == 2.0


def test_spr_at_alpha_one_is_pamr_inside_training():
    torch.manual_seed(2)
    scores = torch.randn(2, 4, 12, 12) * 3
    rgb = torch.rand(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    spr1 = OnlineMasks(OnlineMaskConfig(refiner="spr", alpha=1.0)).refine(scores, rgb, labels)
    pamr_path = OnlineMasks(OnlineMaskConfig(refiner="pamr")).refine(scores, rgb, labels)
    image = torch.nn.functional.interpolate(rgb, size=(12, 12), mode="bilinear", align_corners=False)
    direct = pamr(present_class_probs(scores, labels), image)
    torch.testing.assert_close(spr1, pamr_path)
    torch.testing.assert_close(spr1, direct)
    semantic = OnlineMasks(OnlineMaskConfig(refiner="spr", alpha=0.8)).refine(scores, rgb, labels)
    assert not torch.allclose(semantic, direct)
    # absent classes stay 0 through the refinement
    assert semantic[0, 2].abs().max() == 0 and semantic[1, 1].abs().max() == 0 and semantic[1, 3].abs().max() == 0


def test_masks_are_made_once_per_step_and_need_a_background_channel():
    from weakseg.losses.terms import LossConfig, build_terms

    terms = build_terms(from_mapping(LossConfig, {"classification": {"kind": "logits", "reads": ["logits"]},
                                                  "online_mask": {}}, "loss"))
    assert [t.name for t in terms] == ["cls", "pixel", "region"]
    assert terms[1].masks is terms[2].masks
    calls = []
    original = terms[1].masks.refine
    terms[1].masks.refine = lambda *a: calls.append(1) or original(*a)
    outputs = {"cams": torch.randn(1, 3, 8, 8), "logits": torch.randn(1, 2)}
    batch = {"rgb": torch.rand(1, 3, 32, 32), "labels": torch.tensor([[1.0, 0.0]])}
    for t in terms[1:]:
        t(outputs, batch, 0)
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="background channel"):
        terms[1](outputs, batch, None)
    with pytest.raises(ConfigError, match="logits"):
        terms[0]({"logits": torch.randn(1, 3, 2, 2)}, batch, 0)


# ----------------------------------------------------------------------------- the single-stage run


def test_synthetic_single_stage_run(tmp_path):
    """`weakseg run` on a small version of configs/synthetic_shape_cues.yaml: every stage is
    scored with the dataset's boundary-IoU band (0.05), the pseudo-labels follow the online
    rule (255 where no class or several pass), and the network segments the images itself."""
    from weakseg.steps import pipeline

    config = yaml.safe_load(open("configs/synthetic_shape_cues.yaml"))
    config["dataset"].update(num_images=16)
    config["train_cam"]["train"].update(epochs=2, batch_size=8)
    config["out"] = str(tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    pipeline.run(path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["stages"]) == {"cam", "refined", "pseudo_labels", "final"}
    metrics = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    assert "0.05 x diagonal" in metrics["conventions"]["boundary_iou"]
    from weakseg.data.io import read_label_map
    from weakseg.steps.pseudo_labels import load_probs

    sample = sorted((tmp_path / "run" / "refine" / "probs").glob("*.npz"))[0]
    probs, class_ids = load_probs(sample)
    label = read_label_map(tmp_path / "run" / "pseudo_labels" / "labels" / f"{sample.stem}.png")
    expected = pseudo_mask(torch.from_numpy(probs)[None])[0].numpy()
    np.testing.assert_array_equal(label, np.where(expected == IGNORE, IGNORE, class_ids[np.minimum(expected, len(class_ids) - 1)]))


def test_predict_refuses_a_cam_method_as_segmenter(tmp_path):
    from weakseg.steps.predict import PredictConfig, predict
    from weakseg.steps.model_files import save_cam_model
    from weakseg.data import build_dataset

    dataset = build_dataset({"kind": "synthetic", "num_images": 2, "image_size": 32})
    model = build_model(ModelConfig(), len(dataset.foreground_ids))
    save_cam_model(tmp_path / "cam_model.pt", model, ModelConfig(), dataset)
    with pytest.raises(ConfigError, match="segment"):
        predict(tmp_path / "cam_model.pt", dataset, tmp_path / "out", PredictConfig(network="train_cam"))
    # AuxSegNet+ has a segmentation output, but its train_cam step trains only the classifier
    aux = ModelConfig(method="auxsegnet", method_args={"channels": 8})
    save_cam_model(tmp_path / "aux_model.pt", build_model(aux, len(dataset.foreground_ids)), aux, dataset)
    with pytest.raises(ConfigError, match="segment"):
        predict(tmp_path / "aux_model.pt", dataset, tmp_path / "out", PredictConfig(network="train_cam"))
