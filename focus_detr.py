"""Less is More: Focus Attention for Efficient DETR (Focus-DETR).

Zheng, Li, Huang, Ma, Wang, Pan, Xu, Zhao, Zhu, Zhang, Xu, Zhang. ICCV 2023. arXiv:2307.12612.
Official code: huawei-noah/noah-research, Focus-DETR/ @ aa0f80c (a detrex project,
identical to IDEA-Research/detrex projects/focus_detr), on DINO (IDEA-Research/DINO).

The idea. Like Sparse DETR, update only some encoder tokens, but pick them better and use them
better. A foreground token selector (FTS) scores every token, supervised by FCOS-style labels
(a token is foreground if it lies inside a box whose size fits its level), with each level's
features modulated top-down by the coarser level's scores. The encoder keeps a cascade of nested
top-k sets (50% of the tokens in layer 1 down to 10% in layer 6). In each layer the most
object-like of its tokens (by foreground x class score: the multi-category score predictor, MCSP) first
attend to each other (OESM: the paper's self-attention module among these fine-grained object tokens),
then all of its tokens run deformable attention.

    S_L = MLP_F(T_L);  S_l = MLP_F(T_l * (1 + alpha_l Up(S_{l+1})))    top-down scoring (Sec. 3.2)
    L_fts = focal(S, FCOS labels) / positives, weight 1.5
    I_l = top-k_l(S), k_l = int(cascade_l * int(rho * valid + 1)), cascade = [1, .8, .6, .6, .4, .2], rho = .5
    s_j = max_c(cls(x_j)) * S_j;  J_l = top-300_j(s) of I_l              multi-category score (Sec. 3.3)
    x[J] <- LN(x[J] + MHA(x[J]));  x[I] <- FFN(LN(x[I] + MSDeformAttn(x[I], values)))   dual attention

Paper symbol -> variable:
    T_l, S_l                      proposal features of level l, fg_logits (B, N) (concatenated, finest level first)
    alpha                         ForegroundTokenSelector.alpha (L - 1 scalars)
    MLP_F                         ForegroundTokenSelector.scorer (a ScoringNetwork, one for all levels)
    k_l, I_l                      token counts keep (layers, B), order (B, S_0) (I_l = its first k_l: nested)
    MCSP                          class_embed[dec_layers] (the two-stage class head, reused; no own loss)
    fine-grained tokens J         fine_idx (B, J) in each layer, J = min(num_fine_tokens, k_l)
    OESM                          DualAttentionEncoderLayer.oesm_attn

Parameters (R50, 80 classes): 49,339,920 as official, 49,117,520 trainable (official 49,330,512: we also freeze layer1);
91 logits: 49,140,125 trainable (a test checks). The dense DINO base (`foreground_selection=False`): 47,450,521.

Deviations from the paper / official code (the official code's behaviour is the default unless said):
- Token counts: layer l of image b updates int(ratio_l * n_b) tokens, n_b = int(0.5 * valid_b) + 1, at
  least 1; the official code's int(ratio_l * max_b n_b) for the whole batch is `cascade_counts="batch_max"`.
- The fine-grained tokens are min(num_fine_tokens, k_l) per image, never batch filler (the OESM masks
  filler keys); the official code's topk(300) crashes when a layer keeps fewer (detrex #354).
- Padding never changes an image's scores: the scorer's mean skips it (`scorer_mean_over_padding`),
  Up() resizes each image's valid region (`upsample_over_padding`), the input GroupNorm skips it
  (`masked_groupnorm=False`), the extra level's mask is exact (`extra_level_mask="interpolate"`),
  the two-stage top-k skips padded tokens (`two_stage_over_padding`): each switch restores the official code's.
  The official code's evaluation even zeroes every padding mask (batched inference depends on the batch there).
  Under `batch_max` a smaller image's rows past its k_l (run, not written back) can be padding; the official MCSP
  scores those with the batch's lowest foreground score, ours with the token's own (`per_image` leaves them out).
- Encoder sine positions: temperature 10000, offset -0.5 (official 12-epoch configs; the 24 / 36-epoch
  ones use 20 and 0.0: `pos_temperature`, `pos_offset`).
- Label ranges: the official code's non-overlapping FCOS ranges; `fg_ranges="overlap"` is one reading of the paper's
  unpublished "50% overlap". Both are in input pixels of COCO-sized images (short side 800); `fg_range_scale` scales
  them to smaller images (left at 1 in shapes_config, where nearly every label then falls on the two finest levels).
  MCSP score: the official code's product of raw logits (two negative logits score high);
  `mcsp_score="prob_product"` is the paper's. Deformable values: the official code reads the pre-encoder tokens in
  every layer; `encoder_values="memory"` is the paper's (and Sparse DETR's) updated memory.
- Backbone: stem and layer1 frozen (official: stem only), torchvision ResNet-50 (official: r50_v1.pkl).
- DINO embeds each query's reference box in padded-map coordinates, which move with the batch's
  padding; we use the image's own (`query_pos_over_padding=True` is DINO's).
- 91 class logits indexed by raw category id (official: 80 contiguous; from_official maps them). So denoising's
  label noise draws among all 91 ids, 11 of them never a COCO class (official: among the 80), in the dense base too.
- A batch without boxes gives zero denoising losses (the official code too) and no denoising queries.
- MCSP reads the two-stage class head, class_embed[dec_layers]; the official code reads class_embed[enc_layers]:
  the same head with 6 encoder and 6 decoder layers (its configs); with a shallower encoder a decoder layer's head,
  with a deeper one (shapes_config's 6 and 3) an IndexError.
- The selector's focal loss is computed from its logits; the official code takes the log of the sigmoid, which is
  infinite once a token labelled background scores a logit above about 16.64 (24 ln 2, float32).

As in the official code: box logits clamp at detrex's 1e-3 (`box_logit_eps`; Deformable DETR's is 1e-5). Only boxes
at 0 or 1 notice: denoising boxes clipped at the image's edge, and the padded tokens that the official two-stage
top-k can pick (`two_stage_over_padding`), whose boxes are 1; with 1e-5 a padded batch's decoder differs from the
official code's from layer 1 on.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import (DeformableDecoderLayer, DeformableEncoderLayer, HungarianMatcher, MLP, MSDeformAttn, PostProcess,
                    SetCriterion, box_cxcywh_to_xyxy, check_at_least, check_choice, check_deformable_config,
                    check_state_dict, deformable_detr_init_, deformable_inputs, gather_tokens, input_tokens,
                    inverse_sigmoid, max_count, proposal_features, read_official, rename_keys, set_outputs,
                    sigmoid_focal_loss, smoke_outputs, two_stage_selection, valid_image_sizes, with_fast_path,
                    write_back)

# official GenTargets limit_range: each level's (strides 8 .. 64) range of the largest token-to-edge distance, pixels
FCOS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf))
# The paper's "adjacent ranges overlap by 50%" (its exact numbers are not published; a reading)
OVERLAP_RANGES = ((0.0, 128.0), (64.0, 256.0), (128.0, 512.0), (256.0, math.inf))

# ---------------------------------------------------------------------------------------------
# Foreground token selector (Sec. 3.2)
# ---------------------------------------------------------------------------------------------

# Copied from sparse_detr.ScoringNetwork
class ScoringNetwork(nn.Module):
    """g(x_feat) -> one saliency logit per token (official MaskPredictor, a DynamicViT-style MLP).

    LN -> Linear -> GELU, then the second half of the features is averaged over the image's tokens
    and broadcast back (global context), then 256 -> 128 -> 64 -> 1 with GELU.
    """

    def __init__(self, in_dim, mid_dim=256, mean_over_padding=False):
        super().__init__()
        self.mean_over_padding = mean_over_padding
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, mid_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(mid_dim, mid_dim // 2), nn.GELU(),
            nn.Linear(mid_dim // 2, mid_dim // 4), nn.GELU(),
            nn.Linear(mid_dim // 4, 1))

    def forward(self, x, pad_mask):
        """x (B, N, C), pad_mask (B, N) -> logits (B, N)"""
        z = self.layer1(x)  # (B, N, mid_dim)
        z_local, z_global = z.chunk(2, dim=-1)
        if self.mean_over_padding:  # the official code
            g = z_global.mean(1, keepdim=True)
        else:
            valid = (~pad_mask)[..., None].to(z)
            g = (z_global * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)  # (B, 1, mid_dim / 2)
        return self.layer2(torch.cat([z_local, g.expand_as(z_global)], -1)).squeeze(-1)


def label_ranges(cfg):
    """The (lo, hi] pixel ranges of each level's foreground labels: cfg.fg_ranges' x cfg.fg_range_scale."""
    ranges = OVERLAP_RANGES if cfg.fg_ranges == "overlap" else FCOS_RANGES
    return tuple((lo * cfg.fg_range_scale, hi * cfg.fg_range_scale) for lo, hi in ranges)


def foreground_labels(boxes, spatial_shapes, image_wh, ranges=FCOS_RANGES):
    """FCOS-style foreground labels of every token (official GenTargets; Sec. 3.2): a token of level l
    (stride s = 8 * 2^l, centre (j s + s // 2, i s + s // 2) in pixels) is foreground if its centre is
    strictly inside a box and its largest distance to the box's edges lies in ranges[l] = (lo, hi].
    boxes: [(M, 4)] cxcywh in [0, 1] of the unpadded image; image_wh (B, 2) its pixels -> (B, N) 0 / 1."""
    labels = []
    for b, bx in enumerate(boxes):
        xyxy = box_cxcywh_to_xyxy(bx.float()) * image_wh[b].repeat(2).to(bx.device)  # (M, 4) in pixels
        per_level = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            s = 8 * 2 ** lvl
            ys, xs = torch.meshgrid(torch.arange(h, device=bx.device) * s + s // 2,
                                    torch.arange(w, device=bx.device) * s + s // 2, indexing="ij")
            cx, cy = xs.reshape(-1, 1).float(), ys.reshape(-1, 1).float()  # (N_l, 1)
            ltrb = torch.stack([cx - xyxy[:, 0], cy - xyxy[:, 1], xyxy[:, 2] - cx, xyxy[:, 3] - cy], -1)  # (N_l, M, 4)
            lo, hi = ranges[lvl]
            far = ltrb.max(-1).values
            pos = (ltrb.min(-1).values > 0) & (far > lo) & (far <= hi)  # (N_l, M)
            per_level.append(pos.any(-1))
        labels.append(torch.cat(per_level))
    return torch.stack(labels).float()  # (B, N)


@with_fast_path
def upsample_valid(score, mask_from, mask_to):
    """Up() of each image's own region: its valid h x w cells of score (B, 1, h, w) resized onto its valid H x W
    cells of the finer level (bilinear, align_corners=True) -> (B, 1, H_l, W_l) as mask_to, zero over the padding."""
    out = score.new_zeros(score.shape[0], 1, *mask_to.shape[1:])
    sizes_from, sizes_to = valid_image_sizes(mask_from).int().tolist(), valid_image_sizes(mask_to).int().tolist()
    for b, ((w, h), (W, H)) in enumerate(zip(sizes_from, sizes_to)):  # (w, h): the valid cells
        region = score[b:b + 1, :, :h, :w]  # (1, 1, h, w)
        out[b, :, :H, :W] = F.interpolate(region, size=(H, W), mode="bilinear", align_corners=True)[0]
    return out


class ForegroundTokenSelector(nn.Module):
    """One foreground logit per token, scored level by level from the coarsest down (Sec. 3.2):
    S_L = MLP_F(T_L), S_l = MLP_F(T_l * (1 + alpha_l * Up(S_{l+1}))); the modulated T only feeds the
    scorer; alpha: one scalar per pair of adjacent levels (official: uniform(-0.3, 0.3)). Up: bilinear,
    align_corners=True, of each image's valid region (`upsample_over_padding`: the padded map, the official code)."""

    def __init__(self, hidden_dim, num_levels, mean_over_padding=False, upsample_over_padding=False):
        super().__init__()
        # official MaskPredictor(C, C)
        self.scorer = ScoringNetwork(hidden_dim, mid_dim=hidden_dim, mean_over_padding=mean_over_padding)
        self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-0.3, 0.3))
        self.upsample_over_padding = upsample_over_padding

    def upsample(self, score, mask_from, mask_to):
        """Up(): score (B, 1, h, w) -> (B, 1, H, W) of the finer level (bilinear, align_corners=True)."""
        if self.upsample_over_padding:  # the official code: the whole padded map
            return F.interpolate(score, size=mask_to.shape[-2:], mode="bilinear", align_corners=True)
        return upsample_valid(score, mask_from, mask_to)

    def forward(self, feats, masks):
        """feats (B, N, C) the tokens' proposal features; masks [(B, H_l, W_l)] -> logits (B, N)."""
        B, N, C = feats.shape
        sizes = [m.shape[1] * m.shape[2] for m in masks]
        levels = list(feats.split(sizes, 1))  # [(B, N_l, C)]
        scores = [None] * len(masks)
        for lvl in reversed(range(len(masks))):  # coarsest first
            t = levels[lvl]
            if lvl < len(masks) - 1:
                h, w = masks[lvl].shape[1:]
                up = self.upsample(scores[lvl + 1].view(B, 1, *masks[lvl + 1].shape[1:]), masks[lvl + 1], masks[lvl])
                t = t * (1 + self.alpha[len(masks) - 2 - lvl] * up.view(B, h * w, 1))  # T_l (1 + alpha Up(S_{l+1}))
            scores[lvl] = self.scorer(t, masks[lvl].flatten(1))  # (B, N_l)
        return torch.cat(scores, 1)  # (B, N)


def cascade_token_nums(pad_mask, rho, ratios, per_image=True):
    """How many tokens each encoder layer updates (Sec. 3.2): pad_mask (B, N) -> keep (layers, B),
    int(ratio_l * n_b), n_b = int(rho * valid_b) + 1, at least 1. per_image=False (the official code): the top
    int(ratio_l * max_b n_b) of every image, at most n_b written back (more next to a larger image)."""
    n = ((~pad_mask).sum(1).to(torch.float64) * rho).floor().long() + 1  # (B,)
    ratios = torch.tensor(ratios, dtype=torch.float64, device=pad_mask.device)[:, None]  # (layers, 1)
    if per_image:
        return (ratios * n[None]).floor().long().clamp(min=1)
    return torch.minimum((ratios * n.max()).floor().long().clamp(min=1).expand(-1, n.numel()), n[None])


# Adapted from common.DeformableEncoderLayer: the OESM self-attention among the fine-grained tokens runs first
class DualAttentionEncoderLayer(nn.Module):
    """Post-norm, the official code's order: the fine-grained tokens attend to each other (OESM), then all the layer's
    foreground tokens run Deformable DETR's encoder layer (deformable attention into `value`, then the
    FFN). Without OESM it is Deformable DETR's layer."""

    def __init__(self, hidden_dim, dim_feedforward, dropout, num_levels, nheads, num_points, oesm=True):
        super().__init__()
        if oesm:  # built before the deformable layer, in the official order: the same initialisation per seed
            self.oesm_attn = nn.MultiheadAttention(hidden_dim, nheads, dropout=dropout, batch_first=True)
            self.oesm_norm = nn.LayerNorm(hidden_dim)
            self.oesm_dropout = nn.Dropout(dropout)
        self.deformable = DeformableEncoderLayer(hidden_dim, dim_feedforward, dropout,
                                                 MSDeformAttn(hidden_dim, num_levels, nheads, num_points))

    def forward(self, tgt, pos, reference_points, value, spatial_shapes, pad_mask, fine_idx=None, fine_pad=None):
        """tgt, pos (B, S, C) the layer's foreground tokens; value (B, N, C); fine_idx (B, J) rows of
        tgt that are fine-grained, fine_pad (B, J) True where that row is filler -> (B, S, C)"""
        if fine_idx is not None:  # OESM: self-attention among the fine-grained tokens (Sec. 3.3)
            x, p = gather_tokens(tgt, fine_idx), gather_tokens(pos, fine_idx)  # (B, J, C)
            y = self.oesm_attn(x + p, x + p, x, key_padding_mask=fine_pad, need_weights=False)[0]
            x = self.oesm_norm(x + self.oesm_dropout(y))
            tgt = tgt.scatter(1, fine_idx[..., None].expand(-1, -1, tgt.shape[-1]), x)
        return self.deformable(tgt, pos, reference_points, value, spatial_shapes, pad_mask)


# ---------------------------------------------------------------------------------------------
# DINO's decoder side: box sine embedding, denoising queries, decoder layer
# ---------------------------------------------------------------------------------------------

def box_sine_embed(boxes, num_pos_feats=128, temperature=10000):
    """DINO's gen_sineembed_for_position: boxes (B, Q, 4) cxcywh in [0, 1] -> (B, Q, 4 F),
    the sine / cosine features of y, x, w, h (in that order)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)  # float32 as the official code
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = boxes[..., None] * (2 * math.pi) / dim_t  # (B, Q, 4, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (B, Q, 4, F)
    return torch.cat([pos[:, :, 1], pos[:, :, 0], pos[:, :, 2], pos[:, :, 3]], -1)


def prepare_denoising(targets, dn_number, label_noise, box_noise, num_classes, label_enc, num_queries, eps=1e-3):
    """DINO's contrastive denoising queries (training only).

    Each image's boxes are repeated in G = max(1, dn_number // max_b M_b) groups, each a positive copy
    (corners moved by < half the box size x box_noise) and a negative one (1 to 2 times that); label_noise
    / 2 of the labels are replaced at random. -> None without boxes, else label queries (B, Q_dn, C), box
    logits (B, Q_dn, 4), the attention mask (Q_dn + Q, Q_dn + Q) True = blocked (matching queries do not
    see the denoising ones, no group another) and meta {"groups": G, "group_size": 2 max_b M_b}. The box logits
    clamp at `eps` (detrex's inverse_sigmoid).

    Where each copy sits, worked through: two images with 2 and 1 boxes and dn_number 4 give
    max_b M_b = 2, G = 4 // 2 = 2 groups and Q_dn = 2 * 2 * 2 = 8 slots per image. Copy c = 0 .. 2G-1
    of box i sits at slot c * max_b M_b + i; even c are positives, odd c negatives, group g = c // 2:
        slot      0    1    2    3  |  4    5    6    7
        image 0   a+   b+   a-   b- |  a+   b+   a-   b-      (group 0 | group 1)
        image 1   c+   .    c-   .  |  c+   .    c-   .       (.: empty slot, box logit 0, label zeros)
    The positive copy of box i in group g is slot g * group_size + i: what the criterion matches it to.
    """
    counts = [len(t["labels"]) for t in targets]
    single = max(counts)
    if dn_number <= 0 or single == 0:
        return None
    device = label_enc.weight.device
    G = max(1, dn_number // single)
    labels = torch.cat([t["labels"] for t in targets]).to(device).repeat(2 * G)  # (2 G M,)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device).float().repeat(2 * G, 1)  # (2 G M, 4)
    batch = torch.cat([torch.full((c,), b, device=device) for b, c in enumerate(counts)]).repeat(2 * G)
    # slot of each copy in its image's denoising queries: copy c of box i at c * single + i
    slot = torch.cat([torch.arange(c, device=device) for c in counts])
    slot = torch.cat([slot + single * c for c in range(2 * G)])
    if label_noise > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise * 0.5
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        diff = boxes[:, 2:].repeat(1, 2) / 2  # half width / height for each corner coordinate
        negative = (torch.arange(2 * G, device=device).repeat_interleave(len(slot) // (2 * G)) % 2 == 1)[:, None]
        magnitude = torch.rand_like(boxes) + negative.float()  # positives in [0, 1), negatives in [1, 2)
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        xyxy = (xyxy + magnitude * sign * diff * box_noise).clamp(0.0, 1.0)
        boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
    B, n_dn = len(targets), 2 * G * single
    query_label = torch.zeros(B, n_dn, label_enc.embedding_dim, device=device)  # (B, Q_dn, C)
    query_box = torch.zeros(B, n_dn, 4, device=device)  # (B, Q_dn, 4); empty slots: box logit 0 (the official code)
    query_label[batch, slot] = label_enc(labels).to(query_label.dtype)
    query_box[batch, slot] = inverse_sigmoid(boxes, eps)
    mask = torch.zeros(n_dn + num_queries, n_dn + num_queries, dtype=torch.bool, device=device)
    mask[n_dn:, :n_dn] = True  # matching queries do not see the denoising ones
    group = torch.arange(n_dn, device=device) // (2 * single)
    mask[:n_dn, :n_dn] = group[:, None] != group[None, :]  # nor does a group see another
    return query_label, query_box, mask, {"groups": G, "group_size": 2 * single}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class FocusDETR(nn.Module):
    """ResNet -> 4 levels -> foreground token selector -> cascade encoder of dual-attention layers
    (only each layer's foreground tokens are updated) -> DINO two-stage queries and decoder
    (Deformable DETR's parts: common.py)."""

    def __init__(self, cfg):
        super().__init__()
        C, L = cfg.hidden_dim, cfg.num_feature_levels
        self.cfg = cfg
        self.backbone, self.input_proj, self.level_embed = deformable_inputs(cfg)  # ResNet, projections, (L, C)
        focus = cfg.foreground_selection
        self.selector = None
        if focus:
            self.selector = ForegroundTokenSelector(C, L, cfg.scorer_mean_over_padding, cfg.upsample_over_padding)
        self.encoder = nn.ModuleList(
            DualAttentionEncoderLayer(C, cfg.dim_feedforward, cfg.dropout, L, cfg.nheads, cfg.enc_n_points, oesm=focus)
            for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(
            DeformableDecoderLayer(C, cfg.dim_feedforward, cfg.dropout, cfg.nheads,
                                   MSDeformAttn(C, L, cfg.nheads, cfg.dec_n_points))
            for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(C)  # DINO: applied to every decoder layer's output before the heads
        self.ref_point_head = MLP(2 * C, C, C, 2)  # DINO: query position = MLP(sine(reference box))
        self.enc_output, self.enc_output_norm = nn.Linear(C, C), nn.LayerNorm(C)  # two-stage and scorer input
        self.tgt_embed = nn.Embedding(cfg.num_queries, C) if cfg.learnt_init_query else None  # mixed query selection
        self.label_enc = nn.Embedding(cfg.num_classes, C)  # denoising label queries (always built, as officially)
        # prediction heads: decoder layers 0..5 and the two-stage head (index dec_layers), which is also the MCSP
        self.class_embed = nn.ModuleList(nn.Linear(C, cfg.num_classes) for _ in range(cfg.dec_layers + 1))
        self.bbox_embed = nn.ModuleList(MLP(C, C, 4, 3) for _ in range(cfg.dec_layers + 1))
        self._reset_parameters()

    def _reset_parameters(self):
        # official FOCUS_DETRTransformer.init_weights: Deformable DETR's (common.deformable_detr_init_) on every
        # matrix of the transformer, tgt_embed included; alpha keeps its uniform init
        transformer = [self.encoder, self.decoder, self.decoder_norm, self.ref_point_head, self.enc_output,
                       self.enc_output_norm] + [m for m in (self.selector, self.tgt_embed) if m is not None]
        deformable_detr_init_(self, transformer, zip(self.class_embed, self.bbox_embed))

    def forward(self, images, pad_mask, targets=None, explain=False):
        """The shared interface (common.py). images (B, 3, H_img, W_img), pad_mask (B, H_img, W_img)
        True = padding; targets: in training, what the denoising queries are made of. Returns a dict:

            pred_logits (B, Q, K), pred_boxes (B, Q, 4)  the last decoder layer, cxcywh in [0, 1] of the unpadded image
            aux_outputs, enc_outputs  decoder layers 0 .. dec_layers - 2; the two-stage head on its Q selections
            spatial_shapes, token_pad_mask (B, N)   the token grid, for the foreground labels
          with foreground selection: fg_logits (B, N) the scores S (Sec. 3.2; loss_select), token_nums
            (enc_layers, B) k_l, the tokens encoder layer l updates in image b
          in training, with targets and dn_number > 0: dn_outputs (per decoder layer) and dn_meta
          with explain=True (and foreground selection):
            kept_tokens, fine_tokens  per encoder layer, (B, S_l) the token indices (into N) it updates,
                                 best first, and (B, J_l) its fine-grained ones (OESM); -1 marks filler
        """
        memory, geometry, out = self.encode(self.backbone(images, pad_mask), pad_mask, explain)
        out.update(self.decode(memory, geometry, targets, explain))
        return out

    def encode(self, feats, pad_mask, explain=False):
        """Foreground scoring (Sec. 3.2) and the cascade encoder (Sec. 3.3). feats: the backbone's
        [(C3, m3), (C4, m4), (C5, m5)]; pad_mask the images' (read with extra_level_mask="interpolate")
        -> memory (B, N, C), TokenGeometry, the selection's outputs."""
        cfg = self.cfg
        src, pos, geo = input_tokens(self.input_proj, self.level_embed, feats, cfg.masked_groupnorm, pad_mask,
                                     cfg.extra_level_mask, cfg.pos_temperature, cfg.pos_offset)  # (B, N, C) x 2
        pad, ref, shapes = geo.pad_mask, geo.reference_points, geo.spatial_shapes  # (B, N), (B, N, L, 2)
        out = {"spatial_shapes": shapes, "token_pad_mask": pad}
        if not cfg.foreground_selection:  # the dense DINO encoder
            memory = src
            for layer in self.encoder:
                memory = layer(memory, pos, ref, memory, shapes, pad)
            return memory, geo, out

        # --- Sec. 3.2: foreground scores (once) and the nested per-layer token sets ---
        token_feats = proposal_features(src + pos, geo.proposal_valid, self.enc_output, self.enc_output_norm)
        fg = self.selector(token_feats, geo.masks)  # (B, N) logits
        per_image = cfg.cascade_counts == "per_image"
        keep = cascade_token_nums(pad, cfg.focus_rho, cfg.cascade_ratios, per_image)  # (enc_layers, B) k_l
        order = fg.detach().masked_fill(pad, float("-inf")).topk(max_count(keep, pad.shape[1]), dim=1).indices  # (B, S)
        out.update(fg_logits=fg, token_nums=keep)

        # --- Sec. 3.3: each layer updates its top keep[l] tokens with dual attention ---
        memory, kept, fine_tokens = src, [], []
        for lid, layer in enumerate(self.encoder):
            inds = order[:, :max_count(keep[lid], order.shape[1])]  # (B, S_l) I_l: a prefix of one ranking (nested)
            rows = torch.arange(inds.shape[1], device=src.device)[None] < keep[lid][:, None]  # (B, S) False: filler
            tgt, pos_s, ref_s = gather_tokens(memory, inds), gather_tokens(pos, inds), gather_tokens(ref, inds)
            fine_idx, fine_pad = self.fine_grained(tgt, fg.detach().gather(1, inds), rows, keep[lid])  # (B, J)
            value = src if cfg.encoder_values == "backbone" else memory  # official: the pre-encoder tokens
            tgt = layer(tgt, pos_s, ref_s, value, shapes, pad, fine_idx, fine_pad)  # (B, S, C)
            memory = write_back(memory, inds, rows, tgt)  # the rest keep their value
            if explain:  # token indices; -1 marks filler
                kept.append(inds.masked_fill(~rows, -1))
                fine = inds.gather(1, fine_idx)  # (B, J)
                fine_tokens.append(fine if fine_pad is None else fine.masked_fill(fine_pad, -1))
        if explain:
            out.update(kept_tokens=kept, fine_tokens=fine_tokens)
        return memory, geo, out

    def fine_grained(self, tgt, fg_s, rows, keep):
        """MCSP (Sec. 3.3): s_j = max_c cls_c(x_j) * S_j; its top J = min(num_fine_tokens, S) rows of tgt
        (B, S, C), fg_s (B, S), rows (B, S) -> fine_idx (B, J), fine_pad (B, J) True at filler (None: the official
        batch_max, and a lone image, which has no filler: its J <= k_l; the OESM then runs unmasked, as exported)."""
        cfg = self.cfg
        cls = self.class_embed[cfg.dec_layers](tgt).max(-1).values.detach()  # (B, S): the two-stage head's best class
        if cfg.mcsp_score == "logit_product":  # official: the product of raw logits
            score = cls * fg_s
        else:  # the paper: of probabilities
            score = cls.sigmoid() * fg_s.sigmoid()
        n_fine = max_count(keep.clamp(max=cfg.num_fine_tokens), tgt.shape[1])  # J = min(num_fine_tokens, S)
        fine_pad = None
        if cfg.cascade_counts == "per_image" and tgt.shape[0] > 1:  # a lone image has no filler (J <= its k_l)
            score = score.masked_fill(~rows, float("-inf"))  # filler rows are never fine-grained
            fine_pad = torch.arange(n_fine, device=tgt.device)[None] >= keep.clamp(max=n_fine)[:, None]
        return score.topk(n_fine, dim=1).indices, fine_pad

    def decode(self, memory, geo, targets=None, explain=False):
        """DINO: two-stage query selection, denoising queries (in training, from the targets), and the
        decoder with box refinement. memory (B, N, C), TokenGeometry -> the detection outputs (a dict)."""
        cfg = self.cfg
        tgt, reference, out = self.select_queries(memory, geo)  # (B, Q, C), (B, Q, 4)
        dn = None
        if self.training and targets is not None:
            dn = prepare_denoising(targets, cfg.dn_number, cfg.dn_label_noise, cfg.dn_box_noise, cfg.num_classes,
                                   self.label_enc, cfg.num_queries, cfg.box_logit_eps)
        attn_mask, n_dn = None, 0
        if dn is not None:  # the denoising queries go first: [Q_dn denoising, Q matching]
            dn_label, dn_box, attn_mask, out["dn_meta"] = dn
            n_dn = dn_label.shape[1]
            tgt = torch.cat([dn_label.to(tgt), tgt], 1)  # (B, Q_dn + Q, C)
            reference = torch.cat([dn_box.sigmoid().to(reference), reference], 1)  # (B, Q_dn + Q, 4)
        else:
            # label_enc only gets a gradient through denoising queries; DDP fails on a parameter without
            # one, so (as the official code) it stays in the graph at zero cost when a batch has none
            tgt = tgt + self.label_enc.weight[0, 0] * 0.0
        logits, boxes = self.run_decoder(tgt, reference, memory, geo, attn_mask)  # per layer (B, Q_dn + Q, .)
        out.update(set_outputs([x[:, n_dn:] for x in logits], [x[:, n_dn:] for x in boxes], cfg.aux_loss))
        if n_dn:
            out["dn_outputs"] = [{"pred_logits": a[:, :n_dn], "pred_boxes": b[:, :n_dn]} for a, b in zip(logits, boxes)]
        return out

    def select_queries(self, memory, geo):
        """DINO's mixed query selection: the two-stage head's Q best tokens give the reference boxes, the
        content is learned (or their features) -> content (B, Q, C), boxes (B, Q, 4) detached, enc_outputs."""
        cfg = self.cfg
        head = cfg.dec_layers
        sel = two_stage_selection(memory, geo, self.enc_output, self.enc_output_norm, self.class_embed[head],
                                  self.bbox_embed[head], cfg.num_queries, "max_class", cfg.two_stage_over_padding)
        ref_logit = gather_tokens(sel.boxes, sel.topk)  # (B, Q, 4)
        # DINO: the two-stage loss sees the Q selected tokens only
        out = {"enc_outputs": {"pred_logits": gather_tokens(sel.logits, sel.topk), "pred_boxes": ref_logit.sigmoid()}}
        if self.tgt_embed is not None:  # learned content
            tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)  # (B, Q, C)
        else:  # Deformable DETR style: the selected tokens' features
            tgt = gather_tokens(sel.features, sel.topk).detach()  # (B, Q, C)
        return tgt, ref_logit.detach().sigmoid(), out

    def run_decoder(self, tgt, reference, memory, geo, attn_mask=None):
        """DINO's decoder. Layer l embeds its reference box b_{l-1} (b_0: the selected proposals) as its
        query position and refines it, b_l = sigmoid(bbox_embed_l(h_l) + logit(b_{l-1})), detached for
        layer l + 1. Layer l's predicted box is then rebuilt from the normed state on top of b_{l-1}:
        look forward twice (DINO Sec. 3.5) uses the UNdetached b_{l-1}, so layer l's box loss also
        trains layer l - 1's box head (Deformable DETR: the detached one). -> logits, boxes per layer."""
        cfg, C = self.cfg, tgt.shape[-1]
        ratios = torch.cat([geo.valid_ratios, geo.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        boxes_in, states = [reference], []  # b_{l-1} for every layer, as its box is built on it
        for lid, layer in enumerate(self.decoder):
            ref_in = reference[:, :, None] * ratios  # (B, Q, L, 4) in each level's padded map
            # DINO embeds the box in padded-map coordinates (ref_in), which move with the batch; we: the image's
            pos_box = ref_in[:, :, 0] if cfg.query_pos_over_padding else reference  # (B, Q, 4)
            query_pos = self.ref_point_head(box_sine_embed(pos_box, C // 2))  # (B, Q, C)
            tgt = layer(tgt, query_pos, ref_in, memory, geo.spatial_shapes, geo.pad_mask, attn_mask)[0]
            refined = (self.bbox_embed[lid](tgt) + inverse_sigmoid(reference, cfg.box_logit_eps)).sigmoid()  # b_l
            reference = refined.detach()
            states.append(self.decoder_norm(tgt))
            boxes_in.append(refined if cfg.look_forward_twice else reference)
        logits = [self.class_embed[lid](h) for lid, h in enumerate(states)]  # DINO's heads read the normed states
        boxes = [(self.bbox_embed[lid](h) + inverse_sigmoid(boxes_in[lid], cfg.box_logit_eps)).sigmoid()
                 for lid, h in enumerate(states)]
        return logits, boxes


# ---------------------------------------------------------------------------------------------
# Loss: DINO's set losses (with denoising) plus the foreground selector's focal loss (Sec. 3.2)
# ---------------------------------------------------------------------------------------------

class FocusDETRCriterion(SetCriterion):
    """SetCriterion (decoder layers, the two-stage head on its Q selections) plus loss_select: focal loss
    (0.25, 2) of every token's foreground logit against the FCOS labels, summed per image / its positives
    (>= 1), averaged (official compute_cls_loss), and loss_*_dn: the denoising copies' set losses, each copy
    matched to its own box, / (num_boxes x groups) (the official DN criterion; DN: denoising)."""

    def __init__(self, cfg):
        matcher = HungarianMatcher(cfg.match_ce, cfg.match_bbox, cfg.match_giou, cfg.focal_alpha)
        super().__init__(cfg.num_classes, matcher=matcher, weight_ce=cfg.loss_ce, weight_bbox=cfg.loss_bbox,
                         weight_giou=cfg.loss_giou, focal_alpha=cfg.focal_alpha,
                         num_aux=cfg.dec_layers - 1 if cfg.aux_loss else 0, encoder_labels="class")
        self.ranges = label_ranges(cfg)
        base = {"loss_ce": cfg.loss_ce, "loss_bbox": cfg.loss_bbox, "loss_giou": cfg.loss_giou}
        if cfg.foreground_selection:
            self.weight_dict["loss_select"] = cfg.loss_select
        if cfg.dn_number > 0:
            self.weight_dict.update({f"{k}_dn": v for k, v in base.items()})
            for i in range(cfg.dec_layers - 1 if cfg.aux_loss else 0):
                self.weight_dict.update({f"{k}_dn_{i}": v for k, v in base.items()})

    def forward(self, outputs, targets):
        losses = super().forward(outputs, targets)
        use_dn = any(k.endswith("_dn") for k in self.weight_dict)  # every rank all-reduces, boxes or not:
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device) if use_dn else None
        if "fg_logits" in outputs:
            fg = outputs["fg_logits"].float()
            if any("size" not in t for t in targets):  # the unpadded (h, w) the boxes are relative to
                raise ValueError("Focus-DETR's foreground loss needs each target's 'size' (h, w) in pixels "
                                 "(data/ adds it)")
            image_wh = torch.stack([torch.as_tensor(t["size"]).flip(0) for t in targets]).float()  # (B, 2)
            labels = foreground_labels([t["boxes"] for t in targets], outputs["spatial_shapes"], image_wh,
                                       self.ranges).to(fg.device)  # (B, N)
            per_image = sigmoid_focal_loss(fg, labels, self.focal_alpha, self.focal_gamma).sum(1)
            losses["loss_select"] = (per_image / labels.sum(1).clamp(min=1)).mean()
        if "dn_outputs" in outputs:
            meta = outputs["dn_meta"]
            num_boxes = num_boxes * meta["groups"]
            indices = []
            for t in targets:  # copy g of box i sits at g * group_size + i
                i = torch.arange(len(t["labels"]))
                g = torch.arange(meta["groups"])[:, None] * meta["group_size"]
                indices.append(((g + i).flatten(), i.repeat(meta["groups"])))
            *aux, last = outputs["dn_outputs"]  # aux: the earlier decoder layers, when aux_loss
            for suffix, a in [("_dn", last)] + [(f"_dn_{j}", a) for j, a in enumerate(aux) if "aux_outputs" in outputs]:
                losses.update({f"{k}{suffix}": v for k, v in self.set_loss(a, targets, num_boxes, indices).items()})
        elif use_dn:  # no boxes in the batch (or eval): zero DN terms (the official code)
            zero = outputs["pred_logits"].sum() * 0.0
            losses.update({k: zero for k in self.weight_dict if "_dn" in k})
        return losses


# ---------------------------------------------------------------------------------------------
# Config and build
# ---------------------------------------------------------------------------------------------

MCSP_SCORES = ("logit_product", "prob_product")
CASCADE_COUNTS = ("per_image", "batch_max")
ENCODER_VALUES = ("backbone", "memory")
FG_RANGES = ("fcos", "overlap")


@dataclass
class Config:
    backbone_depth: int = 50  # ResNet-50 (official focus_detr_r50)
    backbone_norm: str = "frozen_bn"  # FrozenBatchNorm2d, stem + layer1 frozen (official: stem only)
    num_classes: int = 91  # largest COCO category id + 1 (train.py sets it from the data; official: 80 contiguous)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048  # DINO / the official code
    dropout: float = 0.0  # DINO / the official code
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900  # DINO two-stage proposals
    # Focus-DETR (Sec. 3); foreground_selection=False is the dense DINO base (every token, no OESM)
    foreground_selection: bool = True
    focus_rho: float = 0.5  # official focus_rho: layer 1 updates int(0.5 * valid) + 1 tokens
    cascade_ratios: tuple = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)  # official cascade_set, one per encoder layer
    cascade_counts: str = "per_image"  # "batch_max": the official code's counts from the largest image of the batch
    num_fine_tokens: int = 300  # official topk_sa: fine-grained tokens in the OESM self-attention
    mcsp_score: str = "logit_product"  # official: raw fg logit x max class logit; "prob_product": sigmoids
    encoder_values: str = "backbone"  # official: deformable values are the pre-encoder tokens; "memory": updated
    fg_ranges: str = "fcos"  # official FCOS ranges; "overlap": the paper's 50%-overlapping reading
    fg_range_scale: float = 1.0  # the ranges x this: they are in pixels of COCO-sized inputs (short side 800)
    scorer_mean_over_padding: bool = False  # True: the official code's per-level mean over padded tokens too
    upsample_over_padding: bool = False  # True: the official code's top-down upsampling of the whole padded map
    masked_groupnorm: bool = True  # False: the official code's GroupNorm, whose statistics include the padding
    query_pos_over_padding: bool = False  # True: DINO's query sine embedding of the padded-map box
    extra_level_mask: str = "exact"  # "interpolate": the official extra-level mask, the image's mask resized (nearest)
    two_stage_over_padding: bool = False  # True: the official code's two-stage top-k, which ranks padded tokens too
    box_logit_eps: float = 1e-3  # detrex's inverse_sigmoid clamp (Deformable DETR's: 1e-5)
    pos_temperature: float = 10000.0  # the encoder's sine positions (official 12-epoch configs; 24 / 36-epoch: 20)
    pos_offset: float = -0.5  # (official 12-epoch configs; 24 / 36-epoch: 0.0)
    # DINO (each can be turned off to compare on a plain two-stage deformable base)
    learnt_init_query: bool = True  # mixed query selection: learned content, positions from the top-k boxes
    look_forward_twice: bool = True
    dn_number: int = 100  # contrastive denoising queries (0: off)
    dn_label_noise: float = 0.5  # the official code (DINO's own config: 0.4)
    dn_box_noise: float = 1.0
    aux_loss: bool = True
    loss_ce: float = 1.0  # official / detrex DINO loss weights
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_select: float = 1.5  # official select_loss
    match_ce: float = 2.0  # matcher costs
    match_bbox: float = 5.0
    match_giou: float = 2.0
    focal_alpha: float = 0.25
    num_select: int = 300  # post-process top-k over queries x classes (the official code)

    def validate(self):
        check_deformable_config(self)
        check_choice(self, "mcsp_score", MCSP_SCORES)
        check_choice(self, "cascade_counts", CASCADE_COUNTS)
        check_choice(self, "fg_ranges", FG_RANGES)
        check_choice(self, "encoder_values", ENCODER_VALUES)
        if not (math.isfinite(self.fg_range_scale) and self.fg_range_scale > 0):
            raise ValueError(f"fg_range_scale multiplies the foreground label ranges: it must be finite and > 0, "
                             f"got {self.fg_range_scale}")
        if not (self.pos_temperature > 0 and 0 < self.focus_rho < 1):  # layer 1 updates int(rho * valid) + 1
            raise ValueError(f"pos_temperature must be > 0 and focus_rho in (0, 1), got {self.pos_temperature}, "
                             f"{self.focus_rho}")
        if len(self.cascade_ratios) != self.enc_layers or not all(0 < r <= 1 for r in self.cascade_ratios):
            raise ValueError(f"cascade_ratios needs one ratio in (0, 1] per encoder layer ({self.enc_layers}), "
                             f"got {self.cascade_ratios}")
        if self.num_feature_levels != 4 and self.foreground_selection:
            raise ValueError("the foreground labels are defined for 4 levels (strides 8..64): num_feature_levels=4")
        check_at_least(self, ("num_fine_tokens",))
        check_at_least(self, ("dn_number",), 0)
        if not 0 < self.box_logit_eps < 0.5:
            raise ValueError(f"box_logit_eps clamps box logits at log(eps / (1 - eps)): it must be in (0, 0.5), "
                             f"got {self.box_logit_eps}")


def shapes_config():
    """CPU-sized Focus-DETR for the shapes set (`python train.py --model focus_detr`); every mechanism on."""
    return Config(backbone_depth=18, backbone_norm="frozen_bn", hidden_dim=128, nheads=8, enc_layers=6, dec_layers=3,
                  dim_feedforward=512, num_queries=50, num_select=100, num_fine_tokens=100, dn_number=20)


# train.py's COCO recipe: the official detrex configs (focus_detr_r50_4scale_{12,24,36}ep.py, configs/common/
# coco_schedule.py, optim.py); the default schedule is the paper's headline one, 36 epochs (50.4 AP)
COCO_RECIPE = {
    "epochs": 36,  # 270k iterations of total batch 16 (7,500 per epoch)
    "lr_drop": 20,  # lr_multiplier_24_36ep = default_coco_scheduler(36, 20, 0): x 0.1 after epoch 20 (DINO: 33)
    "lr": 1e-4,  # optim.py AdamW lr
    "lr_backbone": 1e-5,  # optim.py: lr x 0.1 for every parameter whose name contains "backbone"
    "batch_size": 2,  # images per GPU: dataloader.train.total_batch_size 16 on 8 GPUs
    "total_batch": 16,  # dataloader.train.total_batch_size
    "weight_decay": 1e-4,  # optim.py
    "weight_decay_norm": 0.0,  # optim.py: get_default_optimizer_params(weight_decay_norm=0.0)
    "clip_max_norm": 0.1,  # train.clip_grad.params.max_norm
    "config": {"pos_temperature": 20.0, "pos_offset": 0.0},  # the 24 / 36-epoch configs' encoder sine positions
}
# --schedule NAME: the three official schedules (what differs from COCO_RECIPE); the first is the default
COCO_SCHEDULES = {
    "36ep": {},
    "24ep": {"epochs": 24},  # 180k iterations, the drop at epoch 20 (the official 24- and 36-epoch configs share it)
    "12ep": {"epochs": 12, "lr_drop": 11,  # 90k iterations, x 0.1 at 82.5k
             "config": {"pos_temperature": 10000.0, "pos_offset": -0.5}},  # the 12-epoch config's sine positions
}


def build(cfg):
    """-> (model, criterion, postprocess)"""
    cfg.validate()
    return FocusDETR(cfg), FocusDETRCriterion(cfg), PostProcess(cfg.num_select)


# ---------------------------------------------------------------------------------------------
# The authors' weights (official README: R50 at 12 / 24 / 36 epochs; detrex / detectron2 checkpoints)
# ---------------------------------------------------------------------------------------------

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # official class k -> id
# Official (detrex) name -> ours, the first matching rule wins. detectron2's ResNet: resN = layerN-1, convK.norm = bnK,
# shortcut = downsample; detrex layers: attentions.0 / .1 the OESM or self-attention / the deformable one.
OFFICIAL_KEYS = [
    (r"^backbone\.stem\.conv1\.weight$", "backbone.body.conv1.weight"),
    (r"^backbone\.stem\.conv1\.norm\.", "backbone.body.bn1."),
    *[(rf"^backbone\.res{r}\.(\d+)\.{a}", rf"backbone.body.layer{r - 1}.\1.{b}") for r in (2, 3, 4, 5) for a, b in (
        (r"conv(\d)\.weight$", r"conv\2.weight"), (r"conv(\d)\.norm\.", r"bn\2."),
        (r"shortcut\.weight$", "downsample.0.weight"), (r"shortcut\.norm\.", "downsample.1."))],
    (r"^neck\.convs\.(\d)\.conv\.", r"input_proj.\1.0."), (r"^neck\.convs\.(\d)\.norm\.", r"input_proj.\1.1."),
    (r"^neck\.extra_convs\.0\.conv\.", "input_proj.3.0."), (r"^neck\.extra_convs\.0\.norm\.", "input_proj.3.1."),
    (r"^transformer\.level_embeds$", "level_embed"), (r"^transformer\.alpha$", "selector.alpha"),
    (r"^transformer\.enc_mask_predictor\.", "selector.scorer."),
    (r"^transformer\.(enc_output|enc_output_norm|tgt_embed)\.", r"\1."),
    (r"^transformer\.decoder\.ref_point_head\.", "ref_point_head."),
    (r"^transformer\.decoder\.norm\.", "decoder_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"encoder.\1.oesm_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.\1.oesm_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.0\.", r"encoder.\1.deformable.norm1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.1\.", r"encoder.\1.deformable.norm2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.1\.", r"encoder.\1.deformable.self_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"decoder.\1.self_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.1\.", r"decoder.\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.0\.", r"decoder.\1.norm2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.1\.", r"decoder.\1.norm1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.2\.", r"decoder.\1.norm3."),
    (r"^transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"encoder.\1.deformable.linear1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"encoder.\1.deformable.linear2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"decoder.\1.linear1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"decoder.\1.linear2."),
    (r"^(class_embed|bbox_embed|label_enc)\.", r"\1."),
]
OFFICIAL_ALIASES = [r"^transformer\.decoder\.(class_embed|bbox_embed)\.", r"^enhance_MCSP_layerlist\.",
               r"^transformer\.encoder\.enhance_MCSP\."]

# What the entry points read: where the authors publish the weights from_official converts, and is_official (the
# keys from_official requires: detrex's level embeddings and neck)
OFFICIAL_WEIGHTS = "github.com/huawei-noah/noah-research, Focus-DETR/ README (R50 at 12 / 24 / 36 epochs)"
OFFICIAL_REQUIRED = ("transformer.level_embeds", "neck.convs.0.conv.weight")


def is_official(state):
    """Whether a state dict is the authors' released Focus-DETR (detrex) file: it holds the keys from_official
    requires."""
    return all(k in state for k in OFFICIAL_REQUIRED)


def from_official(source, class_ids="coco", schedule=None):
    """An official checkpoint (detrex's {"model": state dict}, or bare) -> (Config, our state dict, notes on
    what was assumed); sizes, layers, queries, classes, depth from the tensors, every official behaviour on;
    OFFICIAL_ALIASES (second names of shared heads and the MCSP) dropped. class_ids "coco": the 80 class rows
    to their COCO ids of our 91 (others: logit -10000); "contiguous": the official code's 80. schedule "12ep" / "24ep" /
    "36ep" (None: guessed from the file name, 12ep when it names neither 24ep nor 36ep; a note says so): that
    config's encoder sine positions. ValueError for another class_ids or schedule."""
    if class_ids not in ("coco", "contiguous"):
        raise ValueError(f"class_ids must be 'coco' or 'contiguous', got {class_ids!r}")
    if schedule not in (None, "12ep", "24ep", "36ep"):
        raise ValueError(f"schedule must be '12ep', '24ep' or '36ep' (the official configs' sine positions), "
                         f"got {schedule!r}")
    ckpt = read_official(source, "Focus-DETR (detrex)", OFFICIAL_REQUIRED)
    state, what = ckpt.state, ckpt.what
    positions = f"sine positions of the {schedule} config (as stated)"
    if schedule is None:
        named = next((s for s in ("24ep", "36ep") if s in str(source).lower()), None)
        schedule = named or "12ep"
        positions = (f"sine positions of the {schedule} config, guessed from the file name "
                     f"({f'it names {named}' if named else 'it names no 24ep / 36ep'}); to state it: schedule= "
                     f"(detect.py, tools.export: --official-schedule 12ep / 24ep / 36ep)")
    notes = [f"focus_rho, cascade_ratios, num_fine_tokens: the official code's defaults; {positions}"]
    L, C = state["transformer.level_embeds"].shape
    enc_layers, off_classes = ckpt.count("transformer.encoder.layers."), state["class_embed.0.weight"].shape[0]
    depth = {6: 50, 23: 101}.get(ckpt.count("backbone.res4."))
    if not depth:
        notes.append("backbone: no ResNet-50 / 101 weights in the file; ResNet-50 assumed")
    cfg = Config(
        hidden_dim=C,
        nheads=8,
        num_feature_levels=L,
        enc_layers=enc_layers,
        dec_layers=ckpt.count("transformer.decoder.layers."),
        num_queries=len(state["transformer.tgt_embed.weight"]),
        dim_feedforward=state["transformer.encoder.layers.0.ffns.0.layers.0.0.weight"].shape[0],
        num_classes=91 if class_ids == "coco" else off_classes,
        backbone_depth=depth or 50,
        cascade_ratios=Config.cascade_ratios[:enc_layers] if enc_layers <= 6 else (1.0,) * enc_layers,
        cascade_counts="batch_max",  # the official behaviours
        scorer_mean_over_padding=True,
        upsample_over_padding=True,
        masked_groupnorm=False,
        query_pos_over_padding=True,
        extra_level_mask="interpolate",
        two_stage_over_padding=True,
        pos_temperature=10000.0 if schedule == "12ep" else 20.0,
        pos_offset=-0.5 if schedule == "12ep" else 0.0,
    )
    ours, unused = rename_keys(state, OFFICIAL_KEYS, OFFICIAL_ALIASES)
    if class_ids == "coco":  # official row k -> our row COCO_IDS[k]
        if off_classes != len(COCO_IDS):
            raise ValueError(f"{what}: {off_classes} classes; class_ids='coco' maps COCO's 80 (use 'contiguous')")
        for key in [k for k in ours if k.startswith("class_embed.") or k == "label_enc.weight"]:
            full = ours[key].new_full((91, *ours[key].shape[1:]), -1e4 if key.endswith("bias") else 0.0)
            ours[key] = full.index_copy(0, torch.tensor(COCO_IDS), ours[key])
    with torch.device("meta"):  # the names and shapes only
        own = FocusDETR(cfg).state_dict()
    check_state_dict(ours, own, f"{what} does not fit {cfg}", unused)
    return cfg, ours, notes


# ---------------------------------------------------------------------------------------------
# Fast paths (common.with_fast_path chooses them; tests compare each with the readable function it is attached to)
# ---------------------------------------------------------------------------------------------

def bilinear_matrix(n_from, n_to, size_from, size_to, dtype=torch.float32):
    """1-D bilinear resizing (F.interpolate's align_corners=True) of each image's first n_from cells onto its first
    n_to cells, as a matrix: n_from, n_to (B,) -> (B, size_to, size_from); rows past n_to are zero. Computed in
    float32 at least (as F.interpolate's positions under bf16), returned in `dtype`."""
    compute = torch.promote_types(dtype, torch.float32)
    i = torch.arange(size_to, device=n_to.device, dtype=compute)  # (size_to,) target cells
    scale = (n_from - 1).to(compute) / (n_to - 1).clamp(min=1).to(compute)  # (B,) as F.interpolate: 0 if n_to is 1
    src = i[None] * scale[:, None]  # (B, size_to) where each target cell reads the source
    i0 = src.floor().long().clamp(max=size_from - 1)
    i1 = torch.minimum(i0 + 1, (n_from - 1).clamp(min=0)[:, None])
    lam = (src - i0).clamp(0, 1)[..., None]  # (B, size_to, 1)
    weights = F.one_hot(i0, size_from) * (1 - lam) + F.one_hot(i1, size_from) * lam
    return (weights * (i[None] < n_to[:, None])[..., None]).to(dtype)


@upsample_valid.fast_with_export
def upsample_valid_fast(score, mask_from, mask_to):
    """upsample_valid's numbers without a per-image loop: Up = A_rows S A_cols^T with each image's interpolation
    matrices, the valid sizes kept as tensors. It runs in training too, and it is what torch.export traces: the
    readable loop sizes F.interpolate by values read from the masks, which torch.export cannot trace."""
    rows = bilinear_matrix((~mask_from).any(2).sum(1), (~mask_to).any(2).sum(1), mask_from.shape[1],
                           mask_to.shape[1], score.dtype)  # (B, H, h)
    cols = bilinear_matrix((~mask_from).any(1).sum(1), (~mask_to).any(1).sum(1), mask_from.shape[2],
                           mask_to.shape[2], score.dtype)  # (B, W, w)
    return (rows @ score[:, 0] @ cols.transpose(1, 2))[:, None]  # (B, 1, H, W), zero over the padding


if __name__ == "__main__":
    for kw in ({"foreground_selection": False}, {}):
        model = build(Config(**kw))[0]
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"Focus-DETR R50 {kw or '(default)'}: {n:,} trainable parameters")
    print(smoke_outputs(model))
