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
import focus_detr
import train
from engine import pictures
from engine.runtime import MODELS, model_module, run_cli
from test_models import _detectron2_name
from tests.helpers import (OFFICIAL, _official_file, _tiny_checkpoint, tiny_smca)


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
        argv = ["--checkpoint", str(ckpt), "--source", source, "--out", str(out), "--threshold", "0.05"]
        files = detect.source_files(source)
        images = [f for f in files if f.endswith(".png")]
        if source == str(folder):  # notes.txt is skipped: the run ends with an error, after writing everything
            with pytest.raises(ValueError, match=r"1 file\(s\) skipped \(not readable images\) of the 4 source"):
                detect.main(argv)
            n_detections = None
        else:
            summary = detect.main(argv)
            assert summary["images"] == n_images and summary["skipped"] == [] and summary["failed"] == {}
            n_detections = summary["detections"]
        assert sorted(os.listdir(out)) == sorted([os.path.basename(f) for f in images] + ["detections.json"])
        gt = {"images": [{"id": i + 1, "file_name": f, **dict(zip(("width", "height"), Image.open(f).size))}
                         for i, f in enumerate(images)],
              "annotations": [], "categories": [{"id": k, "name": v} for k, v in cats.items()]}
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        results = json.load(open(out / "detections.json"))
        assert results and n_detections in (None, len(results))
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


def test_detect_reports_a_failing_image_keeps_the_others_and_exits_non_zero(tiny_shapes, tmp_path, capsys):
    """A folder with a good image, one too thin to resize (4000 x 1: 0 px at the evaluation sizes) and a text
    file: the good image's detections are in detections.json, the thin one fails and the text file is skipped, each
    named with its reason, and the command exits with status 1 after writing everything."""
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(os.path.join(tiny_shapes, "val", "000000.jpg")).save(folder / "a_good.png")
    Image.new("RGB", (4000, 1), (200, 40, 40)).save(folder / "b_thin.png")
    (folder / "c_notes.txt").write_text("not an image")
    good, thin, text = (str(folder / f) for f in ("a_good.png", "b_thin.png", "c_notes.txt"))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--source", str(folder), "--out", str(out), "--threshold", "0"]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: detect.main(argv))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"failed on {thin} at detection" in err and "aspect ratio 4000:1 too extreme to resize" in err
    assert f"skipped {text}: not a readable image" in err
    assert "error: 1 image(s) failed and 1 file(s) skipped (not readable images) of the 3 source files" in err
    assert str(out / "detections.json") in err
    results = json.load(open(out / "detections.json"))
    assert results and {(r["image_id"], r["file_name"]) for r in results} == {(1, good)}
    assert sorted(os.listdir(out)) == ["a_good.png", "detections.json"]  # nothing of the failed image
    summary = pictures.detect_files(detect.load_detector(str(ckpt)), detect.source_files(str(folder)),
                                    str(tmp_path / "lib"), threshold=0.0)  # the library reports the two apart
    assert summary["images"] == 1 and summary["detections"] == len(results) and summary["skipped"] == [text]
    assert list(summary["failed"]) == [thin] and "too extreme to resize" in summary["failed"][thin]
    with pytest.raises(ValueError, match="aspect ratio 1:4000 too extreme to resize"):  # tall as well as wide
        pictures.detect_image(detect.load_detector(str(ckpt)), Image.new("RGB", (1, 4000)))


class Flaky(torch.nn.Module):
    """The model, raising `error` at its call number `at`."""

    def __init__(self, model, at, error):
        super().__init__()
        self.model, self.at, self.error, self.calls = model, at, error, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.model(*args, **kwargs)


def test_detect_files_goes_on_past_a_model_or_drawing_error_and_writes_what_is_done_when_interrupted(
        tiny_shapes, tmp_path, monkeypatch):
    """An exception in the model or while drawing fails that image only (its pictures removed); a
    KeyboardInterrupt stops the run, but detections.json holds the images done before it is raised again."""
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes)
    det = detect.load_detector(str(ckpt))
    files = detect.source_files(os.path.join(tiny_shapes, "val"))  # 3 images
    flaky = dataclasses.replace(det, model=Flaky(det.model, 2, RuntimeError("out of memory (a stand-in)")))
    summary = pictures.detect_files(flaky, files, str(tmp_path / "model"), threshold=0.0)
    assert summary["images"] == 2 and summary["skipped"] == [] and list(summary["failed"]) == [files[1]]
    assert "RuntimeError: out of memory (a stand-in)" in summary["failed"][files[1]]
    results = json.load(open(tmp_path / "model" / "detections.json"))
    assert {(r["image_id"], r["file_name"]) for r in results} == {(1, files[0]), (2, files[2])}
    assert len(results) == summary["detections"]

    draw, calls = pictures.visualize.draw_detections, []

    class HalfWritten:  # the third picture: written, then the disk is full
        def __init__(self, picture):
            self.picture = picture

        def save(self, path):
            self.picture.save(path)
            raise OSError("disk full (a stand-in)")

    def draw_failing_once(*args):
        calls.append(1)
        return HalfWritten(draw(*args)) if len(calls) == 3 else draw(*args)
    monkeypatch.setattr(pictures.visualize, "draw_detections", draw_failing_once)
    summary = pictures.detect_files(det, files, str(tmp_path / "draw"), threshold=0.0, explain=True)
    assert list(summary["failed"]) == [files[2]] and "drawing: OSError: disk full" in summary["failed"][files[2]]
    assert sorted(os.listdir(tmp_path / "draw")) == ["000000.jpg", "000000_explain.png", "000001.jpg",
                                                     "000001_explain.png", "detections.json"]
    monkeypatch.undo()

    stopped = dataclasses.replace(det, model=Flaky(det.model, 2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pictures.detect_files(stopped, files, str(tmp_path / "stopped"), threshold=0.0)
    results = json.load(open(tmp_path / "stopped" / "detections.json"))
    assert results and {r["file_name"] for r in results} == {files[0]}


def test_detect_states_focus_detrs_schedule(tiny_shapes, tmp_path, capsys, monkeypatch):
    """--official-schedule reaches from_official's schedule= (the encoder's sine positions of the Config), over the
    file name's guess; a guess says it is one and how to state it; a bad value or another file is refused."""
    _, path, _ = _official_file(tmp_path, "focus_detr_r50_12ep_small.pt", _detectron2_name)
    named_36ep = tmp_path / "focus_detr_r50_4scale_36ep.pth"
    named_36ep.write_bytes(open(path, "rb").read())
    det = detect.load_detector(path)
    assert (det.model.cfg.pos_temperature, det.model.cfg.pos_offset) == (10000.0, -0.5)
    note = capsys.readouterr().out
    assert "sine positions of the 12ep config, guessed from the file name" in note and "--official-schedule" in note
    for file, schedule, temperature, offset in [(path, "36ep", 20.0, 0.0), (str(named_36ep), "12ep", 10000.0, -0.5)]:
        cfg = detect.load_detector(file, official_schedule=schedule).model.cfg
        assert (cfg.pos_temperature, cfg.pos_offset) == (temperature, offset)
        note = capsys.readouterr().out
        assert f"sine positions of the {schedule} config (as stated)" in note and "guessed" not in note
    with pytest.raises(ValueError, match="schedule must be '12ep', '24ep' or '36ep'"):
        focus_detr.from_official(path, schedule="48ep")
    with pytest.raises(ValueError, match="--official-schedule must be one of 12ep, 24ep, 36ep"):
        detect.load_detector(path, official_schedule="48ep")
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        detect.parse_args(["--checkpoint", path, "--source", tiny_shapes, "--official-schedule", "48ep"])
    smca_file = _official_file(tmp_path, "smca_single_scale.pt", lambda k: f"backbone.0.body.{k}")[1]
    with pytest.raises(ValueError, match="only the authors' Focus-DETR files take a schedule; .* the authors' smca"):
        detect.load_detector(smca_file, official_schedule="36ep")
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes, "focus_detr")
    with pytest.raises(ValueError, match="only the authors' Focus-DETR files take a schedule; .* of this library"):
        detect.load_detector(str(ckpt), official_schedule="12ep")
    seen = []

    def loaded(path, device, official_schedule=None):
        seen.append(official_schedule)
        raise ValueError("stop here")
    monkeypatch.setattr(detect, "load_detector", loaded)
    with pytest.raises(ValueError, match="stop here"):
        detect.main(["--checkpoint", path, "--source", os.path.join(tiny_shapes, "val"), "--official-schedule",
                     "24ep"])
    assert seen == ["24ep"]  # the command line's value is what load_detector gets


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
    assert det.threshold is None and detect.threshold_of(det)[0] == pictures.DEFAULT_THRESHOLD  # none chosen
    image = Image.open(os.path.join(tiny_shapes, "val", "000000.jpg")).convert("RGB").resize((96, 64))
    small = dataclasses.replace(det, transform=datalib.make_transforms("val", **datalib.SHAPES_SCALES))
    dets, _ = pictures.detect_image(small, image, threshold=0.0)
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
    detect_image = pictures.detect_image
    monkeypatch.setattr(pictures, "detect_image", lambda det, image, *a: seen.append(image) or detect_image(det, image,
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


def test_detect_asks_each_model_file_whether_a_file_is_its_authors():
    """official_model asks every model file's is_official (the keys its from_official requires): each authors' file
    is claimed by its own model file and no other; Lite DETR's claims none and its OFFICIAL_WEIGHTS says why; our
    state dicts are nobody's."""
    owners = {"smca_single_scale.pt": "smca", "sparse_detr_rho0.1.pt": "sparse_detr",
              "deformable_detr_two_stage_refine.pt": "sparse_detr", "focus_detr_r50_12ep_small.pt": "focus_detr"}
    for fixture, owner in owners.items():
        state = torch.load(os.path.join(OFFICIAL, fixture), weights_only=True)["state_dict"]
        assert [name for name in MODELS if model_module(name).is_official(state)] == [owner], fixture
        assert detect.official_model(state) == owner
    ours = model_module("smca").build(tiny_smca())[0].state_dict()
    assert detect.official_model(ours) is None and detect.official_model({}) is None
    for name in MODELS:
        module = model_module(name)
        assert isinstance(module.OFFICIAL_WEIGHTS, str) and module.OFFICIAL_WEIGHTS
        assert hasattr(module, "from_official") == (name != "lite_detr")
    assert "Lite-DINO only" in model_module("lite_detr").OFFICIAL_WEIGHTS


def test_detect_draws_above_the_checkpoints_chosen_threshold(tiny_shapes, tmp_path, capsys):
    """Without --threshold, detect.py keeps the detections scoring at least the threshold train.py chose and stored
    in the checkpoint, and says so; a checkpoint without one gets 0.3, saying why; --threshold overrides both."""
    ckpt = tmp_path / "ckpt.pth"
    _tiny_checkpoint(ckpt, tiny_shapes)
    source = os.path.join(tiny_shapes, "val")
    plain = detect.main(["--checkpoint", str(ckpt), "--source", source, "--out", str(tmp_path / "plain")])
    assert plain["threshold"] == pictures.DEFAULT_THRESHOLD == 0.3
    assert "threshold 0.3 (the default: these weights carry no threshold chosen" in capsys.readouterr().out
    scores = sorted(r["score"] for r in json.load(open(tmp_path / "plain" / "detections.json")))
    assert len(scores) > 2 and scores[0] < scores[-1]
    chosen = {"value": (scores[0] + scores[-1]) / 2, "f1": 0.5, "precision": 0.4, "recall": 0.6, "images": 3,
              "steps": 2, "how": "a stand-in"}
    torch.save({**torch.load(ckpt, weights_only=False), "threshold": chosen}, tmp_path / "chosen.pth")
    assert detect.load_detector(str(tmp_path / "chosen.pth")).threshold == chosen
    summary = detect.main(["--checkpoint", str(tmp_path / "chosen.pth"), "--source", source, "--out",
                           str(tmp_path / "chosen")])
    assert summary["threshold"] == chosen["value"]
    assert f"threshold {chosen['value']:g} (the checkpoint's: the best F1 on the val split, 0.50" in \
        capsys.readouterr().out
    kept = [r["score"] for r in json.load(open(tmp_path / "chosen" / "detections.json"))]
    assert kept == [s for s in kept if s >= chosen["value"]] and len(kept) == sum(s >= chosen["value"] for s in scores)
    given = detect.main(["--checkpoint", str(tmp_path / "chosen.pth"), "--source", source, "--out",
                         str(tmp_path / "given"), "--threshold", "0.3"])
    assert given["threshold"] == 0.3 and given["detections"] == plain["detections"]
    assert "threshold 0.3 (as given)" in capsys.readouterr().out
