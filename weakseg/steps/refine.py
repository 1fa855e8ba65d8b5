"""Step `refine` (`weakseg refine CONFIG`): CAMs + images -> refined per-pixel probabilities,
and how good their argmax is.

Config:  `refine: RefineConfig`.
Reads:   RUN/infer_cam/cams/<id>.npz  (max-normalised CAMs of the present classes; with
                                       background: model also their `probs`)
         RUN/train_affinity/affinity_model.pt  (method affinity_rw only)
         the dataset (images; masks, when it has them, for the metrics only)
Writes:  RUN/refine/probs/<id>.npz     `probs` (K, H, W) float16, `class_ids` (K,) the label id
                                       of each channel (background first when the dataset has one)
         RUN/refine/refined_metrics.json  argmax of the refined probabilities against the masks

CAMs become probabilities by `weakseg.refine.base.channel_probs`, with the background score
`refine.background` picks (power, constant, or the CAM network's own probabilities); a
dataset without a background class (NYUv2) uses its present classes normalised per pixel.
`method: none` keeps those probabilities, so its metrics are their plain argmax.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from weakseg.data.base import SegDataset
from weakseg.data.io import atomic_path, read_arrays, write_text_atomic
from weakseg.errors import ConfigError, DataError
from weakseg.metrics.evaluator import SegEvaluator, metrics_json
from weakseg.registry import available, lookup
from weakseg.refine.base import channel_probs, channel_scores, normalise_scores
from weakseg.steps.base import Step
from weakseg.steps.model_files import AFFINITY_MODEL, load_affinity_model
from weakseg.train.trainer import pick_device

NAME = "refine"


@dataclass
class WalkConfig:
    """The AffinityNet's random walk (psa eq. 8-10), used by method affinity_rw."""

    beta: float = 8.0  # A_ij = a_ij^beta
    log_t: int = 6  # T^(2^log_t)
    # Pairs 0 < |i - j| < radius form the transition matrix (psa's infer_aff.py: 5); the
    # walk's own key, independent of train_affinity.radius.
    radius: int = 5
    # The pair set (weakseg.refine.affinity.PAIR_SETS): psa's (default; no pairs start in the
    # bottom radius-1 rows or the left/right radius-1 columns) or all in-grid pairs.
    pairs: Literal["psa", "all"] = "psa"
    # What the walk propagates (docs/fidelity.md):
    #   scores: [background, CAMs] before the per-pixel normalisation, as psa's and SEAM's
    #           infer_aff.py walk them (the default; with background: model these are the
    #           network's probabilities, as hfpl walks them);
    #   probs:  the per-pixel normalised [background, CAMs] every other refiner gets;
    #   cams:   the CAMs alone, divided by their maximum after the walk, and the background
    #           score (refine.background) added only then, as IRN's make_sem_seg_labels.py.
    # The walked scores are normalised per pixel at the end in every case (refiner contract).
    input: Literal["scores", "probs", "cams"] = "scores"


@dataclass
class RefineConfig:
    method: str = "crf"  # a registered refiner (weakseg.refine.builders) or affinity_rw
    # Where the background score comes from:
    #   power:    (1 - max cam)^background_alpha (psa, SEAM)
    #   constant: background_constant everywhere (IRN, SEAM's evaluation: a CAM threshold)
    #   model:    the CAM network's own probabilities (infer_class_probs: its background
    #             channel, or prod (1 - sigmoid) of the binomial view); no threshold at all.
    # None of them is taken from infer-cam's best threshold: that one is chosen on the masks.
    background: Literal["power", "constant", "model"] = "power"
    background_alpha: float = 1.0
    background_constant: float = 0.25
    crf_preset: Literal["psa", "label"] = "psa"
    pamr_iterations: int = 10
    spr_alpha: float = 0.8  # shape-cues eq. 5-6; 1.0 is PAMR
    walk: WalkConfig = field(default_factory=WalkConfig)
    device: str = "auto"  # where the random walk runs

    def __post_init__(self):
        # Checked when the config loads, not when the step runs after hours of training.
        allowed = available("refiner") + ["affinity_rw"]
        if self.method not in allowed:
            raise ConfigError(f"refine.method: {self.method!r} is not allowed; allowed values: {', '.join(allowed)}")
        if self.method == "affinity_rw" and self.walk.input == "cams" and self.background == "model":
            raise ConfigError("refine.walk.input: cams walks the CAMs before the background score is added, and "
                              "background: model takes the network's [background, classes] probabilities whole; "
                              "use input: scores or probs, or background: power / constant")

    def extra_reads(self) -> tuple[str, ...]:
        """The random walk needs the AffinityNet that step train_affinity trains."""
        return ("train_affinity",) if self.method == "affinity_rw" else ()


def load_cams(path: Path) -> tuple[np.ndarray, np.ndarray]:
    cams, class_ids = read_arrays(path, ("cams", "class_ids"), "CAM file", "run `weakseg infer-cam` first")
    return cams.astype(np.float32), class_ids.astype(np.int64)


def load_model_probs(path: Path) -> np.ndarray:
    (probs,) = read_arrays(path, ("probs",), "CAM file with the model's probabilities",
                           "refine.background: model needs infer_cam.with_probs: true")
    return probs.astype(np.float32)


def build_refiner(config: RefineConfig, dataset: SegDataset, run_dir: Path):
    """The configured refiner (an object following weakseg.refine.base.Refiner) or None:
    a refiner registered by name (weakseg.refine.builders), or the affinity random walk."""
    if config.method == "affinity_rw":
        from weakseg.refine.affinity import RandomWalk

        if dataset.background_index is None:
            raise ConfigError("refine.method: affinity_rw needs a dataset with a background class (its labels are "
                              "confident foreground / confident background regions); use crf, pamr or spr")
        model, _ = load_affinity_model(Path(run_dir) / AFFINITY_MODEL)
        walk = config.walk
        return RandomWalk(model, walk.beta, walk.log_t, walk.radius, device=pick_device(config.device), pairs=walk.pairs)
    # RefineConfig checked the name when it was built.
    return lookup("refiner", config.method, "refine.method")(config)


def save_probs(path: Path, probs: np.ndarray, class_ids: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probs=probs.astype(np.float16), class_ids=class_ids.astype(np.int64))
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def image_probs(cams: np.ndarray, class_ids: np.ndarray, image: np.ndarray, background_index: int | None,
                config: RefineConfig, refiner=None, model_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image's refined probabilities (K, H, W) and the label id of each channel, from its
    max-normalised CAMs: the background score of `config`, then `refiner` (None: kept as they
    are). The random walk takes what refine.walk.input says (WalkConfig)."""
    walk_input = config.walk.input if config.method == "affinity_rw" and refiner is not None else "probs"
    if walk_input == "scores" and config.background == "model":
        walk_input = "probs"  # the network's probabilities are its scores: the same walk
    if walk_input == "cams" and len(class_ids):
        # IRN: the CAMs walk alone; the walked maps over their maximum (over classes and
        # pixels) are CAMs again, and only then meet the background score.
        walked = refiner.propagate(cams, image)
        cams = walked / max(float(walked.max()), 1e-5)
    probs, channel_ids = channel_probs(cams, class_ids, background_index, config.background, config.background_alpha,
                                       config.background_constant, model_probs)
    if probs.shape[0] == 1 or refiner is None:  # one channel: nothing to decide
        return probs, channel_ids
    if walk_input == "scores":
        # psa: the raw [background, CAMs] walk; normalised afterwards for the refiner contract.
        scores = channel_scores(cams, class_ids, background_index, config.background, config.background_alpha,
                                config.background_constant)[0]
        return normalise_scores(refiner.propagate(scores, image)), channel_ids
    if walk_input == "probs":
        return refiner(probs, image), channel_ids
    return probs, channel_ids  # walked already


def refine_cams(dataset: SegDataset, cam_dir: str | Path, out_dir: str | Path, config: RefineConfig,
                refiner=None, on_image=None) -> dict:
    """Probabilities of every image from the CAMs in `cam_dir`, refined by `refiner` (None:
    kept as they are), into `out_dir`."""
    cam_dir, out = Path(cam_dir), Path(out_dir)
    evaluator = SegEvaluator.for_dataset(dataset)
    has_masks = True
    for i in range(len(dataset)):
        sample = dataset[i]
        cams, class_ids = load_cams(cam_dir / "cams" / f"{sample.id}.npz")
        if cams.shape[1:] != sample.image.shape[:2]:
            raise DataError(cam_dir / "cams" / f"{sample.id}.npz", f"CAMs {cams.shape[1:]} do not match the image {sample.image.shape[:2]}")
        cam_path = cam_dir / "cams" / f"{sample.id}.npz"
        model_probs = load_model_probs(cam_path) if config.background == "model" else None
        probs, channel_ids = image_probs(cams, class_ids, sample.image, dataset.background_index, config, refiner,
                                         model_probs)
        # Rounded to float16 here, as stored, so the metrics are those of the saved file.
        probs = probs.astype(np.float16).astype(np.float32)
        save_probs(out / "probs" / f"{sample.id}.npz", probs, channel_ids)
        if sample.mask is None:
            has_masks = False
        elif has_masks:
            evaluator.add(channel_ids[probs.argmax(axis=0)].astype(np.uint8), sample.mask)
        if on_image is not None:
            on_image(i + 1, len(dataset))
    result: dict = {"num_images": len(dataset), "method": config.method}
    if has_masks:
        result.update(evaluator.headline())
        write_text_atomic(out / "refined_metrics.json", metrics_json(result))
    return result


def run(config: RefineConfig, dataset: SegDataset, run_dir: Path, progress=None) -> dict:
    refiner = build_refiner(config, dataset, run_dir)
    return refine_cams(dataset, Path(run_dir) / "infer_cam", Path(run_dir) / NAME, config, refiner, on_image=progress)


STEP = Step(NAME, RefineConfig, run, "Refine the CAMs into per-pixel probabilities (dense CRF, PAMR, SPR or the "
            "affinity random walk, which also reads RUN/train_affinity) and score their argmax (J, F, J&F, "
            "boundary IoU) when the dataset has masks.",
            reads=("infer_cam",), rank_zero=True, stage="refined")
