"""SMCA-DETR: Fast Convergence of DETR with Spatially Modulated Co-Attention.

Gao, Zheng, Wang, Dai, Li. ICCV 2021. arXiv:2101.07448 (v1) / 2108.02404.
Official code: github.com/gaopengcuhk/SMCA-DETR (single-scale only; called OFF below).

The idea. DETR's decoder queries start by attending to the whole image, and learning where to look
is what makes DETR need 500 epochs. SMCA predicts, for every query, a centre and (per head) an
offset and a scale, and adds the log of a Gaussian around that point to the cross-attention
logits, so each query starts by looking near its own location:

    C_h = softmax(K_h^T Q_h / sqrt(d) + log G_h) V_h                        (Eq. 5)
    log G_h(i, j) = -((i - c_x,h)^2 s_x,h^2 + (j - c_y,h)^2 s_y,h^2) / beta  (Eq. 3-4, as OFF computes it)

The box head adds the centre's pre-sigmoid logit to its (cx, cy) output, so boxes are regressed
relative to the point the query attends around. With focal loss and 300 queries this reaches
41.0 AP in 50 epochs where DETR has 34.8 (Table 2).

Paper symbol -> variable (single-scale):
    c_h, c_w (normalised centre)     center_logit.sigmoid(), from `center_mlp` (OFF point1), layer 0 only
    centre in feature cells          center = sigmoid(center_logit) * cells_wh, cells of the UNPADDED image
    head offsets                     `offset_proj` (OFF point2), (B, N, H, 2) in cells, every layer
    s_h, s_w                         `scale_proj` (OFF point3), (B, N, H, 2), every layer
    beta                             Config.beta (OFF --smooth 8)
    log G                            log_prior (B, H, N, L), added to the cross-attention logits

Deviations from the paper / official code:
- Follows OFF where the paper differs: the centre MLP has 3 layers (paper: 2); the centre comes
  from layer 0 and is reused unchanged by layers 1-5; the scale MULTIPLIES the squared distance
  (s_code = 1 / s_paper), initialised to 1; beta is a constant 8; the prior heads read an extra
  LayerNorm(tgt + query_pos) of the layer input (OFF norm4), not the cross-attention query.
- 91 class logits (the largest COCO id + 1). OFF has a 92nd "no-object" column left over from DETR
  that focal loss never trains as positive; dropping it removes 257 parameters.
- OFF reads each image's unpadded size from the targets, even at inference (its issues #9/#11);
  we derive it from pad_mask, so the model needs no targets.
- The cross-attention keeps one packed in-projection like nn.MultiheadAttention (same init, same
  parameter count) but computes the logits explicitly, so the prior is visible in the code.
- `spatial_prior=False` is the paper's DETR baseline (focal loss, 300 queries, Table 2): no prior,
  no centre heads, boxes from the MLP alone.
- The multi-scale encoder and scale-selection attention (Sec. 3.3) are not in this file yet.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import (MLP, Backbone, PostProcess, SetCriterion, sine_position_embedding, valid_image_sizes)

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention (positions on q, k) then FFN."""

    def __init__(self, d_model, nheads, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, pad_mask):
        """src, pos (B, L, C); pad_mask (B, L) -> (B, L, C)"""
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, key_padding_mask=pad_mask, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class GaussianCrossAttention(nn.Module):
    """Multi-head attention with an additive log-prior on the logits: softmax(QK^T/sqrt(d) + log G) V (Eq. 5).

    Parameters are laid out as nn.MultiheadAttention's (packed in_proj, out_proj), as in OFF's
    GaussianMultiheadAttention; attention dropout as DETR.
    """

    def __init__(self, d_model, nheads, dropout):
        super().__init__()
        self.nheads = nheads
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, key, value, pad_mask, log_prior=None):
        """query (B, N, C); key, value (B, L, C); pad_mask (B, L); log_prior (B, H, N, L) -> (B, N, C)"""
        B, N, C = query.shape
        H = self.nheads
        w_q, w_k, w_v = self.in_proj.weight.chunk(3)
        b_q, b_k, b_v = self.in_proj.bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, D)
        k = F.linear(key, w_k, b_k).view(B, -1, H, C // H).transpose(1, 2)  # (B, H, L, D)
        v = F.linear(value, w_v, b_v).view(B, -1, H, C // H).transpose(1, 2)  # (B, H, L, D)
        logits = q @ k.transpose(-1, -2) / math.sqrt(C // H)  # (B, H, N, L)
        if log_prior is not None:
            logits = logits + log_prior  # Eq. (5): the Gaussian enters as log G, exp is never taken
        logits = logits.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        attn = self.dropout(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.out_proj(out)


# ---------------------------------------------------------------------------------------------
# Spatially modulated co-attention (Sec. 3.2)
# ---------------------------------------------------------------------------------------------

SCALE_TYPES = ("fixed", "single", "independent")  # OFF --dynamic_scale type1 / type2 / type3 (Table 2)


class SMCADecoderLayer(nn.Module):
    """DETR decoder layer whose cross-attention is modulated by a per-query, per-head Gaussian.

    The prior is predicted from out = LayerNorm(tgt + query_pos) of the layer's INPUT (OFF norm4):
    layer 0 predicts the shared centre (3-layer MLP), every layer its own head offsets and scales.
    """

    def __init__(self, cfg, first):
        super().__init__()
        d, H = cfg.hidden_dim, cfg.nheads
        self.nheads, self.beta, self.scale_type = H, cfg.beta, cfg.scale_type
        self.self_attn = nn.MultiheadAttention(d, H, dropout=cfg.dropout, batch_first=True)
        self.cross_attn = GaussianCrossAttention(d, H, cfg.dropout)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.spatial_prior = cfg.spatial_prior
        if cfg.spatial_prior:
            self.norm4 = nn.LayerNorm(d)
            self.center_mlp = MLP(d, d, 2, 3) if first else None  # OFF point1 (paper: 2 layers)
            self.offset_proj = nn.Linear(d, 2 * H)  # OFF point2: (dx, dy) per head
            if cfg.scale_type != "fixed":  # OFF point3: s per head (single) or (s_x, s_y) per head
                self.scale_proj = nn.Linear(d, H if cfg.scale_type == "single" else 2 * H)

    def log_prior(self, out, center_logit, cells_wh, grid):
        """log G (B, H, N, L) from out (B, N, C), centre logit (B, N, 2), unpadded size in cells (B, 2), grid (L, 2)."""
        B, N, _ = out.shape
        center = center_logit.sigmoid() * cells_wh[:, None, :]  # (B, N, 2) in cells of the unpadded image
        points = center[:, :, None, :] + self.offset_proj(out).view(B, N, self.nheads, 2)  # (B, N, H, 2)
        sqdist = (points[:, :, :, None, :] - grid) ** 2  # (B, N, H, L, 2): (dx^2, dy^2) to every cell
        if self.scale_type == "fixed":
            weighted = sqdist.sum(-1)  # (B, N, H, L)
        elif self.scale_type == "single":
            s = self.scale_proj(out).view(B, N, self.nheads, 1, 1)
            weighted = (sqdist * s ** 2).sum(-1)
        else:
            s = self.scale_proj(out).view(B, N, self.nheads, 1, 2)
            weighted = (sqdist * s ** 2).sum(-1)  # s_x^2 dx^2 + s_y^2 dy^2
        return (-weighted / self.beta).transpose(1, 2)  # (B, H, N, L)

    def forward(self, tgt, query_pos, memory, pos, pad_mask, grid, cells_wh, center_logit=None):
        """tgt, query_pos (B, N, C); memory, pos (B, L, C); pad_mask (B, L).

        Returns tgt (B, N, C), the centre logit (B, N, 2) (predicted here in layer 0, else passed
        through) and log G (B, H, N, L) or None.
        """
        log_prior = None
        if self.spatial_prior:
            out = self.norm4(tgt + query_pos)  # drives this layer's prior (OFF norm4)
            if center_logit is None:
                center_logit = self.center_mlp(out)  # (B, N, 2) as (x, y)
            log_prior = self.log_prior(out, center_logit, cells_wh, grid)
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        ca = self.cross_attn(tgt + query_pos, memory + pos, memory, pad_mask, log_prior)
        tgt = self.norm2(tgt + self.dropout(ca))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt, center_logit, log_prior


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SMCA(nn.Module):
    """Single-scale SMCA-DETR: ResNet C5 -> DETR encoder -> SMCA decoder -> class / box heads."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.backbone = Backbone(cfg.backbone_depth, cfg.backbone_norm)
        self.stride = self.backbone.strides[-1]  # 32: C5
        self.input_proj = nn.Conv2d(self.backbone.num_channels[-1], d, 1)
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(SMCADecoderLayer(cfg, first=(i == 0)) for i in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.class_embed = nn.Linear(d, cfg.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self):
        # OFF Transformer._reset_parameters: xavier_uniform on every matrix of encoder and decoder
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.decoder:
            nn.init.zeros_(layer.cross_attn.in_proj.bias)  # as nn.MultiheadAttention
            nn.init.zeros_(layer.cross_attn.out_proj.bias)
            if hasattr(layer, "scale_proj"):  # s = 1 at init: log G = -d^2/beta, sigma = 2 cells
                nn.init.zeros_(layer.scale_proj.weight)
                nn.init.ones_(layer.scale_proj.bias)
        # focal-loss prior: every class starts at probability 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, images, pad_mask):
        """images (B, 3, H, W), pad_mask (B, H, W) True = padding -> dict (see forward_features)."""
        c5, mask = self.backbone(images, pad_mask)[-1]  # (B, 2048, H/32, W/32), (B, H/32, W/32)
        return self.forward_features(c5, mask, valid_image_sizes(pad_mask))

    def forward_features(self, c5, mask, image_wh):
        """Everything after the backbone.

        c5 (B, C5, Hf, Wf); mask (B, Hf, Wf) True = padding; image_wh (B, 2) unpadded size in pixels.
        Returns pred_logits (B, Q, K), pred_boxes (B, Q, 4) cxcywh in [0, 1] of the unpadded image,
        aux_outputs (one dict per earlier decoder layer, when aux_loss), centers (B, Q, 2) the queries' Gaussian
        centres (x, y) in [0, 1] (absent when spatial_prior is off), log_priors [(B, H, Q, L)] per layer.
        """
        B, _, Hf, Wf = c5.shape
        src = self.input_proj(c5).flatten(2).transpose(1, 2)  # (B, L, C), L = Hf*Wf
        pos = sine_position_embedding(mask, self.cfg.hidden_dim // 2).flatten(2).transpose(1, 2).to(src)  # (B, L, C)
        pad = mask.flatten(1)  # (B, L)
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, pad)

        ys, xs = torch.meshgrid(torch.arange(Hf, device=c5.device), torch.arange(Wf, device=c5.device), indexing="ij")
        grid = torch.stack([xs, ys], dim=-1).view(-1, 2).to(src)  # (L, 2) integer (x, y) cell indices
        cells_wh = image_wh.to(src) / self.stride  # (B, 2) unpadded size in cells
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, Q, C)
        tgt = torch.zeros_like(query_pos)
        hs, log_priors, center_logit = [], [], None
        for layer in self.decoder:
            tgt, center_logit, log_prior = layer(tgt, query_pos, memory, pos, pad, grid, cells_wh, center_logit)
            hs.append(self.decoder_norm(tgt))
            log_priors.append(log_prior)
        hs = torch.stack(hs)  # (L_dec, B, Q, C)

        logits = self.class_embed(hs)  # (L_dec, B, Q, K)
        raw = self.bbox_embed(hs)  # (L_dec, B, Q, 4) cxcywh logits
        if center_logit is not None:  # boxes are regressed around the Gaussian centre (OFF detr.py)
            raw = torch.cat([raw[..., :2] + center_logit, raw[..., 2:]], dim=-1)
        boxes = raw.sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if center_logit is not None:
            out["centers"] = center_logit.sigmoid()
            out["log_priors"] = log_priors
        return out


# ---------------------------------------------------------------------------------------------
# Config and build
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    backbone_depth: int = 50  # ResNet-50 (Sec. 4.1)
    backbone_norm: str = "frozen_bn"  # DETR: FrozenBatchNorm2d, stem + layer1 frozen
    num_classes: int = 91  # logits: largest COCO category id + 1 (train.py sets it from the data)
    hidden_dim: int = 256  # OFF --hidden_dim
    nheads: int = 8  # OFF hard-codes 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048  # OFF main.py default
    dropout: float = 0.1  # also on attention weights
    num_queries: int = 300  # OFF README (--num_queries 300); the paper's setting
    spatial_prior: bool = True  # False: the paper's DETR baseline (focal loss, 300 queries; Table 2)
    scale_type: str = "independent"  # OFF README --dynamic_scale type3 (Table 2 "Indep.")
    beta: float = 8.0  # OFF --smooth 8; the paper gives no value
    aux_loss: bool = True  # a Hungarian loss after every decoder layer
    loss_ce: float = 2.0  # OFF hard-codes 2
    loss_bbox: float = 5.0  # OFF --bbox_loss_coef
    loss_giou: float = 2.0  # OFF --giou_loss_coef
    focal_alpha: float = 0.25
    num_select: int = 300  # post-process top-k over queries x classes (OFF PostProcess)

    def validate(self):
        if self.scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {self.scale_type!r}")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        if self.hidden_dim % 2:
            raise ValueError("hidden_dim must be even (half of it encodes y, half x)")
        for name in ("num_classes", "enc_layers", "dec_layers", "num_queries", "num_select", "dim_feedforward"):
            if getattr(self, name) < (0 if name == "enc_layers" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def shapes_config():
    """CPU-sized SMCA for the built-in shapes set (what `python train.py --model smca` trains)."""
    return Config(backbone_depth=18, backbone_norm="bn", hidden_dim=128, nheads=8, enc_layers=2, dec_layers=3,
                  dim_feedforward=512, num_queries=50, num_select=100)


# train.py's defaults on --data shapes for this model (a ResNet-18 from scratch: the backbone trains
# at the full learning rate)
SHAPES_RECIPE = {"epochs": 3, "lr_drop": 2, "batch_size": 8, "lr": 4e-4, "lr_backbone": 2e-4, "eval_every": 1}


def build(cfg):
    """-> (model, criterion, postprocess)"""
    cfg.validate()
    model = SMCA(cfg)
    criterion = SetCriterion(cfg.num_classes, weight_ce=cfg.loss_ce, weight_bbox=cfg.loss_bbox,
                             weight_giou=cfg.loss_giou, focal_alpha=cfg.focal_alpha,
                             num_aux=cfg.dec_layers - 1 if cfg.aux_loss else 0)
    return model, criterion, PostProcess(cfg.num_select)


if __name__ == "__main__":
    model, criterion, _ = build(Config())
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"SMCA-DETR R50, 300 queries: {n:,} trainable parameters")
    model.eval()
    images, pad_mask = torch.randn(2, 3, 320, 480), torch.zeros(2, 320, 480, dtype=torch.bool)
    pad_mask[1, 200:, :] = True
    with torch.no_grad():
        out = model(images, pad_mask)
    print({k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)})
