"""torchrun with 2 gloo processes on CPU against one process: same training, same CAMs, same
pipeline results.

Stated tolerance: weights within 1e-5 (absolute) after 12 steps and logged losses within
1e-5; CAM files, label maps and metrics identical. The two runs compute the same global batch
means, but DDP's gradient all-reduce adds the ranks' partial sums in another order than one
process's batched convolution, so the last float32 bits differ and grow slowly with steps.

The model uses GroupNorm (tiny_cnn `norm: group`): BatchNorm statistics are per rank under
DDP (SyncBatchNorm is CUDA-only), so a BatchNorm model would differ by design, not by rounding.
45 images in batches of 8 leave a last batch of 5, split 3 + 2: the loss scaling must
weight the ranks by their sample counts for the runs to match.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
MODEL = {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4, "norm": "group"}}
TRAIN = {"epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001,
         "augment": {"crop_size": None, "scale_range": [1.0, 1.0], "hflip_prob": 0.5}}
CAM = {
    "dataset": {"kind": "synthetic", "num_images": 45, "image_size": 32},
    "train_cam": {"model": MODEL, "loss": {"classification": {"kind": "gap"}, "fsl": {"upsample": 1}}, "train": TRAIN},
    "infer_cam": {"scales": [1.0], "flip": True},
}

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not found beside {sys.executable}")


def launch(args: list[str], processes: int, cwd: Path) -> str:
    if processes == 1:
        command = [sys.executable, "-m", "weakseg", *args]
    else:
        command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", "-m", "weakseg", *args]
    proc = subprocess.run(command, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def log_values(path: Path) -> np.ndarray:
    rows = path.read_text().splitlines()[1:]
    return np.array([[float(x) for x in row.split(",")[3:]] for row in rows])


@pytest.fixture(scope="module")
def cam_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    runs = {}
    for processes in (1, 2):
        out = root / f"p{processes}"
        config = root / f"p{processes}.yaml"
        config.write_text(yaml.safe_dump(CAM | {"out": str(out)}))
        launch(["train-cam", str(config)], processes, root)
        launch(["infer-cam", str(config)], processes, root)
        runs[processes] = out
    return runs


def test_two_gloo_processes_train_the_same_network(cam_runs):
    one, two = (load(cam_runs[p] / "train_cam" / "cam_model.pt") for p in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    # The log holds the global batch means on both: 12 steps (6 per epoch, the last of 5 images).
    a, b = log_values(cam_runs[1] / "train_cam" / "log.csv"), log_values(cam_runs[2] / "train_cam" / "log.csv")
    assert a.shape == b.shape == (12, 3)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert a[-1, 0] < a[0, 0]  # it learned


def test_ddp_network_gives_the_same_cam_metrics(cam_runs):
    # Each run's CAMs from its own weights (within 1e-5 of each other): the metrics agree to
    # well within a pixel's worth, and every image has its CAM file.
    one, two = cam_runs[1] / "infer_cam", cam_runs[2] / "infer_cam"
    metrics = [json.loads((d / "cam_metrics.json").read_text()) for d in (one, two)]
    assert metrics[1]["miou"] == pytest.approx(metrics[0]["miou"], abs=2e-3)
    names = sorted(p.name for p in (one / "cams").iterdir())
    assert names == sorted(p.name for p in (two / "cams").iterdir()) and len(names) == 45
    assert json.loads((cam_runs[2] / "train_cam" / "run.json").read_text())["host"]["world_size"] == 2


def test_sharded_inference_of_one_checkpoint_is_identical(cam_runs, tmp_path):
    # The same weights file inferred by two ranks (each writes every other image; the sweep's
    # and the metrics' counts are summed over the ranks): exactly what one process writes.
    # The one-process run's train_cam folder, copied into a run folder of the same config.
    shutil.copytree(cam_runs[1] / "train_cam", tmp_path / "two" / "train_cam")
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(CAM | {"out": str(tmp_path / "two")}))
    launch(["infer-cam", str(config)], 2, tmp_path)
    one, two = cam_runs[1] / "infer_cam", tmp_path / "two" / "infer_cam"
    assert json.loads((one / "cam_metrics.json").read_text()) == json.loads((two / "cam_metrics.json").read_text())
    for path in sorted((one / "cams").iterdir()):
        with np.load(path) as a, np.load(two / "cams" / path.name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    for path in sorted((one / "cam_labels").iterdir()):
        assert path.read_bytes() == (two / "cam_labels" / path.name).read_bytes()


def test_pipeline_under_torchrun_matches_one_process(tmp_path):
    config = {
        "dataset": {"kind": "synthetic", "num_images": 24, "image_size": 32},
        "train_cam": {"model": MODEL, "loss": {"classification": {"kind": "gap"}}, "train": TRAIN},
        "infer_cam": {"scales": [1.0], "flip": False},
        "refine": {"method": "pamr", "pamr_iterations": 2},
        "pseudo_labels": {"confidence": 0.3},
        "train_seg": {"model": {**MODEL, "aspp_channels": 8}, "train": TRAIN},
        "predict": {"scales": [1.0], "flip": False},
        "evaluate": {},
    }
    results = {}
    for processes in (1, 2):
        path = tmp_path / f"p{processes}.yaml"
        path.write_text(yaml.safe_dump(config | {"out": str(tmp_path / f"p{processes}")}))
        stdout = launch(["run", str(path)], processes, tmp_path)
        assert stdout.count("results (") == 1  # one rank prints the table
        results[processes] = json.loads((tmp_path / f"p{processes}" / "results.json").read_text())
    for stage, metrics in results[1]["stages"].items():
        for key, value in metrics.items():
            assert results[2]["stages"][stage][key] == pytest.approx(value, abs=2e-3), (stage, key)
    assert set(results[2]["stages"]) == {"cam", "refined", "pseudo_labels", "final"}
