"""ISL against naive float64 implementations of icam eq. 1-8 and hfpl eq. 14-18 (value and
gradient, with the pixel draws fixed), sampling frequencies against p_k (chi-square), and
finiteness at saturated scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from weakseg.losses.isl import binomial_isl, multinomial_isl, sample_pixels


def bce(y, p):
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def naive_binomial(scores, labels, pixels, lam):
    """hfpl eq. 14-18 written literally with loops: b = sigmoid(s), read b at each draw."""
    bsz, c, h, w = scores.shape
    gap = torch.sigmoid(scores.mean(dim=(2, 3)))
    l_ce = bce(labels, gap).mean()
    terms = []
    for i in range(bsz):
        for k in range(c):
            for n in range(pixels.shape[-1]):
                p = int(pixels[i, k, n])
                b = torch.sigmoid(scores[i, k, p // w, p % w])
                terms.append(bce(labels[i, k], b))
    return (1 - lam) * l_ce + lam * torch.stack(terms).mean()


def naive_multinomial(scores, labels, pixels, lam):
    """icam eq. 1-8 literally: a = softmax over channels (background = channel 0, label 1)."""
    bsz, k, h, w = scores.shape
    y = torch.cat([torch.ones(bsz, 1, dtype=scores.dtype), labels], dim=1)
    a = torch.softmax(scores, dim=1)
    l_ce = bce(y, torch.sigmoid(scores.mean(dim=(2, 3)))).mean()
    terms = []
    for i in range(bsz):
        for ch in range(k):
            for n in range(pixels.shape[-1]):
                p = int(pixels[i, ch, n])
                terms.append(bce(y[i, ch], a[i, ch, p // w, p % w]))
    return (1 - lam) * l_ce + lam * torch.stack(terms).mean()


@pytest.mark.parametrize("variant", ["binomial", "multinomial"])
def test_isl_matches_naive_formula_value_and_gradient(variant):
    g = torch.Generator().manual_seed(0)
    bsz, c, h, w, n = 2, 3, 5, 6, 7
    channels = c if variant == "binomial" else c + 1
    scores = (torch.randn(bsz, channels, h, w, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = (torch.rand(bsz, c, generator=g) < 0.5).double()
    pixels = torch.randint(0, h * w, (bsz, channels, n), generator=g)
    lam = 0.3
    ours_fn, ref_fn = (binomial_isl, naive_binomial) if variant == "binomial" else (multinomial_isl, naive_multinomial)
    # The paper's multinomial formula (K with the background); the official variant is
    # checked against icam's own code below.
    extra = {} if variant == "binomial" else {"variant": "paper"}
    ours = ours_fn(scores, labels, lam=lam, pixels=pixels, **extra)
    (grad_ours,) = torch.autograd.grad(ours, scores)
    ref = ref_fn(scores, labels, pixels, lam)
    (grad_ref,) = torch.autograd.grad(ref, scores)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-12)


def test_sample_frequencies_follow_pk():
    """Draws from a 3x4 map: counts against p = weight / sum (chi-square, fixed seed)."""
    weights = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 0.5, 0.5, 1.0], [2.0, 0.0, 6.0, 1.0]]).view(1, 1, 3, 4)
    n = 60000
    draws = sample_pixels(weights, n, torch.Generator().manual_seed(1)).view(-1).numpy()
    counts = np.bincount(draws, minlength=12)
    p = weights.view(-1).numpy() / weights.sum().item()
    assert counts[p == 0].sum() == 0  # zero-activation pixels are never drawn (icam §3.2)
    stat = chisquare(counts[p > 0], n * p[p > 0])
    assert stat.pvalue > 1e-3


def test_saturated_scores_give_finite_loss_and_gradient():
    scores = torch.tensor([1e4, -1e4, 0.0, 50.0]).view(1, 1, 2, 2).repeat(1, 2, 1, 1).double().requires_grad_()
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for fn, inp in ((binomial_isl, scores), (multinomial_isl, scores)):
        lab = labels if fn is binomial_isl else labels[:, :1]
        loss = fn(inp, lab, num_samples=20, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad(loss, inp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_multinomial_isl_equals_icam_official_code():
    """icam's own classification loss of one branch (arvijj/icam 5f04fdc, run outside this
    repository; the fixture holds its value and gradient) with the same pixel draws: the
    default variant is the official code's, the paper's differs."""
    import json
    from pathlib import Path

    fx = json.loads((Path(__file__).parent / "fixtures" / "official" / "icam_multinomial_isl.json").read_text())
    g = torch.Generator().manual_seed(fx["seed"])
    scores = (2 * torch.randn(fx["n"], fx["c"] + 1, fx["h"], fx["w"], generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor(fx["labels"], dtype=torch.float64)
    ours = multinomial_isl(scores, labels, fx["num_samples"], fx["lam"], torch.Generator().manual_seed(fx["draw_seed"]))
    ours.backward()
    assert abs(ours.item() - fx["loss"]) < 1e-6 * fx["loss"]
    torch.testing.assert_close(scores.grad.flatten(), torch.tensor(fx["grad_scores"], dtype=torch.float64), rtol=0, atol=1e-8)
    paper = multinomial_isl(scores.detach(), labels, fx["num_samples"], fx["lam"],
                            torch.Generator().manual_seed(fx["draw_seed"]), variant="paper")
    assert abs(paper.item() - fx["loss"]) > 1e-3


def test_official_and_paper_multinomial_agree_without_smoothing_on_all_channels():
    """The variants differ only by the channels and the smoothing: the official form with
    smoothing 0, given the background as one more foreground class labelled 1, is the paper's."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    labels = (torch.rand(2, 3, generator=g) < 0.5).double()
    pixels = torch.randint(0, 25, (2, 4, 9), generator=g)
    paper = multinomial_isl(scores, labels, lam=0.8, pixels=pixels, variant="paper")
    # All K channels as "foreground": append a dummy channel at -inf as the excluded background.
    padded = torch.cat([torch.full((2, 1, 5, 5), -1e4, dtype=torch.float64), scores], dim=1)
    all_labels = torch.cat([torch.ones(2, 1, dtype=torch.float64), labels], dim=1)
    pixels_padded = torch.cat([pixels[:, :1], pixels], dim=1)
    official = multinomial_isl(padded, all_labels, lam=0.8, pixels=pixels_padded, variant="official", smoothing=0.0)
    assert official.item() == pytest.approx(paper.item(), rel=1e-10)
