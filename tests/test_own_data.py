"""Bring your own data (issue 16): a `folder` dataset with no background class (every pixel
is one of the classes or void) through every command, as a new user runs them, and each
case that used to be dropped in silence now one clear line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from _trees import make_folder_tree, write_lines
from weakseg.cli import app
from weakseg.data import build_dataset, dataset_from_file
from weakseg.data.io import read_label_map
from weakseg.errors import ConfigError, DataError, DatasetProblems
from weakseg.metrics.evaluator import SegEvaluator

CLASSES = ["road", "grass", "sky"]
COLOURS = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], np.uint8)


def no_background_tree(root: Path, count: int = 8, size: int = 40, labels: list[str] | None = None, **kwargs) -> Path:
    """Images of two coloured halves (two of the three classes), a void band on top."""
    rng = np.random.default_rng(0)
    samples = {}
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        split = int(rng.integers(10, size - 10))
        a, b = rng.choice(3, 2, replace=False)
        mask[:, :split], mask[:, split:] = a, b
        mask[:2] = 255
        image = COLOURS[np.minimum(mask, 2)] + rng.integers(0, 30, (size, size, 3)).astype(np.uint8)
        samples[f"img{i:02d}"] = {"image": image, "mask": mask}
    return make_folder_tree(root, samples, classes=CLASSES, labels=labels, **kwargs)


def pipeline_config(tmp_path: Path, data_root: Path) -> Path:
    config = {
        "dataset": {"kind": "folder", "root": str(data_root)},
        "train_cam": {"model": {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}},
                      "train": {"epochs": 2, "batch_size": 4, "workers": 0,
                                "augment": {"crop_size": None, "scale_range": [1.0, 1.0]}}},
        "infer_cam": {"scales": [1.0], "flip": True},
        "refine": {"method": "crf", "crf_preset": "psa"},
        "pseudo_labels": {},
        "train_seg": {"model": {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 8},
                                "aspp_channels": 8},
                      "train": {"epochs": 1, "batch_size": 4, "workers": 0,
                                "augment": {"crop_size": None, "scale_range": [1.0, 1.0]}}},
        "predict": {"scales": [1.0], "flip": False},
        "evaluate": {},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def reference_summary(pred_dir: Path, dataset) -> dict:
    evaluator = SegEvaluator(dataset.class_names, background_index=None)
    for i in range(len(dataset)):
        sample = dataset[i]
        evaluator.add(read_label_map(pred_dir / f"{sample.id}.png"), sample.mask)
    return evaluator.summary()


def test_a_dataset_without_background_goes_through_every_command(tmp_path):
    data = no_background_tree(tmp_path / "data")
    dataset_config = tmp_path / "data.yaml"
    dataset_config.write_text(yaml.safe_dump({"kind": "folder", "root": str(data)}))
    config = pipeline_config(tmp_path, data)
    run = tmp_path / "run"

    check = invoke("data", "check", dataset_config).output
    assert "OK: 8 samples, 3 classes (road, grass, sky); background class: none; masks: 8 of 8; depth maps: 0 of 8" in check

    for command in ("train-cam", "infer-cam", "refine", "pseudo-labels"):
        invoke(command, config)
    dataset = build_dataset({"kind": "folder", "root": str(data)})
    assert dataset.background_index is None
    # infer-cam's metrics: null threshold (no background to threshold), classes in class order.
    cam_metrics = json.loads((run / "infer_cam" / "cam_metrics.json").read_text())
    assert cam_metrics["best_threshold"] is None and cam_metrics["background_class"] is None
    assert list(cam_metrics["per_class_iou"]) == CLASSES
    expected = reference_summary(run / "infer_cam" / "cam_labels", dataset)
    assert cam_metrics["miou"] == pytest.approx(expected["miou"]) and cam_metrics["contour_f"] == pytest.approx(expected["contour_f"])

    # eval with --data takes the dataset's "no background": every class counts in F, void in none.
    out = invoke("eval", "--pred", run / "pseudo_labels" / "labels", "--gt", data / "masks", "--data", dataset_config,
                 "--json", tmp_path / "e.json").output
    assert "background: none (every class counts in F)" in out
    summary = json.loads((tmp_path / "e.json").read_text())
    expected = reference_summary(run / "pseudo_labels" / "labels", dataset)
    assert summary["contour_f"] == pytest.approx(expected["contour_f"]) and summary["miou"] == pytest.approx(expected["miou"])
    assert summary["background_class"] is None and "mean over all classes" in summary["conventions"]["contour_f"]
    assert list(summary["per_class_f"]) == CLASSES and summary["background_source"].startswith("the dataset of")

    invoke("run", config)  # the remaining steps; the ones above are reused
    results = json.loads((run / "results.json").read_text())
    assert set(results["stages"]) == {"cam", "refined", "pseudo_labels", "final"}
    final = reference_summary(run / "predict" / "pred", dataset)
    assert results["stages"]["final"]["contour_f"] == pytest.approx(final["contour_f"])
    assert not list(run.rglob(".weakseg.lock"))  # no lock file is left behind

    invoke("report", run, "--out", tmp_path / "report.html")
    assert "road" in (tmp_path / "report.html").read_text()


def test_eval_states_its_background_assumption(tmp_path):
    data = no_background_tree(tmp_path / "data", count=2)
    out = invoke("eval", "--pred", data / "masks", "--gt", data / "masks", "--json", tmp_path / "a.json").output
    assert "background: 'class_0' (left out of F), assumed" in out.replace("\n", " ")
    assumed = json.loads((tmp_path / "a.json").read_text())
    assert assumed["background_class"] == "class_0" and assumed["background_source"].startswith("assumed")
    assert "mean over foreground classes" in assumed["conventions"]["contour_f"]
    invoke("eval", "--pred", data / "masks", "--gt", data / "masks", "--no-background", "--json", tmp_path / "b.json")
    explicit = json.loads((tmp_path / "b.json").read_text())
    assert explicit["background_class"] is None and explicit["background_source"] == "--no-background"


def test_report_takes_step_folders_and_run_folders_without_results(tmp_path):
    data = no_background_tree(tmp_path / "data", count=4)
    config = pipeline_config(tmp_path, data)
    invoke("train-cam", config)
    invoke("infer-cam", config)
    run = tmp_path / "run"
    (run / "results.json").unlink()  # as after single commands of an older release
    invoke("report", run / "infer_cam", "--out", tmp_path / "step.html")
    page = (tmp_path / "step.html").read_text()
    assert "no results.json: read from the finished step folder(s) infer_cam" in page
    invoke("report", run, "--out", tmp_path / "run.html", "--ids", "img03,img01")
    page = (tmp_path / "run.html").read_text()
    assert "train_cam, infer_cam" in page
    assert page.index("<td class='caption'>img03") < page.index("<td class='caption'>img01")
    assert "<td class='caption'>img00" not in page
    with pytest.raises(DataError, match="no weakseg outputs here"):
        invoke("report", tmp_path / "data", "--out", tmp_path / "x.html")


def test_overlays_cover_the_classes_by_default():
    from weakseg.report.html import overlay_indices

    dataset = build_dataset({"kind": "synthetic", "num_images": 30, "image_size": 24})
    chosen = overlay_indices(dataset, 4)
    assert len(chosen) == 4 and len(set(chosen)) == 4
    seen = set()
    for index in chosen[:2]:
        classes = set(dataset[index].present_class_ids)
        assert classes - seen  # each of the first picks shows a class not shown before
        seen |= classes


# ----------------------------------------------------------------------------- silent cases


def test_a_missing_mask_says_why_no_metrics(tmp_path):
    labels = [f"img{i:02d},0 1" for i in range(4)]
    data = no_background_tree(tmp_path / "data", count=4, labels=labels)
    (data / "masks" / "img02.png").unlink()
    dataset = build_dataset({"kind": "folder", "root": str(data)})
    assert [Path(p).name for p in dataset.absent_masks] == ["img02.png"]
    config = pipeline_config(tmp_path, data)
    invoke("train-cam", config)
    lines = []
    from weakseg.steps import pipeline

    pipeline.run_step("infer_cam", config, [], log=lines.append)
    assert not (tmp_path / "run" / "infer_cam" / "cam_metrics.json").exists()
    note = [line for line in lines if "no metrics" in line]
    assert len(note) == 1 and "1 of 4 images have no mask" in note[0] and str(data / "masks" / "img02.png") in note[0]


def test_a_labels_line_for_an_id_with_no_image_is_an_error(tmp_path):
    labels = [f"img{i:02d},0 1" for i in range(3)] + ["img99,2"]
    data = no_background_tree(tmp_path / "data", count=3, labels=labels)
    with pytest.raises(DatasetProblems, match="labels line for id 'img99', but .* has no image"):
        build_dataset({"kind": "folder", "root": str(data)})


@pytest.mark.parametrize("content", ["", "id,labels\n"])
def test_an_empty_labels_file_is_one_error_about_the_file(tmp_path, content):
    data = no_background_tree(tmp_path / "data", count=3)
    (data / "labels.csv").write_text(content)
    with pytest.raises(DataError) as caught:
        build_dataset({"kind": "folder", "root": str(data)})
    assert caught.value.path == str(data / "labels.csv") and "no label line" in caught.value.problem


def test_too_few_class_names_are_blamed_on_the_classes_file(tmp_path):
    labels = [f"img{i:02d},{i % 3} 2" for i in range(6)]
    data = no_background_tree(tmp_path / "data", count=6, labels=labels)
    write_lines(data / "classes.txt", ["road", "grass"])  # "sky" (id 2) forgotten
    with pytest.raises(DatasetProblems) as caught:
        build_dataset({"kind": "folder", "root": str(data)})
    problems = caught.value.problems
    assert len(problems) == 1  # one line, not one per labels line
    assert problems[0].path == str(data / "classes.txt")
    assert "2 class names (ids 0..1), but labels.csv uses class ids up to 2 on 6 line(s)" in problems[0].problem


def test_a_typo_in_a_top_level_dataset_file_names_the_key_as_written(tmp_path):
    data = no_background_tree(tmp_path / "data", count=2)
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({"kind": "folder", "root": str(data), "backgroud": 2}))
    with pytest.raises(ConfigError, match=r"flat.yaml: backgroud: unknown key") as caught:
        dataset_from_file(flat)
    assert "dataset.backgroud" not in str(caught.value)
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"dataset": {"kind": "folder", "root": str(data), "backgroud": 2}}))
    with pytest.raises(ConfigError, match=r"nested.yaml: dataset.backgroud: unknown key"):
        dataset_from_file(nested)


def test_file_paths_in_errors_are_absolute(tmp_path, monkeypatch):
    data = no_background_tree(tmp_path / "data", count=2)
    (data / "images" / "img01.png").write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)
    dataset = build_dataset({"kind": "folder", "root": "data"}, base_dir=Path("."))
    with pytest.raises(DataError) as caught:
        dataset[1]
    assert caught.value.path == str(tmp_path / "data" / "images" / "img01.png")


def test_a_step_that_fails_midway_says_its_folder_is_incomplete(tmp_path):
    data = no_background_tree(tmp_path / "data", count=4)
    config = pipeline_config(tmp_path, data)
    (data / "images" / "img02.png").write_bytes(b"not a png")
    from weakseg.steps import pipeline

    with pytest.raises(DataError) as caught:
        pipeline.run_step("train_cam", config, [], log=lambda m: None)
    assert "img02.png" in caught.value.path
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and f"{tmp_path / 'run' / 'train_cam'} is left incomplete" in notes[0]
    from weakseg.steps.base import StepFolder

    assert StepFolder(tmp_path / "run" / "train_cam", "any").state().startswith("started but not finished")


def test_out_is_relative_to_the_current_folder_and_printed_absolute(tmp_path, monkeypatch):
    data = no_background_tree(tmp_path / "data", count=4)
    config = pipeline_config(tmp_path, data)
    spec = yaml.safe_load(config.read_text())
    spec["out"] = "relative_run"
    (tmp_path / "configs").mkdir()
    moved = tmp_path / "configs" / "p.yaml"
    moved.write_text(yaml.safe_dump(spec))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    lines = []
    from weakseg.steps import pipeline

    pipeline.run_step("train_cam", moved, [], log=lines.append)
    assert (work / "relative_run" / "train_cam" / "done.json").is_file()
    assert lines[0] == f"train_cam: running -> {work / 'relative_run' / 'train_cam'}"


def test_long_steps_print_lines_when_there_is_no_terminal(capsys):
    from weakseg.progress import StepProgress, progress_bar

    with progress_bar() as bars:  # pytest's stderr is no terminal: no bar, lines instead
        progress = StepProgress(bars, "infer_cam")
        for i in range(1, 21):
            progress(i, 20)
        progress.note("epoch 1/2: loss 0.5000 (cls 0.5000); 10.0 images/s; ETA 0m03s")
    lines = capsys.readouterr().err.splitlines()
    tenths = [line for line in lines if "%" in line]
    assert [line.split()[1] for line in tenths] == [f"{10 * k}%" for k in range(1, 11)]
    assert lines[-1] == "infer_cam: epoch 1/2: loss 0.5000 (cls 0.5000); 10.0 images/s; ETA 0m03s"


def test_training_reports_one_line_per_epoch(tmp_path):
    from weakseg.losses.terms import LossConfig
    from weakseg.models.factory import ModelConfig, build_model
    from weakseg.train.trainer import TrainConfig, train

    dataset = build_dataset({"kind": "synthetic", "num_images": 8, "image_size": 32})
    model = build_model(ModelConfig(backbone_args={"width": 8}), len(dataset.foreground_ids))
    lines = []
    history = train(model, dataset, LossConfig(), TrainConfig(epochs=2, batch_size=4, workers=0, device="cpu"),
                    tmp_path, on_epoch=lines.append)
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert f"loss {history['epoch_losses'][1]:.4f} (cls {history['epoch_losses'][1]:.4f})" in lines[1]
    assert "images/s; ETA 0m00s" in lines[1]
    # The line also carries its numbers (EpochLine), equal to the history's, unrounded.
    assert [line.epoch for line in lines] == [1, 2]
    assert [line.loss for line in lines] == history["epoch_losses"]
    assert lines[1].terms == {"cls": pytest.approx(history["epoch_losses"][1])}
