"""gIoU and cIoU exactly as LISA computes them (``train_ds.py::validate``, ``utils.intersectionAndUnionGPU``).

Per sample (one query, one target mask): pixels labelled 255 in the ground truth are ignored;
intersection I and union U of the foreground class; per-sample IoU = I / (U + 1e-5), and a sample
whose union is empty (no target, nothing predicted) scores 1.
- gIoU = mean of the per-sample IoUs;
- cIoU = ΣI / (ΣU + 1e-10).
Not torchmetrics' box-regression `GeneralizedIntersectionOverUnion`, which shares the acronym.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

IGNORE = 255
EPS_SAMPLE = 1e-5  # LISA: acc_iou = intersection / (union + 1e-5)
EPS_TOTAL = 1e-10  # LISA: ciou = ΣI / (ΣU + 1e-10)


def intersection_and_union(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> tuple[int, int]:
    """Foreground intersection and union of a binary prediction and a {0, 1, 255} target (same shape)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    p = pred.bool() & valid
    t = (target == 1) & valid
    return int((p & t).sum()), int((p | t).sum())


def sample_iou(intersection: float, union: float) -> float:
    """LISA's per-sample IoU, including the empty-union rule."""
    return 1.0 if union == 0 else intersection / (union + EPS_SAMPLE)


class SegIoU(Metric):
    """Accumulates LISA's gIoU and cIoU. All states are sums, so multi-process reduction is exact."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ignore_index: int = IGNORE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("intersection", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[torch.Tensor] | torch.Tensor | None = None,
               targets: list[torch.Tensor] | torch.Tensor | None = None, *,
               counts: list[tuple[int, int]] | None = None) -> None:
        """`preds`: binary masks; `targets`: {0, 1, 255} masks; one pair per sample (lists or stacked).
        Or `counts`: per-sample (intersection, union) pairs the caller already computed."""
        if counts is None:
            if preds is None or targets is None:
                raise ValueError("SegIoU.update needs preds and targets, or counts")
            counts = [intersection_and_union(p, t.to(p.device), self.ignore_index) for p, t in zip(preds, targets, strict=True)]
        for inter, union in counts:
            self.intersection += inter
            self.union += union
            self.iou_sum += sample_iou(inter, union)
            self.n += 1

    def update_counts(self, counts: list[tuple[int, int]]) -> None:
        """Accumulate per-sample (intersection, union) pairs already computed by the caller (through
        `update`, so torchmetrics' bookkeeping — update count, cached result — stays right)."""
        self.update(counts=counts)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp(min=1)
        return {
            "giou": (self.iou_sum / n).float(),
            "ciou": (self.intersection / (self.union + EPS_TOTAL)).float(),
        }
