"""Lite DETR: An Interleaved Multi-Scale Encoder for Efficient DETR.

Li, Zeng, Liu, Li, Gao, Zhang, Zhang. CVPR 2023. arXiv:2303.07335.
Official code: github.com/IDEA-Research/Lite-DETR @ 6392353. It releases only
Lite-DINO; this file is Lite-Deformable DETR (the paper's Table 3 model), built on two-stage +
iterative-box-refinement Deformable DETR (fundamentalvision/Deformable-DETR).

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
    F_H, F_L                      memory[:, n_low:], memory[:, :n_low]; n_low: the tokens of the finest
                                  L - enc_scale levels
    S1 .. S4 (S1 coarsest)        code levels 3 .. 0 (tokens are flattened finest level first, as the official code)
    H3L1 / H2L2                   Config.enc_scale = 3 / 2
    (A+1)xB                       Config.num_blocks = B; A = enc_layers / B (see below)
    KDA                           `KeyAwareDeformableAttention`; Config.kda_encoder, kda_decoder
    W_K (separate)                Config.kda_key_proj (official proj_key; default off: K is sampled from V)

Configurations by the paper's names (`Config.named(...)`; `cfg.name` gives a config's name):
    H3L1-(2+1)x3   enc_scale 3, num_blocks 3: [high, all] x 3      (the default; Table 3's best)
    H3L1-(3+1)x2   enc_scale 3, num_blocks 2: [high, high, all] x 2
    H3L1-(6+1)x1   enc_scale 3, num_blocks 1: [high x 5, all]
    H2L2-(2+1)x3   enc_scale 2, num_blocks 3
    dense          enc_scale 4, num_blocks 1, kda_encoder False: exactly the Deformable DETR encoder (a test shows it)
"(A+1)xB" counts 6 layers in all, not (A+1)*B: each block has A-1 high-level layers and one all-token
layer, which performs both the A-th high-level update and the low-level one (the official code's schedule:
layer i updates all tokens when (i + 1) % (6 / B) == 0; Table 3's GFLOPs are consistent with it).

Parameter count (R50, 91 classes, H3L1-(2+1)x3, KDA in the encoder only): 41,552,793 trainable
(`python lite_detr.py` prints it; a test derives it). Derivation from the Deformable DETR base, 40,959,129:
    + 6 encoder layers x (query_proj 256*256+256 - attention_weights (256+1)*128) = 6 x 32,896 = 197,376
    + 3 all-token layers x small FFN (2 x (256*256+256) + LayerNorm 512)          = 3 x 132,096 = 396,288
The paper says 41M. kda_decoder adds 6 x 32,896 more (41,750,169); (3+1)x2 and (6+1)x1 have 2 / 1
small FFNs (41,420,697 / 41,288,601); H2L2 counts like H3L1 (the split is a run-time slice).

Deviations from the paper / official code (the official code's behaviour is the default unless said):
- The official code is Lite-DINO; Lite-Deformable DETR's code is unreleased. We carry the official encoder schedule,
  all-token layers, small FFN and KDA onto the Deformable DETR two-stage + box-refine base (300 proposals,
  FFN 1024, dropout 0.1, per-layer heads, class-agnostic two-stage loss). No denoising, no mixed
  query selection (DINO parts).
- The all-token layer: the official code (and the default) take ALL tokens as queries there, F_L and F_H alike.
  The paper's Fig. 2(b) draws only F_L as queries of the low-level update:
  `last_layer_queries="low"` (F_H then carries through that layer unchanged and the layer has no
  normal FFN unless low_ffn="normal").
- F_L's FFN in the all-token layers: the official code's `small_expand` (hidden = d_model, ReLU, own LayerNorm
  `norm22`) by default, `low_ffn="small"`. The paper's Lite-Deformable DETR FFN is not published, and its
  Table 3 GFLOPs are lower than the official code's design gives on the Deformable DETR base; they match an
  all-token layer whose F_L tokens skip the FFN (`low_ffn="none"`) to within a few percent (docs/cost.md,
  `python -m tools.bench --model lite_detr`). `low_ffn="normal"` gives F_L the full FFN.
- KDA in the decoder: the official code's single `key_aware` flag puts KDA in the decoder cross-attention too.
  Whether Lite-Deformable DETR did is unknown; the default follows the paper text (KDA in the encoder) and
  `kda_decoder=True` is the official code's Lite-DINO choice.
- KDA samples each location once when K = V (the official code samples the same tensor twice); with a separate
  W_K the key and value maps are sampled in one call. Same numbers, fewer grid_samples.
- Where KDA is off, the attention has no query_proj (the official code builds an unused one even then).
- As in sparse_detr.py: the input projections' GroupNorm skips padding (`masked_groupnorm=False`
  is the official Deformable DETR's); the extra level's mask is computed exactly from the C5 mask (`extra_level_mask=
  "interpolate"` is Deformable DETR's); the two-stage top-k never picks padded tokens (`two_stage_over_padding`);
  each class and box head draws its own random weights at initialisation (Deformable DETR deep-copies one head).
- State-dict names follow Deformable DETR's as sparse_detr.py's OFFICIAL_KEYS maps them; the small FFN keeps
  the official code's names linear12 / linear22 / norm22. (No Lite-Deformable DETR weights were released.)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import (MLP, DeformableDecoderLayer, MSDeformAttn, PostProcess, SetCriterion, check_choice,
                    check_deformable_config, decode_with_box_refinement, deform_sampling_locations,
                    deformable_detr_init_, deformable_inputs, float32_under_autocast, gather_tokens, init_offset_ring_,
                    input_tokens, level_gradients, level_maps, ms_deform_sample_levels, points_major,
                    proposal_pos_embed, recomputes_samples, sample_points_major, sampler_backward, set_outputs,
                    smoke_outputs, two_stage_selection, weighted_sum_points_major, with_fast_path)

LAST_LAYER_QUERIES = ("all", "low")
LOW_FFNS = ("small", "normal", "none")

# ---------------------------------------------------------------------------------------------
# Key-aware deformable attention (Sec. 3.3; the standard MSDeformAttn is in common.py)
# ---------------------------------------------------------------------------------------------


class KeyAwareDeformableAttention(nn.Module):
    """KDA (Sec. 3.3): sample keys and values at the deformable locations, weight them by
    softmax(q . k / sqrt(d_head)) over all L*P points of a head. No attention-weight Linear.

    Keys are the sampled values (official proj_key=False: W_K = W_V) unless key_proj, then
    K = Samp(key_proj(S)). Keys sampled in padding or outside the map are zero vectors and still
    get weight exp(0) (the official code does not mask them).
    """

    def __init__(self, hidden_dim, num_levels, nheads, num_points, key_proj=False):
        super().__init__()
        self.num_levels, self.nheads, self.num_points = num_levels, nheads, num_points
        self.sampling_offsets = nn.Linear(hidden_dim, nheads * num_levels * num_points * 2)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.key_proj = nn.Linear(hidden_dim, hidden_dim) if key_proj else None
        self.query_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        init_offset_ring_(self.sampling_offsets, self.nheads, self.num_levels, self.num_points)  # as MSDeformAttn
        for lin in (self.value_proj, self.key_proj, self.query_proj, self.output_proj):
            if lin is not None:  # official: xavier_uniform, bias 0
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_input, spatial_shapes, pad_mask):
        """As MSDeformAttn.forward; the returned weights are the key-aware softmax (B, Q, H, L, P)."""
        B, Q, C = query.shape
        H, L, P = self.nheads, self.num_levels, self.num_points
        D = C // H
        value = self.value_proj(value_input).masked_fill(pad_mask[..., None], 0.0).view(B, -1, H, D)  # (B, N, H, D)
        if self.key_proj is not None:  # sample [V | K] in one call
            key = self.key_proj(value_input).masked_fill(pad_mask[..., None], 0.0).view(B, -1, H, D)
            value = torch.cat([value, key], -1)  # (B, N, H, 2D)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        locs = deform_sampling_locations(reference_points, offsets, spatial_shapes)  # (B, Q, H, L, P, 2)
        q = self.query_proj(query).view(B, Q, H, D)  # (B, Q, H, D)
        out, weights = kda_core(value, spatial_shapes, locs, q)  # (B, Q, H*D), (B, Q, H, L, P)
        return self.output_proj(out), locs, weights


@with_fast_path
def kda_core(kv, spatial_shapes, locs, q):
    """The KDA core, level by level: softmax(q . k_j / sqrt(D)) over a head's L*P sampled keys, then the
    weighted sum of the sampled values.

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


def make_attention(key_aware, hidden_dim, num_levels, nheads, num_points, key_proj=False):
    """KDA, or Deformable DETR's attention where KDA is off."""
    if key_aware:
        return KeyAwareDeformableAttention(hidden_dim, num_levels, nheads, num_points, key_proj)
    return MSDeformAttn(hidden_dim, num_levels, nheads, num_points)


# ---------------------------------------------------------------------------------------------
# The interleaved encoder (Sec. 3.2) and the decoder
# ---------------------------------------------------------------------------------------------


# Adapted from common.DeformableEncoderLayer: the F_L queries of an all-token layer get their own FFN
class LiteEncoderLayer(nn.Module):
    """Post-norm: deformable (or key-aware) self-attention, then FFN; the values are always all tokens.

    queries: which tokens query this layer, "high" (F_H; also every layer of the dense reduction,
    which has no F_L), "all" ([F_L, F_H], the official code's all-token layer) or "low" (F_L only, the paper's
    Fig. 2b). F_H queries get the normal FFN; F_L queries get `low_ffn`: "small" (official small_expand:
    d -> d -> d with its own LayerNorm; the official code names linear12 / linear22 / norm22), "normal" (the
    layer's FFN) or "none" (no FFN). A layer builds only the FFNs its queries use:

        queries   low_ffn            FFNs built
        high      (any)              normal
        all       small / none       normal (F_H) + small (F_L) / normal (F_H)
        all       normal             normal (both)
        low       small / none       small / nothing
        low       normal             normal
    """

    def __init__(self, hidden_dim, dim_feedforward, dropout, self_attn, queries="high", low_ffn="small"):
        super().__init__()
        C = hidden_dim
        self.self_attn = self_attn
        self.norm1 = nn.LayerNorm(C)
        self.queries, self.low_ffn = queries, (low_ffn if queries != "high" else None)
        if queries != "low" or low_ffn == "normal":
            self.linear1, self.linear2 = nn.Linear(C, dim_feedforward), nn.Linear(dim_feedforward, C)
            self.norm2 = nn.LayerNorm(C)
        if self.low_ffn == "small":
            self.linear12, self.linear22, self.norm22 = nn.Linear(C, C), nn.Linear(C, C), nn.LayerNorm(C)
        self.dropout = nn.Dropout(dropout)

    def ffn_high(self, x):
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def ffn_low(self, x):
        if self.low_ffn == "normal":
            return self.ffn_high(x)
        if self.low_ffn == "none":
            return x
        return self.norm22(x + self.dropout(self.linear22(self.dropout(F.relu(self.linear12(x))))))

    def forward(self, tgt, pos, reference_points, memory, spatial_shapes, pad_mask, n_low=0):
        """tgt, pos (B, S, C) the queried tokens, of which the first n_low are F_L (queries="all"); memory
        (B, N, C) all tokens -> (B, S, C)"""
        attn = self.self_attn(tgt + pos, reference_points, memory, spatial_shapes, pad_mask)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        if self.queries == "high":
            return self.ffn_high(tgt)
        if self.queries == "low":
            return self.ffn_low(tgt)
        return torch.cat([self.ffn_low(tgt[:, :n_low]), self.ffn_high(tgt[:, n_low:])], 1)  # (B, S, C)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LiteDETR(nn.Module):
    """ResNet -> 4-level interleaved encoder (F_H updated often, F_L once per block) -> Deformable DETR's
    class-agnostic two-stage queries and its box-refining decoder (common.py)."""

    def __init__(self, cfg):
        super().__init__()
        C, L = cfg.hidden_dim, cfg.num_feature_levels
        self.cfg = cfg
        self.backbone, self.input_proj, self.level_embed = deformable_inputs(cfg)  # ResNet, projections, (L, C)
        self.schedule = cfg.schedule()  # "high" / "all" per encoder layer
        self.encoder = nn.ModuleList()
        for kind in self.schedule:
            attention = make_attention(cfg.kda_encoder, C, L, cfg.nheads, cfg.enc_n_points, cfg.kda_key_proj)
            self.encoder.append(LiteEncoderLayer(C, cfg.dim_feedforward, cfg.dropout, attention,
                                                 queries=cfg.layer_queries(kind), low_ffn=cfg.low_ffn))
        self.decoder = nn.ModuleList()
        for _ in range(cfg.dec_layers):
            attention = make_attention(cfg.kda_decoder, C, L, cfg.nheads, cfg.dec_n_points, cfg.kda_key_proj)
            self.decoder.append(DeformableDecoderLayer(C, cfg.dim_feedforward, cfg.dropout, cfg.nheads, attention))
        self.enc_output, self.enc_output_norm = nn.Linear(C, C), nn.LayerNorm(C)  # two-stage
        self.pos_trans, self.pos_trans_norm = nn.Linear(2 * C, 2 * C), nn.LayerNorm(2 * C)
        # prediction heads: decoder layers 0..5 and the two-stage encoder head (index dec_layers)
        self.class_embed = nn.ModuleList(nn.Linear(C, cfg.num_classes) for _ in range(cfg.dec_layers + 1))
        self.bbox_embed = nn.ModuleList(MLP(C, C, 4, 3) for _ in range(cfg.dec_layers + 1))
        self._reset_parameters()

    def _reset_parameters(self):
        # Deformable DETR DeformableTransformer._reset_parameters and the heads' (common.deformable_detr_init_), KDA
        # initialised as MSDeformAttn
        deformable_detr_init_(self, [self.encoder, self.decoder, self.enc_output, self.pos_trans],
                              zip(self.class_embed, self.bbox_embed), (MSDeformAttn, KeyAwareDeformableAttention))

    def forward(self, images, pad_mask, targets=None, explain=False):
        """The shared interface (common.py). images (B, 3, H_img, W_img), pad_mask (B, H_img, W_img)
        True = padding; targets: unused (no denoising). Returns a dict:

            pred_logits (B, Q, K), pred_boxes (B, Q, 4)  the last decoder layer, cxcywh in [0, 1] of the unpadded image
            aux_outputs          decoder layers 0 .. dec_layers - 2 (when aux_loss)
            enc_outputs          the two-stage head on all N tokens (class-agnostic loss)
          with explain=True:
            spatial_shapes, token_pad_mask (B, N)   the token grid, finest level first
            n_low                |F_L|: tokens [0, n_low) are F_L, the rest F_H
            dec_sampling_locations (B, dec_layers, Q, H, L, P, 2), dec_attention_weights (B, dec_layers, Q, H, L, P)
                                 the decoder's cross-attention (key-aware weights with kda_decoder)
        """
        memory, geometry, out = self.encode(self.backbone(images, pad_mask), pad_mask, explain)
        out.update(self.decode(memory, geometry, targets, explain))
        return out

    def encode(self, feats, pad_mask, explain=False):
        """Input tokens and the interleaved encoder (Sec. 3.2). Tokens are [F_L, F_H] (finest levels
        first). feats: the backbone's [(C3, m3), (C4, m4), (C5, m5)]; pad_mask the images' (read with
        extra_level_mask="interpolate") -> memory (B, N, C), TokenGeometry, the F_L / F_H split (explain)."""
        cfg = self.cfg
        src, pos, geo = input_tokens(self.input_proj, self.level_embed, feats, cfg.masked_groupnorm, pad_mask,
                                     cfg.extra_level_mask)  # (B, N, C) x 2
        ref, shapes, pad = geo.reference_points, geo.spatial_shapes, geo.pad_mask  # (B, N, L, 2), [(H_l, W_l)], (B, N)
        n_low = sum(h * w for h, w in shapes[:cfg.num_feature_levels - cfg.enc_scale])  # |F_L|
        memory = src  # (B, N, C) all tokens; F_L goes stale between all-token layers
        high = src[:, n_low:]  # (B, N - n_low, C) F_H
        for layer in self.encoder:
            if layer.queries == "high":  # Q = F_H, V = [stale F_L, current F_H]; only F_H changes
                high = layer(high, pos[:, n_low:], ref[:, n_low:], memory, shapes, pad)
                memory = torch.cat([memory[:, :n_low], high], 1)  # (B, N, C)
            elif layer.queries == "all":  # official: every token is a query
                memory = layer(memory, pos, ref, memory, shapes, pad, n_low)
                high = memory[:, n_low:]
            else:  # paper Fig. 2(b): Q = F_L only, F_H passes through
                low = layer(memory[:, :n_low], pos[:, :n_low], ref[:, :n_low], memory, shapes, pad)
                memory = torch.cat([low, high], 1)
        out = {"spatial_shapes": shapes, "token_pad_mask": pad, "n_low": n_low} if explain else {}
        return memory, geo, out

    def decode(self, memory, geo, targets=None, explain=False):
        """Deformable DETR's two-stage query selection (class-agnostic ranking, queries from the
        proposals' sine embedding) and its decoder with box refinement. memory (B, N, C), TokenGeometry
        -> the detection outputs (a dict)."""
        cfg = self.cfg
        # --- two-stage: the top-scoring encoder tokens become the decoder's queries ---
        head = cfg.dec_layers
        sel = two_stage_selection(memory, geo, self.enc_output, self.enc_output_norm, self.class_embed[head],
                                  self.bbox_embed[head], cfg.num_queries, "first_class", cfg.two_stage_over_padding)
        ref_logit = gather_tokens(sel.boxes, sel.topk).detach()  # (B, Q, 4)
        embed = proposal_pos_embed(ref_logit, cfg.hidden_dim // 2)  # (B, Q, 2C)
        query_pos, tgt = self.pos_trans_norm(self.pos_trans(embed)).chunk(2, dim=-1)  # (B, Q, C) each

        # --- decoder with iterative box refinement (common.py) ---
        logits, boxes, locs, weights = decode_with_box_refinement(
            self.decoder, self.class_embed, self.bbox_embed, tgt, query_pos, ref_logit.sigmoid(), memory, geo)
        out = set_outputs(logits, boxes, cfg.aux_loss)
        out["enc_outputs"] = {"pred_logits": sel.logits, "pred_boxes": sel.boxes.sigmoid()}
        if explain:
            out["dec_sampling_locations"] = torch.stack(locs, 1)  # (B, dec_layers, Q, H, L, P, 2)
            out["dec_attention_weights"] = torch.stack(weights, 1)  # (B, dec_layers, Q, H, L, P)
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
    enc_layers: int = 6  # official enc_layers: the total, whatever the blocks
    dec_layers: int = 6
    dim_feedforward: int = 1024  # Deformable DETR
    dropout: float = 0.1  # Deformable DETR (Lite-DINO: 0)
    num_feature_levels: int = 4  # C3, C4, C5 + a stride-2 conv on C5
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300  # Deformable DETR two-stage proposals
    enc_scale: int = 3  # official enc_scale: the coarsest levels that are F_H (3: H3L1, 2: H2L2, 4: no F_L = dense)
    num_blocks: int = 3  # official num_expansion, B: a block = enc_layers / B - 1 high-level layers + 1 all-token layer
    last_layer_queries: str = "all"  # "all" (official); "low": only F_L queries the all-token layer (paper Fig. 2b)
    low_ffn: str = "small"  # F_L's FFN in all-token layers: "small" (official small_expand, d -> d -> d), "normal",
    # or "none"
    kda_encoder: bool = True  # key-aware attention in the encoder (Sec. 3.3)
    kda_decoder: bool = False  # KDA in the decoder cross-attention (the official code's Lite-DINO: True)
    kda_key_proj: bool = False  # official proj_key: a separate W_K on the input (default: K sampled from V)
    masked_groupnorm: bool = True  # False: Deformable DETR's GroupNorm, whose statistics include the padding
    extra_level_mask: str = "exact"  # "interpolate": Deformable DETR's extra-level mask, the image's mask resized
    two_stage_over_padding: bool = False  # True: Deformable DETR's two-stage top-k, which ranks padded tokens too
    aux_loss: bool = True
    loss_ce: float = 2.0  # Deformable DETR --cls_loss_coef
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    focal_alpha: float = 0.25
    num_select: int = 100  # post-process top-k (Deformable DETR PostProcess)

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
        """'high' / 'all' for each encoder layer: a layer updates all tokens when (i + 1) % (layers / B) == 0, as the
        official code schedules them."""
        per_block = self.enc_layers // self.num_blocks
        return ["all" if (i + 1) % per_block == 0 else "high" for i in range(self.enc_layers)]

    def layer_queries(self, kind):
        """Which tokens query an encoder layer of `schedule()` kind: "high" (F_H), "all" or "low" (F_L)."""
        if kind == "high" or self.enc_scale == self.num_feature_levels:  # no F_L: every token is F_H
            return "high"
        return self.last_layer_queries

    def validate(self):
        check_deformable_config(self)
        if not 1 <= self.enc_scale <= self.num_feature_levels:
            raise ValueError(f"enc_scale must be 1..num_feature_levels ({self.num_feature_levels}), "
                             f"got {self.enc_scale}")
        if self.num_blocks < 1 or self.enc_layers % self.num_blocks:
            raise ValueError(f"num_blocks must divide enc_layers ({self.enc_layers}), got {self.num_blocks}")
        check_choice(self, "last_layer_queries", LAST_LAYER_QUERIES)
        check_choice(self, "low_ffn", LOW_FFNS)
        if self.last_layer_queries == "low" and self.enc_scale == self.num_feature_levels:
            raise ValueError("last_layer_queries='low' needs low-level tokens: enc_scale < num_feature_levels")


def shapes_config():
    """CPU-sized Lite DETR for the built-in shapes set (what `python train.py --model lite_detr` trains).

    A ResNet-18 pretrained on the shapes set (engine/pretrain.py; frozen BatchNorm, as the papers' ImageNet
    backbone), d 128, no dropout (a few thousand steps are far from overfitting); every mechanism
    of the paper is on.
    """
    return Config(backbone_depth=18, backbone_norm="frozen_bn", hidden_dim=128, nheads=8, enc_layers=6,
                  dec_layers=3, dim_feedforward=512, num_queries=50, num_select=100, dropout=0.0)


# where train.py's shapes recipe differs for this model: lr / 10 after the first of its 2 epochs
SHAPES_RECIPE = {"lr_drop": 1}
# train.py's COCO recipe: Deformable DETR's (the paper's Table 3 rows train 50 epochs "as Deformable DETR"; the authors
# release no Lite-Deformable DETR code): its README and main.py defaults
COCO_RECIPE = {
    "epochs": 50,  # Table 3 (Deformable DETR main.py --epochs 50)
    "lr_drop": 40,  # Deformable DETR main.py --lr_drop 40
    "lr": 2e-4,  # Deformable DETR main.py --lr
    "lr_backbone": 2e-5,  # Deformable DETR main.py --lr_backbone
    "batch_size": 2,  # images per GPU: Deformable DETR main.py --batch_size 2
    "total_batch": 32,  # Deformable DETR README: "total batch size of 32" (16 GPUs x 2)
    "weight_decay": 1e-4,  # Deformable DETR main.py --weight_decay
    "clip_max_norm": 0.1,  # Deformable DETR main.py --clip_max_norm
}
# Deformable DETR --lr_linear_proj_mult 0.1: parameters whose name contains these train at lr x 0.1 (Deformable
# DETR also names reference_points, a layer of single-stage Deformable DETR that the two-stage model does not have)
LR_MULTIPLIERS = {"sampling_offsets": 0.1}


def build(cfg):
    """-> (model, criterion, postprocess)"""
    cfg.validate()
    criterion = SetCriterion(cfg.num_classes, weight_ce=cfg.loss_ce, weight_bbox=cfg.loss_bbox,
                             weight_giou=cfg.loss_giou, focal_alpha=cfg.focal_alpha,
                             num_aux=cfg.dec_layers - 1 if cfg.aux_loss else 0, encoder_labels="binary")
    return LiteDETR(cfg), criterion, PostProcess(cfg.num_select)


# ---------------------------------------------------------------------------------------------
# The authors' weights: none to convert (no from_official)
# ---------------------------------------------------------------------------------------------

# What the entry points read: why there are no weights, and is_official (no file is)
OFFICIAL_WEIGHTS = ("none: the authors (github.com/IDEA-Research/Lite-DETR) released Lite-DINO only, not this file's "
                    "Lite-Deformable DETR")


def is_official(state):
    """Whether a state dict is the authors' released file of this model: never (OFFICIAL_WEIGHTS says why)."""
    return False


# ---------------------------------------------------------------------------------------------
# Fast paths (common.with_fast_path chooses them; tests compare each with the readable function it is
# attached to, values and gradients)
# ---------------------------------------------------------------------------------------------

def kda_weights_points_major(samples, q, D):
    """The key-aware weights from points-major samples (B*H, Dv, P, Q) per level (keys: the last D channels) and
    q (B*H, D, 1, Q) already divided by sqrt(D): softmax over a head's L*P keys of q . k_j -> (B*H, L, P, Q)."""
    logits = samples[0].new_zeros(samples[0].shape[0], len(samples), samples[0].shape[2], samples[0].shape[3])
    Dv = samples[0].shape[1]
    for lvl, sampled in enumerate(samples):
        for d in range(D):  # q . k_j / sqrt(D), one channel at a time: contiguous (B*H, P, Q) slabs
            logits[:, lvl].addcmul_(sampled[:, Dv - D + d], q[:, d])
    BH, L, P, Q = logits.shape
    return logits.view(BH, L * P, Q).softmax(1).view(BH, L, P, Q)


class KDAFunction(torch.autograd.Function):
    """kda_core with its backward written out: the softmax's and both products' gradients in a few whole-level
    ops, then grid_sample's backward per level (no graph of per-channel products)."""

    @staticmethod
    def forward(ctx, kv, locs, q, spatial_shapes):
        B, Q, H, D = q.shape
        maps = level_maps(kv, spatial_shapes)
        grids, _ = points_major(locs)
        q_s = q.permute(0, 2, 3, 1).reshape(B * H, D, 1, Q) / math.sqrt(D)
        samples = sample_points_major(maps, grids)  # per level (B*H, Dv, P, Q)
        weights = kda_weights_points_major(samples, q_s, D)  # (B*H, L, P, Q)
        out = weighted_sum_points_major([s[:, :D] for s in samples], weights)  # (B*H, D, Q)
        ctx.save_for_backward(kv, locs, q_s, weights, *([] if recomputes_samples() else samples))
        ctx.spatial_shapes = spatial_shapes
        ctx.set_materialize_grads(False)  # the weights output is read only by pictures: no zero gradient for it
        out = out.view(B, H, D, Q).permute(0, 3, 1, 2).reshape(B, Q, H * D)
        return out, weights.view(B, H, *weights.shape[1:]).permute(0, 4, 1, 2, 3)  # (B, Q, H, L, P)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_weights_out):
        kv, locs, q_s, weights, *samples = ctx.saved_tensors
        B, Q, H, L, P, _ = locs.shape
        D, Dv = q_s.shape[1], kv.shape[-1]
        maps = level_maps(kv, ctx.spatial_shapes)
        grids, _ = points_major(locs)
        samples = samples or sample_points_major(maps, grids)  # common.recompute_sampling: sampled again
        if g_out is None:
            g_out = q_s.new_zeros(B, Q, H * D)
        g = g_out.reshape(B, Q, H, D).permute(0, 2, 3, 1).reshape(B * H, D, 1, Q)
        g_w = torch.stack([(s[:, :D] * g).sum(1) for s in samples], 1)  # (B*H, L, P, Q): d out / d w = the value
        if g_weights_out is not None:
            g_w = g_w + g_weights_out.permute(0, 2, 3, 4, 1).reshape(B * H, L, P, Q)
        g_logits = weights * (g_w - (weights * g_w).sum((1, 2), keepdim=True))  # the softmax's backward
        g_q, g_maps, g_grids = 0, [], []
        for lvl, sampled in enumerate(samples):
            g_v, g_k = g * weights[:, None, lvl], q_s * g_logits[:, None, lvl]  # (B*H, D, P, Q) each
            g_q = g_q + (sampled[:, Dv - D:] * g_logits[:, None, lvl]).sum(2)  # (B*H, D, Q)
            g_s = g_v + g_k if Dv == D else torch.cat([g_v, g_k], 1)  # values are the keys, or [values | keys]
            g_map, g_grid = sampler_backward(g_s, maps, grids, lvl, *ctx.needs_input_grad[:2])
            g_maps.append(g_map)
            g_grids.append(g_grid)
        g_kv = level_gradients(g_maps, B, H) if ctx.needs_input_grad[0] else None
        g_locs = None
        if ctx.needs_input_grad[1]:
            g_locs = 2 * torch.stack(g_grids, 1).view(B, H, L, P, Q, 2).permute(0, 4, 1, 2, 3, 5)
        g_q = (g_q / math.sqrt(D)).view(B, H, D, Q).permute(0, 3, 1, 2)  # (B, Q, H, D)
        return g_kv, g_locs, g_q, None


@kda_core.fast_with_autograd
@float32_under_autocast
def kda_core_fast(kv, spatial_shapes, locs, q):
    """kda_core's numbers, faster: the points are sampled points-major, so each point's keys and values are
    contiguous slabs; q . k and the weighted values are accumulated in place (no channel-last copy of the samples,
    no product tensor); KDAFunction, also outside autograd."""
    return KDAFunction.apply(kv, locs, q, spatial_shapes)


if __name__ == "__main__":
    for name in NAMED:
        model = build(Config.named(name))[0]
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"Lite-Deformable DETR R50 {name}: {n:,} trainable parameters, encoder {model.schedule}")
    print(smoke_outputs(model))
