"""Tests of data/: the shapes set, transforms, the COCO-format dataset, batching, evaluation.
"""
import json
import math
import os
import re
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data as datalib
from data import shapes


# ---------------------------------------------------------------------------------------------
# data/: the shapes set, transforms, the COCO-format dataset, batching, evaluation
# ---------------------------------------------------------------------------------------------

def test_shapes_generator_is_deterministic_and_coco_like(tiny_shapes, tmp_path):
    shapes.generate(str(tmp_path / "again"), num_train=8, num_val=3, seed=3)
    for split in ("train", "val"):
        a = json.load(open(os.path.join(tiny_shapes, "annotations", f"instances_{split}.json")))
        b = json.load(open(tmp_path / "again" / "annotations" / f"instances_{split}.json"))
        assert a == b
    ids = [c["id"] for c in a["categories"]]
    assert len(ids) >= 4 and ids != list(range(min(ids), min(ids) + len(ids)))  # non-contiguous
    ds = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "train"))
    assert ds.num_classes == max(ids) + 1
    sizes = {tuple(ds.coco.imgs[i][k] for k in ("width", "height")) for i in ds.ids}
    assert len(sizes) > 1  # images of varying size, so batches pad
    with pytest.raises(ValueError, match="not the shapes set asked for .*seed 4"):
        shapes.ensure(tiny_shapes, 8, 3, seed=4)  # never overwrites another set


def test_shapes_set_keeps_cocos_mix_of_sizes_and_several_objects_per_image(tmp_path):
    """Format 2's promises: at least 3 objects per image on average; small (< 32^2), medium and large
    (> 96^2) objects all present; every shape of a colour that differs from the background under it."""
    shapes.generate(str(tmp_path / "s"), num_train=60, num_val=1, seed=5)
    ann = json.load(open(tmp_path / "s" / "annotations" / "instances_train.json"))
    areas = np.array([a["area"] for a in ann["annotations"]])
    assert len(areas) / len(ann["images"]) >= 3
    assert (areas < 32 ** 2).mean() > 0.15 and (areas > 96 ** 2).mean() > 0.05
    assert ((areas >= 32 ** 2) & (areas <= 96 ** 2)).mean() > 0.3
    assert ann["info"]["version"] == shapes.FORMAT_VERSION


def test_shapes_ensure_moves_an_older_version_aside_and_refuses_strangers(tiny_shapes, tmp_path):
    import shutil
    root = str(tmp_path / "shapes")
    shutil.copytree(tiny_shapes, root)
    open(os.path.join(root, "checkpoint_next_to_it.pth"), "w").write("user file")
    for split in ("train", "val"):  # make it an older version of the set
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        d = json.load(open(path))
        d["info"]["version"] = shapes.FORMAT_VERSION - 1
        json.dump(d, open(path, "w"))
    shapes.ensure(root, 8, 3, seed=3)
    aside = f"{root}-v{shapes.FORMAT_VERSION - 1}"
    assert open(os.path.join(aside, "checkpoint_next_to_it.pth")).read() == "user file"  # kept, moved aside
    with open(os.path.join(root, "annotations", "instances_val.json")) as f:
        assert json.load(f)["info"]["version"] == shapes.FORMAT_VERSION
    shutil.copytree(aside, root + "2")
    shutil.copytree(aside, root + "2-v1")  # where it would go is taken: refuse, touch nothing
    with pytest.raises(ValueError, match="version 1 of the shapes set.*exists"):
        shapes.ensure(root + "2", 8, 3, seed=3)
    os.makedirs(tmp_path / "mine")
    with pytest.raises(ValueError, match="not the shapes set asked for"):
        shapes.ensure(str(tmp_path / "mine"), 8, 3, seed=3)
    assert os.listdir(tmp_path / "mine") == []


def test_transforms_keep_boxes_on_the_object():
    """A red rectangle on black: after flip / resize / crop the box must still frame the red pixels."""
    tf = datalib.make_transforms("train", **datalib.SHAPES_SCALES)
    arr = np.zeros((180, 240, 3), dtype=np.uint8)
    arr[40:100, 150:210, 0] = 255
    img = Image.fromarray(arr)
    random.seed(0)
    seen_empty = seen_box = 0
    for _ in range(40):
        x, t = tf(img, {"boxes": torch.tensor([[150.0, 40.0, 210.0, 100.0]]), "labels": torch.tensor([3])})
        red = x[0] * 0.229 + 0.485 > 0.5  # undo the normalisation of the red channel
        h, w = x.shape[1:]
        assert tuple(t["size"].tolist()) == (h, w)
        if len(t["boxes"]) == 0:
            seen_empty += 1
            assert red.sum() <= 2 * max(h, w)  # at most a sliver of the object survives the crop
            continue
        seen_box += 1
        ys, xs = torch.nonzero(red, as_tuple=True)
        cx, cy, bw, bh = (t["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        measured = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert np.allclose([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], measured, atol=2.0)
    assert seen_box > 20


def _write_coco(root, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 4, "name": "b"})):
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": list(categories)}, f)


def test_dataset_image_modes_and_box_hygiene(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "val"))
    modes = {"gray.png": Image.new("L", (40, 30), 128), "pal.png": Image.new("P", (40, 30), 3),
             "rgba.png": Image.new("RGBA", (40, 30), (1, 2, 3, 4)), "cmyk.jpg": Image.new("CMYK", (40, 30)),
             "deep.png": Image.fromarray(np.full((30, 40), 60000, dtype=np.uint16))}
    images = []
    for i, (name, im) in enumerate(modes.items(), start=1):
        im.save(os.path.join(root, "val", name))
        images.append({"id": i, "file_name": name, "width": 40, "height": 30})
    anns = [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 1},  # crowd
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [30, 20, 20, 20], "iscrowd": 0}]  # clipped
    _write_coco(root, images, anns)
    ds = datalib.CocoDetection(*datalib.find_split(root, "val"))
    assert len(ds) == 5 and ds.num_classes == 5 and ds.dropped_boxes == 1
    for i in range(5):
        im, t = ds[i]
        assert im.mode == "RGB" and im.size == (40, 30)
    assert ds[4][0].getpixel((0, 0))[0] > 200  # 16-bit 60000 scales to bright, not clipped to white noise
    assert ds[0][1]["labels"].tolist() == [4]  # crowd and zero-width left out
    assert ds[1][1]["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]
    assert len(ds[2][1]["boxes"]) == 0  # images without annotations stay in


def test_dataset_errors_name_the_file(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ValueError, match="no 'val' split"):
        datalib.find_split(root, "val")
    _write_coco(root, [{"id": 7, "file_name": "x.jpg", "width": 10, "height": 10}], [])
    with pytest.raises(ValueError, match=r"image id 7: file .*x.jpg is missing"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    (tmp_path / "val" / "x.jpg").write_bytes(b"garbage")
    ds = datalib.CocoDetection(*datalib.find_split(root, "val"))
    image, target = ds[0]  # not decodable: the item says so, collate leaves it out (train.py counts it)
    assert image is None and target["image_id"] == 7 and re.search(r"cannot read .*x.jpg", target["error"])
    images, pad_mask, targets = datalib.collate([(image, target)])
    assert images.shape[0] == 0 and len(targets) == 0 and targets.skipped == [(7, target["error"])]
    _write_coco(root, [{"id": 7, "file_name": "x.jpg"}],
                [{"id": 9, "image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="annotation 9 of image id 7 has category_id 3"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    orphan = {"id": 9, "image_id": 8, "category_id": 1, "bbox": [0, 0, 1, 1]}
    _write_coco(root, [{"id": 7, "file_name": "x.jpg"}], [orphan])
    with pytest.raises(ValueError, match="image id 8"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    ann = tmp_path / "annotations" / "instances_val.json"
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="instances_val.json is not valid JSON"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lacks the COCO key"):
        datalib.CocoDetection(*datalib.find_split(root, "val"))


def test_collate_pads_bottom_right():
    a, b = torch.ones(3, 4, 5), torch.ones(3, 6, 3)
    images, pad_mask, _ = datalib.collate([(a, {}), (b, {})])
    assert images.shape == (2, 3, 6, 5) and pad_mask.shape == (2, 6, 5)
    assert not pad_mask[0, :4, :5].any() and pad_mask[0, 4:].all() and pad_mask[1, :, 3:].all()
    assert images[0, :, 4:].abs().sum() == 0
    assert torch.equal(common.valid_image_sizes(pad_mask), torch.tensor([[5.0, 4.0], [3.0, 6.0]]))


def test_evaluator_perfect_detections_score_one(tiny_shapes):
    ds = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "val"))
    ev = datalib.CocoEvaluator(ds.coco)
    for img_id in ds.ids[:2] * 2:  # an image repeated (as the distributed sampler does) counts once
        anns = [a for a in ds.coco.imgToAnns[img_id] if not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns]).view(-1, 4)
        ev.update({img_id: {"scores": torch.ones(len(anns)), "labels": torch.tensor([a["category_id"] for a in anns]),
                            "boxes": boxes}})
    res = ev.summarize(ds.categories)
    assert res["stats"]["AP"] == pytest.approx(1.0) and res["stats"]["AP50"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) or math.isnan(v) for v in res["per_class"].values())
    assert datalib.CocoEvaluator(ds.coco).summarize()["stats"]["AP"] == 0.0
