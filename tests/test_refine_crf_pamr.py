"""Dense CRF, PAMR and SPR refiners: snapping a misplaced mask to the colour edge, the presets,
PAMR/SPR against a per-pixel loop written from the definitions (weakseg/refine/pamr.py
docstring), hand-computed averages on a flat image, normalisation, and input errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from weakseg.refine.crf import CRF_PRESETS, CRFParams, DenseCRF, dense_crf
from weakseg.refine.pamr import PAMR, SPR, pamr, spr

try:
    import pydensecrf.densecrf  # noqa: F401

    HAVE_DENSECRF = True
except ImportError:
    HAVE_DENSECRF = False

needs_densecrf = pytest.mark.skipif(
    not HAVE_DENSECRF, reason="pydensecrf is not installed (pip install pydensecrf2); the CRF itself cannot run"
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture
def misplaced_square():
    """A 20x20 yellow square on a blue background (slight noise), and probabilities from the
    square shifted by (4, 3) pixels and blurred: the input argmax covers only ~half of it."""
    h = w = 48
    square = np.zeros((h, w), dtype=bool)
    square[14:34, 12:32] = True
    image = np.empty((h, w, 3), dtype=np.float64)
    image[:] = (30, 90, 160)
    image[square] = (220, 180, 40)
    rng = np.random.default_rng(0)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    shifted = np.roll(square, (4, 3), axis=(0, 1)).astype(np.float32)
    fg = 0.15 + 0.7 * ndimage.gaussian_filter(shifted, 3)
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    before = iou(probs.argmax(0) == 1, square)
    assert before < 0.6  # the case is hard enough to fail if a refiner does nothing
    return probs, image, square, before


# ---------------------------------------------------------------- dense CRF


def test_presets_hold_the_published_numbers():
    assert set(CRF_PRESETS) == {"psa", "label"}
    assert CRF_PRESETS["psa"] == CRFParams(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
                                           bilateral_compat=10, iterations=10)
    assert CRF_PRESETS["label"] == CRFParams(gaussian_sxy=4, gaussian_compat=3, bilateral_sxy=83, bilateral_srgb=5,
                                             bilateral_compat=3, iterations=10)
    assert DenseCRF("label").params is CRF_PRESETS["label"]
    assert DenseCRF().name == "crf"


@needs_densecrf
@pytest.mark.parametrize("preset", ["psa", "label"])
def test_crf_snaps_misplaced_square_to_colour_edge(misplaced_square, preset):
    probs, image, square, before = misplaced_square
    out = DenseCRF(preset)(probs, image)
    assert out.shape == probs.shape and out.dtype == np.float32
    after = iou(out.argmax(0) == 1, square)
    assert after > 0.95 and after > before
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


@needs_densecrf
def test_crf_without_pairwise_terms_returns_the_unary_distribution():
    """With both compatibilities 0 the mean-field marginals are softmax(-unary), i.e. the
    clipped input probabilities renormalised (Krähenbühl & Koltun eq. 1 without psi_p)."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=(9, 11)).transpose(2, 0, 1).astype(np.float32)
    probs[0, 0, 0], probs[1, 0, 0], probs[2, 0, 0] = 0.0, 0.25, 0.75  # an exact zero gets clipped, not -log 0
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    params = CRFParams(gaussian_sxy=3, gaussian_compat=0, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=0)
    clipped = np.clip(probs.astype(np.float64), 1e-5, 1.0)
    np.testing.assert_allclose(dense_crf(probs, image, params), clipped / clipped.sum(0), atol=1e-6)


@needs_densecrf
def test_crf_reads_non_contiguous_inputs_in_the_right_order():
    """A BGR->RGB flip and a crop are strided views; passed raw, pydensecrf would read the
    wrong pixels. The result must equal the one for contiguous copies of the same arrays."""
    rng = np.random.default_rng(2)
    big_image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    big_probs = rng.dirichlet(np.ones(3), size=(20, 30)).transpose(2, 0, 1).astype(np.float64)
    image = big_image[2:18, 3:27, ::-1]
    probs = big_probs[:, 2:18, 3:27]
    assert not image.flags.c_contiguous and not probs.flags.c_contiguous
    expected = dense_crf(np.ascontiguousarray(probs, dtype=np.float32), np.ascontiguousarray(image))
    np.testing.assert_array_equal(dense_crf(probs, image), expected)


def test_crf_single_label_is_certain_without_running():
    out = DenseCRF()(np.ones((1, 4, 5), np.float32), np.zeros((4, 5, 3), np.uint8))
    np.testing.assert_array_equal(out, np.ones((1, 4, 5), np.float32))


def test_crf_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # makes `import pydensecrf...` fail
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        DenseCRF()(np.full((2, 4, 5), 0.5, np.float32), np.zeros((4, 5, 3), np.uint8))


def test_crf_bad_inputs():
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown CRF preset"):
        DenseCRF("deeplab")
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        DenseCRF()(np.full((4, 5), 0.5, np.float32), image)
    with pytest.raises(ValueError, match="uint8"):
        DenseCRF()(np.full((2, 4, 5), 0.5, np.float32), image.astype(np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        DenseCRF()(np.full((2, 4, 6), 0.5, np.float32), image)
    with pytest.raises(ValueError, match="floating point"):
        DenseCRF()(np.ones((2, 4, 5), np.int64), image)
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(3, 3, 80, 13, 10, iterations=0)


# ---------------------------------------------------------------- PAMR / SPR


def reference_step(probs, image, dilations, alpha=1.0):
    """One refinement step, pixel by pixel and neighbour by neighbour, from the definitions:
    the window of pixel (y, x) is its 3x3 grid at spacing d for every dilation (centre once per
    dilation), coordinates clamped to the image (replicate padding); sigma is the unbiased std
    over that window; neighbours are the window without the centre entries; the kernel mixes
    the channel-mean colour term (alpha) with the per-class score term (1 - alpha); softmax;
    weighted sum; final division by the sum over classes. probs (K,H,W), image (3,H,W)."""
    k_cls, h, w = probs.shape

    def at(a, y, x):
        return a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    out = np.zeros_like(probs)
    for y in range(h):
        for x in range(w):
            window, neighbours = [], []
            for d in dilations:
                for dy in (-d, 0, d):
                    for dx in (-d, 0, d):
                        window.append((y + dy, x + dx))
                        if dy or dx:
                            neighbours.append((y + dy, x + dx))
            sd_x = np.array([at(image, *q) for q in window]).std(axis=0, ddof=1)
            sd_s = np.array([at(probs, *q) for q in window]).std(axis=0, ddof=1)
            k_colour = np.array([np.mean(-np.abs(image[:, y, x] - at(image, *q)) / (1e-8 + 0.1 * sd_x))
                                 for q in neighbours])
            for c in range(k_cls):
                k_sem = np.array([-abs(probs[c, y, x] - at(probs, *q)[c]) / (1e-8 + 0.1 * sd_s[c]) for q in neighbours])
                k = alpha * k_colour + (1 - alpha) * k_sem
                a = np.exp(k - k.max())
                a /= a.sum()
                out[c, y, x] = sum(a[n] * at(probs, *q)[c] for n, q in enumerate(neighbours))
    return out / out.sum(axis=0)


@pytest.mark.parametrize("alpha", [1.0, 0.8, 0.0])
def test_one_step_equals_per_pixel_loop(alpha):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=(6, 7)).transpose(2, 0, 1)
    image = rng.uniform(0, 1, (3, 6, 7))
    image[:, :3, :3] = 0.5  # a flat patch: zero colour differences next to large ones
    dilations = (1, 2, 4, 8, 12, 24)  # 8..24 reach past this 6x7 image: clamping everywhere
    expected = reference_step(probs, image, dilations, alpha)
    p, x = torch.from_numpy(probs)[None], torch.from_numpy(image)[None]
    got = (pamr(p, x, dilations, iterations=1) if alpha == 1.0 else spr(p, x, alpha, dilations, iterations=1))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=0, atol=1e-12)
    if alpha == 1.0:
        np.testing.assert_allclose(spr(p, x, 1.0, dilations, iterations=1)[0].numpy(), expected, rtol=0, atol=1e-12)


def test_flat_image_gives_uniform_average_of_the_eight_neighbours():
    """Flat image: every kernel value is 0, so each pixel becomes the plain mean of its 8
    neighbours (centre excluded, borders replicated). Hand-computed for a corner impulse and
    an interior impulse."""
    image = torch.full((1, 3, 5, 5), 0.3, dtype=torch.float64)
    fg = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    fg[0, 0, 0, 0] = 1.0  # corner
    fg[0, 0, 3, 3] = 1.0  # interior
    probs = torch.cat([1 - fg, fg], dim=1)
    out = pamr(probs, image, dilations=(1,), iterations=1)[0, 1]
    # corner (0,0): its clamped neighbours are (0,0) three times, (0,1), (0,1), (1,0), (1,0), (1,1);
    # (0,1) and (1,0) see (0,0) twice, (1,1) once; the interior impulse spreads 1/8 to its ring.
    expected = torch.tensor(
        [
            [3, 2, 0, 0, 0],
            [2, 1, 0, 0, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 1, 0, 1],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.float64,
    ) / 8
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_pamr_snaps_misplaced_square_to_colour_edge(misplaced_square):
    probs, image, square, before = misplaced_square
    out = PAMR()(probs, image)
    assert out.shape == probs.shape and out.dtype == np.float32
    after = iou(out.argmax(0) == 1, square)
    assert after > 0.95 and after > before


def test_spr_with_alpha_one_equals_pamr():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(3 * torch.randn(2, 3, 13, 17, generator=g), dim=1)
    image = torch.rand(2, 3, 13, 17, generator=g)
    torch.testing.assert_close(spr(probs, image, alpha=1.0), pamr(probs, image), rtol=0, atol=1e-6)


def test_spr_with_alpha_zero_ignores_the_image():
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(3 * torch.randn(1, 3, 12, 12, generator=g), dim=1)
    a = spr(probs, torch.rand(1, 3, 12, 12, generator=g), alpha=0.0)
    b = spr(probs, torch.rand(1, 3, 12, 12, generator=g), alpha=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(spr(probs, torch.rand(1, 3, 12, 12, generator=g), alpha=0.8), a, atol=1e-3)


@pytest.mark.parametrize("refiner", [PAMR(), SPR(), SPR(alpha=0.3)], ids=["pamr", "spr", "spr0.3"])
def test_output_is_a_distribution(refiner):
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(4, 0.3), size=(15, 20)).transpose(2, 0, 1).astype(np.float32)
    image = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    out = refiner(probs, image)
    assert out.shape == probs.shape and out.dtype == np.float32 and (out >= 0).all()
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-6)
    assert np.abs(out - probs).max() > 0.05  # it did refine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(2, 3, 40, 50, generator=g), dim=1)
    image = torch.rand(2, 3, 40, 50, generator=g)
    for fn in (pamr, spr):
        torch.testing.assert_close(fn(probs.cuda(), image.cuda()).cpu(), fn(probs, image), rtol=0, atol=1e-5)


def test_pamr_spr_bad_inputs():
    probs = torch.full((1, 2, 4, 5), 0.5)
    image = torch.zeros(1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"probs must be a float tensor \(B, K, H, W\)"):
        pamr(probs[0], image)
    with pytest.raises(ValueError, match=r"probs must be a float tensor"):
        pamr(probs.long(), image)
    with pytest.raises(ValueError, match=r"image must be a float tensor \(B, 3, H, W\)"):
        pamr(probs, image[:, :1])
    with pytest.raises(ValueError, match="image must be a float tensor"):
        spr(probs, image.to(torch.uint8))
    with pytest.raises(ValueError, match="differ in batch size or spatial size"):
        pamr(probs, torch.zeros(1, 3, 4, 6))
    with pytest.raises(ValueError, match="dilations"):
        pamr(probs, image, dilations=(1, 0))
    with pytest.raises(ValueError, match="alpha"):
        spr(probs, image, alpha=1.5)
    with pytest.raises(ValueError, match="scores"):
        spr(probs, image, scores=torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="iterations"):
        pamr(probs, image, iterations=-1)
    with pytest.raises(ValueError, match="uint8"):
        PAMR()(np.full((2, 4, 5), 0.5, np.float32), np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        SPR()(np.full((2, 4, 5), 0.5, np.float32), np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        SPR(alpha=-0.1)


@needs_densecrf
def test_crf_accepts_read_only_inputs():
    # Datasets hand out cached images as read-only arrays; pydensecrf needs writable buffers.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    probs = rng.random((3, 12, 16)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    expected = DenseCRF("psa")(probs.copy(), image.copy())
    image.setflags(write=False)
    probs.setflags(write=False)
    np.testing.assert_array_equal(DenseCRF("psa")(probs, image), expected)
