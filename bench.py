"""Efficiency, measured: the papers' cost claims as multiply-adds and wall-clock on this machine.

    python bench.py sparse-encoder               # Sparse DETR's encoder across rho, 800 x 1333 input
    python bench.py sparse-encoder --repeats 3 --size 512 640
    python bench.py lite-encoder                 # Lite DETR's interleaved encoders vs the dense one (Table 3)
    python bench.py focus                        # Focus-DETR vs its dense DINO base: encoder and whole model

Multiply-adds come from torch.utils.flop_counter.FlopCounterMode (matmuls and convs; 1 MAC = 2
FLOPs) plus an analytic count for grid_sample, which FlopCounterMode does not see (4 MACs per
sampled value, one per bilinear corner, as fvcore counts it). Times are the median of --repeats
runs after one warm-up, in this process, on random backbone features of the input's shape, with
random weights (cost does not depend on them). Compare ratios measured in the same run, not
absolute times across machines.
"""
import argparse
import math
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import focus_detr
import lite_detr
import sparse_detr


def _median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gmacs(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 2e9


def _backbone_feats(h, w):
    """Random R50 C3..C5 maps of an h x w image, no padding: [(map, mask)]"""
    return [(torch.randn(1, c, math.ceil(h / s), math.ceil(w / s)),
             torch.zeros(1, math.ceil(h / s), math.ceil(w / s), dtype=torch.bool))
            for c, s in zip((512, 1024, 2048), (8, 16, 32))]


def _encoder_cost(model, feats, repeats):
    """GMACs and median seconds of model.encode(feats) with and without its encoder layers:
    -> (layers' GMACs, layers' seconds, rest's GMACs, rest's seconds); grid_sample not counted.
    repeats=0 counts only (the seconds are 0)."""
    layers = model.encoder
    time_it = (lambda: _median_time(lambda: model.encode(feats), repeats)) if repeats else (lambda: 0.0)
    with torch.no_grad():
        full, t_full = _gmacs(lambda: model.encode(feats)), time_it()
        model.encoder = layers[:0]
        base, t_base = _gmacs(lambda: model.encode(feats)), time_it()
    model.encoder = layers
    return full - base, t_full - t_base, base, t_base


def sparse_encoder(args):
    """Encoder layers only (what rho sparsifies): the cost of encode() minus the same model's
    encode() with no layers, so input projections and token selection are reported apart."""
    h, w = args.size
    feats = _backbone_feats(h, w)
    rows = []
    for rho in [None] + args.rhos:
        cfg = sparse_detr.Config(sparse_encoder=rho is not None, rho=rho or 0.1)
        model = sparse_detr.SparseDETR(cfg).eval()
        d, L, P = cfg.hidden_dim, cfg.num_feature_levels, cfg.enc_n_points
        with torch.no_grad():
            _, out = model.encode(feats)
        n = int((~out["token_pad_mask"]).sum())
        s = int(out["topk_inds"].shape[1]) if rho is not None else n
        gmacs, sec, base, t_base = _encoder_cost(model, feats, args.repeats)
        # not seen by FlopCounterMode: grid_sample (4 corners per sampled value) and the elementwise
        # weighted sum (1 per sampled value)
        grid = 5 * len(model.encoder) * s * d * L * P / 1e9
        rows.append({"rho": rho, "tokens": n, "queries": s, "gmacs": gmacs + grid, "sec": sec,
                     "overhead_gmacs": base, "overhead_sec": t_base})
    dense = rows[0]
    print(f"Sparse DETR encoder (6 layers, d 256, 4 levels x 4 points), {h} x {w} input, {dense['tokens']} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| encoder | queries | GMACs | vs dense | paper model (0.087 + 0.913 rho) | time (s) | vs dense | "
          "projections + selection GMACs / s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "dense (Deformable DETR)" if r["rho"] is None else f"sparse, rho {r['rho']}"
        model_ratio = "1.000" if r["rho"] is None else f"{0.087 + 0.913 * r['rho']:.3f}"
        print(f"| {name} | {r['queries']} | {r['gmacs']:.1f} | {r['gmacs'] / dense['gmacs']:.3f} | {model_ratio} | "
              f"{r['sec']:.2f} | {r['sec'] / dense['sec']:.3f} | {r['overhead_gmacs']:.1f} / {r['overhead_sec']:.2f} |")
    return rows


# Lite DETR Table 3 (R50, encoder GFLOPs as fvcore counts them, 1 MAC = 1 FLOP; grid_sample not counted)
LITE_PAPER = {"dense": 90, "H3L1-(2+1)x3": 39, "H3L1-(3+1)x2": 35, "H3L1-(6+1)x1": 30, "H2L2-(2+1)x3": 23}


def lite_encoder(args):
    """The encoder layers of Lite-Deformable DETR's four named schedules and the dense Deformable
    DETR encoder (same model file, enc_scale 4, no KDA), as encode() minus encode() with no layers."""
    h, w = args.size
    feats = _backbone_feats(h, w)
    rows = []
    for name in args.configs:
        row = {"name": name}
        for low_ffn in ("small", "none"):  # OFF's small F_L FFN; F_L without FFN (fits the paper's GFLOPs)
            if name == "dense" and low_ffn == "none":  # no F_L tokens
                row.update(gmacs_no_low_ffn=row["gmacs"])
                continue
            cfg = lite_detr.Config.named(name, low_ffn=low_ffn)
            model = lite_detr.LiteDETR(cfg).eval()
            d, L, P = cfg.hidden_dim, cfg.num_feature_levels, cfg.enc_n_points
            with torch.no_grad():
                _, out = model.encode(feats)
            n, n_low = out["token_pad_mask"].shape[1], out["n_low"]
            queries = sum(n if kind == "all" else n - n_low for kind in model.schedule)  # token updates, all layers
            # FlopCounterMode sees the linears and KDA's q.k, w.v matmuls; not grid_sample (4 corners per
            # sampled value) nor, without KDA, the elementwise weighted sum (1 per sampled value)
            counted, sec, _, _ = _encoder_cost(model, feats, args.repeats if low_ffn == "small" else 0)
            gmacs = counted + queries * d * L * P * (4 + (0 if cfg.kda_encoder else 1)) / 1e9
            if low_ffn == "small":
                row.update(tokens=n, high_share=(n - n_low) / n, updates=queries / (len(model.schedule) * n),
                           counted_gmacs=counted, gmacs=gmacs, sec=sec)
            else:
                row.update(gmacs_no_low_ffn=gmacs)
        rows.append(row)
    base = next((r for r in rows if r["name"] == "dense"), rows[0])
    print(f"Lite-Deformable DETR encoder (6 layers, d 256, FFN 1024, 4 levels x 4 points), {h} x {w} input, "
          f"{base['tokens']} tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| encoder | F_H tokens | token updates vs dense | GMACs, linear + matmul | vs dense | GMACs, all | vs dense | "
          "paper GFLOPs (Table 3) | vs dense | GMACs, all, low_ffn=none | vs dense | time (s) | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = LITE_PAPER.get(r["name"])
        paper_txt = f"{paper} | {paper / LITE_PAPER['dense']:.3f}" if paper else "- | -"
        label = "dense (Deformable DETR)" if r["name"] == "dense" else r["name"]
        print(f"| {label} | {r['high_share']:.1%} | {r['updates']:.3f} | {r['counted_gmacs']:.1f} | "
              f"{r['counted_gmacs'] / base['counted_gmacs']:.3f} | {r['gmacs']:.1f} | {r['gmacs'] / base['gmacs']:.3f} | "
              f"{paper_txt} | {r['gmacs_no_low_ffn']:.1f} | {r['gmacs_no_low_ffn'] / base['gmacs']:.3f} | "
              f"{r['sec']:.2f} | {r['sec'] / base['sec']:.3f} |")
    return rows


# Focus-DETR paper, Table 1 (R50, 36 epochs; fact sheet): whole-model GFLOPs and V100 FPS
FOCUS_PAPER = {"dense": (279, 14.2), "focus": (154, 20.0)}


def focus(args):
    """Focus-DETR against its dense DINO base (foreground_selection=False: every token in every layer,
    no scorer, no OESM), R50, 900 queries, eval mode: encoder layers (encode() minus encode() with no
    layers) and the whole model from the image."""
    h, w = args.size
    images, pad_mask = torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool)
    rows = []
    for name in ("dense", "focus"):
        cfg = focus_detr.Config(foreground_selection=name == "focus")
        model = focus_detr.FocusDETR(cfg).eval()
        d, LP = cfg.hidden_dim, cfg.num_feature_levels * cfg.enc_n_points
        feats = model.backbone(images, pad_mask)
        with torch.no_grad():
            _, out = model.encode(feats)
        n = out["token_pad_mask"].shape[1]
        updates = out["token_nums"].sum().item() if name == "focus" else n * cfg.enc_layers  # encoder query tokens
        counted, sec, overhead, t_overhead = _encoder_cost(model, feats, args.repeats)
        # not seen by FlopCounterMode: grid_sample (4 per sampled value) and the weighted sum (1 per)
        enc = counted + 5 * updates * d * LP / 1e9
        dec_extra = 5 * cfg.dec_layers * cfg.num_queries * d * cfg.num_feature_levels * cfg.dec_n_points / 1e9
        with torch.no_grad():
            total = _gmacs(lambda: model(images, pad_mask)) + 5 * updates * d * LP / 1e9 + dec_extra
            t_total = _median_time(lambda: model(images, pad_mask), args.repeats)
        rows.append({"name": name, "tokens": n, "updates": updates / (n * cfg.enc_layers), "encoder_gmacs": enc,
                     "encoder_sec": sec, "overhead_gmacs": overhead, "gmacs": total, "sec": t_total})
    dense, ours = rows
    print(f"Focus-DETR vs its dense DINO base (R50, 900 queries, 6 + 6 layers, FFN 2048), {h} x {w} input, "
          f"{dense['tokens']} tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| model | encoder token updates | encoder GMACs | vs dense | encoder time (s) | vs dense | whole model GMACs | "
          "vs dense | paper GFLOPs (Table 1) | vs dense | whole model time (s) | vs dense | paper FPS ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper_gflops, paper_fps = FOCUS_PAPER[r["name"]]
        label = "dense DINO base (selection off)" if r["name"] == "dense" else "Focus-DETR"
        print(f"| {label} | {r['updates']:.3f} | {r['encoder_gmacs']:.1f} | {r['encoder_gmacs'] / dense['encoder_gmacs']:.3f} | "
              f"{r['encoder_sec']:.2f} | {r['encoder_sec'] / dense['encoder_sec']:.3f} | {r['gmacs']:.1f} | "
              f"{r['gmacs'] / dense['gmacs']:.3f} | {paper_gflops} | {paper_gflops / FOCUS_PAPER['dense'][0]:.3f} | "
              f"{r['sec']:.2f} | {r['sec'] / dense['sec']:.3f} | {FOCUS_PAPER['dense'][1] / paper_fps:.3f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sparse-encoder", help="Sparse DETR's encoder cost across rho")
    s.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    s.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0])
    s.add_argument("--repeats", type=int, default=5)
    s = sub.add_parser("lite-encoder", help="Lite DETR's interleaved encoders vs the dense encoder")
    s.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    s.add_argument("--configs", nargs="+", default=list(LITE_PAPER), metavar="NAME",
                   help=f"Lite DETR configurations by name ({', '.join(lite_detr.NAMED)})")
    s.add_argument("--repeats", type=int, default=5)
    s = sub.add_parser("focus", help="Focus-DETR vs its dense DINO base, encoder and whole model")
    s.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    s.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if min(args.size) < 64 or args.repeats < 1:
        raise ValueError("--size must be at least 64 x 64 and --repeats positive")
    if args.bench == "focus":
        return focus(args)
    if args.bench == "lite-encoder":
        unknown = [c for c in args.configs if c not in lite_detr.NAMED]
        if unknown:
            raise ValueError(f"unknown --configs {unknown}; known: {', '.join(lite_detr.NAMED)}")
        return lite_encoder(args)
    if args.bench == "sparse-encoder":
        if not all(0 < r <= 1 for r in args.rhos):
            raise ValueError("every --rhos value must be in (0, 1]")
        return sparse_encoder(args)


if __name__ == "__main__":
    import train
    train.run_cli(main)
