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
    "train_cam": {
        "model": {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}},
        "loss": {"classification": {"kind": "gap"}},
        "train": TRAIN,
    },
    "infer_cam": {"scales": [1.0], "flip": True},
    "refine": {"method": "pamr", "pamr_iterations": 3},
    "pseudo_labels": {"confidence": 0.3},
    "train_seg": {
        "model": {"backbone": "tiny_cnn", "backbone_args": {"width": 16, "output_stride": 4}, "aspp_channels": 16},
        "train": dict(TRAIN, epochs=24, optimizer="sgd", lr=0.01),
    },
    "predict": {"scales": [1.0], "flip": True},
    "evaluate": {},
}
STEPS_OF_SMALL = ["train_cam", "infer_cam", "refine", "pseudo_labels", "train_seg", "predict", "evaluate"]


def write(tmp_path, **changes):
    data = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data[section][leaf] = value
        elif value is None:
            data.pop(key)  # the step is left out
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
    final = evaluate_folder(run_dir / "predict" / "pred", dataset)
    assert final["miou"] == pytest.approx(results["stages"]["final"]["miou"], abs=1e-12)
    labels = evaluate_folder(run_dir / "pseudo_labels" / "labels", dataset)
    assert labels["miou"] == pytest.approx(results["stages"]["pseudo_labels"]["miou"], abs=1e-12)
    assert 0 < results["pseudo_labels"]["coverage"] <= 1
    # The segmentation network learnt its pseudo-labels: it agrees with them on most labelled
    # pixels, more than predicting their most frequent class everywhere would.
    hits, counts = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for sample_id in dataset.ids:
        label = read_label_map(run_dir / "pseudo_labels" / "labels" / f"{sample_id}.png")
        pred = read_label_map(run_dir / "predict" / "pred" / f"{sample_id}.png")
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
    assert all("skipped" in line for line in lines) and len(lines) == len(STEPS_OF_SMALL)
    assert again["stages"] == summary["stages"]
    # One folder per step, named as the step (and its YAML key).
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(STEPS_OF_SMALL)

    # A changed pseudo-label threshold re-runs pseudo_labels and what follows, nothing before.
    stamp = (run_dir / "infer_cam" / "done.json").stat().st_mtime_ns
    lines.clear()
    pipeline.run(config, ["pseudo_labels.confidence=0.6"], log=lines.append)
    ran = [line.split(":")[0] for line in lines if "running" in line]
    assert ran == ["pseudo_labels", "train_seg", "predict", "evaluate"]
    assert (run_dir / "infer_cam" / "done.json").stat().st_mtime_ns == stamp

    # --from refine re-runs refine and everything after it.
    lines.clear()
    pipeline.run(config, ["pseudo_labels.confidence=0.6"], from_step="refine", log=lines.append)
    assert [line.split(":")[0] for line in lines if "running" in line] == STEPS_OF_SMALL[2:]


def test_interrupted_training_step_resumes(tmp_path):
    config = write(tmp_path)

    def crash_in_seg(step):
        def update(i, n):
            if step == "train_seg" and i == 8:  # inside epoch 2 (6 steps per epoch)
                raise KeyboardInterrupt

        return update

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, log=lambda m: None, progress=crash_in_seg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "train_seg" / "done.json").exists()
    assert (run_dir / "train_seg" / "checkpoint.pt").exists()
    lines: list[str] = []
    pipeline.run(config, log=lines.append)
    assert [line.split(":")[0] for line in lines if "running" in line] == ["train_seg", "predict", "evaluate"]
    log_rows = (run_dir / "train_seg" / "log.csv").read_text().splitlines()
    epochs = SMALL["train_seg"]["train"]["epochs"]
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
    partial = pipeline.run(config, log=lines.append, to_step="refine")
    assert [line.split(":")[0] for line in lines] == ["train_cam", "infer_cam", "refine"]
    assert set(partial["stages"]) == {"cam", "refined"} and "pseudo_labels" not in partial
    assert not (tmp_path / "run" / "pseudo_labels").exists()
    lines.clear()
    full = pipeline.run(config, log=lines.append)  # the rest, nothing again
    assert [line.split(":")[0] for line in lines if "running" in line] == STEPS_OF_SMALL[3:]
    assert full["stages"]["refined"] == partial["stages"]["refined"]
    with pytest.raises(Exception, match="comes before"):
        pipeline.run(config, from_step="predict", to_step="infer_cam")


@pytest.mark.parametrize("method", ["none", "crf", "spr", "affinity_rw"])
def test_every_refiner_runs_in_the_pipeline(tmp_path, method):
    if method == "crf":
        pytest.importorskip("pydensecrf", reason="pydensecrf2 is not installed (pip install pydensecrf2)")
    one_epoch = dict(TRAIN, epochs=1)
    changes = {"refine": {"method": method, "pamr_iterations": 3}, "train_seg.train": one_epoch}
    if method == "affinity_rw":
        changes["train_affinity"] = {"backbone_args": {"width": 8, "output_stride": 4}, "dim": 16,
                                     "train": {"epochs": 1, "batch_size": 8, "augment": {"crop_size": 40}}}
    config = write(tmp_path, **changes)
    summary = pipeline.run(config, log=lambda m: None)
    refined = json.loads((tmp_path / "run" / "refine" / "refined_metrics.json").read_text())
    assert refined["method"] == method and summary["stages"]["refined"]["miou"] == refined["miou"]
    if method == "none":  # no refiner: the argmax of [(1 - max cam), cams] is the CAM at threshold 0.5
        assert summary["stages"]["refined"]["miou"] > 0
    if method == "affinity_rw":
        assert (tmp_path / "run" / "train_affinity" / "affinity_model.pt").is_file()
        assert summary["seconds"]["train_affinity"] >= 0


def test_every_example_config_parses():
    # Each YAML in configs/ is a pipeline config (one section per step it runs) or a dataset
    # config (configs/data); each must load with no unknown key.
    from pathlib import Path

    from weakseg.data import load_dataset_config

    root = Path(__file__).resolve().parents[1] / "configs"
    seen = 0
    for path in sorted(root.rglob("*.yaml")):
        if path.parent.name == "data":
            assert "kind" in load_dataset_config(path), path
        else:
            config, _ = pipeline.load_config(path)  # with its `base:` file, if any
            assert config.out.startswith("runs/"), path
            assert [s.name for s in config.present()][:2] == ["train_cam", "infer_cam"], path
        seen += 1
    assert seen >= 32


def test_single_step_commands_run_one_step_after_checking_their_inputs(tmp_path):
    # `weakseg <step> CONFIG` runs that step into RUN/<step>; it refuses to start before the
    # steps it reads finished with the same config, and its result equals what `weakseg run`
    # reports for it.
    config = write(tmp_path, **{"train_seg.train": dict(TRAIN, epochs=2)})
    runner = CliRunner()
    result = runner.invoke(app, ["infer-cam", str(config)])
    assert result.exit_code != 0
    assert "train_cam" in str(result.exception) and "not run yet" in str(result.exception)
    for name in STEPS_OF_SMALL:
        result = runner.invoke(app, [name.replace("_", "-"), str(config)])
        assert result.exit_code == 0, (name, result.output, result.exception)
        assert (tmp_path / "run" / name / "done.json").is_file()
    stepwise = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(stepwise["stages"]) == {"cam", "refined", "pseudo_labels", "final"}
    # `weakseg run` on the same config finds every step done: nothing runs again.
    lines: list[str] = []
    summary = pipeline.run(config, log=lines.append)
    assert all("skipped" in line for line in lines)
    assert summary["stages"] == stepwise["stages"]
    # After a changed upstream key, the downstream step refuses to start.
    result = runner.invoke(app, ["pseudo-labels", str(config), "refine.pamr_iterations=4"])
    assert result.exit_code != 0 and "another config" in str(result.exception)
    # A step the config has no section for.
    no_eval = write(tmp_path, evaluate=None)
    result = runner.invoke(app, ["evaluate", str(no_eval)])
    assert result.exit_code != 0 and "no `evaluate:` section" in str(result.exception)


def test_every_step_is_a_command_with_its_keys_in_help():
    from weakseg.steps import STAGE_OF_STEP, STEP_NAMES

    assert STEP_NAMES == tuple(step.name for step in pipeline.STEPS)
    assert STAGE_OF_STEP == {step.name: step.stage for step in pipeline.STEPS if step.stage is not None}
    runner = CliRunner()
    for step in pipeline.STEPS:
        result = runner.invoke(app, [step.command, "--help"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert f"RUN/{step.name}" in text
        # every top-level key of the step's config is listed
        import dataclasses

        for field in dataclasses.fields(step.config):
            assert f"{step.name}.{field.name}" in text, (step.name, field.name)


@pytest.mark.parametrize("old, new", [
    ({"cam": {"model": {}}}, "train_cam"), ({"seg": {}}, "train_seg"), ({"model": {}}, "train_cam.model"),
    ({"infer": {}}, "infer_cam"), ({"refine": {"affinity": {}}}, "train_affinity"),
])
def test_an_old_key_fails_naming_the_new_one(tmp_path, old, new):
    from weakseg.errors import ConfigError

    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"dataset": SMALL["dataset"], **old}))
    with pytest.raises(ConfigError) as caught:
        pipeline.load_config(path)
    message = str(caught.value)
    assert "\n" not in message and "renamed" in message and new in message


def test_cross_step_requirements_fail_when_the_config_loads(tmp_path):
    from weakseg.errors import ConfigError

    # the walk needs train_affinity; the model background needs infer_cam's probabilities
    with pytest.raises(ConfigError, match="train_affinity"):
        pipeline.load_config(write(tmp_path, refine={"method": "affinity_rw"}))
    with pytest.raises(ConfigError, match="infer_cam.with_probs"):
        pipeline.load_config(write(tmp_path, refine={"method": "none", "background": "model"}))
    # a step whose input step is absent
    with pytest.raises(ConfigError, match="reads the outputs of refine"):
        pipeline.load_config(write(tmp_path, refine=None))
    # a preset never overrules a power the user set
    with pytest.raises(ConfigError, match="train_affinity.alpha_low: set while preset seam"):
        pipeline.load_config(write(tmp_path, train_affinity={"alpha_low": 3.0}))
    config, _ = pipeline.load_config(write(tmp_path, train_affinity={"preset": None, "alpha_low": 3.0, "alpha_high": 9.0}))
    assert config.train_affinity.alphas() == (3.0, 9.0)
    # the walk's radius is refine's own key, not the affinity training radius
    config, _ = pipeline.load_config(write(tmp_path, train_affinity={"radius": 4}, refine={"method": "affinity_rw", "walk": {"radius": 3}}))
    assert (config.train_affinity.radius, config.refine.walk.radius) == (4, 3)


def test_refine_background_does_not_change_infer_cam():
    # No step's config changes another step's outputs: refine.background leaves the
    # infer_cam hash (and so its outputs) as they are.
    from weakseg.config import from_mapping

    def hashes(**changes):
        data = json.loads(json.dumps(SMALL))
        data.update(changes)
        config = from_mapping(pipeline.PipelineConfig, data)
        return pipeline.hashes_of(config, pipeline._saved(config, __import__("pathlib").Path("/base")))

    plain = hashes()
    other = hashes(refine={"method": "pamr", "background": "constant"})
    assert other["infer_cam"] == plain["infer_cam"] and other["refine"] != plain["refine"]


def test_train_seg_predict_evaluate_on_given_labels(tmp_path):
    # Pseudo-labels here are the synthetic masks with a void border, placed where the
    # pseudo_labels step writes them: train_seg must read them and ignore 255, evaluate must
    # report the metrics of the label maps predict wrote.
    from weakseg.config import from_mapping
    from weakseg.data.io import write_label_png
    from weakseg.errors import DataError
    from weakseg.steps import evaluate, predict, train_seg

    dataset = build_dataset(SMALL["dataset"])
    for i in range(len(dataset)):
        label = dataset[i].mask.copy()
        label[:2] = 255
        write_label_png(tmp_path / "pseudo_labels" / "labels" / f"{dataset.ids[i]}.png", label)
    seg = from_mapping(train_seg.TrainSegConfig, {"model": SMALL["train_seg"]["model"], "train": dict(TRAIN, epochs=2)})
    train_seg.run(seg, dataset, tmp_path)
    predict.run(from_mapping(predict.PredictConfig, {"scales": [1.0, 0.75]}), dataset, tmp_path)
    result = evaluate.run_step(evaluate.EvaluateConfig(), dataset, tmp_path)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    again = evaluate_folder(tmp_path / "predict" / "pred", dataset)
    for key in ("miou", "contour_f", "jf", "boundary_iou", "precision", "recall"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-12)
    assert result["miou"] == metrics["miou"]
    # min_class_area: the same predictions with every class under 30 % of the image dropped,
    # against a pixel-counting loop over the plain probabilities
    from weakseg.errors import ConfigError
    from weakseg.models.inference import predict_probs
    from weakseg.steps.model_files import SEG_MODEL, load_seg_model

    exact = {"scales": [1.0], "fold_batchnorm": False, "channels_last": False}
    predict.predict(tmp_path / SEG_MODEL, dataset, tmp_path / "filtered",
                    from_mapping(predict.PredictConfig, dict(exact, min_class_area=0.3)))
    model, _ = load_seg_model(tmp_path / SEG_MODEL, torch.device("cpu"))
    dropped_any = False
    for i in range(len(dataset)):
        rgb = torch.from_numpy(np.ascontiguousarray(dataset[i].image)).permute(2, 0, 1)
        probs = predict_probs(model.eval(), rgb, [1.0], True)
        winner = probs.argmax(axis=0)
        areas = [(winner == c).mean() for c in range(probs.shape[0])]
        largest = max(range(1, probs.shape[0]), key=lambda c: areas[c])
        kept = [c for c in range(probs.shape[0]) if c in (0, largest) or areas[c] >= 0.3]
        dropped_any |= len(kept) < sum(a > 0 for a in areas)
        expected = np.asarray(kept)[probs[kept].argmax(axis=0)]
        np.testing.assert_array_equal(read_label_map(tmp_path / "filtered" / "pred" / f"{dataset.ids[i]}.png"), expected)
    assert dropped_any  # the filter did something on this data
    with pytest.raises(ConfigError, match="min_class_area"):
        from_mapping(predict.PredictConfig, {"min_class_area": 1.5})
    # a label id outside the class range is refused, naming the file
    bad = dataset[0].mask.copy()
    bad[0, 0] = 200
    write_label_png(tmp_path / "pseudo_labels" / "labels" / f"{dataset.ids[0]}.png", bad)
    import shutil

    shutil.rmtree(tmp_path / "train_seg")  # else it resumes its finished training
    with pytest.raises(DataError, match=f"{dataset.ids[0]}.png: label ids \\[200\\]"):
        train_seg.run(seg, dataset, tmp_path)


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
    config = write(tmp_path, **{"refine": {"method": "none", "background": "model"}, "train_seg.train": dict(TRAIN, epochs=1),
                                "infer_cam.with_probs": True})
    summary = pipeline.run(config, log=lambda m: None)
    dataset = build_dataset(SMALL["dataset"])
    with np.load(tmp_path / "run" / "infer_cam" / "cams" / f"{dataset.ids[0]}.npz") as stored:
        probs, cams = stored["probs"].astype(np.float32), stored["cams"]
    assert probs.shape[0] == 1 + cams.shape[0] and np.allclose(probs.sum(0), 1, atol=2e-3)
    # refine.method none with the model background: the refined labels are the argmax of those probabilities
    with np.load(tmp_path / "run" / "refine" / "probs" / f"{dataset.ids[0]}.npz") as refined:
        np.testing.assert_array_equal(refined["probs"].astype(np.float32).argmax(0), probs.argmax(0))
    assert summary["stages"]["refined"]["miou"] > 0


def test_refine_scores_what_it_writes(tmp_path):
    # CAM files made by hand from the synthetic masks (blurred), placed where infer_cam writes
    # them, refined with PAMR by the refine step; refined_metrics.json must be the metrics of
    # the saved probabilities' argmax.
    from scipy import ndimage

    from weakseg.config import from_mapping
    from weakseg.steps import refine
    from weakseg.steps.infer_cam import save_cams

    dataset = build_dataset(SMALL["dataset"])
    for i in range(len(dataset)):
        sample = dataset[i]
        ids = sample.present_class_ids
        cams = np.stack([ndimage.gaussian_filter((sample.mask == c).astype(np.float32), 2.0) for c in ids])
        cams /= np.maximum(cams.max(axis=(1, 2), keepdims=True), 1e-6)
        save_cams(tmp_path / "infer_cam" / "cams" / f"{sample.id}.npz", cams, ids)
    config = from_mapping(refine.RefineConfig, {"method": "pamr", "background": "constant", "background_constant": 0.3})
    refine.run(config, dataset, tmp_path)
    metrics = json.loads((tmp_path / "refine" / "refined_metrics.json").read_text())
    evaluator = SegEvaluator(dataset.class_names, dataset.background_index)
    for i in range(len(dataset)):
        with np.load(tmp_path / "refine" / "probs" / f"{dataset.ids[i]}.npz") as stored:
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
    from weakseg.steps.base import _without_nulls

    def hashes_of(config):
        return pipeline.hashes_of(config, pipeline._saved(config, Path("/base")))

    config = from_mapping(pipeline.PipelineConfig, json.loads(json.dumps(SMALL)))
    hashes = hashes_of(config)
    assert list(hashes) == STEPS_OF_SMALL
    # An unset optional key: the same hashes as a config without that key at all.
    assert config.train_cam.loss.fsl is None and config.train_cam.loss.classification.reads is None
    with_null = from_mapping(pipeline.PipelineConfig, dict(json.loads(json.dumps(SMALL)), out="runs/x"))
    assert hashes_of(with_null) == hashes  # `out` is not part of any step
    section = _without_nulls({"a": None, "b": {"c": None, "d": 1}, "e": [{"f": None}]})
    assert section == {"b": {"d": 1}, "e": [{}]}
    # A key that is set changes train_cam and everything after it.
    changed = from_mapping(pipeline.PipelineConfig, json.loads(json.dumps(SMALL)))
    changed.train_cam.loss.classification.reads = ["cams"]
    new = hashes_of(changed)
    assert all(new[step] != hashes[step] for step in STEPS_OF_SMALL)
    # A key of a later step leaves the earlier ones.
    changed = from_mapping(pipeline.PipelineConfig, json.loads(json.dumps(SMALL)))
    changed.predict.flip = False
    new = hashes_of(changed)
    assert [s for s in STEPS_OF_SMALL if new[s] != hashes[s]] == ["predict", "evaluate"]
