"""Choosing image tokens: grid-stride, random, top-k, instance quotas, and cluster assignment.

All functions work on the image-token grid (raster index = row·cols + col) and return sorted index
tensors, so the chosen tokens stay in position order.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def uniform_grid(count: int, rows: int, cols: int) -> torch.Tensor:
    """`count` grid indices spread evenly over the 2-D grid (a 2-D stride, centred).

    A lattice of r × c ≥ count points with the grid's aspect ratio is laid over the grid (each point
    at the centre of its cell); when it has more points than `count`, an evenly spaced subset of the
    lattice (in raster order) is kept. 64 of 16×16 → every second row and column.
    """
    n = rows * cols
    if not 1 <= count <= n:
        raise ValueError(f"cannot choose {count} of {n} grid tokens")
    if count == n:
        return torch.arange(n)
    r = min(rows, max(1, round(math.sqrt(count * rows / cols))))
    c = min(cols, math.ceil(count / r))
    while r * c < count:  # aspect rounding can leave the lattice one row short
        r = min(rows, r + 1)
        c = min(cols, math.ceil(count / r))
    ys = [math.floor((i + 0.5) * rows / r) for i in range(r)]
    xs = [math.floor((j + 0.5) * cols / c) for j in range(c)]
    lattice = [y * cols + x for y in ys for x in xs]
    picks = [lattice[math.floor((k + 0.5) * len(lattice) / count)] for k in range(count)]
    return torch.tensor(sorted(set(picks)), dtype=torch.long)


def random_indices(count: int, n: int, seed: int) -> torch.Tensor:
    """`count` of `n` indices drawn without replacement from a generator seeded by `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(n, generator=g)[:count]).values


def sample_seed(base: int, sample_id: int) -> int:
    """A per-sample seed: the same sample gets the same draw whatever batch it is in."""
    return (int(base) * 1_000_003 + int(sample_id)) % (2**63 - 1)


def topk_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B, N] scores → [B, count] indices of the largest, sorted by index (ties: lower index first)."""
    # A stable descending sort makes the choice among equal scores deterministic.
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :count]
    return torch.sort(order, dim=1).values


def indices_to_mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    """[B, k] indices → [B, n] bool."""
    mask = torch.zeros(indices.shape[0], n, dtype=torch.bool, device=indices.device)
    # a tensor source, not the scalar True: jit tracing (fvcore) has no overload for a bool scalar
    return mask.scatter_(1, indices, torch.ones_like(indices, dtype=torch.bool))


# ----------------------------------------------------------------------------- seg_first
def instance_quotas(areas: np.ndarray, budget: int) -> np.ndarray:
    """Per-instance token quotas: max(1, ⌊budget · area share⌋), then fixed to sum to `budget`.

    Fix-up: while the sum is over budget, take one token from the instance holding the most (an
    instance keeps ≥ 1 unless there are more instances than budget, when the smallest get 0);
    while under budget, give one to the instance with the largest unrounded remainder (area order
    on ties). The caller tops up from the uniform grid if instances have too few tokens.
    """
    areas = np.asarray(areas, dtype=np.float64)
    if areas.size == 0 or areas.sum() <= 0:
        return np.zeros(areas.shape, dtype=np.int64)
    exact = budget * areas / areas.sum()
    quota = np.maximum(1, np.floor(exact)).astype(np.int64)
    if len(areas) > budget:  # more instances than tokens: the largest ones get one each
        quota[:] = 0
        quota[np.argsort(-areas, kind="stable")[:budget]] = 1
        return quota
    while quota.sum() > budget:
        quota[int(np.argmax(quota))] -= 1
    remainder = exact - np.floor(exact)
    order = np.lexsort((-areas, -remainder))
    k = 0
    while quota.sum() < budget:
        quota[order[k % len(order)]] += 1
        k += 1
    return quota


def seg_first_select(instance_ids: np.ndarray, budget: int, rows: int, cols: int) -> torch.Tensor:
    """Representatives from instance masks on the token grid.

    `instance_ids` [rows·cols] gives each token's instance (−1: background / none). Each instance
    gets its quota (`instance_quotas`) of its tokens, spread evenly over them in raster order; the
    total is exactly `budget`, topped up from the uniform grid when instances are too small; with no
    instance at all this falls back to `uniform_grid`.
    """
    ids = np.asarray(instance_ids).reshape(-1)
    labels = [int(v) for v in np.unique(ids) if v >= 0]
    if not labels:
        return uniform_grid(budget, rows, cols)
    members = [np.flatnonzero(ids == lab) for lab in labels]
    quotas = instance_quotas(np.array([len(m) for m in members]), budget)
    chosen: list[int] = []
    for m, q in zip(members, quotas):
        q = min(int(q), len(m))
        chosen += [int(m[math.floor((k + 0.5) * len(m) / q)]) for k in range(q)] if q else []
    picked = set(chosen)
    if len(picked) < budget:
        for idx in _fill_order(rows, cols):
            if len(picked) == budget:
                break
            picked.add(idx)
    return torch.tensor(sorted(picked), dtype=torch.long)


def _fill_order(rows: int, cols: int) -> list[int]:
    """Grid indices in an order that spreads over the image: coarse lattices first, then finer."""
    seen: list[int] = []
    have = set()
    for count in (1, 4, 16, 64, rows * cols):
        count = min(count, rows * cols)
        for idx in uniform_grid(count, rows, cols).tolist():
            if idx not in have:
                have.add(idx)
                seen.append(idx)
    return seen


# ----------------------------------------------------------------------------- assignment
def assign_grid(reps: torch.Tensor, members: torch.Tensor, cols: int) -> torch.Tensor:
    """For each member grid index, the position (in `reps`) of the nearest representative on the
    grid (Euclidean; ties: the representative that comes first). reps [B, R], members [B, M] → [B, M]."""
    ry, rx = reps // cols, reps % cols
    my, mx = members // cols, members % cols
    d2 = (my[:, :, None] - ry[:, None, :]) ** 2 + (mx[:, :, None] - rx[:, None, :]) ** 2  # [B, M, R]
    return d2.argmin(dim=2)


def assign_feature(rep_feats: torch.Tensor, member_feats: torch.Tensor) -> torch.Tensor:
    """Each member joins the representative with the most similar feature (cosine). [B, M]."""
    r = torch.nn.functional.normalize(rep_feats.float(), dim=-1)
    m = torch.nn.functional.normalize(member_feats.float(), dim=-1)
    return torch.bmm(m, r.transpose(1, 2)).argmax(dim=2)
