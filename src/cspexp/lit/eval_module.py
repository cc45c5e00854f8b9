"""Lightning evaluation: one `test_step` = one pruned segmentation pass over a batch."""

from __future__ import annotations

import lightning as L

from cspexp.metrics.seg_iou import SegIoU, intersection_and_union, sample_iou
from cspexp.models.factory import LoadedModel
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.pipeline import segment


class EvalModule(L.LightningModule):
    """Runs `segment` with a pruning method, accumulates LISA's metrics and keeps one record per sample.

    The records (keyed by the dataset's ``idx``) are the ground truth of the run: `results.json`'s
    metrics can be recomputed from them, and under multi-process evaluation they are merged by idx.
    """

    def __init__(self, loaded: LoadedModel, method: PruningMethod, metric: SegIoU | None = None) -> None:
        super().__init__()
        self.model = loaded.model
        self.method = method
        self.metric = metric if metric is not None else SegIoU()
        self.records: list[dict] = []

    def on_test_epoch_start(self) -> None:
        # Fresh states every epoch: under ddp_spawn on CPU the pickled states are shared otherwise
        # (research/framework.md, pitfall L4).
        self.metric.reset()
        self.records = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = segment(self.model, batch, self.method)
        self.metric.update(out.masks, batch["gt_masks"])
        trace = out.trace
        for i, (pred, gt) in enumerate(zip(out.masks, batch["gt_masks"], strict=True)):
            inter, union = intersection_and_union(pred, gt.to(pred.device))
            self.records.append(
                {
                    "idx": int(batch["idx"][i]),
                    "query_kind": batch["query_kinds"][i],
                    "intersection": inter,
                    "union": union,
                    "iou": sample_iou(inter, union),
                    "image_per_layer": trace.image_per_layer[i].tolist(),
                    "tokens_per_layer": trace.tokens_per_layer[i].tolist(),
                    "flops_llm": None,
                    "flops_image": None,
                }
            )

    def on_test_epoch_end(self) -> None:
        values = self.metric.compute()
        self.log_dict({f"test/{k}": v for k, v in values.items()}, batch_size=1)
