"""Step `evaluate` (`weakseg evaluate CONFIG`), and `weakseg eval`, which scores any two folders.

The step scores the predict step's label maps against the evaluation masks:
Config:  `evaluate: {}` (no keys yet; the section's presence runs the step).
Reads:   RUN/predict/pred/<id>.png, the eval_dataset's masks (the dataset's when unset)
Writes:  RUN/evaluate/metrics.json  J (miou), contour_f, jf, boundary_iou, precision, recall
                                    and their per-class values: results.json's `final` stage

`weakseg eval --pred DIR --gt DIR`: a folder of predicted label maps against a folder of
ground-truth label maps. Files are PNG label maps (palette or grayscale; 255 = void/no prediction), matched by file
stem. Every ground-truth stem needs a prediction; problems are collected and reported
together, one line per file, and nothing is written when there are any. The images are
scored in parallel processes (integer counts, summed: the same numbers as one process).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import numpy as np

from weakseg.data.io import read_label_map, write_text_atomic
from weakseg.errors import ConfigError, DataError, DatasetProblems
from weakseg.metrics.evaluator import SegEvaluator, metrics_json
from weakseg.steps.base import Step

NAME = "evaluate"


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


def _read_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    pred = read_label_map(pred_path)
    gt = read_label_map(gt_path)
    if pred.shape != gt.shape:
        raise DataError(pred_path, f"size {pred.shape[1]}x{pred.shape[0]} differs from ground truth {gt_path} ({gt.shape[1]}x{gt.shape[0]})")
    return pred, gt


def _largest_ids(pairs: list[tuple[Path, Path]]) -> tuple[int, list[DataError]]:
    """The largest class id in a chunk of pairs (255 left out), and the unreadable pairs."""
    top, problems = 0, []
    for pred_path, gt_path in pairs:
        try:
            for array in _read_pair(pred_path, gt_path):
                top = max(top, int(np.max(np.where(array == 255, 0, array))))
        except DataError as exc:
            problems.append(exc)
    return top, problems


def _count_chunk(pairs: list[tuple[Path, Path]], class_names: list[str], background_index: int | None):
    """A chunk's evaluator counts (SegEvaluator.COUNTS) and its problems: unreadable files,
    size mismatches, ids outside 0..K-1."""
    evaluator = SegEvaluator(class_names, background_index=background_index)
    k = len(class_names)
    problems = []
    for pred_path, gt_path in pairs:
        try:
            pred, gt = _read_pair(pred_path, gt_path)
        except DataError as exc:
            problems.append(exc)
            continue
        bad_here = False
        for path, arr in ((pred_path, pred), (gt_path, gt)):
            bad = np.unique(arr[(arr >= k) & (arr != 255)])
            if bad.size:
                problems.append(DataError(path, f"label ids outside 0..{k - 1} (and not 255): {', '.join(map(str, bad[:8]))}"))
                bad_here = True
        if not bad_here and not problems:
            evaluator.add(pred, gt)
    return {name: getattr(evaluator, name) for name in SegEvaluator.COUNTS}, problems, len(pairs)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _map_chunks(function, chunks: list, workers: int, on_done: Callable[[int], None] | None = None) -> list:
    """function(*chunk) for every chunk, in `workers` processes (in this one for 1), in order.
    The results are integer counts, so the split changes nothing in the sums."""
    if workers <= 1 or len(chunks) <= 1:
        results = []
        for chunk in chunks:
            results.append(function(*chunk))
            if on_done is not None:
                on_done(len(chunk[0]))
        return results
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(function, *chunk): len(chunk[0]) for chunk in chunks}
        for future in concurrent.futures.as_completed(futures):
            if on_done is not None:
                on_done(futures[future])
        return [future.result() for future in futures]  # dicts keep submission order


def run(
    pred_dir: str | Path,
    gt_dir: str | Path,
    classes_file: str | Path | None = None,
    json_path: str | Path | None = None,
    background: bool | int | None = True,
    on_image: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    class_names: list[str] | None = None,
    background_source: str | None = None,
) -> dict:
    """Metrics of every (prediction, ground truth) pair. Files are read and scored in
    `workers` processes (default: one per core), each summing the integer counts of its
    share of the images; the sums, and so every metric, are those of one process.

    Classes: `class_names` (e.g. a dataset's), else `classes_file`, else class_0..class_N for
    the largest id seen. `background`: True = class 0, an int = that class, False/None = no
    background class (every class counts in F, void belongs to none). `background_source`
    (how that setting was chosen) is stored in the summary beside `background_class`."""
    pairs = pair_files(Path(pred_dir), Path(gt_dir))
    workers = default_workers() if workers is None else max(1, int(workers))
    # Chunks small enough to balance the load and report progress, large enough to be cheap.
    size = max(1, min(32, -(-len(pairs) // (4 * workers))))
    chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    done = [0]

    def progress(count: int) -> None:
        done[0] += count
        if on_image is not None:
            on_image(done[0], len(pairs))

    if class_names is not None:
        class_names = list(class_names)
    elif classes_file is not None:
        class_names = read_class_names(classes_file)
    else:
        found = _map_chunks(_largest_ids, [(chunk,) for chunk in chunks], workers)
        problems = [p for _, chunk_problems in found for p in chunk_problems]
        if problems:
            raise DatasetProblems(problems, "evaluation inputs")
        top = max(t for t, _ in found)
        class_names = [f"class_{k}" for k in range(top + 1)]

    if isinstance(background, bool) or background is None:
        background_index = 0 if background else None
    else:
        background_index = int(background)
        if not 0 <= background_index < len(class_names):
            raise ConfigError(f"background: class {background_index} is not one of the {len(class_names)} classes")
    results = _map_chunks(_count_chunk, [(chunk, class_names, background_index) for chunk in chunks], workers,
                          progress)
    problems = [p for _, chunk_problems, _ in results for p in chunk_problems]
    if problems:
        raise DatasetProblems(problems, "evaluation inputs")
    evaluator = SegEvaluator(class_names, background_index=background_index)
    for counts, _, _ in results:
        for name in SegEvaluator.COUNTS:
            setattr(evaluator, name, getattr(evaluator, name) + counts[name])
    summary = evaluator.summary()
    if background_source is not None:
        summary["background_source"] = background_source
    if json_path is not None:
        write_text_atomic(json_path, metrics_json(summary))
    return summary


@dataclass
class EvaluateConfig:
    """No keys yet: the metrics (J, contour F at the dataset's tolerance, boundary IoU) are
    fixed by weakseg.metrics."""


def evaluate_dataset(pred_dir: str | Path, dataset, out_dir: str | Path, on_image=None) -> dict:
    """Every image's prediction pred_dir/<id>.png against its mask; metrics.json into out_dir."""
    pred_dir = Path(pred_dir)
    evaluator = SegEvaluator.for_dataset(dataset)
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample.mask is None:
            raise ConfigError(f"evaluate: {dataset.name} has no mask for {sample.id}; evaluate needs a dataset with "
                              "masks (set eval_dataset to one), or leave the evaluate step out")
        path = pred_dir / f"{sample.id}.png"
        if not path.is_file():
            raise DataError(path, "prediction missing: run `weakseg predict` first")
        pred = read_label_map(path)
        if pred.shape != sample.mask.shape:
            raise DataError(path, f"prediction {pred.shape[1]}x{pred.shape[0]} differs from the mask "
                                  f"({sample.mask.shape[1]}x{sample.mask.shape[0]})")
        evaluator.add(pred, sample.mask)
        if on_image is not None:
            on_image(i + 1, len(dataset))
    summary = evaluator.summary()
    summary["num_images"] = len(dataset)
    write_text_atomic(Path(out_dir) / "metrics.json", metrics_json(summary))
    return {"num_images": len(dataset), **evaluator.headline()}


def run_step(config: EvaluateConfig, dataset, run_dir: Path, progress=None) -> dict:
    return evaluate_dataset(Path(run_dir) / "predict" / "pred", dataset, Path(run_dir) / NAME, on_image=progress)


STEP = Step(NAME, EvaluateConfig, run_step, "Score the predict step's label maps against the evaluation masks: "
            "J, contour F, J&F, boundary IoU, precision, recall, per class.", reads=("predict",), dataset="eval",
            rank_zero=True, stage="final")
