"""Tests of tools/compare_outputs.py: what it collects from an output and what it reports of two records."""
import torch

from tools import compare_outputs


def test_compare_outputs_collects_every_tensor_and_count_by_path():
    out = {"pred_logits": torch.ones(1, 2), "aux_outputs": [{"pred_boxes": torch.zeros(1, 2, 4)}],
           "level_shapes": [(2, 3), (1, 2)], "token_nums": [3, 1], "corr": 0.5, "name": "skipped"}
    got = compare_outputs.tensors(out)
    assert set(got) == {"/pred_logits", "/aux_outputs/0/pred_boxes", "/level_shapes", "/token_nums", "/corr"}
    assert got["/level_shapes"].tolist() == [[2, 3], [1, 2]] and got["/corr"].item() == 0.5


def test_compare_outputs_reports_the_largest_difference_and_what_one_side_lacks():
    old = {"smca/train": {"/loss": torch.tensor(1.0), "/boxes": torch.zeros(2, 4)}, "lite/eval": {"/x": torch.ones(3)}}
    new = {"smca/train": {"/loss": torch.tensor(1.0), "/boxes": torch.full((2, 4), 1e-3), "/extra": torch.ones(1)},
           "lite/eval": {"/x": torch.ones(4)}}
    lines = compare_outputs.compare(new, old)
    assert lines[0] == "lite/eval: 1 tensors, max |difference| inf"  # another shape
    assert lines[1] == "smca/train: 2 tensors, max |difference| 0.001; on one side only: ['/extra']"
    assert lines[-1] == "largest difference over all cases: inf"
    assert compare_outputs.compare(old, old)[-1] == "largest difference over all cases: 0"
