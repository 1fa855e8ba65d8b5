"""How much each loss term pushes the CAMs: on a trained CAM checkpoint and real images, the
value of every term, its weight, and the norm of its weighted gradient w.r.t. the CAM scores,
as a share of the classification term's. A loss that cannot move the CAMs cannot change them.

    python benchmarks/loss_gradient_share.py --checkpoint runs/bench_cam/voc/pFSL/seed0/cam_model.pt \
        --config configs/voc_cam_hfpl.yaml [--batches 8] [--batch-size 8]

The batches are the config's training augmentation (seed 0) of its dataset, the dropout and
drop-connect masks of train mode seeded too (0); the terms are the
config's `loss:` section, evaluated at full weight (after any warm-up). Gradients are taken
w.r.t. the CAM tensor, so they compare the terms where they act, before the backbone.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from weakseg.data import build_dataset
from weakseg.losses.terms import build_terms
from weakseg.steps import pipeline
from weakseg.steps.model_files import load_cam_model
from weakseg.train.trainer import AugmentedDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="training YAML whose loss terms are measured")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    config, base_dir = pipeline.load_config(args.config)
    model, _ = load_cam_model(args.checkpoint, torch.device("cpu"))
    model.train()  # BatchNorm as in training; nothing is updated
    # Train mode also draws the backbone's dropout / drop-connect masks from torch's global
    # generator; seed it so that the table is the same on every run.
    torch.manual_seed(0)
    dataset = build_dataset(config.dataset, base_dir)
    terms = build_terms(config.train_cam.loss, torch.Generator().manual_seed(0))
    need_depth = any(getattr(t, "needs_depth", False) for t in terms)
    data = AugmentedDataset(dataset, config.train_cam.train.augment, 0, need_depth)
    values: dict[str, list[float]] = {t.name: [] for t in terms}
    norms: dict[str, list[float]] = {t.name: [] for t in terms}
    for b in range(args.batches):
        items = [data[(0, (b * args.batch_size + i) % len(data))] for i in range(args.batch_size)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        outputs = model(batch["rgb"])  # RGB in 0..1; the network normalises it
        for term in terms:
            value = term(outputs, batch, model.background_channel)
            (grad,) = torch.autograd.grad(term.weight * value, outputs["cams"], retain_graph=True)
            values[term.name].append(value.item())
            norms[term.name].append(grad.norm().item())
    reference = statistics.mean(norms[terms[0].name])
    print(f"{args.checkpoint} with the loss of {args.config.name}; {args.batches} batches of {args.batch_size}\n")
    print("| term | weight | value (mean) | weighted gradient norm w.r.t. CAMs | share of the classification term's |")
    print("|---|---|---|---|---|")
    for term in terms:
        norm = statistics.mean(norms[term.name])
        print(f"| {term.name} | {term.weight:g} | {statistics.mean(values[term.name]):.4g} | {norm:.3g} | "
              f"{norm / reference:.3f} |")


if __name__ == "__main__":
    main()
