"""CAM quality of each loss recipe on the real data in ../shared/data: J, F, J&F of CAM
pseudo-labels (best background threshold on VOC, argmax over present classes on NYUv2),
mean +- std over seeds, every row trained with the same CPU-sized schedule.

    python benchmarks/cam_real_data.py --dataset voc --seeds 0 1 2 [--out runs/bench_cam] [--only NAME ...]
    python benchmarks/cam_real_data.py --dataset nyu --seeds 0 1 2 [--threads 1] [--reuse]
    python benchmarks/cam_real_data.py --dataset voc --train-data TRAIN.yaml --eval-data HELD_BACK.yaml
    python benchmarks/cam_real_data.py --dataset voc --holdout 3 --seeds 0 --only SEAM

`--holdout K` holds back every K-th image of the dataset's sorted id list: it writes the two
id lists and dataset configs under OUT/<dataset>_holdoutK/, trains every row on the other
images and scores on the held-back ones (the same as --train-data/--eval-data with those files).

`--train-data` / `--eval-data` (dataset config files) train every row on other images and
score the CAMs on held-back ones; the background threshold is still swept on the scored
images' masks, as for the training-set rows.

Each recipe is a config in configs/ (plus the overrides listed in RECIPES below), trained
with `weakseg train-cam` and evaluated with `weakseg infer-cam` at the config's inference
scales (in-process, same code). Prints a markdown table and writes OUT/<dataset>_summary.json.
SCHEDULE adds overrides shared by every row of a dataset: the epoch count where the GAP
baseline's held-back learning curve flattens (VOC 24, NYUv2 20; docs/results.md, "Learning
curves"), so every row trains the same converged schedule. Rows whose config takes its epochs
from a held-back curve of its own (OWN_SCHEDULE: the NYUv2 SEAM configs) skip it. The tables of earlier sessions used
4 (VOC) and 2 (NYUv2) epochs: `--set train_cam.train.epochs=4` reproduces one. Each run writes bench_metrics.json in its folder (its CAM arrays are deleted once
scored unless `--keep-cams`); `--reuse` takes those of
finished runs instead of training again (after a crash; never across code changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import time
from pathlib import Path

from weakseg.data.holdout import holdout_positions
from weakseg.data.io import write_text_atomic
from weakseg.data import build_dataset, dataset_from_file, load_dataset_config, with_absolute_paths
from weakseg.steps import infer_cam, pipeline

ROOT = Path(__file__).resolve().parents[1]

DATA = {"voc": ROOT / "configs" / "data" / "voc_shared.yaml", "nyu": ROOT / "configs" / "data" / "nyu_shared.yaml"}

# name -> (config file in configs/, overrides). Rows without overrides are the example configs
# as they are; the single-add-on rows switch one loss term of the baseline on.
RECIPES = {
    "voc": {
        "baseline GAP": ("voc_cam_gap.yaml", []),
        "+ISL (binomial)": ("voc_cam_gap.yaml", ["train_cam.loss.classification.kind=isl_binomial"]),
        "+FSL": ("voc_cam_gap.yaml", ["train_cam.loss.fsl={upsample: 4}"]),
        "+ISL/FSL binomial (hfpl)": ("voc_cam_hfpl.yaml", []),
        "+ISL/FSL multinomial (icam)": ("voc_cam_icam.yaml", []),
        # Base methods of issue 5 (VOC has no depth here, so no DEAL rows on VOC).
        "SEAM": ("seam_voc_cpu.yaml", []),
        "SEAM +ISL/FSL": ("seam_voc_cpu_isl_fsl.yaml", []),
        "ViT CAM (random init)": ("vit_voc_cpu.yaml", []),
        "ViT CAM (random init) +ISL/FSL": ("vit_voc_cpu_isl_fsl.yaml", []),
    },
    "nyu": {
        "baseline GAP": ("nyu_cam_gap.yaml", []),
        "+DEAL": ("nyu_cam_deal.yaml", []),
        "+DEAL +ISL/FSL": ("nyu_cam_deal_isl_fsl.yaml", []),
        "SEAM": ("seam_nyu_cpu.yaml", []),
        "SEAM +ISL/FSL": ("seam_nyu_cpu_isl_fsl.yaml", []),
        "SEAM +DEAL": ("seam_nyu_cpu_deal.yaml", []),
        "SEAM +DEAL +ISL/FSL": ("seam_nyu_cpu_deal_isl_fsl.yaml", []),
        "ViT CAM (random init)": ("vit_nyu_cpu.yaml", []),
        "ViT CAM (random init) +ISL/FSL": ("vit_nyu_cpu_isl_fsl.yaml", []),
        "ViT CAM (random init) +DEAL": ("vit_nyu_cpu_deal.yaml", []),
        "ViT CAM (random init) +DEAL +ISL/FSL": ("vit_nyu_cpu_deal_isl_fsl.yaml", []),
    },
}


# Overrides shared by every row of a dataset: the CPU-sized schedule on top of the configs.
SCHEDULE = {"voc": ["train_cam.train.epochs=24"], "nyu": ["train_cam.train.epochs=20"]}

# Configs whose train_cam.train.epochs is their own held-back curve's (the number lives in the
# config alone), so SCHEDULE does not apply: SEAM's NYUv2 curve peaks at epoch 12 and diverges
# after it (docs/results.md, "NYUv2, SEAM"); its variants inherit seam_nyu_cpu.yaml's 12.
OWN_SCHEDULE = {"seam_nyu_cpu.yaml", "seam_nyu_cpu_isl_fsl.yaml", "seam_nyu_cpu_deal.yaml",
                "seam_nyu_cpu_deal_isl_fsl.yaml"}


def schedule_overrides(dataset: str, config_file: str) -> list[str]:
    """SCHEDULE's overrides for a row, none for a config with its own curve's schedule."""
    return [] if config_file in OWN_SCHEDULE else list(SCHEDULE[dataset])


def dataset_override(path: Path) -> str:
    """`dataset={...}` replacing a recipe's training data by a dataset config file's (its
    relative paths made absolute, since the recipe resolves paths from configs/)."""
    return "dataset=" + json.dumps(with_absolute_paths(load_dataset_config(path), path.resolve().parent))


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` atomically, and only when it differs: a second invocation running beside
    the first (other --only rows) must never let the first read a half-written split file."""
    if not (path.is_file() and path.read_text() == text):
        write_text_atomic(path, text)


def write_holdout_split(dataset: str, every: int, folder: Path) -> tuple[Path, Path]:
    """Dataset configs for the images kept for training and every `every`-th one held back
    (sorted ids, positions every-1, 2*every-1, ...), written under `folder`."""
    if every < 2:
        raise SystemExit(f"--holdout {every}: must be at least 2 (every K-th image held back)")
    mapping = with_absolute_paths(load_dataset_config(DATA[dataset]), DATA[dataset].parent)
    ids = build_dataset(mapping).ids
    # The dataset key `holdout` makes the same split (weakseg.data.holdout, one rule).
    held = [ids[i] for i in holdout_positions(ids, every, "heldback")]
    kept = [ids[i] for i in holdout_positions(ids, every, "kept")]
    folder.mkdir(parents=True, exist_ok=True)
    configs = []
    for name, chosen in (("train", kept), ("heldback", held)):
        _write_if_changed(folder / f"{name}_ids.txt", "\n".join(chosen) + "\n")
        config = dict(mapping, ids_file=str((folder / f"{name}_ids.txt").resolve()))
        config.pop("split", None)
        _write_if_changed(folder / f"{name}.yaml", json.dumps(config, indent=2) + "\n")  # JSON is YAML
        configs.append(folder / f"{name}.yaml")
    print(f"held back {len(held)} of {len(ids)} images (1 in {every}): {folder}", flush=True)
    return configs[0], configs[1]


def run_one(dataset: str, recipe: tuple[str, list[str]], seed: int, out: Path, reuse: bool = False,
            train_data: Path | None = None, eval_data: Path | None = None, keep_cams: bool = False,
            extra: list[str] | None = None) -> dict:
    config_file, overrides = recipe
    overrides = (schedule_overrides(dataset, config_file) + overrides + ([dataset_override(train_data)] if train_data else [])
                 + list(extra or []))
    record = out / f"seed{seed}" / "bench_metrics.json"
    if reuse and record.is_file():
        return json.loads(record.read_text())
    run_dir = out / f"seed{seed}"
    config_path = ROOT / "configs" / config_file
    overrides = overrides + [f"train_cam.train.seed={seed}", f"out={run_dir}"]
    started = time.perf_counter()
    # The step commands, so that RUN/train_cam (and, on the training images, RUN/infer_cam) are
    # step folders that `weakseg infer-cam` / `weakseg refine` with the same overrides continue.
    trained = pipeline.run_step("train_cam", config_path, overrides, log=lambda line: None)
    if eval_data is None:
        metrics = pipeline.run_step("infer_cam", config_path, overrides, log=lambda line: None)
        cam_dir = run_dir / "infer_cam"
    else:  # held-back images: the step's own function on another dataset
        config, _ = pipeline.load_config(config_path, overrides)
        cam_dir = run_dir / "infer_heldback"
        metrics = infer_cam.infer_cams(run_dir / "train_cam" / "cam_model.pt", dataset_from_file(eval_data), cam_dir,
                                       config.infer_cam)
    metrics["seconds"] = time.perf_counter() - started
    metrics["final_loss"] = trained["epoch_losses"][-1]
    metrics = {k: metrics.get(k) for k in ("miou", "contour_f", "jf", "best_threshold", "final_loss", "seconds")}
    write_text_atomic(record, json.dumps(metrics, indent=2))
    if not keep_cams:
        # The tables need only the metrics; a NYUv2 run's CAM arrays take about 2.7 GB.
        shutil.rmtree(cam_dir / "cams")
    return metrics


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(RECIPES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cam"))
    parser.add_argument("--only", nargs="*", help="Run only these recipe names.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--reuse", action="store_true", help="reuse bench_metrics.json of finished runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides added to every row, e.g. train_cam.train.epochs=4")
    parser.add_argument("--keep-cams", action="store_true",
                        help="keep each run's infer_cam/cams/ arrays (default: delete them once scored)")
    parser.add_argument("--train-data", type=Path, default=None,
                        help="dataset config to train every row on instead of the recipe's (e.g. a split)")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="dataset config to score the CAMs on (held-back images) instead of the training data")
    parser.add_argument("--holdout", type=int, default=None, metavar="K",
                        help="train on the dataset without every K-th image, score on those (writes the split)")
    args = parser.parse_args()
    tag = args.dataset
    if args.holdout:
        if args.train_data or args.eval_data:
            raise SystemExit("--holdout writes its own --train-data/--eval-data; give one or the other")
        tag = f"{args.dataset}_holdout{args.holdout}"
        args.train_data, args.eval_data = write_holdout_split(args.dataset, args.holdout, args.out / tag)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    results: dict[str, list[dict]] = {}
    for name, recipe in RECIPES[args.dataset].items():
        if args.only and name not in args.only:
            continue
        slug = name.replace(" ", "_").replace("/", "-").replace("+", "p").replace("(", "").replace(")", "")
        results[name] = []
        for seed in args.seeds:
            metrics = run_one(args.dataset, recipe, seed, args.out / tag / slug, args.reuse,
                              args.train_data, args.eval_data, args.keep_cams, args.set)
            results[name].append(metrics)
            print(f"  {name} seed {seed}: J={metrics['miou']:.4f} F={metrics['contour_f']:.4f} "
                  f"({metrics['seconds']:.0f} s)", flush=True)

    scored = f" scored on {args.eval_data}" if args.eval_data else ""
    print(f"\n{tag}: CAM pseudo-labels{scored}, seeds {args.seeds} (mean ± std over seeds), "
          f"shared overrides {SCHEDULE[args.dataset] + args.set or 'none'} "
          f"(SCHEDULE's not on {', '.join(sorted(OWN_SCHEDULE)) or 'none'})\n")
    print("| recipe | config | J (%) | F (%) | J&F (%) | threshold | s / run |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        thresholds = [r["best_threshold"] for r in runs if r.get("best_threshold") is not None]
        config_file, overrides = RECIPES[args.dataset][name]
        print(
            f"| {name} | {config_file} {' '.join(overrides)} | {mean_std([r['miou'] for r in runs])} | {mean_std([r['contour_f'] for r in runs])} | "
            f"{mean_std([r['jf'] for r in runs])} | "
            f"{', '.join(f'{t:.2f}' for t in thresholds) or 'argmax'} | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    # Rows of earlier invocations (e.g. other --only sets) are kept; this one's replace theirs.
    summary_path = args.out / f"{tag}_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({name: [{k: r.get(k) for k in ("miou", "contour_f", "jf", "best_threshold", "final_loss", "seconds")}
                           for r in runs] for name, runs in results.items()})
    write_text_atomic(summary_path, json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
