"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Files are PNG label maps (palette or grayscale; 255 = void/no prediction), matched by file
stem. Every ground-truth stem needs a prediction; problems are collected and reported
together, one line per file, before anything is computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from weakseg.data.io import read_label_map, write_text_atomic
from weakseg.errors import DataError, DatasetProblems
from weakseg.metrics.evaluator import SegEvaluator


def read_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "classes file does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(path, "classes file lists no class")
    if len(names) > 255:
        raise DataError(path, f"{len(names)} classes: at most 255 fit in 8-bit label maps (255 is void)")
    return names


def pair_files(pred_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    if not gt_dir.is_dir():
        raise DataError(gt_dir, "ground-truth folder does not exist")
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder does not exist")
    gts = sorted(gt_dir.glob("*.png"))
    if not gts:
        raise DataError(gt_dir, "no PNG label maps in the ground-truth folder")
    preds = {p.stem: p for p in pred_dir.glob("*.png")}
    missing = [DataError(pred_dir / f"{g.stem}.png", "prediction missing for ground truth " + str(g)) for g in gts if g.stem not in preds]
    if missing:
        raise DatasetProblems(missing, f"predictions in {pred_dir}")
    return [(preds[g.stem], g) for g in gts]


def run(
    pred_dir: str | Path,
    gt_dir: str | Path,
    classes_file: str | Path | None = None,
    json_path: str | Path | None = None,
    background: bool = True,
    on_image: Callable[[int, int], None] | None = None,
) -> dict:
    pairs = pair_files(Path(pred_dir), Path(gt_dir))
    loaded, problems = [], []
    for pred_path, gt_path in pairs:
        try:
            pred = read_label_map(pred_path)
            gt = read_label_map(gt_path)
            if pred.shape != gt.shape:
                raise DataError(pred_path, f"size {pred.shape[1]}x{pred.shape[0]} differs from ground truth {gt_path} ({gt.shape[1]}x{gt.shape[0]})")
            loaded.append((pred_path, gt_path, pred, gt))
        except DataError as exc:
            problems.append(exc)
    if classes_file is not None:
        class_names = read_class_names(classes_file)
    else:
        top = max(int(np.max(np.where(a == 255, 0, a))) for _, _, p, g in loaded for a in (p, g)) if loaded else 0
        class_names = [f"class_{k}" for k in range(top + 1)]
    k = len(class_names)
    for pred_path, gt_path, pred, gt in loaded:
        for path, arr in ((pred_path, pred), (gt_path, gt)):
            bad = np.unique(arr[(arr >= k) & (arr != 255)])
            if bad.size:
                problems.append(DataError(path, f"label ids outside 0..{k - 1} (and not 255): {', '.join(map(str, bad[:8]))}"))
    if problems:
        raise DatasetProblems(problems, "evaluation inputs")

    evaluator = SegEvaluator(class_names, background_index=0 if background else None)
    for i, (_, _, pred, gt) in enumerate(loaded):
        evaluator.add(pred, gt)
        if on_image is not None:
            on_image(i + 1, len(loaded))
    summary = evaluator.summary()
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
