"""Lightning evaluation: one `test_step` = one pruned segmentation pass over a batch.

Under multi-process evaluation (``trainer=ddp``) each rank runs the loop on its own slice of the
samples; `EvalModule.collect` then brings the ranks together once, after the loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import lightning as L
import torch

from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.lit.distributed import gather_to_rank_zero
from cspexp.metrics.seg_iou import SegIoU, intersection_and_union, sample_iou
from cspexp.models.base import LoadedModel
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.pipeline import segment
from cspexp.utils.timing import Stopwatch, peak_memory_mb, reset_peak_memory


@dataclass
class EvalOutcome:
    """One evaluation over all processes, assembled on rank 0."""

    records: list[dict]  # one per sample, sorted by idx
    metrics: dict[str, float]  # gIoU and cIoU over all samples
    samples_per_rank: list[int]
    memory_mb_per_rank: list[float | None]  # each process's peak (its GPU, or its RSS on CPU)

    @property
    def memory_mb(self) -> float | None:
        """The largest per-process peak: what one device must hold."""
        peaks = [m for m in self.memory_mb_per_rank if m is not None]
        return max(peaks) if peaks else None


class EvalModule(L.LightningModule):
    """Runs `segment` with a pruning method, accumulates LISA's metrics and keeps one record per sample.

    The records (keyed by the dataset's ``idx``, the rows of samples.jsonl) are complete when they
    are made — counts, token trace, the sample's FLOPs, latency — and never changed afterwards;
    under multi-process evaluation they are merged by idx (`collect`).
    """

    def __init__(self, loaded: LoadedModel, method: PruningMethod, metric: SegIoU | None = None,
                 warmup: int = 1) -> None:
        super().__init__()
        self.model = loaded.model
        self.dims = LlmDims.from_config(loaded.model.llm.config)
        self.method = method
        self.metric = metric if metric is not None else SegIoU()
        self.warmup = warmup
        self.records: list[dict] = []
        self.peak_memory_mb: float | None = None

    def on_test_epoch_start(self) -> None:
        # Fresh states every epoch: under ddp_spawn on CPU the pickled states are shared otherwise
        # (docs/pitfalls.md, "Lightning: metric states shared under ddp_spawn").
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
            image_per_layer, tokens_per_layer = trace.image_per_layer[i].tolist(), trace.tokens_per_layer[i].tolist()
            overhead = trace.sample_overhead(i)
            flops = sample_flops(tokens_per_layer, image_per_layer, self.model.n_image_tokens, self.dims, overhead)
            self.records.append(
                {
                    "idx": int(batch["idx"][i]),
                    "query_kind": batch["query_kinds"][i],
                    "intersection": inter,
                    "union": union,
                    "iou": sample_iou(inter, union),
                    "image_per_layer": image_per_layer,
                    "tokens_per_layer": tokens_per_layer,
                    "overhead_events": overhead,
                    "latency_ms": {"llm_prefill": per_sample["llm_prefill"], "end_to_end": per_sample["end_to_end"]},
                    **{f"flops_{k}": v for k, v in flops.items()},  # llm, llm_dense, image, image_dense, overhead
                }
            )

    def on_test_epoch_end(self) -> None:
        # No metric sync here: a collective inside the loop hangs if one rank's loop is cut short.
        self.peak_memory_mb = peak_memory_mb(self.device)

    def collect(self, device: torch.device) -> EvalOutcome | None:
        """Call on every rank after ``trainer.test``: the metric reduced over all ranks and, on rank 0,
        the records of all ranks merged by idx. None on the other ranks.

        Lightning has moved the module back to the CPU by now; the metric's states go to the rank's
        `device` first, because NCCL reduces CUDA tensors only."""
        # torchmetrics syncs inside compute(): the states are summed over ranks (dist_reduce_fx="sum"),
        # which is exact because no sample is evaluated twice.
        metrics = {k: float(v) for k, v in self.metric.to(device).compute().items()}
        parts = gather_to_rank_zero({"records": self.records, "memory_mb": self.peak_memory_mb})
        if parts is None:
            return None
        records = sorted((r for part in parts for r in part["records"]), key=lambda r: r["idx"])
        repeated = sorted(i for i, n in Counter(r["idx"] for r in records).items() if n > 1)
        if repeated:
            raise RuntimeError(f"samples evaluated more than once across processes (idx {repeated[:10]}): "
                               "the metrics would be biased; the test loader's sampler must not repeat samples")
        return EvalOutcome(
            records=records,
            metrics=metrics,
            samples_per_rank=[len(part["records"]) for part in parts],
            memory_mb_per_rank=[part["memory_mb"] for part in parts],
        )
