"""Fully connected CRF refiner (Krähenbühl & Koltun, "Efficient Inference in Fully Connected
CRFs with Gaussian Edge Potentials", NeurIPS 2011), through `pydensecrf`.

The energy of a labelling l (Krähenbühl & Koltun eq. 1-3):

    E(l)        = sum_i psi_u(l_i) + sum_{i<j} psi_p(l_i, l_j)
    psi_u(l_i)  = -log p_i(l_i)                                   (unary from the probabilities)
    psi_p       = mu(l_i, l_j) * [ w1 exp(-|pos_i - pos_j|^2 / (2 theta_alpha^2)
                                          - |I_i - I_j|^2 / (2 theta_beta^2))      (bilateral)
                                 + w2 exp(-|pos_i - pos_j|^2 / (2 theta_gamma^2)) ]  (Gaussian)

with the Potts compatibility mu(l, l') = [l != l']. In pydensecrf's names: Gaussian
(sxy = theta_gamma, compat = w2) and bilateral (sxy = theta_alpha, srgb = theta_beta,
compat = w1). Mean-field inference runs `iterations` steps and the CRF's approximate
marginals Q (K, H, W) are returned; they sum to 1 per pixel by construction.

Probabilities are clipped to >= `clip` before the log so a zero score gives a large, finite
unary (the same 1e-5 as pydensecrf.utils.unary_from_softmax, which psa/SEAM use).

Presets (`CRF_PRESETS`), as the public code of each method calls pydensecrf:
    "psa":   psa (Ahn & Kwak, CVPR 2018) and SEAM (Wang et al., CVPR 2020) `crf_inference`:
             Gaussian sxy 3 compat 3; bilateral sxy 80, srgb 13, compat 10; 10 iterations.
    "label": the label CRF of AuxSegNet (Xu et al., ICCV 2021) and WeakTr (Zhu et al., 2023):
             Gaussian sxy 4 compat 3; bilateral sxy 83, srgb 5, compat 3; 10 iterations.
             Those methods build the unary from hard labels (unary_from_labels with a fixed
             confidence); here, like every refiner, it gets probabilities, so only the pairwise
             parameters are shared with them.

Only the K channels given are labels of the CRF (background + the present classes), so the
CRF can never produce an absent class. `pydensecrf2` (PyPI, imported as `pydensecrf`) is an
optional dependency, imported only when a CRF runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weakseg.refine.base import check_inputs

UNARY_CLIP = 1e-5


@dataclass(frozen=True)
class CRFParams:
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int = 10

    def __post_init__(self) -> None:
        for field in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, field) > 0:
                raise ValueError(f"CRFParams.{field} must be > 0, got {getattr(self, field)}")
        for field in ("gaussian_compat", "bilateral_compat"):
            if getattr(self, field) < 0:
                raise ValueError(f"CRFParams.{field} must be >= 0, got {getattr(self, field)}")
        if self.iterations < 1:
            raise ValueError(f"CRFParams.iterations must be >= 1, got {self.iterations}")


CRF_PRESETS: dict[str, CRFParams] = {
    "psa": CRFParams(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10,
                     iterations=10),
    "label": CRFParams(gaussian_sxy=4, gaussian_compat=3, bilateral_sxy=83, bilateral_srgb=5, bilateral_compat=3,
                       iterations=10),
}


def _import_densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:  # the optional dependency is missing, say which package provides it
        raise ImportError(
            "the dense CRF refiner needs pydensecrf: install it with `pip install pydensecrf2` "
            "(a source build; it needs a C++ compiler)"
        ) from err
    return dcrf


def resolve_params(params: str | CRFParams) -> CRFParams:
    if isinstance(params, CRFParams):
        return params
    if params not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset {params!r}; choose one of {sorted(CRF_PRESETS)} or pass CRFParams")
    return CRF_PRESETS[params]


def dense_crf(probs: np.ndarray, image: np.ndarray, params: str | CRFParams = "psa") -> np.ndarray:
    """Probabilities (K, H, W) and uint8 image (H, W, 3) -> CRF marginals (K, H, W) float32."""
    probs = np.asarray(probs)
    image = np.asarray(image)
    check_inputs(probs, image, "dense_crf")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"dense_crf: probabilities must be floating point, got {probs.dtype}")
    p = resolve_params(params)
    k, h, w = probs.shape
    if k == 1:  # one label: nothing to decide, and pydensecrf has nothing to do
        return np.ones((1, h, w), dtype=np.float32)
    dcrf = _import_densecrf()

    # pydensecrf reads the raw buffers: a non-contiguous view (a crop, a transposed array, an
    # RGB<-BGR flip) would be read in the wrong order without any error, hence the copies.
    unary = -np.log(np.clip(probs.astype(np.float32, copy=False), UNARY_CLIP, 1.0))
    unary = np.ascontiguousarray(unary.reshape(k, h * w), dtype=np.float32)
    # ... and pydensecrf also refuses read-only buffers (datasets hand out cached, read-only images).
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])

    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    crf.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=rgb, compat=p.bilateral_compat)
    q = crf.inference(p.iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


class DenseCRF:
    """Refiner: dense CRF over background + present classes, from a preset name or CRFParams."""

    name = "crf"

    def __init__(self, params: str | CRFParams = "psa") -> None:
        self.params = resolve_params(params)

    def __call__(self, probs: np.ndarray, image: np.ndarray) -> np.ndarray:
        return dense_crf(probs, image, self.params)

    def __repr__(self) -> str:
        return f"DenseCRF({self.params})"
