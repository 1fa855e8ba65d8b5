"""The whole `weakseg run` on real data: wall time of every step and J, F, J&F, boundary IoU
of every stage (cam, refined, pseudo_labels, final), as a markdown table.

    python benchmarks/pipeline_real_data.py [--config configs/voc_icam.yaml] [--out runs/bench_pipeline] [key=value ...]
    python benchmarks/pipeline_real_data.py --config configs/voc_cpu.yaml --out runs/voc_cpu --heldback

`--heldback` (configs with an eval_dataset, e.g. the held-back part of a `holdout` split):
the steps that do not train (infer_cam, refine, pseudo_labels) also run on the eval_dataset
with the run's trained networks and its config, into RUN/heldback/<step>, so every stage
(cam, refined, pseudo_labels, final) is scored on images no network trained on. The CAM
row there is given twice: at the background threshold swept on the held-back masks (what
infer_cam reports on any dataset with masks) and at the threshold swept on the training
images, the one a run can choose without the held-back masks.

Target (issue 4): the VOC run with EfficientNet-Lite0 and its short schedule finishes in
<= 30 min on 2 CPU cores. Steps that already finished with the same config are reused (as
`weakseg run` does); pass `--fresh` to start over and time every step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from weakseg.data import build_dataset
from weakseg.metrics.cam_sweep import cam_to_label
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.steps import infer_cam, pipeline, pseudo_labels, refine
from weakseg.steps.model_files import CAM_MODEL

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "voc_icam.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_pipeline"))
    parser.add_argument("--fresh", action="store_true", help="delete OUT first so every step runs")
    parser.add_argument("--heldback", action="store_true",
                        help="also score cam, refined and pseudo_labels on the config's eval_dataset")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--to", default=None, help="stop after this step (as `weakseg run --to`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    started = time.perf_counter()
    summary = pipeline.run(args.config, args.overrides + [f"out={args.out}"], to_step=args.to)
    wall = time.perf_counter() - started

    print(f"\n{args.config.name} {' '.join(args.overrides)}: evaluated on {summary['evaluated_on']}, "
          f"total {wall / 60:.1f} min (this invocation)\n")
    print("| stage | J (%) | F (%) | J&F (%) | boundary IoU (%) |")
    print("|---|---|---|---|---|")
    for stage, values in summary["stages"].items():
        cells = [f"{100 * values[k]:.1f}" if values.get(k) is not None else "n/a"
                 for k in ("miou", "contour_f", "jf", "boundary_iou")]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    labels = summary.get("pseudo_labels", {"coverage": float("nan"), "labelled_miou": float("nan")})
    print(f"\npseudo-labels: coverage {labels['coverage']:.3f}, J on labelled pixels {labels['labelled_miou']:.3f}")
    print("\n| step | seconds |\n|---|---|")
    for step, seconds in summary["seconds"].items():
        print(f"| {step} | {seconds:.0f} |")
    print(f"| total (sum of steps) | {sum(summary['seconds'].values()):.0f} |")
    if args.heldback:
        heldback_stages(args.config, args.overrides + [f"out={args.out}"], summary)


def heldback_stages(config_path: Path, overrides: list[str], summary: dict) -> dict:
    """cam, refined and pseudo_labels of the eval_dataset, made by the run's trained networks
    with the run's step configs (the steps' own functions), next to the final network's
    scores there; written to RUN/heldback/stages.json and printed."""
    config, base_dir = pipeline.load_config(config_path, overrides)
    if config.eval_dataset is None:
        raise SystemExit(f"{config_path}: --heldback needs an eval_dataset (e.g. the `holdout` part heldback)")
    run_dir = Path(config.out).absolute()
    out = run_dir / "heldback"
    heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    started = time.perf_counter()
    cams = infer_cam.infer_cams(run_dir / CAM_MODEL, heldback, out / "infer_cam", config.infer_cam)
    stages = {"cam (threshold swept on these masks)": cams}
    train_threshold = summary.get("cam_threshold")
    if train_threshold is not None and heldback.background_index is not None:
        evaluator = SegEvaluator(heldback.class_names, heldback.background_index)
        for i in range(len(heldback)):
            sample = heldback[i]
            with np.load(out / "infer_cam" / "cams" / f"{sample.id}.npz") as data:
                label = cam_to_label(data["cams"].astype(np.float32), data["class_ids"], train_threshold,
                                     heldback.background_index)
            evaluator.add(label, sample.mask)
        stages[f"cam (training images' threshold {train_threshold:.2f})"] = evaluator.headline()
    if config.refine is not None:
        refiner = refine.build_refiner(config.refine, heldback, run_dir)
        stages["refined"] = refine.refine_cams(heldback, out / "infer_cam", out / "refine", config.refine, refiner)
        if config.pseudo_labels is not None:
            stages["pseudo_labels"] = pseudo_labels.make_pseudo_labels(heldback, out / "refine", out / "pseudo_labels",
                                                                       config.pseudo_labels)
    if "final" in summary["stages"]:
        stages["final"] = summary["stages"]["final"]
    seconds = time.perf_counter() - started
    keys = ("miou", "contour_f", "jf", "boundary_iou")
    record = {"heldback_images": len(heldback), "seconds": seconds,
              "stages": {name: {k: values.get(k) for k in keys} for name, values in stages.items()},
              "on_training_images": {name: {k: values.get(k) for k in keys} for name, values in summary["stages"].items()}}
    (out / "stages.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nheld-back images ({len(heldback)}; {seconds:.0f} s for the held-back inference):\n")
    print("| stage | J (%) | F (%) | J&F (%) | boundary IoU (%) |")
    print("|---|---|---|---|---|")
    for name, values in record["stages"].items():
        cells = [f"{100 * values[k]:.1f}" if values.get(k) is not None else "n/a" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nwritten: {out / 'stages.json'}")
    return record


if __name__ == "__main__":
    main()
