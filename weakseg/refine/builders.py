"""The built-in refiners, registered by name (`refine.method`). Each builder takes the
`refine:` config section and returns an object following `weakseg.refine.base.Refiner`
(`probs, image -> probs`), or None for no refinement. The random walk of a trained
AffinityNet (`affinity_rw`) needs a trained network and is built by the refine step.
"""

from __future__ import annotations

from weakseg.registry import register


@register("refiner", "none")
def no_refinement(config):
    return None


@register("refiner", "crf")
def dense_crf(config):
    from weakseg.refine.crf import DenseCRF

    return DenseCRF(config.crf_preset)


@register("refiner", "pamr")
def pamr(config):
    from weakseg.refine.pamr import PAMR

    return PAMR(iterations=config.pamr_iterations)


@register("refiner", "spr")
def spr(config):
    from weakseg.refine.pamr import SPR

    return SPR(alpha=config.spr_alpha, iterations=config.pamr_iterations)
