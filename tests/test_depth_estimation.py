"""Depth from an estimator: TorchScript / module:callable / Hugging Face (error path) models,
the on-disk cache and its manifest, disparity orientation, a `folder` dataset reading the
written maps, and `weakseg data depth` end to end."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from weakseg.cli import app
from weakseg.data import build_dataset
from weakseg.data.depth_estimation import (
    DISPARITY_FLOOR,
    disparity_to_depth,
    estimate_depth_folder,
    load_depth_model,
)
from weakseg.data.io import write_rgb_png
from weakseg.errors import ConfigError, DataError

runner = CliRunner()
# TorchScript is what this feature loads; its deprecation in recent torch is not under test.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class MeanColour(torch.nn.Module):
    """offset + mean colour, average-pooled by `pool` (so the output is smaller than the image)."""

    def __init__(self, offset: float = 1.0, pool: int = 2):
        super().__init__()
        self.offset = offset
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.mean(1, keepdim=True), self.pool) + self.offset


def scripted(path, offset: float = 1.0, pool: int = 2):
    torch.jit.script(MeanColour(offset, pool)).save(str(path))
    return path


def expected_raw(image: np.ndarray, offset: float = 1.0, pool: int = 2) -> np.ndarray:
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0
    y = F.avg_pool2d(x.mean(1, keepdim=True), pool) + offset
    return F.interpolate(y, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.fixture(scope="module")
def dataset():
    return build_dataset({"kind": "synthetic", "num_images": 6, "image_size": 32})


@pytest.fixture
def model_path(tmp_path):
    return scripted(tmp_path / "mean_colour.pt")


def test_torchscript_maps_match_the_function_with_resize(dataset, model_path, tmp_path):
    model = load_depth_model(model_path, "cpu")
    assert model.kind == "torchscript" and model.content_hash.startswith("sha256:")
    out = tmp_path / "est"
    result = estimate_depth_folder(dataset, model, out)
    assert result.written == dataset.ids and result.reused == []
    for index, sample_id in enumerate(dataset.ids):
        image = dataset[index].image
        values = np.load(out / f"{sample_id}.npy")
        assert values.dtype == np.float32 and values.shape == image.shape[:2]
        np.testing.assert_allclose(values, expected_raw(image), rtol=0, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(model_path.resolve())
    assert manifest["model_hash"] == model.content_hash and manifest["output"] == "depth"
    assert "depth_scale: 1.0" in manifest["scale"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # Full resolution (no resize): plain numpy gives the same numbers.
    full = load_depth_model(scripted(tmp_path / "full.pt", pool=1), "cpu")
    image = dataset[0].image
    np.testing.assert_allclose(full.predict(image), 1.0 + image.astype(np.float32).mean(-1) / 255.0, atol=1e-6)


def test_second_run_uses_the_cache_and_repairs_invalid_maps(dataset, model_path, tmp_path, monkeypatch):
    model = load_depth_model(model_path, "cpu")
    out = tmp_path / "est"
    estimate_depth_folder(dataset, model, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}

    def fail(image):
        raise AssertionError("the model must not run on cached ids")

    forward = model.forward
    monkeypatch.setattr(model, "forward", fail)
    again = estimate_depth_folder(dataset, model, out)
    assert again.written == [] and again.reused == dataset.ids
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == mtimes

    # A corrupt map and a map of the wrong size are recomputed, the rest is kept.
    (out / f"{dataset.ids[1]}.npy").write_bytes(b"not an array")
    np.save(out / f"{dataset.ids[2]}.npy", np.zeros((8, 8), np.float32))
    monkeypatch.setattr(model, "forward", forward)
    repaired = estimate_depth_folder(dataset, model, out)
    assert repaired.written == dataset.ids[1:3]
    np.testing.assert_allclose(np.load(out / f"{dataset.ids[2]}.npy"), expected_raw(dataset[2].image), atol=1e-6)


def test_other_model_refuses_the_cache_until_overwrite(dataset, model_path, tmp_path):
    out = tmp_path / "est"
    estimate_depth_folder(dataset, load_depth_model(model_path, "cpu"), out)
    other = load_depth_model(scripted(tmp_path / "other.pt", offset=2.0), "cpu")
    with pytest.raises(DataError, match="different model") as info:
        estimate_depth_folder(dataset, other, out)
    assert str(out) in str(info.value) and "--overwrite" in str(info.value)
    # Same model file, other output kind: also a different cache.
    with pytest.raises(DataError, match="output"):
        estimate_depth_folder(dataset, load_depth_model(model_path, "cpu", output="disparity"), out)

    result = estimate_depth_folder(dataset, other, out, overwrite=True)
    assert result.written == dataset.ids
    np.testing.assert_allclose(np.load(out / f"{dataset.ids[0]}.npy"), expected_raw(dataset[0].image, 2.0), atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["model_hash"] == other.content_hash

    # A renamed copy of the model has the same content hash and keeps the cache.
    moved = tmp_path / "renamed.ts"
    moved.write_bytes((tmp_path / "other.pt").read_bytes())
    assert estimate_depth_folder(dataset, load_depth_model(moved, "cpu"), out).reused == dataset.ids


def test_npy_files_without_manifest_are_refused(dataset, model_path, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    np.save(out / "keep.npy", np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match="no manifest.json"):
        estimate_depth_folder(dataset, load_depth_model(model_path, "cpu"), out)
    result = estimate_depth_folder(dataset, load_depth_model(model_path, "cpu"), out, overwrite=True)
    assert result.unlisted == [out / "keep.npy"]  # not a dataset id: left untouched


def test_disparity_output_is_flipped_to_larger_is_farther(dataset, model_path, tmp_path):
    np.testing.assert_allclose(
        disparity_to_depth(np.array([[1.0, 2.0], [4.0, 0.0]], np.float32)), [[4.0, 2.0], [1.0, 1 / DISPARITY_FLOOR]]
    )
    with pytest.raises(ValueError, match="positive maximum"):
        disparity_to_depth(np.zeros((2, 2), np.float32))

    model = load_depth_model(model_path, "cpu", output="disparity")
    out = tmp_path / "disp"
    estimate_depth_folder(dataset, model, out)
    for index in range(3):
        raw = expected_raw(dataset[index].image)  # the model's output, read as disparity
        depth = np.load(out / f"{dataset.ids[index]}.npy")
        np.testing.assert_allclose(depth, raw.max() / np.maximum(raw, DISPARITY_FLOOR * raw.max()), rtol=1e-5)
        # Larger disparity = nearer: the largest raw value is the smallest depth, and order reverses.
        assert depth.flat[raw.argmax()] == pytest.approx(1.0)
        order = np.argsort(raw.ravel(), kind="stable")
        assert np.all(np.diff(depth.ravel()[order]) <= 1e-6)
        assert np.corrcoef(raw.ravel(), depth.ravel())[0, 1] < 0


def _folder_dataset_on_disk(root, dataset):
    (root / "images" / "sub").mkdir(parents=True)
    ids = ["a", "sub/b", "c"]
    for index, sample_id in enumerate(ids):
        write_rgb_png(root / "images" / f"{sample_id}.png", dataset[index].image)
    (root / "classes.txt").write_text("background\nthing\n")
    (root / "labels.csv").write_text("a,1\nsub/b,\nc,1\n")
    (root / "list.txt").write_text("\n".join(ids) + "\n")
    return {"kind": "folder", "root": str(root), "ids_file": "list.txt"}


def test_folder_config_reads_the_estimated_depth(dataset, model_path, tmp_path):
    config = _folder_dataset_on_disk(tmp_path / "data", dataset)
    folder = build_dataset(config)
    out = tmp_path / "estimated"
    estimate_depth_folder(folder, load_depth_model(model_path, "cpu"), out)
    assert (out / "sub" / "b.npy").is_file()  # ids with `/` get sub-folders

    with_depth = build_dataset({**config, "depth_dir": str(out), "depth_scale": 1.0, "require_depth": True})
    assert with_depth.ids == ["a", "sub/b", "c"]
    for index in range(len(with_depth)):
        sample = with_depth[index]
        assert sample.depth is not None and sample.depth.dtype == np.float32
        np.testing.assert_array_equal(sample.depth, np.load(out / f"{sample.id}.npy"))
        np.testing.assert_allclose(sample.depth, expected_raw(sample.image), atol=1e-6)


def test_ids_never_write_outside_the_folder(model_path, tmp_path):
    escaping = build_dataset({"kind": "synthetic", "num_images": 2, "image_size": 16})
    escaping.ids[1] = "../evil"
    out = tmp_path / "est"
    with pytest.raises(DataError, match="escape"):
        estimate_depth_folder(escaping, load_depth_model(model_path, "cpu"), out)
    assert not (tmp_path / "evil.npy").exists() and not out.exists()


USER_MODELS = '''
import torch


class Net(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight))

    def forward(self, x):
        return 1.0 + self.weight * x.mean(1)  # (1, h, w)


def build():
    return Net(2.0)


def build_other():
    return Net(3.0)


instance = Net(2.0)


def not_a_module():
    return 42
'''


def test_module_callable_specs(dataset, tmp_path, monkeypatch):
    source = tmp_path / "weakseg_test_user_depth.py"
    source.write_text(USER_MODELS)
    image = dataset[0].image
    colour = image.astype(np.float32).mean(-1) / 255.0

    by_file = load_depth_model(f"{source}:build", "cpu")
    assert by_file.kind == "python"
    np.testing.assert_allclose(by_file.predict(image), 1.0 + 2.0 * colour, atol=1e-5)

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "weakseg_test_user_depth", raising=False)
    by_name = load_depth_model("weakseg_test_user_depth:build", "cpu")
    np.testing.assert_allclose(by_name.predict(image), 1.0 + 2.0 * colour, atol=1e-5)
    assert load_depth_model("weakseg_test_user_depth:instance", "cpu").content_hash == by_name.content_hash
    assert load_depth_model("weakseg_test_user_depth:build_other", "cpu").content_hash != by_name.content_hash

    normalised = load_depth_model("weakseg_test_user_depth:build", "cpu", mean=[0.5] * 3, std=[0.25] * 3)
    np.testing.assert_allclose(normalised.predict(image), 1.0 + 2.0 * (colour - 0.5) / 0.25, atol=1e-4)

    result = estimate_depth_folder(dataset, by_name, tmp_path / "est")
    assert len(result.written) == len(dataset)

    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        load_depth_model("weakseg_test_user_depth:not_a_module", "cpu")
    with pytest.raises(ConfigError, match="no attribute"):
        load_depth_model("weakseg_test_user_depth:missing", "cpu")
    with pytest.raises(ConfigError, match="both or neither"):
        load_depth_model("weakseg_test_user_depth:build", "cpu", mean=[0.5] * 3)


def test_bad_models_give_one_clear_error(tmp_path, monkeypatch):
    hf = tmp_path / "depth-anything-small"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # missing, whatever is installed
    with pytest.raises(DataError, match="pip install transformers") as info:
        load_depth_model(hf, "cpu")
    assert str(hf) in str(info.value)

    with pytest.raises(DataError, match="no config.json"):
        load_depth_model(tmp_path, "cpu")
    with pytest.raises(DataError, match="does not exist"):
        load_depth_model(tmp_path / "nowhere.pt", "cpu")
    pickled = tmp_path / "pickled.pt"
    torch.save({"weight": torch.ones(1)}, pickled)
    with pytest.raises(DataError, match="not a loadable TorchScript"):
        load_depth_model(pickled, "cpu")
    with pytest.raises(ConfigError, match="output"):
        load_depth_model(pickled, "cpu", output="inverse")


def test_cli_data_depth_end_to_end(model_path, tmp_path):
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"kind": "synthetic", "num_images": 3, "image_size": 24}}))
    out = tmp_path / "cli_out"
    args = ["data", "depth", str(config), "--model", str(model_path), "--out", str(out)]

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote 3 depth map(s), reused 0" in first.output
    assert f"depth_dir: {out.resolve()}" in first.output and "depth_scale: 1.0" in first.output
    assert len(list(out.glob("*.npy"))) == 3 and (out / "manifest.json").is_file()

    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "wrote 0 depth map(s), reused 3" in second.output

    other = scripted(tmp_path / "other.pt", offset=5.0)
    refused = runner.invoke(app, ["data", "depth", str(config), "--model", str(other), "--out", str(out)])
    assert refused.exit_code != 0 and isinstance(refused.exception, DataError)
    assert str(out) in str(refused.exception)
    forced = runner.invoke(
        app, ["data", "depth", str(config), "--model", str(other), "--out", str(out), "--overwrite", "--output", "disparity"]
    )
    assert forced.exit_code == 0 and "wrote 3 depth map(s)" in forced.output
    assert json.loads((out / "manifest.json").read_text())["output"] == "disparity"

    bad = runner.invoke(app, ["data", "depth", str(config), "--model", str(other), "--out", str(out), "--output", "far"])
    assert bad.exit_code == 2
    no_out = runner.invoke(app, ["data", "depth", str(config), "--model", str(other)])
    assert no_out.exit_code == 2  # --out is required: a dataset root may be read-only
    assert os.listdir(out)  # nothing was removed by the refused calls
