"""What a COCO run needs from a GPU, checked in one command (about 5-10 minutes on one H100):

    python -m tools.gpu_check                       # everything; the table to runs/gpu-check/<time>.md
    python -m tools.gpu_check --models smca --steps 3 --out check.md

1. outputs: each model's COCO Config (random weights, eval mode) on a padded batch of two images (320 x 480 and
   256 x 384), on CUDA against the CPU: the largest difference of pred_logits / pred_boxes in float64 and in float32
   (TF32 off, so that only the order of operations differs).
2. amp: a few training steps of each model's shapes Config (tiny images) from the same weights and batches, in
   float32, bf16 and fp16 autocast (fp16 with the gradient scaler): every loss finite, and the largest relative
   difference of the bf16 / fp16 losses to float32's.
3. ddp: `torchrun --nproc-per-node 1` of train.py with NCCL, a few optimizer steps of COCO-sized batches (the shapes
   images resized by the COCO scales, short side 480-800, 2 images), the COCO recipe: its exit and its log.
4. memory: peak GPU memory and step time of one training step of each model's COCO Config at 800 x 1333, 2 images,
   with the memory switches on (the COCO recipe: --recompute-sampling, --checkpoint-encoder) and off
   (tools/bench.py's memory_step).
5. compile: the same step under torch.compile (the model): the first step's seconds (compilation) and the step
   time after, against eager.

On a machine without CUDA, part 2 runs on the CPU (float32 and bf16; fp16 autocast there is skipped) and the other
parts print a line saying they are skipped: the command itself is tested there (tests/test_gpu_check.py).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

import train
from data import shapes
from engine.runtime import MODELS, model_module, run_cli
from tools import bench

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def padded_batch(sizes=((320, 480), (256, 384)), seed=0):
    """Two random images in one padded batch -> (images (2, 3, H, W), pad_mask (2, H, W))."""
    g = torch.Generator().manual_seed(seed)
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    images, pad_mask = torch.zeros(len(sizes), 3, H, W), torch.ones(len(sizes), H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        pad_mask[i, :h, :w] = False
    return images, pad_mask


def outputs_check(name):
    """CUDA against CPU, float64 and float32 -> {"float64": max diff, "float32": max diff}."""
    module = model_module(name)
    torch.manual_seed(0)
    model = module.build(module.Config())[0].eval()
    images, pad_mask = padded_batch()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    try:
        for dtype in (torch.float64, torch.float32):
            with torch.no_grad():
                cpu = model.to("cpu", dtype)(images.to(dtype), pad_mask)
                gpu = model.to("cuda", dtype)(images.to("cuda", dtype), pad_mask.cuda())
            out[str(dtype).split(".")[1]] = max((cpu[k].double() - gpu[k].double().cpu()).abs().max().item()
                                                for k in ("pred_logits", "pred_boxes"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def amp_steps(name, device, steps, modes):
    """`steps` training steps of the model's shapes Config from the same weights and batches, in each amp mode ->
    {mode: [losses]}."""
    root = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "set")
    shapes.generate(root, num_train=2 * steps, num_val=1, seed=0)
    losses = {}
    for mode in modes:
        run, train_set = bench.training_run(name, amp="off" if mode == "float32" else mode, root=root,
                                            backbone="none")
        run.device = torch.device(device)
        run.model.to(device)
        run.args.batch_size = 2
        run.model.train()
        loader = train.make_loader(train_set, 2, True, 0, 0, 0, 1, 0)
        losses[mode] = []
        for images, pad_mask, targets in list(loader)[:steps]:
            batch = [(images.to(device), pad_mask.to(device), train.to_device(targets, device))]
            loss, _, _ = train.accumulated_loss(run, batch)
            train.optimizer_step(run)
            losses[mode].append(loss.item())
    return losses


def ddp_run(name, steps, out):
    """train.py under torchrun, one process, NCCL, COCO-sized batches -> (exit status, the log's last lines)."""
    root = os.path.join(out, "set")
    shapes.generate(root, num_train=8, num_val=2, seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "train.py",
           "--model", name, "--data", root, "--scales", "coco", "--backbone-weights", "none", "--epochs", "1",
           "--max-steps", str(steps), "--output-dir", os.path.join(out, name), "--log-every", "0"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600)
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-3:]


def compiled_step(name, steps=3, size=(800, 1333)):
    """One training step of the model's COCO Config under torch.compile -> (first step s, mean of the next
    `steps` s)."""
    run = bench.coco_training_run(name, {}, "cuda")
    run.model = torch.compile(run.model)
    images, pad_mask = torch.randn(2, 3, *size, device="cuda"), torch.zeros(2, *size, dtype=torch.bool, device="cuda")
    targets = [{"labels": torch.tensor([1, 2], device="cuda"), "boxes": torch.tensor([[.5, .5, .2, .2]] * 2,
                                                                                    device="cuda"),
                "size": torch.tensor(size, device="cuda")} for _ in range(2)]
    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train.accumulated_loss(run, [(images, pad_mask, targets)])
        train.optimizer_step(run)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], sum(times[1:]) / steps


def check(models, steps, out_dir):
    """Run every part -> the report's lines (markdown)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    lines = [f"`python -m tools.gpu_check`: {torch.cuda.get_device_name() if cuda else 'no CUDA device'}, torch "
             f"{torch.__version__}", ""]
    if cuda:
        lines += ["## outputs: CUDA against CPU (largest difference)", "", "| model | float64 | float32 |",
                  "|---|---|---|"]
        for name in models:
            d = outputs_check(name)
            lines.append(f"| {name} | {d['float64']:.1e} | {d['float32']:.1e} |")
    else:
        lines.append("outputs: skipped (no CUDA device)")
    modes = ("float32", "bf16", "fp16") if cuda else ("float32", "bf16")
    lines += ["", f"## amp: {steps} training steps on {device} (shapes Config), losses", "",
              "| model | " + " | ".join(modes) + " | largest relative difference to float32 |",
              "|---|" + "---|" * (len(modes) + 1)]
    for name in models:
        losses = amp_steps(name, device, steps, modes)
        rel = max(abs(a - b) / abs(b) for m in modes[1:] for a, b in zip(losses[m], losses["float32"]))
        finite = all(map(torch.isfinite, map(torch.tensor, sum(losses.values(), []))))
        lines.append(f"| {name} | " + " | ".join(", ".join(f"{v:.3f}" for v in losses[m]) for m in modes)
                     + f" | {rel:.3f}{'' if finite else ' (NOT FINITE)'} |")
    if not cuda:
        lines.append("amp fp16: skipped (CPU)")
    if cuda:
        lines += ["", "## ddp: torchrun --nproc-per-node 1 (NCCL), COCO-sized batches", "",
                  "| model | exit | last lines |", "|---|---|---|"]
        for name in models:
            code, tail = ddp_run(name, steps, out_dir)
            lines.append(f"| {name} | {code} | {' / '.join(t.replace('|', '/') for t in tail)} |")
        lines += ["", "## memory and step time: COCO Config, 800 x 1333, 2 images", "",
                  "| model | switches on: peak GB / step s | off: peak GB / step s |", "|---|---|---|"]
        for name in models:
            label = bench.SUITES[name].variants[0].label
            cells = []
            for on in (True, False):
                try:
                    r = bench.memory_step(name, label, 2, (800, 1333), "cuda", recompute=on, checkpoint=on)
                    cells.append(f"{r['peak_gb']:.1f} / {r['step_s']:.2f}")
                except torch.cuda.OutOfMemoryError:
                    cells.append("out of memory")
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        lines += ["", "## torch.compile: COCO step, 800 x 1333, 2 images (the paper's Config)", "",
                  "| model | first step s (compiling) | step s after |", "|---|---|---|"]
        for name in models:
            try:
                first, after = compiled_step(name, steps)
                lines.append(f"| {name} | {first:.1f} | {after:.3f} |")
            except Exception as e:  # a graph break torch cannot compile is a finding, not a crash
                lines.append(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | - |")
    else:
        lines += ["ddp (NCCL): skipped (no CUDA device)", "memory: skipped (no CUDA device)",
                  "compile: skipped (no CUDA device)"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--steps", type=int, default=3, help="training steps of the amp, ddp and compile parts")
    p.add_argument("--out", default=None, help="the report (markdown; default runs/gpu-check/<time>.md; never "
                                               "overwritten)")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    out = args.out or os.path.join(HERE, "runs", "gpu-check", time.strftime("%Y%m%d-%H%M%S") + ".md")
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} exists; nothing is overwritten: pass another --out")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    lines = check(args.models, args.steps, tempfile.mkdtemp(prefix="gpu-check-"))
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"the report: {out}")
    return lines


if __name__ == "__main__":
    run_cli(main)
