"""Evaluation batches for one process or many: over all processes, every sample exactly once.

Lightning's default test sampler under DDP is a padded `DistributedSampler`: when the number of
samples is not a multiple of the number of processes it repeats some, so that every rank runs the
same number of steps, and a repeated sample counts twice in gIoU and cIoU (docs/pitfalls.md,
"Lightning: the test sampler repeats samples"). Here rank r of N reads the strided slice r, r + N,
r + 2N, … (Lightning's `UnrepeatedDistributedSampler`): the slices are disjoint, cover the dataset,
and differ in length by at most one sample. Uneven batch counts are safe because the evaluation
loop never synchronises per step (docs/pitfalls.md, "Lightning: collectives inside the test loop");
the trainer must keep the sampler (``use_distributed_sampler: false`` in conf/trainer/cpu.yaml).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset


class EvalData(L.LightningDataModule):
    """The test loader of an evaluation; under DDP, this rank's slice of the dataset."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, collate_fn: Callable) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn

    def test_dataloader(self) -> DataLoader:
        # Built here, not when evaluate() creates this object: only once the trainer's processes
        # exist are this process's rank and the world size known.
        sampler = UnrepeatedDistributedSampler(
            self.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return self._loader(sampler)

    def first_batch(self) -> dict:
        """The dataset's first batch, read in this process alone (fvcore's one-sample breakdown)."""
        return next(iter(self._loader(None)))

    def _loader(self, sampler) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=self.collate_fn)
