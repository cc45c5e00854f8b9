"""The LLaMA layer loop with a token state that pruning methods edit between layers.

Why our own loop (the FastV / PyramidDrop approach) rather than hooks on `LlamaModel.forward`:
a method must be able to *drop* image tokens (they leave the computation, so time falls with FLOPs)
and to *restore* parked ones later (csp's scattering stage), which no hook-based peer supports.

Invariants the loop keeps:
- tokens stay sorted by their original position (`pos`); `pos` alone orders them and builds the
  causal mask, whatever RoPE uses;
- RoPE uses `rope_pos`, which starts equal to `pos` and follows each token through every edit
  (`take`, `keep_columns`, `drop_image`, `insert`), so by default a dropped token leaves a gap in
  the rotary positions, as in FastV / VTW. Only `renumber()` makes the two differ: it gives the
  tokens present positions 0..n−1 in column order — PyramidDrop's re-indexing after a drop
  (`prune.positions=renumber`), which changes what attention sees of distance, never who may attend
  to whom. Padding is on the right, so real tokens get 0..n_real−1;
- after any change the attention mask (from `pos` and `kind`) and the rotary (cos, sin) (from
  `rope_pos`) are rebuilt (never left for transformers to infer: gapped position ids without a mask
  are read as packed sequences by transformers 5's `create_causal_mask`);
- every sample of a batch has the same number of image tokens (choices differ per sample), so the
  batch stays a dense tensor; text padding is masked.
With nothing dropped the loop reproduces `LlamaModel.forward` (tested to 1e-5 in fp32).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import torch

from cspexp.models.lisa import IMAGE, PAD, AttentionImplementation, PromptEmbeds
from cspexp.utils.choices import check_value



@dataclass
class Tokens:
    """A set of tokens taken out of (or going back into) the sequence; all fields are [B, m, ...]."""

    hidden: torch.Tensor
    pos: torch.Tensor
    kind: torch.Tensor
    grid: torch.Tensor
    rope_pos: torch.Tensor | None = None  # RoPE positions; None: the same as `pos`


@dataclass
class Trace:
    """Per-layer token counts of every sample: the input to FLOPs accounting and the paper's
    "average image tokens per MHSA layer"."""

    image_per_layer: torch.Tensor  # [B, L] image tokens entering layer l
    tokens_per_layer: torch.Tensor  # [B, L] all non-padding tokens entering layer l
    # Work a method did besides the layers (query-attention rows, feature assignment), one dict per
    # event with a "kind"; accounting charges it as the method's overhead.
    overhead: list[dict] = field(default_factory=list)

    def sample_overhead(self, i: int) -> list[dict]:
        """The overhead events of sample `i`, with per-sample lists reduced to that sample's value."""
        return [{k: (v[i] if isinstance(v, list) else v) for k, v in e.items()} for e in self.overhead]


@dataclass
class TokenState:
    """What the decoder loop carries from layer to layer. See the module docstring for invariants."""

    hidden: torch.Tensor  # [B, n, d]
    pos: torch.Tensor  # [B, n] original position ids (order and causal mask)
    kind: torch.Tensor  # [B, n] SYSTEM / IMAGE / TEXT / PAD
    grid: torch.Tensor  # [B, n] image-grid index, −1 for non-image tokens
    trace: Trace
    query_pos: torch.Tensor  # [B] position of the [SEG]-producing query token
    seg_pos: torch.Tensor  # [B] position of the [SEG] token
    extras: dict[str, Any] = field(default_factory=dict)  # a method's own bookkeeping (e.g. parked tokens)
    changed: bool = True  # mask and rotary must be rebuilt before the next layer
    rope_pos: torch.Tensor | None = None  # [B, n] RoPE position ids; `pos` unless a method renumbered

    def __post_init__(self) -> None:
        if self.rope_pos is None:
            self.rope_pos = self.pos

    @classmethod
    def from_prompt(cls, prompt: PromptEmbeds, num_layers: int) -> "TokenState":
        B = prompt.embeds.shape[0]
        zeros = torch.zeros(B, num_layers, dtype=torch.long, device=prompt.embeds.device)
        return cls(
            hidden=prompt.embeds,
            pos=prompt.pos,
            kind=prompt.kind,
            grid=prompt.grid,
            trace=Trace(image_per_layer=zeros.clone(), tokens_per_layer=zeros.clone()),
            query_pos=prompt.query_pos,
            seg_pos=prompt.seg_pos,
        )

    # --------------------------------------------------------------- queries
    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_image(self) -> int:
        """Image tokens currently in the sequence (the same for every sample)."""
        return int((self.kind[0] == IMAGE).sum())

    def image_columns(self) -> torch.Tensor:
        """[B, n_image] sequence columns of the image tokens, in position order."""
        is_img = self.kind == IMAGE
        counts = is_img.sum(1)
        if not torch.all(counts == counts[0]):
            raise RuntimeError("samples of a batch hold different numbers of image tokens")
        cols = torch.arange(self.kind.shape[1], device=self.kind.device).expand_as(self.kind)
        # Stable sort puts image columns first, in their original order.
        order = torch.sort((~is_img).to(torch.int8), dim=1, stable=True).indices
        return torch.gather(cols, 1, order[:, : int(counts[0])])

    def columns_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Column of the token at original position `pos` [B] in each row ([B])."""
        hit = self.pos == pos[:, None]
        if not torch.all(hit.any(1)):
            raise RuntimeError("a queried position is no longer in the sequence")
        return hit.float().argmax(1)

    # --------------------------------------------------------------- edits
    def take(self, columns: torch.Tensor) -> Tokens:
        """The tokens at `columns` [B, m] (no change to the sequence)."""
        return Tokens(
            hidden=_gather_rows(self.hidden, columns),
            pos=torch.gather(self.pos, 1, columns),
            kind=torch.gather(self.kind, 1, columns),
            grid=torch.gather(self.grid, 1, columns),
            rope_pos=torch.gather(self.rope_pos, 1, columns),
        )

    def keep_columns(self, columns: torch.Tensor) -> None:
        """Keep only the tokens at `columns` [B, m] (sorted per row); the others leave the computation."""
        kept = self.take(columns)
        self.hidden, self.pos, self.kind, self.grid = kept.hidden, kept.pos, kept.kind, kept.grid
        self.rope_pos = kept.rope_pos
        self.changed = True

    def renumber(self) -> None:
        """Give the tokens present RoPE positions 0..n−1 in column (= original position) order;
        `pos`, the order and the mask stay. Right padding comes after every real token, so the real
        tokens of a row get 0..n_real−1 (PyramidDrop's position ids after a drop)."""
        n = self.pos.shape[1]
        self.rope_pos = torch.arange(n, dtype=self.pos.dtype, device=self.pos.device).expand_as(self.pos).clone()
        self.changed = True

    def drop_image(self, keep: torch.Tensor) -> Tokens:
        """Keep the image tokens where `keep` [B, n_image] is True (same count per row), drop the rest.

        Returns the dropped tokens (a method may park them to restore later).
        """
        img_cols = self.image_columns()
        n_keep = keep.sum(1)
        if not torch.all(n_keep == n_keep[0]):
            raise ValueError("every sample must keep the same number of image tokens")
        drop_mask = torch.zeros_like(self.kind, dtype=torch.bool)
        drop_mask.scatter_(1, img_cols, ~keep)
        cols = torch.arange(self.kind.shape[1], device=self.kind.device).expand_as(self.kind)
        # Stable sort on the drop flag keeps both groups in position order.
        order = torch.sort(drop_mask.to(torch.int8), dim=1, stable=True).indices
        n_left = self.kind.shape[1] - int((~keep).sum(1)[0])
        keep_cols, drop_cols = torch.gather(cols, 1, order[:, :n_left]), torch.gather(cols, 1, order[:, n_left:])
        dropped = self.take(drop_cols)
        self.keep_columns(keep_cols)
        return dropped

    def insert(self, tokens: Tokens) -> None:
        """Put `tokens` back into the sequence at their original positions. They keep the RoPE
        positions they left with (`tokens.rope_pos`, or `tokens.pos` when None); after a `renumber`
        a method that wants 0..n−1 again renumbers again."""
        hidden = torch.cat([self.hidden, tokens.hidden.to(self.hidden.dtype)], dim=1)
        pos = torch.cat([self.pos, tokens.pos], dim=1)
        kind = torch.cat([self.kind, tokens.kind], dim=1)
        grid = torch.cat([self.grid, tokens.grid], dim=1)
        rope_pos = torch.cat([self.rope_pos, tokens.pos if tokens.rope_pos is None else tokens.rope_pos], dim=1)
        order = torch.argsort(pos, dim=1, stable=True)
        self.hidden = _gather_rows(hidden, order)
        self.pos = torch.gather(pos, 1, order)
        self.kind = torch.gather(kind, 1, order)
        self.grid = torch.gather(grid, 1, order)
        self.rope_pos = torch.gather(rope_pos, 1, order)
        self.changed = True


def _gather_rows(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, columns[..., None].expand(*columns.shape, x.shape[-1]))


def attention_mask(state: TokenState, implementation: AttentionImplementation) -> torch.Tensor | None:
    """The attention mask for the current sequence.

    Allowed: key position ≤ query position, key not padding; every token also sees itself, so a
    padding row is never fully masked (SDPA would return NaN). With SDPA and no padding the mask is
    `None`: the tokens are kept sorted by position, so SDPA's built-in causal mask is exactly the
    positional one and the fast fused kernel is used, gaps or not.
    """
    pad = state.kind == PAD
    if implementation == "sdpa" and not bool(pad.any()):
        return None
    allowed = state.pos[:, None, :] <= state.pos[:, :, None]  # [B, q, k]
    allowed &= ~pad[:, None, :]
    allowed |= torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    allowed = allowed[:, None]  # [B, 1, q, k], broadcast over heads
    if implementation == "sdpa":
        return allowed
    # eager adds the mask to the scores
    return torch.zeros(allowed.shape, dtype=state.hidden.dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(state.hidden.dtype).min
    )


class StateView:
    """Read-only access to a `TokenState`, what observers get: every field and query passes through
    (`hidden`, `pos`, `rope_pos`, `kind`, `grid`, `trace`, `n_image`, `image_columns()`, ...), `extras`
    as a read-only mapping; the edits (`drop_image`, `insert`, `keep_columns`, `renumber`) and
    assignment raise.

    The tensors are the state's own, not copies: an observer may compute from them with gradients
    (training supervises attention rows), and must not edit them in place."""

    __slots__ = ("_state",)
    _EDITS = frozenset({"drop_image", "insert", "keep_columns", "renumber"})

    def __init__(self, state: TokenState) -> None:
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str):
        if name in StateView._EDITS:
            raise AttributeError(f"an observer cannot call TokenState.{name}: observers read the token state, "
                                 "only the pruning method changes it")
        if name == "extras":
            return MappingProxyType(self._state.extras)
        return getattr(self._state, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"an observer cannot set TokenState.{name}: observers read the token state, "
                             "only the pruning method changes it")


class Observer:
    """Watches the decoder loop without taking part in it: the loop calls `on_setup` after the
    method's `setup`, `before_layer` after the method acted before a layer (the state is then the
    layer's input, and the trace holds that layer's counts), and `after_run` after the final norm.
    Each gets a `StateView`, so it cannot change which tokens run or what they hold.
    Override what you need; the defaults do nothing."""

    def on_setup(self, state: StateView, ctx) -> None:
        pass

    def before_layer(self, layer: int, state: StateView, ctx) -> None:
        pass

    def after_run(self, state: StateView) -> None:
        pass


@lru_cache(maxsize=None)
def _cache_keyword(layer_type: type) -> str:
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(layer) -> str:
    """The keyword under which a transformers decoder layer takes its KV cache: ``cache`` in
    transformers ≥ 5.2x, ``past_key_values`` before (the old name is deprecated there and warns), so
    one call works on every transformers 5 (docs/pitfalls.md, "transformers: the decoder layer's cache
    keyword")."""
    return _cache_keyword(type(layer))


class DecoderLoop:
    """Runs a LlamaModel's decoder layers one by one, letting a pruning method act before each
    layer and observers watch after it."""

    def __init__(self, llama_model) -> None:
        self.model = llama_model  # transformers LlamaModel: .layers, .norm, .rotary_emb
        self.implementation = llama_model.config._attn_implementation or "sdpa"
        check_value(self.implementation, AttentionImplementation, "model.attn_implementation")

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def run(self, state: TokenState, method, ctx, observers: Sequence[Observer] = (), cache=None) -> TokenState:
        """Run every layer, then the final RMSNorm; `state.hidden` ends as the model's last hidden state.
        `observers` (see `Observer`) are called after the method, in order.

        `cache` (optional): a transformers `Cache` (`DynamicCache`) that each layer fills through its
        own cache support with the keys and values of the tokens it ran — exactly the tokens present
        at that layer, padding columns included, RoPE applied at `rope_pos` — so layers hold different
        lengths when the method removed or restored tokens (generation, `cspexp.pruning.generate`).
        Without it the layers are called as they always were."""
        view = StateView(state)
        caching = {} if cache is None else {cache_keyword(self.model.layers[0]): cache, "use_cache": True}
        method.setup(state, ctx)
        for observer in observers:
            observer.on_setup(view, ctx)
        mask = position_embeddings = None
        for layer_idx, layer in enumerate(self.model.layers):
            method.before_layer(layer_idx, state, ctx)
            if state.changed:
                mask = attention_mask(state, self.implementation)
                position_embeddings = self.model.rotary_emb(state.hidden, position_ids=state.rope_pos)
                state.changed = False
            state.trace.image_per_layer[:, layer_idx] = (state.kind == IMAGE).sum(1)
            state.trace.tokens_per_layer[:, layer_idx] = (state.kind != PAD).sum(1)
            for observer in observers:
                observer.before_layer(layer_idx, view, ctx)
            state.hidden = layer(
                state.hidden,
                attention_mask=mask,
                position_ids=state.rope_pos,
                position_embeddings=position_embeddings,
                **caching,
            )
        state.hidden = self.model.norm(state.hidden)
        for observer in observers:
            observer.after_run(view)
        return state
