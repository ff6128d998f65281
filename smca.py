"""SMCA-DETR: Fast Convergence of DETR with Spatially Modulated Co-Attention.

Gao, Zheng, Wang, Dai, Li. ICCV 2021. arXiv:2101.07448 (v1) / 2108.02404.
Official code: github.com/gaopengcuhk/SMCA-DETR (single-scale only).

The idea. DETR's decoder queries start by attending to the whole image, and learning where to look
is what makes DETR need 500 epochs. SMCA predicts, for every query, a centre and (per head) an
offset and a scale, and adds the log of a Gaussian around that point to the cross-attention
logits, so each query starts by looking near its own location:

    C_h = softmax(K_h^T Q_h / sqrt(d) + log G_h) V_h                        (Eq. 5)
    log G_h(i, j) = -((i - c_x,h)^2 s_x,h^2 + (j - c_y,h)^2 s_y,h^2) / beta  (Eq. 3-4, as the official code computes it)

The box head adds the centre's pre-sigmoid logit to its (cx, cy) output, so boxes are regressed
relative to the point the query attends around. With focal loss and 300 queries this reaches
41.0 AP in 50 epochs where DETR has 34.8 (Table 2).

Multi-scale SMCA (Sec. 3.3, `Config(multiscale=True)`; MSZ below: the authors' multi-scale code, released
only as a zip): features f16, f32, f64 (ResNet C4, C5 and a stride-2 3x3 conv on C5, each projected to
hidden_dim), an encoder of 2 intra-scale self-attention blocks (one block's weights shared by all scales),
1 multi-scale block (joint attention over every token of every scale) and 2 more intra-scale blocks, FFN
1024; the decoder's prior is computed on every scale and each query weights the scales by scale-selection
attention:

    alpha_16, alpha_32, alpha_64 = softmax(FC(O_q))                           (Eq. 7)
    C_i,j = softmax(K_i,j^T Q_i / sqrt(d) + log G_i) V_i,j * alpha_j           (Eq. 8)
    C_i = sum_j C_i,j                                                          (Eq. 9)

Paper symbol -> variable:
    c_h, c_w (normalised centre)     center_logit.sigmoid(), from `center_mlp` (official point1), layer 0 only
    centre in feature cells          center = sigmoid(center_logit) * cells_wh, cells of the UNPADDED image
    head offsets                     `offset_proj` (official point2), (B, Q, scales, H, 2) in cells, every layer
    s_h, s_w                         `scale_proj` (official point3), (B, Q, scales, H, 2), every layer
    beta                             Config.beta (official --smooth 8)
    log G                            log_prior (B, H, Q, N), added to the cross-attention logits
    f16, f32, f64 / E16, E32, E64    `input_proj[l]` outputs / the encoder's outputs, one per level
    alpha_j (Eq. 7)                  `scale_select` (MSZ point4), (B, Q, scales), one per layer

Deviations from the paper / official code:
- Follows the official code where the paper differs: the centre MLP has 3 layers (paper: 2); the centre comes
  from layer 0 and is reused unchanged by layers 1-5; the scale MULTIPLIES the squared distance
  (s_code = 1 / s_paper), initialised to 1; beta is a constant 8; the prior heads read an extra
  LayerNorm(tgt + query_pos) of the layer input (official norm4), not the cross-attention query.
- 91 class logits (the largest COCO id + 1). The official code has a 92nd "no-object" column left over from DETR
  that focal loss never trains as positive; dropping it removes 257 parameters.
- The official code reads each image's unpadded size from the targets, even at inference (its issues #9/#11);
  we derive it from pad_mask, so the model needs no targets.
- The cross-attention keeps one packed in-projection like nn.MultiheadAttention (same init, same
  parameter count) but computes the logits explicitly, so the prior is visible in the code.
- `spatial_prior=False` is the paper's DETR baseline (focal loss, 300 queries, Table 2): no prior,
  no centre heads, boxes from the MLP alone.
- Multi-scale. MSZ's encoder is a depthwise-conv encoder, not the paper's; the attention encoder described in
  Sec. 3.3 was never released, so ours is written from the paper: 2Intra-Multi-2Intra (`ms_encoder="IIMII"`),
  post-norm DETR blocks, intra-scale blocks shared across scales (Table 3's best), FFN 1024, learned
  level embeddings (normal init, as MSZ) added to each level's sine positions, padding masked at
  every scale. The f64 mask is computed exactly (ceil of half the valid f32 cells), where MSZ
  interpolates. The projections are plain convs (no GroupNorm), as MSZ. The paper's three scales;
  MSZ adds a fourth level (C3, downsampled to stride 16).
- Multi-scale decoder, following MSZ where the paper is silent or differs: one shared key/value
  projection for all scales (the paper says separate ones); alpha from a per-layer Linear on the
  layer's norm4 output, one per query and scale, shared by the heads; each scale's centre is the
  shared centre in that scale's cells, with its own head offsets and scales, and its weighted
  squared distance is multiplied by stride / 32 (MSZ's fixed factors 0.5 / 1 / 2). MSZ's bug of
  using image 0's alpha for the whole batch is NOT copied: alpha is per image.
  `scale_selection=False` (Table 3 "w/o scale-selection") takes one softmax over all scales' keys.
- `head_shared=True` (Table 2 "Head-shared") predicts one offset and one scale per query and
  broadcasts them to all heads; the official code has no such option.
- Table 3's partial sharing variants (shared FFN only / shared self-attention only) are not offered;
  `intra_share=False` is its "no sharing" row.
- `feature_stride=16` (single-scale) reads C4 instead of C5, its prior in C4 cells (`smca_backbone`). Not a
  paper setting: the CPU shapes configuration uses it to keep cells per object near COCO's on C5.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import (Backbone, MLP, PostProcess, SetCriterion, cell_grid, check_at_least, check_choice,
                    check_state_dict, halve_mask, read_official, rename_keys, set_outputs, sine_position_embedding,
                    smoke_outputs, valid_image_sizes, with_fast_path)

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention (positions on q, k) then FFN."""

    def __init__(self, hidden_dim, nheads, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1, self.norm2 = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, pad_mask):
        """src, pos (B, N, C); pad_mask (B, N) -> (B, N, C)"""
        q = k = src + pos
        attn = self.self_attn(q, k, src, key_padding_mask=pad_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class GaussianCrossAttention(nn.Module):
    """Multi-head attention with an additive log-prior on the logits: softmax(QK^T/sqrt(d) + log G) V (Eq. 5).

    Parameters are laid out as nn.MultiheadAttention's (packed in_proj, out_proj), as in the official code's
    GaussianMultiheadAttention; attention dropout as DETR.
    """

    def __init__(self, hidden_dim, nheads, dropout):
        super().__init__()
        self.nheads = nheads
        self.in_proj = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def logits(self, query, key, pad_mask, log_prior=None):
        """QK^T / sqrt(d) + log G, padded keys at -inf: query (B, Q, C), key (B, N, C) -> (B, H, Q, N)."""
        B, Q, C = query.shape
        H = self.nheads
        w_q, w_k = self.in_proj.weight.chunk(3)[:2]
        b_q, b_k = self.in_proj.bias.chunk(3)[:2]
        q = F.linear(query, w_q, b_q).view(B, Q, H, C // H).transpose(1, 2)  # (B, H, Q, D)
        k = F.linear(key, w_k, b_k).view(B, -1, H, C // H).transpose(1, 2)  # (B, H, N, D)
        logits = q @ k.transpose(-1, -2) / math.sqrt(C // H)  # (B, H, Q, N)
        if log_prior is not None:
            logits = logits + log_prior  # Eq. (5): the Gaussian enters as log G, exp is never taken
        return logits.masked_fill(pad_mask[:, None, None, :], float("-inf"))

    def forward(self, query, key, value, pad_mask, log_prior=None, level_sizes=None, alpha=None):
        """query (B, Q, C); key, value (B, N, C); pad_mask (B, N); log_prior (B, H, Q, N) -> (B, Q, C).

        With alpha (B, Q, scales) the keys are `level_sizes` consecutive segments, one per scale:
        each gets its own softmax, scaled by alpha (Eq. 8); the sum over scales (Eq. 9) is the
        product of the concatenated weights with the concatenated values.
        """
        B, Q, C = query.shape
        logits = self.logits(query, key, pad_mask, log_prior)  # (B, H, Q, N)
        w_v, b_v = self.in_proj.weight.chunk(3)[2], self.in_proj.bias.chunk(3)[2]
        v = F.linear(value, w_v, b_v).view(B, -1, self.nheads, C // self.nheads).transpose(1, 2)  # (B, H, N, D)
        if alpha is None:
            attn = logits.softmax(dim=-1)
        else:
            segments = logits.split(level_sizes, dim=-1)  # per scale (B, H, Q, N_j)
            attn = torch.cat([seg.softmax(-1) * alpha[:, None, :, j, None] for j, seg in enumerate(segments)], -1)
        attn = self.dropout(attn)
        out = (attn @ v).transpose(1, 2).reshape(B, Q, C)  # (B, Q, C)
        return self.out_proj(out)


# ---------------------------------------------------------------------------------------------
# Spatially modulated co-attention (Sec. 3.2)
# ---------------------------------------------------------------------------------------------

SCALE_TYPES = ("fixed", "single", "independent")  # official --dynamic_scale type1 / type2 / type3 (Table 2)


@dataclass
class ScaleGeometry:
    """Where SMCA's tokens sit, scale by scale in key order: what `encode` hands `decode`."""
    spatial_shapes: list  # [(H_j, W_j)]
    pad_mask: torch.Tensor  # (B, N) True = padding, N = sum_j N_j
    pos: torch.Tensor  # (B, N, C) sine positions (multi-scale: + the level embeddings)
    cells_wh: list  # per scale (B, 2): the unpadded image's size in that scale's cells, the prior's frame
    grids: list  # per scale (N_j, 2): each cell's integer (x, y)


@with_fast_path
def gaussian_log_prior(points, grid, scales, factor, beta):
    """log G of one scale to every one of its cells (Eq. 3-4, as the official code computes it):
    -(s_x^2 (i - c_x)^2 + s_y^2 (j - c_y)^2) * factor / beta.

    points (B, Q, H, 2): each head's centre c (the shared centre plus its offset) in this scale's cells
    (H = 1 when head_shared); grid (N_j, 2) the cells' (i, j); scales (B, Q, H, 1) s or (B, Q, H, 2)
    (s_x, s_y), None for the fixed scale; factor: stride / 32 (multi-scale, MSZ's 0.5 / 1 / 2) or 1
    -> (B, Q, H, N_j)"""
    sqdist = (points[:, :, :, None, :] - grid) ** 2  # (B, Q, H, N_j, 2): (dx^2, dy^2) to every cell
    if scales is not None:
        sqdist = sqdist * scales[:, :, :, None, :] ** 2  # s_x^2 dx^2, s_y^2 dy^2
    return -(sqdist.sum(-1) * factor) / beta


class SMCADecoderLayer(nn.Module):
    """DETR decoder layer whose cross-attention is modulated by a per-query, per-head Gaussian.

    The prior is predicted from out = LayerNorm(tgt + query_pos) of the layer's INPUT (official norm4):
    layer 0 predicts the shared centre (3-layer MLP), every layer its own head offsets and scales,
    per scale when there are several, and (multi-scale) the scale-selection weights alpha.
    """

    def __init__(self, cfg, first):
        super().__init__()
        C, H = cfg.hidden_dim, cfg.nheads
        self.nheads, self.beta, self.scale_type = H, cfg.beta, cfg.scale_type
        self.strides = cfg.strides()
        self.ref_stride = 32 if cfg.multiscale else self.strides[0]  # distances in f32 cells (MSZ) / the map's own
        self.prior_heads = 1 if cfg.head_shared else H  # Table 2: head-shared vs multi-head modulation
        ffn = cfg.ms_dim_feedforward if cfg.multiscale else cfg.dim_feedforward
        self.self_attn = nn.MultiheadAttention(C, H, dropout=cfg.dropout, batch_first=True)
        self.cross_attn = GaussianCrossAttention(C, H, cfg.dropout)
        self.linear1 = nn.Linear(C, ffn)
        self.linear2 = nn.Linear(ffn, C)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(C), nn.LayerNorm(C), nn.LayerNorm(C)
        self.dropout = nn.Dropout(cfg.dropout)
        self.spatial_prior = cfg.spatial_prior
        self.scale_select = None
        if cfg.multiscale and cfg.scale_selection:
            self.scale_select = nn.Linear(C, len(self.strides))  # Eq. (7), MSZ point4
        if cfg.spatial_prior or self.scale_select is not None:
            self.norm4 = nn.LayerNorm(C)  # official norm4: drives the prior and alpha
        if cfg.spatial_prior:
            n = len(self.strides) * self.prior_heads  # one offset / scale per (scale, head)
            self.center_mlp = MLP(C, C, 2, 3) if first else None  # official point1 (paper: 2 layers)
            self.offset_proj = nn.Linear(C, 2 * n)  # official point2: (dx, dy) per scale and head
            if cfg.scale_type != "fixed":  # official point3: s (single) or (s_x, s_y) (independent)
                self.scale_proj = nn.Linear(C, n if cfg.scale_type == "single" else 2 * n)

    def log_prior(self, out, center_logit, geometry):
        """log G (B, H, Q, N) over all scales' cells. out (B, Q, C); centre logit (B, Q, 2) as (x, y)."""
        B, Q, _ = out.shape
        n_scales, Hp = len(self.strides), self.prior_heads
        center = center_logit.sigmoid()  # (B, Q, 2) normalised (x, y)
        offsets = self.offset_proj(out).view(B, Q, n_scales, Hp, 2)  # in each scale's cells
        scales = None
        if self.scale_type != "fixed":
            scales = self.scale_proj(out).view(B, Q, n_scales, Hp, -1)  # (..., 1) single or (..., 2) independent
        logs = []
        for j, (stride, cells_wh, grid) in enumerate(zip(self.strides, geometry.cells_wh, geometry.grids)):
            points = (center * cells_wh[:, None, :])[:, :, None, :] + offsets[:, :, j]  # (B, Q, H, 2) in cells
            s = None if scales is None else scales[:, :, j]
            logs.append(gaussian_log_prior(points, grid, s, stride / self.ref_stride, self.beta))  # (B, Q, H, N_j)
        log_g = torch.cat(logs, dim=-1)  # (B, Q, H, N)
        return log_g.expand(B, Q, self.nheads, log_g.shape[-1]).transpose(1, 2)  # (B, H, Q, N)

    def forward(self, tgt, query_pos, memory, geometry, center_logit=None):
        """tgt, query_pos (B, Q, C); memory (B, N, C); geometry: ScaleGeometry.

        Returns tgt (B, Q, C), the centre logit (B, Q, 2) (predicted here in layer 0, else passed
        through), log G (B, H, Q, N) or None, and alpha (B, Q, scales) or None.
        """
        log_prior = alpha = None
        if self.spatial_prior or self.scale_select is not None:
            out = self.norm4(tgt + query_pos)  # this layer's prior and alpha read its input (official norm4)
        if self.spatial_prior:
            if center_logit is None:
                center_logit = self.center_mlp(out)  # (B, Q, 2) as (x, y)
            log_prior = self.log_prior(out, center_logit, geometry)
        if self.scale_select is not None:
            alpha = self.scale_select(out).softmax(-1)  # (B, Q, scales), Eq. (7), per image
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        sizes = [len(grid) for grid in geometry.grids]  # keys per scale, in memory order
        keys = memory + geometry.pos
        ca = self.cross_attn(tgt + query_pos, keys, memory, geometry.pad_mask, log_prior, sizes, alpha)
        tgt = self.norm2(tgt + self.dropout(ca))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt, center_logit, log_prior, alpha


# ---------------------------------------------------------------------------------------------
# Multi-scale encoder (Sec. 3.3): intra-scale and multi-scale self-attention
# ---------------------------------------------------------------------------------------------


class MultiScaleEncoder(nn.Module):
    """A cascade of intra-scale ("I") and multi-scale ("M") self-attention blocks, e.g. "IIMII".

    Intra-scale: each scale attends only to itself, through one block whose self-attention and FFN
    weights are shared by every scale (`intra_share`, Table 3). Multi-scale: one attention over the
    concatenated tokens of all scales.
    """

    def __init__(self, cfg):
        super().__init__()
        self.layout, n_scales = cfg.ms_encoder, len(cfg.strides())

        def block():
            return EncoderLayer(cfg.hidden_dim, cfg.nheads, cfg.ms_dim_feedforward, cfg.dropout)
        self.blocks = nn.ModuleList(
            block() if kind == "M" or cfg.intra_share else nn.ModuleList(block() for _ in range(n_scales))
            for kind in self.layout)

    def forward(self, srcs, poss, pads):
        """srcs, poss: per scale (B, N_j, C); pads: per scale (B, N_j) -> per scale (B, N_j, C)"""
        sizes = [x.shape[1] for x in srcs]
        for kind, block in zip(self.layout, self.blocks):
            if kind == "M":
                joint = block(torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(pads, 1))  # (B, N, C)
                srcs = list(joint.split(sizes, dim=1))
            else:
                layers = block if isinstance(block, nn.ModuleList) else [block] * len(srcs)
                srcs = [layer(x, p, m) for layer, x, p, m in zip(layers, srcs, poss, pads)]
        return srcs


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def smca_backbone(cfg):
    """The ResNet, whose last map the single-scale encoder reads: C5, the paper's. The one place the shapes-only
    `feature_stride=16` acts: single-scale, the ResNet stops at C4 (Backbone(last_stage=4)), so its last map is C4,
    of 16-pixel cells (Config.strides). Multi-scale reads C4 and C5 whatever feature_stride."""
    stops_at_c4 = cfg.feature_stride == 16 and not cfg.multiscale
    return Backbone(cfg.backbone_depth, cfg.backbone_norm, last_stage=4 if stops_at_c4 else 5)


class SMCA(nn.Module):
    """SMCA-DETR: ResNet -> DETR encoder (single-scale, C5) or intra/multi-scale encoder (f16, f32, f64)
    -> SMCA decoder -> class / box heads."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_dim
        self.cfg = cfg
        self.strides = cfg.strides()  # (32,), (16,) at feature_stride 16, or (16, 32, 64)
        self.backbone = smca_backbone(cfg)  # C3, C4, C5 (to C4 at feature_stride 16)
        if cfg.multiscale:  # Sec. 3.3: "3 convolutions project ResNet-50 outputs to 256-d"
            c4, c5 = self.backbone.num_channels[1:]  # C4 and C5 channels
            self.input_proj = nn.ModuleList([
                nn.Conv2d(c4, C, 1),  # f16 from C4
                nn.Conv2d(c5, C, 1),  # f32 from C5
                nn.Conv2d(c5, C, 3, stride=2, padding=1)])  # f64 from C5 (MSZ)
            self.level_embed = nn.Parameter(torch.empty(len(self.strides), C))
            self.encoder = MultiScaleEncoder(cfg)
        else:
            self.input_proj = nn.ModuleList([nn.Conv2d(self.backbone.num_channels[-1], C, 1)])  # the last map: C5 (C4)
            self.encoder = nn.ModuleList(
                EncoderLayer(C, cfg.nheads, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(SMCADecoderLayer(cfg, first=(i == 0)) for i in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(C)
        self.query_embed = nn.Embedding(cfg.num_queries, C)
        self.class_embed = nn.Linear(C, cfg.num_classes)
        self.bbox_embed = MLP(C, C, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self):
        # official Transformer._reset_parameters: xavier_uniform on every matrix of encoder and decoder
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.decoder:
            nn.init.zeros_(layer.cross_attn.in_proj.bias)  # as nn.MultiheadAttention
            nn.init.zeros_(layer.cross_attn.out_proj.bias)
            if hasattr(layer, "scale_proj"):  # s = 1 at init: log G = -d^2/beta, sigma = 2 cells
                nn.init.zeros_(layer.scale_proj.weight)
                nn.init.ones_(layer.scale_proj.bias)
        if self.cfg.multiscale:
            nn.init.normal_(self.level_embed)  # MSZ
        # focal-loss prior: every class starts at probability 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, images, pad_mask, targets=None, explain=False):
        """The shared interface (common.py). images (B, 3, H_img, W_img), pad_mask (B, H_img, W_img)
        True = padding; targets: unused (no denoising). Returns a dict:

            pred_logits (B, Q, K), pred_boxes (B, Q, 4)  the last decoder layer, cxcywh in [0, 1] of the unpadded image
            aux_outputs          decoder layers 0 .. dec_layers - 2 (when aux_loss)
            centers (B, Q, 2)    the queries' Gaussian centres (x, y) in [0, 1] (absent when spatial_prior is off)
          with explain=True:
            log_priors           per decoder layer, log G (B, H, Q, N) over every scale's cells (None without a prior)
            scale_weights        per decoder layer, alpha (B, Q, scales) (None unless multi-scale with scale selection)
            level_shapes         [(H_j, W_j)]: the cells of each scale, in key order (N = sum_j H_j W_j)
        """
        memory, geometry, out = self.encode(self.backbone(images, pad_mask), pad_mask, explain)
        out.update(self.decode(memory, geometry, targets, explain))
        return out

    def encode(self, feats, pad_mask, explain=False):
        """The scales' tokens and the encoder (single-scale DETR or Sec. 3.3's). feats: the backbone's
        [(C3, m3), (C4, m4), (C5, m5)] (to C4 at feature_stride 16); pad_mask (B, H_img, W_img) -> memory (B, N, C),
        ScaleGeometry, {}."""
        image_wh = valid_image_sizes(pad_mask)  # (B, 2) unpadded size in pixels: the prior's frame
        if self.cfg.multiscale:  # f16 from C4; f32 and f64 from C5
            (c4, m4), (c5, m5) = feats[-2:]
            maps = [self.input_proj[0](c4), self.input_proj[1](c5), self.input_proj[2](c5)]
            masks = [m4, m5, halve_mask(m5)]
        else:
            x, m = feats[-1]  # the backbone's last map: C5, the paper's (C4 at feature_stride 16)
            maps, masks = [self.input_proj[0](x)], [m]
        srcs, poss, pads, cells_wh, grids = [], [], [], [], []
        for j, (x, m) in enumerate(zip(maps, masks)):
            pos = sine_position_embedding(m, self.cfg.hidden_dim // 2).to(x)  # (B, C, H_j, W_j)
            pos = pos.flatten(2).transpose(1, 2)  # (B, N_j, C)
            if self.cfg.multiscale:
                pos = pos + self.level_embed[j]
            srcs.append(x.flatten(2).transpose(1, 2))  # (B, N_j, C)
            poss.append(pos)
            pads.append(m.flatten(1))  # (B, N_j)
            grids.append(cell_grid(*x.shape[-2:], x.device).to(x))  # (N_j, 2) integer (x, y) cell indices
            cells_wh.append(image_wh.to(x) / self.strides[j])  # (B, 2) unpadded size in this scale's cells
        if self.cfg.multiscale:
            srcs = self.encoder(srcs, poss, pads)
        else:
            for layer in self.encoder:
                srcs = [layer(srcs[0], poss[0], pads[0])]
        geometry = ScaleGeometry([tuple(x.shape[-2:]) for x in maps], torch.cat(pads, 1), torch.cat(poss, 1),
                                 cells_wh, grids)
        return torch.cat(srcs, 1), geometry, {}  # memory (B, N, C)

    def decode(self, memory, geometry, targets=None, explain=False):
        """The SMCA decoder (Sec. 3.2) and the heads: boxes regressed around each query's Gaussian centre.
        memory (B, N, C), ScaleGeometry -> the detection outputs (a dict)."""
        query_pos = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)  # (B, Q, C)
        tgt = torch.zeros_like(query_pos)
        hs, log_priors, alphas, center_logit = [], [], [], None
        for layer in self.decoder:
            tgt, center_logit, log_prior, alpha = layer(tgt, query_pos, memory, geometry, center_logit)
            hs.append(self.decoder_norm(tgt))
            log_priors.append(log_prior)
            alphas.append(alpha)
        hs = torch.stack(hs)  # (dec_layers, B, Q, C)

        logits = self.class_embed(hs)  # (dec_layers, B, Q, K)
        raw = self.bbox_embed(hs)  # (dec_layers, B, Q, 4) cxcywh logits
        if center_logit is not None:  # boxes are regressed around the Gaussian centre (official detr.py)
            raw = torch.cat([raw[..., :2] + center_logit, raw[..., 2:]], dim=-1)
        out = set_outputs(logits, raw.sigmoid(), self.cfg.aux_loss)
        if center_logit is not None:
            out["centers"] = center_logit.sigmoid()
        if explain:
            out.update(log_priors=log_priors, scale_weights=alphas, level_shapes=geometry.spatial_shapes)
        return out


def gaussian_maps(out, image=0, query=0, layer=-1):
    """The spatial prior one query puts on the image: exp(log G) averaged over heads, one
    (H_j, W_j) map per scale, from `model(..., explain=True)` (what official issue #22 asks for).
    Write one over its image with visualize.save_heatmap_png."""
    log_prior = out["log_priors"][layer]
    if log_prior is None:
        raise ValueError("this model has no spatial prior (spatial_prior=False)")
    maps = log_prior[image, :, query].exp().mean(0)  # (L,) averaged over heads
    return [m.view(h, w) for m, (h, w) in zip(maps.split([h * w for h, w in out["level_shapes"]]), out["level_shapes"])]


# ---------------------------------------------------------------------------------------------
# Config and build
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    backbone_depth: int = 50  # ResNet-50 (Sec. 4.1)
    backbone_norm: str = "frozen_bn"  # DETR: FrozenBatchNorm2d, stem + layer1 frozen
    num_classes: int = 91  # logits: largest COCO category id + 1 (train.py sets it from the data)
    hidden_dim: int = 256  # official --hidden_dim
    nheads: int = 8  # the official code hard-codes 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048  # official main.py default
    dropout: float = 0.1  # also on attention weights
    num_queries: int = 300  # official README (--num_queries 300); the paper's setting
    spatial_prior: bool = True  # False: the paper's DETR baseline (focal loss, 300 queries; Table 2)
    scale_type: str = "independent"  # official README --dynamic_scale type3 (Table 2 "Indep.")
    head_shared: bool = False  # True: Table 2 "Head-shared" (one offset and scale for all heads)
    multiscale: bool = False  # True: the full SMCA of Sec. 3.3 (f16, f32, f64; Tables 1, 3, 4)
    feature_stride: int = 32  # single-scale: the map the encoder reads, 32 = C5 (the paper), 16 = C4
    ms_encoder: str = "IIMII"  # multi-scale encoder blocks, I intra / M multi (Table 3 2Intra-Multi-2Intra)
    intra_share: bool = True  # intra-scale blocks share weights across scales (Table 3 default)
    scale_selection: bool = True  # per-query alpha over scales, Eqs. (7)-(9) (Table 3 "w/o" = False)
    ms_dim_feedforward: int = 1024  # multi-scale FFN, encoder and decoder (Sec. 4.1; MSZ README)
    beta: float = 8.0  # official --smooth 8; the paper gives no value
    aux_loss: bool = True  # a Hungarian loss after every decoder layer
    loss_ce: float = 2.0  # the official code hard-codes 2
    loss_bbox: float = 5.0  # official --bbox_loss_coef
    loss_giou: float = 2.0  # official --giou_loss_coef
    focal_alpha: float = 0.25
    num_select: int = 300  # post-process top-k over queries x classes (official PostProcess)

    def strides(self):
        """The feature strides the decoder attends to."""
        return (16, 32, 64) if self.multiscale else (self.feature_stride,)

    def validate(self):
        check_choice(self, "scale_type", SCALE_TYPES)
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        if self.hidden_dim % 2:
            raise ValueError("hidden_dim must be even (half of it encodes y, half x)")
        check_at_least(self, ("num_classes", "dec_layers", "num_queries", "num_select", "dim_feedforward",
                              "ms_dim_feedforward"))
        check_at_least(self, ("enc_layers",), 0)
        if not self.ms_encoder or set(self.ms_encoder) - set("IM"):
            raise ValueError(f"ms_encoder must be a string of I (intra-scale) and M (multi-scale) blocks, "
                             f"got {self.ms_encoder!r}")
        if self.feature_stride not in (16, 32):
            raise ValueError(f"feature_stride must be 32 (C5) or 16 (C4), got {self.feature_stride}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def shapes_config():
    """CPU-sized SMCA for the built-in shapes set (what `python train.py --model smca` trains).

    A ResNet-18 pretrained on the shapes set (engine/pretrain.py; frozen BatchNorm as DETR's), read at C4
    (stride 16): at 128-192 px a side, C5 is 4-6 cells, so the prior's 2-cell sigma covers the image
    and most objects are a fraction of a cell; on C4 the cells per object are closer to COCO's on
    C5. Every SMCA mechanism is on; `spatial_prior=False` on it is the matching DETR baseline.
    No dropout: a few thousand steps are far from overfitting.
    """
    return Config(backbone_depth=18, backbone_norm="frozen_bn", hidden_dim=128, nheads=8, enc_layers=2,
                  dec_layers=3, dim_feedforward=512, ms_dim_feedforward=512, num_queries=50, num_select=100,
                  feature_stride=16, dropout=0.0)


# where train.py's shapes recipe differs for this model: 4 epochs (lr / 10 after 3), the ResNet in bf16 on a CPU with
# AMX (float32 elsewhere; docs/training-speed.md)
SHAPES_RECIPE = {"epochs": 4, "lr_drop": 3, "amp": "bf16-backbone"}
# train.py's COCO recipe: the official README's single-scale command (main.py --epochs 50 --lr_drop 40 --batch_size 2
# on 8 GPUs) and main.py's defaults for the rest
COCO_RECIPE = {
    "epochs": 50,  # README (paper Sec. 4.1: 50 epochs)
    "lr_drop": 40,  # README --lr_drop 40 (paper: lr x 0.1 at epoch 40)
    "lr": 1e-4,  # main.py default (paper Sec. 4.1)
    "lr_backbone": 1e-5,  # main.py default (paper Sec. 4.1)
    "batch_size": 2,  # images per GPU: README --batch_size 2
    "total_batch": 16,  # README: 8 GPUs x 2 (paper: 8 GPUs x 1 = 8; its Table 2: 8 / 16 / 32 give 40.2 / 40.2 / 39.9)
    "weight_decay": 1e-4,  # main.py default
    "clip_max_norm": 0.1,  # main.py default
}


def build(cfg):
    """-> (model, criterion, postprocess)"""
    cfg.validate()
    model = SMCA(cfg)
    criterion = SetCriterion(cfg.num_classes, weight_ce=cfg.loss_ce, weight_bbox=cfg.loss_bbox,
                             weight_giou=cfg.loss_giou, focal_alpha=cfg.focal_alpha,
                             num_aux=cfg.dec_layers - 1 if cfg.aux_loss else 0)
    return model, criterion, PostProcess(cfg.num_select)


# ---------------------------------------------------------------------------------------------
# The authors' weights (official README's model zoo: single-scale R50 at 50 / 108 / 250 epochs)
# ---------------------------------------------------------------------------------------------

# official state-dict name -> ours, the first matching rule wins (DETR's names; point1-3 are the prior heads)
OFFICIAL_KEYS = [
    (r"^backbone\.0\.body\.", "backbone.body."),
    (r"^input_proj\.", "input_proj.0."),
    (r"^transformer\.encoder\.layers\.(\d+)\.", r"encoder.\1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.in_proj_(weight|bias)$",
     r"decoder.\1.cross_attn.in_proj.\2"),
    (r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.", r"decoder.\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.point1\.", r"decoder.\1.center_mlp."),
    (r"^transformer\.decoder\.layers\.(\d+)\.point2\.", r"decoder.\1.offset_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.point3\.", r"decoder.\1.scale_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.", r"decoder.\1."),
    (r"^transformer\.decoder\.norm\.", "decoder_norm."),
    (r"^(query_embed|class_embed|bbox_embed)\.", r"\1."),
]

# What the entry points read: where the authors publish the weights from_official converts, and is_official (the
# keys from_official requires: DETR's query embedding and decoder cross-attention)
OFFICIAL_WEIGHTS = "github.com/gaopengcuhk/SMCA-DETR, README model zoo (single-scale R50 at 50 / 108 / 250 epochs)"
OFFICIAL_REQUIRED = ("query_embed.weight", "transformer.decoder.layers.0.multihead_attn.in_proj_weight")


def is_official(state):
    """Whether a state dict is the authors' released SMCA-DETR file: it holds the keys from_official requires."""
    return all(k in state for k in OFFICIAL_REQUIRED)


def from_official(source):
    """An official checkpoint (the file as released, {"model": state dict, "args": ...}, or a bare state
    dict) -> (Config, our state dict, notes on what was assumed). The configuration is read from the
    tensors (sizes, layer counts, scale type) and the official code's args when present (beta = --smooth); the
    92nd class row (DETR's no-object column, never trained under focal loss) is dropped. Raises
    ValueError naming the keys when the file is not a single-scale SMCA checkpoint."""
    ckpt = read_official(source, "SMCA-DETR", OFFICIAL_REQUIRED)
    state, args, notes = ckpt.state, ckpt.args, []
    blocks = ckpt.count("backbone.0.body.layer3.")
    point2 = state.get("transformer.decoder.layers.0.point2.weight")  # (2 H, C): the head offsets
    point3 = state.get("transformer.decoder.layers.0.point3.weight")  # (2 H or H, C): the scales
    H = point2.shape[0] // 2 if point2 is not None else 8
    if point3 is None:
        scale_type = "fixed"
    else:
        scale_type = "independent" if point3.shape[0] == 2 * H else "single"
    cfg = Config(
        hidden_dim=state["query_embed.weight"].shape[1],
        num_queries=state["query_embed.weight"].shape[0],
        nheads=H,
        enc_layers=ckpt.count("transformer.encoder.layers."),
        dec_layers=ckpt.count("transformer.decoder.layers."),
        dim_feedforward=state["transformer.decoder.layers.0.linear1.weight"].shape[0],
        num_classes=min(state["class_embed.weight"].shape[0], 91),
        spatial_prior=point2 is not None,
        scale_type=scale_type,
        beta=float(args.get("smooth", 8.0)),
        backbone_depth={6: 50, 23: 101}.get(blocks, 50),
        dropout=float(args.get("dropout", 0.1)),
    )
    if "smooth" not in args:
        notes.append("beta = 8 (official --smooth, not in the file)")
    if blocks not in (6, 23):
        notes.append("backbone: no ResNet-50 / 101 weights in the file; ResNet-50 assumed")
    if state["class_embed.weight"].shape[0] == 92:  # DETR's no-object column
        state = {**state, "class_embed.weight": state["class_embed.weight"][:91],
                 "class_embed.bias": state["class_embed.bias"][:91]}
    ours, unused = rename_keys(state, OFFICIAL_KEYS)
    with torch.device("meta"):  # the names and shapes only
        own = SMCA(cfg).state_dict()
    check_state_dict(ours, own, f"{ckpt.what} does not fit {cfg}", unused)
    return cfg, ours, notes


# ---------------------------------------------------------------------------------------------
# Fast paths (common.with_fast_path chooses them, here outside autograd only; tests compare each with
# the readable function it is attached to)
# ---------------------------------------------------------------------------------------------

@gaussian_log_prior.fast
def gaussian_log_prior_fast(points, grid, scales, factor, beta):
    """gaussian_log_prior's numbers, separable: dx^2 per column plus dy^2 per row, scaled in place."""
    w = int(grid[-1, 0]) + 1  # the last cell is (W_j - 1, H_j - 1); the grid runs row by row
    dx2 = (points[..., 0, None] - grid[:w, 0]) ** 2  # (B, Q, H, W_j)
    dy2 = (points[..., 1, None] - grid[::w, 1]) ** 2  # (B, Q, H, H_j)
    if scales is not None:
        dx2, dy2 = dx2 * scales[..., :1] ** 2, dy2 * scales[..., -1:] ** 2
    sqdist = (dx2[..., None, :] + dy2[..., :, None]).flatten(-2)  # (B, Q, H, N_j)
    return sqdist.mul_(-factor / beta)


if __name__ == "__main__":
    for multiscale in (False, True):
        model = build(Config(multiscale=multiscale))[0]
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"SMCA-DETR R50, 300 queries, multiscale={multiscale}: {n:,} trainable parameters")
        print(smoke_outputs(model))
