"""Pretrain the shapes configurations' ResNet on the shapes set: the miniature of ImageNet pretraining.

    python -m engine.pretrain      # writes data/shapes/backbone_resnet18.pth (its time: docs/results.md, "The recipe")

All four papers fine-tune a ResNet-50 pretrained on ImageNet classification; none trains its
backbone from scratch, and DETR-family detectors started from random weights sit for a long time
on the plateau where the queries have learnt where boxes usually are but not yet to read the
image. ImageNet weights cannot be used on the shapes set's machine (no download, a 1000-class
photo task), so the shapes configurations do what the papers do, in miniature: they start from a
backbone pretrained on classification of the same kind of images, then fine-tune it inside the
detector as the papers fine-tune theirs (stem and layer1 frozen, layer2-4 trained).

The pretraining task is ImageNet's: object-centric image classification. Each sample is a square
crop around one annotated object of the train split (1.3-2.2 times its longer side, centre
jittered, flipped), resized to 64 x 64, labelled with its class; one sample in six is a crop of
background (no object centre inside), a sixth class. The classifier (global average pooling of C5,
one Linear) is thrown away; the ResNet is kept, BatchNorm statistics included. It sees only the
train split, never val, and never a box target: where objects are and where they end is left for
the detector to learn.

train.py runs this on first use when --data shapes trains a model whose --backbone-weights is the
default ('shapes'); the file is reused by every later run and every model with the same ResNet.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common import ResNet, fast_paths
from data import shapes
from data.coco import find_split, load_coco, load_rgb
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from engine.runtime import SHAPES_ROOT, run_cli, save_atomic

PRETRAIN_VERSION = 1  # bump when the recipe below changes: an older file is then refused, not reused
RECIPE = {"steps": 200, "batch_size": 128, "crop": 64, "lr": 2e-3, "weight_decay": 1e-4, "warmup": 20}


def default_path(root, depth):
    return os.path.join(root, f"backbone_resnet{depth}.pth")


class ObjectCrops(torch.utils.data.Dataset):
    """(crop (3, S, S), class) samples of a COCO-format train split: an object (its category's index
    in id order), or background (`self.background`, one past the last category)."""

    def __init__(self, root, crop):
        img_dir, ann_file = find_split(root, "train")
        coco = load_coco(ann_file)
        cat_index = {c["id"]: k for k, c in enumerate(sorted(coco.dataset["categories"], key=lambda c: c["id"]))}
        self.files = {i: os.path.join(img_dir, info["file_name"]) for i, info in coco.imgs.items()}
        self.sizes = {i: (info["width"], info["height"]) for i, info in coco.imgs.items()}
        self.boxes = {i: [a["bbox"] for a in coco.imgToAnns.get(i, [])] for i in coco.imgs}
        self.objects = [(a["image_id"], a["bbox"], cat_index[a["category_id"]]) for a in coco.dataset["annotations"]]
        if not self.objects:
            raise ValueError(f"{ann_file} has no annotations to pretrain on")
        self.background = len(cat_index)
        self.crop = crop
        self.mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD)[:, None, None]

    def __len__(self):
        return len(self.objects) * 6 // 5  # one sample in six is background

    def _background_box(self, img_id):
        w, h = self.sizes[img_id]
        for _ in range(20):  # a square without an object centre in it
            side = random.uniform(24, 0.6 * min(w, h))
            x0, y0 = random.uniform(0, w - side), random.uniform(0, h - side)
            if not any(x0 < bx + bw / 2 < x0 + side and y0 < by + bh / 2 < y0 + side
                       for bx, by, bw, bh in self.boxes[img_id]):
                return x0, y0, side
        return None

    def __getitem__(self, i):
        label, square = None, None
        if i >= len(self.objects):  # background: a random image's empty square
            img_id = random.choice(list(self.files))
            square = self._background_box(img_id)
            label = self.background
        if square is None:
            img_id, (bx, by, bw, bh), label = self.objects[i % len(self.objects)]
            side = max(bw, bh) * random.uniform(1.3, 2.2)
            cx, cy = bx + bw / 2 + random.uniform(-0.1, 0.1) * side, by + bh / 2 + random.uniform(-0.1, 0.1) * side
            square = (cx - side / 2, cy - side / 2, side)
        x0, y0, side = square
        box = tuple(round(v) for v in (x0, y0, x0 + side, y0 + side))  # may reach past the border: black there
        patch = load_rgb(self.files[img_id]).crop(box).resize((self.crop, self.crop), Image.BILINEAR)
        if random.random() < 0.5:
            patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(patch, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, label


def pretrain(root, depth=18, out=None, seed=0, log=print, **overrides):
    """Pretrain ResNet-`depth` to classify the object crops of `root`'s train split; write and return the file."""
    recipe = dict(RECIPE, **overrides)
    if not (recipe["batch_size"] >= 1 and recipe["crop"] >= 32 and recipe["lr"] > 0 and recipe["weight_decay"] >= 0
            and 1 <= recipe["warmup"] < recipe["steps"]):
        raise ValueError(f"pretrain recipe {recipe}: needs batch_size >= 1, crop >= 32 px, lr > 0, weight_decay >= 0 "
                         f"and 1 <= warmup < steps")
    out = out or default_path(root, depth)
    torch.manual_seed(seed)
    random.seed(seed)
    data = ObjectCrops(root, recipe["crop"])
    body = ResNet(depth, nn.BatchNorm2d)
    classifier = nn.Linear(body.channels[-1], data.background + 1)  # the categories, then background
    params = list(body.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps, warmup = recipe["steps"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to zero
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=steps * recipe["batch_size"],
                                             generator=gen)
    loader = torch.utils.data.DataLoader(data, batch_size=recipe["batch_size"], sampler=sampler)
    body.train()
    start, last, correct, total = time.time(), time.time(), 0, 0
    for step, (x, label) in enumerate(loader):
        with fast_paths(False):  # BatchNorm2d learning batch statistics: nothing to fold, channels-last slower
            logits = classifier(body(x)[-1].mean((2, 3)))  # global average pooling of C5, (B, classes)
        loss = F.cross_entropy(logits, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 50:  # training accuracy over the last 50 steps (fresh random crops, before their update)
            correct, total = correct + (logits.argmax(1) == label).sum().item(), total + len(label)
        if time.time() - last > 10 or step == steps - 1:
            last = time.time()
            log(f"pretrain ResNet-{depth} on shapes: step {step + 1}/{steps}  loss {loss.item():.3f}  "
                f"{(step + 1) / (time.time() - start):.2f} it/s")
    info = {"version": PRETRAIN_VERSION, "shapes_version": shapes.FORMAT_VERSION, "depth": depth, "seed": seed,
            "recipe": recipe, "seconds": round(time.time() - start, 1), "accuracy": round(correct / max(total, 1), 4)}
    save_atomic({"model": body.state_dict(), "info": json.dumps(info)}, out)
    log(f"pretrained backbone written to {out}: {info['seconds']:.0f} s, crop accuracy {info['accuracy']:.3f} "
        f"over the last 50 steps")
    return out


def read_info(path):
    """The info a pretrained file was written with, or None if it is not one of ours."""
    try:
        info = torch.load(path, map_location="cpu", weights_only=True).get("info")
        return json.loads(info) if isinstance(info, str) else None
    except Exception:
        return None


def ensure(root, depth=18, seed=0, log=print):
    """The pretrained backbone for the shapes set at `root`: reused if present and current, else trained."""
    path = default_path(root, depth)
    if os.path.exists(path):
        info = read_info(path)
        want = {"version": PRETRAIN_VERSION, "shapes_version": shapes.FORMAT_VERSION, "depth": depth, "seed": seed}
        if info is not None and all(info.get(k) == v for k, v in want.items()):
            return path
        raise ValueError(f"{path} exists but is not the pretrained ResNet-{depth} this code would write "
                         f"(recipe version {PRETRAIN_VERSION}, shapes version {shapes.FORMAT_VERSION}, seed {seed}); "
                         f"move or delete it to pretrain again")
    log(f"no pretrained ResNet-{depth} for the shapes set yet: pretraining one (once; later runs reuse {path})")
    return pretrain(root, depth, path, seed, log)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=SHAPES_ROOT)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--out", default=None, help="default: DATA/backbone_resnet<depth>.pth (refuses to overwrite)")
    p.add_argument("--seed", type=int, default=0)
    for key, value in RECIPE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    out = args.out or default_path(args.data, args.depth)
    if os.path.exists(out):
        raise ValueError(f"{out} exists; move or delete it, or pass another --out")
    pretrain(args.data, args.depth, out, args.seed, **{k: getattr(args, k) for k in RECIPE})


if __name__ == "__main__":
    run_cli(main)
