"""The one training engine: DataLoader workers change nothing but speed, the speed options
keep the numbers (or say how far they move them), frozen stages stay frozen, and every
network (CAM, AffinityNet, segmentation, the demo) trains through the same loop."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from weakseg.data import build_dataset
from weakseg.errors import ConfigError
from weakseg.losses.terms import LossConfig
from weakseg.models.factory import ModelConfig, build_model
from weakseg.train import trainer
from weakseg.train.trainer import TrainConfig, train

DATA = {"kind": "synthetic", "num_images": 24, "image_size": 40}


def small_config(**changes) -> TrainConfig:
    from weakseg.data.transforms import AugmentConfig

    # Rescale + crop + flip: the augmentation really draws random numbers per sample.
    base = dict(epochs=2, batch_size=6, optimizer="sgd", lr=0.01, seed=3,
                augment=AugmentConfig(crop_size=32, scale_range=[0.8, 1.2], brightness=0.2))
    base.update(changes)
    return TrainConfig(**base)


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def train_small(tmp_path, name: str, model_config: ModelConfig | None = None, **changes):
    dataset = build_dataset(DATA)
    torch.manual_seed(0)
    model = build_model(model_config or ModelConfig(backbone_args={"width": 8}), len(dataset.foreground_ids))
    history = train(model, dataset, LossConfig(), small_config(**changes), tmp_path / name)
    return model, history


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_bit_identical_weights(tmp_path, workers):
    reference, ref_history = train_small(tmp_path, "w0", workers=0)
    model, history = train_small(tmp_path, f"w{workers}", workers=workers)
    assert weights_digest(model) == weights_digest(reference)
    assert history["epoch_losses"] == ref_history["epoch_losses"]


def test_the_loader_does_not_touch_torchs_global_generator():
    """Dropout masks come from the global generator: building and iterating the loader must
    leave it where it was, or a run with a DataLoader would draw other masks."""
    dataset = build_dataset(DATA)
    data = trainer.AugmentedDataset(dataset, small_config().augment, 0, need_depth=False)
    sampler = trainer._EpochBatchSampler(lambda epoch: [[0, 1], [2, 3]])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    batches = list(trainer.make_loader(data, sampler, 0, torch.device("cpu")))
    assert len(batches) == 2 and batches[0]["rgb"].shape == (2, 3, 32, 32)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_sample_is_a_pure_function_of_seed_epoch_and_index():
    dataset = build_dataset(DATA)
    data = trainer.AugmentedDataset(dataset, small_config().augment, 7, need_depth=False)
    a, b, c = data[(1, 4)], data[(1, 4)], data[(2, 4)]
    assert torch.equal(a["rgb"], b["rgb"])
    assert not torch.equal(a["rgb"], c["rgb"])  # another epoch, another crop


def test_the_training_datasets_survive_pickling_for_spawned_workers(tmp_path):
    """Under the spawn start method (macOS, Windows) every DataLoader worker receives the
    dataset pickled: the segmentation targets and the AffinityNet's labels must pickle, and
    give the same sample on the other side."""
    import pickle

    from weakseg.data.io import write_label_png
    from weakseg.steps.infer_cam import save_cams
    from weakseg.steps.train_seg import PseudoLabelReader
    from weakseg.train.affinity import AffinityLabels

    dataset = build_dataset(DATA)
    for i in range(2):
        sample = dataset[i]
        write_label_png(tmp_path / "labels" / f"{sample.id}.png", sample.mask)
        cams = np.stack([(sample.mask == c).astype(np.float32) for c in sample.present_class_ids])
        save_cams(tmp_path / "infer_cam" / "cams" / f"{sample.id}.npz", cams, sample.present_class_ids)
    augment = small_config().augment
    seg = trainer.AugmentedDataset(dataset, augment, 0, False, trainer._TargetById(PseudoLabelReader(tmp_path, dataset)))
    affinity = trainer.AugmentedDataset(dataset, augment, 0, False,
                                        AffinityLabels(dataset, tmp_path / "infer_cam", tmp_path / "aff", 4.0, 24.0))
    for data in (seg, affinity):
        copy = pickle.loads(pickle.dumps(data))
        for key in (0, 1), (1, 0):
            ours, theirs = data[key], copy[key]
            assert ours.keys() == theirs.keys() and "mask" in ours
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), name


def test_images_of_different_sizes_are_one_clear_error():
    items = [{"rgb": torch.zeros(3, 8, 8)}, {"rgb": torch.zeros(3, 8, 9)}]
    with pytest.raises(ConfigError, match="crop_size"):
        trainer.collate(items)


def test_channels_last_matches_fp32_to_rounding(tmp_path):
    reference, ref_history = train_small(tmp_path, "plain", workers=0)
    model, history = train_small(tmp_path, "nhwc", workers=0, channels_last=True)
    np.testing.assert_allclose(history["epoch_losses"], ref_history["epoch_losses"], rtol=1e-4)
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-3, atol=1e-4)
    # The weights come back in the ordinary layout, so saved files read the same everywhere.
    assert all(p.is_contiguous() for p in model.parameters())


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    _, ref_history = train_small(tmp_path, "fp32", workers=0)
    _, history = train_small(tmp_path, "bf16", workers=0, precision="bf16")
    assert all(np.isfinite(history["epoch_losses"]))
    # bf16 keeps 8 bits of mantissa: the losses agree to about a percent, not bit for bit.
    np.testing.assert_allclose(history["epoch_losses"], ref_history["epoch_losses"], rtol=0.05)


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.precision"):
        train_small(tmp_path, "bad", workers=0, precision="fp8")


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clipping_bounds_the_step(tmp_path, clip):
    """With plain SGD (no momentum or decay) the first step moves the weights by lr times
    the gradient norm: at most lr * clip with clipping, far more without."""
    dataset = build_dataset(DATA)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_args={"width": 8}), len(dataset.foreground_ids))
    before = [p.detach().double().clone() for p in model.parameters()]
    config = small_config(epochs=1, max_steps_per_epoch=1, momentum=0.0, weight_decay=0.0, head_lr_mult=1.0,
                          grad_clip=clip, workers=0, poly_power=0.0)
    train(model, dataset, LossConfig(), config, tmp_path / "clip")
    moved = torch.sqrt(sum(((p.detach().double() - b) ** 2).sum() for p, b in zip(model.parameters(), before))).item()
    bound = config.lr * 1e-3
    # float32 weights: the difference of two nearby weights carries their rounding (~1e-3 here).
    assert (0 < moved <= bound * 1.01) if clip else moved > 20 * bound


def test_frozen_stages_keep_weights_and_batch_statistics(tmp_path):
    config = ModelConfig(backbone_args={"width": 8}, freeze_stages=2)
    dataset = build_dataset(DATA)
    torch.manual_seed(0)
    untrained = build_model(config, len(dataset.foreground_ids))
    model, _ = train_small(tmp_path, "frozen", model_config=config, workers=0)
    state, start = model.state_dict(), untrained.state_dict()
    # Stages 1-2 of the tiny CNN are features.0 .. features.2: weights and BN running stats.
    frozen = [k for k in state if k.startswith(("backbone.features.0.", "backbone.features.1.", "backbone.features.2."))]
    trained = [k for k in state if k.startswith("backbone.features.3.") and state[k].is_floating_point()]
    assert frozen and trained
    for key in frozen:
        assert torch.equal(state[key], start[key]), key
    assert any(not torch.equal(state[k], start[k]) for k in trained)
    model.train()
    assert not model.backbone.features[0].training and model.backbone.features[3].training


def test_freeze_stages_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.freeze_stages"):
        build_model(ModelConfig(backbone_args={"width": 8}, freeze_stages=9), 3)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "deit_tiny"])
def test_freeze_stages_on_the_factory_families(backbone):
    from weakseg.models.backbones import build_backbone
    from weakseg.models.freeze import freeze_stages

    net = build_backbone(backbone)
    stages = net.stages()
    assert len(stages) >= 4
    frozen = freeze_stages(net, 1)
    stem_params = [p for m in frozen for p in m.parameters()]
    assert stem_params and not any(p.requires_grad for p in stem_params)
    others = [p for m in stages[1] for p in m.parameters()]
    assert others and all(p.requires_grad for p in others)


def test_inference_runs_without_autograd():
    from weakseg.models.inference import infer_cams_and_probs

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_args={"width": 8}), 3).eval()
    cams, _ = infer_cams_and_probs(model, torch.rand(1, 3, 24, 24), [0, 2], with_probs=False)
    assert cams.shape == (2, 24, 24)
    assert torch.is_grad_enabled()  # inference mode ended with the call
