"""LISA's gIoU / cIoU on hand-worked cases, and cIoU against torchmetrics' BinaryJaccardIndex."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex

from cspexp.metrics import SegIoU, intersection_and_union


def t(rows):
    return torch.tensor(rows, dtype=torch.uint8)


def test_hand_worked_two_samples():
    # Sample A: pred covers 3 pixels, target 2 of them + 1 more → I=2, U=4, IoU=0.5
    pred_a = t([[1, 1, 1, 0]]).bool()
    gt_a = t([[1, 1, 0, 1]])
    # Sample B: perfect 1-pixel hit → I=1, U=1, IoU≈1
    pred_b = t([[0, 1], [0, 0]]).bool()
    gt_b = t([[0, 1], [0, 0]])
    assert intersection_and_union(pred_a, gt_a) == (2, 4)
    m = SegIoU()
    m.update([pred_a, pred_b], [gt_a, gt_b])
    out = m.compute()
    assert out["giou"].item() == pytest.approx((2 / (4 + 1e-5) + 1 / (1 + 1e-5)) / 2, abs=1e-7)
    assert out["ciou"].item() == pytest.approx(3 / 5, abs=1e-7)


def test_ignore_label_removes_pixels_from_both_terms():
    pred = t([[1, 1, 1, 1]]).bool()
    gt = t([[1, 255, 255, 0]])
    # valid pixels: 0 (pred 1, gt 1) and 3 (pred 1, gt 0) → I=1, U=2
    assert intersection_and_union(pred, gt) == (1, 2)


def test_empty_union_counts_as_one():
    m = SegIoU()
    m.update([torch.zeros(3, 3, dtype=torch.bool)], [torch.zeros(3, 3, dtype=torch.uint8)])
    assert m.compute()["giou"].item() == 1.0
    m.update([torch.ones(3, 3, dtype=torch.bool)], [torch.zeros(3, 3, dtype=torch.uint8)])
    # second sample: I=0, U=9 → IoU 0; gIoU = (1 + 0) / 2; cIoU = 0 / 9
    out = m.compute()
    assert out["giou"].item() == pytest.approx(0.5)
    assert out["ciou"].item() == 0.0


def test_ciou_equals_binary_jaccard_over_all_pixels():
    g = torch.Generator().manual_seed(0)
    preds = [torch.rand(8, 9, generator=g) > 0.5 for _ in range(5)]
    gts = [(torch.rand(8, 9, generator=g) > 0.6).to(torch.uint8) for _ in range(5)]
    m = SegIoU()
    m.update(preds, gts)
    oracle = BinaryJaccardIndex()
    for p, y in zip(preds, gts):
        oracle.update(p.long(), y.long())
    assert m.compute()["ciou"].item() == pytest.approx(oracle.compute().item(), abs=1e-6)


def test_states_are_sums_so_merging_is_exact():
    g = torch.Generator().manual_seed(1)
    preds = [torch.rand(6, 6, generator=g) > 0.5 for _ in range(7)]
    gts = [(torch.rand(6, 6, generator=g) > 0.5).to(torch.uint8) for _ in range(7)]
    whole, a, b = SegIoU(), SegIoU(), SegIoU()
    whole.update(preds, gts)
    a.update(preds[:3], gts[:3])
    b.update(preds[3:], gts[3:])
    a.merge_state(b)
    for k in ("giou", "ciou"):
        assert a.compute()[k].item() == pytest.approx(whole.compute()[k].item(), abs=1e-9)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_and_union(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.uint8))
