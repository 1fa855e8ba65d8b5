"""FSL: the windowed implementation against a looped all-pairs reference written from icam
eq. 9-13 (value and gradient), the truncation bound, learnable mu/sigma, and finiteness."""

from __future__ import annotations

import math

import pytest
import torch

from weakseg.losses.fsl import (
    _activation_of_distance,
    feature_similarity_loss,
    feature_similarity_loss_all_pairs,
    gate_input,
    similarity_activation,
    window_truncation_bound,
)


def looped_reference(p, image, mask, mu, sigma, metric, variant="official"):
    """Every ordered pair of pixels, term by term, exactly as icam eq. 9-13 (with the 1/(HW)
    normalisation of DEAL eq. 11) and the hfpl class mask; the activation's epsilon as the
    official code writes it, log((d + 1e-5) / (1 - d + 1e-5)), or as the paper variant clamps d."""
    b, c, h, w = p.shape
    total = p.new_zeros(())
    for n in range(b):
        for i in range(h * w):
            yi, xi = divmod(i, w)
            for j in range(h * w):
                yj, xj = divmod(j, w)
                wij = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
                diff = image[n, :, yi, xi] - image[n, :, yj, xj]
                d = diff.abs().sum() / 3 if metric == "l1" else diff.pow(2).sum().sqrt() / 3
                if variant == "official":
                    f = torch.tanh(mu + torch.log((d + 1e-5) / (1 - d + 1e-5)))
                else:
                    d = d.clamp(1e-5, 1 - 1e-5)
                    f = torch.tanh(mu + torch.log(d / (1 - d)))
                g = 0.5 * (mask[n] * (p[n, :, yi, xi] - p[n, :, yj, xj]) ** 2).sum()
                total = total - wij * g * f
    return total / (b * h * w)


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_windowed_equals_looped_reference_when_window_covers_image(metric, variant):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    image = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    ours = feature_similarity_loss(p, image, mask, mu=2.5, sigma=1.5, radius=10, metric=metric, variant=variant)
    (grad_ours,) = torch.autograd.grad(ours, p)
    ref = looped_reference(p, image, mask, 2.5, 1.5, metric, variant)
    (grad_ref,) = torch.autograd.grad(ref, p)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-14)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-13)


def test_all_pairs_matrix_version_equals_loops():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(1, 2, 3, 4, generator=g, dtype=torch.float64)
    image = torch.rand(1, 3, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    a = feature_similarity_loss_all_pairs(p, image, mask, 2.5, 2.0, "l1")
    assert a.item() == pytest.approx(looped_reference(p, image, mask, 2.5, 2.0, "l1").item(), rel=1e-12)


def test_truncated_window_within_bound_and_gradient_close():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(1, 4, 24, 24, generator=g, dtype=torch.float64, requires_grad=True)
    image = torch.rand(1, 3, 24, 24, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    sigma = 3.0
    windowed = feature_similarity_loss(p, image, mask, sigma=sigma, radius=9)  # a window smaller than the default
    full = feature_similarity_loss_all_pairs(p, image, mask, sigma=sigma)
    bound = window_truncation_bound(sigma, 9, num_present=3)
    assert 0 < abs(windowed.item() - full.item()) <= bound
    (gw,) = torch.autograd.grad(windowed, p)
    (gf,) = torch.autograd.grad(full, p)
    assert (gw - gf).abs().max() < 0.05 * gf.abs().max()


def test_learnable_mu_sigma_path_matches_and_gets_gradients():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    image = torch.rand(1, 3, 6, 7, generator=g, dtype=torch.float64)
    mu = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    learn = feature_similarity_loss(p, image, None, mu=mu, sigma=sigma, radius=12)
    fixed = feature_similarity_loss(p, image, None, mu=2.5, sigma=1.5, radius=12)
    assert learn.item() == pytest.approx(fixed.item(), rel=1e-12)
    grads = torch.autograd.grad(learn, (p, mu, sigma))
    assert all(torch.isfinite(t).all() for t in grads)
    assert grads[1].item() < 0  # hfpl §4.3: d L / d mu is always negative


def test_similar_pixels_pull_predictions_together_dissimilar_push_apart():
    image = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    p = torch.tensor([[[[0.2, 0.8]]]], dtype=torch.float64, requires_grad=True)
    loss = feature_similarity_loss(p, image, sigma=1.0)
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() > 0 and grad[0, 0, 0, 0] < 0 < grad[0, 0, 0, 1]  # descent moves them together
    image[..., 1] = 1.0  # opposite colours: d = 1
    loss = feature_similarity_loss(p, image, sigma=1.0)
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() < 0 and grad[0, 0, 0, 0] > 0 > grad[0, 0, 0, 1]  # descent pushes them apart


def test_activation_finite_at_the_ends():
    d = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    f = similarity_activation(d, 2.5)
    assert torch.isfinite(f).all() and f[0] < -0.99 and f[1] > 0.99
    (grad,) = torch.autograd.grad(f.sum(), d)
    assert torch.isfinite(grad).all()


def test_arithmetic_activation_equals_tanh_logit():
    # The hot loop uses (e^2mu d^2 - (1-d)^2) / (e^2mu d^2 + (1-d)^2) instead of tanh(mu + logit d).
    d = torch.cat([torch.tensor([0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0]), torch.rand(1000)]).double()
    for mu in (0.0, 2.5, -1.0):
        for variant in ("official", "paper"):
            assert torch.allclose(_activation_of_distance(d, math.exp(2 * mu), variant=variant),
                                  similarity_activation(d, mu, variant=variant), atol=1e-12)


@pytest.mark.parametrize("gate", ["r", "b", "s", "a"])
def test_gate_inputs_give_finite_gradients_at_saturation(gate):
    scores = torch.tensor([0.0, 1e4, -1e4, 3.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1).double().requires_grad_()
    image = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    p = gate_input(scores, gate, background_channel=0)
    loss = feature_similarity_loss(p, image, sigma=1.0)
    (grad,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- the official code


def test_fsl_term_equals_hfpl_official_code():
    """hfpl's own feature_similarity_loss with its train_cam_voc.py preprocessing (arvijj/hfpl
    1038a68, run outside this repository; the fixture holds its loss and gradient), against
    the FSL term at its defaults (variant official, gate r). The 10x12 grid lies inside the
    default window, so all pairs count on both sides."""
    import json
    from pathlib import Path

    from weakseg.losses.fsl import FSLConfig, FSLTerm

    fx = json.loads((Path(__file__).parent / "fixtures" / "official" / "hfpl_fsl.json").read_text())
    n, c, h, w, s = fx["n"], fx["c"], fx["h"], fx["w"], fx["scale"]
    g = torch.Generator().manual_seed(fx["seed"])
    logits = 3 * torch.randn(n, c + 1, h, w, generator=g, dtype=torch.float64)
    rgb = torch.rand(n, 3, h * s, w * s, generator=g, dtype=torch.float64)
    scores = logits[:, 1:].clone().requires_grad_()
    batch = {"rgb": rgb, "labels": torch.tensor(fx["labels"], dtype=torch.float64)}
    value = FSLTerm(FSLConfig(mu=fx["mu"], sigma=fx["sigma"]), ["cams"]).value(scores, batch, None)
    value.backward()
    assert abs(value.item() - fx["loss"]) < 1e-6 * abs(fx["loss"])
    torch.testing.assert_close(scores.grad.flatten(), torch.tensor(fx["grad_logits_fg"], dtype=torch.float64),
                               rtol=0, atol=1e-6 * scores.grad.abs().max().item())
    paper = FSLTerm(FSLConfig(mu=fx["mu"], sigma=fx["sigma"], variant="paper"), ["cams"]).value(scores.detach(), batch, None)
    assert abs(paper.item() - fx["loss"]) > 0.1 * abs(fx["loss"])  # the variants differ (the background channel)


def test_default_window_leaves_out_under_1e4_of_the_loss_at_56x56():
    torch.manual_seed(0)
    p = torch.rand(2, 21, 56, 56, dtype=torch.float64)
    image = torch.rand(2, 3, 56, 56, dtype=torch.float64)
    mask = (torch.rand(2, 21) < 0.3).double()
    windowed = feature_similarity_loss(p, image, mask).item()  # default radius ceil(4.4 * 5) = 22
    full = feature_similarity_loss_all_pairs(p, image, mask).item()
    assert abs(windowed - full) < 1e-4 * abs(full)
