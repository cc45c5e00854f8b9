"""MustDrop — Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
Language Model" (arXiv:2411.10803; code github.com/liuting20/MustDrop, commit 909afa5).

Why this baseline: it scores image tokens at more than one stage of their life. In the vision stage
it merges spatially adjacent tokens that are alike (a window whose tokens are all similar becomes one
token) and marks a *key set* of tokens by CLIP's [CLS] attention that later stages may not drop; in
the prefill it drops image tokens that the prompt's text attends to little both *globally* (the
attention all text tokens pay to the token, as a share) and *individually* (the most any one text
token pays to it). Its third stage, a policy for the KV cache of the decoding steps, is not implemented
here: the method acts in the prefill (in generation, decoding runs on the prefill's pruned cache as it is).

The rule of the authors' code, on LLaVA-1.5 (line numbers at that commit):
- vision stage, ``llava/model/multimodal_encoder/local_merge.py`` L30-146, called after CLIP's first
  layer (``clip_encoder.py`` L110-112, threshold 0.8, window 3×3 on the 24×24 grid): the grid is cut
  into non-overlapping w×w windows; a window's similarity is the mean cosine similarity of its
  w²(w²−1) ordered pairs of distinct tokens (L59-70); r = the *smallest over the batch* of the number
  of windows whose similarity is ≥ the threshold (L76-79); in each sample the r most similar windows
  merge (L83) — the window's last token (bottom-right) is the destination, the other w²−1 are summed
  into it and the sum divided by the sizes, i.e. the plain mean of the w² tokens (L114-131, L135-146);
- key set, ``clip_encoder.py`` L98-107: the ⌈0.08·n⌉ tokens (n after the merge) the [CLS] token of
  CLIP's last layer attends to most, heads averaged;
- prefill, ``llava/model/language_model/modelling_sparse_llama.py`` L103, L235-267, L336-354: after
  each of the layers 2, 6, 10, 14 (of 32) the layer's attention, heads averaged, is read on the rows
  of the text after the image and the image columns; an image token is dropped when its global
  attention (the column's sum) is below ``global_thr`` × the sum over all image columns *and* its
  individual attention (the column's maximum) is below ``individual_thr``; the key set is never
  dropped (L256-258). Thresholds are per benchmark (``scripts/v1_5/eval/*.sh``).

cspexp follows that rule with these departures (docs/method.md, "`mustdrop` — MustDrop"): the merge acts
on the projected tokens the LLM receives (in `setup`, before layer 0), not after CLIP's first layer;
the key set is ranked by the [CLS] attention of CLIP's feature layer (a merged token: its window's
mean); the prefill's text rows are the prompt up to the [SEG]-producing token; ``keep`` caps the image
tokens kept at the first filtering layer at ⌈keep·N⌉ by raising both thresholds by one factor per
sample, and the raised thresholds stay for the later filtering layers (keep = 1: the authors'
thresholds as given); a merged token sits at its destination cell's original position (the authors
put the merged tokens first and renumber); in a batch the vision stage merges the batch's r windows
(the authors' batch rule) and each filtering layer keeps the largest of the samples' own counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from cspexp.models.lisa import IMAGE, PAD
from cspexp.pruning.engine import Tokens
from cspexp.pruning.merges import record_merges
from cspexp.pruning.methods.base import PruningContext, PruningMethod, PruningSpec
from cspexp.pruning.methods.sparsevlm import rater_rows
from cspexp.pruning.schedule import n_keep, resolve_layers
from cspexp.pruning.scoring import query_mask
from cspexp.pruning.selection import indices_to_mask, topk_indices
from cspexp.utils.choices import Fraction, KeepFraction, Range
from cspexp.utils.errors import ConfigError

PositiveFloat = Annotated[float, Range(0.0, lo_open=True)]
Cosine = Annotated[float, Range(-1.0, 1.0)]
WindowSide = Annotated[int, Range(2)]

#: The authors' filtering layers 2, 6, 10, 14 of LLaVA-1.5-7B's 32 (modelling_sparse_llama.py L103) as
#: fractions of depth (exact on 32 layers; 1, 2, 3, 4 of 8).
REFERENCE_LAYERS = (2 / 32, 6 / 32, 10 / 32, 14 / 32)


# ----------------------------------------------------------------------------- the rule's pieces
def window_cells(side: int, window: int) -> torch.Tensor:
    """[W, w²] the grid cells of each w×w window of a side×side raster grid: windows in raster order,
    cells in raster order inside a window (the authors' ``unfold`` order), so the last is the
    bottom-right cell, the merge's destination."""
    cells = torch.arange(side * side).view(side, side)
    return cells.unfold(0, window, window).unfold(1, window, window).reshape(-1, window * window)


def window_similarity(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """[B, W]: each window's mean cosine similarity over its w²(w²−1) ordered pairs of distinct tokens,
    for tokens x [B, N, d] in cell order; computed in float32 as a batched product of the unit vectors
    (the product the FLOPs accounting charges)."""
    B, W, k = x.shape[0], *windows.shape
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    grouped = unit[:, windows.to(x.device).reshape(-1)].reshape(B * W, k, -1)  # [B·W, k, d]
    sims = torch.bmm(grouped, grouped.transpose(1, 2)).view(B, W, k, k)
    off_diagonal = 1.0 - torch.eye(k, device=x.device)
    return (sims * off_diagonal).sum(dim=(-1, -2)) / (k * (k - 1))


def merge_count(similarity: torch.Tensor, threshold: float | None) -> int:
    """r: the fewest windows any sample of the batch has at or above the threshold (0 when it is None)."""
    if threshold is None:
        return 0
    return int((similarity >= threshold).sum(dim=1).min())


def key_count(key_ratio: float, n: int) -> int:
    """⌈key_ratio·n⌉ (the product rounded to 6 decimals first, so 0.08·25 is 2, not 3)."""
    return min(n, math.ceil(round(key_ratio * n, 6)))


def filter_scores(rows: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """[n] s = max(G/g, I/i) from one sample's text rows [T, n] over the image columns: G the column's
    share of the rows' total attention to the image, I the column's largest entry. The authors drop a
    token when G < g and I < i, i.e. when s < 1; with both thresholds scaled by c, when s < c."""
    global_attn = rows.sum(dim=0)
    share = global_attn / global_attn.sum()
    return torch.maximum(share / global_thr, rows.max(dim=0).values / individual_thr)


def calibrate(scores: torch.Tensor, key: torch.Tensor, cap: int) -> float:
    """The factor c ≥ 1 on both thresholds that leaves one sample at most `cap` image tokens, key set
    included: 1 (the authors' thresholds) when they already do; else halfway between the scores of
    the last non-key token the cap admits and the first it refuses (so exactly that many have s ≥ c,
    barring ties, and no token sits on the threshold); inf when the key set alone fills the cap."""
    room = cap - int(key.sum())
    if room <= 0:
        return math.inf
    free = torch.sort(scores[~key], descending=True).values
    if room >= free.numel():
        return 1.0
    return max(1.0, 0.5 * (float(free[room - 1]) + float(free[room])))


# ----------------------------------------------------------------------------- spec and method
@dataclass(frozen=True)
class MustDrop(PruningSpec):
    """Vision-stage merging of similar windows, a [CLS]-attention key set, and dual-attention
    filtering in the prefill (module docstring).

    Args:
        keep: caps the image tokens kept at the first filtering layer at ⌈keep·N⌉, key set included,
            by raising both thresholds by one factor per sample; the raised thresholds hold at the
            later filtering layers. 1.0: the thresholds as given (the authors' rule).
        window: the side w of the merge windows (the authors' 3 on a 24×24 grid; 2 is the same 1/8 of
            the side, and the same 8×8 windows, on LISA's 16×16); must divide the grid's side.
        merge_threshold: a window merges when its mean pairwise cosine similarity is ≥ this (the
            authors' 0.8), in [-1, 1]; null: no vision-stage merge.
        key_ratio: the key set is ⌈key_ratio·n⌉ of the n tokens after the merge (the authors' 0.08).
        layers: the filtering layers (the authors' 2, 6, 10, 14 of 32); the tokens leave after each.
        global_thr: g, the global-attention threshold (a share of the text's attention to the image).
        individual_thr: i, the individual-attention threshold (an attention probability).
    """

    name: ClassVar[str] = "mustdrop"
    needs_cls_attention: ClassVar[bool] = True

    keep: KeepFraction = 0.333
    window: WindowSide = 2
    merge_threshold: Cosine | None = 0.8
    key_ratio: Fraction = 0.08
    layers: Sequence[int | float] = REFERENCE_LAYERS
    global_thr: PositiveFloat = 0.001
    individual_thr: PositiveFloat = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()  # types and ranges of every field, keep in (0, 1]
        threshold = None if self.merge_threshold is None else float(self.merge_threshold)
        self._set(layers=tuple(self.layers), merge_threshold=threshold, key_ratio=float(self.key_ratio),
                  global_thr=float(self.global_thr), individual_thr=float(self.individual_thr))

    def bind(self, num_layers: int, n_image: int) -> BoundMustDrop:
        return BoundMustDrop(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "window": self.window, "merge_threshold": self.merge_threshold,
                "key_ratio": self.key_ratio, "layers": list(self.layers), "global_thr": self.global_thr,
                "individual_thr": self.individual_thr}


class BoundMustDrop(PruningMethod):
    """`MustDrop` resolved against a model: its windows, filtering layers and cap."""

    def __init__(self, spec: MustDrop, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        side = math.isqrt(n_image)
        if side * side != n_image or side % spec.window:
            raise ConfigError(f"prune.window={spec.window} must divide the side of a square image-token grid "
                              f"({n_image} tokens{f', {side}×{side}' if side * side == n_image else ''})")
        self.side, self.window = side, spec.window
        self.windows = window_cells(side, spec.window)  # [W, w²]
        self.layers = resolve_layers(spec.layers, num_layers, "prune.layers", 0, num_layers - 2,
                                     "MustDrop's filtering layers", "the tokens leave before the layer after each")
        self.cap = n_keep(spec.keep, n_image)
        self.merge_threshold, self.key_ratio = spec.merge_threshold, spec.key_ratio
        self.global_thr, self.individual_thr = spec.global_thr, spec.individual_thr

    # ------------------------------------------------------------------ hooks
    def setup(self, state, ctx: PruningContext) -> None:
        if tuple(ctx.grid_size) != (self.side, self.side):
            raise RuntimeError(f"prune=mustdrop was bound to a {self.side}×{self.side} grid, the model has "
                               f"{ctx.grid_size[0]}×{ctx.grid_size[1]}")
        if ctx.cls_attention is None:
            raise RuntimeError("prune=mustdrop needs CLIP's [CLS] attention in the context (ctx.cls_attention) for "
                               "its key set; run it through segment/run_llm, or pass it in the PruningContext")
        # windows: per sample the merged windows (most similar first); key: [B, positions] bool, the key
        # set by original position; scale: [B] the thresholds' factor, set at the first filtering layer;
        # pending: a filtering decision waiting for the next layer; filtered: per filtering step, the
        # layer the tokens left before and each sample's own count (for tests and tables)
        own = {"windows": None, "key": None, "scale": None, "pending": None, "filtered": []}
        state.extras["mustdrop"] = own
        cls_by_cell = ctx.cls_attention.to(state.hidden.device).float()
        if self.merge_threshold is not None:
            cls_by_cell = self.merge(state, cls_by_cell)
        with torch.no_grad():
            own["key"] = self.key_set(state, cls_by_cell)

    def before_layer(self, layer: int, state, ctx: PruningContext) -> None:
        own = state.extras["mustdrop"]
        if own["pending"] is not None and layer == own["pending"]["at"]:
            pending, own["pending"] = own["pending"], None
            self.drop(state, pending)
        if layer in self.layers and state.n_image > 0:
            with torch.no_grad():
                own["pending"] = self.filter(layer, state, ctx)

    # ------------------------------------------------------------------ vision stage
    def merge(self, state, cls_by_cell: torch.Tensor) -> torch.Tensor:
        """Merge each sample's r most similar windows into one token at its last cell; returns the
        per-cell [CLS] attention with each merged window's destination holding the window's mean."""
        tokens = state.take(state.image_columns())  # [B, N, d], position = raster order
        B, N = tokens.grid.shape
        if N != self.side * self.side or not torch.equal(tokens.grid, torch.arange(N, device=tokens.grid.device)
                                                         .expand(B, N)):
            raise RuntimeError("prune=mustdrop merges the full image grid before layer 0; the image tokens "
                               "entering the LLM are not the grid's cells in raster order")
        windows = self.windows.to(tokens.grid.device)
        W, k = windows.shape
        d = tokens.hidden.shape[-1]
        with torch.no_grad():
            similarity = window_similarity(tokens.hidden, windows)  # [B, W]
        state.trace.overhead.append({"kind": "matmul", "what": "mustdrop window similarity", "m": W * k, "n": k,
                                     "k": d, "widths": {"k": "hidden"}})
        r = merge_count(similarity, self.merge_threshold)
        own = state.extras["mustdrop"]
        if r == 0:
            own["windows"] = similarity.new_zeros(B, 0, dtype=torch.long)
            return cls_by_cell
        # each sample's r most similar windows, most similar first (ties: the earlier window)
        chosen = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :r]  # [B, r]
        cells = windows[chosen]  # [B, r, k]
        own["windows"] = chosen
        grouped = torch.gather(tokens.hidden, 1, cells.reshape(B, r * k, 1).expand(-1, -1, d)).view(B, r, k, d)
        # the authors' size-weighted average with unit sizes: the window's sum over its w² tokens
        ones = grouped.new_ones(1, k, dtype=torch.float32)
        merged = (torch.matmul(ones, grouped.float()).squeeze(-2) / k).to(tokens.hidden.dtype)  # [B, r, d]
        state.trace.overhead.append({"kind": "matmul", "what": "mustdrop window merge", "m": r, "n": d, "k": k,
                                     "widths": {"n": "hidden"}})
        targets, members = cells[..., -1], cells[..., :-1].reshape(B, r * (k - 1))
        in_merged = torch.zeros(B, N, dtype=torch.bool, device=cells.device)
        in_merged.scatter_(1, cells.reshape(B, -1), True)
        state.drop_image(~in_merged)  # every cell of a merged window leaves ...
        state.insert(Tokens(hidden=merged, pos=torch.gather(tokens.pos, 1, targets),  # ... and its last cell returns
                            kind=torch.full_like(targets, IMAGE), grid=targets,
                            rope_pos=torch.gather(tokens.rope_pos, 1, targets)))
        record_merges(state, targets, members, torch.arange(r, device=cells.device).repeat_interleave(k - 1)
                      .expand(B, -1))
        window_cls = torch.gather(cls_by_cell, 1, cells.reshape(B, -1)).view(B, r, k).mean(-1)
        return cls_by_cell.scatter(1, targets, window_cls)

    def key_set(self, state, cls_by_cell: torch.Tensor) -> torch.Tensor:
        """[B, positions] bool: each sample's ⌈key_ratio·n⌉ image tokens of highest [CLS] attention."""
        cols = state.image_columns()
        grid = torch.gather(state.grid, 1, cols)
        count = key_count(self.key_ratio, cols.shape[1])
        key = torch.zeros(state.batch_size, int(state.pos.max()) + 1, dtype=torch.bool, device=state.pos.device)
        if count:
            best = topk_indices(torch.gather(cls_by_cell, 1, grid), count)  # ties: the earlier token
            key.scatter_(1, torch.gather(torch.gather(state.pos, 1, cols), 1, best), True)
        return key

    # ------------------------------------------------------------------ prefill stage
    def filter(self, layer: int, state, ctx: PruningContext) -> dict:
        """Score the image tokens with `layer`'s attention (the state being its input): each sample's
        own count under its thresholds, and the batch's (the largest)."""
        own = state.extras["mustdrop"]
        text = query_mask(state, "text_mean")  # the prompt after the image, up to the [SEG]-producing token
        n_text = text.sum(1)
        state.trace.overhead.append({"kind": "query_attention", "layer": layer,
                                     "tokens": (state.kind != PAD).sum(1).tolist(), "queries": n_text.tolist()})
        rows = rater_rows(ctx.layers[layer], ctx.rotary_emb, state, text)  # [B, T, n_image]
        cols = state.image_columns()
        key = torch.gather(own["key"], 1, torch.gather(state.pos, 1, cols))  # [B, n_image]
        B, n = key.shape
        scores = torch.stack([filter_scores(rows[b, : int(n_text[b])], self.global_thr, self.individual_thr)
                              for b in range(B)])
        if own["scale"] is None:  # the first filtering layer sets each sample's thresholds
            own["scale"] = [calibrate(scores[b], key[b], self.cap) for b in range(B)]
        counts = []
        for b in range(B):
            above = int((scores[b][~key[b]] >= own["scale"][b]).sum())
            counts.append(int(key[b].sum()) + min(above, max(self.cap - int(key[b].sum()), 0)))
        own["filtered"].append({"at": layer + 1, "counts": counts})
        priority = scores.masked_fill(key, math.inf)  # the key set first, then by s
        return {"at": layer + 1, "priority": priority, "count": max(counts)}

    def drop(self, state, pending: dict) -> None:
        priority, count = pending["priority"], pending["count"]
        if count >= priority.shape[1]:
            return
        state.drop_image(indices_to_mask(topk_indices(priority, count), priority.shape[1]))
