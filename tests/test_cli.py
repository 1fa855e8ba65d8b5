"""The command line end to end: demo determinism, eval against the demo's own numbers and on
real VOC masks, and one clear error per bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from weakseg.cli import app, main
from weakseg.data.io import write_label_png

runner = CliRunner()

METRIC_KEYS = ("miou", "contour_f", "jf", "boundary_iou", "per_class_iou", "num_images")


def run_main(args, capsys):
    """Run the real entry point (with its error handling) and return (exit code, stdout+stderr)."""
    import sys

    old = sys.argv
    sys.argv = ["weakseg", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.slow
def test_demo_quick_end_to_end_is_deterministic(tmp_path):
    first = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    text_a = (tmp_path / "a" / "results.json").read_text()
    assert text_a == (tmp_path / "b" / "results.json").read_text()

    results = json.loads(text_a)
    for key in METRIC_KEYS + ("cam_threshold",):
        assert key in results
    # Training really happened: the loss fell, and the CAMs beat labelling everything background
    # (J = bg IoU / 5 classes < 0.2) while staying clearly imperfect.
    assert results["train_loss"][-1] < 0.8 * results["train_loss"][0]
    assert 0.3 < results["miou"] < 0.9
    assert 0.0 < results["contour_f"] < 0.9
    assert results["jf"] == pytest.approx((results["miou"] + results["contour_f"]) / 2)
    assert len(list((tmp_path / "a" / "overlays").glob("*.png"))) > 0

    # `weakseg eval` on the demo's own label maps reproduces the demo's numbers exactly.
    out_json = tmp_path / "eval.json"
    run = runner.invoke(
        app,
        ["eval", "--pred", str(tmp_path / "a" / "pseudo_labels"), "--gt", str(tmp_path / "a" / "gt"),
         "--classes", str(tmp_path / "a" / "classes.txt"), "--json", str(out_json)],
    )
    assert run.exit_code == 0, run.output
    evaluated = json.loads(out_json.read_text())
    for key in METRIC_KEYS:
        assert evaluated[key] == results[key], key


def test_eval_gt_as_prediction_on_real_voc_is_one(voc_root, tmp_path):
    masks = voc_root / "SegmentationClass"
    out_json = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", "--pred", str(masks), "--gt", str(masks), "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out_json.read_text())
    assert metrics["num_images"] == 330
    assert metrics["miou"] == 1.0 and metrics["contour_f"] == 1.0 and metrics["jf"] == 1.0
    assert set(metrics) >= set(METRIC_KEYS)


def _label_dirs(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for name in ("a", "b"):
        label = np.zeros((20, 30), np.uint8)
        label[5:15, 5:20] = 1
        write_label_png(gt_dir / f"{name}.png", label)
        write_label_png(pred_dir / f"{name}.png", label)
    return gt_dir, pred_dir


def test_eval_hand_case_json(tmp_path):
    gt_dir, pred_dir = _label_dirs(tmp_path)
    shifted = np.zeros((20, 30), np.uint8)
    shifted[5:15, 10:25] = 1  # 10 of 15 columns overlap
    write_label_png(pred_dir / "b.png", shifted)
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nthing\n")
    out_json = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", "--pred", str(pred_dir), "--gt", str(gt_dir), "--classes", str(classes), "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    m = json.loads(out_json.read_text())
    # thing: TP = 150 + 100, GT = 300, pred = 300 -> IoU = 250 / 350
    assert m["per_class_iou"]["thing"] == pytest.approx(250 / 350)
    # background: 1200 px total; TP = 450 + 400 -> IoU = 850 / (900 + 900 - 850)
    assert m["per_class_iou"]["background"] == pytest.approx(850 / 950)
    assert m["miou"] == pytest.approx((250 / 350 + 850 / 950) / 2)
    assert "thing" in result.output


def test_eval_missing_prediction_names_file(tmp_path, capsys):
    gt_dir, pred_dir = _label_dirs(tmp_path)
    (pred_dir / "b.png").unlink()
    code, output = run_main(["eval", "--pred", pred_dir, "--gt", gt_dir], capsys)
    assert code == 2
    assert "b.png" in output and "prediction missing" in output


def test_eval_size_mismatch_and_bad_ids_name_files(tmp_path, capsys):
    gt_dir, pred_dir = _label_dirs(tmp_path)
    write_label_png(pred_dir / "a.png", np.zeros((10, 10), np.uint8))
    bad = np.zeros((20, 30), np.uint8)
    bad[0, 0] = 7
    write_label_png(pred_dir / "b.png", bad)
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nthing\n")
    json_path = tmp_path / "out.json"
    code, output = run_main(["eval", "--pred", pred_dir, "--gt", gt_dir, "--classes", classes, "--json", json_path], capsys)
    assert code == 2
    assert "a.png" in output and "differs from ground truth" in output
    assert "b.png" in output and "outside 0..1" in output
    assert not json_path.exists()  # nothing half-written


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "eval", "data"):
        assert command in result.output


def test_data_check_names_every_broken_file(tmp_path, capsys):
    """A deliberately broken `folder` dataset with depth: each broken file is named on its own
    line, convertible images (grayscale, CMYK, opaque RGBA) pass, and the exit code is 1."""
    from PIL import Image

    from tests._trees import corrupt, make_folder_tree, rgb, save_png, truncate, write_lines

    good_mask = np.zeros((8, 8), np.uint8)
    good_mask[2:6, 2:6] = 1
    depth = np.full((8, 8), 1000, np.uint16)
    ok = {"image": rgb(8, 8), "mask": good_mask, "depth": depth}
    bad_ids = np.zeros((8, 8), np.uint8)
    bad_ids[0, 0] = 9
    root = make_folder_tree(
        tmp_path / "broken",
        {
            "ok": ok,
            "gray": ok,
            "cmyk": ok,
            "rgba_opaque": ok,
            "rgba_transparent": ok,
            "sixteen_bit": ok,
            "corrupt": ok,
            "truncated": {**ok, "image_ext": ".jpg"},
            "size_mismatch": {**ok, "mask": np.zeros((6, 8), np.uint8)},
            "out_of_range": {**ok, "mask": bad_ids},
            "no_depth": {"image": rgb(8, 8), "mask": good_mask},
        },
    )
    images = root / "images"
    Image.fromarray(rgb(8, 8)).convert("L").save(images / "gray.png")
    Image.fromarray(rgb(8, 8)).convert("CMYK").save(images / "cmyk.jpg")
    (images / "cmyk.png").unlink()
    rgba = np.dstack([rgb(8, 8), np.full((8, 8), 255, np.uint8)])
    save_png(images / "rgba_opaque.png", Image.fromarray(rgba, "RGBA"))
    rgba[0, 0, 3] = 10
    save_png(images / "rgba_transparent.png", Image.fromarray(rgba, "RGBA"))
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(images / "sixteen_bit.png")
    corrupt(images / "corrupt.png")
    truncate(images / "truncated.jpg", keep=0.4)
    ids = ["ok", "gray", "cmyk", "rgba_opaque", "rgba_transparent", "sixteen_bit", "corrupt", "truncated",
           "size_mismatch", "out_of_range", "no_depth", "missing", "../escape"]
    write_lines(root / "list.txt", ids)
    config = tmp_path / "broken.yaml"
    config.write_text("kind: folder\nroot: broken\nids_file: list.txt\nrequire_depth: true\ndepth_scale: 0.001\n")
    listing_before = sorted(p.name for p in tmp_path.rglob("*"))

    code, output = run_main(["data", "check", config], capsys)
    assert code == 1
    error_lines = [line for line in output.splitlines() if line.startswith("ERROR ")]
    expected = {
        images / "rgba_transparent.png": "transparent",
        images / "sixteen_bit.png": "16-bit",
        images / "corrupt.png": "corrupt or truncated",
        images / "truncated.jpg": "corrupt or truncated",
        root / "masks" / "size_mismatch.png": "does not match image size",
        root / "masks" / "out_of_range.png": "outside 0..2",
        root / "depth" / "no_depth.png": "depth map does not exist",
        images / "missing": "no image for id 'missing'",
        root / "../escape": "escape the dataset root",
    }
    for path, problem in expected.items():
        assert any(str(path) in line and problem in line for line in error_lines), (path, problem, output)
    assert len(error_lines) == len(expected) + 2  # + the missing id's mask and depth map
    for fine in ("ok", "gray", "cmyk", "rgba_opaque"):
        assert not any(f"/{fine}." in line for line in error_lines), fine
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing_before  # nothing written


def test_data_check_ok_on_synthetic(tmp_path, capsys):
    config = tmp_path / "syn.yaml"
    config.write_text("dataset:\n  kind: synthetic\n  num_images: 5\n  image_size: 32\n")
    code, output = run_main(["data", "check", config], capsys)
    assert code == 0 and "OK: 5 samples, 5 classes" in output


def test_config_errors_name_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("kind: synthetic\nnum_imgs: 5\n")
    code, output = run_main(["data", "check", config], capsys)
    assert code == 2 and "num_imgs: unknown key" in output and "num_images" in output
    config.write_text("kind: pascal\n")
    code, output = run_main(["data", "check", config], capsys)
    assert code == 2 and "'pascal' is not allowed" in output and "voc" in output
