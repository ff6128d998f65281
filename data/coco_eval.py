"""COCO box evaluation with pycocotools, correct under DDP.

Each rank `update`s with its detections; `summarize` gathers them on every rank, keeps one set of
detections per image id (the DistributedSampler repeats images to even out ranks), and runs
COCOeval on the images that were evaluated. Returns AP, AP50, AP75, APs, APm, APl and per-class AP.
"""
import contextlib
import io

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


class CocoEvaluator:
    def __init__(self, coco_gt):
        self.coco_gt = coco_gt
        self.results = {}  # image_id -> list of COCO result dicts

    def update(self, predictions):
        """predictions: {image_id: {scores (k,), labels (k,), boxes (k, 4) xyxy pixels of the original image}}"""
        for img_id, p in predictions.items():
            boxes = p["boxes"].float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            self.results[int(img_id)] = [
                {"image_id": int(img_id), "category_id": int(c), "bbox": b, "score": float(s)}
                for c, b, s in zip(p["labels"].tolist(), xywh, p["scores"].tolist())]

    def gather(self):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.results)
            merged = {}
            for part in parts:
                merged.update(part)  # a repeated image id carries the same detections: keep one
            self.results = merged

    def summarize(self, class_names=None):
        """Returns {"stats": {name: value}, "per_class": {category_id: AP}, "text": printable table}."""
        self.gather()
        img_ids = sorted(self.results)
        dets = [d for i in img_ids for d in self.results[i]]
        if not img_ids or not dets:
            stats = {k: 0.0 for k in STAT_NAMES}
            return {"stats": stats, "per_class": {}, "text": "no detections: every AP is 0"}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = self.coco_gt.loadRes(dets)
            ev = COCOeval(self.coco_gt, coco_dt, "bbox")
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
        # precision: (iou thresholds, recall points, categories, area ranges, max dets)
        precision = ev.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k]
            per_class[cat_id] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        names = class_names or {}
        class_rows = [f"{names.get(c, str(c)):>20s}  {ap * 100:5.1f}" for c, ap in per_class.items()]
        rows = [f"{'category':>20s}  AP"] + class_rows
        return {"stats": stats, "per_class": per_class, "text": buf.getvalue() + "\n".join(rows)}
