"""Tests of engine/curves.py: the picture of a run's losses and AP, from small synthetic logs.
"""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine import curves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(step, epoch=0, **losses):
    rec = {"type": "train", "epoch": epoch, "iter": step, "step": step, "loss": 3.0, "grad_norm": 1.0,
           "lr_base": 1e-4, "lr_backbone": 1e-5, "loss_ce": 0.5, "loss_bbox": 0.05, "loss_giou": 0.2,
           "loss_ce_0": 0.7, "loss_bbox_enc": 0.3, "loss_giou_enc_0": 0.3, "loss_ce_dn": 0.6, "loss_ce_backbone": 0.6}
    return {**rec, **losses}


def _write(path, records):
    with (gzip.open(path, "wt") if str(path).endswith(".gz") else open(path, "w")) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _log(steps=300):
    """A run of `steps` constant-loss steps, 100 an epoch, evaluated after the first two epochs."""
    records = [{"type": "start", "args": {"model": "smca"}, "start_epoch": 0}]
    evals = {99: {"type": "eval", "epoch": 0, "steps": 100, "AP": 0.2, "AP50": 0.6},
             199: {"type": "eval", "epoch": 1, "steps": 200, "AP": 0.3, "AP50": 0.5}}
    for s in range(steps):
        records += [_train(s, s // 100)] + ([evals[s]] if s in evals else [])
    return records


def test_curves_main_terms_leave_out_the_auxiliary_ones():
    keys = ["loss", "loss_giou", "loss_ce", "loss_bbox", "loss_ce_0", "loss_bbox_enc", "loss_giou_enc_1", "loss_ce_dn",
            "loss_bbox_dn_2", "loss_ce_backbone", "loss_select", "loss_dam", "lr_base", "grad_norm"]
    assert curves.main_terms(keys) == ["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_dam", "loss_select"]


def test_curves_axes_map_data_to_the_box():
    axes = curves.Axes((100, 50, 500, 250), (0.0, 1000.0), (0.1, 10.0), log_y=True)
    assert axes.xy(0, 0.1) == (100, 250) and axes.xy(1000, 10.0) == (500, 50)
    px, py = axes.xy(250, 1.0)  # the geometric middle of the log range is the box's middle
    assert px == 200 and py == pytest.approx(150)
    assert axes.xy(0, 0.0)[1] == 250  # nothing below the log axis's bottom
    linear = curves.Axes((100, 50, 500, 250), (0.0, 1000.0), (0.0, 50.0))
    assert linear.xy(500, 25.0) == (300, 150)


def test_curves_picture_places_losses_and_ap_where_the_axes_map_them(tmp_path):
    _write(tmp_path / "log.jsonl", _log())
    image = curves.draw_curves(str(tmp_path))
    assert image.size == curves.SIZE == (1000, 700)
    run = curves.load_run(tmp_path)
    assert run.name == os.path.normpath(str(tmp_path)) and run.model == "smca" and run.window == 3
    assert list(run.smooth) == ["loss", "loss_ce", "loss_bbox", "loss_giou"]
    axes = curves.layout(run)
    loss = axes["loss"]
    assert loss.x == (0.0, 300.0) and loss.y[0] < 0.05 and loss.y[1] > 3.0  # every smoothed curve inside
    for key, value in [("loss", 3.0), ("loss_ce", 0.5), ("loss_bbox", 0.05), ("loss_giou", 0.2)]:
        px, py = loss.xy(150, value)
        assert loss.box[0] < px < loss.box[2] and loss.box[1] < py < loss.box[3]
        assert image.getpixel((round(px), round(py))) == curves.TERM_COLOURS[key], key
    assert loss.xy(150, 0.5)[1] < loss.xy(150, 0.2)[1] < loss.xy(150, 0.05)[1]  # larger losses higher up
    ap = axes["ap"]
    assert ap.y == (0.0, 70.0)  # the best AP50 (60) rounded up past a few points
    blue, orange = curves.AP_COLOURS["AP"], curves.AP_COLOURS["AP50"]
    for steps, value, colour in [(100, 20.0, blue), (200, 30.0, blue), (100, 60.0, orange), (200, 50.0, orange)]:
        px, py = ap.xy(steps, value)
        assert image.getpixel((round(px), round(py))) == colour
    mx, my = ap.xy(150, 25.0)  # halfway along the line joining AP's two points
    assert image.getpixel((round(mx), round(my))) == blue


def test_curves_a_repeated_step_keeps_its_later_record(tmp_path):
    """A resumed run that redid steps 50-99 logs them twice; the model is the last start record's."""
    records = [{"type": "start", "args": {"model": "smca"}}] + [_train(s) for s in range(100)]
    records += [{"type": "start", "args": {"model": "sparse_detr"}}] + [_train(s, loss_ce=0.9) for s in range(50, 100)]
    records += [{"type": "eval", "epoch": 0, "AP": 0.1, "AP50": 0.2}]  # an old log's eval: no steps
    _write(tmp_path / "log.jsonl", records)
    run = curves.load_run(tmp_path / "log.jsonl")
    assert run.model == "sparse_detr" and run.window == 1 and list(run.steps) == list(range(100))
    assert np.all(run.raw["loss_ce"][:50] == 0.5) and np.all(run.raw["loss_ce"][50:] == 0.9)
    assert run.evals == [(100, 10.0, 20.0)]  # after the last train step before it
    image = curves.draw_curves(tmp_path / "log.jsonl")
    loss = curves.layout(run)["loss"]
    px, py = loss.xy(75, 0.9)
    assert image.getpixel((round(px), round(py))) == curves.TERM_COLOURS["loss_ce"]
    _, old = loss.xy(75, 0.5)
    assert image.getpixel((round(px), round(old))) != curves.TERM_COLOURS["loss_ce"]


def test_curves_read_a_gzipped_record_and_a_log_still_being_written(tmp_path):
    gz = _write(tmp_path / "seed-0.jsonl.gz", _log())
    run = curves.load_run(str(gz))
    assert run.name == os.path.normpath(str(tmp_path / "seed-0")) and len(run.steps) == 300 and len(run.evals) == 2
    out = curves.main([str(gz)])
    assert out == str(tmp_path / "seed-0.curves.png") and os.path.exists(out)
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _log(250))
        f.write('{"type": "train", "epoch": 2, "it')  # cut short: the run is writing it
    assert len(curves.load_run(tmp_path).steps) == 250


def test_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="has no log.jsonl"):
        curves.draw_curves(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        curves.draw_curves(str(tmp_path / "missing.jsonl.gz"))
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        curves.draw_curves(str(tmp_path))
    _write(tmp_path / "log.jsonl", [{"type": "start", "args": {"model": "smca"}},
                                    {"type": "eval", "epoch": -1, "AP": 0.1, "AP50": 0.2}])
    with pytest.raises(ValueError, match="no train records"):
        curves.draw_curves(str(tmp_path))
    _write(tmp_path / "log.jsonl", [_train(0), _train(1)])
    assert curves.main([str(tmp_path)]) == str(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="curves.png exists; .* pass another --out"):
        curves.main([str(tmp_path)])
    assert curves.main([str(tmp_path), "--out", str(tmp_path / "other.png")]) == str(tmp_path / "other.png")


def test_curves_command_refuses_to_overwrite_with_a_message(tmp_path):
    _write(tmp_path / "log.jsonl", [_train(0)])
    (tmp_path / "curves.png").write_bytes(b"mine")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.curves", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "error:" in done.stderr and "pass another --out" in done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "curves.png").read_bytes() == b"mine"
