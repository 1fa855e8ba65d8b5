"""Training-step time of a CAM network with each add-on loss, as ratios to the baseline.

    python benchmarks/loss_step_time.py [--backbone efficientnet_lite0] [--size 320] [--batch 8]
                                        [--output-stride 8] [--fsl-upsample 1] [--repeats 5]

Target (issue 3): all add-ons together cost <= 10 % of a step (hfpl reports +30 %).
One fixed batch: real-sized RGB inputs with 20 foreground classes of which 1-3 are present
(VOC statistics), depth maps, the same model and optimiser for every row. A step is
forward + every loss term + backward + SGD update; the median of `--repeats` steps after
two warm-up steps is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from weakseg.config import from_mapping
from weakseg.losses.terms import LossConfig, build_terms
from weakseg.models.factory import ModelConfig, build_model

VARIANTS = {
    "baseline (GAP)": {"classification": {"kind": "gap"}},
    "+ISL (binomial)": {"classification": {"kind": "isl_binomial"}},
    "+FSL": {"classification": {"kind": "gap"}, "fsl": {}},
    "+DEAL": {"classification": {"kind": "gap"}, "deal": {}},
    "+ISL +FSL +DEAL": {"classification": {"kind": "isl_binomial"}, "fsl": {}, "deal": {}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--fsl-upsample", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=20, help="foreground classes (VOC 20, NYUv2 40)")
    parser.add_argument("--present-max", type=int, default=3, help="image i has 1 + i %% present-max classes (VOC ~1.6, NYUv2 ~10)")
    args = parser.parse_args()

    torch.manual_seed(0)
    classes = args.classes
    args_bb = {"output_stride": args.output_stride}
    model = build_model(ModelConfig(backbone=args.backbone, backbone_args=args_bb), classes)
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(args.batch, classes)
    for i in range(args.batch):
        labels[i, torch.randperm(classes, generator=g)[: 1 + i % args.present_max]] = 1
    rgb = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    batch = {"rgb": rgb, "image": (rgb - 0.45) / 0.25, "labels": labels,
             "depth": torch.rand(args.batch, 1, args.size, args.size, generator=g) * 5}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    grid = None
    rows = []
    for name, spec in VARIANTS.items():
        spec = dict(spec)
        if "fsl" in spec:
            spec["fsl"] = {"upsample": args.fsl_upsample}
        terms = build_terms(from_mapping(LossConfig, spec, "loss"), torch.Generator().manual_seed(1))
        times = []
        for step in range(args.repeats + 2):
            start = time.perf_counter()
            outputs = model(batch["image"])
            grid = tuple(outputs["cams"].shape[2:])
            total = sum(t.weight_at(99) * t(outputs, batch) for t in terms)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            if step >= 2:
                times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times)))
    base = rows[0][1]
    print(f"{classes} classes, 1-{args.present_max} present per image; "
          f"backbone {args.backbone}, input {args.size}x{args.size}, batch {args.batch}, output stride "
          f"{args.output_stride} (CAM grid {grid[0]}x{grid[1]}), FSL upsample x{args.fsl_upsample}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| loss terms | step time (s) | ratio to baseline |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / base:.3f} |")


if __name__ == "__main__":
    main()
