"""The pipeline: the ordered steps of a config `{dataset, eval_dataset, out, <step>: ...}`.

    RUN/train_cam/       cam_model.pt, checkpoint.pt, log.csv
    RUN/infer_cam/       cams/<id>.npz, cam_labels/, cam_metrics.json
    RUN/train_affinity/  affinity_model.pt (only with refine.method: affinity_rw)
    RUN/refine/          probs/<id>.npz, refined_metrics.json
    RUN/pseudo_labels/   labels/<id>.png, pseudo_label_metrics.json
    RUN/label_rounds/    round_<r>/{labels,saliency}/, stage_<s>/, auxsegnet_model.pt (AuxSegNet+)
    RUN/train_seg/       seg_model.pt, checkpoint.pt, log.csv
    RUN/predict/         pred/<id>.png (on eval_dataset; from train_seg's network, or label_rounds')
    RUN/evaluate/        metrics.json
    RUN/results.json     J, F, J&F and boundary IoU per stage: cam, refined, pseudo_labels, final;
                         label_rounds: precision, recall, J and F of every round's labels

A config runs the steps it has a section for (`evaluate: {}` runs one with its defaults), in
the order above. `weakseg run CONFIG` runs them all; `weakseg <step> CONFIG` runs one, after
checking that the steps it reads finished with this same config. This module is the only
place where steps meet; they talk through the run directory only.

Restarting: see weakseg.steps.base. A step whose `done.json` matches is skipped by `weakseg
run`; a step whose config (or an upstream step's) changed is cleared and run again, and so is
everything after it; an interrupted step resumes (training from its last per-epoch
checkpoint). `--from STEP` re-runs STEP and what follows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from weakseg.config import apply_overrides, from_mapping, load_yaml, to_dict
from weakseg.data import build_dataset, check_dataset_mapping, with_absolute_paths
from weakseg.data.io import write_text_atomic
from weakseg.errors import ConfigError
from weakseg.record import folder_lock, run_record
from weakseg.steps import (evaluate, infer_cam, label_rounds, predict, pseudo_labels, refine, stages_and_seconds,
                           train_affinity, train_cam, train_seg)
from weakseg.steps.base import Step, StepFolder, execute, step_hashes
from weakseg.train import distributed
from weakseg.metrics.evaluator import metrics_json

STEPS: tuple[Step, ...] = (train_cam.STEP, infer_cam.STEP, train_affinity.STEP, refine.STEP, pseudo_labels.STEP,
                           label_rounds.STEP, train_seg.STEP, predict.STEP, evaluate.STEP)
BY_NAME = {step.name: step for step in STEPS}
STEP_NAMES = tuple(BY_NAME)

# Keys of earlier releases: a config using one fails with one line naming the new key.
RENAMED = {
    "cam": "train_cam (its model, loss, train) and infer_cam (the keys of cam.infer)",
    "seg": "train_seg (its model, train) and predict (the keys of seg.infer)",
    "model": "train_cam.model (a CAM training config is a pipeline config: dataset, out, train_cam, infer_cam)",
    "loss": "train_cam.loss",
    "train": "train_cam.train",
    "infer": "infer_cam",
    "labels": "a train_seg section in the run folder's config (train_seg reads RUN/pseudo_labels)",
    "refine.affinity": "train_affinity (preset, alpha_low, alpha_high, backbone, backbone_args, dim, crf_labels, "
                       "radius, train) and refine.walk (beta, log_t, radius)",
}


@dataclass
class PipelineConfig:
    dataset: dict[str, Any]
    # Where predict and evaluate run; None: the training images (the only split of the
    # shared VOC data; see docs/results.md for what that measures).
    eval_dataset: dict[str, Any] | None = None
    out: str = "runs/pipeline"
    train_cam: train_cam.TrainCamConfig | None = None
    infer_cam: infer_cam.InferCamConfig | None = None
    train_affinity: train_affinity.TrainAffinityConfig | None = None
    refine: refine.RefineConfig | None = None
    pseudo_labels: pseudo_labels.PseudoLabelConfig | None = None
    label_rounds: label_rounds.LabelRoundsConfig | None = None
    train_seg: train_seg.TrainSegConfig | None = None
    predict: predict.PredictConfig | None = None
    evaluate: evaluate.EvaluateConfig | None = None

    def present(self) -> list[Step]:
        """The steps this config runs, in pipeline order."""
        return [step for step in STEPS if getattr(self, step.name) is not None]


def _check_renamed(data: dict) -> None:
    for old, new in RENAMED.items():
        head, _, rest = old.partition(".")
        node = data.get(head)
        if (not rest and head in data) or (rest and isinstance(node, dict) and rest in node):
            raise ConfigError(f"{old}: renamed; use {new} (see docs/pipeline.md)")


def _check_steps(config: PipelineConfig) -> None:
    """What one step needs of another, checked when the config loads."""
    present = {step.name for step in config.present()}
    if not present:
        raise ConfigError(f"the config names no step; steps: {', '.join(STEP_NAMES)}")
    for step in config.present():
        for upstream in step.reads_for(getattr(config, step.name)):
            if upstream not in present:
                why = " (refine.method: affinity_rw walks with its AffinityNet)" if upstream == "train_affinity" else ""
                raise ConfigError(f"{step.name}: reads the outputs of {upstream}, which this config does not run{why}; "
                                  f"add a `{upstream}:` section (`{upstream}: {{}}` for its defaults)")
    if config.refine is not None and config.refine.background == "model" and config.infer_cam is not None \
            and not config.infer_cam.with_probs:
        raise ConfigError("refine.background: model starts from the CAM network's own probabilities; "
                          "set infer_cam.with_probs: true so that infer_cam saves them")


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, Path]:
    data = load_yaml(path)
    for name in STEP_NAMES:
        if name in data and data[name] is None:  # `evaluate:` with nothing after it, most likely
            raise ConfigError(f"{path}: {name}: null; write `{name}: {{}}` to run the step with its defaults, "
                              "or leave the key out")
    data = apply_overrides(data, overrides or [])
    for name in STEP_NAMES:
        if name in data and data[name] is None:  # an override `STEP=null` leaves the step out
            del data[name]
    _check_renamed(data)
    config = from_mapping(PipelineConfig, data)
    check_dataset_mapping(config.dataset)
    if config.eval_dataset is not None:
        check_dataset_mapping(config.eval_dataset, "eval_dataset")
    _check_steps(config)
    return config, Path(path).resolve().parent


def _saved(config: PipelineConfig, base_dir: Path) -> dict:
    """The config as saved into the run folder: datasets by absolute paths (so it runs from
    the run folder too), absent steps left out."""
    saved = {k: v for k, v in to_dict(config).items() if v is not None or k == "eval_dataset"}
    saved["dataset"] = with_absolute_paths(config.dataset, base_dir)
    if config.eval_dataset is not None:
        saved["eval_dataset"] = with_absolute_paths(config.eval_dataset, base_dir)
    return saved


def hashes_of(config: PipelineConfig, saved: dict) -> dict[str, str]:
    datasets = {"train": saved["dataset"], "eval": saved.get("eval_dataset") or saved["dataset"]}
    return step_hashes(list(STEPS), {s.name: getattr(config, s.name) for s in STEPS}, datasets)


class _Datasets:
    """The pipeline's datasets, built when a step first needs one."""

    def __init__(self, config: PipelineConfig, base_dir: Path):
        self.config, self.base_dir, self.built = config, base_dir, {}

    def __getitem__(self, which: str):
        if which not in self.built:
            if which == "eval" and self.config.eval_dataset is not None:
                self.built[which] = build_dataset(self.config.eval_dataset, self.base_dir, prefix="eval_dataset")
            else:
                self.built[which] = self["train"] if which == "eval" else build_dataset(self.config.dataset, self.base_dir)
        return self.built[which]


def _check_range(config: PipelineConfig, from_step: str | None, to_step: str | None) -> list[Step]:
    present = config.present()
    names = [s.name for s in present]
    for flag, name in (("--from", from_step), ("--to", to_step)):
        if name is not None and name not in names:
            what = "is not a step" if name not in BY_NAME else "has no section in this config"
            raise ConfigError(f"{flag}: {name!r} {what}; this config's steps: {', '.join(names)}")
    if from_step is not None and to_step is not None and names.index(to_step) < names.index(from_step):
        raise ConfigError(f"--to {to_step} comes before --from {from_step}")
    return present[: names.index(to_step) + 1] if to_step is not None else present


def run(
    config_path: str | Path,
    overrides: list[str] | None = None,
    from_step: str | None = None,
    log: Callable[[str], None] = print,
    to_step: str | None = None,
    progress: Callable[[str], Callable[[int, int], None] | None] = lambda step: None,
) -> dict:
    """`weakseg run`: every step of the config (up to `to_step`), skipping those done earlier
    with the same config; returns (and writes) results.json."""
    config, base_dir = load_config(config_path, overrides)
    steps = _check_range(config, from_step, to_step)
    run_dir = Path(config.out).absolute()  # `out` is relative to the current folder (docs/pipeline.md)
    saved = _saved(config, base_dir)
    with run_record(run_dir, "run", saved, {"from_step": from_step, "to_step": to_step}) as record:
        summary, _ = _run(config, saved, base_dir, run_dir, steps, from_step, None, log, progress)
        record["result"] = summary
    return summary


def run_step(
    name: str,
    config_path: str | Path,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """`weakseg <step> CONFIG`: that one step (resumed when it was interrupted with this same
    config, else from scratch) after checking the steps it reads; returns its result."""
    step = BY_NAME[name]
    config, base_dir = load_config(config_path, overrides)
    if getattr(config, name) is None:
        raise ConfigError(f"{config_path}: no `{name}:` section; add one (`{name}: {{}}` for its defaults)")
    run_dir = Path(config.out).absolute()  # `out` is relative to the current folder (docs/pipeline.md)
    saved = _saved(config, base_dir)
    hashes = hashes_of(config, saved)
    for upstream in step.reads_for(getattr(config, name)):
        state = StepFolder(run_dir / upstream, hashes[upstream])
        if state.finished() is None:
            raise ConfigError(f"{name} reads {run_dir / upstream}, which is {state.state()}; run `weakseg "
                              f"{BY_NAME[upstream].command} {config_path}` (or `weakseg run {config_path} --to "
                              f"{upstream}`) with the same config first")
    lock = folder_lock(run_dir) if distributed.is_main() else contextlib.nullcontext()
    with lock:
        _, results = _run(config, saved, base_dir, run_dir, [step], None, name, log, lambda _: progress)
    return results[name]


def _run(config: PipelineConfig, saved: dict, base_dir: Path, run_dir: Path, steps: list[Step],
         from_step: str | None, single: str | None, log: Callable[[str], None], progress) -> tuple[dict, dict]:
    """Run `steps` with the shared bookkeeping; (results.json's summary, each step's result)."""
    # Under torchrun every rank runs this loop: the trainers use DDP, CAM inference and
    # pseudo-labels shard the images, rank-zero steps run on rank 0 alone. Rank 0 alone writes
    # the bookkeeping (config, started/done markers, results.json) and logs; barriers keep
    # the ranks on the same step.
    distributed.setup()
    main = distributed.is_main()
    if not main:
        log, progress = (lambda message: None), (lambda step: None)
    if main:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    datasets = _Datasets(config, base_dir)
    hashes = hashes_of(config, saved)
    names = [s.name for s in steps]
    forced = set(names[names.index(from_step):]) if from_step else set()
    results, rerun_rest = {}, False
    for step in steps:
        folder = StepFolder(run_dir / step.name, hashes[step.name])
        distributed.barrier()  # every rank sees the same markers
        if single is not None:
            # A step asked for by name runs; an interrupted run of the same config resumes.
            clear = folder.finished() is not None
        else:
            done = None if (rerun_rest or step.name in forced) else folder.finished()
            if done is not None:
                log(f"{step.name}: done earlier, skipped ({folder.folder})")
                results[step.name] = done["result"]
                continue
            # Forced, or downstream of a step that ran again: its old outputs were made from
            # other inputs, so nothing of them is resumed.
            clear = rerun_rest or step.name in forced
            rerun_rest = True
        log(f"{step.name}: running -> {folder.folder}")
        result = execute(step, getattr(config, step.name), datasets[step.dataset], run_dir, hashes[step.name], clear,
                         main, progress(step.name))
        results[step.name] = result if main else folder.finished()["result"]
        absent = datasets[step.dataset].absent_masks
        if step.stage is not None and absent and "miou" not in result:
            log(f"{step.name}: no metrics: {len(absent)} of {len(datasets[step.dataset])} images have no mask "
                f"(first: {absent[0]}); give every image a mask, or set require_masks: true to list them as errors")
    summary = summarize(config, run_dir, hashes)
    if main:
        write_text_atomic(run_dir / "results.json", metrics_json(summary))
    distributed.barrier()
    return summary, results


def summarize(config: PipelineConfig, run_dir: Path, hashes: dict[str, str]) -> dict:
    """results.json: the stage metrics of every step of the config whose folder finished with
    this config's hash (after `--to`, or one step run by name, the stages so far)."""
    finished = {}
    for step in config.present():
        done = StepFolder(run_dir / step.name, hashes[step.name]).finished()
        if done is not None:
            finished[step.name] = done
    recorded = stages_and_seconds(finished)
    summary: dict = {
        "stages": recorded["stages"],
        "evaluated_on": "training images" if config.eval_dataset is None else "eval_dataset",
        "seconds": recorded["seconds"],
    }
    if "infer_cam" in finished:
        cam = finished["infer_cam"]["result"]
        summary["cam_threshold"] = cam.get("best_threshold", cam.get("threshold"))
    if "pseudo_labels" in finished:
        labels = finished["pseudo_labels"]["result"]
        summary["pseudo_labels"] = {k: labels.get(k) for k in ("labelled_miou", "coverage", "confidence")}
    if "label_rounds" in finished:
        summary["label_rounds"] = finished["label_rounds"]["result"]["label_rounds"]
    return summary


def sweep_seed_keys(config: PipelineConfig) -> list[str]:
    """The `seed` keys of the trainers this config runs (a sweep sets each to the job's seed)."""
    keys = []
    for step in config.present():
        section = getattr(config, step.name)
        if hasattr(section, "train") and hasattr(section.train, "seed"):
            keys.append(f"{step.name}.train.seed")
    return keys

