"""Run a trained detector of this library on your own images: annotated pictures and COCO results.

    python detect.py --checkpoint runs/smca-shapes/checkpoint.pth --source data/shapes/val
    python detect.py --checkpoint CKPT --source 'photos/*.jpg' --threshold 0.5 --out runs/detect/photos
    python detect.py --checkpoint CKPT --source photo.png --explain     # + the paper's mechanism

The checkpoint (what train.py writes) says which model and Config it is, which categories it knows
(their names; a checkpoint without them uses the names of the data it was trained on when that is
on this machine, else the ids) and which evaluation transform it was trained for: no model flag
is repeated. The authors' released SMCA-DETR, Sparse DETR and Focus-DETR weights work the same
way (recognised by their keys, converted by the model file's from_official; COCO's names).
--source is an image file, a folder (every file in it, sorted) or a glob. One bad file does not stop the run:
a file that is not a readable image is skipped, and an image that fails later (the transform, e.g. an aspect ratio
too extreme to resize; the model; drawing or writing its pictures) fails, each with a warning naming the file and
the error, and the other images go on. The run then ends with an error (exit status 1) that counts them, after
everything else is written. The authors' Focus-DETR files encode positions by their training schedule, guessed from
the file name: --official-schedule 12ep / 24ep / 36ep states it.

Written to --out (default runs/detect/exp, exp2, ... : a new folder every run; an existing,
non-empty --out is refused, and so is one inside the source folder, which is never written to):
- one annotated copy of each image done (boxes, class names and scores, a colour per class);
- with --explain, NAME_explain.png: the paper's mechanism for the image (SMCA: the top 3 queries'
  Gaussian priors; Sparse DETR: token scores, selected tokens and the DAM; Lite DETR: F_L / F_H
  and the top 3 queries' sampling points; Focus-DETR: foreground scores and the per-layer kept and
  fine-grained tokens), from the model's `explain=True` outputs;
- detections.json: every detection at or above --threshold in the COCO results format
  ({"image_id", "file_name", "category_id", "bbox": [x, y, w, h] in pixels of the original image,
  "score"}), image ids 1, 2, ... of the images done, in the order they were read; the skipped and failed files
  have no entry. It is written whatever happens: with the images done so far when an exception (Ctrl-C, a
  KeyboardInterrupt) stops the run, which is then raised again.
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
from data.transforms import RandomResize, resized_hw
from engine import visualize
from engine.runtime import MODELS, SHAPES_ROOT, load_checkpoint, model_module, run_cli, select_device

KEEP_FORMAT = (".jpg", ".jpeg", ".png")  # annotated copies keep these formats; others are written as PNG
SCHEDULES = ("12ep", "24ep", "36ep")  # the authors' Focus-DETR configs (focus_detr.from_official's schedule=)


@dataclasses.dataclass
class Detector:
    name: str  # the model file: smca, sparse_detr, lite_detr, focus_detr
    model: torch.nn.Module  # in eval mode, on its device
    postprocess: torch.nn.Module
    transform: object  # the evaluation transform (data.make_transforms("val", ...))
    names: dict  # category id -> name
    device: torch.device
    scales: str = None  # the evaluation sizes it was trained for: "shapes" or "coco" (datalib.*_SCALES); None: unknown


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


def load_detector(path, device="cpu", official_schedule=None):
    """A train.py checkpoint, or the authors' released weights (SMCA-DETR, Sparse DETR, Focus-DETR:
    the file as published, converted by the model file's from_official; COCO sizes) -> Detector.
    official_schedule "12ep" / "24ep" / "36ep": an authors' Focus-DETR file's training schedule (its encoder's sine
    positions; default: guessed from the file name); refused for any other file. ValueError for a missing file or
    one of no model here."""
    if official_schedule is not None and official_schedule not in SCHEDULES:
        raise ValueError(f"--official-schedule must be one of {', '.join(SCHEDULES)}, got {official_schedule!r}")
    try:  # weights only: the authors' files and plain state dicts
        state, extra = read_state_dict(path, "checkpoint")
    except ValueError:  # missing, or one of our checkpoints (numpy RNG states): load_checkpoint says
        state, extra = None, {}
    official = official_model(state) if state is not None and "model_name" not in extra else None
    if official_schedule is not None and official not in (None, "focus_detr"):
        raise ValueError(f"--official-schedule {official_schedule}: only the authors' Focus-DETR files take a "
                         f"schedule; {path!r} is the authors' {official} weights")
    if official:
        module = model_module(official)
        schedule = {} if official_schedule is None else {"schedule": official_schedule}  # only focus_detr's takes it
        cfg, converted, notes = module.from_official(path, **schedule)
        model, _, postprocess = module.build(cfg)
        model.load_state_dict(converted)
        print(f"{path}: the authors' {module.__name__} weights" + "".join(f"; {n}" for n in notes))
        transform = datalib.make_transforms("val", **datalib.COCO_SCALES)
        return Detector(module.__name__, model.eval().to(torch.device(device)), postprocess, transform,
                        dict(COCO_NAMES), torch.device(device), "coco")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("model_name") not in MODELS or \
            not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise ValueError(f"{path!r} is not a checkpoint of a model of this library ({', '.join(MODELS)}) nor "
                         f"the authors' SMCA-DETR, Sparse DETR or Focus-DETR weights; train.py writes ours as "
                         f"OUTPUT_DIR/checkpoint.pth")
    if official_schedule is not None:
        raise ValueError(f"--official-schedule {official_schedule}: only the authors' Focus-DETR files take a "
                         f"schedule; {path!r} is a checkpoint of this library, whose Config says it")
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
                    checkpoint_categories(ckpt), device, scales)


def model_input(det, image):
    """image: PIL RGB -> det.transform's (3, H, W) tensor. ValueError for an image too thin to resize (the
    transform would give it a side of 0 px: above about 2 * max_size : 1, 2666:1 at COCO's sizes)."""
    w, h = image.size
    for t in getattr(det.transform, "transforms", ()):  # data.make_transforms' Compose: check before PIL fails
        if isinstance(t, RandomResize):
            for size in t.sizes:
                H, W = resized_hw(w, h, size, t.max_size)
                if min(H, W) < 1:
                    raise ValueError(f"aspect ratio {w}:{h} too extreme to resize: the evaluation transform (short "
                                     f"side {size}, long side at most {t.max_size} px) would make it {W} x {H} px")
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    x, _ = det.transform(image, empty, random.Random(0))  # (3, H, W); the val transform draws nothing
    if min(x.shape[1:]) < 1:
        raise ValueError(f"aspect ratio {w}:{h} too extreme to resize: the evaluation transform made it "
                         f"{x.shape[2]} x {x.shape[1]} px")
    return x


@torch.no_grad()
def detect_image(det, image, threshold=0.3, explain=False, top=3):
    """image: PIL RGB -> ({boxes (M, 4) xyxy, labels (M,), scores (M,)} in original pixels, clipped to
    the image, at or above threshold, best first; and with explain the mechanism picture (PIL), else
    None). Only ids of the checkpoint's categories are classes (when it knows them). ValueError for an image too
    thin to resize (model_input)."""
    x = model_input(det, image).to(det.device)  # (3, H, W)
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


def _write_results(results, out):
    """detections.json, through a temporary file: an interrupted write never leaves half a file."""
    path = os.path.join(out, "detections.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)


def _detect_and_draw(det, image, path, image_id, stem, out, threshold, explain):
    """One image -> its rows of detections.json, its pictures written into `out` as STEM.EXT (and
    STEM_explain.png). When it fails, what it wrote is removed and the error is raised again, as
    ValueError("at STAGE: ERROR") for an Exception."""
    written, stage = [], "detection (the transform or the model)"
    try:
        dets, picture = detect_image(det, image, threshold, explain)
        rows = [{"image_id": image_id, "file_name": path, "category_id": int(label),
                 "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                 "score": round(float(score), 5)}
                for box, label, score in zip(dets["boxes"].tolist(), dets["labels"].tolist(), dets["scores"].tolist())]
        stage = "drawing"
        ext = os.path.splitext(path)[1]
        written.append(os.path.join(out, stem + (ext if ext.lower() in KEEP_FORMAT else ".png")))
        visualize.draw_detections(image, dets["boxes"], dets["labels"], dets["scores"], det.names).save(written[-1])
        if picture is not None:  # 256 colours: a third of the size, the same picture to the eye
            written.append(os.path.join(out, f"{stem}_explain.png"))
            picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                written[-1], optimize=True)
        return rows
    except BaseException as e:
        for f in written:
            if os.path.exists(f):
                os.remove(f)
        if isinstance(e, Exception):
            raise ValueError(f"at {stage}: {type(e).__name__}: {e}") from e
        raise


def detect_files(det, files, out, threshold=0.3, explain=False, log=print):
    """Detect on every file, write the pictures and detections.json into `out` (created). One bad file does not
    stop the run: a file that is not a readable image is skipped; an image that fails later (the transform, e.g. an
    aspect ratio too extreme to resize; the model; drawing or writing its pictures) fails, its pictures removed and
    its detections left out. Each gets a warning on stderr naming the file and the error, and the others go on.
    detections.json holds the images done; it is written whatever happens, also when an exception such as
    KeyboardInterrupt stops the run (with the images done so far; the exception is then raised again).
    -> {"images": n done, "skipped": [paths, not readable images], "failed": {path: the error}, "detections": n,
    "out": out}"""
    os.makedirs(out, exist_ok=True)
    results, skipped, failed, used, start, last = [], [], {}, set(), time.time(), 0.0
    n_done, finished = 0, False
    try:
        for i, path in enumerate(files):
            try:
                image = load_rgb(path, exif_orientation=True)  # as a viewer shows it: boxes in those coordinates
            except Exception as e:  # not an image, truncated, unreadable
                print(f"warning: skipped {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
                skipped.append(path)
                outcome = "skipped"
            else:
                stem = os.path.splitext(os.path.basename(path))[0]
                name, n = stem, 1
                while name in used:  # the same file name from two folders of a glob
                    n += 1
                    name = f"{stem}_{n}"
                try:
                    rows = _detect_and_draw(det, image, path, n_done + 1, name, out, threshold, explain)
                except ValueError as e:
                    print(f"warning: failed on {path} {e}; left out, the other images go on", file=sys.stderr)
                    failed[path] = str(e)
                    outcome = "failed"
                else:
                    used.add(name)
                    results.extend(rows)
                    n_done += 1
                    outcome = f"{len(rows)} detections"
            if time.time() - last > 2 or i + 1 == len(files):  # a progress line every 2 s and at the end
                last = time.time()
                log(f"[{i + 1}/{len(files)}] {path}: " + outcome + f" ({time.time() - start:.1f} s)")
        finished = True
    finally:
        _write_results(results, out)
        if not finished:
            print(f"stopped: detections.json in {out} holds the {n_done} image(s) done", file=sys.stderr)
    return {"images": n_done, "skipped": skipped, "failed": failed, "detections": len(results), "out": out}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by train.py")
    p.add_argument("--source", required=True, help="an image file, a folder of images, or a glob (quote it)")
    p.add_argument("--out", default=None, help="output folder (default runs/detect/exp, exp2, ...)")
    p.add_argument("--threshold", type=float, default=0.3, help="keep detections scoring at least this (0..1)")
    p.add_argument("--explain", action="store_true", help="also draw the paper's mechanism for each image")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--official-schedule", choices=SCHEDULES, default=None,
                   help="an authors' Focus-DETR file's training schedule, which sets its encoder's sine positions "
                        "(default: guessed from the file name, 12ep when it names none)")
    args = p.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    args.device = select_device(args)
    return args


def main(argv=None):
    """-> detect_files' summary. ValueError (exit status 1 from the command line) after everything is written when
    a file was skipped or an image failed."""
    args = parse_args(argv)
    files = source_files(args.source)
    det = load_detector(args.checkpoint, args.device, args.official_schedule)
    out = output_dir(args.out, files, args.source)
    print(f"{det.name} from {args.checkpoint} on {len(files)} file(s), {args.device}; threshold {args.threshold}")
    summary = detect_files(det, files, out, args.threshold, args.explain)
    skipped, failed = len(summary["skipped"]), len(summary["failed"])
    if summary["images"] == 0 and not failed:
        raise ValueError(f"none of the {len(files)} source files is a readable image")
    problems = ([f"{failed} image(s) failed"] if failed else []) + \
        ([f"{skipped} file(s) skipped (not readable images)"] if skipped else [])
    print(f"{summary['images']} image(s) done" + "".join(f", {p}" for p in problems) +
          f"; {summary['detections']} detections at or above {args.threshold}: "
          f"pictures{' and mechanism pictures' if args.explain else ''} and detections.json in {out}")
    if problems:
        raise ValueError(f"{' and '.join(problems)} of the {len(files)} source files (the warnings above name them "
                         f"and why); the results of the {summary['images']} image(s) done are in "
                         f"{os.path.join(out, 'detections.json')}")
    return summary


if __name__ == "__main__":
    run_cli(main)
