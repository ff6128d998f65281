"""COCO-format detection dataset over pycocotools, with checks that name the bad file.

Layouts found under a root (first match wins), for split in {train, val}:
    ROOT/{split}2017/            + ROOT/annotations/instances_{split}2017.json   (COCO)
    ROOT/{split}/                + ROOT/annotations/instances_{split}.json       (shapes, custom sets)

Labels are the raw category ids; the model has `num_classes = max category id + 1` logits (91 for
COCO, as in the official DETR code). Crowd boxes are left out of training targets (COCOeval still
sees them); boxes of zero or negative width or height, or lying outside their image, are dropped
and counted in the log; the rest are clipped to the image. Images without annotations stay in as
negatives.

The image files' sizes are read (from their headers) when the set is opened: an image whose file is not the size
its annotation's width / height says (a set exported with the wrong orientation, say) is counted and reported, the
first few named, and its boxes are clipped to the file's pixels. An image that cannot be decoded when an item is
read (a truncated JPEG) does not raise: the item is (None, {"image_id", "error"}), and `collate` leaves it out of
the batch and lists it in the batch's targets' `.skipped` (train.py counts them and stops past a limit).
"""
import contextlib
import io
import json
import logging
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO

log = logging.getLogger(__name__)


# COCO 2017's 80 categories by id (what the authors' weights detect; detect.py names them)
COCO_NAMES = {1: 'person', 2: 'bicycle', 3: 'car', 4: 'motorcycle', 5: 'airplane', 6: 'bus', 7: 'train', 8: 'truck',
              9: 'boat', 10: 'traffic light', 11: 'fire hydrant', 13: 'stop sign', 14: 'parking meter', 15: 'bench',
              16: 'bird', 17: 'cat', 18: 'dog', 19: 'horse', 20: 'sheep', 21: 'cow', 22: 'elephant', 23: 'bear',
              24: 'zebra', 25: 'giraffe', 27: 'backpack', 28: 'umbrella', 31: 'handbag', 32: 'tie', 33: 'suitcase',
              34: 'frisbee', 35: 'skis', 36: 'snowboard', 37: 'sports ball', 38: 'kite', 39: 'baseball bat',
              40: 'baseball glove', 41: 'skateboard', 42: 'surfboard', 43: 'tennis racket', 44: 'bottle',
              46: 'wine glass', 47: 'cup', 48: 'fork', 49: 'knife', 50: 'spoon', 51: 'bowl', 52: 'banana',
              53: 'apple', 54: 'sandwich', 55: 'orange', 56: 'broccoli', 57: 'carrot', 58: 'hot dog', 59: 'pizza',
              60: 'donut', 61: 'cake', 62: 'chair', 63: 'couch', 64: 'potted plant', 65: 'bed', 67: 'dining table',
              70: 'toilet', 72: 'tv', 73: 'laptop', 74: 'mouse', 75: 'remote', 76: 'keyboard', 77: 'cell phone',
              78: 'microwave', 79: 'oven', 80: 'toaster', 81: 'sink', 82: 'refrigerator', 84: 'book', 85: 'clock',
              86: 'vase', 87: 'scissors', 88: 'teddy bear', 89: 'hair drier', 90: 'toothbrush'}


def find_split(root, split):
    """(image_dir, annotation_file) of a split under root, or ValueError listing what was tried."""
    tried = []
    for img_dir, ann in ((f"{split}2017", f"instances_{split}2017.json"), (split, f"instances_{split}.json")):
        img_dir, ann = os.path.join(root, img_dir), os.path.join(root, "annotations", ann)
        if os.path.isdir(img_dir) and os.path.isfile(ann):
            return img_dir, ann
        tried.append(f"{img_dir} + {ann}")
    raise ValueError(f"no '{split}' split under {root!r}; looked for: " + "; ".join(tried))


def load_rgb(path, exif_orientation=False):
    """Open any PIL-readable image as 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit, float). exif_orientation:
    turn it as its EXIF orientation tag says (as phones store portraits and viewers show them; detect.py does),
    not for a dataset, whose boxes are in the stored pixels' coordinates (COCO's, DETR's loaders)."""
    with Image.open(path) as img:
        img.load()
        if exif_orientation:
            img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.asarray(img, dtype=np.float64)
            hi = 65535.0 if a.max() > 255 else 255.0
            img = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8))
        elif img.mode == "P":
            img = img.convert("RGBA")
        return img.convert("RGB")


class CocoDetection(torch.utils.data.Dataset):
    """Item: (image tensor (3, H, W), target dict) after `transforms`.

    target: boxes (N, 4) cxcywh normalised to the transformed image, labels (N,) category ids,
    image_id, orig_size (h, w) of the file, size (h, w) after the transforms.
    """

    def __init__(self, img_dir, ann_file, transforms=None):
        self.img_dir, self.ann_file, self.transforms = img_dir, ann_file, transforms
        self.rng = random.Random(0)  # the augmentation's randomness; train.py's sampler restarts it every epoch
        self.stream, self.position = None, -1  # no stream yet: the first item of a pass restarts it
        self.coco = load_coco(ann_file)
        self.ids = sorted(self.coco.imgs)
        self.categories = {c["id"]: c.get("name", str(c["id"])) for c in self.coco.dataset["categories"]}
        self.num_classes = max(self.categories) + 1
        self._check_and_index()

    def _check_and_index(self):
        files = set(os.listdir(self.img_dir))
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            if "file_name" not in info:
                raise ValueError(f"{self.ann_file}: image id {img_id} has no file_name")
            if info["file_name"] not in files and not os.path.isfile(os.path.join(self.img_dir, info["file_name"])):
                missing = os.path.join(self.img_dir, info["file_name"])
                raise ValueError(f"{self.ann_file}: image id {img_id}: file {missing} is missing")
        self.sizes, mismatched = {}, []  # image id -> (w, h) of the file
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            path = os.path.join(self.img_dir, info["file_name"])
            try:
                with Image.open(path) as img:  # the header only
                    self.sizes[img_id] = img.size
            except Exception:  # not decodable: __getitem__ skips it when it comes (the run counts it)
                self.sizes[img_id] = (info.get("width", np.inf), info.get("height", np.inf))
                continue
            if (info.get("width"), info.get("height")) not in ((None, None), self.sizes[img_id]):
                mismatched.append(f"id {img_id} ({info['file_name']}: file {self.sizes[img_id][0]} x "
                                  f"{self.sizes[img_id][1]}, annotation {info.get('width')} x {info.get('height')})")
        self.size_mismatches = mismatched
        if mismatched:
            log.warning("%s: %d image(s) are not the size their annotation says; their boxes are clipped to the "
                        "file's pixels (boxes given for a rotated or rescaled export are wrong there). First: %s",
                        self.ann_file, len(mismatched), "; ".join(mismatched[:5]))
        self.targets, dropped = {}, 0
        for img_id in self.ids:
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann["category_id"] not in self.categories:
                    raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} of image id {img_id} has "
                                     f"category_id {ann['category_id']}, which 'categories' does not declare")
                if ann.get("iscrowd", 0):
                    continue
                bbox = ann.get("bbox")
                if bbox is None or len(bbox) != 4:
                    raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} of image id {img_id} "
                                     f"has bbox {bbox!r}, not [x, y, w, h]")
                x, y, w, h = map(float, bbox)
                W, H = self.sizes[img_id]
                x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
                if not (w > 0 and h > 0 and x1 > x0 and y1 > y0):
                    dropped += 1
                    continue
                boxes.append([x0, y0, x1, y1])
                labels.append(ann["category_id"])
            self.targets[img_id] = (torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                                    torch.tensor(labels, dtype=torch.int64))
        self.dropped_boxes = dropped
        if dropped:
            log.warning("%s: dropped %d boxes with zero or negative width/height or outside their image",
                        self.ann_file, dropped)

    def reseed(self, stream):
        """Restart the augmentation's random stream (the dataset's own; the global `random` is untouched). In a
        loader's worker process the stream is the worker's own: `stream` offset by its worker id."""
        self.stream, self.position = stream, -1
        worker = torch.utils.data.get_worker_info()
        self.rng.seed(stream if worker is None else stream + 7919 * (worker.id + 1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        """idx: an index, or (index, stream, position in the epoch) as train.py's sampler gives it: the
        augmentation's random stream restarts from `stream` at the start of each pass (a new stream, or a position
        not after the last one this process read)."""
        if isinstance(idx, tuple):
            idx, stream, position = idx
            if stream != self.stream or position <= self.position:
                self.reseed(stream)
            self.position = position
        img_id = self.ids[idx]
        path = os.path.join(self.img_dir, self.coco.imgs[img_id]["file_name"])
        try:
            image = load_rgb(path)
        except Exception as e:  # truncated or corrupt: the batch goes on without it (collate lists it)
            return None, {"image_id": img_id, "error": f"cannot read {path}: {type(e).__name__}: {e}"}
        w, h = image.size
        boxes, labels = self.targets[img_id]
        # clip again to the decoded size (a file changed since the set was opened)
        boxes = torch.min(boxes, torch.tensor([w, h, w, h], dtype=torch.float32))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {"boxes": boxes[keep], "labels": labels[keep], "image_id": img_id, "orig_size": torch.tensor([h, w])}
        if self.transforms is not None:
            image, target = self.transforms(image, target, self.rng)
        return image, target


def load_coco(ann_file):
    """pycocotools COCO with a clear error for a missing / malformed / incomplete json."""
    if not os.path.isfile(ann_file):
        raise ValueError(f"annotation file {ann_file} does not exist")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {ann_file}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"annotation file {ann_file} lacks the COCO key(s) {missing}")
    if not data["categories"]:
        raise ValueError(f"annotation file {ann_file} declares no categories")
    image_ids = {img.get("id") for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"annotation file {ann_file}: annotation {ann.get('id')} refers to image id "
                             f"{ann.get('image_id')}, which 'images' does not list")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class Targets(list):
    """A batch's targets, with `skipped`: [(image id, error)] of the items that could not be read."""
    skipped = ()


def collate(batch):
    """Pad a list of (image (3, H_i, W_i), target) to images (B, 3, H_img, W_img) and pad_mask (B, H_img, W_img)
    -> (images, pad_mask, targets). Padding goes to the bottom and right; pad_mask is True on padding. Items whose
    image is None (unreadable) are left out and listed in targets.skipped; a batch of none left has B = 0."""
    skipped = [(t["image_id"], t["error"]) for im, t in batch if im is None]
    batch = [(im, t) for im, t in batch if im is not None]
    if not batch:
        targets = Targets()
        targets.skipped = skipped
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, 1, 1, dtype=torch.bool), targets
    images, targets = zip(*batch)
    targets = Targets(targets)
    targets.skipped = skipped
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    out = images[0].new_zeros(len(images), 3, H, W)
    pad_mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        pad_mask[i, : im.shape[1], : im.shape[2]] = False
    return out, pad_mask, targets
