"""Every model's outputs and losses for fixed seeds and inputs, in float64: to check that a change of the
code leaves them as they were.

    python -m tools.compare_outputs --save before.pt                 # on the code before the change
    python -m tools.compare_outputs --save after.pt --compare before.pt
    python -m tools.compare_outputs --repo ../other-checkout --save other.pt   # the model files of another checkout

For each model file, its shapes configuration and its COCO configuration (ResNet-50) and a few
variants of the shapes one (each switch that chooses another code path), built with the same seed:
the training-mode outputs and loss terms on two padded images with targets, and the evaluation
outputs (explain=True) on the readable path and on the inference fast paths. Only the shared
interface is used (build, the model call, the criterion), so any two versions of the code compare.
"""
import argparse
import contextlib
import importlib
import sys

import torch

MODELS = ("smca", "sparse_detr", "lite_detr", "focus_detr")
VARIANTS = {  # --set-style overrides of the shapes configuration, each a code path of its own
    "smca": [{"spatial_prior": False}, {"multiscale": True}, {"scale_type": "fixed", "head_shared": True},
             {"multiscale": True, "scale_selection": False, "intra_share": False}, {"feature_stride": 32}],
    "sparse_detr": [{"sparse_encoder": False, "use_enc_aux_loss": False},
                    {"sparse_encoder": False, "eff_query_init": False, "eff_specific_head": False},
                    {"selection": "objectness"}, {"scorer_mean_over_padding": True, "masked_groupnorm": False,
                                                  "extra_level_mask": "interpolate", "two_stage_over_padding": True}],
    "lite_detr": [{"enc_scale": 4, "num_blocks": 1, "kda_encoder": False}, {"last_layer_queries": "low"},
                  {"kda_decoder": True, "kda_key_proj": True}, {"low_ffn": "none", "num_blocks": 2}],
    "focus_detr": [{"foreground_selection": False}, {"cascade_counts": "batch_max", "mcsp_score": "prob_product"},
                   {"encoder_values": "memory", "learnt_init_query": False, "look_forward_twice": False},
                   {"upsample_over_padding": True, "query_pos_over_padding": True}],
}


def readable_path(common):
    """The code's own switch to the readable path (a context manager, or the older module global)."""
    if hasattr(common, "fast_paths"):
        return common.fast_paths(False)

    @contextlib.contextmanager
    def flag():
        before, common.FAST_INFERENCE = common.FAST_INFERENCE, False
        try:
            yield
        finally:
            common.FAST_INFERENCE = before
    return flag()


def tensors(obj, prefix=""):
    """Every tensor (and list of ints) in a nested output, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj.detach().clone()}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, int) for x in obj) or all(isinstance(x, tuple) for x in obj):
            return {prefix: torch.tensor(obj)}
        return {k: v for i, value in enumerate(obj) for k, v in tensors(value, f"{prefix}/{i}").items()}
    return {prefix: torch.tensor(obj)} if isinstance(obj, (int, float, bool)) else {}


def inputs(size, num_classes):
    g = torch.Generator().manual_seed(1)
    H, W = size
    images = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    pad_mask = torch.zeros(2, H, W, dtype=torch.bool)
    pad_mask[1, H - H // 4:, :] = True
    pad_mask[1, :, W - W // 5:] = True
    targets = []
    for b, n in enumerate((3, 2)):
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        h, w = (~pad_mask[b]).any(1).sum().item(), (~pad_mask[b]).any(0).sum().item()
        targets.append({"boxes": torch.cat([cxcy, wh], -1), "labels": torch.randint(1, num_classes, (n,), generator=g),
                        "size": torch.tensor([h, w]), "orig_size": torch.tensor([h, w]), "image_id": b})
    return images, pad_mask, targets


def record(repo):
    sys.path.insert(0, repo)
    common = importlib.import_module("common")
    results = {}
    for name in MODELS:
        module = importlib.import_module(name)
        cases = [("shapes", module.shapes_config(), (160, 192), 6), ("coco", module.Config(), (256, 320), 91)]
        base = module.shapes_config
        cases += [(f"shapes{kw}", base(), (160, 192), 6) for kw in VARIANTS[name]]
        for (label, cfg, size, classes), kw in zip(cases, [{}, {}] + VARIANTS[name]):
            for key, value in dict(kw, num_classes=classes).items():
                setattr(cfg, key, value)
            torch.manual_seed(0)
            model, criterion, _ = module.build(cfg)
            model.double()
            images, pad_mask, targets = inputs(size, classes)
            torch.manual_seed(2)
            model.train()
            out = model(images, pad_mask, targets)
            results[f"{name}/{label}/train"] = {**tensors(out), **tensors(criterion(out, targets), "/losses")}
            model.eval()
            with torch.no_grad():
                with readable_path(common):
                    results[f"{name}/{label}/eval-readable"] = tensors(model(images, pad_mask, explain=True))
                results[f"{name}/{label}/eval-fast"] = tensors(model(images, pad_mask, explain=True))
            print(f"{name} {label}: {sum(len(v) for k, v in results.items() if k.startswith(f'{name}/{label}/'))} "
                  f"tensors", flush=True)
    return results


def compare(ours, theirs):
    """-> lines: per case, the largest absolute difference, and every key on one side only."""
    lines, worst = [], 0.0
    for case in sorted(set(ours) | set(theirs)):
        a, b = ours.get(case, {}), theirs.get(case, {})
        only = sorted(set(a) ^ set(b))
        diffs = [(a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else float("inf")
                 for k in set(a) & set(b) if a[k].numel()]
        diff = max(diffs, default=0.0)
        worst = max(worst, diff)
        lines.append(f"{case}: {len(set(a) & set(b))} tensors, max |difference| {diff:.3g}"
                     + (f"; on one side only: {only}" if only else ""))
    lines.append(f"largest difference over all cases: {worst:.3g}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="the checkout whose model files to run (default: this one)")
    p.add_argument("--save", required=True, help="where to write the outputs (torch.save)")
    p.add_argument("--compare", default=None, help="outputs saved earlier to compare with")
    args = p.parse_args(argv)
    results = record(args.repo)
    torch.save(results, args.save)
    if args.compare:
        print("\n".join(compare(results, torch.load(args.compare, weights_only=True))))


if __name__ == "__main__":
    main()
