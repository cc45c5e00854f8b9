"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv:2410.17247).

The decoder is split into stages at 1/4, 2/4 and 3/4 of depth; at the start of each later stage
the image tokens are ranked by a query's attention, computed with that layer's own norm and q/k
projections (the paper's "lightweight attention"), and a fraction λ = keep of the remaining ones is
kept — so 256 tokens become 256·λ, 256·λ², 256·λ³. Unlike the original, positions are not
re-indexed after a drop (cspexp keeps original RoPE positions for every method).
"""

from __future__ import annotations

from cspexp.pruning.methods.base import PruningMethod, keep_top, score_image_tokens
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.pruning.scoring import check_query
from cspexp.utils.errors import ConfigError


class PyramidDrop(PruningMethod):
    """Args: keep (λ, the fraction kept at each drop), layers (drop points: indices or fractions),
    query (whose attention ranks the tokens)."""

    name = "pdrop"

    def __init__(self, keep: float = 0.5, layers=(0.25, 0.5, 0.75), query: str = "seg") -> None:
        super().__init__(keep)
        check_query(query)
        self.layers_spec, self.query = list(layers), query

    def validate(self, num_layers: int, n_image: int) -> None:
        layers = [resolve_layer(v, num_layers, f"prune.layers[{i}]") for i, v in enumerate(self.layers_spec)]
        if not layers or any(not 1 <= l <= num_layers - 1 for l in layers) or layers != sorted(set(layers)):
            raise ConfigError(
                f"prune.layers={self.layers_spec} resolves to {layers}: drop layers must be distinct, increasing "
                f"and within 1..{num_layers - 1}"
            )
        self.drop_layers = layers
        counts, n = [], n_image
        for _ in layers:
            n = n_keep(self.keep, n)
            counts.append(n)
        self.counts = dict(zip(layers, counts))

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer in self.counts:
            keep_top(state, score_image_tokens(layer, state, ctx, self.query), self.counts[layer])

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layers": self.layers_spec, "query": self.query}
