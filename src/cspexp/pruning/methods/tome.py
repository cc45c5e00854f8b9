"""ToMe — Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461) inside LISA's CLIP tower.

The rule of the authors' code (github.com/facebookresearch/ToMe at af95e4b: ``tome/merge.py`` L18-97
``bipartite_soft_matching``, L210-224 ``merge_wavg``, L227-239 ``merge_source``; ``tome/patch/timm.py``
L34-56 ``ToMeBlock``, L66-96 ``ToMeAttention``), in every layer of the vision transformer:
1. attention as usual, with *proportional attention*: the log of each key token's size (how many
   patches it holds) is added to the attention logits, so a token of size s weighs as s copies;
2. after attention, before the MLP, r tokens are merged away: the layer's attention keys averaged over
   heads, normalised, are split alternately into A (tokens 0, 2, 4, …) and B (1, 3, 5, …); every A
   token's edge is its most similar B token (cosine); the r A tokens with the strongest edges are
   merged into their B partners; [CLS] (token 0, in A) is never merged; r is at most half of the
   mergeable tokens, ⌊(T − 1)/2⌋;
3. a merged token is the size-weighted average of what it took in, its size their sum; the sequence
   goes on as [the unmerged A tokens in order ([CLS] first), then the B tokens].
cspexp runs this in its own CLIP layer loop (`cspexp.models.clip_loop`) up to LISA's feature layer,
so the LLM receives N' = ⌈keep·N⌉ patch tokens from its first layer on, each at the grid cell of its
smallest member, in raster order of those cells. How keep maps to r, and the departures from the
authors' code: docs/method.md, "`tome` — ToMe (Token Merging)".
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import ClassVar, Literal

import torch

from cspexp.models.clip_loop import ClipHook, ClipShape, run_clip
from cspexp.pruning.merges import record_merges
from cspexp.pruning.methods.base import PruningMethod, PruningSpec
from cspexp.pruning.schedule import n_keep
from cspexp.utils.choices import KeepFraction
from cspexp.utils.errors import ConfigError


@dataclass(frozen=True)
class ToMe(PruningSpec):
    """Merge the N patch tokens inside CLIP down to ⌈keep·N⌉, r tokens per layer (ToMe), before the LLM.

    Args:
        keep: the fraction of the N patch tokens left at CLIP's feature layer, in (0, 1]; it sets r
            per layer (`merge_schedule`).
        prop_attn: proportional attention (log size added to the attention logits), the authors'
            setting for models used off the shelf (``apply_patch(prop_attn=True)``).
        positions: ``keep`` (default) — every merged token at the original position of its cell (its
            smallest member), gaps in RoPE, the text where it was (the rule of every other cspexp
            method); ``renumber`` — the LLM sees the N' tokens at contiguous RoPE positions, the text
            after them moved up (LLaVA + ToMe: a shorter prompt). On the embedded model, whose LLM was
            trained with 256 image tokens before the text, renumbering costs more than the merging
            (docs/method.md, "`tome` — ToMe (Token Merging)").
    """

    name: ClassVar[str] = "tome"
    changes_vision: ClassVar[bool] = True

    keep: KeepFraction = 0.25
    prop_attn: bool = True
    positions: Literal["keep", "renumber"] = "keep"

    def bind(self, num_layers: int, n_image: int) -> BoundToMe:
        return BoundToMe(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "prop_attn": self.prop_attn, "positions": self.positions}


def _final_patches(n_patches: int, layers: int, r: int, target: int) -> tuple[list[int], int]:
    """ToMe's constant-r run with its own cap — a layer with T tokens ([CLS] included) merges at most
    ⌊(T − 1)/2⌋ — and ours: never below `target` patches. The schedule and the patches left."""
    tokens, schedule = n_patches + 1, []
    for _ in range(layers):
        step = max(0, min(r, (tokens - 1) // 2, tokens - 1 - target))
        schedule.append(step)
        tokens -= step
    return schedule, tokens - 1


@lru_cache(maxsize=None)
def merge_schedule(n_patches: int, n_out: int, layers: int) -> tuple[int, ...]:
    """r per layer that takes N = `n_patches` patch tokens to exactly `n_out` over `layers` layers.

    The authors' constant r (``parse_r`` with an int: the same r in every layer) is kept: the smallest
    constant r that reaches n_out under ToMe's own cap (a layer merges at most half its mergeable
    tokens), the last layers then merging only what is left (so the count is exactly n_out, not below).
    With layers ≥ 1 and no cap reached this is r = ⌈(N − n_out)/layers⌉. Raises ValueError when even
    merging half in every layer does not get to n_out."""
    if n_out >= n_patches:
        return (0,) * layers
    for r in range(math.ceil((n_patches - n_out) / max(layers, 1)), n_patches + 1):
        schedule, left = _final_patches(n_patches, layers, r, n_out)
        if left == n_out:
            return tuple(schedule)
    raise ValueError(f"{layers} layers cannot merge {n_patches} tokens down to {n_out}")


def smallest_count(n_patches: int, layers: int) -> int:
    """The fewest patch tokens `layers` ToMe layers can leave: each merges half of what it may."""
    return _final_patches(n_patches, layers, n_patches, 1)[1]


def bipartite_matching(metric: torch.Tensor, r: int) -> torch.Tensor:
    """Where each of T tokens goes when r of them are merged away (step 2 of the module docstring):
    `metric` [B, T, c] (keys averaged over heads; token 0 is [CLS]) → [B, T] its column among the
    T − r tokens that remain. Ties in the edge ranking go to the earlier A token (the authors'
    ``argsort`` leaves them unspecified)."""
    B, T, _ = metric.shape
    device = metric.device
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
    a_cols, b_cols = torch.arange(0, T, 2, device=device), torch.arange(1, T, 2, device=device)
    n_a, n_b = len(a_cols), len(b_cols)
    if not 0 < r <= (T - 1) // 2:
        raise ValueError(f"ToMe merges 1..{(T - 1) // 2} of {T} tokens, not {r}")
    similarity = unit[:, a_cols] @ unit[:, b_cols].transpose(1, 2)  # [B, A, B]
    similarity[:, 0] = -math.inf  # [CLS] is A's first token and must stay
    edge, partner = similarity.max(dim=2)  # [B, A]: each A token's best B token
    ranked = torch.sort(edge, dim=1, descending=True, stable=True).indices
    merged, kept = ranked[:, :r], ranked[:, r:].sort(dim=1).values  # A tokens merged away / left, in order
    n_kept = n_a - r
    a_into = torch.empty(B, n_a, dtype=torch.long, device=device)
    a_into.scatter_(1, kept, torch.arange(n_kept, device=device).expand(B, n_kept))
    a_into.scatter_(1, merged, n_kept + torch.gather(partner, 1, merged))  # into its partner's column
    into = torch.empty(B, T, dtype=torch.long, device=device)
    into[:, a_cols] = a_into
    into[:, b_cols] = n_kept + torch.arange(n_b, device=device)  # B follows the unmerged A tokens
    return into


def merge_weighted(hidden: torch.Tensor, size: torch.Tensor, into: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The size-weighted average of the tokens that go to each column (`into` [B, T] from
    `bipartite_matching`), and the summed sizes: hidden [B, T, d], size [B, T] → [B, n_out, d],
    [B, n_out]. In float32 (sizes up to N must stay exact), back to hidden's dtype."""
    B, _, d = hidden.shape
    total = hidden.new_zeros(B, n_out, d, dtype=torch.float32).scatter_add_(
        1, into[..., None].expand(-1, -1, d), hidden.float() * size[..., None])
    summed = size.new_zeros(B, n_out).scatter_add_(1, into, size)
    return (total / summed[..., None]).to(hidden.dtype), summed


class ToMeHook(ClipHook):
    """One forward pass of ToMe through the tower (`run_clip`): the merges of a `merge_schedule`, the
    tokens' sizes (for proportional attention) and which token holds each patch cell."""

    def __init__(self, schedule, prop_attn: bool) -> None:
        self.schedule, self.prop_attn = tuple(schedule), prop_attn
        self.size: torch.Tensor | None = None  # [B, T] float32 cells per token ([CLS]: 1); None: one each
        self.owner: torch.Tensor | None = None  # [B, N] the column (≥ 1: [CLS] is 0) holding each patch cell

    def attention_bias(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.prop_attn or self.size is None:  # before any merge log(1) = 0 everywhere
            return None
        return self.size.log().to(hidden.dtype)[:, None, None, :]  # over the keys

    def after_attention(self, layer: int, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        r = self.schedule[layer]
        if r == 0:
            return hidden
        B, T, _ = hidden.shape
        if self.size is None:
            self.size = torch.ones(B, T, dtype=torch.float32, device=hidden.device)
            self.owner = torch.arange(1, T, device=hidden.device).expand(B, T - 1)
        with torch.no_grad():  # which tokens merge is a constant, also when fine-tuning
            into = bipartite_matching(keys.mean(2), r)
        hidden, self.size = merge_weighted(hidden, self.size, into, T - r)
        self.owner = torch.gather(into, 1, self.owner)
        return hidden

    def patch_tokens(self, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tower's output [B, T, d] → its patch tokens [B, n, d] in raster order of each token's
        smallest cell, and `VisionFeatures`' merge fields: image_grid [B, n] (that cell), image_size
        [B, n], image_source [B, N] (the token holding each cell)."""
        B, T, _ = hidden.shape
        n, device = T - 1, hidden.device
        owner = self.owner if self.owner is not None else torch.arange(1, T, device=device).expand(B, n)
        size = self.size if self.size is not None else torch.ones(B, T, device=device)
        column = owner - 1  # [B, N] patch column holding each cell
        N = column.shape[1]
        cells = torch.arange(N, device=device).expand(B, N)
        smallest = torch.full((B, n), N, dtype=torch.long, device=device).scatter_reduce_(1, column, cells, reduce="amin")
        order = smallest.argsort(dim=1)  # the tokens' smallest cells are distinct
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(B, n))
        feats = torch.gather(hidden[:, 1:], 1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        return feats, {"image_grid": torch.gather(smallest, 1, order),
                       "image_size": torch.gather(size[:, 1:], 1, order).float(),
                       "image_source": torch.gather(rank, 1, column)}


class BoundToMe(PruningMethod):
    """`ToMe` resolved against a model: ⌈keep·N⌉ patch tokens leave CLIP; r per CLIP layer follows from
    the tower's depth (`schedule`), which only the model's vision config tells."""

    def __init__(self, spec: ToMe, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.count = n_keep(spec.keep, n_image)
        self.changes_vision = self.count < n_image  # keep 1 (or ⌈keep·N⌉ = N): the dense tower, bit for bit

    def schedule(self, shape: ClipShape) -> tuple[int, ...]:
        """r per CLIP layer run (`merge_schedule`); ConfigError when the tower is too shallow for keep."""
        try:
            return merge_schedule(self.n_image, self.count, shape.layers)
        except ValueError:
            least = smallest_count(self.n_image, shape.layers)
            raise ConfigError(f"prune.keep={self.keep:g} asks for {self.count} of {self.n_image} image tokens, but ToMe "
                              f"merges at most half of a layer's tokens and the CLIP tower runs {shape.layers} layers to "
                              f"its feature layer: keep must be at least {least / self.n_image:.6g} ({least} tokens)") from None

    def check_model(self, model) -> None:
        if self.changes_vision:
            self.schedule(ClipShape.of(model.vision_tower.config, model.vision_select_layer))

    def vision_description(self) -> dict | None:
        if not self.changes_vision:
            return None
        # positions act in the LLM only: both settings share the tower's output
        return {"name": self.name, "keep": self.keep, "prop_attn": self.spec.prop_attn, "tokens": self.count,
                "code": _code_digest()}

    def encode_image(self, model, clip_pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hook = ToMeHook(self.schedule(ClipShape.of(model.vision_tower.config, model.vision_select_layer)),
                        self.spec.prop_attn)
        hidden = run_clip(model.vision_tower, clip_pixels, model.vision_select_layer, hook)
        feats, merged = hook.patch_tokens(hidden)
        return model.project_image(feats, source=merged["image_source"]), merged

    def setup(self, state, ctx) -> None:
        if not self.changes_vision:
            return
        if ctx.image_grid is None or ctx.image_source is None or ctx.clip_shape is None:
            raise RuntimeError("prune=tome needs the vision stage's merge map and the CLIP tower's shape in the context "
                               "(ctx.image_grid, ctx.image_source, ctx.clip_shape); run it through segment/run_llm")
        # The splice put each merged token on its cell of the full grid; the cells no token stands for
        # are empty and leave before layer 0, so the LLM runs on the n merged tokens only.
        grid = ctx.image_grid.to(state.kind.device)  # [B, n]; image column c of the splice is cell c
        occupied = torch.zeros(grid.shape[0], state.n_image, dtype=torch.bool, device=grid.device)
        state.drop_image(occupied.scatter_(1, grid, torch.ones_like(grid, dtype=torch.bool)))  # (a tensor: jit-traceable)
        if self.spec.positions == "renumber":
            state.renumber()  # contiguous RoPE positions, the text right after the n image tokens
        # the similarity products of the merges, counted as the method's overhead (the tower's own work
        # under the schedule is `cspexp.flops.vision.clip_vision_flops(..., merges=...)`)
        tokens = self.n_image + 1
        for layer, r in enumerate(self.schedule(ctx.clip_shape)):
            if r:
                state.trace.overhead.append({"kind": "matmul", "what": f"tome similarity, CLIP layer {layer}",
                                             "m": (tokens + 1) // 2, "n": tokens // 2, "k": ctx.clip_shape.head_dim,
                                             "widths": {"k": "clip_head"}})
            tokens -= r
        # for the pictures: {cell of a token: the other cells it holds} (`cspexp.pruning.merges`)
        source = ctx.image_source.to(grid.device)
        record_merges(state, targets=grid, members=torch.arange(source.shape[1], device=grid.device).expand_as(source),
                      assign=source)


@cache
def _code_digest() -> str:
    """The source of what makes tome's image tokens: editing it invalidates its feature-cache entries."""
    from cspexp.models import clip_loop
    from cspexp.models.lisa import LisaModel

    parts = [inspect.getsource(f) for f in (clip_loop.run_clip, clip_loop._hooked_layer, _final_patches,
                                            merge_schedule, bipartite_matching, merge_weighted, ToMeHook,
                                            BoundToMe.encode_image, LisaModel.project_image)]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()
