"""The loss-term interface every add-on shares, so that any term attaches to any method.

A term has a `name`, a `weight` (zero during the first `warmup_epochs` epochs, counted from
0), and `reads`: the model outputs it is applied to (e.g. "cams"; SEAM adds "cams_pcm", a
ViT CAM "cams_coarse"/"cams_fine"). Over several outputs the value is their mean, as DEAL
averages the two branches of WeakTr and SEAM (deal eq. 14-15) and ISL/FSL those of WeakTr
(deal eq. 13). The batch is a dict: "rgb" (B, 3, H, W) in [0, 1] (the network's input; it normalises
it itself), "labels" (B, C) multi-hot over foreground classes, "depth" (B, 1, H, W) metres.
The trainer adds `weight_at(epoch, progress) * term.loss(outputs, batch, background_channel)`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from weakseg.errors import ConfigError


def foreground_channels(scores: torch.Tensor, background_channel: int | None) -> torch.Tensor:
    """Drop the background channel (if the method has one): terms see foreground classes only."""
    if background_channel is None:
        return scores
    keep = [c for c in range(scores.shape[1]) if c != background_channel]
    return scores[:, keep]


class LossTerm(torch.nn.Module):
    name = "term"
    needs_depth = False

    def __init__(self, weight: float, warmup_epochs: int = 0, reads: Sequence[str] | str = ("cams",)):
        super().__init__()
        if warmup_epochs < 0:
            raise ConfigError(f"loss.{self.name}.warmup_epochs: must be >= 0, got {warmup_epochs}")
        self.weight = float(weight)
        self.warmup_epochs = int(warmup_epochs)
        self.reads = (reads,) if isinstance(reads, str) else tuple(reads)
        if not self.reads:
            raise ConfigError(f"loss.{self.name}.reads: name at least one model output")

    def weight_at(self, epoch: int, progress: float = 1.0) -> float:
        """The weight at `epoch` (from 0); `progress` is the fraction of training done, for
        terms whose weight ramps within the schedule (e.g. the region loss's lambda)."""
        return 0.0 if epoch < self.warmup_epochs else self.weight

    def check_reads(self, outputs: dict) -> None:
        missing = [key for key in self.reads if key not in outputs]
        if missing:
            raise ConfigError(f"loss.{self.name}: reads {missing} but the method outputs {sorted(outputs)}")

    def value(self, scores: torch.Tensor, batch: dict, background_channel: int | None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, outputs: dict, batch: dict, background_channel: int | None = None) -> torch.Tensor:
        """The unweighted value, averaged over `reads`."""
        self.check_reads(outputs)
        return torch.stack([self.value(outputs[key], batch, background_channel) for key in self.reads]).mean()

    def forward(self, outputs: dict, batch: dict, background_channel: int | None = None) -> torch.Tensor:
        return self.loss(outputs, batch, background_channel)
