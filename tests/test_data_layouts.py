"""Dataset layouts (voc, folder, nyu, coco) on tiny generated trees, bad inputs, and the real data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _trees import (
    block_mask,
    corrupt,
    make_folder_tree,
    make_voc_tree,
    rectangle,
    rgb,
    save_png,
    truncate,
    write_coco,
    write_lines,
)
from weakseg.data import build_dataset, dataset_from_file
from weakseg.data.nyu import NYU40_CLASSES
from weakseg.data.voc import VOC_CLASSES
from weakseg.errors import ConfigError, DataError, DatasetProblems

REPO = Path(__file__).resolve().parents[1]


def folder(root: Path, strict: bool = True, **keys):
    return build_dataset({"kind": "folder", "root": str(root), **keys}, None, strict)


def messages(problems) -> list[str]:
    return [str(p) for p in problems]


def assert_one_error(exc_info, path: Path, *fragments: str) -> None:
    text = str(exc_info.value)
    assert str(path) in text, text
    for fragment in fragments:
        assert fragment in text, text


# ============================================================================ folder


def test_folder_loads_exact_values(tmp_path):
    image_a, image_b = rgb(6, 8, seed=1), rgb(6, 8, seed=2)
    mask_a = block_mask(6, 8, [0, 1])  # background + cat
    mask_b = block_mask(6, 8, [2, 255])  # dog + void
    depth_a = np.arange(48, dtype=np.uint16).reshape(6, 8) * 100
    depth_b = np.full((6, 8), 7, dtype=np.uint16)
    root = make_folder_tree(
        tmp_path / "data",
        {
            "b": {"image": image_b, "mask": mask_b, "depth": depth_b},
            "a": {"image": image_a, "mask": mask_a, "depth": depth_a},
        },
    )
    dataset = folder(root, depth_scale=0.25)
    assert dataset.ids == ["a", "b"]  # sorted
    assert dataset.class_names == ("background", "cat", "dog")
    assert dataset.background_index == 0
    assert dataset.foreground_names == ["cat", "dog"]
    a, b = dataset[0], dataset[1]
    np.testing.assert_array_equal(a.image, image_a)
    np.testing.assert_array_equal(a.mask, mask_a)
    np.testing.assert_array_equal(a.depth, depth_a.astype(np.float32) * 0.25)
    assert a.depth.dtype == np.float32
    np.testing.assert_array_equal(a.labels, [1.0, 0.0])
    np.testing.assert_array_equal(b.labels, [0.0, 1.0])  # void is not a class
    assert b.present_class_ids == [2]
    np.testing.assert_array_equal(b.depth, np.full((6, 8), 1.75, dtype=np.float32))


def test_folder_labels_file_and_optional_masks(tmp_path):
    root = make_folder_tree(
        tmp_path / "d",
        {
            "x": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 1])},
            "y": {"image": rgb(4, 4)},  # no mask: fine, labels come from labels.csv
            "z": {"image": rgb(4, 4)},
        },
        labels=["id,labels", "x,2", "y,0 1 2", "z,"],
    )
    dataset = folder(root)
    assert dataset.ids == ["x", "y", "z"]
    x, y, z = dataset[0], dataset[1], dataset[2]
    np.testing.assert_array_equal(x.labels, [0.0, 1.0])  # from the file, not from the mask
    assert x.mask is not None and y.mask is None
    np.testing.assert_array_equal(y.labels, [1.0, 1.0])  # listed background id is no foreground class
    np.testing.assert_array_equal(z.labels, [0.0, 0.0])


def test_folder_labels_file_space_separated_form(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"x": {"image": rgb(4, 4)}}, labels=["x 1 2"])
    np.testing.assert_array_equal(folder(root)[0].labels, [1.0, 1.0])


@pytest.mark.parametrize(
    "background, expected_index, expected_fg",
    [("auto", None, 3), (None, None, 3), ("sky", 2, 2), (0, 0, 2)],
)
def test_folder_background_choice(tmp_path, background, expected_index, expected_fg):
    root = make_folder_tree(
        tmp_path / "d", {"x": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 2])}}, classes=["road", "car", "sky"]
    )
    dataset = folder(root, background=background)
    assert dataset.background_index == expected_index
    assert dataset[0].labels.shape == (expected_fg,)


def test_folder_unknown_background_name(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"x": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}})
    with pytest.raises(ConfigError, match="dataset.background: no class named 'grass'"):
        folder(root, background="grass")


def test_folder_inline_classes_and_npy_depth(tmp_path):
    depth = np.linspace(0.5, 4.0, 16, dtype=np.float32).reshape(4, 4)
    root = make_folder_tree(
        tmp_path / "d", {"x": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 1]), "depth": depth}}, classes=None
    )
    dataset = folder(root, classes=["a", "b"], depth_scale=1.0)
    assert dataset.class_names == ("a", "b") and dataset.background_index is None
    np.testing.assert_array_equal(dataset[0].depth, depth)


def test_folder_void_values_and_offset(tmp_path):
    raw = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    root = make_folder_tree(tmp_path / "d", {"x": {"image": rgb(2, 4), "mask": raw}}, classes=["p", "q", "r"])
    sample = folder(root, void_values=[0], mask_offset=-1)[0]
    np.testing.assert_array_equal(sample.mask, [[255, 0, 1, 2], [2, 1, 0, 255]])
    np.testing.assert_array_equal(sample.labels, [1.0, 1.0, 1.0])


def test_folder_mask_mapping(tmp_path):
    raw = np.array([[7, 9, 200, 255]], dtype=np.uint8)
    root = make_folder_tree(tmp_path / "d", {"x": {"image": rgb(1, 4), "mask": raw}}, classes=["bg", "thing"])
    sample = folder(root, mask_mapping={7: 0, 9: 1}, void_values=[200])[0]
    np.testing.assert_array_equal(sample.mask, [[0, 1, 255, 255]])


def test_folder_mapped_value_out_of_range_is_an_error(tmp_path):
    raw = np.array([[1, 2, 4]], dtype=np.uint8)  # 4 - 1 = 3 is not a class of 3
    root = make_folder_tree(tmp_path / "d", {"x": {"image": rgb(1, 3), "mask": raw}}, classes=["p", "q", "r"])
    dataset = folder(root, mask_offset=-1)
    with pytest.raises(DataError) as exc_info:
        dataset.load(0)
    assert_one_error(exc_info, root / "masks" / "x.png", "raw mask values 4", "mask_offset -1")


def test_folder_mask_id_outside_class_range(tmp_path):
    mask = block_mask(4, 4, [0, 3])  # classes 0..2; 3 is neither a class nor void
    root = make_folder_tree(tmp_path / "d", {"x": {"image": rgb(4, 4), "mask": mask}})
    with pytest.raises(DataError) as exc_info:
        folder(root).load(0)
    assert_one_error(exc_info, root / "masks" / "x.png", "label ids outside 0..2", "3")


@pytest.mark.parametrize("what", ["mask", "depth"])
def test_folder_size_mismatch(tmp_path, what):
    files = {"image": rgb(4, 6), "mask": block_mask(4, 6, [0, 1]), "depth": np.ones((4, 6), np.uint16)}
    files[what] = files[what][:3, :5]
    root = make_folder_tree(tmp_path / "d", {"x": files})
    with pytest.raises(DataError) as exc_info:
        folder(root, depth_scale=1.0).load(0)
    path = root / ("masks/x.png" if what == "mask" else "depth/x.png")
    assert_one_error(exc_info, path, f"{what} size 5x3 does not match image size 6x4")


def _image_case(kind: str):
    """(PIL image or array, extension, expected outcome) for one input format."""
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    if kind == "grayscale":
        return gray, ".png", np.repeat(gray[..., None], 3, axis=2)
    if kind == "rgba_opaque":
        rgba = np.dstack([rgb(4, 4), np.full((4, 4), 255, np.uint8)])
        return Image.fromarray(rgba), ".png", rgba[..., :3]
    if kind == "rgba_transparent":
        rgba = np.dstack([rgb(4, 4), np.full((4, 4), 255, np.uint8)])
        rgba[0, 0, 3] = 0
        return Image.fromarray(rgba), ".png", "transparent pixels"
    if kind == "cmyk":
        return Image.fromarray(rgb(4, 4)).convert("CMYK"), ".jpg", (4, 4, 3)
    if kind == "16bit":
        return Image.fromarray(np.full((4, 4), 40000, np.uint16)), ".png", "unsupported image mode I;16"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["grayscale", "rgba_opaque", "rgba_transparent", "cmyk", "16bit"])
def test_folder_image_modes(tmp_path, kind):
    image, ext, expected = _image_case(kind)
    root = make_folder_tree(tmp_path / "d", {"x": {"image": image, "image_ext": ext, "mask": block_mask(4, 4, [0])}})
    dataset = folder(root)
    if isinstance(expected, str):
        with pytest.raises(DataError) as exc_info:
            dataset.load(0)
        assert_one_error(exc_info, root / "images" / f"x{ext}", expected)
        return
    sample = dataset.load(0)
    assert sample.image.dtype == np.uint8 and sample.image.shape == (4, 4, 3)
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(sample.image, expected)


@pytest.mark.parametrize(
    "damage, target",
    [
        ("corrupt", "image.jpg"),
        ("truncated", "image.jpg"),
        ("corrupt", "image.png"),
        ("truncated", "image.png"),
        ("corrupt", "mask"),
        ("truncated", "mask"),
        ("truncated", "depth"),
    ],
)
def test_folder_damaged_files(tmp_path, damage, target):
    ext = ".jpg" if target == "image.jpg" else ".png"
    # a large noisy image so that cutting it in half really loses pixel data
    files = {"image": rgb(64, 64), "image_ext": ext, "mask": block_mask(64, 64, [0, 1, 2]),
             "depth": (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 13)}
    root = make_folder_tree(tmp_path / "d", {"x": files})
    path = {
        "image.jpg": root / "images" / "x.jpg",
        "image.png": root / "images" / "x.png",
        "mask": root / "masks" / "x.png",
        "depth": root / "depth" / "x.png",
    }[target]
    corrupt(path) if damage == "corrupt" else truncate(path)
    dataset = folder(root, depth_scale=0.001)
    with pytest.raises(DataError) as exc_info:
        dataset.load(0)
    assert_one_error(exc_info, path, "corrupt or truncated image")


def test_folder_listed_ids_missing_and_escaping(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}})
    write_lines(root / "list.txt", ["a", "ghost", "../outside"])
    (tmp_path / "outside.png").write_bytes(b"")
    dataset = folder(root, strict=False, ids_file="list.txt")
    assert dataset.ids == ["a"]
    got = messages(dataset.index_problems)
    assert len(got) == 3  # one per missing file, one for the escaping id
    assert got[0] == f"{root / 'images' / 'ghost'}: no image for id 'ghost' (listed in list.txt)"
    assert got[1] == f"{root / 'masks' / 'ghost.png'}: mask does not exist (listed in list.txt)"
    assert got[2] == f"{root / '../outside'}: id '../outside' would escape the dataset root {root}"
    with pytest.raises(DatasetProblems) as exc_info:
        folder(root, ids_file="list.txt")
    assert "3 problem(s)" in str(exc_info.value)


def test_folder_missing_mask_and_depth_when_required(tmp_path):
    root = make_folder_tree(
        tmp_path / "d",
        {
            "a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0]), "depth": np.ones((4, 4), np.uint16)},
            "b": {"image": rgb(4, 4), "depth": np.ones((4, 4), np.uint16)},  # no mask
            "c": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])},  # no depth
        },
    )
    dataset = folder(root, strict=False, require_depth=True, depth_scale=1.0)
    assert dataset.ids == ["a"]
    got = messages(dataset.index_problems)
    assert got == [
        f"{root / 'masks' / 'b.png'}: mask does not exist",  # listing mode: no "listed in"
        f"{root / 'depth' / 'c.png'}: depth map does not exist (require_depth)",
    ]
    # without require_depth, the sample without depth is fine and has depth None
    relaxed = folder(root, strict=False, depth_scale=1.0)
    assert relaxed.ids == ["a", "c"] and relaxed[1].depth is None


def test_folder_missing_depth_folder_when_required(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}})
    with pytest.raises(DataError) as exc_info:
        folder(root, require_depth=True, depth_scale=1.0)
    assert_one_error(exc_info, root / "depth", "depth folder does not exist")


def test_folder_depth_scale_required(tmp_path):
    root = make_folder_tree(
        tmp_path / "d", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0]), "depth": np.ones((4, 4), np.uint16)}}
    )
    with pytest.raises(ConfigError, match="dataset.depth_scale: required"):
        folder(root)


def test_folder_labels_file_problems(tmp_path):
    samples = {k: {"image": rgb(4, 4)} for k in ["a", "b", "c", "d"]}
    root = make_folder_tree(tmp_path / "d", samples, labels=["a,1", "b,1 7", "c,dog", "a,2"])
    dataset = folder(root, strict=False)
    labels_csv = root / "labels.csv"
    got = messages(dataset.index_problems)
    assert got == [
        f"{root / 'classes.txt'}: 3 class names (ids 0..2), but labels.csv uses class ids up to 7 on 1 line(s), "
        "first line 2: are names missing here (or is that id wrong)?",
        f"{labels_csv}: line 3: 'dog' is not an integer class id "
        "(write `id,c1 c2 ...` with class ids separated by spaces)",
        f"{labels_csv}: line 4: id 'a' already has labels on line 1",
        f"{labels_csv}: no labels line for id 'd'",
    ]
    assert dataset.ids == []  # a: ambiguous, b/c: broken lines, d: no labels


def test_folder_two_images_with_one_id(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}})
    save_png(root / "images" / "a.jpg", rgb(4, 4))  # wrong content for a .jpg, but never read
    dataset = folder(root, strict=False)
    assert dataset.ids == []
    assert "several images for id 'a' (a.jpg, a.png); keep one" in str(dataset.index_problems[0])


def test_folder_classes_file_problems(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}},
                            classes=["background", "", "dog"])
    with pytest.raises(DataError) as exc_info:
        folder(root)
    assert_one_error(exc_info, root / "classes.txt", "line 2: blank line")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError) as exc_info:
        folder(root)
    assert_one_error(exc_info, root / "classes.txt", "classes file does not exist")


def test_folder_config_errors(tmp_path):
    root = make_folder_tree(tmp_path / "d", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}})
    with pytest.raises(ConfigError, match="dataset.mask_dirr: unknown key"):
        folder(root, mask_dirr="masks")
    with pytest.raises(ConfigError, match="dataset.require_masks: cannot be false"):
        folder(root, require_masks=False)
    with pytest.raises(DataError, match="mask folder does not exist"):
        folder(root, mask_dir="annotations")
    with pytest.raises(DataError, match="dataset root folder does not exist"):
        folder(tmp_path / "nowhere")


def test_check_reports_one_problem_per_broken_file(tmp_path):
    """A tree with several broken files: check() finds each once; strict build refuses the index."""
    good = {"image": rgb(8, 8), "mask": block_mask(8, 8, [0, 1])}
    root = make_folder_tree(
        tmp_path / "d",
        {
            "ok": dict(good),
            "bad_jpeg": {**good, "image_ext": ".jpg"},
            "bad_mask": dict(good),
            "out_of_range": {**good, "mask": block_mask(8, 8, [0, 9])},
            "wrong_size": {**good, "mask": block_mask(6, 8, [0, 1])},
            "no_mask": {"image": rgb(8, 8)},
        },
    )
    corrupt(root / "images" / "bad_jpeg.jpg")
    truncate(root / "masks" / "bad_mask.png", keep=0.3)
    write_lines(root / "list.txt", ["ok", "bad_jpeg", "bad_mask", "out_of_range", "wrong_size", "no_mask", "ghost"])

    dataset = folder(root, strict=False, ids_file="list.txt")
    problems = dataset.check()
    paths = [p.path for p in problems]
    assert sorted(paths) == sorted(
        str(p)
        for p in [
            root / "masks" / "no_mask.png",  # index problems come first
            root / "images" / "ghost",
            root / "masks" / "ghost.png",
            root / "images" / "bad_jpeg.jpg",
            root / "masks" / "bad_mask.png",
            root / "masks" / "out_of_range.png",
            root / "masks" / "wrong_size.png",
        ]
    )
    assert len(problems) == 7 and all(isinstance(p, DataError) for p in problems)

    with pytest.raises(DatasetProblems) as exc_info:
        folder(root, ids_file="list.txt")
    lines = str(exc_info.value).splitlines()
    assert lines[0].startswith("3 problem(s) in folder dataset")
    assert any(str(root / "masks" / "no_mask.png") in line and "mask does not exist" in line for line in lines)
    assert any(str(root / "images" / "ghost") in line and "no image for id 'ghost'" in line for line in lines)


# ============================================================================ voc


def voc(root: Path, strict: bool = True, **keys):
    return build_dataset({"kind": "voc", "root": str(root), **keys}, None, strict)


def test_voc_loads_masks_and_labels(tmp_path):
    mask_a = block_mask(5, 8, [0, 15, 255])
    mask_b = block_mask(5, 8, [20, 1])
    root = make_voc_tree(
        tmp_path / "VOC2012",
        {"2007_000001": {"image": rgb(5, 8), "mask": mask_a}, "2007_000002": {"image": rgb(5, 8), "mask": mask_b}},
    )
    dataset = voc(root)
    assert dataset.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert dataset.class_names[15] == "person" and dataset.class_names[20] == "tvmonitor"
    assert dataset.ids == ["2007_000001", "2007_000002"]
    a, b = dataset[0], dataset[1]
    np.testing.assert_array_equal(a.mask, mask_a)
    assert a.present_class_ids == [15] and b.present_class_ids == [1, 20]
    assert a.image.shape == (5, 8, 3) and a.depth is None


def test_voc_mask_id_21_is_an_error(tmp_path):
    root = make_voc_tree(tmp_path / "V", {"x": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 21])}})
    with pytest.raises(DataError) as exc_info:
        voc(root).load(0)
    assert_one_error(exc_info, root / "SegmentationClass" / "x.png", "label ids outside 0..20", "21")


def test_voc_missing_and_escaping_ids(tmp_path):
    root = make_voc_tree(
        tmp_path / "V",
        {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}, "b": {"mask": block_mask(4, 4, [0])},
         "c": {"image": rgb(4, 4)}},
        listed=["a", "b", "c", "../../etc/passwd"],
    )
    dataset = voc(root, strict=False)
    assert dataset.ids == ["a"]
    got = messages(dataset.index_problems)
    assert got[0] == f"{root / 'JPEGImages' / 'b.jpg'}: image does not exist (listed in train.txt)"
    assert got[1] == (
        f"{root / 'SegmentationClass' / 'c.png'}: mask does not exist (nor in SegmentationClassAug) "
        "(listed in train.txt)"
    )
    assert "'../../etc/passwd' would escape the dataset root" in got[2]
    with pytest.raises(DatasetProblems) as exc_info:
        voc(root)
    assert str(exc_info.value).startswith("3 problem(s) in voc dataset")


def test_voc_mask_dir_auto_falls_back_to_aug(tmp_path):
    root = make_voc_tree(
        tmp_path / "V",
        {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 3])},
         "b": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 7]), "aug": True}},
    )
    dataset = voc(root)
    assert [s.present_class_ids for s in (dataset[0], dataset[1])] == [[3], [7]]
    strict_dir = voc(root, strict=False, mask_dir="SegmentationClass")
    assert strict_dir.ids == ["a"]
    assert "SegmentationClass/b.png: mask does not exist (listed" in str(strict_dir.index_problems[0])
    with pytest.raises(ConfigError, match="dataset.mask_dir: 'Masks' is not allowed"):
        voc(root, mask_dir="Masks")


def test_voc_labels_file_and_ids_file(tmp_path):
    root = make_voc_tree(
        tmp_path / "V",
        {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0, 3])}, "b": {"image": rgb(4, 4)}},
    )
    write_lines(root / "train_aug.txt", ["b", "a"])
    write_lines(root / "cls_labels.txt", ["a 5", "b 1 20", "unused 2"])
    dataset = voc(root, ids_file="train_aug.txt", labels_file="cls_labels.txt")
    assert dataset.ids == ["b", "a"]
    b, a = dataset[0], dataset[1]
    assert b.present_class_ids == [1, 20] and b.mask is None  # masks optional with a labels file
    assert a.present_class_ids == [5] and a.mask is not None  # labels from the file, mask kept for evaluation


@pytest.mark.parametrize(
    "line, problem",
    [
        ("a 0 5", "class id 0 for id 'a' is outside 1..20 (list foreground ids 1..20; 0 is background)"),
        ("a 21", "class id 21 for id 'a' is outside 1..20"),
    ],
)
def test_voc_labels_file_out_of_range(tmp_path, line, problem):
    root = make_voc_tree(tmp_path / "V", {"a": {"image": rgb(4, 4)}})
    write_lines(root / "labels.txt", [line])
    with pytest.raises(DatasetProblems) as exc_info:
        voc(root, labels_file="labels.txt")
    assert f"{root / 'labels.txt'}: line 1: {problem}" in str(exc_info.value)


def test_voc_missing_split_and_bad_list_lines(tmp_path):
    root = make_voc_tree(tmp_path / "V", {"a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])}})
    with pytest.raises(DataError) as exc_info:
        voc(root, split="val")
    assert_one_error(exc_info, root / "ImageSets" / "Segmentation" / "val.txt", "id list does not exist")
    write_lines(root / "pairs.txt", ["a", "/JPEGImages/a.jpg /SegmentationClassAug/a.png", "a"])
    dataset = voc(root, strict=False, ids_file="pairs.txt")
    assert dataset.ids == ["a"]
    assert messages(dataset.index_problems) == [
        f"{root / 'pairs.txt'}: line 2: expected one id per line, got '/JPEGImages/a.jpg /SegmentationClassAug/a.png'",
        f"{root / 'pairs.txt'}: line 3: id 'a' already listed on line 1",
    ]


def test_voc_corrupt_jpeg_and_size_mismatch(tmp_path):
    root = make_voc_tree(
        tmp_path / "V",
        {
            "a": {"image": rgb(4, 4), "mask": block_mask(4, 4, [0])},
            "b": {"image": rgb(4, 6), "mask": block_mask(4, 4, [0])},
        },
    )
    corrupt(root / "JPEGImages" / "a.jpg")
    problems = voc(root).check()
    assert [p.path for p in problems] == [str(root / "JPEGImages" / "a.jpg"), str(root / "SegmentationClass" / "b.png")]
    assert "corrupt or truncated image" in problems[0].problem
    assert problems[1].problem == "mask size 4x4 does not match image size 6x4"


# ============================================================================ nyu


def make_nyu_tree(root: Path, samples: dict[str, dict], listed: list[str]) -> Path:
    for sample_id, files in samples.items():
        if "image" in files:
            save_png(root / "images" / f"{sample_id}.png", files["image"])
        if "labels" in files:
            save_png(root / "labels40" / f"{sample_id}.png", files["labels"])
        if "depth" in files:
            save_png(root / "depth" / f"{sample_id}.png", files["depth"])
    (root / "depth").mkdir(parents=True, exist_ok=True)
    write_lines(root / "train.txt", listed)
    return root


def test_nyu_preset_maps_labels_and_depth(tmp_path):
    raw = np.array([[0, 1, 40, 22], [5, 5, 0, 1]], dtype=np.uint8)
    depth = np.array([[0, 51, 255, 1], [25, 26, 100, 200]], dtype=np.uint8)
    root = make_nyu_tree(tmp_path / "nyu", {"0001": {"image": rgb(2, 4), "labels": raw, "depth": depth}}, ["0001"])
    dataset = build_dataset({"kind": "nyu", "root": str(root)})
    assert dataset.class_names == NYU40_CLASSES and len(NYU40_CLASSES) == 40
    assert dataset.background_index is None and dataset.class_names[21] == "ceiling"
    sample = dataset[0]
    np.testing.assert_array_equal(sample.mask, [[255, 0, 39, 21], [4, 4, 255, 0]])
    assert sample.present_class_ids == [0, 4, 21, 39]
    assert sample.labels.shape == (40,)
    np.testing.assert_allclose(sample.depth, depth.astype(np.float32) / 25.5, rtol=1e-6)
    assert sample.depth[0, 2] == pytest.approx(10.0)


def test_nyu_missing_depth_is_a_problem_unless_not_required(tmp_path):
    raw = np.ones((2, 2), np.uint8)
    root = make_nyu_tree(
        tmp_path / "nyu",
        {"0001": {"image": rgb(2, 2), "labels": raw, "depth": np.ones((2, 2), np.uint8)},
         "0002": {"image": rgb(2, 2), "labels": raw}},
        ["0001", "0002"],
    )
    with pytest.raises(DatasetProblems) as exc_info:
        build_dataset({"kind": "nyu", "root": str(root)})
    assert f"{root / 'depth' / '0002.png'}: depth map does not exist (require_depth) (listed in train.txt)" in str(
        exc_info.value
    )
    relaxed = build_dataset({"kind": "nyu", "root": str(root), "require_depth": False})
    assert relaxed.ids == ["0001", "0002"] and relaxed[1].depth is None and relaxed[0].depth is not None


# ============================================================================ coco


def coco(tmp_path: Path, images, annotations, categories, strict=True, **keys):
    write_coco(tmp_path / "instances.json", images, annotations, categories)
    return build_dataset(
        {"kind": "coco", "annotations": "instances.json", "image_dir": "images", **keys}, tmp_path, strict
    )


CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]


def test_coco_masks_overlaps_crowd_and_labels(tmp_path):
    save_png(tmp_path / "images" / "one.png", rgb(8, 10))
    save_png(tmp_path / "images" / "empty.png", rgb(4, 4))
    images = [{"id": 1, "file_name": "one.png", "width": 10, "height": 8},
              {"id": 2, "file_name": "empty.png", "width": 4, "height": 4}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 7, "segmentation": rectangle(3, 2, 5, 4), "iscrowd": 0},  # small dog
        {"id": 11, "image_id": 1, "category_id": 3, "segmentation": rectangle(0, 0, 6, 6), "iscrowd": 0},  # big cat
        {"id": 12, "image_id": 1, "category_id": 7, "segmentation": rectangle(5, 5, 10, 8), "iscrowd": 1},  # crowd
    ]
    dataset = coco(tmp_path, images, annotations, CATEGORIES)
    assert dataset.class_names == ("background", "cat", "dog")  # sorted category ids 3, 7
    assert dataset.ids == ["one", "empty"]
    sample = dataset[0]
    expected = np.zeros((8, 10), np.uint8)
    expected[0:6, 0:6] = 1  # cat (larger) painted first
    expected[5:8, 5:10] = 255  # crowd void, under every object
    expected[5, 5] = 1  # ... so the cat covers the crowd where they overlap
    expected[2:4, 3:5] = 2  # the small dog lies on top of the cat
    np.testing.assert_array_equal(sample.mask, expected)
    assert sample.present_class_ids == [1, 2]
    empty = dataset[1]
    assert (empty.mask == 0).all() and empty.labels.sum() == 0
    assert coco(tmp_path, images, annotations, CATEGORIES, skip_empty=True).ids == ["one"]


def test_coco_crowd_only_class_is_not_a_label(tmp_path):
    save_png(tmp_path / "images" / "a.png", rgb(4, 4))
    images = [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}]
    rle = {"size": [4, 4], "counts": [0, 8, 8]}  # uncompressed RLE, column-major: first two columns
    annotations = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": rle, "iscrowd": 1}]
    sample = coco(tmp_path, images, annotations, CATEGORIES)[0]
    assert (sample.mask[:, :2] == 255).all() and (sample.mask[:, 2:] == 0).all()
    assert sample.labels.sum() == 0


def test_coco_index_problems(tmp_path):
    save_png(tmp_path / "images" / "a.png", rgb(4, 4))
    save_png(tmp_path / "images" / "b.png", rgb(4, 4))
    images = [
        {"id": 1, "file_name": "a.png", "width": 4, "height": 4},
        {"id": 2, "file_name": "missing.png", "width": 4, "height": 4},
        {"id": 3, "file_name": "../x.png", "width": 4, "height": 4},
        {"id": 4, "file_name": "b.png", "width": 4, "height": 4},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 99, "segmentation": rectangle(0, 0, 2, 2)},
        {"id": 2, "image_id": 4, "category_id": 3, "segmentation": []},
        {"id": 3, "image_id": 42, "category_id": 3, "segmentation": rectangle(0, 0, 2, 2)},
    ]
    dataset = coco(tmp_path, images, annotations, CATEGORIES, strict=False)
    assert dataset.ids == []
    json_path = tmp_path / "instances.json"
    assert messages(dataset.index_problems) == [
        f"{tmp_path / 'images' / 'missing.png'}: image does not exist (listed in instances.json)",
        f"{tmp_path / 'images' / '../x.png'}: file_name '../x.png' would escape the dataset root {tmp_path / 'images'}",
        f"{json_path}: annotation 1: category_id 99 is not in categories",
        f"{json_path}: annotation 2: empty segmentation (an object without a region would be painted as background)",
        f"{json_path}: annotation 3: image_id 42 is not in images",
    ]
    with pytest.raises(DatasetProblems):
        coco(tmp_path, images, annotations, CATEGORIES)


def test_coco_image_size_differs_from_json(tmp_path):
    save_png(tmp_path / "images" / "a.png", rgb(4, 5))
    images = [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}]
    dataset = coco(tmp_path, images, [], CATEGORIES)
    with pytest.raises(DataError) as exc_info:
        dataset.load(0)
    assert_one_error(
        exc_info, tmp_path / "images" / "a.png", "image size 5x4 does not match the size 4x4 given in instances.json"
    )


def test_coco_bad_json(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text("{not json")
    with pytest.raises(DataError) as exc_info:
        build_dataset({"kind": "coco", "annotations": "instances.json", "image_dir": "images"}, tmp_path)
    assert_one_error(exc_info, tmp_path / "instances.json", "not a readable JSON file")


def test_coco_without_pycocotools(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ConfigError, match="pip install pycocotools"):
        build_dataset({"kind": "coco", "annotations": "x.json", "image_dir": "images"}, tmp_path)


# ============================================================================ real data


def _sample_indices(count: int, n: int) -> list[int]:
    return sorted({round(i * (count - 1) / (n - 1)) for i in range(n)})


def test_real_voc(voc_root):
    dataset = build_dataset({"kind": "voc", "root": str(voc_root)})
    assert len(dataset) == 330 and not dataset.index_problems
    for index in _sample_indices(len(dataset), 6):
        sample = dataset[index]
        assert sample.image.shape[:2] == sample.mask.shape and sample.image.shape[2] == 3
        values = set(np.unique(sample.mask).tolist())
        assert values <= set(range(21)) | {255}
        assert sample.present_class_ids == sorted(values - {0, 255})
        assert sample.present_class_ids, "every VOC segmentation image has a foreground class"


def test_real_nyu(nyu_root):
    dataset = build_dataset({"kind": "nyu", "root": str(nyu_root)})
    assert len(dataset) == 795 and not dataset.index_problems
    for index in _sample_indices(len(dataset), 4):
        sample = dataset[index]
        assert sample.image.shape == (480, 640, 3)
        assert sample.mask.shape == sample.depth.shape == (480, 640)
        values = set(np.unique(sample.mask).tolist())
        assert values <= set(range(40)) | {255}
        assert sample.present_class_ids == sorted(values - {255})
        assert 0.0 <= sample.depth.min() and sample.depth.max() <= 10.0 + 1e-5
        assert 0.3 < float(np.median(sample.depth)) < 8.0  # indoor scenes


def test_real_nyu_check_on_a_sample(nyu_root):
    """check() over a spread of ids (the whole set takes ~8 s; CI runs `weakseg check` for that)."""
    dataset = build_dataset({"kind": "nyu", "root": str(nyu_root)})
    subset = _sample_indices(len(dataset), 12)
    dataset.ids = [dataset.ids[i] for i in subset]
    dataset.entries = [dataset.entries[i] for i in subset]
    assert dataset.check() == []


@pytest.mark.parametrize("name, count", [("voc_shared.yaml", 330), ("nyu_shared.yaml", 795)])
def test_shared_configs(name, count, voc_root, nyu_root):
    dataset = dataset_from_file(REPO / "configs" / "data" / name)
    assert len(dataset) == count


def test_with_absolute_paths_keeps_a_saved_config_runnable(tmp_path):
    """A run folder saves its dataset config; relative to that folder the original relative
    root would point nowhere, so the saved copy names it absolutely (and only the keys that
    are relative to the config file: a folder layout's image_dir stays relative to root)."""
    from weakseg.data import with_absolute_paths

    root = make_folder_tree(tmp_path / "project" / "data", {"a": {"image": rgb(4, 4, seed=1), "mask": block_mask(4, 4, [0, 1])}})
    config_dir = tmp_path / "project" / "configs"
    config_dir.mkdir()
    mapping = {"kind": "folder", "root": "../data", "image_dir": "images"}
    saved = with_absolute_paths(mapping, config_dir)
    assert saved == {"kind": "folder", "root": str(root.resolve()), "image_dir": "images"}
    assert mapping["root"] == "../data"  # a copy
    elsewhere = tmp_path / "project" / "runs" / "deep" / "run"
    elsewhere.mkdir(parents=True)
    assert build_dataset(saved, elsewhere).ids == build_dataset(mapping, config_dir).ids == ["a"]
    coco = with_absolute_paths({"kind": "coco", "annotations": "ann.json", "image_dir": "img"}, config_dir)
    assert coco["annotations"] == str((config_dir / "ann.json").resolve())
    assert coco["image_dir"] == str((config_dir / "img").resolve())
    synthetic = {"kind": "synthetic", "num_images": 4}
    assert with_absolute_paths(synthetic, config_dir) == synthetic
