"""Efficiency, measured: the papers' cost claims as multiply-adds and wall-clock on this machine.

    python bench.py sparse-encoder               # Sparse DETR's encoder across rho, 800 x 1333 input
    python bench.py sparse-encoder --repeats 3 --size 512 640

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


def sparse_encoder(args):
    """Encoder layers only (what rho sparsifies): the cost of encode() minus the same model's
    encode() with no layers, so input projections and token selection are reported apart."""
    h, w = args.size
    strides = [8, 16, 32]
    feats = [(torch.randn(1, c, math.ceil(h / s), math.ceil(w / s)), torch.zeros(1, math.ceil(h / s), math.ceil(w / s),
                                                                                  dtype=torch.bool))
             for c, s in zip((512, 1024, 2048), strides)]
    rows = []
    for rho in [None] + args.rhos:
        cfg = sparse_detr.Config(sparse_encoder=rho is not None, rho=rho or 0.1)
        model = sparse_detr.SparseDETR(cfg).eval()
        layers = model.encoder
        d, L, P = cfg.hidden_dim, cfg.num_feature_levels, cfg.enc_n_points
        with torch.no_grad():
            _, out = model.encode(feats)
            n = int((~out["token_pad_mask"]).sum())
            s = int(out["topk_inds"].shape[1]) if rho is not None else n
            full = _gmacs(lambda: model.encode(feats))
            t_full = _median_time(lambda: model.encode(feats), args.repeats)
            model.encoder = layers[:0]
            base = _gmacs(lambda: model.encode(feats))
            t_base = _median_time(lambda: model.encode(feats), args.repeats)
        grid = 4 * len(layers) * s * d * L * P / 1e9  # grid_sample: 4 corners per sampled value
        rows.append({"rho": rho, "tokens": n, "queries": s, "gmacs": full - base + grid, "sec": t_full - t_base,
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sparse-encoder", help="Sparse DETR's encoder cost across rho")
    s.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    s.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0])
    s.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.bench == "sparse-encoder":
        if min(args.size) < 64 or args.repeats < 1 or not all(0 < r <= 1 for r in args.rhos):
            raise ValueError("--size must be at least 64 x 64, --repeats positive, every rho in (0, 1]")
        return sparse_encoder(args)


if __name__ == "__main__":
    import train
    train.run_cli(main)
