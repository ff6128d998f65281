"""The built-in synthetic "shapes" dataset, written to disk in COCO format.

    python -m data.shapes --out data/shapes            # 2000 train + 250 val images, seed 0

Layout: OUT/train/*.jpg, OUT/val/*.jpg, OUT/annotations/instances_{train,val}.json.
Each image (176..320 px a side, so batches pad) holds 1..10 filled shapes of 5 classes with
non-contiguous category ids (as COCO's), sizes from 8 px to over half the image, random colours on
a smooth-noise textured background; shapes may overlap (boxes cover the visible part; an object
less than 30% visible is not annotated). The same seed gives the same files.
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
FORMAT_VERSION = 1


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


def make_image(rng):
    """One image and its objects [(category_id, [x, y, w, h])].

    Shapes are painted in order, later ones over earlier ones; an instance mask painted alongside
    gives each object's visible pixels. The box is the visible part's extent (as COCO's boxes are),
    and an object less than 30% visible is left out of the annotations.
    """
    w, h = int(rng.integers(176, 321)), int(rng.integers(176, 321))
    img = Image.fromarray(_background(rng, w, h))
    mask = Image.new("L", (w, h), 0)
    draw, draw_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    painted = []  # (category_id, pixel count when painted)
    for idx in range(1, int(rng.integers(1, 11)) + 1):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        size = math.exp(rng.uniform(math.log(8), math.log(0.75 * min(w, h))))  # 8 px .. 3/4 of the short side
        aspect = 1.0 if cat["name"] in ("circle", "star", "cross") and rng.random() < 0.5 else rng.uniform(0.5, 2.0)
        bw, bh = min(size * math.sqrt(aspect), w - 1), min(size / math.sqrt(aspect), h - 1)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        x1, y1 = x0 + bw, y0 + bh
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        flip = bool(rng.random() < 0.5)  # triangles point up or down
        for d, fill in ((draw, colour), (draw_mask, idx)):
            if cat["name"] == "circle":
                d.ellipse([x0, y0, x1, y1], fill=fill)
            elif cat["name"] == "rectangle":
                d.rectangle([x0, y0, x1, y1], fill=fill)
            else:
                d.polygon(_polygon(cat["name"], x0, y0, x1, y1, flip), fill=fill)
        painted.append((cat["id"], int((np.asarray(mask) == idx).sum())))
    ids = np.asarray(mask)
    objects = []
    for idx, (cat_id, full) in enumerate(painted, start=1):
        ys, xs = np.nonzero(ids == idx)
        if full == 0 or len(xs) < 0.3 * full:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append((cat_id, [x0, y0, x1 - x0, y1 - y0]))
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
    info = {"description": "synthetic shapes", "version": FORMAT_VERSION, "seed": seed, "count": count}
    with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}, f)


def generate(out, num_train=2000, num_val=250, seed=0):
    """Write the dataset to `out` (built in `out`.tmp, then renamed, so a killed run leaves no half set)."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "annotations"))
    _write_split(tmp, "train", num_train, seed)
    _write_split(tmp, "val", num_val, seed)
    os.rename(tmp, out)


def ensure(out, num_train=2000, num_val=250, seed=0):
    """Generate the set at `out` unless an identical one is there. Never overwrites other files."""
    want = {"train": num_train, "val": num_val}
    if os.path.exists(out):
        try:
            for split, count in want.items():
                with open(os.path.join(out, "annotations", f"instances_{split}.json")) as f:
                    info = json.load(f)["info"]
                if (info.get("version"), info.get("seed"), info.get("count")) != (FORMAT_VERSION, seed, count):
                    raise ValueError
            return out
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            raise ValueError(f"{out!r} exists but is not the shapes set asked for ({num_train} train / {num_val} "
                             f"val images, seed {seed}); move or delete it to generate that set there") from None
    generate(out, num_train, num_val, seed)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes"))
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ensure(args.out, args.train, args.val, args.seed)
    print(f"shapes dataset at {args.out}")


if __name__ == "__main__":
    main()
