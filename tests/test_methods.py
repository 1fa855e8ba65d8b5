"""One shared test base for every CAM method (plain CAM, SEAM, ViT CAM, AuxSegNet+, shape cues): each method, with
each add-on set (none, ISL/FSL, DEAL, both), builds from config, gives finite losses, lets
every term reach the parameters, lowers its loss with one optimisation step, and runs through
`weakseg train-cam` + `weakseg infer-cam` on synthetic RGB-D data.

A new method joins by adding one entry to METHODS (its model config and which outputs each
loss term reads); every test below then runs for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from weakseg.cli import app
from weakseg.config import from_mapping
from weakseg.data import build_dataset
from weakseg.errors import ConfigError
from weakseg.losses.terms import LossConfig, build_terms
from weakseg.models.factory import ModelConfig, build_model

DATASET = {"kind": "synthetic", "num_images": 16, "image_size": 48}
NUM_CLASSES = len(build_dataset(DATASET).foreground_ids)  # synthetic: 4 object classes

# Each method: its model config, the loss keys every recipe of it needs, and which outputs
# the add-ons read (the same convention as configs/seam_*.yaml and configs/vit_*.yaml).
METHODS = {
    "cam": {
        "model": {"method": "cam", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}},
        "base": {},
        "reads": {"classification": ["cams"], "fsl": ["cams"], "deal": ["cams"]},
    },
    "seam": {
        "model": {"method": "seam", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4},
                  "method_args": {"scale": 0.5, "pcm_dim": 16}},
        "base": {"seam": {}},
        # SEAM: classification (or ISL) on both siamese branches; FSL on the full-size CAM;
        # DEAL on the CAM and its PCM-revised CAM (deal eq. 15).
        "reads": {"classification": ["cams", "cams_scaled"], "fsl": ["cams"], "deal": ["cams", "cams_pcm"]},
    },
    "auxsegnet": {
        "model": {"method": "auxsegnet", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4},
                  "method_args": {"channels": 8}},
        "base": {},
        # Its classification branch is a plain CAM head: every add-on reads its CAMs.
        "reads": {"classification": ["cams"], "fsl": ["cams"], "deal": ["cams"]},
    },
    "shape_cues": {
        "model": {"method": "shape_cues", "backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 8},
                  "method_args": {"skip_stage": 1, "aspp_channels": 16, "skip_channels": 8, "shape_channels": 8,
                                  "decoder_channels": 16}},
        # Its own mask loss (pixel + region on the SPR pseudo-masks) in every recipe; the
        # add-ons read its score map S (K + 1 channels, background 0). The pixel term's class
        # mean: SSSS's balancing zeroes images whose mask misses a class, as an untrained
        # network's masks all do (tests/test_shape_cues.py tests that balancing).
        "base": {"online_mask": {"pixel": {"balance": "class_mean"}}},
        "reads": {"classification": ["cams"], "fsl": ["cams"], "deal": ["cams"]},
    },
    "vit_cam": {
        "model": {"method": "vit_cam", "backbone": "deit_tiny",
                  "backbone_args": {"depth": 2, "embed_dim": 48, "num_heads": 2},
                  "method_args": {"reduction": 2}},
        "base": {},
        # WeakTr as the DEAL paper trains it: every term on both branches, averaged (eq. 13-14).
        "reads": {"classification": ["cams_coarse", "cams_fine"], "fsl": ["cams_coarse", "cams_fine"],
                  "deal": ["cams_coarse", "cams_fine"]},
    },
}

ADDONS = {
    "none": {"classification": {"kind": "gap"}},
    "isl_fsl": {"classification": {"kind": "isl_binomial"}, "fsl": {"gate": "r"}},
    "deal": {"classification": {"kind": "gap"}, "deal": {"weight": 0.04}},
    "both": {"classification": {"kind": "isl_binomial"}, "fsl": {"gate": "r"}, "deal": {"weight": 0.04}},
}


def loss_mapping(method: str, addon: str) -> dict:
    spec = METHODS[method]
    loss = json.loads(json.dumps(ADDONS[addon]))
    for key in ("classification", "fsl", "deal"):
        if key in loss:
            loss[key]["reads"] = spec["reads"][key]
    loss.update(json.loads(json.dumps(spec["base"])))
    return loss


def make_model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(from_mapping(ModelConfig, METHODS[method]["model"], "model"), NUM_CLASSES)


def make_batch(size: int = 4) -> dict:
    dataset = build_dataset(DATASET)
    samples = [dataset[i] for i in range(size)]
    rgb = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    return {
        "rgb": rgb,
        "labels": torch.from_numpy(np.stack([s.labels for s in samples])),
        "depth": torch.from_numpy(np.stack([s.depth for s in samples])).unsqueeze(1),
    }


def total_loss(model, terms, batch, seed: int = 0) -> torch.Tensor:
    for term in terms:  # ISL's draws: the same samples for every evaluation
        if getattr(term, "generator", None) is not None:
            term.generator.manual_seed(seed)
    torch.manual_seed(seed)  # stochastic layers (the shape cue module's drops) draw the same twice
    outputs = model(batch["rgb"])
    return sum(term.weight * term(outputs, batch, model.background_channel) for term in terms)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_outputs_train_and_eval(method):
    model = make_model(method)
    batch = make_batch(2)
    model.train()
    outputs = model(batch["rgb"])
    for name in ("cams", "logits"):
        assert name in outputs, name
    channels = NUM_CLASSES + (model.background_channel is not None)  # + a background channel (shape cues)
    maps = {k: v for k, v in outputs.items() if v.ndim == 4 and v.shape[1] == channels}
    assert maps, "no class maps"
    for name, value in outputs.items():
        assert torch.isfinite(value).all(), name
    assert outputs["logits"].shape == (2, NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        evaluated = model(batch["rgb"])
    # Inference reads `inference_output`; probabilities come from `score_output`.
    for attr in ("inference_output", "score_output"):
        name = getattr(type(model), attr)
        assert evaluated[name].shape[:2] == (2, channels), (attr, name)
    assert not any(k.endswith("_scaled") for k in evaluated)  # SEAM's second branch: training only


@pytest.mark.parametrize("addon", sorted(ADDONS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_addon_attaches_and_reaches_the_parameters(method, addon):
    model = make_model(method).train()
    batch = make_batch()
    terms = build_terms(from_mapping(LossConfig, loss_mapping(method, addon), "loss"), torch.Generator().manual_seed(0))
    names = [t.name for t in terms]
    expected = {"cls"} | ({"pixel", "region"} if "online_mask" in METHODS[method]["base"] else set()) | ({"fsl"} if "fsl" in ADDONS[addon] else set()) | ({"deal"} if "deal" in ADDONS[addon] else set())
    assert expected <= set(names)
    if method == "seam":
        assert {"er", "ecr", "min_pool"} <= set(names)
    outputs = model(batch["rgb"])
    params = [p for p in model.parameters() if p.requires_grad]
    for term in terms:
        value = term(outputs, batch, model.background_channel)
        assert torch.isfinite(value), term.name
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"{method}: {term.name} gives no gradient"


@pytest.mark.parametrize("addon", ["none", "both"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_step_lowers_the_loss(method, addon):
    model = make_model(method).train()
    for module in model.modules():  # dropout would make the two evaluations differ
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            module.p = 0.0
    batch = make_batch()
    terms = build_terms(from_mapping(LossConfig, loss_mapping(method, addon), "loss"), torch.Generator())
    # A descent direction lowers the loss only for a short enough step. SEAM's is shortest:
    # its ECR term selects pixels by rank (a piecewise function), so a longer step changes
    # the selection (at 1e-3 the loss rose by 0.02 on this batch, at 1e-4 it fell).
    optimizer = torch.optim.SGD(model.parameters(), lr={"vit_cam": 0.002, "seam": 1e-4}.get(method, 0.01), momentum=0.0)
    before = total_loss(model, terms, batch)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = total_loss(model, terms, batch)
    assert after < before, f"{method}/{addon}: {before.item():.5f} -> {after.item():.5f}"


def test_seam_without_its_terms_is_refused(tmp_path):
    from weakseg.steps import pipeline

    data = {"dataset": DATASET, "out": str(tmp_path / "run"),
            "train_cam": {"model": METHODS["seam"]["model"], "loss": {"classification": {"kind": "gap"}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="train_cam.loss.seam"):
        pipeline.run_step("train_cam", tmp_path / "c.yaml")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_method_args_are_checked():
    with pytest.raises(ConfigError, match="allowed keys"):
        build_model(ModelConfig(method="seam", method_args={"scael": 0.3}), NUM_CLASSES)
    with pytest.raises(ConfigError, match="background_channel"):
        build_model(ModelConfig(method="seam", background_channel=True), NUM_CLASSES)
    with pytest.raises(ConfigError, match="allowed values"):
        build_model(ModelConfig(method="mct"), NUM_CLASSES)  # type: ignore[arg-type]


@pytest.mark.parametrize("addon", sorted(ADDONS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_train_cam_and_infer_cam(tmp_path, method, addon):
    """The bar of issue 5: `weakseg train-cam` with each method x add-on set on synthetic data;
    then infer-cam reads the method's inference output, here at 40 px, which a ViT with 16 px
    patches cannot tile: the padding path of inference is exercised."""
    config = {
        # 40 px images, trained in 48 px crops (padded); inference at 40 px
        "dataset": dict(DATASET, num_images=8, image_size=40),
        "train_cam": {
            "model": METHODS[method]["model"],
            "loss": loss_mapping(method, addon),
            "train": {"epochs": 1, "batch_size": 2, "optimizer": "adamw", "lr": 0.001, "max_steps_per_epoch": 2,
                      "augment": {"crop_size": 48, "scale_range": [1.0, 1.0], "hflip_prob": 0.5}},
        },
        "infer_cam": {"scales": [1.0], "flip": True},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    result = runner.invoke(app, ["train-cam", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    log = (tmp_path / "run" / "train_cam" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 2  # header + 2 steps
    result = runner.invoke(app, ["infer-cam", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    files = sorted((tmp_path / "run" / "infer_cam" / "cams").glob("*.npz"))
    assert len(files) == 8
    cams = [np.load(path)["cams"] for path in files]
    for cam in cams:
        assert cam.shape[1:] == (40, 40) and np.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1
    if addon == "none":  # infer_cam.output picks another map (e.g. SEAM's raw CAM); an unknown one is one clear error
        result = runner.invoke(app, ["infer-cam", str(path), "infer_cam.output=cams"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        same = all(np.array_equal(np.load(path)["cams"], cam) for path, cam in zip(files, cams))
        assert same == (make_model(method).inference_output == "cams")
        result = runner.invoke(app, ["infer-cam", str(path), "infer_cam.output=nope"])
        assert result.exit_code != 0 and "nope" in (result.output + str(result.exception))


def test_vit_class_tokens_get_their_own_loss_through_per_term_reads():
    """WeakTr's class tokens: the classification term also reads the 1x1 token map, while FSL
    keeps to the two CAMs (FSL on a 1x1 map would be meaningless)."""
    spec = METHODS["vit_cam"]["model"]
    model = build_model(from_mapping(ModelConfig, dict(spec, method_args={"reduction": 2, "class_tokens": True}),
                                     "model"), NUM_CLASSES).train()
    loss = {"classification": {"kind": "gap", "reads": ["cams_coarse", "cams_fine", "token_scores"]},
            "fsl": {"gate": "r"}, "reads": ["cams_coarse", "cams_fine"]}
    terms = build_terms(from_mapping(LossConfig, loss, "loss"))
    assert [t.reads for t in terms] == [("cams_coarse", "cams_fine", "token_scores"), ("cams_coarse", "cams_fine")]
    batch = make_batch(2)
    outputs = model(batch["rgb"])
    cls = terms[0](outputs, batch, None)
    (grad,) = torch.autograd.grad(cls, model.class_tokens)
    assert grad.abs().sum() > 0
