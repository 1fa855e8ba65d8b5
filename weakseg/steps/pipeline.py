"""`weakseg run CONFIG`: the whole pipeline from one YAML, one folder per step.

    RUN/cam_train/      train-cam      cam_model.pt, checkpoint.pt, log.csv
    RUN/cam/            infer-cam      cams/<id>.npz, pseudo_labels/, cam_metrics.json
    RUN/refined/        refine         probs/<id>.npz, refined_metrics.json
    RUN/pseudo_labels/  pseudo-labels  labels/<id>.png, pseudo_label_metrics.json
    RUN/seg_train/      train-seg      seg_model.pt, checkpoint.pt, log.csv
    RUN/final/          predict        pred/<id>.png, metrics.json (on eval_dataset)
    RUN/results.json    J, F, J&F and boundary IoU per stage: cam, refined, pseudo_labels, final

This module is the only place where steps meet; they talk through the run directory only.

Restarting. Each step folder gets `done.json` when the step has finished, holding a hash of
the step's config chained with the hashes of the steps before it. A step whose `done.json`
matches is skipped. A step whose config (or an upstream step's) changed is cleared and run
again, and so is everything after it. A step that was interrupted resumes: the training
steps from their last per-epoch checkpoint; the others redo their outputs (each file is
written atomically, so none is half-written). `--from STEP` re-runs STEP and what follows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from weakseg.config import apply_overrides, from_mapping, load_yaml, to_dict
from weakseg.data import build_dataset, check_dataset_mapping, with_absolute_paths
from weakseg.data.io import write_text_atomic
from weakseg.errors import ConfigError
from weakseg.losses.terms import LossConfig
from weakseg.models.factory import ModelConfig, SegModelConfig
from weakseg.record import run_record
from weakseg.steps import infer_cam, predict, pseudo_labels, refine, train_cam, train_seg
from weakseg.steps.predict import SegInferConfig
from weakseg.steps.pseudo_labels import PseudoLabelConfig
from weakseg.steps.refine import RefineConfig
from weakseg.steps.train_cam import CAMRunConfig, InferConfig
from weakseg.train import distributed
from weakseg.train.trainer import TrainConfig

STEPS = ("cam_train", "cam", "refined", "pseudo_labels", "seg_train", "final")
# Under torchrun these run on rank 0 while the other ranks wait (the others split the work).
RANK_ZERO_STEPS = ("refined", "final")
METRIC_KEYS = ("miou", "contour_f", "jf", "boundary_iou")


@dataclass
class CAMStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


@dataclass
class SegStageConfig:
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: SegInferConfig = field(default_factory=SegInferConfig)


@dataclass
class PipelineConfig:
    dataset: dict[str, Any]
    # Where the final network is evaluated; None: the training images (the only split of the
    # shared VOC data; see docs/results.md for what that measures).
    eval_dataset: dict[str, Any] | None = None
    cam: CAMStageConfig = field(default_factory=CAMStageConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    seg: SegStageConfig = field(default_factory=SegStageConfig)
    out: str = "runs/pipeline"


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, Path]:
    data = apply_overrides(load_yaml(path), overrides or [])
    config = from_mapping(PipelineConfig, data)
    check_dataset_mapping(config.dataset)
    if config.eval_dataset is not None:
        check_dataset_mapping(config.eval_dataset, "eval_dataset")
    return config, Path(path).resolve().parent


def _without_nulls(value: Any) -> Any:
    """Mappings without their null-valued keys, recursively. An optional key left unset (null)
    then does not enter a step's hash, so a release that adds an optional config key (e.g. a
    loss term's own `reads`) does not invalidate the finished steps of existing runs."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _hash(previous: str, section: Any) -> str:
    text = json.dumps(_without_nulls(section), sort_keys=True, default=str)
    return hashlib.sha256((previous + "\n" + text).encode()).hexdigest()[:16]


def step_hashes(config: PipelineConfig, base_dir: Path) -> dict[str, str]:
    """Each step's hash covers its own config section and every upstream one (and where the
    datasets are, resolved), so a change anywhere invalidates exactly what depends on it."""
    data_key = {"dataset": config.dataset, "base_dir": str(base_dir)}
    sections = {
        "cam_train": [data_key, to_dict(config.cam.model), to_dict(config.cam.loss), to_dict(config.cam.train)],
        "cam": [to_dict(config.cam.infer), config.refine.background == "model"],
        "refined": to_dict(config.refine),
        "pseudo_labels": to_dict(config.pseudo_labels),
        "seg_train": [to_dict(config.seg.model), to_dict(config.seg.train)],
        "final": [to_dict(config.seg.infer), config.eval_dataset],
    }
    hashes, previous = {}, ""
    for step in STEPS:
        previous = hashes[step] = _hash(previous, sections[step])
    return hashes


class _StepState:
    """done.json / started.json bookkeeping of one step folder."""

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = folder, digest

    def _read(self, name: str) -> dict | None:
        path = self.folder / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None  # a torn marker counts as absent (markers are written atomically anyway)

    def finished(self) -> dict | None:
        done = self._read("done.json")
        return done if done is not None and done.get("hash") == self.digest else None

    def begin(self, clear: bool) -> None:
        """Clear outputs of a different config (or all, with `clear`); keep those of an
        interrupted run of this same config, so that its training resumes."""
        started = self._read("started.json")
        if self.folder.exists() and (clear or started is None or started.get("hash") != self.digest):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "done.json").unlink(missing_ok=True)
        write_text_atomic(self.folder / "started.json", json.dumps({"hash": self.digest}) + "\n")

    def finish(self, result: dict, seconds: float) -> None:
        record = {"hash": self.digest, "seconds": round(seconds, 1), "result": result}
        write_text_atomic(self.folder / "done.json", json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def run(
    config_path: str | Path,
    overrides: list[str] | None = None,
    from_step: str | None = None,
    log: Callable[[str], None] = print,
    to_step: str | None = None,
    progress: Callable[[str], Callable[[int, int], None] | None] = lambda step: None,
) -> dict:
    config, base_dir = load_config(config_path, overrides)
    for flag, step in (("--from", from_step), ("--to", to_step)):
        if step is not None and step not in STEPS:
            raise ConfigError(f"{flag}: {step!r} is not a step; steps: {', '.join(STEPS)}")
    if from_step is not None and to_step is not None and STEPS.index(to_step) < STEPS.index(from_step):
        raise ConfigError(f"--to {to_step} comes before --from {from_step}")
    last = STEPS.index(to_step) if to_step is not None else len(STEPS) - 1
    run_dir = Path(config.out)
    # The saved copy names its data by absolute paths, so it runs from the run folder too.
    saved = to_dict(config)
    saved["dataset"] = with_absolute_paths(config.dataset, base_dir)
    if config.eval_dataset is not None:
        saved["eval_dataset"] = with_absolute_paths(config.eval_dataset, base_dir)
    with run_record(run_dir, "run", saved, {"from_step": from_step, "to_step": to_step}) as record:
        record["result"] = summary = _run_steps(config, saved, base_dir, run_dir, from_step, last, log, progress)
    return summary


def _run_steps(config: PipelineConfig, saved: dict, base_dir: Path, run_dir: Path, from_step: str | None, last: int,
               log: Callable[[str], None], progress) -> dict:
    # Under torchrun every rank runs this loop: the trainers use DDP, CAM inference and
    # pseudo-labels shard the images, refinement and prediction run on rank 0 alone. Rank 0
    # alone writes the bookkeeping (config, started/done markers, results.json) and logs;
    # barriers keep the ranks on the same step.
    distributed.setup()
    main = distributed.is_main()
    if not main:
        log, progress = (lambda message: None), (lambda step: None)
    if main:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    dataset = build_dataset(config.dataset, base_dir)
    eval_dataset = dataset if config.eval_dataset is None else build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    hashes = step_hashes(config, base_dir)
    folders = {step: run_dir / step for step in STEPS}
    forced = set(STEPS[STEPS.index(from_step):]) if from_step else set()

    def cam_train():
        cam_config = CAMRunConfig(
            dataset=config.dataset, model=config.cam.model, loss=config.cam.loss, train=config.cam.train,
            infer=config.cam.infer, out=str(folders["cam_train"]),
        )
        result = train_cam.run_config(cam_config, base_dir, on_step=progress("cam_train"))
        return {"final_loss": result["epoch_losses"][-1], "steps": result["steps"]}

    def cam():
        infer = config.cam.infer
        return infer_cam.run(
            folders["cam_train"] / "cam_model.pt", dataset, folders["cam"], infer.scales, infer.flip,
            infer.threshold, on_image=progress("cam"), with_probs=config.refine.background == "model",
            fold_batchnorm=infer.fold_batchnorm, channels_last=infer.channels_last,
        )

    def refined():
        return refine.run(dataset, folders["cam"], folders["refined"], config.refine, on_image=progress("refined"),
                          on_step=progress("refined: train affinity"))

    def labels():
        return pseudo_labels.run(dataset, folders["refined"], folders["pseudo_labels"], config.pseudo_labels,
                                 on_image=progress("pseudo_labels"))

    def seg_train():
        result = train_seg.run(dataset, folders["pseudo_labels"], folders["seg_train"], config.seg.model,
                               config.seg.train, on_step=progress("seg_train"))
        return {"final_loss": result["epoch_losses"][-1], "steps": result["steps"]}

    def final():
        return predict.run(folders["seg_train"] / "seg_model.pt", eval_dataset, folders["final"], config.seg.infer,
                           on_image=progress("final"))

    actions = {"cam_train": cam_train, "cam": cam, "refined": refined, "pseudo_labels": labels,
               "seg_train": seg_train, "final": final}
    results, rerun_rest = {}, False
    for step in STEPS[: last + 1]:
        state = _StepState(folders[step], hashes[step])
        distributed.barrier()  # every rank sees the same markers
        done = None if (rerun_rest or step in forced) else state.finished()
        if done is not None:
            log(f"{step}: done earlier, skipped ({folders[step]})")
            results[step] = done["result"]
            continue
        # Forced, or downstream of a step that ran again: its old outputs were made from
        # other inputs, so nothing of them is resumed.
        clear = rerun_rest or step in forced
        rerun_rest = True
        log(f"{step}: running -> {folders[step]}")
        if main:
            state.begin(clear)
        distributed.barrier()
        started = time.perf_counter()
        result = actions[step]() if (main or step not in RANK_ZERO_STEPS) else None
        if main:
            state.finish(result, time.perf_counter() - started)
        distributed.barrier()
        results[step] = result if main else state.finished()["result"]

    # With --to, results.json holds the stages that ran so far.
    summary = {
        "stages": {
            stage: {k: results[step].get(k) for k in METRIC_KEYS if k in results[step]}
            for stage, step in (("cam", "cam"), ("refined", "refined"), ("pseudo_labels", "pseudo_labels"), ("final", "final"))
            if step in results
        },
        "evaluated_on": "training images" if config.eval_dataset is None else "eval_dataset",
        "seconds": {step: json.loads((folders[step] / "done.json").read_text())["seconds"] for step in results},
    }
    if "cam" in results:
        summary["cam_threshold"] = results["cam"].get("best_threshold", results["cam"].get("threshold"))
    if "pseudo_labels" in results:
        summary["pseudo_labels"] = {k: results["pseudo_labels"].get(k) for k in ("labelled_miou", "coverage", "confidence")}
    if main:
        write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    distributed.barrier()
    return summary
