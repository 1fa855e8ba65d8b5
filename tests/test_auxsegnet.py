"""AuxSegNet+ (issue 19): each equation's function against a loop written from its definition,
the network's composition of them, eq. 19's loss falling with one step, the saliency sources
and label update, the seed formula on a hand-computed case, early stopping, and the
label_rounds pipeline on synthetic data (rounds kept, resumable, predict from its network)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from weakseg.data import build_dataset
from weakseg.data.transforms import Paired, pad_to
from weakseg.errors import ConfigError, DataError
from weakseg.models.factory import ModelConfig, build_model
from weakseg.models.methods import auxsegnet as A
from weakseg.refine import saliency as S
from weakseg.steps.label_rounds import StageLossConfig, stage_terms
from weakseg.train.trainer import patience_stop


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- equations vs loops


def test_pairwise_affinity_eq2_matches_loop():
    q, k = rand(2, 3, 2, 3, seed=1), rand(2, 3, 2, 3, seed=2)
    got = A.pairwise_affinity(q, k)
    n = 6
    for b in range(2):
        qs, ks = q[b].reshape(3, n), k[b].reshape(3, n)
        for i in range(n):
            logits = [float(sum(qs[c, i] * ks[c, j] for c in range(3))) for j in range(n)]
            top = max(logits)
            den = sum(math.exp(v - top) for v in logits)
            for j in range(n):
                assert got[b, i, j].item() == pytest.approx(math.exp(logits[j] - top) / den, rel=1e-12)


def test_pairwise_context_and_refinement_eq3_14_15_18_match_loop():
    aff = torch.softmax(rand(2, 6, 6, seed=3), dim=-1)
    value = rand(2, 4, 2, 3, seed=4)
    got = A.pairwise_context(aff, value)
    refined = A.refine_pairwise(value, aff)
    flat = value.reshape(2, 4, 6)
    for b in range(2):
        for c in range(4):
            for i in range(6):
                want = sum(aff[b, i, j] * flat[b, c, j] for j in range(6))
                assert got[b, c, i // 3, i % 3].item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.equal(got, refined)


def test_unary_affinity_and_context_eq8_9_match_loop():
    scores = rand(2, 1, 2, 3, seed=5)
    u = A.unary_affinity(scores)
    value = rand(2, 4, 2, 3, seed=6)
    ctx = A.unary_context(u, value)
    assert ctx.shape == (2, 4, 1, 1)
    for b in range(2):
        e = [math.exp(v) for v in scores[b, 0].flatten().tolist()]
        for j in range(6):
            assert u[b, j].item() == pytest.approx(e[j] / sum(e), rel=1e-12)
        for c in range(4):
            want = sum(u[b, j] * value[b, c].flatten()[j] for j in range(6))
            assert ctx[b, c, 0, 0].item() == pytest.approx(want.item(), rel=1e-12)


def test_refine_dual_eq16_17_matches_loop():
    aff = torch.softmax(rand(1, 6, 6, seed=7), dim=-1)
    u = torch.softmax(rand(1, 6, seed=8), dim=-1)
    pred = rand(1, 3, 2, 3, seed=9)
    got = A.refine_dual(pred, aff, u)
    flat = pred.reshape(3, 6)
    for c in range(3):
        for i in range(6):
            want = sum(aff[0, i, j] * flat[c, j] for j in range(6)) + sum(u[0, j] * flat[c, j] for j in range(6))
            assert got[0, c, i // 3, i % 3].item() == pytest.approx(want.item(), rel=1e-12)


def test_fuse_affinities_eq6_7_10_11_matches_loop():
    torch.manual_seed(0)
    fusion = A.AffinityFusion().double().requires_grad_(False)
    a, b = torch.softmax(rand(2, 6, 6, seed=10), -1), torch.softmax(rand(2, 6, 6, seed=11), -1)
    got = A.fuse_affinities(a, b, fusion)
    # the loop reference of the attention module: conv3x3 (zero padding) -> ReLU -> conv1x1 -> softmax
    x = torch.stack((a, b), 1)
    w1, w2, b2 = fusion.conv1.weight, fusion.conv2.weight, fusion.conv2.bias
    for bi in range(2):
        for i in range(6):
            for j in range(6):
                hidden = []
                for o in range(2):
                    acc = 0.0
                    for c in range(2):
                        for di in (-1, 0, 1):
                            for dj in (-1, 0, 1):
                                if 0 <= i + di < 6 and 0 <= j + dj < 6:
                                    acc += float(w1[o, c, di + 1, dj + 1] * x[bi, c, i + di, j + dj])
                    hidden.append(max(acc, 0.0))
                logits = [float(b2[o] + sum(w2[o, c, 0, 0] * hidden[c] for c in range(2))) for o in range(2)]
                e = [math.exp(v) for v in logits]
                want = (e[0] * a[bi, i, j].item() + e[1] * b[bi, i, j].item()) / sum(e)
                assert got[bi, i, j].item() == pytest.approx(want, rel=1e-10)
    assert (got >= torch.minimum(a, b) - 1e-12).all() and (got <= torch.maximum(a, b) + 1e-12).all()


def test_enhance_features_eq12_13_matches_loop():
    conv = torch.nn.Conv2d(3, 3, 1).double()
    x, ctx = rand(1, 3, 2, 2, seed=12), rand(1, 3, 2, 2, seed=13)
    got = A.enhance_features(x, ctx, conv)
    for o in range(3):
        for i in range(2):
            for j in range(2):
                want = x[0, o, i, j] + conv.bias[o] + sum(conv.weight[o, c, 0, 0] * ctx[0, c, i, j] for c in range(3))
                assert got[0, o, i, j].item() == pytest.approx(want.item(), rel=1e-12)


# ----------------------------------------------------------------------------- the network

MODEL = {"method": "auxsegnet", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}}


def make(affinity="dual", saliency_branch=True, **extra):
    torch.manual_seed(0)
    cfg = dict(MODEL, method_args={"channels": 8, "affinity": affinity, "saliency_branch": saliency_branch, **extra})
    return build_model(ModelConfig(**cfg), 4)


@pytest.mark.parametrize("affinity,saliency_branch", [("none", True), ("segmentation", False), ("segmentation", True),
                                                      ("pairwise", True), ("dual", True)])
def test_variants_output_what_they_supervise(affinity, saliency_branch):
    model = make(affinity, saliency_branch).train()
    out = model(torch.rand(2, 3, 32, 32))
    supervised = model.prediction_outputs("seg") + model.prediction_outputs("sal")
    assert set(out) == {"cams", "logits"} | set(supervised)
    assert out["seg"].shape == (2, 5, 8, 8) and out["cams"].shape == (2, 4, 8, 8)
    if saliency_branch:
        assert out["sal"].shape == (2, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        evaluated = model(torch.rand(1, 3, 32, 32))
    assert model.segmentation_output in evaluated
    assert ("affinity" in evaluated) == (affinity != "none")


def test_forward_composes_the_equations():
    """In eval mode the refined predictions are the cross-task affinity applied to the
    predictions (eq. 14-15); each fused element lies between the two tasks' (eq. 6-7)."""
    model = make("pairwise").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    aff = out["affinity"]
    assert aff.min() > 0
    for name in ("seg", "sal"):
        flat = out[name].flatten(2)[0]  # (K, N)
        want = (aff[0] @ flat.T).T.reshape(out[name].shape)
        assert torch.allclose(out[f"{name}_pairwise"], want, atol=1e-5)


def test_ablation_switches_are_checked():
    with pytest.raises(ValueError, match="saliency_branch: false"):
        make("dual", saliency_branch=False)
    with pytest.raises(ValueError, match="allowed values"):
        make("cross")


def test_one_step_lowers_eq19_loss():
    model = make("dual").train()
    dataset = build_dataset({"kind": "synthetic", "num_images": 4, "image_size": 32})
    samples = [dataset[i] for i in range(4)]
    batch = {
        "rgb": torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples]),
        "labels": torch.from_numpy(np.stack([s.labels for s in samples])),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples])).long(),
        "saliency_mask": torch.from_numpy(np.stack([(s.mask > 0).astype(np.uint8) for s in samples])).long(),
    }
    terms = stage_terms(model, StageLossConfig())
    assert [t.name for t in terms] == ["cls", "sal", "sal_pairwise", "sal_dual", "seg", "seg_pairwise", "seg_dual"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss():
        out = model(batch["rgb"])
        return sum(t.weight * t(out, batch) for t in terms)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    # every branch and both fusion modules receive a gradient from eq. 19
    for prefix in ("head.", "seg.", "sal.", "fusion.pairwise.", "fusion.unary."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before
    assert [t.name for t in stage_terms(model, StageLossConfig(classification=0, saliency=0))] == \
        ["seg", "seg_pairwise", "seg_dual"]


# ----------------------------------------------------------------------------- saliency and seeds


def test_saliency_cam_seeds_hand_case():
    cams = np.array([[[0.9, 0.1, 0.5, 0.0]], [[0.3, 0.0, 0.6, 0.1]]], dtype=np.float32)  # 2 classes, 1x4
    saliency = np.array([[0.5, 0.01, 0.02, 0.9]])
    # px0: cam .9 > .2 & salient -> class 7; px1: neither -> background; px2: activated, not salient -> 255;
    # px3: salient, not activated -> 255
    assert S.saliency_cam_seeds(cams, np.array([7, 3]), saliency).tolist() == [[7, 0, 255, 255]]
    # px2's strongest class is the second one (0.6 > 0.5): salient there -> 3
    assert S.saliency_cam_seeds(cams, np.array([7, 3]), np.full((1, 4), 0.5)).tolist() == [[7, 255, 3, 255]]
    # no background class: the CAM rule alone
    assert S.saliency_cam_seeds(cams, np.array([7, 3]), saliency, background_id=None).tolist() == [[7, 255, 3, 255]]
    assert S.saliency_cam_seeds(cams[:0], np.array([]), saliency).tolist() == [[255, 0, 0, 255]]


def test_depth_nearness_and_normalisation():
    depth = np.array([[1.0, 2.0], [3.0, 0.0]], dtype=np.float32)  # 0: missing
    assert S.depth_nearness(depth).tolist() == [[1.0, 0.5], [0.0, 0.0]]
    assert S.normalise_saliency(np.array([[2.0, 4.0, 3.0]])).tolist() == [[0.0, 1.0, 0.5]]
    assert S.normalise_saliency(np.ones((2, 2))).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_saliency_unary_and_update_eq1():
    p = 0.8
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    unary = S.saliency_unary(np.array([[p]]))
    assert unary[0, 0, 0] == pytest.approx(-math.log(0.2 + 1e-8) / (1.05 * sig(0.2)), rel=1e-5)
    assert unary[1, 0, 0] == pytest.approx(-math.log(0.8 + 1e-8) / (1.05 * sig(0.8)), rel=1e-5)
    previous, predicted = np.array([[0.2, 1.0]]), np.array([[0.6, 0.0]])
    np.testing.assert_allclose(S.update_saliency(previous, predicted, None), [[0.4, 0.5]], rtol=1e-6)
    pytest.importorskip("pydensecrf")
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    sal = np.zeros((8, 8), np.float32)
    sal[:, 4:] = 0.95
    out = S.update_saliency(sal, sal, image)
    assert out[:, 4:].min() > 0.5 and out[:, :4].max() < 0.5  # a confident map keeps its two regions


def test_folder_source_errors_name_the_file(tmp_path):
    from PIL import Image

    dataset = build_dataset({"kind": "synthetic", "num_images": 2, "image_size": 16})
    source = S.SaliencySource(S.SaliencyConfig(source="folder", folder=str(tmp_path)))
    with pytest.raises(DataError, match=f"{dataset.ids[0]}.png.*missing"):
        source(dataset[0])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{dataset.ids[0]}.png")
    with pytest.raises(DataError, match="8x8 but the image is 16x16"):
        source(dataset[0])
    grey = np.zeros((16, 16), np.uint8)
    grey[4:8] = 200
    Image.fromarray(grey).save(tmp_path / f"{dataset.ids[1]}.png")
    assert source(dataset[1]).max() == 1.0 and source(dataset[1])[0, 0] == 0.0
    with pytest.raises(ConfigError, match="saliency.folder"):
        S.SaliencyConfig(source="folder")


def test_torchscript_model_source(tmp_path):
    class Brightness(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=1, keepdim=True) * 4 - 2  # logits

    path = tmp_path / "sal.pt"
    torch.jit.script(Brightness()).save(str(path))
    dataset = build_dataset({"kind": "synthetic", "num_images": 1, "image_size": 16})
    sample = dataset[0]
    got = S.SaliencySource(S.SaliencyConfig(source="model", model=str(path), model_input="unit"))(sample)
    want = S.normalise_saliency(1 / (1 + np.exp(-(sample.image.astype(np.float32).mean(-1) / 255 * 4 - 2))))
    np.testing.assert_allclose(got, want, atol=1e-5)


def _brightness_onnx(path, image_size: int) -> None:
    """The TorchScript test's model, x.mean(channels) * 4 - 2, written as an ONNX graph by hand."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
         helper.make_node("Mul", ["mean", "four"], ["scaled"]),
         helper.make_node("Sub", ["scaled", "two"], ["logits"])],
        "brightness",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, image_size, image_size])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("four", TensorProto.FLOAT, [], [4.0]),
                     helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnx_model_source_matches_the_formula(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "sal.onnx"
    _brightness_onnx(path, 16)
    dataset = build_dataset({"kind": "synthetic", "num_images": 1, "image_size": 16})
    sample = dataset[0]
    got = S.SaliencySource(S.SaliencyConfig(source="model", model=str(path), model_input="unit"))(sample)
    want = S.normalise_saliency(1 / (1 + np.exp(-(sample.image.astype(np.float32).mean(-1) / 255 * 4 - 2))))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # ImageNet input: the mean of the normalised channels, by hand.
    got = S.SaliencySource(S.SaliencyConfig(source="model", model=str(path), model_output="probabilities"))(sample)
    x = (sample.image.astype(np.float32) / 255 - S.IMAGENET_MEAN) / S.IMAGENET_STD
    np.testing.assert_allclose(got, S.normalise_saliency(x.mean(-1) * 4 - 2), atol=1e-5)


def test_model_source_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        S.SaliencySource(S.SaliencyConfig(source="model", model=str(tmp_path / "missing.onnx")))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a TorchScript file"):
        S.SaliencySource(S.SaliencyConfig(source="model", model=str(broken)))
    pytest.importorskip("onnxruntime")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(DataError, match="broken.onnx.*not a loadable ONNX model"):
        S.SaliencySource(S.SaliencyConfig(source="model", model=str(broken)))


def test_opencv_sources_run_offline():
    pytest.importorskip("cv2.saliency")
    dataset = build_dataset({"kind": "synthetic", "num_images": 1, "image_size": 32})
    for source in ("spectral_residual", "fine_grained"):
        sal = S.SaliencySource(S.SaliencyConfig(source=source))(dataset[0])
        assert sal.shape == (32, 32) and sal.min() == 0.0 and sal.max() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- trainer pieces


def test_patience_stop():
    stop = patience_stop(2)
    assert not stop([3.0, 2.0, 2.5])  # best one epoch old
    assert stop([3.0, 2.0, 2.5, 2.1])  # best two epochs old
    assert not patience_stop(3, min_delta=0.5)([3.0, 2.8, 2.7])  # 2.8, 2.7 are no real improvement: best 2 old
    assert patience_stop(3, min_delta=0.5)([3.0, 2.8, 2.7, 2.6])  # ...and with 2.6 the best is 3 epochs old
    assert not patience_stop(3, min_delta=0.5)([3.0, 2.8, 2.7, 2.4])  # 2.4 is 0.6 below 3.0: a new best


def test_two_channel_targets_pad_and_split():
    mask = np.stack([np.full((2, 3), 4, np.uint8), np.ones((2, 3), np.uint8)], -1)
    padded = pad_to(Paired(np.zeros((2, 3, 3), np.uint8), mask, None), 4, 4)
    assert padded.mask.shape == (4, 4, 2)
    assert (padded.mask[2:] == 255).all() and (padded.mask[:2, :3, 0] == 4).all()


# ----------------------------------------------------------------------------- the pipeline


def pipeline_config(tmp_path) -> dict:
    train = {"batch_size": 4, "optimizer": "adamw", "lr": 0.003, "workers": 0,
             "augment": {"crop_size": None, "scale_range": [1.0, 1.0], "hflip_prob": 0.5}}
    return {
        "dataset": {"kind": "synthetic", "num_images": 12, "image_size": 32},
        "train_cam": {"model": dict(MODEL, method_args={"channels": 8}),
                      "loss": {"classification": {"kind": "gap"}}, "train": dict(train, epochs=2)},
        "infer_cam": {"scales": [1.0], "flip": False},
        "label_rounds": {"saliency": {"source": "depth"}, "stages": 2, "patience": 1, "cam_scales": [1.0, 1.5],
                         "saliency_crf": False, "train": dict(train, epochs=3)},
        "predict": {"scales": [1.0], "flip": False, "network": "label_rounds"},
        "evaluate": {},
        "out": str(tmp_path / "run"),
    }


def test_label_rounds_pipeline_keeps_rounds_and_resumes(tmp_path):
    from weakseg.steps import pipeline

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(tmp_path)))
    results = pipeline.run(path)
    run = tmp_path / "run"
    rounds = results["label_rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert {"precision", "recall", "miou", "contour_f"} <= set(r)
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= r["coverage"] + 1e-12
    assert "final" in results["stages"] and "cam" in results["stages"]
    for index in range(3):
        assert len(list((run / "label_rounds" / f"round_{index}" / "labels").glob("*.png"))) == 12
    history = json.loads((run / "label_rounds" / "stage_0" / "history.json").read_text())
    assert 1 <= len(history["epoch_losses"]) <= 3
    # the early stop is the rule's: stopped exactly when the best loss became `patience` (1) epochs old
    if history["stopped_epoch"] is not None:
        assert patience_stop(1)(history["epoch_losses"]) and not patience_stop(1)(history["epoch_losses"][:-1])
    # a run killed during stage 1: its model, the last round and the outputs after it are gone
    labels_before = (run / "label_rounds" / "round_1" / "labels" / f"{build_dataset(pipeline_config(tmp_path)['dataset']).ids[0]}.png").read_bytes()
    (run / "label_rounds" / "stage_1" / "model.pt").unlink()
    (run / "label_rounds" / "round_2" / "metrics.json").unlink()
    (run / "label_rounds" / "done.json").unlink()
    again = pipeline.run_step("label_rounds", path)
    assert [r["round"] for r in again["label_rounds"]] == [0, 1, 2]
    assert again["label_rounds"][:2] == rounds[:2]  # finished rounds kept, not recomputed
    assert (run / "label_rounds" / "round_1" / "labels" / f"{build_dataset(pipeline_config(tmp_path)['dataset']).ids[0]}.png").read_bytes() == labels_before


def test_label_rounds_refuses_a_plain_cam_network(tmp_path):
    from weakseg.steps import pipeline

    config = pipeline_config(tmp_path)
    config["train_cam"]["model"] = {"method": "cam", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}}
    config["train_cam"]["train"]["epochs"] = 1
    for key in ("infer_cam", "predict", "evaluate"):
        del config[key]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(DataError, match="cam_model.pt.*auxsegnet"):
        pipeline.run(path)


def test_stage_schedule_defaults_survive_a_partial_train_section():
    from weakseg.config import from_mapping
    from weakseg.steps.label_rounds import LabelRoundsConfig

    config = from_mapping(LabelRoundsConfig, {"train": {"lr": 0.002}}, "label_rounds")
    assert (config.train.epochs, config.train.batch_size, config.train.lr, config.train.weight_decay) == (15, 4, 0.002, 1e-5)
    with pytest.raises(ConfigError, match="saliency_update"):
        LabelRoundsConfig(saliency_update="always")
