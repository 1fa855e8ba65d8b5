"""The CAM trainer and the train-cam / infer-cam steps on small synthetic data: the loss
falls, every add-on attaches and contributes a gradient, a resumed run equals an
uninterrupted one, and infer-cam writes CAMs, pseudo-labels and metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from weakseg.cli import app
from weakseg.config import from_mapping
from weakseg.data import build_dataset
from weakseg.losses.terms import LossConfig, build_terms
from weakseg.models.factory import ModelConfig, build_model
from weakseg.steps import pipeline

SMALL = {
    "dataset": {"kind": "synthetic", "num_images": 48, "image_size": 40},
    "train_cam": {
        "model": {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "optimizer": "adamw",
            "lr": 0.003,
            "weight_decay": 0.0001,
            "augment": {"crop_size": None, "scale_range": [1.0, 1.0], "hflip_prob": 0.5},
        },
    },
    "infer_cam": {"scales": [1.0], "flip": True},
}
TRAIN = SMALL["train_cam"]["train"]

VARIANTS = {
    "gap": {"classification": {"kind": "gap"}},
    "gmp": {"classification": {"kind": "gmp"}},
    "isl_binomial+fsl": {"classification": {"kind": "isl_binomial"}, "fsl": {"gate": "r"}},
    "isl_multinomial+fsl_a": {"classification": {"kind": "isl_multinomial"}, "fsl": {"gate": "a"}},
    "deal": {"classification": {"kind": "gap"}, "deal": {"weight": 0.04}},
    "deal+isl+fsl": {"classification": {"kind": "isl_binomial"}, "fsl": {}, "deal": {}},
}


def write_config(tmp_path, name="cfg.yaml", train=None, **changes):
    data = json.loads(json.dumps(SMALL))
    data.update(changes)
    if train is not None:
        data["train_cam"]["train"] = train
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_addon_attaches_and_contributes_a_gradient(variant):
    loss_cfg = from_mapping(LossConfig, VARIANTS[variant], "loss")
    multinomial = loss_cfg.classification.kind == "isl_multinomial"
    dataset = build_dataset(SMALL["dataset"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(background_channel=multinomial, backbone_args={"width": 8}), len(dataset.foreground_ids))
    samples = [dataset[i] for i in range(4)]
    rgb = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    batch = {
        "rgb": rgb,
        "labels": torch.from_numpy(np.stack([s.labels for s in samples])),
        "depth": torch.from_numpy(np.stack([s.depth for s in samples])).unsqueeze(1),
    }
    outputs = model(batch["rgb"])
    terms = build_terms(loss_cfg, torch.Generator().manual_seed(0))
    assert len(terms) == 1 + ("fsl" in VARIANTS[variant]) + ("deal" in VARIANTS[variant])
    for term in terms:
        value = term(outputs, batch, model.background_channel)
        assert torch.isfinite(value), term.name
        grads = torch.autograd.grad(value, model.head.classifier.weight, retain_graph=True)
        assert grads[0].abs().sum() > 0, f"{term.name} gives no gradient"


def test_gap_and_gmp_logits_by_hand():
    # One image, one class present, CAM cells 0, 1, 2, 5: GAP logit 2, GMP logit 5; absent
    # class all zeros (logit 0). Multi-label soft margin = mean over classes of BCE(sigmoid).
    scores = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]]]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0]])
    batch = {"labels": labels}
    for kind, logit in (("gap", 2.0), ("gmp", 5.0)):
        term = build_terms(from_mapping(LossConfig, {"classification": {"kind": kind}}, "loss"))[0]
        value = term({"cams": scores}, batch, None)
        expected = 0.5 * (math.log1p(math.exp(-logit)) + math.log(2.0))
        assert value.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(value, scores)  # GMP: only the max cell of the class moves
    assert torch.count_nonzero(grad[0, 0]) == 1 and grad[0, 0, 1, 1] < 0


def test_two_epochs_lower_the_loss_and_resume_matches(tmp_path):
    full = write_config(tmp_path, "full.yaml", out=str(tmp_path / "full"), train={**TRAIN, "epochs": 3})
    result = pipeline.run_step("train_cam", full, log=lambda m: None)
    losses = result["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]

    # The same run interrupted in the middle of epoch 2 (after the epoch-1 checkpoint), then
    # started again in the same directory: it resumes and ends with exactly the weights of
    # the uninterrupted run.
    part = write_config(tmp_path, "part.yaml", out=str(tmp_path / "part"), train={**TRAIN, "epochs": 3})

    def crash(step, total):
        if step == 8:  # 6 steps per epoch: inside epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_step("train_cam", part, log=lambda m: None, progress=crash)
    full_dir, part_dir = tmp_path / "full" / "train_cam", tmp_path / "part" / "train_cam"
    assert torch.load(part_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = pipeline.run_step("train_cam", part, log=lambda m: None)
    assert resumed["epoch_losses"] == losses
    assert (part_dir / "log.csv").read_text() == (full_dir / "log.csv").read_text()
    a = torch.load(full_dir / "cam_model.pt", weights_only=True)["model"]
    b = torch.load(part_dir / "cam_model.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    header = (full_dir / "log.csv").read_text().splitlines()[0]
    assert header == "epoch,step,lr,total,cls"


def test_cli_train_then_infer_writes_cams_labels_and_metrics(tmp_path):
    runner = CliRunner()
    cfg = write_config(tmp_path, out=str(tmp_path / "run"))
    keys = ["train_cam.loss.classification.kind=isl_binomial", "train_cam.loss.fsl={}"]
    result = runner.invoke(app, ["train-cam", str(cfg), *keys])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "infer_cam"
    result = runner.invoke(app, ["infer-cam", str(cfg), *keys, "infer_cam.scales=[1.0,1.5]"])
    assert result.exit_code == 0, result.output
    assert "infer_cam: J=" in result.output
    metrics = json.loads((out / "cam_metrics.json").read_text())
    for key in ("miou", "contour_f", "jf", "best_threshold"):
        assert key in metrics
    assert metrics["jf"] == pytest.approx((metrics["miou"] + metrics["contour_f"]) / 2)
    dataset = build_dataset(SMALL["dataset"])
    first = dataset[0]
    with np.load(out / "cams" / f"{first.id}.npz") as stored:
        assert stored["cams"].shape == (len(first.present_class_ids), 40, 40)
        assert list(stored["class_ids"]) == first.present_class_ids
        assert 0 <= stored["cams"].min() and stored["cams"].max() <= 1
    assert len(list((out / "cam_labels").glob("*.png"))) == 48
    # the pseudo-labels on disk reproduce the metrics in cam_metrics.json
    from weakseg.data.io import write_label_png

    for i in range(len(dataset)):
        write_label_png(tmp_path / "gt" / f"{dataset.ids[i]}.png", dataset[i].mask)
    (tmp_path / "classes.txt").write_text("\n".join(dataset.class_names) + "\n")
    result = runner.invoke(app, ["eval", "--pred", str(out / "cam_labels"), "--gt", str(tmp_path / "gt"),
                                 "--classes", str(tmp_path / "classes.txt"), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "m.json").read_text())
    for key in ("miou", "contour_f", "jf", "boundary_iou"):
        assert again[key] == metrics[key], key


def test_bad_checkpoint_is_refused(tmp_path):
    from weakseg.errors import DataError
    from weakseg.steps.model_files import load_cam_model

    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"model_config": Boom()}, evil)
    with pytest.raises(DataError, match="evil.pt"):
        load_cam_model(evil, torch.device("cpu"))
    assert not (tmp_path / "pwned").exists()


def test_cam_activation_conventions():
    """ReLU zeroes every negative score; sigmoid keeps their order (binomial view)."""
    from weakseg.models.inference import infer_cams

    class Fixed(torch.nn.Module):
        def forward(self, x):
            s = torch.tensor([[-3.0, -1.0], [0.5, 2.0]]).view(1, 1, 2, 2).repeat(x.shape[0], 1, 1, 1)
            return {"cams": s}

    image = torch.zeros(1, 3, 2, 2)
    relu = infer_cams(Fixed(), image, [0], flip=False)[0]
    sig = infer_cams(Fixed(), image, [0], flip=False, activation="sigmoid")[0]
    assert relu[0, 0] == relu[0, 1] == 0 and relu[1, 1] == pytest.approx(1.0, abs=1e-4)
    assert sig[0, 0] < sig[0, 1] < sig[1, 0] < sig[1, 1]
    expected = torch.sigmoid(torch.tensor([[-3.0, -1.0], [0.5, 2.0]]))
    np.testing.assert_allclose(sig, (expected / (expected.max() + 1e-5)).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        infer_cams(Fixed(), image, [0], activation="tanh")
