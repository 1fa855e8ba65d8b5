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
from weakseg.errors import ConfigError
from weakseg.losses.base import LossTerm
from weakseg.refine.affinity import affinity_loss, pair_affinities, pair_labels, pair_region


class AffinityTerm(LossTerm):
    name = "affinity"

    def __init__(self, radius: int = 5, weight: float = 1.0, pairs: str = "psa"):
        super().__init__(weight, 0, ("features",))
        self.radius, self.pairs = int(radius), pairs

    def value(self, features: torch.Tensor, batch: dict, background_channel: int | None) -> torch.Tensor:
        grid = features.shape[-2:]
        if not pair_region(*grid, self.radius, self.pairs).any():
            raise ConfigError(f"train_affinity: a {grid[0]}x{grid[1]} feature grid has no pairs of the {self.pairs!r} set "
                              f"at radius {self.radius} (psa's needs a width above 2 x (radius - 1)); train on larger "
                              "crops, or set train_affinity.pairs: all")
        labels = batch["mask"].to("cpu", torch.uint8).numpy()
        codes = np.stack([pair_labels(resize_nearest(label, *grid), self.radius, self.pairs) for label in labels])
        # The loss in fp32 whatever the autocast: log(1 - a) of affinities near 1 needs it.
        return affinity_loss(pair_affinities(features.float(), self.radius), torch.from_numpy(codes).to(features.device))
