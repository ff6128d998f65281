"""Lite DETR: An Interleaved Multi-Scale Encoder for Efficient DETR.

Li, Zeng, Liu, Li, Gao, Zhang, Zhang. CVPR 2023. arXiv:2303.07335.
Official code: github.com/IDEA-Research/Lite-DETR @ 6392353 (called OFF below). It releases only
Lite-DINO; this file is Lite-Deformable DETR (the paper's Table 3 model), built on two-stage +
iterative-box-refinement Deformable DETR (fundamentalvision/Deformable-DETR, called DDETR).

The idea. About 75% of a 4-level encoder's tokens are the stride-8 map, so a dense deformable
encoder spends most of its compute on low-level tokens. Lite DETR splits the levels into
high-level F_H (the coarsest `enc_scale` maps, ~25% of tokens) and low-level F_L (the rest), and
interleaves: most encoder layers update only F_H (whose queries still sample from all levels), and
the last layer of each of B blocks updates every token. Key-aware deformable attention (KDA)
replaces the predicted attention weights by a softmax of query-key products over the sampled points.

    block (x B):  F_H <- EncLayer(Q = F_H, V = [F_L, F_H])   x (6/B - 1)     high-level update (Sec. 3.2)
                  [F_L, F_H] <- EncLayer(Q = [F_L, F_H], V = [F_L, F_H])       all-token update; F_L FFN small
    KDA:          dP = Q W_p;  K, V = Samp(S, p + dP) W_V;  out = softmax(Q W_q K^T / sqrt(d_k)) V   (Sec. 3.3)

Paper symbol -> variable:
    F_H, F_L                      memory[:, n_low:], memory[:, :n_low]; n_low = tokens of the finest L - enc_scale levels
    S1 .. S4 (S1 coarsest)        code levels 3 .. 0 (tokens are flattened finest level first, as OFF)
    H3L1 / H2L2                   Config.enc_scale = 3 / 2
    (A+1)xB                       Config.num_blocks = B; A = enc_layers / B (see below)
    KDA                           `KeyAwareDeformableAttention`; Config.kda_encoder, kda_decoder
    W_K (separate)                Config.kda_key_proj (OFF proj_key; default off: K is sampled from V)

Configurations by the paper's names (`Config.named(...)`; `cfg.name` gives a config's name):
    H3L1-(2+1)x3   enc_scale 3, num_blocks 3: [high, all] x 3      (the default; Table 3's best)
    H3L1-(3+1)x2   enc_scale 3, num_blocks 2: [high, high, all] x 2
    H3L1-(6+1)x1   enc_scale 3, num_blocks 1: [high x 5, all]
    H2L2-(2+1)x3   enc_scale 2, num_blocks 3
    dense          enc_scale 4, num_blocks 1, kda_encoder False: exactly the DDETR encoder (a test shows it)
"(A+1)xB" counts 6 layers in all, not (A+1)*B: each block has A-1 high-level layers and one all-token
layer, which performs both the A-th high-level update and the low-level one (OFF's schedule:
layer i updates all tokens when (i + 1) % (6 / B) == 0; Table 3's GFLOPs are consistent with it).

Parameter count (R50, 91 classes, H3L1-(2+1)x3, KDA in the encoder only): 41,552,793 trainable
(`python lite_detr.py` prints it; a test derives it). Derivation from the DDETR base, 40,959,129:
    + 6 encoder layers x (query_proj 256*256+256 - attention_weights (256+1)*128) = 6 x 32,896 = 197,376
    + 3 all-token layers x small FFN (2 x (256*256+256) + LayerNorm 512)          = 3 x 132,096 = 396,288
The paper says 41M. kda_decoder adds 6 x 32,896 more (41,750,169); (3+1)x2 and (6+1)x1 have 2 / 1
small FFNs (41,420,697 / 41,288,601); H2L2 counts like H3L1 (the split is a run-time slice).

Deviations from the paper / official code (OFF's behaviour is the default unless said):
- OFF is Lite-DINO; Lite-Deformable DETR's code is unreleased. We carry OFF's encoder schedule,
  all-token layers, small FFN and KDA onto the DDETR two-stage + box-refine base (300 proposals,
  FFN 1024, dropout 0.1, per-layer heads, class-agnostic two-stage loss). No denoising, no mixed
  query selection (DINO parts).
- The all-token layer: OFF (and the default) take ALL tokens as queries there, F_L and F_H alike.
  The paper's Fig. 2(b) draws only F_L as queries of the low-level update:
  `last_layer_queries="low"` (F_H then carries through that layer unchanged and the layer has no
  normal FFN unless low_ffn="normal").
- F_L's FFN in the all-token layers: OFF's `small_expand` (hidden = d_model, ReLU, own LayerNorm
  `norm22`) by default, `low_ffn="small"`. The paper's Lite-DDETR FFN is not published, and its
  Table 3 GFLOPs are lower than OFF's design gives on the DDETR base; they match an all-token layer
  whose F_L tokens skip the FFN (`low_ffn="none"`) to within a few percent (README,
  `python bench.py --model lite_detr`). `low_ffn="normal"` gives F_L the full FFN.
- KDA in the decoder: OFF's single `key_aware` flag puts KDA in the decoder cross-attention too.
  Whether Lite-DDETR did is unknown; the default follows the paper text (KDA in the encoder) and
  `kda_decoder=True` is OFF's Lite-DINO choice.
- KDA samples each location once when K = V (OFF samples the same tensor twice); with a separate
  W_K the key and value maps are sampled in one call. Same numbers, fewer grid_samples.
- Where KDA is off, the attention has no query_proj (OFF builds an unused one even then).
- As in sparse_detr.py: the input projections' GroupNorm skips padding (`masked_groupnorm=False`
  is OFF/DDETR's); the extra level's mask is computed exactly from the C5 mask; the two-stage
  top-k never picks padded tokens.
- State-dict keys map onto OFF/DDETR's as in sparse_detr.py (encoder.{i} -> transformer.encoder.layers.{i},
  decoder.{i} -> transformer.decoder.layers.{i}, ...); the small FFN keeps OFF's names
  linear12 / linear22 / norm22.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import (Backbone, MaskedGroupNorm, MLP, MSDeformAttn, PostProcess, SetCriterion,
                    deform_sampling_locations, encoder_reference_points, halve_mask, init_offset_ring_,
                    inverse_sigmoid, level_valid_ratios, ms_deform_sample_levels, sine_position_embedding,
                    token_proposals, valid_image_sizes)

LAST_LAYER_QUERIES = ("all", "low")
LOW_FFNS = ("small", "normal", "none")

# ---------------------------------------------------------------------------------------------
# Key-aware deformable attention (Sec. 3.3; the standard MSDeformAttn is in common.py)
# ---------------------------------------------------------------------------------------------


class KeyAwareDeformableAttention(nn.Module):
    """KDA (Sec. 3.3): sample keys and values at the deformable locations, weight them by
    softmax(q . k / sqrt(d_head)) over all L*P points of a head. No attention-weight Linear.

    Keys are the sampled values (OFF proj_key=False: W_K = W_V) unless key_proj, then
    K = Samp(key_proj(S)). Keys sampled in padding or outside the map are zero vectors and still
    get weight exp(0) (OFF does not mask them).
    """

    def __init__(self, d_model, n_levels, n_heads, n_points, key_proj=False):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.value_proj = nn.Linear(d_model, d_model)
        self.key_proj = nn.Linear(d_model, d_model) if key_proj else None
        self.query_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        init_offset_ring_(self.sampling_offsets, self.n_heads, self.n_levels, self.n_points)  # as MSDeformAttn
        for lin in (self.value_proj, self.key_proj, self.query_proj, self.output_proj):
            if lin is not None:  # OFF: xavier_uniform, bias 0
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_input, spatial_shapes, pad_mask):
        """As MSDeformAttn.forward; the returned weights are the key-aware softmax (B, Q, H, L, P)."""
        B, Q, C = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        D = C // H
        value = self.value_proj(value_input).masked_fill(pad_mask[..., None], 0.0).view(B, -1, H, D)  # (B, N, H, D)
        if self.key_proj is not None:  # sample [V | K] in one call
            key = self.key_proj(value_input).masked_fill(pad_mask[..., None], 0.0).view(B, -1, H, D)
            value = torch.cat([value, key], -1)  # (B, N, H, 2D)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        locs = deform_sampling_locations(reference_points, offsets, spatial_shapes)  # (B, Q, H, L, P, 2)
        q = self.query_proj(query).view(B, Q, H, D)  # (B, Q, H, D)
        core = kda_core_stacked if not torch.is_grad_enabled() else kda_core
        out, weights = core(value, spatial_shapes, locs, q)  # (B, Q, H*D), (B, Q, H, L, P)
        return self.output_proj(out), locs, weights


def kda_core(kv, spatial_shapes, locs, q):
    """The KDA core, level by level (the reference; used when autograd is on, where it is the fastest).

    kv (B, N, H, D) values (= keys), or (B, N, H, 2D) [values | keys]; locs (B, Q, H, L, P, 2);
    q (B, Q, H, D) -> out (B, Q, H*D), weights (B, Q, H, L, P).
    """
    B, Q, H, D = q.shape
    L, P = locs.shape[3], locs.shape[4]
    q = q.permute(0, 2, 3, 1).reshape(B * H, D, Q, 1) / math.sqrt(D)  # (B*H, D, Q, 1)
    levels = list(ms_deform_sample_levels(kv, spatial_shapes, locs))  # L x (B*H, Dv, Q, P)
    logits = torch.cat([(s[:, -D:] * q).sum(1) for s in levels], -1)  # (B*H, Q, L*P): q . k_j / sqrt(D)
    weights = logits.softmax(-1).view(B * H, 1, Q, L, P)  # one softmax over all levels and points of a head
    out = sum((s[:, :D] * weights[:, :, :, lvl]).sum(-1) for lvl, s in enumerate(levels))  # (B*H, D, Q)
    out = out.view(B, H, D, Q).permute(0, 3, 1, 2).reshape(B, Q, H * D)  # heads concatenated
    return out, weights.view(B, H, Q, L, P).transpose(1, 2)


def kda_core_stacked(kv, spatial_shapes, locs, q):
    """The same numbers as kda_core, faster without autograd on large inputs: the sampled points are
    laid out channel-last once, then q . k and sum_j w_j v_j are two batched matmuls."""
    B, Q, H, D = q.shape
    L, P, Dv = locs.shape[3], locs.shape[4], kv.shape[-1]
    sampled = kv.new_empty(B * H, Q, L, P, Dv)  # (B*H, Q, L, P, Dv)
    for lvl, s in enumerate(ms_deform_sample_levels(kv, spatial_shapes, locs)):
        sampled[:, :, lvl] = s.permute(0, 2, 3, 1)  # (B*H, Dv, Q, P) -> (B*H, Q, P, Dv)
    sampled = sampled.view(B * H, Q, L * P, Dv)
    q = q.permute(0, 2, 1, 3).reshape(B * H, Q, 1, D)  # (B*H, Q, 1, D)
    weights = (torch.matmul(q, sampled[..., -D:].transpose(-1, -2)) / math.sqrt(D)).softmax(-1)  # (B*H, Q, 1, L*P)
    out = torch.matmul(weights, sampled[..., :D])  # (B*H, Q, 1, D)
    out = out.view(B, H, Q, D).transpose(1, 2).reshape(B, Q, H * D)
    return out, weights.view(B, H, Q, L, P).transpose(1, 2)


def make_attention(key_aware, d, n_levels, n_heads, n_points, key_proj=False):
    if key_aware:
        return KeyAwareDeformableAttention(d, n_levels, n_heads, n_points, key_proj)
    return MSDeformAttn(d, n_levels, n_heads, n_points)


# ---------------------------------------------------------------------------------------------
# The interleaved encoder (Sec. 3.2) and the decoder
# ---------------------------------------------------------------------------------------------


class LiteEncoderLayer(nn.Module):
    """Post-norm: deformable (or key-aware) self-attention, then FFN. Queries may be a subset of the
    tokens, the values are always all of them. In an all-token layer the queries that are F_L tokens
    (the first n_low) get `low_ffn`: "small" (OFF small_expand: d -> d -> d, own LayerNorm; OFF
    names linear12 / linear22 / norm22), "normal" (the layer's FFN) or "none" (no FFN)."""

    def __init__(self, d, ffn, dropout, n_levels, n_heads, n_points, key_aware, key_proj=False, low_ffn="normal",
                 normal_ffn=True):
        super().__init__()
        self.self_attn = make_attention(key_aware, d, n_levels, n_heads, n_points, key_proj)
        self.norm1 = nn.LayerNorm(d)
        if normal_ffn:
            self.linear1, self.linear2, self.norm2 = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.LayerNorm(d)
        self.low_ffn = low_ffn
        if low_ffn == "small":
            self.linear12, self.linear22, self.norm22 = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def ffn(self, x):
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def ffn_low(self, x):
        if self.low_ffn == "none":
            return x
        return self.norm22(x + self.dropout(self.linear22(self.dropout(F.relu(self.linear12(x))))))

    def forward(self, tgt, pos, reference_points, memory, spatial_shapes, pad_mask, n_low=0):
        """tgt, pos (B, S, C) the queried tokens, of which the first n_low are F_L; memory (B, N, C)
        all tokens -> (B, S, C)"""
        attn = self.self_attn(tgt + pos, reference_points, memory, spatial_shapes, pad_mask)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        if self.low_ffn == "normal" or not n_low:
            return self.ffn(tgt)
        if n_low == tgt.shape[1]:  # only F_L queries (last_layer_queries="low")
            return self.ffn_low(tgt)
        return torch.cat([self.ffn_low(tgt[:, :n_low]), self.ffn(tgt[:, n_low:])], 1)  # (B, S, C)


# Adapted from sparse_detr.DeformableDecoderLayer: the cross-attention may be key-aware
class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention among queries, deformable cross-attention into the memory, FFN."""

    def __init__(self, d, ffn, dropout, n_levels, n_heads, n_points, key_aware=False, key_proj=False):
        super().__init__()
        self.cross_attn = make_attention(key_aware, d, n_levels, n_heads, n_points, key_proj)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, pad_mask):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        ca, locs, weights = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, pad_mask)
        tgt = self.norm1(tgt + self.dropout(ca))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt, locs, weights


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


# Copied from sparse_detr.proposal_pos_embed
def proposal_pos_embed(proposals, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
    """Sine embedding of sigmoid(proposals) (B, Q, 4) -> (B, Q, 4 * num_pos_feats) (Deformable DETR)."""
    dim_t = torch.arange(num_pos_feats, dtype=proposals.dtype, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid()[..., None] * scale / dim_t  # (B, Q, 4, F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


class LiteDETR(nn.Module):
    """ResNet -> 4-level interleaved encoder (F_H updated often, F_L once per block) -> two-stage
    top-k queries -> deformable decoder with box refinement."""

    def __init__(self, cfg):
        super().__init__()
        d, L = cfg.hidden_dim, cfg.num_feature_levels
        self.cfg = cfg
        self.backbone = Backbone(cfg.backbone_depth, cfg.backbone_norm)
        in_ch = self.backbone.num_channels  # C3, C4, C5
        n_bb = min(L, len(in_ch))
        projs = [nn.Sequential(nn.Conv2d(c, d, 1), MaskedGroupNorm(32, d)) for c in in_ch[len(in_ch) - n_bb:]]
        for lvl in range(n_bb, L):  # extra levels: 3x3 stride-2 convs, the first on raw C5
            projs.append(nn.Sequential(nn.Conv2d(in_ch[-1] if lvl == n_bb else d, d, 3, 2, 1), MaskedGroupNorm(32, d)))
        self.input_proj = nn.ModuleList(projs)
        self.level_embed = nn.Parameter(torch.empty(L, d))
        has_low = cfg.enc_scale < L  # no F_L: every layer is a plain dense layer
        self.schedule = cfg.schedule()  # "high" / "all" per encoder layer
        self.encoder = nn.ModuleList(
            LiteEncoderLayer(d, cfg.dim_feedforward, cfg.dropout, L, cfg.nheads, cfg.enc_n_points, cfg.kda_encoder,
                             cfg.kda_key_proj, low_ffn=cfg.low_ffn if kind == "all" and has_low else "normal",
                             normal_ffn=not (kind == "all" and cfg.last_layer_queries == "low" and cfg.low_ffn != "normal"))
            for kind in self.schedule)
        self.decoder = nn.ModuleList(
            DeformableDecoderLayer(d, cfg.dim_feedforward, cfg.dropout, L, cfg.nheads, cfg.dec_n_points,
                                   cfg.kda_decoder, cfg.kda_key_proj)
            for _ in range(cfg.dec_layers))
        self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)  # two-stage
        self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        # heads: decoder layers 0..5 and the two-stage encoder head (index dec_layers)
        self.class_embed = nn.ModuleList(nn.Linear(d, cfg.num_classes) for _ in range(cfg.dec_layers + 1))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.dec_layers + 1))
        self._reset_parameters()

    def _reset_parameters(self):
        # DDETR DeformableTransformer._reset_parameters: xavier on every matrix, then the deformable inits
        for module in (self.encoder, self.decoder, self.enc_output, self.pos_trans):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, (MSDeformAttn, KeyAwareDeformableAttention)):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for cls, box in zip(self.class_embed, self.bbox_embed):
            nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))  # focal prior 0.01
            nn.init.zeros_(box.layers[-1].weight)  # boxes start at the reference / proposal
            nn.init.zeros_(box.layers[-1].bias)  # (two-stage: DDETR's bias[2:] = -2 is reset to 0)

    # Copied from sparse_detr.SparseDETR.proposal_features
    def proposal_features(self, memory, valid):
        """enc_output + LN of the tokens (invalid ones zeroed first): what the two-stage head and the
        scorer read. memory (B, N, C), valid (B, N) -> (B, N, C)"""
        return self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))

    # Copied from sparse_detr.SparseDETR.input_tokens
    def input_tokens(self, feats):
        """The backbone maps -> the encoder's flattened tokens: 1x1 conv + GroupNorm per backbone level,
        3x3 stride-2 convs for the extra levels, sine positions + a learned embedding per level.
        -> src (B, N, C), pos (B, N, C), pad_mask (B, N), masks [(B, H_l, W_l)]; finest level first."""
        cfg = self.cfg
        n_bb = min(cfg.num_feature_levels, len(feats))  # levels taken from the backbone (its last n_bb maps)
        maps, masks = [], []
        for lvl, proj in enumerate(self.input_proj):
            if lvl < n_bb:
                x, m = feats[len(feats) - n_bb + lvl]
            else:  # extra level: stride-2 conv on raw C5, then on the previous level
                x, m = (feats[-1][0] if lvl == n_bb else maps[-1]), halve_mask(masks[-1])
            x = proj[0](x)
            maps.append(proj[1](x, m if cfg.masked_groupnorm else None))  # (B, C, H_l, W_l)
            masks.append(m)
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in maps], 1)  # (B, N, C)
        pad = torch.cat([m.flatten(1) for m in masks], 1)  # (B, N)
        pos = [sine_position_embedding(m, cfg.hidden_dim // 2, offset=-0.5) for m in masks]  # DDETR: -0.5 offset
        pos = torch.cat([(p.to(src).flatten(2).transpose(1, 2) + self.level_embed[lvl]) for lvl, p in enumerate(pos)],
                        1)  # (B, N, C)
        return src, pos, pad, masks

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, images, pad_mask):
        """images (B, 3, H, W), pad_mask (B, H, W) True = padding -> dict (see forward_features)."""
        return self.forward_features(self.backbone(images, pad_mask), valid_image_sizes(pad_mask))

    def forward_features(self, feats, image_wh=None):
        """Everything after the backbone. feats: the backbone's [(C3, m3), (C4, m4), (C5, m5)].

        Returns pred_logits (B, Q, K), pred_boxes (B, Q, 4) cxcywh in [0, 1] of the unpadded image,
        aux_outputs (decoder layers 0..4), enc_outputs (the two-stage head on all tokens),
        spatial_shapes, token_pad_mask (B, N), n_low (the F_L token count), and the decoder's
        dec_sampling_locations (B, layers, Q, H, L, P, 2) and dec_attention_weights (B, layers, Q, H, L, P).
        image_wh is unused (the deformable models read the unpadded size from the masks) and kept
        for the shared signature.
        """
        memory, out = self.encode(feats)
        return self.decode(memory, out)

    def encode(self, feats):
        """Input projections and the interleaved encoder (Sec. 3.2).
        -> memory (B, N, C) and a dict with the geometry."""
        src, pos, pad, masks = self.input_tokens(feats)  # (B, N, C), (B, N, C), (B, N), [(B, H_l, W_l)]
        spatial_shapes = [tuple(m.shape[-2:]) for m in masks]
        valid_ratios = level_valid_ratios(masks)  # (B, L, 2)
        ref = encoder_reference_points(spatial_shapes, valid_ratios)  # (B, N, L, 2)
        n_low = sum(h * w for h, w in spatial_shapes[:self.cfg.num_feature_levels - self.cfg.enc_scale])  # |F_L|
        memory = self.run_encoder(src, pos, ref, spatial_shapes, pad, n_low)
        proposals, valid = token_proposals(masks)  # (B, N, 4), (B, N)
        return memory, {"spatial_shapes": spatial_shapes, "token_pad_mask": pad, "n_low": n_low,
                        "valid_ratios": valid_ratios, "proposals": proposals, "proposal_valid": valid}

    def run_encoder(self, src, pos, ref, spatial_shapes, pad, n_low):
        """The interleaved schedule. Tokens are [F_L, F_H] (finest levels first), n_low = |F_L|.
        src, pos (B, N, C); ref (B, N, L, 2); pad (B, N) -> memory (B, N, C)."""
        memory = src  # (B, N, C) all tokens; F_L goes stale between all-token layers
        pos_h, ref_h = pos[:, n_low:], ref[:, n_low:]  # (B, N - n_low, ...) F_H queries
        high = src[:, n_low:]  # (B, N - n_low, C)
        for kind, layer in zip(self.schedule, self.encoder):
            if kind == "high":  # Q = F_H, V = [stale F_L, current F_H]; only F_H changes
                high = layer(high, pos_h, ref_h, memory, spatial_shapes, pad)
                memory = torch.cat([memory[:, :n_low], high], 1)  # (B, N, C)
            elif self.cfg.last_layer_queries == "all":  # OFF: every token is a query
                memory = layer(memory, pos, ref, memory, spatial_shapes, pad, n_low)
                high = memory[:, n_low:]
            else:  # paper Fig. 2(b): Q = F_L only, F_H passes through
                low = layer(memory[:, :n_low], pos[:, :n_low], ref[:, :n_low], memory, spatial_shapes, pad, n_low)
                memory = torch.cat([low, high], 1)
        return memory

    # Adapted from sparse_detr.SparseDETR.decode: plain two-stage Deformable DETR queries (no
    # Efficient-DETR content init, class-agnostic ranking by logit 0)
    def decode(self, memory, out):
        """Two-stage query selection and the decoder with box refinement; fills `out`."""
        cfg = self.cfg
        spatial_shapes, pad, valid_ratios = out["spatial_shapes"], out["token_pad_mask"], out.pop("valid_ratios")
        proposals, valid = out.pop("proposals"), out.pop("proposal_valid")
        if cfg.num_queries > pad.shape[1]:
            raise ValueError(f"num_queries {cfg.num_queries} exceeds the {pad.shape[1]} encoder tokens of this "
                             f"batch: lower num_queries or use larger images")

        # --- two-stage: the top-scoring encoder tokens become the decoder's queries ---
        enc_feats = self.proposal_features(memory, valid)  # (B, N, C)
        head = cfg.dec_layers
        enc_logits = self.class_embed[head](enc_feats)  # (B, N, K)
        enc_coord = self.bbox_embed[head](enc_feats) + proposals  # (B, N, 4) logits
        out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_coord.sigmoid()}
        topk = enc_logits[..., 0].masked_fill(pad, float("-inf")).topk(cfg.num_queries, dim=1).indices  # (B, Q)
        ref_logit = enc_coord.gather(1, topk[..., None].expand(-1, -1, 4)).detach()  # (B, Q, 4)
        query = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(ref_logit, cfg.hidden_dim // 2)))  # (B, Q, 2C)
        query_pos, tgt = query.chunk(2, dim=-1)  # (B, Q, C) each

        # --- decoder with iterative box refinement ---
        reference = ref_logit.sigmoid()  # (B, Q, 4)
        logits, boxes, locs, weights = [], [], [], []
        for lid, layer in enumerate(self.decoder):
            ref_in = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, Q, L, 4)
            tgt, loc, w = layer(tgt, query_pos, ref_in, memory, spatial_shapes, pad)
            box = (self.bbox_embed[lid](tgt) + inverse_sigmoid(reference)).sigmoid()
            logits.append(self.class_embed[lid](tgt))
            boxes.append(box)
            locs.append(loc)
            weights.append(w)
            reference = box.detach()
        out.update(pred_logits=logits[-1], pred_boxes=boxes[-1],
                   dec_sampling_locations=torch.stack(locs, 1), dec_attention_weights=torch.stack(weights, 1))
        if cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


# ---------------------------------------------------------------------------------------------
# Config and build
# ---------------------------------------------------------------------------------------------

NAMED = {"H3L1-(2+1)x3": dict(enc_scale=3, num_blocks=3), "H3L1-(3+1)x2": dict(enc_scale=3, num_blocks=2),
         "H3L1-(6+1)x1": dict(enc_scale=3, num_blocks=1), "H2L2-(2+1)x3": dict(enc_scale=2, num_blocks=3),
         "dense": dict(enc_scale=4, num_blocks=1, kda_encoder=False)}


@dataclass
class Config:
    backbone_depth: int = 50  # ResNet-50 (Table 3)
    backbone_norm: str = "frozen_bn"  # FrozenBatchNorm2d, stem + layer1 frozen
    num_classes: int = 91  # largest COCO category id + 1 (train.py sets it from the data)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6  # OFF enc_layers: the total, whatever the blocks
    dec_layers: int = 6
    dim_feedforward: int = 1024  # DDETR
    dropout: float = 0.1  # DDETR (Lite-DINO: 0)
    num_feature_levels: int = 4  # C3, C4, C5 + a stride-2 conv on C5
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300  # DDETR two-stage proposals
    enc_scale: int = 3  # OFF enc_scale: the coarsest levels that are F_H (3: H3L1, 2: H2L2, 4: no F_L = dense)
    num_blocks: int = 3  # OFF num_expansion, B: each block = enc_layers / B - 1 high-level layers + 1 all-token layer
    last_layer_queries: str = "all"  # "all" (OFF); "low": only F_L queries the all-token layer (paper Fig. 2b)
    low_ffn: str = "small"  # F_L's FFN in all-token layers: "small" (OFF small_expand, d -> d -> d), "normal", "none"
    kda_encoder: bool = True  # key-aware attention in the encoder (Sec. 3.3)
    kda_decoder: bool = False  # KDA in the decoder cross-attention (OFF's Lite-DINO: True)
    kda_key_proj: bool = False  # OFF proj_key: a separate W_K on the input (default: K sampled from V)
    masked_groupnorm: bool = True  # False: DDETR's GroupNorm, whose statistics include the padding
    aux_loss: bool = True
    loss_ce: float = 2.0  # DDETR --cls_loss_coef
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    focal_alpha: float = 0.25
    num_select: int = 100  # post-process top-k (DDETR PostProcess)

    @classmethod
    def named(cls, name, **overrides):
        """Config.named("H3L1-(3+1)x2") -> the paper's configuration of that name (see NAMED)."""
        if name not in NAMED:
            raise ValueError(f"unknown Lite DETR configuration {name!r}; known: {', '.join(NAMED)}")
        return cls(**{**NAMED[name], **overrides})

    @property
    def name(self):
        """The paper's name for this schedule, e.g. "H3L1-(2+1)x3"."""
        if self.enc_scale == self.num_feature_levels:
            return "dense" if not self.kda_encoder else "dense+KDA"
        low = self.num_feature_levels - self.enc_scale
        return f"H{self.enc_scale}L{low}-({self.enc_layers // self.num_blocks}+1)x{self.num_blocks}"

    def schedule(self):
        """'high' / 'all' for each encoder layer: a layer updates all tokens when (i + 1) % (layers / B) == 0 (OFF)."""
        per_block = self.enc_layers // self.num_blocks
        return ["all" if (i + 1) % per_block == 0 else "high" for i in range(self.enc_layers)]

    def validate(self):
        if not 1 <= self.num_feature_levels <= 4:
            raise ValueError(f"num_feature_levels must be 1..4, got {self.num_feature_levels}")
        if not 1 <= self.enc_scale <= self.num_feature_levels:
            raise ValueError(f"enc_scale must be 1..num_feature_levels ({self.num_feature_levels}), got {self.enc_scale}")
        if self.num_blocks < 1 or self.enc_layers % self.num_blocks:
            raise ValueError(f"num_blocks must divide enc_layers ({self.enc_layers}), got {self.num_blocks}")
        if self.last_layer_queries not in LAST_LAYER_QUERIES:
            raise ValueError(f"last_layer_queries must be one of {LAST_LAYER_QUERIES}, got {self.last_layer_queries!r}")
        if self.low_ffn not in LOW_FFNS:
            raise ValueError(f"low_ffn must be one of {LOW_FFNS}, got {self.low_ffn!r}")
        if self.last_layer_queries == "low" and self.enc_scale == self.num_feature_levels:
            raise ValueError("last_layer_queries='low' needs low-level tokens: enc_scale < num_feature_levels")
        if self.hidden_dim % self.nheads or self.hidden_dim % 32:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by nheads {self.nheads} and by 32 "
                             f"(GroupNorm groups)")
        for name in ("num_classes", "enc_layers", "dec_layers", "num_queries", "num_select", "dim_feedforward",
                     "enc_n_points", "dec_n_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def shapes_config():
    """CPU-sized Lite DETR for the built-in shapes set (what `python train.py --model lite_detr` trains).

    A ResNet-18 pretrained on the shapes set (pretrain.py; frozen BatchNorm, as the papers' ImageNet
    backbone), d 128, no dropout (a few thousand steps are far from overfitting); every mechanism
    of the paper is on.
    """
    return Config(backbone_depth=18, backbone_norm="frozen_bn", hidden_dim=128, nheads=8, enc_layers=6,
                  dec_layers=3, dim_feedforward=512, num_queries=50, num_select=100, dropout=0.0)


# train.py's defaults on --data shapes (the ResNet-18 pretrained on shapes by pretrain.py; 2 epochs of
# 500 steps, lr / 10 after the first: about 20 minutes on 2 CPU cores, its six all-level KDA layers
# make it the slowest per step)
SHAPES_RECIPE = {"epochs": 2, "lr_drop": 1, "batch_size": 8, "lr": 4e-4, "lr_backbone": 1e-4, "eval_every": 1}
# DDETR recipe (Table 3 rows train 50 epochs): lr 2e-4, backbone 2e-5, drop at 40
COCO_RECIPE = {"lr": 2e-4, "lr_backbone": 2e-5}
# DDETR --lr_linear_proj_mult 0.1: parameters whose name contains these train at lr x 0.1
LR_MULTIPLIERS = {"sampling_offsets": 0.1, "reference_points": 0.1}


def build(cfg):
    """-> (model, criterion, postprocess)"""
    cfg.validate()
    criterion = SetCriterion(cfg.num_classes, weight_ce=cfg.loss_ce, weight_bbox=cfg.loss_bbox,
                             weight_giou=cfg.loss_giou, focal_alpha=cfg.focal_alpha,
                             num_aux=cfg.dec_layers - 1 if cfg.aux_loss else 0, encoder_labels="binary")
    return LiteDETR(cfg), criterion, PostProcess(cfg.num_select)


if __name__ == "__main__":
    for name in NAMED:
        model, _, _ = build(Config.named(name))
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"Lite-Deformable DETR R50 {name}: {n:,} trainable parameters, encoder {model.schedule}")
    model.eval()
    images, pad_mask = torch.randn(2, 3, 320, 480), torch.zeros(2, 320, 480, dtype=torch.bool)
    pad_mask[1, 200:, :] = True
    with torch.no_grad():
        out = model(images, pad_mask)
    print({k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)})
