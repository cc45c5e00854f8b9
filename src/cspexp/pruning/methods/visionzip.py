"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): before the LLM, keep the image tokens CLIP's
[CLS] attends most (*dominant*) and merge the others into a few evenly spaced *contextual* tokens by
the similarity of their CLIP keys.

The rule of the authors' code (github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
L43-80, keys from ``visionzip/utils.py`` L22-24 and L89), on the N patch tokens of a sample:
1. score each patch by the [CLS] attention of the feature layer (the layer whose output LISA reads),
   and keep the D best: the dominant tokens;
2. list the other R = N − D patches in raster order; every ⌊R/C⌋-th of them, from the first, is one
   of the C targets (the first C such); the M = R − C others are merged;
3. each merged patch goes to the target whose key (that layer's k projection, heads averaged) has
   the largest cosine similarity with its own (first target on ties);
4. a target's value becomes its own value *plus the plain mean* of the values assigned to it (a
   target nobody joined keeps its value).
cspexp applies it to the image tokens the LLM receives (the projected tokens, in `setup`, before
layer 0): dominant tokens stay where they are, each contextual token takes its target's position and
grid cell. Departures from the authors' code are listed in docs/method.md ("visionzip").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from cspexp.models.lisa import IMAGE
from cspexp.pruning.engine import Tokens
from cspexp.pruning.merges import record_merges
from cspexp.pruning.methods.base import PruningMethod, PruningSpec
from cspexp.pruning.schedule import n_keep
from cspexp.pruning.selection import indices_to_mask, topk_indices
from cspexp.utils.choices import Fraction, KeepFraction


@dataclass(frozen=True)
class VisionZip(PruningSpec):
    """Keep ⌈keep·N⌉ image tokens from the start of the LLM: D dominant ones by CLIP [CLS] attention
    and C = ⌈keep·N⌉ − D contextual ones merged from the rest by CLIP key similarity.

    Args:
        keep: the fraction of image tokens the LLM sees, dominant and contextual together, in (0, 1].
        dominant_ratio: the dominant share D / ⌈keep·N⌉ (rounded to the nearest token), in [0, 1]:
            1 keeps only dominant tokens (no merging), 0 only merged ones. The default 27/32 is the
            authors' split at every budget they report (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192).
    """

    name: ClassVar[str] = "visionzip"
    needs_cls_attention: ClassVar[bool] = True
    needs_clip_keys: ClassVar[bool] = True

    keep: KeepFraction = 0.25
    dominant_ratio: Fraction = 0.84375

    def __post_init__(self) -> None:
        super().__post_init__()  # Literal / range checks (dominant_ratio in [0, 1]) and keep's range
        self._set(dominant_ratio=float(self.dominant_ratio))  # 1 and 1.0 are one setting

    def bind(self, num_layers: int, n_image: int) -> BoundVisionZip:
        return BoundVisionZip(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "dominant_ratio": self.dominant_ratio}


def split_counts(keep: float, dominant_ratio: float, n_image: int) -> tuple[int, int]:
    """(D, C): ⌈keep·N⌉ tokens kept, D = dominant_ratio of them rounded half up, C the rest."""
    total = n_keep(keep, n_image)
    dominant = min(total, math.floor(round(dominant_ratio * total, 6) + 0.5))
    return dominant, total - dominant


def target_slots(n_rest: int, n_contextual: int) -> torch.Tensor:
    """Which of the R remaining tokens (in raster order) are the C targets: every max(1, ⌊R/C⌋)-th
    from the first, the first C of them (the authors' ``step`` / ``target_indices``)."""
    step = max(1, n_rest // n_contextual)
    return torch.arange(0, n_rest, step)[:n_contextual]


class BoundVisionZip(PruningMethod):
    """`VisionZip` resolved against a model: D dominant and C contextual tokens of N."""

    def __init__(self, spec: VisionZip, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.n_dominant, self.n_contextual = split_counts(spec.keep, spec.dominant_ratio, n_image)
        self.count = self.n_dominant + self.n_contextual

    def setup(self, state, ctx) -> None:
        n = state.n_image
        if self.count >= n:
            return  # every token kept: each would be its own target with nobody to merge (the dense pass)
        for field, what in (("cls_attention", "[CLS] attention"), ("clip_keys", "patch keys")):
            if getattr(ctx, field) is None:
                raise RuntimeError(f"prune=visionzip needs CLIP's {what} in the context (ctx.{field}); "
                                   "run it through segment/run_llm, or pass them in the PruningContext")
        D, C = self.n_dominant, self.n_contextual
        tokens = state.take(state.image_columns())  # [B, n] image tokens in position (= raster) order
        grid = tokens.grid
        B = grid.shape[0]
        with torch.no_grad():  # a selection is a constant, also when fine-tuning
            scores = torch.gather(ctx.cls_attention.to(grid.device).float(), 1, grid)  # [B, n]
            dominant = topk_indices(scores, D)  # [B, D] sorted; ties to the earlier token
            is_dominant = indices_to_mask(dominant, n)
            # the other R tokens in raster order (a stable sort puts the non-dominant first)
            rest = torch.sort(is_dominant.to(torch.int8), dim=1, stable=True).indices[:, : n - D]  # [B, R]
        bookkeeping = {"dominant": torch.gather(grid, 1, dominant)}
        merged = None
        if C > 0:
            slots = target_slots(n - D, C).to(grid.device)
            is_slot = torch.zeros(n - D, dtype=torch.bool, device=grid.device)
            is_slot[slots] = True
            targets, members = rest[:, slots], rest[:, ~is_slot]  # [B, C], [B, M]
            M = members.shape[1]
            with torch.no_grad():
                keys = ctx.clip_keys.to(grid.device).float()
                keys = torch.gather(keys, 1, grid[..., None].expand(B, n, keys.shape[-1]))  # [B, n, hd]
                keys = keys / keys.norm(dim=-1, keepdim=True)
                similarity = torch.bmm(_rows(keys, members), _rows(keys, targets).transpose(1, 2))  # [B, M, C]
                assign = similarity.argmax(dim=2)  # [B, M]: first maximum on ties
                one_hot = torch.zeros(B, M, C, device=grid.device).scatter_(2, assign[..., None], 1.0)
                counts = one_hot.sum(1).clamp(min=1)[..., None]  # [B, C, 1]
            hidden = tokens.hidden.float()
            mean = torch.bmm(one_hot.transpose(1, 2), _rows(hidden, members)) / counts  # [B, C, d]
            merged = (_rows(hidden, targets) + mean).to(tokens.hidden.dtype)
            if M:
                d, hd = hidden.shape[-1], keys.shape[-1]
                state.trace.overhead += [
                    {"kind": "matmul", "what": "visionzip key similarity", "m": M, "n": C, "k": hd,
                     "widths": {"k": "clip_head"}},
                    {"kind": "matmul", "what": "visionzip merge", "m": C, "n": d, "k": M, "widths": {"n": "hidden"}},
                ]
            bookkeeping.update(targets=torch.gather(grid, 1, targets), members=torch.gather(grid, 1, members),
                               assign=assign)
            record_merges(state, bookkeeping["targets"], bookkeeping["members"], assign)
        state.extras["visionzip"] = bookkeeping  # grid cells: dominant, targets, members; member → target slot
        state.drop_image(is_dominant)  # targets and members leave ...
        if merged is not None:  # ... and each target comes back holding its merged value
            state.insert(Tokens(hidden=merged, pos=torch.gather(tokens.pos, 1, targets),
                                kind=torch.full_like(targets, IMAGE), grid=torch.gather(grid, 1, targets),
                                rope_pos=torch.gather(tokens.rope_pos, 1, targets)))


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for [B, n, f] x and [B, m] index → [B, m, f]."""
    return torch.gather(x, 1, index[..., None].expand(*index.shape, x.shape[-1]))
