"""COCO box evaluation with pycocotools, correct under DDP.

Each rank `update`s with its detections; `summarize` gathers them on rank 0, keeps one set of
detections per image id (the DistributedSampler repeats images to even out ranks), runs COCOeval
there once on the images that were evaluated, and gives every rank the result. Returns AP, AP50,
AP75, APs, APm, APl and per-class AP (NaN for a class with no ground truth among those images).
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

    def summarize(self, class_names=None):
        """Returns {"stats": {name: value}, "per_class": {category_id: AP}, "text": printable table}, on every
        rank; COCOeval runs on rank 0 only."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._summarize(self.results, class_names)
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(self.results, parts, dst=0)
        result = [None]
        if dist.get_rank() == 0:
            merged = {}
            for part in parts:
                merged.update(part)  # a repeated image id carries the same detections: keep one
            result = [self._summarize(merged, class_names)]
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def _summarize(self, results, class_names):
        img_ids = sorted(results)
        dets = [d for i in img_ids for d in results[i]]
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
