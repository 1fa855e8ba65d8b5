"""AuxSegNet+: one network for multi-label classification, saliency and segmentation with a
cross-task dual affinity (Xu, Ouyang, Bennamoun, Boussaid, Xu, "Auxiliary Tasks Enhanced
Dual-affinity Learning for Weakly Supervised Semantic Segmentation", §III; the first version,
AuxSegNet, ICCV 2021, public code github.com/xulianuwa/AuxSegNet, network/AuxSegNet.py).

The paper text in ../shared/papers has the equation numbers but not their bodies; each
function below says what it computes, and docs/fidelity.md ("AuxSegNet+") lists where that is
our reading rather than the authors' code, which covers only the pairwise, single-scale version.

Network (`AuxSegNet.forward`), features x = backbone(I) on the h x w grid, N = h w:

- classification (§III-A): ``cams`` = 1x1 convolution without bias on x (the fc classifier's
  weights as a convolution, so GAP(cams) equals the fc layer on GAP(x)); ``logits`` = GAP(cams).
- saliency and segmentation branches: two 3x3 convolutions with dilation 6 and 12 (128
  channels, ReLU) -> the affinity module -> 1x1 convolution (1 output for saliency, a logit
  before the sigmoid; C + 1 for segmentation, channel 0 background, logits before the softmax;
  C with ``background: false``, for datasets without a background class).
- affinity module, per task t (eq. 2-13): query/key/value 1x1 convolutions, the pairwise
  affinity A_t = softmax(Q_t^T K_t) over the keys (eq. 2, 4); the unary affinity
  u_t = spatial softmax of a 1-channel 1x1 convolution (eq. 8-9); the features enhanced by both
  contexts, x_t + W_t(A_t V_t + 1 u_t^T V_t) (eq. 3, 5, 12, 13). The two tasks' affinities are
  fused by a small attention module (conv 3x3 -> ReLU -> conv 1x1 -> softmax over the two maps,
  eq. 6-7 for A, eq. 10-11 for u) into the cross-task A and u.
- refined predictions (eq. 14-17): ``<task>_pairwise`` = A P, ``<task>_dual`` = A P + 1 u^T P.
  Both are trained (eq. 19); inference reads ``seg_pairwise`` (§III-C); eq. 18 refines the CAMs
  with A between label rounds (``affinity`` in eval mode).

Ablation switches (Tables IV, V, X): ``saliency_branch: false`` drops the saliency branch;
``affinity``: ``none`` (no affinity module), ``segmentation`` (the segmentation branch's own
pairwise affinity refines its prediction), ``pairwise`` (AuxSegNet: the cross-task pairwise
affinity), ``dual`` (AuxSegNet+: + the unary affinity; the default). ``post_conv: true`` adds
AuxSegNet's third 3x3 convolution (dilation 18) after the affinity module, as in its code.

Parameter names: ``backbone.*`` at the base LR, ``head.*`` (classifier), ``seg.*``, ``sal.*``
and ``fusion.*`` (the new layers; 10x LR in the authors' code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.models.heads import CAMHead
from weakseg.registry import register

AFFINITY_VARIANTS = ("none", "segmentation", "pairwise", "dual")


# ----------------------------------------------------------------------------- the equations


def flatten(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, N, C), N = h w in row-major order: one row per position."""
    return maps.flatten(2).transpose(1, 2)


def unflatten(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, C, h, w) with the spatial size of `like`."""
    return rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], *like.shape[2:])


def pairwise_affinity(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Eq. 2 (saliency) and eq. 4 (segmentation): A = softmax(Q^T K) over the keys.

    query, key (B, C', h, w) -> A (B, N, N); row i is query position i, and sums to 1."""
    return torch.softmax(torch.bmm(flatten(query), flatten(key).transpose(1, 2)), dim=-1)


def pairwise_context(affinity: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The position-dependent context of eq. 3 and 5: position i gathers sum_j A_ij V_j.

    affinity (B, N, N), value (B, C, h, w) -> (B, C, h, w)."""
    return unflatten(torch.bmm(affinity, flatten(value)), value)


def unary_affinity(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 8-9, first part: u = softmax over the h x w positions of a 1-channel map.

    scores (B, 1, h, w) -> u (B, N), each row sums to 1."""
    return torch.softmax(scores.flatten(1), dim=-1)


def unary_context(unary: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Eq. 8-9: the position-independent context sum_j u_j V_j, the same at every position
    (a vector of channel-wise global responses).

    unary (B, N), value (B, C, h, w) -> (B, C, 1, 1)."""
    return torch.einsum("bn,bcn->bc", unary, value.flatten(2))[:, :, None, None]


def fuse_affinities(first: torch.Tensor, second: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """Eq. 6-7 (pairwise: first, second (B, N, N)) and eq. 10-11 (unary: (B, h, w) maps).

    The two task-specific maps, stacked as two channels, go through `attention` (two
    convolutions and a softmax over the two channels), which gives one weight map per task;
    the cross-task map is w_seg * first + w_sal * second, element by element. The weights vary
    with the position, so each element lies between the two tasks' values, but the rows of the
    fused matrix need not sum to exactly 1 (AuxSegNet does not renormalise them either)."""
    stacked = torch.stack((first, second), dim=1)
    weights = attention(stacked)
    return weights[:, 0] * first + weights[:, 1] * second


def enhance_features(features: torch.Tensor, context: torch.Tensor, transform: nn.Module) -> torch.Tensor:
    """Eq. 3, 5 (pairwise context only) and eq. 12-13 (pairwise + unary context):
    features + W(context), W a 1x1 convolution."""
    return features + transform(context)


def refine_pairwise(prediction: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """Eq. 14-15 (predictions) and eq. 18 (CAMs): P~_i = sum_j A_ij P_j.

    prediction (B, K, h, w), affinity (B, N, N) -> (B, K, h, w)."""
    return pairwise_context(affinity, prediction)


def refine_dual(prediction: torch.Tensor, affinity: torch.Tensor, unary: torch.Tensor) -> torch.Tensor:
    """Eq. 16-17, as weakseg reads them (docs/fidelity.md): the prediction refined by both
    cross-task affinities, A P + 1 u^T P, the same sum of the two contexts as eq. 12-13."""
    return refine_pairwise(prediction, affinity) + unary_context(unary, prediction)


class AffinityFusion(nn.Module):
    """The self-attention module of eq. 6-7 and 10-11: conv 3x3 (2 -> 2, no bias) -> ReLU ->
    conv 1x1 (2 -> 2) -> softmax over the two channels (AuxSegNet's `cross_att`)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2, 2, 1)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.conv2(F.relu(self.conv1(stacked))), dim=1)


class TaskBranch(nn.Module):
    """One dense-prediction branch: conv 3x3 d6 -> conv 3x3 d12 (ReLU) -> [affinity module]
    -> [conv 3x3 d18, AuxSegNet's code] -> 1x1 classifier."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, affinity: bool, unary: bool,
                 post_conv: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=6, dilation=6)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=12, dilation=12)
        if affinity:
            self.query = nn.Conv2d(channels, channels, 1)
            self.key = nn.Conv2d(channels, channels, 1)
            self.value = nn.Conv2d(channels, channels, 1)
            self.transform = nn.Conv2d(channels, channels, 1)
        if unary:
            self.unary = nn.Conv2d(channels, 1, 1)
        self.post_conv = nn.Conv2d(channels, channels, 3, padding=18, dilation=18) if post_conv else None
        self.classifier = nn.Conv2d(channels, out_channels, 1, bias=False)
        for conv in (self.conv1, self.conv2, self.classifier) + ((self.post_conv,) if post_conv else ()):
            nn.init.xavier_uniform_(conv.weight)  # as AuxSegNet's code initialises its branch convolutions

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def affinities(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pairwise = pairwise_affinity(self.query(features), self.key(features))
        unary = unary_affinity(self.unary(features)) if hasattr(self, "unary") else None
        return pairwise, unary

    def enhanced(self, features: torch.Tensor, pairwise: torch.Tensor, unary: torch.Tensor | None) -> torch.Tensor:
        value = self.value(features)
        context = pairwise_context(pairwise, value)
        if unary is not None:
            context = context + unary_context(unary, value)
        return enhance_features(features, context, self.transform)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        if self.post_conv is not None:
            features = F.relu(self.post_conv(features))
        return self.classifier(features)


@register("method", "auxsegnet")
class AuxSegNet(NormalisesInput, nn.Module):
    inference_output = "cams"  # what CAM inference reads (the classification branch)
    score_output = "cams"
    cam_order = "irn"

    def __init__(self, num_classes: int, backbone: str = "tiny_cnn", *, saliency_branch: bool = True,
                 affinity: str = "dual", channels: int = 128, post_conv: bool = False, background: bool = True,
                 **backbone_kwargs):
        super().__init__()
        if affinity not in AFFINITY_VARIANTS:
            raise ValueError(f"method_args.affinity: {affinity!r} is not allowed; allowed values: "
                             f"{', '.join(AFFINITY_VARIANTS)}")
        if affinity in ("pairwise", "dual") and not saliency_branch:
            raise ValueError(f"method_args.affinity: {affinity} fuses the saliency and segmentation affinities; "
                             "with saliency_branch: false use affinity: segmentation or none")
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        self.background_channel = None
        self.num_classes = num_classes
        self.affinity = affinity
        self.head = CAMHead(self.backbone.out_channels, num_classes)
        self.seg_background = bool(background)  # channel 0 of seg is the background (false: NYUv2's 40 classes)
        self.seg = TaskBranch(self.backbone.out_channels, num_classes + int(background), channels, affinity != "none",
                              affinity == "dual", post_conv)
        self.sal = (TaskBranch(self.backbone.out_channels, 1, channels, affinity in ("pairwise", "dual"),
                               affinity == "dual", post_conv) if saliency_branch else None)
        if affinity in ("pairwise", "dual"):
            self.fusion = nn.ModuleDict({"pairwise": AffinityFusion()})
            if affinity == "dual":
                self.fusion["unary"] = AffinityFusion()

    @property
    def segmentation_output(self) -> str:
        """The segmentation prediction inference reads: refined by the cross-task pairwise
        affinity (§III-C), or the plain prediction without an affinity module."""
        return "seg" if self.affinity == "none" else "seg_pairwise"

    def prediction_outputs(self, task: str) -> list[str]:
        """The outputs of `task` ("seg" or "sal") that eq. 19 supervises: the prediction and its
        refined versions under this affinity variant."""
        if task == "sal" and self.sal is None:
            return []
        names = [task]
        if self.affinity in ("pairwise", "dual") or (self.affinity == "segmentation" and task == "seg"):
            names.append(f"{task}_pairwise")
        if self.affinity == "dual":
            names.append(f"{task}_dual")
        return names

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.backbone(self.input_norm(images))
        cams = self.head(x)
        out = {"cams": cams, "logits": cams.mean(dim=(2, 3))}
        seg_f = self.seg.features(x)
        sal_f = self.sal.features(x) if self.sal is not None else None
        if self.affinity == "none":
            out["seg"] = self.seg.predict(seg_f)
            if self.sal is not None:
                out["sal"] = self.sal.predict(sal_f)
            return out
        seg_pair, seg_unary = self.seg.affinities(seg_f)
        out["seg"] = seg = self.seg.predict(self.seg.enhanced(seg_f, seg_pair, seg_unary))
        if self.affinity == "segmentation":  # Table V, row 2: the segmentation affinity alone
            out["seg_pairwise"] = refine_pairwise(seg, seg_pair)
            if self.sal is not None:
                out["sal"] = self.sal.predict(sal_f)
            if not self.training:
                out["affinity"] = seg_pair
            return out
        sal_pair, sal_unary = self.sal.affinities(sal_f)
        out["sal"] = sal = self.sal.predict(self.sal.enhanced(sal_f, sal_pair, sal_unary))
        cross = fuse_affinities(seg_pair, sal_pair, self.fusion["pairwise"])  # eq. 6-7
        out["seg_pairwise"] = refine_pairwise(seg, cross)  # eq. 15
        out["sal_pairwise"] = refine_pairwise(sal, cross)  # eq. 14
        if self.affinity == "dual":
            shape = (seg_unary.shape[0],) + tuple(seg_f.shape[2:])
            unary = fuse_affinities(seg_unary.view(shape), sal_unary.view(shape), self.fusion["unary"]).flatten(1)
            out["seg_dual"] = refine_dual(seg, cross, unary)  # eq. 17
            out["sal_dual"] = refine_dual(sal, cross, unary)  # eq. 16
        if not self.training:
            out["affinity"] = cross  # eq. 18 refines the CAMs with it between label rounds
        return out
