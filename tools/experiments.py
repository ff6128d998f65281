"""Training experiments on the shapes set: each trains models with train.py (the same code path as
any run) in folders under --out, reads their log.jsonl files and writes a table. A killed run is
continued with `--resume auto`, so running a command again only does what is missing.

    python -m tools.experiments converge                      # SMCA's convergence claim, runs/converge/
    python -m tools.experiments converge --epochs 6 --out runs/converge6 --data /path/to/coco
    python -m tools.experiments converge --probe runs/converge/0/checkpoint.pth runs/converge/1/checkpoint.pth
    python -m tools.experiments claims                        # each paper's claim: efficient model vs dense base
    python -m tools.experiments claims --table-only           # the table of the committed records (docs/claims-records)
    python -m tools.experiments claims --steps 5 --seeds 1 --out runs/claims-check   # a quick check of the command
    python -m tools.experiments leaderboard --budget 5         # every model, the same CPU minutes, runs/leaderboard/
    python -m tools.experiments fine-tokens --checkpoint runs/focus_detr-shapes/checkpoint.pth
    python -m tools.experiments selected-tokens --checkpoint runs/sparse_detr-shapes/checkpoint.pth
    python -m tools.experiments speed --vs ../older-checkout   # training steps/s against another checkout
    python -m tools.experiments log-stats runs/smca-shapes docs/claims-records/smca/*/seed-42.jsonl.gz --steps 1900-1999
    python -m tools.experiments log-evals docs/claims-records/focus_detr/*/seed-42.jsonl.gz

converge: the DETR baseline and single-scale SMCA (and, with --multiscale, multi-scale SMCA)
trained with the same data, seed, schedule and number of steps, evaluated after every epoch. The
table (AP / AP50 per epoch and model, seconds per epoch) goes to OUT/table.md. Its last row reads
off the claim's size: for each SMCA epoch, how many steps the DETR baseline needed to reach that
AP (the paper: DETR needs about 5-10x SMCA's epochs on COCO), or "> N" when it never did within
the N steps it was given.

converge --probe CKPT... reads trained SMCA / DETR checkpoints instead: on the first 16 val
images, each resized to 160 x 160 (no padding, so cells and queries line up across images), how
much the backbone's last map, the encoder's input (that map projected) and output, the first decoder
layer's cross-attention output and the predicted boxes vary across images against across cells or
queries, and how many cells one query's cross-attention reads (exp of its weights' entropy; first and last
layer). A model whose predictions vary across queries but not across images has learned where boxes usually are
and not yet to read the image; the first quantity that stops varying across images shows where the image is lost.

claims: each paper's efficient model and its own dense base (the Config switches that reduce it to the base),
trained with the same seeds, data order, recipe (the model's shapes recipe) and number of steps, evaluated after
each epoch, with every seed of --seeds (default 3); Sparse DETR's rho 0.3 and its objectness and random selections,
Lite DETR's cheaper schedule and the DETR baseline trained 10x SMCA's steps with the first seed only. Runs are
folders OUT/MODEL/RUN/seed-S; each finished run's log is kept as a record (RECORDS/MODEL/RUN/seed-S.jsonl.gz,
default docs/claims-records, committed), a run with a record is not trained again, an unfinished one is continued
(--resume auto), a folder or record holding a run of other arguments is refused. Then every configuration's cost on
this machine (bench.py's GMACs, inference ms, training ms per step; RECORDS/costs.json), and RECORDS/claims.md /
.json (per paper: each seed's AP, their mean and range, the per-seed difference to the base, whether the paper's
claim holds within it, the costs and the paper's figures) and RECORDS/claims.png (AP against encoder multiply-adds,
the seeds' spread), from the records alone. --jobs N trains N runs at once, each in its own process.

leaderboard: each model (and DETR, SMCA with the prior off) trained with train.py's
--time-budget (the same minutes, seed and data), then the last evaluation of each run and its model's inference
time (timed here from the run's checkpoint.pth, kept in the run's inference.json) in OUT/leaderboard.md and .json.

speed: each model's shapes recipe trained for --budget minutes (default 1) by this checkout's train.py and by
another checkout's (--vs; e.g. `git worktree add ../before COMMIT` and `ln -s $PWD/data/shapes ../before/data/`, so
both train on the same set and pretrained backbone), alternating, each in its own process with the same seed;
OUT/speed.md: steps per second of each, their ratio, the mean loss of each over the steps both took and the
largest relative difference of their losses at one step. --this-args="--amp bf16-backbone" gives this checkout's
runs flags the other may lack (its runs are named by them; the other's runs are shared).

fine-tokens (no training): where a trained Focus-DETR's fine-grained tokens sit. On the first
--images val images, the share of all tokens, of each encoder layer's kept tokens and of its
fine-grained ones whose cell centre lies inside a ground-truth box (and the share of the in-box tokens
that each layer keeps, and that it takes as fine-grained), with the MCSP score (Focus-DETR's
multi-category score predictor: foreground x class score) the model was trained with and with the other one
(official: the product of raw logits; the paper: of probabilities); and per feature level, the share of its
tokens inside a box, labelled foreground for the selector's training and kept by the encoder layers.

selected-tokens (no training): what a trained Sparse DETR's encoder updates. On the first --images val images, each
alone: the decoder attention map's (DAM's) mass on the n selected tokens (the corr Sparse DETR logs), on the DAM's own
n heaviest tokens (the most any n tokens carry) and n / N (what random ones carry on average); the share of the
selected tokens inside a ground-truth box, of the in-box tokens selected, and of all tokens inside a box. A dense
base's checkpoint gives the same of its own DAM's top rho (--rho): how much of its decoder's reading rho of the
tokens could carry.

log-stats (no training): per run (a train.py folder or a claims record) and window of --every steps within --steps,
the mean (--median: the median) of logged training terms: by default the total loss and the loss terms curves.png
draws (the last decoder layer's and terms such as loss_dam, no auxiliary ones), grad_norm (before clipping) and
corr where logged. A step a resumed run logged twice counts once, its later record.

log-evals (no training): per run (a train.py folder or a claims record), each of its end-of-epoch evaluations (an
--eval-only of weights saved within an epoch is left out): the steps trained and the COCO metrics (--metrics; by
default AP, AP50, AP75 and AP by object size) in %.
"""
import argparse
import contextlib
import gzip
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data as datalib
import detect
import focus_detr
import smca
import train
from common import box_cxcywh_to_xyxy, fast_paths
from data import shapes
from engine import curves, pretrain, visualize
from engine.runtime import MODELS, SHAPES_ROOT, load_checkpoint, machine_name, model_module, run_cli
from sparse_detr import sparse_token_nums
from tools import bench

# ---------------------------------------------------------------------------------------------
# converge: SMCA against its DETR baseline, same steps
# ---------------------------------------------------------------------------------------------

VARIANTS = [  # (name, --set overrides)
    ("DETR baseline (prior off)", ["spatial_prior=false"]),
    ("SMCA single-scale", []),
]
MULTISCALE = ("SMCA multi-scale", ["multiscale=true"])


def log_records(where):
    """The records of a run's log: `where` is a run folder (its log.jsonl) or a run's record file (.jsonl.gz, as
    claims keeps them in docs/). Nothing when there is no log."""
    path = where if where.endswith(".jsonl.gz") else os.path.join(where, "log.jsonl")
    if not os.path.exists(path):
        return
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            yield json.loads(line)


def epoch_evals(records):
    """The end-of-epoch eval records among `records`, by epoch (a resumed run may repeat one: keep the last); an
    --eval-only of weights saved within an epoch (its record has "iter") is not that epoch's."""
    return {rec["epoch"]: rec for rec in records if rec.get("type") == "eval" and "iter" not in rec}


def evals(run_dir):
    """The end-of-epoch eval records of a run's log.jsonl (or record file), by epoch: epoch_evals."""
    return epoch_evals(log_records(run_dir))


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
    """epochs: {variant name: the epochs it trained}; the rows run to the longest."""
    head = "| epoch | " + " | ".join(f"{name} AP / AP50" for name, _ in variants) + " |"
    rows = [head, "|---" * (len(variants) + 1) + "|"]
    for e in range(max(epochs.values())):
        cells = []
        for name, _ in variants:
            rec = results[name].get(e)
            cells.append(f"{100 * rec['AP']:.1f} / {100 * rec['AP50']:.1f}" if rec else "-")
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    secs = [results[name].get(epochs[name] - 1, {}).get("epoch_time_s") for name, _ in variants]
    rows.append("| s / epoch, train + eval | " + " | ".join(f"{s:.0f}" if s else "-" for s in secs) + " |")
    detr, single = results[variants[0][0]], results[variants[1][0]]
    reach = steps_to_reach(detr, single, epochs[variants[1][0]])
    rows.append(f"| DETR steps to reach SMCA's AP of each epoch (SMCA: 1 epoch = {single.get(0, {}).get('steps', '?')} "
                f"steps) | " + " | ".join(["-", " / ".join(reach)] + ["-"] * (len(variants) - 2)) + " |")
    return "\n".join(rows)


def attended_cells(weights):
    """Attention weights (..., cells), each row summing to 1 -> how many cells a row reads, exp of its entropy
    (uniform over k cells: k), averaged over the rows."""
    return (-(weights * weights.clamp_min(1e-30).log()).sum(-1)).exp().mean().item()


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
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o[-1][0])),
             model.input_proj[0].register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o)),
             model.encoder[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("memory", o)),
             model.decoder[0].cross_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("cross0", o))]

    def keep_weights(name):  # a cross-attention's weights, softmax(QK^T / sqrt(d) + log G), from its inputs
        def hook(module, args, output):
            query, key, _, pad_mask, log_prior = args[:5]
            seen[name] = module.logits(query, key, pad_mask, log_prior).softmax(-1)  # (images, H, Q, N)
        return hook

    last = len(model.decoder) - 1
    hooks += [model.decoder[lid].cross_attn.register_forward_hook(keep_weights(f"weights{lid}")) for lid in (0, last)]
    out = model(images, torch.zeros(n, size, size, dtype=torch.bool))
    for h in hooks:
        h.remove()

    def spread(x):  # x (images, cells or queries, C): summed over channels
        return x.var(0).sum(-1).mean().item(), x.mean(0).var(0).sum(-1).item()

    def cells(x):  # (images, C, H, W) -> (images, H*W, C)
        return x.flatten(2).transpose(1, 2)

    return {"backbone's last map (images / cells)": spread(cells(seen["features"])),
            "encoder input, the projected map (images / cells)": spread(cells(seen["tokens"])),
            "encoder output (images / cells)": spread(seen["memory"]),
            "decoder layer 0 cross-attention (images / queries)": spread(seen["cross0"]),
            "predicted boxes (images / queries)": spread(out["pred_boxes"]),
            f"cells a query's cross-attention reads, exp(entropy), of {seen['weights0'].shape[-1]} (decoder layer 0 / "
            f"layer {last})": (attended_cells(seen["weights0"]), attended_cells(seen[f"weights{last}"]))}


def converge(args, argv):
    if args.probe:
        root = SHAPES_ROOT if args.data == "shapes" else args.data
        results = {path: probe(path, root) for path in args.probe}
        for path, rows in results.items():
            print(path)
            for name, (a, b) in rows.items():
                print(f"  {name}: {'variance ' if '(images /' in name else ''}{a:.3g} / {b:.3g}")
        return results
    baseline_epochs = args.epochs if args.baseline_epochs is None else args.baseline_epochs
    if args.epochs <= 0 or baseline_epochs <= 0:
        raise ValueError(f"--epochs and --baseline-epochs must be positive, got {args.epochs}, {baseline_epochs}")
    out = args.out or os.path.join("runs", "converge")
    results, variants = {}, VARIANTS + ([MULTISCALE] if args.multiscale else [])
    epochs = {name: baseline_epochs if i == 0 else args.epochs for i, (name, _) in enumerate(variants)}
    for i, (name, overrides) in enumerate(variants):
        run_dir = os.path.join(out, f"{i}")
        print(f"== {name}: {run_dir}", flush=True)
        if not (epochs[name] - 1 in evals(run_dir) or run_finished(run_dir, epochs[name])):  # or its budget spent
            sets = ["--set", *overrides] if overrides else []
            train.main(["--model", "smca", "--data", args.data, "--output-dir", run_dir, "--epochs",
                        str(epochs[name]), "--lr-drop", str(epochs[name]), "--eval-every", "1", "--seed",
                        str(args.seed), "--resume", "auto", *sets, *args.train_args])
        results[name] = evals(run_dir)
    text = table(results, epochs, variants)
    print(text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"`python -m tools.experiments {' '.join(argv)}`\n\n{text}\n")
    return results


# ---------------------------------------------------------------------------------------------
# claims: each paper's efficient model against its own dense base, trained alike
# ---------------------------------------------------------------------------------------------

@dataclass
class ClaimRun:
    label: str
    sets: list  # --set overrides of the model's shapes Config ([]: the model's bare run)
    paper_ap: float = None  # the paper's COCO val AP of this configuration (R50)
    paper_gflops: float = None  # ... its whole-model GFLOPs (fvcore: 1 per multiply-add)
    paper_encoder_gflops: float = None  # ... its encoder's, where published
    paper_note: str = ""
    all_seeds: bool = True  # False: a side run of the claim, trained with the first seed only
    train_args: tuple = ()  # train.py flags beside the model's shapes recipe (the long baseline's epochs)
    below: tuple = ()  # labels of earlier runs of the claim the paper puts this one below (Sparse DETR's Fig. 4)


@dataclass
class Claim:
    paper: str
    model: str
    claim: str  # the paper's claim, in its own figures
    runs: list  # [ClaimRun], the dense base first
    long_base: ClaimRun = None  # the base trained much longer, first seed only (SMCA's convergence ratio)


CLAIMS = [
    Claim("SMCA-DETR", "smca", "converges about 10x faster than DETR at the same cost: single-scale SMCA 41.0 AP at "
          "50 epochs, the DETR baseline 34.8 at 50 (DETR 42.0 at 500)", [
              ClaimRun("DETR baseline (prior off)", ["spatial_prior=false"], 34.8, 86, None, "50 epochs (Table 2)"),
              ClaimRun("SMCA single-scale", [], 41.0, 86, None, "50 epochs (Table 1)")],
          # 10x SMCA's recipe steps (20,000 of 8 images) at a constant lr (--lr-drop past the end: no drop)
          ClaimRun("DETR baseline, 10x SMCA's steps, constant lr", ["spatial_prior=false"],
                   train_args=("--epochs", "40", "--lr-drop", "41"))),
    Claim("Sparse DETR", "sparse_detr", "rho 0.1 keeps 45.3 of the dense base's 46.0 AP at 105 of its 177 GFLOPs; "
          "rho 0.3 keeps 46.0; the DAM-trained scorer selects better than objectness (Fig. 4), random worse still", [
              ClaimRun("dense: Deformable DETR + top-k & BBR", ["sparse_encoder=false", "use_enc_aux_loss=false"],
                       46.0, 177.3),
              ClaimRun("rho 0.1 (DAM scorer)", ["rho=0.1"], 45.3, 105.4),
              ClaimRun("rho 0.3 (DAM scorer)", ["rho=0.3"], 46.0, 120.5, all_seeds=False),
              ClaimRun("rho 0.1, objectness selection", ["rho=0.1", "selection=objectness"], None, None, None,
                       "below the DAM scorer at every rho (Fig. 4)", all_seeds=False,
                       below=("rho 0.1 (DAM scorer)",)),
              ClaimRun("rho 0.1, random selection", ["rho=0.1", "selection=random"], None, None, None,
                       "the preliminary experiment: below both", all_seeds=False,
                       below=("rho 0.1 (DAM scorer)", "rho 0.1, objectness selection"))]),
    Claim("Lite DETR", "lite_detr", "H3L1-(2+1)x3 keeps 46.7 of Deformable DETR's 46.8 AP with 39 of its 90 encoder "
          "GFLOPs (Table 3)", [
              ClaimRun("dense: Deformable DETR", ["enc_scale=4", "num_blocks=1", "kda_encoder=false"], 46.8, 177, 90),
              ClaimRun("H3L1-(2+1)x3", [], 46.7, 123, 39),
              ClaimRun("H3L1-(3+1)x2", ["num_blocks=2"], 46.2, 119, 35, all_seeds=False)]),
    Claim("Focus-DETR", "focus_detr", "keeps 50.4 of DINO's 50.9 AP at 154 of its 279 GFLOPs (36 epochs; 48.8 against "
          "detrex DINO's 49.2 at 12)", [
              ClaimRun("dense: DINO", ["foreground_selection=false"], 50.9, 279, None, "36 epochs; 49.2 at 12"),
              ClaimRun("Focus-DETR", [], 50.4, 154, None, "36 epochs; 48.8 at 12")]),
]


RECORDS = os.path.join("docs", "claims-records")  # the full-recipe runs' records, committed (claims --table-only)


def claim_dir(out, claim, run, seed):
    """A claim run's folder: OUT/MODEL/RUN/seed-S (train.py's checkpoint and log.jsonl)."""
    return os.path.join(out, claim.model, re.sub(r"[^a-z0-9.]+", "_", run.label.lower()).strip("_"), f"seed-{seed}")


def claim_record(records, claim, run, seed):
    """A finished claim run's record: RECORDS/MODEL/RUN/seed-S.jsonl.gz (its log.jsonl, compacted by save_record)."""
    return claim_dir(records, claim, run, seed) + ".jsonl.gz"


def compact(value):
    """A train record's number to 4 significant digits (a loss curve needs no more; the records stay small)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def save_record(run_dir, path):
    """A finished run's log.jsonl -> its record file, gzipped: start and eval records as logged, the per-iteration
    train records with their numbers to 4 significant digits. Written atomically; an existing record is kept."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path + ".tmp", "wt") as f:
        for rec in log_records(run_dir):
            if rec.get("type") == "train":
                rec = {k: compact(v) for k, v in rec.items()}
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".tmp", path)


def parse_seeds(text, first):
    """--seeds: a count N (the seeds first, first + 1, ..., first + N - 1; first is --seed; at most 20) or a
    comma-separated list of seeds ("7," is the one seed 7) -> the list."""
    try:
        if "," not in text:
            count = int(text)
            if not 1 <= count <= 20:
                raise ValueError
            return [first + i for i in range(count)]
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a count from 1 to 20 or a comma-separated list of seeds (one "
                         f"seed: '{text.strip(',')},')") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: no seed, or a seed repeated")
    return seeds


def claim_runs(seeds, long=True):
    """Every (claim, run, seed) to train, claim by claim and seed by seed: each claim's base and efficient model
    with every seed, its side runs (all_seeds False) with the first seed only; then (long) the long baselines, first
    seed only."""
    runs = [(claim, run, seed) for claim in CLAIMS for seed in seeds for run in claim.runs
            if run.all_seeds or seed == seeds[0]]
    return runs + [(claim, claim.long_base, seeds[0]) for claim in CLAIMS if long and claim.long_base]


def lr_range(where):
    """(lowest, highest) lr of a run's logged training steps (train.py's lr_base), or None: a long run's constant lr
    shows as one value, a drop as two."""
    lrs = [rec["lr_base"] for rec in log_records(where) if rec.get("type") == "train" and "lr_base" in rec]
    return (min(lrs), max(lrs)) if lrs else None


def start_record(run_dir):
    """The last 'start' record of a run's log.jsonl or record file (train.py's arguments and Config as last
    started), or None."""
    found = None
    for rec in log_records(run_dir):
        if rec.get("type") == "start":
            found = rec
    return found


def run_finished(run_dir, epochs=None):
    """Whether a run's log.jsonl holds the evaluation that ends its training: of its last epoch (`epochs`, default
    the epochs it was last started with), or of the epoch where its --time-budget or --max-steps ran out."""
    start, done = start_record(run_dir), evals(run_dir)
    if start is None or not done:
        return False
    last, budget, max_steps = done[max(done)], start["args"].get("time_budget"), start["args"].get("max_steps")
    return (max(done) >= (epochs or start["args"]["epochs"]) - 1 or last.get("epoch_fraction", 1.0) < 1
            or (budget is not None and last.get("train_s", 0.0) >= 60 * budget)
            or (max_steps is not None and last.get("steps", 0) >= max_steps))


def claim_argv(args, claim, run, run_dir, seed):
    return (["--model", claim.model, "--data", "shapes", "--output-dir", run_dir, "--seed", str(seed),
             "--eval-every", "1", "--resume", "auto"] + (["--set", *run.sets] if run.sets else [])
            + (["--time-budget", str(args.budget)] if args.budget else [])
            + (["--max-steps", str(args.steps)] if args.steps else []) + list(run.train_args) + args.train_args)


def check_same_run(run_dir, argv):
    """A run folder already in --out must hold the run asked for now (model, data, seed, --set, --time-budget,
    --max-steps and the recipe: epochs, lr drop, batch size, lrs, amp): never continue or overwrite another one."""
    start = start_record(run_dir)
    if start is None:
        return
    asked = train.parse_args(argv)
    train.resolve_recipe(asked, model_module(asked.model), asked.data == "shapes")  # as train.py logs them
    keys = ("model", "data", "seed", "set", "time_budget", "max_steps", "epochs", "lr_drop", "batch_size", "lr",
            "lr_backbone", "amp")
    differ = [k for k in keys if start["args"].get(k) != getattr(asked, k)]
    if differ:
        held = ", ".join(f"{k} {start['args'].get(k)!r}" for k in differ)
        wanted = ", ".join(f"{k} {getattr(asked, k)!r}" for k in differ)
        raise ValueError(f"{run_dir} holds another run ({held}; asked: {wanted}): pass another --out (or --records)")


def train_runs(argvs, jobs, here, ended=None):
    """train.py on each argv: in this process one after another (jobs 1), else `jobs` processes at a time, each
    logging to its OUTPUT_DIR/train.out. `ended(argv)`, if given, is called as each run ends (claims keeps its
    record). Every run is tried; a failure is raised once all have ended."""
    failed = []
    ended = ended or (lambda argv: None)
    if jobs == 1:
        for argv in argvs:
            try:
                train.main(argv)
            except ValueError as e:  # a bad input or a diverged run: the next runs still train
                failed.append(f"{argv[argv.index('--output-dir') + 1]} ({e})")
            ended(argv)
    else:
        failed = _train_in_processes(argvs, jobs, here, ended)
    if failed:
        raise ValueError("these runs failed: " + "; ".join(failed))


def _train_in_processes(argvs, jobs, here, ended):
    """`python train.py ARGV` for each argv, `jobs` processes at a time -> the failed runs, described. Each process
    gets its share of this machine's cores as its torch threads (OMP_NUM_THREADS, unless set already): processes
    that each take every core fight over them and run many times slower."""
    prepare_shared_files(argvs)
    pending, running, failed = list(argvs), [], []
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // jobs)))
    while pending or running:
        while pending and len(running) < jobs:
            argv = pending.pop(0)
            run_dir = argv[argv.index("--output-dir") + 1]
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "train.out"), "a")
            running.append((run_dir, log, argv, subprocess.Popen([sys.executable, "train.py", *argv], cwd=here, env=env,
                                                           stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(0.5)
        for run_dir, log, argv, process in [r for r in running if r[3].poll() is not None]:
            running.remove((run_dir, log, argv, process))
            log.close()
            if process.returncode:
                failed.append(f"{run_dir} (exit {process.returncode}, see its train.out)")
            ended(argv)
    return failed


def prepare_shared_files(argvs):
    """What train.py makes on first use and every run on the shapes set reads, made once here: the set and the
    ResNet pretrained on it (each depth the runs use), before parallel runs would each make them at once."""
    depths = set()
    for argv in argvs:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage message: the run's own process says it
                args = train.parse_args(argv)
            if args.data == "shapes" and args.backbone_weights in (None, "shapes") and args.official is None:
                depths.add(train.apply_overrides(model_module(args.model).shapes_config(), args.set).backbone_depth)
        except (SystemExit, ValueError):  # a wrong flag or --set: that run's own process says so, the others train
            continue
    if depths:
        shapes.ensure(SHAPES_ROOT)
    for depth in sorted(depths):
        pretrain.ensure(SHAPES_ROOT, depth)


def claim_costs(claim, root, images=8, repeats=5, train_steps=5):
    """One claim's configurations measured in this process on this machine -> {label: {"gmacs", "encoder_gmacs",
    "infer_ms", "train_ms"}}: bench.py's counters (GMACs averaged over the first `images` val images at the shapes
    val size), the median of `repeats` eval-mode forwards of the first image (float32, the runs interleaved) and
    bench.py's training step of the shapes recipe (`train_steps` steps after one warm-up, the recipe's amp)."""
    module = model_module(claim.model)
    val = datalib.CocoDetection(*datalib.find_split(root, "val"),
                                datalib.make_transforms("val", **datalib.SHAPES_SCALES))
    configs = []
    for run in claim.runs:
        cfg = train.apply_overrides(module.shapes_config(), run.sets)
        cfg.num_classes = val.num_classes
        configs.append((cfg, True))
    timing = argparse.Namespace(device="cpu", amp="off", batch_sizes=[1], repeats=repeats)
    rows = bench.measure(module, configs, timing, [val[i][0] for i in range(min(images, len(val)))])
    out = {}
    for run, row in zip(claim.runs, rows):
        step = bench.profile_train_step(claim.model, train_steps, warmup=1, sets=run.sets, root=root)
        out[run.label] = {"gmacs": row["gmacs"], "encoder_gmacs": row["encoder_gmacs"], "infer_ms": row["ms"],
                          "train_ms": step["ms_per_step"]}
    return out


def spread(values):
    """[x] -> (mean, min, max) of the values present (None: no value)."""
    values = [v for v in values if v is not None]
    return (statistics.mean(values), min(values), max(values)) if values else (None, None, None)


def repo_path(path):
    """A path inside this checkout relative to it (the tables are the same on every clone), others as they are."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(path), here)
    return path if rel.startswith("..") else rel


def claim_rows(claim_sources, costs):
    """Every run of CLAIMS as a dict: per seed its evaluations (from its record, or its run folder while it has none)
    and the difference to its claim's dense base of the same seed (same data order); the mean and spread over the
    seeds; its costs and their ratios to the base; the paper's figures. claim_sources: {(model, label, seed): the
    record or run folder}."""
    rows = []
    for claim in CLAIMS:
        base, by_label = None, {}
        for run in claim.runs + ([claim.long_base] if claim.long_base else []):
            seeds = {}
            for (model, label, seed), where in sorted(claim_sources.items(), key=lambda kv: kv[0][2]):
                if (model, label) != (claim.model, run.label):
                    continue
                done, start = evals(where), start_record(where)
                last = done[max(done)] if done else {}
                seeds[seed] = {"source": repo_path(where), "device": (start or {}).get("device"),
                               "finished": run_finished(where),
                               "lr": lr_range(where) if run is claim.long_base else None,  # no lr drop sneaked in
                               "epochs": [{k: rec.get(k) for k in ("epoch", "steps", "AP", "AP50", "APs")}
                                          for _, rec in sorted(done.items())],
                               **{k: last.get(k) for k in ("AP", "AP50", "APs", "steps")}}
            row = {"paper": claim.paper, "model": claim.model, "label": run.label, "sets": run.sets,
                   "base": base is None, "long": run is claim.long_base, "seeds": seeds,
                   "paper_ap": run.paper_ap, "paper_gflops": run.paper_gflops,
                   "paper_encoder_gflops": run.paper_encoder_gflops, "paper_note": run.paper_note,
                   **costs.get(claim.model, {}).get(run.label, {})}
            for key in ("AP", "AP50", "APs"):
                row[key], row[f"{key}_min"], row[f"{key}_max"] = spread([v[key] for v in seeds.values()])
            if base is not None and not row["long"]:  # per seed: this run's AP minus the base's of the same seed
                diffs = seed_diffs(row, base)
                row["diff"] = diffs
                row["diff_mean"], row["diff_min"], row["diff_max"] = spread(list(diffs.values()))
            base = base or row
            for key in ("AP", "gmacs", "encoder_gmacs", "train_ms", "infer_ms", "paper_ap", "paper_gflops",
                        "paper_encoder_gflops"):
                ours, theirs = row.get(key), base.get(key)
                row[f"{key}_ratio"] = ours / theirs if ours is not None and theirs else None
            row["verdict"] = None if row["base"] or row["long"] else verdict(row, base)
            if run.below:  # the paper's claim for this run is an order among the claim's runs
                unknown = [label for label in run.below if label not in by_label]
                if unknown:
                    raise ValueError(f"{claim.paper}, {run.label}: below={unknown} names no earlier run of the claim")
                row["verdict"] = order_verdict(row, [by_label[label] for label in run.below])
            by_label[run.label] = row
            rows.append(row)
    return rows


def seed_diffs(row, other):
    """{seed: row's AP minus other's} over the seeds where both have an AP (the same seed: the same data order)."""
    return {seed: v["AP"] - other["seeds"][seed]["AP"] for seed, v in row["seeds"].items()
            if v["AP"] is not None and other["seeds"].get(seed, {}).get("AP") is not None}


def order_verdict(row, above):
    """Does the paper's order hold here: this run below each run of `above` (rows of the same claim), seed by seed?
    Per run of `above`: the mean of this run's AP minus that run's over the seeds both have, and in how many of them
    this run is below. Holds when below in every such seed against each; does not hold when, against one of them,
    below in none; else within the spread. A run of `above` with no seed in common is named "not trained yet"."""
    parts, below_all, below_none, compared = [], True, False, 0
    for other in above:
        diffs = list(seed_diffs(row, other).values())
        if not diffs:
            parts.append(f"{other['label']} not trained yet")
            continue
        compared += 1
        below = sum(d < 0 for d in diffs)
        below_all = below_all and below == len(diffs)
        below_none = below_none or below == 0
        parts.append(f"{100 * statistics.mean(diffs):+.1f} against {other['label']}, below it in {below} of "
                     f"{len(diffs)} seed(s)")
    if not compared:
        return None
    word = "holds" if below_all else "does not hold" if below_none else "within the spread"
    return f"{word}: " + "; ".join(parts)


def verdict(row, base):
    """Does the paper's claim hold here, within the spread of seeds? The paper's AP difference to its base, relative
    to the base (e.g. -0.7 / 46.0 for Sparse DETR at rho 0.1), against each seed's relative difference here."""
    if not row.get("diff"):
        return None
    diffs = [d / base["seeds"][seed]["AP"] for seed, d in row["diff"].items() if base["seeds"][seed]["AP"]]
    if row["paper_ap"] is None or base["paper_ap"] is None or len(diffs) < len(row["diff"]):  # a claim in words (a
        diffs = list(row["diff"].values())  # side run), or a base at AP 0 (no ratio to it): the order only
        return f"{'above' if min(diffs) > 0 else 'below' if max(diffs) < 0 else 'on both sides of'} the base in " \
               f"{len(diffs)} seed(s)"
    paper = (row["paper_ap"] - base["paper_ap"]) / base["paper_ap"]
    n = f"{sum(d >= paper for d in diffs)} of {len(diffs)} seed(s)"
    if min(diffs) >= paper:
        return f"holds: {n} at or above the paper's {100 * paper:+.1f}% of the base"
    if max(diffs) >= paper:
        return f"within the spread: {n} at or above the paper's {100 * paper:+.1f}% of the base"
    return f"does not hold: {n} at or above the paper's {100 * paper:+.1f}% of the base"


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(value, ratio, fmt):
    return "-" if value is None else f"{value:{fmt}}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def _mean_range(mean, low, high, scale=100.0, sign=False):
    """'mean (low to high)' in AP points, or '-'."""
    if mean is None:
        return "-"
    fmt = "+.1f" if sign else ".1f"
    return f"{scale * mean:{fmt}}" + ("" if low == high else f" ({scale * low:{fmt}} to {scale * high:{fmt}})")


def claims_table(rows, header):
    lines = [header, ""]
    for claim in CLAIMS:
        mine = [r for r in rows if r["paper"] == claim.paper and not r["long"]]
        lines += [f"### {claim.paper}", "", f"The paper: {claim.claim}.", "",
                  "| run | seeds | AP at the end, each seed | AP mean (min to max) | AP50 | APs | AP - base, each seed "
                  "(same data order) | mean (min to max) | the paper's claim here | encoder GMACs (/ base) | "
                  "GMACs (/ base) | train ms / step (/ base) | inference ms (/ base) | paper: AP (/ base) | "
                  "paper: GFLOPs (/ base) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            seeds = r["seeds"]
            each = " / ".join("not trained yet" if not v["epochs"] else _pct(v["AP"]) + (
                "" if v["finished"] else f" (unfinished: {v['steps']} steps)") for v in seeds.values()) or "-"
            diffs = " / ".join(f"{100 * d:+.1f}" for d in r.get("diff", {}).values()) or "-"
            paper_ap = _cell(r["paper_ap"], None if r["base"] else r["paper_ap_ratio"], ".1f")
            gflops = _cell(r["paper_gflops"], None if r["base"] else r["paper_gflops_ratio"], "g")
            if r["paper_encoder_gflops"] is not None:
                gflops += "; encoder " + _cell(r["paper_encoder_gflops"],
                                               None if r["base"] else r["paper_encoder_gflops_ratio"], "g")
            note = f"; {r['paper_note']}" if r["paper_note"] else ""
            costs = [_cell(r.get(key), None if r["base"] else r[f"{key}_ratio"], fmt)
                     for key, fmt in (("encoder_gmacs", ".2f"), ("gmacs", ".2f"), ("train_ms", ".0f"),
                                      ("infer_ms", ".1f"))]
            diff = "-" if r["base"] else _mean_range(r["diff_mean"], r["diff_min"], r["diff_max"], sign=True)
            lines.append(f"| {r['label']} | {', '.join(map(str, seeds)) or '-'} | {each} | "
                         f"{_mean_range(r['AP'], r['AP_min'], r['AP_max'])} | {_pct(r['AP50'])} | {_pct(r['APs'])} | "
                         f"{'-' if r['base'] else diffs} | {diff} | {r['verdict'] or '-'} | " + " | ".join(costs)
                         + f" | {paper_ap} | {gflops}{note} |")
        epochs = max((len(v["epochs"]) for r in mine for v in r["seeds"].values()), default=0)
        if epochs:
            lines += ["", "AP after each epoch: the mean over the seeds (each seed's).", "",
                      "| run | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
                      "|---|" + "---|" * epochs]
            for r in mine:
                cells = []
                for e in range(epochs):
                    aps = [v["epochs"][e]["AP"] for v in r["seeds"].values() if len(v["epochs"]) > e]
                    cells.append("-" if not aps else f"{_pct(statistics.mean(aps))} ("
                                 + " / ".join(_pct(a) for a in aps) + ")")
                lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        long = next((r for r in rows if r["paper"] == claim.paper and r["long"]), None)
        if long is not None:
            lines += ["", *long_base_lines(long, mine[1] if len(mine) > 1 else None)]
        lines.append("")
    return lines


def best(values):
    """The largest of the values that are not None, or None."""
    return max((v for v in values if v is not None), default=None)


def long_base_lines(long, efficient):
    """SMCA's ratio: the DETR baseline's long run (its highest AP and AP50, and its AP at up to 10 evaluations evenly
    spaced back from the last), then, after a blank line, the steps it needs to reach SMCA's AP after each of SMCA's
    epochs (SMCA's run of the same seed)."""
    seed, run = next(iter(long["seeds"].items()), (None, None))
    if run is None or not run["epochs"]:
        return [f"{long['label']}: not trained yet."]
    if not run["lr"]:
        lr = "no lr logged"
    elif run["lr"][0] == run["lr"][1]:
        lr = f"lr {run['lr'][0]:g} at every step"
    else:  # a drop, e.g. brought in by a resume
        lr = f"lr from {run['lr'][1]:g} down to {run['lr'][0]:g}"
    epochs = run["epochs"]
    every = math.ceil(len(epochs) / 10)
    shown = ", ".join(f"{_pct(e['AP'])} after {e['steps']}" for e in epochs[(len(epochs) - 1) % every::every])
    ap, ap50 = _pct(best(e["AP"] for e in epochs)), _pct(best(e.get("AP50") for e in epochs))
    out = [f"{long['label']} (seed {seed}, {run['steps']} steps{'' if run['finished'] else ', unfinished'}; {lr}): AP "
           f"at most {ap} (AP50 at most {ap50}) in its {len(epochs)} evaluation(s); {shown} steps."]
    mine = (efficient or {}).get("seeds", {}).get(seed)
    if mine and mine["epochs"]:
        detr = {e["epoch"]: e for e in epochs}
        smca_epochs = {e["epoch"]: e for e in mine["epochs"]}
        reach = steps_to_reach(detr, smca_epochs, max(smca_epochs) + 1)
        out.append("")
        out.append(f"Steps the DETR baseline needs to reach SMCA's AP after each of SMCA's epochs (seed {seed}; "
                   f"SMCA's epochs end at {', '.join(str(e['steps']) for e in mine['epochs'])} steps): "
                   f"{' / '.join(reach)}.")
    return out


PAPER_COLOURS = {"SMCA-DETR": (214, 39, 40), "Sparse DETR": (31, 119, 180), "Lite DETR": (44, 160, 44),
                 "Focus-DETR": (148, 103, 189)}
PLOT = {"size": (760, 520), "box": (70, 40, 560, 460), "x": (0.0, 1.1)}  # picture, plot area (l, t, r, b), x range


def plot_xy(x, y, y_max):
    """Data (encoder MACs / base, AP in %) -> pixel of the claims picture."""
    (left, top, right, bottom), (x0, x1) = PLOT["box"], PLOT["x"]
    return left + (x - x0) / (x1 - x0) * (right - left), bottom - y / y_max * (bottom - top)


def line_points(segments, every=2):
    """Segments [((x0, y0), (x1, y1))] -> the points along them, `every` pixels apart, as zero-size boxes."""
    points = []
    for (x0, y0), (x1, y1) in segments:
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / every))
        for i in range(n + 1):
            x, y = x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n
            points.append((x, y, x, y))
    return points


def place_labels(points, sizes, box, segments=(), marker=5, gap=3):
    """Each marker's label: points [(px, py)] the markers' centres, sizes [(w, h)] their labels', segments the lines
    drawn [((x0, y0), (x1, y1))] -> [(x, y)] each label's top-left corner. Of a few places right of, left of, above
    and below its marker, inside `box` (left, top, right, bottom), the first that covers no marker and no label
    placed before it and crosses the fewest lines; if none is free of markers and labels, the first place."""
    def overlaps(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    markers = [(px - marker, py - marker, px + marker, py + marker) for px, py in points]
    lines = line_points(segments)
    placed = []
    for (px, py), (w, h) in zip(points, sizes):
        right, left = px + marker + gap, px - marker - gap - w
        candidates = [(x, py - h / 2 + dy) for dy in (0, -h, h, -2 * h, 2 * h) for x in (right, left)]
        candidates += [(px - w / 2, py - marker - gap - h), (px - w / 2, py + marker + gap)]  # above, below
        free = []  # (lines crossed, order) of each place inside the box that covers no marker or label
        for order, (x, y) in enumerate(candidates):
            rect = (x, y, x + w, y + h)
            inside = box[0] <= x and box[1] <= y and x + w <= box[2] and y + h <= box[3]
            if inside and not any(overlaps(rect, other) for other in markers + placed):
                free.append((sum(overlaps(rect, point) for point in lines), order))
        x, y = candidates[min(free)[1] if free else 0]
        placed.append((x, y, x + w, y + h))
    return [(x, y) for x, y, _, _ in placed]


def claims_picture(rows, path):
    """The papers' Fig. 1 in miniature: AP on the shapes val split against encoder multiply-adds relative to each
    paper's dense base: per run its seeds' APs as small points and their mean as a large one (the base hollow),
    a bar from the lowest seed to the highest, each efficient model's mean joined to its base's."""
    done = [r for r in rows if r["AP"] is not None and r.get("encoder_gmacs_ratio") is not None and not r["long"]]
    y_max = max([10.0] + [math.ceil(100 * r["AP_max"] / 10 + 0.5) * 10 for r in done])
    image = Image.new("RGB", PLOT["size"], "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = PLOT["box"]
    small = visualize.font(11)
    draw.rectangle(PLOT["box"], outline=(0, 0, 0))
    for i in range(12):  # x ticks every 0.1
        px, _ = plot_xy(i / 10, 0, y_max)
        draw.line([(px, bottom), (px, bottom + 4)], fill=(0, 0, 0))
        draw.text((px - 8, bottom + 6), f"{i / 10:.1f}", fill=(0, 0, 0), font=small)
    for v in range(0, int(y_max) + 1, 10):
        _, py = plot_xy(0, v, y_max)
        draw.line([(left - 4, py), (left, py)], fill=(0, 0, 0))
        draw.line([(left, py), (right, py)], fill=(235, 235, 235))
        draw.text((left - 28, py - 6), f"{v}", fill=(0, 0, 0), font=small)
    draw.text((left, bottom + 22), "encoder multiply-adds, relative to the paper's dense base (bench.py's counters)",
              fill=(0, 0, 0), font=visualize.font(12))
    draw.text((left, 12), "AP (%) on the shapes val split: each efficient model and its dense base, trained alike",
              fill=(0, 0, 0), font=visualize.font(13))
    labels = []  # ((px, py), text, colour) of each run's mean, labelled once every marker is drawn
    segments = []  # every line drawn, which the labels avoid crossing where they can
    for claim in CLAIMS:
        colour = PAPER_COLOURS[claim.paper]
        mine = [r for r in done if r["paper"] == claim.paper]
        base = next((r for r in mine if r["base"]), None)
        for r in mine:
            px, py = plot_xy(r["encoder_gmacs_ratio"], 100 * r["AP"], y_max)
            if base is not None and not r["base"]:
                segments.append((plot_xy(1.0, 100 * base["AP"], y_max), (px, py)))
                draw.line(segments[-1], fill=colour, width=2)
        for r in mine:
            px, py = plot_xy(r["encoder_gmacs_ratio"], 100 * r["AP"], y_max)
            _, low = plot_xy(0, 100 * r["AP_min"], y_max)
            _, high = plot_xy(0, 100 * r["AP_max"], y_max)
            segments.append(((px, low), (px, high)))
            draw.line(segments[-1], fill=colour, width=1)  # the seeds' range
            for v in r["seeds"].values():
                if v["AP"] is not None:
                    _, sy = plot_xy(0, 100 * v["AP"], y_max)
                    draw.ellipse([px - 2, sy - 2, px + 2, sy + 2], fill=colour)
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], outline=colour, width=2,
                         fill="white" if r["base"] else colour)
            labels.append(((px, py), r["label"].split(":")[0], colour))
    sizes = [draw.textbbox((0, 0), text, font=small)[2:] for _, text, _ in labels]
    corners = place_labels([point for point, _, _ in labels], sizes, PLOT["box"], segments)
    for (_, text, colour), xy in zip(labels, corners):
        draw.text(xy, text, fill=colour, font=small)
    for i, claim in enumerate(CLAIMS):  # legend
        y = top + 10 + 22 * i
        draw.ellipse([right + 16, y, right + 26, y + 10], fill=PAPER_COLOURS[claim.paper])
        draw.text((right + 32, y - 2), claim.paper, fill=(0, 0, 0), font=visualize.font(12))
    draw.ellipse([right + 16, top + 110, right + 26, top + 120], outline=(0, 0, 0), width=2, fill="white")
    draw.text((right + 32, top + 108), "dense base", fill=(0, 0, 0), font=visualize.font(12))
    draw.text((right + 16, top + 132), "large: mean of the seeds", fill=(0, 0, 0), font=visualize.font(11))
    draw.text((right + 16, top + 148), "small, bar: each seed", fill=(0, 0, 0), font=visualize.font(11))
    image.save(path)
    return image


def claims(args, argv):
    """Train every run of CLAIMS (each seed of --seeds) that neither --records nor --out holds finished (the same
    seed, data order and recipe within a claim), keeping each finished run's record in --records; measure each
    configuration's cost on this machine (once: kept in RECORDS/costs.json), then write RECORDS/claims.md,
    claims.json and claims.png from the records (a run without one yet: from its folder in --out)."""
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be a positive number of minutes, got {args.budget}")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive number of steps, got {args.steps}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be positive, got {args.jobs}")
    if args.train_only and args.table_only:
        raise ValueError("--train-only and --table-only exclude each other")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.abspath(args.out or os.path.join("runs", "claims"))
    quick = args.budget is not None or args.steps is not None  # not the full recipes: records stay beside the runs
    records = os.path.abspath(args.records or (os.path.join(out, "records") if quick else os.path.join(here, RECORDS)))
    seeds = parse_seeds(args.seeds, args.seed)
    print(f"== seeds {', '.join(map(str, seeds))}; runs in {out}, records in {records}", flush=True)
    todo, record_of = [], {}
    for claim, run, seed in claim_runs(seeds):
        run_dir, record = claim_dir(out, claim, run, seed), claim_record(records, claim, run, seed)
        argv_run = claim_argv(args, claim, run, run_dir, seed)
        record_of[run_dir] = record
        if args.table_only:  # the records are read as they are (a machine with AMX resolves SMCA's amp otherwise)
            continue
        check_same_run(record, argv_run)
        check_same_run(run_dir, argv_run)
        if os.path.exists(record) or run_finished(run_dir):
            save_record(run_dir, record)  # a run finished before its record was kept
            print(f"== {claim.paper}, {run.label}, seed {seed}: finished ({record})", flush=True)
        else:
            print(f"== {claim.paper}, {run.label}, seed {seed}: python train.py {shlex.join(argv_run)}", flush=True)
            todo.append(argv_run)

    def keep_record(argv):  # each run's record as soon as it has finished
        run_dir = argv[argv.index("--output-dir") + 1]
        if run_finished(run_dir):
            save_record(run_dir, record_of[run_dir])
            print(f"== finished: {run_dir}; its record: {record_of[run_dir]}", flush=True)
    train_runs(todo, args.jobs, here, keep_record)
    if args.train_only:
        again = " ".join(a for a in argv if a != "--train-only")
        print(f"trained; `python -m tools.experiments {again}` measures the costs and writes the table")
        return None
    os.makedirs(records, exist_ok=True)
    cost_path = os.path.join(records, "costs.json")
    costs = {}
    if os.path.exists(cost_path):
        with open(cost_path) as f:
            costs = json.load(f)
    for claim in CLAIMS:
        if not args.table_only and set(costs.get(claim.model, {})) != {run.label for run in claim.runs}:
            print(f"== measuring the cost of {claim.paper}'s configurations on this machine", flush=True)
            costs[claim.model] = claim_costs(claim, SHAPES_ROOT)
            costs["machine"] = f"{machine_name()}, {torch.get_num_threads()} threads"
            with open(cost_path, "w") as f:
                json.dump(costs, f, indent=1)
    sources = {(claim.model, run.label, seed): (record_of[d] if os.path.exists(record_of[d]) else d)
               for claim, run, seed in claim_runs(seeds) for d in [claim_dir(out, claim, run, seed)]}
    rows = claim_rows(sources, costs)
    devices = sorted({v["device"] for r in rows for v in r["seeds"].values() if v["device"]})
    header = (f"`python -m tools.experiments {' '.join(argv)}`: trained on {', '.join(devices) or '?'} (seeds "
              f"{', '.join(map(str, seeds))}; shapes val); costs measured on {costs.get('machine', '?')} "
              f"({os.path.relpath(cost_path, here)}: delete it to measure again). AP in %; ratios and differences "
              f"against each paper's dense base.")
    write_table(records, "claims", claims_table(rows, header), rows)
    claims_picture(rows, os.path.join(records, "claims.png"))
    print(f"the table and the picture: {os.path.join(records, 'claims.md')}, {os.path.join(records, 'claims.png')}")
    return rows


# ---------------------------------------------------------------------------------------------
# leaderboard: every model trained on shapes with one shared CPU budget
# ---------------------------------------------------------------------------------------------

LEADERBOARD = [("DETR (SMCA, prior off)", "smca", ["--set", "spatial_prior=false"]),
               ("SMCA-DETR", "smca", []), ("Sparse DETR", "sparse_detr", []), ("Lite DETR", "lite_detr", []),
               ("Focus-DETR", "focus_detr", [])]


INFER_IMAGES = 20  # the val images a leaderboard run's inference is timed on


@torch.no_grad()
def inference_ms(run_dir, last_eval, data, readable=False):
    """Milliseconds per image of a leaderboard run's model forward: its checkpoint.pth (the weights its last
    evaluation evaluated) on the first INFER_IMAGES val images, one image at a time without autograd, after an untimed
    warm-up; on the readable path when the runs train with --readable-path (readable), else the fast paths. Kept
    in RUN/inference.json with the step it timed, so that reading the table again does not time again. An
    evaluation record that carries its own timing (infer_ms_per_image: the logs of earlier versions of train.py)
    is read as it is."""
    if "infer_ms_per_image" in last_eval:
        return last_eval["infer_ms_per_image"]
    path = os.path.join(run_dir, "inference.json")
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        if kept.get("steps") == last_eval["steps"] and kept.get("readable_path", False) == readable:
            return kept["ms_per_image"]
    det = detect.load_detector(os.path.join(run_dir, "checkpoint.pth"))
    val = datalib.CocoDetection(*datalib.find_split(SHAPES_ROOT if data == "shapes" else data, "val"), det.transform)
    n, seconds = min(INFER_IMAGES, len(val)), 0.0
    images = [val[i][0][None] for i in range(n)]  # (1, 3, H, W) each
    with torch.no_grad(), fast_paths(not readable):
        det.model(images[0], torch.zeros(1, *images[0].shape[2:], dtype=torch.bool))  # a warm-up, untimed
        for image in images:
            t0 = time.perf_counter()
            det.model(image, torch.zeros(1, *image.shape[2:], dtype=torch.bool))
            seconds += time.perf_counter() - t0
    ms = 1e3 * seconds / n
    with open(path, "w") as f:
        json.dump({"steps": last_eval["steps"], "ms_per_image": ms, "images": n, "threads": torch.get_num_threads(),
                   "readable_path": readable}, f)
    return ms


def leaderboard(args, argv):
    """Train each model with train.py's --time-budget (same minutes, seed and data), in this process,
    then table the last evaluation of each run and time its model's inference (inference_ms). Runs already in
    --out are resumed: a spent budget trains nothing, so a second call only re-reads them."""
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
                     "train_min": e["train_s"] / 60,
                     "infer_ms": inference_ms(run_dir, e, args.data, "--readable-path" in args.train_args)})
    lines = [f"`python -m tools.experiments {' '.join(argv)}` ({args.budget:g} CPU minutes of training each, seed "
             f"{args.seed}, {args.data} val, {torch.get_num_threads()} threads)", "",
             "| model | AP | AP50 | APs | APm | APl | epochs done | train (min) | inference (ms / image, batch 1) |",
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

def tokens_in_boxes(tokens, spatial_shapes, boxes):
    """Flat token indices (n,), the token grid, boxes (M, 4) xyxy in input pixels -> (n,) bool: whether each token's
    cell centre lies in a box."""
    centres = torch.tensor([((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2) for _, (x0, y0, x1, y1) in
                            visualize.token_cells(tokens, spatial_shapes)]).reshape(-1, 2)  # (n, 2)
    return ((boxes[None, :, :2] <= centres[:, None]) & (centres[:, None] <= boxes[None, :, 2:])).all(-1).any(-1)


def chosen_in_boxes(inside, per_layer):
    """One image. inside (N,) bool: whether each token's cell centre lies in a ground-truth box; per_layer: per encoder
    layer, the indices of the tokens it chose (kept, or fine-grained; -1 pads) -> [chosen tokens inside a box, chosen
    tokens, in-box tokens], each summed over the layers: the first over the second is the share of the chosen that
    lie in a box, the first over the third the share of the in-box tokens that are chosen."""
    hits = chosen = in_box = 0
    for tokens in per_layer:
        tokens = tokens[tokens >= 0]
        hits += inside[tokens].sum().item()
        chosen += len(tokens)
        in_box += inside.sum().item()
    return [hits, chosen, in_box]


def kept_by_level(inside, foreground, per_layer, spatial_shapes):
    """One image. inside, foreground (N,) bool: whether each token's cell centre lies in a ground-truth box, whether
    the selector's training label calls it foreground; per_layer: each encoder layer's kept token indices (-1 pads)
    -> per level [tokens, in-box tokens, foreground tokens, kept tokens, in-box tokens kept], the last two summed
    over the layers."""
    kept = torch.zeros(len(inside), dtype=torch.long)  # (N,) how many layers keep each token
    for tokens in per_layer:
        kept[tokens[tokens >= 0]] += 1
    rows, start = [], 0
    for h, w in spatial_shapes:
        level = slice(start, start + int(h) * int(w))
        start = level.stop
        rows.append([level.stop - level.start, inside[level].sum().item(), foreground[level].sum().item(),
                     kept[level].sum().item(), kept[level][inside[level]].sum().item()])
    return rows


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
    ranges = focus_detr.label_ranges(det.model.cfg)
    levels = [[0] * 5 for _ in range(det.model.cfg.num_feature_levels)]  # kept_by_level's, over the images
    for score in (trained, "prob_product" if trained == "logit_product" else "logit_product"):
        det.model.cfg.mcsp_score = score
        counts = {"all": [0, 0, 0], "kept": [0, 0, 0], "fine": [0, 0, 0]}  # chosen_in_boxes', over the images
        for i in range(args.images):
            image, target = val[i]
            H, W = image.shape[1:]
            boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([W, H, W, H])  # (M, 4) pixels
            out = det.model(image[None], torch.zeros(1, H, W, dtype=torch.bool), explain=True)
            every = torch.arange(sum(h * w for h, w in out["spatial_shapes"]))  # one image, no padding
            inside = tokens_in_boxes(every.tolist(), out["spatial_shapes"], boxes)  # (N,)
            kept = [t[0] for t in out["kept_tokens"]]
            for key, per_layer in (("all", [every]), ("kept", kept), ("fine", [t[0] for t in out["fine_tokens"]])):
                counts[key] = [a + b for a, b in zip(counts[key], chosen_in_boxes(inside, per_layer))]
            if score == trained:  # the kept tokens do not depend on the MCSP score
                fg = focus_detr.foreground_labels([target["boxes"]], out["spatial_shapes"],
                                                  torch.tensor([[float(W), float(H)]]), ranges)[0].bool()
                for row, more in zip(levels, kept_by_level(inside, fg, kept, out["spatial_shapes"])):
                    row[:] = [a + b for a, b in zip(row, more)]
        rows[score] = {k: a / max(b, 1) for k, (a, b, _) in counts.items()}
        rows[score].update({f"inside_{k}": a / max(c, 1) for k, (a, _, c) in counts.items() if k != "all"})
    det.model.cfg.mcsp_score = trained
    layers, total = det.model.cfg.enc_layers, sum(row[0] for row in levels)
    rows["levels"] = [{"tokens": n / total, "inside": i / max(n, 1), "foreground": f / max(n, 1),
                       "kept": k / max(n * layers, 1), "inside_kept": ik / max(i * layers, 1)}
                      for n, i, f, k, ik in levels]
    names = {"logit_product": "product of raw logits (official)", "prob_product": "product of probabilities (paper)"}
    lines = [f"`python -m tools.experiments {' '.join(argv)}` (first {args.images} val images, every encoder layer; "
             f"the model was trained with {trained})", "",
             "| MCSP score | all tokens inside a box | kept tokens | fine-grained tokens | in-box tokens kept | "
             "in-box tokens fine-grained |", "|---|---|---|---|---|---|"]
    lines += [f"| {names[k]}{' (as trained)' if k == trained else ''} | {100 * v['all']:.1f}% | "
              f"{100 * v['kept']:.1f}% | {100 * v['fine']:.1f}% | {100 * v['inside_kept']:.1f}% | "
              f"{100 * v['inside_fine']:.1f}% |" for k, v in rows.items() if k != "levels"]
    spans = ", ".join(f"({lo:g}, {hi:g}]" for lo, hi in ranges)
    lines += ["", f"Per level, each layer's kept tokens averaged over the {layers} layers; the foreground labels are "
              f"the selector's training target (label ranges {spans} px)", "",
              "| level (stride) | share of the tokens | inside a box | foreground label | kept | in-box tokens kept |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {lvl} ({8 * 2 ** lvl}) | {100 * v['tokens']:.1f}% | {100 * v['inside']:.1f}% | "
              f"{100 * v['foreground']:.1f}% | {100 * v['kept']:.1f}% | {100 * v['inside_kept']:.1f}% |"
              for lvl, v in enumerate(rows["levels"])]
    print("\n".join(lines))
    return rows


# ---------------------------------------------------------------------------------------------
# selected-tokens: what Sparse DETR's encoder updates, against the decoder attention map and the boxes
# ---------------------------------------------------------------------------------------------

def selection_shares(dam, selected, inside):
    """One image. dam (N,) the decoder attention map (DAM); selected (n,) the token indices the encoder updates;
    inside (N,) bool, whether a token's cell centre lies in a ground-truth box. -> {"dam_selected": the DAM's mass
    on the selected tokens (Sparse DETR's logged corr), "dam_top": on its own n heaviest tokens (the most any n
    carry), "uniform": n / N (what n random tokens carry on average), "selected_inside": the share of the selected
    inside a box, "inside": of all tokens, "inside_selected": the share of the in-box tokens that are selected}."""
    n, total, mass = len(selected), dam.numel(), dam.sum().clamp(min=1e-12)
    chosen = torch.zeros_like(inside)
    chosen[selected] = True
    hits = (inside & chosen).sum().item()  # selected tokens inside a box
    return {"dam_selected": (dam[chosen].sum() / mass).item(), "dam_top": (dam.topk(n).values.sum() / mass).item(),
            "uniform": n / total, "selected_inside": hits / n, "inside": inside.float().mean().item(),
            "inside_selected": hits / max(inside.sum().item(), 1)}


@torch.no_grad()
def selected_tokens(args, argv):
    rows = {}
    for path in args.checkpoint:
        det = detect.load_detector(path)
        if det.name != "sparse_detr":
            raise ValueError(f"selected-tokens reads Sparse DETR checkpoints; {path} is {det.name}")
        cfg, ckpt_args = det.model.cfg, load_checkpoint(path).get("args") or {}
        root = SHAPES_ROOT if ckpt_args.get("data", "shapes") == "shapes" else ckpt_args["data"]
        val = datalib.CocoDetection(*datalib.find_split(root, "val"), det.transform)
        if not 1 <= args.images <= len(val):
            raise ValueError(f"--images {args.images}: between 1 and the {len(val)} images of {val.ann_file}")
        if args.rho is None and not cfg.sparse_encoder:  # its config's rho is unused by a dense model
            raise ValueError(f"{path} is a dense base: give --rho, the share of its DAM's heaviest tokens to read")
        rho = cfg.rho if args.rho is None else args.rho  # a dense model's DAM is read at n = this rho
        if not 0 < rho <= 1:
            raise ValueError(f"--rho must be in (0, 1], got {rho}")
        if cfg.sparse_encoder and rho != cfg.rho:
            raise ValueError(f"--rho {args.rho}: {path} selects at its own rho {cfg.rho} (--rho is for a dense base)")
        shares = []
        for i in range(args.images):
            image, target = val[i]
            H, W = image.shape[1:]
            pad = torch.zeros(1, H, W, dtype=torch.bool)  # one image, no padding
            out = det.model(image[None], pad, explain=True)
            boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([W, H, W, H])  # (M, 4) pixels
            inside = tokens_in_boxes(range(out["dam"].shape[1]), out["spatial_shapes"], boxes)  # (N,)
            if cfg.sparse_encoder:
                selected = out["topk_inds"][0, :out["sparse_token_nums"][0]]
            else:  # the DAM's own top n: what an oracle scorer would select
                n = sparse_token_nums(out["token_pad_mask"], rho)[0]
                selected = out["dam"][0].topk(int(n)).indices
            shares.append(selection_shares(out["dam"][0], selected, inside))
        rows[path] = {k: statistics.mean(s[k] for s in shares) for k in shares[0]}
        rows[path]["selection"] = f"{cfg.selection}, rho {cfg.rho}" if cfg.sparse_encoder else \
            f"dense (the DAM's top rho {rho})"
    lines = [f"`python -m tools.experiments {' '.join(argv)}` (first {args.images} val images, each alone; the mean "
             "over images)", "",
             "| checkpoint | selection | DAM on the selected tokens | DAM on its own top n (n / N) | selected "
             "inside a box | in-box tokens selected | all tokens inside a box |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {path} | {r['selection']} | {100 * r['dam_selected']:.1f}% | {100 * r['dam_top']:.1f}% "
              f"({100 * r['uniform']:.1f}%) | {100 * r['selected_inside']:.1f}% | {100 * r['inside_selected']:.1f}% | "
              f"{100 * r['inside']:.1f}% |" for path, r in rows.items()]
    print("\n".join(lines))
    return rows


# ---------------------------------------------------------------------------------------------
# log-stats: logged training terms over a range of steps
# ---------------------------------------------------------------------------------------------

BOOKKEEPING = {"type", "epoch", "iter", "step"}  # keys of a train record that are not measured terms


def parse_step_range(text):
    """'900-999' -> (900, 999), both included."""
    m = re.fullmatch(r"(\d+)-(\d+)", text.strip())
    if not m or int(m[1]) > int(m[2]):
        raise ValueError(f"--steps {text!r}: give FIRST-LAST, two optimizer steps with FIRST <= LAST (e.g. 900-999)")
    return int(m[1]), int(m[2])


def train_records_by_step(source):
    """A run folder, its log.jsonl or a record file -> {step: its train record}, the later of a repeated step (a
    resumed run logs the steps it redoes again)."""
    path = curves.log_path(source)
    by_step = {int(r["step"]): r for r in curves.read_records(path) if r.get("type") == "train" and "step" in r}
    if not by_step:
        raise ValueError(f"{path} has no train records: the run has not finished an optimizer step yet")
    return by_step


def log_stats(args, argv):
    """Prints, per run and window of --every steps within --steps, the mean (or median) of each term over the train
    records of the steps logged in that window, as a Markdown table; returns {(run, first, last): {"steps logged":
    n, term: value}}."""
    first, last = parse_step_range(args.steps)
    every = last - first + 1 if args.every is None else args.every
    if every < 1:
        raise ValueError(f"--every {every}: a window is at least one step")
    stat = statistics.median if args.median else statistics.fmean
    table = {}
    for source in args.runs:
        by_step = train_records_by_step(source)
        logged = set().union(*by_step.values()) - BOOKKEEPING
        terms = args.terms or curves.main_terms(logged) + [t for t in ("grad_norm", "corr") if t in logged]
        if missing := [t for t in terms if t not in logged]:
            raise ValueError(f"{source} logs no {', '.join(missing)}; its terms: {', '.join(sorted(logged))}")
        ordered = sorted(by_step.items())
        for lo in range(first, last + 1, every):
            hi = min(lo + every - 1, last)
            recs = [r for step, r in ordered if lo <= step <= hi]
            if not recs:
                raise ValueError(f"{source} logged no step in {lo}-{hi} (its steps: {min(by_step)}-{max(by_step)})")
            values = {t: stat([r[t] for r in recs if isinstance(r.get(t), (int, float))] or [math.nan]) for t in terms}
            table[(source, lo, hi)] = {"steps logged": len(recs), **values}
    columns = list(dict.fromkeys(k for row in table.values() for k in row))

    def cell(row, column):
        if column not in row:
            return ""
        return str(row[column]) if column == "steps logged" else f"{row[column]:.4g}"

    print(f"{'median' if args.median else 'mean'} over the logged steps of each window\n")
    print("| run | steps | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2))
    for (source, lo, hi), row in table.items():
        print(f"| {source} | {lo}-{hi} | " + " | ".join(cell(row, c) for c in columns) + " |")
    return table


EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def log_evals(args, argv):
    """Prints each run's end-of-epoch evaluations (an epoch evaluated again after a resume: its last; an --eval-only
    of weights saved within an epoch is not one) with --metrics in %, as a Markdown table; returns {(run, steps):
    {metric: value}}, the values as logged (fractions)."""
    table = {}
    for source in args.runs:
        path = curves.log_path(source)
        by_epoch = epoch_evals(curves.read_records(path))
        if not by_epoch:
            raise ValueError(f"{path} has no end-of-epoch evaluation records: the run has not finished an epoch's "
                             f"evaluation yet")
        for _, rec in sorted(by_epoch.items()):
            if missing := [m for m in args.metrics if not isinstance(rec.get(m), (int, float))]:
                raise ValueError(f"{path}'s evaluation after step {rec.get('steps')} has no {', '.join(missing)}")
            table[(source, rec.get("steps"))] = {m: rec[m] for m in args.metrics}
    print("| run | steps | " + " | ".join(args.metrics) + " |\n|" + "---|" * (len(args.metrics) + 2))
    for (source, steps), row in table.items():
        print(f"| {source} | {steps} | " + " | ".join(f"{100 * v:.1f}" for v in row.values()) + " |")
    return table


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    c = sub.add_parser("converge", help="SMCA against its DETR baseline, same seed and steps")
    c.add_argument("--epochs", type=int, default=3, help="epochs per model, no lr drop (default 3)")
    c.add_argument("--baseline-epochs", type=int, help="epochs of the DETR baseline (default: --epochs), to see "
                   "how many steps it needs to reach SMCA's AP")
    c.add_argument("--probe", nargs="+", metavar="CKPT", help="probe trained smca checkpoints instead of training")
    c.add_argument("--multiscale", action="store_true", help="also train multi-scale SMCA (third column)")
    m = sub.add_parser("claims", help="each paper's efficient model against its dense base, trained alike")
    m.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="train each run for this many minutes (train.py --time-budget), for a quick check of the "
                        "whole command; default: each model's full shapes recipe")
    m.add_argument("--steps", type=int, default=None, metavar="N",
                   help="train each run for N optimizer steps (train.py --max-steps; every run of a pair the same), "
                        "then evaluate; default: each model's full shapes recipe")
    m.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process with its "
                   "share of the cores as threads (default 1)")
    m.add_argument("--seeds", default="3", help="a count N from 1 to 20 (the seeds --seed, --seed + 1, ...) or a "
                   "comma-separated list ('44,' is the one seed 44): each claim's base and efficient model train with "
                   "every seed, its side runs with the first (default 3)")
    m.add_argument("--records", default=None, metavar="DIR",
                   help="where each finished run's record (its log.jsonl, gzipped) is kept and the table is read "
                        f"from; default {RECORDS} of the checkout (committed), OUT/records with --budget or --steps")
    m.add_argument("--train-only", action="store_true", help="train the runs, measure nothing, write no table")
    m.add_argument("--table-only", action="store_true", help="train nothing: the table and picture of the runs --out "
                   "holds now (an unfinished one marked with its steps)")
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
    t = sub.add_parser("selected-tokens", help="the tokens a trained Sparse DETR updates, against its decoder "
                       "attention map and the boxes")
    t.add_argument("--checkpoint", nargs="+", required=True,
                   help="Sparse DETR checkpoint.pth files written by train.py")
    t.add_argument("--images", type=int, default=100, help="how many val images (default 100)")
    t.add_argument("--rho", type=float, default=None, help="a dense base's DAM is read at its heaviest rho of the "
                   "tokens (required with a dense base); a sparse model's at its own rho (--rho, if given, must be it)")
    g = sub.add_parser("log-stats", help="the mean or median of logged training terms over a range of steps")
    g.add_argument("runs", nargs="+", metavar="RUN",
                   help="train.py --output-dir folders, log.jsonl files or .jsonl.gz records")
    g.add_argument("--steps", required=True, metavar="FIRST-LAST", help="the optimizer steps read, both included")
    g.add_argument("--every", type=int, default=None, metavar="N", help="one row per N steps (default: one row)")
    g.add_argument("--terms", nargs="+", default=None, help="logged terms, last on the line (default: the total loss "
                   "and the loss terms curves.png draws, grad_norm and corr where logged)")
    g.add_argument("--median", action="store_true", help="the median instead of the mean")
    e = sub.add_parser("log-evals", help="each end-of-epoch evaluation of a run: the steps trained and COCO metrics")
    e.add_argument("runs", nargs="+", metavar="RUN",
                   help="train.py --output-dir folders, log.jsonl files or .jsonl.gz records")
    e.add_argument("--metrics", nargs="+", default=list(EVAL_METRICS),
                   help=f"logged metrics (default: {' '.join(EVAL_METRICS)})")
    for q in (c, b):  # claims: the shapes set (its costs are the shapes configurations')
        q.add_argument("--data", default="shapes")
    for q in (c, m, b, v):
        q.add_argument("--seed", type=int, default=42)
        q.add_argument("--out", default=None, help="output folder (default runs/converge, runs/claims, "
                                                   "runs/leaderboard or runs/speed)")
        q.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                       help="further train.py arguments for every run "
                            "(last on the line, e.g. --train-args --batch-size 4)")
    args = p.parse_args(argv)
    experiments = {"converge": converge, "claims": claims, "leaderboard": leaderboard, "speed": speed,
                   "fine-tokens": fine_tokens, "selected-tokens": selected_tokens,
                   "log-stats": log_stats, "log-evals": log_evals}
    return experiments[args.experiment](args, argv)


if __name__ == "__main__":
    run_cli(main)
