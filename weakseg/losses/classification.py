"""Image-level classification loss on aggregated CAM scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multilabel_soft_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over classes and images of the binary cross-entropy of sigmoid(logits) against the
    multi-hot labels (PyTorch's MultiLabelSoftMarginLoss, the loss of SEAM, WeakTr, DEAL eq. 9)."""
    return F.multilabel_soft_margin_loss(logits, labels)
