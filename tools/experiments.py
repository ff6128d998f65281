"""Training experiments on the shapes set: each trains models with train.py (the same code path as
any run) in folders under --out, reads their log.jsonl files and writes a table. A killed run is
continued with `--resume auto`, so running a command again only does what is missing.

    python -m tools.experiments converge                      # SMCA's convergence claim, runs/converge/
    python -m tools.experiments converge --epochs 6 --out runs/converge6 --data /path/to/coco
    python -m tools.experiments converge --probe runs/converge/0/checkpoint.pth runs/converge/1/checkpoint.pth
    python -m tools.experiments leaderboard --budget 5         # every model, the same CPU minutes, runs/leaderboard/
    python -m tools.experiments fine-tokens --checkpoint runs/focus_detr-shapes/checkpoint.pth
    python -m tools.experiments speed --vs ../older-checkout   # training steps/s against another checkout

converge: the DETR baseline and single-scale SMCA (and, with --multiscale, multi-scale SMCA)
trained with the same data, seed, schedule and number of steps, evaluated after every epoch. The
table (AP / AP50 per epoch and model, seconds per epoch) goes to OUT/table.md. Its last row reads
off the claim's size: for each SMCA epoch, how many steps the DETR baseline needed to reach that
AP (the paper: DETR needs about 5-10x SMCA's epochs on COCO), or "> N" when it never did within
the N steps it was given.

converge --probe CKPT... reads trained SMCA / DETR checkpoints instead: on the first 16 val
images, each resized to 160 x 160 (no padding, so cells and queries line up across images), how
much the encoder output, the first decoder layer's cross-attention output and the predicted boxes
vary across images against across cells or queries. A model whose predictions vary across queries
but not across images has learned where boxes usually are and not yet to read the image.

leaderboard: each model (and DETR, SMCA with the prior off) trained with train.py's
--time-budget (the same minutes, seed and data), then the last evaluation of each run in
OUT/leaderboard.md and .json.

speed: each model's shapes recipe trained for --budget minutes (default 1) by this checkout's train.py and by
another checkout's (--vs; e.g. `git worktree add ../before COMMIT` and `ln -s $PWD/data/shapes ../before/data/`, so
both train on the same set and pretrained backbone), alternating, each in its own process with the same seed;
OUT/speed.md: steps per second of each, their ratio, the mean loss of each over the steps both took and the
largest relative difference of their losses at one step. --this-args="--amp bf16-backbone" gives this checkout's
runs flags the other may lack (its runs are named by them; the other's runs are shared).

fine-tokens (no training): where a trained Focus-DETR's fine-grained tokens sit. On the first
--images val images, the share of all tokens, of each encoder layer's kept tokens and of its
fine-grained ones whose cell centre lies inside a ground-truth box, with the MCSP score the model was trained with
and with the other one (official: the product of raw logits; the paper: of probabilities).
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import data as datalib
import detect
import smca
import train
from common import box_cxcywh_to_xyxy
from engine import visualize
from engine.runtime import MODELS, SHAPES_ROOT, load_checkpoint, run_cli

# ---------------------------------------------------------------------------------------------
# converge: SMCA against its DETR baseline, same steps
# ---------------------------------------------------------------------------------------------

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
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("model_name") != "smca":
        raise ValueError(f"--probe: {ckpt_path} is a {ckpt.get('model_name')!r} checkpoint, not an smca one")
    if ckpt["config"].get("multiscale"):
        raise ValueError(f"--probe reads single-scale checkpoints; {ckpt_path} is multi-scale")
    model = smca.build(smca.Config(**ckpt["config"]))[0].eval()
    model.load_state_dict(ckpt["model"])
    val_transforms = datalib.make_transforms("val", **datalib.SHAPES_SCALES)
    val = datalib.CocoDetection(*datalib.find_split(root, "val"), val_transforms)
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


def converge(args, argv):
    if args.probe:
        root = SHAPES_ROOT if args.data == "shapes" else args.data
        results = {path: probe(path, root) for path in args.probe}
        for path, rows in results.items():
            print(path)
            for name, (across_images, across_other) in rows.items():
                print(f"  {name}: variance {across_images:.3g} / {across_other:.3g}")
        return results
    if args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    out = args.out or os.path.join("runs", "converge")
    results, variants = {}, VARIANTS + ([MULTISCALE] if args.multiscale else [])
    for i, (name, overrides) in enumerate(variants):
        run_dir = os.path.join(out, f"{i}")
        print(f"== {name}: {run_dir}", flush=True)
        done = evals(run_dir)
        if args.epochs - 1 not in done:
            sets = ["--set", *overrides] if overrides else []
            train.main(["--model", "smca", "--data", args.data, "--output-dir", run_dir, "--epochs", str(args.epochs),
                        "--lr-drop", str(args.epochs), "--eval-every", "1", "--seed", str(args.seed),
                        "--resume", "auto", *sets, *args.train_args])
        results[name] = evals(run_dir)
    text = table(results, args.epochs, variants)
    print(text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"`python -m tools.experiments {' '.join(argv)}`\n\n{text}\n")
    return results


# ---------------------------------------------------------------------------------------------
# leaderboard: every model trained on shapes with one shared CPU budget
# ---------------------------------------------------------------------------------------------

LEADERBOARD = [("DETR (SMCA, prior off)", "smca", ["--set", "spatial_prior=false"]),
               ("SMCA-DETR", "smca", []), ("Sparse DETR", "sparse_detr", []), ("Lite DETR", "lite_detr", []),
               ("Focus-DETR", "focus_detr", [])]


def leaderboard(args, argv):
    """Train each model with train.py's --time-budget (same minutes, seed and data), in this process,
    then table the last evaluation of each run. Runs already in --out are resumed: a spent budget
    trains nothing, so a second call only re-reads them."""
    if not args.budget > 0:
        raise ValueError(f"--budget must be positive, got {args.budget}")
    out, rows = args.out or os.path.join("runs", "leaderboard"), []
    for label, model, extra in LEADERBOARD:
        run_dir = os.path.join(out, re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_"))
        run_args = ["--model", model, "--data", args.data, "--output-dir", run_dir, "--seed", str(args.seed),
                    "--time-budget", str(args.budget), "--resume", "auto"] + extra + args.train_args
        print(f"== {label}: python train.py {' '.join(run_args)}", flush=True)
        train.main(run_args)
        runs = evals(run_dir)
        if not runs:
            raise ValueError(f"{run_dir}/log.jsonl has no evaluation")
        e = runs[max(runs)]
        rows.append({"model": label, "AP": e["AP"], "AP50": e["AP50"], "APs": e["APs"], "APm": e["APm"],
                     "APl": e["APl"], "epochs": e["epoch"] + e.get("epoch_fraction", 1.0),
                     "train_min": e["train_s"] / 60, "infer_ms": e["infer_ms_per_image"]})
    lines = [f"`python -m tools.experiments {' '.join(argv)}` ({args.budget:g} CPU minutes of training each, seed "
             f"{args.seed}, {args.data} val, {torch.get_num_threads()} threads)", "",
             "| model | AP | AP50 | APs | APm | APl | epochs done | train (min) | inference (ms / image) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | {100 * r['APs']:.1f} | "
                     f"{100 * r['APm']:.1f} | {100 * r['APl']:.1f} | {r['epochs']:.2f} | {r['train_min']:.1f} | "
                     f"{r['infer_ms']:.0f} |")
    return write_table(out, "leaderboard", lines, rows)


def write_table(out, name, lines, rows):
    """Print the table and write it as OUT/NAME.md, its rows as OUT/NAME.json -> rows."""
    text = "\n".join(lines)
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


# ---------------------------------------------------------------------------------------------
# speed: training steps per second of this checkout against another, runs alternating
# ---------------------------------------------------------------------------------------------

def train_log(run_dir):
    """-> (the losses of the train records by step, the last evaluation record) of a run's log.jsonl."""
    losses, last_eval = {}, None
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("type") == "train":
                losses[r["step"]] = r["loss"]
            elif r.get("type") == "eval":
                last_eval = r
    if last_eval is None or "train_s" not in last_eval:
        raise ValueError(f"{run_dir}/log.jsonl has no evaluation with the training seconds (an unfinished run?)")
    return losses, last_eval


def speed(args, argv):
    """Each model's shapes recipe trained for --budget minutes by train.py of this checkout and of --vs (another
    checkout, e.g. a worktree of an older commit), alternating (other, this) for --rounds rounds, each a separate
    process with the same seed, the order reversed every other round -> steps per second of each, their ratio, and
    how far the losses of the steps both took apart are. Runs already in --out (named by model, checkout, budget
    and round) are re-read, not repeated."""
    other = os.path.abspath(args.vs)
    if not os.path.isfile(os.path.join(other, "train.py")):
        raise ValueError(f"--vs {args.vs!r}: no train.py there (pass another checkout of this repository)")
    if not args.budget > 0 or args.rounds < 1:
        raise ValueError("--budget and --rounds must be positive")
    here, out = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.abspath(args.out or "runs/speed")
    this_args = shlex.split(args.this_args)
    this_name = "this" + ("-" + re.sub(r"[^A-Za-z0-9.-]+", "_", " ".join(this_args).strip("-")) if this_args else "")
    rows = []
    for model in args.models:
        rates = {"other": [], "this": []}
        logs = {}
        for r in range(args.rounds):
            order = (("other", other), ("this", here))
            for tree, root in order if r % 2 == 0 else order[::-1]:  # ABBA: the machine's drift touches both alike
                run_dir = os.path.join(out, f"{model}-{this_name if tree == 'this' else tree}-{args.budget:g}min-{r}")
                cmd = [sys.executable, "train.py", "--model", model, "--seed", str(args.seed), "--time-budget",
                       str(args.budget), "--output-dir", run_dir, "--resume", "auto"] + args.train_args + \
                    (this_args if tree == "this" else [])
                if not _has_eval(run_dir):
                    print(f"== {model} ({tree}, round {r + 1}): cd {root} && {' '.join(cmd[1:])}", flush=True)
                    done = subprocess.run(cmd, cwd=root, stdout=subprocess.DEVNULL)
                    if done.returncode:
                        raise ValueError(f"the run in {run_dir} failed (exit {done.returncode}): cd {root} && "
                                         f"{' '.join(cmd[1:])}")
                losses, e = train_log(run_dir)
                rates[tree].append(e["steps"] / e["train_s"])
                logs.setdefault(tree, losses)
        common_steps = sorted(set(logs["other"]) & set(logs["this"]))
        diffs = [abs(logs["this"][s] - logs["other"][s]) / max(abs(logs["other"][s]), 1e-12) for s in common_steps]
        this, that = statistics.median(rates["this"]), statistics.median(rates["other"])
        means = {t: statistics.mean(logs[t][s] for s in common_steps) if common_steps else None for t in logs}
        rows.append({"model": model, "steps_per_s_other": that, "steps_per_s_this": this, "ratio": this / that,
                     "common_steps": len(common_steps), "max_rel_loss_diff": max(diffs) if diffs else None,
                     "mean_loss_other": means["other"], "mean_loss_this": means["this"], "rates": rates})
    lines = [f"`python -m tools.experiments {' '.join(argv)}` (--vs {other}; {args.budget:g} min of training per run, "
             f"{args.rounds} round(s) alternating, median steps/s; {torch.get_num_threads()} threads)", "",
             f"| model | steps/s (--vs) | steps/s (this{''.join(' ' + a for a in this_args)}) | ratio | "
             "steps both took | their mean loss (--vs / this) | largest relative loss difference at the same step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["max_rel_loss_diff"] is None else f"{r['max_rel_loss_diff']:.1e}"
        mean = "-" if r["mean_loss_this"] is None else f"{r['mean_loss_other']:.3f} / {r['mean_loss_this']:.3f}"
        lines.append(f"| {r['model']} | {r['steps_per_s_other']:.3f} | {r['steps_per_s_this']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['common_steps']} | {mean} | {diff} |")
    return write_table(out, "speed", lines, rows)


def _has_eval(run_dir):
    if not os.path.exists(os.path.join(run_dir, "log.jsonl")):
        return False
    try:
        train_log(run_dir)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# fine-tokens: where Focus-DETR's fine-grained tokens sit, under each MCSP score
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def fine_tokens(args, argv):
    det = detect.load_detector(args.checkpoint)
    if det.name != "focus_detr" or not det.model.cfg.foreground_selection:
        raise ValueError(f"fine-tokens reads a Focus-DETR checkpoint with foreground selection; {args.checkpoint} "
                         f"is {det.name}")
    ckpt_args = load_checkpoint(args.checkpoint).get("args") or {}
    root = SHAPES_ROOT if ckpt_args.get("data", "shapes") == "shapes" else ckpt_args["data"]
    val = datalib.CocoDetection(*datalib.find_split(root, "val"), det.transform)
    if not 1 <= args.images <= len(val):
        raise ValueError(f"--images {args.images}: between 1 and the {len(val)} images of {val.ann_file}")
    trained, rows = det.model.cfg.mcsp_score, {}
    for score in (trained, "prob_product" if trained == "logit_product" else "logit_product"):
        det.model.cfg.mcsp_score = score
        counts = {"all": [0, 0], "kept": [0, 0], "fine": [0, 0]}  # [inside a box, all], over images and layers
        for i in range(args.images):
            image, target = val[i]
            H, W = image.shape[1:]
            boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([W, H, W, H])  # (M, 4) pixels
            out = det.model(image[None], torch.zeros(1, H, W, dtype=torch.bool), explain=True)
            every = [torch.arange(sum(h * w for h, w in out["spatial_shapes"]))[None]]  # one image, no padding
            for key, per_layer in (("all", every), ("kept", out["kept_tokens"]), ("fine", out["fine_tokens"])):
                for tokens in per_layer:
                    for _, (x0, y0, x1, y1) in visualize.token_cells([t for t in tokens[0].tolist() if t >= 0],
                                                                     out["spatial_shapes"]):
                        cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
                        counts[key][0] += bool(((boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy)
                                                & (cy <= boxes[:, 3])).any())
                        counts[key][1] += 1
        rows[score] = {k: a / max(b, 1) for k, (a, b) in counts.items()}
    det.model.cfg.mcsp_score = trained
    names = {"logit_product": "product of raw logits (official)", "prob_product": "product of probabilities (paper)"}
    lines = [f"`python -m tools.experiments {' '.join(argv)}` (first {args.images} val images, every encoder layer; "
             f"the model was trained with {trained})", "",
             "| MCSP score | all tokens inside a box | kept tokens | fine-grained tokens |", "|---|---|---|---|"]
    lines += [f"| {names[k]}{' (as trained)' if k == trained else ''} | {100 * v['all']:.1f}% | "
              f"{100 * v['kept']:.1f}% | {100 * v['fine']:.1f}% |" for k, v in rows.items()]
    print("\n".join(lines))
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    c = sub.add_parser("converge", help="SMCA against its DETR baseline, same seed and steps")
    c.add_argument("--epochs", type=int, default=3, help="epochs per model, no lr drop (default 3)")
    c.add_argument("--probe", nargs="+", metavar="CKPT", help="probe trained smca checkpoints instead of training")
    c.add_argument("--multiscale", action="store_true", help="also train multi-scale SMCA (third column)")
    b = sub.add_parser("leaderboard", help="every model trained for the same CPU minutes")
    b.add_argument("--budget", type=float, default=10.0, help="training minutes per model (default 10)")
    v = sub.add_parser("speed", help="training steps per second of this checkout against another")
    v.add_argument("--vs", required=True, metavar="CHECKOUT", help="the other checkout (e.g. a git worktree)")
    v.add_argument("--budget", type=float, default=1.0, help="training minutes per run (default 1)")
    v.add_argument("--rounds", type=int, default=1, help="runs of each checkout per model, alternating")
    v.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    v.add_argument("--this-args", default="", help='train.py flags for this checkout\'s runs only, one string '
                   '(e.g. --this-args="--amp bf16-backbone")')
    f = sub.add_parser("fine-tokens", help="where a trained Focus-DETR's fine-grained tokens sit, by MCSP score")
    f.add_argument("--checkpoint", required=True, help="a Focus-DETR checkpoint.pth written by train.py")
    f.add_argument("--images", type=int, default=100, help="how many val images (default 100)")
    for q in (c, b):
        q.add_argument("--data", default="shapes")
    for q in (c, b, v):
        q.add_argument("--seed", type=int, default=42)
        q.add_argument("--out", default=None, help="output folder (default runs/converge, runs/leaderboard or "
                                                   "runs/speed)")
        q.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                       help="further train.py arguments for every run "
                            "(last on the line, e.g. --train-args --batch-size 4)")
    args = p.parse_args(argv)
    experiments = {"converge": converge, "leaderboard": leaderboard, "speed": speed, "fine-tokens": fine_tokens}
    return experiments[args.experiment](args, argv)


if __name__ == "__main__":
    run_cli(main)
