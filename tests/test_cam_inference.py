"""CAM inference orders (weakseg.models.inference): each official convention against a loop
that follows its code's steps one pass at a time (IRN make_cam.py; SEAM's and hfpl's
infer_cam), on a probe whose scores are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakseg.models.inference import infer_cams


class Probe(torch.nn.Module):
    """Scores with negative and positive parts that depend on position and colour: 4x4
    average pooling of the RGB, mixed into 3 classes, minus 0.4."""

    def __init__(self, order: str | None = None):
        super().__init__()
        self.mix = torch.tensor([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0], [0.3, 0.3, -1.2]], dtype=torch.float64)
        if order is not None:
            self.cam_order = order

    def forward(self, x):
        pooled = F.avg_pool2d(x.double(), 4, ceil_mode=True)
        return {"cams": torch.einsum("kc,bchw->bkhw", self.mix, pooled) * 3 - 0.4}


def passes(model, image, scales, flip):
    """Each (scale, mirror) pass's raw score grid, un-mirrored, in pass order."""
    _, _, h, w = image.shape
    out = []
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = image if scale == 1.0 else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for mirrored in ([False, True] if flip else [False]):
            scores = model(scaled.flip(-1) if mirrored else scaled)["cams"][0]
            out.append((scores, mirrored))
    return out


def reference(model, image, classes, scales, flip, order):
    _, _, h, w = image.shape
    up = lambda x: F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]  # noqa: E731
    total = torch.zeros(len(classes), h, w, dtype=torch.float64)
    for scores, mirrored in passes(model, image, scales, flip):
        scores = scores[classes]
        if order == "irn":  # make_cam.py: relu on the grid, upsample, sum
            m = up(F.relu(scores))
        elif order == "seam":  # infer_cam: raw scores upsampled, summed
            m = up(scores)
        else:
            m = F.relu(up(scores))
        total += m.flip(-1) if mirrored else m
    if order == "seam":  # sum_cam[sum_cam < 0] = 0; then min-max with 1e-5, below min + 1e-5 -> 0
        total = total.clamp_min(0)
        low = total.amin(dim=(1, 2), keepdim=True)
        high = total.amax(dim=(1, 2), keepdim=True)
        total = torch.where(total < low + 1e-5, torch.zeros_like(total), total)
        return ((total - low - 1e-5) / (high - low + 1e-5)).clamp_min(0)
    return total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)


@pytest.mark.parametrize("order", ["irn", "seam", "upsample_relu"])
def test_each_order_equals_its_code_step_by_step(order):
    image = torch.rand(1, 3, 30, 26, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Probe()
    classes = [0, 2]
    ours = infer_cams(model, image, classes, scales=(0.5, 1.0, 1.5), flip=True, order=order)
    expected = reference(model, image, classes, (0.5, 1.0, 1.5), True, order).float().numpy()
    assert abs(ours - expected).max() < 1e-6


def test_the_orders_differ_and_auto_follows_the_model():
    image = torch.rand(1, 3, 30, 26, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    maps = {o: infer_cams(Probe(), image, [0, 1, 2], scales=(1.0,), flip=False, order=o) for o in ("irn", "seam", "upsample_relu")}
    assert abs(maps["irn"] - maps["upsample_relu"]).max() > 1e-3
    assert abs(maps["seam"] - maps["irn"]).max() > 1e-3
    for order in ("irn", "seam"):
        auto = infer_cams(Probe(order), image, [0, 1, 2], scales=(1.0,), flip=False)
        assert abs(auto - maps[order]).max() == 0


def test_methods_declare_their_official_order():
    from weakseg.models.methods.cam import CAMNet
    from weakseg.models.methods.seam import SEAMNet
    from weakseg.models.methods.vit_cam import ViTCAMNet

    assert (CAMNet.cam_order, SEAMNet.cam_order, ViTCAMNet.cam_order) == ("irn", "seam", "irn")
