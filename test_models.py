"""Tests: the shared ops against references, the data pipeline, the models, the training loop.

CPU, tiny configurations; the whole file runs in a few minutes on 2 cores.
"""
import dataclasses
import importlib
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import common
import data as datalib
import detect
import experiments
import focus_detr
import lite_detr
import pretrain
import smca
import sparse_detr
import train
import visualize
from data import shapes


# ---------------------------------------------------------------------------------------------
# Helpers shared by the sections below
# ---------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))


class GivenFeatures(torch.nn.Module):
    """A stand-in backbone that returns fixed features: drives a model's own forward past its CNN."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats

    def forward(self, images, pad_mask):
        return self.feats


def after_backbone(model, feats, **kwargs):
    """model(images, pad_mask, **kwargs) with the backbone's output replaced by `feats`
    [(map, mask)], the last at stride 32: the image-level pad_mask is that mask upsampled 32x."""
    mask = feats[-1][1].repeat_interleave(32, 1).repeat_interleave(32, 2)  # (B, H_img, W_img)
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
    dead = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().max() > 0)}
    hidden = {f"bbox_embed.{i}.layers.{j}.{w}" for i in range(len(model.bbox_embed)) for j in (0, 1)
              for w in ("weight", "bias")}
    assert dead == hidden, dead ^ hidden


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "set")
    shapes.generate(root, num_train=8, num_val=3, seed=3)
    return root


OFFICIAL = os.path.join(ROOT, "tests", "official")  # golden fixtures of the official code (tests/official/README.md)


def _official_file(tmp_path, fixture, backbone_key, extra=None):
    """The fixture's official state dict with a random ResNet-50 in the official naming (the fixtures
    leave the backbone out), saved as the authors' files are: {"model": ..., **extra}."""
    fx = torch.load(os.path.join(OFFICIAL, fixture), weights_only=True)
    torch.manual_seed(0)
    backbone = {backbone_key(k): v.double() + 0.01 * torch.randn_like(v, dtype=torch.float64)  # running_var stays > 0
                for k, v in common.Backbone(50).body.state_dict().items()}
    path = tmp_path / fixture
    torch.save({"model": {**fx["state_dict"], **backbone}, **(extra or {})}, path)
    return fx, str(path), backbone


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


# ---------------------------------------------------------------------------------------------
# common.py: backbone, position encoding, deformable sampling, box ops, matcher, criterion
# ---------------------------------------------------------------------------------------------

def test_giou_hand_cases_and_degenerate_boxes():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0]])
    g = common.generalized_box_iou(a, b)[0]
    # disjoint: IoU 0, enclosing 3, union 2 -> -1/3; identical -> 1; half overlap: IoU 1/3, enclosing = union
    assert torch.allclose(g, torch.tensor([-1 / 3, 1.0, 1 / 3]), atol=1e-6)
    bad = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [float("nan"), 0.0, 1.0, 1.0],
                        [0.0, 0.0, float("inf"), 1.0]], requires_grad=True)
    g = common.generalized_box_iou(bad, bad)
    assert torch.isfinite(g).all()
    g.sum().backward()
    assert torch.isfinite(bad.grad).all()


def test_box_conversions_round_trip():
    b = torch.rand(10, 4)
    x0, y0, x1, y1 = common.box_cxcywh_to_xyxy(b).unbind(-1)
    assert torch.allclose(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1), b, atol=1e-6)


def test_matcher_is_optimal_against_brute_force():
    matcher = common.HungarianMatcher()
    out, tgt = _random_outputs(1, 5, 7), _random_targets([3], 7)
    src, dst = matcher(out, tgt)[0]
    # the cost written out independently of the matcher
    p = out["pred_logits"][0].sigmoid()[:, tgt[0]["labels"]]
    cls = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
    l1 = (out["pred_boxes"][0][:, None] - tgt[0]["boxes"][None]).abs().sum(-1)
    giou = common.generalized_box_iou(common.box_cxcywh_to_xyxy(out["pred_boxes"][0]),
                                      common.box_cxcywh_to_xyxy(tgt[0]["boxes"]))
    cost = 2 * cls + 5 * l1 - 2 * giou  # (5, 3)
    best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert torch.isclose(cost[src, dst].sum(), torch.as_tensor(best), atol=1e-5)


def test_matcher_alone_equals_batched_and_handles_empty():
    matcher = common.HungarianMatcher()
    out, tgt = _random_outputs(3, 6, 5), _random_targets([2, 0, 4], 5)
    batched = matcher(out, tgt)
    assert len(batched[1][0]) == 0 and len(batched[1][1]) == 0
    for b in range(3):
        alone = matcher({k: v[b:b + 1] for k, v in out.items()}, [tgt[b]])[0]
        assert torch.equal(alone[0], batched[b][0]) and torch.equal(alone[1], batched[b][1])
    assert all(len(i) == 0 for i, _ in matcher(out, _random_targets([0, 0, 0], 5)))
    nan_out = {k: torch.full_like(v, float("nan")) for k, v in out.items()}
    assert [len(i) for i, _ in matcher(nan_out, tgt)] == [2, 0, 4]  # no crash on a diverged model


def test_criterion_with_an_image_without_boxes():
    out, tgt = _random_outputs(2, 6, 5), _random_targets([2, 0], 5)
    out = {k: v.clone().requires_grad_() for k, v in out.items()}
    crit = common.SetCriterion(5)
    losses = crit(out, tgt)
    assert all(torch.isfinite(v) for v in losses.values())
    # loss_ce written out: focal loss of every logit against one-hot targets at the matched pairs / 2 boxes
    idx = crit.matcher(out, tgt)
    onehot = torch.zeros(2, 6, 5)
    for q, j in zip(*idx[0]):
        onehot[0, q, tgt[0]["labels"][j]] = 1
    p = out["pred_logits"].sigmoid()
    pt = p * onehot + (1 - p) * (1 - onehot)
    w = 0.25 * onehot + 0.75 * (1 - onehot)
    expected = (w * -torch.log(pt) * (1 - pt) ** 2).sum() / 2
    assert torch.allclose(losses["loss_ce"], expected, rtol=1e-5)
    sum(losses.values()).backward()
    assert out["pred_logits"].grad[1].abs().sum() > 0  # the empty image still trains its negatives
    empty = crit({k: v.detach() for k, v in out.items()}, _random_targets([0, 0], 5))
    assert empty["loss_bbox"] == 0 and torch.isfinite(empty["loss_ce"])


def test_postprocess_scales_to_original_size():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2] = 5.0
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2], [0.5, 0.5, 0.1, 0.1]]])
    res = common.PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert res["labels"][0] == 2 and res["scores"][0] > 0.99
    assert torch.allclose(res["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))  # w 200, h 100


def test_sine_position_embedding_ignores_padding():
    alone = common.sine_position_embedding(torch.zeros(1, 3, 4, dtype=torch.bool), 16)
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    mask[:, :3, :4] = False
    padded = common.sine_position_embedding(mask, 16)
    assert padded.shape == (1, 32, 5, 7)
    assert torch.allclose(alone, padded[..., :3, :4], atol=1e-6)


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


def test_ms_deform_attn_matches_naive_loop():
    torch.manual_seed(0)
    shapes_ = [(3, 4), (2, 2), (5, 3)]
    B, Q, H, D, P = 2, 3, 2, 4, 2
    L = len(shapes_)
    value = torch.randn(B, sum(h * w for h, w in shapes_), H, D, dtype=torch.float64)
    loc = torch.rand(B, Q, H, L, P, 2, dtype=torch.float64) * 1.3 - 0.15  # some outside the map
    attw = torch.rand(B, Q, H, L, P, dtype=torch.float64)
    out = common.ms_deform_attn(value, shapes_, loc, attw)
    starts = np.cumsum([0] + [h * w for h, w in shapes_])
    ref = torch.zeros(B, Q, H, D, dtype=torch.float64)
    for b, q, h, lvl, p in itertools.product(range(B), range(Q), range(H), range(L), range(P)):
        hl, wl = shapes_[lvl]
        v = value[b, starts[lvl]:starts[lvl + 1], h].T.reshape(D, hl, wl)
        x, y = loc[b, q, h, lvl, p, 0] * wl - 0.5, loc[b, q, h, lvl, p, 1] * hl - 0.5
        ref[b, q, h] += attw[b, q, h, lvl, p] * _bilinear_naive(v, x.item(), y.item())
    assert torch.allclose(out, ref.view(B, Q, H * D), atol=1e-10)


def test_halve_mask_matches_a_strided_conv_on_the_image_alone():
    for h, w in [(3, 4), (5, 5), (1, 2), (4, 7)]:
        mask = torch.ones(2, 6, 8, dtype=torch.bool)
        mask[0, :h, :w] = False
        mask[1] = False
        half = common.halve_mask(mask)
        assert half.shape == (2, 3, 4) and not half[1].any()
        alone = torch.nn.functional.conv2d(torch.ones(1, 1, h, w), torch.ones(1, 1, 3, 3), stride=2, padding=1)
        assert (~half[0]).sum().item() == alone.numel()
        assert not half[0, :alone.shape[2], :alone.shape[3]].any()


TORCHVISION_PARAMS = {18: 11_689_512, 50: 25_557_032}  # torchvision.models.resnetXX().parameters()


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_has_torchvision_layout(depth):
    body = common.ResNet(depth)
    state = body.state_dict()
    learnable = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var")))
    fc = 512 * common.RESNET_SPECS[depth][0].expansion * 1000 + 1000
    assert learnable + fc == TORCHVISION_PARAMS[depth]
    assert "layer2.0.downsample.1.running_var" in state and "layer4.1.bn2.weight" in state


def _torchvision_format(depth, seed=0):
    """A state dict as torchvision writes it: BatchNorm's num_batches_tracked and the fc layer included."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in common.ResNet(depth).state_dict().items()}
    for k in [k for k in state if k.endswith("running_var")]:
        state[k] = state[k].abs() + 0.5
        state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(100)
    width = 512 * common.RESNET_SPECS[depth][0].expansion
    state.update({"fc.weight": torch.randn(1000, width, generator=g), "fc.bias": torch.zeros(1000)})
    return state


def test_backbone_loads_torchvision_weights_and_rejects_bad_files(tmp_path):
    path = tmp_path / "resnet18.pth"
    state = _torchvision_format(18)
    torch.save(state, path)
    bb = common.Backbone(18)
    common.load_backbone_weights(bb, str(path))
    assert torch.equal(bb.body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(bb.body.bn1.running_var, state["bn1.running_var"])
    with pytest.raises(ValueError, match="missing"):
        common.load_backbone_weights(common.Backbone(50), str(path))
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"1 missing \['layer1.0.conv1.weight'\]"):
        common.load_backbone_weights(common.Backbone(18), str(tmp_path / "partial.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        common.load_backbone_weights(bb, str(tmp_path / "corrupt.pth"))
    with pytest.raises(ValueError, match="no such file"):
        common.load_backbone_weights(bb, str(tmp_path / "absent.pth"))
    # a BatchNorm backbone (the shapes configs) from one of our own checkpoints: backbone.body.* taken
    trained = common.Backbone(18, "bn")
    torch.nn.init.normal_(trained.body.layer2[0].conv1.weight)
    torch.save({"model": {**{f"backbone.body.{k}": v for k, v in trained.body.state_dict().items()},
                          "class_embed.weight": torch.zeros(3)}, "epoch": 1}, tmp_path / "checkpoint.pth")
    fresh = common.Backbone(18, "bn")
    common.load_backbone_weights(fresh, str(tmp_path / "checkpoint.pth"))
    assert torch.equal(fresh.body.layer2[0].conv1.weight, trained.body.layer2[0].conv1.weight)


def test_backbone_freezes_stem_and_layer1():
    for norm in ("frozen_bn", "bn"):
        bb = common.Backbone(18, norm)
        trainable = {n.split(".")[1] for n, p in bb.named_parameters() if p.requires_grad}
        assert trainable == {"layer2", "layer3", "layer4"}


EXPLAIN_KEYS = {"smca": {"log_priors", "scale_weights", "level_shapes"}, "sparse_detr": {"dam"},
                "lite_detr": {"spatial_shapes", "token_pad_mask", "n_low", "dec_sampling_locations",
                              "dec_attention_weights"},
                "focus_detr": {"kept_tokens", "fine_tokens"}}


@pytest.mark.parametrize("name", list(EXPLAIN_KEYS))
def test_interface_every_model_takes_the_same_call(name):
    """model(images, pad_mask, targets) trains and model(images, pad_mask) evaluates, for every model;
    explain=True adds exactly its documented keys and changes no detection."""
    torch.manual_seed(0)
    tiny = {"smca": tiny_smca, "sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    model, criterion, post = importlib.import_module(name).build(tiny())
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    pad_mask[1, 64:] = True
    targets = _sized(_random_targets([2, 1], 21), pad_mask)
    losses = criterion(model.train()(images, pad_mask, targets), targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    model.eval()
    with torch.no_grad():
        plain, explained = model(images, pad_mask), model(images, pad_mask, explain=True)
    assert set(explained) - set(plain) == EXPLAIN_KEYS[name]
    cfg, Q = model.cfg, model.cfg.num_queries
    if name == "smca":  # log G per decoder layer (B, H, Q, N) over the level_shapes' cells
        N = sum(h * w for h, w in explained["level_shapes"])
        assert [tuple(g.shape) for g in explained["log_priors"]] == [(2, cfg.nheads, Q, N)] * cfg.dec_layers
    elif name == "sparse_detr":
        assert explained["dam"].shape == explained["token_pad_mask"].shape
    elif name == "lite_detr":
        N = explained["token_pad_mask"].shape[1]
        assert explained["dec_sampling_locations"].shape == (2, cfg.dec_layers, Q, cfg.nheads, 4, cfg.dec_n_points, 2)
        assert explained["n_low"] == explained["spatial_shapes"][0][0] * explained["spatial_shapes"][0][1] < N
    else:
        assert len(explained["kept_tokens"]) == len(explained["fine_tokens"]) == cfg.enc_layers
        assert [tuple(t.shape) for t in explained["kept_tokens"]] == [(2, int(k.max())) for k in explained["token_nums"]]
    for key in ("pred_logits", "pred_boxes"):
        assert plain[key].shape[:2] == (2, tiny().num_queries) and torch.equal(plain[key], explained[key])
    assert len(post(plain, torch.tensor([[96, 128], [64, 128]]))) == 2
    common.FAST_INFERENCE = False  # the readable reference path gives the same detections
    try:
        with torch.no_grad():
            reference = model(images, pad_mask)
    finally:
        common.FAST_INFERENCE = True
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(reference[key], plain[key], atol=1e-4), key


def test_input_tokens_extra_level_mask_and_position_switches():
    """extra_level_mask="interpolate" is the official mask of the extra level (the image's mask
    resized, nearest), "exact" is halve_mask of C5's; they differ for a 200 x 290 image padded to
    250 x 330. temperature / offset reach every level's sine positions."""
    torch.manual_seed(0)
    pixel = torch.zeros(2, 250, 330, dtype=torch.bool)
    pixel[1, 200:], pixel[1, :, 290:] = True, True
    feats = []
    for c, s in [(8, 8), (16, 16), (32, 32)]:
        shape = (math.ceil(250 / s), math.ceil(330 / s))
        feats.append((torch.randn(2, c, *shape), F.interpolate(pixel[None].float(), size=shape)[0].bool()))
    proj, level_embed = common.InputProjections([8, 16, 32], 32, 4), torch.zeros(4, 32)
    exact = common.input_tokens(proj, level_embed, feats, pad_mask=pixel)[2].masks[3]
    official = common.input_tokens(proj, level_embed, feats, pad_mask=pixel, extra_level_mask="interpolate")[2].masks[3]
    assert torch.equal(exact, common.halve_mask(feats[2][1]))
    assert torch.equal(official, F.interpolate(pixel[None].float(), size=exact.shape[1:])[0].bool())
    assert not torch.equal(exact, official)
    src, pos, geo = common.input_tokens(proj, level_embed, feats, temperature=20, offset=0.0)
    want = common.sine_position_embedding(geo.masks[1], 16, 20, offset=0.0).flatten(2).transpose(1, 2)
    n0 = geo.spatial_shapes[0][0] * geo.spatial_shapes[0][1]
    assert torch.allclose(pos[:, n0:n0 + want.shape[1]], want)
    assert not torch.allclose(pos, common.input_tokens(proj, level_embed, feats)[1])


def test_top_queries_skips_padding_unless_told_otherwise():
    """The two-stage selection never picks a padded token; over_padding=True (the official code)
    ranks them like the others."""
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    pad = torch.tensor([[False, True, False, False]])
    assert common.top_queries(scores, pad, 2).tolist() == [[2, 3]]
    assert common.top_queries(scores, pad, 2, over_padding=True).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="num_queries 5 exceeds the 4 encoder tokens"):
        common.top_queries(scores, pad, 5)


@pytest.mark.parametrize("name", ["sparse_detr", "lite_detr", "focus_detr"])
def test_official_switches_reach_the_two_stage_selection_and_the_extra_level(name, monkeypatch):
    """two_stage_over_padding and extra_level_mask travel from the Config to the shared functions."""
    module = importlib.import_module(name)
    tiny = {"sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    seen = {}

    def top_queries(*args):
        seen["over_padding"] = args[3]
        return common.top_queries(*args)

    def input_tokens(*args):
        seen["extra"] = args[5]
        return common.input_tokens(*args)
    monkeypatch.setattr(module, "top_queries", top_queries)
    monkeypatch.setattr(module, "input_tokens", input_tokens)
    model = module.build(tiny(two_stage_over_padding=True, extra_level_mask="interpolate"))[0].eval()
    images, pad_mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    pad_mask[1, 40:] = True
    with torch.no_grad():
        model(images, pad_mask)
    assert seen == {"over_padding": True, "extra": "interpolate"}


@pytest.fixture
def reference_path(monkeypatch):
    """Run with the inference fast paths switched off (common.FAST_INFERENCE) inside the test."""
    def switch(on):
        monkeypatch.setattr(common, "FAST_INFERENCE", not on)
    return switch


@pytest.mark.parametrize("depth,norm", [(18, "frozen_bn"), (50, "frozen_bn"), (18, "bn")])
def test_backbone_fast_path_equals_the_reference(depth, norm, reference_path):
    """Outside autograd the backbone folds FrozenBatchNorm2d into its convolutions, runs channels-last
    and in place: the same maps within float32 rounding (a few 1e-6 relative after ~50 layers);
    with autograd on, the fast path is never taken (bit-identical)."""
    torch.manual_seed(0)
    bb = common.Backbone(depth, norm).eval()
    for m in bb.modules():  # non-trivial statistics, so the folding is exercised
        if isinstance(m, (common.FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5) if isinstance(m.weight, torch.nn.Parameter) else m.weight.uniform_(0.5, 1.5)
    images, mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        reference_path(True)
        ref = bb(images, mask)
        reference_path(False)
        fast = bb(images, mask)
    for (a, ma), (b, mb) in zip(ref, fast):
        assert torch.equal(ma, mb) and (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(bb(images, mask), bb(images, mask)))  # autograd on


def test_ms_deform_attn_fast_path_equals_the_reference(reference_path):
    """The in-place, point-by-point weighted sum gives the level-by-level product's result."""
    torch.manual_seed(0)
    shapes = [(6, 8), (3, 4), (2, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8)
    locs, weights = torch.rand(2, 10, 4, 3, 5, 2) * 1.2 - 0.1, torch.rand(2, 10, 4, 3, 5).softmax(-1)
    with torch.no_grad():
        reference_path(True)
        ref = common.ms_deform_attn(value, shapes, locs, weights)
        reference_path(False)
        fast = common.ms_deform_attn(value, shapes, locs, weights)
    assert torch.allclose(ref, fast, atol=1e-6)


def test_copied_blocks_stay_in_sync():
    """Every `# Copied from module.name` block in a model file is a verbatim copy of its source."""
    import importlib
    import inspect
    import re
    checked = []
    for module in (smca, sparse_detr, lite_detr, focus_detr):
        text = inspect.getsource(module)
        for match in re.finditer(r"^( *)# Copied from ([\w.]+)\n", text, re.M):
            indent, source = match.groups()
            mod_name, *path = source.split(".")
            src_obj, copy_obj = importlib.import_module(mod_name), module
            for attr in path:
                src_obj = inspect.unwrap(getattr(src_obj, attr))
            # the copy is the definition right after the comment (a class's methods live on the class)
            name = re.match(r" *(?:@\w+\n *)*(?:def|class) (\w+)", text[match.end():]).group(1)
            owner = copy_obj if not indent else next(c for c in vars(copy_obj).values()
                                                        if inspect.isclass(c) and name in vars(c))
            copy_def = inspect.unwrap(getattr(owner, name))
            assert inspect.getsource(copy_def) == inspect.getsource(src_obj), f"{module.__name__}.{name} != {source}"
            checked.append(f"{module.__name__}.{name}")
    assert checked == ["focus_detr.ScoringNetwork"]  # everything else the models share lives in common.py


# ---------------------------------------------------------------------------------------------
# data/: the shapes set, transforms, the COCO-format dataset, batching, evaluation
# ---------------------------------------------------------------------------------------------

def test_shapes_generator_is_deterministic_and_coco_like(tiny_shapes, tmp_path):
    shapes.generate(str(tmp_path / "again"), num_train=8, num_val=3, seed=3)
    for split in ("train", "val"):
        a = json.load(open(os.path.join(tiny_shapes, "annotations", f"instances_{split}.json")))
        b = json.load(open(tmp_path / "again" / "annotations" / f"instances_{split}.json"))
        assert a == b
    ids = [c["id"] for c in a["categories"]]
    assert len(ids) >= 4 and ids != list(range(min(ids), min(ids) + len(ids)))  # non-contiguous
    ds = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "train"))
    assert ds.num_classes == max(ids) + 1
    sizes = {tuple(ds.coco.imgs[i][k] for k in ("width", "height")) for i in ds.ids}
    assert len(sizes) > 1  # images of varying size, so batches pad
    with pytest.raises(ValueError, match="not the shapes set asked for .*seed 4"):
        shapes.ensure(tiny_shapes, 8, 3, seed=4)  # never overwrites another set


def test_shapes_set_keeps_cocos_mix_of_sizes_and_several_objects_per_image(tmp_path):
    """Format 2's promises: at least 3 objects per image on average; small (< 32^2), medium and large
    (> 96^2) objects all present; every shape of a colour that differs from the background under it."""
    shapes.generate(str(tmp_path / "s"), num_train=60, num_val=1, seed=5)
    ann = json.load(open(tmp_path / "s" / "annotations" / "instances_train.json"))
    areas = np.array([a["area"] for a in ann["annotations"]])
    assert len(areas) / len(ann["images"]) >= 3
    assert (areas < 32 ** 2).mean() > 0.15 and (areas > 96 ** 2).mean() > 0.05
    assert ((areas >= 32 ** 2) & (areas <= 96 ** 2)).mean() > 0.3
    assert ann["info"]["version"] == shapes.FORMAT_VERSION


def test_shapes_ensure_moves_an_older_version_aside_and_refuses_strangers(tiny_shapes, tmp_path):
    import shutil
    root = str(tmp_path / "shapes")
    shutil.copytree(tiny_shapes, root)
    open(os.path.join(root, "checkpoint_next_to_it.pth"), "w").write("user file")
    for split in ("train", "val"):  # make it an older version of the set
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        d = json.load(open(path))
        d["info"]["version"] = shapes.FORMAT_VERSION - 1
        json.dump(d, open(path, "w"))
    shapes.ensure(root, 8, 3, seed=3)
    aside = f"{root}-v{shapes.FORMAT_VERSION - 1}"
    assert open(os.path.join(aside, "checkpoint_next_to_it.pth")).read() == "user file"  # kept, moved aside
    assert json.load(open(os.path.join(root, "annotations", "instances_val.json")))["info"]["version"] == shapes.FORMAT_VERSION
    shutil.copytree(aside, root + "2")
    shutil.copytree(aside, root + "2-v1")  # where it would go is taken: refuse, touch nothing
    with pytest.raises(ValueError, match="version 1 of the shapes set.*exists"):
        shapes.ensure(root + "2", 8, 3, seed=3)
    os.makedirs(tmp_path / "mine")
    with pytest.raises(ValueError, match="not the shapes set asked for"):
        shapes.ensure(str(tmp_path / "mine"), 8, 3, seed=3)
    assert os.listdir(tmp_path / "mine") == []


def test_transforms_keep_boxes_on_the_object():
    """A red rectangle on black: after flip / resize / crop the box must still frame the red pixels."""
    tf = datalib.make_transforms("train", **datalib.SHAPES_SCALES)
    arr = np.zeros((180, 240, 3), dtype=np.uint8)
    arr[40:100, 150:210, 0] = 255
    img = Image.fromarray(arr)
    random.seed(0)
    seen_empty = seen_box = 0
    for _ in range(40):
        x, t = tf(img, {"boxes": torch.tensor([[150.0, 40.0, 210.0, 100.0]]), "labels": torch.tensor([3])})
        red = x[0] * 0.229 + 0.485 > 0.5  # undo the normalisation of the red channel
        h, w = x.shape[1:]
        assert tuple(t["size"].tolist()) == (h, w)
        if len(t["boxes"]) == 0:
            seen_empty += 1
            assert red.sum() <= 2 * max(h, w)  # at most a sliver of the object survives the crop
            continue
        seen_box += 1
        ys, xs = torch.nonzero(red, as_tuple=True)
        cx, cy, bw, bh = (t["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        measured = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert np.allclose([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], measured, atol=2.0)
    assert seen_box > 20


def _write_coco(root, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 4, "name": "b"})):
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": list(categories)}, f)


def test_dataset_image_modes_and_box_hygiene(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "val"))
    modes = {"gray.png": Image.new("L", (40, 30), 128), "pal.png": Image.new("P", (40, 30), 3),
             "rgba.png": Image.new("RGBA", (40, 30), (1, 2, 3, 4)), "cmyk.jpg": Image.new("CMYK", (40, 30)),
             "deep.png": Image.fromarray(np.full((30, 40), 60000, dtype=np.uint16))}
    images = []
    for i, (name, im) in enumerate(modes.items(), start=1):
        im.save(os.path.join(root, "val", name))
        images.append({"id": i, "file_name": name, "width": 40, "height": 30})
    anns = [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 1},  # crowd
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [30, 20, 20, 20], "iscrowd": 0}]  # clipped
    _write_coco(root, images, anns)
    ds = datalib.CocoDetection(*datalib.find_split(root, "val"))
    assert len(ds) == 5 and ds.num_classes == 5 and ds.dropped_boxes == 1
    for i in range(5):
        im, t = ds[i]
        assert im.mode == "RGB" and im.size == (40, 30)
    assert ds[4][0].getpixel((0, 0))[0] > 200  # 16-bit 60000 scales to bright, not clipped to white noise
    assert ds[0][1]["labels"].tolist() == [4]  # crowd and zero-width left out
    assert ds[1][1]["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]
    assert len(ds[2][1]["boxes"]) == 0  # images without annotations stay in


def test_dataset_errors_name_the_file(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ValueError, match="no 'val' split"):
        datalib.find_split(root, "val")
    _write_coco(root, [{"id": 7, "file_name": "x.jpg", "width": 10, "height": 10}], [])
    with pytest.raises(ValueError, match=r"image id 7: file .*x.jpg is missing"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    (tmp_path / "val" / "x.jpg").write_bytes(b"garbage")
    ds = datalib.CocoDetection(*datalib.find_split(root, "val"))
    with pytest.raises(ValueError, match=r"image id 7: cannot read .*x.jpg"):
        ds[0]
    _write_coco(root, [{"id": 7, "file_name": "x.jpg"}],
                [{"id": 9, "image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="annotation 9 of image id 7 has category_id 3"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    _write_coco(root, [{"id": 7, "file_name": "x.jpg"}], [{"id": 9, "image_id": 8, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="image id 8"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    ann = tmp_path / "annotations" / "instances_val.json"
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="instances_val.json is not valid JSON"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lacks the COCO key"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))


def test_collate_pads_bottom_right():
    a, b = torch.ones(3, 4, 5), torch.ones(3, 6, 3)
    images, pad_mask, _ = datalib.collate([(a, {}), (b, {})])
    assert images.shape == (2, 3, 6, 5) and pad_mask.shape == (2, 6, 5)
    assert not pad_mask[0, :4, :5].any() and pad_mask[0, 4:].all() and pad_mask[1, :, 3:].all()
    assert images[0, :, 4:].abs().sum() == 0
    assert torch.equal(common.valid_image_sizes(pad_mask), torch.tensor([[5.0, 4.0], [3.0, 6.0]]))


def test_evaluator_perfect_detections_score_one(tiny_shapes):
    ds = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "val"))
    ev = datalib.CocoEvaluator(ds.coco)
    for img_id in ds.ids[:2] * 2:  # an image repeated (as the distributed sampler does) counts once
        anns = [a for a in ds.coco.imgToAnns[img_id] if not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns]).view(-1, 4)
        ev.update({img_id: {"scores": torch.ones(len(anns)), "labels": torch.tensor([a["category_id"] for a in anns]),
                            "boxes": boxes}})
    res = ev.summarize(ds.categories)
    assert res["stats"]["AP"] == pytest.approx(1.0) and res["stats"]["AP50"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) or math.isnan(v) for v in res["per_class"].values())
    assert datalib.CocoEvaluator(ds.coco).summarize()["stats"]["AP"] == 0.0


# ---------------------------------------------------------------------------------------------
# pretrain.py
# ---------------------------------------------------------------------------------------------

def test_pretrain_crops_are_centred_on_their_object_and_background_has_none(tmp_path):
    """A hand-built set: one red rectangle (category 5 -> class index 1) on black."""
    root = tmp_path / "set"
    os.makedirs(root / "train")
    os.makedirs(root / "annotations")
    arr = np.zeros((200, 240, 3), dtype=np.uint8)
    arr[60:100, 120:180, 0] = 255
    Image.fromarray(arr).save(root / "train" / "a.png")
    json.dump({"images": [{"id": 1, "file_name": "a.png", "width": 240, "height": 200}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [120, 60, 60, 40], "area": 2400,
                                "iscrowd": 0}],
               "categories": shapes.CATEGORIES}, open(root / "annotations" / "instances_train.json", "w"))
    ds = pretrain.ObjectCrops(str(root), 32)
    random.seed(0)
    for _ in range(5):
        x, label = ds[0]
        rgb = x * torch.tensor(datalib.transforms.IMAGENET_STD)[:, None, None] + torch.tensor(datalib.transforms.IMAGENET_MEAN)[:, None, None]
        assert label == 1 and x.shape == (3, 32, 32)
        assert rgb[0, 16, 16] > 0.9 and rgb[1:, 16, 16].abs().max() < 0.1  # the crop's centre is the object
        x0, y0, side = ds._background_box(1)
        assert not (x0 < 150 < x0 + side and y0 < 80 < y0 + side)  # no object centre in a background crop


def test_pretrain_writes_a_backbone_the_detectors_load_and_ensure_reuses_it(tiny_shapes, tmp_path):
    import shutil
    root = str(tmp_path / "shapes")
    shutil.copytree(tiny_shapes, root)
    out = pretrain.pretrain(root, 18, str(tmp_path / "bb.pth"), log=lambda s: None, steps=2, batch_size=4, warmup=1)
    info = pretrain.read_info(out)
    assert info["shapes_version"] == shapes.FORMAT_VERSION and info["depth"] == 18 and 0 <= info["accuracy"] <= 1
    before = torch.load(out, weights_only=True)["model"]
    backbone = common.Backbone(18, "frozen_bn")
    common.load_backbone_weights(backbone, out)  # BatchNorm statistics become the frozen ones
    assert torch.equal(backbone.body.layer3[0].bn1.running_var, before["layer3.0.bn1.running_var"])
    assert not torch.equal(before["conv1.weight"], common.ResNet(18).conv1.weight)  # the stem trained too
    shutil.copy(out, pretrain.default_path(root, 18))
    assert pretrain.ensure(root, 18, log=lambda s: None) == pretrain.default_path(root, 18)  # reused, not retrained
    with pytest.raises(ValueError, match="not the pretrained ResNet-18 this code would write"):
        pretrain.ensure(root, 18, seed=1)
    for bad in (dict(warmup=0), dict(steps=5, warmup=5), dict(crop=16), dict(batch_size=0), dict(lr=0.0)):
        with pytest.raises(ValueError, match="needs batch_size >= 1, crop >= 32"):
            pretrain.pretrain(root, 18, str(tmp_path / "bad.pth"), log=lambda s: None, **bad)
    assert not os.path.exists(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="use it with --data shapes"):
        train.main(["--model", "smca", "--data", root, "--backbone-weights", "shapes", "--output-dir", str(tmp_path / "r")])


# ---------------------------------------------------------------------------------------------
# smca.py
# ---------------------------------------------------------------------------------------------

def tiny_smca(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                dim_feedforward=64, ms_dim_feedforward=48, ms_encoder="IMI", num_queries=12, num_classes=21,
                num_select=20)
    base.update(kw)
    return smca.Config(**base)


def test_smca_parameter_counts_match_official():
    model, _, _ = smca.build(smca.Config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41_537_825
    # The DETR baseline: official DETR-R50 is 41,302,368 with 100 queries and 92 logits;
    # +200 queries x 256, -1 class column (257) = 41,353,311.
    model, _, _ = smca.build(smca.Config(spatial_prior=False))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41_353_311


def test_smca_multiscale_parameter_count_is_the_papers():
    """Table 3: 2Intra-Multi-2Intra has 39.5M parameters (Table 4 rounds it to 40M)."""
    model, _, _ = smca.build(smca.Config(multiscale=True))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(n / 1e6, 1) == 39.5, n


@pytest.mark.parametrize("multiscale", [False, True])
def test_smca_output_shapes_and_box_range(multiscale):
    cfg = tiny_smca(multiscale=multiscale)
    model, _, post = smca.build(cfg)
    model.eval()
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    pad_mask[1, 64:, :] = True
    out = model(images, pad_mask, explain=True)
    assert out["pred_logits"].shape == (2, 12, 21) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 1 and out["centers"].shape == (2, 12, 2)
    shapes = [(6, 8), (3, 4), (2, 2)] if multiscale else [(3, 4)]  # f16, f32, f64 of a 96 x 128 input
    assert out["level_shapes"] == shapes
    assert out["log_priors"][0].shape == (2, 4, 12, sum(h * w for h, w in shapes))
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    res = post(out, torch.tensor([[480, 640], [320, 640]]))
    assert res[0]["boxes"].shape == (20, 4)
    assert "log_priors" not in model(images, pad_mask)  # attention maps only on request


def test_smca_log_prior_is_the_papers_gaussian():
    """log G at every cell equals -(s_x^2 dx^2 + s_y^2 dy^2) / beta around centre + head offset."""
    cfg = tiny_smca()
    layer = smca.SMCADecoderLayer(cfg, first=True)
    B, N, H = 1, 2, cfg.nheads
    out = torch.randn(B, N, cfg.hidden_dim)
    center_logit = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])
    cells_wh = torch.tensor([[4.0, 3.0]])
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    grid = torch.stack([xs, ys], -1).view(-1, 2).float()
    log_g = layer.log_prior(out, center_logit, [(cells_wh, grid)])  # (B, H, N, L)
    offsets = layer.offset_proj(out).view(B, N, H, 2)
    s = layer.scale_proj(out).view(B, N, H, 2)
    for n, h, cell in itertools.product(range(N), range(H), range(12)):
        c = torch.sigmoid(center_logit[0, n]) * cells_wh[0] + offsets[0, n, h]
        d = c - grid[cell]
        want = -(s[0, n, h, 0] ** 2 * d[0] ** 2 + s[0, n, h, 1] ** 2 * d[1] ** 2) / cfg.beta
        assert torch.isclose(log_g[0, h, n, cell], want, atol=1e-5)


def test_smca_multiscale_log_prior_per_scale():
    """Each scale's prior sits on the shared centre in that scale's cells, with that scale's own head
    offsets and scales, its squared distance weighted by stride / 32 (MSZ); head_shared broadcasts."""
    for head_shared in (False, True):
        cfg = tiny_smca(multiscale=True, head_shared=head_shared)
        layer = smca.SMCADecoderLayer(cfg, first=True)
        B, N, H, Hp = 1, 2, cfg.nheads, 1 if head_shared else cfg.nheads
        out = torch.randn(B, N, cfg.hidden_dim)
        center_logit = torch.tensor([[[0.3, -0.2], [1.0, -1.0]]])
        image_wh = torch.tensor([[128.0, 96.0]])
        levels, grids = [], []
        for stride, (h, w) in zip((16, 32, 64), [(6, 8), (3, 4), (2, 2)]):
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grids.append(torch.stack([xs, ys], -1).view(-1, 2).float())
            levels.append((image_wh / stride, grids[-1]))
        log_g = layer.log_prior(out, center_logit, levels)  # (B, H, N, 48 + 12 + 4)
        assert log_g.shape == (B, H, N, 64)
        offsets = layer.offset_proj(out).view(B, N, 3, Hp, 2)
        s = layer.scale_proj(out).view(B, N, 3, Hp, 2)
        start = 0
        for j, stride in enumerate((16, 32, 64)):
            for n, h in itertools.product(range(N), range(H)):
                hp = 0 if head_shared else h
                c = torch.sigmoid(center_logit[0, n]) * image_wh[0] / stride + offsets[0, n, j, hp]
                d = c - grids[j]  # (L_j, 2)
                want = -(s[0, n, j, hp, 0] ** 2 * d[:, 0] ** 2 + s[0, n, j, hp, 1] ** 2 * d[:, 1] ** 2)
                want = want * stride / 32 / cfg.beta
                assert torch.allclose(log_g[0, h, n, start:start + len(d)], want, atol=1e-5)
            start += len(grids[j])


def test_smca_gaussian_map_peaks_at_the_predicted_centre():
    """A constructed case: zero offsets, s = 1: the map of every scale peaks at the cell holding the
    centre the model predicts."""
    torch.manual_seed(0)
    model, _, _ = smca.build(tiny_smca(multiscale=True))
    model.eval()
    for layer in model.decoder:
        torch.nn.init.zeros_(layer.offset_proj.weight)
        torch.nn.init.zeros_(layer.offset_proj.bias)
    images, pad_mask = torch.randn(1, 3, 128, 192), torch.zeros(1, 128, 192, dtype=torch.bool)
    with torch.no_grad():
        out = model(images, pad_mask, explain=True)
    for q in range(3):
        cx, cy = out["centers"][0, q].tolist()  # normalised (x, y)
        for stride, m in zip((16, 32, 64), smca.gaussian_maps(out, query=q)):
            h, w = m.shape  # exp(-(dx^2 + dy^2) stride / 32 / beta) peaks at the cell nearest the centre
            want = (min(round(cy * 128 / stride), h - 1), min(round(cx * 192 / stride), w - 1))
            assert divmod(int(m.argmax()), w) == want and math.isclose(m.max().item(), m[want].item())
    with pytest.raises(ValueError, match="spatial prior"):
        baseline, _, _ = smca.build(tiny_smca(spatial_prior=False))
        smca.gaussian_maps(baseline.eval()(images, pad_mask, explain=True))


def test_smca_prior_picture_draws_the_map_over_the_image(tmp_path):
    """The query's Gaussian, written over its image: warm (red to yellow) where the prior is, the box in green."""
    model, _, _ = smca.build(tiny_smca())
    model.eval()
    image = torch.zeros(3, 96, 128)  # the ImageNet mean: mid grey once de-normalised
    with torch.no_grad():
        out = model(image[None], torch.zeros(1, 96, 128, dtype=torch.bool), explain=True)
    (heat,) = smca.gaussian_maps(out, query=0)  # (3, 4) cells of 32 px
    path = tmp_path / "q0.png"
    visualize.save_heatmap_png(image, heat, path, cell=32, boxes=[(4, 4, 40, 30)])
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert png.shape == (96, 128, 3)
    (r, c), (r0, c0) = divmod(int(heat.argmax()), 4), divmod(int(heat.argmin()), 4)
    hot, cold = png[32 * r + 16, 32 * c + 16], png[32 * r0 + 16, 32 * c0 + 16]  # cell centres
    assert hot[0] - hot[2] > cold[0] - cold[2] + 20  # warmer where the prior is high
    assert tuple(png[4, 20]) == (0, 255, 0)  # the box outline
    with pytest.raises(ValueError, match="does not cover"):
        visualize.save_heatmap_png(image, heat, path, cell=16)


def test_smca_scale_selection_is_per_scale_softmax_weighted_by_alpha():
    """Eqs. (8)-(9) against a naive loop over heads and scales; alpha = one scale is attention on it alone."""
    torch.manual_seed(0)
    attn = smca.GaussianCrossAttention(32, 4, dropout=0.0)
    B, N, sizes = 2, 3, [6, 4, 2]
    q, k, v = torch.randn(B, N, 32), torch.randn(B, 12, 32), torch.randn(B, 12, 32)
    pad = torch.zeros(B, 12, dtype=torch.bool)
    pad[1, 4:6] = pad[1, 9:10] = True  # some padding in two scales of image 1
    log_prior = torch.randn(B, 4, N, 12)
    alpha = torch.randn(B, N, 3).softmax(-1)
    got = attn(q, k, v, pad, log_prior, sizes, alpha)
    wq, wk, wv = attn.in_proj.weight.chunk(3)
    bq, bk, bv = attn.in_proj.bias.chunk(3)
    want = torch.zeros(B, N, 32)
    for b, n, h in itertools.product(range(B), range(N), range(4)):
        sl = slice(8 * h, 8 * h + 8)
        qh = (q[b, n] @ wq.T + bq)[sl]
        kh, vh = (k[b] @ wk.T + bk)[:, sl], (v[b] @ wv.T + bv)[:, sl]
        start = 0
        for j, size in enumerate(sizes):
            seg = slice(start, start + size)
            logit = kh[seg] @ qh / math.sqrt(8) + log_prior[b, h, n, seg]
            logit = logit.masked_fill(pad[b, seg], float("-inf"))
            want[b, n, sl] += alpha[b, n, j] * (logit.softmax(0) @ vh[seg])  # C_ij, summed over j
            start += size
    want = want @ attn.out_proj.weight.T + attn.out_proj.bias
    assert torch.allclose(got, want, atol=1e-5)
    one_hot = torch.zeros(B, N, 3)
    one_hot[..., 1] = 1.0
    only = attn(q, k[:, 6:10], v[:, 6:10], pad[:, 6:10], log_prior[..., 6:10])
    assert torch.allclose(attn(q, k, v, pad, log_prior, sizes, one_hot), only, atol=1e-5)


def test_smca_scale_selection_weights_are_per_image():
    """alpha sums to 1 per query and follows each image (the released code used image 0's for all)."""
    torch.manual_seed(0)
    model, _, _ = smca.build(tiny_smca(multiscale=True))
    model.eval()
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        out = model(images, pad_mask, explain=True)
        alone = model(images[1:], pad_mask[1:], explain=True)
    assert out["scale_weights"][0] is not None and out["scale_weights"][1].shape == (2, 12, 3)
    for alpha in out["scale_weights"]:
        assert torch.allclose(alpha.sum(-1), torch.ones(2, 12), atol=1e-6)
    # layer 0 reads only the queries (tgt = 0), so its alpha is the same for every image; layer 1's is not
    assert not torch.allclose(out["scale_weights"][1][0], out["scale_weights"][1][1], atol=1e-4)
    assert torch.allclose(out["scale_weights"][1][1], alone["scale_weights"][1][0], atol=1e-5)


def test_smca_gaussian_cross_attention_without_prior_is_multihead_attention():
    torch.manual_seed(0)
    ours = smca.GaussianCrossAttention(32, 4, dropout=0.0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    assert torch.allclose(ours(q, k, v, pad), ref(q, k, v, key_padding_mask=pad)[0], atol=1e-5)


@pytest.mark.parametrize("spatial_prior,multiscale,stride", [(True, False, 32), (False, False, 32), (True, True, 32),
                                                             (False, True, 32), (True, False, 16)])
def test_smca_padding_invariance(spatial_prior, multiscale, stride, figures):
    """An image's outputs do not depend on the padding its batch adds, at every scale (and on C4)."""
    torch.manual_seed(0)
    cfg = tiny_smca(spatial_prior=spatial_prior, multiscale=multiscale, feature_stride=stride)
    model, _, _ = smca.build(cfg)
    model.double().eval()
    # C5 of a 96 x 128 image (3 x 4 cells) padded to 5 x 6 cells; C4 the same at twice the resolution.
    # 3 x 4 -> f64 2 x 2 alone; padded, f64 is 3 x 3 of which the same 2 x 2 are valid.
    (c5, m5), (c5_batch, m5_batch) = _alone_and_padded(torch.randn(1, 512, 3, 4, dtype=torch.float64), 5, 6)
    (c4, m4), (c4_batch, m4_batch) = _alone_and_padded(torch.randn(1, 256, 6, 8, dtype=torch.float64), 10, 12)
    alone = after_backbone(model, [(c4, m4), (c5, m5)], explain=True)  # image 96 x 128 px
    batched = after_backbone(model, [(c4_batch, m4_batch), (c5_batch, m5_batch)], explain=True)  # padded to 160 x 192
    for key in ("pred_logits", "pred_boxes") + (("centers",) if spatial_prior else ()):
        assert torch.allclose(alone[key][0], batched[key][0], atol=1e-4), key
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(alone["aux_outputs"][0][key][0], batched["aux_outputs"][0][key][0], atol=1e-4)
    if multiscale:
        assert torch.allclose(alone["scale_weights"][-1][0], batched["scale_weights"][-1][0], atol=1e-4)
    # The full model, backbone included: report how far the CNN's view of the padding moves it.
    (images, m1), (big, pad) = _alone_and_padded(torch.randn(1, 3, 96, 128, dtype=torch.float64), 160, 192)
    drift = (model(images, m1)["pred_boxes"][0] - model(big, pad)["pred_boxes"][0]).abs().max().item()
    figures.append((f"smca full-model padding drift, max |d box| (spatial_prior={spatial_prior}, "
                    f"multiscale={multiscale}, stride {stride})", f"{drift:.2e}"))


# Parameters a single backward leaves without gradient, and why:
NO_GRAD_EXPECTED = {
    # Layer 0's decoder input is tgt = 0, so its self-attention values all equal the value bias:
    # the q / k projections and the value projection never receive a gradient (as in DETR).
    "decoder.0.self_attn.in_proj_weight",
    # ...and that attention's output, out_proj(value bias), is exactly 0 while both biases are at
    # their zero init, so on the first step out_proj.weight and the following LayerNorm's weight
    # (which scales LN(0) = 0) get none either; they do once the biases have moved.
    "decoder.0.self_attn.out_proj.weight",
    "decoder.0.norm1.weight",
}


@pytest.mark.parametrize("multiscale,stride", [(False, 32), (True, 32), (False, 16)])
def test_smca_gradient_flow(multiscale, stride):
    torch.manual_seed(0)
    cfg = tiny_smca(multiscale=multiscale, feature_stride=stride)
    model, criterion, _ = smca.build(cfg)
    model.train()
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    pad_mask[1, :, 96:] = True
    targets = _random_targets([3, 2], cfg.num_classes)
    losses = criterion(model(images, pad_mask), targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses).backward()
    dead = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if p.grad.abs().max() < 1e-9:
                dead.add(name)
    assert dead == NO_GRAD_EXPECTED


def test_smca_official_checkpoint_gives_the_official_outputs(tmp_path):
    """The authors' format ({"model", "args"}; OFF names, 92 class rows) through from_official: the
    fixture's official outputs to 1e-6 and losses to 1e-5 relative; wrong files refused."""
    import argparse
    fx, path, backbone = _official_file(tmp_path, "smca_single_scale.pt", lambda k: f"backbone.0.body.{k}",
                                        {"args": argparse.Namespace(smooth=8, dropout=0.0, num_queries=20)})
    cfg, state, notes = smca.from_official(path)
    assert (cfg.num_queries, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.scale_type, cfg.num_classes) == \
        (20, 2, 2, 128, "independent", 91) and notes == []
    model, criterion, _ = smca.build(cfg)
    model.double().load_state_dict(state)
    assert torch.equal(model.backbone.body.layer3[2].conv2.weight, backbone["backbone.0.body.layer3.2.conv2.weight"])
    with torch.no_grad():
        out = _run_official_case(model.eval(), fx["inputs"])
        ref = fx["outputs"]
        assert _max_diff(out["pred_logits"], ref["pred_logits"][..., :91]) < 1e-6
        assert _max_diff(out["pred_boxes"], ref["pred_boxes"]) < 1e-6
        assert _max_diff(out["aux_outputs"][0]["pred_logits"], ref["aux_outputs"][0]["pred_logits"][..., :91]) < 1e-6
        assert _max_diff(out["centers"], ref["center_logits"].sigmoid()) < 1e-6
        losses = criterion(_run_official_case(model.train(), fx["inputs"]), fx["targets"])
    for k, v in fx["losses_91_fp32"].items():
        if k.startswith("loss"):
            assert losses[k].item() == pytest.approx(v, rel=1e-5), k
    other = _official_file(tmp_path, "sparse_detr_rho0.1.pt", lambda k: f"backbone.0.body.{k}")[1]
    with pytest.raises(ValueError, match="not an SMCA-DETR state dict"):
        smca.from_official(other)
    _bad_official_files(tmp_path, path, smca.from_official, "transformer.decoder.layers.1.point3.weight",
                        "transformer.encoder.layers.0.linear1.weight")


@pytest.mark.parametrize("kw", [{}, {"multiscale": True}, {"scale_type": "single"}, {"scale_type": "fixed"}])
def test_smca_prior_fast_path_equals_the_reference(kw, reference_path):
    """Outside autograd the Gaussian's squared distances are summed separably (a column term plus a
    row term) and scaled by -1/beta in place: the same log G as the per-cell reference."""
    torch.manual_seed(0)
    model, _, _ = smca.build(tiny_smca(**kw))
    model.eval()
    images, pad_mask = torch.randn(2, 3, 96, 160), torch.zeros(2, 96, 160, dtype=torch.bool)
    pad_mask[1, 64:, 96:] = True
    with torch.no_grad():
        reference_path(True)
        ref = model(images, pad_mask, explain=True)
        reference_path(False)
        fast = model(images, pad_mask, explain=True)
    for a, b in zip(ref["log_priors"], fast["log_priors"]):
        assert a is None and b is None or torch.allclose(a, b, rtol=1e-5, atol=1e-4)
    assert torch.allclose(ref["pred_boxes"], fast["pred_boxes"], atol=1e-5)


def test_smca_config_errors():
    with pytest.raises(ValueError, match="scale_type"):
        smca.build(tiny_smca(scale_type="diagonal"))
    with pytest.raises(ValueError, match="divisible"):
        smca.build(tiny_smca(hidden_dim=30))
    with pytest.raises(ValueError, match="ms_encoder"):
        smca.build(tiny_smca(multiscale=True, ms_encoder="IXI"))
    with pytest.raises(ValueError, match="feature_stride"):
        smca.build(tiny_smca(feature_stride=8))


def test_smca_on_c4_reads_c4_in_its_own_cells_and_leaves_layer4_untrained():
    """feature_stride 16 (the shapes config): the encoder reads C4, the prior counts C4 cells (sigma
    sqrt(beta / 2) cells at init, as on C5), and layer4, whose output nobody reads, does not train."""
    model, _, _ = smca.build(tiny_smca(feature_stride=16))
    model.eval()
    images, pad_mask = torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool)
    out = model(images, pad_mask, explain=True)
    assert out["level_shapes"] == [(6, 8)]
    layer = model.decoder[0]
    grid = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    with torch.no_grad():
        layer.offset_proj.weight.zero_()
        layer.offset_proj.bias.zero_()
    log_g = layer.log_prior(torch.zeros(1, 1, 32), torch.full((1, 1, 2), -20.0), [(torch.tensor([[8.0, 6.0]]), grid)])
    assert torch.allclose(log_g[0, 0, 0], torch.tensor([0.0, -4.0 / 8.0]), atol=1e-6)  # -(2 cells)^2 / beta
    assert not any(p.requires_grad for p in model.backbone.body.layer4.parameters())
    assert any(p.requires_grad for p in model.backbone.body.layer3.parameters())


# ---------------------------------------------------------------------------------------------
# sparse_detr.py
# ---------------------------------------------------------------------------------------------

def tiny_sparse(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, enc_layers=3, dec_layers=2,
                dim_feedforward=64, num_queries=10, num_classes=21, num_select=20, rho=0.3)
    base.update(kw)
    return sparse_detr.Config(**base)


def test_sparse_detr_parameter_counts_match_official():
    """Counted from the official code built on CPU: rho 0.1, the "+" baseline, plain two-stage."""
    for kw, want in [({}, 41_714_805), ({"sparse_encoder": False, "use_enc_aux_loss": False}, 40_827_289),
                     ({"sparse_encoder": False, "eff_query_init": False, "eff_specific_head": False}, 40_959_129)]:
        model, _, _ = sparse_detr.build(sparse_detr.Config(**kw))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want, kw


def test_sparse_detr_outputs_and_selection_counts():
    """Shapes; n_b = int(valid * rho) + 1 per image with mixed sizes; padded tokens never selected."""
    torch.manual_seed(0)
    model, criterion, post = sparse_detr.build(tiny_sparse())
    model.eval()
    images, pad_mask = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    pad_mask[1, 64:, :] = True
    pad_mask[1, :, 96:] = True  # image 1 is 64 x 96
    with torch.no_grad():
        out = model(images, pad_mask)
    # levels: strides 8, 16, 32, 64 -> 16x20 + 8x10 + 4x5 + 2x3 = 426 tokens; image 1: 8x12 + 4x6 + 2x3 + 1x2 = 128
    assert out["token_pad_mask"].shape == (2, 426) and (~out["token_pad_mask"]).sum(1).tolist() == [426, 128]
    assert out["sparse_token_nums"].tolist() == [int(426 * 0.3) + 1, int(128 * 0.3) + 1]
    assert out["topk_inds"].shape == (2, 128)
    for b, n in enumerate(out["sparse_token_nums"].tolist()):
        assert not out["token_pad_mask"][b, out["topk_inds"][b, :n]].any()
    assert out["pred_logits"].shape == (2, 10, 21) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1 and "enc_aux_outputs" not in out  # a training loss only
    model.train()
    enc_aux = model(images, pad_mask)["enc_aux_outputs"]
    assert len(enc_aux) == 2 and enc_aux[0]["pred_logits"].shape == (2, 128, 21)
    model.eval()
    assert out["enc_outputs"]["pred_boxes"].shape == (2, 426, 4)
    assert out["dec_sampling_locations"].shape == (2, 2, 10, 4, 4, 4, 2)
    assert post(out, torch.tensor([[480, 640], [300, 400]]))[1]["boxes"].shape == (20, 4)


def _dam_brute_force(locs, weights, shapes, shift):
    """One point at a time: the four bilinear corners of loc * (W, H) (- 0.5), each inside the map."""
    B = weights.shape[0]
    dam = torch.zeros(B, sum(h * w for h, w in shapes), dtype=torch.float64)
    starts = [sum(h * w for h, w in shapes[:lvl]) for lvl in range(len(shapes))]
    flat_l, flat_w = locs.reshape(B, -1, len(shapes), locs.shape[-2], 2), weights.reshape(B, -1, len(shapes), weights.shape[-1])
    for b, m, lvl, p in itertools.product(range(B), range(flat_w.shape[1]), range(len(shapes)), range(flat_w.shape[-1])):
        h, w = shapes[lvl]
        x = flat_l[b, m, lvl, p, 0].item() * w - shift
        y = flat_l[b, m, lvl, p, 1].item() * h - shift
        x0, y0 = math.floor(x), math.floor(y)
        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
            if 0 <= cx < w and 0 <= cy < h:
                dam[b, starts[lvl] + cy * w + cx] += flat_w[b, m, lvl, p].item() * (1 - abs(x - cx)) * (1 - abs(y - cy))
    return dam


@pytest.mark.parametrize("shift", [False, True])
def test_sparse_detr_dam_splat_matches_brute_force(shift):
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    locs = torch.rand(2, 2, 3, 2, 2, 3, 2, dtype=torch.float64) * 1.2 - 0.1  # some points off the map
    weights = torch.rand(2, 2, 3, 2, 2, 3, dtype=torch.float64)
    got = sparse_detr.decoder_attention_map(locs, weights, shapes, half_cell_shift=shift)
    assert torch.allclose(got, _dam_brute_force(locs, weights, shapes, 0.5 if shift else 0.0), atol=1e-10)


def test_sparse_detr_encoder_at_rho_one_is_the_dense_encoder():
    """rho = 1 without aux heads updates every token: the same outputs as the dense Deformable encoder."""
    torch.manual_seed(0)
    sparse, _, _ = sparse_detr.build(tiny_sparse(rho=1.0, use_enc_aux_loss=False))
    dense, _, _ = sparse_detr.build(tiny_sparse(sparse_encoder=False, use_enc_aux_loss=False))
    missing = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("scoring.") for k in missing.unexpected_keys)
    sparse.double().eval()
    dense.double().eval()
    feats = [(torch.randn(1, c, h, w, dtype=torch.float64), torch.zeros(1, h, w, dtype=torch.bool))
             for c, h, w in [(128, 8, 10), (256, 4, 5), (512, 2, 3)]]
    a, b = after_backbone(sparse, feats), after_backbone(dense, feats)
    assert a["topk_inds"].shape[1] == 80 + 20 + 6 + 2  # every token
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(a[key], b[key], atol=1e-8), key


@pytest.mark.parametrize("mean_over_padding", [False, True])
def test_sparse_detr_padding_invariance(mean_over_padding, figures):
    """After the backbone, an image's detections, scores and selection do not depend on its batch;
    OFF's mean over padded tokens (mean_over_padding) breaks this for the scores."""
    torch.manual_seed(0)
    model, _, _ = sparse_detr.build(tiny_sparse(scorer_mean_over_padding=mean_over_padding))
    model.double().eval()
    pairs = [_alone_and_padded(torch.randn(1, c, h, w, dtype=torch.float64), 2 * h, 2 * w)
             for c, h, w in [(128, 8, 12), (256, 4, 6), (512, 2, 3)]]
    alone = after_backbone(model, [p[0] for p in pairs])
    batched = after_backbone(model, [p[1] for p in pairs])
    valid = ~batched["token_pad_mask"][0]
    same_scores = torch.allclose(alone["token_scores"][0], batched["token_scores"][0][valid], atol=1e-6)
    assert same_scores != mean_over_padding
    if not mean_over_padding:
        n = alone["sparse_token_nums"][0]
        assert n == batched["sparse_token_nums"][0]
        pos = valid.nonzero()[:, 0]  # batched token index of every alone token
        assert set(pos[alone["topk_inds"][0, :n]].tolist()) == set(batched["topk_inds"][0, :n].tolist())
        for key in ("pred_logits", "pred_boxes"):
            assert torch.allclose(alone[key][0], batched[key][0], atol=1e-4), key
    # Full model: the queries are top-k tokens, so their order can change; measure how far each box of
    # the image alone is from the nearest box of the padded run.
    (images, m1), (big, pad) = _alone_and_padded(torch.randn(1, 3, 128, 192, dtype=torch.float64), 192, 256)
    a, b = model(images, m1)["pred_boxes"][0], model(big, pad)["pred_boxes"][0]
    drift = torch.cdist(a, b, p=1).min(1).values.max().item()
    figures.append((f"sparse_detr full-model padding drift, max L1 to the nearest box (mean_over_padding="
                    f"{mean_over_padding})", f"{drift:.2e}"))


def test_sparse_detr_gradients_and_scorer_learns_only_from_dam():
    torch.manual_seed(0)
    model, criterion, _ = sparse_detr.build(tiny_sparse())
    model.train()
    images, pad_mask = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    pad_mask[1, 96:, :] = True
    targets = _random_targets([3, 0], 21)  # image 1 has no boxes
    losses = criterion(model(images, pad_mask), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"loss_dam", "corr", "loss_ce_enc", "loss_giou_enc_1", "loss_bbox_0"} <= set(losses)
    assert 0 <= losses["corr"].item() <= 1
    set_loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict and k != "loss_dam")
    set_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in model.scoring.parameters())  # top-k passes no gradient
    model.zero_grad()
    losses["loss_dam"].backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.scoring.parameters())
    model.zero_grad()
    (set_loss + losses["loss_dam"]).backward()
    _assert_only_box_hidden_layers_without_gradient(model)


@pytest.mark.parametrize("selection", ["objectness", "random"])
def test_sparse_detr_other_selections(selection):
    torch.manual_seed(0)
    model, criterion, _ = sparse_detr.build(tiny_sparse(selection=selection))
    assert model.scoring is None
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    losses = criterion(model(images, pad_mask), _random_targets([2, 1], 21))
    assert "loss_dam" not in losses and "corr" in losses
    assert ("loss_ce_backbone" in losses) == (selection == "objectness")
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()


def test_sparse_detr_explain_returns_the_dam_its_loss_is_made_of():
    """explain=True adds the DAM (Sec. 3.3): the decoder's attention splatted onto the N tokens; every
    query's weights sum to 1 per head and layer, so the map's mass is at most layers x Q x H."""
    torch.manual_seed(0)
    model, _, _ = sparse_detr.build(tiny_sparse())
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        out = model.eval()(images, pad_mask, explain=True)
    dam = out["dam"]
    assert dam.shape == out["token_pad_mask"].shape and (dam >= 0).all()
    assert torch.allclose(dam, sparse_detr.decoder_attention_map(out["dec_sampling_locations"],
                                                                 out["dec_attention_weights"], out["spatial_shapes"]))
    layers, Q, H = out["dec_attention_weights"].shape[1:4]
    assert (dam.sum(1) <= layers * Q * H + 1e-4).all() and (dam.sum(1) > 0.5 * layers * Q * H).all()


def test_sparse_detr_selected_tokens_are_exactly_the_ones_the_encoder_updates():
    """What detect.py --explain outlines (topk_inds[:n_b]) is what the encoder changed: every other
    token leaves the encoder as it entered it."""
    torch.manual_seed(0)
    model, _, _ = sparse_detr.build(tiny_sparse())
    model.double().eval()
    pairs = [_alone_and_padded(torch.randn(1, c, h, w, dtype=torch.float64), 2 * h, 2 * w)
             for c, h, w in [(128, 8, 12), (256, 4, 6), (512, 2, 3)]]
    feats = [p[1] for p in pairs]
    with torch.no_grad():
        src = common.input_tokens(model.input_proj, model.level_embed, feats)[0]
        memory, _, out = model.encode(feats)
    for b in range(2):
        changed = set((memory[b] != src[b]).any(-1).nonzero()[:, 0].tolist())
        assert changed == set(out["topk_inds"][b, :out["sparse_token_nums"][b]].tolist())


@pytest.mark.parametrize("fixture", ["sparse_detr_rho0.1.pt", "deformable_detr_two_stage_refine.pt"])
def test_sparse_detr_official_checkpoint_gives_the_official_outputs(tmp_path, fixture):
    """Sparse DETR rho 0.1 and OFF's dense two-stage Deformable DETR: the configuration read from the
    file (and its args), the official switches on, the fixture's outputs, selections and losses."""
    import argparse
    fx, path, _ = _official_file(tmp_path, fixture, lambda k: f"backbone.0.body.{k}",
                                 {"args": argparse.Namespace(**fx_args) for fx_args in [
                                     torch.load(os.path.join(OFFICIAL, fixture), weights_only=True)["args"]]})
    cfg, state, notes = sparse_detr.from_official(path)
    sparse = fixture.startswith("sparse")
    assert (cfg.sparse_encoder, cfg.eff_query_init, cfg.use_enc_aux_loss, cfg.num_queries, cfg.enc_layers) == \
        (sparse, sparse, sparse, 20, 2) and notes == []
    assert (cfg.extra_level_mask, cfg.two_stage_over_padding, cfg.masked_groupnorm) == ("interpolate", True, False)
    model, criterion, _ = sparse_detr.build(cfg)
    model.double().load_state_dict(state)
    ref = fx["outputs"]
    with torch.no_grad():
        out = _run_official_case(model.eval(), fx["inputs"])
        for key in ("pred_logits", "pred_boxes"):
            assert _max_diff(out[key], ref[key]) < 1e-6, key
            assert _max_diff(out["aux_outputs"][0][key], ref["aux_outputs"][0][key]) < 1e-6, key
            assert _max_diff(out["enc_outputs"][key], ref["enc_outputs"][key]) < 1e-6, key
        assert torch.equal(out["token_pad_mask"], ref["mask_flatten"])
        if sparse:
            assert _max_diff(out["token_scores"], ref["scorer_logits"]) < 1e-6
            assert torch.equal(out["sparse_token_nums"], ref["sparse_token_nums"])
            for b, n in enumerate(ref["sparse_token_nums"].tolist()):
                assert set(out["topk_inds"][b, :n].tolist()) == set(ref["backbone_topk_proposals"][b, :n].tolist())
        losses = criterion(_run_official_case(model.train(), fx["inputs"]), fx["targets"])
    for k, v in fx["losses_fp32"].items():
        if k.startswith("loss"):
            assert losses["loss_dam" if k == "loss_mask_prediction" else k].item() == pytest.approx(v, rel=1e-5), k
    other = _official_file(tmp_path, "smca_single_scale.pt", lambda k: f"backbone.0.body.{k}")[1]
    with pytest.raises(ValueError, match="not a two-stage Deformable / Sparse DETR state dict"):
        sparse_detr.from_official(other)
    _bad_official_files(tmp_path, path, sparse_detr.from_official, "transformer.decoder.layers.1.norm3.bias",
                        "input_proj.2.0.weight")


def test_sparse_detr_config_errors():
    with pytest.raises(ValueError, match="rho"):
        sparse_detr.build(tiny_sparse(rho=0.0))
    with pytest.raises(ValueError, match="selection"):
        sparse_detr.build(tiny_sparse(selection="entropy"))
    model, _, _ = sparse_detr.build(tiny_sparse(num_queries=500))  # a 64 x 64 image has 64 + 16 + 4 + 1 tokens
    with pytest.raises(ValueError, match="num_queries 500 exceeds the 85 encoder tokens"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# lite_detr.py
# ---------------------------------------------------------------------------------------------

def tiny_lite(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, enc_layers=6, dec_layers=2,
                dim_feedforward=64, num_queries=10, num_classes=21, num_select=20)
    base.update(kw)
    return lite_detr.Config(**base)


def _lite_feats(B=1, sizes=((8, 10), (4, 5), (2, 3)), dtype=torch.float64):
    return [(torch.randn(B, c, h, w, dtype=dtype), torch.zeros(B, h, w, dtype=torch.bool))
            for c, (h, w) in zip((128, 256, 512), sizes)]


def test_lite_detr_parameter_counts_follow_the_derivation():
    """The DDETR base is official (40,959,129); KDA swaps the attention-weight Linear for a query
    projection in each encoder layer, each all-token layer adds a d -> d -> d FFN with a LayerNorm."""
    d, H, L, P = 256, 8, 4, 4
    kda = (d * d + d) - (d + 1) * H * L * P  # + query_proj - attention_weights
    small = 2 * (d * d + d) + 2 * d
    count = lambda cfg: sum(p.numel() for p in lite_detr.build(cfg)[0].parameters() if p.requires_grad)  # noqa: E731
    assert count(lite_detr.Config.named("dense")) == 40_959_129
    for name, blocks in [("H3L1-(2+1)x3", 3), ("H3L1-(3+1)x2", 2), ("H3L1-(6+1)x1", 1), ("H2L2-(2+1)x3", 3)]:
        assert count(lite_detr.Config.named(name)) == 40_959_129 + 6 * kda + blocks * small, name
    assert count(lite_detr.Config(kda_decoder=True)) == 40_959_129 + 12 * kda + 3 * small == 41_750_169
    for low_ffn in ("none", "normal"):  # no small FFN: KDA's change only
        assert count(lite_detr.Config(low_ffn=low_ffn)) == 40_959_129 + 6 * kda
    assert lite_detr.Config().name == "H3L1-(2+1)x3" and lite_detr.Config(enc_scale=2, num_blocks=2).name == "H2L2-(3+1)x2"


@pytest.mark.parametrize("key_proj", [False, True])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_lite_detr_kda_matches_naive_per_point_reference(key_proj, ref_dim):
    """KDA against a loop over queries, heads, levels and points in float64 (Sec. 3.3): keys and
    values bilinearly sampled at the same locations, softmax of q.k / sqrt(d_head) over all L*P."""
    torch.manual_seed(0)
    shapes_ = [(4, 5), (2, 3), (3, 2)]
    B, Q, C, H, P = 2, 3, 16, 2, 2
    L, D = len(shapes_), C // H
    attn = lite_detr.KeyAwareDeformableAttention(C, L, H, P, key_proj=key_proj).double()
    nn = torch.nn
    nn.init.normal_(attn.sampling_offsets.weight, std=0.5)  # offsets that depend on the query
    N = sum(h * w for h, w in shapes_)
    query, x = torch.randn(B, Q, C, dtype=torch.float64), torch.randn(B, N, C, dtype=torch.float64)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 3:5] = True  # some padded tokens: their keys and values are zero
    ref = torch.rand(B, Q, L, ref_dim, dtype=torch.float64) * (0.5 if ref_dim == 4 else 1.0)
    out, _, weights = attn(query, ref, x, shapes_, pad)

    value = attn.value_proj(x).masked_fill(pad[..., None], 0)
    key = attn.key_proj(x).masked_fill(pad[..., None], 0) if key_proj else value
    q = attn.query_proj(query)
    off = attn.sampling_offsets(query).view(B, Q, H, L, P, 2)
    starts = np.cumsum([0] + [h * w for h, w in shapes_])
    heads = torch.zeros(B, Q, C, dtype=torch.float64)
    for b, qi, h in itertools.product(range(B), range(Q), range(H)):
        ks, vs = [], []
        for lvl, p in itertools.product(range(L), range(P)):
            hl, wl = shapes_[lvl]
            r = ref[b, qi, lvl]
            if ref_dim == 2:
                lx, ly = r[0] + off[b, qi, h, lvl, p, 0] / wl, r[1] + off[b, qi, h, lvl, p, 1] / hl
            else:
                lx = r[0] + off[b, qi, h, lvl, p, 0] / P * r[2] * 0.5
                ly = r[1] + off[b, qi, h, lvl, p, 1] / P * r[3] * 0.5
            grid = lambda t: t[b, starts[lvl]:starts[lvl + 1], h * D:(h + 1) * D].T.reshape(D, hl, wl)  # noqa: E731
            x_px, y_px = (lx * wl - 0.5).item(), (ly * hl - 0.5).item()
            ks.append(_bilinear_naive(grid(key), x_px, y_px))
            vs.append(_bilinear_naive(grid(value), x_px, y_px))
        logits = torch.stack([q[b, qi, h * D:(h + 1) * D] @ k for k in ks]) / math.sqrt(D)
        w = torch.softmax(logits, 0)
        assert torch.allclose(weights[b, qi, h].flatten(), w, atol=1e-12)
        heads[b, qi, h * D:(h + 1) * D] = sum(wi * v for wi, v in zip(w, vs))
    assert torch.allclose(out, attn.output_proj(heads), atol=1e-10)
    with torch.no_grad():  # the inference fast path (kda_core_fast) gives the same numbers
        out_nograd, _, weights_nograd = attn(query, ref, x, shapes_, pad)
    assert torch.allclose(out_nograd, out, atol=1e-12) and torch.allclose(weights_nograd, weights, atol=1e-12)


def test_lite_detr_dense_reduction_is_the_deformable_detr_encoder():
    """Every level high-level and KDA off: the same parameters and outputs as the dense two-stage
    Deformable DETR (sparse_detr.py with its sparse encoder and Efficient-DETR parts off)."""
    torch.manual_seed(0)
    lite, _, _ = lite_detr.build(tiny_lite(enc_scale=4, num_blocks=1, kda_encoder=False))
    dense, _, _ = sparse_detr.build(tiny_sparse(enc_layers=6, sparse_encoder=False, eff_query_init=False,
                                                eff_specific_head=False))
    dense.load_state_dict(lite.state_dict())  # strict: the same names and shapes
    lite.double().eval()
    dense.double().eval()
    feats = _lite_feats()
    a, b = after_backbone(lite, feats), after_backbone(dense, feats)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(a[key], b[key], atol=1e-8), key
    assert torch.allclose(lite.encode(feats)[0], dense.encode(feats)[0], atol=1e-10)


@pytest.mark.parametrize("name,queries", [
    ("H3L1-(2+1)x3", "all"), ("H3L1-(3+1)x2", "all"), ("H2L2-(2+1)x3", "all"), ("H3L1-(2+1)x3", "low")])
def test_lite_detr_encoder_schedule(name, queries):
    """Which tokens each layer updates: high-level layers query F_H only and leave F_L as it was
    after the last all-token layer; all-token layers query every token (OFF) or only F_L (Fig. 2b)."""
    torch.manual_seed(0)
    cfg = tiny_lite(**lite_detr.NAMED[name], last_layer_queries=queries)
    model, _, _ = lite_detr.build(cfg)
    model.double().eval()
    calls = []
    hooks = [layer.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[1], args[3].clone(), out)))
             for layer in model.encoder]
    feats = _lite_feats()
    memory, _, n_low = model.encode(feats)
    for h in hooks:
        h.remove()
    N = memory.shape[1]
    assert n_low == {3: 80, 2: 100}[cfg.enc_scale]  # 8x10 (+ 4x5 for H2L2) finest tokens
    assert [kind for kind in model.schedule] == cfg.schedule() and len(calls) == 6
    src = common.input_tokens(model.input_proj, model.level_embed, feats)[0]
    low, high = src[:, :n_low], src[:, n_low:]
    for kind, (n_queries, values, output) in zip(model.schedule, calls):
        assert torch.equal(values[:, :n_low], low) and torch.equal(values[:, n_low:], high)  # V = current tokens
        if kind == "high":
            assert n_queries == N - n_low
            high = output
        elif queries == "all":
            assert n_queries == N
            assert not torch.allclose(output[:, :n_low], low)  # F_L is updated here, and only here
            low, high = output[:, :n_low], output[:, n_low:]
        else:
            assert n_queries == n_low
            low = output
    assert torch.equal(memory, torch.cat([low, high], 1))


@pytest.mark.parametrize("kw", [{}, {"kda_decoder": True, "kda_key_proj": True, "last_layer_queries": "low"},
                                {"enc_scale": 2, "low_ffn": "none"}])
def test_lite_detr_padding_invariance(kw, figures):
    """After the backbone an image's detections do not depend on its batch."""
    torch.manual_seed(0)
    model, _, _ = lite_detr.build(tiny_lite(**kw))
    model.double().eval()
    pairs = [_alone_and_padded(torch.randn(1, c, h, w, dtype=torch.float64), 2 * h, 2 * w)
             for c, h, w in [(128, 8, 12), (256, 4, 6), (512, 2, 3)]]
    alone = after_backbone(model, [p[0] for p in pairs])
    batched = after_backbone(model, [p[1] for p in pairs])
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(alone[key][0], batched[key][0], atol=1e-4), key
    (images, m1), (big, pad) = _alone_and_padded(torch.randn(1, 3, 128, 192, dtype=torch.float64), 192, 256)
    a, b = model(images, m1)["pred_boxes"][0], model(big, pad)["pred_boxes"][0]
    figures.append((f"lite_detr full-model padding drift, max L1 to the nearest box ({kw or 'default'})",
                    f"{torch.cdist(a, b, p=1).min(1).values.max().item():.2e}"))


@pytest.mark.parametrize("kw", [{}, {"kda_decoder": True, "kda_key_proj": True, "last_layer_queries": "low"}])
def test_lite_detr_gradient_flow_and_empty_targets(kw):
    torch.manual_seed(0)
    model, criterion, post = lite_detr.build(tiny_lite(**kw))
    model.train()
    images, pad_mask = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    pad_mask[1, 96:, :] = True
    out = model(images, pad_mask)
    assert out["pred_logits"].shape == (2, 10, 21) and out["pred_boxes"].shape == (2, 10, 4)
    n_tokens = 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3  # strides 8, 16, 32, 64 of a 128 x 160 batch
    assert len(out["aux_outputs"]) == 1 and out["enc_outputs"]["pred_logits"].shape[1] == n_tokens
    assert "dec_sampling_locations" not in out  # the decoder's internals come with explain=True only
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    losses = criterion(out, _random_targets([3, 0], 21))  # image 1 has no boxes
    assert {"loss_ce", "loss_bbox_0", "loss_giou_enc"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses[k] * criterion.weight_dict[k] for k in losses).backward()
    _assert_only_box_hidden_layers_without_gradient(model)
    empty = criterion(model(images, pad_mask), _random_targets([0, 0], 21))
    assert all(torch.isfinite(v) for v in empty.values()) and empty["loss_bbox"] == 0
    res = post(out, torch.tensor([[100, 120], [80, 90]]))
    assert len(res) == 2 and res[0]["boxes"].shape == (20, 4)


def test_lite_detr_named_configs_run_through_the_shared_interface():
    torch.manual_seed(0)
    for name in lite_detr.NAMED:
        model, criterion, post = lite_detr.build(tiny_lite(**lite_detr.NAMED[name]))
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
        assert out["pred_logits"].shape == (1, 10, 21) and len(post(out, torch.tensor([[96, 128]]))[0]["scores"]) == 20


def test_lite_detr_config_errors():
    with pytest.raises(ValueError, match="num_blocks must divide enc_layers"):
        lite_detr.build(tiny_lite(num_blocks=4))
    with pytest.raises(ValueError, match="enc_scale"):
        lite_detr.build(tiny_lite(enc_scale=5))
    with pytest.raises(ValueError, match="last_layer_queries"):
        lite_detr.build(tiny_lite(last_layer_queries="high"))
    with pytest.raises(ValueError, match="low_ffn"):
        lite_detr.build(tiny_lite(low_ffn="tiny"))
    with pytest.raises(ValueError, match="needs low-level tokens"):
        lite_detr.build(tiny_lite(enc_scale=4, last_layer_queries="low"))
    with pytest.raises(ValueError, match="unknown Lite DETR configuration 'H4L0'"):
        lite_detr.Config.named("H4L0")


# ---------------------------------------------------------------------------------------------
# focus_detr.py
# ---------------------------------------------------------------------------------------------

def tiny_focus(**kw):
    base = dict(backbone_depth=18, backbone_norm="bn", hidden_dim=32, nheads=4, dec_layers=2, dim_feedforward=64,
                num_queries=10, num_classes=21, num_select=20, num_fine_tokens=8, dn_number=6)
    base.update(kw)
    return focus_detr.Config(**base)


def box_ops_xyxy(b):
    return common.box_cxcywh_to_xyxy(b)


def test_focus_detr_parameter_counts_follow_the_official_model():
    """OFF (80 classes, only the stem frozen): 49,339,920 parameters, 49,330,512 trainable (counted from the official code)."""
    count = lambda model, trainable: sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)  # noqa: E731
    model = focus_detr.build(focus_detr.Config(num_classes=80))[0]
    layer1 = sum(p.numel() for n, p in model.backbone.named_parameters() if n.startswith("body.layer1"))
    assert count(model, False) == 49_339_920 and count(model, True) == 49_330_512 - layer1
    assert count(focus_detr.build(focus_detr.Config())[0], True) == 49_330_512 - layer1 + 7 * 11 * 257 + 11 * 256


def test_focus_detr_foreground_labels_on_constructed_boxes():
    """FCOS assignment: centre strictly inside, largest edge distance in the level's (lo, hi]."""
    shapes_ = [(32, 32), (16, 16), (8, 8), (4, 4)]  # a 256 x 256 input, strides 8..64
    wh = torch.tensor([[256.0, 256.0]])

    def positives(x0, y0, x1, y1):
        box = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]]) / 256
        lab = focus_detr.foreground_labels([box], shapes_, wh)[0]
        starts = np.cumsum([0] + [h * w for h, w in shapes_])
        return [set(lab[starts[i]:starts[i + 1]].nonzero()[:, 0].tolist()) for i in range(4)]

    # a 40 x 40 box at (10, 10): level 0 centres 12, 20, 28, 36, 44 are inside; max distance <= 38 < 64
    lv = positives(10, 10, 50, 50)
    assert lv[0] == {r * 32 + c for r in range(1, 6) for c in range(1, 6)} and not lv[1] | lv[2] | lv[3]
    # a 200 x 200 box: distances up to 200 -> level 2 (128, 256] for centres far from an edge,
    # level 1 (64, 128] near the middle; never level 0 (the box is too big for distances <= 64)
    lv = positives(20, 20, 220, 220)
    assert not lv[0] and lv[1] and lv[2] and not lv[3]
    centre16 = 7 * 16 + 7  # level-1 token centred at (120, 120): distances 100 .. 100 -> (64, 128]
    assert centre16 in lv[1]
    # a centre exactly on the edge is not inside (min distance must be > 0): box edge at x = 12
    lv = positives(12, 4, 60, 30)
    assert all(t % 32 != 0 for t in lv[0])  # column 0 (centre x = 4) is outside; column 1 (x = 12) on the edge
    assert all(t % 32 != 1 for t in lv[0])
    assert not any(focus_detr.foreground_labels([torch.zeros(0, 4)], shapes_, wh)[0])
    # level 3 (> 256 px): a 600 x 600 box in a 1024 x 1024 input; its centre token is 300 px from every edge
    big = [(128, 128), (64, 64), (32, 32), (16, 16)]
    lab = focus_detr.foreground_labels([torch.tensor([[0.5, 0.5, 600 / 1024, 600 / 1024]])], big,
                                       torch.tensor([[1024.0, 1024.0]]))[0]
    starts = np.cumsum([0] + [h * w for h, w in big])
    assert lab[starts[3] + 8 * 16 + 8] == 1 and lab[starts[3]:].sum() > 0  # token (8, 8): centre (544, 544)
    overlap = focus_detr.foreground_labels([torch.tensor([[0.5, 0.5, 600 / 1024, 600 / 1024]])], big,
                                           torch.tensor([[1024.0, 1024.0]]), focus_detr.OVERLAP_RANGES)[0]
    assert overlap.sum() > lab.sum()  # overlapping ranges label a token on two levels


def test_focus_detr_top_down_modulation_on_a_constructed_case():
    """S_l = MLP_F(T_l (1 + alpha Up(S_{l+1}))) with the coarse score upsampled bilinearly (align_corners)."""
    torch.manual_seed(0)
    sel = focus_detr.ForegroundTokenSelector(8, 2).double()
    with torch.no_grad():
        sel.alpha.fill_(0.5)
    masks = [torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)]
    feats = torch.randn(1, 16 + 4, 8, dtype=torch.float64)
    out = sel(feats, masks)
    coarse = sel.scorer(feats[:, 16:], masks[1].flatten(1))
    assert torch.allclose(out[:, 16:], coarse)
    up = F.interpolate(coarse.view(1, 1, 2, 2), size=(4, 4), mode="bilinear", align_corners=True).view(1, 16, 1)
    # align_corners=True: the corners of the fine map take the coarse corners exactly
    assert torch.allclose(up.view(4, 4)[[0, 0, 3, 3], [0, 3, 0, 3]], coarse.view(4))
    fine = sel.scorer(feats[:, :16] * (1 + 0.5 * up), masks[0].flatten(1))
    assert torch.allclose(out[:, :16], fine)
    with torch.no_grad():
        sel.alpha.zero_()  # alpha = 0: no modulation
    assert torch.allclose(sel(feats, masks)[:, :16], sel.scorer(feats[:, :16], masks[0].flatten(1)))


def test_focus_detr_cascade_counts_and_nested_sets_with_mixed_image_sizes():
    pad = torch.zeros(2, 1000, dtype=torch.bool)
    pad[1, 400:] = True  # image 1 has 400 valid tokens
    ratios = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
    ours = focus_detr.cascade_token_nums(pad, 0.5, ratios)
    assert ours[:, 0].tolist() == [501, 400, 300, 300, 200, 100] and ours[:, 1].tolist() == [201, 160, 120, 120, 80, 40]
    off = focus_detr.cascade_token_nums(pad, 0.5, ratios, per_image=False)  # K0 from the largest image
    assert off[:, 0].tolist() == ours[:, 0].tolist() and off[:, 1].tolist() == [201, 201, 201, 201, 200, 100]
    torch.manual_seed(0)
    model, _, _ = focus_detr.build(tiny_focus())
    model.eval()
    sets = []
    hooks = [layer.register_forward_hook(lambda m, args, o: sets.append(args[0].shape[1])) for layer in model.encoder]
    images, pad_mask = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    pad_mask[1, 64:, :96] = True
    pad_mask[1, :, 96:] = True
    with torch.no_grad():
        out = model(images, pad_mask)
    for h in hooks:
        h.remove()
    keep = out["token_nums"]
    assert sets == keep.max(1).values.tolist()  # each layer queries the batch's largest count
    assert (keep[:, 1] < keep[:, 0]).all() and (keep[1:] <= keep[:-1]).all()


def test_focus_detr_padding_invariance(figures):
    torch.manual_seed(0)
    model, _, _ = focus_detr.build(tiny_focus())
    model.double().eval()
    pairs = [_alone_and_padded(torch.randn(1, c, h, w, dtype=torch.float64), 2 * h, 2 * w)
             for c, h, w in [(128, 8, 12), (256, 4, 6), (512, 2, 3)]]
    alone = after_backbone(model, [p[0] for p in pairs])
    batched = after_backbone(model, [p[1] for p in pairs])
    valid = ~batched["token_pad_mask"][0]
    assert torch.allclose(alone["fg_logits"][0], batched["fg_logits"][0][valid], atol=1e-8)
    assert torch.equal(alone["token_nums"][:, 0], batched["token_nums"][:, 0])
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(alone[key][0], batched[key][0], atol=1e-4), key
    (images, m1), (big, pad) = _alone_and_padded(torch.randn(1, 3, 128, 192, dtype=torch.float64), 192, 256)
    a, b = model(images, m1)["pred_boxes"][0], model(big, pad)["pred_boxes"][0]
    figures.append(("focus_detr full-model padding drift, max L1 to the nearest box",
                    f"{torch.cdist(a, b, p=1).min(1).values.max().item():.2e}"))


def test_focus_detr_selector_learns_only_from_its_focal_loss_and_dn_is_training_only():
    torch.manual_seed(0)
    model, criterion, post = focus_detr.build(tiny_focus())
    model.train()
    images, pad_mask = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    pad_mask[1, 96:, :] = True
    targets = _sized(_random_targets([3, 0], 21), pad_mask)
    out = model(images, pad_mask, targets)
    assert out["pred_logits"].shape == (2, 10, 21) and out["enc_outputs"]["pred_logits"].shape == (2, 10, 21)
    assert out["dn_meta"] == {"groups": 2, "group_size": 6} and out["dn_outputs"][-1]["pred_boxes"].shape == (2, 12, 4)
    losses = criterion(out, targets)
    assert {"loss_select", "loss_ce_dn", "loss_giou_dn_0", "loss_bbox_enc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    rest = sum(losses[k] * criterion.weight_dict[k] for k in losses if k != "loss_select")
    rest.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in model.selector.parameters())  # top-k passes no gradient
    model.zero_grad()
    (rest + 1.5 * losses["loss_select"]).backward()
    _assert_only_box_hidden_layers_without_gradient(model)
    no_boxes = _sized(_random_targets([0, 0], 21), pad_mask)
    empty = criterion(model(images, pad_mask, no_boxes), no_boxes)
    assert all(torch.isfinite(v) for v in empty.values()) and empty["loss_bbox_dn"] == 0
    model.eval()
    with torch.no_grad():
        out = model(images, pad_mask, targets)  # targets are ignored in eval
    assert "dn_outputs" not in out and out["pred_logits"].shape == (2, 10, 21)
    assert post(out, torch.tensor([[100, 120], [80, 90]]))[0]["boxes"].shape == (20, 4)


def test_focus_detr_denoising_queries_and_mask():
    torch.manual_seed(0)
    label_enc = torch.nn.Embedding(5, 8)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])}]
    q_label, q_box, mask, meta = focus_detr.prepare_denoising(targets, 5, 0.0, 1.0, 5, label_enc, 3)
    assert meta == {"groups": 2, "group_size": 4} and q_label.shape == (2, 8, 8) and mask.shape == (11, 11)
    boxes = q_box.sigmoid()
    for g in range(2):
        for b, t in enumerate(targets):
            for i, box in enumerate(t["boxes"]):
                pos, neg = boxes[b, g * 4 + i], boxes[b, g * 4 + 2 + i]
                corner = lambda x: box_ops_xyxy(x)  # noqa: E731
                dist_pos = (corner(pos) - corner(box)).abs() / box[2:].repeat(2) * 2
                dist_neg = (corner(neg) - corner(box)).abs() / box[2:].repeat(2) * 2
                assert (dist_pos <= 1 + 1e-4).all()  # positives move each corner by < half the box size
                # negatives by 1 to 2 times that, unless clamped to the image or crossed (collapsed to size 0)
                collapsed = (neg[2:] <= 1e-4).repeat(2)
                assert ((dist_neg >= 1 - 1e-4) | (corner(neg) <= 1e-4) | (corner(neg) >= 1 - 1e-4) | collapsed).all()
                assert torch.allclose(q_label[b, g * 4 + i], label_enc.weight[t["labels"][i]])  # no label noise
        assert not q_label[1, g * 4 + 1].any()  # image 1 has one box: its second slot is padding
    assert mask[8:, :8].all() and not mask[:8, 8:].any() and not mask[8:, 8:].any()  # matching queries never see the denoising ones
    assert not mask[:4, :4].any() and mask[:4, 4:8].all() and mask[4:8, :4].all()
    assert focus_detr.prepare_denoising([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                                        5, 0.5, 1.0, 5, label_enc, 3) is None


def test_focus_detr_fewer_kept_tokens_than_fine_grained_and_dense_base():
    """A small image keeps fewer tokens than num_fine_tokens (OFF's crash, detrex #354): no error.
    foreground_selection=False is the dense DINO encoder: every layer queries every token."""
    torch.manual_seed(0)
    for kw in ({"num_fine_tokens": 300}, {"num_fine_tokens": 300, "cascade_counts": "batch_max",
                                          "mcsp_score": "prob_product", "encoder_values": "memory"},
               {"foreground_selection": False}):
        model, criterion, _ = focus_detr.build(tiny_focus(**kw))
        images, pad_mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
        targets = _sized(_random_targets([2, 1], 21), pad_mask)
        out = model(images, pad_mask, targets)
        losses = criterion(out, targets)
        assert ("loss_select" in losses) == kw.get("foreground_selection", True)
        sum(losses[k] * criterion.weight_dict[k] for k in losses).backward()
    assert model.selector is None and not hasattr(model.encoder[0], "oesm_attn")


@pytest.mark.parametrize("kw", [{"fg_ranges": "overlap"}, {"learnt_init_query": False}, {"look_forward_twice": False},
                                {"dn_number": 0}, {"scorer_mean_over_padding": True, "upsample_over_padding": True,
                                                   "query_pos_over_padding": True, "masked_groupnorm": False}])
def test_focus_detr_switches_build_and_train(kw):
    torch.manual_seed(0)
    model, criterion, _ = focus_detr.build(tiny_focus(**kw))
    images, pad_mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    pad_mask[1, 64:] = True
    targets = _sized(_random_targets([2, 1], 21), pad_mask)
    out = model(images, pad_mask, targets)
    assert ("dn_outputs" in out) == (kw.get("dn_number", 6) > 0)
    losses = criterion(out, targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_focus_detr_explain_returns_the_nested_cascade_and_its_fine_tokens():
    """explain=True adds each encoder layer's kept tokens and fine-grained tokens: the kept sets are
    nested (Sec. 3.2) with k_l members, the fine-grained ones are min(num_fine_tokens, k_l) of them."""
    torch.manual_seed(0)
    model, _, _ = focus_detr.build(tiny_focus())
    images, pad_mask = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    pad_mask[1, 64:, 96:] = True
    with torch.no_grad():
        out = model.eval()(images, pad_mask, explain=True)
    keep, kept, fine = out["token_nums"], out["kept_tokens"], out["fine_tokens"]
    assert len(kept) == len(fine) == len(model.encoder)
    for b in range(2):
        previous = None
        for lid in range(len(kept)):
            ids = {i for i in kept[lid][b].tolist() if i >= 0}
            fine_ids = {i for i in fine[lid][b].tolist() if i >= 0}
            assert len(ids) == keep[lid, b] and not out["token_pad_mask"][b, list(ids)].any()
            assert fine_ids <= ids and len(fine_ids) == min(model.cfg.num_fine_tokens, int(keep[lid, b]))
            assert previous is None or ids <= previous
            previous = ids


def _detectron2_name(key):
    """torchvision ResNet names -> detectron2's (the official Focus-DETR checkpoints' backbone)."""
    key = re.sub(r"^conv1\.", "stem.conv1.", re.sub(r"^bn1\.", "stem.conv1.norm.", key))
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", key)
    return "backbone." + key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


@pytest.mark.parametrize("class_ids", ["coco", "contiguous"])
def test_focus_detr_official_checkpoint_gives_the_official_outputs(tmp_path, class_ids):
    """A detrex checkpoint (detectron2 backbone names) through from_official: the batch (padded)
    and single-image cases of the fixture, 80 classes mapped onto COCO ids or kept contiguous."""
    fx, path, backbone = _official_file(tmp_path, "focus_detr_r50_12ep_small.pt", _detectron2_name)
    cfg, state, notes = focus_detr.from_official(path, class_ids=class_ids)
    assert (cfg.num_queries, cfg.enc_layers, cfg.cascade_counts, cfg.pos_temperature, cfg.extra_level_mask) == \
        (30, 2, "batch_max", 10000.0, "interpolate") and any("num_fine_tokens" in n for n in notes)
    cfg.num_fine_tokens, cfg.dn_number = 16, 0  # the fixture's (OFF's topk_sa is no config value)
    model, criterion, _ = focus_detr.build(cfg)
    model.double().load_state_dict(state)
    assert torch.equal(model.backbone.body.layer2[0].downsample[1].running_var,
                       backbone["backbone.res3.0.shortcut.norm.running_var"])
    cols = focus_detr.COCO_IDS if class_ids == "coco" else list(range(80))
    for case in (fx, fx["single"]):
        ref = case["outputs"]
        with torch.no_grad():
            out = _run_official_case(model.eval(), case["inputs"])
            for key, ours, theirs in [("logits", out["pred_logits"][..., cols], ref["pred_logits"]),
                                      ("boxes", out["pred_boxes"], ref["pred_boxes"]),
                                      ("aux", out["aux_outputs"][0]["pred_logits"][..., cols], ref["aux_outputs"][0]["pred_logits"]),
                                      ("enc", out["enc_outputs"]["pred_logits"][..., cols], ref["enc_outputs"]["pred_logits"]),
                                      ("fg", out["fg_logits"], ref["fg_logits"])]:
                assert _max_diff(ours, theirs) < 1e-6, key
            assert torch.equal(out["token_nums"], ref["token_nums"])
            targets = [{**t, "labels": torch.tensor(cols)[t["labels"]]} for t in case["targets"]]
            losses = criterion(_run_official_case(model.train(), case["inputs"]), targets)
        names = {"loss_class": "loss_ce", "loss_class_0": "loss_ce_0", "loss_class_enc": "loss_ce_enc",
                 "select_loss": "loss_select"}
        for k, v in case["losses_fp32"].items():
            assert losses[names.get(k, k)].item() == pytest.approx(v, rel=1e-5), k
    if class_ids == "coco":
        assert (state["class_embed.0.bias"][[0, 12, 26]] == -1e4).all()  # ids that are no COCO category
        other = _official_file(tmp_path, "sparse_detr_rho0.1.pt", lambda k: f"backbone.0.body.{k}")[1]
        with pytest.raises(ValueError, match="not a Focus-DETR"):
            focus_detr.from_official(other)
        _bad_official_files(tmp_path, path, focus_detr.from_official, "transformer.encoder.layers.1.norm2.weight",
                            "neck.convs.1.norm.bias")
        torch.save(torch.load(path, weights_only=False), tmp_path / "focus_detr_r50_4scale_36ep.pth")
        cfg36 = focus_detr.from_official(str(tmp_path / "focus_detr_r50_4scale_36ep.pth"))[0]
        assert (cfg36.pos_temperature, cfg36.pos_offset) == (20.0, 0.0)  # the 24 / 36-epoch configs' encoding


def test_focus_detr_config_errors():
    for kw, msg in [({"mcsp_score": "sum"}, "mcsp_score"), ({"cascade_ratios": (1.0, 0.5)}, "cascade_ratios"),
                    ({"focus_rho": 0.0}, "focus_rho"), ({"encoder_values": "src"}, "encoder_values"),
                    ({"dn_number": -1}, "dn_number"), ({"num_feature_levels": 3}, "4 levels")]:
        with pytest.raises(ValueError, match=msg):
            focus_detr.build(tiny_focus(**kw))


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

TINY_SET = ["--set", "hidden_dim=32", "nheads=4", "enc_layers=1", "dec_layers=2", "dim_feedforward=64",
            "num_queries=12", "num_select=20"]


def _train_args(data, out, *extra):
    return ["--model", "smca", "--data", data, "--output-dir", str(out), "--batch-size", "4", "--num-workers", "0",
            "--scales", "shapes", "--backbone-weights", "none",
            "--lr-drop", "100", "--log-every", "100", *extra, *TINY_SET]


def _train_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {(r["epoch"], r["iter"]): r["loss"] for r in map(json.loads, f) if r["type"] == "train"}


def test_train_resume_matches_uninterrupted_run(tiny_shapes, tmp_path):
    train.main(_train_args(tiny_shapes, tmp_path / "a", "--epochs", "2", "--eval-every", "2"))
    train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    result = train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "2", "--resume", "auto"))
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert len(a) == 4 and set(a) == set(b)  # 2 epochs x 2 iterations
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    assert set(result["stats"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    pictures = sorted(os.listdir(tmp_path / "b" / "pictures-after-step-4"))  # the run ends with detect.py's pictures
    assert pictures == ["000000.jpg", "000000_explain.png", "000001.jpg", "000001_explain.png", "000002.jpg",
                        "000002_explain.png", "detections.json"]
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)["categories"][2] == "circle"
    evaluated = train.main(_train_args(tiny_shapes, tmp_path / "b", "--eval-only"))  # uses b's checkpoint
    assert evaluated["stats"] == pytest.approx(result["stats"])
    # the same output dir without --resume, or with another config, is refused (nothing overwritten)
    with pytest.raises(ValueError, match="--resume auto"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "3"))
    weights_only = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    torch.save({k: weights_only[k] for k in ("model", "model_name", "config")}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"lacks the training state \['optimizer'"):
        train.main(_train_args(tiny_shapes, tmp_path / "c", "--epochs", "3", "--resume", str(tmp_path / "weights.pth")))
    with pytest.raises(ValueError, match="hidden_dim: checkpoint 32 vs now 64"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "3", "--resume", "auto") + ["hidden_dim=64"])
    # a checkpoint written before a Config field existed ran as the field's default: still compatible
    old = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    del old["config"]["beta"]
    torch.save(old, tmp_path / "older.pth")
    train.main(_train_args(tiny_shapes, tmp_path / "c", "--eval-only", "--resume", str(tmp_path / "older.pth")))
    with pytest.raises(ValueError, match="beta: checkpoint 8.0 vs now 4.0"):
        train.main(_train_args(tiny_shapes, tmp_path / "d", "--eval-only", "--resume", str(tmp_path / "older.pth"))
                   + ["beta=4"])


def test_train_loader_augments_from_the_datasets_own_random_stream(tiny_shapes):
    """make_loader reseeds the dataset's augmentation stream, never the global `random`: the same
    (seed, epoch, rank) gives the same batches, and the caller's random state is left alone."""
    ds = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "train"),
                               datalib.make_transforms("train", **datalib.SHAPES_SCALES))

    def boxes():
        return [t["boxes"] for _, _, targets in train.make_loader(ds, 2, True, 0, 1, 0, 1, 0) for t in targets]
    random.seed(123)
    state = random.getstate()
    first = boxes()
    assert random.getstate() == state
    assert all(torch.equal(a, b) for a, b in zip(first, boxes()))


def test_train_reads_backbone_weights_from_its_own_checkpoints(tmp_path):
    """--backbone-weights may name a train.py checkpoint (numpy RNG states inside): train.py reads it,
    common.load_backbone_weights only ever unpickles plain tensors."""
    model, _, _ = smca.build(tiny_smca())
    torch.nn.init.normal_(model.backbone.body.layer2[0].conv1.weight)
    torch.save({"model": model.state_dict(), "rng": {"numpy": np.random.get_state()}}, tmp_path / "ckpt.pth")
    fresh = common.Backbone(18, "bn")
    common.load_backbone_weights(fresh, train.backbone_weights(str(tmp_path / "ckpt.pth")))
    assert torch.equal(fresh.body.layer2[0].conv1.weight, model.backbone.body.layer2[0].conv1.weight)
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        common.load_backbone_weights(fresh, str(tmp_path / "ckpt.pth"))
    with pytest.raises(ValueError, match="no such file"):
        train.backbone_weights(str(tmp_path / "absent.pth"))


def test_train_stops_on_non_finite_loss(tiny_shapes, tmp_path, monkeypatch):
    real_build = smca.build

    def build_with_nan_on_third_call(cfg):
        model, criterion, post = real_build(cfg)
        calls = {"n": 0}
        forward = criterion.forward

        def poisoned(outputs, targets):
            losses = forward(outputs, targets)
            calls["n"] += 1
            if calls["n"] == 3:  # epoch 1, iteration 0
                losses["loss_giou"] = losses["loss_giou"] * float("nan")
            return losses
        criterion.forward = poisoned
        return model, criterion, post

    monkeypatch.setattr(smca, "build", build_with_nan_on_third_call)
    with pytest.raises(FloatingPointError, match=r"epoch 1 iteration 0 \(global step 2\), image ids \[\d+"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "2", "--eval-every", "5"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_train_finetune_skips_and_lists_what_does_not_fit(tmp_path):
    source, _, _ = smca.build(tiny_smca(num_classes=21))
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    target, _, _ = smca.build(tiny_smca(num_classes=7))
    report = train.finetune_from(target, str(tmp_path / "ckpt.pth"))
    assert report["shape_mismatch"] == ["class_embed.bias", "class_embed.weight"]
    assert report["missing"] == ["class_embed.bias", "class_embed.weight"] and report["unused"] == []
    assert torch.equal(target.query_embed.weight, source.query_embed.weight)
    torch.save({"model": {"unrelated": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors fits"):
        train.finetune_from(target, str(tmp_path / "other.pth"))


def test_train_rejects_bad_flags(tiny_shapes, tmp_path):
    with pytest.raises(ValueError, match="no such Config field"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1") + ["nonsense=1"])
    with pytest.raises(ValueError, match="expected a int"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1") + ["num_queries=many"])
    with pytest.raises(ValueError, match="neither 'shapes' nor a folder"):
        train.main(_train_args(str(tmp_path / "nowhere"), tmp_path, "--epochs", "1"))
    with pytest.raises(ValueError, match="does not exist"):
        train.main(_train_args(tiny_shapes, tmp_path, "--eval-only", "--resume", str(tmp_path / "none.pth")))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        train.main(_train_args(tiny_shapes, tmp_path / "empty", "--eval-only"))
    with pytest.raises(ValueError, match="--device 'warp9'"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--device", "warp9"))
    with pytest.raises(ValueError, match="--lr-backbone must be positive"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--lr-backbone", "-1"))
    with pytest.raises(ValueError, match="--lr must be positive"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--lr", "0"))


def test_train_set_parses_tuples_and_rejects_bad_ones():
    cfg = train.apply_overrides(focus_detr.Config(), ["cascade_ratios=1,0.5,0.5,0.5,0.25,0.25"])
    assert cfg.cascade_ratios == (1.0, 0.5, 0.5, 0.5, 0.25, 0.25)
    with pytest.raises(ValueError, match="expected a tuple"):
        train.apply_overrides(focus_detr.Config(), ["cascade_ratios=1,half"])


def test_train_lr_backbone_zero_freezes_the_backbone(tiny_shapes, tmp_path):
    """DETR's convention: --lr-backbone 0 trains no backbone parameter; the rest trains, and steps are counted."""
    train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--lr-backbone", "0"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert "backbone" not in [g["name"] for g in ckpt["optimizer"]["param_groups"]]
    assert {g["name"] for g in ckpt["optimizer"]["param_groups"]} == {"base"}
    assert ckpt["steps"] == 2  # 8 train images, batch 4
    with open(tmp_path / "log.jsonl") as f:
        assert [r["steps"] for r in map(json.loads, f) if r["type"] == "eval"] == [2]


def test_train_time_budget_stops_saves_and_evaluates(tiny_shapes, tmp_path):
    """--time-budget: training stops at the first iteration past the budget, the partial epoch is saved
    and evaluated (with the training seconds and inference ms logged); a resume trains no further."""
    with pytest.raises(ValueError, match="--time-budget must be a positive"):
        train.main(_train_args(tiny_shapes, tmp_path / "x", "--epochs", "1", "--time-budget", "0"))
    result = train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "3", "--time-budget", "1e-7"))
    assert set(result["stats"]) >= {"AP", "AP50"}
    assert len(_train_losses(tmp_path / "b")) == 1  # 1 of the epoch's 2 iterations
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["epoch_fraction"] == 0.5 and ckpt["train_s"] > 0
    with open(tmp_path / "b" / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["epoch_fraction"] == 0.5 and evals[0]["infer_ms_per_image"] > 0
    assert evals[0]["train_s"] == pytest.approx(ckpt["train_s"])
    train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "3", "--time-budget", "1e-7", "--resume", "auto"))
    assert len(_train_losses(tmp_path / "b")) == 1  # the budget is spent: nothing more trained


def test_train_ddp_two_processes(tiny_shapes, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *_train_args(tiny_shapes, out, "--epochs", "1", "--batch-size", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert sum(r["type"] == "train" for r in records) == 2  # 8 images / 2 ranks / batch 2
    assert any(r["type"] == "eval" for r in records)


# ---------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------

def _bench_tiny(name, cfg, *flags, h=64, w=96):
    """bench.py's records for one suite applied to a tiny Config, on an h x w random image."""
    args = bench.parse_args(["--size", str(h), str(w), "--repeats", "1", *flags])
    args.size_label = f"{h}x{w}"
    return bench.bench_model(name, args, [torch.randn(3, h, w)], config=cfg)


def test_bench_counts_grid_sample_as_four_macs_per_sampled_value():
    v, grid = torch.randn(2, 3, 5, 7), torch.rand(2, 4, 6, 2) * 2 - 1
    total, _ = bench.count_gmacs(lambda: F.grid_sample(v, grid, align_corners=False))
    assert total * 1e9 == pytest.approx(4 * 2 * 3 * 4 * 6)  # one multiply-add per bilinear corner per output value
    B, Q, H, D, P, shapes = 2, 5, 4, 8, 3, [(6, 8), (3, 4)]
    value = torch.randn(B, sum(h * w for h, w in shapes), H, D)
    loc, weights = torch.rand(B, Q, H, len(shapes), P, 2), torch.rand(B, Q, H, len(shapes), P)
    total, _ = bench.count_gmacs(lambda: common.ms_deform_attn(value, shapes, loc, weights))
    assert total * 1e9 == pytest.approx(4 * B * Q * H * D * len(shapes) * P)  # the weighted sum is elementwise (not counted)
    # nn.MultiheadAttention: projections and both attention products, on the CPU kernel and the fused
    # inference path (query is key is value) alike
    mha, E, Lq, Lk = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval(), 16, 5, 7
    for p in mha.parameters():
        p.requires_grad_(False)
    q, kv = torch.randn(B, Lq, E), torch.randn(B, Lk, E)
    with torch.no_grad():
        total, _ = bench.count_gmacs(lambda: mha(q, kv, kv + 1, need_weights=False))
        assert total * 1e9 == pytest.approx(B * (2 * Lq * E * E + 2 * Lk * E * E + 2 * Lq * Lk * E))
        total, _ = bench.count_gmacs(lambda: mha(kv, kv, kv, need_weights=False))
        assert total * 1e9 == pytest.approx(B * (4 * Lk * E * E + 2 * Lk * Lk * E))


@pytest.mark.parametrize("name", list(bench.SUITES))
def test_bench_baselines_differ_from_their_models_only_where_they_should(name):
    """Each efficiency comparison changes only the paper's switch: the Config fields, and the
    parameters those fields add or remove; every other parameter has the same name and shape."""
    fields = {"smca": {"spatial_prior", "multiscale"}, "sparse_detr": {"sparse_encoder", "rho"},
              "lite_detr": {"enc_scale", "num_blocks", "kda_encoder", "low_ffn"},
              "focus_detr": {"foreground_selection"}}[name]
    params = {"smca": r"decoder\.\d+\.(center_mlp|norm4|offset_proj|scale_proj)\..*",
              "sparse_detr": r"scoring\..*|(class|bbox)_embed\.\d+\..*",  # the scorer, the encoder-aux heads
              "lite_detr": r"encoder\.\d+\.(self_attn\.(query_proj|attention_weights)|linear12|linear22|norm22)\..*",
              "focus_detr": r"selector\..*|encoder\.\d+\.oesm_(attn|norm)\..*"}[name]
    module = importlib.import_module(name)
    tiny = {"smca": tiny_smca, "sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    suite = bench.SUITES[name]
    base_cfg = bench.make_config(module, suite.baseline.overrides)
    base = {k: p.shape for k, p in module.build(bench.make_config(module, suite.baseline.overrides, tiny()))[0]
            .state_dict().items()}
    for v in suite.variants:
        cfg = bench.make_config(module, v.overrides)
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base_cfg, f.name)}
        assert changed and changed <= fields, (v.label, changed)
        if "multiscale" in changed:  # another encoder and input projections: the SMCA tests cover it
            continue
        ours = {k: p.shape for k, p in module.build(bench.make_config(module, v.overrides, tiny()))[0]
                .state_dict().items()}
        differing = (ours.keys() ^ base.keys()) | {k for k in ours.keys() & base.keys() if ours[k] != base[k]}
        assert differing, v.label
        assert all(re.fullmatch(params, k) for k in differing), (v.label, sorted(differing))


def test_bench_lite_detr_encoder_macs_follow_the_token_updates():
    """bench.py's count: all-token layers cost the dense layer's per-query part, high-level layers
    that part x |F_H| / N, and every layer pays the value projection over all N tokens."""
    cfg = tiny_lite()
    by_label = {r["label"]: r for r in _bench_tiny("lite_detr", cfg)}
    # 64 x 96: levels 8x12, 4x6, 2x3, 1x2 -> N = 128 tokens; F_H = the coarsest 3 (32) or 2 (8) levels.
    # Per layer and query token (d model, F FFN, H heads, L levels, P points): offsets d*2HLP + output
    # d*d + FFN 2dF + grid_sample 4dLP (+ dense: attention weights d*HLP; + KDA: query d*d and the q.k,
    # w.v matmuls 2dLP); the value projection d*d per token per layer. The weighted sum is elementwise.
    d, F_, H, L, P, n = cfg.hidden_dim, cfg.dim_feedforward, cfg.nheads, 4, cfg.enc_n_points, 128
    per_q_dense = d * 2 * H * L * P + d * d + 2 * d * F_ + 4 * d * L * P + d * H * L * P
    per_q_kda = d * 2 * H * L * P + d * d + 2 * d * F_ + 4 * d * L * P + d * d + 2 * d * L * P
    small = 2 * d * d - 2 * d * F_  # F_L's small FFN in the all-token layer instead of the normal one
    dense_enc = cfg.enc_layers * n * (per_q_dense + d * d)
    for name, n_high, blocks in (("H3L1-(2+1)x3", 32, 3), ("H3L1-(3+1)x2", 32, 2), ("H3L1-(6+1)x1", 32, 1),
                                 ("H2L2-(2+1)x3", 8, 3)):
        lite, no_ffn = by_label[name], by_label[f"{name}, F_L without FFN"]
        assert lite["baseline_encoder_gmacs"] * 1e9 == pytest.approx(dense_enc, rel=1e-6)
        want = (6 * n * d * d + (6 - blocks) * n_high * per_q_kda + blocks * n * per_q_kda
                + blocks * (n - n_high) * small)
        assert lite["encoder_gmacs"] * 1e9 == pytest.approx(want, rel=1e-6), name
        assert no_ffn["encoder_gmacs"] * 1e9 == pytest.approx(want - blocks * (n - n_high) * 2 * d * d, rel=1e-6)
        assert 0 < lite["encoder_ms"] <= lite["ms"] and no_ffn["ms"] is None  # counted, not timed


def test_bench_smca_costs_what_detr_costs_plus_the_prior_heads():
    """Single-scale SMCA adds only the prior's small heads to DETR: same encoder, nearly the same total."""
    cfg = tiny_smca()
    single, multi = _bench_tiny("smca", cfg)
    assert single["encoder_gmacs"] == pytest.approx(single["baseline_encoder_gmacs"], rel=1e-9)
    assert 1 < single["gmacs"] / single["baseline_gmacs"] < 1.02
    assert multi["encoder_gmacs"] > single["encoder_gmacs"] and 0 < multi["encoder_ms"] <= multi["ms"]


def test_bench_sparse_detr_encoder_macs_follow_rho():
    """bench.py's count: the sparse encoder's multiply-adds are the per-query part on the S = int(N rho) + 1
    selected tokens plus the value projection on all N (the paper's slope: ratio 0.087 + 0.913 rho at d 256,
    FFN 1024, 4 x 4 points; here a tiny config); the records carry every field --json promises."""
    cfg = tiny_sparse(enc_layers=2)
    records = _bench_tiny("sparse_detr", cfg)
    d, F_, H, L, P, n = cfg.hidden_dim, cfg.dim_feedforward, cfg.nheads, 4, cfg.enc_n_points, 128  # 8x12 + 4x6 + 2x3 + 1x2
    per_q = d * 2 * H * L * P + d * H * L * P + d * d + 2 * d * F_ + 4 * d * L * P  # offsets, weights, output, FFN, grid
    assert [r["label"] for r in records] == ["rho 0.1", "rho 0.2", "rho 0.3", "rho 0.5"]
    for r in records:
        assert set(r) >= {"model", "config", "params", "gmacs", "encoder_gmacs", "baseline_gmacs",
                          "baseline_encoder_gmacs", "ms", "baseline_ms", "device", "size"}
        s_ = int(n * r["config"]["rho"]) + 1
        assert r["encoder_gmacs"] * 1e9 == pytest.approx(2 * (s_ * per_q + n * d * d), rel=1e-6)
        assert r["baseline_encoder_gmacs"] * 1e9 == pytest.approx(2 * n * (per_q + d * d), rel=1e-6)
        assert r["params"] > r["baseline_params"]  # the scorer and the encoder-aux heads
        assert r["device"] == "cpu" and r["size"] == "64x96" and 0 < r["encoder_ms"] <= r["ms"]
    # the same count at the paper's widths (d 256, FFN 1024, 4 levels x 4 points), per token
    d, n, s_ = 256, 20000, 2001
    per_q = 65536 + 32768 + 65536 + 524288 + 4 * 256 * 16  # sampling offsets, weights, output, FFN, grid_sample
    assert (s_ * per_q + n * d * d) / (n * (per_q + d * d)) == pytest.approx(0.087 + 0.913 * 0.1, abs=0.003)


def test_bench_focus_detr_under_bf16_autocast_counts_the_same_work():
    cfg = tiny_focus()
    fp32, bf16 = _bench_tiny("focus_detr", cfg)[0], _bench_tiny("focus_detr", cfg, "--amp", "bf16")[0]
    assert bf16["amp"] == "bf16" and bf16["ms"] > 0
    for key in ("gmacs", "encoder_gmacs", "baseline_gmacs", "baseline_encoder_gmacs"):
        assert bf16[key] == pytest.approx(fp32[key], rel=1e-6), key
    assert 0 < fp32["encoder_gmacs"] < fp32["baseline_encoder_gmacs"] < fp32["baseline_gmacs"]


def test_bench_smca_fast_vs_reference_and_profile():
    """--fast-vs-reference times the readable and the fast path of a model and its baseline and
    reports their output differences; --profile splits a forward by module and op group."""
    rows = bench.main(["--fast-vs-reference", "--model", "smca", "--size", "64", "96", "--repeats", "1"])
    assert [r["label"] for r in rows] == ["DETR baseline (prior off)", "SMCA single-scale", "SMCA multi-scale"]
    assert all(r["ms_reference"] > 0 and r["ms_fast"] > 0 and r["logits_diff"] < 1e-4 for r in rows)
    (base, smca_row) = bench.main(["--profile", "--model", "smca", "--size", "64", "96"])
    for mode in ("reference", "fast"):
        m = smca_row[mode]
        assert m["backbone"] > 0 and m["encoder"] > 0 and m["decoder"] > 0
        assert m["rest"] >= 0  # the hooked modules run inside the forward, never counted twice
        assert m["ops"]["convolutions"] > 0


def test_bench_rejects_bad_flags(tiny_shapes):
    with pytest.raises(ValueError, match=r"--images 99: .*instances_val.json has only 3 images"):
        bench.main(["--data", tiny_shapes, "--images", "99"])
    images = bench._val_images(tiny_shapes, 2, "cpu")  # val transforms: short side 800
    assert len(images) == 2 and all(min(im.shape[1:]) == 800 or max(im.shape[1:]) in (1332, 1333) for im in images)
    with pytest.raises(ValueError, match="--size must be at least 64"):
        bench.main(["--size", "32", "32"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench.main(["--device", "cuda"])
    with pytest.raises(ValueError, match="--threads must be positive"):
        bench.main(["--threads", "0"])
    with pytest.raises(ValueError, match="is not a folder"):
        bench.main(["--data", "/nowhere/coco"])
    with pytest.raises(SystemExit):
        bench.main(["--model", "detr9000"])


# ---------------------------------------------------------------------------------------------
# detect.py and visualize.py
# ---------------------------------------------------------------------------------------------

def _tiny_checkpoint(path, data, name="smca", **kw):
    """A checkpoint as train.py writes it (model, config, args, categories), of a tiny random model."""
    module = importlib.import_module(name)
    tiny = {"smca": tiny_smca, "sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    torch.manual_seed(0)
    model = module.build(tiny(**kw))[0]
    torch.nn.init.constant_(model.class_embed.bias if name == "smca" else model.class_embed[-2].bias, 2.0)  # confident
    cats = {c["id"]: c["name"] for c in json.load(open(os.path.join(data, "annotations", "instances_val.json")))["categories"]}
    torch.save({"model": model.state_dict(), "model_name": name, "config": dataclasses.asdict(model.cfg),
                "args": {"data": data, "scales": "shapes"}, "categories": cats}, path)
    return cats


def test_detect_on_a_file_a_folder_and_a_glob_writes_pictures_and_coco_results(tiny_shapes, tmp_path):
    from pycocotools.coco import COCO
    ckpt = tmp_path / "ckpt.pth"
    cats = _tiny_checkpoint(ckpt, tiny_shapes)
    folder = tmp_path / "photos"
    os.makedirs(folder)
    val = os.path.join(tiny_shapes, "val")
    for f in sorted(os.listdir(val)):
        Image.open(os.path.join(val, f)).save(folder / f.replace(".jpg", ".png"))
    (folder / "notes.txt").write_text("not an image")
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    for source, n_images in [(str(folder / "000000.png"), 1), (str(folder), 3), (str(folder / "*.png"), 3)]:
        out = tmp_path / f"out{n_images}{len(source)}"
        summary = detect.main(["--checkpoint", str(ckpt), "--source", source, "--out", str(out), "--threshold", "0.05"])
        assert summary["images"] == n_images and len(summary["skipped"]) == (1 if source == str(folder) else 0)
        files = detect.source_files(source)
        images = [f for f in files if f.endswith(".png")]
        gt = {"images": [{"id": i + 1, "file_name": f, **dict(zip(("width", "height"), Image.open(f).size))}
                         for i, f in enumerate(images)],
              "annotations": [], "categories": [{"id": k, "name": v} for k, v in cats.items()]}
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        results = json.load(open(out / "detections.json"))
        assert results and summary["detections"] == len(results)
        dt = coco.loadRes(str(out / "detections.json"))  # the COCO results format, ids of the given images
        for r in dt.dataset["annotations"]:
            w, h = Image.open(images[r["image_id"] - 1]).size
            x, y, bw, bh = r["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01 and r["score"] >= 0.05
            assert r["category_id"] in cats and r["file_name"] == images[r["image_id"] - 1]
        first = results[0]
        original = np.asarray(Image.open(images[first["image_id"] - 1]).convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out / os.path.basename(images[first["image_id"] - 1]))).astype(int)
        assert drawn.shape == original.shape
        x, y, bw, bh = [int(round(v)) for v in first["bbox"]]
        edge = drawn[min(y, original.shape[0] - 1), x:x + max(bw, 1)]  # the box's top edge
        assert (edge != original[min(y, original.shape[0] - 1), x:x + max(bw, 1)]).any()
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before  # the source is untouched


def test_detect_refuses_bad_inputs_and_never_overwrites(tiny_shapes, tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes)
    val = os.path.join(tiny_shapes, "val")
    with pytest.raises(ValueError, match="does not exist"):
        detect.main(["--checkpoint", str(tmp_path / "absent.pth"), "--source", val])
    torch.save({"model": {}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a checkpoint of a model of this library"):
        detect.main(["--checkpoint", str(tmp_path / "other.pth"), "--source", val, "--out", str(tmp_path / "o1")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no files"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no such file or folder"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="no files"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "*.jpeg")])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="none of the 1 source files is a readable image"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "text"), "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="inside the source folder"):
        detect.main(["--checkpoint", str(ckpt), "--source", val, "--out", os.path.join(val, "out")])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "detections.json").write_text("[]")
    with pytest.raises(ValueError, match="not empty; nothing is overwritten"):
        detect.main(["--checkpoint", str(ckpt), "--source", val, "--out", str(tmp_path / "used")])
    assert (tmp_path / "used" / "detections.json").read_text() == "[]"
    with pytest.raises(ValueError, match="threshold"):
        detect.main(["--checkpoint", str(ckpt), "--source", val, "--threshold", "2"])


@pytest.mark.parametrize("name,kw", [("smca", {}), ("smca", {"multiscale": True}), ("smca", {"spatial_prior": False}),
                                     ("sparse_detr", {}), ("sparse_detr", {"sparse_encoder": False}), ("lite_detr", {}),
                                     ("focus_detr", {}), ("focus_detr", {"foreground_selection": False})],
                         ids=["smca", "smca-multiscale", "smca-detr-baseline", "sparse_detr", "sparse_detr-dense",
                              "lite_detr", "focus_detr", "focus_detr-dense"])
def test_detect_explain_picture_of_each_model(tiny_shapes, tmp_path, name, kw):
    """--explain writes one mechanism picture per image, for every model (and SMCA's variants)."""
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes, name, **kw)
    source = os.path.join(tiny_shapes, "val", "000000.jpg")
    detect.main(["--checkpoint", str(ckpt), "--source", source, "--out", str(tmp_path / "o"), "--explain"])
    picture = Image.open(tmp_path / "o" / "000000_explain.png")
    assert picture.size[0] >= 240 and picture.size[1] > 240  # panels enlarged to 240 px or more


def test_detect_and_eval_take_the_authors_weights(tiny_shapes, tmp_path, monkeypatch):
    """The authors' file goes where our checkpoints go: detect.py recognises and converts it (COCO
    names), train.py --eval-only --official evaluates it (also on the readable path); wrong uses are refused."""
    monkeypatch.setattr(common, "FAST_INFERENCE", True)  # --readable-path switches it off: restored after the test
    import argparse
    _, path, _ = _official_file(tmp_path, "smca_single_scale.pt", lambda k: f"backbone.0.body.{k}",
                                {"args": argparse.Namespace(smooth=8)})
    det = detect.load_detector(path)
    assert det.name == "smca" and det.names[1] == "person" and det.model.cfg.num_queries == 20
    image = Image.open(os.path.join(tiny_shapes, "val", "000000.jpg")).convert("RGB").resize((96, 64))
    dets, _ = detect.detect_image(dataclasses.replace(det, transform=datalib.make_transforms("val", **datalib.SHAPES_SCALES)),
                                  image, threshold=0.0)
    assert len(dets["scores"]) and set(dets["labels"].tolist()) <= set(det.names)
    result = train.main(["--model", "smca", "--data", tiny_shapes, "--eval-only", "--official", path, "--scales",
                         "shapes", "--output-dir", str(tmp_path / "eval"), "--batch-size", "3"])
    assert set(result["stats"]) >= {"AP", "AP50"} and not os.path.exists(tmp_path / "eval" / "checkpoint.pth")
    readable = train.main(["--model", "smca", "--data", tiny_shapes, "--eval-only", "--official", path, "--scales",
                           "shapes", "--output-dir", str(tmp_path / "eval2"), "--batch-size", "3", "--readable-path"])
    assert readable["stats"] == pytest.approx(result["stats"], abs=1e-6) and common.FAST_INFERENCE is False
    with pytest.raises(ValueError, match="add --eval-only"):
        train.main(["--model", "smca", "--data", tiny_shapes, "--official", path, "--output-dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="no released weights"):
        train.main(["--model", "lite_detr", "--data", tiny_shapes, "--eval-only", "--official", path,
                    "--output-dir", str(tmp_path / "y")])


def test_visualize_token_cells_and_level_maps_follow_the_flattening():
    """Token t of the flattened levels (finest first) is cell (row, col) of its level, a square of
    stride 8 * 2^l pixels; level_maps undoes the flattening."""
    shapes = [(4, 6), (2, 3), (1, 2)]
    assert visualize.token_cells([0, 7, 24, 25, 29, 30], shapes) == [
        (0, (0, 0, 7, 7)), (0, (8, 8, 15, 15)), (1, (0, 0, 15, 15)), (1, (16, 0, 31, 15)), (1, (32, 16, 47, 31)),
        (2, (0, 0, 31, 31))]
    maps = visualize.level_maps(torch.arange(32.0), shapes)
    assert [tuple(m.shape) for m in maps] == shapes and maps[1][1, 2] == 24 + 5 and maps[2][0, 1] == 31


# ---------------------------------------------------------------------------------------------
# experiments.py
# ---------------------------------------------------------------------------------------------

def test_experiments_leaderboard_trains_each_model_once_and_tables_them(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "LEADERBOARD", [("DETR tiny", "smca", ["--set", "spatial_prior=false"]),
                                                     ("SMCA tiny", "smca", [])])
    argv = ["leaderboard", "--budget", "1e-7", "--out", str(tmp_path), "--data", tiny_shapes, "--train-args",
            "--scales", "shapes", "--batch-size", "4", "--backbone-weights", "none", "--log-every", "100", *TINY_SET]
    rows = experiments.main(argv)
    assert [r["model"] for r in rows] == ["DETR tiny", "SMCA tiny"]
    assert all(r["epochs"] == 0.5 and r["train_min"] > 0 and r["infer_ms"] > 0 for r in rows)
    with open(tmp_path / "detr_tiny" / "log.jsonl") as f:
        assert json.loads(f.readline())["config"]["spatial_prior"] is False
    table = (tmp_path / "leaderboard.md").read_text()
    assert "| DETR tiny |" in table and "| SMCA tiny |" in table and "experiments.py leaderboard --budget 1e-7" in table
    assert experiments.main(argv) == rows  # a second call re-reads the spent runs: nothing retrained, nothing lost
    assert len(_train_losses(tmp_path / "smca_tiny")) == 1


def test_experiments_converge_probe_reads_a_checkpoint_and_refuses_others(tiny_shapes, tmp_path):
    train.main(_train_args(tiny_shapes, tmp_path / "s", "--epochs", "1"))
    rows = experiments.probe(str(tmp_path / "s" / "checkpoint.pth"), tiny_shapes, n=3, size=64)
    assert len(rows) == 3 and all(a >= 0 and b >= 0 for a, b in rows.values())
    assert rows["predicted boxes (images / queries)"][1] > 0  # the queries' boxes differ
    with pytest.raises(ValueError, match="needs 4 val images"):
        experiments.probe(str(tmp_path / "s" / "checkpoint.pth"), tiny_shapes, n=4)
    ckpt = torch.load(tmp_path / "s" / "checkpoint.pth", weights_only=False)
    ckpt["model_name"] = "sparse_detr"
    torch.save(ckpt, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an smca one"):
        experiments.probe(str(tmp_path / "other.pth"), tiny_shapes, n=3)


def test_experiments_converge_table_from_logs_and_skips_finished_runs(tmp_path, monkeypatch):
    """experiments.py converge reads each run's eval records (the last one of an epoch wins), does not retrain a
    run whose last epoch is already evaluated, and counts the steps DETR needed to reach SMCA's AP."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"retrained {argv}"))
    for i in range(3):
        os.makedirs(tmp_path / str(i))
        with open(tmp_path / str(i) / "log.jsonl", "w") as f:
            f.write(json.dumps({"type": "train", "loss": 1.0}) + "\n")
            for epoch in (0, 1, 1):
                ap = 0.01 * (i + 1) * (epoch + 1)
                f.write(json.dumps({"type": "eval", "epoch": epoch, "AP": ap, "AP50": 2 * ap, "epoch_time_s": 60.0,
                                    "steps": 100 * (epoch + 1)}) + "\n")
    experiments.main(["converge", "--epochs", "2", "--out", str(tmp_path)])
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert rows[-3] == "| 2 | 2.0 / 4.0 | 4.0 / 8.0 |"
    assert rows[-2] == "| s / epoch, train + eval | 60 | 60 |"
    # SMCA's AP after epoch 1 (2.0) is DETR's after its epoch 2 (200 steps); SMCA's final 4.0 it never reaches
    assert rows[-1] == "| DETR steps to reach SMCA's AP of each epoch (SMCA: 1 epoch = 100 steps) | - | 200 (2.0x) / > 200 (> 1.0x) |"
    experiments.main(["converge", "--epochs", "2", "--out", str(tmp_path), "--multiscale"])
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert rows[-3] == "| 2 | 2.0 / 4.0 | 4.0 / 8.0 | 6.0 / 12.0 |"

def test_experiments_fine_tokens_counts_kept_and_fine_tokens_inside_boxes(tiny_shapes, tmp_path):
    """The kept tokens do not depend on the MCSP score; the fine-grained share does; both in [0, 1]."""
    _tiny_checkpoint(tmp_path / "focus.pth", tiny_shapes, "focus_detr")
    rows = experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "focus.pth"), "--images", "2"])
    assert set(rows) == {"logit_product", "prob_product"}
    assert rows["logit_product"]["kept"] == rows["prob_product"]["kept"]
    assert all(0 <= v <= 1 for r in rows.values() for v in r.values())
    _tiny_checkpoint(tmp_path / "smca.pth", tiny_shapes, "smca")
    with pytest.raises(ValueError, match="reads a Focus-DETR checkpoint"):
        experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "smca.pth")])
    with pytest.raises(ValueError, match="--images 9"):
        experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "focus.pth"), "--images", "9"])
