"""A first look, in about a minute: what each paper changes in DETR, and what that saves, measured here.

    python -m tools.tour                 # writes runs/tour/ (runs/tour2/, ... when that folder is taken)

For each paper it builds the efficient model and its dense base (the shapes configuration that
`python train.py --model M` trains, with the paper's mechanism switched off for the base, as docs/claims.md trains
them), runs both on the first shapes val image (untrained: the cost does not depend on the weights) and prints the
encoder's multiply-adds, the whole model's, and the forward time (median of 5, after two warm-ups), each against the
base. Beside them, the APs of the pairs trained to the end of their recipes with several seeds (the committed
records of docs/claims-records/claims.json; `python -m tools.experiments claims` trains them). It also draws the
first val images with their labelled boxes (shapes.png), the data every shapes figure of this library comes from.
The shapes set is generated on first use (about 20 s).
"""
import argparse
import json
import os
import statistics
import time

import torch

import data as datalib
from common import box_cxcywh_to_xyxy
from data import shapes
from engine import visualize
from engine.runtime import SHAPES_ROOT, first_free, model_module, run_cli
from tools import bench
from tools.experiments import CLAIMS, RECORDS
from train import apply_overrides

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANGES = {  # what each paper changes in DETR, in a line (the README's table says more)
    "smca": "the decoder's cross-attention: a Gaussian around each query's predicted centre (no encoder change)",
    "sparse_detr": "the encoder updates only the top 10% of tokens, picked by a scoring network",
    "lite_detr": "the encoder updates the low-level (stride-8) tokens in 1 layer of 3, the rest in every layer",
    "focus_detr": "the encoder updates only foreground tokens, fewer in each layer (50% down to 10%)",
}


def shapes_picture(val, count=4):
    """The first `count` val images (as the model sees them, unpadded) with their labelled boxes -> one picture."""
    names = {c["id"]: c["name"] for c in val.coco.dataset["categories"]}
    row = []
    for i in range(count):
        image, target = val[i]
        pil = visualize.input_image(image)
        zoom = visualize.zoom_for(pil)  # enlarged before drawing, so the labels stay sharp
        pil = pil.resize((pil.size[0] * zoom, pil.size[1] * zoom))
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([pil.size[0], pil.size[1]] * 2)  # (M, 4) pixels
        row.append((visualize.draw_detections(pil, boxes, target["labels"], None, names),
                    f"val image {i}: {len(target['labels'])} objects"))
    return visualize.panels([row], "the shapes set: val images as the models see them, with their boxes")


def cost(module, sets, image, repeats=5):
    """One configuration on one image -> (encoder GMACs, GMACs, forward ms), untrained, float32, eval mode."""
    cfg = apply_overrides(module.shapes_config(), sets)
    torch.manual_seed(0)
    model = module.build(cfg)[0].eval()
    images, pad_mask = image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool)
    gmacs, encoder = bench.count_gmacs(lambda: model(images, pad_mask), model)  # (autograd on: its module tracker)
    with torch.no_grad():
        model(images, pad_mask)  # warm-ups
        model(images, pad_mask)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images, pad_mask)
            times.append(1e3 * (time.perf_counter() - start))
    return encoder, gmacs, statistics.median(times)


def trained_aps(path):
    """{(paper, label): (mean AP %, seeds finished)} of the committed claims table; {} without one."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f)
    out = {}
    for r in rows:
        aps = [s["AP"] for s in r["seeds"].values() if s.get("finished") and s.get("AP") is not None]
        if aps and not r["long"]:
            out[(r["paper"], r["label"])] = (100 * statistics.mean(aps), len(aps))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "tour"), help="output folder (a new one: OUT2, ... if taken)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shapes.ensure(SHAPES_ROOT)
    val = datalib.CocoDetection(*datalib.find_split(SHAPES_ROOT, "val"),
                                datalib.make_transforms("val", **datalib.SHAPES_SCALES))
    out = first_free(args.out)
    os.makedirs(out)
    shapes_picture(val).save(os.path.join(out, "shapes.png"))
    image = val[0][0]
    trained = trained_aps(os.path.join(HERE, RECORDS, "claims.json"))
    print(f"each paper's shapes model against its dense base, untrained, on val image 0 ({image.shape[2]} x "
          f"{image.shape[1]} px), {torch.get_num_threads()} threads; AP: trained to the end of the recipe, mean of the "
          f"seeds finished ({os.path.join(RECORDS, 'claims.md')})\n")
    for claim in CLAIMS:
        module = model_module(claim.model)
        print(f"{claim.paper}: {CHANGES[claim.model]}")
        base = None
        for run in claim.runs[:2]:  # the dense base, then the paper's model
            enc, total, ms = cost(module, run.sets, image)
            base = base or (enc, total, ms)
            ap, n = trained.get((claim.paper, run.label), (None, 0))
            ap_text = f"AP {ap:4.1f} ({n} seed{'s' if n != 1 else ''})" if ap is not None else "AP not trained yet"
            print(f"  {run.label:<38} encoder {enc:6.3f} GMACs ({enc / base[0]:4.2f}x)  model {total:5.2f} GMACs "
                  f"({total / base[1]:4.2f}x)  forward {ms:6.1f} ms ({ms / base[2]:4.2f}x)  {ap_text}")
        print(f"  the paper: {claim.claim}\n")
    print(f"the shapes set, val images 0-3 with their boxes: {os.path.join(out, 'shapes.png')}")
    return out


if __name__ == "__main__":
    run_cli(main)
