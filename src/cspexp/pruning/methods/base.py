"""The interface every pruning method implements, and the dense reference `none`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cspexp.models.lisa import PAD
from cspexp.pruning.scoring import query_attention, query_mask
from cspexp.pruning.selection import indices_to_mask, topk_indices
from cspexp.utils.errors import require


@dataclass
class PruningContext:
    """What a method may read besides the token state."""

    layers: Any  # the LLaMA decoder layers (for a method's own q/k projections)
    rotary_emb: Any  # the LLaMA rotary embedding (position ids → cos, sin)
    grid_size: tuple[int, int]  # image-token grid (rows, cols)
    cls_attention: torch.Tensor | None = None  # [B, N] CLIP [CLS] attention at the feature layer
    images: list | None = None  # per sample uint8 [H, W, 3] originals (for segmenter-based selection)
    sample_ids: list[int] | None = None  # dataset idx per sample (per-sample seeds)
    extras: dict[str, Any] = field(default_factory=dict)


class PruningMethod:
    """A token-pruning schedule applied inside the LLM's layer loop.

    Lifecycle: ``validate(num_layers, n_image)`` once at start-up, before any model is loaded (so a
    bad schedule fails in a second, not after a 7B load); then per batch ``setup(state, ctx)`` and
    ``before_layer(l, state, ctx)`` for every layer l. A method edits the state through
    `TokenState.drop_image` / `TokenState.insert`; the engine rebuilds mask and RoPE.

    Args:
        keep: the fraction of image tokens the method's main pruning step keeps, in (0, 1].
    """

    name = "base"
    #: whether the method needs the CLIP [CLS] attention in the context
    needs_cls_attention = False

    def __init__(self, keep: float = 1.0) -> None:
        require(isinstance(keep, (int, float)) and 0.0 < float(keep) <= 1.0, f"prune.keep={keep!r} is outside (0, 1]")
        self.keep = float(keep)

    def validate(self, num_layers: int, n_image: int) -> None:
        """Check the schedule against the model's depth and image-token count; raise ConfigError."""

    def setup(self, state, ctx: PruningContext) -> None:
        """Called once per batch before layer 0."""

    def before_layer(self, layer: int, state, ctx: PruningContext) -> None:
        """Called before every decoder layer."""

    def describe(self) -> dict:
        """The schedule's parameters, for results.json and tables."""
        return {"name": self.name, "keep": self.keep}


class NoPruning(PruningMethod):
    """The dense model: every image token passes every layer."""

    name = "none"


def score_image_tokens(layer: int, state, ctx: PruningContext, query: str) -> torch.Tensor:
    """Query attention [B, n_image] at `layer` (the state being that layer's input); the call is
    recorded in the trace so that accounting can charge it as the method's overhead."""
    n_queries = query_mask(state, query).sum(1).tolist()
    state.trace.overhead.append(
        {"kind": "query_attention", "layer": layer, "tokens": (state.kind != PAD).sum(1).tolist(), "queries": n_queries}
    )
    with torch.no_grad():  # selections are constants, also when fine-tuning under a schedule
        return query_attention(ctx.layers[layer], ctx.rotary_emb, state, query)


def keep_top(state, scores: torch.Tensor, count: int) -> None:
    """Keep the `count` image tokens with the highest scores [B, n_image]; drop the rest for good."""
    if count >= scores.shape[1]:
        return
    state.drop_image(indices_to_mask(topk_indices(scores, count), scores.shape[1]))


def sample_ids(state, ctx: PruningContext) -> list[int]:
    """The dataset idx of each sample (0..B-1 when the caller gave none)."""
    return list(ctx.sample_ids) if ctx.sample_ids is not None else list(range(state.batch_size))
