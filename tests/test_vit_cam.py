"""ViTCAMNet (WeakTr-style coarse + fine CAM): the attention-returning ViT forward equals
timm's own, the adaptive attention fusion and the fine CAM equal brute-force loops, output
names and shapes, one AdamW step lowers the classification loss of both branches, and the
gradients reach the parameters of each branch (with WeakTr's stop-gradient and without)."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from weakseg.errors import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="timm is not installed (pip install -r requirements.lock)"
)

# A tiny DeiT: 2 blocks, 2 heads, width 48 (timm create_model options through build_backbone).
TINY = dict(depth=2, embed_dim=48, num_heads=2)


pytestmark = pytest.mark.usefixtures("single_thread")


def make(num_classes: int = 3, seed: int = 0, **kwargs):
    from weakseg.models.methods.vit_cam import ViTCAMNet

    torch.manual_seed(seed)
    return ViTCAMNet(num_classes, "deit_tiny", **{**TINY, **kwargs})


def batch(seed: int = 1, size=(32, 48), b: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, *size, generator=g)  # RGB in 0..1: the network normalises it


# --------------------------------------------------------------------------------------
# The attention-returning forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("train_mode", [False, True])
def test_forward_with_attention_equals_timm(output_stride, train_mode):
    """Tokens after the final norm equal timm's forward_features on the same weights, and
    each block's output equals timm's own block; attention maps are row-stochastic."""
    from weakseg.models.methods.vit_cam import attention_block_forward, vit_embed, vit_forward_with_attention

    model = make(output_stride=output_stride)
    model.train(train_mode)  # no dropout / drop path configured: train mode is deterministic too
    vit = model.backbone.model
    x = batch()
    with torch.no_grad():
        tokens, attentions = vit_forward_with_attention(vit, vit_embed(vit, x)[0], final_norm=True)
        reference = vit.forward_features(x)
        torch.testing.assert_close(tokens, reference, atol=1e-5, rtol=0)
        h = vit_embed(vit, x)[0]
        for blk in vit.blocks:
            mine, probs = attention_block_forward(blk, h)
            torch.testing.assert_close(mine, blk(h), atol=1e-5, rtol=0)
            h = mine
    n = (32 // output_stride) * (48 // output_stride) + 1  # + DeiT's class token
    assert len(attentions) == 2
    for a in attentions:
        assert a.shape == (2, 2, n, n)
        assert a.min() >= 0
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, n), atol=1e-6, rtol=0)


def test_attention_probabilities_equal_a_hand_computed_softmax():
    """Block 0's attention equals softmax(q k^T / sqrt(d)) computed from its qkv weights by hand."""
    from weakseg.models.methods.vit_cam import attention_block_forward, vit_embed

    vit = make().backbone.model.eval()
    with torch.no_grad():
        x = vit_embed(vit, batch())[0]
        blk = vit.blocks[0]
        _, probs = attention_block_forward(blk, x)
        y = blk.norm1(x)
        d, heads = 48, 2
        hd = d // heads
        wq, wk, _ = blk.attn.qkv.weight.split(d)
        bq, bk, _ = blk.attn.qkv.bias.split(d)
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            q = y @ wq[sl].T + bq[sl]
            k = y @ wk[sl].T + bk[sl]
            expected = torch.softmax(q @ k.transpose(1, 2) / hd**0.5, dim=-1)
            torch.testing.assert_close(probs[:, head], expected, atol=1e-6, rtol=0)


def test_class_tokens_initialised_from_the_checkpoint_token_reproduce_timm():
    """With C = 1 class token started from DeiT's class token and its position embedding,
    the token sequence is timm's own, so the forward equals timm's."""
    model = make(num_classes=1, class_tokens=True).eval()
    vit = model.backbone.model
    torch.testing.assert_close(model.class_tokens, vit.cls_token)
    torch.testing.assert_close(model.class_pos_embed, vit.pos_embed[:, :1])
    x = batch()
    with torch.no_grad():
        tokens, _, _ = model.tokens_and_attention(x)
        torch.testing.assert_close(vit.norm(tokens), vit.forward_features(model.input_norm(x)), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Adaptive attention fusion and the fine CAM against brute force
# --------------------------------------------------------------------------------------


def test_fusion_weights_fused_map_and_propagation_equal_loops():
    from weakseg.models.methods.vit_cam import AdaptiveAttentionFusion, fuse_attention, propagate_cam

    g = torch.Generator().manual_seed(3)
    b, maps, n, c, h, w = 2, 4, 5, 3, 2, 2
    attn = torch.softmax(torch.randn(b, maps, n, n, generator=g, dtype=torch.float64), dim=-1)

    # Known weights: a hand-written fused map and fine CAM.
    weights = torch.tensor([[0.1, 0.5, 0.9, 0.3], [1.0, 0.0, 0.25, 0.75]], dtype=torch.float64)
    fused = fuse_attention(attn, weights)
    for bi, i, j in itertools.product(range(b), range(n), range(n)):
        expected = sum(weights[bi, m] * attn[bi, m, i, j] for m in range(maps)) / maps
        assert abs(fused[bi, i, j].item() - expected.item()) < 1e-12
    patch = fused[:, 1:, 1:]  # one prefix token, a 2 x 2 patch grid
    cam = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    fine = propagate_cam(patch, cam)
    for bi, k, i in itertools.product(range(b), range(c), range(h * w)):
        expected = sum(patch[bi, i, j] * cam[bi, k, j // w, j % w] for j in range(h * w))
        assert abs(fine[bi, k, i // w, i % w].item() - expected.item()) < 1e-12

    # The excitation MLP, written out: max-pool -> W1 -> ReLU -> W2 -> sigmoid.
    for pool in ("max", "avg"):
        torch.manual_seed(0)
        aaf = AdaptiveAttentionFusion(maps, reduction=2, pool=pool).double()
        got = aaf(attn)
        w1, w2 = aaf.fc1.weight, aaf.fc2.weight
        for bi in range(b):
            pooled = torch.stack(
                [attn[bi, m].max() if pool == "max" else attn[bi, m].sum() / (n * n) for m in range(maps)]
            )
            hidden = torch.clamp(w1 @ pooled, min=0)
            expected = 1 / (1 + torch.exp(-(w2 @ hidden)))
            torch.testing.assert_close(got[bi], expected, atol=1e-12, rtol=0)
        assert got.shape == (b, maps) and ((got > 0) & (got < 1)).all()
    # Average pooling of a row-stochastic map is the constant 1/N: why WeakTr's recipe uses max.
    constant = torch.full((b, maps), 1 / n, dtype=torch.float64)
    torch.testing.assert_close(AdaptiveAttentionFusion(maps, pool="avg").pooled(attn), constant)


@pytest.mark.parametrize("class_tokens", [False, True])
def test_model_fine_cam_equals_brute_force_from_its_attention(class_tokens):
    """cams_fine = (1/L sum_i w_i A_i)[patches, patches] @ seed, seed = ReLU(coarse) (patchcam)
    or cross-attention * ReLU(coarse) (class tokens), by explicit loops over the model's own
    attention maps and fusion weights."""
    model = make(class_tokens=class_tokens).eval()
    with torch.no_grad():
        out = model(batch(size=(32, 32)), return_attention=True)
    attn, weights, coarse, fine = out["attention"], out["fusion_weights"], out["cams_coarse"], out["cams_fine"]
    b, maps, n_tok, _ = attn.shape
    c, h, w = coarse.shape[1:]
    p = n_tok - h * w
    assert p == (3 if class_tokens else 1)
    for bi in range(b):
        fused = sum(weights[bi, m] * attn[bi, m] for m in range(maps)) / maps
        for k in range(c):
            seed = torch.relu(coarse[bi, k]).flatten()
            if class_tokens:
                seed = seed * fused[k, p:]
            expected = fused[p:, p:] @ seed
            torch.testing.assert_close(fine[bi, k].flatten(), expected, atol=1e-6, rtol=1e-5)
    assert (fine >= 0).all()


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 48), (64, 64)])
@pytest.mark.parametrize("class_tokens", [False, True])
def test_output_names_and_shapes(size, class_tokens):
    model = make(num_classes=4, class_tokens=class_tokens).eval()
    with torch.no_grad():
        out = model(batch(size=size, b=3))
    grid = (size[0] // 16, size[1] // 16)
    expected = {"cams_coarse", "cams_fine", "cams", "logits", "logits_coarse", "logits_fine"}
    if class_tokens:
        expected |= {"logits_tokens", "token_scores"}
    assert set(out) == expected
    for name in ("cams_coarse", "cams_fine", "cams"):
        assert out[name].shape == (3, 4, *grid)
    for name in ("logits", "logits_coarse", "logits_fine"):
        assert out[name].shape == (3, 4)
    assert out["cams"] is out["cams_coarse"]  # the trainable raw scores, as for every method
    assert model.inference_output in out and model.background_channel is None and model.num_classes == 4
    torch.testing.assert_close(out["logits_coarse"], out["cams_coarse"].mean(dim=(2, 3)))
    torch.testing.assert_close(out["logits_fine"], out["cams_fine"].mean(dim=(2, 3)))
    if class_tokens:
        assert out["token_scores"].shape == (3, 4, 1, 1)
        torch.testing.assert_close(out["logits"], out["logits_tokens"])
    else:
        torch.testing.assert_close(out["logits"], out["logits_coarse"])


def test_output_stride_8_grid_and_inference():
    from weakseg.models.inference import infer_cams

    model = make(output_stride=8).eval()
    with torch.no_grad():
        out = model(batch(size=(32, 48)))
    assert out["cams_coarse"].shape == (2, 3, 4, 6) and out["cams_fine"].shape == (2, 3, 4, 6)
    cams = infer_cams(model, batch(b=1), [0, 2], scales=(1.0,), output=model.inference_output)
    assert cams.shape == (2, 32, 48)


def test_backbone_parameters_live_under_backbone_and_timm_checkpoints_load(tmp_path):
    from weakseg.models.backbones.weights import save_weights

    model = make(class_tokens=True)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("backbone.model.blocks.") for n in names)
    assert {n for n in names if not n.startswith("backbone.")} == {
        "head.weight", "head.bias", "fusion.fc1.weight", "fusion.fc2.weight", "class_tokens", "class_pos_embed"
    }
    path = save_weights(model.backbone, tmp_path / "deit.pth")  # timm key names
    loaded = make(class_tokens=True, seed=5, weights=str(path))
    for (k, a), (_, b) in zip(model.backbone.state_dict().items(), loaded.backbone.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    torch.testing.assert_close(loaded.class_tokens, model.backbone.model.cls_token.expand(1, 3, -1))


def test_bad_inputs():
    from weakseg.models.methods.vit_cam import ViTCAMNet

    with pytest.raises(ConfigError, match="ViT backbone"):
        ViTCAMNet(3, "tiny_cnn")
    with pytest.raises(ValueError, match="divisible"):
        make()(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ConfigError, match="pool"):
        make(pool="median")


# --------------------------------------------------------------------------------------
# Training signal
# --------------------------------------------------------------------------------------


def test_one_adamw_step_lowers_the_classification_loss_of_both_branches():
    from weakseg.losses.classification import ClassificationConfig, ClassificationTerm

    model = make(reduction=1).train()
    term = ClassificationTerm(ClassificationConfig(), ["cams_coarse", "cams_fine"])
    coarse_only = ClassificationTerm(ClassificationConfig(), ["cams_coarse"])
    fine_only = ClassificationTerm(ClassificationConfig(), ["cams_fine"])
    x = batch(b=4, size=(32, 32))
    data = {"labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    out = model(x)
    before = (coarse_only(out, data).item(), fine_only(out, data).item())
    loss = term(out, data)
    assert loss.item() == pytest.approx((before[0] + before[1]) / 2, rel=1e-6)  # deal eq. 13-14 averaging
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        out = model(x)
        after = (coarse_only(out, data).item(), fine_only(out, data).item())
    assert after[0] < before[0] and after[1] < before[1], (before, after)


def _grads(model, output: str):
    model.zero_grad()
    out = model(batch(size=(32, 32)))
    (out[output] * torch.linspace(-1, 1, out[output].numel()).view_as(out[output])).sum().backward()
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in model.named_parameters()}


def test_gradients_reach_both_branches_with_weaktr_stop_gradient():
    model = make(reduction=1)
    coarse = _grads(model, "cams_coarse")
    assert coarse["head.weight"] and coarse["backbone.model.blocks.0.attn.qkv.weight"]
    assert coarse["backbone.model.patch_embed.proj.weight"]
    assert not coarse["fusion.fc1.weight"] and not coarse["fusion.fc2.weight"]

    fine = _grads(model, "cams_fine")
    assert fine["fusion.fc1.weight"] and fine["fusion.fc2.weight"]
    # WeakTr detaches the attention maps and the coarse CAM in the fine branch.
    assert not any(v for n, v in fine.items() if n.startswith(("backbone.", "head.")))


def test_without_stop_gradient_the_fine_branch_trains_the_backbone():
    model = make(reduction=1, detach=False)
    fine = _grads(model, "cams_fine")
    assert fine["fusion.fc1.weight"] and fine["head.weight"]
    assert fine["backbone.model.blocks.0.attn.qkv.weight"] and fine["backbone.model.blocks.1.attn.qkv.weight"]


def test_class_token_scores_feed_the_classification_term():
    from weakseg.losses.classification import ClassificationConfig, ClassificationTerm

    model = make(class_tokens=True)
    out = model(batch(size=(32, 32)))
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    term = ClassificationTerm(ClassificationConfig(), ["token_scores"])
    expected = torch.nn.functional.multilabel_soft_margin_loss(out["logits_tokens"], labels)
    value = term(out, {"labels": labels})
    torch.testing.assert_close(value, expected)
    value.backward()
    assert model.class_tokens.grad.abs().sum() > 0
