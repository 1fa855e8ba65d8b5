"""Held-back learning curve of a CAM recipe: train on the images not held back and score the
CAMs of the held-back ones after every k-th epoch, until held-back J has not risen for
`--patience` evaluations (or `--max-epochs` is reached).

    python benchmarks/learning_curve.py --dataset voc --holdout 3 [--config voc_cam_gap.yaml]
        [--max-epochs 60] [--every 1] [--patience 3] [--threads 2] [--out runs/learning_curve]
        [--png docs/img/learning_curve_voc_cam.png]

The split is cam_real_data.py's (`--holdout K`: every K-th image of the sorted ids held back).
Training is the trainer `weakseg train-cam` runs, on the kept images, with `train_cam.train.epochs=MAX` (the
poly learning rate decays over MAX epochs: the curve answers "how long until held-back J
stops rising under this schedule"; a recipe set to the flattening epoch then decays over its
own, shorter schedule and is re-measured on its own). The held-back CAMs are the infer_cam
step's (`infer_cam.scales` from the config unless `--scales`), scored with its background
sweep (VOC) or argmax (NYUv2). Writes OUT/<dataset>_holdoutK/<config>/curve.json after every
evaluation and the PNG at the end; an interrupted curve resumes from the trainer's checkpoint,
and a finished one is only printed and drawn again (e.g. with another `--png`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

from weakseg.data import build_dataset, dataset_from_file
from weakseg.data.io import write_text_atomic
from weakseg.models.factory import build_model
from weakseg.report.curves import Series, line_chart_png
from weakseg.steps import infer_cam, pipeline
from weakseg.steps.model_files import save_cam_model
from weakseg.train.trainer import train

from cam_real_data import ROOT, SCHEDULE, dataset_override, write_holdout_split

DEFAULT_CONFIG = {"voc": "voc_cam_gap.yaml", "nyu": "nyu_cam_gap.yaml"}


class Converged(Exception):
    """Raised from the epoch callback to end training once held-back J has stopped rising."""


def stopped_rising(js: list[float], patience: int, min_delta: float = 0.0) -> bool:
    """True when none of the last `patience` values beats the best before them by more than
    `min_delta`."""
    if len(js) <= patience:
        return False
    best_before = max(js[:-patience])
    return all(j <= best_before + min_delta for j in js[-patience:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DEFAULT_CONFIG), required=True)
    parser.add_argument("--config", default=None, help="CAM config in configs/ (default: the GAP baseline)")
    parser.add_argument("--holdout", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=1, help="evaluate after every k-th epoch")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--min-delta", type=float, default=0.0, help="a rise smaller than this does not count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="held-back inference scales")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/learning_curve"))
    parser.add_argument("--png", type=Path, default=None, help="where to draw the curve (default: beside curve.json)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train_cam.train.batch_size=16")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    config_file = args.config or DEFAULT_CONFIG[args.dataset]
    split = args.out / f"{args.dataset}_holdout{args.holdout}"
    train_yaml, heldback_yaml = write_holdout_split(args.dataset, args.holdout, split)
    folder = split / Path(config_file).stem / f"seed{args.seed}"
    overrides = (SCHEDULE[args.dataset] + [dataset_override(train_yaml)] + list(args.overrides)
                 + [f"train_cam.train.epochs={args.max_epochs}", f"train_cam.train.seed={args.seed}"])
    config, base_dir = pipeline.load_config(ROOT / "configs" / config_file, overrides)
    dataset = build_dataset(config.dataset, base_dir)
    heldback = dataset_from_file(heldback_yaml)
    infer_config = config.infer_cam or infer_cam.InferCamConfig()
    if args.scales:
        infer_config = replace(infer_config, scales=list(args.scales))
    cam = config.train_cam
    model = build_model(cam.model, len(dataset.foreground_ids))

    curve_path = folder / "curve.json"
    header = {"config": config_file, "overrides": overrides, "dataset": args.dataset, "holdout": args.holdout,
              "train_images": len(dataset), "heldback_images": len(heldback), "scales": infer_config.scales,
              "flip": infer_config.flip, "max_epochs": args.max_epochs, "every": args.every,
              "patience": args.patience, "min_delta": args.min_delta}
    rows: list[dict] = []
    checkpoint = folder / "train_cam" / "checkpoint.pt"
    recorded = json.loads(curve_path.read_text()) if curve_path.is_file() else None
    if recorded is not None and recorded["converged"]:  # finished: only print and draw it again
        rows = recorded["rows"]
    elif recorded is not None and checkpoint.is_file():  # resume: keep the rows the checkpoint has passed
        import torch

        done = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
        rows = [r for r in recorded["rows"] if r["epoch"] <= done]
        print(f"resuming after epoch {done} ({len(rows)} evaluations kept)", flush=True)
    epoch = rows[-1]["epoch"] if rows else 0
    started = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    print(f"{config_file}: {len(dataset)} training images, {len(heldback)} held back; up to {args.max_epochs} "
          f"epochs, scored every {args.every}, patience {args.patience}", flush=True)

    def write_curve(converged: bool) -> None:
        best = max(rows, key=lambda r: r["miou"]) if rows else None
        record = dict(header, rows=rows, converged=converged, best_epoch=best and best["epoch"],
                      best_miou=best and best["miou"])
        write_text_atomic(curve_path, json.dumps(record, indent=2) + "\n")

    def on_epoch(line: str) -> None:
        nonlocal epoch
        epoch += 1
        if epoch % args.every and epoch != args.max_epochs:
            return
        model_file = folder / "curve_model.pt"
        save_cam_model(model_file, model, cam.model, dataset)
        scored = folder / "heldback_cams"
        metrics = infer_cam.infer_cams(model_file, heldback, scored, infer_config)
        shutil.rmtree(scored)
        loss = float(re.search(r"loss ([^ ]+)", line).group(1))  # the trainer's epoch line (its mean loss)
        rows.append({"epoch": epoch, "train_loss": loss, "miou": metrics["miou"], "contour_f": metrics["contour_f"],
                     "jf": metrics["jf"], "best_threshold": metrics.get("best_threshold"),
                     "seconds": time.perf_counter() - started})
        print(f"epoch {epoch:3d}  held-back J {100 * metrics['miou']:5.1f}  F {100 * metrics['contour_f']:5.1f}  "
              f"({line.strip()})", flush=True)
        converged = stopped_rising([r["miou"] for r in rows], args.patience, args.min_delta)
        write_curve(converged)
        if converged:
            raise Converged

    converged = False
    try:
        if rows and stopped_rising([r["miou"] for r in rows], args.patience, args.min_delta):
            raise Converged
        train(model, dataset, cam.loss, cam.train, folder / "train_cam", background_channel=model.background_channel,
              on_epoch=on_epoch)
    except Converged:
        converged = True
    write_curve(converged)
    best = max(rows, key=lambda r: r["miou"])
    print(f"\n{'converged' if converged else 'NOT converged (max epochs reached)'}: best held-back J "
          f"{100 * best['miou']:.1f} at epoch {best['epoch']}; curve in {curve_path}\n")
    print("| epoch | train loss | held-back J (%) | held-back F (%) | threshold | minutes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        threshold = f"{r['best_threshold']:.2f}" if r.get("best_threshold") is not None else "argmax"
        print(f"| {r['epoch']} | {r['train_loss']:.3f} | {100 * r['miou']:.1f} | {100 * r['contour_f']:.1f} | {threshold} | "
              f"{r['seconds'] / 60:.1f} |")
    png = args.png or folder / "curve.png"
    epochs = [r["epoch"] for r in rows]
    line_chart_png(png, [Series("held-back J", epochs, [100 * r["miou"] for r in rows]),
                         Series("held-back F", epochs, [100 * r["contour_f"] for r in rows])],
                   f"{config_file} on {args.dataset} (holdout {args.holdout}: {len(dataset)} train, "
                   f"{len(heldback)} held back), seed {args.seed}", "epoch", "%")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
