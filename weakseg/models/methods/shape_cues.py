"""Single-stage WSSS with shape cues (Kho, Lee, Lee, Ki & Byun, "Exploiting Shape Cues for
Weakly Supervised Semantic Segmentation", ../shared/papers/shape-cues-single-stage.txt, §3).

No public code exists for this paper. Where it builds on SSSS (Araslanov & Roth, CVPR 2020,
github.com/visinf/1-stage-wseg, models/stage_net.py: the constant background map, nGWP, the
decoder, PAMR, the pseudo-mask rule) and on InfoDrop (Shi et al., ICML 2020,
github.com/bfshi/InfoDrop, the self-information estimate the shape cue module uses), those
codes are the reference for behaviour; docs/fidelity.md ("Shape cues") lists every choice.

Network (`ShapeCuesNet.forward`), DeepLabV3-style (§3.1.1, §4.1.2):

- encoder: a factory backbone (output stride 16 by default) -> ASPP;
- skip: the output of backbone stage `skip_stage` (stride 4 on EfficientNet-Lite and
  tiny_cnn), 1x1 conv -> 48 channels, as SSSS's decoder merges its conv3 features;
- shape cue module (§3.1.2, Fig. 3): the same low-level features, with texture positions
  dropped stochastically in training (eq. 3-4), through a 3x3 conv -> `shape_channels`,
  concatenated into the decoder;
- four-layer decoder: 3x3 conv on [ASPP upsampled, skip, shape cues] -> 3x3 conv -> 3x3 conv
  -> 1x1 conv to K class scores (BN + ReLU after the 3x3 convs, dropout 0.5 and 0.1 before
  the last two, as SSSS);
- S: a constant map of ones as channel 0 (background) in front of the K scores (§3.1.1);
- image-level scores v (eq. 1): nGWP over the softmax M of S.

Outputs: ``cams`` = S (B, K + 1, h, w) on the stride-4 grid (channel 0 background, so the
pipeline treats it as a model with a background channel: CAM inference takes softmax(S) = M),
``logits`` = v (B, K), the foreground classes' image-level scores that eq. 2 reads.

Parameter names: ``backbone.*`` (base LR, 1e-3 in §4.1.2) and ``aspp.*``, ``skip.*``,
``scm.*``, ``decoder.*`` (the other modules, 10x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.models.heads import ASPP, aspp_rates, conv_bn_relu
from weakseg.registry import register

# §4.1.3, "Shape cue module"
SCM_RADIUS = 7  # R1, Manhattan
SCM_SAMPLES = 9
SCM_BANDWIDTH = 1.0  # h
SCM_TEMPERATURE = 0.5  # tau
# Not in the paper: InfoDrop's drop_rate (Info_Dropout.drop_rate): 1.5 h w positions are drawn
# (with replacement) from the dropping distribution, and every position drawn is zeroed.
SCM_DROP_RATE = 1.5


# ----------------------------------------------------------------------------- the equations


def manhattan_offsets(radius: int) -> list[tuple[int, int]]:
    """Every (dy, dx) != (0, 0) with |dy| + |dx| <= radius, in row-major order."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if 0 < abs(dy) + abs(dx) <= radius]


def sample_offsets(radius: int, count: int, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """`count` distinct neighbours drawn uniformly from `manhattan_offsets(radius)` (§4.1.3:
    "randomly sampled 9 patches from the neighborhood within the manhattan radius R1 = 7"),
    one draw shared by the batch, as InfoDrop draws once per forward pass."""
    pool = manhattan_offsets(radius)
    if not 1 <= count <= len(pool):
        raise ValueError(f"shape cue module: samples must be in 1..{len(pool)} for radius {radius}, got {count}")
    pick = torch.randperm(len(pool), generator=generator)[:count].tolist()
    return [pool[i] for i in pick]


def _shift_zero(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """y[..., i, j] = x[..., i + dy, j + dx], zero outside the map (InfoDrop pads with zeros)."""
    h, w = x.shape[-2:]
    r = max(abs(dy), abs(dx))
    padded = F.pad(x, [r] * 4)
    return padded[..., r + dy : r + dy + h, r + dx : r + dx + w]


def patch_distances(features: torch.Tensor, offsets: list[tuple[int, int]], patch: int = 3) -> torch.Tensor:
    """||p - p'||^2 of eq. 3 for every position: p is the `patch` x `patch` window of all
    channels around the position, p' the window around the position shifted by each offset,
    both read from the zero-padded map (InfoDrop's padding). (B, C, H, W) -> (B, len(offsets), H, W)."""
    h, w = features.shape[-2:]
    half = patch // 2
    reach = half + max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(features, [reach] * 4)
    out = []
    for dy, dx in offsets:
        sq = (padded - _shift_zero(padded, dy, dx)).square().sum(dim=1, keepdim=True)
        window = F.avg_pool2d(sq, patch, stride=1) * (patch * patch)  # sum over each patch
        top = reach - half
        out.append(window[..., top : top + h, top : top + w])
    return torch.cat(out, dim=1)


def self_information(distances: torch.Tensor, bandwidth: float = SCM_BANDWIDTH, normalise: bool = True) -> torch.Tensor:
    """Eq. 3: I(p) = -log( 1/|B_p| sum_p' exp(-||p - p'||^2 / 2h^2) / (sqrt(2 pi) h) ).

    (B, S, H, W) squared patch distances -> (B, H, W). With `normalise` (InfoDrop's code:
    "using mean of distance to normalize") the distances are first divided by their mean over
    the whole batch, so h is in units of the typical distance whatever the features' scale."""
    d = distances / distances.mean().clamp_min(1e-12) if normalise else distances
    density = torch.exp(-d / (2.0 * bandwidth**2)).mean(dim=1) / (2.0 * torch.pi) ** 0.5 / bandwidth
    return -torch.log(density.clamp_min(torch.finfo(density.dtype).tiny))


def drop_probabilities(information: torch.Tensor, temperature: float = SCM_TEMPERATURE) -> torch.Tensor:
    """Eq. 4: r(c_p) proportional to exp(-I(p) / tau), normalised over the positions of each
    image (§4.1.3, "followed by normalization"). (B, H, W) -> (B, H, W), each image sums to 1."""
    flat = -information.flatten(1) / temperature
    return torch.softmax(flat, dim=1).view_as(information)


def texture_drop_mask(probabilities: torch.Tensor, channels: int, drop_rate: float = SCM_DROP_RATE,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep-mask (B, channels, H, W) of 0/1: for each image and channel independently,
    round(drop_rate * H * W) positions are drawn with replacement from `probabilities` and each
    position drawn is zeroed (InfoDrop's random_sample). Low-information (texture) positions
    are drawn most."""
    b, h, w = probabilities.shape
    draws = int(round(drop_rate * h * w))
    keep = torch.ones(b * channels, h * w, device=probabilities.device)
    if draws > 0:
        rows = probabilities.flatten(1).repeat_interleave(channels, dim=0) + 1e-12
        picked = torch.multinomial(rows, draws, replacement=True, generator=generator)
        keep.scatter_(1, picked, 0.0)
    return keep.view(b, channels, h, w)


def ngwp(scores: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Eq. 1, normalised global weighted pooling: m = softmax_c(s) over all K + 1 channels,
    v^c = sum_i m_i^c s_i^c / (eps + sum_i m_i^c). (B, K + 1, h, w) -> (B, K + 1).
    eps = 1: SSSS's code (the paper: "a small constant")."""
    m = torch.softmax(scores, dim=1)
    return (m * scores).sum(dim=(2, 3)) / (eps + m.sum(dim=(2, 3)))


def size_penalty(scores: torch.Tensor, power: float = 3.0, lam: float = 0.01) -> torch.Tensor:
    """SSSS's focal mask penalty (not in this paper; `size_penalty: true`): (1 - mbar)^p
    log(lam + mbar) per class, mbar the mean of m over the image, added to v."""
    mbar = torch.softmax(scores, dim=1).mean(dim=(2, 3))
    return (1.0 - mbar).pow(power) * torch.log(lam + mbar)


# ----------------------------------------------------------------------------- the modules


class ShapeCueModule(nn.Module):
    """§3.1.2: drop the low-information (texture) positions of the input features in
    training (eq. 3-4), then a 3x3 conv + BN + ReLU: the shape cues. In eval mode nothing is
    dropped. `method_args.shape_cues: false` leaves the module out (the Table 5 rows without SCM)."""

    def __init__(self, in_channels: int, out_channels: int, radius: int = SCM_RADIUS, samples: int = SCM_SAMPLES,
                 bandwidth: float = SCM_BANDWIDTH, temperature: float = SCM_TEMPERATURE,
                 drop_rate: float = SCM_DROP_RATE, normalise_distances: bool = True):
        super().__init__()
        if temperature <= 0 or bandwidth <= 0 or drop_rate < 0:
            raise ValueError(f"shape cue module: temperature and bandwidth must be > 0 and drop_rate >= 0, got "
                             f"{temperature}, {bandwidth}, {drop_rate}")
        self.radius, self.samples = int(radius), int(samples)
        if not 1 <= self.samples <= len(manhattan_offsets(self.radius)):
            raise ValueError(f"shape cue module: samples must be in 1..{len(manhattan_offsets(self.radius))} "
                             f"for radius {radius}, got {samples}")
        self.bandwidth, self.temperature, self.drop_rate = float(bandwidth), float(temperature), float(drop_rate)
        self.normalise_distances = bool(normalise_distances)
        self.conv = conv_bn_relu(in_channels, out_channels, 3)

    def keep_mask(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = features.detach().float()
            offsets = sample_offsets(self.radius, self.samples)
            info = self_information(patch_distances(x, offsets), self.bandwidth, self.normalise_distances)
            return texture_drop_mask(drop_probabilities(info, self.temperature), x.shape[1], self.drop_rate).to(features.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_rate > 0:
            features = features * self.keep_mask(features)
        return self.conv(features)


class _StageTap:
    """Keeps the output of one backbone module (a forward hook), for the decoder's skip."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        module.register_forward_hook(self._store)

    def _store(self, module, inputs, output):
        self.value = output


@register("method", "shape_cues")
class ShapeCuesNet(NormalisesInput, nn.Module):
    inference_output = "cams"  # S; with background_channel 0, CAM inference reads softmax(S) = M
    score_output = "cams"
    cam_order = "irn"
    segmentation_output = "cams"  # the decoder's prediction is the final result (§3.3)
    single_stage = True  # train_cam trains its segmentation too: predict.network: train_cam may read it

    def __init__(self, num_classes: int, backbone: str = "tiny_cnn", *, shape_cues: bool = True, skip_stage: int = 2,
                 aspp_channels: int = 256, skip_channels: int = 48, shape_channels: int = 48,
                 decoder_channels: int = 256, ngwp_eps: float = 1.0, size_penalty: bool = False,
                 scm: dict | None = None, **backbone_kwargs):
        super().__init__()
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        self.background_channel = 0
        self.num_classes = num_classes
        self.ngwp_eps = float(ngwp_eps)
        self.use_size_penalty = bool(size_penalty)
        stages = self.backbone.stages()
        if not 0 <= skip_stage < len(stages) - 1:
            raise ValueError(f"method_args.skip_stage: {skip_stage} is not a stage of {backbone} before its last "
                             f"(0..{len(stages) - 2})")
        self._tap = _StageTap(stages[skip_stage][-1])
        skip_in = self._probe_skip_channels()
        self.aspp = ASPP(self.backbone.out_channels, aspp_rates(int(self.backbone.output_stride)), aspp_channels)
        self.skip = conv_bn_relu(skip_in, skip_channels, 1)
        self.scm = ShapeCueModule(skip_in, shape_channels, **(scm or {})) if shape_cues else None
        cat = aspp_channels + skip_channels + (shape_channels if shape_cues else 0)
        c = decoder_channels
        self.decoder = nn.Sequential(
            conv_bn_relu(cat, c, 3),
            conv_bn_relu(c, c, 3), nn.Dropout(0.5),
            conv_bn_relu(c, c, 3), nn.Dropout(0.1),
            nn.Conv2d(c, num_classes, 1),
        )

    def _probe_skip_channels(self) -> int:
        mode = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            self.backbone(torch.zeros(1, 3, 64, 64))
        self.backbone.train(mode)
        channels = int(self._tap.value.shape[1])
        self._tap.value = None
        return channels

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.backbone(self.input_norm(images))
        low = self._tap.value
        self._tap.value = None
        x = F.interpolate(self.aspp(x), size=low.shape[-2:], mode="bilinear", align_corners=False)
        parts = [x, self.skip(low)] + ([self.scm(low)] if self.scm is not None else [])
        fg = self.decoder(torch.cat(parts, dim=1))
        scores = torch.cat([torch.ones_like(fg[:, :1]), fg], dim=1)  # constant background (§3.1.1)
        pooled = ngwp(scores, self.ngwp_eps)
        if self.use_size_penalty:
            pooled = pooled + size_penalty(scores)
        return {"cams": scores, "logits": pooled[:, 1:]}
