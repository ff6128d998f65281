"""Tests of train.py: resume, data order, backbone weights, failures, flags, time budget, DDP.
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import data as datalib
import focus_detr
import lite_detr
import smca
import train
from tests.helpers import (ROOT, _train_args, _train_losses, tiny_smca)


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

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


def test_train_bf16_backbone_fused_optimizer_and_resume(tiny_shapes, tmp_path):
    """--amp bf16-backbone trains with the ResNet in bf16 (losses near float32's, not equal); the optimizer is
    fused AdamW; a resume keeps the checkpoint's --amp unless the flag says otherwise."""
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
