"""Two nodes without a shared disk, on one machine: train.py under torchrun's own rendezvous, each "node" in its own
clone of this repository, a few steps, then a resume; checks that both ranks end with equal parameters.

    python -m tools.two_nodes                  # clones HEAD twice into a new folder under runs/two-nodes/
    python -m tools.two_nodes --out /tmp/two   # elsewhere (a new or empty folder)

Each node runs, in its clone, what a user runs on each machine of a two-node job (here with c10d rendezvous on
localhost; on real machines --rdzv-endpoint is the first machine's address):

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID \\
        train.py --model smca --data shapes --backbone-weights none --output-dir runs/two-nodes ...

What it checks: each node makes its own shapes set (neither sees the other's files); the first run stops after
--steps optimizer steps, saves and evaluates; the second (--resume auto) is decided by global rank 0, whose node
alone holds the checkpoint, and continues on both ranks; rank 0's log.jsonl then holds, for each checkpoint, both
ranks' parameter sums, equal; the second node's clone holds no checkpoint (only rank 0 writes). The clones are of
the committed HEAD: commit a change before checking it. On 2 CPU cores it takes a few minutes.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

from engine.runtime import run_cli

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def node_commands(steps, port, run_id, extra=()):
    """The torchrun command each node runs (the same on both: the rendezvous gives them their ranks)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", run_id,
            "train.py", "--model", "smca", "--data", "shapes", "--backbone-weights", "none", "--epochs", "2",
            "--batch-size", "2", "--max-steps", str(steps), "--output-dir", os.path.join("runs", "two-nodes"),
            "--log-every", "30", *extra]


def run_nodes(clones, cmd, timeout):
    """Start `cmd` in each clone at once, wait for both -> their outputs; ValueError if either fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(cmd, cwd=c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in clones]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for clone, proc, out in zip(clones, procs, outs):
        if proc.returncode:
            raise ValueError(f"the node in {clone} failed (exit {proc.returncode}):\n{out[-3000:]}")
    return outs


def check(clones):
    """-> the lines of the report; ValueError if the ranks drifted apart or a node wrote what it should not."""
    log = os.path.join(clones[0], "runs", "two-nodes", "log.jsonl")
    with open(log) as f:
        records = [json.loads(line) for line in f]
    sums = [r["param_sums"] for r in records if r["type"] == "checkpoint"]
    starts = [r for r in records if r["type"] == "start"]
    if len(sums) != 2 or any(len(s) != 2 or s[0] != s[1] for s in sums):
        raise ValueError(f"the ranks' parameter sums at each checkpoint are {sums}: expected two checkpoints of "
                         f"two equal sums")
    if len(starts) != 2 or starts[1]["start_epoch"] != 1 or starts[0]["world_size"] != 2:
        raise ValueError(f"expected a 2-process start and a resumed start at epoch 1; got "
                         f"{[(s['world_size'], s['start_epoch']) for s in starts]}")
    if os.path.exists(os.path.join(clones[1], "runs", "two-nodes", "checkpoint.pth")):
        raise ValueError("the second node wrote a checkpoint: only global rank 0 writes")
    for c in clones:
        if not os.path.isdir(os.path.join(c, "data", "shapes")):
            raise ValueError(f"{c} has no shapes set of its own")
    steps = [r["steps"] for r in records if r["type"] == "eval"]
    return [f"two nodes (1 process each, c10d rendezvous on localhost), clones {clones[0]} and {clones[1]}",
            f"evaluations after steps {steps}; parameter sums of rank 0 / rank 1 at each checkpoint: "
            + "; ".join(f"{a!r} / {b!r}" for a, b in sums),
            "equal on both ranks; the resume was read from rank 0's node only; each node made its own shapes set"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="a new or empty folder for the two clones "
                   "(default runs/two-nodes/<time>)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of the first run; the resume takes as many")
    p.add_argument("--timeout", type=float, default=1200, help="seconds each run may take")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(HERE, "runs", "two-nodes", time.strftime("%Y%m%d-%H%M%S")))
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"--out {out!r} is not empty; nothing is overwritten: pass another --out")
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    clones = [os.path.join(out, f"node{i}") for i in range(2)]
    for clone in clones:
        subprocess.run(["git", "clone", "--quiet", HERE, clone], check=True)
    start = time.time()
    run_id = f"two-nodes-{os.getpid()}"
    run_nodes(clones, node_commands(args.steps, free_port(), run_id), args.timeout)
    outs = run_nodes(clones, node_commands(2 * args.steps, free_port(), run_id + "-resume", ["--resume", "auto"]),
                     args.timeout)
    if not any("resumed after epoch 1" in o for o in outs):
        raise ValueError("the second run did not resume:\n" + outs[0][-2000:])
    lines = check(clones) + [f"{time.time() - start:.0f} s in all"]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run_cli(main)
