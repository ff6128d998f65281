"""Tests of engine/pretrain.py: the shapes backbone's pretraining.
"""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data as datalib
import train
from data import shapes
from engine import pretrain


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
        std = torch.tensor(datalib.transforms.IMAGENET_STD)[:, None, None]
        rgb = x * std + torch.tensor(datalib.transforms.IMAGENET_MEAN)[:, None, None]
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
        train.main(["--model", "smca", "--data", root, "--backbone-weights", "shapes",
                    "--output-dir", str(tmp_path / "r")])
