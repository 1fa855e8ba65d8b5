"""`model.freeze_stages: N`: the first N stages of a backbone (the stem is stage 1) keep their
weights and batch statistics, as IRN trains its ResNet-50 with conv1 and layer1 frozen
(`jiwoon-ahn/irn`, net/resnet50_cam.py: `self.stage1` is detached and kept in eval mode).

Frozen parameters get `requires_grad = False`, so autograd records nothing through them (the
stage's output is detached: no activations are kept for backward, which saves the memory and
the time of their gradients), and the optimiser leaves them alone. Their BatchNorm layers
stay in eval mode whatever `model.train()` says, so the running statistics keep the values
the weights were trained with.

A backbone opts in by a `stages()` method: a list of stages, each a list of modules.
"""

from __future__ import annotations

import types

from torch import nn

from weakseg.errors import ConfigError


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_stages(backbone: nn.Module, count: int, key: str = "model.freeze_stages") -> list[nn.Module]:
    """Freeze the first `count` stages of `backbone` in place; returns the frozen modules."""
    if count < 0:
        raise ConfigError(f"{key}: must be >= 0, got {count}")
    if count == 0:
        return []
    stages = getattr(backbone, "stages", None)
    if stages is None:
        raise ConfigError(f"{key}: backbone {type(backbone).__name__} does not list its stages; use 0")
    groups = stages()
    if count > len(groups):
        raise ConfigError(f"{key}: {count} stages asked, the backbone has {len(groups)}")
    frozen = [m for group in groups[:count] for m in group]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        for sub in module.modules():
            # Instance-level override: nn.Module.train recurses by calling each child's train.
            sub.train = types.MethodType(_stay_in_eval, sub)
        nn.Module.train(module, False)
    return frozen
