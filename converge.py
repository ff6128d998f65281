"""SMCA's convergence claim in miniature: the DETR baseline, single-scale SMCA and multi-scale SMCA
trained with the same data, seed, schedule and number of steps, evaluated after every epoch.

    python converge.py                          # shapes set, 3 epochs each, runs/converge/
    python converge.py --epochs 6 --out runs/converge6 --data /path/to/coco
    python converge.py --probe runs/converge/0/checkpoint.pth runs/converge/1/checkpoint.pth

Each variant is `train.py --model smca` with one `--set` (the same code path as any other run), in
its own folder under --out; a killed run is continued with `--resume auto`, so running the command
again only does what is missing. The table (AP / AP50 per epoch and model, seconds per epoch) is
printed and written to OUT/table.md, computed from each run's log.jsonl.

--probe CKPT... reads trained SMCA / DETR checkpoints instead: on the first 16 val images, each
resized to 160 x 160 (no padding, so cells and queries line up across images), how much the
encoder output, the first decoder layer's cross-attention output and the predicted boxes vary
across images against across cells or queries. A model whose predictions vary across queries but
not across images has learned where boxes usually are and not yet to read the image.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import data as datalib
import smca
import train

VARIANTS = [  # (name, --set overrides)
    ("DETR baseline (prior off)", ["spatial_prior=false"]),
    ("SMCA single-scale", []),
    ("SMCA multi-scale", ["multiscale=true"]),
]


def evals(run_dir):
    """The eval records of a run's log.jsonl, by epoch (a resumed run may repeat one: keep the last)."""
    path = os.path.join(run_dir, "log.jsonl")
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "eval":
                    out[rec["epoch"]] = rec
    return out


def table(results, epochs):
    head = "| epoch | " + " | ".join(f"{name} AP / AP50" for name, _ in VARIANTS) + " |"
    rows = [head, "|---" * (len(VARIANTS) + 1) + "|"]
    for e in range(epochs):
        cells = []
        for name, _ in VARIANTS:
            rec = results[name].get(e)
            cells.append(f"{100 * rec['AP']:.1f} / {100 * rec['AP50']:.1f}" if rec else "-")
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    secs = [results[name].get(epochs - 1, {}).get("epoch_time_s") for name, _ in VARIANTS]
    rows.append("| s / epoch, train + eval | " + " | ".join(f"{s:.0f}" if s else "-" for s in secs) + " |")
    return "\n".join(rows)


@torch.no_grad()
def probe(ckpt_path, root, n=16, size=160):
    """-> {quantity: (variance across images, variance across cells / queries)} for one SMCA checkpoint."""
    ckpt = train.load_checkpoint(ckpt_path)
    if ckpt.get("model_name") != "smca":
        raise ValueError(f"--probe: {ckpt_path} is a {ckpt.get('model_name')!r} checkpoint, not an smca one")
    if ckpt["config"].get("multiscale"):
        raise ValueError(f"--probe reads single-scale checkpoints; {ckpt_path} is multi-scale")
    model = smca.build(smca.Config(**ckpt["config"]))[0].eval()
    model.load_state_dict(ckpt["model"])
    val = datalib.CocoDetection(*datalib.find_split(root, "val"), datalib.make_transforms("val", **datalib.SHAPES_SCALES))
    if len(val) < n:
        raise ValueError(f"--probe needs {n} val images, {root} has {len(val)}")
    images = torch.stack([F.interpolate(val[i][0][None], size=(size, size), mode="bilinear")[0] for i in range(n)])
    seen = {}
    hooks = [model.encoder[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("memory", o)),
             model.decoder[0].cross_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("cross0", o))]
    out = model(images, torch.zeros(n, size, size, dtype=torch.bool))
    for h in hooks:
        h.remove()

    def spread(x):  # x (images, cells or queries, C): summed over channels
        return x.var(0).sum(-1).mean().item(), x.mean(0).var(0).sum(-1).item()

    return {"encoder output (images / cells)": spread(seen["memory"]),
            "decoder layer 0 cross-attention (images / queries)": spread(seen["cross0"]),
            "predicted boxes (images / queries)": spread(out["pred_boxes"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes")
    p.add_argument("--epochs", type=int, default=3, help="epochs per model, no lr drop (default 3)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=os.path.join("runs", "converge"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further train.py arguments for every run (e.g. --extra --batch-size 4)")
    p.add_argument("--probe", nargs="+", metavar="CKPT", help="probe trained smca checkpoints instead of training")
    args = p.parse_args(argv)
    if args.probe:
        root = train.SHAPES_ROOT if args.data == "shapes" else args.data
        results = {path: probe(path, root) for path in args.probe}
        for path, rows in results.items():
            print(path)
            for name, (across_images, across_other) in rows.items():
                print(f"  {name}: variance {across_images:.3g} / {across_other:.3g}")
        return results
    if args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    results = {}
    for i, (name, overrides) in enumerate(VARIANTS):
        run_dir = os.path.join(args.out, f"{i}")
        print(f"== {name}: {run_dir}", flush=True)
        done = evals(run_dir)
        if args.epochs - 1 not in done:
            sets = ["--set", *overrides] if overrides else []
            train.main(["--model", "smca", "--data", args.data, "--output-dir", run_dir, "--epochs", str(args.epochs),
                        "--lr-drop", str(args.epochs), "--eval-every", "1", "--seed", str(args.seed),
                        "--resume", "auto", *sets, *args.extra])
        results[name] = evals(run_dir)
    text = table(results, args.epochs)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"`python converge.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{text}\n")
    return results


if __name__ == "__main__":
    train.run_cli(main)
