"""The final segmentation network: segmentation_ce against a hand computation and against
torch's CrossEntropyLoss, DeepLabNet's output grid and ASPP rates (DeepLab v3, Chen et al.
2017) at output stride 8 and 16, overfitting two synthetic images, and predict_probs against
a pass-by-pass reference (normalisation, scales, flips)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakseg.data import build_dataset
from weakseg.losses.segmentation import segmentation_ce
from weakseg.models.heads import ASPP, aspp_rates
from weakseg.models.inference import predict_probs
from weakseg.models.methods.deeplab import DeepLabNet

TINY = {"width": 8, "aspp_channels": 16}


# --------------------------------------------------------------------------------------
# segmentation_ce
# --------------------------------------------------------------------------------------


def test_ce_by_hand_with_one_ignored_pixel():
    # Two classes on a 2x2 grid; the bottom-left pixel is void (255) and must not count,
    # even though its logits (5, -5) against any label would dominate the mean.
    logits = torch.tensor([[[[2.0, 1.0], [5.0, 0.0]], [[0.0, 1.0], [-5.0, 3.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 1], [255, 1]]], dtype=torch.uint8)
    expected = (
        -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))  # (0, 0): class 0
        - math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(1.0)))  # (0, 1): class 1, a tie: log 2
        - math.log(math.exp(3.0) / (math.exp(0.0) + math.exp(3.0)))  # (1, 1): class 1
    ) / 3  # mean over the 3 labelled pixels
    loss = segmentation_ce(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[0, :, 1, 0] == 0)  # the void pixel gets no gradient


def test_ce_upsamples_logits_bilinearly_to_the_label_size():
    # A 1x2 logit grid against 1x4 labels: bilinear (align_corners=False) interpolation gives
    # the columns a, (3a + b)/4, (a + 3b)/4, b for each channel.
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([-2.0, 2.0])
    logits = torch.stack([a, b], dim=-1).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 1, 0, 1]]])
    columns = [a, (3 * a + b) / 4, (a + 3 * b) / 4, b]
    expected = sum(
        -math.log(math.exp(col[t].item()) / sum(math.exp(v) for v in col.tolist())) for col, t in zip(columns, [0, 1, 0, 1])
    ) / 4
    assert segmentation_ce(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_ce_equals_torch_cross_entropy_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (3, 12, 14), generator=g)
    target[torch.rand(3, 12, 14, generator=g) < 0.3] = 255
    ours = segmentation_ce(logits, target)
    up = F.interpolate(logits, size=(12, 14), mode="bilinear", align_corners=False)
    ref = torch.nn.CrossEntropyLoss(ignore_index=255)(up, target)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_ce_all_ignored_is_zero_with_a_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 8, 8), 255, dtype=torch.long)
    loss = segmentation_ce(logits, target)
    assert loss.item() == 0.0
    loss.backward()  # defined: no NaN from 0/0
    assert logits.grad is not None and torch.all(logits.grad == 0)


# --------------------------------------------------------------------------------------
# DeepLabNet and ASPP
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride, rates", [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_output_grid_and_aspp_rates_follow_the_stride(stride, rates):
    torch.manual_seed(0)
    model = DeepLabNet(5, "tiny_cnn", output_stride=stride, **TINY).eval()
    assert model.output_stride == stride and aspp_rates(stride) == rates
    out = model(torch.rand(2, 3, 64, 48))["seg"]
    assert out.shape == (2, 5, 64 // stride, 48 // stride)
    branches = model.head.aspp.branches
    assert branches[0][0].kernel_size == (1, 1)
    for branch, rate in zip(branches[1:4], rates):
        conv = branch[0]
        assert conv.kernel_size == (3, 3) and conv.dilation == (rate, rate) and conv.padding == (rate, rate)
    assert len(branches) == 5  # 1x1, three atrous, image pooling


def test_rates_that_do_not_scale_are_refused():
    assert aspp_rates(32) == (3, 6, 9) and aspp_rates(4) == (24, 48, 72)
    with pytest.raises(ValueError, match="output stride 5"):
        aspp_rates(5)


def test_image_pooling_is_constant_over_the_grid_and_trains_with_batch_size_one():
    torch.manual_seed(0)
    aspp = ASPP(8, rates=(1, 2, 3), channels=4, dropout=0.0).train()
    x = torch.randn(1, 8, 5, 6, requires_grad=True)
    pooling = aspp.branches[4]
    pooled = pooling(x)
    expected = torch.relu(pooling.conv.weight.view(4, 8) @ x.mean(dim=(2, 3))[0] + pooling.conv.bias)
    torch.testing.assert_close(pooled[0], expected.view(4, 1, 1).expand(4, 5, 6))
    aspp(x).sum().backward()  # batch 1 at train time: no BatchNorm on the pooled vector
    assert torch.isfinite(x.grad).all()


def test_input_norm_is_the_backbone_one():
    model = DeepLabNet(3, "tiny_cnn", **TINY)
    assert model.input_norm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert model.input_norm.std == pytest.approx((0.229, 0.224, 0.225))


def test_overfits_two_synthetic_images():
    # Images 6 and 7 of the default synthetic set are ~40 % foreground (3 classes), so
    # predicting background everywhere scores only ~0.6. 96 px at stride 8 is a 12x12 grid,
    # fine enough for the shapes; 40 AdamW steps take about half a second on one thread.
    dataset = build_dataset({"kind": "synthetic", "num_images": 8, "image_size": 96})
    samples = [dataset[6], dataset[7]]
    rgb = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    masks = torch.from_numpy(np.stack([s.mask for s in samples])).long()
    assert (masks == 0).float().mean() < 0.65
    torch.manual_seed(0)
    model = DeepLabNet(dataset.num_classes, "tiny_cnn", output_stride=8, **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    losses = []
    for _ in range(40):
        loss = segmentation_ce(model(rgb)["seg"], masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    pred = torch.from_numpy(np.stack([predict_probs(model, im, scales=(1.0,), flip=False).argmax(0) for im in rgb]))
    accuracy = (pred == masks).float().mean().item()
    foreground = masks > 0
    assert accuracy > 0.9, accuracy
    assert (pred[foreground] == masks[foreground]).float().mean() > 0.8  # not just background


# --------------------------------------------------------------------------------------
# predict_probs
# --------------------------------------------------------------------------------------


class Probe(torch.nn.Module):
    """Logits that depend on position and colour (2x2 average pooling of the input, scaled,
    3 classes); records the size of every batch it sees. It normalises its RGB input itself
    with its own statistics, so a caller that normalised first would change the result (the
    image contract: RGB in, the network normalises)."""

    mean_std = ((0.3, 0.5, 0.2), (0.2, 0.4, 0.1))

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape))
        assert 0 <= float(x.min()) and float(x.max()) <= 1, "the probe takes RGB in 0..1"
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in self.mean_std)
        return {"seg": 3.0 * F.avg_pool2d((x - mean) / std, 2, ceil_mode=True)}


def reference_probs(model, rgb, scales, flip):
    """One pass per (scale, mirror), one image at a time; mirroring by index reversal."""
    _, h, w = rgb.shape
    reverse = torch.arange(w - 1, -1, -1)
    total, passes = torch.zeros(3, h, w), 0
    for scale in scales:
        for mirrored in ([False, True] if flip else [False]):
            x = rgb[:, :, reverse] if mirrored else rgb  # RGB: the model normalises it
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)
            logits = F.interpolate(model(x)["seg"], size=(h, w), mode="bilinear", align_corners=False)
            probs = torch.softmax(logits[0], dim=0)
            total += probs[:, :, reverse] if mirrored else probs
            passes += 1
    return (total / passes).numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_predict_probs_equals_pass_by_pass_reference(flip):
    rgb = torch.rand(3, 37, 29, generator=torch.Generator().manual_seed(0))
    model = Probe()
    ours = predict_probs(model, rgb, scales=(0.5, 1.0, 1.5, 2.0), flip=flip)
    batch = 2 if flip else 1
    # every scale was run, and the maps were brought back to the input size
    assert model.sizes == [(batch, 3, 18, 14), (batch, 3, 37, 29), (batch, 3, 56, 44), (batch, 3, 74, 58)]
    assert ours.shape == (3, 37, 29) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_probs(Probe(), rgb, (0.5, 1.0, 1.5, 2.0), flip), atol=1e-6)


def test_predict_probs_of_deeplab_sums_to_one_and_is_flip_equivariant():
    torch.manual_seed(0)
    model = DeepLabNet(4, "tiny_cnn", output_stride=8, **TINY).eval()
    rgb = torch.rand(3, 37, 29, generator=torch.Generator().manual_seed(1))
    probs = predict_probs(model, rgb)
    assert probs.shape == (4, 37, 29)
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # Both calls average the same two passes per scale, mirrored: equivariant by construction.
    mirrored = predict_probs(model, rgb.flip(-1))
    np.testing.assert_allclose(probs[:, :, ::-1], mirrored, atol=1e-5)
    # uint8 input in 0..255 is read as the same image
    as_uint8 = (rgb * 255).round().to(torch.uint8)
    np.testing.assert_allclose(predict_probs(model, as_uint8), predict_probs(model, as_uint8.float() / 255), atol=1e-6)


def test_predict_probs_refuses_a_batch():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        predict_probs(Probe(), torch.rand(1, 3, 8, 8))


def test_classes_by_area_by_hand():
    from weakseg.models.inference import classes_by_area

    # 4 x 5 image, background channel 0: class 1 wins 3 pixels (15 %), class 2 one (5 %)
    probs = np.zeros((3, 4, 5), np.float32)
    probs[0] = 0.6
    probs[1, 0, :3] = 0.9
    probs[2, 3, 4] = 0.7
    probs[1, 3, 4] = 0.2  # the pixel class 2 loses goes to background (0.6), not to class 1
    np.testing.assert_array_equal(classes_by_area(probs, 0.0, 0), [0, 1, 2])
    np.testing.assert_array_equal(classes_by_area(probs, 0.05, 0), [0, 1, 2])  # 1/20 is not below 5 %
    keep = classes_by_area(probs, 0.1, 0)
    np.testing.assert_array_equal(keep, [0, 1])
    label = keep[probs[keep].argmax(axis=0)]
    assert label[3, 4] == 0 and (label == 1).sum() == 3
    # below the bar but the largest object class: kept (every image shows one object)
    np.testing.assert_array_equal(classes_by_area(probs, 0.2, 0), [0, 1])
    # no background channel (NYUv2): areas 0.6, 0.3, 0.1; only the largest survives 0.5
    flat = np.zeros((3, 1, 10), np.float32)
    flat[0, 0, :6], flat[1, 0, 6:9], flat[2, 0, 9] = 1, 1, 1
    np.testing.assert_array_equal(classes_by_area(flat, 0.5, None), [0])
    np.testing.assert_array_equal(classes_by_area(flat, 0.2, None), [0, 1])
    with pytest.raises(ValueError, match="min_area"):
        classes_by_area(flat, 1.0, None)


def test_label_map_by_hand_with_and_without_a_crf():
    from weakseg.steps.predict import CRF_MIN_PROB, label_map

    # 2 x 2 image, 4 channels; channel 3 never reaches CRF_MIN_PROB, channel 1 is not kept
    probs = np.zeros((4, 2, 2), np.float32)
    probs[0] = [[0.5, 0.1], [0.2, 0.3]]
    probs[1] = [[0.4, 0.8], [0.1, 0.1]]
    probs[2] = [[0.1, 0.1], [0.7, 0.6]]
    probs[3] = CRF_MIN_PROB / 2
    keep = np.array([0, 2, 3])
    # plain argmax over the kept channels: pixel (0, 1) goes to background, not to class 1
    np.testing.assert_array_equal(label_map(probs, keep, None), [[0, 0], [2, 2]])
    seen = {}

    def fake_crf(unary, image):
        seen["unary"], seen["image"] = unary, image
        out = np.zeros_like(unary)
        out[1] = 1.0  # the CRF's answer: its second channel everywhere
        return out

    image = np.zeros((2, 2, 3), np.uint8)
    label = label_map(probs, keep, image, fake_crf)
    # channel 3 is left out, so the CRF sees [0, 2] renormalised, and its channel 1 is class 2
    assert seen["unary"].shape == (2, 2, 2) and seen["image"] is image
    expected = probs[[0, 2]] / probs[[0, 2]].sum(axis=0, keepdims=True)
    np.testing.assert_allclose(seen["unary"], expected, rtol=1e-6)
    np.testing.assert_array_equal(label, [[2, 2], [2, 2]])
    assert label.dtype == np.uint8
