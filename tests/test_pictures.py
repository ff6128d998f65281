"""Tests of engine/pictures.py: the threshold the pictures are drawn above (the best F1 on val), its matching
against COCO's. (The detector on files: tests/test_detect.py, through detect.py.)
"""
import contextlib
import io
import random

import numpy as np
import pytest

from engine import pictures


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def _gt(image_id, category_id, bbox, iscrowd=0):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


# Two images, four boxes and a crowd region. Outcomes: d1 hits A; d2 is A's duplicate; d3 is on B but of another
# class; d4 hits B; d5 hits C; d6 is on nothing; d7 hits D at IoU 0.5 exactly; d8 lies in the crowd region
# (ignored); d9 overlaps D at IoU 0.5 after d7 took it.
GROUND_TRUTH = [_gt(1, 1, [0, 0, 10, 10]), _gt(1, 1, [20, 20, 10, 10]), _gt(1, 2, [40, 0, 10, 10]),  # A, B, C
                _gt(2, 1, [0, 0, 20, 20]), _gt(2, 1, [50, 50, 40, 40], iscrowd=1)]  # D, a crowd
DETECTIONS = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [1, 0, 10, 10], 0.8), _det(1, 2, [20, 20, 10, 10], 0.7),
              _det(1, 1, [20, 20, 10, 10], 0.4), _det(1, 2, [40, 0, 10, 10], 0.2), _det(1, 1, [60, 60, 10, 10], 0.1),
              _det(2, 1, [0, 0, 20, 10], 0.6), _det(2, 1, [55, 55, 10, 10], 0.95), _det(2, 1, [0, 10, 20, 10], 0.5)]


def test_pictures_match_detections_by_hand():
    assert pictures.match_detections(DETECTIONS, GROUND_TRUTH) == [True, False, False, True, True, False, True,
                                                                  None, False]
    # greedy by score: the higher-scoring detection takes the box, even at a lower IoU than a later one's
    box = [_gt(3, 1, [0, 0, 10, 10])]
    assert pictures.match_detections([_det(3, 1, [0, 0, 10, 12], 0.25), _det(3, 1, [0, 0, 10, 10], 0.3)],
                                     box) == [False, True]
    # of two free boxes, a detection takes the one of higher IoU
    two = [_gt(4, 1, [0, 0, 10, 10]), _gt(4, 1, [2, 0, 10, 10])]
    assert pictures.match_detections([_det(4, 1, [2, 0, 10, 10], 0.9), _det(4, 1, [0, 0, 10, 10], 0.8)],
                                     two) == [True, True]
    assert pictures.match_detections([_det(5, 1, [0, 0, 10, 10], 0.9)], []) == [False]  # an image without boxes


def test_pictures_best_f1_threshold_by_hand():
    """The counts at each threshold of the grid, and the best F1: 4 TP and 3 FP of 4 boxes above 0.15 and 0.2
    (F1 8 / 11), the highest of the two chosen."""
    tp, fp, n_gt = pictures.f1_counts(DETECTIONS, GROUND_TRUTH)
    assert n_gt == 4 and len(tp) == len(fp) == len(pictures.THRESHOLDS) == 19
    expect = {0.05: (4, 4), 0.1: (4, 4), 0.15: (4, 3), 0.2: (4, 3), 0.25: (3, 3), 0.4: (3, 3), 0.45: (2, 3),
              0.5: (2, 3), 0.55: (2, 2), 0.6: (2, 2), 0.65: (1, 2), 0.7: (1, 2), 0.75: (1, 1), 0.8: (1, 1),
              0.85: (1, 0), 0.9: (1, 0), 0.95: (0, 0)}
    for t, counts in expect.items():
        k = pictures.THRESHOLDS.index(t)
        assert (tp[k], fp[k]) == counts, t
    chosen = pictures.best_f1_threshold(tp, fp, n_gt)
    assert chosen["value"] == 0.2 and chosen["f1"] == pytest.approx(8 / 11)
    assert chosen["precision"] == pytest.approx(4 / 7) and chosen["recall"] == 1.0
    # the counts of disjoint images add up
    first = pictures.f1_counts([d for d in DETECTIONS if d["image_id"] == 1], GROUND_TRUTH[:3])
    second = pictures.f1_counts([d for d in DETECTIONS if d["image_id"] == 2], GROUND_TRUTH[3:])
    assert (first[0] + second[0] == tp).all() and (first[1] + second[1] == fp).all() and first[2] + second[2] == 4
    nothing = pictures.best_f1_threshold(*pictures.f1_counts([], GROUND_TRUTH))
    assert nothing["f1"] == 0.0 and nothing["value"] == 0.95


def test_pictures_matching_agrees_with_cocoeval():
    """On random boxes, scores, classes and crowd regions: match_detections' true positives and ignored detections
    are COCOeval's at IoU 0.5 (area 'all', no cap on detections)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    rng = random.Random(0)

    def box():
        x, y = rng.uniform(0, 80), rng.uniform(0, 80)
        return [round(x, 1), round(y, 1), round(rng.uniform(4, 30), 1), round(rng.uniform(4, 30), 1)]
    images, gts, dets = range(1, 9), [], []
    for i in images:
        for _ in range(rng.randint(0, 6)):
            gts.append({**_gt(i, rng.randint(1, 2), box(), int(rng.random() < 0.15)), "id": len(gts) + 1})
        for _ in range(rng.randint(0, 25)):
            near = rng.choice([g for g in gts if g["image_id"] == i] or [None])  # a box's duplicates, or anywhere
            if near is None or rng.random() < 0.3:
                category, bbox = rng.randint(1, 2), box()
            else:
                category, bbox = near["category_id"], [v + rng.uniform(-2, 2) for v in near["bbox"]]
            dets.append({**_det(i, category, bbox, round(rng.random(), 4)), "id": len(dets) + 1})
    for g in gts:
        g["area"] = g["bbox"][2] * g["bbox"][3]
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in images], "annotations": gts,
                    "categories": [{"id": 1}, {"id": 2}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([{k: v for k, v in d.items() if k != "id"} for d in dets]), "bbox")
        ev.params.maxDets = [1000]
        ev.params.areaRng, ev.params.areaRngLbl = [ev.params.areaRng[0]], ["all"]
        ev.evaluate()
    theirs = {}
    for e in ev.evalImgs:
        if e is None:
            continue
        for d, matched, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
            theirs[d] = None if ignored else bool(matched)
    loaded = sorted(ev.cocoDt.anns.values(), key=lambda d: d["id"])  # loadRes numbers them 1, 2, ... in order
    ours = pictures.match_detections(dets, gts)
    assert ours == [theirs[d["id"]] for d in loaded]
    assert len(theirs) == len(dets) > 50 and sum(o is True for o in ours) > 10 and None in ours
    assert np.isfinite(pictures.best_f1_threshold(*pictures.f1_counts(dets, gts))["f1"])
