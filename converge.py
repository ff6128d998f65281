"""SMCA's convergence claim in miniature: the DETR baseline and single-scale SMCA (and, with
--multiscale, multi-scale SMCA) trained with the same data, seed, schedule and number of steps,
evaluated after every epoch.

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

The claim's size is read off the table's last row: for each SMCA epoch, how many steps the DETR
baseline needed to reach that AP (the paper: DETR needs about 5-10x SMCA's epochs on COCO), or
"> N" when it never did within the N steps it was given.
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
]
MULTISCALE = ("SMCA multi-scale", ["multiscale=true"])


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


def steps_to_reach(detr, smca_evals, epochs):
    """Per SMCA epoch: the optimizer steps DETR's run needed to reach SMCA's AP there, as 'steps (ratio)',
    or '> N (> ratio)' when it did not within its N steps."""
    out = []
    last = max((rec.get("steps", 0) for rec in detr.values()), default=0)
    for e in range(epochs):
        rec = smca_evals.get(e)
        if rec is None or not rec.get("steps"):
            out.append("-")
            continue
        first = next((d for _, d in sorted(detr.items()) if d["AP"] >= rec["AP"]), None)
        out.append(f"{first['steps']} ({first['steps'] / rec['steps']:.1f}x)" if first
                   else f"> {last} (> {last / rec['steps']:.1f}x)")
    return out


def table(results, epochs, variants):
    head = "| epoch | " + " | ".join(f"{name} AP / AP50" for name, _ in variants) + " |"
    rows = [head, "|---" * (len(variants) + 1) + "|"]
    for e in range(epochs):
        cells = []
        for name, _ in variants:
            rec = results[name].get(e)
            cells.append(f"{100 * rec['AP']:.1f} / {100 * rec['AP50']:.1f}" if rec else "-")
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    secs = [results[name].get(epochs - 1, {}).get("epoch_time_s") for name, _ in variants]
    rows.append("| s / epoch, train + eval | " + " | ".join(f"{s:.0f}" if s else "-" for s in secs) + " |")
    detr, single = results[variants[0][0]], results[variants[1][0]]
    reach = steps_to_reach(detr, single, epochs)
    rows.append(f"| DETR steps to reach SMCA's AP of each epoch (SMCA: 1 epoch = {single.get(0, {}).get('steps', '?')} "
                f"steps) | " + " | ".join(["-", " / ".join(reach)] + ["-"] * (len(variants) - 2)) + " |")
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
    p.add_argument("--multiscale", action="store_true", help="also train multi-scale SMCA (third column)")
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
    results, variants = {}, VARIANTS + ([MULTISCALE] if args.multiscale else [])
    for i, (name, overrides) in enumerate(variants):
        run_dir = os.path.join(args.out, f"{i}")
        print(f"== {name}: {run_dir}", flush=True)
        done = evals(run_dir)
        if args.epochs - 1 not in done:
            sets = ["--set", *overrides] if overrides else []
            train.main(["--model", "smca", "--data", args.data, "--output-dir", run_dir, "--epochs", str(args.epochs),
                        "--lr-drop", str(args.epochs), "--eval-every", "1", "--seed", str(args.seed),
                        "--resume", "auto", *sets, *args.extra])
        results[name] = evals(run_dir)
    text = table(results, args.epochs, variants)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        command = " ".join(["python converge.py", *(argv if argv is not None else sys.argv[1:])])
        f.write(f"`{command}`\n\n{text}\n")
    return results


if __name__ == "__main__":
    train.run_cli(main)
