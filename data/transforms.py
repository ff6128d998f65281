"""DETR's augmentation recipe in PIL / numpy / torch (no torchvision).

A transform is called as t(image, target, rng) and returns (image, target): image a PIL.Image until
ToTensorNormalize, target a dict with `boxes` (M, 4) absolute xyxy pixels and `labels` (M,), filtered
together; rng a random.Random (the dataset's own, seeded by the loader; the `random` module by
default). ToTensorNormalize turns boxes into cxcywh relative to the (unpadded) image.

Deviation from DETR's datasets/transforms.py: RandomSizeCrop clamps its minimum side to the image,
where DETR's raises on an image smaller than min_size (384 px); larger images crop the same way.
"""
import random

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DETR's COCO recipe (datasets/coco.py): short side 480..800, max side 1333, crop branch.
COCO_SCALES = dict(scales=list(range(480, 801, 32)), max_size=1333, crop_resize=(400, 500, 600),
                   crop_size=(384, 600), val_size=800)
# The same recipe scaled to the built-in shapes set (160..256 px a side, data/shapes.py), for CPU training: short
# side 128..192, max side 240, evaluated at 160.
SHAPES_SCALES = dict(scales=list(range(128, 193, 16)), max_size=240, crop_resize=(128, 160, 192),
                     crop_size=(112, 192), val_size=160)

PER_BOX = ("boxes", "labels")


def _keep(target, keep):
    return {k: (v[keep] if k in PER_BOX else v) for k, v in target.items()}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target, rng=random):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target, rng=random):
        if rng.random() < self.p:
            w = image.width
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = target["boxes"]
            target = {**target, "boxes": torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], -1)}
        return image, target


def resized_hw(w, h, size, max_size=None):
    """DETR's get_size_with_aspect_ratio: short side -> size unless the long side passes max_size."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size, max_size=None):
    h, w = resized_hw(image.width, image.height, size, max_size)
    sx, sy = w / image.width, h / image.height
    image = image.resize((w, h), Image.BILINEAR)
    return image, {**target, "boxes": target["boxes"] * torch.tensor([sx, sy, sx, sy])}


class RandomResize:
    def __init__(self, sizes, max_size=None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target, rng=random):
        return resize(image, target, rng.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """A random crop of random size (each side in [min_size, max_size], within the image)."""

    def __init__(self, min_size, max_size):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng=random):
        w = rng.randint(min(image.width, self.min_size), min(image.width, self.max_size))
        h = rng.randint(min(image.height, self.min_size), min(image.height, self.max_size))
        top, left = rng.randint(0, image.height - h), rng.randint(0, image.width - w)
        return crop(image, target, top, left, h, w)


def crop(image, target, top, left, h, w):
    image = image.crop((left, top, left + w, top + h))
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.view(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
    keep = (boxes[:, 1] > boxes[:, 0]).all(dim=1)  # boxes left with no area are dropped
    return image, _keep({**target, "boxes": boxes.view(-1, 4)}, keep)


class RandomSelect:
    """Apply t1 with probability p, else t2."""

    def __init__(self, t1, t2, p=0.5):
        self.t1, self.t2, self.p = t1, t2, p

    def __call__(self, image, target, rng=random):
        return self.t1(image, target, rng) if rng.random() < self.p else self.t2(image, target, rng)


class ToTensorNormalize:
    """PIL -> float (3, H, W) with ImageNet normalisation; boxes -> cxcywh in [0, 1] of this image."""

    def __call__(self, image, target, rng=None):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        h, w = x.shape[-2:]
        b = target["boxes"]
        cxcywh = torch.stack(
            [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
        target = {**target, "boxes": cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32),
                  "size": torch.tensor([h, w])}
        return x, target


def make_transforms(split, scales, max_size, crop_resize, crop_size, val_size):
    """DETR's train / val pipelines (datasets/coco.py make_coco_transforms), sizes as arguments."""
    if split == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size),
                Compose([RandomResize(crop_resize), RandomSizeCrop(*crop_size), RandomResize(scales, max_size)])),
            ToTensorNormalize()])
    return Compose([RandomResize([val_size], max_size), ToTensorNormalize()])
