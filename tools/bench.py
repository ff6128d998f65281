"""Efficiency, measured: every model against its dense baseline, next to what its paper reports.
(Training experiments, the leaderboard among them, are in tools/experiments.py.)

    python -m tools.bench cost               # docs/cost.md: each model against its dense baseline (the default)
    python -m tools.bench fast-vs-reference  # docs/fast-paths.md: the inference fast paths against the readable path
    python -m tools.bench profile            # docs/fast-paths.md: where a forward's time goes, by module and op group
    python -m tools.bench train-step         # docs/training-speed.md: where a shapes-recipe training step's time goes
    python -m tools.bench train-memory       # docs/memory.md: peak memory of a COCO training step, batch 1 and 2
    python -m tools.bench memory-step MODEL LABEL BATCH  # docs/memory.md: one such step in this process, as JSON
    python -m tools.bench data-throughput    # docs/memory.md: images/s of the COCO training transform, one worker

`python -m tools.bench SUBCOMMAND -h` lists a subcommand's options. Without a subcommand, bench runs `cost`:

    python -m tools.bench                          # all four models and their baselines, 800 x 1333, CPU
    python -m tools.bench --model lite_detr        # one model (smca, sparse_detr, lite_detr, focus_detr)
    python -m tools.bench --size 512 640 --repeats 5
    python -m tools.bench --readable-path          # time the readable path (no inference fast paths)
    python -m tools.bench --data PATH --images 100 # GMACs averaged over the first 100 val images (as the papers)
    python -m tools.bench --device cuda --amp bf16 # GPU: synchronised timing at batch 1 and 4 (FPS, B4FPS)
    python -m tools.bench --json                   # one JSON record per model configuration, nothing else

What `cost` measures, per configuration (R50, the paper's COCO Config, random weights: cost does not
depend on them):
- params: every parameter of the model, frozen ones included (as the papers count them).
- GMACs: torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, 2 FLOPs per
  multiply-add) / 2, plus grid_sample at 4 multiply-adds per sampled value (one per bilinear
  corner, as fvcore counts it), which FlopCounterMode does not see, the attention products of
  nn.MultiheadAttention on CPU (FlopCounterMode counts its CUDA kernels only) and Lite DETR's
  key-aware attention products q . k and sum_j w_j v_j (its readable core computes them elementwise). Elementwise work
  (softmax, norms, deformable attention's weighted sum) is not counted; fvcore, which the papers
  used, skips most of it too. "Encoder" is what runs inside `model.encoder` (the encoder layers; token scoring
  and selection are outside it and show up in the total).
- ms: wall-clock of a whole forward pass (no_grad, eval mode), median and spread (max - min) of
  --repeats rounds after a warm-up round; each round runs every configuration of the model once,
  so warm-up and the machine's drift touch them alike. "encoder ms" is the time between entering
  the first encoder layer and leaving the last (forward hooks) in the same runs.
Ratios are taken against the baseline measured in the same process. The paper's figures beside
them are the papers' own (GFLOPs from fvcore, which counts 1 FLOP per multiply-add; time as
baseline FPS / model FPS on the paper's GPU with CUDA kernels); figures marked * are derived, not
published (see SUITES below).
"""
import argparse
import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import data as datalib
import lite_detr
import train
from common import checkpoint_layers, fast_paths, recompute_sampling
from data import shapes
from data.coco import load_rgb
from engine.runtime import SHAPES_ROOT, model_module, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# ---------------------------------------------------------------------------------------------
# What is compared: each model's configurations, its dense baseline, the papers' figures
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    label: str
    overrides: dict  # fields of the model's Config changed from its COCO defaults
    paper_gmacs: float = None  # the paper's whole-model GFLOPs ratio to its baseline
    paper_encoder: float = None  # ... encoder GFLOPs ratio
    paper_time: float = None  # ... time ratio (baseline FPS / this FPS)
    timed: bool = True  # False: GMACs only (a counting variant, not worth the wall-clock)


@dataclass
class Suite:
    baseline: Variant
    variants: list
    source: str  # where the paper figures come from
    derived: set = field(default_factory=set)  # paper columns marked * (derived, not published)


_LITE = {"H3L1-(2+1)x3": (123, 39), "H3L1-(3+1)x2": (119, 35), "H3L1-(6+1)x1": (115, 30),
         "H2L2-(2+1)x3": (108, 23)}  # Lite Table 3: whole / encoder GFLOPs (dense: 177 / 90)
_SPARSE = {0.1: (105.4, 26.5), 0.2: (112.9, 24.8), 0.3: (120.5, 23.2), 0.5: (135.6, 20.5)}  # GFLOPs, B4FPS

SUITES = {
    "smca": Suite(
        baseline=Variant("DETR baseline (prior off)", {"spatial_prior": False}),
        variants=[Variant("SMCA single-scale", {}, 86 / 86, None, 0.043 / 0.038),
                  Variant("SMCA multi-scale", {"multiscale": True}, 152 / 86, None, 0.100 / 0.038)],
        source="SMCA Table 1: DETR 86 GFLOPs, 0.038 s/img; single-scale 86, 0.043; multi-scale 152, 0.100"),
    "sparse_detr": Suite(
        baseline=Variant("dense (Deformable DETR + top-k & BBR)", {"sparse_encoder": False}),
        variants=[Variant(f"rho {rho}", {"rho": rho}, g / 177.3, 0.087 + 0.913 * rho, 18.2 / fps)
                  for rho, (g, fps) in _SPARSE.items()],
        source="Sparse DETR Table 1 (R50): dense 177.3 GFLOPs, B4FPS 18.2; encoder* = 0.087 + 0.913 rho, derived "
               "from the paper's GFLOPs slope (no encoder figure is published)",
        derived={"encoder"}),
    "lite_detr": Suite(
        baseline=Variant("dense (Deformable DETR)", lite_detr.NAMED["dense"]),
        variants=[Variant(name, lite_detr.NAMED[name], g / 177, e / 90) for name, (g, e) in _LITE.items()]
        + [Variant(f"{name}, F_L without FFN", {**lite_detr.NAMED[name], "low_ffn": "none"}, g / 177, e / 90,
                   timed=False) for name, (g, e) in _LITE.items()],
        source="Lite DETR Table 3 (R50): dense 177 GFLOPs, encoder 90; no timings published"),
    "focus_detr": Suite(
        baseline=Variant("dense DINO base (selection off)", {"foreground_selection": False}),
        variants=[Variant("Focus-DETR", {}, 154 / 279, None, 14.2 / 20.0)],
        source="Focus-DETR Table 1 (R50): DINO 279 GFLOPs, 14.2 FPS; Focus-DETR 154, 20.0"),
}


def make_config(module, overrides, base=None):
    """The model's COCO Config (or `base`) with `overrides` applied."""
    return dataclasses.replace(base if base is not None else module.Config(), **overrides)


# ---------------------------------------------------------------------------------------------
# Counting and timing
# ---------------------------------------------------------------------------------------------


def _grid_sample_flops(*args, out_shape=None, **kwargs):
    """grid_sampler_2d: 4 multiply-adds (8 FLOPs) per sampled value, one per bilinear corner."""
    return 8 * math.prod(out_shape)


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs):
    """CPU scaled-dot-product attention (B, H, Lq, D) x (B, H, Lk, D): Q K^T and A V. FlopCounterMode
    counts the CUDA kernels of nn.MultiheadAttention's attention but not this CPU one."""
    b, h, lq, d = query
    return 2 * b * h * lq * key[-2] * (d + value[-1])


def _native_mha_flops(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs):
    """nn.MultiheadAttention's fused inference path (B, L, E): in-projections, attention, out-projection."""
    b, lq, e = query
    lk = key[1]
    return 2 * b * (2 * lq * e * e + 2 * lk * e * e + 2 * lq * lk * e)


FLOP_FORMULAS = {torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                 torch.ops.aten._native_multi_head_attention: _native_mha_flops}


class KeyAwareProducts:
    """Forward hooks on Lite DETR's key-aware attentions: their q . k and weighted sum of values, B Q H L P D
    multiply-adds each, which the readable core computes elementwise (FlopCounterMode counts matrix products
    only) -> FLOPs in all and inside model.encoder."""

    def __init__(self, model):
        inside = {id(m) for m in model.encoder.modules()} if model is not None else set()
        self.total = self.encoder = 0
        self.handles = [m.register_forward_hook(lambda mod, args, out: self.count(out, id(mod) in inside))
                        for m in (model.modules() if model is not None else [])
                        if isinstance(m, lite_detr.KeyAwareDeformableAttention)]

    def count(self, out, in_encoder):
        output, _, weights = out  # (B, Q, C), _, (B, Q, H, L, P)
        flops = 2 * 2 * weights.numel() * (output.shape[-1] // weights.shape[2])  # two products, D = C / H
        self.total += flops
        self.encoder += flops if in_encoder else 0

    def remove(self):
        for h in self.handles:
            h.remove()


def count_gmacs(fn, model=None):
    """-> (total GMACs, GMACs inside model.encoder) of running fn(); grid_sample, CPU attention and
    key-aware attention included. Counted on the readable path (the inference fast paths do the same work)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    kda = KeyAwareProducts(model)
    try:
        with fast_paths(False), counter:
            fn()
    finally:
        kda.remove()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    encoder = 0
    if model is not None:
        root = f"{type(model).__name__}.encoder"
        layers = re.compile(re.escape(root) + r"\.\d+")
        encoder = counts[root] if root in counts else sum(v for k, v in counts.items() if layers.fullmatch(k))
    return (counts.get("Global", 0) + kda.total) / 2e9, (encoder + kda.encoder) / 2e9


class EncoderTimer:
    """Forward hooks around model.encoder: seconds from entering its first layer to leaving its last."""

    def __init__(self, model, sync):
        enc = model.encoder
        first, last = (enc[0], enc[-1]) if isinstance(enc, torch.nn.ModuleList) else (enc, enc)
        self.sync, self.start, self.seconds = sync, None, 0.0
        self.handles = [first.register_forward_pre_hook(self._enter), last.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self.sync()
        self.start = time.perf_counter()

    def _leave(self, *_):
        self.sync()
        self.seconds = time.perf_counter() - self.start

    def remove(self):
        for h in self.handles:
            h.remove()


def _val_images(root, n, device):
    """The first n val images of a COCO-format root (val transforms: short side 800, max 1333)."""
    import data as datalib
    from data.coco import CocoDetection, find_split
    img_dir, ann = find_split(root, "val")
    ds = CocoDetection(img_dir, ann, datalib.make_transforms("val", **datalib.COCO_SCALES))
    if n > len(ds):
        raise ValueError(f"--images {n}: {ann} has only {len(ds)} images")
    return [ds[i][0].to(device) for i in range(n)]


def measure(module, configs, args, images):
    """Several configurations of one model file -> one dict each (params, gmacs, encoder_gmacs and,
    for the timed ones, ms, ms_spread, encoder_ms per batch size). configs: [(Config, timed)].

    Timing is interleaved: a warm-up round, then --repeats rounds each running every timed model
    once, so warm-up and the machine's drift touch every configuration alike."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    rows, models = [], []
    for cfg, timed in configs:
        torch.manual_seed(0)
        model = module.build(cfg)[0].eval().to(device)
        model.backbone.amp_dtype = torch.bfloat16 if args.amp == "bf16-backbone" else None
        for p in model.parameters():  # no autograd anywhere (FlopCounterMode's module tracker trips over
            p.requires_grad_(False)   # views of parameters taken under no_grad, e.g. SMCA's query embedding)
        with torch.no_grad(), amp:
            gm = [count_gmacs(lambda: model(img[None], torch.zeros(1, *img.shape[1:], dtype=torch.bool,
                                                                   device=device)), model) for img in images]
        rows.append({"params": sum(p.numel() for p in model.parameters()),
                     "gmacs": statistics.mean(g for g, _ in gm), "encoder_gmacs": statistics.mean(e for _, e in gm)})
        models.append(model if timed else None)
    for b in args.batch_sizes:
        img = images[0][None].expand(b, *images[0].shape).contiguous()
        inputs = (img, torch.zeros(b, *img.shape[2:], dtype=torch.bool, device=device))
        timers = [EncoderTimer(m, sync) if m is not None else None for m in models]
        total, encoder = [[] for _ in models], [[] for _ in models]
        with torch.no_grad(), amp:
            for r in range(args.repeats + 1):  # round 0 is the warm-up
                for i, model in enumerate(models):
                    if model is None:
                        continue
                    sync()
                    t0 = time.perf_counter()
                    model(*inputs)
                    sync()
                    if r:
                        total[i].append(time.perf_counter() - t0)
                        encoder[i].append(timers[i].seconds)
        for i, row in enumerate(rows):
            if models[i] is not None:
                timers[i].remove()
                key = "" if b == 1 else f"_b{b}"
                row[f"ms{key}"] = 1e3 * statistics.median(total[i])
                row[f"ms_spread{key}"] = 1e3 * (max(total[i]) - min(total[i]))
                row[f"encoder_ms{key}"] = 1e3 * statistics.median(encoder[i])
    return rows


# ---------------------------------------------------------------------------------------------
# cost: the efficiency tables (the default subcommand; docs/cost.md)
# ---------------------------------------------------------------------------------------------


def input_images(data, n, size, device):
    """What the inference subcommands run on: the first n val images of the COCO-format root `data`, or one random
    image of `size` -> (images, the label the headers and records give them)."""
    if data:
        return _val_images(data, n, device), f"first {n} val images of {data}, timed on the first"
    torch.manual_seed(0)
    return [torch.randn(3, *size, device=device)], f"{size[0]}x{size[1]}"


def _ratio(ours, paper, derived=False):
    """'ours | paper (ours - paper)' cells."""
    if ours is None:
        return "- | -"
    if paper is None:
        return f"{ours:.3f} | -"
    return f"{ours:.3f} | {paper:.3f}{'*' if derived else ''} ({ours - paper:+.3f})"


def bench_model(name, args, images, config=None):
    """Measure one suite -> list of records (one per variant, with its baseline's figures).
    `config`: the Config the suite's overrides apply to (default: the model's COCO Config)."""
    module = model_module(name)
    suite = SUITES[name]
    rows = measure(module, [(make_config(module, v.overrides, config), v.timed)
                            for v in [suite.baseline] + suite.variants], args, images)
    base = rows[0]
    records = []
    for v, ours in zip(suite.variants, rows[1:]):
        rec = {"model": name, "label": v.label, "config": dict(v.overrides),
               "params": ours["params"], "gmacs": ours["gmacs"], "encoder_gmacs": ours["encoder_gmacs"],
               "baseline": suite.baseline.label, "baseline_params": base["params"], "baseline_gmacs": base["gmacs"],
               "baseline_encoder_gmacs": base["encoder_gmacs"], "ms": ours.get("ms"), "baseline_ms": base["ms"],
               "encoder_ms": ours.get("encoder_ms"), "baseline_encoder_ms": base["encoder_ms"],
               "ms_spread": ours.get("ms_spread"), "baseline_ms_spread": base["ms_spread"],
               "paper_gmacs_ratio": v.paper_gmacs, "paper_encoder_ratio": v.paper_encoder,
               "paper_time_ratio": v.paper_time, "device": args.device, "amp": args.amp, "size": args.size_label}
        for b in args.batch_sizes[1:]:
            rec[f"ms_b{b}"], rec[f"baseline_ms_b{b}"] = ours.get(f"ms_b{b}"), base[f"ms_b{b}"]
        records.append(rec)
    return records


def cost_header(args):
    """The line above the cost tables: the input, device, amp, threads, path and rounds."""
    path = "readable path" if args.readable_path else "inference fast paths"
    return (f"bench: {args.size_label}, {args.device}, amp {args.amp}, {torch.get_num_threads()} threads, {path}, "
            f"median of {args.repeats} after a warm-up; GMACs = FlopCounterMode / 2 + grid_sample 4 per value")


def cost_table(name, records, batch_sizes):
    """One suite's records -> its table under a heading with the baseline's figures and the paper's source."""
    suite = SUITES[name]
    r0 = records[0]
    b4 = list(batch_sizes[1:])
    lines = [f"\n### {name}: against {r0['baseline']} ({r0['baseline_params'] / 1e6:.1f} M parameters, "
             f"{r0['baseline_gmacs']:.1f} GMACs, encoder {r0['baseline_encoder_gmacs']:.1f}, "
             f"{r0['baseline_ms']:.0f} ms +- {r0['baseline_ms_spread'] / 2:.0f}, "
             f"encoder {r0['baseline_encoder_ms']:.0f} ms)",
             f"Paper figures: {suite.source}\n",
             "| configuration | params (M) | GMACs | vs base | paper | encoder GMACs | vs base | paper | ms | vs base "
             "| paper | encoder ms | vs base |" + "".join(f" ms B{b} | vs base |" for b in b4),
             "|---" * (13 + 2 * len(b4)) + "|"]
    for r in records:
        t = r["ms"] is not None
        cells = [r["label"], f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.1f}",
                 _ratio(r["gmacs"] / r["baseline_gmacs"], r["paper_gmacs_ratio"]),
                 f"{r['encoder_gmacs']:.1f}",
                 _ratio(r["encoder_gmacs"] / r["baseline_encoder_gmacs"], r["paper_encoder_ratio"],
                        "encoder" in suite.derived),
                 f"{r['ms']:.0f} +- {r['ms_spread'] / 2:.0f}" if t else "-",
                 _ratio(r["ms"] / r["baseline_ms"] if t else None, r["paper_time_ratio"]),
                 f"{r['encoder_ms']:.0f}" if t else "-",
                 f"{r['encoder_ms'] / r['baseline_encoder_ms']:.3f}" if t else "-"]
        for b in b4:
            cells += [f"{r[f'ms_b{b}']:.0f}" if t else "-",
                      f"{r[f'ms_b{b}'] / r[f'baseline_ms_b{b}']:.3f}" if t else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost(args):
    """The `cost` subcommand: each suite measured (bench_model) and printed as it is done, as its table or as JSON
    lines -> the records."""
    images, args.size_label = input_images(args.data, args.images, args.size, args.device)
    if not args.json:
        print(cost_header(args))
    records = []
    for name in args.model or list(SUITES):
        recs = bench_model(name, args, images)
        records += recs
        print("\n".join(map(json.dumps, recs)) if args.json else cost_table(name, recs, args.batch_sizes), flush=True)
    return records


# ---------------------------------------------------------------------------------------------
# fast-vs-reference: the inference fast paths against the readable reference (common.fast_paths)
# ---------------------------------------------------------------------------------------------


def max_diff(a, b):
    return (a - b).abs().max().item()


def fast_vs_reference(name, args, image):
    """The suite's baseline and first variant with the fast paths off (the reference) and on,
    interleaved round by round (a warm-up round, then --repeats) -> one record per configuration:
    median ms of each, their ratio, and the largest output differences of the fast path."""
    module = model_module(name)
    suite, rows = SUITES[name], []
    variants = [suite.baseline] + [v for v in suite.variants if v.timed][:2 if name == "smca" else 1]
    inputs = (image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool, device=image.device))
    models = []
    for v in variants:
        torch.manual_seed(0)
        models.append(module.build(make_config(module, v.overrides))[0].eval().to(args.device))
    times = [[[], []] for _ in models]
    outs = [[None, None] for _ in models]
    with torch.no_grad():
        for r in range(args.repeats + 1):  # round 0 is the warm-up
            for i, model in enumerate(models):
                for fast in (False, True):
                    with fast_paths(fast):
                        t0 = time.perf_counter()
                        outs[i][fast] = model(*inputs)
                    if r:
                        times[i][fast].append(time.perf_counter() - t0)
    for v, (t_ref, t_fast), (ref, fast) in zip(variants, times, outs):
        ms_ref, ms_fast = 1e3 * statistics.median(t_ref), 1e3 * statistics.median(t_fast)
        # before any top-k: the scores the selections are made from (a near-tie may flip a selection,
        # after which the outputs legitimately differ)
        key = next((k for k in ("token_scores", "fg_logits") if k in ref), None)
        pre = None
        if key:
            pre = max_diff(ref[key], fast[key])
        elif "enc_outputs" in ref and name != "focus_detr":  # DINO's enc_outputs come after its top-k
            pre = max_diff(ref["enc_outputs"]["pred_logits"], fast["enc_outputs"]["pred_logits"])
        rows.append({"model": name, "label": v.label, "ms_reference": ms_ref, "ms_fast": ms_fast,
                     "speedup": ms_ref / ms_fast, "logits_diff": max_diff(ref["pred_logits"], fast["pred_logits"]),
                     "boxes_diff": max_diff(ref["pred_boxes"], fast["pred_boxes"]),
                     "selection_scores_diff": pre, "size": args.size_label})
    return rows


FAST_VS_REFERENCE_HEADER = ("| model | configuration | reference ms | fast ms | speedup | max diff logits / boxes | "
                            "max diff of the scores a top-k selects from |\n|---|---|---|---|---|---|---|")


def fast_vs_reference_line(r):
    """One fast_vs_reference record -> its table row."""
    sel_diff = r["selection_scores_diff"]
    sel_text = "-" if sel_diff is None else format(sel_diff, ".1e")
    return (f"| {r['model']} | {r['label']} | {r['ms_reference']:.0f} | {r['ms_fast']:.0f} | {r['speedup']:.2f}x | "
            f"{r['logits_diff']:.1e} / {r['boxes_diff']:.1e} | {sel_text} |")


def fast_vs_reference_command(args):
    """The `fast-vs-reference` subcommand: each suite's rows, printed as they are measured -> the rows."""
    images, args.size_label = input_images(args.data, args.images, args.size, args.device)
    if not args.json:
        print(f"bench fast-vs-reference: {args.size_label}, {args.device}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats} after a warm-up, the readable and the fast path interleaved")
        print(FAST_VS_REFERENCE_HEADER)
    records = []
    for name in args.model or list(SUITES):
        rows = fast_vs_reference(name, args, images[0])
        records += rows
        print("\n".join(json.dumps(r) if args.json else fast_vs_reference_line(r) for r in rows), flush=True)
    return records


# ---------------------------------------------------------------------------------------------
# profile: where a forward's time goes, by module and op group (docs/fast-paths.md)
# ---------------------------------------------------------------------------------------------

OP_GROUPS = {"convolutions": ("aten::mkldnn_convolution", "aten::convolution"),
             "grid_sample": ("aten::grid_sampler_2d",),
             "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::_native_multi_head_attention"),
             "elementwise": ("aten::mul", "aten::add", "aten::addcmul_", "aten::add_", "aten::sum", "aten::clamp_min",
                             "aten::clamp_min_", "aten::div", "aten::sub", "aten::softmax", "aten::_softmax"),
             "copies": ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_")}

PROFILE_SPANS = ("backbone", "input projections", "encoder", "decoder", "rest")  # the hooked modules, and the rest
PROFILE_PATHS = ("reference", "fast")


def profile_forward(model, inputs, spans, torch_profile, activity):
    """One timed forward with hooks around each span, then one under torch.profiler (after a warm-up)."""
    seconds, handles = dict.fromkeys(spans, 0.0), []
    for part, mods in spans.items():
        for m in mods:
            first, last = (m[0], m[-1]) if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) else (m, m)
            start = {}

            def enter(*_, s=start):
                s["t"] = time.perf_counter()

            def leave(*_, s=start, p=part):
                seconds[p] += time.perf_counter() - s["t"]
            handles += [first.register_forward_pre_hook(enter), last.register_forward_hook(leave)]
    with torch.no_grad():
        model(*inputs)  # warm-up
        seconds.update(dict.fromkeys(spans, 0.0))
        t0 = time.perf_counter()
        model(*inputs)
        total = time.perf_counter() - t0
        for h in handles:
            h.remove()
        with torch_profile(activities=[activity.CPU]) as prof:
            model(*inputs)
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    groups = {g: sum(ops.get(o, 0.0) for o in names) for g, names in OP_GROUPS.items()}
    return {"total": 1e3 * total, **{p: 1e3 * t for p, t in seconds.items()},
            "rest": 1e3 * (total - sum(seconds.values())), "ops": groups,
            "ops_other": sum(ops.values()) - sum(groups.values())}


def profile(name, image, variant=None):
    """One forward of `variant` of the suite (default: its first timed variant) on the CPU, reference and fast
    path: ms in the backbone, the input projections, the encoder, the decoder and the rest (hooks), and the
    self CPU ms of each op group (torch.profiler). -> {"model", "label", "reference": {...}, "fast": {...}}"""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    module = model_module(name)
    v = variant or next(v for v in SUITES[name].variants if v.timed)
    torch.manual_seed(0)
    model = module.build(make_config(module, v.overrides))[0].eval()
    inputs = (image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool))
    spans = {"backbone": [model.backbone], "input projections": list(model.input_proj),
             "encoder": [model.encoder], "decoder": [model.decoder]}
    result = {}
    for mode, fast in zip(PROFILE_PATHS, (False, True)):
        with fast_paths(fast):
            result[mode] = profile_forward(model, inputs, spans, torch_profile, ProfilerActivity)
    return {"model": name, "label": v.label, **result}


PROFILE_HEADER = ("| model | path | total ms | " + " | ".join(PROFILE_SPANS) + " | " + " | ".join(OP_GROUPS)
                  + " | other ops |\n" + "|---" * (4 + len(PROFILE_SPANS) + len(OP_GROUPS)) + "|")


def profile_lines(r):
    """One profile record -> its table rows, the reference path's and the fast path's."""
    lines = []
    for mode in PROFILE_PATHS:
        m = r[mode]
        lines.append(f"| {r['model']}: {r['label']} | {mode} | {m['total']:.0f} | "
                     + " | ".join(f"{m[c]:.0f}" for c in PROFILE_SPANS) + " | "
                     + " | ".join(f"{m['ops'][g]:.0f}" for g in OP_GROUPS) + f" | {m['ops_other']:.0f} |")
    return "\n".join(lines)


def profile_command(args):
    """The `profile` subcommand: each suite's baseline and first timed variant, printed as they are profiled -> the
    records."""
    images, size_label = input_images(args.data, args.images, args.size, "cpu")
    if not args.json:
        print(f"bench profile: {size_label}, cpu, {torch.get_num_threads()} threads; one forward per path after a "
              "warm-up: ms by module (forward hooks), self CPU ms by op group (torch.profiler)")
        print(PROFILE_HEADER)
    records = []
    for name in args.model or list(SUITES):
        for v in [SUITES[name].baseline, next(v for v in SUITES[name].variants if v.timed)]:
            records.append(profile(name, images[0], v))
            print(json.dumps(records[-1]) if args.json else profile_lines(records[-1]), flush=True)
    return records


# ---------------------------------------------------------------------------------------------
# train-step: one training step of a model's shapes recipe, part by part (docs/training-speed.md)
# ---------------------------------------------------------------------------------------------

TRAIN_PARTS = ("data", "backbone", "encoder", "decoder", "forward rest", "matcher", "losses",
               "backward: decoder, heads, losses", "backward: encoder", "backward: backbone", "clip", "optimizer")


def _grad_tensors(x):
    if torch.is_tensor(x):
        return [x] if x.requires_grad else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _grad_tensors(v)]
    return []


class StepClock:
    """Wall-clock seconds of the parts of training steps. The forward by wrapping the model's backbone, encode
    and decode and the criterion's matcher; the backward split at the moments the gradient of the encoder's
    memory and the first of the backbone's features' gradients are complete (tensor hooks): the CPU autograd
    engine runs the graph in reverse creation order, so the decoder's backward (heads and losses included) ends
    when memory's gradient is complete and the encoder's (with the input projections) when the deepest
    feature's is (C3 and C4 feed the later stages: theirs complete inside the backbone's backward). The clipping
    (train.optimizer_step's unscaling and clip_grad_norm_) ends as train.optimizer_step calls run.scaler.step,
    wrapped likewise; the optimizer part is the rest of train.optimizer_step (the step, the scaler's update,
    zero_grad)."""

    def __init__(self, run):
        self.seconds, self.grad_done = dict.fromkeys(TRAIN_PARTS + ("criterion",), 0.0), {}
        self.clipped = None  # when the clipping of the current step ended
        for obj, method, part in ((run.model.backbone, "forward", "backbone"), (run.model, "encode", "encoder"),
                                  (run.model, "decode", "decoder"), (run.criterion.matcher, "forward", "matcher"),
                                  (run.criterion, "forward", "criterion")):
            self._wrap(obj, method, part)
        scaler_step = run.scaler.step

        def step_after_clipping(*args, **kwargs):
            self.clipped = time.perf_counter()
            return scaler_step(*args, **kwargs)
        run.scaler.step = step_after_clipping  # an instance attribute, as _wrap's

    def _wrap(self, obj, method, part):
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - t0
            watched = {"backbone": out, "encoder": out[0] if isinstance(out, tuple) else out}.get(part)
            for t in _grad_tensors(watched):
                t.register_hook(functools.partial(self._stamp, part))
            return out
        setattr(obj, method, timed)  # an instance attribute: the model calls self.encode(...), which finds it

    def _stamp(self, part, grad):
        self.grad_done.setdefault(part, time.perf_counter())  # the first of the part's outputs to be complete

    def step(self, run, batch_iter):
        """One training step (train.forward_loss, the backward, train.optimizer_step) with its parts timed ->
        (seconds, loss)."""
        sec, t0 = self.seconds, time.perf_counter()
        images, pad_mask, targets = next(batch_iter)
        images, pad_mask, targets = images.to(run.device), pad_mask.to(run.device), train.to_device(targets, run.device)
        t1 = time.perf_counter()
        sec["data"] += t1 - t0
        before = {p: sec[p] for p in ("backbone", "encoder", "decoder", "criterion")}
        loss, _ = train.forward_loss(run, images, pad_mask, targets)
        t2 = time.perf_counter()
        sec["forward rest"] += (t2 - t1) - sum(sec[p] - before[p] for p in before)
        self.grad_done.clear()
        self.clipped = None
        run.scaler.scale(loss).backward()
        backward_done = time.perf_counter()
        train.optimizer_step(run)
        t3 = time.perf_counter()
        if "encoder" not in self.grad_done:
            raise RuntimeError("the encoder's memory got no gradient: its backward cannot be told from the decoder's")
        if self.clipped is None:
            raise RuntimeError("train.optimizer_step did not call run.scaler.step: the clipping cannot be told from "
                               "the optimizer step")
        mem, feats = self.grad_done["encoder"], self.grad_done.get("backbone", backward_done)  # frozen: none
        sec["backward: decoder, heads, losses"] += mem - t2
        sec["backward: encoder"] += feats - mem
        sec["backward: backbone"] += backward_done - feats
        sec["clip"] += self.clipped - backward_done
        sec["optimizer"] += t3 - self.clipped
        return t3 - t0, loss.item()


def training_run(name, sets=(), amp=None, root=None, backbone="shapes"):
    """train.py's set-up of a model's shapes recipe on the shapes set at `root` (default: the built-in one, generated
    on first use), with the shapes-pretrained backbone (trained on first use) or `backbone` 'none'
    -> (run, train_set); nothing is written but the built-in set and its backbone, if missing."""
    argv = ["--model", name, "--device", "cpu", "--backbone-weights", backbone] + (["--amp", amp] if amp else []) + \
        (["--set", *sets] if sets else [])
    args = train.parse_args(argv)
    module = model_module(name)
    train.resolve_recipe(args, module, True)
    args.num_workers = 0
    if root is None:
        root = SHAPES_ROOT
        shapes.ensure(root)
    train_set = datalib.CocoDetection(*datalib.find_split(root, "train"),
                                      datalib.make_transforms("train", **datalib.SHAPES_SCALES))
    cfg = train.apply_overrides(module.shapes_config(), args.set)
    cfg.num_classes = train_set.num_classes
    torch.manual_seed(args.seed)
    model, criterion, postprocess = train.build_model(args, module, cfg, True, 0)
    run = train.build_run(args, module, model, criterion, postprocess, torch.device("cpu"), 0, 1, train_set.categories)
    return run, train_set


def profile_train_step(name, steps, warmup=2, sets=(), amp=None, top_ops=8, root=None, backbone="shapes"):
    """`steps` timed training steps of the shapes recipe (after `warmup`), the same batches every call (train.py's,
    seed 42); then one step under torch.profiler -> {"model", "steps_per_s", "ms": {part: ms per step},
    "top_ops": [(op, self CPU ms)], "loss": [the timed steps' losses]}."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    run, train_set = training_run(name, sets, amp, root, backbone)
    run.model.train()
    run.criterion.train()
    clock = StepClock(run)
    batches = (batch for epoch in itertools.count()  # train.py's batches, epoch after epoch
               for batch in train.make_loader(train_set, run.args.batch_size, True, run.args.seed, epoch, 0, 1, 0))
    for _ in range(warmup):
        clock.step(run, batches)
    clock.seconds = dict.fromkeys(clock.seconds, 0.0)
    timed = [clock.step(run, batches) for _ in range(steps)]
    total = sum(t for t, _ in timed)
    sec = clock.seconds
    sec["losses"] = sec["criterion"] - sec["matcher"]
    ms = {p: 1e3 * sec[p] / steps for p in TRAIN_PARTS}
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        clock.step(run, batches)
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()), key=lambda kv: -kv[1])
    return {"model": name, "steps": steps, "steps_per_s": steps / total, "ms_per_step": 1e3 * total / steps,
            "ms": ms, "top_ops": ops[:top_ops], "amp": run.args.amp, "sets": list(sets),
            "loss": [loss for _, loss in timed]}


def train_step_table(records):
    """profile_train_step's records -> their table, then each model's most expensive ops."""
    lines = ["| model | steps/s | ms per step | " + " | ".join(TRAIN_PARTS) + " |",
             "|---" * (3 + len(TRAIN_PARTS)) + "|"]
    for r in records:
        label = r["model"] + "".join(f" {s}" for s in r["sets"]) + (f" (amp {r['amp']})" if r["amp"] != "off" else "")
        lines.append(f"| {label} | {r['steps_per_s']:.2f} | {r['ms_per_step']:.0f} | "
                     + " | ".join(f"{r['ms'][p]:.0f}" for p in TRAIN_PARTS) + " |")
    lines.append("\nself CPU ms of the most expensive ops in one profiled step:")
    lines += [f"- {r['model']}: " + ", ".join(f"{op} {t:.0f}" for op, t in r["top_ops"]) for r in records]
    return "\n".join(lines)


def train_step(args):
    """The `train-step` subcommand: each model's profile_train_step, as JSON lines while they are measured or as
    one table at the end -> the records."""
    if not args.json:
        print(f"bench train-step: each model's shapes recipe (batch 8), {torch.get_num_threads()} threads, "
              f"amp {args.amp or 'as train.py'}; ms per step, mean of {args.steps} after 2 warm-up steps")
    records = []
    for name in args.model or list(SUITES):
        records.append(profile_train_step(name, args.steps, sets=args.set, amp=args.amp))
        if args.json:
            print(json.dumps(records[-1]), flush=True)
    if not args.json:
        print(train_step_table(records))
    return records


# ---------------------------------------------------------------------------------------------
# train-memory, memory-step: training memory at COCO scale (docs/memory.md)
# ---------------------------------------------------------------------------------------------

DEFORMABLE = ("MSDeformAttn", "KeyAwareDeformableAttention")  # the modules that run the deformable sampling


class SavedForBackward:
    """Bytes the autograd graph keeps for the backward pass, by part: a saved-tensor hook counts each saved
    tensor's storage once (parameters, which stay anyway, excluded) against the innermost part running when it
    was saved: the backbone, the encoder and decoder layers, and in those the deformable attention modules
    (their projections, sampling and weighted sum); everything else (input projections, token selection,
    heads, the losses) is "rest". A storage is known by its address while a tensor saved on it lives: a graph the
    forward drops frees its tensors, and a later one at the same address is counted anew."""

    def __init__(self, model):
        self.bytes, self.seen, self.stack = {}, {}, ["rest"]  # seen: address -> weak reference to a saved tensor
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.handles = []
        parts = [(model.backbone, "backbone")]
        for name in ("encoder", "decoder"):
            whole = getattr(model, name)
            parts += [(m, f"{name}: deformable attention") for m in whole.modules() if type(m).__name__ in DEFORMABLE]
            layers = list(whole) if isinstance(whole, nn.ModuleList) else [whole]  # a ModuleList is never called
            parts += [(layer, f"{name}: rest") for layer in layers]
        for module, part in parts:
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._enter, part)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, part, module, args):
        self.stack.append(part)

    def _leave(self, module, args, output):
        self.stack.pop()  # a forward hook's return value would replace the output: none

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and (key not in self.seen or self.seen[key]() is None):
            self.seen[key] = weakref.ref(t)
            self.bytes[self.stack[-1]] = self.bytes.get(self.stack[-1], 0) + storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def remove(self):
        for h in self.handles:
            h.remove()


def coco_training_run(name, overrides, device):
    """train.py's set-up of a model's COCO recipe (random backbone: memory does not depend on the weights) for
    the configuration `overrides` of its COCO Config -> run."""
    args = train.parse_args(["--model", name, "--data", "coco", "--device", device, "--backbone-weights", "none"])
    module = model_module(name)
    train.resolve_recipe(args, module, False)
    torch.manual_seed(0)
    model, criterion, postprocess = train.build_model(args, module, make_config(module, overrides), False, 0)
    model.to(device)
    return train.build_run(args, module, model, criterion, postprocess, torch.device(device), 0, 1, {})


def memory_step(name, label, batch, size, device, recompute=True, checkpoint=True):
    """One training step (forward, loss, backward, AdamW) of a COCO configuration on `batch` random images of
    `size` with 3 boxes each, in this process, the deformable sampling recomputed in the backward or not and the
    encoder layers checkpointed or not (train.py --recompute-sampling, --checkpoint-encoder; both on in the COCO
    recipe) -> its record: peak memory (the process's peak RSS on the CPU, torch's peak allocation on CUDA), the
    bytes saved for the backward pass by part (a checkpointed layer's inputs, which it holds itself, not seen),
    the step's seconds."""
    suite = SUITES[name]
    variant = next(v for v in [suite.baseline] + suite.variants if v.label == label)
    run = coco_training_run(name, variant.overrides, device)
    if checkpoint:
        checkpoint_layers(train.encoder_layers(run.model))
    run.model.train()
    run.criterion.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    pad_mask = torch.zeros(batch, *size, dtype=torch.bool, device=device)
    targets = [{"labels": torch.randint(1, 91, (3,), generator=g).to(device),
                "boxes": (torch.rand(3, 4, generator=g) * 0.4 + 0.2).to(device),
                "size": torch.tensor(size, device=device)} for _ in range(batch)]
    saved = SavedForBackward(run.model)
    if device == "cuda":
        gc.collect()  # free the models measured before in this process (checkpoint_layers makes reference cycles)
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with recompute_sampling(recompute):
        with saved.hooks():
            loss, _ = train.forward_loss(run, images, pad_mask, targets)
        run.scaler.scale(loss).backward()
        train.optimizer_step(run)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    saved.remove()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: KiB on Linux
    return {"model": name, "label": label, "batch": batch, "size": list(size), "device": device,
            "recompute_sampling": recompute, "checkpoint_encoder": checkpoint, "peak_gb": peak / 1e9,
            "saved_gb": {k: v / 1e9 for k, v in saved.bytes.items()},
            "saved_total_gb": sum(saved.bytes.values()) / 1e9, "step_s": seconds}


MEMORY_PARTS = ("backbone", "encoder: deformable attention", "encoder: rest", "decoder: deformable attention",
                "decoder: rest", "rest")


MEMORY_BATCHES = (1, 2)


def memory_step_command(args):
    """The `memory-step` subcommand (what train-memory runs in each process): memory_step, printed as JSON -> its
    record."""
    record = memory_step(args.model, args.label, args.batch, tuple(args.size), args.device,
                         args.recompute_sampling == "on", args.checkpoint_encoder == "on")
    print(json.dumps(record))
    return record


def memory_step_in_a_process(name, label, batch, args):
    """memory_step in a fresh `python -m tools.bench memory-step` process (its own peak RSS) -> its record."""
    cmd = [sys.executable, "-m", "tools.bench", "memory-step", name, label, str(batch),
           "--size", *map(str, args.size), "--device", args.device, "--recompute-sampling", args.recompute_sampling,
           "--checkpoint-encoder", args.checkpoint_encoder]
    cmd += ["--readable-path"] if args.readable_path else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise ValueError(f"the memory step of {name} ({label}, batch {batch}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_table(records, args):
    """memory_step's records -> their table under a line saying what was run; "per added image" is a configuration's
    peak at a batch above 1 less its peak at batch 1, per added image."""
    what = "peak RSS of the process" if args.device == "cpu" else "torch's peak CUDA allocation"
    lines = [f"\none training step (forward, loss, backward, AdamW) at {args.size[0]} x {args.size[1]}, 3 boxes per "
             f"image, {args.device}, {torch.get_num_threads()} threads, --recompute-sampling {args.recompute_sampling} "
             f"--checkpoint-encoder {args.checkpoint_encoder}"
             f"{', readable path' if args.readable_path else ''}; peak: {what}; GB saved for the backward pass by part "
             "(storages counted once, parameters excluded)\n",
             "| model | configuration | batch | peak GB | per added image GB | saved for backward GB | "
             + " | ".join(MEMORY_PARTS) + " | step s |",
             "|---" * (7 + len(MEMORY_PARTS)) + "|"]
    for r in records:
        one = next((o for o in records if (o["model"], o["label"], o["batch"]) == (r["model"], r["label"], 1)), None)
        added = None if one is None or r["batch"] == 1 else (r["peak_gb"] - one["peak_gb"]) / (r["batch"] - 1)
        per_image = "-" if added is None else f"{added:.2f}"
        lines.append(f"| {r['model']} | {r['label']} | {r['batch']} | {r['peak_gb']:.2f} | {per_image} | "
                     f"{r['saved_total_gb']:.2f} | "
                     + " | ".join(f"{r['saved_gb'].get(p, 0.0):.2f}" for p in MEMORY_PARTS) + f" | {r['step_s']:.0f} |")
    return "\n".join(lines)


def train_memory(args):
    """The `train-memory` subcommand: each model's COCO configuration and its dense base at MEMORY_BATCHES, each step
    in its own process on the CPU (so each peak RSS is its own; on CUDA torch's peak is reset per step, in this
    process), as JSON lines while they are measured or as one table at the end -> the records."""
    records = []
    for name in args.model or list(SUITES):
        suite = SUITES[name]
        for v in [suite.baseline, next(v for v in suite.variants if v.timed)]:
            for batch in MEMORY_BATCHES:
                if args.device == "cuda":
                    records.append(memory_step(name, v.label, batch, tuple(args.size), "cuda",
                                               args.recompute_sampling == "on", args.checkpoint_encoder == "on"))
                else:
                    records.append(memory_step_in_a_process(name, v.label, batch, args))
                if args.json:
                    print(json.dumps(records[-1]), flush=True)
    if not args.json:
        print(memory_table(records, args))
    return records


# ---------------------------------------------------------------------------------------------
# data-throughput: the COCO training transform's throughput (docs/memory.md)
# ---------------------------------------------------------------------------------------------

DATA_STAGES = ("decode", "flip", "resize / crop", "to tensor, normalise")


def coco_like_photos(folder, n, size=(640, 480), seed=0):
    """n JPEGs of COCO's most common size (640 x 480, quality 90) into `folder`, photo-like for the decoder
    (smooth colour fields with edges and fine texture, not noise) -> their paths."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    paths = []
    for i in range(n):
        coarse = torch.rand(1, 3, h // 32, w // 32, generator=g)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        texture = 0.08 * torch.randn(3, h, w, generator=g)
        pixels = ((field + texture).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def data_throughput(images):
    """The COCO training transform (data.make_transforms("train", **COCO_SCALES): flip, multi-scale resize or
    resize-crop-resize, to tensor and normalise) on `images` COCO-sized JPEGs in one process, the work of one loader
    worker, stage by stage -> {"images_per_s", "ms": {stage: ms per image}}, and the workers it takes to feed
    8 GPUs x 2 images at 4 steps per second."""
    folder = tempfile.mkdtemp(prefix="coco-like-")
    paths = coco_like_photos(folder, images)
    flip, select, to_tensor = datalib.make_transforms("train", **datalib.COCO_SCALES).transforms
    rng = random.Random(0)
    ms = dict.fromkeys(DATA_STAGES, 0.0)
    for rep in range(2):  # the first pass warms the caches; the second is timed
        for path in paths:
            target = {"boxes": torch.tensor([[10.0, 20.0, 200.0, 300.0], [300.0, 100.0, 600.0, 400.0]]),
                      "labels": torch.tensor([1, 2])}
            t0 = time.perf_counter()
            image = load_rgb(path)
            t1 = time.perf_counter()
            image, target = flip(image, target, rng)
            t2 = time.perf_counter()
            image, target = select(image, target, rng)
            t3 = time.perf_counter()
            to_tensor(image, target, rng)
            t4 = time.perf_counter()
            if rep:
                for stage, dt in zip(DATA_STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    ms[stage] += 1e3 * dt / len(paths)
    for path in paths:
        os.remove(path)
    os.rmdir(folder)
    per_image = sum(ms.values())
    rate, need = 1e3 / per_image, 8 * 2 * 4
    return {"images_per_s": rate, "ms": ms, "threads": torch.get_num_threads(), "images": images,
            "needed_images_per_s": need, "workers_needed": need / rate}


def data_throughput_line(r):
    """A data_throughput record -> its one-line report."""
    return (f"COCO training transform, one process ({r['threads']} torch threads), {r['images']} "
            f"640 x 480 JPEGs: {r['images_per_s']:.1f} images/s; ms per image: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["ms"].items())
            + f". 8 GPUs x 2 images x 4 steps/s = {r['needed_images_per_s']} images/s: "
              f"{r['workers_needed']:.1f} such workers ({r['workers_needed'] / 8:.1f} per GPU)")


def data_throughput_command(args):
    """The `data-throughput` subcommand -> data_throughput's record, printed as its line or as JSON."""
    record = data_throughput(args.images)
    print(json.dumps(record) if args.json else data_throughput_line(record))
    return record


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

SUBCOMMANDS = {"cost": cost, "fast-vs-reference": fast_vs_reference_command, "profile": profile_command,
               "train-step": train_step, "train-memory": train_memory, "memory-step": memory_step_command,
               "data-throughput": data_throughput_command}

MOVED_FLAGS = {f"--{name}": name for name in SUBCOMMANDS if name != "cost"}  # the modes' flags before subcommands


def parse_args(argv=None):
    """The subcommand and its options; without a subcommand, `cost`'s."""
    argv = list(sys.argv[1:] if argv is None else argv)
    moved = next((a for a in argv if a in MOVED_FLAGS), None)
    if moved:
        raise ValueError(f"{moved} is a subcommand now: python -m tools.bench {MOVED_FLAGS[moved]} ... "
                         f"(python -m tools.bench {MOVED_FLAGS[moved]} -h lists its options)")
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["cost"] + argv
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(readable_path=False)  # the subcommands without --readable-path choose the path themselves
    sub = p.add_subparsers(dest="subcommand", required=True)
    cost_p = sub.add_parser("cost", help="each model against its dense baseline: params, GMACs, ms (the default)")
    fast = sub.add_parser("fast-vs-reference",
                          help="time each model and its baseline with the inference fast paths off and on, interleaved")
    prof = sub.add_parser("profile", help="where one forward's time goes (modules, op groups), reference and fast path")
    step = sub.add_parser("train-step",
                          help="where a training step of each model's shapes recipe spends its time, part by part")
    mem = sub.add_parser("train-memory",
                         help="peak memory of one training step of each COCO configuration and its dense base at "
                              "--size, batch 1 and 2, each in its own process, and what each part saves for the "
                              "backward pass")
    one = sub.add_parser("memory-step", help="(what train-memory runs in each process) one step, printed as JSON")
    data = sub.add_parser("data-throughput",
                          help="images per second of the COCO training transform in one process (a loader worker), "
                               "stage by stage")
    for name, q in (("cost", cost_p), ("fast-vs-reference", fast), ("profile", prof), ("train-step", step),
                    ("train-memory", mem), ("memory-step", one), ("data-throughput", data)):
        q.set_defaults(run=SUBCOMMANDS[name])
        q.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    for q in (cost_p, fast, prof, step, mem):
        q.add_argument("--model", choices=list(SUITES), action="append", help="only this model (repeatable)")
    for q in (cost_p, fast, prof, mem, one):
        q.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"), help="fixed input size")
    for q in (cost_p, fast, prof):
        q.add_argument("--data", help="a COCO-format root: GMACs averaged over its first --images val images, the "
                                      "first timed")
        q.add_argument("--images", type=int, default=100, help="with --data: how many val images (default 100)")
    for q in (cost_p, fast):
        q.add_argument("--repeats", type=int, default=3, help="timed runs per configuration, after one warm-up")
    for q in (cost_p, fast, mem, one):
        q.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cpu or cuda" + (" (times batch 1 and batch 4 on cuda)" if q is cost_p else ""))
    for q in (cost_p, step, mem, one):
        q.add_argument("--readable-path", action="store_true",
                       help="run the readable path, without the fast paths (common.fast_paths)")
    for q in (mem, one):
        q.add_argument("--recompute-sampling", choices=("on", "off"), default="on",
                       help="as train.py's flag (default on, as the COCO recipe)")
        q.add_argument("--checkpoint-encoder", choices=("on", "off"), default="on",
                       help="as train.py's flag (default on, as the COCO recipe)")
    for q in (cost_p, fast, prof, step, mem, data):
        q.add_argument("--json", action="store_true", help="print one JSON record per configuration instead of tables")
    cost_p.add_argument("--amp", choices=("off", "bf16", "bf16-backbone"), default="off",
                        help="bf16 autocast of the whole model, or only of its ResNet (train.py's --amp); default off")
    step.add_argument("--amp", choices=("off", "bf16", "bf16-backbone"), default=None,
                      help="as train.py's --amp (default: the model's shapes recipe's, as train.py)")
    step.add_argument("--steps", type=int, default=5, help="timed steps per model, after 2 warm-up (default 5)")
    step.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                      help="override the shapes Config (as train.py --set)")
    one.add_argument("model", metavar="MODEL", choices=list(SUITES), help="one of " + ", ".join(SUITES))
    one.add_argument("label", metavar="LABEL", help="the configuration: a label of the model's suite")
    one.add_argument("batch", metavar="BATCH", type=int, help="images per step")
    data.add_argument("--images", type=int, default=100, help="how many synthetic 640 x 480 JPEGs (default 100)")
    args = p.parse_args(argv)
    check_args(args)
    if "device" in vars(args):
        args.batch_sizes = [1, 4] if args.device == "cuda" else [1]
    return args


def check_args(args):
    """ValueError for a value the subcommand cannot run with."""
    given = vars(args)
    for key in ("threads", "repeats", "images", "steps"):
        if given.get(key) is not None and given[key] < 1:
            raise ValueError(f"--{key} must be positive, got {given[key]}")
    if "size" in given and min(args.size) < 64:
        raise ValueError(f"--size must be at least 64 x 64, got {args.size}")
    if given.get("device") == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device (or torch is a CPU build)")
    if given.get("data") and not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data!r} is not a folder")
    if args.subcommand == "memory-step":
        labels = [v.label for v in [SUITES[args.model].baseline] + SUITES[args.model].variants]
        if args.label not in labels:
            raise ValueError(f"memory-step: {args.model} has no configuration {args.label!r}; it has {labels}")
        if args.batch < 1:
            raise ValueError(f"memory-step: the batch size must be positive, got {args.batch}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with fast_paths(not args.readable_path):  # the timed forwards and steps; GMACs are counted on the readable path
        return args.run(args)


if __name__ == "__main__":
    run_cli(main)
