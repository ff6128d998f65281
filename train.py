"""Train and evaluate a detector of this library.

    python train.py --model smca                               # built-in shapes set, CPU-sized recipe
    torchrun --nproc_per_node=8 train.py --model smca --data /path/to/coco --backbone-weights imagenet
    python train.py --model sparse_detr --set rho=0.2           # any model; --set overrides its Config
    python train.py --model lite_detr --set enc_scale=2          # Lite DETR H2L2-(2+1)x3 (2 high-level maps, 2 low)

--data shapes (the default) generates the synthetic set under data/shapes on first use and trains
the model's CPU-sized configuration (`shapes_config()`, with SHAPES_RECIPE below and the model
file's differences from it) from the ResNet-18 that engine/pretrain.py pretrains on the set (once, on
first use; --backbone-weights shapes). --data PATH is a COCO-format root (train2017/ val2017/
annotations/instances_{train,val}2017.json, or train/ val/ annotations/instances_{train,val}.json)
and trains the paper's configuration with COCO_RECIPE.

What train.py reads from a model file (the module named by --model):
    Config, build(cfg) -> (model, criterion, postprocess), shapes_config()   required
    SHAPES_RECIPE, COCO_RECIPE   optional: where the model's recipe differs from the shared one below (its
                                 "amp" is taken on a CPU with AMX only, float32 elsewhere)
    LR_MULTIPLIERS               optional: {substring of a parameter name: lr multiplier}
    from_official(path) -> (Config, state dict, notes)   optional: the authors' weights (--eval-only --official)
    OFFICIAL_WEIGHTS             required: where the authors publish those weights, or why there are none (the
                                 --official error of a model without from_official quotes it)
and calls the model as common.py's interface says: model(images, pad_mask, targets) in training,
model(images, pad_mask) in evaluation.

Every epoch writes OUTPUT_DIR/checkpoint.pth atomically (model, optimizer, AMP scaler, epoch, every rank's RNG
states, config; plain types and tensors), and so do --save-every N steps within an epoch and a SIGTERM (saved at
the end of the step in progress, then the run stops with exit status 143); --resume auto continues from it, as the
uninterrupted run would have, taking the flags given then (docs/coco-training.md). OUTPUT_DIR/log.jsonl holds every loss
term, the grad norm and each evaluation. A non-finite loss stops the run and names the step and
the image ids; the last checkpoint stays as it was. Each evaluation also chooses the score threshold of the best
F1 on the val split (engine/pictures.py: a detection counts when it matches a ground-truth box of its class at
IoU >= 0.5); the checkpoint of the evaluated weights keeps it ("threshold") and detect.py draws above it by default.
A run ends by drawing its detections above that threshold and the paper's mechanism on the first 4 val images (the
pictures detect.py draws; --pictures N draws N, 0 none) into OUTPUT_DIR/pictures-after-step-S; --eval-only draws
them only when --pictures is given, into OUTPUT_DIR/eval-pictures-NAME-after-step-S (NAME: the checkpoint file's).
--time-budget MINUTES stops training when that much training time is spent (a partial epoch then counts as done),
saves, evaluates and logs the training seconds.
"""
import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
import json
import math
import os
import random
import signal
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import data as datalib
from common import checkpoint_layers, fast_paths, load_backbone_weights, recompute_sampling, RESNET_URLS
from data import shapes
from engine import curves, pictures, pretrain
from engine.runtime import (MODELS, SHAPES_ROOT, backbone_weights, cpu_has_amx, cpu_has_bf16, load_checkpoint,
                            machine_name, model_module, run_cli, save_atomic, select_device)
# What every run needs beside a model file's COCO_RECIPE (the paper's epochs, lr drop, lrs, images per GPU, the
# total batch it assumes, weight decay, clip; each model file gives them with their sources). At 800 x 1333 the
# deformable samples and the encoder's activations are most of a step's memory: both are recomputed in the backward
# pass by default there (docs/memory.md)
COCO_RECIPE = {"accum_steps": 1, "eval_every": 1, "recompute_sampling": "on", "checkpoint_encoder": "on"}
# The CPU recipe on the shapes set (a model file's SHAPES_RECIPE overrides some of it): 2 epochs of
# 500 steps of 8 images, lr / 10 after the second, the shapes-pretrained backbone at a quarter of the lr, float32
# (no "amp": a model's SHAPES_RECIPE may add "amp": "bf16-backbone", honoured on a CPU with AMX only)
SHAPES_RECIPE = {"epochs": 2, "lr_drop": 2, "batch_size": 8, "lr": 4e-4, "lr_backbone": 1e-4, "weight_decay": 1e-4,
                 "clip_max_norm": 0.1, "accum_steps": 1, "eval_every": 1}
# The flags a recipe fills, and that a resumed run may change: each given on resume is applied from there on and
# named in one line at the start; each not given keeps the checkpoint's value. (--max-steps and --time-budget are
# limits of the invocation: counted over resumes, but applied only when given. The model's Config (--set, the data's
# classes, a schedule's Config) cannot change: a resume under another is refused.)
RECIPE_FLAGS = ("epochs", "lr_drop", "batch_size", "lr", "lr_backbone", "weight_decay", "clip_max_norm", "accum_steps",
                "eval_every")
RESUMED_FLAGS = RECIPE_FLAGS + ("amp", "seed", "scales", "schedule", "recompute_sampling", "checkpoint_encoder",
                                "max_bad_images", "save_every")


AMP_MODES = ("off", "bf16", "fp16", "bf16-backbone")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--data", default="shapes", help="'shapes' (built in) or a COCO-format root folder")
    p.add_argument("--output-dir", default=None, help="default: runs/<model>-<data name>")
    p.add_argument("--schedule", default=None, help="with --data PATH: one of the model file's named COCO schedules "
                   "(Focus-DETR: 12ep, 24ep, 36ep; default its paper's headline one)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr-drop", type=int, help="epoch after which the lr is multiplied by 0.1")
    p.add_argument("--batch-size", type=int, help="images per process and step (before --accum-steps)")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation: each optimizer step sums the gradients of "
                   "K batches, its loss normalised as one batch of K x batch-size images would be (DDP synchronises "
                   "once per step). Total batch = processes x batch size x K. Default 1")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-backbone", type=float, help="0 freezes the whole backbone (as DETR's --lr_backbone 0)")
    p.add_argument("--weight-decay", type=float, help="AdamW's (default: the recipe's, 1e-4 in every paper)")
    p.add_argument("--clip-max-norm", type=float, help="gradient clipping; 0 turns it off (default: the recipe's, 0.1)")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="mixed precision: bf16 or fp16 autocast of the whole model; bf16-backbone: only the ResNet "
                   "in bf16 (where a CPU's AMX or a GPU's tensor cores pay most), the transformer in float32. "
                   "Default: the recipe's (SMCA's shapes recipe says bf16-backbone, taken on a CPU with AMX only), "
                   "else off. Evaluation runs as training does")
    p.add_argument("--tf32", choices=("on", "off"), default="on",
                   help="on CUDA: TF32 matrix products and convolutions (float32 ranges, 10-bit mantissa; much faster "
                        "on Ampere and later, as DETR-style training usually runs). Default on")
    p.add_argument("--recompute-sampling", choices=("on", "off"), default=None,
                   help="on: the deformable sampling keeps only its inputs for the backward and samples again there "
                        "(the same numbers, less memory, a slower backward; common.recompute_sampling). Default: on "
                        "with --data PATH (COCO scale), off on shapes")
    p.add_argument("--checkpoint-encoder", choices=("on", "off"), default=None,
                   help="on: activation checkpointing of the encoder layers (each keeps only its inputs for the "
                        "backward and runs again there; the same numbers, less memory, a slower step; "
                        "common.checkpoint_layers). Default: on with --data PATH, off on shapes")
    p.add_argument("--resume", default=None, help="'auto' (OUTPUT_DIR/checkpoint.pth if present) or a checkpoint "
                   "path. Flags given on resume apply from there on (named at the start); flags not given keep "
                   "the checkpoint's values")
    p.add_argument("--finetune", default=None, help="initialise from a checkpoint's model weights; keys whose "
                   "shape differs (e.g. another class count) are skipped and listed")
    p.add_argument("--scales", choices=("coco", "shapes"), default=None,
                   help="image sizes of the augmentation: 'coco' (short side 480-800, max 1333; the default with "
                        "--data PATH) or 'shapes' (128-192, max 240; the default on shapes)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--readable-path", action="store_true",
                   help="train and evaluate on the readable path, without the fast paths (common.fast_paths)")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="with --eval-only: evaluate the authors' released weights (the file as published) through "
                        "the model file's from_official(); the configuration comes from the file")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop training after this many minutes of training (summed over resumes; checked every "
                   "iteration), then save and evaluate")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop training after N iterations (optimizer steps, counted over resumes), then save and "
                        "evaluate; a partial epoch then counts as done, as with --time-budget. The lr drop stays at "
                        "its epoch (--lr-drop)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="also save OUTPUT_DIR/checkpoint.pth every N optimizer steps within an epoch (beside the save "
                        "at each epoch's end; 0: none, as by default; a resume keeps the run's); --resume auto "
                        "continues from that step, the run's numbers as if uninterrupted. With or without it, a "
                        "SIGTERM (a cluster's preemption) saves at the end of the step in progress and stops the run "
                        "(exit status 143)")
    p.add_argument("--max-bad-images", type=int, default=None, metavar="N",
                   help="an image that cannot be decoded is skipped with a warning; the run stops once more than N "
                        "different ones were skipped (default 10)")
    p.add_argument("--backbone-weights", default=None,
                   help="torchvision-format ResNet .pth, 'imagenet' (download), "
                   "'shapes' (the ResNet engine/pretrain.py pretrains on the shapes set, trained on first use) "
                   "or 'none' (from scratch). Default: "
                   "'imagenet' with --data PATH (the papers fine-tune an ImageNet backbone), 'shapes' on shapes")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override model Config fields (repeatable; later wins)")
    p.add_argument("--seed", type=int, default=None, help="default 42")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader processes; default 4 on GPU, 0 on CPU "
                        "(where workers only take cores from the model)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between console progress lines")
    p.add_argument("--pictures", type=int, default=None, metavar="N",
                   help="val images whose detections and mechanism the run's end draws (default 4 after training, "
                        "none after --eval-only; 0: none)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

def init_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPU, gloo on CPU -> (rank, local rank, world, device).
    On one or several nodes alike: torchrun's own rendezvous (--nnodes, --rdzv-endpoint) forms the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), local_rank, dist.get_world_size(), device


def any_rank(flag):
    """Whether `flag` holds on any rank (every rank gets the answer: a decision they take together)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_each_node(prepare, rank, local_rank):
    """Run `prepare` (which makes files a node reads unless they are there already: the shapes set, its pretrained
    backbone, a download) on global rank 0 first, then on the first process of every other node: a node without a
    shared disk makes its own copy, and nodes that share one never write the same file at once. A ValueError (or any
    error) in `prepare` on one rank stops every rank, each with a message (no rank is left waiting)."""
    for mine in (rank == 0, local_rank == 0 and rank != 0):
        error = None
        if mine:
            try:
                prepare()
            except Exception as e:
                error = e
        if any_rank(error is not None):
            if error is not None:
                raise error if isinstance(error, ValueError) else ValueError(f"{type(error).__name__}: {error}")
            raise ValueError(f"rank {rank}: another process failed to prepare its node's data (its log says why)")


def from_rank0(make, rank):
    """`make()` on rank 0, its result (or the ValueError it raised) given to every rank: a decision taken once."""
    if not dist.is_initialized():
        return make()
    box = [None]
    if rank == 0:
        try:
            box = [("ok", make())]
        except ValueError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise ValueError(box[0][1])
    return box[0][1]


def all_finite(t):
    """Whether a scalar is finite on every rank (so all ranks stop together)."""
    return not any_rank(not torch.isfinite(t).item())


def mean_over_ranks(values, device):
    """{name: float} -> the same names, each averaged over the ranks (the logged losses of a DDP step)."""
    if not dist.is_initialized():
        return values
    names = sorted(values)
    t = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(names, (t / dist.get_world_size()).tolist()))


def param_fingerprints(model, world):
    """Every rank's sum of its parameters (float64): equal when the ranks hold the same model, as DDP must keep
    them."""
    mine = sum(p.detach().double().sum() for p in model.parameters()).item()
    if world == 1:
        return [mine]
    prints = [None] * world
    dist.all_gather_object(prints, mine)
    return prints


# ---------------------------------------------------------------------------------------------
# Set-up: config, data, optimizer, checkpoints
# ---------------------------------------------------------------------------------------------

def apply_overrides(cfg, pairs):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if key not in fields:
            raise ValueError(f"--set {key}: no such Config field; fields are {sorted(fields)}")
        kind = type(getattr(cfg, key))
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                parsed = value.lower() in ("true", "1")
            elif kind is tuple:  # comma-separated numbers, e.g. cascade_ratios=1,0.8,0.6,0.6,0.4,0.2
                parsed = tuple(float(x) for x in value.split(","))
            else:
                parsed = kind(value)
        except ValueError:
            raise ValueError(f"--set {key}={value!r}: expected a {kind.__name__}") from None
        setattr(cfg, key, parsed)
    return cfg


def build_data(args, recipe_scales, rank, local_rank):
    if args.data == "shapes":  # made on each node that lacks it (several nodes need no shared disk)
        on_each_node(lambda: shapes.ensure(SHAPES_ROOT), rank, local_rank)
        root = SHAPES_ROOT
    else:
        root = args.data
        if not os.path.isdir(root):
            raise ValueError(f"--data {root!r} is neither 'shapes' nor a folder")
    val = datalib.CocoDetection(*datalib.find_split(root, "val"), datalib.make_transforms("val", **recipe_scales))
    train = None
    if not args.eval_only:
        train_transforms = datalib.make_transforms("train", **recipe_scales)
        train = datalib.CocoDetection(*datalib.find_split(root, "train"), train_transforms)
        if train.num_classes > val.num_classes or train.categories != val.categories:
            raise ValueError(f"train and val annotation files declare different categories "
                             f"({train.ann_file} vs {val.ann_file})")
    return train, val


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose indices carry the augmentation's stream: (index, seed * 100003 + epoch * 1009 +
    rank, position in the epoch); the dataset restarts its random stream from it at each pass
    (CocoDetection.__getitem__), so order and augmentation depend only on (seed, epoch, rank) and the loader's worker:
    a resumed run sees what an uninterrupted one saw, with persistent workers too."""

    def __iter__(self):
        stream = self.seed * 100003 + self.epoch * 1009 + self.rank
        return ((i, stream, position) for position, i in enumerate(super().__iter__()))


def make_loader(dataset, batch_size, shuffle, seed, epoch, rank, world, workers, cuda=False, persistent=True):
    """A loader whose order and augmentation depend only on (seed, epoch, rank): resume-exact. For another epoch,
    `loader.sampler.set_epoch(e)`. On CUDA its batches come in pinned memory and (persistent) its workers persist
    over epochs."""
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=datalib.collate,
                                       num_workers=workers, drop_last=False, pin_memory=cuda,
                                       persistent_workers=cuda and persistent and workers > 0,
                                       worker_init_fn=ignore_sigterm if workers > 0 else None)


def ignore_sigterm(worker_id):
    """A loader worker's start: a SIGTERM sent to every process of the run (torchrun's to its workers' process group,
    a scheduler's to the job) is for the training process, which saves and stops (stop_on_sigterm) and so ends its
    loader workers; torch's own handler would end a worker at once, failing the step in progress unsaved. One from
    the training process itself (torch ending a worker that does not stop) still ends it, as torch's does: the
    signal is blocked and a thread waits for it, asking who sent it."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no SIGTERM from outside a process
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (threads started after this one inherit it)

    def wait():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)
    threading.Thread(target=wait, daemon=True).start()


NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)


def param_groups(model, lr, lr_backbone, multipliers, weight_decay, weight_decay_norm=None):
    """AdamW groups: backbone at lr_backbone, parameters whose name contains a key of `multipliers`
    at lr * multiplier (a model file's LR_MULTIPLIERS), the rest at lr; each group's `base_lr` is its lr before the
    drop. weight_decay_norm (a recipe's; detrex's 0.0): the weight decay of normalisation layers' parameters."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            key, group_lr = "backbone", lr_backbone
        else:
            key, group_lr = "base", lr
            for sub, mult in multipliers.items():
                if sub in name:
                    key, group_lr = sub, lr * mult
                    break
        decay = weight_decay
        if weight_decay_norm is not None and id(p) in norm:
            key, decay = key + "_norm", weight_decay_norm
        groups.setdefault(key, {"params": [], "lr": group_lr, "base_lr": group_lr, "weight_decay": decay,
                                "name": key})["params"].append(p)
    return list(groups.values())


def set_lr(optimizer, epoch, lr_drop):
    """Each group's lr for `epoch` (0-based): its base lr, x 0.1 from epoch lr_drop on (DETR's StepLR, written as a
    function of the epoch so that a resumed run takes a changed --lr-drop or --lr)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * 0.1 ** (epoch // lr_drop)


TRAINING_STATE = ("optimizer", "scaler", "rng", "epoch")


def check_compatible(ckpt, path, model_name, cfg, training):
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path!r} is not a checkpoint written by train.py")
    missing = [k for k in TRAINING_STATE if k not in ckpt] if training else []
    if missing:
        raise ValueError(f"{path!r} lacks the training state {missing} needed to resume; "
                         f"use --finetune to start from its weights")
    if ckpt.get("model_name") != model_name:
        raise ValueError(f"{path!r} is a checkpoint of model {ckpt.get('model_name')!r}, not {model_name!r}")
    ours, theirs = dataclasses.asdict(cfg), ckpt["config"]
    diff = [f"{k}: checkpoint {theirs[k]!r} vs now {v!r}" if k in theirs else f"{k}: not in the checkpoint (an older "
            f"version of {model_name}.py) vs now {v!r}" for k, v in ours.items() if theirs.get(k, object()) != v]
    if diff:
        shown = ", ".join(diff)
        raise ValueError(f"{path!r} was trained with another config ({shown}); use the same --data/--set/--schedule, "
                         f"another --output-dir, or --finetune to start from its weights")


def finetune_from(model, path):
    """Load matching weights; report what was skipped (another class count, another head)."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds no model state dict")
    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    unused = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in loadable)
    if not loadable:
        raise ValueError(f"{path!r}: none of its {len(state)} tensors fits this model")
    model.load_state_dict(loadable, strict=False)
    return {"loaded": len(loadable), "shape_mismatch": skipped, "unused": unused, "missing": missing}


# ---------------------------------------------------------------------------------------------
# Train and evaluate
# ---------------------------------------------------------------------------------------------

def to_device(targets, device):
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def json_safe(value):
    """NaN and infinities (a class with no ground truth has AP NaN) -> None, so log.jsonl stays JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class Run:
    """What the training and evaluation loops share."""
    model: torch.nn.Module  # wrapped in DistributedDataParallel when world > 1
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    amp_dtype: object  # None, torch.bfloat16 or torch.float16
    categories: dict  # category id -> name, from the data (saved in checkpoints for detect.py)
    log_file: object = None  # rank 0: OUTPUT_DIR/log.jsonl, opened for appending
    train_s: float = 0.0  # seconds of training so far, over every resume (--time-budget)
    steps: int = 0  # optimizer steps so far, over every resume
    best_ap: float = -1.0  # the best evaluated AP so far (checkpoint_best.pth holds its weights)
    bad_images: dict = dataclasses.field(default_factory=dict)  # image id -> why it could not be read (this rank)
    stop_asked: bool = False  # a SIGTERM came: save at the end of the step in progress and stop
    train_images: int = 0  # the train set's size (a checkpoint saved within an epoch keeps it)
    epoch_start: float = 0.0  # time.time() when the epoch in progress began (a resumed one: back-dated by its epoch_s)

    def log(self, record):
        if self.log_file:
            self.log_file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.log_file.flush()


def out_of_time(run, seconds_this_epoch):
    """Has the --time-budget run out, or have --max-steps steps been taken? Rank 0's clock decides for every rank
    (they must stop together; the step count is the same on every rank)."""
    if run.args.max_steps is not None and run.steps >= run.args.max_steps:
        return True
    budget = run.args.time_budget
    if budget is None:
        return False
    spent = torch.tensor([float(run.train_s + seconds_this_epoch >= 60 * budget)], device=run.device)
    if run.world > 1:
        dist.broadcast(spent, 0)
    return bool(spent.item())


def limit_text(run):
    """Which limit ended training, in words: --max-steps once its steps are taken, else the --time-budget."""
    if run.args.max_steps is not None and run.steps >= run.args.max_steps:
        return f"--max-steps {run.args.max_steps}"
    return f"--time-budget of {run.args.time_budget:g} min"


def forward_loss(run, images, pad_mask, targets):
    """The forward pass and the set loss of one batch -> (weighted total, {term: unweighted value})."""
    weights = run.criterion.weight_dict
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        outputs = run.model(images, pad_mask, targets)
    losses = run.criterion(outputs, targets)
    return sum(losses[k] * weights[k] for k in losses if k in weights), losses


def accumulated_loss(run, batches):
    """Forward and backward of the batches of one optimizer step (--accum-steps), their loss normalised as one
    batch of all their images would be: the box losses divide by the batches' mean box count (the criterion's
    accumulated_boxes), and each batch's loss by the number of batches. DDP synchronises the gradients in the last
    backward only. -> (the step's loss, {term: value}, whether every batch's loss was finite on every rank), each the
    mean over the batches (at the first non-finite batch: that batch's, nothing backpropagated)."""
    k = len(batches)
    run.criterion.accumulated_boxes = sum(len(t["labels"]) for _, _, ts in batches for t in ts) / k if k > 1 else None
    total, terms = 0.0, {}
    try:
        for i, (images, pad_mask, targets) in enumerate(batches):
            last = run.world == 1 or i == k - 1
            with contextlib.nullcontext() if last else run.model.no_sync():
                loss, losses = forward_loss(run, images, pad_mask, targets)
                if not all_finite(loss.detach()):
                    return loss, losses, False
                run.scaler.scale(loss / k).backward()
            total = total + loss.detach() / k
            for name, v in losses.items():
                terms[name] = terms.get(name, 0.0) + v.detach() / k
    finally:
        run.criterion.accumulated_boxes = None
    return total, terms, True


def optimizer_step(run):
    """Gradient clipping and the optimizer step (the gradients already summed) -> the gradient norm before
    clipping."""
    optimizer, scaler, clip = run.optimizer, run.scaler, run.args.clip_max_norm
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def note_bad_images(run, skipped):
    """Count the images of a batch that could not be read (collate lists them: [(image id, error)]); stop the run
    once more than --max-bad-images different ones were skipped on any rank."""
    for image_id, error in skipped:
        if image_id not in run.bad_images:
            run.bad_images[image_id] = error
            print(f"warning: skipped image id {image_id} (rank {run.rank}): {error}", flush=True)
    count = torch.tensor([float(len(run.bad_images))], device=run.device)
    if run.world > 1:  # the ranks read different images (DistributedSampler)
        dist.all_reduce(count)
    if count.item() > run.args.max_bad_images:
        named = "; ".join(f"id {i}: {e}" for i, e in list(run.bad_images.items())[:5])
        raise ValueError(f"stopped: {int(count.item())} images could not be read (more than --max-bad-images "
                         f"{run.args.max_bad_images}); {named}. Fix or remove them, or raise --max-bad-images; "
                         f"the last checkpoint in {run.args.output_dir} is untouched")


def step_batches(loader, k, device):
    """A loader's batches, on the device, grouped k at a time (one optimizer step each; the epoch's last group may
    hold fewer) -> lists of (images, pad_mask, targets, skipped: [(image id, error)] of what could not be read)."""
    group = []
    for images, pad_mask, targets in loader:
        group.append((images.to(device, non_blocking=True), pad_mask.to(device, non_blocking=True),
                      to_device(targets, device), targets.skipped))
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(run, cfg, epoch, loader, start_it=0, resumed=False):
    """The epoch's optimizer steps from start_it (a run resumed within the epoch: its first start_it steps trained
    before), saving within the epoch at every --save-every steps and when a SIGTERM asks to stop. resumed: the first
    epoch of a resumed run. -> the fraction of the epoch trained (1.0 unless the --time-budget or --max-steps ran out
    in it)."""
    model, criterion, optimizer, args = run.model, run.criterion, run.optimizer, run.args
    model.train()
    criterion.train()
    optimizer.zero_grad(set_to_none=True)
    n = math.ceil(len(loader) / args.accum_steps)  # optimizer steps in the epoch
    # Resumed within the epoch: the batches of its steps trained before are read again and dropped, so that the
    # augmentation's streams (the dataset's, each loader worker's) stand where they stood. iter() draws the loader's
    # base seed from torch's stream (a persistent loader: in its first epoch only); the uninterrupted run drew it
    # before the steps its checkpoint saved, so a resumed run puts torch's stream back as the checkpoint had it.
    rng = torch.get_rng_state()
    loader_batches = iter(loader)
    for _ in range(start_it * args.accum_steps):
        note_bad_images(run, next(loader_batches)[2].skipped)
    if resumed and (start_it or loader.persistent_workers):
        torch.set_rng_state(rng)
    start, last_print = time.time(), time.time()
    for it, group in enumerate(step_batches(loader_batches, args.accum_steps, run.device), start=start_it):
        for *_, skipped in group:
            note_bad_images(run, skipped)
        batches = [(images, pad_mask, targets) for images, pad_mask, targets, _ in group]
        if any_rank(any(len(targets) == 0 for _, _, targets in batches)):  # a batch with no readable image: every
            continue  # rank skips the step (the ranks must run the same forwards and collectives)
        step = run.steps  # optimizer steps before this one, over every resume
        run.steps += 1
        loss, losses, finite = accumulated_loss(run, batches)
        if not finite:
            ids = [t["image_id"] for _, _, targets in batches for t in targets]
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at epoch {epoch} iteration {it} (global step {step}), "
                f"image ids {ids} on rank {run.rank}; the last good checkpoint is untouched in {args.output_dir}")
        grad_norm = optimizer_step(run)

        values = mean_over_ranks({"loss": float(loss), "grad_norm": float(grad_norm),
                                  **{k: float(v) for k, v in losses.items()}}, run.device)
        record = {"type": "train", "epoch": epoch, "iter": it, "step": step, **values,
                  **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
        run.log(record)
        if run.rank == 0 and (time.time() - last_print > args.log_every or it == n - 1):
            last_print = time.time()
            rate = (it + 1 - start_it) / (time.time() - start)
            eta = (n - it - 1) / rate + (args.epochs - epoch - 1) * n / rate
            if args.time_budget is not None:
                eta = max(0.0, min(eta, 60 * args.time_budget - run.train_s - (time.time() - start)))
            if args.max_steps is not None:
                eta = max(0.0, min(eta, (args.max_steps - run.steps) / rate))
            print(f"epoch {epoch + 1}/{args.epochs} it {it + 1}/{n}  loss {values['loss']:.3f} "
                  f"(ce {values['loss_ce']:.3f} l1 {values['loss_bbox']:.3f} giou {values['loss_giou']:.3f})  "
                  f"grad {values['grad_norm']:.2f}  lr {record.get('lr_base', 0.0):.2e}  {rate:.2f} it/s  "
                  f"ETA {eta / 60:.1f} min", flush=True)
        if it + 1 < n and out_of_time(run, time.time() - start):
            run.train_s += time.time() - start
            return (it + 1) / n
        stop = any_rank(run.stop_asked)  # the ranks stop together (the signal may reach them a step apart)
        if stop or (it + 1 < n and args.save_every and run.steps % args.save_every == 0):
            save_within_epoch(run, cfg, epoch, it + 1, n, time.time() - start)
            if stop:
                stop_run(run, f"in epoch {epoch + 1} after its step {it + 1} of {n}")
    run.train_s += time.time() - start
    return 1.0


def save_within_epoch(run, cfg, epoch, done, n, seconds):
    """OUTPUT_DIR/checkpoint.pth after `done` of the epoch's n optimizer steps (`seconds` trained since this process
    began or resumed the epoch): --resume auto continues the epoch from its step done + 1 (next_iter; after its last
    step: from its save and evaluation). It also keeps the train set's size: with the seed, batch layout and loader
    workers of its args, what decides the images of the epoch's remaining steps (within_epoch_changes); and the
    epoch's seconds so far (epoch_s: the resumed epoch's epoch_time_s counts them)."""
    state = checkpoint_state(run, epoch, done / n, cfg)
    if state is not None:
        state["train_s"], state["next_iter"] = run.train_s + seconds, done
        state["epoch_s"] = time.time() - run.epoch_start
        state["train_images"] = run.train_images
        save_atomic(state, os.path.join(run.args.output_dir, "checkpoint.pth"))
    run.log({"type": "checkpoint_within_epoch", "epoch": epoch, "iter": done - 1, "steps": run.steps})


def stop_run(run, where):
    """End the run a SIGTERM asked to stop, its checkpoint saved: exit status 143 (128 + SIGTERM), as if killed,
    so that a scheduler (or a script) knows the run did not finish."""
    if run.rank == 0:
        print(f"stopped by SIGTERM {where}, {run.steps} steps trained; the checkpoint is saved: --resume auto "
              f"continues from there ({run.args.output_dir})", flush=True)
    raise SystemExit(128 + signal.SIGTERM)


@contextlib.contextmanager
def stop_on_sigterm(run):
    """While training: a SIGTERM (a cluster's preemption, `kill`) only asks the run to stop at the end of the step in
    progress (train_one_epoch saves it there; one that comes during an evaluation: fit, once it is done). In the main
    thread only (a signal handler cannot be set elsewhere); the handler before is restored after. POSIX: Windows
    has no SIGTERM from outside a process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, frame):
        run.stop_asked = True
    before = signal.signal(signal.SIGTERM, ask)
    try:
        yield
    finally:  # (None: a handler not set from Python, which cannot be set again from here; the default then)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


@torch.no_grad()
def evaluate(run, dataset):
    """COCO evaluation of the val set: each rank detects on its share, rank 0 computes the summary, every rank
    gets it, and the score threshold of the best F1 on these images (chosen_threshold) as its "threshold"."""
    model, device = run.model, run.device
    model.eval()
    loader = make_loader(dataset, run.args.batch_size, False, 0, 0, run.rank, run.world, run.args.num_workers,
                         device.type == "cuda", persistent=False)  # one pass: its workers end with it
    evaluator = datalib.CocoEvaluator(dataset.coco)
    for images, pad_mask, targets in loader:
        for image_id, error in targets.skipped:
            print(f"warning: evaluation skipped image id {image_id}: {error}", flush=True)
        if not len(targets):
            continue
        images, pad_mask = images.to(device), pad_mask.to(device)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            outputs = model(images, pad_mask)
        orig = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = run.postprocess(outputs, orig)
        evaluator.update({t["image_id"]: r for t, r in zip(targets, results)})
    result = evaluator.summarize(dataset.categories)
    result["threshold"] = chosen_threshold(run, dataset.coco, evaluator.results)
    return result


def chosen_threshold(run, coco, results):
    """The score threshold the pictures draw above: the best F1 over the evaluated val images
    (engine.pictures.best_f1_threshold). coco: the val ground truth; results: this rank's evaluated images, {image id:
    COCO results}. Every rank gets it (an image two ranks evaluated counts once). -> best_f1_threshold's dict with
    "images" (how many), "steps" (the training steps of the evaluated weights) and "how" (how it was chosen)."""
    counts = {}  # image id -> (true positives, false positives at each threshold, ground-truth boxes)
    for image_id, dets in results.items():
        tp, fp, n_gt = pictures.f1_counts(dets, coco.loadAnns(coco.getAnnIds(imgIds=[image_id])))
        counts[image_id] = (tp.tolist(), fp.tolist(), n_gt)
    if run.world > 1:
        parts = [None] * run.world
        dist.all_gather_object(parts, counts)
        counts = {k: v for part in parts for k, v in part.items()}
    tp, fp, n_gt = np.zeros(len(pictures.THRESHOLDS)), np.zeros(len(pictures.THRESHOLDS)), 0
    for image_tp, image_fp, image_gt in counts.values():
        tp, fp, n_gt = tp + image_tp, fp + image_fp, n_gt + image_gt
    chosen = pictures.best_f1_threshold(tp, fp, n_gt)
    return {**chosen, "images": len(counts), "steps": run.steps,
            "how": f"the score threshold of the best F1 on {len(counts)} val images after step {run.steps} (a "
                   f"detection counts when it matches a ground-truth box of its class at IoU >= "
                   f"{pictures.IOU_MATCH}; thresholds {pictures.THRESHOLDS[0]}, {pictures.THRESHOLDS[1]}, ..., "
                   f"{pictures.THRESHOLDS[-1]})"}


# ---------------------------------------------------------------------------------------------
# main: recipe -> device -> data -> model -> optimizer / resume -> epochs
# ---------------------------------------------------------------------------------------------

def recipe_of(args, module, on_shapes):
    """The recipe a run follows: on shapes the shared SHAPES_RECIPE and the model file's differences; on COCO the
    model file's COCO_RECIPE (the paper's), one of its COCO_SCHEDULES by --schedule (default: the first), and the
    shared run settings."""
    schedules = getattr(module, "COCO_SCHEDULES", {})
    if on_shapes:
        if args.schedule is not None:
            raise ValueError("--schedule names one of a paper's COCO schedules: use it with --data PATH")
        return dict(SHAPES_RECIPE, **getattr(module, "SHAPES_RECIPE", {}))
    if args.schedule is not None and args.schedule not in schedules:
        named = f"its schedules are {', '.join(schedules)}" if schedules else "it has one schedule"
        raise ValueError(f"--schedule {args.schedule!r}: not a COCO schedule of {args.model} ({named})")
    if schedules and args.schedule is None:
        args.schedule = next(iter(schedules))
    recipe = dict(COCO_RECIPE, **module.COCO_RECIPE)
    schedule = schedules.get(args.schedule, {})
    return {**recipe, **schedule, "config": {**recipe.get("config", {}), **schedule.get("config", {})}}


def resolve_recipe(args, module, on_shapes):
    """Fill the flags left unset from the recipe (recipe_of) -> the recipe."""
    recipe = recipe_of(args, module, on_shapes)
    for key in RECIPE_FLAGS:
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
        if getattr(args, key) < 0 or (getattr(args, key) == 0 and key not in ("lr_backbone", "weight_decay",
                                                                              "clip_max_norm")):
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    for key in ("recompute_sampling", "checkpoint_encoder"):
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, "off"))
    if args.amp is None:  # a recipe's "amp" holds on a CPU with AMX (native bf16); float32 elsewhere
        amp = recipe.get("amp", "off")
        args.amp = amp if amp == "off" or (select_device(args).type == "cpu" and cpu_has_amx()) else "off"
    args.seed = 42 if args.seed is None else args.seed
    args.max_bad_images = 10 if args.max_bad_images is None else args.max_bad_images
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be a positive number of steps, got {args.max_steps}")
    if args.save_every is not None and args.save_every < 0:
        raise ValueError(f"--save-every must be a number of steps (0: no saves within an epoch), got "
                         f"{args.save_every}")
    if args.max_bad_images < 0:
        raise ValueError(f"--max-bad-images must be 0 or more, got {args.max_bad_images}")
    args.pictures = (0 if args.eval_only else 4) if args.pictures is None else args.pictures
    if args.pictures < 0:
        raise ValueError(f"--pictures must be a number of val images, 0 or more, got {args.pictures}")
    return recipe


def resumed_flags(args, ckpt, given):
    """A resumed run: each flag of RESUMED_FLAGS not given now takes the checkpoint's value; each given that differs
    from it is applied -> 'name old -> new' of those, for the line that starts the run."""
    before = ckpt.get("args") or {}
    if "lr_backbone" in given and before.get("lr_backbone") is not None and (before["lr_backbone"] == 0) != (
            args.lr_backbone == 0):
        raise ValueError(f"--lr-backbone {args.lr_backbone} on resume: the checkpoint's run had --lr-backbone "
                         f"{before['lr_backbone']}; freezing or unfreezing the backbone cannot change under a run "
                         f"(its optimizer holds other parameters): start a new run from its weights with --finetune "
                         f"CKPT and another --output-dir")
    changed = []
    for key in RESUMED_FLAGS:
        if key not in before:
            continue
        if key not in given:
            setattr(args, key, before[key])
        elif getattr(args, key) != before[key]:
            changed.append(f"{key.replace('_', '-')} {before[key]} -> {getattr(args, key)}")
    return changed


def given_flags(argv):
    """The RESUMED_FLAGS named on the command line (their values given, not from a recipe or checkpoint)."""
    defaults = parse_args(["--model", "smca"])
    asked = parse_args(argv)
    return {k for k in RESUMED_FLAGS if getattr(asked, k) != getattr(defaults, k)}


def build_model(args, module, cfg, on_shapes, rank, official_state=None, local_rank=0):
    """The model file's build, with the backbone weights (or the authors' whole state dict),
    --finetune and --lr-backbone 0 applied."""
    model, criterion, postprocess = module.build(cfg)
    if official_state is not None:
        model.load_state_dict(official_state)
        return model, criterion, postprocess
    weights = args.backbone_weights or ("shapes" if on_shapes else "imagenet")
    if weights == "shapes":  # the miniature of the papers' ImageNet backbone (engine/pretrain.py)
        if not on_shapes:
            raise ValueError("--backbone-weights shapes is the ResNet pretrained on the built-in shapes set; "
                             "use it with --data shapes, or pass 'imagenet', a file or 'none'")
        on_each_node(lambda: pretrain.ensure(SHAPES_ROOT, cfg.backbone_depth), rank, local_rank)
        weights = pretrain.default_path(SHAPES_ROOT, cfg.backbone_depth)
    if weights == "imagenet":  # downloaded once per node into torch's hub cache, then read from there
        try:
            on_each_node(lambda: torch.hub.load_state_dict_from_url(RESNET_URLS[cfg.backbone_depth],
                                                                    map_location="cpu"), rank, local_rank)
        except Exception as e:  # no network, a proxy, a full disk
            raise ValueError(f"could not download the ImageNet ResNet-{cfg.backbone_depth} weights "
                             f"({type(e).__name__}: {e}); pass --backbone-weights PATH to a torchvision-format file, "
                             f"or 'none'") from e
    if weights != "none":
        try:
            load_backbone_weights(model.backbone, backbone_weights(weights))
        except RuntimeError as e:  # a state dict that load_state_dict refuses
            raise ValueError(f"backbone weights {weights!r} do not load into ResNet-{cfg.backbone_depth}: {e}") from e
    if args.finetune:
        report = finetune_from(model, args.finetune)
        if rank == 0:
            print(f"finetune: loaded {report['loaded']} tensors; skipped for shape {report['shape_mismatch']}; "
                  f"not in this model {report['unused']}; left at init {len(report['missing'])}")
    if args.lr_backbone == 0:  # DETR's convention: --lr_backbone 0 keeps the whole backbone frozen
        model.backbone.requires_grad_(False)
    return model, criterion, postprocess


def encoder_layers(model):
    """A model's encoder layers: the modules of model.encoder's ModuleLists, nested ones flattened (SMCA's
    multi-scale encoder holds its blocks, with intra_share=false a list per block)."""
    def flat(layers):  # a ModuleList's items, each a layer or a list of layers
        return [x for m in layers for x in (flat(m) if isinstance(m, torch.nn.ModuleList) else [m])]
    if isinstance(model.encoder, torch.nn.ModuleList):
        return flat(model.encoder)
    lists = [m for m in model.encoder.children() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"--checkpoint-encoder: {type(model.encoder).__name__} holds no list of layers")
    layers = [layer for m in lists for layer in flat(m)]
    return [layer for i, layer in enumerate(layers) if all(layer is not other for other in layers[:i])]  # shared once


def build_run(args, module, model, criterion, postprocess, device, rank, world, categories, recipe=None):
    """The optimizer (AdamW on param_groups; fused: one kernel for all parameters, the for-loop's update up to
    rounding), the AMP scaler and the Run that holds them."""
    groups = param_groups(model, args.lr, args.lr_backbone, getattr(module, "LR_MULTIPLIERS", {}), args.weight_decay,
                          (recipe or {}).get("weight_decay_norm"))
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)  # autocast of the whole model
    model.backbone.amp_dtype = torch.bfloat16 if args.amp == "bf16-backbone" else None
    return Run(model, criterion, postprocess, optimizer, scaler, args, device, rank, world, amp_dtype, categories)


def within_epoch_changes(ckpt, args, world, train_images):
    """A checkpoint saved within an epoch: what differs now of what decides the images of the epoch's remaining steps
    (the sampler's order comes from the seed, the train set and the processes; a step's images from the batch layout;
    their augmentation from the loader workers' streams) -> 'what was -> is' of each (what the checkpoint does not
    say is not compared)."""
    before = ckpt.get("args") or {}
    was = {"processes": ckpt.get("world_size"), "--batch-size": before.get("batch_size"),
           "--accum-steps": before.get("accum_steps"), "--seed": before.get("seed"),
           "--num-workers": before.get("num_workers"), "train images": ckpt.get("train_images")}
    now = {"processes": world, "--batch-size": args.batch_size, "--accum-steps": args.accum_steps,
           "--seed": args.seed, "--num-workers": args.num_workers, "train images": train_images}
    return [f"{name} ({was[name]} -> {now[name]})" for name in was if was[name] not in (None, now[name])]


def checkpoint_to_resume(args, ckpt_path):
    """--resume auto / PATH / none, and --eval-only -> the checkpoint to load, or None; refuses what would evaluate
    nothing or overwrite another run's checkpoint."""
    if args.official:
        return None  # the weights come from --official
    if args.resume == "auto":
        if os.path.isfile(ckpt_path):
            return ckpt_path
        if args.eval_only:
            raise ValueError(f"--eval-only --resume auto: nothing to evaluate; {ckpt_path} does not exist")
        return None
    if args.resume is None and args.eval_only:
        if not os.path.isfile(ckpt_path):
            raise ValueError(f"--eval-only: nothing to evaluate; {ckpt_path} does not exist (pass --resume CKPT)")
        return ckpt_path
    if args.resume is None and os.path.isfile(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume auto to continue that run, or another --output-dir")
    others = [f for f in ("checkpoint_best.pth", "checkpoint_before_lr_drop.pth")
              if os.path.isfile(os.path.join(args.output_dir, f))]
    if args.resume is None and others:
        raise ValueError(f"{args.output_dir} holds {', '.join(others)} of another run, which a new run would "
                         f"overwrite: pass another --output-dir")
    if (args.resume is not None and not args.eval_only and os.path.isfile(ckpt_path)
            and os.path.realpath(args.resume) != os.path.realpath(ckpt_path)):
        raise ValueError(f"{ckpt_path} exists and would be overwritten by the run continued from {args.resume}: "
                         f"pass another --output-dir (or --resume auto to continue the run that is there)")
    return args.resume


def numpy_state():
    """numpy's global RNG state with its key as a list (a checkpoint of plain types loads with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def restore_rng(rng, rank):
    """The RNG states a checkpoint saved: Python's, numpy's, this rank's torch CPU (and CUDA) stream."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"][rank % len(rng["torch"])])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])])


def rng_states(run):
    """The RNG states a resume restores (restore_rng): Python's, numpy's, each rank's torch CPU (and CUDA) stream.
    Every rank takes part; rank 0 gets the dict, the others None."""
    def gathered(state):
        if run.world == 1:
            return [state]
        states = [None] * run.world
        dist.all_gather_object(states, state)
        return states
    torch_states = gathered(torch.get_rng_state())
    cuda_states = gathered(torch.cuda.get_rng_state()) if run.device.type == "cuda" else None
    if run.rank != 0:
        return None
    return {"python": random.getstate(), "numpy": numpy_state(), "torch": torch_states, "cuda": cuda_states}


def checkpoint_state(run, epoch, fraction, cfg):
    """Everything a resume needs (plain types and tensors: it loads with weights_only); every rank takes part (each
    one's RNG state), rank 0 gets the dict, the others None."""
    rng = rng_states(run)
    if run.rank != 0:
        return None
    model = run.model.module if run.world > 1 else run.model
    return {"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "rng": rng,
            "model_name": run.args.model, "config": dataclasses.asdict(cfg), "args": vars(run.args),
            "categories": run.categories, "world_size": run.world, "best_ap": run.best_ap,
            "train_s": run.train_s, "steps": run.steps, "epoch_fraction": fraction}


def main(argv=None):
    args = parse_args(argv)
    with fast_paths(not args.readable_path):  # --readable-path: training and evaluation on the readable path
        return train_or_evaluate(args, given_flags(argv))


def redone(line, start_epoch, start_it=0):
    """Whether a log line belongs to what is trained again from step start_it of epoch start_epoch (a record
    without "iter", an epoch's checkpoint or evaluation, comes after the epoch's steps), or cannot be read (a line
    cut short when a run was killed)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return True
    return rec.get("type") != "start" and (rec.get("epoch", -1), rec.get("iter", math.inf)) >= (start_epoch, start_it)


def start_log(out, start_epoch, training, start_it=0):
    """OUTPUT_DIR/log.jsonl for appending. A run that trains from step start_it of start_epoch (0, 0 without a
    checkpoint) redoes what came after: those records from an interrupted attempt move to log-redone.jsonl (appended
    there, kept), so log.jsonl holds each step once."""
    path = os.path.join(out, "log.jsonl")
    if training and os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        redo = [redone(line, start_epoch, start_it) for line in lines]
        if any(redo):
            ended = [line if line.endswith("\n") else line + "\n" for line in lines]  # a line cut short too
            with open(os.path.join(out, "log-redone.jsonl"), "a") as f:
                f.writelines(line for line, r in zip(ended, redo) if r)
            with open(path + ".tmp", "w") as f:
                f.writelines(line for line, r in zip(ended, redo) if not r)
            os.replace(path + ".tmp", path)
    return open(path, "a")


def set_tf32(device, tf32):
    """--tf32 on / off: TF32 matrix products and convolutions on a CUDA device (nothing elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 == "on"


def recipe_text(args, recipe, world):
    """The resolved recipe, in the lines that start a run (and OUTPUT_DIR/recipe.json)."""
    total = world * args.batch_size * args.accum_steps
    lines = [f"recipe: {args.epochs} epochs, lr {args.lr:g} (backbone {args.lr_backbone:g}) x 0.1 after epoch "
             f"{args.lr_drop}, AdamW weight decay {args.weight_decay:g}, clip {args.clip_max_norm:g}, total batch "
             f"{total} = {world} process(es) x {args.batch_size} images x {args.accum_steps} accumulated, amp "
             f"{args.amp}" + (f", schedule {args.schedule}" if args.schedule else "")]
    paper = recipe.get("total_batch")
    if paper and paper != total:
        k = paper / (world * args.batch_size)
        how = (f"--accum-steps {int(k)} reaches it" if k == int(k) and k >= 1 else
               f"processes x --batch-size x --accum-steps = {paper} reaches it")
        lines.append(f"note: the paper trains with a total batch of {paper} (its lr is for that batch); here "
                     f"{total}: {how}")
    return lines


def train_or_evaluate(args, given=frozenset()):
    """main, once the flags are parsed: device -> resume decision -> recipe -> data -> model -> optimizer -> epochs.
    `given`: the flags named on the command line (a resumed run keeps the checkpoint's value of the others)."""
    module = model_module(args.model)
    on_shapes = args.data == "shapes"
    rank, local_rank, world, device = init_distributed(select_device(args))
    set_tf32(device, args.tf32)
    data_name = "shapes" if on_shapes else os.path.basename(os.path.normpath(args.data))
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.model}-{data_name}")
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    try:
        resume = from_rank0(lambda: checkpoint_to_resume(args, ckpt_path), rank)  # decided once, for every rank
        ckpt = from_rank0(lambda: load_checkpoint(resume), rank) if resume else None  # the same one on every rank
        changed = []
        if ckpt is not None and not args.eval_only:
            changed = resumed_flags(args, ckpt, given)
        elif ckpt is not None and args.schedule is None:  # evaluating a run: its schedule's Config
            args.schedule = (ckpt.get("args") or {}).get("schedule")
        schedule_given = "schedule" in given
        recipe = resolve_recipe(args, module, on_shapes)
        return run_training(args, module, on_shapes, rank, local_rank, world, device, ckpt, resume, changed, recipe,
                            schedule_given)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(args, module, on_shapes, rank, local_rank, world, device, ckpt, resume, changed, recipe,
                 schedule_given=False):
    """train_or_evaluate's body, the process group formed and the checkpoint (if any) read. schedule_given: --schedule
    was on the command line (the authors' Focus-DETR files then take it instead of guessing it)."""
    if device.type == "cpu" and args.amp.startswith("bf16") and not cpu_has_bf16() and rank == 0:
        print(f"warning: --amp {args.amp} on a CPU without bf16 instructions (AVX512-BF16 or AMX): bf16 is emulated "
              f"there, about 10x slower than float32")
    if args.num_workers is None:
        args.num_workers = 4 if device.type == "cuda" else 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    args.scales = args.scales or ("shapes" if on_shapes else "coco")  # recorded in the checkpoint (detect.py reads it)
    scales = datalib.SHAPES_SCALES if args.scales == "shapes" else datalib.COCO_SCALES
    train_set, val_set = build_data(args, scales, rank, local_rank)
    official_state = None
    if args.official:  # the authors' weights: their file says the configuration
        if not args.eval_only:
            raise ValueError("--official evaluates the authors' weights: add --eval-only")
        if not hasattr(module, "from_official"):
            raise ValueError(f"--official: {args.model} has no released weights to convert ({args.model}.py: "
                             f"{module.OFFICIAL_WEIGHTS})")
        if schedule_given and not getattr(module, "COCO_SCHEDULES", None):
            raise ValueError(f"--schedule: {args.model} has one schedule; its authors' files need none")
        stated = {"schedule": args.schedule} if schedule_given else {}  # Focus-DETR: the file's sine positions
        cfg, official_state, notes = module.from_official(args.official, **stated)
        if rank == 0:
            print(f"{args.official}: the authors' {args.model} weights" + "".join(f"; {n}" for n in notes))
    else:
        cfg = module.shapes_config() if on_shapes else module.Config()
        cfg.num_classes = val_set.num_classes  # largest category id + 1
        cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in recipe.get("config", {}).items()])  # the schedule's
    cfg = apply_overrides(cfg, args.set)
    if cfg.num_classes < val_set.num_classes:
        raise ValueError(f"num_classes {cfg.num_classes} < {val_set.num_classes} (largest category id + 1 in the data)")
    if ckpt is not None:
        check_compatible(ckpt, resume, args.model, cfg, training=not args.eval_only)
    model, criterion, postprocess = build_model(args, module, cfg, on_shapes, rank, official_state, local_rank)
    model.to(device)
    if args.checkpoint_encoder == "on":
        checkpoint_layers(encoder_layers(model))

    run = build_run(args, module, model, criterion, postprocess, device, rank, world, val_set.categories, recipe)
    run.train_images = len(train_set) if train_set else 0
    start_epoch, start_it, trained, epoch_s = 0, 0, False, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if not args.eval_only:
            bases = {g["name"]: (g["base_lr"], g["weight_decay"]) for g in run.optimizer.param_groups}
            run.optimizer.load_state_dict(ckpt["optimizer"])
            for g in run.optimizer.param_groups:  # this run's lrs and weight decay (a changed flag applies)
                g["base_lr"], g["weight_decay"] = bases[g["name"]]
            if run.scaler.is_enabled() and ckpt["scaler"]:  # fp16 before: its loss scale goes on; else a new one
                run.scaler.load_state_dict(ckpt["scaler"])
            restore_rng(ckpt["rng"], rank)
        start_epoch = ckpt.get("epoch", -1) + 1
        if ckpt.get("next_iter") and not args.eval_only:  # saved within an epoch (--save-every, a SIGTERM): it goes on
            start_epoch, start_it = ckpt["epoch"], ckpt["next_iter"]
            epoch_s = ckpt.get("epoch_s", 0.0)  # the epoch's seconds before the stop
            trained = ckpt.get("epoch_fraction", 0.0) >= 1  # after its last step: its save and evaluation are left
            differ = [] if trained else within_epoch_changes(ckpt, args, world, run.train_images)
            if differ:
                raise ValueError(f"{resume} was saved within epoch {start_epoch + 1}, after {start_it} of its steps: "
                                 f"the rest of the epoch goes on with the images (and augmentation) it would have had, "
                                 f"which needs the same {', '.join(differ)}: resume with those, or start a new run "
                                 f"from its weights with --finetune {resume} and another --output-dir")
        run.train_s, run.steps = ckpt.get("train_s", 0.0), ckpt.get("steps", 0)
        run.best_ap = ckpt.get("best_ap", -1.0)
        before = (ckpt.get("world_size") or world) * (ckpt.get("args") or {}).get("batch_size", args.batch_size) * \
            (ckpt.get("args") or {}).get("accum_steps", 1)
        if not args.eval_only and before != world * args.batch_size * args.accum_steps:
            changed.append(f"total batch {before} -> {world * args.batch_size * args.accum_steps} (the lr is not "
                           f"rescaled: pass --lr for that)")
        if rank == 0:
            where = (f"in epoch {ckpt['epoch'] + 1} of {args.epochs} after {ckpt['next_iter']} of its steps "
                     f"({run.steps} in all)" if ckpt.get("next_iter") else
                     f"after epoch {start_epoch} of {args.epochs}")
            print(f"resumed {where} from {resume}"
                  + "".join(f"; {c}" for c in changed))
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        run.log_file = start_log(args.output_dir, start_epoch, not args.eval_only, start_it)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.model} on {args.data}: {n_params:,} trainable parameters, {world} process(es) on {device}, "
              f"{len(train_set) if train_set else 0} train / {len(val_set)} val images, output {args.output_dir}")
        if not args.eval_only:
            text = recipe_text(args, recipe, world)
            print("\n".join(text))
            name = "recipe.json"
            if ckpt is not None:
                name = (f"recipe-resumed-in-epoch-{start_epoch + 1}-after-step-{run.steps}.json" if start_it else
                        f"recipe-resumed-after-epoch-{start_epoch}.json")
            with open(os.path.join(args.output_dir, name), "w") as f:  # a resume's own file: none is overwritten
                json.dump({"args": vars(args), "recipe": recipe, "world_size": world, "summary": text,
                           "config": dataclasses.asdict(cfg)}, f, indent=1)
        run.log({"type": "start", "args": vars(args), "config": dataclasses.asdict(cfg), "start_epoch": start_epoch,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                 f"{machine_name()} (CPU, {torch.get_num_threads()} threads)", "world_size": world,
                 "resumed_changes": changed})
    try:
        if args.eval_only:
            drawn = from_rank0(lambda: eval_pictures_dir(args, resume, run.steps), rank) if args.pictures else None
            result = evaluate(run, val_set)
            within = {"iter": ckpt["next_iter"] - 1} if ckpt and ckpt.get("next_iter") else {}  # saved within it
            run.log({"type": "eval", "epoch": start_epoch - 1, **within, "steps": run.steps, **result["stats"],
                     "threshold": result["threshold"]})
            if rank == 0:
                print(result["text"])
                if drawn:
                    write_pictures(run, val_set, result["threshold"], drawn)
            return result
        with recompute_sampling(args.recompute_sampling == "on"), stop_on_sigterm(run):
            result = fit(run, cfg, train_set, val_set, start_epoch, args.output_dir, start_it, trained, epoch_s)
        if rank == 0:  # the threshold of this run's last evaluation, else (nothing trained) the checkpoint's
            write_pictures(run, val_set, result["threshold"] if result else (ckpt or {}).get("threshold"))
        return result
    finally:
        if run.log_file:
            run.log_file.close()


def eval_pictures_dir(args, weights, steps):
    """--eval-only --pictures N: where the evaluated weights' pictures go, OUTPUT_DIR/eval-pictures-NAME-after-step-S
    (NAME: the checkpoint file's name, S: its steps), or OUTPUT_DIR/eval-pictures-NAME for the authors' file NAME;
    refused when it exists (nothing is overwritten)."""
    name = os.path.splitext(os.path.basename(args.official or weights))[0]
    out = os.path.join(args.output_dir, f"eval-pictures-{name}" + ("" if args.official else f"-after-step-{steps}"))
    if os.path.exists(out):
        raise ValueError(f"{out} exists; nothing is overwritten: remove it, or pass another --output-dir or "
                         f"--pictures 0")
    return out


def write_pictures(run, val_set, threshold=None, out=None):
    """The pictures detect.py draws (detections scoring at least `threshold`, the chosen_threshold dict of the last
    evaluation, else pictures.DEFAULT_THRESHOLD; and the paper's mechanism) of the first --pictures val images, in
    `out` (eval_pictures_dir's), or at the end of a training run in OUTPUT_DIR/pictures-after-step-S (S: the optimizer
    steps so far; a folder already there is left as it is) with the picture of the losses and AP over the run
    (engine/curves.py) as OUTPUT_DIR/curves-after-step-S.png."""
    at_the_end = out is None
    out = out or os.path.join(run.args.output_dir, f"pictures-after-step-{run.steps}")
    curves_path = os.path.join(run.args.output_dir, f"curves-after-step-{run.steps}.png")
    if at_the_end and not os.path.exists(curves_path):
        try:
            curves.save_curves(run.args.output_dir, curves_path)
            print(f"the losses and AP over the run: {curves_path}")
        except ValueError as e:  # a log with nothing to draw (no step trained): the run itself is fine
            print(f"warning: no picture of the run: {e}")
    if run.args.pictures == 0:
        return
    if at_the_end and os.path.exists(out):
        print(f"pictures of the val images are in {out} (already written)")
        return
    model = run.model.module if run.world > 1 else run.model
    det = pictures.Detector(run.args.model, model.eval(), run.postprocess, val_set.transforms, run.categories,
                            run.device, threshold=threshold)
    files = [os.path.join(val_set.img_dir, val_set.coco.imgs[i]["file_name"]) for i in val_set.ids[:run.args.pictures]]
    score = threshold["value"] if threshold else pictures.DEFAULT_THRESHOLD
    summary = pictures.detect_files(det, files, out, score, explain=True, log=lambda line: None)
    why = f"the best F1 on val, {threshold['f1']:.2f}" if threshold else "no threshold chosen: the default"
    print(f"detections (score >= {score:g}, {why}) and {run.args.model}'s mechanism on {summary['images']} val "
          f"images: {out}")


def save_checkpoints(run, state, epoch, out):
    """Rank 0 writes OUTPUT_DIR/checkpoint.pth, and keeps beside it checkpoint_before_lr_drop.pth (the last epoch
    before the drop) and checkpoint_best.pth (the best AP so far, when this epoch's evaluation is it)."""
    if state is None:
        return
    save_atomic(state, os.path.join(out, "checkpoint.pth"))
    if epoch + 1 == run.args.lr_drop and epoch + 1 < run.args.epochs:
        save_atomic(state, os.path.join(out, "checkpoint_before_lr_drop.pth"))


def fit(run, cfg, train_set, val_set, start_epoch, out, start_it=0, trained=False, epoch_s=0.0):
    """The epochs from start_epoch (from its step start_it + 1 for a run resumed within it, whose epoch_s seconds
    before the stop its epoch_time_s counts; trained: all its steps were, a stop after the last, and its save and
    evaluation are left): train, save, evaluate every --eval-every (the checkpoint saved again with the evaluation's
    chosen threshold; a new best AP also as checkpoint_best.pth). A SIGTERM (stop_on_sigterm) stops the run once its
    state is saved. -> the last evaluation."""
    args, result = run.args, None
    loader = make_loader(train_set, args.batch_size, True, args.seed, start_epoch, run.rank, run.world,
                         args.num_workers, run.device.type == "cuda")
    first = start_epoch + trained  # the first epoch this process trains
    for epoch in range(start_epoch, args.epochs):
        if epoch >= first and out_of_time(run, 0.0):
            if run.rank == 0:
                print(f"the {limit_text(run)} is reached ({run.train_s / 60:.1f} min, {run.steps} steps "
                      f"trained); nothing left to train in {args.output_dir}")
            break
        run.epoch_start = time.time() - (epoch_s if epoch == start_epoch else 0.0)
        fraction = 1.0
        if epoch >= first:
            loader.sampler.set_epoch(epoch)
            set_lr(run.optimizer, epoch, args.lr_drop)
            resumed = epoch == first and (first > 0 or start_it > 0)
            fraction = train_one_epoch(run, cfg, epoch, loader, start_it if epoch == start_epoch else 0, resumed)
        state = checkpoint_state(run, epoch, fraction, cfg)
        prints = param_fingerprints(run.model, run.world)
        if max(prints) - min(prints) > 1e-12 * max(abs(p) for p in prints):
            raise ValueError(f"the processes' parameters differ after epoch {epoch + 1} (sums {prints}): DDP is out "
                             f"of sync; the checkpoint of epoch {epoch} in {args.output_dir} is kept")
        save_checkpoints(run, state, epoch, out)
        run.log({"type": "checkpoint", "epoch": epoch, "steps": run.steps, "param_sums": prints})
        steps_done = args.max_steps is not None and run.steps >= args.max_steps
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or fraction < 1 or steps_done:
            result = evaluate(run, val_set)
            run.log({"type": "eval", "epoch": epoch, "epoch_fraction": fraction,
                     "epoch_time_s": time.time() - run.epoch_start, "train_s": run.train_s, "steps": run.steps,
                     **result["stats"], "threshold": result["threshold"],
                     "per_class": {str(k): v for k, v in result["per_class"].items()}})
            best = result["stats"]["AP"] > run.best_ap
            run.best_ap = max(run.best_ap, result["stats"]["AP"])
            rng = rng_states(run)  # as the evaluation left them (its loader drew from torch's stream)
            if state is not None:  # saved again with what the evaluation chose (the threshold, best AP), and the
                state["threshold"], state["best_ap"], state["rng"] = result["threshold"], run.best_ap, rng  # RNGs
                save_checkpoints(run, state, epoch, out)
                if best:
                    save_atomic(state, os.path.join(out, "checkpoint_best.pth"))
            if run.rank == 0:
                print(result["text"])
                stats = result["stats"]
                print(f"epoch {epoch + 1}: AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}", flush=True)
        if fraction < 1 or steps_done:
            if run.rank == 0:
                print(f"the {limit_text(run)} is reached after {fraction:.0%} of epoch {epoch + 1}")
            break
        if epoch + 1 < args.epochs and any_rank(run.stop_asked):
            stop_run(run, f"after epoch {epoch + 1}")
    return result


if __name__ == "__main__":
    run_cli(main)
