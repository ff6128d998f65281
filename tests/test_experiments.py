"""Tests of tools/experiments.py: converge, leaderboard, speed, fine-tokens, selected-tokens, log-stats, log-evals.
"""
import gzip
import importlib
import json
import os
import shutil

import pytest
import torch

import data as datalib
import detect
import train
from common import box_cxcywh_to_xyxy
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
    kept = json.loads((tmp_path / "smca_tiny" / "inference.json").read_text())  # timed once, on the fast paths
    assert kept["ms_per_image"] == rows[1]["infer_ms"] and kept["readable_path"] is False


def test_leaderboard_reads_the_inference_time_an_older_log_carries(tmp_path):
    # an evaluation record with its own timing is read as it is: no checkpoint is needed
    assert experiments.inference_ms(str(tmp_path), {"steps": 5, "infer_ms_per_image": 12.5}, "shapes") == 12.5


def test_experiments_converge_probe_reads_a_checkpoint_and_refuses_others(tiny_shapes, tmp_path):
    train.main(_train_args(tiny_shapes, tmp_path / "s", "--epochs", "1"))
    rows = experiments.probe(str(tmp_path / "s" / "checkpoint.pth"), tiny_shapes, n=3, size=64)
    assert len(rows) == 6 and all(a >= 0 and b >= 0 for a, b in rows.values())
    cells = next(v for k, v in rows.items() if k.startswith("cells a query's cross-attention reads"))
    assert all(1 <= c <= 16 for c in cells)  # 64 x 64 at stride 16: 16 cells; uniform weights read all 16
    assert rows["predicted boxes (images / queries)"][1] > 0  # the queries' boxes differ
    assert rows["backbone's last map (images / cells)"][0] > 0  # a backbone reads its image
    with pytest.raises(ValueError, match="needs 4 val images"):
        experiments.probe(str(tmp_path / "s" / "checkpoint.pth"), tiny_shapes, n=4)
    ckpt = torch.load(tmp_path / "s" / "checkpoint.pth", weights_only=False)
    ckpt["model_name"] = "sparse_detr"
    torch.save(ckpt, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an smca one"):
        experiments.probe(str(tmp_path / "other.pth"), tiny_shapes, n=3)


def test_experiments_attended_cells_counts_the_cells_a_query_reads():
    uniform, one_hot = torch.full((2, 3, 16), 1 / 16), torch.eye(16)[:3]
    assert experiments.attended_cells(uniform) == pytest.approx(16)
    assert experiments.attended_cells(one_hot) == pytest.approx(1)
    half = torch.zeros(1, 16)
    half[0, :4] = 0.25  # uniform over 4 of the 16
    assert experiments.attended_cells(half) == pytest.approx(4)


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
    assert set(rows) == {"logit_product", "prob_product", "levels"}
    assert rows["logit_product"]["kept"] == rows["prob_product"]["kept"]
    assert rows["logit_product"]["inside_kept"] == rows["prob_product"]["inside_kept"]
    levels = rows.pop("levels")  # per level: shares of its tokens, kept ones averaged over the layers
    assert all(0 <= v <= 1 for r in [*rows.values(), *levels] for v in r.values())
    assert set(rows["prob_product"]) == {"all", "kept", "fine", "inside_kept", "inside_fine"}
    # the levels add up to chosen_in_boxes' counts over all tokens: the share inside a box, of those the share kept
    in_box = [v["tokens"] * v["inside"] for v in levels]
    assert len(levels) == 4 and sum(in_box) == pytest.approx(rows["logit_product"]["all"])
    kept_in_box = sum(share * v["inside_kept"] for share, v in zip(in_box, levels)) / sum(in_box)
    assert kept_in_box == pytest.approx(rows["logit_product"]["inside_kept"])
    _tiny_checkpoint(tmp_path / "smca.pth", tiny_shapes, "smca")
    with pytest.raises(ValueError, match="reads a Focus-DETR checkpoint"):
        experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "smca.pth")])
    with pytest.raises(ValueError, match="--images 9"):
        experiments.main(["fine-tokens", "--checkpoint", str(tmp_path / "focus.pth"), "--images", "9"])


def test_experiments_chosen_in_boxes_of_a_hand_built_image():
    """6 tokens, 0, 1 and 4 inside a box; layer 1 chose tokens 0 and 2 (one pad), layer 2 token 4: 2 of the 3 chosen
    lie in a box, and 2 of the 6 in-box tokens the two layers saw were chosen."""
    inside = torch.tensor([True, True, False, False, True, False])
    assert experiments.chosen_in_boxes(inside, [torch.tensor([0, 2, -1]), torch.tensor([4])]) == [2, 3, 6]
    assert experiments.chosen_in_boxes(inside, [torch.arange(6)]) == [3, 6, 3]  # every token: the in-box share


def test_experiments_kept_by_level_of_a_hand_built_image():
    """Level 0 is 2 x 2 (tokens 0-3), level 1 1 x 2 (4, 5); tokens 0, 1 and 4 inside a box, token 0 labelled
    foreground; layer 1 keeps 0, 2 and 4 (one pad), layer 2 token 0: level 0 kept 3 times, twice in a box."""
    inside = torch.tensor([True, True, False, False, True, False])
    foreground = torch.tensor([True, False, False, False, False, False])
    per_layer = [torch.tensor([0, 2, 4, -1]), torch.tensor([0])]
    assert experiments.kept_by_level(inside, foreground, per_layer, [(2, 2), (1, 2)]) == [[4, 2, 1, 3, 2],
                                                                                          [2, 1, 0, 1, 1]]


def test_experiments_selection_shares_of_a_hand_built_image():
    """6 tokens, the DAM 4/2/1/1/0/0 (sum 8), tokens 0, 1 and 4 inside a box; the encoder updates tokens 2 and 4."""
    dam, inside = torch.tensor([4.0, 2, 1, 1, 0, 0]), torch.tensor([True, True, False, False, True, False])
    shares = experiments.selection_shares(dam, torch.tensor([2, 4]), inside)
    assert shares == pytest.approx({"dam_selected": 1 / 8, "dam_top": 6 / 8, "uniform": 2 / 6, "selected_inside": 1 / 2,
                                    "inside": 3 / 6, "inside_selected": 1 / 3})


def test_experiments_selected_tokens_of_sparse_and_dense_checkpoints(tiny_shapes, tmp_path):
    """On one image, against the model's own outputs and boxes recomputed per level: the DAM's mass on the selected
    tokens (the criterion's corr) and the tokens whose cell centre lies in a box. A dense base's row is its own DAM's
    top rho; the wrong checkpoint or rho is refused."""
    _tiny_checkpoint(tmp_path / "sparse.pth", tiny_shapes, "sparse_detr")
    _tiny_checkpoint(tmp_path / "dense.pth", tiny_shapes, "sparse_detr", sparse_encoder=False, use_enc_aux_loss=False)
    sparse, dense = str(tmp_path / "sparse.pth"), str(tmp_path / "dense.pth")
    r = experiments.main(["selected-tokens", "--checkpoint", sparse, "--images", "1"])[sparse]
    det = detect.load_detector(sparse)
    image, target = datalib.CocoDetection(*datalib.find_split(tiny_shapes, "val"), det.transform)[0]
    H, W = image.shape[1:]
    with torch.no_grad():
        out = det.model(image[None], torch.zeros(1, H, W, dtype=torch.bool), explain=True)
    dam, selected = out["dam"][0], out["topk_inds"][0, :out["sparse_token_nums"][0]]
    boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([W, H, W, H])
    inside = []
    for lvl, (h, w) in enumerate(out["spatial_shapes"]):  # cell centres ((col + 0.5) s, (row + 0.5) s), s = 8 * 2^l
        s = 8 * 2 ** lvl
        y, x = torch.meshgrid((torch.arange(h) + 0.5) * s, (torch.arange(w) + 0.5) * s, indexing="ij")
        x, y = x.flatten()[:, None], y.flatten()[:, None]
        inside.append(((boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])).any(1))
    inside = torch.cat(inside)
    assert 0 < inside.sum() < len(inside)
    assert r["dam_selected"] == pytest.approx((dam[selected].sum() / dam.sum()).item())
    assert r["dam_top"] == pytest.approx((dam.topk(len(selected)).values.sum() / dam.sum()).item())
    assert r["uniform"] == pytest.approx(len(selected) / len(dam)) and r["selection"] == "dam, rho 0.3"
    assert r["inside"] == pytest.approx(inside.float().mean().item())
    assert r["selected_inside"] == pytest.approx(inside[selected].float().mean().item())
    d = experiments.main(["selected-tokens", "--checkpoint", dense, "--images", "1", "--rho", "0.5"])[dense]
    assert d["dam_selected"] == pytest.approx(d["dam_top"]) and d["selection"] == "dense (the DAM's top rho 0.5)"
    assert d["uniform"] > r["uniform"] and d["inside"] == pytest.approx(r["inside"])  # the same image and tokens
    _tiny_checkpoint(tmp_path / "smca.pth", tiny_shapes, "smca")
    with pytest.raises(ValueError, match="reads Sparse DETR checkpoints"):
        experiments.main(["selected-tokens", "--checkpoint", str(tmp_path / "smca.pth")])
    with pytest.raises(ValueError, match="is a dense base: give --rho"):
        experiments.main(["selected-tokens", "--checkpoint", dense, "--images", "1"])
    with pytest.raises(ValueError, match="its own rho"):
        experiments.main(["selected-tokens", "--checkpoint", sparse, "--rho", "0.5", "--images", "1"])
    with pytest.raises(ValueError, match="--rho must be in"):
        experiments.main(["selected-tokens", "--checkpoint", dense, "--rho", "1.5", "--images", "1"])
    with pytest.raises(ValueError, match="--images 9"):
        experiments.main(["selected-tokens", "--checkpoint", dense, "--rho", "0.1", "--images", "9"])


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


# claims -------------------------------------------------------------------------------------

def _claim_log(run_dir, argv, aps, steps_per_epoch=100, epochs=None):
    """A run's log.jsonl as train.py writes it: the start record of `argv`, then one eval per AP."""
    os.makedirs(run_dir, exist_ok=True)
    parsed = train.parse_args(argv)
    train.resolve_recipe(parsed, importlib.import_module(parsed.model), True)  # train.py logs the resolved recipe
    args = vars(parsed)
    assert args["epochs"] == (epochs or len(aps))
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"type": "start", "args": args, "device": "test CPU"}) + "\n")
        for e, ap in enumerate(aps):
            f.write(json.dumps({"type": "eval", "epoch": e, "steps": steps_per_epoch * (e + 1), "AP": ap,
                                "AP50": 2 * ap, "APs": ap / 2}) + "\n")


def _two_claims():
    run = experiments.ClaimRun
    return [experiments.Claim("SMCA-DETR", "smca", "faster", [run("DETR", ["spatial_prior=false"], 34.8, 86),
                                                              run("SMCA", [], 41.0, 86)],
                              run("DETR long", ["spatial_prior=false"], train_args=("--epochs", "6"))),
            experiments.Claim("Sparse DETR", "sparse_detr", "cheaper", [run("dense", ["sparse_encoder=false"], 46.0,
                                                                            177.3),
                                                                        run("rho 0.1", ["rho=0.1"], 45.3, 105.4),
                                                                        run("random", ["selection=random"],
                                                                            all_seeds=False)])]


def _claims_args(**kw):
    return experiments.main.__globals__["argparse"].Namespace(**{"data": "shapes", "seed": 42, "budget": None,
                                                                  "steps": None, "train_args": [], **kw})


CLAIM_APS = {  # (label, seed) -> AP after each epoch (each model's shapes recipe: SMCA 4 epochs, Sparse DETR 2)
    ("DETR", 42): [0.01, 0.05, 0.10, 0.12], ("SMCA", 42): [0.04, 0.08, 0.2, 0.3],
    ("DETR", 43): [0.02, 0.04, 0.08, 0.10], ("SMCA", 43): [0.05, 0.09, 0.2, 0.25],
    ("DETR long", 42): [0.01, 0.05, 0.10, 0.20, 0.25, 0.31],
    ("dense", 42): [0.2, 0.4], ("rho 0.1", 42): [0.1, 0.3], ("random", 42): [0.1, 0.2],
    ("dense", 43): [0.2, 0.5], ("rho 0.1", 43): [0.1, 0.5]}


def _claim_runs_logged(out, seeds=(42, 43)):
    args = _claims_args()
    for claim, run, seed in experiments.claim_runs(list(seeds)):
        run_dir = experiments.claim_dir(out, claim, run, seed)
        _claim_log(run_dir, experiments.claim_argv(args, claim, run, run_dir, seed), CLAIM_APS[run.label, seed])
        with open(os.path.join(run_dir, "log.jsonl"), "a") as f:  # a train record: compacted in the record
            f.write(json.dumps({"type": "train", "epoch": 0, "iter": 0, "step": 0, "loss": 1.2345678912,
                                "lr_base": 4e-4}) + "\n")


def test_experiments_claims_tables_seeds_keeps_records_and_rebuilds_from_them_alone(tmp_path, monkeypatch):
    """claims --seeds 2: each claim's base and efficient model with both seeds, a side run and the long baseline with
    the first; finished runs are re-read (nothing trained), each kept as a record (its log.jsonl, gzipped, train
    numbers to 4 digits), costs measured once; the table gives each seed's AP, their mean and range, the per-seed
    difference to the base of the same seed and whether the paper's claim holds within it; --table-only rebuilds the
    same table from the records alone (a fresh clone); an unfinished run is continued, a folder of another run
    refused."""
    monkeypatch.setattr(experiments, "CLAIMS", _two_claims())
    costs = {"DETR": (2.0, 1.0, 10.0, 100.0), "SMCA": (2.0, 1.0, 11.0, 110.0), "dense": (4.0, 2.0, 20.0, 200.0),
             "rho 0.1": (3.0, 0.5, 15.0, 120.0), "random": (3.0, 0.5, 14.0, 110.0)}
    measured = []

    def fake_costs(claim, root):
        measured.append(claim.model)
        return {r.label: dict(zip(("gmacs", "encoder_gmacs", "infer_ms", "train_ms"), costs[r.label]))
                for r in claim.runs}
    monkeypatch.setattr(experiments, "claim_costs", fake_costs)
    monkeypatch.setattr(experiments.shapes, "ensure", lambda root: root)
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"retrained {argv}"))
    out, records = str(tmp_path / "claims"), str(tmp_path / "records")
    _claim_runs_logged(out)
    rows = experiments.main(["claims", "--out", out, "--records", records, "--seeds", "2"])
    assert measured == ["smca", "sparse_detr"]
    record = experiments.claim_record(records, experiments.CLAIMS[1], experiments.CLAIMS[1].runs[1], 43)
    kept = list(experiments.log_records(record))
    assert [r["AP"] for r in kept if r["type"] == "eval"] == [0.1, 0.5] and kept[-1]["loss"] == 1.235
    rho = next(r for r in rows if r["label"] == "rho 0.1")
    assert list(rho["seeds"]) == [42, 43] and rho["AP"] == pytest.approx(0.4)
    assert rho["diff"] == {42: pytest.approx(-0.1), 43: pytest.approx(0.0)}
    assert rho["verdict"] == "within the spread: 1 of 2 seed(s) at or above the paper's -1.5% of the base"
    text = open(os.path.join(records, "claims.md")).read()
    assert ("| rho 0.1 | 42, 43 | 30.0 / 50.0 | 40.0 (30.0 to 50.0) | 80.0 | 20.0 | -10.0 / +0.0 | -5.0 (-10.0 to "
            "+0.0) | within the spread: 1 of 2 seed(s) at or above the paper's -1.5% of the base | 0.50 (0.25x) | "
            "3.00 (0.75x) | 120 (0.60x) | 15.0 (0.75x) | 45.3 (0.98x) | 105.4 (0.59x) |") in text
    assert "| random | 42 | 20.0 | 20.0 | 40.0 | 10.0 | -20.0 | -20.0 | below the base in 1 seed(s) |" in text
    assert "| SMCA | 42, 43 | 30.0 / 25.0 | 27.5 (25.0 to 30.0) |" in text
    assert "| SMCA | 4.5 (4.0 / 5.0) | 8.5 (8.0 / 9.0) | 20.0 (20.0 / 20.0) | 27.5 (30.0 / 25.0) |" in text
    assert ("DETR long (seed 42, 600 steps; lr 0.0004 at every step): AP at most 31.0 (AP50 at most 62.0) in its 6 "
            "evaluation(s); 1.0 after 100,") in text
    # the long baseline passes SMCA's 4.0 / 8.0 / 20.0 / 30.0 after 200 / 300 / 400 / 600 of its steps
    assert ("Steps the DETR baseline needs to reach SMCA's AP after each of SMCA's epochs (seed 42; SMCA's epochs "
            "end at 100, 200, 300, 400 steps): 200 (2.0x) / 300 (1.5x) / 400 (1.3x) / 600 (1.5x).") in text
    assert "trained on test CPU" in text and os.path.exists(os.path.join(records, "claims.png"))

    shutil.rmtree(out)  # a fresh clone: the records alone
    monkeypatch.setattr(experiments, "claim_costs", lambda *a: pytest.fail("--table-only measured"))
    again = experiments.main(["claims", "--out", out, "--records", records, "--seeds", "2", "--table-only"])
    assert open(os.path.join(records, "claims.md")).read() == text.replace("--records " + records + " --seeds 2",
                                                                           "--records " + records + " --seeds 2 "
                                                                           "--table-only")
    assert [r["AP"] for r in again] == [r["AP"] for r in rows]

    claim, run = experiments.CLAIMS[1], experiments.CLAIMS[1].runs[1]
    os.remove(experiments.claim_record(records, claim, run, 43))
    unfinished = experiments.claim_dir(out, claim, run, 43)
    args = _claims_args()
    _claim_log(unfinished, experiments.claim_argv(args, claim, run, unfinished, 43), [0.1], epochs=2)
    rows = experiments.main(["claims", "--out", out, "--records", records, "--seeds", "2", "--table-only"])
    assert next(r for r in rows if r["label"] == "rho 0.1")["seeds"][43]["finished"] is False
    assert "| rho 0.1 | 42, 43 | 30.0 / 10.0 (unfinished: 100 steps) |" in open(os.path.join(records,
                                                                                          "claims.md")).read()
    trained = []

    def continue_run(argv):
        trained.append(argv)
        _claim_log(unfinished, argv, [0.1, 0.35])
    monkeypatch.setattr(train, "main", continue_run)
    rows = experiments.main(["claims", "--out", out, "--records", records, "--seeds", "2"])
    assert len(trained) == 1 and trained[0][trained[0].index("--output-dir") + 1] == unfinished
    assert "--seed" in trained[0] and trained[0][trained[0].index("--seed") + 1] == "43"
    assert os.path.exists(experiments.claim_record(records, claim, run, 43))  # kept as soon as it finished
    assert next(r for r in rows if r["label"] == "rho 0.1")["seeds"][43]["AP"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="holds another run .*time_budget None.*asked: time_budget 0.5"):
        experiments.main(["claims", "--out", out, "--records", records, "--seeds", "2", "--budget", "0.5"])


def test_experiments_lr_range_shows_a_drop(tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:
        for step, lr in enumerate([4e-5, 4e-4, 4e-5]):
            f.write(json.dumps({"type": "train", "step": step, "lr_base": lr}) + "\n")
        f.write(json.dumps({"type": "eval", "epoch": 0, "steps": 3, "AP": 0.0, "lr_base": 1.0}) + "\n")  # not a step
    assert experiments.lr_range(str(tmp_path)) == (4e-5, 4e-4)
    assert experiments.lr_range(str(tmp_path / "none")) is None
    long = {"label": "DETR long", "seeds": {42: {"steps": 3, "finished": True, "lr": (4e-5, 4e-4),
                                                 "epochs": [{"epoch": 0, "steps": 3, "AP": 0.0, "AP50": 0.01}]}}}
    assert experiments.long_base_lines(long, None) == ["DETR long (seed 42, 3 steps; lr from 0.0004 down to 4e-05): "
                                                       "AP at most 0.0 (AP50 at most 1.0) in its 1 evaluation(s); 0.0 "
                                                       "after 3 steps."]
    epochs = [{"epoch": e, "steps": 500 * (e + 1), "AP": 0.001 * (e % 3), "AP50": 0.002 * (e % 5)} for e in range(40)]
    long["seeds"][42].update(steps=20000, lr=(4e-4, 4e-4), epochs=epochs)
    smca = {"seeds": {42: {"epochs": [{"epoch": 0, "steps": 500, "AP": 0.019}, {"epoch": 1, "steps": 1000,
                                                                               "AP": 0.0015}]}}}
    line, blank, reach = experiments.long_base_lines(long, smca)
    assert blank == ""
    assert line.startswith("DETR long (seed 42, 20000 steps; lr 0.0004 at every step): AP at most 0.2 (AP50 at most "
                           "0.8) in its 40 evaluation(s); 0.0 after 2000, 0.1 after 4000, ")
    assert line.count(" after ") == 10 and line.endswith("0.0 after 20000 steps.")  # every 4th, back from the last
    assert reach.endswith("> 20000 (> 40.0x) / 1500 (1.5x).")  # SMCA's 0.15 after 1000: first passed after 1500


def test_experiments_log_stats_means_and_medians_over_windows_of_steps(tmp_path, capsys):
    with open(tmp_path / "log.jsonl", "w") as f:
        f.write(json.dumps({"type": "start", "args": {"model": "sparse_detr"}}) + "\n")
        for step in range(6):
            f.write(json.dumps({"type": "train", "step": step, "loss": 2.0 * step, "loss_ce": 1.0, "loss_ce_0": 9.0,
                                "grad_norm": [1, 2, 9, 4, 5, 6][step]}) + "\n")
        resumed = {"type": "train", "step": 2, "loss": 40.0, "loss_ce": 1.0, "grad_norm": 3}  # step 2 again
        f.write(json.dumps(resumed) + "\n")
        f.write(json.dumps({"type": "eval", "epoch": 0, "steps": 6, "AP": 0.5, "loss": 1e9}) + "\n")  # not a step
    run = str(tmp_path)
    table = experiments.main(["log-stats", run, "--steps", "0-5", "--every", "4"])
    first, second = table[(run, 0, 3)], table[(run, 4, 5)]  # the last window ends at --steps
    assert list(first) == ["steps logged", "loss", "loss_ce", "grad_norm"]  # no auxiliary terms, no corr logged
    assert first == {"steps logged": 4, "loss": (0 + 2 + 40 + 6) / 4, "loss_ce": 1.0, "grad_norm": (1 + 2 + 3 + 4) / 4}
    assert second["grad_norm"] == 5.5 and second["steps logged"] == 2
    assert "| 0-3 | 4 | 12 | 1 | 2.5 |" in capsys.readouterr().out
    median = experiments.main(["log-stats", run, "--steps", "1-3", "--median", "--terms", "grad_norm"])
    assert median == {(run, 1, 3): {"steps logged": 3, "grad_norm": 3}}

    (tmp_path / "empty").mkdir()
    with open(tmp_path / "empty" / "log.jsonl", "w") as f:
        f.write(json.dumps({"type": "start", "args": {"model": "smca"}}) + "\n")
    (tmp_path / "bad.jsonl.gz").write_text("not gzip")
    for argv, message in [([run, "--steps", "3-1"], "FIRST <= LAST"),
                          ([run, "--steps", "1-3", "--every", "0"], "--every 0"),
                          ([run, "--steps", "7-9"], "logged no step in 7-9 \\(its steps: 0-5\\)"),
                          ([run, "--steps", "0-5", "--terms", "corr"], "logs no corr; its terms: grad_norm, loss, "),
                          ([str(tmp_path / "empty"), "--steps", "0-1"], "no train records"),
                          ([str(tmp_path / "bad.jsonl.gz"), "--steps", "0-1"], "cannot be read as a train.py log"),
                          ([str(tmp_path / "nope.jsonl.gz"), "--steps", "0-1"], "does not exist")]:
        with pytest.raises(ValueError, match=message):
            experiments.main(["log-stats", *argv])


def test_experiments_log_evals_lists_each_evaluation_once_the_later_after_a_resume(tmp_path, capsys):
    metrics = {"AP": 0.25, "AP50": 0.5, "AP75": 0.125, "APs": 0.1, "APm": 0.3, "APl": 0.4}
    with gzip.open(tmp_path / "seed-42.jsonl.gz", "wt") as f:
        f.write(json.dumps({"type": "start", "args": {"model": "focus_detr"}}) + "\n")
        f.write(json.dumps({"type": "eval", "epoch": 0, "steps": 500, **metrics, "AP": 0.2}) + "\n")
        f.write(json.dumps({"type": "eval", "epoch": 0, "steps": 500, **metrics}) + "\n")  # evaluated again: kept
        f.write(json.dumps({"type": "eval", "epoch": 1, "iter": 3, "steps": 503, **metrics}) + "\n")  # mid-epoch
        f.write(json.dumps({"type": "train", "step": 999, "loss": 1.0}) + "\n")
        f.write(json.dumps({"type": "eval", "epoch": 1, "steps": 1000, **metrics, "APl": 0.5}) + "\n")
    run = str(tmp_path / "seed-42.jsonl.gz")
    table = experiments.main(["log-evals", run])
    assert table == {(run, 500): metrics, (run, 1000): {**metrics, "APl": 0.5}}
    assert f"| {run} | 1000 | 25.0 | 50.0 | 12.5 | 10.0 | 30.0 | 50.0 |" in capsys.readouterr().out
    assert experiments.main(["log-evals", run, "--metrics", "APl"]) == {(run, 500): {"APl": 0.4}, (run, 1000):
                                                                       {"APl": 0.5}}
    (tmp_path / "empty").mkdir()
    with open(tmp_path / "empty" / "log.jsonl", "w") as f:
        f.write(json.dumps({"type": "train", "step": 0, "loss": 1.0}) + "\n")
    for argv, message in [([run, "--metrics", "AR1"], "evaluation after step 500 has no AR1"),
                          ([str(tmp_path / "empty")], "no end-of-epoch evaluation records"),
                          ([str(tmp_path / "nope")], "does not exist")]:
        with pytest.raises(ValueError, match=message):
            experiments.main(["log-evals", *argv])


def test_experiments_order_verdict_compares_seed_by_seed_with_the_runs_the_paper_puts_above():
    def row(label, aps):
        return {"label": label, "seeds": {seed: {"AP": ap} for seed, ap in aps.items()}}
    dam = row("DAM", {42: 0.40, 43: 0.38, 44: None})  # seed 44 not evaluated yet
    objectness = row("objectness", {42: 0.41})
    assert experiments.order_verdict(row("random", {42: 0.35, 43: 0.30}), [dam, objectness]) == (
        "holds: -6.5 against DAM, below it in 2 of 2 seed(s); -6.0 against objectness, below it in 1 of 1 seed(s)")
    assert experiments.order_verdict(row("random", {42: 0.45, 43: 0.30}), [dam]).startswith(
        "within the spread: -1.5 against DAM, below it in 1 of 2")
    assert experiments.order_verdict(objectness, [dam]) == "does not hold: +1.0 against DAM, below it in 0 of 1 seed(s)"
    # below the one run in every seed, below the other in none: the order does not hold
    assert experiments.order_verdict(row("random", {42: 0.405}), [dam, objectness]).startswith("does not hold: +0.5")
    assert experiments.order_verdict(row("random", {42: 0.3}), [dam, row("objectness", {})]) == (
        "holds: -10.0 against DAM, below it in 1 of 1 seed(s); objectness not trained yet")
    assert experiments.order_verdict(row("random", {44: 0.3}), [dam]) is None  # no seed both have


def test_experiments_each_order_names_earlier_runs_of_its_claim():
    for claim in experiments.CLAIMS:
        for i, run in enumerate(claim.runs):
            assert set(run.below) <= {earlier.label for earlier in claim.runs[:i]}, (claim.paper, run.label)
    assert any(run.below for claim in experiments.CLAIMS for run in claim.runs)


def test_experiments_claims_seeds_a_count_or_a_list():
    assert experiments.parse_seeds("3", 42) == [42, 43, 44] and experiments.parse_seeds("7,1", 42) == [7, 1]
    assert experiments.parse_seeds("44,", 42) == [44]
    for bad in ("0", "x", "1,1", "44", ","):  # 44: a count above 20 is a seed meant as a list
        with pytest.raises(ValueError, match="--seeds"):
            experiments.parse_seeds(bad, 42)
    runs = [(c.model, r.label, s) for c, r, s in experiments.claim_runs([5, 6])]
    assert ("sparse_detr", "rho 0.3 (DAM scorer)", 5) in runs and ("sparse_detr", "rho 0.3 (DAM scorer)", 6) not in runs
    assert ("sparse_detr", "rho 0.1 (DAM scorer)", 6) in runs and runs[-1][2] == 5  # the long baseline last


def test_experiments_run_finished_reads_the_epochs_asked_for(tmp_path):
    """A run finished at its own epochs is unfinished for more (converge --baseline-epochs continues it)."""
    argv = ["--model", "sparse_detr", "--output-dir", str(tmp_path / "r")]
    _claim_log(str(tmp_path / "r"), argv, [0.1, 0.2])
    assert experiments.run_finished(str(tmp_path / "r")) and experiments.run_finished(str(tmp_path / "r"), 2)
    assert not experiments.run_finished(str(tmp_path / "r"), 3)


def test_experiments_claims_steps_end_a_run_and_name_its_folder(tmp_path, monkeypatch):
    """claims --steps N: every run gets train.py --max-steps N; a run whose last evaluation is at N steps is
    finished (even at an epoch's end); a folder of another --steps is refused."""
    argv = ["--model", "sparse_detr", "--output-dir", str(tmp_path / "r"), "--max-steps", "100"]
    _claim_log(str(tmp_path / "r"), argv, [0.1], epochs=2)  # 100 steps: the end of epoch 1 of 2
    assert experiments.run_finished(str(tmp_path / "r"))
    _claim_log(str(tmp_path / "s"), argv[:-1] + ["200"], [0.1], epochs=2)
    assert not experiments.run_finished(str(tmp_path / "s"))
    monkeypatch.setattr(experiments, "CLAIMS", _two_claims()[1:])
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"trained {argv}"))
    out = str(tmp_path / "claims")
    args = _claims_args(steps=300)
    for claim, run, seed in experiments.claim_runs([42]):
        run_dir = experiments.claim_dir(out, claim, run, seed)
        run_argv = experiments.claim_argv(args, claim, run, run_dir, seed)
        assert run_argv[run_argv.index("--max-steps") + 1] == "300" and run_dir.endswith("seed-42")
        _claim_log(run_dir, run_argv, [0.2], steps_per_epoch=300, epochs=2)
    with pytest.raises(ValueError, match="holds another run .*max_steps 300.*asked: max_steps 200"):
        experiments.main(["claims", "--out", out, "--steps", "200", "--seeds", "1"])
    with pytest.raises(ValueError, match="--steps must be a positive"):
        experiments.main(["claims", "--out", out, "--steps", "0"])


def test_experiments_claims_picture_places_each_run_by_encoder_cost_and_ap(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "CLAIMS", _two_claims())

    def row(paper, label, base, aps, ratio):
        return {"paper": paper, "label": label, "base": base, "long": False, "encoder_gmacs_ratio": ratio,
                "AP": None if not aps else sum(aps) / len(aps), "AP_min": min(aps, default=None),
                "AP_max": max(aps, default=None), "seeds": {i: {"AP": a} for i, a in enumerate(aps)}}
    rows = [row("Sparse DETR", "dense", True, [0.40], 1.0), row("Sparse DETR", "rho 0.1", False, [0.25, 0.35], 0.25),
            row("SMCA-DETR", "DETR", True, [], 1.0)]
    image = experiments.claims_picture(rows, str(tmp_path / "claims.png"))
    assert image.size == experiments.PLOT["size"] and os.path.exists(tmp_path / "claims.png")
    blue = experiments.PAPER_COLOURS["Sparse DETR"]
    px, py = experiments.plot_xy(0.25, 30.0, 50.0)  # y axis to 50: the largest AP (40) rounded up past half a tick
    assert image.getpixel((round(px), round(py))) == blue  # the efficient run's mean: a filled point
    for ap in (25.0, 35.0):  # each seed: a small point
        sx, sy = experiments.plot_xy(0.25, ap, 50.0)
        assert image.getpixel((round(sx), round(sy))) == blue
    bx, by = experiments.plot_xy(1.0, 40.0, 50.0)
    assert image.getpixel((round(bx), round(by))) == (255, 255, 255)  # the base: hollow ...
    assert image.getpixel((round(bx) + 4, round(by))) == blue  # ... in its paper's colour
    mx, my = experiments.plot_xy(0.625, 35.0, 50.0)  # halfway along the line joining the means
    assert image.getpixel((round(mx), round(my))) == blue


def test_experiments_claims_picture_labels_overlap_no_marker_line_or_label():
    def rect(xy, size):
        return (xy[0], xy[1], xy[0] + size[0], xy[1] + size[1])

    def hits(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    box, size = (0, 0, 200, 100), (40, 10)
    first, second = experiments.place_labels([(50, 50), (50, 50)], [size, size], box)  # two runs at one point
    assert first == (58, 45)  # right of the marker (radius 5, gap 3), centred on it
    assert not hits(rect(first, size), rect(second, size)) and not hits(rect(second, size), (45, 45, 55, 55))
    (x, y), = experiments.place_labels([(190, 50)], [size], box)  # no room on the right: left of the marker
    assert (x, y) == (190 - 8 - 40, 45)
    line = ((60, 40), (80, 60))  # a line through the right-hand place
    (x, y), = experiments.place_labels([(50, 50)], [size], box, [line])
    assert not any(hits(rect((x, y), size), (px, py, px, py)) for px, py in [(60 + i, 40 + i) for i in range(21)])
    assert x + size[0] <= 50 - 8  # it moved to the left, the first place free of the line
    (x, y), = experiments.place_labels([(5, 5)], [(500, 500)], box)  # nowhere fits: the first place
    assert (x, y) == (13, 5 - 250)
    # the claims picture's fan: three runs at one x, each joined to a base far right, a fourth marker to the right
    points = [(20, 40), (20, 55), (20, 70), (65, 55), (190, 20)]
    fan = [((190, 20), point) for point in points[:4]]
    corners = experiments.place_labels(points, [size] * 5, box, fan)
    rects = [rect(xy, s) for xy, s in zip(corners, [size] * 5)]
    for i, r in enumerate(rects):  # no label covers a marker or another label
        assert not any(hits(r, (px - 5, py - 5, px + 5, py + 5)) for px, py in points)
        assert not any(hits(r, other) for other in rects[:i] + rects[i + 1:])
    crossed = [sum(hits(r, point) for point in experiments.line_points(fan)) for r in rects]
    assert crossed == [0] * 5  # each found a place clear of the lines: the middle one two lines down on the right
    assert corners[1] == (28, 70)
    # lines everywhere: no place is clear of them, so the one crossing fewest that covers no marker (not the first
    # place, which covers the marker to the right)
    grid = [((0, y), (200, y)) for y in range(0, 101, 5)]
    (x, y), _ = experiments.place_labels([(50, 50), (65, 50)], [size, (4, 4)], box, grid)
    assert not hits(rect((x, y), size), (60, 45, 70, 55)) and (x, y) != (58, 45)


def test_experiments_parallel_runs_get_the_shapes_set_and_its_backbones_made_once_before(monkeypatch):
    """Runs started at once would each make the shapes set and pretrain the same backbone: both are made first,
    once, for the backbone depths the runs on the shapes set load from the set's pretraining."""
    made = []
    monkeypatch.setattr(experiments.shapes, "ensure", lambda root: made.append(("set", root)))
    monkeypatch.setattr(experiments.pretrain, "ensure", lambda root, depth: made.append(("resnet", depth)))
    experiments.prepare_shared_files([["--model", "lite_detr"], ["--model", "smca", "--seed", "3"],
                                      ["--model", "sparse_detr", "--set", "backbone_depth=50"]])
    assert made == [("set", experiments.SHAPES_ROOT), ("resnet", 18), ("resnet", 50)]
    made.clear()
    experiments.prepare_shared_files([["--model", "smca", "--data", "/my/coco"],
                                      ["--model", "smca", "--backbone-weights", "none"],
                                      ["--model", "smca", "--no-such-flag"], ["--model", "smca", "--set", "depth=1"]])
    assert made == []  # another set; no pretrained backbone; a wrong flag or --set is for its own run to report


def test_experiments_train_runs_in_parallel_processes_and_reports_failures(tmp_path, monkeypatch):
    """--jobs N: each run its own `python train.py ARGV` process in the checkout, logging to OUTPUT_DIR/train.out,
    with its share of the cores as threads; every run is tried, the failed ones named once all have ended."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "train.py").write_text("import os, sys, time\ntime.sleep(0.2)\nprint('ran', sys.argv[1:])\n"
                                       "print('threads', os.environ['OMP_NUM_THREADS'])\n"
                                       "sys.exit(1 if 'fail' in sys.argv else 0)\n")
    argvs = [["--output-dir", str(tmp_path / f"run{i}")] + (["fail"] if i == 1 else []) for i in range(3)]
    with pytest.raises(ValueError, match=r"these runs failed: .*run1 \(exit 1"):
        experiments.train_runs(argvs, 2, str(tmp_path))
    for i in range(3):
        out = (tmp_path / f"run{i}" / "train.out").read_text()
        assert "ran ['--output-dir'" in out
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert f"threads {max(1, cores // 2)}" in out  # each process its share of the cores
