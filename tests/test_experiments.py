"""Tests of tools/experiments.py: converge, leaderboard, speed, fine-tokens.
"""
import json
import os

import pytest
import torch

import train
from tools import experiments
from tests.helpers import (TINY_SET, _tiny_checkpoint, _train_args, _train_losses)


# ---------------------------------------------------------------------------------------------
# experiments.py
# ---------------------------------------------------------------------------------------------

def test_experiments_leaderboard_trains_each_model_once_and_tables_them(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "LEADERBOARD", [("DETR tiny", "smca", ["--set", "spatial_prior=false"]),
                                                     ("SMCA tiny", "smca", [])])
    argv = ["leaderboard", "--budget", "1e-7", "--out", str(tmp_path), "--data", tiny_shapes, "--train-args",
            "--scales", "shapes", "--batch-size", "4", "--backbone-weights", "none", "--log-every", "100", *TINY_SET]
    rows = experiments.main(argv)
    assert [r["model"] for r in rows] == ["DETR tiny", "SMCA tiny"]
    assert all(r["epochs"] == 0.5 and r["train_min"] > 0 and r["infer_ms"] > 0 for r in rows)
    with open(tmp_path / "detr_tiny" / "log.jsonl") as f:
        assert json.loads(f.readline())["config"]["spatial_prior"] is False
    table = (tmp_path / "leaderboard.md").read_text()
    assert "| DETR tiny |" in table and "| SMCA tiny |" in table
    assert "python -m tools.experiments leaderboard --budget 1e-7" in table
    assert experiments.main(argv) == rows  # a second call re-reads the spent runs: nothing retrained, nothing lost
    assert len(_train_losses(tmp_path / "smca_tiny")) == 1


def test_experiments_converge_probe_reads_a_checkpoint_and_refuses_others(tiny_shapes, tmp_path):
    train.main(_train_args(tiny_shapes, tmp_path / "s", "--epochs", "1"))
    rows = experiments.probe(str(tmp_path / "s" / "checkpoint.pth"), tiny_shapes, n=3, size=64)
    assert len(rows) == 3 and all(a >= 0 and b >= 0 for a, b in rows.values())
    assert rows["predicted boxes (images / queries)"][1] > 0  # the queries' boxes differ
    with pytest.raises(ValueError, match="needs 4 val images"):
        experiments.probe(str(tmp_path / "s" / "checkpoint.pth"), tiny_shapes, n=4)
    ckpt = torch.load(tmp_path / "s" / "checkpoint.pth", weights_only=False)
    ckpt["model_name"] = "sparse_detr"
    torch.save(ckpt, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an smca one"):
        experiments.probe(str(tmp_path / "other.pth"), tiny_shapes, n=3)


def test_experiments_converge_table_from_logs_and_skips_finished_runs(tmp_path, monkeypatch):
    """experiments.py converge reads each run's eval records (the last one of an epoch wins), does not retrain a
    run whose last epoch is already evaluated, and counts the steps DETR needed to reach SMCA's AP."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"retrained {argv}"))
    for i in range(3):
        os.makedirs(tmp_path / str(i))
        with open(tmp_path / str(i) / "log.jsonl", "w") as f:
            f.write(json.dumps({"type": "train", "loss": 1.0}) + "\n")
            for epoch in (0, 1, 1):
                ap = 0.01 * (i + 1) * (epoch + 1)
                f.write(json.dumps({"type": "eval", "epoch": epoch, "AP": ap, "AP50": 2 * ap, "epoch_time_s": 60.0,
                                    "steps": 100 * (epoch + 1)}) + "\n")
    experiments.main(["converge", "--epochs", "2", "--out", str(tmp_path)])
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert rows[-3] == "| 2 | 2.0 / 4.0 | 4.0 / 8.0 |"
    assert rows[-2] == "| s / epoch, train + eval | 60 | 60 |"
    # SMCA's AP after epoch 1 (2.0) is DETR's after its epoch 2 (200 steps); SMCA's final 4.0 it never reaches
    assert rows[-1] == ("| DETR steps to reach SMCA's AP of each epoch (SMCA: 1 epoch = 100 steps) | - | "
                        "200 (2.0x) / > 200 (> 1.0x) |")
    experiments.main(["converge", "--epochs", "2", "--out", str(tmp_path), "--multiscale"])
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert rows[-3] == "| 2 | 2.0 / 4.0 | 4.0 / 8.0 | 6.0 / 12.0 |"

def test_experiments_fine_tokens_counts_kept_and_fine_tokens_inside_boxes(tiny_shapes, tmp_path):
    """The kept tokens do not depend on the MCSP score; the fine-grained share does; both in [0, 1]."""
    _tiny_checkpoint(tmp_path / "focus.pth", tiny_shapes, "focus_detr")
    rows = experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "focus.pth"), "--images", "2"])
    assert set(rows) == {"logit_product", "prob_product"}
    assert rows["logit_product"]["kept"] == rows["prob_product"]["kept"]
    assert all(0 <= v <= 1 for r in rows.values() for v in r.values())
    _tiny_checkpoint(tmp_path / "smca.pth", tiny_shapes, "smca")
    with pytest.raises(ValueError, match="reads a Focus-DETR checkpoint"):
        experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "smca.pth")])
    with pytest.raises(ValueError, match="--images 9"):
        experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "focus.pth"), "--images", "9"])


def _fake_run(run_dir, losses, steps, train_s):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        for step, loss in enumerate(losses):
            f.write(json.dumps({"type": "train", "step": step, "loss": loss}) + "\n")
        f.write(json.dumps({"type": "eval", "steps": steps, "train_s": train_s, "AP": 0.0}) + "\n")


def test_experiments_speed_tables_finished_runs_without_rerunning_them(tmp_path):
    """speed re-reads runs already in --out (nothing trains): steps/s of each checkout, median over rounds, the
    ratio, and the largest relative loss difference at the steps both took; a --vs without train.py is refused."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.py").write_text("raise SystemExit('must not run')\n")
    out = tmp_path / "speed"
    for r, (this_s, other_s) in enumerate([(20.0, 40.0), (25.0, 40.0), (30.0, 60.0)]):
        _fake_run(out / f"smca-other-1min-{r}", [10.0, 8.0], 40, other_s)
        _fake_run(out / f"smca-this-1min-{r}", [10.0, 8.8, 7.0], 40, this_s)
    rows = experiments.main(["speed", "--vs", str(other), "--models", "smca", "--rounds", "3", "--out", str(out)])
    (row,) = rows
    assert row["steps_per_s_other"] == pytest.approx(1.0) and row["steps_per_s_this"] == pytest.approx(1.6)
    assert row["ratio"] == pytest.approx(1.6) and row["common_steps"] == 2
    assert row["max_rel_loss_diff"] == pytest.approx(0.1)
    table = (out / "speed.md").read_text()
    assert "| smca | 1.000 | 1.600 | 1.60x | 2 | 9.000 / 9.400 | 1.0e-01 |" in table
    _fake_run(out / "smca-this-amp_bf16-backbone-1min-0", [10.0, 8.0], 40, 10.0)  # --this-args: its own runs
    (flagged,) = experiments.main(["speed", "--vs", str(other), "--models", "smca", "--out", str(out),
                                   "--this-args=--amp bf16-backbone"])
    assert flagged["steps_per_s_this"] == pytest.approx(4.0) and flagged["steps_per_s_other"] == pytest.approx(1.0)
    assert "| model | steps/s (--vs) | steps/s (this --amp bf16-backbone) |" in (out / "speed.md").read_text()
    with pytest.raises(ValueError, match="no train.py there"):
        experiments.main(["speed", "--vs", str(tmp_path / "nowhere"), "--out", str(out)])
    _fake_run(out / "broken", [1.0], 1, 1.0)
    os.remove(out / "broken" / "log.jsonl")
    with open(out / "broken" / "log.jsonl", "w") as f:
        f.write(json.dumps({"type": "train", "step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="has no evaluation"):
        experiments.train_log(str(out / "broken"))
