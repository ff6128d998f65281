"""Tests of detect.py: files, folders and globs, bad inputs, the mechanism pictures, the authors' weights.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data as datalib
import detect
import train
from tests.helpers import (_official_file, _tiny_checkpoint)


# ---------------------------------------------------------------------------------------------
# detect.py and visualize.py
# ---------------------------------------------------------------------------------------------

def test_detect_on_a_file_a_folder_and_a_glob_writes_pictures_and_coco_results(tiny_shapes, tmp_path):
    from pycocotools.coco import COCO
    ckpt = tmp_path / "ckpt.pth"
    cats = _tiny_checkpoint(ckpt, tiny_shapes)
    folder = tmp_path / "photos"
    os.makedirs(folder)
    val = os.path.join(tiny_shapes, "val")
    for f in sorted(os.listdir(val)):
        Image.open(os.path.join(val, f)).save(folder / f.replace(".jpg", ".png"))
    (folder / "notes.txt").write_text("not an image")
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    for source, n_images in [(str(folder / "000000.png"), 1), (str(folder), 3), (str(folder / "*.png"), 3)]:
        out = tmp_path / f"out{n_images}{len(source)}"
        summary = detect.main(["--checkpoint", str(ckpt), "--source", source, "--out", str(out), "--threshold", "0.05"])
        assert summary["images"] == n_images and len(summary["skipped"]) == (1 if source == str(folder) else 0)
        files = detect.source_files(source)
        images = [f for f in files if f.endswith(".png")]
        gt = {"images": [{"id": i + 1, "file_name": f, **dict(zip(("width", "height"), Image.open(f).size))}
                         for i, f in enumerate(images)],
              "annotations": [], "categories": [{"id": k, "name": v} for k, v in cats.items()]}
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        results = json.load(open(out / "detections.json"))
        assert results and summary["detections"] == len(results)
        dt = coco.loadRes(str(out / "detections.json"))  # the COCO results format, ids of the given images
        for r in dt.dataset["annotations"]:
            w, h = Image.open(images[r["image_id"] - 1]).size
            x, y, bw, bh = r["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01 and r["score"] >= 0.05
            assert r["category_id"] in cats and r["file_name"] == images[r["image_id"] - 1]
        first = results[0]
        original = np.asarray(Image.open(images[first["image_id"] - 1]).convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out / os.path.basename(images[first["image_id"] - 1]))).astype(int)
        assert drawn.shape == original.shape
        x, y, bw, bh = [int(round(v)) for v in first["bbox"]]
        edge = drawn[min(y, original.shape[0] - 1), x:x + max(bw, 1)]  # the box's top edge
        assert (edge != original[min(y, original.shape[0] - 1), x:x + max(bw, 1)]).any()
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before  # the source is untouched


def test_detect_refuses_bad_inputs_and_never_overwrites(tiny_shapes, tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes)
    val = os.path.join(tiny_shapes, "val")
    with pytest.raises(ValueError, match="does not exist"):
        detect.main(["--checkpoint", str(tmp_path / "absent.pth"), "--source", val])
    torch.save({"model": {}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a checkpoint of a model of this library"):
        detect.main(["--checkpoint", str(tmp_path / "other.pth"), "--source", val, "--out", str(tmp_path / "o1")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no files"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no such file or folder"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="no files"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "*.jpeg")])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="none of the 1 source files is a readable image"):
        detect.main(["--checkpoint", str(ckpt), "--source", str(tmp_path / "text"), "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="inside the source folder"):
        detect.main(["--checkpoint", str(ckpt), "--source", val, "--out", os.path.join(val, "out")])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "detections.json").write_text("[]")
    with pytest.raises(ValueError, match="not empty; nothing is overwritten"):
        detect.main(["--checkpoint", str(ckpt), "--source", val, "--out", str(tmp_path / "used")])
    assert (tmp_path / "used" / "detections.json").read_text() == "[]"
    with pytest.raises(ValueError, match="threshold"):
        detect.main(["--checkpoint", str(ckpt), "--source", val, "--threshold", "2"])


@pytest.mark.parametrize("name,kw", [("smca", {}), ("smca", {"multiscale": True}), ("smca", {"spatial_prior": False}),
                                     ("sparse_detr", {}), ("sparse_detr", {"sparse_encoder": False}), ("lite_detr", {}),
                                     ("focus_detr", {}), ("focus_detr", {"foreground_selection": False})],
                         ids=["smca", "smca-multiscale", "smca-detr-baseline", "sparse_detr", "sparse_detr-dense",
                              "lite_detr", "focus_detr", "focus_detr-dense"])
def test_detect_explain_picture_of_each_model(tiny_shapes, tmp_path, name, kw):
    """--explain writes one mechanism picture per image, for every model (and SMCA's variants)."""
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes, name, **kw)
    source = os.path.join(tiny_shapes, "val", "000000.jpg")
    detect.main(["--checkpoint", str(ckpt), "--source", source, "--out", str(tmp_path / "o"), "--explain"])
    picture = Image.open(tmp_path / "o" / "000000_explain.png")
    assert picture.size[0] >= 240 and picture.size[1] > 240  # panels enlarged to 240 px or more


def test_detect_and_eval_take_the_authors_weights(tiny_shapes, tmp_path, monkeypatch):
    """The authors' file goes where our checkpoints go: detect.py recognises and converts it (COCO
    names), train.py --eval-only --official evaluates it (also on the readable path); wrong uses are refused."""
    import argparse
    _, path, _ = _official_file(tmp_path, "smca_single_scale.pt", lambda k: f"backbone.0.body.{k}",
                                {"args": argparse.Namespace(smooth=8)})
    det = detect.load_detector(path)
    assert det.name == "smca" and det.names[1] == "person" and det.model.cfg.num_queries == 20
    image = Image.open(os.path.join(tiny_shapes, "val", "000000.jpg")).convert("RGB").resize((96, 64))
    small = dataclasses.replace(det, transform=datalib.make_transforms("val", **datalib.SHAPES_SCALES))
    dets, _ = detect.detect_image(small,
                                  image, threshold=0.0)
    assert len(dets["scores"]) and set(dets["labels"].tolist()) <= set(det.names)
    result = train.main(["--model", "smca", "--data", tiny_shapes, "--eval-only", "--official", path, "--scales",
                         "shapes", "--output-dir", str(tmp_path / "eval"), "--batch-size", "3"])
    assert set(result["stats"]) >= {"AP", "AP50"} and not os.path.exists(tmp_path / "eval" / "checkpoint.pth")
    readable = train.main(["--model", "smca", "--data", tiny_shapes, "--eval-only", "--official", path, "--scales",
                           "shapes", "--output-dir", str(tmp_path / "eval2"), "--batch-size", "3", "--readable-path"])
    assert readable["stats"] == pytest.approx(result["stats"], abs=1e-6)
    assert common._fast_paths_on  # --readable-path switched the fast paths off inside train.main only
    with pytest.raises(ValueError, match="add --eval-only"):
        train.main(["--model", "smca", "--data", tiny_shapes, "--official", path, "--output-dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="no released weights"):
        train.main(["--model", "lite_detr", "--data", tiny_shapes, "--eval-only", "--official", path,
                    "--output-dir", str(tmp_path / "y")])


def test_detect_turns_a_photo_upright_by_its_exif_orientation(tiny_shapes, tmp_path, monkeypatch):
    """A JPEG stored on its side with EXIF orientation 6 (as a phone stores a portrait) is detected and drawn
    upright: the model gets the upright image, the picture has its size, the boxes lie inside it."""
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes)
    upright = Image.open(os.path.join(tiny_shapes, "val", "000000.jpg")).convert("RGB")
    upright = upright.crop((0, 0, upright.width, upright.height * 2 // 3))  # not square: a turn changes the size
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise to be shown
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the stored pixels: turned counter-clockwise
    os.makedirs(tmp_path / "photos")
    photo = tmp_path / "photos" / "portrait.jpg"
    stored.save(photo, quality=98, exif=exif)
    assert Image.open(photo).size == (upright.height, upright.width)
    seen = []
    detect_image = detect.detect_image
    monkeypatch.setattr(detect, "detect_image", lambda det, image, *a: seen.append(image) or detect_image(det, image,
                                                                                                            *a))
    detect.main(["--checkpoint", str(ckpt), "--source", str(photo), "--out", str(tmp_path / "out"),
                 "--threshold", "0"])
    (image,) = seen
    assert image.size == upright.size
    diff = np.abs(np.asarray(image).astype(int) - np.asarray(upright).astype(int)).mean()
    assert diff < 3  # the upright pixels, up to JPEG's rounding
    assert Image.open(tmp_path / "out" / "portrait.jpg").size == upright.size
    results = json.load(open(tmp_path / "out" / "detections.json"))
    assert results and all(r["bbox"][0] + r["bbox"][2] <= upright.width + 0.01 and
                           r["bbox"][1] + r["bbox"][3] <= upright.height + 0.01 for r in results)
