"""Which part of an AuxSegNet+ label update helps or hurts: round s + 1's labels rebuilt with
one change at a time, scored against the masks, plus the statistics of the learned affinity.

    python benchmarks/auxsegnet_round_breakdown.py runs/synthetic_auxsegnet [--stage 0] [--every 2]

RUN is a finished (or at least stage-s-trained) `weakseg run` folder of an auxsegnet config.
Round s + 1 differs from round s in two ways (weakseg/steps/label_rounds.py): its CAMs come
from stage s's network refined by the cross-task pairwise affinity (eq. 18), and its saliency
labels are CRF((round-s label + refined prediction) / 2) (eq. 1). Each row changes one of them
(or skips the refinement, or the CRF), with the run's own thresholds and scales, on every
--every-th training image; J and F count 255 as a miss, as results.json's label_rounds do.

The affinity rows read stage s's cross-task pairwise affinity at scale 1: a row's effective
support (exp of its entropy, in grid positions, out of the grid size) and the share of its
mass on positions whose mask class is the query position's own, beside what a uniform row
would give (the class's share of the grid). A nearly uniform affinity smears each CAM over the
image when eq. 18 multiplies by it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data import build_dataset
from weakseg.labels import IGNORE
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.models.inference import input_multiple
from weakseg.refine.saliency import saliency_cam_seeds, update_saliency
from weakseg.steps.label_rounds import _read_saliency, auxsegnet_maps
from weakseg.steps.model_files import CAM_MODEL, load_cam_model
from weakseg.steps.pipeline import load_config
from weakseg.data.io import read_label_map


def score(labels, masks, dataset) -> tuple[float, float]:
    evaluator = SegEvaluator.for_dataset(dataset)
    for label, mask in zip(labels, masks):
        evaluator.add(label, mask)
    summary = evaluator.summary()
    return 100 * summary["miou"], 100 * summary["contour_f"]


@torch.inference_mode()
def own_segmentation(model, rgb: torch.Tensor) -> np.ndarray:
    """The network's segmentation argmax at scale 1 (channel k = label id k)."""
    _, h, w = rgb.shape
    multiple = input_multiple(model)
    x = F.pad(rgb[None], (0, -w % multiple, 0, -h % multiple), mode="replicate") if multiple > 1 else rgb[None]
    logits = model(x)[model.segmentation_output]
    logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
    return logits[0].argmax(0).cpu().numpy().astype(np.uint8)


@torch.inference_mode()
def affinity_stats(model, rgb: torch.Tensor, mask: np.ndarray) -> tuple[float, int, float, float] | None:
    """(mean effective support of a row, grid size, mean same-class mass, mean uniform-row
    same-class mass) over the valid grid positions of one image, or None without an affinity."""
    multiple = input_multiple(model)
    _, h, w = rgb.shape
    x = F.pad(rgb[None], (0, -w % multiple, 0, -h % multiple), mode="replicate") if multiple > 1 else rgb[None]
    out = model(x)
    if "affinity" not in out:
        return None
    affinity = out["affinity"][0].float()  # (N, N), rows sum to 1
    gh, gw = out["cams"].shape[-2:]
    # The mask on the feature grid: nearest-neighbour, the padding void.
    padded = np.pad(mask, ((0, x.shape[-2] - h), (0, x.shape[-1] - w)), constant_values=IGNORE)
    grid = F.interpolate(torch.from_numpy(padded)[None, None].float(), size=(gh, gw), mode="nearest")
    grid = grid.flatten().long()
    valid = grid != IGNORE
    if not valid.any():
        return None
    entropy = -(affinity * affinity.clamp_min(1e-12).log()).sum(1)
    same = (grid[:, None] == grid[None, :]).float()
    same_mass = (affinity * same).sum(1)
    uniform = same.mean(1)
    return (float(entropy.exp()[valid].mean()), int(grid.numel()), float(same_mass[valid].mean()),
            float(uniform[valid].mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config, base_dir = load_config(args.run / "config.yaml")
    rounds_config = config.label_rounds
    dataset = build_dataset(config.dataset, base_dir)
    s = args.stage
    rounds_dir = args.run / "label_rounds"
    stage_model, _ = load_cam_model(rounds_dir / f"stage_{s}" / "model.pt", "cpu")
    previous_model, _ = (load_cam_model(args.run / CAM_MODEL, "cpu") if s == 0 else
                         load_cam_model(rounds_dir / f"stage_{s - 1}" / "model.pt", "cpu"))
    stage_model.eval()
    previous_model.eval()
    rows = {k: [] for k in ("round_s", "unrefined", "refined", "sal_crf", "sal_nocrf", "own", "round_next")}
    masks, stats = [], []
    seeds = dict(cam_threshold=rounds_config.cam_threshold, saliency_threshold=rounds_config.saliency_threshold,
                 background_id=dataset.background_index)
    next_dir = rounds_dir / f"round_{s + 1}"
    for i in range(0, len(dataset), args.every):
        sample = dataset[i]
        if sample.mask is None:
            raise SystemExit(f"{args.run}: image {sample.id} has no mask; nothing to score against")
        masks.append(sample.mask)
        present = [int(j) for j in np.flatnonzero(sample.labels > 0.5)]
        class_ids = np.asarray([dataset.foreground_ids[j] for j in present], dtype=np.int64)
        rgb = torch.from_numpy(np.require(sample.image, requirements=["C", "W"])).permute(2, 0, 1).float().div(255.0)
        saliency_s = _read_saliency(rounds_dir / f"round_{s}" / "saliency" / f"{sample.id}.png")
        rows["round_s"].append(read_label_map(rounds_dir / f"round_{s}" / "labels" / f"{sample.id}.png"))
        previous_cams, _ = auxsegnet_maps(previous_model, rgb, present, rounds_config.cam_scales,
                                          refine=s > 0 and rounds_config.refine_cams,
                                          normalisation=rounds_config.cam_normalisation)
        unrefined, _ = auxsegnet_maps(stage_model, rgb, present, rounds_config.cam_scales, refine=False,
                                      normalisation=rounds_config.cam_normalisation)
        refined, predicted = auxsegnet_maps(stage_model, rgb, present, rounds_config.cam_scales, refine=True,
                                            normalisation=rounds_config.cam_normalisation)
        rows["unrefined"].append(saliency_cam_seeds(unrefined, class_ids, saliency_s, **seeds))
        rows["refined"].append(saliency_cam_seeds(refined, class_ids, saliency_s, **seeds))
        if predicted is not None:
            rows["sal_crf"].append(saliency_cam_seeds(previous_cams, class_ids,
                                                      update_saliency(saliency_s, predicted, sample.image), **seeds))
            rows["sal_nocrf"].append(saliency_cam_seeds(previous_cams, class_ids,
                                                        update_saliency(saliency_s, predicted, None), **seeds))
        rows["own"].append(own_segmentation(stage_model, rgb))
        if (next_dir / "metrics.json").is_file():
            rows["round_next"].append(read_label_map(next_dir / "labels" / f"{sample.id}.png"))
        found = affinity_stats(stage_model, rgb, sample.mask)
        if found is not None:
            stats.append(found)
    names = {
        "round_s": f"round {s} as written (its CAMs + its saliency)",
        "unrefined": f"stage-{s} CAMs, not refined + round-{s} saliency",
        "refined": f"stage-{s} CAMs refined by the cross-task affinity (eq. 18) + round-{s} saliency",
        "sal_crf": f"round-{s} CAMs + updated saliency (eq. 1, with CRF)",
        "sal_nocrf": f"round-{s} CAMs + updated saliency (eq. 1, no CRF)",
        "own": f"the stage-{s} network's own segmentation ({stage_model.segmentation_output}, argmax)",
        "round_next": f"round {s + 1} as written (both changes)",
    }
    print(f"{args.run}, stage {s}, {len(masks)} images (--every {args.every})\n")
    print(f"| round-{s + 1} labels from | J (%) | F (%) |")
    print("|---|---|---|")
    for key, labels in rows.items():
        if len(labels) == len(masks):
            j, f = score(labels, masks, dataset)
            print(f"| {names[key]} | {j:.1f} | {f:.1f} |")
    if stats:
        support, size, same, uniform = (np.mean([row[k] for row in stats]) for k in range(4))
        print(f"\ncross-task pairwise affinity of stage {s} (scale 1): a row spreads over {support:.0f} of "
              f"{size:.0f} grid positions (exp of its entropy); {100 * same:.0f} % of its mass on the query's "
              f"own mask class, against {100 * uniform:.0f} % for a uniform row")


if __name__ == "__main__":
    main()
