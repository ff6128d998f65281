"""Export a trained model with torch.export (no extra dependency) for one fixed input size, and check that the
exported program computes what the model does.

    python -m tools.export --checkpoint runs/smca-shapes/checkpoint.pth --out smca.pt2            # 160 x 160
    python -m tools.export --checkpoint CKPT --size 800 1216 --out model.pt2
    python -m tools.export --checkpoint focus_detr_r50_4scale_36ep.pth --official-schedule 36ep --out focus.pt2
    python -m tools.export --model lite_detr --size 800 1333 --out lite.pt2   # the COCO Config, random weights

--checkpoint takes what detect.py takes (train.py's checkpoints, the authors' released weights; with
--official-schedule for an authors' Focus-DETR file, as in detect.py). The default size is the one the detector was
trained for, as detect.load_detector found it: 160 x 160 for the shapes sizes, else 800 x 1333 (COCO's; the
authors' weights).

The exported program takes (images (1, 3, H, W) float32, normalised as data/ does, pad_mask (1, H, W) bool, True
where the image is padding: all False for an image of exactly that size) of the size it was exported at, and
returns (pred_logits (1, Q, K), pred_boxes (1, Q, 4), cxcywh in [0, 1]); `torch.export.load(path).module()(images,
pad_mask)` runs it. Before saving, its outputs on a random
input are compared with the eager model's (at most 1e-4 apart, else nothing is written). An existing --out is
never overwritten.

What exports: all four models and their dense bases. Sparse DETR and Focus-DETR size their token sets by counts
read from the padding mask; common.max_count bounds each such count with torch._check, and the exported program
keeps these counts as values computed at run time (checked against eager on a padded mask too, in the tests).
The program is the readable path (common.fast_paths(False)), traced without autograd, except where a readable
function has an export twin (`@op.fast_with_export`): Focus-DETR's per-image F.interpolate of its scores, whose
output sizes are read from the mask, exports as focus_detr.upsample_valid_fast (interpolation matrices).
"""
import argparse
import os

import torch
from torch import nn

from common import fast_paths
from engine.runtime import MODELS, model_module, run_cli


class Detections(nn.Module):
    """A detector as (images, pad_mask) -> (pred_logits, pred_boxes): the two outputs an exported program needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, pad_mask):
        out = self.model(images, pad_mask)
        return out["pred_logits"], out["pred_boxes"]


def load_model(args):
    """--checkpoint (what detect.load_detector takes: train.py's, or the authors' weights; --official-schedule
    passed on) or --model (the COCO Config, random weights) -> (model name, model in eval mode, (H, W): --size,
    else 160 x 160 for a detector of the shapes sizes, 800 x 1333 for COCO's)."""
    schedule = getattr(args, "official_schedule", None)
    if args.checkpoint:
        import detect
        det = detect.load_detector(args.checkpoint, official_schedule=schedule)
        default = (160, 160) if det.scales == "shapes" else (800, 1333)  # the file read once, by load_detector
        return det.name, det.model.eval(), tuple(args.size or default)
    if schedule is not None:
        raise ValueError("--official-schedule goes with --checkpoint (an authors' Focus-DETR file), not --model")
    module = model_module(args.model)
    torch.manual_seed(0)
    return args.model, module.build(module.Config())[0].eval(), tuple(args.size or (800, 1333))


def export(model, size, tolerance=1e-4):
    """-> the torch.export program of `model` for one (1, 3, *size) input, its outputs checked against eager."""
    wrapped = Detections(model).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, *size, generator=g)
    pad_mask = torch.zeros(1, *size, dtype=torch.bool)
    try:  # inference (no set_grad_enabled regions in the program: they do not load back) on the readable path
        with torch.no_grad(), fast_paths(False):  # (SMCA's inference fast path reads a map's width from a tensor)
            program = torch.export.export(wrapped, (images, pad_mask))
    except Exception as e:  # torch.export's errors are long traces; the first line says what
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{type(model).__name__} does not export: torch.export said: {first}") from e
    with torch.no_grad():
        eager = wrapped(images, pad_mask)
        exported = program.module()(images, pad_mask)
    diff = max((a - b).abs().max().item() for a, b in zip(eager, exported))
    if diff > tolerance:
        raise ValueError(f"the exported program's outputs differ from the model's by {diff:.2e} (> {tolerance})")
    return program, diff


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint.pth written by train.py, or the authors' released weights")
    src.add_argument("--model", choices=MODELS, help="the model's COCO Config with random weights")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="the input size (default: 160 x 160 for a shapes checkpoint, else 800 x 1333)")
    p.add_argument("--official-schedule", choices=("12ep", "24ep", "36ep"), default=None,
                   help="an authors' Focus-DETR file's training schedule, as in detect.py (default: guessed from "
                        "the file name)")
    p.add_argument("--out", required=True, help="the .pt2 file to write (never overwritten)")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out!r} exists; nothing is overwritten: pass another --out")
    if args.size and min(args.size) < 32:
        raise ValueError(f"--size must be at least 32 x 32, got {args.size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    name, model, size = load_model(args)
    program, diff = export(model, size)
    torch.export.save(program, args.out)
    print(f"{name} exported for {size[0]} x {size[1]} inputs to {args.out} (outputs within {diff:.1e} of the model's)")
    return args.out


if __name__ == "__main__":
    run_cli(main)
