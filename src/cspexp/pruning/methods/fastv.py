"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (arXiv:2403.06764).

At layer K the image tokens that received the least attention at layer K−1 are dropped for all
later layers (R = 1 − keep of them). FastV ranks by the last token's attention row; in LISA's
teacher-forced prompt the token that plays that role (the one that emits [SEG]) is `prune.query=seg`
(default) — `last` gives FastV's literal choice (here the final ``</s>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.methods.base import PruningMethod, PruningSpec, keep_top, score_image_tokens
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.pruning.scoring import Query
from cspexp.utils.errors import ConfigError


@dataclass(frozen=True)
class FastV(PruningSpec):
    """Args: keep (fraction of image tokens kept after layer K), layer (K: index or fraction of
    depth), query (whose attention ranks the tokens; see `cspexp.pruning.scoring`)."""

    name = "fastv"

    keep: KeepFraction = 0.5
    layer: int | float = 2
    query: Query = "seg"

    def bind(self, num_layers: int, n_image: int) -> BoundFastV:
        return BoundFastV(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layer": self.layer, "query": self.query}


class BoundFastV(PruningMethod):
    def __init__(self, spec: FastV, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.layer = resolve_layer(spec.layer, num_layers, "prune.layer")
        if not 1 <= self.layer <= num_layers - 1:
            raise ConfigError(
                f"prune.layer={spec.layer} (layer {self.layer}) must be in 1..{num_layers - 1}: FastV "
                "ranks with layer K−1's attention and prunes before layer K (for K=0 use prune=random)"
            )
        self.n_keep = n_keep(spec.keep, n_image)
        self.query = spec.query

    def setup(self, state, ctx) -> None:
        state.extras["fastv_scores"] = None

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer == self.layer - 1:
            state.extras["fastv_scores"] = score_image_tokens(layer, state, ctx, self.query)
        elif layer == self.layer:
            keep_top(state, state.extras.pop("fastv_scores"), self.n_keep)
