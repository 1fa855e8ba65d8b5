"""A compact CAM training loop on in-memory tensors (demo and tests).

Deterministic for a given seed on a given machine: seeded generators for shuffling and
augmentation, deterministic kernels, no data-loader workers. The general trainer (config
-> model + loss terms, checkpoints, logging) grows from this in the CAM-learning issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from weakseg.errors import NonFiniteLoss
from weakseg.losses.classification import multilabel_soft_margin


@dataclass
class CAMTrainConfig:
    epochs: int = 25
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9  # lr = base_lr * (1 - step / total) ** power
    seed: int = 0


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    return base_lr * (1.0 - step / max(1, total)) ** power


def train_cam_in_memory(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: CAMTrainConfig,
    on_epoch: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Train with GAP logits + multi-label soft margin; random horizontal flips. Returns the
    mean loss of each epoch."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = images.shape[0]
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total = config.epochs * steps_per_epoch
    history = []
    step = 0
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            batch = images[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(config.lr, step, total, config.poly_power)
            loss = multilabel_soft_margin(model(batch)["logits"], labels[idx])
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss (term cls: {loss.item()}) at epoch {epoch + 1}, step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(idx)
            step += 1
            if on_step is not None:
                on_step(step, total)
        history.append(running / n)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    model.eval()
    return history
