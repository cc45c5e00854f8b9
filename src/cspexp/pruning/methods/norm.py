"""Norm: at layer K keep the image tokens whose hidden state (layer K's input) has the largest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.methods.base import PruningMethod, PruningSpec, keep_top
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.utils.errors import require


@dataclass(frozen=True)
class NormDrop(PruningSpec):
    """Before layer K keep the ⌈keep·N⌉ image tokens whose input hidden state has the largest L2 norm;
    the others are dropped for every later layer. Ties go to the earlier grid position.

    Args:
        keep: the fraction of image tokens kept, in (0, 1].
        layer: K, an index (0 ≤ K < number of layers) or a fraction of depth.
    """

    name: ClassVar[str] = "norm"

    keep: KeepFraction = 0.5
    layer: int | float = 2

    def bind(self, num_layers: int, n_image: int) -> BoundNormDrop:
        return BoundNormDrop(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layer": self.layer}


class BoundNormDrop(PruningMethod):
    """`NormDrop` resolved against a model: the layer index K and the kept count ⌈keep·N⌉."""

    def __init__(self, spec: NormDrop, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.layer = resolve_layer(spec.layer, num_layers, "prune.layer")
        require(self.layer < num_layers,
                f"prune.layer={spec.layer} resolves to layer {self.layer}; it must be a layer of the model, "
                f"0..{num_layers - 1}")
        self.count = n_keep(spec.keep, n_image)

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer != self.layer:
            return
        with torch.no_grad():  # a selection is a constant, also when fine-tuning
            hidden = state.take(state.image_columns()).hidden  # [B, n_image, d] in position order
            scores = hidden.float().norm(dim=-1)  # [B, n_image]
        keep_top(state, scores, self.count)
