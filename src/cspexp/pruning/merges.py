"""Which image cells a merged token stands for: the bookkeeping that lets pictures show merges.

A method that merges tokens (visionzip's contextual tokens, sparsevlm's recycled clusters, ToMe,
MustDrop) leaves one token in the sequence that carries several grid cells' content, at the grid cell
of one of them (its *target*). The token state only knows that cell. So that the kept-token pictures
can show what each merged token holds, such a method records its merges here, in
``state.extras["merges"]``: one dict per sample, ``{target cell: sorted member cells}``, the members
being the other cells whose content went into the target's token.

Merges compose: when a token that already holds members is merged into another target, its members
move with it, so the dict always says which original cells each present token stands for. A target
that later leaves the sequence keeps its entry; readers look up only the cells still present.
"""

from __future__ import annotations

import torch

KEY = "merges"


def record_merges(state, targets: torch.Tensor, members: torch.Tensor, assign: torch.Tensor) -> None:
    """Record that, in each sample b, member cell ``members[b, j]`` was merged into target cell
    ``targets[b, assign[b, j]]``. `targets` [B, C], `members` [B, M] are grid cells; `assign` [B, M]
    indexes the targets."""
    B = targets.shape[0]
    merges = state.extras.setdefault(KEY, [{} for _ in range(B)])
    targets, members, assign = targets.tolist(), members.tolist(), assign.tolist()
    for b in range(B):
        record_sample_merges(merges[b], {(targets[b][a], m) for m, a in zip(members[b], assign[b])})


def record_sample_merges(sample: dict[int, list[int]], pairs) -> None:
    """Fold (target cell, member cell) pairs into one sample's ``{target: members}`` dict; a member that
    was itself a target brings its own members along."""
    for target, member in sorted(pairs):
        if member == target:
            continue
        moved = [member, *sample.pop(member, [])]
        sample[target] = sorted(set(sample.get(target, [])) | set(moved))


def present_merges(state, sample: int, cells) -> dict[int, list[int]]:
    """Sample `sample`'s merges whose target cell is among `cells` (the image cells present now)."""
    merges = state.extras.get(KEY)
    if not merges:
        return {}
    present = set(cells)
    return {t: list(m) for t, m in merges[sample].items() if t in present}
