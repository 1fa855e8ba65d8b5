"""Training-step time of a CAM network with each add-on loss, as ratios to the baseline.

    python benchmarks/loss_step_time.py [--backbone efficientnet_lite0] [--size 320] [--batch 8]
                                        [--output-stride 8] [--fsl-upsample 1] [--repeats 5]

Target (issue 3): all add-ons together cost <= 10 % of a step (hfpl reports +30 %).
One fixed batch: real-sized RGB inputs with 20 foreground classes of which 1-3 are present
(VOC statistics), depth maps, the same model and optimiser for every row. A step is
forward + every loss term + backward + SGD update; the median of `--repeats` steps after
two warm-up steps is reported, variants interleaved. Because whole steps vary by several per
cent from one to the next, the cost of the terms is also measured alone: forward + backward
of the loss terms on fixed network outputs, which is the work they add to a step (the
backbone's backward pass is the same for every loss), reported as a share of the baseline step.
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
    batch = {"rgb": rgb, "labels": labels,
             "depth": torch.rand(args.batch, 1, args.size, args.size, generator=g) * 5}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    variants = {}
    for name, spec in VARIANTS.items():
        spec = dict(spec)
        if "fsl" in spec:
            spec["fsl"] = {"upsample": args.fsl_upsample}
        variants[name] = build_terms(from_mapping(LossConfig, spec, "loss"), torch.Generator().manual_seed(1))

    # Whole steps, variants interleaved round-robin so that drift of the machine hits all alike.
    step_times: dict[str, list[float]] = {name: [] for name in variants}
    grid = None
    for step in range(args.repeats + 2):
        for name, terms in variants.items():
            start = time.perf_counter()
            outputs = model(batch["rgb"])  # RGB in; the network normalises it
            grid = tuple(outputs["cams"].shape[2:])
            total = sum(t.weight_at(99) * t(outputs, batch) for t in terms)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            if step >= 2:
                step_times[name].append(time.perf_counter() - start)

    # The add-on terms alone: forward + backward of the loss terms on fixed network outputs
    # (a leaf tensor), i.e. exactly the work a term adds to a step; far less noisy than the
    # difference of two whole steps.
    with torch.no_grad():
        fixed = model(batch["rgb"])
    term_times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(3 * args.repeats + 2):
        for name, terms in variants.items():
            leaves = {k: v.detach().clone().requires_grad_() for k, v in fixed.items()}
            start = time.perf_counter()
            total = sum(t.weight_at(99) * t(leaves, batch) for t in terms)
            total.backward()
            if step >= 2:
                term_times[name].append(time.perf_counter() - start)

    base = statistics.median(step_times["baseline (GAP)"])
    base_terms = statistics.median(term_times["baseline (GAP)"])
    print(f"{classes} classes, 1-{args.present_max} present per image; "
          f"backbone {args.backbone}, input {args.size}x{args.size}, batch {args.batch}, output stride "
          f"{args.output_stride} (CAM grid {grid[0]}x{grid[1]}), FSL upsample x{args.fsl_upsample}, "
          f"{torch.get_num_threads()} threads; whole steps: median of {args.repeats}, loss terms alone: "
          f"median of {3 * args.repeats}\n")
    print("| loss terms | step time (s) | step ratio | loss terms alone (ms) | added cost, share of baseline step |")
    print("|---|---|---|---|---|")
    for name in variants:
        step = statistics.median(step_times[name])
        terms = statistics.median(term_times[name])
        print(f"| {name} | {step:.3f} | {step / base:.3f} | {1000 * terms:.1f} | {100 * (terms - base_terms) / base:+.1f} % |")

if __name__ == "__main__":
    main()
