"""ViT CAM network with a coarse and a fine CAM branch, in the style of WeakTr.

References
----------
* WeakTr: L. Zhu et al., "WeakTr: Exploring Plain Vision Transformer for Weakly-supervised
  Semantic Segmentation", arXiv:2304.01184 (2023), §3.2 "Direct CAM generation with adaptive
  attention fusion" and its public code (hustvl/WeakTr, `models.py`, `AAF.py`, `engine.py`).
  This file is an independent implementation; no code was copied.
* DEAL: Schmidt, Belagiannis, Nalpantidis, "Depth Edge Alignment Loss" §IV-B/C: ISL and FSL
  (eq. 13) and DEAL (eq. 14) are each applied to the fine and to the coarse CAM of WeakTr and
  the two values averaged; trained for 60 epochs, w_edge = 0.04, w_edge = 0 for 20 epochs.
* hfpl (Jonnarth et al., WACV 2024) §5.1: for MCTformer, a DeiT-S whose patch-token CAMs are
  14x14, FSL is computed on CAMs upsampled x4 to 56x56 (`fsl.upsample: 4` here).

What the network computes (notation of the WeakTr paper, B images, C classes, K blocks,
H heads, an h x w patch grid with n = h*w patches and p prefix tokens, N = p + n tokens)
-----------------------------------------------------------------------------------------
1. A plain timm ViT (``backbone.model``) runs over the tokens; :func:`vit_forward_with_attention`
   replays its blocks with their own weights and also returns every block's attention
   probabilities ``A_k = softmax(q k^T / sqrt(d))``, (B, H, N, N) per block, row-stochastic.
2. Coarse CAM (WeakTr eq. for ``F_coarse``): the final patch tokens, as an (D, h, w) map, go
   through a 3x3 convolution (WeakTr's head) -> ``cams_coarse`` (B, C, h, w) raw class scores;
   global average pooling gives the coarse logits.
3. Adaptive attention fusion (WeakTr "AAF"): the K*H attention maps, detached, are stacked as
   channels ``A_i``, i = k*H + head (block-major); each is pooled to a scalar (global max by
   default, as WeakTr's VOC/COCO recipe ``--pool-type max``; average pooling of a
   row-stochastic map is the constant 1/N, so it carries no information), and a squeeze-and-
   excitation MLP without biases, FC(K*H -> K*H/r) - ReLU - FC(K*H/r -> K*H) - sigmoid with
   r = 8 (``--reduction 8``), turns the pooled vector into one weight ``w_i in (0, 1)`` per
   map and image. The fused map is ``A_f = (1 / KH) sum_i w_i A_i`` (WeakTr averages the
   weighted maps over heads and blocks; it is not renormalised, so its rows sum to
   mean_i w_i, not 1).
4. Fine CAM: the patch-to-patch block ``PA = A_f[p:, p:]`` (n x n) propagates the coarse CAM,
   ``cams_fine[c] = PA @ vec(ReLU(cams_coarse[c]))`` (B, C, h, w); GAP gives the fine logits.
   As in WeakTr, the fine branch sees the attention maps and the coarse CAM *detached*
   (``detach=True``): losses on ``cams_fine`` train only the fusion MLP. ``detach=False`` lets
   them reach the backbone and the CAM head too (not WeakTr; an option for experiments).

WeakTr's loss is L = L_cls(tokens) + L_MLSM(GAP coarse) + L_MLSM(GAP fine) with the
multi-label soft margin loss (DEAL eq. 9 with Agg = GAP).

Class tokens (``class_tokens=True``, off by default)
----------------------------------------------------
WeakTr (like MCTformer) replaces the single class token by C class tokens, one per class;
their final embeddings averaged over channels give class-token logits, trained with their own
MLSM term, and the class-to-patch cross attention ``CA = A_f[:C, C:]`` (B, C, h, w) weights
the coarse CAM before propagation: ``cams_fine = PA @ (CA * ReLU(cams_coarse))``
(WeakTr's ``attention_type='fused'``). With ``class_tokens=False`` (default) the timm prefix
tokens stay as they are and ``cams_fine = PA @ ReLU(cams_coarse)``: WeakTr's
``attention_type='patchcam'`` variant. Why off by default: the class tokens only become
class-specific through their own classification term, and in this package one ``reads`` list
is shared by the classification, FSL and DEAL terms, which cannot take the 1x1 token map. With
``class_tokens=True`` the output ``token_scores`` (B, C, 1, 1) holds the token logits so that a
classification term reading it (GAP of a 1x1 map = the logit) gives WeakTr's L_cls; that needs
a loss config where the classification term reads more outputs than FSL/DEAL.
The class tokens and their position embeddings are parameters of this module (not under
``backbone.``), initialised as copies of the checkpoint's class token and its position
embedding (WeakTr's ``--extra-token`` fine-tuning does the same), so a timm checkpoint still
loads into ``backbone.model`` with timm's key names.

Outputs and loss configuration
------------------------------
``forward(images)`` returns (all class scores, foreground classes only, no background
channel):

* ``cams_coarse`` (B, C, h, w): the coarse CAM, raw scores.
* ``cams_fine`` (B, C, h, w): the fine CAM, >= 0 (ReLU'd coarse CAM times non-negative
  weights).
* ``cams``: the same tensor as ``cams_coarse``, the trainable raw class scores, as ``cams``
  is for every method of the package (so a config with the default ``reads: [cams]`` trains
  the ViT like a plain CAM network). WeakTr's CAM at inference is the fine CAM
  (``--patch-attn-refine``: the fused patch attention applied to the CAM), so
  :attr:`inference_output` is ``"cams_fine"``; the model's per-pixel probabilities come from
  the raw scores (:attr:`score_output` ``"cams"``).
* ``logits_coarse``, ``logits_fine`` (B, C): GAP of the two CAMs.
* ``logits`` (B, C): the class-token logits with class tokens (WeakTr's main prediction,
  used for its mAP), otherwise ``logits_coarse`` (the classifier of the plain CAM).
* with ``class_tokens=True`` also ``logits_tokens`` (B, C) and ``token_scores`` (B, C, 1, 1).

The WeakTr CAM loss of the DEAL recipe is the existing ``ClassificationTerm`` with
``reads: [cams_coarse, cams_fine]``: it computes the MLSM of the GAP of each CAM and averages
them, i.e. (L_coarse + L_fine) / 2 (WeakTr sums them; a factor 1/2, which AdamW is insensitive
to, and the class-token term is absent unless configured as above). The same ``reads`` attach
ISL/FSL (DEAL eq. 13) and DEAL (eq. 14) to both branches, averaged::

    model: {method: vit_cam, backbone: deit_small, backbone_args: {weights: deit_small.pth}}
    loss:
      classification: {kind: gap}          # isl_binomial for ISL (DEAL eq. 13)
      fsl: {weight: 0.1, upsample: 4}      # optional: FSL x0.1 (DEAL §IV-B), 14x14 -> 56x56 (hfpl §5.1)
      deal: {weight: 0.04, warmup_epochs: 20, cam_norm: none}   # optional: DEAL eq. 14, §IV-C
      reads: [cams_coarse, cams_fine]

Deviations from WeakTr
----------------------
* No ImageNet weights offline: the backbone is randomly initialised unless
  ``backbone_args.weights`` names a local timm DeiT checkpoint.
* Class tokens off by default (see above); with them on, their loss needs its own term.
* The backbone is timm's own ViT (``dynamic_img_size``: position embeddings resampled to any
  input divisible by the stride; WeakTr resamples bicubically itself); output stride 8 is
  also possible (overlapping 16x16 patches, see ``backbones.TimmBackbone``), at 4x tokens and
  16x attention memory.
* The coarse CAM head reads the final block's tokens without the final LayerNorm, as WeakTr
  does (its ``forward_features`` skips ``self.norm``); ``final_norm=True`` applies it.
* The fusion MLP's channel order is block-major (WeakTr's is head-major); this only matters for
  loading WeakTr's own checkpoints, which this module does not attempt.
* The hidden width of the fusion MLP is max(1, int(K*H / r)) (WeakTr: int(K*H / r), which is 0
  for tiny test models).
* WeakTr's online-retraining decoder (its second stage) is not part of this CAM method; the
  pipeline's DeepLab step plays that role.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.errors import ConfigError
from weakseg.models.backbones import build_backbone
from weakseg.models.backbones.norm import NormalisesInput
from weakseg.registry import register


# --------------------------------------------------------------------------------------
# The ViT forward that also returns attention probabilities
# --------------------------------------------------------------------------------------


def _check_vit(model: nn.Module) -> None:
    """Raise ConfigError unless `model` is a plain timm VisionTransformer with standard blocks."""
    from weakseg._compat import import_timm

    timm = import_timm()
    block_type = timm.models.vision_transformer.Block
    attention_type = timm.layers.Attention
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"vit_cam needs a timm ViT backbone, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not block_type or type(blk.attn) is not attention_type:
            raise ConfigError(
                f"vit_cam: block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; "
                "only timm's pre-norm Block with the standard Attention is supported"
            )
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise ConfigError("vit_cam: patch dropout would remove patches from the CAM grid; build the ViT without it")


def attention_block_forward(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One timm ``Block`` (pre-norm) on tokens x (B, N, D), computed from the block's own
    weights -> (the block's output, its attention probabilities (B, heads, N, N)).

    Numerically the same as ``blk(x)`` (timm's fused attention differs only by rounding); the
    probabilities are taken after the softmax and before attention dropout, as WeakTr does.
    """
    attn = blk.attn
    y = blk.norm1(x)
    b, n, _ = y.shape
    gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (B, heads, N, N)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + blk.drop_path1(blk.ls1(out))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, probs


def vit_embed(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding + timm's prefix tokens + position embeddings (timm's own code path)
    -> tokens (B, p + h*w, D) before the blocks, and the patch grid (h, w)."""
    patches = model.patch_embed(images)
    if patches.ndim == 4:  # dynamic_img_size: (B, h, w, D)
        grid = (int(patches.shape[1]), int(patches.shape[2]))
    else:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
    x = model._pos_embed(patches)
    x = model.patch_drop(x)
    return model.norm_pre(x), grid


def vit_forward_with_attention(
    model: nn.Module, tokens: torch.Tensor, final_norm: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the blocks of a timm ViT over `tokens` (B, N, D) -> (final tokens, with the final
    LayerNorm when `final_norm`, and the list of each block's attention (B, heads, N, N))."""
    attentions = []
    for blk in model.blocks:
        tokens, probs = attention_block_forward(blk, tokens)
        attentions.append(probs)
    return (model.norm(tokens) if final_norm else tokens), attentions


# --------------------------------------------------------------------------------------
# Adaptive attention fusion (WeakTr) as pure functions + the small module
# --------------------------------------------------------------------------------------


def fuse_attention(attentions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """WeakTr's fused map: attentions (B, L, N, N), weights (B, L) -> (1/L) sum_i w_i A_i (B, N, N)."""
    return torch.einsum("bl,blij->bij", weights, attentions) / attentions.shape[1]


def propagate_cam(patch_attention: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Fine CAM: patch_attention (B, n, n) applied to each class map of cams (B, C, h, w), n = h*w:
    out[b, c, i] = sum_j patch_attention[b, i, j] cams[b, c, j] (row-major patch order)."""
    b, c, h, w = cams.shape
    return torch.einsum("bij,bcj->bci", patch_attention, cams.reshape(b, c, h * w)).reshape(b, c, h, w)


class AdaptiveAttentionFusion(nn.Module):
    """The weights of WeakTr's adaptive attention fusion: each of the L = K*H attention maps
    is pooled to one number (global max or average over its N x N entries), and an
    excitation MLP FC(L -> L/r, no bias) - ReLU - FC(L/r -> L, no bias) - sigmoid maps the L
    numbers to L weights in (0, 1), per image."""

    def __init__(self, num_maps: int, reduction: float = 8, pool: str = "max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ConfigError(f"vit_cam.pool: must be 'max' or 'avg', got {pool!r}")
        if reduction <= 0:
            raise ConfigError(f"vit_cam.reduction: must be > 0, got {reduction}")
        hidden = max(1, int(num_maps / reduction))
        self.pool = pool
        self.fc1 = nn.Linear(num_maps, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, num_maps, bias=False)

    def pooled(self, attentions: torch.Tensor) -> torch.Tensor:
        flat = attentions.flatten(2)
        return flat.amax(dim=2) if self.pool == "max" else flat.mean(dim=2)

    def forward(self, attentions: torch.Tensor) -> torch.Tensor:
        """(B, L, N, N) -> weights (B, L)."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(self.pooled(attentions)))))


# --------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------


@register("method", "vit_cam")
class ViTCAMNet(NormalisesInput, nn.Module):
    """WeakTr-style CAM network on a timm ViT: coarse CAM (conv head on patch tokens) and fine
    CAM (adaptively fused attention propagating the coarse CAM). See the module docstring.

    num_classes: foreground classes C. backbone: a timm ViT name or alias (``deit_small``,
    ``deit_tiny``, ``timm:<vit>``); backbone_kwargs go to ``build_backbone`` (``weights``,
    ``output_stride``, and timm ``create_model`` options such as ``drop_path_rate``, or
    ``depth``/``embed_dim``/``num_heads`` for small test models).
    class_tokens: C class tokens instead of timm's prefix tokens (WeakTr's 'fused' CAM).
    reduction, pool: the fusion MLP's reduction ratio r and its pooling ('max' or 'avg').
    detach: WeakTr's stop-gradient of the attention maps and coarse CAM in the fine branch.
    final_norm: apply the ViT's final LayerNorm before the CAM head (WeakTr: no).
    head_kernel: kernel size of the CAM head convolution (WeakTr: 3).
    """

    background_channel = None
    inference_output = "cams_fine"  # what CAM inference reads
    score_output = "cams"  # raw class scores (logit-like): the model's probabilities
    cam_order = "irn"  # CAM inference order of its official code (weakseg.models.inference)

    def __init__(
        self,
        num_classes: int,
        backbone: str = "deit_small",
        *,
        class_tokens: bool = False,
        reduction: float = 8,
        pool: str = "max",
        detach: bool = True,
        final_norm: bool = False,
        head_kernel: int = 3,
        **backbone_kwargs: Any,
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"vit_cam: num_classes must be >= 1, got {num_classes}")
        if head_kernel < 1 or head_kernel % 2 == 0:
            raise ConfigError(f"vit_cam.head_kernel: must be odd and >= 1, got {head_kernel}")
        self.backbone = build_backbone(backbone, **backbone_kwargs)
        if not getattr(self.backbone, "is_vit", False):
            raise ConfigError(f"vit_cam needs a ViT backbone (e.g. deit_small), got {backbone!r}")
        vit = self.backbone.model
        _check_vit(vit)
        self.num_classes = num_classes
        self.use_class_tokens = bool(class_tokens)
        self.detach = bool(detach)
        self.final_norm = bool(final_norm)
        dim = int(vit.embed_dim)
        depth, heads = len(vit.blocks), int(vit.blocks[0].attn.num_heads)
        self.head = nn.Conv2d(dim, num_classes, head_kernel, padding=head_kernel // 2)
        self.fusion = AdaptiveAttentionFusion(depth * heads, reduction, pool)
        if self.use_class_tokens:
            token, pos = self._initial_class_token(vit, dim)
            self.class_tokens = nn.Parameter(token.expand(1, num_classes, dim).clone())
            self.class_pos_embed = nn.Parameter(pos.expand(1, num_classes, dim).clone())

    @staticmethod
    def _initial_class_token(vit: nn.Module, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The checkpoint's class token and its position embedding (zeros where the ViT has
        none), each (1, 1, D), to start every class token from (WeakTr's --extra-token)."""
        with torch.no_grad():
            if getattr(vit, "cls_token", None) is not None:
                token = vit.cls_token.detach().clone()
            else:
                token = nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02)
            pos_embed = getattr(vit, "pos_embed", None)
            has_prefix_pos = pos_embed is not None and not getattr(vit, "no_embed_class", False) and vit.num_prefix_tokens
            pos = pos_embed[:, :1].detach().clone() if has_prefix_pos else torch.zeros(1, 1, dim)
        return token, pos

    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens: C class tokens, or timm's prefix tokens."""
        return self.num_classes if self.use_class_tokens else int(self.backbone.model.num_prefix_tokens)

    def tokens_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """RGB images -> (final tokens (B, prefix + h*w, D), per-block attention list, (h, w))."""
        vit = self.backbone.model
        s = self.backbone.output_stride
        if images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(f"vit_cam: input size {tuple(images.shape[-2:])} must be divisible by {s}")
        x, grid = vit_embed(vit, self.input_norm(images))
        if self.use_class_tokens:
            # Drop timm's prefix tokens (the patches keep timm's resampled position embedding)
            # and put the C class tokens, with their own position embedding, in front.
            patches = x[:, vit.num_prefix_tokens :]
            cls = vit.pos_drop(self.class_tokens + self.class_pos_embed).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, patches], dim=1)
        tokens, attentions = vit_forward_with_attention(vit, x, final_norm=self.final_norm)
        return tokens, attentions, grid

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> dict[str, torch.Tensor]:
        tokens, attentions, (h, w) = self.tokens_and_attention(images)
        p = self.num_prefix
        b = images.shape[0]
        patch_map = tokens[:, p:].transpose(1, 2).reshape(b, -1, h, w)
        coarse = self.head(patch_map)  # (B, C, h, w)

        stacked = torch.stack(attentions, dim=1).flatten(1, 2)  # (B, K*H, N, N), block-major
        maps = stacked.detach() if self.detach else stacked
        weights = self.fusion(maps)  # (B, K*H)
        fused = fuse_attention(maps, weights)  # (B, N, N)
        seed = F.relu(coarse.detach() if self.detach else coarse)
        if self.use_class_tokens:
            cross = fused[:, :p, p:].reshape(b, p, h, w)  # class-to-patch attention, (B, C, h, w)
            seed = cross * seed
        fine = propagate_cam(fused[:, p:, p:], seed)

        out = {
            "cams_coarse": coarse,
            "cams_fine": fine,
            "cams": coarse,
            "logits_coarse": coarse.mean(dim=(2, 3)),
            "logits_fine": fine.mean(dim=(2, 3)),
        }
        if self.use_class_tokens:
            token_logits = tokens[:, :p].mean(dim=-1)  # (B, C): WeakTr's class-token prediction
            out["logits_tokens"] = token_logits
            out["token_scores"] = token_logits[:, :, None, None]
            out["logits"] = token_logits
        else:
            out["logits"] = out["logits_coarse"]
        if return_attention:
            out["attention"] = stacked  # (B, K*H, N, N), not detached
            out["fusion_weights"] = weights
        return out
