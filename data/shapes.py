"""The built-in synthetic "shapes" dataset, written to disk in COCO format.

    python -m data.shapes --out data/shapes            # 4000 train + 250 val images, seed 0

Layout: OUT/train/*.jpg, OUT/val/*.jpg, OUT/annotations/instances_{train,val}.json.

Format version 2 (version 1 had 1..10 objects from 8 px, free overlap and any colour): each image
(160..256 px a side, so batches pad) holds 2..7 filled shapes of 5 classes with non-contiguous
category ids (as COCO's), on a smooth-noise textured background. Sizes are log-uniform from 16 px
to 0.8 of the short side, which puts about a third of the objects under COCO's "small" area
(32^2), half "medium" and an eighth "large" (over 96^2); COCO has 41 / 34 / 24 %. A shape's colour differs
from the background under it (an invisible object is a label no detector can earn); a shape is
placed where it covers at most 25% of an earlier one's box (20 tries, else it is left out), and
boxes cover the visible part (an object less than 30% visible is not annotated). The same seed
gives the same files.
"""
import argparse
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 2, "name": "circle"}, {"id": 5, "name": "rectangle"}, {"id": 9, "name": "triangle"},
              {"id": 14, "name": "star"}, {"id": 20, "name": "cross"}]
FORMAT_VERSION = 2
NUM_TRAIN, NUM_VAL = 4000, 250
DESCRIPTION = "synthetic shapes"


def _background(rng, w, h):
    """Smooth random colour field plus pixel noise, uint8 (h, w, 3)."""
    coarse = rng.uniform(0, 255, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    field = 0.6 * field + 0.4 * rng.uniform(0, 255, size=3)
    field += rng.normal(0, rng.uniform(4, 20), size=(h, w, 3))
    return np.clip(field, 0, 255).astype(np.uint8)


def _polygon(kind, x0, y0, x1, y1, flip):
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "triangle":
        return [(x0, y0), (x1, y0), (cx, y1)] if flip else [(x0, y1), (x1, y1), (cx, y0)]
    if kind == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
        return pts
    if kind == "cross":
        tx, ty = rx * 0.35, ry * 0.35
        return [(cx - tx, y0), (cx + tx, y0), (cx + tx, cy - ty), (x1, cy - ty), (x1, cy + ty), (cx + tx, cy + ty),
                (cx + tx, y1), (cx - tx, y1), (cx - tx, cy + ty), (x0, cy + ty), (x0, cy - ty), (cx - tx, cy - ty)]
    raise ValueError(kind)


def _overlap(a, b):
    """Intersection of boxes a and b (x0, y0, x1, y1) over the area of b."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0) / ((b[2] - b[0]) * (b[3] - b[1]))


def make_image(rng):
    """One image and its objects [(category_id, [x, y, w, h])].

    Shapes are painted in order, later ones over earlier ones; an instance mask painted alongside
    gives each object's visible pixels. The box is the visible part's extent (as COCO's boxes are),
    and an object less than 30% visible is left out of the annotations.
    """
    w, h = int(rng.integers(160, 257)), int(rng.integers(160, 257))
    pixels = _background(rng, w, h)
    img = Image.fromarray(pixels)
    mask = Image.new("L", (w, h), 0)
    draw, draw_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    painted, placed = [], []  # (category index, pixel count when painted); boxes placed so far
    for _ in range(int(rng.integers(2, 8))):
        k = int(rng.integers(len(CATEGORIES)))
        name = CATEGORIES[k]["name"]
        size = math.exp(rng.uniform(math.log(16), math.log(0.8 * min(w, h))))  # 16 px .. 0.8 of the short side
        aspect = 1.0 if name in ("circle", "star", "cross") and rng.random() < 0.5 else rng.uniform(0.5, 2.0)
        bw, bh = min(size * math.sqrt(aspect), w - 1), min(size / math.sqrt(aspect), h - 1)
        for _ in range(20):  # a place that hides at most a quarter of an earlier box
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(_overlap(box, other) <= 0.25 for other in placed):
                break
        else:
            continue
        placed.append(box)
        under = pixels[int(y0):int(box[3]) + 1, int(x0):int(box[2]) + 1].reshape(-1, 3).mean(0)
        for _ in range(10):  # a colour that stands out from the background under the shape
            colour = rng.integers(0, 256, size=3)
            if np.linalg.norm(colour - under) >= 100:
                break
        colour = tuple(int(c) for c in colour)
        flip = bool(rng.random() < 0.5)  # triangles point up or down
        for d, fill in ((draw, colour), (draw_mask, len(placed))):
            if name == "circle":
                d.ellipse(box, fill=fill)
            elif name == "rectangle":
                d.rectangle(box, fill=fill)
            else:
                d.polygon(_polygon(name, *box, flip), fill=fill)
        painted.append((k, int((np.asarray(mask) == len(placed)).sum())))
    ids = np.asarray(mask)
    objects = []
    for idx, (k, full) in enumerate(painted, start=1):
        ys, xs = np.nonzero(ids == idx)
        if full == 0 or len(xs) < 0.3 * full:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append((CATEGORIES[k]["id"], [x0, y0, x1 - x0, y1 - y0]))
    return img, objects


def _write_split(out, split, count, seed):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    os.makedirs(os.path.join(out, split), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        img, objects = make_image(rng)
        name = f"{i:06d}.jpg"
        img.save(os.path.join(out, split, name), quality=92)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for cat, (x, y, bw, bh) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    info = {"description": DESCRIPTION, "version": FORMAT_VERSION, "seed": seed, "count": count}
    with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}, f)


def generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0):
    """Write the dataset to `out` (built in `out`.tmp, then renamed, so a killed run leaves no half set)."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "annotations"))
    _write_split(tmp, "train", num_train, seed)
    _write_split(tmp, "val", num_val, seed)
    os.rename(tmp, out)


def _info(out, split):
    with open(os.path.join(out, "annotations", f"instances_{split}.json")) as f:
        info = json.load(f)["info"]
    if not isinstance(info, dict):
        raise TypeError("not a shapes set's info")
    return info


def ensure(out, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0):
    """Generate the set at `out` unless an identical one is there. Never overwrites other files.

    A shapes set of an older format version at `out` is moved aside to `out`-v<version> (kept,
    with everything trained next to it) and the current version is generated; any other folder
    there is refused with a message.
    """
    want = {"train": num_train, "val": num_val}
    if os.path.exists(out):
        try:
            infos = {split: _info(out, split) for split in want}
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            infos = None
        if infos and all((i.get("version"), i.get("seed"), i.get("count")) == (FORMAT_VERSION, seed, want[s])
                         for s, i in infos.items()):
            return out
        old = infos and {i.get("version") for i in infos.values()}
        if (old and len(old) == 1 and isinstance(min(old), int) and min(old) < FORMAT_VERSION
                and all(i.get("description") == DESCRIPTION for i in infos.values())):
            aside = f"{out.rstrip('/')}-v{min(old)}"
            if os.path.exists(aside):
                raise ValueError(f"{out!r} holds version {min(old)} of the shapes set, which this code replaces "
                                 f"by version {FORMAT_VERSION}, and {aside!r} (where it would be moved) exists; "
                                 f"move or delete one of them")
            os.rename(out, aside)
            print(f"{out} held version {min(old)} of the shapes set; moved it to {aside} and generating "
                  f"version {FORMAT_VERSION}", flush=True)
        else:
            raise ValueError(f"{out!r} exists but is not the shapes set asked for (version {FORMAT_VERSION}, "
                             f"{num_train} train / {num_val} val images, seed {seed}); move or delete it to "
                             f"generate that set there")
    generate(out, num_train, num_val, seed)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes"))
    p.add_argument("--train", type=int, default=NUM_TRAIN)
    p.add_argument("--val", type=int, default=NUM_VAL)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ensure(args.out, args.train, args.val, args.seed)
    print(f"shapes dataset at {args.out}")


if __name__ == "__main__":
    main()
