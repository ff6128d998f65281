"""A trained detector on image files: its detections, the annotated pictures, the paper's mechanism pictures, and
the score threshold the pictures are drawn above. What detect.py (your images) and train.py (a run's closing
pictures of val images) share; reading a detector from a file is detect.py's `load_detector`.

The threshold. A picture shows the detections scoring at least a threshold; the one a detector carries is chosen
on the val split at each evaluation of a training run (`best_f1_threshold`; the checkpoint of the evaluated weights
keeps it): the score threshold, on the grid 0.05, 0.10, ...,
0.95, whose detections have the best F1 over all val images. A detection is a true positive when it matches a
ground-truth box of its class that no higher-scoring detection matched, at IoU >= 0.5 (`match_detections`: greedy
by score, as COCO's evaluation matches); F1 = 2 TP / (2 TP + FP + FN). A detector without one (a checkpoint
written before, the authors' weights) draws at DEFAULT_THRESHOLD.
"""
import dataclasses
import json
import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image

from common import box_cxcywh_to_xyxy
from data.coco import load_rgb
from data.transforms import RandomResize, resized_hw
from engine import visualize

KEEP_FORMAT = (".jpg", ".jpeg", ".png")  # annotated copies keep these formats; others are written as PNG
DEFAULT_THRESHOLD = 0.3  # the pictures' threshold for a detector that carries none
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # the grid best_f1_threshold chooses from
IOU_MATCH = 0.5  # a detection matches a ground-truth box at this IoU or more


@dataclasses.dataclass
class Detector:
    name: str  # the model file: smca, sparse_detr, lite_detr, focus_detr
    model: torch.nn.Module  # in eval mode, on its device
    postprocess: torch.nn.Module
    transform: object  # the evaluation transform (data.make_transforms("val", ...))
    names: dict  # category id -> name
    device: torch.device
    scales: str = None  # the evaluation sizes it was trained for: "shapes" or "coco" (datalib.*_SCALES); None: unknown
    threshold: dict = None  # the checkpoint's chosen threshold (best_f1_threshold's dict); None: it has none


# ---------------------------------------------------------------------------------------------
# Detections and pictures
# ---------------------------------------------------------------------------------------------

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
def detect_image(det, image, threshold=DEFAULT_THRESHOLD, explain=False, top=3):
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


def detect_files(det, files, out, threshold=DEFAULT_THRESHOLD, explain=False, log=print):
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


# ---------------------------------------------------------------------------------------------
# The threshold: the best F1 on the val split
# ---------------------------------------------------------------------------------------------

def _ious(dets, gts, crowd):
    """dets (D, 4), gts (G, 4) COCO xywh boxes, crowd (G,) bool -> (D, G): IoU, and over a crowd region the
    intersection over the detection's area (as COCO's evaluation)."""
    d, g = np.asarray(dets, dtype=np.float64).reshape(-1, 4), np.asarray(gts, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(d[:, None, 0], g[None, :, 0])
    y0 = np.maximum(d[:, None, 1], g[None, :, 1])
    x1 = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2])
    y1 = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)  # (D, G)
    area_d, area_g = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd[None, :], area_d[:, None], area_d[:, None] + area_g[None, :] - inter)
    return inter / np.maximum(union, 1e-12)


def match_detections(detections, annotations, iou_min=IOU_MATCH):
    """detections: COCO results ({"image_id", "category_id", "bbox": [x, y, w, h], "score"}); annotations: COCO
    ground truth ({"image_id", "category_id", "bbox", "iscrowd" optional}). -> per detection, in the given order:
    True (a true positive), False (a false positive) or None (ignored: on a crowd region).

    COCO's matching, per image and class: the detections by descending score each take the unmatched ground-truth
    box of highest IoU at iou_min or more; one left without takes a crowd region instead (IoU there: the
    intersection over the detection's area; any number of detections may), and is ignored."""
    groups = {}  # (image id, category id) -> ([detection indices], [annotations])
    for i, d in enumerate(detections):
        groups.setdefault((d["image_id"], d["category_id"]), ([], []))[0].append(i)
    for a in annotations:
        if (a["image_id"], a["category_id"]) in groups:
            groups[a["image_id"], a["category_id"]][1].append(a)
    outcome = [False] * len(detections)
    for idx, gts in groups.values():
        if not gts:
            continue
        gts = sorted(gts, key=lambda a: bool(a.get("iscrowd")))  # the boxes first, then the crowd regions
        crowd = np.array([bool(a.get("iscrowd")) for a in gts])
        order = sorted(idx, key=lambda i: -detections[i]["score"])  # stable: ties keep their order
        ious = _ious([detections[i]["bbox"] for i in order], [a["bbox"] for a in gts], crowd)  # (D, G)
        taken = np.zeros(len(gts), dtype=bool)
        for row, i in zip(ious, order):
            candidates = np.flatnonzero(~crowd & ~taken & (row >= iou_min))
            if len(candidates):
                best = candidates[np.argmax(row[candidates])]
                taken[best] = True
                outcome[i] = True
            elif (crowd & (row >= iou_min)).any():
                outcome[i] = None
    return outcome


def f1_counts(detections, annotations, thresholds=THRESHOLDS, iou_min=IOU_MATCH):
    """-> (true positives, false positives) at each threshold (the detections scoring at least it; numpy int64
    arrays), and the number of ground-truth boxes (crowd regions not counted): sums over images, so the counts of
    disjoint sets of images add up."""
    outcome = match_detections(detections, annotations, iou_min)
    scores = np.array([d["score"] for d in detections], dtype=np.float64)
    hit = np.array([o is True for o in outcome], dtype=bool)
    miss = np.array([o is False for o in outcome], dtype=bool)
    above = scores[None, :] >= np.asarray(thresholds, dtype=np.float64)[:, None]  # (T, detections)
    n_gt = sum(1 for a in annotations if not a.get("iscrowd"))
    return (above & hit).sum(1), (above & miss).sum(1), n_gt


def best_f1_threshold(tp, fp, n_gt, thresholds=THRESHOLDS):
    """f1_counts' counts -> {"value": the threshold of the best F1 (the highest one of equal F1: fewer boxes drawn
    for the same F1), "f1", "precision", "recall"} at it."""
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    fn = n_gt - tp
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
    k = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last of the best
    precision = tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else 0.0
    recall = tp[k] / n_gt if n_gt else 0.0
    return {"value": float(thresholds[k]), "f1": float(f1[k]), "precision": float(precision),
            "recall": float(recall)}
