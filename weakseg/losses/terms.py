"""The loss section of a CAM training run: which terms it has, in one table.

`train_cam.loss:` in a config:

    classification: {kind: gap | gmp | isl_binomial | isl_multinomial, ...}  # losses/classification.py, isl.py
    fsl:  {weight: 1.0, gate: r, mu: 2.5, sigma: 5.0, ...}   # optional; losses/fsl.py
    deal: {weight: 0.04, warmup_epochs: 3, ...}              # optional; losses/deal.py
    seam: {er: 1.0, ecr: 1.0, min_pool: 1.0}                 # SEAM's own terms; losses/seam.py
    online_mask: {refiner: spr, pixel: {...}, region: {...}} # single-stage pseudo-mask terms; losses/region.py
    reads: [cams]

Each section's config dataclass and term sit beside the term's formula, in the module named
above; that module registers the section's builder (`@register("loss_term", NAME)`), and
`build_terms` builds the sections that are set, in this table's order. Adding a term: its
module (formula, config, term, builder), a field here, and the module in
`registry.KINDS["loss_term"]` (docs/architecture.md).

`reads` names the model outputs every term is applied to (averaged over them); a term's own
`reads` overrides it. E.g. SEAM: classification reads [cams, cams_scaled] (both siamese
branches), DEAL [cams, cams_pcm] (deal eq. 15); WeakTr: [cams_coarse, cams_fine] (deal eq. 13-14).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from weakseg.losses.base import LossTerm
from weakseg.losses.classification import ClassificationConfig
from weakseg.losses.deal import DEALConfig
from weakseg.losses.fsl import FSLConfig
from weakseg.losses.region import OnlineMaskConfig
from weakseg.losses.seam import SEAMLossConfig
from weakseg.registry import lookup


@dataclass
class LossConfig:
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    fsl: FSLConfig | None = None
    deal: DEALConfig | None = None
    seam: SEAMLossConfig | None = None
    online_mask: OnlineMaskConfig | None = None
    reads: list[str] = field(default_factory=lambda: ["cams"])


def build_terms(config: LossConfig, generator: torch.Generator | None = None) -> list[LossTerm]:
    """The terms of every section that is set, in LossConfig's order; each built by the
    builder its module registered under the section's name."""
    terms: list[LossTerm] = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if section.name == "reads" or value is None:
            continue
        terms += lookup("loss_term", section.name, f"loss.{section.name}")(value, config.reads, generator)
    return terms
