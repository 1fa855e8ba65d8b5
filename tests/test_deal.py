"""DEAL (depth edge alignment loss, DEAL paper eq. 1-8) against a brute-force numpy reference
written with explicit loops: bicubic resampling (PyTorch's convention), per-pixel Sobel with
replicate padding, the literal tanh(mu + log(t / (1 - t))), and the present-class mean.
Value and gradient (central finite differences of the reference vs autograd), plus the
behaviour the paper relies on: aligned edges lower the loss, absent classes do not count,
saturated CAMs and edgeless depth stay finite, warm-up."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weakseg.errors import ConfigError
import torch

from weakseg.losses.deal import (
    DEALTerm,
    deal_loss,
    deal_per_image,
    edge_activation,
    sobel_magnitude,
    unit_edges,
)

GX = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
GY = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]


# ---------------------------------------------------------------- brute-force reference


def ref_cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic kernel evaluated at the distances of the 4 taps from the sample point."""

    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def ref_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bicubic, align_corners=False: output pixel i samples the input at (i + 0.5) * in/out - 0.5,
    4 taps per axis at floor - 1 .. floor + 2, indices clamped to the border."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = (i + 0.5) * in_h / out_h - 0.5
        y0 = math.floor(y)
        wy = ref_cubic_weights(y - y0)
        for j in range(out_w):
            x = (j + 0.5) * in_w / out_w - 0.5
            x0 = math.floor(x)
            wx = ref_cubic_weights(x - x0)
            total = 0.0
            for p in range(4):
                for q in range(4):
                    yy = min(max(y0 - 1 + p, 0), in_h - 1)
                    xx = min(max(x0 - 1 + q, 0), in_w - 1)
                    total += wy[p] * wx[q] * img[yy, xx]
            out[i, j] = total
    return out


def ref_sobel_magnitude(img: np.ndarray) -> np.ndarray:
    """Eq. 3-5 per pixel; a neighbour outside the map takes the nearest border value."""
    h, w = img.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            gx = gy = 0.0
            for u in range(3):
                for v in range(3):
                    val = img[min(max(i + u - 1, 0), h - 1), min(max(j + v - 1, 0), w - 1)]
                    gx += GX[u][v] * val
                    gy += GY[u][v] * val
            out[i, j] = math.sqrt(gx * gx + gy * gy)
    return out


def ref_eta(t: np.ndarray, mu: float) -> np.ndarray:
    """Eq. 6-7 literally; numpy's log(0) = -inf and x/0 = inf give tanh = -1 / +1 at the ends."""
    with np.errstate(divide="ignore"):
        return np.tanh(mu + np.log(t / (1.0 - t)))


def ref_unit(m: np.ndarray, mode: str, scale: float | None, eps: float) -> np.ndarray:
    if mode == "max":
        return m / max(m.max(), eps)
    return np.clip(m / scale, 0.0, 1.0)


def ref_cam_norm(cam: np.ndarray, mode: str) -> np.ndarray:
    if mode == "none":
        return cam
    if mode == "max":
        r = np.maximum(cam, 0.0)
        return r / max(r.max(), 1e-5)
    return 1.0 / (1.0 + np.exp(-cam))


def ref_deal(cams, depth, labels, mu=2.5, size=None, cam_norm="none", edge_norm="max",
             cam_edge_scale=None, depth_edge_scale=None, eps=1e-6) -> float:
    b, k, hc, wc = cams.shape
    hp, wp = (hc, wc) if size is None else size
    per_image = []
    for n in range(b):
        present = [c for c in range(k) if labels[n, c] == 1]
        if not present:
            continue  # an image without a present class contributes nothing
        dp = ref_resize(depth[n, 0], hp, wp)
        d_act = ref_eta(ref_unit(ref_sobel_magnitude(dp), edge_norm, depth_edge_scale, eps), mu)
        class_terms = []
        for c in present:
            sp = ref_resize(ref_cam_norm(cams[n, c], cam_norm), hp, wp)
            a_act = ref_eta(ref_unit(ref_sobel_magnitude(sp), edge_norm, cam_edge_scale, eps), mu)
            class_terms.append(a_act)
        # eq. 8: -(1/H'W') sum_ij (1/|present|) sum_{k present} a'_kij d'_ij
        total = 0.0
        for i in range(hp):
            for j in range(wp):
                total += sum(a_act[i, j] * d_act[i, j] for a_act in class_terms) / len(present)
        per_image.append(-total / (hp * wp))
    return float(np.mean(per_image)) if per_image else 0.0


# ---------------------------------------------------------------- fixtures


def random_inputs(seed, b=3, k=3, hc=5, wc=6, h=13, w=11):
    rng = np.random.default_rng(seed)
    cams = rng.normal(size=(b, k, hc, wc))
    depth = rng.uniform(0.5, 5.0, size=(b, 1, h, w))
    labels = rng.integers(0, 2, size=(b, k)).astype(np.float64)
    labels[0] = 0
    labels[0, 1] = 1
    labels[-1] = 0  # one image with no present class
    return cams, depth, labels


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def square_depth(n=32, lo=8, hi=20):
    depth = torch.full((1, 1, n, n), 3.0, dtype=torch.float64)
    depth[..., lo:hi, lo:hi] = 1.5
    return depth


def square_cam(n=32, lo=8, hi=20, dy=0, dx=0):
    cam = torch.zeros((1, 1, n, n), dtype=torch.float64)
    cam[..., lo + dy : hi + dy, lo + dx : hi + dx] = 1.0
    return cam


# ---------------------------------------------------------------- components


def test_sobel_matches_reference():
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 7))
    got = sobel_magnitude(t64(x)).numpy()
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[n, c], ref_sobel_magnitude(x[n, c]), rtol=0, atol=1e-12)


def test_sobel_of_constant_map_is_zero_everywhere_including_border():
    """Replicate padding: no invented frame-shaped edge at the border."""
    x = torch.full((1, 1, 5, 4), 7.5, dtype=torch.float64, requires_grad=True)
    m = sobel_magnitude(x)
    assert torch.equal(m, torch.zeros_like(m))
    m.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # zero subgradient, not 0/0


@pytest.mark.parametrize("shape,out", [((5, 6), (8, 9)), ((13, 11), (5, 6)), ((4, 4), (7, 3))])
def test_bicubic_convention_matches_reference(shape, out):
    x = np.random.default_rng(1).normal(size=shape)
    got = torch.nn.functional.interpolate(t64(x)[None, None], size=out, mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got[0, 0].numpy(), ref_resize(x, *out), rtol=0, atol=1e-12)


def test_activation_is_the_literal_formula_inside_and_its_limits_at_the_ends():
    t = torch.tensor([0.0, 1e-12, 1e-4, 0.05, 1 / (1 + math.exp(2.5)), 0.3, 0.5, 0.9, 1 - 1e-9, 1.0],
                     dtype=torch.float64, requires_grad=True)
    eta = edge_activation(t, mu=2.5)
    np.testing.assert_allclose(eta.detach().numpy(), ref_eta(t.detach().numpy(), 2.5), rtol=0, atol=1e-12)
    assert eta[0].item() == -1.0 and eta[-1].item() == 1.0
    assert abs(eta[4].item()) < 1e-12  # crossover at t = 1 / (1 + e^mu)
    eta.sum().backward()
    assert torch.isfinite(t.grad).all()
    # float32 too: the ends stay exactly -1 and +1 and the gradient finite
    t32 = torch.tensor([0.0, 1.0], requires_grad=True)
    e32 = edge_activation(t32)
    assert e32.tolist() == [-1.0, 1.0]
    e32.sum().backward()
    assert torch.isfinite(t32.grad).all()


def test_unit_edges_maps_zero_to_zero_and_the_max_to_one():
    m = torch.tensor([[[[0.0, 0.5], [2.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    u = unit_edges(m, "max")
    assert u[0].flatten().tolist() == [0.0, 0.125, 0.5, 1.0]
    assert torch.equal(u[1], torch.zeros_like(u[1]))  # an edgeless map stays 0 (eta = -1)
    f = unit_edges(m, "fixed", scale=2.0)
    assert f[0].flatten().tolist() == [0.0, 0.25, 1.0, 1.0]
    with pytest.raises(ValueError):
        unit_edges(m, "fixed")


# ---------------------------------------------------------------- value and gradient


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"size": (8, 9)},
        {"size": (7, 5), "cam_norm": "max"},
        {"cam_norm": "sigmoid", "mu": 1.0},
        {"size": (8, 9), "edge_norm": "fixed", "cam_edge_scale": 6.0, "depth_edge_scale": 12.0},
    ],
)
def test_value_matches_reference(kwargs):
    cams, depth, labels = random_inputs(seed=3)
    got = deal_loss(t64(cams), t64(depth), t64(labels), **kwargs).item()
    want = ref_deal(cams, depth, labels, **kwargs)
    assert abs(got - want) < 1e-6, (got, want)
    assert -1.0 <= got <= 1.0


@pytest.mark.parametrize("kwargs", [{"size": (7, 6)}, {"cam_norm": "sigmoid"}])
def test_gradient_matches_finite_differences_of_reference(kwargs):
    cams, depth, labels = random_inputs(seed=5, b=1, k=2, hc=4, wc=5, h=9, w=8)
    labels[:] = 1
    x = t64(cams).requires_grad_(True)
    deal_loss(x, t64(depth), t64(labels), **kwargs).backward()
    h = 1e-6
    fd = np.zeros_like(cams)
    for idx in np.ndindex(cams.shape):
        plus, minus = cams.copy(), cams.copy()
        plus[idx] += h
        minus[idx] -= h
        fd[idx] = (ref_deal(plus, depth, labels, **kwargs) - ref_deal(minus, depth, labels, **kwargs)) / (2 * h)
    np.testing.assert_allclose(x.grad.numpy(), fd, rtol=1e-5, atol=1e-7)
    assert np.abs(fd).max() > 1e-4  # the test is not vacuous


def test_gradcheck_through_implementation():
    cams, depth, labels = random_inputs(seed=7, b=2, k=3, hc=4, wc=4, h=10, w=9)
    d, y = t64(depth), t64(labels)
    x = t64(cams).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: deal_loss(c, d, y, size=(6, 7)), (x,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cam_norm", ["none", "max", "sigmoid"])
@pytest.mark.parametrize("shift", [(0, 3), (2, 0), (3, -3)])
def test_cam_on_depth_edges_scores_lower_than_shifted_cam(cam_norm, shift):
    depth, labels = square_depth(), torch.ones(1, 1, dtype=torch.float64)
    aligned = deal_loss(square_cam(), depth, labels, cam_norm=cam_norm)
    shifted = deal_loss(square_cam(dy=shift[0], dx=shift[1]), depth, labels, cam_norm=cam_norm)
    assert aligned < shifted - 0.05, (aligned, shifted)
    # also through a lower-resolution CAM that is upsampled (eq. 2) and a depth downsampled (eq. 1)
    small = torch.nn.functional.avg_pool2d(square_cam(), 4)
    small_shift = torch.nn.functional.avg_pool2d(square_cam(dy=4 * np.sign(shift[0]), dx=4 * np.sign(shift[1])), 4)
    a2 = deal_loss(small, depth, labels, size=(16, 16), cam_norm=cam_norm)
    s2 = deal_loss(small_shift, depth, labels, size=(16, 16), cam_norm=cam_norm)
    assert a2 < s2


def test_sign_cam_equal_to_depth_gives_minus_mean_square():
    """a = d exactly, so a'd' = a'^2 >= 0 and L = -mean(a'^2) <= 0 (the aligned case is negative)."""
    depth = square_depth() + 0.01 * torch.arange(32, dtype=torch.float64)  # a ramp: not all edges saturate
    loss = deal_loss(depth, depth, torch.ones(1, 1, dtype=torch.float64))
    act = edge_activation(unit_edges(sobel_magnitude(depth)))
    assert loss.item() == pytest.approx(-(act**2).mean().item(), abs=1e-12)
    assert loss.item() < 0


@pytest.mark.parametrize("cam_norm", ["none", "max", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_for_saturated_cams_and_edgeless_depth(cam_norm, dtype):
    binary = square_cam().to(dtype)
    cams = torch.cat([binary, torch.zeros_like(binary), torch.ones_like(binary), 1 - binary], dim=1)
    labels = torch.ones(1, 4, dtype=dtype)
    for depth in (square_depth().to(dtype), torch.full((1, 1, 40, 36), 2.0, dtype=dtype), torch.zeros(1, 1, 40, 36, dtype=dtype)):
        for size in (None, (20, 20)):
            x = cams.clone().requires_grad_(True)
            loss = deal_loss(x, depth, labels, cam_norm=cam_norm, size=size)
            loss.backward()
            assert torch.isfinite(loss), (cam_norm, size)
            assert torch.isfinite(x.grad).all(), (cam_norm, size)


def test_edgeless_depth_rewards_flat_cams():
    """Constant depth: d' = -1 everywhere, so L = mean over present classes of mean(a'), lowest
    (-1) for a CAM without edges."""
    depth = torch.full((1, 1, 32, 32), 2.0, dtype=torch.float64)
    labels = torch.ones(1, 1, dtype=torch.float64)
    assert deal_loss(torch.zeros(1, 1, 32, 32, dtype=torch.float64), depth, labels).item() == -1.0
    assert deal_loss(square_cam(), depth, labels).item() > -1.0


def test_absent_classes_do_not_contribute():
    cams, depth, labels = random_inputs(seed=11)
    x = t64(cams).requires_grad_(True)
    loss = deal_loss(x, t64(depth), t64(labels), size=(8, 8))
    loss.backward()
    absent = t64(labels) == 0
    assert torch.equal(x.grad[absent], torch.zeros_like(x.grad[absent]))
    changed = cams.copy()
    changed[labels == 0] = np.random.default_rng(12).normal(scale=5.0, size=changed[labels == 0].shape)
    assert deal_loss(t64(changed), t64(depth), t64(labels), size=(8, 8)).item() == loss.item()


def test_images_without_a_present_class_contribute_nothing():
    cams, depth, labels = random_inputs(seed=13)
    assert labels[-1].sum() == 0
    full = deal_loss(t64(cams), t64(depth), t64(labels))
    without = deal_loss(t64(cams[:-1]), t64(depth[:-1]), t64(labels[:-1]))
    assert full.item() == pytest.approx(without.item(), abs=1e-15)
    per_image, valid = deal_per_image(t64(cams), t64(depth), t64(labels))
    assert valid.tolist() == [True, bool(labels[1].sum() > 0), False]
    # a batch where no image has a present class: loss 0, still differentiable, zero gradient
    x = t64(cams).requires_grad_(True)
    empty = deal_loss(x, t64(depth), torch.zeros(3, 3, dtype=torch.float64))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_scale_and_offset_invariance_with_max_edge_norm():
    """edge_norm='max' makes the loss independent of the CAM's and the depth's units."""
    cams, depth, labels = random_inputs(seed=17)
    base = deal_loss(t64(cams), t64(depth), t64(labels), size=(8, 9)).item()
    assert deal_loss(t64(3.7 * cams - 2.0), t64(depth), t64(labels), size=(8, 9)).item() == pytest.approx(base, abs=1e-12)
    assert deal_loss(t64(cams), t64(1000.0 * depth), t64(labels), size=(8, 9)).item() == pytest.approx(base, abs=1e-12)


def test_shape_errors():
    cams, depth, labels = random_inputs(seed=1)
    with pytest.raises(ValueError, match="labels"):
        deal_loss(t64(cams), t64(depth), t64(labels[:, :2]))
    with pytest.raises(ValueError, match="depth"):
        deal_loss(t64(cams), t64(depth[:, 0]), t64(labels))


# ---------------------------------------------------------------- the loss term


def deal_term_of(config_file: str):
    """The DEAL term of an example config, and the config (no data is read)."""
    from pathlib import Path

    from weakseg.losses.terms import build_terms
    from weakseg.steps import pipeline

    config, _ = pipeline.load_config(Path(__file__).resolve().parents[1] / "configs" / config_file)
    (term,) = [t for t in build_terms(config.train_cam.loss) if isinstance(t, DEALTerm)]
    return term, config


def test_the_papers_deal_schedules_are_the_example_configs():
    # WeakTr (deal §IV-C): 60 epochs, w_edge = 0 for the first 20; SEAM (§IV-D): 8 epochs, 0 for
    # the first 3; w_edge = 0.04 in both, on both CAMs averaged (eq. 14-15).
    weaktr, weaktr_config = deal_term_of("vit_voc_deal.yaml")
    seam, seam_config = deal_term_of("seam_voc_deal.yaml")
    assert weaktr_config.train_cam.train.epochs == 60 and seam_config.train_cam.train.epochs == 8
    assert [weaktr.weight_at(e) for e in (0, 19, 20, 59)] == [0.0, 0.0, 0.04, 0.04]
    assert [seam.weight_at(e) for e in (0, 2, 3, 7)] == [0.0, 0.0, 0.04, 0.04]
    assert set(weaktr.reads) == {"cams_coarse", "cams_fine"} and set(seam.reads) == {"cams", "cams_pcm"}
    assert DEALTerm().weight == 0.04 and DEALTerm().weight_at(0) == 0.04
    assert DEALTerm.needs == ("depth", "labels") and DEALTerm().reads == ("cams",)


def test_term_call_weights_and_averages_its_outputs():
    cams, depth, labels = random_inputs(seed=19, hc=4, wc=4)
    fine = t64(cams)
    coarse = torch.nn.functional.avg_pool2d(fine, 2)
    batch = {"depth": t64(depth), "labels": t64(labels)}
    outputs = {"cams_fine": fine, "cams_coarse": coarse}
    term, _ = deal_term_of("vit_voc_deal.yaml")
    assert term.weight_at(5) == 0.0
    # eq. 14: mean of the two, both at the finer CAM's resolution (coarse upsampled, eq. 2)
    want = 0.5 * (deal_loss(fine, batch["depth"], batch["labels"]) + deal_loss(coarse, batch["depth"], batch["labels"], size=(4, 4)))
    assert term.weight_at(20) * term(outputs, batch).item() == pytest.approx(0.04 * want.item(), abs=1e-12)
    # a background channel (multinomial methods) is dropped before DEAL sees the CAMs
    with_bg = {k: torch.cat([torch.zeros_like(v[:, :1]), v], dim=1) for k, v in outputs.items()}
    assert term(with_bg, batch, background_channel=0).item() == pytest.approx(want.item(), abs=1e-12)
    with pytest.raises(ConfigError, match="cams_fine"):
        term({"cams": fine}, batch)
