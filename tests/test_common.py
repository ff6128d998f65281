"""Tests of common.py: backbone, position encoding, deformable sampling, token geometry, box ops, matcher,
criterion, post-processing, and the backbone's and deformable attention's inference fast paths.
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from tests.helpers import (_bilinear_naive, _random_outputs, _random_targets)


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


@pytest.mark.parametrize("depth,norm", [(18, "frozen_bn"), (50, "frozen_bn"), (18, "bn")])
def test_backbone_fast_path_equals_the_reference(depth, norm):
    """Outside autograd the backbone folds FrozenBatchNorm2d into its convolutions, runs channels-last
    and in place: the same maps within float32 rounding (a few 1e-6 relative after ~50 layers).
    With autograd on the frozen stem and layer1 run it without a graph; the stages record it (next test)."""
    torch.manual_seed(0)
    bb = common.Backbone(depth, norm).eval()
    for m in bb.modules():  # non-trivial statistics, so the folding is exercised
        if isinstance(m, (common.FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            weight = m.weight.data if isinstance(m.weight, torch.nn.Parameter) else m.weight
            weight.uniform_(0.5, 1.5)
    images, mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        with common.fast_paths(False):
            ref = bb(images, mask)
        fast = bb(images, mask)
        x = torch.randn(2, 3, 64, 96)
        c2, c2_fast = common.ResNet.stem.readable(bb.body, x), common.resnet_stem_fast(bb.body, x)
        stages = common.ResNet.stages.readable(bb.body, c2), common.resnet_stages_fast(bb.body, c2)
        direct = [([c2], [c2_fast]), stages]
    for pair in direct:  # the functions themselves
        for a, b in zip(*pair):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    for (a, ma), (b, mb) in zip(ref, fast):
        assert torch.equal(ma, mb) and (a - b).abs().max() <= 1e-5 * a.abs().max()
    calls, fast_stem = [], common.ResNet.stem.fast_path
    common.ResNet.stem.fast_path = lambda *a: calls.append(torch.is_grad_enabled()) or fast_stem(*a)
    try:
        trained = bb(images, mask)  # autograd on: the frozen stem runs its fast path, without a graph
    finally:
        common.ResNet.stem.fast_path = fast_stem
    assert calls == [False]
    for (a, _), (b, _) in zip(ref, trained):
        assert b.requires_grad and (a - b).abs().max() <= 1e-5 * a.abs().max()
    with common.fast_paths(False):
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(ref, bb(images, mask)))  # the readable path, exactly


@pytest.mark.parametrize("value_grad,recompute", [(True, False), (False, False), (True, True)])
def test_ms_deform_attn_fast_path_under_autograd_equals_the_reference(value_grad, recompute):
    """In training the fast path runs through MSDeformAttnFunction, whose backward is written out: the readable
    function's values and gradients (value, locations, weights) in float64, points outside the maps included;
    with fast_paths(False) autograd records the readable function. Under recompute_sampling it keeps only its
    three inputs for the backward (not the samples of the 3 levels) and gives the same gradients."""
    torch.manual_seed(0)
    shapes = [(6, 8), (3, 4), (2, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8, dtype=torch.float64, requires_grad=value_grad)
    locs = (torch.rand(2, 10, 4, 3, 5, 2, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    weights = torch.rand(2, 10, 4, 3, 5, dtype=torch.float64).softmax(-1).requires_grad_()
    inputs = [t for t in (value, locs, weights) if t.requires_grad]
    with common.recompute_sampling(recompute):
        fast = common.ms_deform_attn(value, shapes, locs, weights)
    with common.fast_paths(False):
        ref = common.ms_deform_attn(value, shapes, locs, weights)
    assert type(fast.grad_fn).__name__ == "MSDeformAttnFunctionBackward"
    assert len(fast.grad_fn.saved_tensors) == (3 if recompute else 3 + len(shapes)) and not common.recomputes_samples()
    assert "Function" not in type(ref.grad_fn).__name__
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert torch.allclose(fast, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_stages_fast_path_trains_like_the_reference(depth):
    """In training the stages run their fast path (folded FrozenBatchNorm2d, channels-last, in place) under
    autograd: the readable stages' maps and every trained parameter's gradient, in float64."""
    torch.manual_seed(0)
    bb = common.Backbone(depth).double()
    for m in bb.modules():
        if isinstance(m, common.FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    images, mask = torch.randn(2, 3, 64, 96, dtype=torch.float64), torch.zeros(2, 64, 96, dtype=torch.bool)
    trained = [p for p in bb.parameters() if p.requires_grad]

    def maps_and_grads():
        feats = [f for f, _ in bb(images, mask)]
        loss = sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in feats)
        return feats, torch.autograd.grad(loss, trained)
    calls, fast_stages = [], common.ResNet.stages.fast_path
    common.ResNet.stages.fast_path = lambda *a: calls.append(torch.is_grad_enabled()) or fast_stages(*a)
    try:
        fast = maps_and_grads()
    finally:
        common.ResNet.stages.fast_path = fast_stages
    with common.fast_paths(False):
        ref = maps_and_grads()
    assert calls == [True] and fast[0][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ref[0] + list(ref[1]), fast[0] + list(fast[1])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * a.abs().max().item())


def test_backbone_amp_dtype_runs_only_the_resnet_in_bf16():
    """Backbone.amp_dtype (train.py --amp bf16-backbone): the ResNet under bf16 autocast, float32 features within
    bf16 rounding of the float32 ones, gradients reaching the trained stages; a whole-model autocast around an
    unset backbone is left as it is (no nested autocast turns it off)."""
    torch.manual_seed(0)
    bb = common.Backbone(18)
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    ref = bb(images, mask)
    bb.amp_dtype = torch.bfloat16
    half = bb(images, mask)
    bb.amp_dtype = None
    with torch.autocast("cpu", torch.bfloat16):
        whole = bb(images, mask)
    for (a, ma), (b, mb) in zip(ref, half):
        assert b.dtype == torch.float32 and torch.equal(ma, mb)
        assert 0 < (a - b).abs().max() <= 0.05 * a.abs().max()  # computed in bf16, returned in float32
    assert all(f.dtype == torch.bfloat16 for f, _ in whole)
    w = bb.body.layer2[0].conv1.weight
    g_ref = torch.autograd.grad(sum(f.sum() for f, _ in ref), w)[0]
    bb.amp_dtype = torch.bfloat16
    g_half = torch.autograd.grad(sum(f.sum() for f, _ in bb(images, mask)), w)[0]
    assert g_half.dtype == torch.float32 and 0 < (g_half - g_ref).abs().max() <= 0.05 * g_ref.abs().max()


def test_deformable_fast_paths_run_in_float32_under_autocast():
    """Under bf16 autocast the autograd fast paths (an autograd Function gets no autocast casts) take their
    inputs in float32: the readable function's float32 result and gradients, as if autocast were off."""
    torch.manual_seed(0)
    shapes = [(6, 8), (3, 4)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8, requires_grad=True)
    locs = (torch.rand(2, 10, 4, 2, 3, 2) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(2, 10, 4, 2, 3).softmax(-1).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        fast = common.ms_deform_attn(value.bfloat16(), shapes, locs, weights)
    ref = common.ms_deform_attn.readable(value.bfloat16().float(), shapes, locs, weights)
    assert type(fast.grad_fn).__name__ == "MSDeformAttnFunctionBackward" and fast.dtype == torch.float32
    assert torch.allclose(fast, ref, atol=1e-6)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (value, locs, weights), g),
                    torch.autograd.grad(ref, (value, locs, weights), g)):
        assert torch.allclose(a, b, atol=2e-2 * b.abs().max().item())  # value's gradient passes its bf16 cast


def test_backbone_last_stage_4_skips_layer4():
    """A model that reads no C5 (SMCA at stride 16) gets C3 and C4, the same maps; layer4 is kept but frozen and
    never run, so its weights still load and DDP finds no parameter without a gradient."""
    torch.manual_seed(0)
    full, short = common.Backbone(18), common.Backbone(18, last_stage=4)
    short.load_state_dict(full.state_dict())
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    ran = []
    short.body.layer4.register_forward_hook(lambda *_: ran.append(True))
    feats = short(images, mask)
    assert len(feats) == 2 and not ran and short.num_channels == [128, 256]
    assert all(torch.equal(a, b) and torch.equal(ma, mb) for (a, ma), (b, mb) in zip(feats, full(images, mask)))
    assert not any(p.requires_grad for p in short.body.layer4.parameters())
    assert all(p.requires_grad for p in short.body.layer3.parameters())
    with pytest.raises(ValueError, match="last_stage must be 4"):
        common.Backbone(18, last_stage=3)
    short.body.conv1.weight.requires_grad_(True)  # a stem that trains gets its gradient (the readable stem runs)
    short(images, mask)[1][0].sum().backward()
    assert short.body.conv1.weight.grad is not None


def test_ms_deform_attn_fast_path_equals_the_reference():
    """The in-place, point-by-point weighted sum gives the level-by-level product's result."""
    torch.manual_seed(0)
    shapes = [(6, 8), (3, 4), (2, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8)
    locs, weights = torch.rand(2, 10, 4, 3, 5, 2) * 1.2 - 0.1, torch.rand(2, 10, 4, 3, 5).softmax(-1)
    with torch.no_grad():
        ref = common.ms_deform_attn.readable(value, shapes, locs, weights)
        fast = common.ms_deform_attn_fast(value, shapes, locs, weights)
        with common.fast_paths(False):
            switched_off = common.ms_deform_attn(value, shapes, locs, weights)
        chosen = common.ms_deform_attn(value, shapes, locs, weights)
    assert torch.allclose(ref, fast, atol=1e-6)
    assert torch.equal(switched_off, ref) and torch.equal(chosen, fast)  # with_fast_path chooses, fast_paths switches


def test_with_fast_path_chooses_by_the_switch_autograd_and_export():
    """The one place of the choice: `.fast` runs outside autograd with fast paths on; `.fast_with_autograd` also under
    autograd; `.fast_with_export` as that, and also while torch.export traces with fast paths off (the program
    holds the twin's ops, not the readable function's)."""
    def make(kind):
        @common.with_fast_path
        def op(x):
            return x + 1

        getattr(op, kind)(lambda x: x + 2)  # the twin: distinguishable, not equal
        return op

    x = torch.zeros(1)
    for kind, grad_fast, export_fast in (("fast", False, False), ("fast_with_autograd", True, False),
                                         ("fast_with_export", True, True)):
        op = make(kind)
        with torch.no_grad():
            assert op(x).item() == 2
            with common.fast_paths(False):
                assert op(x).item() == 1 and op.readable(x).item() == 1
        assert op(x.requires_grad_(True)).item() == (2 if grad_fast else 1)
        x = x.detach()

        class Wrapped(torch.nn.Module):
            def forward(self, t):
                return op(t)

        with torch.no_grad(), common.fast_paths(False):
            program = torch.export.export(Wrapped(), (x,))
        assert program.module()(x).item() == (2 if export_fast else 1)


def test_max_count_is_the_largest_count_as_an_int():
    n = common.max_count(torch.tensor([3, 7, 5]), 10)
    assert n == 7 and isinstance(n, int)


def test_inverse_sigmoid_clamps_numerator_and_denominator_as_deformable_detr():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.5], dtype=torch.float64)
    expected = torch.tensor([math.log(1e-3), math.log(1 / 1e-3), 0.0, math.log(1 / 3), math.log(1 / 1e-3)],
                            dtype=torch.float64)
    assert torch.allclose(common.inverse_sigmoid(x, 1e-3), expected, atol=1e-12)
    assert common.inverse_sigmoid(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(math.log(1e5))


def test_checkpoint_layers_trains_like_the_plain_layers():
    """Activation checkpointing of the encoder layers (train.py --checkpoint-encoder): the same outputs and every
    parameter's gradient in float64, with the sampling recomputed too; outside autograd the layers run as they are."""
    import train
    from tests.helpers import tiny_sparse
    import sparse_detr
    images, pad_mask = torch.randn(2, 3, 96, 128, dtype=torch.float64), torch.zeros(2, 96, 128, dtype=torch.bool)
    pad_mask[1, 64:, :] = True
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = sparse_detr.build(tiny_sparse(sparse_encoder=False, use_enc_aux_loss=False))[0].double().train()
        if checkpointed:
            common.checkpoint_layers(train.encoder_layers(model))
        with common.recompute_sampling(checkpointed):
            out = model(images, pad_mask)
            (out["pred_logits"].sum() + out["pred_boxes"].square().sum()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        with torch.no_grad():
            results[-1][0]["eval"] = model.eval()(images, pad_mask)["pred_logits"]
    (a, ga), (b, gb) = results
    for key in ("pred_logits", "pred_boxes", "eval"):
        assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    assert ga.keys() == gb.keys() and any("encoder" in n for n in ga)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-10, rtol=0) for n in ga)
