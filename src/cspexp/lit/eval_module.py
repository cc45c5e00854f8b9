"""Lightning evaluation: one `test_step` = one pruned segmentation pass over a batch."""

from __future__ import annotations

import lightning as L

from cspexp.metrics.seg_iou import SegIoU, intersection_and_union, sample_iou
from cspexp.models.factory import LoadedModel
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.pipeline import segment
from cspexp.utils.timing import Stopwatch, peak_memory_mb, reset_peak_memory


class EvalModule(L.LightningModule):
    """Runs `segment` with a pruning method, accumulates LISA's metrics and keeps one record per sample.

    The records (keyed by the dataset's ``idx``) are the ground truth of the run: `results.json`'s
    metrics can be recomputed from them, and under multi-process evaluation they are merged by idx.
    """

    def __init__(self, loaded: LoadedModel, method: PruningMethod, metric: SegIoU | None = None,
                 warmup: int = 1) -> None:
        super().__init__()
        self.model = loaded.model
        self.method = method
        self.metric = metric if metric is not None else SegIoU()
        self.warmup = warmup
        self.records: list[dict] = []
        self.peak_memory_mb: float | None = None

    def on_test_epoch_start(self) -> None:
        # Fresh states every epoch: under ddp_spawn on CPU the pickled states are shared otherwise
        # (research/framework.md, pitfall L4).
        self.metric.reset()
        self.records = []
        self._warm = False
        reset_peak_memory(self.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if not self._warm:
            # Untimed passes first: the first call pays for allocator growth, kernel selection, lazy init.
            for _ in range(self.warmup):
                segment(self.model, batch, self.method)
            self._warm = True
        watch = Stopwatch(self.device)
        with watch.section("end_to_end"):
            out = segment(self.model, batch, self.method, stopwatch=watch)
        ms = watch.collect()
        per_sample = {k: v / len(out.masks) for k, v in ms.items()}  # a batch's time, shared by its samples
        counts = [intersection_and_union(p, g.to(p.device), self.metric.ignore_index)
                  for p, g in zip(out.masks, batch["gt_masks"], strict=True)]
        self.metric.update_counts(counts)  # the same numbers the per-sample records keep
        trace = out.trace
        for i, (inter, union) in enumerate(counts):
            self.records.append(
                {
                    "idx": int(batch["idx"][i]),
                    "query_kind": batch["query_kinds"][i],
                    "intersection": inter,
                    "union": union,
                    "iou": sample_iou(inter, union),
                    "image_per_layer": trace.image_per_layer[i].tolist(),
                    "tokens_per_layer": trace.tokens_per_layer[i].tolist(),
                    "overhead_events": trace.sample_overhead(i),
                    "latency_ms": {"llm_prefill": per_sample["llm_prefill"], "end_to_end": per_sample["end_to_end"]},
                }
            )

    def on_test_epoch_end(self) -> None:
        values = self.metric.compute()
        self.log_dict({f"test/{k}": v for k, v in values.items()}, batch_size=1)
        self.peak_memory_mb = peak_memory_mb(self.device)
