"""`weakseg run` end to end on small synthetic data: every stage in results.json, the stage
metrics equal an independent evaluation of the files on disk, finished steps are skipped,
a changed config re-runs exactly the steps that depend on it, and `--from` re-runs a step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from weakseg.cli import app
from weakseg.data import build_dataset
from weakseg.data.io import read_label_map
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.steps import pipeline

TRAIN = {
    "epochs": 4,
    "batch_size": 8,
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.0001,
    "augment": {"crop_size": None, "scale_range": [1.0, 1.0], "hflip_prob": 0.5},
}
SMALL = {
    "dataset": {"kind": "synthetic", "num_images": 48, "image_size": 40},
    "cam": {
        "model": {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}},
        "loss": {"classification": {"kind": "gap"}},
        "train": TRAIN,
        "infer": {"scales": [1.0], "flip": True},
    },
    "refine": {"method": "pamr", "pamr_iterations": 3},
    "pseudo_labels": {"confidence": 0.3},
    "seg": {
        "model": {"backbone": "tiny_cnn", "backbone_args": {"width": 16, "output_stride": 4}, "aspp_channels": 16},
        "train": dict(TRAIN, epochs=24, optimizer="sgd", lr=0.01),
        "infer": {"scales": [1.0], "flip": True},
    },
}


def write(tmp_path, **changes):
    data = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data[section][leaf] = value
        else:
            data[key] = value
    data["out"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def evaluate_folder(folder, dataset):
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    for i in range(len(dataset)):
        evaluator.add(read_label_map(folder / f"{dataset.ids[i]}.png"), dataset[i].mask)
    return evaluator.summary()


def test_run_end_to_end_skips_and_reruns(tmp_path):
    config = write(tmp_path)
    lines: list[str] = []
    summary = pipeline.run(config, log=lines.append)
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    for stage in ("cam", "refined", "pseudo_labels", "final"):
        values = results["stages"][stage]
        assert set(values) == {"miou", "contour_f", "jf", "boundary_iou"}
        assert values["jf"] == pytest.approx((values["miou"] + values["contour_f"]) / 2)
        assert 0 <= values["miou"] <= 1

    # The reported numbers are those of the files on disk, evaluated independently.
    dataset = build_dataset(SMALL["dataset"])
    final = evaluate_folder(run_dir / "final" / "pred", dataset)
    assert final["miou"] == pytest.approx(results["stages"]["final"]["miou"], abs=1e-12)
    labels = evaluate_folder(run_dir / "pseudo_labels" / "labels", dataset)
    assert labels["miou"] == pytest.approx(results["stages"]["pseudo_labels"]["miou"], abs=1e-12)
    assert 0 < results["pseudo_labels"]["coverage"] <= 1
    # The segmentation network learnt its pseudo-labels: it agrees with them on most labelled
    # pixels, more than predicting their most frequent class everywhere would.
    hits, counts = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for sample_id in dataset.ids:
        label = read_label_map(run_dir / "pseudo_labels" / "labels" / f"{sample_id}.png")
        pred = read_label_map(run_dir / "final" / "pred" / f"{sample_id}.png")
        keep = label != 255
        hits += np.bincount(label[keep][pred[keep] == label[keep]], minlength=256)
        counts += np.bincount(label[keep], minlength=256)
    majority = counts.max() / counts.sum()
    assert hits.sum() / counts.sum() > majority + 0.06
    # and not only on the majority class: the two most frequent classes are both mostly right
    # (predicting one class everywhere would give 1 and 0)
    top_two = np.argsort(counts)[-2:]
    assert (hits[top_two] / counts[top_two]).min() > 0.6

    # Nothing changed: every step is skipped and results.json is the same.
    lines.clear()
    again = pipeline.run(config, log=lines.append)
    assert all("skipped" in line for line in lines) and len(lines) == len(pipeline.STEPS)
    assert again["stages"] == summary["stages"]

    # A changed pseudo-label threshold re-runs pseudo_labels and what follows, nothing before.
    stamp = (run_dir / "cam" / "done.json").stat().st_mtime_ns
    lines.clear()
    pipeline.run(config, ["pseudo_labels.confidence=0.6"], log=lines.append)
    ran = [line.split(":")[0] for line in lines if "running" in line]
    assert ran == ["pseudo_labels", "seg_train", "final"]
    assert (run_dir / "cam" / "done.json").stat().st_mtime_ns == stamp

    # --from refined re-runs refined and everything after it.
    lines.clear()
    pipeline.run(config, ["pseudo_labels.confidence=0.6"], from_step="refined", log=lines.append)
    assert [line.split(":")[0] for line in lines if "running" in line] == list(pipeline.STEPS[2:])


def test_interrupted_training_step_resumes(tmp_path):
    config = write(tmp_path)

    def crash_in_seg(step):
        def update(i, n):
            if step == "seg_train" and i == 8:  # inside epoch 2 (6 steps per epoch)
                raise KeyboardInterrupt

        return update

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, log=lambda m: None, progress=crash_in_seg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "seg_train" / "done.json").exists()
    assert (run_dir / "seg_train" / "checkpoint.pt").exists()
    lines: list[str] = []
    pipeline.run(config, log=lines.append)
    assert [line.split(":")[0] for line in lines if "running" in line] == ["seg_train", "final"]
    log_rows = (run_dir / "seg_train" / "log.csv").read_text().splitlines()
    epochs = SMALL["seg"]["train"]["epochs"]
    assert len(log_rows) == 1 + epochs * 6  # header + 6 steps per epoch, the resumed epoch once


def test_cli_run_and_bad_step_name(tmp_path):
    config = write(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--from", "nonsense"])
    assert result.exit_code != 0
    assert "nonsense" in str(result.exception) or "nonsense" in result.output


def test_run_to_a_step_stops_there_and_continues_later(tmp_path):
    config = write(tmp_path)
    lines: list[str] = []
    partial = pipeline.run(config, log=lines.append, to_step="refined")
    assert [line.split(":")[0] for line in lines] == ["cam_train", "cam", "refined"]
    assert set(partial["stages"]) == {"cam", "refined"} and "pseudo_labels" not in partial
    assert not (tmp_path / "run" / "pseudo_labels").exists()
    lines.clear()
    full = pipeline.run(config, log=lines.append)  # the rest, nothing again
    assert [line.split(":")[0] for line in lines if "running" in line] == ["pseudo_labels", "seg_train", "final"]
    assert full["stages"]["refined"] == partial["stages"]["refined"]
    with pytest.raises(Exception, match="comes before"):
        pipeline.run(config, from_step="final", to_step="cam")


@pytest.mark.parametrize("method", ["none", "crf", "spr", "affinity_rw"])
def test_every_refiner_runs_in_the_pipeline(tmp_path, method):
    if method == "crf":
        pytest.importorskip("pydensecrf", reason="pydensecrf2 is not installed (pip install pydensecrf2)")
    one_epoch = dict(TRAIN, epochs=1)
    affinity = {"backbone_args": {"width": 8, "output_stride": 4}, "dim": 16,
                "train": {"epochs": 1, "batch_size": 8, "augment": {"crop_size": 40}}}
    config = write(tmp_path, **{"refine": {"method": method, "pamr_iterations": 3, "affinity": affinity},
                                "seg.train": one_epoch})
    summary = pipeline.run(config, log=lambda m: None)
    refined = json.loads((tmp_path / "run" / "refined" / "refined_metrics.json").read_text())
    assert refined["method"] == method and summary["stages"]["refined"]["miou"] == refined["miou"]
    if method == "none":  # no refiner: the argmax of [(1 - max cam), cams] is the CAM at threshold 0.5
        assert summary["stages"]["refined"]["miou"] > 0
    if method == "affinity_rw":
        assert (tmp_path / "run" / "refined" / "affinity" / "checkpoint.pt").is_file()


def test_every_example_config_parses():
    # Each YAML in configs/ is a pipeline config (has `cam:`), a CAM training config (has
    # `model:`), or a dataset config (configs/data); each must load with no unknown key.
    from pathlib import Path

    from weakseg.data import load_dataset_config
    from weakseg.steps import train_cam

    root = Path(__file__).resolve().parents[1] / "configs"
    seen = 0
    from weakseg.config import load_yaml

    for path in sorted(root.rglob("*.yaml")):
        data = load_yaml(path)  # with its `base:` file, if any
        if "cam" in data:
            config, _ = pipeline.load_config(path)
            assert config.out.startswith("runs/"), path
        elif "model" in data:
            train_cam.load_config(path)
        else:
            assert "kind" in load_dataset_config(path), path
        seen += 1
    assert seen >= 32


def test_cli_train_seg_and_predict(tmp_path):
    # Pseudo-labels here are the synthetic masks with a void border: train-seg must read them,
    # ignore 255, and predict must report the metrics of the label maps it writes.
    from weakseg.data.io import write_label_png

    dataset = build_dataset(SMALL["dataset"])
    for i in range(len(dataset)):
        label = dataset[i].mask.copy()
        label[:2] = 255
        write_label_png(tmp_path / "labels" / "labels" / f"{dataset.ids[i]}.png", label)
    config = tmp_path / "seg.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": SMALL["dataset"], "labels": str(tmp_path / "labels"), "model": SMALL["seg"]["model"],
        "train": dict(TRAIN, epochs=2), "out": str(tmp_path / "seg"),
    }))
    runner = CliRunner()
    result = runner.invoke(app, ["train-seg", str(config)])
    assert result.exit_code == 0, result.output
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(SMALL["dataset"]))
    result = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "seg" / "seg_model.pt"), "--data", str(data),
                                 "--out", str(tmp_path / "pred"), "--scales", "1.0,0.75"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    again = evaluate_folder(tmp_path / "pred" / "pred", dataset)
    for key in ("miou", "contour_f", "jf", "boundary_iou"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-12)
    # a label id outside the class range is refused, naming the file
    bad = dataset[0].mask.copy()
    bad[0, 0] = 200
    write_label_png(tmp_path / "labels" / "labels" / f"{dataset.ids[0]}.png", bad)
    result = runner.invoke(app, ["train-seg", str(config), f"out={tmp_path / 'seg2'}"])
    assert result.exit_code != 0 and dataset.ids[0] in str(result.exception)


class _FixedScores(torch.nn.Module):
    """A 'network' whose class scores are fixed maps, resized to the input (for inference tests)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, images):
        size = images.shape[-2:]
        maps = torch.nn.functional.interpolate(self.scores, size=size, mode="bilinear", align_corners=False)
        return {"cams": maps.expand(images.shape[0], -1, -1, -1).clone()}


def test_model_probabilities_binomial_and_multinomial_by_hand():
    from weakseg.models.inference import infer_class_probs

    image = torch.zeros(1, 3, 4, 4)
    # binomial: classes 0 and 2 present with scores 0 and log 3 -> b = 1/2 and 3/4,
    # background (1 - 1/2)(1 - 3/4) = 1/8; normalised by 1/8 + 1/2 + 3/4 = 11/8
    scores = torch.tensor([0.0, 5.0, math.log(3.0)]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    probs = infer_class_probs(_FixedScores(scores), image, [0, 2], scales=[1.0], flip=True)
    np.testing.assert_allclose(probs[:, 0, 0], [1 / 11, 4 / 11, 6 / 11], rtol=1e-6)
    # multinomial: channel 0 background; softmax restricted to background + present class 1
    scores = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    probs = infer_class_probs(_FixedScores(scores), image, [0], scales=[1.0, 0.5], flip=False, background_channel=0)
    e = np.exp([1.0, 2.0])
    np.testing.assert_allclose(probs[:, 2, 3], e / e.sum(), rtol=1e-6)


def test_refine_with_the_model_background(tmp_path):
    config = write(tmp_path, **{"refine": {"method": "none", "background": "model"}, "seg.train": dict(TRAIN, epochs=1)})
    summary = pipeline.run(config, log=lambda m: None)
    dataset = build_dataset(SMALL["dataset"])
    with np.load(tmp_path / "run" / "cam" / "cams" / f"{dataset.ids[0]}.npz") as stored:
        probs, cams = stored["probs"].astype(np.float32), stored["cams"]
    assert probs.shape[0] == 1 + cams.shape[0] and np.allclose(probs.sum(0), 1, atol=2e-3)
    # refine.method none with the model background: the refined labels are the argmax of those probabilities
    with np.load(tmp_path / "run" / "refined" / "probs" / f"{dataset.ids[0]}.npz") as refined:
        np.testing.assert_array_equal(refined["probs"].astype(np.float32).argmax(0), probs.argmax(0))
    assert summary["stages"]["refined"]["miou"] > 0


def test_cli_refine_scores_what_it_writes(tmp_path):
    # CAM files made by hand from the synthetic masks (blurred), refined with PAMR from the
    # command line; refined_metrics.json must be the metrics of the saved probabilities' argmax.
    from scipy import ndimage

    from weakseg.steps.infer_cam import save_cams

    dataset = build_dataset(SMALL["dataset"])
    for i in range(len(dataset)):
        sample = dataset[i]
        ids = sample.present_class_ids
        cams = np.stack([ndimage.gaussian_filter((sample.mask == c).astype(np.float32), 2.0) for c in ids])
        cams /= np.maximum(cams.max(axis=(1, 2), keepdims=True), 1e-6)
        save_cams(tmp_path / "cam" / "cams" / f"{sample.id}.npz", cams, ids)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(SMALL["dataset"]))
    result = CliRunner().invoke(app, ["refine", "--cams", str(tmp_path / "cam"), "--data", str(data), "--out",
                                      str(tmp_path / "ref"), "--method", "pamr", "--background", "constant",
                                      "--constant", "0.3"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ref" / "refined_metrics.json").read_text())
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    for i in range(len(dataset)):
        with np.load(tmp_path / "ref" / "probs" / f"{dataset.ids[i]}.npz") as stored:
            label = stored["class_ids"][stored["probs"].astype(np.float32).argmax(0)].astype(np.uint8)
        evaluator.add(label, dataset[i].mask)
    assert metrics["miou"] == pytest.approx(evaluator.summary()["miou"], abs=1e-12)
    assert metrics["miou"] > 0.5  # blurred true masks stay good masks


def test_channel_probs_by_hand():
    from weakseg.refine.base import channel_probs

    cams = np.array([[[0.5]], [[0.25]]], dtype=np.float32)  # two present classes, one pixel
    ids = np.array([3, 7])
    # constant background 0.25: scores (0.25, 0.5, 0.25) / 1.0
    probs, channels = channel_probs(cams, ids, 0, "constant", constant=0.25)
    np.testing.assert_allclose(probs[:, 0, 0], [0.25, 0.5, 0.25], rtol=1e-6)
    assert channels.tolist() == [0, 3, 7]
    # power 2: background (1 - 0.5)^2 = 0.25, the same scores here
    probs, _ = channel_probs(cams, ids, 0, "power", alpha=2.0)
    np.testing.assert_allclose(probs[:, 0, 0], [0.25, 0.5, 0.25], rtol=1e-6)
    # no background class: the present classes normalised, (2/3, 1/3)
    probs, channels = channel_probs(cams, ids, None)
    np.testing.assert_allclose(probs[:, 0, 0], [2 / 3, 1 / 3], rtol=1e-6)
    assert channels.tolist() == [3, 7]
    with pytest.raises(ValueError, match="model"):
        channel_probs(cams, ids, 0, "model")


def test_step_hashes_ignore_unset_optional_keys_but_not_set_ones():
    """A finished run must not be invalidated by a release that adds an optional key (left
    null), while any key that is set still changes the hash of its step and those after."""
    from pathlib import Path

    from weakseg.config import from_mapping

    tmp_base = Path("/base")
    config = from_mapping(pipeline.PipelineConfig, json.loads(json.dumps(SMALL)))
    hashes = pipeline.step_hashes(config, tmp_base)
    # An unset optional key: the same hashes as a config without that key at all.
    assert config.cam.loss.fsl is None and config.cam.loss.classification.reads is None
    with_null = from_mapping(pipeline.PipelineConfig, dict(json.loads(json.dumps(SMALL)), out="runs/x"))
    assert pipeline.step_hashes(with_null, tmp_base) == hashes  # `out` is not part of any step
    section = pipeline._without_nulls({"a": None, "b": {"c": None, "d": 1}, "e": [{"f": None}]})
    assert section == {"b": {"d": 1}, "e": [{}]}
    # A key that is set changes cam_train and everything after it.
    changed = from_mapping(pipeline.PipelineConfig, json.loads(json.dumps(SMALL)))
    changed.cam.loss.classification.reads = ["cams"]
    new = pipeline.step_hashes(changed, tmp_base)
    assert all(new[step] != hashes[step] for step in pipeline.STEPS)
