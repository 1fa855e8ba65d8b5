"""CAM inference: test-time scales and flips, then per-class max normalisation.

Conventions (per method):
- plain CAM / binomial: the raw class scores of each scale and flip are upsampled
  bilinearly to H x W, passed through ReLU and summed; each class map is then divided by
  its maximum (+1e-5), so values lie in [0, 1).
- multinomial (a model with a background channel, icam eq. 1): the softmax probabilities
  over the C + 1 channels replace the ReLU scores; the foreground channels are then summed
  and max-normalised the same way.
- `activation="sigmoid"` (binomial view, hfpl eq. 14): sigmoid(s) replaces ReLU(s), so
  negative scores keep their order instead of all becoming 0; for ISL-trained models whose
  best threshold under ReLU sits at 0 (see docs/results.md).
Only the classes asked for (those present in the image) are returned.

The order of ReLU, upsampling and normalisation for `activation="relu"` (`order`) differs
between the official codes; "irn" and "seam" reproduce them:
- "irn" (IRN's net/resnet50_cam.py CAM.forward and step/make_cam.py, jiwoon-ahn/irn a2ece00; the
  plain CAM's reference): ReLU on each pass's score grid, then
  bilinear upsampling to H x W, summed; each class divided by its maximum + 1e-5.
- "seam" (SEAM's and hfpl's infer_cam: the network's raw scores, upsampled): raw scores
  upsampled and summed over the passes; then negatives set to 0 and min-max normalised,
  relu(x - min - 1e-5) / (max - min + 1e-5).
- "upsample_relu" (weakseg before issue 17): upsampling, then ReLU, per pass; max-normalised.
`order="auto"` takes the model's `cam_order` (cam and vit_cam: irn; seam: seam).

Segmentation probabilities (`predict_probs`, for the final network's {"seg"} logits): the
same scales and flips, but the logits are upsampled to H x W *before* the softmax, the way
`segmentation_ce` compares them with the labels in training (and as DeepLab's multi-scale
evaluation does); the probabilities are averaged over every scale and flip, so each pixel
still sums to 1 (bilinear weights are convex).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError


def min_max_norm(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SEAM's and hfpl's max_norm (hfpl tool/visualization.py, and their infer_cam): a ReLU,
    then per map (the last two dims) relu(x - min - eps) / (max - min + eps), so each map spans
    [0, 1) whatever its floor. Used by the "seam" CAM order and by FSL's official gate "r"."""
    pos = F.relu(maps)
    flat = pos.flatten(-2)
    low, high = flat.amin(dim=-1)[..., None, None], flat.amax(dim=-1)[..., None, None]
    return F.relu(pos - low - eps) / (high - low + eps)


def _scale_and_flip(image: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
    """One image (1, 3, H, W) resized bilinearly by `scale` (each side rounded, at least one
    pixel; 1.0 leaves it as is) -> the batch [scaled, scaled mirrored] (or [scaled])."""
    _, _, h, w = image.shape
    scaled = image if scale == 1.0 else F.interpolate(
        image, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False
    )
    return torch.cat([scaled, scaled.flip(-1)]) if flip else scaled


def _merge_flip(maps: torch.Tensor, flip: bool) -> torch.Tensor:
    """Maps of a `_scale_and_flip` batch, already at the input size -> the sum of the original
    and the un-mirrored flipped pass (or the one pass)."""
    return maps[0] + maps[1].flip(-1) if flip else maps[0]


def input_multiple(model: torch.nn.Module) -> int:
    """The side length every input must be a multiple of: a ViT's patch stride (its token grid
    must tile the image), 1 for CNNs (they take any size)."""
    backbone = getattr(model, "backbone", None)
    return int(backbone.output_stride) if getattr(backbone, "is_vit", False) else 1


def _forward_padded(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """model(batch) for any input size: when the model needs a multiple of its stride, the
    batch is edge-padded at the bottom/right, and every map output is upsampled to the padded
    size and cropped back, so it covers exactly the input (a map the caller then resizes)."""
    multiple = input_multiple(model)
    h, w = batch.shape[-2:]
    if multiple == 1 or (h % multiple == 0 and w % multiple == 0):
        return model(batch)
    padded = F.pad(batch, (0, -w % multiple, 0, -h % multiple), mode="replicate")
    outputs = model(padded)
    size = padded.shape[-2:]
    return {
        key: F.interpolate(value, size=size, mode="bilinear", align_corners=False)[..., :h, :w] if value.ndim == 4 else value
        for key, value in outputs.items()
    }


@torch.inference_mode()
def infer_cams_and_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    class_indices: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    background_channel: int | None = None,
    output: str = "cams",
    activation: str = "relu",
    with_probs: bool = True,
    probs_output: str | None = None,
    order: str = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    """`infer_cams` and `infer_class_probs` of one image from the same forward passes.
    `output` is the map the CAMs come from (a method's `inference_output`, e.g. SEAM's
    PCM-revised CAM); `probs_output` the raw class scores the probabilities come from (a
    method's `score_output`; default: `output`)."""
    if activation not in ("relu", "sigmoid"):
        raise ValueError(f"CAM activation must be 'relu' or 'sigmoid', got {activation!r}")
    if order == "auto":
        order = getattr(model, "cam_order", "irn")
    if order not in ("irn", "seam", "upsample_relu"):
        raise ValueError(f"CAM order must be auto, irn, seam or upsample_relu, got {order!r}")
    _, _, h, w = image.shape
    idx = list(class_indices)
    channels = [i + 1 if background_channel == 0 else i for i in idx] if background_channel is not None else idx
    cams = torch.zeros(len(idx), h, w, device=image.device)
    probs = torch.zeros(1 + len(idx), h, w, device=image.device) if with_probs else None
    for scale in scales:
        outputs = _forward_padded(model, _scale_and_flip(image, scale, flip))
        for name in (output, probs_output or output):
            if name not in outputs:
                raise ConfigError(f"CAM output {name!r}: the model has none; its outputs are {sorted(outputs)}")
        scores = outputs[output]
        if idx:
            if background_channel is not None:
                maps = F.interpolate(torch.softmax(scores, dim=1)[:, channels], size=(h, w), mode="bilinear", align_corners=False)
            elif activation == "sigmoid":
                maps = torch.sigmoid(F.interpolate(scores[:, channels], size=(h, w), mode="bilinear", align_corners=False))
            elif order == "irn":
                maps = F.interpolate(F.relu(scores[:, channels]), size=(h, w), mode="bilinear", align_corners=False)
            elif order == "seam":
                maps = F.interpolate(scores[:, channels], size=(h, w), mode="bilinear", align_corners=False)
            else:
                maps = F.relu(F.interpolate(scores[:, channels], size=(h, w), mode="bilinear", align_corners=False))
            cams += _merge_flip(maps, flip)
        if probs is not None:
            probs += _merge_flip(_class_probs(outputs[probs_output or output], idx, background_channel, (h, w)), flip)
    if order == "seam" and activation == "relu" and background_channel is None:
        cams = min_max_norm(cams)
    else:
        cams /= cams.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5
    if probs is not None:
        probs /= len(scales) * (2 if flip else 1)
        probs = probs.cpu().numpy().astype(np.float32)
    return cams.cpu().numpy().astype(np.float32), probs


def _class_probs(scores: torch.Tensor, idx: list[int], background_channel: int | None, size) -> torch.Tensor:
    """[background, present classes] probabilities of a batch of class scores at `size`
    (see infer_class_probs)."""
    scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    if background_channel is not None:
        keep = [background_channel] + [i + 1 if background_channel == 0 else i for i in idx]
        probs = torch.softmax(scores, dim=1)[:, keep]
    else:
        fg = torch.sigmoid(scores[:, idx])
        background = torch.exp(torch.log1p(-fg.clamp(max=1 - 1e-7)).sum(dim=1, keepdim=True))
        probs = torch.cat([background, fg], dim=1)
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


def infer_cams(
    model: torch.nn.Module,
    image: torch.Tensor,
    class_indices: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    background_channel: int | None = None,
    output: str = "cams",
    activation: str = "relu",
    order: str = "auto",
) -> np.ndarray:
    """CAMs of one RGB image (1, 3, H, W) in 0..1 for the given label-vector indices ->
    (len(class_indices), H, W) float32 in [0, 1)."""
    return infer_cams_and_probs(
        model, image, class_indices, scales, flip, background_channel, output, activation, with_probs=False,
        order=order,
    )[0]


def infer_class_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    class_indices: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    background_channel: int | None = None,
    output: str = "cams",
) -> np.ndarray:
    """The CAM network's own per-pixel probabilities of [background, present classes] for one
    RGB image (1, 3, H, W) in 0..1 -> (1 + len(class_indices), H, W) float32, summing to 1.

    Unlike the max-normalised CAMs, these keep the model's calibration, so they can decide
    background without a threshold:
    - with a background channel (multinomial, icam eq. 1): the softmax over all channels,
      restricted to background + the present classes and renormalised (absent classes are
      removed, as icam §4.1 does for pseudo-labels);
    - without (binomial, hfpl eq. 14): b_c = sigmoid(s_c) per present class and background
      prod_c (1 - b_c), the probability that no present class is there; then normalised.
    Logits are upsampled bilinearly before the activation; scales and flips are averaged.
    """
    return infer_cams_and_probs(model, image, class_indices, scales, flip, background_channel, output)[1]


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    flip: bool = True,
    output: str = "seg",
) -> np.ndarray:
    """Class probabilities of one RGB image (3, H, W) in [0, 1] (uint8 0..255 is also taken)
    -> (K, H, W) float32, the softmax averaged over `scales` and, with `flip`, mirrored passes.

    Each scaled and flipped copy of the RGB image goes to the model, which normalises it
    itself (its `input_norm`). It runs on `image.device`; put the model in eval
    mode first (dropout and batch statistics would otherwise change the result).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one RGB image (3, H, W), got shape {tuple(image.shape)}")
    if not scales:
        raise ValueError("predict_probs needs at least one scale")
    _, h, w = image.shape
    rgb = (image.float().div(255.0) if image.dtype == torch.uint8 else image.float()).unsqueeze(0)
    total = None
    for scale in scales:
        logits = _forward_padded(model, _scale_and_flip(rgb, scale, flip))[output]
        probs = torch.softmax(F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False), dim=1)
        merged = _merge_flip(probs, flip)
        total = merged if total is None else total + merged
    total /= len(scales) * (2 if flip else 1)
    return total.cpu().numpy().astype(np.float32)


def classes_by_area(probs: np.ndarray, min_area: float, background: int | None) -> np.ndarray:
    """Channels of a (K, H, W) prediction to keep when classes whose argmax region covers less
    than `min_area` of the image are dropped -> sorted channel indices.

    Why: a final network trained on a few hundred pseudo-labelled images paints about one
    wrong class per image; where those are small blobs, this drops them without any
    image-level label (on VOC they were mostly not: docs/results.md, "Small-class filter",
    +0.2 J at 1 %). The background channel is always kept, and so
    is the largest other class (every image shows at least one object, and without a
    background channel, e.g. NYUv2, something must remain). The pixels of a dropped class
    go to the best kept class of their own scores (the caller's argmax over the kept
    channels). `min_area` 0 keeps every channel.
    """
    if not 0.0 <= min_area < 1.0:
        raise ValueError(f"min_area must be in [0, 1), got {min_area}")
    channels = probs.shape[0]
    if min_area == 0.0:
        return np.arange(channels)
    area = np.bincount(probs.argmax(axis=0).ravel(), minlength=channels) / float(probs[0].size)
    keep = area >= min_area
    objects = [c for c in range(channels) if c != background]
    if objects:
        keep[objects[int(np.argmax(area[objects]))]] = True
    if background is not None:
        keep[background] = True
    return np.flatnonzero(keep)
