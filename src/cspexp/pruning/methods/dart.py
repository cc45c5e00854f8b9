"""DART — Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More" (arXiv:2502.11494; code github.com/ZichenWen1/DART).

Why it is here: the attention-ranked baselines (FastV, PyramidDrop, csp's pruning stage) keep the
tokens a query attends to, and those are often near-copies of one another. DART asks the opposite
question — which tokens add something the kept ones do not already carry — without any attention
row, so it runs on fused attention kernels. It is the duplication-based point of comparison.

The rule, as the authors' LLaVA code applies it (docs/method.md cites the lines), before layer K:

1. **Pivots.** The `pivot_image` image tokens and the `pivot_text` text tokens after the image
   whose *keys* in layer K−1 (the layer's own input norm and k projection, RoPE applied, heads
   concatenated) have the largest L1 norm.
2. **Least duplicated.** The pivots are visited one by one; each takes, from the image tokens not
   yet taken (image pivots excluded), those whose state entering layer K — after the LLM's final
   RMSNorm — has the *lowest* cosine similarity to the pivot's state.
3. **Kept:** the image pivots and every token a pivot took; the others leave for good. Text pivots
   are not image tokens: like all text they stay.

cspexp keeps exactly ⌈keep·N⌉ image tokens: the image pivots plus R = ⌈keep·N⌉ − pivot_image taken
tokens, ⌊R/P⌋ per pivot (P pivots) and one more for the first R mod P pivots visited. When P divides
R this is the authors' rule with their per-pivot count ⌊max_num_trunction/P⌋ = R/P.

Pivots are visited in the order the authors' loop visits them — the iteration order of a Python
`set` of their sequence positions, built from the image pivots then the text pivots, each by
decreasing L1 norm. The order matters (a pivot takes tokens the next one may have wanted), and it
is the only one that reproduces the authors' kept sets (tests/test_dart.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cspexp.models.lisa import IMAGE, TEXT
from cspexp.pruning.methods.base import PruningMethod, PruningSpec
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.utils.choices import KeepFraction, NonNegativeInt
from cspexp.utils.errors import ConfigError, require

#: Which text tokens may be pivots: `prompt` — the text after the image up to the token that produces
#: [SEG] (`prune.query=seg`'s token), which is all the text the authors' code sees when it prefills a
#: generation prompt; `all` — every text token after the image, LISA's teacher-forced answer
#: ``[SEG] . </s>`` included (the authors' slice applied literally to LISA's prompt).
TextSpan = Literal["prompt", "all"]

_PIVOTS = "dart_pivots"  # state.extras key: per sample, the pivots' positions in visiting order


@dataclass(frozen=True)
class Dart(PruningSpec):
    """Before layer K keep ⌈keep·N⌉ image tokens: the image pivots and the tokens least duplicated
    with the pivots (see the module docstring).

    Args:
        keep: the fraction of image tokens kept from layer K on, pivots included, in (0, 1]; the
            authors' reduction ratio is 1 − keep (their default 0.778: keep 0.222).
        layer: K, an index (1 ≤ K < number of layers) or a fraction of depth; the pivots are ranked
            with layer K−1's keys (the authors' default K = 2).
        pivot_image: image pivots (≥ 0; the authors' 4), always kept.
        pivot_text: text pivots (≥ 0; the authors' 4); with fewer candidate text tokens, all of them.
        text_span: which text tokens may be pivots (`TextSpan`).
    """

    name: ClassVar[str] = "dart"

    keep: KeepFraction = 0.222
    layer: int | float = 2
    pivot_image: NonNegativeInt = 4
    pivot_text: NonNegativeInt = 4
    text_span: TextSpan = "prompt"

    def __post_init__(self) -> None:
        super().__post_init__()  # Literal and range checks, prune.keep in (0, 1]
        require(self.pivot_image + self.pivot_text >= 1,
                f"prune.pivot_image={self.pivot_image} and prune.pivot_text={self.pivot_text} leave no pivot; "
                "DART needs at least one (the authors use 4 and 4)")

    def bind(self, num_layers: int, n_image: int) -> BoundDart:
        return BoundDart(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layer": self.layer, "pivot_image": self.pivot_image,
                "pivot_text": self.pivot_text, "text_span": self.text_span}


class BoundDart(PruningMethod):
    """`Dart` resolved against a model: the layer K and the kept count ⌈keep·N⌉."""

    def __init__(self, spec: Dart, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.layer = resolve_layer(spec.layer, num_layers, "prune.layer")
        if not 1 <= self.layer <= num_layers - 1:
            raise ConfigError(
                f"prune.layer={spec.layer} (layer {self.layer}) must be in 1..{num_layers - 1}: DART ranks its "
                "pivots with layer K−1's keys and prunes before layer K")
        self.count = n_keep(spec.keep, n_image)
        if spec.pivot_image > self.count:
            raise ConfigError(
                f"prune.keep={spec.keep} keeps {self.count} of {n_image} image tokens, fewer than "
                f"prune.pivot_image={spec.pivot_image}, which DART always keeps; use prune.keep ≥ "
                f"{spec.pivot_image / n_image:g} or fewer image pivots")
        self.pivot_image, self.pivot_text, self.text_span = spec.pivot_image, spec.pivot_text, spec.text_span

    def before_layer(self, layer: int, state, ctx) -> None:
        if self.count >= self.n_image:  # keep=1.0: nothing to choose, nothing computed
            return
        if layer == self.layer - 1:
            state.extras[_PIVOTS] = self._pivots(layer, state, ctx)
        elif layer == self.layer:
            self._keep_least_duplicated(state, ctx, state.extras.pop(_PIVOTS))

    # ------------------------------------------------------------------ layer K−1: pivots
    def _pivots(self, layer: int, state, ctx) -> list[tuple[list[int], list[int]]]:
        """Per sample (the pivots' positions in visiting order, the image pivots' positions), from the
        keys of `layer` (= K−1) computed on its input `state`."""
        # keys are needed for the image tokens and the text tokens that may be pivots, when there are such pivots
        text = (state.kind == TEXT) & (self.pivot_text > 0)
        if self.text_span == "prompt":
            text &= state.pos <= state.query_pos[:, None]
        candidates = text | ((state.kind == IMAGE) & (self.pivot_image > 0))
        counts = candidates.sum(1)
        # candidate columns first, in position order; a row's columns past its count are filler
        cols = torch.sort((~candidates).to(torch.int8), dim=1, stable=True).indices[:, : int(counts.max())]
        with torch.no_grad():  # a selection is a constant, also when fine-tuning
            keys = layer_keys(ctx.layers[layer], ctx.rotary_emb, state, cols)  # [B, m, d_kv]
            l1 = keys.float().abs().sum(-1)  # [B, m]
        state.trace.overhead.append({"kind": "matmul", "what": "dart: layer K−1 keys of the pivot candidates",
                                     "layer": layer, "m": counts.tolist(), "n": int(keys.shape[-1]),
                                     "k": int(state.hidden.shape[-1]), "widths": {"n": "kv", "k": "hidden"}})
        kind, pos = torch.gather(state.kind, 1, cols), torch.gather(state.pos, 1, cols)
        pivots = []
        for b in range(state.batch_size):
            valid = torch.arange(cols.shape[1], device=cols.device) < counts[b]
            image = _largest(l1[b], pos[b], valid & (kind[b] == IMAGE), self.pivot_image)
            text = _largest(l1[b], pos[b], valid & (kind[b] == TEXT), self.pivot_text)
            # the authors' loop visits `list(set(image + text))`: a Python set's order of the positions
            pivots.append((list(set(image + text)), image))
        return pivots

    # ------------------------------------------------------------------ layer K: the least duplicated
    def _keep_least_duplicated(self, state, ctx, pivots: list[tuple[list[int], list[int]]]) -> None:
        img_cols = state.image_columns()  # [B, N] in position order
        n_img = img_cols.shape[1]
        if min(len(order) for order, _ in pivots) == 0:
            raise RuntimeError("dart: a sample has no pivot (prune.pivot_image=0 and no candidate text token)")
        width = max(len(order) for order, _ in pivots)
        # columns of each sample's pivots in visiting order (rows padded with a repeat of column 0)
        piv_cols = torch.zeros(state.batch_size, width, dtype=torch.long, device=img_cols.device)
        for b, (order, _) in enumerate(pivots):
            piv_cols[b, : len(order)] = _columns(state, b, order)
        norm = ctx.final_norm if ctx.final_norm is not None else (lambda h: h)
        with torch.no_grad():
            h_img = F.normalize(norm(_rows(state.hidden, img_cols)).float(), dim=-1)  # [B, N, d]
            h_piv = F.normalize(norm(_rows(state.hidden, piv_cols)).float(), dim=-1)  # [B, P, d]
            sims = torch.bmm(h_piv, h_img.transpose(1, 2))  # [B, P, N] cosine similarities
        state.trace.overhead.append({"kind": "matmul", "what": "dart: pivot × image-token cosine similarities",
                                     "layer": self.layer, "m": [len(order) for order, _ in pivots], "n": n_img,
                                     "k": int(state.hidden.shape[-1]), "widths": {"k": "hidden"}})
        img_pos = torch.gather(state.pos, 1, img_cols)
        keep = torch.zeros(state.batch_size, n_img, dtype=torch.bool, device=img_cols.device)
        for b, (order, image) in enumerate(pivots):
            # the image pivots are kept and are no candidates
            taken = torch.isin(img_pos[b], torch.tensor(image, dtype=img_pos.dtype, device=img_pos.device))
            quotas = split_budget(self.count - len(image), len(order))
            for i, quota in enumerate(quotas):
                if quota == 0:
                    continue
                scores = sims[b, i].masked_fill(taken, float("inf"))
                # the lowest similarities; ties to the earlier token
                taken[torch.sort(scores, stable=True).indices[:quota]] = True
            keep[b] = taken
        state.drop_image(keep)


def split_budget(budget: int, pivots: int) -> list[int]:
    """How many tokens each of `pivots` pivots takes, in visiting order: ⌊budget/pivots⌋ each, one more
    for the first budget mod pivots."""
    share, extra = divmod(budget, pivots)
    return [share + (i < extra) for i in range(pivots)]


def layer_keys(layer, rotary_emb, state, cols: torch.Tensor) -> torch.Tensor:
    """The keys [B, m, d_kv] that decoder `layer` computes for the tokens at `cols` [B, m] of its input
    `state`: its input RMSNorm (per token, so the rows alone suffice), k projection, and RoPE at the
    positions the layer uses; key/value heads concatenated."""
    attn = layer.self_attn
    x = layer.input_layernorm(_rows(state.hidden, cols))  # [B, m, d]
    B, m, _ = x.shape
    k = attn.k_proj(x).view(B, m, -1, attn.head_dim).transpose(1, 2)  # [B, Hkv, m, hd]
    cos, sin = rotary_emb(x, position_ids=torch.gather(state.rope_pos, 1, cols))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.transpose(1, 2).reshape(B, m, -1)


def _largest(values: torch.Tensor, pos: torch.Tensor, where: torch.Tensor, count: int) -> list[int]:
    """Positions of the `count` largest `values` among `where` (all of them if fewer), largest first;
    ties to the earlier position."""
    idx = where.nonzero().squeeze(1)
    order = torch.sort(values[idx], descending=True, stable=True).indices[:count]
    return pos[idx[order]].tolist()


def _columns(state, b: int, positions: list[int]) -> torch.Tensor:
    """Columns of sample `b`'s tokens at original `positions`."""
    wanted = torch.tensor(positions, dtype=state.pos.dtype, device=state.pos.device)
    hit = state.pos[b][None, :] == wanted[:, None]  # [P, n]
    if not bool(hit.any(1).all()):
        raise RuntimeError("dart: a pivot is no longer in the sequence")
    return hit.float().argmax(1)


def _rows(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, cols[..., None].expand(*cols.shape, x.shape[-1]))
