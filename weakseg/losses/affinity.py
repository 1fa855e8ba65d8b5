"""The AffinityNet's loss as a loss term of the one trainer (psa eq. 4-7).

The formulas live in `weakseg.refine.affinity` beside the random walk that uses the trained
network: `pair_labels` (psa eq. 4-5: bg-pos, fg-pos, neg, ignored pairs within `radius` on
the feature grid), `pair_affinities` (psa eq. 3) and `affinity_loss` (psa eq. 6-7 with the
public code's L_bg+/4 + L_fg+/4 + L_neg/2). This term reads the network's feature map
("features") and the batch's confident-region label map ("mask", (B, H, W), 255 ignored),
sampled onto the feature grid (nearest, at pixel centres).
"""

from __future__ import annotations

import numpy as np
import torch

from weakseg.data.transforms import resize_nearest
from weakseg.losses.base import LossTerm
from weakseg.refine.affinity import affinity_loss, pair_affinities, pair_labels


class AffinityTerm(LossTerm):
    name = "affinity"

    def __init__(self, radius: int = 5, weight: float = 1.0):
        super().__init__(weight, 0, ("features",))
        self.radius = int(radius)

    def value(self, features: torch.Tensor, batch: dict, background_channel: int | None) -> torch.Tensor:
        grid = features.shape[-2:]
        labels = batch["mask"].to("cpu", torch.uint8).numpy()
        codes = np.stack([pair_labels(resize_nearest(label, *grid), self.radius) for label in labels])
        # The loss in fp32 whatever the autocast: log(1 - a) of affinities near 1 needs it.
        return affinity_loss(pair_affinities(features.float(), self.radius), torch.from_numpy(codes).to(features.device))
