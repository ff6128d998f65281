"""Tests of tools/bench.py: the counting of multiply-adds, the suites' baselines, each subcommand's records, its
table rows and its command line.
"""
import dataclasses
import importlib
import json
import math
import re
import subprocess
import weakref

import pytest
import torch
import torch.nn.functional as F

import common
import sparse_detr
import train
from tools import bench
from tests.helpers import (tiny_focus, tiny_lite, tiny_smca, tiny_sparse)


# ---------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------

def _bench_tiny(name, cfg, *flags, h=64, w=96):
    """bench.py's records for one suite applied to a tiny Config, on an h x w random image."""
    args = bench.parse_args(["cost", "--size", str(h), str(w), "--repeats", "1", *flags])
    args.size_label = f"{h}x{w}"
    return bench.bench_model(name, args, [torch.randn(3, h, w)], config=cfg)


def test_bench_counts_grid_sample_as_four_macs_per_sampled_value():
    v, grid = torch.randn(2, 3, 5, 7), torch.rand(2, 4, 6, 2) * 2 - 1
    total, _ = bench.count_gmacs(lambda: F.grid_sample(v, grid, align_corners=False))
    assert total * 1e9 == pytest.approx(4 * 2 * 3 * 4 * 6)  # one multiply-add per bilinear corner per output value
    B, Q, H, D, P, shapes = 2, 5, 4, 8, 3, [(6, 8), (3, 4)]
    value = torch.randn(B, sum(h * w for h, w in shapes), H, D)
    loc, weights = torch.rand(B, Q, H, len(shapes), P, 2), torch.rand(B, Q, H, len(shapes), P)
    total, _ = bench.count_gmacs(lambda: common.ms_deform_attn(value, shapes, loc, weights))
    # the weighted sum is elementwise (not counted)
    assert total * 1e9 == pytest.approx(4 * B * Q * H * D * len(shapes) * P)
    # nn.MultiheadAttention: projections and both attention products, on the CPU kernel and the fused
    # inference path (query is key is value) alike
    mha, E, Lq, Lk = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval(), 16, 5, 7
    for p in mha.parameters():
        p.requires_grad_(False)
    q, kv = torch.randn(B, Lq, E), torch.randn(B, Lk, E)
    with torch.no_grad():
        total, _ = bench.count_gmacs(lambda: mha(q, kv, kv + 1, need_weights=False))
        assert total * 1e9 == pytest.approx(B * (2 * Lq * E * E + 2 * Lk * E * E + 2 * Lq * Lk * E))
        total, _ = bench.count_gmacs(lambda: mha(kv, kv, kv, need_weights=False))
        assert total * 1e9 == pytest.approx(B * (4 * Lk * E * E + 2 * Lk * Lk * E))


@pytest.mark.parametrize("name", list(bench.SUITES))
def test_bench_baselines_differ_from_their_models_only_where_they_should(name):
    """Each efficiency comparison changes only the paper's switch: the Config fields, and the
    parameters those fields add or remove; every other parameter has the same name and shape."""
    fields = {"smca": {"spatial_prior", "multiscale"}, "sparse_detr": {"sparse_encoder", "rho"},
              "lite_detr": {"enc_scale", "num_blocks", "kda_encoder", "low_ffn"},
              "focus_detr": {"foreground_selection"}}[name]
    params = {"smca": r"decoder\.\d+\.(center_mlp|norm4|offset_proj|scale_proj)\..*",
              "sparse_detr": r"scoring\..*|(class|bbox)_embed\.\d+\..*",  # the scorer, the encoder-aux heads
              "lite_detr": r"encoder\.\d+\.(self_attn\.(query_proj|attention_weights)|linear12|linear22|norm22)\..*",
              "focus_detr": r"selector\..*|encoder\.\d+\.oesm_(attn|norm)\..*"}[name]
    module = importlib.import_module(name)
    tiny = {"smca": tiny_smca, "sparse_detr": tiny_sparse, "lite_detr": tiny_lite, "focus_detr": tiny_focus}[name]
    suite = bench.SUITES[name]
    base_cfg = bench.make_config(module, suite.baseline.overrides)
    base = {k: p.shape for k, p in module.build(bench.make_config(module, suite.baseline.overrides, tiny()))[0]
            .state_dict().items()}
    for v in suite.variants:
        cfg = bench.make_config(module, v.overrides)
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base_cfg, f.name)}
        assert changed and changed <= fields, (v.label, changed)
        if "multiscale" in changed:  # another encoder and input projections: the SMCA tests cover it
            continue
        ours = {k: p.shape for k, p in module.build(bench.make_config(module, v.overrides, tiny()))[0]
                .state_dict().items()}
        differing = (ours.keys() ^ base.keys()) | {k for k in ours.keys() & base.keys() if ours[k] != base[k]}
        assert differing, v.label
        assert all(re.fullmatch(params, k) for k in differing), (v.label, sorted(differing))


def test_bench_lite_detr_encoder_macs_follow_the_token_updates():
    """bench.py's count: all-token layers cost the dense layer's per-query part, high-level layers
    that part x |F_H| / N, and every layer pays the value projection over all N tokens."""
    cfg = tiny_lite()
    by_label = {r["label"]: r for r in _bench_tiny("lite_detr", cfg)}
    # 64 x 96: levels 8x12, 4x6, 2x3, 1x2 -> N = 128 tokens; F_H = the coarsest 3 (32) or 2 (8) levels.
    # Per layer and query token (d model, F FFN, H heads, L levels, P points): offsets d*2HLP + output
    # d*d + FFN 2dF + grid_sample 4dLP (+ dense: attention weights d*HLP; + KDA: query d*d and the q.k,
    # w.v matmuls 2dLP); the value projection d*d per token per layer. The weighted sum is elementwise.
    d, F_, H, L, P, n = cfg.hidden_dim, cfg.dim_feedforward, cfg.nheads, 4, cfg.enc_n_points, 128
    per_q_dense = d * 2 * H * L * P + d * d + 2 * d * F_ + 4 * d * L * P + d * H * L * P
    per_q_kda = d * 2 * H * L * P + d * d + 2 * d * F_ + 4 * d * L * P + d * d + 2 * d * L * P
    small = 2 * d * d - 2 * d * F_  # F_L's small FFN in the all-token layer instead of the normal one
    dense_enc = cfg.enc_layers * n * (per_q_dense + d * d)
    for name, n_high, blocks in (("H3L1-(2+1)x3", 32, 3), ("H3L1-(3+1)x2", 32, 2), ("H3L1-(6+1)x1", 32, 1),
                                 ("H2L2-(2+1)x3", 8, 3)):
        lite, no_ffn = by_label[name], by_label[f"{name}, F_L without FFN"]
        assert lite["baseline_encoder_gmacs"] * 1e9 == pytest.approx(dense_enc, rel=1e-6)
        want = (6 * n * d * d + (6 - blocks) * n_high * per_q_kda + blocks * n * per_q_kda
                + blocks * (n - n_high) * small)
        assert lite["encoder_gmacs"] * 1e9 == pytest.approx(want, rel=1e-6), name
        assert no_ffn["encoder_gmacs"] * 1e9 == pytest.approx(want - blocks * (n - n_high) * 2 * d * d, rel=1e-6)
        assert 0 < lite["encoder_ms"] <= lite["ms"] and no_ffn["ms"] is None  # counted, not timed


def test_bench_smca_costs_what_detr_costs_plus_the_prior_heads():
    """Single-scale SMCA adds only the prior's small heads to DETR: same encoder, nearly the same total."""
    cfg = tiny_smca()
    single, multi = _bench_tiny("smca", cfg)
    assert single["encoder_gmacs"] == pytest.approx(single["baseline_encoder_gmacs"], rel=1e-9)
    assert 1 < single["gmacs"] / single["baseline_gmacs"] < 1.02
    assert multi["encoder_gmacs"] > single["encoder_gmacs"] and 0 < multi["encoder_ms"] <= multi["ms"]


def test_bench_sparse_detr_encoder_macs_follow_rho():
    """bench.py's count: the sparse encoder's multiply-adds are the per-query part on the S = int(N rho) + 1
    selected tokens plus the value projection on all N (the paper's slope: ratio 0.087 + 0.913 rho at d 256,
    FFN 1024, 4 x 4 points; here a tiny config); the records carry every field --json promises."""
    cfg = tiny_sparse(enc_layers=2)
    records = _bench_tiny("sparse_detr", cfg)
    d, F_, H, L, P = cfg.hidden_dim, cfg.dim_feedforward, cfg.nheads, 4, cfg.enc_n_points
    n = 128  # 8x12 + 4x6 + 2x3 + 1x2 tokens
    # offsets, weights, output, FFN, grid
    per_q = d * 2 * H * L * P + d * H * L * P + d * d + 2 * d * F_ + 4 * d * L * P
    assert [r["label"] for r in records] == ["rho 0.1", "rho 0.2", "rho 0.3", "rho 0.5"]
    for r in records:
        assert set(r) >= {"model", "config", "params", "gmacs", "encoder_gmacs", "baseline_gmacs",
                          "baseline_encoder_gmacs", "ms", "baseline_ms", "device", "size"}
        s_ = int(n * r["config"]["rho"]) + 1
        assert r["encoder_gmacs"] * 1e9 == pytest.approx(2 * (s_ * per_q + n * d * d), rel=1e-6)
        assert r["baseline_encoder_gmacs"] * 1e9 == pytest.approx(2 * n * (per_q + d * d), rel=1e-6)
        assert r["params"] > r["baseline_params"]  # the scorer and the encoder-aux heads
        assert r["device"] == "cpu" and r["size"] == "64x96" and 0 < r["encoder_ms"] <= r["ms"]
    # the same count at the paper's widths (d 256, FFN 1024, 4 levels x 4 points), per token
    d, n, s_ = 256, 20000, 2001
    per_q = 65536 + 32768 + 65536 + 524288 + 4 * 256 * 16  # sampling offsets, weights, output, FFN, grid_sample
    assert (s_ * per_q + n * d * d) / (n * (per_q + d * d)) == pytest.approx(0.087 + 0.913 * 0.1, abs=0.003)


def test_bench_focus_detr_under_bf16_autocast_counts_the_same_work():
    cfg = tiny_focus()
    fp32, bf16 = _bench_tiny("focus_detr", cfg)[0], _bench_tiny("focus_detr", cfg, "--amp", "bf16")[0]
    assert bf16["amp"] == "bf16" and bf16["ms"] > 0
    for key in ("gmacs", "encoder_gmacs", "baseline_gmacs", "baseline_encoder_gmacs"):
        assert bf16[key] == pytest.approx(fp32[key], rel=1e-6), key
    assert 0 < fp32["encoder_gmacs"] < fp32["baseline_encoder_gmacs"] < fp32["baseline_gmacs"]


def test_bench_cost_json_prints_one_record_per_configuration_and_nothing_else(capsys):
    """`cost --json` (the default subcommand): stdout is the records, one JSON line each, in the suite's order."""
    records = bench.main(["--model", "smca", "--size", "64", "96", "--repeats", "1", "--json"])
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(records))
    assert [r["label"] for r in records] == [v.label for v in bench.SUITES["smca"].variants]


def test_bench_cost_table_gives_ratios_against_the_baseline_and_the_paper():
    """A hand-built suite's records -> the heading with the baseline's figures and one row per variant: ratios to the
    baseline beside the paper's with their difference, '-' where a variant is counted but not timed."""
    base = {"baseline": "dense", "baseline_params": 40e6, "baseline_gmacs": 200.0, "baseline_encoder_gmacs": 100.0,
            "baseline_ms": 1000.0, "baseline_ms_spread": 20.0, "baseline_encoder_ms": 500.0, "baseline_ms_b4": 3000.0}
    timed = {**base, "label": "rho 0.1", "params": 41e6, "gmacs": 120.0, "encoder_gmacs": 20.0, "ms": 400.0,
             "ms_spread": 10.0, "encoder_ms": 100.0, "ms_b4": 1500.0, "paper_gmacs_ratio": 0.5,
             "paper_encoder_ratio": 0.25, "paper_time_ratio": None}
    counted = {**timed, "label": "counted", "ms": None, "encoder_ms": None, "ms_b4": None}
    lines = bench.cost_table("sparse_detr", [timed, counted], [1, 4]).splitlines()
    assert lines[1] == ("### sparse_detr: against dense (40.0 M parameters, 200.0 GMACs, encoder 100.0, 1000 ms +- 10, "
                        "encoder 500 ms)")
    assert lines[2] == "Paper figures: " + bench.SUITES["sparse_detr"].source
    assert lines[-2] == ("| rho 0.1 | 41.00 | 120.0 | 0.600 | 0.500 (+0.100) | 20.0 | 0.200 | 0.250* (-0.050) | "
                         "400 +- 5 | 0.400 | - | 100 | 0.200 | 1500 | 0.500 |")
    assert lines[-1] == ("| counted | 41.00 | 120.0 | 0.600 | 0.500 (+0.100) | 20.0 | 0.200 | 0.250* (-0.050) | "
                         "- | - | - | - | - | - | - |")
    assert lines[-3] == "|---" * 15 + "|"


def test_bench_fast_vs_reference_agrees_with_the_readable_path():
    """`fast-vs-reference`: SMCA's baseline and both variants, each timed on both paths, their outputs within float32
    rounding of each other (SMCA takes no top-k over scores: nothing to flip)."""
    rows = bench.main(["fast-vs-reference", "--model", "smca", "--size", "64", "96", "--repeats", "1"])
    assert [r["label"] for r in rows] == ["DETR baseline (prior off)", "SMCA single-scale", "SMCA multi-scale"]
    assert all(r["ms_reference"] > 0 and r["ms_fast"] > 0 for r in rows)
    assert all(r["logits_diff"] < 1e-4 and r["boxes_diff"] < 1e-4 for r in rows)
    assert all(r["selection_scores_diff"] is None for r in rows)


def test_bench_fast_vs_reference_row_reads_as_documented():
    """docs/fast-paths.md's first row, from its record."""
    r = {"model": "smca", "label": "DETR baseline (prior off)", "ms_reference": 2062.3, "ms_fast": 880.1,
         "speedup": 2062.3 / 880.1, "logits_diff": 3.3e-6, "boxes_diff": 1.2e-7, "selection_scores_diff": None}
    assert bench.fast_vs_reference_line(r) == \
        "| smca | DETR baseline (prior off) | 2062 | 880 | 2.34x | 3.3e-06 / 1.2e-07 | - |"
    assert bench.fast_vs_reference_line({**r, "selection_scores_diff": 4.8e-6}).endswith(" | 4.8e-06 |")


def test_bench_profile_splits_a_forward_by_module_without_counting_twice(capsys):
    """`profile`: the suite's baseline and first timed variant, under their labels, each path split by module; the
    hooked modules run inside the forward, so what is left over ("rest") is never negative; one table row per path."""
    base, smca_row = bench.main(["profile", "--model", "smca", "--size", "64", "96"])
    assert (base["label"], smca_row["label"]) == ("DETR baseline (prior off)", "SMCA single-scale")
    for mode in bench.PROFILE_PATHS:
        m = smca_row[mode]
        assert m["backbone"] > 0 and m["encoder"] > 0 and m["decoder"] > 0 and m["ops"]["convolutions"] > 0
        assert m["rest"] >= 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smca: ")]
    assert [row.split(" | ")[:2] for row in rows] == [["| smca: " + r["label"], mode] for r in (base, smca_row)
                                                     for mode in bench.PROFILE_PATHS]


TINY_SETS = {"smca": ("hidden_dim=32", "nheads=4", "enc_layers=1", "dec_layers=2", "dim_feedforward=32"),
             "sparse_detr": ("hidden_dim=32", "nheads=4", "enc_layers=2", "dec_layers=2", "dim_feedforward=32",
                             "num_queries=20")}


@pytest.mark.parametrize("name", ["smca", "sparse_detr"])
def test_bench_train_step_profile_splits_the_whole_step(tiny_shapes, name):
    """train-step: the parts of a training step (data, forward by module, matcher, losses, the backward split at
    the gradients of memory and features, clip, optimizer) account for the whole step, each non-negative (a
    backward split in the wrong order would give a negative part), and training goes on (finite losses)."""
    r = bench.profile_train_step(name, steps=2, warmup=0, sets=TINY_SETS[name], root=tiny_shapes, backbone="none")
    assert set(r["ms"]) == set(bench.TRAIN_PARTS)
    assert all(v >= 0 for v in r["ms"].values()), r["ms"]
    assert sum(r["ms"].values()) == pytest.approx(r["ms_per_step"], rel=1e-6)  # nothing counted twice or lost
    for part in ("backbone", "encoder", "decoder", "matcher", "backward: encoder", "backward: backbone", "clip",
                 "optimizer"):
        assert r["ms"][part] > 0, part
    assert len(r["loss"]) == 2 and all(math.isfinite(v) for v in r["loss"])
    assert r["top_ops"] and all(t >= 0 for _, t in r["top_ops"])


def test_bench_step_clock_trains_as_train_py(tiny_shapes):
    """The profile's timed step (its wrappers on the model, the criterion and the scaler) moves the parameters exactly
    as train.py's step does (forward_loss, backward, optimizer_step) from the same start and batch."""
    (run, train_set), (ref, _) = (bench.training_run("smca", TINY_SETS["smca"], root=tiny_shapes, backbone="none")
                                  for _ in range(2))
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    batch = next(iter(train.make_loader(train_set, 2, True, 42, 0, 0, 1, 0)))
    clock = bench.StepClock(run)
    for r in (run, ref):
        r.model.train()
        r.criterion.train()
    torch.manual_seed(0)
    clock.step(run, iter([batch]))
    torch.manual_seed(0)
    images, pad_mask, targets = batch
    loss, _ = train.forward_loss(ref, images, pad_mask, targets)
    ref.scaler.scale(loss).backward()
    train.optimizer_step(ref)
    ours, theirs = run.model.state_dict(), ref.model.state_dict()
    assert any(not torch.equal(ours[k], start[k]) for k in start)  # the step moved the parameters
    for k in start:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
    assert clock.seconds["clip"] > 0 and clock.seconds["optimizer"] > 0


def test_bench_train_step_table_labels_a_run_by_its_overrides_and_amp():
    ms = {p: float(i) for i, p in enumerate(bench.TRAIN_PARTS)}
    records = [{"model": "smca", "sets": [], "amp": "off", "steps_per_s": 2.4, "ms_per_step": 416.4, "ms": ms,
                "top_ops": [("aten::mm", 30.2)]},
               {"model": "smca", "sets": ["enc_layers=1"], "amp": "bf16-backbone", "steps_per_s": 3.81,
                "ms_per_step": 262.0, "ms": ms, "top_ops": [("aten::mm", 20.0), ("aten::mul", 19.4)]}]
    lines = bench.train_step_table(records).splitlines()
    cells = " | ".join(str(i) for i in range(len(bench.TRAIN_PARTS)))
    assert lines[2:4] == [f"| smca | 2.40 | 416 | {cells} |", f"| smca enc_layers=1 (amp bf16-backbone) | 3.81 | 262 | "
                                                               f"{cells} |"]
    assert lines[-2:] == ["- smca: aten::mm 30", "- smca: aten::mm 20, aten::mul 19"]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def test_bench_without_a_subcommand_runs_the_cost_tables():
    """The docs' `python -m tools.bench [options]` is `python -m tools.bench cost [options]`."""
    argv = ["--model", "smca", "--size", "64", "96", "--readable-path"]
    assert bench.parse_args([]).run is bench.cost
    assert vars(bench.parse_args(argv)) == vars(bench.parse_args(["cost", *argv]))


SUBCOMMAND_ARGV = {  # each subcommand with every option it takes, and one it does not take
    "cost": (["--model", "smca", "--size", "64", "96", "--data", ".", "--images", "2", "--repeats", "2", "--device",
              "cpu", "--amp", "bf16", "--threads", "1", "--json", "--readable-path"], ["--steps", "2"]),
    "fast-vs-reference": (["--model", "smca", "--size", "64", "96", "--data", ".", "--images", "2", "--repeats", "2",
                           "--device", "cpu", "--threads", "1", "--json"], ["--amp", "bf16"]),
    "profile": (["--model", "smca", "--size", "64", "96", "--data", ".", "--images", "2", "--threads", "1", "--json"],
                ["--device", "cpu"]),
    "train-step": (["--model", "smca", "--steps", "2", "--set", "rho=0.2", "--amp", "off", "--threads", "1", "--json",
                    "--readable-path"], ["--size", "64", "64"]),
    "train-memory": (["--model", "smca", "--size", "64", "96", "--device", "cpu", "--recompute-sampling", "off",
                      "--checkpoint-encoder", "off", "--threads", "1", "--json", "--readable-path"],
                     ["--repeats", "2"]),
    "memory-step": (["smca", "SMCA single-scale", "2", "--size", "64", "96", "--device", "cpu", "--recompute-sampling",
                     "off", "--checkpoint-encoder", "off", "--threads", "1", "--readable-path"], ["--json"]),
    "data-throughput": (["--images", "3", "--threads", "1", "--json"], ["--model", "smca"]),
}


@pytest.mark.parametrize("name", list(bench.SUBCOMMANDS))
def test_bench_subcommands_take_their_own_options_only(name):
    own, foreign = SUBCOMMAND_ARGV[name]
    args = bench.parse_args([name, *own])
    assert args.run is bench.SUBCOMMANDS[name] and args.threads == 1
    with pytest.raises(SystemExit):
        bench.parse_args([name, *own, *foreign])


def test_bench_old_mode_flags_name_their_subcommand():
    for name in set(bench.SUBCOMMANDS) - {"cost"}:
        with pytest.raises(ValueError, match=f"--{name} is a subcommand now: python -m tools.bench {name} "):
            bench.parse_args([f"--{name}", "--model", "smca"])


def test_bench_rejects_bad_values(tiny_shapes):
    with pytest.raises(ValueError, match=r"--images 99: .*instances_val.json has only 3 images"):
        bench.main(["--data", tiny_shapes, "--images", "99"])
    with pytest.raises(ValueError, match="--size must be at least 64"):
        bench.parse_args(["profile", "--size", "32", "32"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench.parse_args(["train-memory", "--device", "cuda"])
    with pytest.raises(ValueError, match="--threads must be positive"):
        bench.parse_args(["data-throughput", "--threads", "0"])
    with pytest.raises(ValueError, match="--steps must be positive"):
        bench.parse_args(["train-step", "--steps", "0"])
    with pytest.raises(ValueError, match="is not a folder"):
        bench.parse_args(["fast-vs-reference", "--data", "/nowhere/coco"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "detr9000"])


def test_bench_val_images_take_the_coco_val_transform(tiny_shapes):
    images = bench._val_images(tiny_shapes, 2, "cpu")  # short side 800, long side at most 1333
    assert len(images) == 2 and all(min(im.shape[1:]) == 800 or max(im.shape[1:]) in (1332, 1333) for im in images)


def test_bench_memory_step_refuses_an_unknown_configuration_or_batch():
    with pytest.raises(ValueError, match="has no configuration 'rho 0.9'; it has"):
        bench.parse_args(["memory-step", "sparse_detr", "rho 0.9", "1"])
    with pytest.raises(ValueError, match="the batch size must be positive, got 0"):
        bench.parse_args(["memory-step", "sparse_detr", "rho 0.1", "0"])


def test_bench_train_memory_runs_each_step_as_a_memory_step_command_of_the_same_settings(monkeypatch):
    """On the CPU each step is `python -m tools.bench memory-step ...` in its own process, with train-memory's
    settings."""
    args = bench.parse_args(["train-memory", "--size", "96", "128", "--recompute-sampling", "off", "--threads", "1",
                             "--readable-path"])
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='log\n{"peak_gb": 1.5}\n', stderr="")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.memory_step_in_a_process("lite_detr", "dense (Deformable DETR)", 2, args) == {"peak_gb": 1.5}
    (cmd,) = seen
    assert cmd[1:3] == ["-m", "tools.bench"]
    step = bench.parse_args(cmd[3:])
    assert step.run is bench.memory_step_command
    assert (step.model, step.label, step.batch) == ("lite_detr", "dense (Deformable DETR)", 2)
    assert (step.size, step.device, step.recompute_sampling, step.checkpoint_encoder, step.threads,
            step.readable_path) == ([96, 128], "cpu", "off", "on", 1, True)


def test_bench_saved_for_backward_splits_what_autograd_keeps_by_part():
    """The parts' bytes add up to every saved storage counted once; the backbone's equal what the backbone alone
    saves; parameters are not counted; deformable attention inside the encoder and decoder is told apart."""
    torch.manual_seed(0)
    model = sparse_detr.build(tiny_sparse())[0].train()
    images, pad_mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    saved = bench.SavedForBackward(model)
    with saved.hooks():
        out = model(images, pad_mask)
    saved.remove()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted, live = [], {}

    def count(t):  # each storage once while a tensor saved on it lives (the class's rule, without the parts)
        key = t.untyped_storage().data_ptr()
        if key not in params and (key not in live or live[key]() is None):
            live[key] = weakref.ref(t)
            counted.append(t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model(images, pad_mask)
    assert sum(saved.bytes.values()) == sum(counted)
    assert set(saved.bytes) == set(bench.MEMORY_PARTS)
    counted.clear()
    live.clear()
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model.backbone(images, pad_mask)
    assert saved.bytes["backbone"] == sum(counted) > 0
    assert out["pred_logits"].requires_grad


def test_bench_memory_step_runs_a_coco_configuration_and_reports_its_peak():
    """One COCO-configuration step (small images): its peak and split; recomputing the sampling keeps less in the
    deformable attention (the samples: B*H x D x P x Q floats per level and layer) and nothing else changes."""
    label = bench.SUITES["sparse_detr"].baseline.label
    kept, recomputed = (bench.memory_step("sparse_detr", label, 1, (160, 256), "cpu", recompute=r, checkpoint=False)
                        for r in (0, 1))
    assert recomputed["peak_gb"] > 0.1 and recomputed["saved_total_gb"] > 0 and recomputed["step_s"] > 0
    assert set(kept["saved_gb"]) == set(bench.MEMORY_PARTS)
    part = "encoder: deformable attention"
    tokens = sum(math.ceil(160 / s) * math.ceil(256 / s) for s in (8, 16, 32, 64))  # the dense encoder's queries
    samples = 6 * 4 * 4 * 256 * tokens * 4 / 1e9  # layers x levels x points x (heads x head dim) x queries, float32
    assert kept["saved_gb"][part] - recomputed["saved_gb"][part] == pytest.approx(samples, rel=1e-6)
    for p in set(bench.MEMORY_PARTS) - {part, "decoder: deformable attention"}:
        assert kept["saved_gb"][p] == pytest.approx(recomputed["saved_gb"][p], rel=1e-9)
    checkpointed = bench.memory_step("sparse_detr", label, 1, (160, 256), "cpu")  # the COCO recipe: both on
    encoder = [p for p in bench.MEMORY_PARTS if p.startswith("encoder")]  # only what the checkpoints keep: inputs
    assert sum(checkpointed["saved_gb"].get(p, 0) for p in encoder) < 0.1 * sum(kept["saved_gb"][p] for p in encoder)
    assert checkpointed["saved_gb"]["backbone"] == pytest.approx(kept["saved_gb"]["backbone"], rel=1e-9)


def test_bench_memory_table_gives_the_peak_per_added_image():
    """docs/memory.md's DETR-baseline rows from their records: batch 2's peak less batch 1's, per added image."""
    parts = dict(zip(bench.MEMORY_PARTS, (0.61, 0.0, 0.86, 0.0, 0.33, 0.01)))
    one = {"model": "smca", "label": "DETR baseline (prior off)", "batch": 1, "peak_gb": 2.481, "saved_total_gb": 1.8,
           "saved_gb": parts, "step_s": 14.2}
    two = {**one, "batch": 2, "peak_gb": 4.382, "saved_total_gb": 3.54, "step_s": 26.1,
           "saved_gb": dict(zip(bench.MEMORY_PARTS, (1.12, 0.0, 1.73, 0.0, 0.66, 0.03)))}
    args = bench.parse_args(["train-memory", "--recompute-sampling", "off", "--checkpoint-encoder", "off"])
    lines = bench.memory_table([one, two], args).splitlines()
    assert lines[-2:] == [
        "| smca | DETR baseline (prior off) | 1 | 2.48 | - | 1.80 | 0.61 | 0.00 | 0.86 | 0.00 | 0.33 | 0.01 | 14 |",
        "| smca | DETR baseline (prior off) | 2 | 4.38 | 1.90 | 3.54 | 1.12 | 0.00 | 1.73 | 0.00 | 0.66 | 0.03 | 26 |"]
    assert "800 x 1333" in lines[1] and "--recompute-sampling off --checkpoint-encoder off" in lines[1]


def test_bench_coco_like_photos_are_coco_sized_jpegs(tmp_path):
    from PIL import Image
    (path,) = bench.coco_like_photos(str(tmp_path), 1)
    assert Image.open(path).size == (640, 480) and Image.open(path).format == "JPEG"


def test_bench_data_throughput_times_each_stage_of_the_coco_transform():
    """The stages' ms per image add up to the rate, and the workers 8 GPUs x 2 images x 4 steps/s need follow."""
    r = bench.data_throughput(3)
    assert set(r["ms"]) == set(bench.DATA_STAGES) and all(v > 0 for v in r["ms"].values())
    assert r["images_per_s"] == pytest.approx(1e3 / sum(r["ms"].values()))
    assert r["workers_needed"] == pytest.approx(64 / r["images_per_s"])


def test_bench_data_throughput_line_reads_as_documented():
    """docs/memory.md's line, from its record."""
    ms = dict(zip(bench.DATA_STAGES, (3.36, 0.18, 7.26, 10.03)))
    rate = 1e3 / sum(ms.values())
    r = {"images_per_s": rate, "ms": ms, "threads": 1, "images": 100, "needed_images_per_s": 64,
         "workers_needed": 64 / rate}
    assert bench.data_throughput_line(r) == (
        "COCO training transform, one process (1 torch threads), 100 640 x 480 JPEGs: 48.0 images/s; ms per image: "
        "decode 3.4, flip 0.2, resize / crop 7.3, to tensor, normalise 10.0. 8 GPUs x 2 images x 4 steps/s = 64 "
        "images/s: 1.3 such workers (0.2 per GPU)")
