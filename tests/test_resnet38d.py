"""Wide ResNet-38d (psa / SEAM backbone): output size and stride, the parameter count and the
state-dict names/shapes against a layer table written out here by hand, loading synthetic
weights files (safetensors and .pth) under the converted-ImageNet names, clear errors for bad
files, SEAM's freezing, and the `build_backbone` registration.

The real network has 105M parameters: files are round-tripped with the same-named network at
1/16 width (`width_divisor=16`); the full width is checked without writing files."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from weakseg.errors import ConfigError, DataError
from weakseg.models.backbones import available_backbones, build_backbone
from weakseg.models.backbones.norm import IMAGENET_NORM
from weakseg.models.backbones.resnet38d import ResNet38d

SMALL = 16  # width divisor for the file round trips


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def full_model() -> ResNet38d:
    torch.manual_seed(0)
    return ResNet38d(output_stride=8).eval()


# ----------------------------------------------------------------------------------------
# The reference layer table (psa's network/resnet38d.py, the names convert_mxnet_to_torch
# writes), spelled out independently of the implementation.
# ----------------------------------------------------------------------------------------

# (unit, in, mid, out, projection shortcut?) for the two-3x3 units
PLAIN_UNITS = [
    ("b2", 64, 128, 128, True), ("b2_1", 128, 128, 128, False), ("b2_2", 128, 128, 128, False),
    ("b3", 128, 256, 256, True), ("b3_1", 256, 256, 256, False), ("b3_2", 256, 256, 256, False),
    ("b4", 256, 512, 512, True), ("b4_1", 512, 512, 512, False), ("b4_2", 512, 512, 512, False),
    ("b4_3", 512, 512, 512, False), ("b4_4", 512, 512, 512, False), ("b4_5", 512, 512, 512, False),
    ("b5", 512, 512, 1024, True), ("b5_1", 1024, 512, 1024, False), ("b5_2", 1024, 512, 1024, False),
]
# (unit, in, 1x1 out, 3x3 out, 1x1 out) for the bottlenecks
BOTTLENECKS = [("b6", 1024, 512, 1024, 2048), ("b7", 2048, 1024, 2048, 4096)]
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def reference_shapes(d: int = 1) -> dict[str, tuple[int, ...]]:
    """name -> shape of every state-dict entry, channels divided by `d`."""
    shapes: dict[str, tuple[int, ...]] = {"conv1a.weight": (64 // d, 3, 3, 3)}

    def bn(name, c):
        for f in BN_FIELDS:
            shapes[f"{name}.{f}"] = (c,)

    for unit, cin, mid, cout, proj in PLAIN_UNITS:
        cin, mid, cout = cin // d, mid // d, cout // d
        bn(f"{unit}.bn_branch2a", cin)
        shapes[f"{unit}.conv_branch2a.weight"] = (mid, cin, 3, 3)
        bn(f"{unit}.bn_branch2b1", mid)
        shapes[f"{unit}.conv_branch2b1.weight"] = (cout, mid, 3, 3)
        if proj:
            shapes[f"{unit}.conv_branch1.weight"] = (cout, cin, 1, 1)
    for unit, cin, c1, c2, c3 in BOTTLENECKS:
        cin, c1, c2, c3 = cin // d, c1 // d, c2 // d, c3 // d
        bn(f"{unit}.bn_branch2a", cin)
        shapes[f"{unit}.conv_branch2a.weight"] = (c1, cin, 1, 1)
        bn(f"{unit}.bn_branch2b1", c1)
        shapes[f"{unit}.conv_branch2b1.weight"] = (c2, c1, 3, 3)
        bn(f"{unit}.bn_branch2b2", c2)
        shapes[f"{unit}.conv_branch2b2.weight"] = (c3, c2, 1, 1)
        shapes[f"{unit}.conv_branch1.weight"] = (c3, cin, 1, 1)
    bn("bn7", 4096 // d)
    return shapes


def hand_parameter_count() -> int:
    """Learnable parameters, counted from the layer list (BN: weight + bias per channel)."""
    total = 64 * 3 * 9  # conv1a
    for _, cin, mid, cout, proj in PLAIN_UNITS:
        total += 2 * cin + cin * mid * 9 + 2 * mid + mid * cout * 9 + (cin * cout if proj else 0)
    for _, cin, c1, c2, c3 in BOTTLENECKS:
        total += 2 * cin + cin * c1 + 2 * c1 + c1 * c2 * 9 + 2 * c2 + c2 * c3 + cin * c3
    return total + 2 * 4096  # bn7


def random_reference_state(d: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in reference_shapes(d).items():
        t = torch.randn(shape, generator=g)
        state[name] = t.abs() + 0.5 if name.endswith("running_var") else t
    return state


def save(state: dict[str, torch.Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


# ----------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------


def test_state_dict_names_and_shapes_are_the_reference(full_model):
    ours = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    expected = reference_shapes()
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:5], sorted(set(expected) - set(ours))[:5])
    assert ours == expected
    for name in ("conv1a.weight", "b2.conv_branch2a.weight", "b4_5.bn_branch2b1.running_var",
                 "b6.conv_branch2b2.weight", "b7.conv_branch1.weight", "bn7.running_mean"):
        assert name in ours
    assert not any("num_batches_tracked" in k for k in ours)  # the converted MXNet file has none
    assert list(ours) == list(expected)  # same order as the reference module


def test_parameter_count(full_model):
    count = sum(p.numel() for p in full_model.parameters())
    assert count == hand_parameter_count() == 105_070_912


def test_output_shape_stride_and_norm(full_model):
    assert full_model.out_channels == 4096 and full_model.output_stride == 8
    assert full_model.input_norm == IMAGENET_NORM
    with torch.no_grad():
        for (h, w), (fh, fw) in {(32, 32): (4, 4), (33, 47): (5, 6), (24, 9): (3, 2)}.items():
            out = full_model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 4096, fh, fw)  # ceil(size / 8)
        assert torch.isfinite(out).all() and (out >= 0).all()  # ends with BN + ReLU


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_other_strides_same_weights(output_stride):
    model = ResNet38d(output_stride=output_stride, width_divisor=SMALL).eval()
    assert set(model.state_dict()) == set(reference_shapes(SMALL))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 40))
    assert out.shape == (1, 4096 // SMALL, -(-65 // output_stride), -(-40 // output_stride))


def test_dilation_scheme_matches_psa():
    m = ResNet38d(output_stride=8, width_divisor=SMALL)
    for unit in ("b2", "b3", "b4"):
        assert getattr(m, unit).conv_branch2a.stride == (2, 2)
        assert getattr(m, unit).conv_branch1.stride == (2, 2)
    assert m.b5.conv_branch2a.stride == (1, 1) and m.b5.conv_branch2a.dilation == (1, 1)
    assert m.b5.conv_branch2b1.dilation == (2, 2)
    assert m.b5_2.conv_branch2a.dilation == (2, 2) and m.b5_2.conv_branch2a.padding == (2, 2)
    assert m.b6.conv_branch2a.stride == (1, 1) and m.b6.conv_branch2b1.dilation == (4, 4)
    assert m.b7.conv_branch2b1.dilation == (4, 4) and m.b7.conv_branch2b1.padding == (4, 4)
    assert [mod.p for mod in m.modules() if isinstance(mod, nn.Dropout2d)] == [0.3, 0.3, 0.5, 0.5]
    m16 = ResNet38d(output_stride=16, width_divisor=SMALL)
    assert m16.b5.conv_branch2a.stride == (2, 2) and m16.b5_1.conv_branch2a.dilation == (1, 1)
    assert m16.b6.conv_branch2b1.dilation == (2, 2) and m16.b7.conv_branch2b1.dilation == (2, 2)


def test_forward_dict_features():
    m = ResNet38d(width_divisor=SMALL).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        feats = m.forward_dict(x)
        assert torch.equal(feats["conv6"], m(x))
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    c = lambda n: n // SMALL  # noqa: E731
    assert shapes == {"conv3": (1, c(256), 8, 12), "conv4": (1, c(512), 4, 6),
                      "conv5": (1, c(1024), 4, 6), "conv6": (1, c(4096), 4, 6)}


def test_bad_settings():
    with pytest.raises(ConfigError, match="output_stride"):
        ResNet38d(output_stride=4)
    with pytest.raises(ConfigError, match="dropout"):
        ResNet38d(dropout=(0.3,), width_divisor=SMALL)


# ----------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_reference_named_file_loads(tmp_path, suffix):
    state = random_reference_state(SMALL)
    path = tmp_path / f"ilsvrc-cls_rna-a1_cls1000_ep-0001{suffix}"
    save(state, path)
    model = build_backbone("resnet38d", output_stride=8, weights=path, width_divisor=SMALL)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    assert torch.equal(model.b4_3.conv_branch2b1.weight.detach(), state["b4_3.conv_branch2b1.weight"])
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_imagenet_classifier_keys_are_tolerated_on_request(tmp_path):
    state = random_reference_state(SMALL)
    state["linear1000.weight"] = torch.randn(1000, 4096 // SMALL)
    state["linear1000.bias"] = torch.randn(1000)
    path = tmp_path / "with_classifier.pth"
    save(state, path)
    with pytest.raises(DataError, match="allow_head_mismatch"):
        build_backbone("resnet38d", weights=path, width_divisor=SMALL)
    model = build_backbone("resnet38d", weights=path, width_divisor=SMALL, allow_head_mismatch=True)
    assert torch.equal(model.bn7.running_var, state["bn7.running_var"])


def test_wrong_key_is_one_clear_error_naming_the_file(tmp_path):
    state = random_reference_state(SMALL)
    state["b2.conv2a.weight"] = state.pop("b2.conv_branch2a.weight")
    path = tmp_path / "renamed.safetensors"
    save(state, path)
    with pytest.raises(DataError) as info:
        build_backbone("resnet38d", weights=path, width_divisor=SMALL)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "missing key(s): b2.conv_branch2a.weight" in message
    assert "unexpected key(s): b2.conv2a.weight" in message


def test_full_width_file_into_small_network_names_the_shapes(tmp_path):
    state = random_reference_state(SMALL)
    state["bn7.weight"] = torch.ones(4096)
    path = tmp_path / "wrong_width.pth"
    save(state, path)
    with pytest.raises(DataError, match=r"shape mismatch.*bn7\.weight \(4096,\) vs \(256,\)") as info:
        build_backbone("resnet38d", weights=path, width_divisor=SMALL)
    assert str(path) in str(info.value)


class _OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code in a pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "must_not_exist"
    path = tmp_path / "evil.pth"
    torch.save({"payload": _OpensAFile(str(marker)), **random_reference_state(SMALL)}, path)
    with pytest.raises(DataError, match="refused to load") as info:
        build_backbone("resnet38d", weights=path, width_divisor=SMALL)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # and the payload is real: an unrestricted unpickling would have run it
    pickle.loads(pickle.dumps(_OpensAFile(str(marker)))).close()
    assert marker.exists()


def test_strict_load_state_dict_with_or_without_batch_counters():
    model = ResNet38d(width_divisor=SMALL)
    plain = dict(random_reference_state(SMALL))  # no PyTorch metadata, no num_batches_tracked
    model.load_state_dict(plain, strict=True)
    with_counters = dict(plain)
    with_counters["b3.bn_branch2a.num_batches_tracked"] = torch.tensor(7)
    model.load_state_dict(with_counters, strict=True)
    assert "b3.bn_branch2a.num_batches_tracked" in with_counters  # the caller's dict is untouched
    assert torch.equal(model.b3.bn_branch2a.running_mean, plain["b3.bn_branch2a.running_mean"])


# ----------------------------------------------------------------------------------------
# Freezing (SEAM) and training behaviour
# ----------------------------------------------------------------------------------------


def test_default_trains_everything():
    model = ResNet38d(width_divisor=SMALL).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    model(torch.randn(1, 3, 16, 16)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.conv1a.weight.grad.abs().sum() > 0


def test_freeze_stem_like_seam():
    model = ResNet38d(width_divisor=SMALL, freeze_stem=True)
    model.eval().train()  # train() must keep BN in eval mode
    stem = ("conv1a.", "b2.", "b2_1.", "b2_2.")
    for name, p in model.named_parameters():
        is_bn = ".bn_" in name or name.startswith("bn7.")
        assert p.requires_grad == (not name.startswith(stem) and not is_bn), name
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(m.training for m in model.modules() if isinstance(m, nn.Dropout2d))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(1, 3, 16, 16)).mean().backward()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # running stats fixed
    assert model.conv1a.weight.grad is None and model.b2_2.conv_branch2b1.weight.grad is None
    assert model.b3.conv_branch2a.weight.grad.abs().sum() > 0


def test_freeze_bn_alone():
    model = ResNet38d(width_divisor=SMALL, freeze_bn=True).train()
    assert model.conv1a.weight.requires_grad and not model.b2.bn_branch2a.weight.requires_grad
    assert not model.bn7.training
    unfrozen_bn = ResNet38d(width_divisor=SMALL, freeze_stem=True, freeze_bn=False).train()
    assert unfrozen_bn.bn7.training and unfrozen_bn.bn7.weight.requires_grad
    assert not unfrozen_bn.b2.bn_branch2a.weight.requires_grad  # part of the frozen stem


# ----------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------


def test_build_backbone_registration():
    assert "resnet38d" in available_backbones()
    model = build_backbone("resnet38d", width_divisor=SMALL)
    assert isinstance(model, ResNet38d) and model.output_stride == 8
    assert build_backbone("resnet38d", output_stride=16, width_divisor=SMALL).output_stride == 16
    seam = build_backbone("resnet38d", output_stride=8, freeze_stem=True, width_divisor=SMALL)
    assert seam.freeze_stem and seam.freeze_bn
    with pytest.raises(ConfigError, match="weights=PATH"):
        build_backbone("resnet38d", pretrained=True)


def test_load_weights_tolerates_batch_counters_both_ways(tmp_path):
    """A file saved from PyTorch code (psa/SEAM `Net.state_dict()`) carries BatchNorm step
    counters that the converted file and this module lack; a module that has them (tiny CNN)
    loads a file without them. Both load; a real missing weight still fails."""
    from weakseg.models.backbones import build_backbone
    from weakseg.models.backbones.weights import load_weights, save_weights

    plain = dict(random_reference_state(SMALL))
    with_counters = dict(plain, **{"b3.bn_branch2a.num_batches_tracked": torch.tensor(7)})
    torch.save(with_counters, tmp_path / "pytorch.pth")
    model = ResNet38d(width_divisor=SMALL)
    load_weights(model, tmp_path / "pytorch.pth")
    assert torch.equal(model.b3.bn_branch2a.running_mean, plain["b3.bn_branch2a.running_mean"])

    tiny = build_backbone("tiny_cnn", width=8)
    save_weights(tiny, tmp_path / "tiny.pth")
    state = torch.load(tmp_path / "tiny.pth", weights_only=True)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters  # the tiny CNN's BatchNorms have them
    torch.save({k: v for k, v in state.items() if k not in counters}, tmp_path / "no_counters.pth")
    load_weights(build_backbone("tiny_cnn", width=8), tmp_path / "no_counters.pth")
    weight = next(k for k in state if k.endswith("weight"))
    torch.save({k: v for k, v in state.items() if k != weight}, tmp_path / "missing.pth")
    with pytest.raises(DataError, match="missing"):
        load_weights(build_backbone("tiny_cnn", width=8), tmp_path / "missing.pth")
