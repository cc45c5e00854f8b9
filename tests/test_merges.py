"""The merge bookkeeping behind the kept-token pictures (`cspexp.pruning.merges`) and how a picture
draws it: hand-worked compositions, and pixels read back from a rendered PNG."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from cspexp.pruning.merges import present_merges, record_merges, record_sample_merges
from cspexp.report.pictures import MERGE_COLOURS, render_sample, stage_overlay, stages


class FakeState:
    def __init__(self):
        self.extras = {}


def test_merges_are_recorded_per_sample_and_compose():
    state = FakeState()
    # sample 0: cells 2, 3 → target 1; cell 6 → target 5. sample 1: cell 0 → target 7 (assign indexes targets)
    record_merges(state, torch.tensor([[1, 5], [7, 4]]), torch.tensor([[2, 3, 6], [0, 0, 0]]),
                  torch.tensor([[0, 0, 1], [0, 0, 0]]))
    assert state.extras["merges"] == [{1: [2, 3], 5: [6]}, {7: [0]}]
    # a later merge of target 1 (holding 2, 3) into 5: 5 now stands for 1, 2, 3 and 6; 1 is no target
    record_merges(state, torch.tensor([[5], [9]]), torch.tensor([[1], [8]]), torch.tensor([[0], [0]]))
    assert state.extras["merges"] == [{5: [1, 2, 3, 6]}, {7: [0], 9: [8]}]
    # only targets still present are reported
    assert present_merges(state, 1, [9, 10]) == {9: [8]}
    assert present_merges(FakeState(), 0, [1, 2]) == {}


def test_a_cell_merged_into_itself_is_no_member():
    sample: dict[int, list[int]] = {}
    record_sample_merges(sample, {(4, 4), (4, 2)})  # sparsevlm: a cluster's centre is one of its members
    assert sample == {4: [2]}


def test_stages_split_where_the_merges_change():
    cells = [[0, 1], [0, 1], [0, 1]]
    assert stages(cells) == [(0, 2, [0, 1])]
    assert stages(cells, [{}, {1: [2]}, {1: [2]}]) == [(0, 0, [0, 1]), (1, 2, [0, 1])]


def test_a_panel_tints_merged_cells_and_darkens_dropped_ones():
    """A 2×2 grid: cell 0 kept and holding cell 1, cell 2 kept alone, cell 3 dropped."""
    shade, outlines = stage_overlay(4, [0, 2], {0: [1]})
    assert shade[0].tolist() == [0, 0, 0, 0] and shade[2].tolist() == [0, 0, 0, 0]  # kept: clear
    assert shade[3].tolist() == [0, 0, 0, 0.72]  # dropped: darkened
    colour = MERGE_COLOURS(0)
    assert shade[1].tolist() == [*colour[:3], 0.55] and max(colour[:3]) - min(colour[:3]) > 0.2  # tinted
    assert outlines == [(0, colour)]
    # two merged tokens get two colours
    _, two = stage_overlay(4, [0, 2], {0: [1], 2: [3]})
    assert two[0][1] != two[1][1]


def test_a_picture_with_merges_is_drawn(tmp_path):
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    item = {"image": image, "mask": np.zeros((64, 64), dtype=np.uint8), "idx": 0, "query": "q"}
    png = render_sample(item, torch.zeros(64, 64, dtype=torch.bool), [[0, 2], [0]], (2, 2), "m", [{0: [1]}, {}])
    assert Image.open(io.BytesIO(png)).size[0] > Image.open(io.BytesIO(png)).size[1]  # three panels side by side
