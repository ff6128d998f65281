"""tools/tour.py: a new output folder each time (engine.runtime.first_free), the trained APs read from a claims
table, the cost of a pair."""
import json
import os

import pytest
import torch

import sparse_detr
from engine.runtime import first_free
from tools import tour


def test_first_free_never_reuses_a_folder(tmp_path):
    first = first_free(str(tmp_path / "tour"))
    os.makedirs(first)
    (tmp_path / "tour" / "shapes.png").write_bytes(b"kept")
    second = first_free(str(tmp_path / "tour"))
    os.makedirs(second)
    third = first_free(str(tmp_path / "tour"))
    assert [os.path.basename(p) for p in (first, second, third)] == ["tour", "tour2", "tour3"]
    assert (tmp_path / "tour" / "shapes.png").read_bytes() == b"kept"


def test_trained_aps_mean_finished_seeds_only(tmp_path):
    rows = [{"paper": "P", "label": "base", "long": False,
             "seeds": {"1": {"finished": True, "AP": 0.2}, "2": {"finished": True, "AP": 0.4},
                       "3": {"finished": False, "AP": 0.9}}},
            {"paper": "P", "label": "long", "long": True, "seeds": {"1": {"finished": True, "AP": 0.5}}},
            {"paper": "P", "label": "untrained", "long": False, "seeds": {"1": {"finished": False, "AP": None}}}]
    path = tmp_path / "claims.json"
    path.write_text(json.dumps(rows))
    aps = tour.trained_aps(str(path))
    assert set(aps) == {("P", "base")}
    assert abs(aps[("P", "base")][0] - 30.0) < 1e-9 and aps[("P", "base")][1] == 2
    assert tour.trained_aps(str(tmp_path / "missing.json")) == {}


def test_sparse_encoder_costs_less_than_its_dense_base():
    torch.manual_seed(0)
    image = torch.randn(3, 64, 96)
    base = tour.cost(sparse_detr, ["sparse_encoder=false", "use_enc_aux_loss=false"], image, repeats=1)
    sparse = tour.cost(sparse_detr, ["rho=0.1"], image, repeats=1)
    assert all(v > 0 for v in base + sparse)
    # rho 0.1 updates a tenth of the tokens (plus one per image): well under half of the dense encoder's work
    assert sparse[0] < 0.5 * base[0]


def test_tour_refuses_a_thread_count_below_one():
    with pytest.raises(ValueError, match="--threads must be at least 1, got 0"):
        tour.main(["--threads", "0"])
