"""Saliency for AuxSegNet+ (auxsegnet-plus §III-A, §IV-A): where the first saliency labels
come from, how the labels are updated between rounds (eq. 1), and the seed formula that
combines saliency with the CAMs into segmentation pseudo-labels.

Sources (`SaliencyConfig.source`), each giving an (H, W) float32 map in [0, 1] per image:

- ``spectral_residual``: OpenCV's spectral-residual static saliency (Hou & Zhang 2007,
  `cv2.saliency` in opencv-contrib-python-headless). Needs no model: runs offline out of the box.
- ``fine_grained``: OpenCV's fine-grained static saliency (Montabone & Soto 2010).
- ``depth``: nearness from the depth map, for RGB-D data: 1 at the nearest valid depth of the
  image, 0 at the farthest and where depth is missing (0 or not finite).
- ``folder``: PNGs the user brings, `<folder>/<id>.png` (the paper uses PoolNet, MINet or DSS
  outputs), grey levels 0..255 read as 0..1, of the image's size.
- ``model``: a local salient-object model, TorchScript (`.pt`, `.ts`, loaded with
  `torch.jit.load`, no pickled code) or ONNX (`.onnx`, needs the `onnxruntime` package). It takes
  (1, 3, H, W) float32 (``model_input``: ``imagenet`` mean/std normalised, or ``unit``: RGB in
  [0, 1]) and returns (1, 1, h, w) (``model_output``: ``logits`` get a sigmoid,
  ``probabilities`` are used as they are), resized to the image.

Every source's map is min-max normalised per image (the paper thresholds "the normalized
off-the-shelf saliency maps").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from weakseg.errors import ConfigError, DataError
from weakseg.labels import IGNORE

SOURCES = ("spectral_residual", "fine_grained", "depth", "folder", "model")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class SaliencyConfig:
    source: Literal["spectral_residual", "fine_grained", "depth", "folder", "model"] = "spectral_residual"
    folder: str | None = None  # source folder: <folder>/<id>.png
    model: str | None = None  # source model: a TorchScript (.pt, .ts) or ONNX (.onnx) file
    model_input: Literal["imagenet", "unit"] = "imagenet"
    model_output: Literal["logits", "probabilities"] = "logits"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"saliency.source: {self.source!r} is not allowed; allowed values: {', '.join(SOURCES)}")
        if self.source == "folder" and not self.folder:
            raise ConfigError("saliency.folder: source folder needs the folder of <id>.png saliency maps")
        if self.source == "model" and not self.model:
            raise ConfigError("saliency.model: source model needs the path of a TorchScript or ONNX file")


def normalise_saliency(saliency: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1]; a constant map becomes 0 everywhere."""
    saliency = np.asarray(saliency, dtype=np.float32)
    low, high = float(saliency.min()), float(saliency.max())
    if high - low <= 1e-12:
        return np.zeros_like(saliency)
    return (saliency - low) / (high - low)


def depth_nearness(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth (metres; 0 or non-finite = missing) -> nearness in [0, 1]: 1 at the nearest
    valid pixel, 0 at the farthest and at missing pixels."""
    depth = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape, dtype=np.float32)
    if not valid.any():
        return out
    near, far = float(depth[valid].min()), float(depth[valid].max())
    if far - near <= 1e-12:
        out[valid] = 1.0
        return out
    out[valid] = (far - depth[valid]) / (far - near)
    return out


def opencv_saliency(image: np.ndarray, kind: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> OpenCV static saliency (H, W), not yet normalised."""
    try:
        import cv2

        saliency_module = cv2.saliency
    except (ImportError, AttributeError) as err:
        raise ImportError("saliency.source: spectral_residual and fine_grained need cv2.saliency: "
                          "pip install opencv-contrib-python-headless") from err
    detector = (saliency_module.StaticSaliencySpectralResidual_create() if kind == "spectral_residual"
                else saliency_module.StaticSaliencyFineGrained_create())
    ok, saliency = detector.computeSaliency(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV takes BGR
    if not ok:
        raise RuntimeError(f"cv2.saliency {kind} failed on an image of shape {image.shape}")
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape != image.shape[:2]:
        import cv2

        saliency = cv2.resize(saliency, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return saliency


class SaliencySource:
    """sample -> its normalised (H, W) saliency map in [0, 1], by `config.source`."""

    def __init__(self, config: SaliencyConfig):
        self.config = config
        self._model = None
        if config.source == "folder" and not Path(config.folder).is_dir():
            raise DataError(config.folder, "saliency.folder: not a folder")
        if config.source == "model":
            self._model = _load_saliency_model(Path(config.model))

    def __call__(self, sample) -> np.ndarray:
        source = self.config.source
        if source in ("spectral_residual", "fine_grained"):
            raw = opencv_saliency(sample.image, source)
        elif source == "depth":
            if sample.depth is None:
                raise DataError(sample.id, "saliency.source: depth, but this sample has no depth map")
            return depth_nearness(sample.depth)  # already in [0, 1], with missing depth at 0
        elif source == "folder":
            raw = _read_saliency_png(Path(self.config.folder) / f"{sample.id}.png", sample.image.shape[:2])
        else:
            raw = self._model(sample.image, self.config)
        return normalise_saliency(raw)


def _read_saliency_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DataError(path, "saliency map missing (saliency.source: folder needs one <id>.png per image)")
    try:
        with Image.open(path) as image:
            saliency = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except OSError as err:
        raise DataError(path, f"not a readable image: {err}") from err
    if saliency.shape != tuple(shape):
        raise DataError(path, f"saliency map is {saliency.shape[1]}x{saliency.shape[0]} but the image is "
                              f"{shape[1]}x{shape[0]}")
    return saliency


class _TorchScriptSaliency:
    def __init__(self, path: Path):
        import torch

        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise DataError(path, f"not a TorchScript file: {err}") from err

    def __call__(self, image: np.ndarray, config: SaliencyConfig) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(_model_input(image, config.model_input))
        with torch.no_grad():
            out = self.module(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = F.interpolate(out.float().reshape(1, 1, *out.shape[-2:]), size=image.shape[:2], mode="bilinear",
                            align_corners=False)[0, 0]
        return (torch.sigmoid(out) if config.model_output == "logits" else out).numpy()


class _OnnxSaliency:
    def __init__(self, path: Path):
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError(f"saliency.model: {path} is ONNX; install onnxruntime to run it "
                              "(or export the model to TorchScript)") from err
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own InvalidProtobuf / Fail types, not RuntimeError
            raise DataError(path, f"not a loadable ONNX model: {err}") from err

    def __call__(self, image: np.ndarray, config: SaliencyConfig) -> np.ndarray:
        import cv2

        name = self.session.get_inputs()[0].name
        out = np.asarray(self.session.run(None, {name: _model_input(image, config.model_input)})[0], dtype=np.float32)
        out = cv2.resize(out.reshape(out.shape[-2:]), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return 1.0 / (1.0 + np.exp(-out)) if config.model_output == "logits" else out


def _model_input(image: np.ndarray, kind: str) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    if kind == "imagenet":
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _load_saliency_model(path: Path):
    if not path.is_file():
        raise DataError(path, "saliency.model: no such file")
    if path.suffix.lower() == ".onnx":
        return _OnnxSaliency(path)
    return _TorchScriptSaliency(path)


# ----------------------------------------------------------------------------- eq. 1: label update

# AuxSegNet's saliency CRF (its tool/imutils.py): two labels, one mean-field iteration, a
# Gaussian kernel (sxy 3, compat 3) and a bilateral kernel (sxy 60, srgb 5, compat 5); the
# unary of each label is -log(p) / (tau * sigmoid(p)), tau = 1.05.
SALIENCY_CRF = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 60, "bilateral_srgb": 5,
                "bilateral_compat": 5, "iterations": 1, "tau": 1.05}


def saliency_unary(saliency: np.ndarray, tau: float = SALIENCY_CRF["tau"], eps: float = 1e-8) -> np.ndarray:
    """(H, W) foreground probability -> (2, H, W) unary energies [background, foreground]:
    -log(q) / (tau * sigmoid(q)) with q = 1 - p and q = p."""
    p = np.asarray(saliency, dtype=np.float64)

    def energy(q):
        return -np.log(q + eps) / (tau * (1.0 / (1.0 + np.exp(-q))))

    return np.stack([energy(1.0 - p), energy(p)]).astype(np.float32)


def saliency_crf(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """Dense CRF of a saliency map (H, W) in [0, 1] on its uint8 RGB image -> the foreground
    marginal (H, W) float32."""
    from weakseg.refine.crf import _import_densecrf

    dcrf = _import_densecrf()
    h, w = saliency.shape
    p = SALIENCY_CRF
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(saliency_unary(saliency).reshape(2, h * w)))
    crf.addPairwiseGaussian(sxy=p["gaussian_sxy"], compat=p["gaussian_compat"])
    crf.addPairwiseBilateral(sxy=p["bilateral_sxy"], srgb=p["bilateral_srgb"],
                             rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]),
                             compat=p["bilateral_compat"])
    q = np.asarray(crf.inference(p["iterations"]), dtype=np.float32).reshape(2, h, w)
    return q[1]


def update_saliency(previous: np.ndarray, refined_prediction: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """Eq. 1: the next round's saliency label S^t = CRF((S^(t-1) + S~^(t-1)) / 2), the mean of
    the previous label and the refined saliency prediction (a probability), through the dense
    CRF when `image` is given (None: the mean alone, the CRF switched off)."""
    mean = (np.asarray(previous, dtype=np.float32) + np.asarray(refined_prediction, dtype=np.float32)) / 2
    return mean if image is None else saliency_crf(image, mean)


# ----------------------------------------------------------------------------- the seed formula


def saliency_cam_seeds(cams: np.ndarray, class_ids: np.ndarray, saliency: np.ndarray,
                       cam_threshold: float = 0.2, saliency_threshold: float = 0.06,
                       background_id: int | None = 0) -> np.ndarray:
    """AuxSegNet+'s pseudo-label (§III-A, §IV-A thresholds 0.2 and 0.06; the rule of
    AuxSegNet's `fusion_cam`): cams (K, H, W) normalised to [0, 1] for the image's K classes,
    class_ids (K,) their label ids, saliency (H, W) in [0, 1] -> (H, W) uint8:

    - object (label id of the strongest CAM) where max CAM > cam_threshold and saliency > saliency_threshold;
    - background (`background_id`) where max CAM <= cam_threshold and saliency <= saliency_threshold;
    - 255 (not trained on) where the two disagree.

    A dataset without a background class (`background_id` None, e.g. NYUv2's 40 classes) has
    nothing for the non-salient pixels to be: there the object rule alone holds (the strongest
    class where max CAM > cam_threshold), and every other pixel is 255.
    """
    saliency = np.asarray(saliency)
    salient = saliency > saliency_threshold
    if cams.shape[0] == 0:  # no class: what is salient is unexplained, the rest is background
        return np.where(salient | (background_id is None), IGNORE, background_id or 0).astype(np.uint8)
    strongest = cams.max(axis=0)
    activated = strongest > cam_threshold
    objects = np.asarray(class_ids)[cams.argmax(axis=0)]
    if background_id is None:
        return np.where(activated, objects, IGNORE).astype(np.uint8)
    label = np.where(activated & salient, objects, background_id)
    label[activated != salient] = IGNORE
    return label.astype(np.uint8)
