"""SEAM (Wang et al., CVPR 2020): the siamese network with its pixel correlation module and
SEAM's losses (ER, ECR, min-pooling), each against hand-computed values or naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.losses.deal import DEALTerm
from weakseg.losses.seam import (
    CrossEquivariantTerm,
    EquivariantTerm,
    PCMMinPoolTerm,
    SEAMLossConfig,
    build_seam_terms,
    ecr_loss,
    er_loss,
    max_onehot,
    min_pool_loss,
    seam_max_norm,
    top_fraction_mean,
    with_background,
)
from weakseg.losses.classification import ClassificationConfig, ClassificationTerm
from weakseg.models.methods.seam import PixelCorrelationModule, SEAMNet, pcm_affinity, pcm_input, pcm_refine

EPS = 1e-5
TRAIN_NAMES = {
    "cams", "logits", "cams_pcm", "cams_pcm_background",
    "cams_scaled", "logits_scaled", "cams_pcm_scaled", "cams_pcm_background_scaled",
}  # fmt: skip


def small_model(**kwargs) -> SEAMNet:
    torch.manual_seed(0)
    return SEAMNet(3, "tiny_cnn", width=8, output_stride=4, **kwargs)


def small_batch(batch_size: int = 4, size: int = 32) -> dict:
    gen = torch.Generator().manual_seed(1)
    rgb = torch.rand(batch_size, 3, size, size, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[:batch_size]
    depth = torch.rand(batch_size, 1, size, size, generator=gen) + 1.0
    return {"rgb": rgb, "labels": labels, "depth": depth}


# ---------------------------------------------------------------------------------------
# Naive references (python loops over scalars, float64)
# ---------------------------------------------------------------------------------------


def ref_max_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    out = torch.zeros_like(x)
    B, K, h, w = x.shape
    for b in range(B):
        for k in range(K):
            p = [[max(float(x[b, k, i, j]), 0.0) for j in range(w)] for i in range(h)]
            lo = min(min(row) for row in p)
            hi = max(max(row) for row in p)
            for i in range(h):
                for j in range(w):
                    out[b, k, i, j] = max(p[i][j] - lo - eps, 0.0) / (hi - lo + eps)
    return out


def ref_halve(x: torch.Tensor) -> torch.Tensor:
    """Bilinear resizing to exactly half the size (align_corners=False) averages 2x2 blocks."""
    B, K, h, w = x.shape
    out = torch.zeros(B, K, h // 2, w // 2, dtype=x.dtype)
    for b in range(B):
        for k in range(K):
            for i in range(h // 2):
                for j in range(w // 2):
                    out[b, k, i, j] = sum(float(x[b, k, 2 * i + di, 2 * j + dj]) for di in (0, 1) for dj in (0, 1)) / 4
    return out


def ref_er(cams, cams_scaled, labels):
    original, transformed = ref_halve(ref_max_norm(cams)), ref_max_norm(cams_scaled)
    B, C, h, w = transformed.shape
    total = 0.0
    for b in range(B):
        for c in range(C):
            for i in range(h):
                for j in range(w):
                    total += abs(float(labels[b, c]) * (float(original[b, c, i, j]) - float(transformed[b, c, i, j])))
    return total / (B * C * h * w)


def ref_ecr(cams, cams_scaled, pcm, pcm_scaled, labels, fraction):
    """SEAM's L_ECR with the original branch on a grid twice the rescaled one."""
    cams_o, cams_t = ref_halve(ref_max_norm(cams)), ref_max_norm(cams_scaled)
    pcm_o, pcm_t = ref_halve(ref_max_norm(pcm)), ref_max_norm(pcm_scaled)
    B, C, h, w = cams_t.shape
    total = 0.0
    for target_cams, prediction in ((cams_t, pcm_o), (cams_o, pcm_t)):
        per_image = []
        for b in range(B):
            mask = [1.0] + [float(v) for v in labels[b]]
            errors = []
            for i in range(h):
                for j in range(w):
                    fg = [float(target_cams[b, c, i, j]) * mask[c + 1] for c in range(C)]
                    top = max(fg)
                    target = [1.0 - top] + [v if v >= top else 0.0 for v in fg]
                    errors += [abs(target[k] - float(prediction[b, k, i, j]) * mask[k]) for k in range(C + 1)]
            errors.sort(reverse=True)
            k = int(fraction * len(errors))
            per_image.append(sum(errors[:k]) / k)
        total += sum(per_image) / B
    return total


def ref_affinity(embedding: torch.Tensor) -> torch.Tensor:
    """A_ji = ReLU(cos(e_j, e_i)) / sum_k ReLU(cos(e_j, e_k)), cos(e, e) = 1, one image."""
    d, h, w = embedding.shape
    vectors = [[float(embedding[c, p // w, p % w]) for c in range(d)] for p in range(h * w)]
    n = len(vectors)
    sim = [[0.0] * n for _ in range(n)]
    for j in range(n):
        for i in range(n):
            if i == j:
                sim[j][i] = 1.0
                continue
            dot = sum(a * b for a, b in zip(vectors[j], vectors[i]))
            norms = math.sqrt(sum(a * a for a in vectors[j])) * math.sqrt(sum(b * b for b in vectors[i]))
            sim[j][i] = max(dot / norms, 0.0) if norms > 0 else 0.0
    return torch.tensor([[v / sum(row) for v in row] for row in sim], dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# Loss functions
# ---------------------------------------------------------------------------------------


def test_seam_max_norm_equals_loop():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 1] = -1.0  # an all-negative map normalises to 0
    torch.testing.assert_close(seam_max_norm(x), ref_max_norm(x), rtol=0, atol=1e-12)
    assert seam_max_norm(x)[0, 1].abs().max() == 0


def test_er_by_hand():
    # Class 0 (present): original [[0, 2], [4, -1]] -> norm [[0, .5], [1, 0]]; rescaled
    # [[1, 1], [3, 2]] -> [[0, 0], [1, .5]]; |difference| sums to 1. Class 1 is absent: 0.
    # Mean over 1 image x 2 classes x 4 pixels = 1 / 8 (eps = 0 to keep the numbers round).
    cams = torch.tensor([[[[0.0, 2.0], [4.0, -1.0]], [[5.0, 1.0], [0.0, 3.0]]]], dtype=torch.float64)
    scaled = torch.tensor([[[[1.0, 1.0], [3.0, 2.0]], [[0.0, 7.0], [1.0, 1.0]]]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert er_loss(cams, scaled, labels, eps=0.0).item() == pytest.approx(0.125, abs=1e-15)


def test_er_equals_loop_with_rescaling():
    gen = torch.Generator().manual_seed(1)
    cams = torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=gen)
    scaled = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    assert er_loss(cams, scaled, labels).item() == pytest.approx(ref_er(cams, scaled, labels), abs=1e-12)


def test_er_is_zero_for_equivariant_maps_and_positive_otherwise():
    # Maps constant on 2x2 blocks, and the rescaled branch giving exactly those block values:
    # halving commutes with the per-map normalisation, so the two branches agree.
    gen = torch.Generator().manual_seed(2)
    blocks = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen)
    cams = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    labels = torch.ones(2, 3, dtype=torch.float64)
    assert er_loss(cams, blocks, labels).item() == pytest.approx(0.0, abs=1e-12)
    moved = blocks.clone()
    moved[0, 0, 0, 0] += 1.0
    assert er_loss(cams, moved, labels).item() > 1e-3
    assert er_loss(cams, blocks.roll(1, dims=3), labels).item() > 1e-3


def test_max_onehot_and_background_by_hand():
    fg = torch.tensor([0.2, 0.7, 0.7, 0.1]).view(1, 4, 1, 1)  # two classes tie at the maximum
    full = with_background(fg)
    assert full.flatten().tolist() == pytest.approx([0.3, 0.2, 0.7, 0.7, 0.1])
    assert max_onehot(full).flatten().tolist() == pytest.approx([0.3, 0.0, 0.7, 0.7, 0.0])


def test_top_fraction_mean_by_hand():
    errors = torch.stack([torch.arange(10.0), torch.ones(10)])
    # 20 % of 10 values = the 2 largest: (9 + 8) / 2 = 8.5 and 1; batch mean 4.75.
    assert top_fraction_mean(errors, 0.2).item() == pytest.approx(4.75)
    assert top_fraction_mean(errors, 0.01).item() == pytest.approx(5.0)  # at least one value: (9 + 1) / 2
    assert top_fraction_mean(errors, 1.0).item() == pytest.approx((4.5 + 1.0) / 2)


def test_ecr_equals_loop_and_trains_only_the_revised_cams():
    gen = torch.Generator().manual_seed(3)
    cams = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    scaled = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    pcm = torch.rand(2, 4, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    pcm_scaled = torch.rand(2, 4, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    for fraction in (0.2, 0.5, 1.0):
        value = ecr_loss(cams, scaled, pcm, pcm_scaled, labels, fraction)
        expected = ref_ecr(cams.detach(), scaled.detach(), pcm.detach(), pcm_scaled.detach(), labels, fraction)
        assert value.item() == pytest.approx(expected, abs=1e-12), fraction
    grads = torch.autograd.grad(value, [cams, scaled, pcm, pcm_scaled], allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads[:2])  # targets are detached
    assert all(g.abs().sum() > 0 for g in grads[2:])


def test_ecr_top_k_selects_the_largest_errors():
    # One image, one class, both branches on a 1x4 grid (no resizing), eps = 0: the min-max
    # normalisation leaves maps with min 0 and max 1 unchanged.
    def maps(*rows):
        return torch.tensor(rows, dtype=torch.float64).view(1, len(rows), 1, 4)

    labels = torch.ones(1, 1, dtype=torch.float64)
    cams, cams_scaled = maps([0, 1, 0, 0]), maps([1, 0, 0.5, 0])
    # Original revised CAM vs the rescaled CAM's target [bg 0, 1, .5, 1 | fg 1, 0, .5, 0]:
    # errors bg 0, 0, 0, .2 and fg 0, 0, .5, .5.
    pcm = maps([0, 1, 0.5, 0.8], [1, 0, 0, 0.5])
    # Rescaled revised CAM vs the original CAM's target [bg 1, 0, 1, 1 | fg 0, 1, 0, 0]:
    # errors bg 0, 0, 0, 0 and fg 0, 0, 0, .25.
    pcm_scaled = maps([1, 0, 1, 1], [0, 1, 0, 0.25])
    expected = {
        0.25: (0.5 + 0.5) / 2 + 0.25 / 2,  # k = 2 of 8
        0.375: (0.5 + 0.5 + 0.2) / 3 + 0.25 / 3,  # k = 3
        0.5: (0.5 + 0.5 + 0.2 + 0) / 4 + 0.25 / 4,  # k = 4
    }
    for fraction, value in expected.items():
        got = ecr_loss(cams, cams_scaled, pcm, pcm_scaled, labels, fraction, eps=0.0)
        assert got.item() == pytest.approx(value, abs=1e-12), fraction


def test_min_pool_by_hand():
    pcm = torch.tensor([[[0.1, 0.5], [0.9, 0.3]], [[0.8, 0.0], [0.0, 0.4]]]).unsqueeze(0).repeat(2, 1, 1, 1)
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # image 0: max over both classes [[.8, .5], [.9, .4]], smallest quarter (1 of 4) = .4;
    # image 1: class 0 only, smallest = .1; mean .25.
    assert min_pool_loss(pcm, labels).item() == pytest.approx(0.25)
    # half of the pixels: image 0 (.4 + .5) / 2, image 1 (.1 + .3) / 2.
    assert min_pool_loss(pcm, labels, 0.5).item() == pytest.approx((0.45 + 0.2) / 2)
    assert min_pool_loss(pcm, torch.zeros(2, 2)).item() == 0.0


# ---------------------------------------------------------------------------------------
# Pixel correlation module
# ---------------------------------------------------------------------------------------


def test_pcm_affinity_equals_loop_rows_are_stochastic():
    gen = torch.Generator().manual_seed(4)
    embedding = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=gen)
    embedding[1, :, 1, 1] = 0.0  # a zero embedding: only itself as neighbour
    affinity = pcm_affinity(embedding)
    for b in range(2):
        torch.testing.assert_close(affinity[b], ref_affinity(embedding[b]), rtol=0, atol=1e-12)
    assert (affinity >= 0).all()
    torch.testing.assert_close(affinity.sum(dim=2), torch.ones(2, 9, dtype=torch.float64), rtol=0, atol=1e-12)
    assert affinity[1, 4].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_pcm_refine_equals_loop_and_keeps_constants():
    gen = torch.Generator().manual_seed(5)
    affinity = pcm_affinity(torch.randn(1, 5, 2, 3, dtype=torch.float64, generator=gen))
    cams = torch.rand(1, 2, 2, 3, dtype=torch.float64, generator=gen)
    refined = pcm_refine(cams, affinity)
    for k in range(2):
        for j in range(6):
            expected = sum(float(affinity[0, j, i]) * float(cams[0, k, i // 3, i % 3]) for i in range(6))
            assert refined[0, k, j // 3, j % 3].item() == pytest.approx(expected, abs=1e-12)
    constant = torch.full((1, 2, 2, 3), 0.7, dtype=torch.float64)
    torch.testing.assert_close(pcm_refine(constant, affinity), constant, rtol=0, atol=1e-12)
    module = PixelCorrelationModule(6, dim=8)
    out = module(torch.full((2, 3, 4, 4), 0.25), torch.randn(2, 6, 4, 4), torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(out, torch.full((2, 3, 4, 4), 0.25), rtol=0, atol=1e-6)


def test_pcm_input_by_hand():
    # Two classes, two pixels: class 0 [2, -1] -> [1, 0]; class 1 [1, 4] -> [.25, 1].
    # Pixel 0: class 0 wins (bg 0), pixel 1: class 1 wins (bg 0).
    cams = torch.tensor([[[[2.0, -1.0]], [[1.0, 4.0]]]], dtype=torch.float64)
    out = pcm_input(cams, eps=0.0)
    assert out[0, :, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert out[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]
    cams = torch.tensor([[[[2.0, 1.0]], [[1.0, 4.0]]]], dtype=torch.float64)  # pixel 0: [1, .25]; pixel 1: [.5, 1]
    out = pcm_input(cams, eps=0.0)
    assert out[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]
    cams = torch.tensor([[[[4.0, 1.0]], [[4.0, 2.0]]]], dtype=torch.float64)  # pixel 1: [.25, .5] -> bg .5
    assert pcm_input(cams, eps=0.0)[0, :, 0, 1].tolist() == [0.5, 0.0, 0.5]


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------


def test_outputs_in_train_and_eval_mode_and_one_pass_in_eval():
    model = small_model()
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    images = small_batch(2, 40)["rgb"]
    model.train()
    out = model(images)
    assert set(out) == TRAIN_NAMES
    assert calls == [(2, 3, 40, 40), (2, 3, 12, 12)]  # round(0.3 * 40) = 12
    assert out["cams"].shape == out["cams_pcm"].shape == (2, 3, 10, 10)
    assert out["cams_pcm_background"].shape == (2, 1, 10, 10)
    assert out["cams_scaled"].shape == out["cams_pcm_scaled"].shape == (2, 3, 3, 3)
    assert out["logits"].shape == out["logits_scaled"].shape == (2, 3)
    torch.testing.assert_close(out["logits"], out["cams"].mean(dim=(2, 3)))
    calls.clear()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"cams", "logits", "cams_pcm", "cams_pcm_background"}
    assert SEAMNet.inference_output in out
    assert len(calls) == 1
    # The revised CAM is a convex combination of [1 - max, one-hot max]: in [0, 1], and the
    # channels of every pixel sum to 1 (no ties at random init).
    assert out["cams_pcm"].min() >= 0 and out["cams_pcm"].max() <= 1
    torch.testing.assert_close(out["cams_pcm"].sum(dim=1) + out["cams_pcm_background"][:, 0], torch.ones(2, 10, 10))
    assert model.background_channel is None and model.num_classes == 3
    names = [name for name, _ in model.named_parameters()]
    assert {name.split(".")[0] for name in names} == {"backbone", "head", "pcm"}
    assert {"pcm.embed.weight", "pcm.project.weight", "head.classifier.weight"} <= set(names)


def test_er_of_the_network_is_zero_without_rescaling():
    batch = small_batch(2, 32)
    model = small_model(scale=1.0).train()
    out = model(batch["rgb"])
    torch.testing.assert_close(out["cams_scaled"], out["cams"], rtol=0, atol=0)
    assert EquivariantTerm()(out, batch).item() == 0.0
    out = small_model(scale=0.5).train()(batch["rgb"])
    assert EquivariantTerm()(out, batch).item() > 1e-4


def seam_terms():
    return [ClassificationTerm(ClassificationConfig(), ["cams", "cams_scaled"]), *build_seam_terms(SEAMLossConfig())]


def test_every_term_contributes_a_gradient():
    batch = small_batch(4, 32)
    model = small_model(scale=0.5).train()
    outputs = model(batch["rgb"])
    groups = {
        "backbone": [p for n, p in model.named_parameters() if n.startswith("backbone.")],
        "head": [model.head.classifier.weight],
        "pcm": [model.pcm.embed.weight, model.pcm.project.weight],
    }
    reaches = {}
    for term in seam_terms():
        value = term(outputs, batch, model.background_channel)
        assert torch.isfinite(value) and value.item() > 0, term.name
        reaches[term.name] = set()
        for group, params in groups.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            if any(g is not None and g.abs().sum() > 0 for g in grads):
                reaches[term.name].add(group)
    # As in SEAM's code: the PCM reads detached CAMs and features, so ECR and the min-pooling
    # loss train only the PCM layers; ER and classification train the backbone and CAM head.
    assert reaches == {
        "cls": {"backbone", "head"},
        "er": {"backbone", "head"},
        "ecr": {"pcm"},
        "min_pool": {"pcm"},
    }
    # With detach_pcm_features=False the PCM losses reach the backbone as well.
    model = small_model(scale=0.5, detach_pcm_features=False).train()
    value = CrossEquivariantTerm()(model(batch["rgb"]), batch)
    grads = torch.autograd.grad(value, list(model.backbone.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_deal_on_seam_reads_the_network_outputs():
    batch = small_batch(2, 32)
    model = small_model(scale=0.5).train()
    outputs = model(batch["rgb"])
    term = DEALTerm(reads=("cams", "cams_pcm"), cam_norm="max")  # as configs/seam_voc_deal.yaml, max-normalised
    value = term(outputs, batch, model.background_channel)
    assert torch.isfinite(value)
    grad = torch.autograd.grad(value, model.pcm.project.weight)[0]
    assert grad.abs().sum() > 0


def test_config_weights_and_validation():
    assert [t.name for t in build_seam_terms(SEAMLossConfig(ecr=0.0))] == ["er", "min_pool"]
    terms = build_seam_terms(SEAMLossConfig(er=2.0, warmup_epochs=1))
    assert terms[0].weight_at(0) == 0.0 and terms[0].weight_at(1) == 2.0
    with pytest.raises(ConfigError, match="ecr_top_fraction"):
        build_seam_terms(SEAMLossConfig(ecr_top_fraction=0.0))
    with pytest.raises(ConfigError, match="loss.seam.er"):
        build_seam_terms(SEAMLossConfig(er=-1.0))
    with pytest.raises(ConfigError, match="reads"):
        CrossEquivariantTerm()({"cams": torch.zeros(1, 1, 2, 2)}, {"labels": torch.ones(1, 1)})
    assert PCMMinPoolTerm().reads == ("cams_pcm", "cams_pcm_scaled")
    with pytest.raises(ValueError, match="scale"):
        SEAMNet(3, "tiny_cnn", scale=0.0, width=8)
