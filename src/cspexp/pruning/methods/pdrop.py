"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv:2410.17247).

The decoder is split into stages at 1/4, 2/4 and 3/4 of depth; at the start of each later stage
the image tokens are ranked by a query's attention, computed with that layer's own norm and q/k
projections (the paper's "lightweight attention"), and a fraction λ = keep of the remaining ones is
kept — so 256 tokens become 256·λ, 256·λ², 256·λ³. Unlike the original, positions are not
re-indexed after a drop (cspexp keeps original RoPE positions for every method).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.methods.base import PruningMethod, PruningSpec, keep_top, score_image_tokens
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.pruning.scoring import Query
from cspexp.utils.errors import ConfigError


@dataclass(frozen=True)
class PyramidDrop(PruningSpec):
    """Args: keep (λ, the fraction kept at each drop), layers (drop points: indices or fractions),
    query (whose attention ranks the tokens)."""

    name = "pdrop"

    keep: KeepFraction = 0.5
    layers: Sequence[int | float] = (0.25, 0.5, 0.75)
    query: Query = "seg"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(layers=tuple(self.layers))

    def bind(self, num_layers: int, n_image: int) -> BoundPyramidDrop:
        return BoundPyramidDrop(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layers": list(self.layers), "query": self.query}


class BoundPyramidDrop(PruningMethod):
    def __init__(self, spec: PyramidDrop, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        layers_spec = list(spec.layers)
        layers = [resolve_layer(v, num_layers, f"prune.layers[{i}]") for i, v in enumerate(layers_spec)]
        if not layers or any(not 1 <= l <= num_layers - 1 for l in layers) or layers != sorted(set(layers)):
            raise ConfigError(
                f"prune.layers={layers_spec} resolves to {layers}: drop layers must be distinct, increasing "
                f"and within 1..{num_layers - 1}"
            )
        counts, n = [], n_image
        for _ in layers:
            n = n_keep(spec.keep, n)
            counts.append(n)
        self.counts = dict(zip(layers, counts))  # drop layer → image tokens kept from it on
        self.query = spec.query

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer in self.counts:
            keep_top(state, score_image_tokens(layer, state, ctx, self.query), self.counts[layer])
