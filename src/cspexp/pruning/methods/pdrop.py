"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv:2410.17247).

The decoder is split into stages at 1/4, 2/4 and 3/4 of depth; at the start of each later stage
the image tokens are ranked by a query's attention, computed with that layer's own norm and q/k
projections (the paper's "lightweight attention"), and the top ones are kept. Two settings choose
between cspexp's rule and the authors' code (the pdrop section of docs/method.md):

- `count`: `remaining` (default) keeps ⌈λ·n⌉ of the n tokens still present at each drop (256 →
  128 → 64 → 32 at λ = 0.5; 74 / 22 / 7 at λ = 0.288); `original` keeps ⌊N·λ^s⌋ of the original N
  at the s-th drop, as the authors' ratio list does (73 / 21 / 6 at λ = 0.288).
- `positions`: `keep` (default) leaves every token its original RoPE position, the rule of every
  cspexp method; `renumber` gives the tokens present RoPE positions 0..n−1 after each drop, as the
  authors' code resets its position ids. Order and causal mask are the original ones either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.methods.base import PruningMethod, PruningSpec, keep_top, score_image_tokens
from cspexp.pruning.schedule import n_keep, resolve_layers
from cspexp.pruning.scoring import Query
from cspexp.utils.errors import ConfigError


def original_counts(keep: float, n_image: int, stages: int) -> list[int]:
    """⌊N·λ^s⌋ for s = 1..stages (PyramidDrop's `int(N * ratio_s)` with ratio_s = λ^s).

    λ is read as the decimal it is written as (`Fraction(repr(λ))`, e.g. exactly 288/1000), so the
    product is exact rational arithmetic: 0.29·100 is 29, where float arithmetic gives 28.999… → 28.
    """
    lam = Fraction(repr(float(keep)))
    return [math.floor(n_image * lam**s) for s in range(1, stages + 1)]


def remaining_counts(keep: float, n_image: int, stages: int) -> list[int]:
    """⌈λ·n⌉ of the n tokens still present, stage after stage (`schedule.n_keep`)."""
    counts, n = [], n_image
    for _ in range(stages):
        n = n_keep(keep, n)
        counts.append(n)
    return counts


@dataclass(frozen=True)
class PyramidDrop(PruningSpec):
    """Args: keep (λ, the fraction kept at each drop), layers (drop points: indices or fractions),
    query (whose attention ranks the tokens), count (remaining: ⌈λ·n⌉ of those present; original:
    ⌊N·λ^s⌋ of the original N at the s-th drop), positions (keep: original RoPE positions; renumber:
    0..n−1 after each drop)."""

    name = "pdrop"

    keep: KeepFraction = 0.5
    layers: Sequence[int | float] = (0.25, 0.5, 0.75)
    query: Query = "seg"
    count: Literal["remaining", "original"] = "remaining"
    positions: Literal["keep", "renumber"] = "keep"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(layers=tuple(self.layers))

    def bind(self, num_layers: int, n_image: int) -> BoundPyramidDrop:
        return BoundPyramidDrop(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layers": list(self.layers), "query": self.query,
                "count": self.count, "positions": self.positions}


class BoundPyramidDrop(PruningMethod):
    def __init__(self, spec: PyramidDrop, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        layers = list(resolve_layers(spec.layers, num_layers, "prune.layers", 1, num_layers - 1, "drop layers"))
        if spec.count == "original":
            counts = original_counts(spec.keep, n_image, len(layers))
            if 0 in counts:
                s = counts.index(0) + 1
                raise ConfigError(
                    f"prune.keep={spec.keep} with prune.count=original keeps ⌊{n_image}·{spec.keep}^{s}⌋ = 0 image "
                    f"tokens at drop {s} (layer {layers[s - 1]}): raise prune.keep, use fewer prune.layers, or "
                    f"prune.count=remaining"
                )
        else:
            counts = remaining_counts(spec.keep, n_image, len(layers))
        self.counts = dict(zip(layers, counts))  # drop layer → image tokens kept from it on
        self.query = spec.query
        self.renumber = spec.positions == "renumber"

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer in self.counts:
            keep_top(state, score_image_tokens(layer, state, ctx, self.query), self.counts[layer])
            if self.renumber:
                state.renumber()
