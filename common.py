"""Shared parts of the four efficient-DETR models: what no paper contributes and every paper needs.

A model file imports this module (and torch) and nothing else of ours, so one model file plus this
file is a whole model. Contents: 1. ResNet backbone (torchvision's names, FrozenBatchNorm2d, loading
weights); 2. sine positions, padding masks, MLP; then Deformable DETR's base (SMCA uses none of it):
3. multi-scale deformable sampling in pure PyTorch (F.grid_sample, for the CUDA extension); 4. Deformable
DETR's scaffolding, used unchanged by Sparse, Lite and Focus DETR (deformable attention, its
initialisation, input tokens and their geometry, two-stage selection, encoder and decoder layers, the
box-refining decoder); 5. box ops; 6. the output dict, matcher, set criterion, post-processing;
7. checks of configurations, state dicts and the authors' checkpoints; the export helpers; the switches
(`with fast_paths(False):` runs the readable code everywhere, recompute_sampling, checkpoint_layers);
then the fast paths, each attached to the readable function it equals (`with_fast_path`, the marker
at the top).

Every model: build(cfg) -> (model, criterion, postprocess); model(images, pad_mask, targets=None,
explain=False) -> dict (pred_logits, pred_boxes, aux_outputs, what its loss reads; its `forward`
docstring lists the keys); images (B, 3, H_img, W_img), pad_mask (B, H_img, W_img) True = padding.
Inside, `encode(feats, pad_mask, explain) -> (memory, geometry, outputs dict)` and `decode(memory,
geometry, targets, explain) -> outputs dict`.

Shape letters, the same in every file of the library:
    B  images in the batch               Q  decoder queries (Q_dn: DINO's denoising ones)
    C  channels (hidden_dim)             N  encoder tokens, all levels: N = sum_l H_l * W_l
    H  attention heads (nheads)          S  the tokens an encoder layer updates, a subset of N
    D  channels per head, C / H             (Sparse DETR's selected, Focus-DETR's kept tokens)
    L  feature levels                    J  Focus-DETR's fine-grained tokens, a subset of S
    P  sampling points per head, level   K  classes (logits per query)
    M  target boxes of an image          G  denoising groups
    F  sine frequencies per coordinate   R  sampling points of a level, all layers, queries, heads
    H_l, W_l, N_l = H_l W_l  level l's map (SMCA: H_j, W_j, N_j of scale j, the paper's index)
    C_l  the backbone's channels at level l;  H_img, W_img  the padded images

Deviations from DETR / Deformable DETR: generalized_box_iou never asserts and the matcher bounds
non-finite costs (a diverging prediction is a large loss, not a dead run); `Backbone(norm="bn")`.
"""
import argparse
import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from scipy.optimize import linear_sum_assignment
from torch import nn

# ---------------------------------------------------------------------------------------------
# The fast-path marker, first: the backbone's readable code carries it (the switches and the fast paths: the end)
# ---------------------------------------------------------------------------------------------

def with_fast_path(readable):
    """Marks a readable function as having a fast path, attached later in the fast paths section at the end of its
    file by `@readable.fast` (inference only), `@readable.fast_with_autograd` (inference and training: its
    gradients are tested equal too, and it runs under autocast as well) or `@readable.fast_with_export` (as with
    autograd, and what torch.export traces even with fast paths off: the twin of a readable function that does not
    export). The one place where the two are chosen: the fast one runs when fast paths are on and autograd is off,
    or always, attached with autograd, or while torch.export traces, attached with export; `readable.readable` is
    always the readable one."""
    @functools.wraps(readable)
    def choose(*args, **kwargs):
        on = _fast_paths_on and (choose.autograd or not torch.is_grad_enabled())
        if choose.fast_path is not None and (on or choose.export and torch.compiler.is_exporting()):
            return choose.fast_path(*args, **kwargs)
        return readable(*args, **kwargs)

    def attach(fast, autograd=False, export=False):
        choose.fast_path, choose.autograd, choose.export = fast, autograd, export
        return fast

    choose.fast_path, choose.autograd, choose.export, choose.readable = None, False, False, readable
    choose.fast, choose.fast_with_autograd = attach, functools.partial(attach, autograd=True)
    choose.fast_with_export = functools.partial(attach, autograd=True, export=True)
    return choose


# ---------------------------------------------------------------------------------------------
# 1. Backbone
# ---------------------------------------------------------------------------------------------

# torchvision's ImageNet weights (IMAGENET1K_V1, the ones DETR and its descendants start from).
RESNET_URLS = {d: f"https://download.pytorch.org/models/resnet{d}-{h}.pth"
               for d, h in ((18, "f37072fd"), (34, "b627a593"), (50, "0676ba61"), (101, "63fe2227"))}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # torchvision BatchNorm2d has it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_shift()
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4  # torchvision's "ResNet v1.5": the stride sits on the 3x3 conv

    def __init__(self, inplanes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.downsample = _downsample(inplanes, planes * 4, stride, norm)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


def _downsample(inplanes, outplanes, stride, norm):
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), norm(outplanes))


RESNET_SPECS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
                50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}


class ResNet(nn.Module):
    """torchvision's ResNet without the classifier; names match its state dict."""

    def __init__(self, depth, norm=FrozenBatchNorm2d):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
        block, counts = RESNET_SPECS[depth]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, self.channels = 64, []
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, planes, 2 if (j == 0 and i > 0) else 1, norm))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.channels.append(inplanes)
        for m in self.modules():  # torchvision's init, for training from scratch
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, last_stage=5):
        """images (B, 3, H_img, W_img) -> [C3, C4, C5], (B, C_l, H_l, W_l) at strides 8, 16, 32
        (last_stage 4: [C3, C4], layer4 not run)"""
        return self.stages(self.stem(x), last_stage)

    @with_fast_path
    def stem(self, x):
        """images -> C2 (B, C_2, H_img / 4, W_img / 4): conv1, max-pool, layer1"""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # stride 4
        return self.layer1(x)

    @with_fast_path
    def stages(self, c2, last_stage=5):
        """C2 -> [C3, C4, C5] (last_stage 4: [C3, C4])"""
        c3 = self.layer2(c2)  # stride 8
        c4 = self.layer3(c3)  # stride 16
        if last_stage == 4:
            return [c3, c4]
        c5 = self.layer4(c4)  # stride 32
        return [c3, c4, c5]


STAGES = ("layer2", "layer3", "layer4")  # the ResNet stages a Backbone trains (C3, C4, C5)


class Backbone(nn.Module):
    """ResNet returning C3, C4, C5 (strides 8, 16, 32), each with its padding mask. norm="frozen_bn"
    (DETR) or "bn" (batch statistics, to train from scratch); the stem and layer1 are frozen either way.
    last_stage=4 (a model that reads no C5): C3 and C4 only; layer4 stays (ResNet weights load whole),
    frozen and not run. `amp_dtype` (None: the caller's precision; train.py --amp bf16-backbone sets bfloat16):
    the ResNet runs under autocast in that dtype and its features come out in float32, so only the
    convolutions, where bf16 hardware pays most, leave float32."""

    def __init__(self, depth=50, norm="frozen_bn", last_stage=5):
        super().__init__()
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"backbone norm must be 'frozen_bn' or 'bn', got {norm!r}")
        if last_stage not in (4, 5):
            raise ValueError(f"backbone last_stage must be 4 (C3, C4) or 5 (C3, C4, C5), got {last_stage!r}")
        self.depth, self.last_stage, self.amp_dtype = depth, last_stage, None
        self.body = ResNet(depth, FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d)
        self.num_channels = self.body.channels[1:last_stage - 1]  # C3, C4(, C5)
        for name, p in self.body.named_parameters():
            if not name.startswith(STAGES[:last_stage - 2]):
                p.requires_grad_(False)

    def stem_parameters(self):
        """The parameters of the stem and layer1 (frozen unless a user unfreezes them)."""
        return [p for name, p in self.body.named_parameters() if not name.startswith(STAGES)]

    def forward(self, images, pad_mask):
        """images (B, 3, H_img, W_img), pad_mask (B, H_img, W_img) -> [(map (B, C_l, H_l, W_l), mask (B, H_l, W_l))]"""
        stem_grad = images.requires_grad or any(p.requires_grad for p in self.stem_parameters())
        amp = self.amp_dtype is not None
        with torch.autocast(images.device.type, self.amp_dtype) if amp else contextlib.nullcontext():
            with torch.set_grad_enabled(torch.is_grad_enabled() and stem_grad):  # frozen (default): no graph to record
                c2 = self.body.stem(images)
            feats = self.body.stages(c2, self.last_stage)
        out = []
        for feat in feats:
            mask = F.interpolate(pad_mask[:, None].float(), size=feat.shape[-2:])[:, 0].bool()
            out.append((feat.float() if amp else feat, mask))
        return out


def load_backbone_weights(backbone, source):
    """Load a torchvision-format ResNet state dict into `backbone.body`. source: what read_state_dict
    takes (a whole model's of this library too: its backbone.body.*) or "imagenet" (downloaded)."""
    state = (torch.hub.load_state_dict_from_url(RESNET_URLS[backbone.depth], map_location="cpu")
             if source == "imagenet" else read_state_dict(source, "backbone weights")[0])
    if any(k.startswith("backbone.body.") for k in state):  # a whole model of this library
        state = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    name = source if isinstance(source, str) else "the given state dict"
    check_state_dict(state, backbone.body.state_dict(), f"backbone weights {name!r} do not fit ResNet-{backbone.depth}")
    backbone.body.load_state_dict(state, strict=False)  # everything but BatchNorm's step counters, checked above


# ---------------------------------------------------------------------------------------------
# 2. Positions, padding masks and small layers
# ---------------------------------------------------------------------------------------------

def sine_position_embedding(mask, num_pos_feats=128, temperature=10000, scale=2 * math.pi, offset=0.0):
    """DETR's PositionEmbeddingSine(normalize=True): mask (B, H_l, W_l) -> pos (B, 2 F, H_l, W_l), y
    then x, over valid cells normalised by the image's valid extent (padding-independent). offset:
    added to the cell index (DETR 0; Deformable DETR -0.5, the cell centre)."""
    not_mask = (~mask).float()
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    eps = 1e-6
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t  # (B, H_l, W_l, F), F = num_pos_feats
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H_l, W_l)


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (DETR's box head): in_dim -> mid_dim ... -> out_dim."""

    def __init__(self, in_dim, mid_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [mid_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def valid_image_sizes(pad_mask):
    """pad_mask (B, H_img, W_img) (or a level's), True = padding -> (B, 2) unpadded (width, height), float."""
    valid = ~pad_mask
    return torch.stack([valid.any(1).sum(-1), valid.any(2).sum(-1)], dim=-1).float()


def halve_mask(mask):
    """Padding mask of a stride-2 3x3 conv's output, (B, H_l, W_l) -> (B, ceil(H_l/2), ceil(W_l/2)): h x w
    valid cells give ceil(h/2) x ceil(w/2), what the same conv gives on the image alone."""
    _, h, w = mask.shape
    valid_w, valid_h = valid_image_sizes(mask).long().unbind(-1)  # (B,) valid cells
    rows = torch.arange((h + 1) // 2, device=mask.device)[None, :, None] >= ((valid_h + 1) // 2)[:, None, None]
    cols = torch.arange((w + 1) // 2, device=mask.device)[None, None, :] >= ((valid_w + 1) // 2)[:, None, None]
    return rows | cols  # (B, ceil(H_l/2), ceil(W_l/2))


def cell_grid(h, w, device):
    """The (x, y) indices of an h x w map's cells, row by row -> (h * w, 2)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], -1).view(-1, 2)


# =============================================================================================
# Deformable DETR's base: used by sparse_detr, lite_detr, focus_detr; SMCA does not use what follows until the box
# ops (5.)
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# 3. Multi-scale deformable sampling (pure PyTorch; replaces the MultiScaleDeformableAttention op)
# ---------------------------------------------------------------------------------------------

def ms_deform_sample_levels(value, spatial_shapes, sampling_locations):
    """Bilinearly sample every level's value map at the given locations, one level at a time.
    value (B, N, H, D): all levels' tokens; spatial_shapes [(H_l, W_l)]; sampling_locations
    (B, Q, H, L, P, 2): (x, y) in [0, 1] of each level's map (0 and 1: the outer edges of the border
    cells) -> yields (B*H, D, Q, P) per level. Points outside read zeros, as the official CUDA kernel."""
    B, N, H, D = value.shape
    assert N == sum(h * w for h, w in spatial_shapes), "value length does not match spatial_shapes"
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, h, w)  # (B*H, D, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*H, Q, P, 2)
        yield F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*H, D, Q, P)


def deform_sampling_locations(reference_points, offsets, spatial_shapes):
    """Where a deformable attention samples (Deformable DETR Eq. 3): reference_points (B, Q, L, 2)
    points (offsets in cells) or (B, Q, L, 4) boxes (offsets relative to the box, half its size at
    |offset| = P), offsets (B, Q, H, L, P, 2) -> locations (B, Q, H, L, P, 2) in [0, 1] of each map."""
    if reference_points.shape[-1] == 2:
        wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)  # (L, 2)
        return reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    P = offsets.shape[-2]
    return (reference_points[:, :, None, :, None, :2]
            + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)


@with_fast_path
def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Deformable attention core: sum over levels and points of weight * sampled value, level by level.
    attention_weights (B, Q, H, L, P) -> output (B, Q, H*D)."""
    B, N, H, D = value.shape
    Q = sampling_locations.shape[1]
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (B*H, Q, L, P)
    out = 0
    for lvl, sampled in enumerate(ms_deform_sample_levels(value, spatial_shapes, sampling_locations)):
        out = out + (sampled * weights[:, None, :, lvl]).sum(-1)  # (B*H, D, Q)
    return out.view(B, H, D, Q).permute(0, 3, 1, 2).reshape(B, Q, H * D)


# ---------------------------------------------------------------------------------------------
# 4. Deformable DETR's scaffolding (used unchanged by Sparse, Lite and Focus-DETR)
# ---------------------------------------------------------------------------------------------

def init_offset_ring_(sampling_offsets, nheads, num_levels, num_points):
    """Deformable DETR's offset init: weight 0, bias on a ring (head h along angle 2 pi h / H,
    scaled so the larger coordinate is 1, point p at distance p + 1), the same at every level."""
    nn.init.zeros_(sampling_offsets.weight)
    thetas = torch.arange(nheads, dtype=torch.float32) * (2.0 * math.pi / nheads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (H, 2)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(nheads, 1, 1, 2)
    grid = grid.repeat(1, num_levels, num_points, 1)  # (H, L, P, 2)
    grid = grid * torch.arange(1, num_points + 1).view(1, 1, -1, 1)
    with torch.no_grad():
        sampling_offsets.bias.copy_(grid.view(-1))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR Eq. 3) on ms_deform_attn (the grid_sample path)."""

    def __init__(self, hidden_dim, num_levels, nheads, num_points):
        super().__init__()
        self.num_levels, self.nheads, self.num_points = num_levels, nheads, num_points
        self.sampling_offsets = nn.Linear(hidden_dim, nheads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, nheads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        init_offset_ring_(self.sampling_offsets, self.nheads, self.num_levels, self.num_points)
        nn.init.zeros_(self.attention_weights.weight)  # uniform attention over levels and points at init
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_input, spatial_shapes, pad_mask):
        """query (B, Q, C); reference_points (B, Q, L, 2) points or (B, Q, L, 4) boxes in [0, 1] of each
        level's padded map; value_input (B, N, C); pad_mask (B, N) -> (B, Q, C), locations
        (B, Q, H, L, P, 2), weights (B, Q, H, L, P)."""
        B, Q, C = query.shape
        H, L, P = self.nheads, self.num_levels, self.num_points
        value = self.value_proj(value_input).masked_fill(pad_mask[..., None], 0.0)  # zero at padding
        value = value.view(B, -1, H, C // H)  # (B, N, H, D)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        locs = deform_sampling_locations(reference_points, offsets, spatial_shapes)  # (B, Q, H, L, P, 2)
        out = ms_deform_attn(value, spatial_shapes, locs, weights)  # (B, Q, C)
        return self.output_proj(out), locs, weights


def deformable_inputs(cfg):
    """What a model on the Deformable DETR base reads its tokens with: the backbone, the input
    projections of cfg.num_feature_levels levels and their level embeddings (L, C) (set by deformable_detr_init_)."""
    backbone = Backbone(cfg.backbone_depth, cfg.backbone_norm)
    input_proj = InputProjections(backbone.num_channels, cfg.hidden_dim, cfg.num_feature_levels)
    return backbone, input_proj, nn.Parameter(torch.empty(cfg.num_feature_levels, cfg.hidden_dim))


def deformable_detr_init_(model, transformer, heads, attention=(MSDeformAttn,)):
    """Deformable DETR's initialisation (DeformableTransformer._reset_parameters and the heads'), in its
    order: xavier_uniform on every matrix of the `transformer` modules, then each deformable attention
    (of the `attention` types) its own init, the level embeddings normal, the input projections xavier,
    and each (class, box) head of `heads` the focal prior and a zero last box layer."""
    for module in transformer:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    for m in model.modules():
        if isinstance(m, attention):
            m._reset_parameters()
    nn.init.normal_(model.level_embed)
    model.input_proj.reset_parameters()
    for cls, box in heads:
        nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: every class at 0.01
        nn.init.zeros_(box.layers[-1].weight)  # boxes start at their reference / proposal (two-stage:
        nn.init.zeros_(box.layers[-1].bias)  # Deformable DETR's bias[2:] = -2 is reset to 0 as well)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics skip padded positions, so an image's features do not depend on
    how much its batch pads it (the official code's plain GroupNorm counts the padding: `masked_groupnorm=False`)."""

    def forward(self, x, mask=None):
        """x (B, C, H_l, W_l); mask (B, H_l, W_l) True = padding, or None for plain GroupNorm."""
        if mask is None:
            return super().forward(x)
        B, C, h, w = x.shape
        xg = x.view(B, self.num_groups, C // self.num_groups, h, w)
        valid = (~mask)[:, None, None].to(x)  # (B, 1, 1, H_l, W_l)
        n = valid.sum((2, 3, 4), keepdim=True) * (C // self.num_groups)
        mean = (xg * valid).sum((2, 3, 4), keepdim=True) / n
        var = ((xg - mean) ** 2 * valid).sum((2, 3, 4), keepdim=True) / n
        y = ((xg - mean) / torch.sqrt(var + self.eps)).view(B, C, h, w)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def encoder_reference_points(spatial_shapes, valid_ratios):
    """Each token's centre, normalised by its level's unpadded size, seen from every level:
    (B, N, L, 2) in [0, 1] of each level's padded map."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        centres = cell_grid(h, w, valid_ratios.device) + 0.5  # (H_l*W_l, 2)
        x = centres[None, :, 0] / (valid_ratios[:, None, lvl, 0] * w)  # (B, H_l*W_l)
        y = centres[None, :, 1] / (valid_ratios[:, None, lvl, 1] * h)
        refs.append(torch.stack([x, y], -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]  # (B, N, L, 2)


def token_proposals(masks):
    """One box per token: its cell centre, side 0.05 * 2^l of the unpadded image (two-stage). masks
    [(B, H_l, W_l)] -> proposals (B, N, 4) logits, valid (B, N): False at padding and where the box
    leaves (0.01, 0.99) (proposal inf)."""
    props = []
    for lvl, m in enumerate(masks):
        valid_wh = valid_image_sizes(m)  # (B, 2) valid cells (w, h)
        centres = (cell_grid(m.shape[1], m.shape[2], m.device)[None] + 0.5) / valid_wh[:, None]  # (B, H_l*W_l, 2)
        props.append(torch.cat([centres, torch.full_like(centres, 0.05 * 2.0 ** lvl)], -1))
    props = torch.cat(props, 1)  # (B, N, 4)
    pad = torch.cat([m.flatten(1) for m in masks], 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~pad  # (B, N)
    return torch.log(props / (1 - props)).masked_fill(~valid[..., None], float("inf")), valid


class InputProjections(nn.ModuleList):
    """Deformable DETR's input projections: 1x1 conv + GroupNorm for the last min(num_levels, 3) of
    C3-C5, then 3x3 stride-2 conv + GroupNorm per extra level (the first on raw C5, then chained)."""

    def __init__(self, in_channels, hidden_dim, num_levels):
        n_bb = min(num_levels, len(in_channels))  # levels taken from the backbone
        projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), MaskedGroupNorm(32, hidden_dim))
                 for c in in_channels[len(in_channels) - n_bb:]]
        for lvl in range(n_bb, num_levels):
            c = in_channels[-1] if lvl == n_bb else hidden_dim
            projs.append(nn.Sequential(nn.Conv2d(c, hidden_dim, 3, 2, 1), MaskedGroupNorm(32, hidden_dim)))
        super().__init__(projs)

    def reset_parameters(self):  # Deformable DETR: xavier_uniform conv weights, zero biases
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)


@dataclass
class TokenGeometry:
    """Where the N tokens sit (finest level first; all from the masks): what `encode` hands `decode`."""
    spatial_shapes: list  # [(H_l, W_l)]
    masks: list  # [(B, H_l, W_l)] True = padding
    pad_mask: torch.Tensor  # (B, N) True = padding
    valid_ratios: torch.Tensor  # (B, L, 2) unpadded fraction (w, h) of each level's map
    reference_points: torch.Tensor  # (B, N, L, 2) each token's centre, seen from every level
    proposals: torch.Tensor  # (B, N, 4) two-stage proposal per token, logits (inf where invalid)
    proposal_valid: torch.Tensor  # (B, N) False at padding and at proposals leaving (0.01, 0.99)


def input_tokens(input_proj, level_embed, feats, masked_groupnorm=True, pad_mask=None, extra_level_mask="exact",
                 temperature=10000, offset=-0.5):
    """The backbone's [(C3, m3), (C4, m4), (C5, m5)] -> the encoder's tokens (Deformable DETR Sec. 4.1):
    src, pos (B, N, C) (sine positions + level_embed (L, C)), TokenGeometry. masked_groupnorm=False:
    the official GroupNorm over padding; extra_level_mask "exact" (halve_mask) or "interpolate" (the
    official: the images' pad_mask, nearest-resized)."""
    n_bb = min(len(input_proj), len(feats))  # levels taken from the backbone (its last n_bb maps)
    maps, masks = [], []
    for lvl, proj in enumerate(input_proj):
        if lvl < n_bb:
            x, m = feats[len(feats) - n_bb + lvl]
            x = proj[0](x)
        else:  # extra level: stride-2 conv on raw C5, then on the previous level
            x = proj[0](feats[-1][0] if lvl == n_bb else maps[-1])
            if extra_level_mask == "exact":
                m = halve_mask(masks[-1])
            else:
                m = F.interpolate(pad_mask[None].float(), size=x.shape[-2:])[0].bool()
        maps.append(proj[1](x, m if masked_groupnorm else None))  # (B, C, H_l, W_l)
        masks.append(m)
    src = torch.cat([x.flatten(2).transpose(1, 2) for x in maps], 1)  # (B, N, C)
    pos = []
    for lvl, m in enumerate(masks):
        p = sine_position_embedding(m, src.shape[-1] // 2, temperature, offset=offset).to(src)  # (B, C, H_l, W_l)
        pos.append(p.flatten(2).transpose(1, 2) + level_embed[lvl])  # (B, H_l*W_l, C)
    pos = torch.cat(pos, 1)  # (B, N, C)
    spatial_shapes = [tuple(m.shape[-2:]) for m in masks]
    sizes = torch.tensor([[m.shape[2], m.shape[1]] for m in masks], device=src.device)  # (L, 2) (W_l, H_l)
    valid_ratios = torch.stack([valid_image_sizes(m) for m in masks], 1) / sizes  # (B, L, 2) unpadded fraction
    proposals, proposal_valid = token_proposals(masks)  # (B, N, 4), (B, N)
    geometry = TokenGeometry(spatial_shapes, masks, torch.cat([m.flatten(1) for m in masks], 1), valid_ratios,
                             encoder_reference_points(spatial_shapes, valid_ratios), proposals, proposal_valid)
    return src, pos, geometry


def proposal_features(memory, valid, enc_output, enc_output_norm):
    """enc_output + LayerNorm of the tokens, invalid ones zeroed first: what the two-stage head (and
    Sparse / Focus-DETR's scorers) read. memory (B, N, C), valid (B, N) -> (B, N, C)"""
    return enc_output_norm(enc_output(memory.masked_fill(~valid[..., None], 0.0)))


def proposal_pos_embed(proposals, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
    """Sine embedding of sigmoid(proposals) (B, Q, 4) -> (B, Q, 4 F), F = num_pos_feats (Deformable DETR)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)  # float32 as the official code
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid()[..., None] * scale / dim_t  # (B, Q, 4, F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


def gather_tokens(x, inds):
    """x (B, N, ...) -> the rows inds (B, S) -> (B, S, ...)."""
    return x.gather(1, inds.view(*inds.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def write_back(memory, inds, rows, updated):
    """The tokens an encoder layer updated go back into the memory, all others keep their value. memory
    (B, N, C); inds (B, S); rows (B, S) False at batch filler (an image updating < S); updated (B, S, C)."""
    B, N, C = memory.shape
    b, s = rows.nonzero(as_tuple=True)
    return memory.reshape(B * N, C).index_copy(0, b * N + inds[b, s], updated[b, s]).view(B, N, C)


def top_queries(scores, pad_mask, num_queries, over_padding=False):
    """Two-stage query selection: scores, pad_mask (B, N) -> the num_queries best tokens (B, Q), padded
    ones never chosen (over_padding=True: ranked like the others, as the official code)."""
    if num_queries > pad_mask.shape[1]:
        raise ValueError(f"num_queries {num_queries} exceeds the {pad_mask.shape[1]} encoder tokens of this batch: "
                         f"lower num_queries or use larger images")
    if not over_padding:
        scores = scores.masked_fill(pad_mask, float("-inf"))
    return scores.topk(num_queries, dim=1).indices


@dataclass
class TwoStage:
    """The two-stage head on every token (Deformable DETR Sec. 4.1 / A.4) and the tokens it selects."""
    features: torch.Tensor  # (B, N, C) proposal_features of the memory
    logits: torch.Tensor  # (B, N, K) class logits of every token
    boxes: torch.Tensor  # (B, N, 4) box logits: the head's refinement of each token's proposal
    topk: torch.Tensor  # (B, Q) the selected tokens, best first


def two_stage_selection(memory, geometry, enc_output, enc_output_norm, class_head, box_head, num_queries,
                        rank_by="max_class", over_padding=False):
    """The two-stage head (class_head, box_head) on every encoder token's proposal features, and its
    num_queries best tokens, ranked by their best class logit ("max_class": Efficient-DETR, DINO) or the
    first class's ("first_class": Deformable DETR's class-agnostic objectness) -> TwoStage."""
    feats = proposal_features(memory, geometry.proposal_valid, enc_output, enc_output_norm)  # (B, N, C)
    logits = class_head(feats)  # (B, N, K)
    boxes = box_head(feats) + geometry.proposals  # (B, N, 4) logits
    objectness = logits.max(-1).values if rank_by == "max_class" else logits[..., 0]  # (B, N)
    return TwoStage(feats, logits, boxes, top_queries(objectness, geometry.pad_mask, num_queries, over_padding))


class DeformableEncoderLayer(nn.Module):
    """Deformable DETR's post-norm encoder layer: deformable self-attention (`self_attn`, built by the
    caller), then the FFN. The queries may be a subset of the tokens; the values are all N of them."""

    def __init__(self, hidden_dim, dim_feedforward, dropout, self_attn):
        super().__init__()
        self.self_attn = self_attn
        self.norm1, self.norm2 = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.linear1, self.linear2 = nn.Linear(hidden_dim, dim_feedforward), nn.Linear(dim_feedforward, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, pos, reference_points, memory, spatial_shapes, pad_mask):
        """tgt, pos (B, S, C) the queried tokens; reference_points (B, S, L, 2); memory (B, N, C)
        all tokens; pad_mask (B, N) -> (B, S, C)"""
        attn = self.self_attn(tgt + pos, reference_points, memory, spatial_shapes, pad_mask)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        return self.norm2(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class DeformableDecoderLayer(nn.Module):
    """Deformable DETR's post-norm decoder layer: self-attention among the queries (attn_mask, True =
    blocked: DINO's denoising mask), deformable cross-attention (`cross_attn`, built by the caller), FFN."""

    def __init__(self, hidden_dim, dim_feedforward, dropout, nheads, cross_attn):
        super().__init__()
        self.cross_attn = cross_attn
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.self_attn = nn.MultiheadAttention(hidden_dim, nheads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear1, self.linear2 = nn.Linear(hidden_dim, dim_feedforward), nn.Linear(dim_feedforward, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, pad_mask, attn_mask=None):
        """tgt, query_pos (B, Q, C); reference_points (B, Q, L, 4) boxes -> tgt (B, Q, C), sampling
        locations (B, Q, H, L, P, 2) and attention weights (B, Q, H, L, P) of the cross-attention"""
        q = k = tgt + query_pos
        sa = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(sa))
        ca, locs, weights = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, pad_mask)
        tgt = self.norm1(tgt + self.dropout(ca))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt, locs, weights


def decode_with_box_refinement(decoder, class_embed, bbox_embed, tgt, query_pos, reference, memory, geometry):
    """Deformable DETR's decoder with iterative box refinement (Sec. 4.1 / A.4): layer l refines the
    boxes of layer l - 1 (detached). tgt, query_pos (B, Q, C); reference (B, Q, 4) cxcywh in [0, 1] of
    the unpadded image -> per layer (four lists): logits (B, Q, K), boxes (B, Q, 4), sampling
    locations (B, Q, H, L, P, 2), attention weights (B, Q, H, L, P)."""
    ratios = torch.cat([geometry.valid_ratios, geometry.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
    per_layer = []
    for lid, layer in enumerate(decoder):
        ref_in = reference[:, :, None] * ratios  # (B, Q, L, 4) in each level's padded map
        tgt, loc, w = layer(tgt, query_pos, ref_in, memory, geometry.spatial_shapes, geometry.pad_mask)
        box = (bbox_embed[lid](tgt) + inverse_sigmoid(reference)).sigmoid()  # (B, Q, 4)
        per_layer.append((class_embed[lid](tgt), box, loc, w))
        reference = box.detach()
    return tuple(list(x) for x in zip(*per_layer))  # logits, boxes, locs, weights


# ---------------------------------------------------------------------------------------------
# 5. Box ops
# ---------------------------------------------------------------------------------------------

def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _sanitize(boxes):
    """Non-finite coordinates -> 0; an inverted box (x1 < x0) becomes an empty one at x0."""
    boxes = torch.nan_to_num(boxes, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2])], dim=-1)


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)) for x in [0, 1], numerator and denominator each clamped at eps (Deformable DETR's, for box
    refinement; detrex's has eps 1e-3): x = 1 gives log(1 / eps)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise IoU of xyxy boxes: (N, 4), (M, 4) -> iou (N, M), union (N, M)."""
    boxes1, boxes2 = _sanitize(boxes1), _sanitize(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # (N, M)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / union.clamp(min=eps), union


def generalized_box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise GIoU of xyxy boxes (N, M). Finite for degenerate, inverted and NaN boxes."""
    iou, union = box_iou(boxes1, boxes2, eps)
    boxes1, boxes2 = _sanitize(boxes1), _sanitize(boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=eps)


# ---------------------------------------------------------------------------------------------
# 6. The output dict, matcher, criterion, post-processing
# ---------------------------------------------------------------------------------------------

def set_outputs(logits, boxes, aux_loss=True):
    """Per decoder layer logits (B, Q, K) and boxes (B, Q, 4) -> the output dict: the last layer's as
    pred_logits / pred_boxes, the earlier ones as aux_outputs (when aux_loss)."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0):
    """Deformable DETR's focal matching cost at the target class: (N, K), (M,) -> (N, M)."""
    prob = logits.sigmoid()[:, labels]
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising class + L1 + GIoU cost."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4); targets: [{labels (M,), boxes (M, 4)}]
        -> [(pred_idx, tgt_idx)] per image, int64 tensors of equal length min(Q, M)."""
        B, Q = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()  # (B*Q, K)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        if tgt_labels.numel() == 0:
            return [(torch.empty(0, dtype=torch.int64),) * 2 for _ in targets]
        cost = (self.cost_class * focal_class_cost(logits, tgt_labels, self.alpha, self.gamma)
                + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).view(B, Q, -1).cpu()
        indices = []
        for b, c in enumerate(cost.split([len(t["labels"]) for t in targets], dim=-1)):
            rows, cols = linear_sum_assignment(c[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss (Lin et al.), same shape as logits."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SetCriterion(nn.Module):
    """DETR's set loss with sigmoid focal classification, as the four papers use it. Every output set
    (the last decoder layer, `aux_outputs`, the two-stage `enc_outputs` with `encoder_labels` "binary"
    (class-agnostic) or "class", `enc_aux_outputs`) is Hungarian-matched: loss_ce = focal loss over all
    queries and classes, loss_bbox = L1, loss_giou = 1 - GIoU on the matches, each / num_boxes (the
    targets averaged over ranks, >= 1) -> unweighted terms (_0, .., _enc, _enc_0, ..); `weight_dict`."""

    def __init__(self, num_classes, matcher=None, weight_ce=2.0, weight_bbox=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0, num_aux=0, encoder_labels=None, num_enc_aux=0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(weight_ce, weight_bbox, weight_giou, focal_alpha, focal_gamma)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        if encoder_labels not in (None, "binary", "class"):
            raise ValueError(f"encoder_labels must be None, 'binary' or 'class', got {encoder_labels!r}")
        self.encoder_labels = encoder_labels
        suffixes = [""] + [f"_{i}" for i in range(num_aux)] + (["_enc"] if encoder_labels else [])
        suffixes += [f"_enc_{i}" for i in range(num_enc_aux)]
        terms = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.weight_dict = {f"{k}{s}": v for s in suffixes for k, v in terms.items()}

    accumulated_boxes = None  # train.py --accum-steps: the mean box count of the batches accumulated into one step

    def num_boxes(self, targets, device):
        """What the box losses divide by: the batch's box count (or, for a batch accumulated with others into one
        optimizer step, `accumulated_boxes`), averaged over the processes, at least 1 (DETR's normaliser)."""
        count = sum(len(t["labels"]) for t in targets) if self.accumulated_boxes is None else self.accumulated_boxes
        n = torch.tensor([float(count)], device=device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(n)
        return (n / world).clamp(min=1).item()

    def set_loss(self, outputs, targets, num_boxes, indices=None):
        """The three terms for one output set (pred_logits, pred_boxes); `indices` [(pred_idx,
        tgt_idx)] per image replaces the Hungarian matching (DINO's denoising queries)."""
        logits = outputs["pred_logits"].float()  # losses in float32, also under autocast
        if indices is None:
            indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)  # unmatched queries: all-zero targets
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_boxes

        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()  # (M, 4)
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs, targets):
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self.set_loss(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.set_loss(aux, targets, num_boxes).items()})
        if self.encoder_labels and "enc_outputs" in outputs:  # "binary": every box is class 0
            enc_targets = targets
            if self.encoder_labels == "binary":
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_losses = self.set_loss(outputs["enc_outputs"], enc_targets, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        for i, aux in enumerate(outputs.get("enc_aux_outputs", [])):
            losses.update({f"{k}_enc_{i}": v for k, v in self.set_loss(aux, targets, num_boxes).items()})
        return losses


class PostProcess(nn.Module):
    """Top-k over (query x class) pairs -> COCO-style detections in original-image pixels."""

    def __init__(self, num_select=300):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes (B, 2) as (height, width) of the original images -> [{scores, labels, boxes xyxy}]"""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, K = logits.shape
        prob = logits.float().sigmoid().flatten(1)  # (B, Q*K)
        scores, idx = prob.topk(min(self.num_select, Q * K), dim=1)  # (B, k)
        query, labels = idx // K, idx % K
        boxes = box_cxcywh_to_xyxy(boxes.float()).gather(1, query[..., None].expand(-1, -1, 4))  # (B, k, 4)
        h, w = target_sizes.float().unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], dim=1)[:, None, :]
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


def smoke_outputs(model):
    """The output shapes of `model` (eval mode, no autograd) on two random 320 x 480 images, the second padded
    below row 200: what each model file's `__main__` prints."""
    images, pad_mask = torch.randn(2, 3, 320, 480), torch.zeros(2, 320, 480, dtype=torch.bool)
    pad_mask[1, 200:, :] = True
    with torch.no_grad():
        out = model.eval()(images, pad_mask)
    return {k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)}


# ---------------------------------------------------------------------------------------------
# 7. Checks of what a user gives: configurations, state dicts, the authors' checkpoints
# ---------------------------------------------------------------------------------------------

def check_choice(cfg, name, allowed):
    """ValueError unless the Config field `name` is one of `allowed`."""
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(cfg, name)!r}")


def check_at_least(cfg, names, minimum=1):
    """ValueError unless every Config field of `names` is >= minimum."""
    for name in names:
        if getattr(cfg, name) < minimum:
            bound = "positive" if minimum == 1 else f">= {minimum}"
            raise ValueError(f"{name} must be {bound}, got {getattr(cfg, name)}")


def check_deformable_config(cfg):
    """What every Config on the Deformable DETR base holds (Sparse, Lite and Focus-DETR's)."""
    check_choice(cfg, "extra_level_mask", ("exact", "interpolate"))
    if not 1 <= cfg.num_feature_levels <= 4:
        raise ValueError(f"num_feature_levels must be 1..4, got {cfg.num_feature_levels}")
    if cfg.hidden_dim % cfg.nheads or cfg.hidden_dim % 32:
        raise ValueError(f"hidden_dim {cfg.hidden_dim} must be divisible by nheads {cfg.nheads} and by 32 "
                         f"(GroupNorm groups)")
    check_at_least(cfg, ("num_classes", "enc_layers", "dec_layers", "num_queries", "num_select", "dim_feedforward",
                         "enc_n_points", "dec_n_points"))


def read_state_dict(source, what):
    """A state dict, or a file holding one (bare, or under "model" beside other entries such as the
    official checkpoints' "args"; read weights_only) -> (state dict, the other entries)."""
    obj = source
    if not isinstance(source, dict):
        if not os.path.isfile(source):
            raise ValueError(f"{what}: no such file {source!r}")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):  # the official checkpoints' args
                obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{what}: {source!r} is not a readable torch state dict ({e})") from e
    extra = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj, extra = obj["model"], {k: v for k, v in obj.items() if k != "model"}
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{what}: {source if isinstance(source, str) else 'the given dict'!r} holds no state dict")
    return obj, extra


def rename_keys(state, rules, ignore=()):
    """Another code's state dict -> our names: the first (regex, replacement) of `rules` matching a key
    renames it; keys matching an `ignore` regex are dropped -> (renamed, the keys matching neither)."""
    renamed = {k: next((re.sub(p, r, k) for p, r in rules if re.match(p, k)), None)
               for k in state if not any(re.match(p, k) for p in ignore)}
    return {new: state[k] for k, new in renamed.items() if new}, [k for k, new in renamed.items() if not new]


def check_state_dict(state, own, what, unused=()):
    """ValueError naming the keys unless `state` fills exactly `own`'s tensors and shapes, none left `unused`."""
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own)) + sorted(unused)
    misshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(f"{what}: {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected "
                         f"{unexpected[:5]}, {len(misshaped)} with another shape {misshaped[:5]}")


@dataclass
class OfficialCheckpoint:
    """The authors' released file, opened for a model file's from_official."""
    what: str  # how messages name it
    state: dict  # the state dict, the authors' names
    args: dict  # the training arguments saved beside it ({} when the file has none)

    def count(self, prefix):
        """How many numbered children `prefix` has in the state dict (prefix.0., prefix.1., ...): a stack's layers."""
        return len({k[len(prefix):].split(".")[0] for k in self.state if k.startswith(prefix)})


def read_official(source, name, required):
    """The authors' checkpoint of model `name` (the file as released, {"model": state dict, "args": ...}, or
    a bare state dict) -> OfficialCheckpoint; a ValueError naming the file unless it holds every `required` key."""
    what = f"official {name} checkpoint {source if isinstance(source, str) else ''}".strip()
    state, extra = read_state_dict(source, what)
    args = extra.get("args")
    args = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{what}: not a state dict of {name} (no {' or '.join(missing)})")
    return OfficialCheckpoint(what, state, args)


# ---------------------------------------------------------------------------------------------
# Export helpers: what lets torch.export trace the models (tools/export.py)
# ---------------------------------------------------------------------------------------------

def max_count(counts, upper):
    """The largest of per-image token counts (a tensor) as the int that sizes a batch's top-k or slice."""
    n = counts.max().item()
    torch._check(n >= 1)  # export: tells torch.export the value read is a valid size, 1 .. upper (eager: a check)
    torch._check(n <= upper)
    return n


# ---------------------------------------------------------------------------------------------
# The switches: fast paths on or off, sampling recomputed in the backward, layers checkpointed
# ---------------------------------------------------------------------------------------------

_fast_paths_on = True


@contextlib.contextmanager
def fast_paths(enabled=True):
    """`with fast_paths(False):` runs the readable code everywhere inside the block (fast paths are on by
    default); leaving the block restores what it found."""
    global _fast_paths_on
    before, _fast_paths_on = _fast_paths_on, bool(enabled)
    try:
        yield
    finally:
        _fast_paths_on = before


_recompute_samples = False


@contextlib.contextmanager
def recompute_sampling(enabled=True):
    """`with recompute_sampling():` the deformable sampling's training fast paths keep only their inputs for the
    backward pass and sample again there: the same numbers, one more grid_sample per level in the backward, the
    samples ((B*H, D, P, Q) per level and layer) not kept. The readable path keeps what autograd keeps."""
    global _recompute_samples
    before, _recompute_samples = _recompute_samples, bool(enabled)
    try:
        yield
    finally:
        _recompute_samples = before


def recomputes_samples():
    """Is recompute_sampling on (read by the model files' own sampling fast paths)?"""
    return _recompute_samples


def checkpoint_layers(layers):
    """Activation checkpointing of each module in `layers` (torch.utils.checkpoint, non-reentrant): in training
    a layer keeps only its inputs for the backward pass and runs its forward again there (the same numbers, the
    RNG state restored; one more forward of those layers); outside autograd it runs as it is. train.py
    --checkpoint-encoder applies it to a model's encoder layers. -> layers"""
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)  # an instance attribute: __call__ finds it
    return layers


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Fast paths: the same numbers as the readable functions they are attached to, with fewer passes over memory
# (with_fast_path chooses: the backbone's stem outside autograd only, which in training is the frozen stem and
# layer1; its stages and the deformable sampling in training too), each tested against its readable twin (values,
# and gradients where autograd runs it)
# ---------------------------------------------------------------------------------------------

def conv_bn_fast(conv, bn, x):
    """bn(conv(x)), a FrozenBatchNorm2d folded into the convolution (one op for three)."""
    if not isinstance(bn, FrozenBatchNorm2d):
        return bn(conv(x))
    scale, shift = bn.scale_shift()
    weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding)


def block_forward_fast(block, x):
    """BasicBlock / Bottleneck.forward: folded convolutions, ReLU and the residual add in place."""
    identity = x if block.downsample is None else conv_bn_fast(block.downsample[0], block.downsample[1], x)
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    out = x
    for i, (conv, bn) in enumerate(pairs):
        out = conv_bn_fast(conv, bn, out)
        if i < len(pairs) - 1:
            out = F.relu_(out)
    return F.relu_(out.add_(identity))


@ResNet.stem.fast
def resnet_stem_fast(resnet, x):
    """ResNet.stem in channels-last (the CPU's faster convolution layout, oneDNN's for bf16 above all), every
    block by block_forward_fast."""
    x = x.contiguous(memory_format=torch.channels_last)
    x = resnet.maxpool(F.relu_(conv_bn_fast(resnet.conv1, resnet.bn1, x)))  # stride 4
    for block in resnet.layer1:
        x = block_forward_fast(block, x)
    return x


@ResNet.stages.fast_with_autograd
def resnet_stages_fast(resnet, c2, last_stage=5):
    """ResNet.stages in channels-last, every block by block_forward_fast; in training too (autograd records the
    folded convolutions: the gradients reach conv.weight through the product with the frozen scale)."""
    x, feats = c2.contiguous(memory_format=torch.channels_last), []
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4)[:last_stage - 2]:
        for block in layer:
            x = block_forward_fast(block, x)
        feats.append(x)
    return feats  # C3, C4(, C5)


def level_maps(value, spatial_shapes):
    """value (B, N, H, D) -> per level (B*H, D, H_l, W_l), the layout grid_sample reads."""
    B, _, H, D = value.shape
    return [v.flatten(2).transpose(1, 2).reshape(B * H, D, h, w)
            for v, (h, w) in zip(value.split([h * w for h, w in spatial_shapes], 1), spatial_shapes)]


def level_gradients(grads, B, H):
    """The inverse of level_maps for gradients: per level (B*H, D, H_l, W_l) -> (B, N, H, D)."""
    return torch.cat([g.reshape(B, H * g.shape[1], -1).transpose(1, 2).reshape(B, -1, H, g.shape[1]) for g in grads], 1)


def points_major(sampling_locations, attention_weights=None):
    """(B, Q, H, L, P, 2) locations in [0, 1] and (B, Q, H, L, P) weights -> grid_sample grids (B*H, L, P, Q, 2)
    in [-1, 1] and weights (B*H, L, P, Q) (None without): each point's samples come out as contiguous (B*H, D, Q)
    slabs."""
    B, Q, H, L, P, _ = sampling_locations.shape
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).reshape(B * H, L, P, Q, 2)
    if attention_weights is None:
        return grids, None
    return grids, attention_weights.permute(0, 2, 3, 4, 1).reshape(B * H, L, P, Q)


def sample_points_major(maps, grids):
    """Bilinear samples of every level: per level (B*H, D, P, Q)."""
    return [F.grid_sample(v, grids[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
            for lvl, v in enumerate(maps)]


def weighted_sum_points_major(samples, weights):
    """sum over levels and points of weight * sample, added in place: -> (B*H, D, Q)."""
    out = samples[0].new_zeros(samples[0].shape[0], samples[0].shape[1], samples[0].shape[3])
    for lvl, sampled in enumerate(samples):
        for p in range(sampled.shape[2]):
            out.addcmul_(sampled[:, :, p], weights[:, None, lvl, p])
    return out


def sampler_backward(g_samples, maps, grids, lvl, value_grad=True, grid_grad=True):
    """grid_sample's backward for one level: (grad wrt the map (B*H, D, H_l, W_l), grad wrt its grid), each None
    when not asked for."""
    return torch.ops.aten.grid_sampler_2d_backward(g_samples, maps[lvl], grids[:, lvl], 0, 0, False,
                                                   [value_grad, grid_grad])  # bilinear, zeros, align_corners=False


class MSDeformAttnFunction(torch.autograd.Function):
    """ms_deform_attn with its backward written out: the forward keeps the samples (as autograd would keep
    them; under recompute_sampling the backward samples again), the backward makes one weighted copy per level
    for grid_sample's backward (no graph of per-point products)."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, spatial_shapes):
        B, _, H, D = value.shape
        Q = sampling_locations.shape[1]
        maps = level_maps(value, spatial_shapes)
        grids, weights = points_major(sampling_locations, attention_weights)
        samples = sample_points_major(maps, grids)
        ctx.save_for_backward(value, sampling_locations, attention_weights, *([] if _recompute_samples else samples))
        ctx.spatial_shapes = spatial_shapes
        out = weighted_sum_points_major(samples, weights)  # (B*H, D, Q)
        return out.view(B, H, D, Q).permute(0, 3, 1, 2).reshape(B, Q, H * D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        value, sampling_locations, attention_weights, *samples = ctx.saved_tensors
        B, _, H, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        g = g_out.reshape(B, Q, H, D).permute(0, 2, 3, 1).reshape(B * H, D, 1, Q)  # broadcast over the points
        maps = level_maps(value, ctx.spatial_shapes)
        grids, weights = points_major(sampling_locations, attention_weights)
        samples = samples or sample_points_major(maps, grids)  # recompute_sampling: sampled again
        g_maps, g_grids, g_weights = [], [], []
        for lvl, sampled in enumerate(samples):  # sampled (B*H, D, P, Q)
            g_weights.append((sampled * g).sum(1))  # (B*H, P, Q): d out / d weight = the sample
            g_map, g_grid = sampler_backward(g * weights[:, None, lvl], maps, grids, lvl, *ctx.needs_input_grad[:2])
            g_maps.append(g_map)
            g_grids.append(g_grid)  # (B*H, P, Q, 2)
        g_value = level_gradients(g_maps, B, H) if ctx.needs_input_grad[0] else None
        g_locs = None
        if ctx.needs_input_grad[1]:
            g_locs = 2 * torch.stack(g_grids, 1).view(B, H, L, P, Q, 2).permute(0, 4, 1, 2, 3, 5)
        g_weights = torch.stack(g_weights, 1).view(B, H, L, P, Q).permute(0, 4, 1, 2, 3)
        return g_value, g_locs, g_weights, None


def float32_under_autocast(fn):
    """fn run with autocast off and its floating-point tensor arguments in float32 while autocast is on (an
    autograd Function gets no autocast casts): the deformable sampling stays in float32 under mixed precision,
    as detrex runs its CUDA op."""
    def up(a):
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
    return run


@ms_deform_attn.fast_with_autograd
@float32_under_autocast
def ms_deform_attn_fast(value, spatial_shapes, sampling_locations, attention_weights):
    """ms_deform_attn's numbers, faster: sampled points-major, each point's samples are a contiguous (B*H, D, Q)
    slab added in place with its weight (no (B*H, D, Q, P) product); MSDeformAttnFunction, also outside autograd."""
    return MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, spatial_shapes)
