"""Run a trained detector of this library on your own images: annotated pictures and COCO results.

    python detect.py --checkpoint runs/smca-shapes/checkpoint.pth --source data/shapes/val
    python detect.py --checkpoint CKPT --source 'photos/*.jpg' --threshold 0.5 --out runs/detect/photos
    python detect.py --checkpoint CKPT --source photo.png --explain     # + the paper's mechanism

The checkpoint (what train.py writes) says which model and Config it is, which categories it knows
(their names; a checkpoint without them uses the names of the data it was trained on when that is
on this machine, else the ids) and which evaluation transform it was trained for: no model flag
is repeated. The authors' released weights (SMCA-DETR, Sparse DETR, Focus-DETR) work the same way: each model
file says whether a file is its authors' (is_official) and converts it (from_official); COCO's names.
--threshold: the detections drawn and written score at least it. By default it is the checkpoint's: at each
evaluation (the last one when training ends) train.py chooses the score threshold of the best F1 on the val split (a
detection counts when it matches a ground-truth box of its class at IoU >= 0.5; engine/pictures.py) and stores it
in the checkpoint. A checkpoint without one, and the authors' weights, use 0.3; the first line printed says which
threshold and why.
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
  Gaussian priors; Sparse DETR: token scores, selected tokens and the DAM (decoder attention map); Lite DETR: F_L / F_H
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
import glob
import os

import torch

import data as datalib
from common import read_state_dict
from data.coco import COCO_NAMES
from engine.pictures import DEFAULT_THRESHOLD, Detector, detect_files
from engine.runtime import MODELS, SHAPES_ROOT, first_free, load_checkpoint, model_module, run_cli, select_device



def official_schedules():
    """The schedules an authors' file can be stated with: every model file's COCO_SCHEDULES (Focus-DETR's 12ep, 24ep,
    36ep: its from_official's schedule=)."""
    return sorted({s for name in MODELS for s in getattr(model_module(name), "COCO_SCHEDULES", {})})


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
    """Which model file converts an authors' state dict -> its name, or None: each model file of MODELS is asked
    (its is_official: the keys its from_official requires; no two model files claim the same file)."""
    return next((name for name in MODELS if model_module(name).is_official(state)), None)


def load_detector(path, device="cpu", official_schedule=None):
    """A train.py checkpoint (with the score threshold train.py chose, when it holds one), or the authors' released
    weights (the file as published, recognised by official_model and converted by the model file's from_official;
    COCO sizes; no threshold) -> Detector.
    official_schedule "12ep" / "24ep" / "36ep": an authors' Focus-DETR file's training schedule (its encoder's sine
    positions; default: guessed from the file name); refused for any other file. ValueError for a missing file or
    one of no model here."""
    if official_schedule is not None and official_schedule not in official_schedules():
        raise ValueError(f"--official-schedule must be one of {', '.join(official_schedules())}, got "
                         f"{official_schedule!r}")
    try:  # weights only: the authors' files and plain state dicts
        state, extra = read_state_dict(path, "checkpoint")
    except ValueError:  # missing, unreadable, or holding more than tensors and plain data: load_checkpoint says
        state, extra = None, {}
    official = official_model(state) if state is not None and "model_name" not in extra else None
    if official_schedule is not None and official is not None and \
            official_schedule not in getattr(model_module(official), "COCO_SCHEDULES", {}):
        raise ValueError(f"--official-schedule {official_schedule}: only the authors' Focus-DETR files take a "
                         f"schedule; {path!r} is the authors' {official} weights")
    if official:
        module = model_module(official)
        schedule = {} if official_schedule is None else {"schedule": official_schedule}  # a model with COCO_SCHEDULES
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
        converted = " or ".join(n for n in MODELS if hasattr(model_module(n), "from_official"))
        raise ValueError(f"{path!r} is not a checkpoint of a model of this library ({', '.join(MODELS)}) nor "
                         f"the authors' weights of {converted}; train.py writes ours as OUTPUT_DIR/checkpoint.pth")
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
    threshold = ckpt.get("threshold") if isinstance(ckpt.get("threshold"), dict) else None  # train.py's choice
    return Detector(ckpt["model_name"], model.eval().to(device), postprocess, transform,
                    checkpoint_categories(ckpt), device, scales, threshold)


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
        out = first_free(os.path.join("runs", "detect", "exp"))
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


def threshold_of(det, given=None):
    """--threshold -> (the threshold, why that one): the one given; else the detector's (train.py's best F1 on the
    val split); else DEFAULT_THRESHOLD."""
    if given is not None:
        return given, "as given"
    if det.threshold is not None:
        t = det.threshold
        return t["value"], (f"the checkpoint's: the best F1 on the val split, {t['f1']:.2f} (precision "
                            f"{t['precision']:.2f}, recall {t['recall']:.2f}); --threshold sets another")
    return DEFAULT_THRESHOLD, ("the default: these weights carry no threshold chosen on val data (train.py stores "
                               "one in the checkpoint when a run ends); --threshold sets another")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by train.py")
    p.add_argument("--source", required=True, help="an image file, a folder of images, or a glob (quote it)")
    p.add_argument("--out", default=None, help="output folder (default runs/detect/exp, exp2, ...)")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep detections scoring at least this (0..1). Default: the checkpoint's, which train.py "
                        f"chose as the best F1 on the val split at its evaluation; {DEFAULT_THRESHOLD} for a "
                        f"checkpoint without one and for the authors' weights")
    p.add_argument("--explain", action="store_true", help="also draw the paper's mechanism for each image")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--official-schedule", choices=official_schedules(), default=None,
                   help="an authors' Focus-DETR file's training schedule, which sets its encoder's sine positions "
                        "(default: guessed from the file name, 12ep when it names none)")
    args = p.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    args.device = select_device(args)
    return args


def main(argv=None):
    """-> detect_files' summary and the "threshold" used. ValueError (exit status 1 from the command line) after
    everything is written when a file was skipped or an image failed."""
    args = parse_args(argv)
    files = source_files(args.source)
    det = load_detector(args.checkpoint, args.device, args.official_schedule)
    out = output_dir(args.out, files, args.source)
    args.threshold, why = threshold_of(det, args.threshold)
    print(f"{det.name} from {args.checkpoint} on {len(files)} file(s), {args.device}; threshold {args.threshold:g} "
          f"({why})")
    summary = detect_files(det, files, out, args.threshold, args.explain)
    skipped, failed = len(summary["skipped"]), len(summary["failed"])
    if summary["images"] == 0 and not failed:
        raise ValueError(f"none of the {len(files)} source files is a readable image")
    problems = ([f"{failed} image(s) failed"] if failed else []) + \
        ([f"{skipped} file(s) skipped (not readable images)"] if skipped else [])
    print(f"{summary['images']} image(s) done" + "".join(f", {p}" for p in problems) +
          f"; {summary['detections']} detections at or above {args.threshold}: "
          f"pictures{' and mechanism pictures' if args.explain else ''} and detections.json in {out}")
    summary["threshold"] = args.threshold
    if problems:
        raise ValueError(f"{' and '.join(problems)} of the {len(files)} source files (the warnings above name them "
                         f"and why); the results of the {summary['images']} image(s) done are in "
                         f"{os.path.join(out, 'detections.json')}")
    return summary


if __name__ == "__main__":
    run_cli(main)
