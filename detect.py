"""Run a trained detector of this library on your own images: annotated pictures and COCO results.

    python detect.py --checkpoint runs/smca-shapes/checkpoint.pth --source data/shapes/val
    python detect.py --checkpoint CKPT --source 'photos/*.jpg' --threshold 0.5 --out runs/detect/photos
    python detect.py --checkpoint CKPT --source photo.png --explain     # + the paper's mechanism

The checkpoint (what train.py writes) says which model and Config it is, which categories it knows
(their names; a checkpoint without them uses the names of the data it was trained on when that is
on this machine, else the ids) and which evaluation transform it was trained for: no model flag
is repeated. The authors' released SMCA-DETR, Sparse DETR and Focus-DETR weights work the same
way (recognised by their keys, converted by the model file's from_official; COCO's names).
--source is an image file, a folder (every file in it, sorted; what is not a readable image is
skipped with a warning) or a glob.

Written to --out (default runs/detect/exp, exp2, ... : a new folder every run; an existing,
non-empty --out is refused, and so is one inside the source folder, which is never written to):
- one annotated copy of each image (boxes, class names and scores, a colour per class);
- with --explain, NAME_explain.png: the paper's mechanism for the image (SMCA: the top 3 queries'
  Gaussian priors; Sparse DETR: token scores, selected tokens and the DAM; Lite DETR: F_L / F_H
  and the top 3 queries' sampling points; Focus-DETR: foreground scores and the per-layer kept and
  fine-grained tokens), from the model's `explain=True` outputs;
- detections.json: every detection at or above --threshold in the COCO results format
  ({"image_id", "file_name", "category_id", "bbox": [x, y, w, h] in pixels of the original image,
  "score"}), image ids 1, 2, ... in the order the images were read.
A photo whose EXIF orientation tag says it is turned (as phones store portraits) is turned upright first, as a
viewer shows it: the model sees it upright, and the pictures and the boxes are in the upright image's pixels.
"""
import argparse
import dataclasses
import glob
import json
import os
import random
import sys
import time

import torch
from PIL import Image

import data as datalib
from common import box_cxcywh_to_xyxy, read_state_dict
from data.coco import COCO_NAMES, load_rgb
from engine import visualize
from engine.runtime import MODELS, SHAPES_ROOT, load_checkpoint, model_module, run_cli, select_device

KEEP_FORMAT = (".jpg", ".jpeg", ".png")  # annotated copies keep these formats; others are written as PNG


@dataclasses.dataclass
class Detector:
    name: str  # the model file: smca, sparse_detr, lite_detr, focus_detr
    model: torch.nn.Module  # in eval mode, on its device
    postprocess: torch.nn.Module
    transform: object  # the evaluation transform (data.make_transforms("val", ...))
    names: dict  # category id -> name
    device: torch.device


def checkpoint_categories(ckpt):
    """{id: name} from the checkpoint, else from the data it was trained on (if on this machine), else {}."""
    if isinstance(ckpt.get("categories"), dict):
        return {int(k): str(v) for k, v in ckpt["categories"].items()}
    data = (ckpt.get("args") or {}).get("data")
    if not data:
        return {}
    try:
        coco = datalib.load_coco(datalib.find_split(SHAPES_ROOT if data == "shapes" else data, "val")[1])
    except (ValueError, OSError):
        return {}
    return {c["id"]: c.get("name", str(c["id"])) for c in coco.dataset["categories"]}


def official_model(state):
    """Which model file converts an official state dict (its tell-tale keys), or None."""
    if "neck.convs.0.conv.weight" in state and "transformer.level_embeds" in state:
        return "focus_detr"  # detrex / detectron2
    if "transformer.level_embed" in state:
        return "sparse_detr"  # Sparse DETR, or its dense two-stage Deformable DETR base
    if "query_embed.weight" in state and any(".multihead_attn." in k for k in state):
        return "smca"
    return None


def load_detector(path, device="cpu"):
    """A train.py checkpoint, or the authors' released weights (SMCA-DETR, Sparse DETR, Focus-DETR:
    the file as published, converted by the model file's from_official) -> Detector. ValueError for
    a missing file or one of no model here."""
    try:  # weights only: the authors' files and plain state dicts
        state, extra = read_state_dict(path, "checkpoint")
    except ValueError:  # missing, or one of our checkpoints (numpy RNG states): load_checkpoint says
        state, extra = None, {}
    if state is not None and "model_name" not in extra and official_model(state):
        module = model_module(official_model(state))
        cfg, converted, notes = module.from_official(path)
        model, _, postprocess = module.build(cfg)
        model.load_state_dict(converted)
        print(f"{path}: the authors' {module.__name__} weights" + "".join(f"; {n}" for n in notes))
        transform = datalib.make_transforms("val", **datalib.COCO_SCALES)
        return Detector(module.__name__, model.eval().to(torch.device(device)), postprocess, transform,
                        dict(COCO_NAMES), torch.device(device))
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("model_name") not in MODELS or \
            not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise ValueError(f"{path!r} is not a checkpoint of a model of this library ({', '.join(MODELS)}) nor "
                         f"the authors' SMCA-DETR, Sparse DETR or Focus-DETR weights; train.py writes ours as "
                         f"OUTPUT_DIR/checkpoint.pth")
    module = model_module(ckpt["model_name"])
    try:
        cfg = module.Config(**ckpt["config"])
        model, _, postprocess = module.build(cfg)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path!r} does not fit this version of {ckpt['model_name']}.py: {e}") from e
    args = ckpt.get("args") or {}
    scales = args.get("scales") or ("shapes" if args.get("data", "shapes") == "shapes" else "coco")
    transform = datalib.make_transforms("val", **(datalib.SHAPES_SCALES if scales == "shapes" else datalib.COCO_SCALES))
    device = torch.device(device)
    return Detector(ckpt["model_name"], model.eval().to(device), postprocess, transform,
                    checkpoint_categories(ckpt), device)


@torch.no_grad()
def detect_image(det, image, threshold=0.3, explain=False, top=3):
    """image: PIL RGB -> ({boxes (M, 4) xyxy, labels (M,), scores (M,)} in original pixels, clipped to
    the image, at or above threshold, best first; and with explain the mechanism picture (PIL), else
    None). Only ids of the checkpoint's categories are classes (when it knows them)."""
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    x, _ = det.transform(image, empty, random.Random(0))  # (3, H, W); the val transform draws nothing
    x = x.to(det.device)
    out = det.model(x[None], torch.zeros(1, *x.shape[1:], dtype=torch.bool, device=det.device), explain=explain)
    w, h = image.size
    logits = out["pred_logits"]
    if det.names:  # logits are indexed by category id: ids that name no category of the data are not classes
        unknown = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        unknown[[i for i in det.names if i < logits.shape[-1]]] = False
        logits = logits.masked_fill(unknown, float("-inf"))
    result = det.postprocess({**out, "pred_logits": logits}, torch.tensor([[h, w]], device=det.device))[0]
    keep = result["scores"] >= threshold
    dets = {k: v[keep].cpu() for k, v in result.items()}
    # in the image
    dets["boxes"] = torch.min(dets["boxes"].clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
    picture = None
    if explain:
        best = out["pred_logits"][0].float().sigmoid().max(-1).values  # (Q,) each query's best class score
        queries = best.topk(min(top, best.numel())).indices.tolist()
        H, W = x.shape[1:]
        boxes = box_cxcywh_to_xyxy(out["pred_boxes"][0, queries].float().cpu()) * torch.tensor([W, H, W, H])
        strides = getattr(det.model, "strides", None)
        picture = visualize.explain_picture(det.name, x, out, queries, boxes.tolist(), strides)
    return dets, picture


def source_files(source):
    """An image file, a folder (its files, sorted; hidden ones left out) or a glob -> file paths."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if not f.startswith(".") and os.path.isfile(os.path.join(source, f)))
    elif os.path.isfile(source):
        files = [source]
    elif glob.has_magic(source):
        files = sorted(p for p in glob.glob(source) if os.path.isfile(p))
    else:
        raise ValueError(f"--source {source!r}: no such file or folder")
    if not files:
        raise ValueError(f"--source {source!r}: no files to detect on")
    return files


def output_dir(out, files, source):
    """The folder to write to: never an existing non-empty one, never inside a source folder."""
    if out is None:
        out, n = os.path.join("runs", "detect", "exp"), 1
        while os.path.exists(out):
            n += 1
            out = os.path.join("runs", "detect", f"exp{n}")
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out!r} exists and is not empty; nothing is overwritten: pass another --out")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    target = os.path.realpath(out)
    sources = {os.path.realpath(os.path.dirname(f)) for f in files}
    if os.path.isdir(source):
        sources.add(os.path.realpath(source))
    for folder in sources:
        if target == folder or target.startswith(folder + os.sep):
            raise ValueError(f"--out {out!r} is inside the source folder {folder!r}, which is never written to; "
                             f"pass an --out elsewhere")
    return out


def detect_files(det, files, out, threshold=0.3, explain=False, log=print):
    """Detect on every file, write the pictures and detections.json into `out` (created).
    -> {"images": n read, "skipped": [paths], "detections": n, "out": out}"""
    os.makedirs(out, exist_ok=True)
    results, skipped, used, start, last = [], [], set(), time.time(), 0.0
    for i, path in enumerate(files):
        try:
            image = load_rgb(path, exif_orientation=True)  # as a viewer shows it: boxes in those coordinates
        except Exception as e:  # not an image, truncated, unreadable
            print(f"warning: skipped {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
            skipped.append(path)
            image = None
        if image is not None:
            dets, picture = detect_image(det, image, threshold, explain)
            image_id = i + 1 - len(skipped)
            for box, label, score in zip(dets["boxes"].tolist(), dets["labels"].tolist(), dets["scores"].tolist()):
                results.append({"image_id": image_id, "file_name": path, "category_id": int(label),
                                "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                         round(box[3] - box[1], 2)], "score": round(float(score), 5)})
            stem, ext = os.path.splitext(os.path.basename(path))
            name, n = stem, 1
            while name in used:  # the same file name from two folders of a glob
                n += 1
                name = f"{stem}_{n}"
            used.add(name)
            visualize.draw_detections(image, dets["boxes"], dets["labels"], dets["scores"], det.names).save(
                os.path.join(out, name + (ext if ext.lower() in KEEP_FORMAT else ".png")))
            if picture is not None:  # 256 colours: a third of the size, the same picture to the eye
                picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                    os.path.join(out, f"{name}_explain.png"), optimize=True)
        if time.time() - last > 2 or i + 1 == len(files):  # a progress line every 2 s and at the end
            last = time.time()
            outcome = f"{len(dets['scores'])} detections" if image is not None else "skipped"
            log(f"[{i + 1}/{len(files)}] {path}: " + outcome + f" ({time.time() - start:.1f} s)")
    n_images = len(files) - len(skipped)
    if n_images == 0:
        raise ValueError(f"none of the {len(files)} source files is a readable image")
    with open(os.path.join(out, "detections.json"), "w") as f:
        json.dump(results, f)
    return {"images": n_images, "skipped": skipped, "detections": len(results), "out": out}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by train.py")
    p.add_argument("--source", required=True, help="an image file, a folder of images, or a glob (quote it)")
    p.add_argument("--out", default=None, help="output folder (default runs/detect/exp, exp2, ...)")
    p.add_argument("--threshold", type=float, default=0.3, help="keep detections scoring at least this (0..1)")
    p.add_argument("--explain", action="store_true", help="also draw the paper's mechanism for each image")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    args.device = select_device(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    files = source_files(args.source)
    det = load_detector(args.checkpoint, args.device)
    out = output_dir(args.out, files, args.source)
    print(f"{det.name} from {args.checkpoint} on {len(files)} file(s), {args.device}; threshold {args.threshold}")
    summary = detect_files(det, files, out, args.threshold, args.explain)
    skipped = f", {len(summary['skipped'])} skipped (not readable images)" if summary["skipped"] else ""
    print(f"{summary['images']} image(s){skipped}, {summary['detections']} detections at or above "
          f"{args.threshold}: pictures{' and mechanism pictures' if args.explain else ''} and detections.json "
          f"in {out}")
    return summary


if __name__ == "__main__":
    run_cli(main)
