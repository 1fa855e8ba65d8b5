"""Step `train_affinity` (`weakseg train-affinity CONFIG`): the CAMs -> a trained AffinityNet
(Ahn & Kwak 2018, psa §3.3), whose random walk the refine step runs (refine.method: affinity_rw).

Config:  `train_affinity: TrainAffinityConfig`.
Reads:   RUN/infer_cam/cams/<id>.npz, the dataset's images (never its masks).
Writes:  RUN/train_affinity/affinity_model.pt (weights + the config that rebuilds the net),
         checkpoint.pt (per epoch, for resuming), log.csv, labels_low*_high*_*/ (the cached
         confident-region label maps the pairs come from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from weakseg.errors import ConfigError
from weakseg.refine.affinity import AFFINITY_ALPHA_PRESETS, AffinityNet
from weakseg.steps.base import Step
from weakseg.steps.model_files import AFFINITY_MODEL, save_affinity_model
from weakseg.train import distributed
from weakseg.train.affinity import AffinityTrainConfig, train_affinity

NAME = "train_affinity"


@dataclass
class TrainAffinityConfig:
    # Background powers (alpha_low, alpha_high) of the affinity labels. `preset` names a
    # paper's pair: seam (4, 24), hfpl (1, 24), icam (2, 4) (weakseg.refine.affinity); set
    # `preset: null` and both powers to choose your own. Setting a power while a preset is
    # set is an error: the preset would silently overrule one of them.
    preset: str | None = "seam"
    alpha_low: float | None = None
    alpha_high: float | None = None
    radius: int = 5  # training pairs 0 < |i - j| < radius on the feature grid (psa: 5)
    # The pair set (weakseg.refine.affinity.PAIR_SETS): psa's (default) or all in-grid pairs.
    pairs: Literal["psa", "all"] = "psa"
    backbone: str = "tiny_cnn"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    dim: int = 448
    crf_labels: bool = False  # refine the two confident-region maps with the psa CRF, as psa does
    train: AffinityTrainConfig = field(default_factory=AffinityTrainConfig)

    def __post_init__(self):
        if self.preset is not None:
            if self.preset not in AFFINITY_ALPHA_PRESETS:
                raise ConfigError(f"{NAME}.preset: {self.preset!r} is not allowed; allowed values: "
                                  f"{', '.join(AFFINITY_ALPHA_PRESETS)} or null")
            for key in ("alpha_low", "alpha_high"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{NAME}.{key}: set while preset {self.preset} sets it too; "
                                      f"set {NAME}.preset: null to choose both powers yourself")
        elif self.alpha_low is None or self.alpha_high is None:
            raise ConfigError(f"{NAME}.alpha_low, alpha_high: both are needed when preset is null")
        if self.radius < 2:
            raise ConfigError(f"{NAME}.radius: {self.radius}; at least 2 (pairs 0 < |i - j| < radius)")

    def alphas(self) -> tuple[float, float]:
        if self.preset is not None:
            return tuple(float(a) for a in AFFINITY_ALPHA_PRESETS[self.preset])
        return float(self.alpha_low), float(self.alpha_high)


def run(config: TrainAffinityConfig, dataset, run_dir: Path, progress=None) -> dict:
    if dataset.background_index is None:
        raise ConfigError(f"{NAME}: the dataset has no background class, and the affinity labels are confident "
                          "foreground / confident background regions; refine with crf, pamr or spr instead")
    out = Path(run_dir) / NAME
    crf = None
    if config.crf_labels:
        from weakseg.refine.crf import DenseCRF

        crf = DenseCRF("psa")
    torch.manual_seed(config.train.seed)
    model = AffinityNet(config.backbone, config.dim, **config.backbone_args)
    train_affinity(model, dataset, Path(run_dir) / "infer_cam", config.train, out, radius=config.radius, pairs=config.pairs,
                   alphas=config.alphas(), crf=crf, on_step=progress, on_epoch=getattr(progress, "note", None))
    if distributed.is_main():
        save_affinity_model(Path(run_dir) / AFFINITY_MODEL, model.cpu(), dataset)
    distributed.barrier()
    low, high = config.alphas()
    return {"alpha_low": low, "alpha_high": high, "affinity_model": str(Path(run_dir) / AFFINITY_MODEL)}


STEP = Step(NAME, TrainAffinityConfig, run, "Train the AffinityNet (psa) on pair labels from the CAMs' confident "
            "regions; writes affinity_model.pt for refine.method: affinity_rw.", reads=("infer_cam",))
