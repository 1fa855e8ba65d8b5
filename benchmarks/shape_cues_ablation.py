"""Shape cues' ablations (shape-cues Tables 5, 6 and 8) as `weakseg run`s of one config, one
per row and seed, printed as mean ± std over the seeds.

    python benchmarks/shape_cues_ablation.py [--config configs/synthetic_shape_cues.yaml]
        [--table 5|6|8] [--seeds 0 1 2] [--out runs/shape_cues_ablation] [--threads 1] [overrides]

Table 5: baseline (no SCM, colour-only refinement: SPR at alpha 1 = PAMR), +SPR (alpha 0.8),
+SCM, both. Table 6: alpha in 0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 (with SCM). Table 8: the
classification loss alone, + the pixel loss, + the region loss, all three.
Each row is `weakseg run` of the config with the row's overrides and `train_cam.train.seed=S`;
its run folder is OUT/<config>/table<T>/<row>/seed<S>, and a finished run is only read again
(the steps' own bookkeeping). Columns: the pseudo-labels (the
online rule on the trained network's SPR-refined scores, training images) and the final
prediction (eval_dataset when the config has one), J, F and boundary IoU (the dataset's band),
and the train_cam wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from weakseg.steps import pipeline

ROOT = Path(__file__).resolve().parents[1]

NO_SCM = "train_cam.model.method_args.shape_cues=false"
# Colour-only refinement everywhere the row refines: inside training (the online masks) and in
# the refine step that makes the pseudo-label column from the trained network's scores.
COLOUR_ONLY = ["train_cam.loss.online_mask.alpha=1.0", "refine.spr_alpha=1.0"]
TABLES = {
    "5": {
        "#1 baseline (colour-only refinement)": [NO_SCM, *COLOUR_ONLY],
        "#2 + SPR": [NO_SCM],
        "#3 + SCM": COLOUR_ONLY,
        "#4 + SCM + SPR": [],
    },
    "6": {f"alpha {a}": [f"train_cam.loss.online_mask.alpha={a}", f"refine.spr_alpha={a}"]
          for a in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)},
    "8": {
        "L_cls": ["train_cam.loss.online_mask=null"],
        "L_cls + L_pixel": ["train_cam.loss.online_mask.region=null"],
        "L_cls + L_region": ["train_cam.loss.online_mask.pixel=null"],
        "L_cls + L_pixel + L_region": [],
    },
}


def run_row(config: Path, out: Path, overrides: list[str], seed: int) -> dict:
    folder = out / f"seed{seed}"
    pipeline.run(config, [f"out={folder}", f"train_cam.train.seed={seed}", *overrides])
    results = json.loads((folder / "results.json").read_text())
    stages = results["stages"]
    return {"pseudo": stages["pseudo_labels"], "final": stages["final"],
            "train_seconds": results["seconds"].get("train_cam")}


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic_shape_cues.yaml")
    parser.add_argument("--table", choices=sorted(TABLES), default="5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "shape_cues_ablation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows (their names as printed)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every row")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = {name: ov for name, ov in TABLES[args.table].items() if not args.only or name in args.only}
    table = []
    for name, overrides in rows.items():
        slug = name.split(" (")[0].replace(" ", "_").replace("#", "").replace("+", "p")
        runs = [run_row(args.config, args.out / args.config.stem / f"table{args.table}" / slug,
                        overrides + list(args.overrides), seed) for seed in args.seeds]
        table.append((name, overrides, runs))
    print(f"\n{args.config.name}, table {args.table}, seeds {args.seeds} (mean ± std, %)\n")
    print("| row | overrides | pseudo-mask J | pseudo-mask F | pseudo-mask bIoU | final J | final F | final bIoU "
          "| train_cam s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, overrides, runs in table:
        cells = [mean_std([r[part][key] for r in runs]) for part in ("pseudo", "final")
                 for key in ("miou", "contour_f", "boundary_iou")]
        seconds = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        timing = f"{statistics.mean(seconds):.0f}" if seconds else ""
        print(f"| {name} | {' '.join(overrides) or '(the config)'} | " + " | ".join(cells) + f" | {timing} |")


if __name__ == "__main__":
    main()
