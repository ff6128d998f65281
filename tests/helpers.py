"""What several test files share (the fixtures are in the repository's conftest.py)."""
import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import re

import pytest
import torch

import common
import focus_detr
import lite_detr
import smca
import sparse_detr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


class GivenFeatures(torch.nn.Module):
    """A stand-in backbone that returns fixed features: drives a model's own forward past its CNN."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats

    def forward(self, images, pad_mask):
        return self.feats


def after_backbone(model, feats, last_stride=32, **kwargs):
    """model(images, pad_mask, **kwargs) with the backbone's output replaced by `feats`
    [(map, mask)], the last at `last_stride`: the image-level pad_mask is that mask upsampled."""
    mask = feats[-1][1].repeat_interleave(last_stride, 1).repeat_interleave(last_stride, 2)  # (B, H_img, W_img)
    backbone, model.backbone = model.backbone, GivenFeatures(feats)
    try:
        return model(torch.zeros(mask.shape[0], 3, *mask.shape[1:], dtype=feats[0][0].dtype), mask, **kwargs)
    finally:
        model.backbone = backbone


def _sized(targets, pad_mask):
    """Add each target's "size" (h, w), its image's unpadded size (what data/ puts in a target)."""
    valid = ~pad_mask
    return [{**t, "size": torch.stack([v.any(1).sum(), v.any(0).sum()])} for t, v in zip(targets, valid)]


def _random_outputs(B, Q, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(B, Q, K, generator=g),
            "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25}


def _random_targets(counts, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, K, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3}
            for n in counts]


def _alone_and_padded(x, H, W):
    """x (1, C, h, w) -> x with its all-valid mask, and a batch of 2 where x is zero-padded to (H, W)
    next to a random full-size item, with the matching pad_mask (True = padding)."""
    _, C, h, w = x.shape
    batch = torch.zeros(2, C, H, W, dtype=x.dtype)
    batch[0, :, :h, :w] = x[0]
    batch[1] = torch.randn(C, H, W, dtype=x.dtype)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[0] = True
    mask[0, :h, :w] = False
    return (x, torch.zeros(1, h, w, dtype=torch.bool)), (batch, mask)


def _assert_only_box_hidden_layers_without_gradient(model):
    """After one backward, every trainable parameter has a finite non-zero gradient except the box
    MLPs' hidden layers: their last layer starts at zero (boxes start at their reference), so on
    the first step nothing flows back through it (as in the official code)."""
    dead = {n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().max() > 0)}
    hidden = {f"bbox_embed.{i}.layers.{j}.{w}" for i in range(len(model.bbox_embed)) for j in (0, 1)
              for w in ("weight", "bias")}
    assert dead == hidden, dead ^ hidden


OFFICIAL = os.path.join(ROOT, "tests", "official")  # golden fixtures of the official code (tests/official/README.md)


def _official_file(tmp_path, fixture, backbone_key, extra=None):
    """The fixture's official state dict with a random ResNet-50 in the official naming (the fixtures
    leave the backbone out), saved as the authors' files are: {"model": ..., **extra}."""
    fx = torch.load(os.path.join(OFFICIAL, fixture), weights_only=True)
    backbone = {backbone_key(k): v for k, v in _random_resnet50().items()}
    path = tmp_path / fixture
    torch.save({"model": {**fx["state_dict"], **backbone}, **(extra or {})}, path)
    return fx, str(path), backbone


@functools.cache
def _random_resnet50():
    """A random ResNet-50 state dict in torchvision's names, float64, made once per test session (building and
    perturbing it takes a second); read only."""
    torch.manual_seed(0)
    return {k: v.double() + 0.01 * torch.randn_like(v, dtype=torch.float64)  # running_var stays > 0
            for k, v in common.Backbone(50).body.state_dict().items()}


def _param_count(module, cfg, frozen_too=False, device="meta"):
    """The parameters of module.build(cfg)'s model, the trainable ones (or all): built on the meta device by default,
    since a count needs no values and a COCO-size model takes a second to initialise ("cpu" builds it for real)."""
    with torch.device(device):
        model = module.build(cfg)[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad or frozen_too)


def _run_official_case(model, inputs, **kwargs):
    """The model's own forward on the fixture's backbone maps, with the pixel padding mask."""
    H, W = inputs["padded_hw"].tolist()
    pad = torch.ones(len(inputs["image_hw"]), H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(inputs["image_hw"].tolist()):
        pad[b, :h, :w] = False
    feats = [(f.double(), m) for f, m in zip(inputs["feats"], inputs["masks"])]
    backbone, model.backbone = model.backbone, GivenFeatures(feats if len(feats) == 3 else [None, None, *feats])
    try:
        return model(torch.zeros(pad.shape[0], 3, H, W, dtype=torch.float64), pad, **kwargs)
    finally:
        model.backbone = backbone


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _bad_official_files(tmp_path, path, from_official, drop, rename):
    """A truncated state dict and a renamed key are refused, naming the key."""
    ckpt = torch.load(path, weights_only=False)
    for name, edit, message in [("truncated", lambda sd: sd.pop(drop), "1 missing"),
                                ("renamed", lambda sd: sd.__setitem__(rename + "_x", sd.pop(rename)), "_x")]:
        sd = dict(ckpt["model"])
        edit(sd)
        torch.save({**ckpt, "model": sd}, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=re.escape(message)):
            from_official(str(tmp_path / f"{name}.pth"))


def tiny_smca(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                dim_feedforward=64, ms_dim_feedforward=48, ms_encoder="IMI", num_queries=12, num_classes=21,
                num_select=20)
    base.update(kw)
    return smca.Config(**base)


def tiny_sparse(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, enc_layers=3, dec_layers=2,
                dim_feedforward=64, num_queries=10, num_classes=21, num_select=20, rho=0.3)
    base.update(kw)
    return sparse_detr.Config(**base)


def tiny_lite(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, enc_layers=6, dec_layers=2,
                dim_feedforward=64, num_queries=10, num_classes=21, num_select=20)
    base.update(kw)
    return lite_detr.Config(**base)


def tiny_focus(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, dec_layers=2, dim_feedforward=64,
                num_queries=10, num_classes=21, num_select=20, num_fine_tokens=8, dn_number=6)
    base.update(kw)
    return focus_detr.Config(**base)


def _bilinear_naive(v, x, y):
    """v (D, H, W); x, y pixel coordinates (align_corners=False); zeros outside."""
    D, H, W = v.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(D, dtype=v.dtype)
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        w = (1 - abs(x - xx)) * (1 - abs(y - yy))
        if 0 <= xx < W and 0 <= yy < H:
            out += w * v[:, yy, xx]
    return out


TINY_SET = ["--set", "backbone_depth=18", "hidden_dim=32", "nheads=4", "enc_layers=1", "dec_layers=2",
            "dim_feedforward=64", "num_queries=12", "num_select=20"]


def _train_args(data, out, *extra):
    """train.py's flags for a tiny SMCA run on `data` into `out`; `extra` goes after them (and so wins). To keep a
    tiny run short, the backbone is frozen (--lr-backbone 0, DETR's convention: 3.05 -> 1.5 s a run; its gradients,
    also in bf16, are tested in tests/test_common.py) and the run's end draws no val pictures (--pictures 0)."""
    return ["--model", "smca", "--data", data, "--output-dir", str(out), "--batch-size", "4", "--num-workers", "0",
            "--scales", "shapes", "--backbone-weights", "none", "--lr-backbone", "0", "--pictures", "0",
            "--lr-drop", "100", "--log-every", "100", *extra, *TINY_SET]


def _train_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {(r["epoch"], r["iter"]): r["loss"] for r in map(json.loads, f) if r["type"] == "train"}


def _tiny_checkpoint(path, data, name="smca", **kw):
    """A checkpoint as train.py writes it (model, config, args, categories), of a tiny random model."""
    module = importlib.import_module(name)
    tiny = {"smca": tiny_smca, "sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    torch.manual_seed(0)
    model = module.build(tiny(**kw))[0]
    torch.nn.init.constant_(model.class_embed.bias if name == "smca" else model.class_embed[-2].bias, 2.0)  # confident
    with open(os.path.join(data, "annotations", "instances_val.json")) as f:
        cats = {c["id"]: c["name"] for c in json.load(f)["categories"]}
    torch.save({"model": model.state_dict(), "model_name": name, "config": dataclasses.asdict(model.cfg),
                "args": {"data": data, "scales": "shapes"}, "categories": cats}, path)
    return cats
