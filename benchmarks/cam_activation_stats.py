"""How much of each image a trained CAM network's raw CAMs cover, run by run: a check for
CAMs that shrank during training (a network can keep its classification loss low on a few
peaks while its CAMs are negative almost everywhere).

    python benchmarks/cam_activation_stats.py --data runs/bench_cam_holdout24/voc_holdout3/heldback.yaml \
        runs/bench_cam_holdout24/voc_holdout3/SEAM/seed0 runs/bench_cam_holdout24/voc_holdout3/SEAM/seed1

For every RUN (a folder with train_cam/cam_model.pt) and every `--every`-th image of
`--data`, at scale 1 without flip: the largest raw CAM score of the image's classes, the
fraction of pixels of the CAM grid where one of them is positive (ReLU CAMs keep only those),
and the mean pooled score (`logits`) of present and of absent classes. SEAM networks also
give the PCM-revised CAM's largest value and the fraction of the grid above a tenth of it.
Means over the images; the run's held-back J (bench_metrics.json) beside them when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from weakseg.data import dataset_from_file
from weakseg.steps.model_files import CAM_MODEL, load_cam_model


def image_stats(outputs: dict, present: list[int]) -> dict[str, float]:
    """The statistics of one image's network outputs (batch of one)."""
    cams = outputs["cams"][0, present]
    logits = outputs["logits"][0]
    absent = [c for c in range(logits.numel()) if c not in present]
    stats = {
        "raw_max": cams.amax().item(),
        "raw_positive": (cams > 0).any(dim=0).float().mean().item(),
        "logit_present": logits[present].mean().item(),
        "logit_absent": logits[absent].mean().item() if absent else float("nan"),
    }
    if "cams_pcm" in outputs:
        revised = outputs["cams_pcm"][0, present]
        peak = revised.amax()
        stats["pcm_max"] = peak.item()
        stats["pcm_above_tenth"] = (revised > 0.1 * peak.clamp(min=1e-8)).any(dim=0).float().mean().item()
    return stats


def run_stats(run: Path, dataset, every: int) -> dict[str, float]:
    model, _ = load_cam_model(run / CAM_MODEL, torch.device("cpu"))
    model.eval()
    rows = []
    for index in range(0, len(dataset), every):
        sample = dataset[index]
        present = [int(c) for c in np.flatnonzero(sample.labels)]
        if not present:
            continue
        image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            rows.append(image_stats(model(image), present))
    return {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]} | {"images": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding train_cam/cam_model.pt")
    parser.add_argument("--data", type=Path, required=True, help="dataset config of the images to read")
    parser.add_argument("--every", type=int, default=4, help="read every k-th image (default 4)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = dataset_from_file(args.data)
    print("| run | held-back J (%) | raw CAM max | grid positive (%) | pooled score, present | absent "
          "| PCM max | PCM above a tenth (%) | images |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        stats = run_stats(run, dataset, args.every)
        record = run / "bench_metrics.json"
        j = f"{100 * json.loads(record.read_text())['miou']:.1f}" if record.is_file() else "-"
        pcm = (f"{stats['pcm_max']:.3f} | {100 * stats['pcm_above_tenth']:.1f}" if "pcm_max" in stats else "- | -")
        print(f"| {run} | {j} | {stats['raw_max']:.2f} | {100 * stats['raw_positive']:.1f} | "
              f"{stats['logit_present']:.2f} | {stats['logit_absent']:.2f} | {pcm} | {stats['images']} |", flush=True)


if __name__ == "__main__":
    main()
