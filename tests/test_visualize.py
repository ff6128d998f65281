"""Tests of engine/visualize.py: the token cells and level maps the pictures are drawn from.
"""

import torch

from engine import visualize


def test_visualize_token_cells_and_level_maps_follow_the_flattening():
    """Token t of the flattened levels (finest first) is cell (row, col) of its level, a square of
    stride 8 * 2^l pixels; level_maps undoes the flattening."""
    shapes = [(4, 6), (2, 3), (1, 2)]
    assert visualize.token_cells([0, 7, 24, 25, 29, 30], shapes) == [
        (0, (0, 0, 7, 7)), (0, (8, 8, 15, 15)), (1, (0, 0, 15, 15)), (1, (16, 0, 31, 15)), (1, (32, 16, 47, 31)),
        (2, (0, 0, 31, 31))]
    maps = visualize.level_maps(torch.arange(32.0), shapes)
    assert [tuple(m.shape) for m in maps] == shapes and maps[1][1, 2] == 24 + 5 and maps[2][0, 1] == 31
