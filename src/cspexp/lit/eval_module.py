"""Lightning evaluation: one `test_step` = one pruned segmentation pass over a batch.

Under multi-process evaluation (``trainer=ddp``) each rank runs the loop on its own slice of the
samples; `EvalModule.collect` then brings the ranks together once, after the loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import lightning as L
import torch

from cspexp.features.cache import CacheStats, FeatureCache
from cspexp.features.vision import encode_vision
from cspexp.flops.analytic import LlmDims, decode_flops, sample_flops
from cspexp.flops.vision import lisa_vision_flops
from cspexp.lit.distributed import gather_to_rank_zero
from cspexp.metrics.seg_iou import SegIoU, intersection_and_union, sample_iou
from cspexp.models.base import LoadedModel
from cspexp.pruning.generate import generate
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
    cache: dict | None = None  # the feature cache's counts summed over processes (`CacheStats.as_dict`)
    vision_passes: int = 0  # samples whose vision stage was computed, warm-up passes included

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

    With a `FeatureCache` the vision stage of a batch is taken from it when it holds the batch, and
    computed and stored otherwise. Latency then reports each stage where it actually ran: a sample's
    ``vision`` time is the one measured when its features were computed (possibly by an earlier job),
    and ``end_to_end`` is the sum of ``vision``, ``llm_prefill`` and ``mask_decoder``. Without a
    cache ``end_to_end`` is measured around the whole pass.

    ``max_new_tokens`` set: ``evaluate.mode=generate`` — each batch (generation prompts) goes through
    `cspexp.pruning.generate.generate` instead of `segment`, the first generated [SEG]'s mask is
    scored (an empty mask when none was generated), latency gains ``decode`` (between the prefill
    and the mask decoder) and the records the generated ids and text, the [SEG] count, the KV-cache
    sizes and the decode FLOPs.
    """

    def __init__(self, loaded: LoadedModel, method: PruningMethod, metric: SegIoU | None = None,
                 warmup: int = 1, features: FeatureCache | None = None, max_new_tokens: int | None = None) -> None:
        super().__init__()
        self.model = loaded.model
        self.dims = LlmDims.from_config(loaded.model.llm.config)
        self.method = method
        self.metric = metric if metric is not None else SegIoU()
        self.warmup = warmup
        self.records: list[dict] = []
        self.peak_memory_mb: float | None = None
        self.features = features
        self.processor = loaded.processor  # pixels for a batch collated without them (pixels=False)
        self.vision_passes = 0
        self.max_new_tokens = max_new_tokens  # None: teacher-forced (segment); an int: generation
        self.stages = ("vision", "llm_prefill", "mask_decoder") if max_new_tokens is None else \
            ("vision", "llm_prefill", "decode", "mask_decoder")
        # CLIP and the projector per image, under this method and dense: the same for every sample
        self.vision_flops = lisa_vision_flops(loaded.model, method)

    def on_test_epoch_start(self) -> None:
        # Fresh states every epoch: under ddp_spawn on CPU the pickled states are shared otherwise
        # (docs/pitfalls.md, "Lightning: metric states shared under ddp_spawn").
        self.metric.reset()
        self.records = []
        self._warm = False
        self.vision_passes = 0
        if self.features is not None:
            self.features.stats = CacheStats()
        reset_peak_memory(self.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if not self._warm:
            # Untimed passes first: the first call pays for allocator growth, kernel selection, lazy init.
            cached = self.features.lookup(batch, count=False, method=self.method) if self.features is not None else None
            for _ in range(self.warmup):
                if cached is None:
                    batch = self.processor.add_pixels(batch)
                self._pass(batch, features=None if cached is None else cached.features)
                self.vision_passes += 0 if cached is not None else len(batch["idx"])
            self._warm = True
        out, masks, latency, source = self._timed_pass(batch)
        self.vision_passes += len(masks) if source == "computed" else 0
        counts = [intersection_and_union(p, g.to(p.device), self.metric.ignore_index)
                  for p, g in zip(masks, batch["gt_masks"], strict=True)]
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
                    "latency_ms": latency[i],
                    "features": source,  # where the vision stage came from: computed, memory or disk
                    **{f"flops_{k}": v for k, v in flops.items()},  # llm, llm_dense, image, image_dense, overhead
                    **{f"flops_{k}": v for k, v in self.vision_flops.items()},  # vision, vision_dense
                    **(self._generated(out.samples[i], tokens_per_layer) if self.max_new_tokens is not None else {}),
                }
            )

    def _pass(self, batch: dict, stopwatch=None, features=None):
        """One pass of the mode: (its output, the predicted mask [H, W] of each sample)."""
        if self.max_new_tokens is None:
            out = segment(self.model, batch, self.method, stopwatch=stopwatch, features=features)
            return out, out.masks
        tokenizer = self.processor.tokenizer
        out = generate(self.model, batch, self.method, max_new_tokens=self.max_new_tokens,
                       eos_token_id=tokenizer.eos_token_id, stopwatch=stopwatch, features=features, tokenizer=tokenizer)
        return out, [s.mask for s in out.samples]  # the first [SEG]'s mask; an empty one without [SEG]

    def _generated(self, sample, tokens_per_layer: list[int]) -> dict:
        """A generated sample's own fields of its record (docs/outputs.md, "samples.jsonl")."""
        vocab = self.model.llm.config.vocab_size
        dense_prompt = [c - sample.fed_tokens for c in sample.cached_tokens_dense]
        return {
            "generated_ids": sample.ids,
            "generated_text": sample.text,
            "n_seg": sample.n_seg,
            "finished": sample.finished,
            "decode_tokens": sample.decode_tokens,
            "kv_cache_mb": sample.kv_cache_mb,
            "kv_cache_dense_mb": sample.kv_cache_dense_mb,
            "flops_decode": decode_flops(tokens_per_layer, sample.fed_tokens, self.dims, vocab),
            "flops_decode_dense": decode_flops(dense_prompt, sample.fed_tokens, self.dims, vocab),
        }

    def _timed_pass(self, batch: dict):
        """One timed pass; returns (output, predicted masks, per-sample latency dicts, where the
        features came from)."""
        B = len(batch["idx"])
        watch = Stopwatch(self.device)
        if self.features is None:
            batch = self.processor.add_pixels(batch)
            with watch.section("end_to_end"):
                out, masks = self._pass(batch, stopwatch=watch)
            ms = {k: v / B for k, v in watch.collect().items()}  # a batch's time, shared by its samples
            stages = {k: ms[k] for k in (*self.stages, "end_to_end")}
            return out, masks, [dict(stages) for _ in range(B)], "computed"
        cached = self.features.lookup(batch, method=self.method)
        if cached is None:
            batch = self.processor.add_pixels(batch)  # preprocessing stays outside the timed stages, as without a cache
            with watch.section("vision"):
                # [CLS] attention and CLIP keys always: the entry then serves every method of the sweep
                features = encode_vision(self.model, batch, cls_attention=True, clip_keys=True, method=self.method)
        else:
            features = cached.features
        out, masks = self._pass(batch, stopwatch=watch, features=features)
        ms = {k: v / B for k, v in watch.collect().items()}
        if cached is None:
            vision_ms = [ms["vision"]] * B
            self.features.store(batch, features, vision_ms, method=self.method)
            source = "computed"
        else:
            vision_ms, source = cached.vision_ms, cached.source
        latency = []
        for v in vision_ms:
            stages = {"vision": v, **{k: ms[k] for k in self.stages if k != "vision"}}
            latency.append({**stages, "end_to_end": sum(stages.values())})
        return out, masks, latency, source

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
        stats = self.features.stats.as_dict() if self.features is not None else None
        parts = gather_to_rank_zero({"records": self.records, "memory_mb": self.peak_memory_mb, "cache": stats,
                                     "vision_passes": self.vision_passes})
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
            cache=None if stats is None else {k: sum(p["cache"][k] for p in parts) for k in stats},
            vision_passes=sum(part["vision_passes"] for part in parts),
        )
