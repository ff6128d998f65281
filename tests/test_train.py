"""Tests of train.py: resume, data order, backbone weights, failures, flags, time budget, DDP.
"""
import dataclasses
import importlib
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import data as datalib
import detect
import focus_detr
import lite_detr
import smca
import train
from engine import runtime
from tools import experiments
from tests.helpers import (ROOT, TINY_SET, _train_args, _train_losses, tiny_focus, tiny_lite, tiny_smca, tiny_sparse)


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

def _model_after(out):
    return runtime.load_checkpoint(str(out / "checkpoint.pth"))["model"]


def test_train_resume_matches_uninterrupted_run(tiny_shapes, tmp_path):
    """The same losses and weights, the backbone's included (this run trains it: the optimizer's two groups)."""
    def args(out, *extra):  # on each call: a resume keeps its run's choice to train the backbone or not
        return _train_args(tiny_shapes, out, "--lr-backbone", "1e-5", *extra)
    train.main(args(tmp_path / "a", "--epochs", "2"))  # evaluated after each epoch, as b is
    train.main(args(tmp_path / "b", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and set(ckpt) >= {"model", "optimizer", "scaler", "rng", "config"}
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["backbone", "base"]
    result = train.main(args(tmp_path / "b", "--epochs", "2", "--resume", "auto", "--pictures", "2"))
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert len(a) == 4 and set(a) == set(b)  # 2 epochs x 2 iterations
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    resumed, uninterrupted = _model_after(tmp_path / "b"), _model_after(tmp_path / "a")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    name = "backbone.body.layer4.1.conv2.weight"
    assert not torch.equal(resumed[name], ckpt["model"][name])  # the backbone trained after the resume
    assert set(result["stats"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    pictures = sorted(os.listdir(tmp_path / "b" / "pictures-after-step-4"))  # the run ends with detect.py's pictures
    assert pictures == ["000000.jpg", "000000_explain.png", "000001.jpg", "000001_explain.png", "detections.json"]
    assert not os.path.exists(tmp_path / "a" / "pictures-after-step-4")  # --pictures 0
    assert os.path.exists(tmp_path / "a" / "curves-after-step-4.png")
    saved = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    assert saved["categories"][2] == "circle"
    evaluated = train.main(args(tmp_path / "b", "--eval-only"))  # uses b's checkpoint
    assert evaluated["stats"] == pytest.approx(result["stats"])
    # the same output dir without --resume, or with another config, is refused (nothing overwritten)
    with pytest.raises(ValueError, match="--resume auto"):
        train.main(args(tmp_path / "b", "--epochs", "3"))
    weights_only = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    torch.save({k: weights_only[k] for k in ("model", "model_name", "config")}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"lacks the training state \['optimizer'"):
        train.main(args(tmp_path / "c", "--epochs", "3", "--resume", str(tmp_path / "weights.pth")))
    with pytest.raises(ValueError, match="hidden_dim: checkpoint 32 vs now 64"):
        train.main(args(tmp_path / "b", "--epochs", "3", "--resume", "auto") + ["hidden_dim=64"])


def test_train_stores_the_best_f1_threshold_and_draws_above_it(tiny_shapes, tmp_path, capsys):
    """Each evaluation chooses the score threshold of the best F1 on val: it is in the checkpoint, the eval record and
    the closing pictures, and an --eval-only of the same weights chooses the same (and draws above it, in a folder of
    its own, only when --pictures asks it to)."""
    result = train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--pictures", "3"))
    chosen = result["threshold"]
    assert chosen["images"] == 3 and chosen["steps"] == 2 and "IoU >= 0.5" in chosen["how"]
    assert 0.05 <= chosen["value"] <= 0.95 and 0 <= chosen["f1"] <= 1
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["threshold"] == chosen
    with open(tmp_path / "log.jsonl") as f:
        assert [r for r in map(json.loads, f) if r["type"] == "eval"][-1]["threshold"] == chosen
    with open(tmp_path / "pictures-after-step-2" / "detections.json") as f:
        drawn = json.load(f)
    assert all(r["score"] >= chosen["value"] - 1e-5 for r in drawn)  # none, where 2 steps give no F1 above 0
    said = capsys.readouterr().out
    assert f"detections (score >= {chosen['value']:g}, the best F1 on val, {chosen['f1']:.2f})" in said
    assert train.main(_train_args(tiny_shapes, tmp_path, "--eval-only"))["threshold"]["value"] == chosen["value"]
    before = sorted(os.listdir(tmp_path))
    without = _train_args(tiny_shapes, tmp_path, "--eval-only")
    i = without.index("--pictures")
    train.main(without[:i] + without[i + 2:])  # --eval-only draws nothing unless asked: only the log grows
    assert sorted(os.listdir(tmp_path)) == before
    capsys.readouterr()
    train.main(_train_args(tiny_shapes, tmp_path, "--eval-only", "--pictures", "1"))  # asked: its own folder
    drawn = tmp_path / "eval-pictures-checkpoint-after-step-2"
    assert sorted(os.listdir(drawn)) == ["000000.jpg", "000000_explain.png", "detections.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(before + [drawn.name])
    assert f"detections (score >= {chosen['value']:g}, the best F1 on val" in capsys.readouterr().out
    with pytest.raises(ValueError, match="eval-pictures-checkpoint-after-step-2 exists; nothing is overwritten"):
        train.main(_train_args(tiny_shapes, tmp_path, "--eval-only", "--pictures", "1"))
    authors = train.parse_args(["--model", "focus_detr", "--eval-only", "--official", "/w/focus_detr_r50_36ep.pth",
                                "--output-dir", str(tmp_path)])  # the authors' weights: named by their file alone
    assert train.eval_pictures_dir(authors, None, 0) == str(tmp_path / "eval-pictures-focus_detr_r50_36ep")


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
    with pytest.raises(ValueError, match="does not exist"):
        train.backbone_weights(str(tmp_path / "absent.pth"))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"'.*notes.pth' is not a torch file \("):
        train.backbone_weights(str(tmp_path / "notes.pth"))


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
    with pytest.raises(ValueError, match=r"--save-every must be a number of steps \(0: no saves within an epoch\), "
                                         r"got -1"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--save-every", "-1"))
    with pytest.raises(ValueError, match="--pictures must be a number of val images, 0 or more, got -1"):
        train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--pictures", "-1"))


def test_train_set_parses_tuples_and_rejects_bad_ones():
    cfg = train.apply_overrides(focus_detr.Config(), ["cascade_ratios=1,0.5,0.5,0.5,0.25,0.25"])
    assert cfg.cascade_ratios == (1.0, 0.5, 0.5, 0.5, 0.25, 0.25)
    with pytest.raises(ValueError, match="expected a tuple"):
        train.apply_overrides(focus_detr.Config(), ["cascade_ratios=1,half"])


def test_train_lr_backbone_zero_freezes_the_backbone(tiny_shapes, tmp_path):
    """DETR's convention: --lr-backbone 0 trains no backbone parameter; the rest trains, and steps are counted. A
    run with --lr-backbone > 0 from the same initial weights moves the backbone in its first step."""
    def backbone(out):
        return {k: v for k, v in runtime.load_checkpoint(str(out / "checkpoint.pth"))["model"].items()
                if k.startswith("backbone.")}
    frozen = tmp_path / "frozen"
    train.main(_train_args(tiny_shapes, frozen, "--epochs", "1", "--lr-backbone", "0"))
    ckpt = torch.load(frozen / "checkpoint.pth", weights_only=False)
    assert {g["name"] for g in ckpt["optimizer"]["param_groups"]} == {"base"}
    assert ckpt["steps"] == 2  # 8 train images, batch 4
    with open(frozen / "log.jsonl") as f:
        assert [r["steps"] for r in map(json.loads, f) if r["type"] == "eval"] == [2]
    before = backbone(frozen)
    train.main(_train_args(tiny_shapes, frozen, "--epochs", "2", "--resume", "auto"))
    assert all(torch.equal(v, before[k]) for k, v in backbone(frozen).items())
    train.main(_train_args(tiny_shapes, tmp_path / "trained", "--max-steps", "1", "--lr-backbone", "1e-5"))
    ckpt = torch.load(tmp_path / "trained" / "checkpoint.pth", weights_only=False)
    assert {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}["backbone"] == 1e-5
    name = "backbone.body.layer4.1.conv2.weight"
    assert not torch.equal(backbone(tmp_path / "trained")[name], before[name])


def test_train_time_budget_stops_saves_and_evaluates(tiny_shapes, tmp_path):
    """--time-budget: training stops at the first iteration past the budget, the partial epoch is saved
    and evaluated (with the training seconds logged); a resume trains no further."""
    with pytest.raises(ValueError, match="--time-budget must be a positive"):
        train.main(_train_args(tiny_shapes, tmp_path / "x", "--epochs", "1", "--time-budget", "0"))
    result = train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "3", "--time-budget", "1e-7"))
    assert set(result["stats"]) >= {"AP", "AP50"}
    assert len(_train_losses(tmp_path / "b")) == 1  # 1 of the epoch's 2 iterations
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["epoch_fraction"] == 0.5 and ckpt["train_s"] > 0
    with open(tmp_path / "b" / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["epoch_fraction"] == 0.5 and "infer_ms_per_image" not in evals[0]
    assert evals[0]["train_s"] == pytest.approx(ckpt["train_s"])
    train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "3", "--time-budget", "1e-7", "--resume", "auto"))
    assert len(_train_losses(tmp_path / "b")) == 1  # the budget is spent: nothing more trained


def test_train_max_steps_stops_saves_evaluates_and_holds_over_a_resume(tiny_shapes, tmp_path):
    """--max-steps N: training stops after N optimizer steps, across epochs and resumes; the partial epoch is
    saved and evaluated; a resume with the same N trains no further."""
    with pytest.raises(ValueError, match="--max-steps must be a positive"):
        train.main(_train_args(tiny_shapes, tmp_path / "x", "--epochs", "1", "--max-steps", "0"))
    train.main(_train_args(tiny_shapes, tmp_path / "m", "--epochs", "3", "--max-steps", "3"))
    assert len(_train_losses(tmp_path / "m")) == 3  # epoch 1 (2 iterations), then 1 of epoch 2's
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["epoch_fraction"] == 0.5 and ckpt["steps"] == 3
    with open(tmp_path / "m" / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["type"] == "eval"]
    assert [(e["epoch"], e["steps"]) for e in evals] == [(0, 2), (1, 3)]
    train.main(_train_args(tiny_shapes, tmp_path / "m", "--epochs", "3", "--max-steps", "3", "--resume", "auto"))
    assert len(_train_losses(tmp_path / "m")) == 3
    train.main(_train_args(tiny_shapes, tmp_path / "e", "--epochs", "3", "--eval-every", "5", "--max-steps", "2"))
    with open(tmp_path / "e" / "log.jsonl") as f:  # N at an epoch's end: evaluated there all the same
        assert [r["steps"] for r in map(json.loads, f) if r["type"] == "eval"] == [2]


def test_train_ddp_two_processes(tiny_shapes, tmp_path):
    """Two processes, two batches accumulated per step (DDP synchronising in the second): rank 0 decides the resume
    and every rank loads its checkpoint; the ranks' parameters stay equal (checked at every checkpoint); COCOeval
    runs once."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for epochs, resume in (("1", ["--accum-steps", "2"]), ("2", ["--resume", "auto"])):  # accumulation kept
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "train.py"),
               *_train_args(tiny_shapes, out, "--epochs", epochs, "--batch-size", "2", *resume)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "2 process(es)" in proc.stdout and proc.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | "
                                                                    "area=   all") == 1
    assert "resumed after epoch 1 of 2" in proc.stdout
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert sum(r["type"] == "train" for r in records) == 2  # 8 images / 2 ranks / batch 2 / 2 accumulated, 2 epochs
    sums = [r["param_sums"] for r in records if r["type"] == "checkpoint"]
    assert len(sums) == 2 and all(len(s) == 2 and s[0] == s[1] for s in sums)
    assert sum(r["type"] == "eval" for r in records) == 2


def test_train_bf16_backbone_fused_optimizer_and_resume(tiny_shapes, tmp_path):
    """--amp bf16-backbone runs the ResNet in bf16 (losses near float32's, not equal; its gradients in bf16:
    tests/test_common.py); the optimizer is fused AdamW; a resume keeps the checkpoint's --amp unless the flag says
    otherwise."""
    train.main(_train_args(tiny_shapes, tmp_path / "bf16", "--epochs", "1", "--amp", "bf16-backbone"))
    train.main(_train_args(tiny_shapes, tmp_path / "fp32", "--epochs", "1"))
    half, full = _train_losses(tmp_path / "bf16"), _train_losses(tmp_path / "fp32")
    assert set(half) == set(full) and half != full
    assert all(half[k] == pytest.approx(full[k], rel=0.05) for k in full)
    ckpt = torch.load(tmp_path / "bf16" / "checkpoint.pth", weights_only=False)
    assert all(g["fused"] for g in ckpt["optimizer"]["param_groups"]) and ckpt["args"]["amp"] == "bf16-backbone"
    train.main(_train_args(tiny_shapes, tmp_path / "bf16", "--epochs", "2", "--resume", "auto"))
    assert torch.load(tmp_path / "bf16" / "checkpoint.pth", weights_only=False)["args"]["amp"] == "bf16-backbone"
    train.main(_train_args(tiny_shapes, tmp_path / "bf16", "--epochs", "3", "--resume", "auto", "--amp", "off"))
    assert torch.load(tmp_path / "bf16" / "checkpoint.pth", weights_only=False)["args"]["amp"] == "off"
    train.main(_train_args(tiny_shapes, tmp_path / "fp32", "--eval-only"))  # evaluation takes any --amp


def test_train_recipe_amp_holds_only_where_the_cpu_has_amx(monkeypatch):
    """SMCA's shapes recipe says bf16-backbone: train.py takes it on a CPU with AMX, float32 on one without or on
    CUDA, not on COCO (SMCA's COCO recipe is the paper's float32) and never over an explicit --amp."""
    def resolved(*flags, data="shapes"):
        args = train.parse_args(["--model", "smca", "--data", data, "--device", "cpu", *flags])
        train.resolve_recipe(args, smca, data == "shapes")
        return args.amp, args.epochs
    monkeypatch.setattr(train, "cpu_has_amx", lambda: True)
    assert resolved() == ("bf16-backbone", 4) and resolved("--amp", "off") == ("off", 4)
    assert resolved(data="coco")[0] == "off"
    monkeypatch.setattr(train, "select_device", lambda args: torch.device("cuda"))
    assert resolved()[0] == "off"
    monkeypatch.undo()
    monkeypatch.setattr(train, "cpu_has_amx", lambda: False)
    assert resolved() == ("off", 4) and resolved("--amp", "bf16-backbone")[0] == "bf16-backbone"
    assert train.parse_args(["--model", "focus_detr"]).amp is None
    args = train.parse_args(["--model", "focus_detr", "--device", "cpu"])
    train.resolve_recipe(args, focus_detr, True)
    assert args.amp == "off"  # its recipe keeps float32


def test_train_recipe_recomputes_the_sampling_and_checkpoints_the_encoder_at_coco_scale_only(tiny_shapes, tmp_path):
    def resolved(*flags, data="shapes"):
        args = train.parse_args(["--model", "lite_detr", "--data", data, "--device", "cpu", *flags])
        train.resolve_recipe(args, lite_detr, data == "shapes")
        return args.recompute_sampling, args.checkpoint_encoder
    assert resolved() == ("off", "off") and resolved(data="coco") == ("on", "on")
    assert resolved("--recompute-sampling", "on") == ("on", "off")
    assert resolved("--recompute-sampling", "off", "--checkpoint-encoder", "off", data="coco") == ("off", "off")
    runs = [train.main(_train_args(tiny_shapes, tmp_path / name, "--model", "sparse_detr", "--set", "rho=0.5",
                                   "--epochs", "1", *flags))
            for name, flags in (("plain", ()), ("both", ("--recompute-sampling", "on", "--checkpoint-encoder", "on")))]
    # the same run (a deformable encoder: both switches bite), computed with less memory
    assert _train_losses(tmp_path / "plain") == pytest.approx(_train_losses(tmp_path / "both"), rel=1e-6)
    assert runs[0]["stats"]["AP"] == pytest.approx(runs[1]["stats"]["AP"], abs=1e-6)


def test_train_encoder_layers_finds_every_model_s_encoder_layers_once():
    """--checkpoint-encoder wraps these: each encoder layer, once (a shared one too), never a sub-module."""
    from tests.helpers import tiny_focus, tiny_lite, tiny_sparse
    import sparse_detr
    for model, names in [(smca.build(tiny_smca())[0], {"EncoderLayer"}),
                         (smca.build(tiny_smca(multiscale=True))[0], {"EncoderLayer"}),
                         (smca.build(tiny_smca(multiscale=True, intra_share=False))[0], {"EncoderLayer"}),
                         (sparse_detr.build(tiny_sparse())[0], {"DeformableEncoderLayer"}),
                         (lite_detr.build(tiny_lite())[0], {"LiteEncoderLayer"}),
                         (focus_detr.build(tiny_focus())[0], {"DualAttentionEncoderLayer"})]:
        layers = train.encoder_layers(model)
        assert {type(layer).__name__ for layer in layers} == names
        assert len({id(layer) for layer in layers}) == len(layers) == len({id(m) for m in model.encoder.modules()
                                                                           if type(m).__name__ in names})


# ---------------------------------------------------------------------------------------------
# the COCO run: accumulation, resume, recipes, files, traps, data, DDP
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smca", "sparse_detr", "lite_detr", "focus_detr"])
def test_train_accumulated_steps_give_the_gradients_of_one_large_batch(name):
    """--accum-steps K: K batches of B images give the gradients of one batch of K x B (same-size images, so no
    padding differs; frozen BatchNorm, no dropout, no denoising noise: nothing else depends on the grouping)."""
    module = {"smca": smca, "sparse_detr": importlib.import_module("sparse_detr"), "lite_detr": lite_detr,
              "focus_detr": focus_detr}[name]
    tiny = {"smca": tiny_smca, "sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    extra = {"dn_number": 0} if name == "focus_detr" else {}
    cfg = tiny(backbone_norm="frozen_bn", dropout=0.0, **extra)
    torch.manual_seed(0)
    model, criterion, _ = module.build(cfg)
    model.double().train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    pad_mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.randint(1, 21, (n,), generator=g), "image_id": i, "size": torch.tensor([64, 64]),
                "boxes": (torch.rand(n, 4, generator=g) * 0.4 + 0.3).double()} for i, n in enumerate((1, 3, 2, 4))]
    run = train.Run(model, criterion, None, None, torch.amp.GradScaler("cpu", enabled=False), None,
                    torch.device("cpu"), 0, 1, None, {})

    def grads(batches):
        model.zero_grad(set_to_none=True)
        loss, _, finite = train.accumulated_loss(run, batches)
        assert finite
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    one_loss, one = grads([(images, pad_mask, targets)])
    two_loss, two = grads([(images[:2], pad_mask[:2], targets[:2]), (images[2:], pad_mask[2:], targets[2:])])
    assert criterion.accumulated_boxes is None  # put back after the step
    assert two_loss == pytest.approx(one_loss, rel=1e-6) and set(one) == set(two)
    for n in one:  # within rounding: parts of the models compute in float32 (the sampling matrices, the losses)
        assert (one[n] - two[n]).abs().max() <= 1e-6 * one[n].abs().max() + 1e-12, n
    _, halves = grads([(images[:2], pad_mask[:2], targets[:2])])  # a batch of its own differs (4 boxes, not 5)
    assert max(((halves[n] - one[n]).abs().max() / one[n].abs().max()).item() for n in one if one[n].any()) > 1e-2


def _log(out, kind=None):
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for line in f]
    return [r for r in records if kind is None or r["type"] == kind]


def test_train_resume_applies_the_flags_given_names_them_and_keeps_the_others(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(_train_args(tiny_shapes, out, "--epochs", "1", "--weight-decay", "0.001", "--clip-max-norm", "0.5"))
    assert os.path.exists(out / "recipe.json") and "total batch 4 = 1 process(es) x 4 images" in capsys.readouterr().out
    train.main(_train_args(tiny_shapes, out, "--epochs", "3", "--resume", "auto", "--lr", "2e-4", "--lr-drop", "2",
                           "--batch-size", "2", "--accum-steps", "2"))
    said = capsys.readouterr().out
    assert "resumed after epoch 1 of 3" in said
    for change in ("epochs 1 -> 3", "lr 0.0001 -> 0.0002", "lr-drop 100 -> 2", "batch-size 4 -> 2",
                   "accum-steps 1 -> 2"):
        assert change in said
    assert "weight-decay" not in said and "total batch 4 ->" not in said  # 2 x 2 = 4 as before
    lrs = {r["epoch"]: r["lr_base"] for r in _log(out, "train")}
    assert lrs == {0: pytest.approx(1e-4), 1: pytest.approx(2e-4), 2: pytest.approx(2e-5)}
    ckpt = runtime.load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["args"]["weight_decay"] == 0.001 and ckpt["args"]["clip_max_norm"] == 0.5  # not given: kept
    assert {g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]} == {0.001}
    assert os.path.exists(out / "checkpoint_before_lr_drop.pth") and os.path.exists(out / "checkpoint_best.pth")
    assert runtime.load_checkpoint(str(out / "checkpoint_before_lr_drop.pth"))["epoch"] == 1
    assert any(f.startswith("curves-after-step-") for f in os.listdir(out))
    assert _log(out, "start")[-1]["resumed_changes"][0] == "epochs 1 -> 3"
    with pytest.raises(ValueError, match="freezing or unfreezing the backbone cannot change under a run"):
        train.main(_train_args(tiny_shapes, out, "--epochs", "4", "--resume", "auto", "--lr-backbone", "1e-5"))
    train.main(_train_args(tiny_shapes, out, "--epochs", "4", "--resume", "auto", "--batch-size", "4",
                           "--weight-decay", "0.002", "--seed", "7", "--amp", "fp16"))
    said = capsys.readouterr().out
    assert "total batch 4 -> 8 (the lr is not rescaled" in said  # 4 x 2 accumulated, kept
    for change in ("weight-decay 0.001 -> 0.002", "seed 42 -> 7", "amp off -> fp16"):
        assert change in said
    ckpt = runtime.load_checkpoint(str(out / "checkpoint.pth"))
    assert {g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]} == {0.002} and ckpt["scaler"]  # fp16's


def test_train_a_redone_epoch_is_logged_once_and_the_interrupted_records_kept(tiny_shapes, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "log.jsonl").write_text('{"type": "train", "epoch": 0, "iter": 0, "loss": 3.0}\n{"type": "tr')  # killed
    train.main(_train_args(tiny_shapes, out, "--epochs", "1"))  # in epoch 0, before its checkpoint, mid-line
    assert [(r["epoch"], r["iter"]) for r in _log(out, "train")] == [(0, 0), (0, 1)]
    shutil.copy(out / "checkpoint.pth", tmp_path / "after-epoch-1.pth")
    train.main(_train_args(tiny_shapes, out, "--epochs", "2", "--resume", "auto"))
    shutil.copy(tmp_path / "after-epoch-1.pth", out / "checkpoint.pth")  # as if killed before epoch 2's save
    train.main(_train_args(tiny_shapes, out, "--epochs", "2", "--resume", "auto"))
    steps = [(r["epoch"], r["iter"]) for r in _log(out, "train")]
    assert sorted(steps) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # each once
    with open(out / "log-redone.jsonl") as f:
        lines = f.read().splitlines()
    assert lines[1] == '{"type": "tr'
    redone = [json.loads(line) for i, line in enumerate(lines) if i != 1]
    assert {(r["type"], r["epoch"]) for r in redone[:1]} == {("train", 0)}  # the first attempt's (the cut line too)
    assert {(r["type"], r["epoch"]) for r in redone[1:]} == {("train", 1), ("checkpoint", 1), ("eval", 1)}


INTERRUPTED = ("--epochs", "2", "--batch-size", "2", "--eval-every", "1")  # 4 steps an epoch


@pytest.fixture(scope="module")
def uninterrupted(tiny_shapes, tmp_path_factory):
    """The run the interrupted ones are compared with: INTERRUPTED's 2 epochs in one go -> its folder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.main(_train_args(tiny_shapes, out, *INTERRUPTED))
    return out


def test_train_saves_within_an_epoch_and_resumes_there_as_if_uninterrupted(tiny_shapes, uninterrupted, tmp_path,
                                                                          monkeypatch):
    """--save-every 3 (4 steps an epoch, 2 epochs): a run killed in step 4 left the state after step 3, resumed and
    killed in step 8 the state after step 6 (epoch 2, its step 2); --resume auto trains steps 7 and 8 again: every
    loss, evaluation and weight as a run never interrupted, each step once in log.jsonl (the killed attempt's step 7
    moved to log-redone.jsonl), each epoch's time over its parts. Resuming it with another batch layout or seed (other
    images for the epoch's remaining steps) is refused."""
    args = INTERRUPTED
    step = train.optimizer_step

    def killed_in_step(k):
        def optimizer_step(run):
            if run.steps == k:
                raise RuntimeError("killed")
            return step(run)
        return optimizer_step
    monkeypatch.setattr(train, "optimizer_step", killed_in_step(4))
    with pytest.raises(RuntimeError, match="killed"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", *args, "--save-every", "3"))
    saved = runtime.load_checkpoint(str(tmp_path / "b" / "checkpoint.pth"))
    assert (saved["epoch"], saved["next_iter"], saved["epoch_s"] > 0) == (0, 3, True)
    saved["epoch_s"] = 1000.0  # as if its first steps had taken that long: the epoch's time counts them
    torch.save(saved, tmp_path / "b" / "checkpoint.pth")
    monkeypatch.setattr(train, "optimizer_step", killed_in_step(8))
    began = time.time()
    with pytest.raises(RuntimeError, match="killed"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", *args, "--resume", "auto"))
    assert 1000 < experiments.evals(str(tmp_path / "b"))[0]["epoch_time_s"] < 1000 + time.time() - began
    monkeypatch.setattr(train, "optimizer_step", step)
    saved = runtime.load_checkpoint(str(tmp_path / "b" / "checkpoint.pth"))
    assert (saved["epoch"], saved["next_iter"], saved["steps"], saved["epoch_fraction"]) == (1, 2, 6, 0.5)
    assert 0 < saved["epoch_s"] < time.time() - began  # epoch 2's own seconds
    assert [(r["epoch"], r["iter"]) for r in _log(tmp_path / "b", "checkpoint_within_epoch")] == [(0, 2), (1, 1)]
    train.main(_train_args(tiny_shapes, tmp_path / "b", *args, "--eval-only"))  # not an epoch's evaluation
    assert [(r["epoch"], r.get("iter"), r["steps"]) for r in _log(tmp_path / "b", "eval")] == [(0, None, 4), (1, 1, 6)]
    assert set(experiments.evals(str(tmp_path / "b"))) == {0}
    with pytest.raises(ValueError, match=r"saved within epoch 2, after 2 of its steps: .* needs the same "
                                         r"--batch-size \(2 -> 4\), --seed \(42 -> 7\): resume with those"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", *args, "--resume", "auto", "--batch-size", "4",
                               "--seed", "7"))
    saved["epoch_s"] = 1000.0
    torch.save(saved, tmp_path / "b" / "checkpoint.pth")
    began = time.time()
    train.main(_train_args(tiny_shapes, tmp_path / "b", *args, "--resume", "auto"))
    assert _log(tmp_path / "b", "start")[-1]["args"]["save_every"] == 3  # kept, not given again
    assert 1000 < experiments.evals(str(tmp_path / "b"))[1]["epoch_time_s"] < 1000 + time.time() - began
    assert set(experiments.evals(str(tmp_path / "b"))) == {0, 1}
    a, b = _train_losses(uninterrupted), _train_losses(tmp_path / "b")
    assert len(a) == 8 and len(_log(tmp_path / "b", "train")) == 8
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    assert [e["AP"] for e in experiments.evals(str(tmp_path / "b")).values()] == pytest.approx(
        [e["AP"] for e in _log(uninterrupted, "eval")])
    resumed = _model_after(tmp_path / "b")
    for name, value in _model_after(uninterrupted).items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    with open(tmp_path / "b" / "log-redone.jsonl") as f:
        assert [(r["type"], r["epoch"], r["iter"]) for r in map(json.loads, f)] == [("train", 1, 2)]


def test_train_sigterm_saves_the_step_stops_and_resumes_as_if_uninterrupted(tiny_shapes, uninterrupted, tmp_path,
                                                                             monkeypatch, capsys):
    """A SIGTERM in the epoch's last step (4 of 4): the run saves after it, before the epoch's save and evaluation,
    and exits with status 143; the resumed run does them first, even with its --max-steps spent, and goes on with the
    uninterrupted run's losses and evaluations. The SIGTERM handler before the run is back after it. (A SIGTERM within
    an epoch saves as --save-every does, whose resume the test above checks.)"""
    step, handler = train.optimizer_step, signal.getsignal(signal.SIGTERM)

    def terminated(run):
        if run.steps == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run)
    monkeypatch.setattr(train, "optimizer_step", terminated)
    with pytest.raises(SystemExit) as stopped:
        train.main(_train_args(tiny_shapes, tmp_path, *INTERRUPTED))
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler
    monkeypatch.setattr(train, "optimizer_step", step)
    saved = runtime.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert (saved["epoch"], saved["next_iter"], saved["steps"]) == (0, 4, 4) and not _log(tmp_path, "eval")
    assert "stopped by SIGTERM in epoch 1 after its step 4 of 4" in capsys.readouterr().out
    train.main(_train_args(tiny_shapes, tmp_path, *INTERRUPTED, "--resume", "auto", "--max-steps", "4"))
    assert "resumed in epoch 1 of 2 after 4 of its steps (4 in all)" in capsys.readouterr().out
    assert [(e["epoch"], e["steps"]) for e in _log(tmp_path, "eval")] == [(0, 4)]  # nothing more trained
    train.main(_train_args(tiny_shapes, tmp_path, *INTERRUPTED, "--resume", "auto"))
    a, b = _train_losses(uninterrupted), _train_losses(tmp_path)
    assert len(_log(tmp_path, "train")) == 8 and all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6) for k in a)
    assert [e["AP"] for e in _log(tmp_path, "eval")] == pytest.approx([e["AP"] for e in _log(uninterrupted, "eval")])


def test_train_sigterm_to_every_process_with_loader_workers_saves_and_exits_143(tiny_shapes, tmp_path):
    """torchrun and schedulers send the SIGTERM to the whole process group, loader workers included: the workers
    ignore it (torch's handler would end them and fail the step), the training process saves and stops."""
    out = tmp_path / "w"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *_train_args(tiny_shapes, out, "--epochs", "2", "--batch-size", "1", "--num-workers", "2",
                        "--log-every", "0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if "it 1/8" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    said.append(proc.communicate(timeout=120)[0])
    assert proc.returncode == 143, "".join(said)[-3000:]
    assert "stopped by SIGTERM in epoch 1 after its step" in "".join(said)
    assert runtime.load_checkpoint(str(out / "checkpoint.pth"))["next_iter"] >= 1


def _worker_ignoring_sigterm(ready):
    train.ignore_sigterm(0)
    ready.set()
    time.sleep(60)


def test_train_loader_workers_ignore_a_sigterm_from_another_process_not_from_their_own():
    """ignore_sigterm (a loader worker's start): a SIGTERM from another process (torchrun's, a scheduler's) leaves
    the worker running; one from the process that started it (torch ending a worker) ends it, as torch's does."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_worker_ignoring_sigterm, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(30)
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # from another process
    worker.join(1.0)
    assert worker.is_alive()
    os.kill(worker.pid, signal.SIGTERM)  # from its parent
    worker.join(10.0)
    assert worker.exitcode == 0


def test_train_refuses_what_would_evaluate_nothing_or_overwrite_a_run(tiny_shapes, tmp_path):
    with pytest.raises(ValueError, match="--eval-only --resume auto: nothing to evaluate"):
        train.main(_train_args(tiny_shapes, tmp_path / "none", "--eval-only", "--resume", "auto"))
    train.main(_train_args(tiny_shapes, tmp_path / "a", "--epochs", "1"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another run's folder
    before = (tmp_path / "b" / "checkpoint.pth").read_bytes()
    with pytest.raises(ValueError, match="exists and would be overwritten by the run continued from"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "2", "--resume",
                               str(tmp_path / "a" / "checkpoint.pth")))
    assert (tmp_path / "b" / "checkpoint.pth").read_bytes() == before
    train.main(_train_args(tiny_shapes, tmp_path / "b", "--eval-only", "--resume",
                           str(tmp_path / "a" / "checkpoint.pth")))  # evaluating another run's checkpoint writes none
    os.remove(tmp_path / "b" / "checkpoint.pth")  # its best and its log are still there
    with pytest.raises(ValueError, match="holds checkpoint_best.pth of another run"):
        train.main(_train_args(tiny_shapes, tmp_path / "b", "--epochs", "1"))


class _WritesAFile:
    """Unpickling this runs os.system: what a malicious checkpoint does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_train_and_detect_never_run_code_from_a_checkpoint(tiny_shapes, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}, "config": {}, "model_name": "smca", "payload": _WritesAFile(marker)}, bad)
    for load in (lambda: runtime.load_checkpoint(str(bad)), lambda: detect.load_detector(str(bad)),
                 lambda: train.main(_train_args(tiny_shapes, tmp_path / "r", "--epochs", "1", "--resume", str(bad))),
                 lambda: train.main(_train_args(tiny_shapes, tmp_path / "f", "--epochs", "1", "--finetune", str(bad)))):
        with pytest.raises(ValueError, match="could run code|not a readable"):  # read_state_dict: not a state dict
            load()
        assert not marker.exists()
    with pytest.raises(ValueError, match=r"GLOBAL posix.system .*If you trust the file, re-save what a checkpoint"):
        runtime.load_checkpoint(str(bad))


def test_train_checkpoints_load_with_weights_only_and_restore_every_rng(tiny_shapes, tmp_path):
    train.main(_train_args(tiny_shapes, tmp_path, "--epochs", "1"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # plain types and tensors only
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"} and ckpt["rng"]["cuda"] is None  # (a CPU run)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = {"python": random.getstate(), "numpy": train.numpy_state(), "torch": [torch.get_rng_state()]}
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    train.restore_rng(torch.load(io.BytesIO(_saved(state)), weights_only=True), 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_train_log_is_json_when_a_class_has_no_ground_truth(tiny_shapes, tmp_path):
    assert train.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": 2}) == {"a": None, "b": [1.0, None],
                                                                                      "c": 2}
    root = _tiny_set_copy(tiny_shapes, tmp_path)
    ann = root / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    coco["categories"].append({"id": 30, "name": "hexagon"})  # a declared class without a single box
    ann.write_text(json.dumps(coco))
    val = datalib.CocoDetection(*datalib.find_split(str(root), "val"))
    evaluator = datalib.CocoEvaluator(val.coco)
    evaluator.update({i: {"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2]),
                          "scores": torch.tensor([0.9])} for i in val.ids})
    per_class = evaluator.summarize(val.categories)["per_class"]
    assert math.isnan(per_class[30])  # COCOeval's AP for a class without ground truth
    run = train.Run(*[None] * 11, log_file=io.StringIO())
    run.log({"type": "eval", "per_class": {str(k): v for k, v in per_class.items()}})
    logged = json.loads(run.log_file.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in the log"))
    assert logged["per_class"]["30"] is None and logged["per_class"]["2"] is not None


def test_train_backbone_weights_that_do_not_fit_are_not_called_a_failed_download(tiny_shapes, tmp_path):
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="backbone weights") as err:
        train.main(_train_args(tiny_shapes, tmp_path / "r", "--epochs", "1")[:-len(TINY_SET)]
                   + ["--backbone-weights", str(tmp_path / "wrong.pth")] + TINY_SET)
    assert "download" not in str(err.value)


COCO_RECIPES = {  # each paper's or official config's figures (the model files cite the source of each)
    "smca": {"epochs": 50, "lr_drop": 40, "lr": 1e-4, "lr_backbone": 1e-5, "batch_size": 2, "total_batch": 16,
             "weight_decay": 1e-4, "clip_max_norm": 0.1},
    "sparse_detr": {"epochs": 50, "lr_drop": 40, "lr": 2e-4, "lr_backbone": 2e-5, "batch_size": 2, "total_batch": 16,
                    "weight_decay": 1e-4, "clip_max_norm": 0.1},
    "lite_detr": {"epochs": 50, "lr_drop": 40, "lr": 2e-4, "lr_backbone": 2e-5, "batch_size": 2, "total_batch": 32,
                  "weight_decay": 1e-4, "clip_max_norm": 0.1},
    "focus_detr": {"epochs": 36, "lr_drop": 20, "lr": 1e-4, "lr_backbone": 1e-5, "batch_size": 2, "total_batch": 16,
                   "weight_decay": 1e-4, "clip_max_norm": 0.1, "weight_decay_norm": 0.0},
}


@pytest.mark.parametrize("name", sorted(COCO_RECIPES))
def test_train_coco_recipe_is_the_papers(name):
    args = train.parse_args(["--model", name, "--data", "coco", "--device", "cpu"])
    recipe = train.resolve_recipe(args, importlib.import_module(name), False)
    assert {k: recipe[k] for k in COCO_RECIPES[name]} == COCO_RECIPES[name]
    assert (args.epochs, args.lr_drop, args.lr, args.batch_size) == tuple(
        COCO_RECIPES[name][k] for k in ("epochs", "lr_drop", "lr", "batch_size"))
    assert args.accum_steps == 1 and args.recompute_sampling == "on"


def test_train_focus_detr_schedules_by_name(tiny_shapes):
    def resolved(*flags, data="coco"):
        args = train.parse_args(["--model", "focus_detr", "--data", data, "--device", "cpu", *flags])
        return args, train.resolve_recipe(args, focus_detr, data == "shapes")
    args, recipe = resolved()
    assert (args.schedule, args.epochs, args.lr_drop, recipe["config"]["pos_temperature"]) == ("36ep", 36, 20, 20.0)
    args, recipe = resolved("--schedule", "12ep")
    assert (args.epochs, args.lr_drop, recipe["config"]) == (12, 11, {"pos_temperature": 10000.0, "pos_offset": -0.5})
    args, _ = resolved("--schedule", "24ep", "--epochs", "30")
    assert (args.epochs, args.lr_drop) == (30, 20)  # a flag wins over the schedule
    with pytest.raises(ValueError, match="its schedules are 36ep, 24ep, 12ep"):
        resolved("--schedule", "50ep")
    with pytest.raises(ValueError, match="--schedule names one of a paper's COCO schedules"):
        resolved("--schedule", "12ep", data="shapes")
    with pytest.raises(ValueError, match="it has one schedule"):
        train.resolve_recipe(train.parse_args(["--model", "smca", "--schedule", "12ep", "--data", "x"]), smca, False)


def test_train_weight_decay_norm_spares_the_normalisation_layers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    model.backbone = torch.nn.Linear(2, 2)
    groups = {g["name"]: g for g in train.param_groups(model, 1e-4, 1e-5, {}, 1e-4, 0.0)}
    assert groups["base"]["weight_decay"] == 1e-4 and groups["base_norm"]["weight_decay"] == 0.0
    assert len(groups["base_norm"]["params"]) == 2 and groups["backbone"]["lr"] == 1e-5


def _tiny_set_copy(tiny_shapes, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(tiny_shapes, root)
    return root


def test_train_reports_images_whose_size_disagrees_with_their_annotation(tiny_shapes, tmp_path, caplog):
    root = _tiny_set_copy(tiny_shapes, tmp_path)
    ann = root / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    first = coco["images"][0]
    first["width"], first["height"] = first["height"] + 7, first["width"]  # exported turned, say
    ann.write_text(json.dumps(coco))
    ds = datalib.CocoDetection(*datalib.find_split(str(root), "train"))
    assert len(ds.size_mismatches) == 1 and f"id {first['id']} " in ds.size_mismatches[0]
    assert "not the size their annotation says" in caplog.text
    w, h = ds.sizes[first["id"]]
    boxes = ds.targets[first["id"]][0]
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()  # clipped to the file's pixels


def test_train_skips_an_image_that_cannot_be_decoded_and_stops_past_the_limit(tiny_shapes, tmp_path, capsys):
    root = _tiny_set_copy(tiny_shapes, tmp_path)
    ds = datalib.CocoDetection(*datalib.find_split(str(root), "train"))
    path = root / "train" / ds.coco.imgs[ds.ids[1]]["file_name"]
    path.write_bytes(path.read_bytes()[:300])  # truncated after the header
    train.main(_train_args(str(root), tmp_path / "ok", "--epochs", "1"))
    said = capsys.readouterr().out
    assert f"warning: skipped image id {ds.ids[1]}" in said and "epoch 1: AP" in said
    with pytest.raises(ValueError, match=r"stopped: 1 images could not be read \(more than --max-bad-images 0\)"):
        train.main(_train_args(str(root), tmp_path / "stop", "--epochs", "1", "--max-bad-images", "0"))


def test_train_on_each_node_prepares_on_rank_0_first_then_on_each_other_nodes_first_process(monkeypatch):
    calls = []
    for rank, local_rank in ((0, 0), (1, 1), (2, 0), (3, 1)):  # two nodes of two processes
        train.on_each_node(lambda: calls.append(rank), rank, local_rank)
    assert calls == [0, 2]

    def fails():
        raise OSError("disk full")
    with pytest.raises(ValueError, match="OSError: disk full"):  # every rank stops (here: the one), none waits
        train.on_each_node(fails, 0, 0)


def test_train_persistent_workers_see_each_epoch_as_a_fresh_loader_does(tiny_shapes):
    """On CUDA the loader keeps its workers from epoch to epoch; the sampler carries each epoch's augmentation
    stream, so epoch 2 of a long-lived loader is epoch 2 of a new one (a resumed run)."""
    ds = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "train"), datalib.make_transforms(
        "train", **datalib.SHAPES_SCALES))

    def boxes(loader, epoch):
        loader.sampler.set_epoch(epoch)
        return [t["boxes"] for _, _, targets in loader for t in targets]
    kept = train.make_loader(ds, 2, True, 0, 0, 0, 1, 2, cuda=True)
    assert kept.persistent_workers and kept.pin_memory
    first, second = boxes(kept, 0), boxes(kept, 1)
    fresh = train.make_loader(ds, 2, True, 0, 1, 0, 1, 2, cuda=True)
    assert all(torch.equal(a, b) for a, b in zip(second, boxes(fresh, 1)))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second))


def test_train_tf32_is_on_by_default_on_cuda_and_never_touched_elsewhere():
    assert train.parse_args(["--model", "smca"]).tf32 == "on"
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        train.set_tf32(torch.device("cpu"), "on")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        train.set_tf32(torch.device("cuda"), "on")  # only flags: no CUDA device needed to set them
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        train.set_tf32(torch.device("cuda"), "off")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_checkpoint_without_a_newer_config_field_is_refused_naming_it():
    cfg = smca.shapes_config()
    old = dataclasses.asdict(cfg)
    del old["scale_type"]  # as a checkpoint of a version of smca.py before the field existed
    ckpt = {"model": {}, "config": old, "model_name": "smca"}
    with pytest.raises(ValueError, match=r"scale_type: not in the checkpoint \(an older version of smca.py\) vs now "
                                         r"'independent'.*--finetune"):
        train.check_compatible(ckpt, "old.pth", "smca", cfg, training=False)
    train.check_compatible({**ckpt, "config": dataclasses.asdict(cfg)}, "same.pth", "smca", cfg, training=False)
