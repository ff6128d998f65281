"""Train and evaluate a detector of this library.

    python train.py --model smca                               # built-in shapes set, CPU-sized recipe
    torchrun --nproc_per_node=8 train.py --model smca --data /path/to/coco --backbone-weights imagenet
    python train.py --model sparse_detr --set rho=0.2           # any model; --set overrides its Config
    python train.py --model lite_detr --set enc_scale=2          # Lite DETR H2L2-(2+1)x3

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
and calls the model as common.py's interface says: model(images, pad_mask, targets) in training,
model(images, pad_mask) in evaluation.

Every epoch writes OUTPUT_DIR/checkpoint.pth atomically (model, optimizer, scheduler, AMP scaler,
epoch, RNG states, config); --resume auto continues from it. OUTPUT_DIR/log.jsonl holds every loss
term, the grad norm and each evaluation. A non-finite loss stops the run and names the step and
the image ids; the last checkpoint stays as it was. A run ends by drawing its detections and the
paper's mechanism on the first 4 val images (detect.py's pictures) into
OUTPUT_DIR/pictures-after-step-S. --time-budget MINUTES stops training when that much training
time is spent (a partial epoch then counts as done), saves, evaluates and logs the training
seconds and the inference ms per image (experiments.py leaderboard reads them).
"""
import argparse
import dataclasses
from dataclasses import dataclass
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

import data as datalib
import detect
from common import checkpoint_layers, fast_paths, load_backbone_weights, recompute_sampling
from data import shapes
from engine import pretrain
from engine.runtime import (MODELS, SHAPES_ROOT, backbone_weights, cpu_has_amx, cpu_has_bf16, load_checkpoint,
                            machine_name, model_module, run_cli, save_atomic, select_device)
# The paper recipe, shared by the four papers (a model file's COCO_RECIPE overrides some of it)
# (at 800 x 1333 the deformable samples and the encoder's activations are most of a step's memory: both are
# recomputed in the backward pass by default there, docs/memory.md)
COCO_RECIPE = {"epochs": 50, "lr_drop": 40, "batch_size": 2, "lr": 1e-4, "lr_backbone": 1e-5, "eval_every": 1,
               "recompute_sampling": "on", "checkpoint_encoder": "on"}
# The CPU recipe on the shapes set (a model file's SHAPES_RECIPE overrides some of it): 2 epochs of
# 500 steps of 8 images, lr / 10 after the second, the shapes-pretrained backbone at a quarter of the lr, float32
# (no "amp": a model's SHAPES_RECIPE may add "amp": "bf16-backbone", honoured on a CPU with AMX only)
SHAPES_RECIPE = {"epochs": 2, "lr_drop": 2, "batch_size": 8, "lr": 4e-4, "lr_backbone": 1e-4, "eval_every": 1}


AMP_MODES = ("off", "bf16", "fp16", "bf16-backbone")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--data", default="shapes", help="'shapes' (built in) or a COCO-format root folder")
    p.add_argument("--output-dir", default=None, help="default: runs/<model>-<data name>")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr-drop", type=int, help="epoch after which the lr is multiplied by 0.1")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-backbone", type=float, help="0 freezes the whole backbone (as DETR's --lr_backbone 0)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip-max-norm", type=float, default=0.1, help="0 turns clipping off")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="mixed precision: bf16 or fp16 autocast of the whole model; bf16-backbone: only the ResNet "
                   "in bf16 (where a CPU's AMX or a GPU's tensor cores pay most), the transformer in float32. "
                   "Default: the recipe's (SMCA's shapes recipe says bf16-backbone, taken on a CPU with AMX only), "
                   "else off; a resumed run keeps its checkpoint's unless given. Evaluation runs as training does")
    p.add_argument("--recompute-sampling", choices=("on", "off"), default=None,
                   help="on: the deformable sampling keeps only its inputs for the backward and samples again there "
                        "(the same numbers, less memory, a slower backward; common.recompute_sampling). Default: on "
                        "with --data PATH (COCO scale), off on shapes")
    p.add_argument("--checkpoint-encoder", choices=("on", "off"), default=None,
                   help="on: activation checkpointing of the encoder layers (each keeps only its inputs for the "
                        "backward and runs again there; the same numbers, less memory, a slower step; "
                        "common.checkpoint_layers). Default: on with --data PATH, off on shapes")
    p.add_argument("--resume", default=None, help="'auto' (OUTPUT_DIR/checkpoint.pth if present) or a checkpoint path")
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
                        "iteration), then save and evaluate. experiments.py leaderboard gives every model the same one")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop training after N iterations (optimizer steps, counted over resumes), then save and "
                        "evaluate; a partial epoch then counts as done, as with --time-budget. The lr drop stays at "
                        "its epoch (--lr-drop)")
    p.add_argument("--backbone-weights", default=None,
                   help="torchvision-format ResNet .pth, 'imagenet' (download), "
                        "'shapes' (the ResNet engine/pretrain.py pretrains on the shapes set, trained on first use) "
                        "or 'none' (from scratch). Default: "
                        "'imagenet' with --data PATH (the papers fine-tune an ImageNet backbone), 'shapes' on shapes")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override model Config fields (repeatable; later wins)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader processes; default 4 on GPU, 0 on CPU "
                        "(where workers only take cores from the model)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between console progress lines")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

def init_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPU, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_finite(t):
    """Whether a scalar is finite on every rank (so all ranks stop together)."""
    ok = torch.tensor([float(torch.isfinite(t).item())], device=t.device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


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


def build_data(args, recipe_scales, rank):
    if args.data == "shapes":
        if rank == 0:
            shapes.ensure(SHAPES_ROOT)
        if dist.is_initialized():
            dist.barrier()
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


def _reseed_worker(worker_id):
    """Each loader process restarts its dataset copy's augmentation stream from its own torch seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed)


def make_loader(dataset, batch_size, shuffle, seed, epoch, rank, world, workers):
    """A loader whose order and augmentation depend only on (seed, epoch, rank): resume-exact. The
    augmentation draws from the dataset's own random stream (CocoDetection.rng), reseeded here."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    seed = seed * 100003 + epoch * 1009 + rank
    dataset.reseed(seed)  # num_workers == 0: the loop's own process augments
    gen = torch.Generator().manual_seed(seed)  # worker seeds
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=datalib.collate,
                                       num_workers=workers, generator=gen, drop_last=False,
                                       worker_init_fn=_reseed_worker if workers else None)


def param_groups(model, lr, lr_backbone, multipliers):
    """AdamW groups: backbone at lr_backbone, parameters whose name contains a key of `multipliers`
    at lr * multiplier (a model file's LR_MULTIPLIERS), the rest at lr."""
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
        groups.setdefault(key, {"params": [], "lr": group_lr, "name": key})["params"].append(p)
    return list(groups.values())


TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "epoch")


def check_compatible(ckpt, path, model_name, cfg, training):
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path!r} is not a checkpoint written by train.py")
    missing = [k for k in TRAINING_STATE if k not in ckpt] if training else []
    if missing:
        raise ValueError(f"{path!r} lacks the training state {missing} needed to resume; "
                         f"use --finetune to start from its weights")
    if ckpt.get("model_name") != model_name:
        raise ValueError(f"{path!r} is a checkpoint of model {ckpt.get('model_name')!r}, not {model_name!r}")
    ours = dataclasses.asdict(cfg)
    # a field the checkpoint predates ran as its default (new switches default to the old behaviour)
    theirs = {f.name: f.default for f in dataclasses.fields(cfg)} | ckpt["config"]
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        shown = ", ".join(diff)
        raise ValueError(f"{path!r} was trained with another config ({shown}); use the same --data/--set, "
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

    def log(self, record):
        if self.log_file:
            self.log_file.write(json.dumps(record) + "\n")


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


def optimizer_step(run, loss, mark=None):
    """Backward, gradient clipping and the optimizer step -> the gradient norm before clipping.
    `mark(part)`, if given, is called as the backward and the clipping end (bench's training profile)."""
    optimizer, scaler, clip = run.optimizer, run.scaler, run.args.clip_max_norm
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if mark:
        mark("backward")
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if mark:
        mark("clip")
    scaler.step(optimizer)
    scaler.update()
    return grad_norm


def train_one_epoch(run, epoch, loader):
    """-> the fraction of the epoch trained (1.0 unless the --time-budget ran out in it)."""
    model, criterion, optimizer, args = run.model, run.criterion, run.optimizer, run.args
    model.train()
    criterion.train()
    n, start, last_print = len(loader), time.time(), time.time()
    for it, (images, pad_mask, targets) in enumerate(loader):
        images, pad_mask, targets = images.to(run.device), pad_mask.to(run.device), to_device(targets, run.device)
        loss, losses = forward_loss(run, images, pad_mask, targets)
        step = epoch * n + it
        run.steps += 1
        if not all_finite(loss.detach()):
            ids = [t["image_id"] for t in targets]
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at epoch {epoch} iteration {it} (global step {step}), "
                f"image ids {ids} on rank {run.rank}; the last good checkpoint is untouched in {args.output_dir}")
        grad_norm = optimizer_step(run, loss)

        record = {"type": "train", "epoch": epoch, "iter": it, "step": step, "loss": loss.item(),
                  "grad_norm": float(grad_norm), **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                  **{k: v.item() for k, v in losses.items()}}
        run.log(record)
        if run.rank == 0 and (time.time() - last_print > args.log_every or it == n - 1):
            last_print = time.time()
            rate = (it + 1) / (time.time() - start)
            eta = (n - it - 1) / rate + (args.epochs - epoch - 1) * n / rate
            if args.time_budget is not None:
                eta = max(0.0, min(eta, 60 * args.time_budget - run.train_s - (time.time() - start)))
            if args.max_steps is not None:
                eta = max(0.0, min(eta, (args.max_steps - run.steps) / rate))
            print(f"epoch {epoch + 1}/{args.epochs} it {it + 1}/{n}  loss {loss.item():.3f} "
                  f"(ce {losses['loss_ce'].item():.3f} l1 {losses['loss_bbox'].item():.3f} "
                  f"giou {losses['loss_giou'].item():.3f})  grad {float(grad_norm):.2f}  "
                  f"lr {record.get('lr_base', 0.0):.2e}  {rate:.2f} it/s  ETA {eta / 60:.1f} min", flush=True)
        if it + 1 < n and out_of_time(run, time.time() - start):
            run.train_s += time.time() - start
            return (it + 1) / n
    run.train_s += time.time() - start
    return 1.0


@torch.no_grad()
def evaluate(run, dataset):
    model, device = run.model, run.device
    model.eval()
    loader = make_loader(dataset, run.args.batch_size, False, 0, 0, run.rank, run.world, run.args.num_workers)
    evaluator = datalib.CocoEvaluator(dataset.coco)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, count = 0.0, 0
    for images, pad_mask, targets in loader:
        images, pad_mask = images.to(device), pad_mask.to(device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            outputs = model(images, pad_mask)
        sync()
        seconds, count = seconds + time.perf_counter() - t0, count + len(targets)
        orig = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = run.postprocess(outputs, orig)
        evaluator.update({t["image_id"]: r for t, r in zip(targets, results)})
    result = evaluator.summarize(dataset.categories)
    result["infer_ms_per_image"] = 1e3 * seconds / max(count, 1)  # the model's forward, at the eval batch size
    return result


# ---------------------------------------------------------------------------------------------
# main: recipe -> device -> data -> model -> optimizer / resume -> epochs
# ---------------------------------------------------------------------------------------------

def resolve_recipe(args, module, on_shapes):
    """Fill the flags left unset from the recipe: the shared one, then the model file's differences."""
    recipe = dict(SHAPES_RECIPE, **getattr(module, "SHAPES_RECIPE", {})) if on_shapes else \
        dict(COCO_RECIPE, **getattr(module, "COCO_RECIPE", {}))
    for key in ("epochs", "lr_drop", "batch_size", "lr", "lr_backbone", "eval_every"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
        if getattr(args, key) < 0 or (getattr(args, key) == 0 and key != "lr_backbone"):
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    for key in ("recompute_sampling", "checkpoint_encoder"):
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, "off"))
    if args.amp is None:  # a recipe's "amp" holds on a CPU with AMX, where it was measured; float32 elsewhere
        amp = recipe.get("amp", "off")
        args.amp = amp if amp == "off" or (select_device(args).type == "cpu" and cpu_has_amx()) else "off"
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be a positive number of steps, got {args.max_steps}")


def build_model(args, module, cfg, on_shapes, rank, official_state=None):
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
        if rank == 0:
            pretrain.ensure(SHAPES_ROOT, cfg.backbone_depth)
        if dist.is_initialized():
            dist.barrier()
        weights = pretrain.default_path(SHAPES_ROOT, cfg.backbone_depth)
    if weights != "none":
        try:
            load_backbone_weights(model.backbone, backbone_weights(weights))
        except (OSError, RuntimeError) as e:  # a failed download
            raise ValueError(f"could not download the ImageNet ResNet-{cfg.backbone_depth} weights ({e}); pass "
                             f"--backbone-weights PATH to a torchvision-format file, or 'none'") from e
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


def build_run(args, module, model, criterion, postprocess, device, rank, world, categories):
    """The optimizer (AdamW on param_groups; fused: one kernel for all parameters, the for-loop's update up to
    rounding), the lr schedule, the AMP scaler and the Run that holds them -> (run, scheduler)."""
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.lr_backbone, getattr(module, "LR_MULTIPLIERS", {})),
                                  lr=args.lr, weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)  # autocast of the whole model
    model.backbone.amp_dtype = torch.bfloat16 if args.amp == "bf16-backbone" else None
    run = Run(model, criterion, postprocess, optimizer, scaler, args, device, rank, world, amp_dtype, categories)
    return run, scheduler


def checkpoint_to_resume(args, ckpt_path):
    """--resume auto / PATH / none, and --eval-only -> the checkpoint to load, or None."""
    if args.resume == "auto":
        return ckpt_path if os.path.isfile(ckpt_path) else None
    if args.official:
        return None  # the weights come from --official
    if args.resume is None and args.eval_only:
        if not os.path.isfile(ckpt_path):
            raise ValueError(f"--eval-only: nothing to evaluate; {ckpt_path} does not exist (pass --resume CKPT)")
        return ckpt_path
    if args.resume is None and os.path.isfile(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume auto to continue that run, or another --output-dir")
    return args.resume


def save_checkpoint(run, scheduler, epoch, fraction, cfg, path):
    """Rank 0 writes everything a resume needs; every rank takes part (each one's RNG state)."""
    torch_states = [torch.get_rng_state()]
    if run.world > 1:  # every rank's dropout stream, so a resumed DDP run continues each one
        torch_states = [None] * run.world
        dist.all_gather_object(torch_states, torch.get_rng_state())
    if run.rank == 0:
        model = run.model.module if run.world > 1 else run.model
        save_atomic({"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
                     "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch_states},
                     "model_name": run.args.model, "config": dataclasses.asdict(cfg), "args": vars(run.args),
                     "categories": run.categories,
                     "train_s": run.train_s, "steps": run.steps, "epoch_fraction": fraction}, path)


def main(argv=None):
    args = parse_args(argv)
    with fast_paths(not args.readable_path):  # --readable-path: training and evaluation on the readable path
        return train_or_evaluate(args)


def train_or_evaluate(args):
    """main, once the flags are parsed: recipe -> device -> data -> model -> optimizer / resume -> epochs."""
    module = model_module(args.model)
    on_shapes = args.data == "shapes"
    amp_given = args.amp is not None
    resolve_recipe(args, module, on_shapes)
    data_name = "shapes" if on_shapes else os.path.basename(os.path.normpath(args.data))
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.model}-{data_name}")
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    resume = checkpoint_to_resume(args, ckpt_path)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None and not args.eval_only and not amp_given:  # a resumed run keeps the precision it trained in
        args.amp = (ckpt.get("args") or {}).get("amp") or "off"
    rank, world, device = init_distributed(select_device(args))
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
    train_set, val_set = build_data(args, scales, rank)
    official_state = None
    if args.official:  # the authors' weights: their file says the configuration
        if not args.eval_only:
            raise ValueError("--official evaluates the authors' weights: add --eval-only")
        if not hasattr(module, "from_official"):
            raise ValueError(f"--official: {args.model} has no released weights to convert (Lite DETR's authors "
                             f"released Lite-DINO only)")
        cfg, official_state, notes = module.from_official(args.official)
        if rank == 0:
            print(f"{args.official}: the authors' {args.model} weights" + "".join(f"; {n}" for n in notes))
    else:
        cfg = module.shapes_config() if on_shapes else module.Config()
        cfg.num_classes = val_set.num_classes  # largest category id + 1
    cfg = apply_overrides(cfg, args.set)
    if cfg.num_classes < val_set.num_classes:
        raise ValueError(f"num_classes {cfg.num_classes} < {val_set.num_classes} (largest category id + 1 in the data)")
    model, criterion, postprocess = build_model(args, module, cfg, on_shapes, rank, official_state)
    model.to(device)
    if args.checkpoint_encoder == "on":
        checkpoint_layers(encoder_layers(model))

    run, scheduler = build_run(args, module, model, criterion, postprocess, device, rank, world, val_set.categories)
    start_epoch = 0
    if resume:
        check_compatible(ckpt, resume, args.model, cfg, training=not args.eval_only)
        model.load_state_dict(ckpt["model"])
        if not args.eval_only:
            run.optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            run.scaler.load_state_dict(ckpt["scaler"])
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"][rank % len(ckpt["rng"]["torch"])])
        start_epoch = ckpt.get("epoch", -1) + 1
        run.train_s, run.steps = ckpt.get("train_s", 0.0), ckpt.get("steps", 0)
        if rank == 0:
            print(f"resumed from {resume} (epoch {start_epoch} done)")
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    os.makedirs(args.output_dir, exist_ok=True)
    run.log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a") if rank == 0 else None
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.model} on {args.data}: {n_params:,} trainable parameters, {world} process(es) on {device}, "
              f"{len(train_set) if train_set else 0} train / {len(val_set)} val images, output {args.output_dir}")
        run.log({"type": "start", "args": vars(args), "config": dataclasses.asdict(cfg), "start_epoch": start_epoch,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                 f"{machine_name()} (CPU, {torch.get_num_threads()} threads)", "world_size": world})
    try:
        if args.eval_only:
            result = evaluate(run, val_set)
            run.log({"type": "eval", "epoch": start_epoch - 1, **result["stats"]})
            if rank == 0:
                print(result["text"])
            return result
        with recompute_sampling(args.recompute_sampling == "on"):
            result = fit(run, scheduler, cfg, train_set, val_set, start_epoch, ckpt_path)
        if rank == 0:
            write_pictures(run, val_set)
        return result
    finally:
        if run.log_file:
            run.log_file.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def write_pictures(run, val_set, n=4):
    """The end of a training run: detect.py's pictures (detections, and the paper's mechanism) of the
    first n val images, in OUTPUT_DIR/pictures-after-step-S (S: the optimizer steps so far; a folder
    already there is left as it is)."""
    out = os.path.join(run.args.output_dir, f"pictures-after-step-{run.steps}")
    if os.path.exists(out):
        print(f"pictures of the val images are in {out} (already written)")
        return
    model = run.model.module if run.world > 1 else run.model
    det = detect.Detector(run.args.model, model.eval(), run.postprocess, val_set.transforms, run.categories, run.device)
    files = [os.path.join(val_set.img_dir, val_set.coco.imgs[i]["file_name"]) for i in val_set.ids[:n]]
    summary = detect.detect_files(det, files, out, explain=True, log=lambda line: None)
    print(f"detections (score >= 0.3) and {run.args.model}'s mechanism on {summary['images']} val images: {out}")


def fit(run, scheduler, cfg, train_set, val_set, start_epoch, ckpt_path):
    """The epochs from start_epoch: train, save, evaluate every --eval-every. -> the last evaluation."""
    args, result = run.args, None
    for epoch in range(start_epoch, args.epochs):
        if out_of_time(run, 0.0):
            if run.rank == 0:
                print(f"the {limit_text(run)} is reached ({run.train_s / 60:.1f} min, {run.steps} steps "
                      f"trained); nothing left to train in {args.output_dir}")
            break
        t0 = time.time()
        loader = make_loader(train_set, args.batch_size, True, args.seed, epoch, run.rank, run.world, args.num_workers)
        fraction = train_one_epoch(run, epoch, loader)
        scheduler.step()
        save_checkpoint(run, scheduler, epoch, fraction, cfg, ckpt_path)
        steps_done = args.max_steps is not None and run.steps >= args.max_steps
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or fraction < 1 or steps_done:
            result = evaluate(run, val_set)
            run.log({"type": "eval", "epoch": epoch, "epoch_fraction": fraction, "epoch_time_s": time.time() - t0,
                     "train_s": run.train_s, "steps": run.steps, "infer_ms_per_image": result["infer_ms_per_image"],
                     **result["stats"], "per_class": {str(k): v for k, v in result["per_class"].items()}})
            if run.rank == 0:
                print(result["text"])
                stats = result["stats"]
                print(f"epoch {epoch + 1}: AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}", flush=True)
        if fraction < 1 or steps_done:
            if run.rank == 0:
                print(f"the {limit_text(run)} is reached after {fraction:.0%} of epoch {epoch + 1}")
            break
    return result


if __name__ == "__main__":
    run_cli(main)
