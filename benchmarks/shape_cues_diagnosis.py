"""Why a shape-cues network segments poorly: how many training images' online masks are
complete (SSSS's balancing gives the others no pixel loss), and how much of the held-back
images its prediction calls background against the masks.

    python benchmarks/shape_cues_diagnosis.py \
        --model runs/learning_curve/voc_holdout3/voc_shape_cues/seed0/curve_model.pt \
        [--split runs/learning_curve/voc_holdout3] [--every 4] [--crop 256] [--threads 2]

--split is the folder learning_curve.py wrote train.yaml and heldback.yaml into. The online
masks are made as in training (train mode, so the SCM drops; images resized to --crop, every
--every-th training image, torch seed 0) by weakseg.losses.region.OnlineMasks with the
default online_mask config; an image is complete when its mask has the background and
every class of its label. The prediction is predict's (scale 1, flip).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data import dataset_from_file
from weakseg.losses.region import IGNORE, OnlineMaskConfig, OnlineMasks
from weakseg.models.inference import predict_probs
from weakseg.steps.model_files import load_cam_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=Path("runs/learning_curve/voc_holdout3"))
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_cam_model(args.model, "cpu")
    train, heldback = dataset_from_file(args.split / "train.yaml"), dataset_from_file(args.split / "heldback.yaml")
    masks = OnlineMasks(OnlineMaskConfig())
    torch.manual_seed(0)
    model.train()
    complete = seen = 0
    for i in range(0, len(train), args.every):
        sample = train[i]
        rgb = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float()[None] / 255
        rgb = F.interpolate(rgb, size=(args.crop, args.crop), mode="bilinear", align_corners=False)
        labels = torch.from_numpy(np.array(sample.labels))[None].float()
        with torch.no_grad():
            scores = model(rgb)["cams"]
        mask = masks(scores, {"rgb": rgb, "labels": labels})["image"][0]
        present = {int(k) for k in torch.unique(mask) if k != IGNORE}
        need = {0} | {int(c) + 1 for c in torch.nonzero(labels[0]).flatten()}
        complete += need <= present
        seen += 1
    print(f"training images whose online mask is complete: {complete} of {seen}")
    model.eval()
    background = gt_background = valid_total = 0
    for i in range(len(heldback)):
        sample = heldback[i]
        pred = predict_probs(model, torch.from_numpy(np.array(sample.image)).permute(2, 0, 1), [1.0], True,
                             output=model.segmentation_output).argmax(0)
        valid = sample.mask != IGNORE
        background += int(((pred == 0) & valid).sum())
        gt_background += int(((sample.mask == 0) & valid).sum())
        valid_total += int(valid.sum())
    print(f"held-back pixels predicted background: {100 * background / valid_total:.1f} % "
          f"(background in the masks: {100 * gt_background / valid_total:.1f} %)")


if __name__ == "__main__":
    main()
