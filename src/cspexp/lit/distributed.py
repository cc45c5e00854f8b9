"""What multi-process evaluation (``trainer=ddp``) needs around Lightning's test loop.

Lightning's ``strategy=ddp`` re-runs the command line once per extra device, so every rank runs
the whole of `evaluate`. The collectives here are called by *every* rank at the same point after
``trainer.test`` has returned — never per step, since ranks run different numbers of batches under
the unrepeated sampler (docs/pitfalls.md, "Lightning: collectives inside the test loop"). In a single
process they are no-ops. Object collectives pickle through the process group's device: the current
CUDA device under NCCL, which Lightning has set for each rank.
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_only

from cspexp.utils.errors import ConfigError
from cspexp.utils.hydra_mode import in_multirun


def process_rank() -> int:
    """This process's global rank, known before the trainer starts its process group: Lightning
    reads it from the launcher's environment (``LOCAL_RANK`` of the processes it started, ``RANK``
    under torchrun, ``SLURM_PROCID``) when it is imported. 0 in a single process."""
    return int(getattr(rank_zero_only, "rank", 0))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_rank_zero(obj) -> list | None:
    """Every rank's `obj` as a list in rank order on rank 0; None on the other ranks."""
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def share_from_rank_zero(obj):
    """Rank 0's `obj` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_processes(trainer, n_samples: int) -> None:
    """Refuse, before any process is started, the multi-process setups that would go wrong.

    - inside a multirun: ``strategy=ddp`` re-runs ``sys.argv``, ``-m`` and sweeps included, so each
      extra process would start a sweep of its own (docs/pitfalls.md, "Lightning: ddp re-runs the
      command line");
    - ``ddp_spawn`` / ``ddp_fork``: the test loop then runs in worker processes whose per-sample
      records never come back to the process that writes the results;
    - fewer samples than processes: a process would have nothing to evaluate (Lightning's unrepeated
      sampler asserts that every rank gets a sample).
    """
    world = trainer.num_nodes * trainer.num_devices
    if world == 1:
        return
    setup = f"{world} processes (trainer.devices × trainer.num_nodes)"
    if in_multirun():
        raise ConfigError(
            f"trainer with {setup} cannot run inside a multirun (-m): Lightning's ddp re-runs the command line, "
            "sweep included; run each point with trainer.devices=1 (one GPU per job), or one point at a time"
        )
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError(
            f"trainer.strategy starts its {setup} with {trainer.strategy.launcher._start_method} (ddp_spawn, ddp_fork, "
            "ddp_notebook), whose workers keep their per-sample records to themselves; use trainer=ddp (strategy=ddp)"
        )
    if n_samples < world:
        raise ConfigError(
            f"the dataset has {n_samples} sample{'s' if n_samples != 1 else ''}, fewer than the {setup}; "
            f"use at most trainer.devices={max(1, n_samples // trainer.num_nodes)}"
        )
