"""VTW — Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for
Rapid Inference", AAAI 2025 (arXiv:2405.05803); its LISA variant withdraws at layer 20 of 32.

Every image token is withdrawn before layer K (`prune.layer`, default 0.625 of depth = 20 of 32);
K = 0 means the LLM never sees the image. `prune.keep` has no effect: the method keeps none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.methods.base import PruningMethod, PruningSpec
from cspexp.pruning.schedule import resolve_layer


@dataclass(frozen=True)
class VisualTokenWithdrawal(PruningSpec):
    name = "vtw"

    keep: KeepFraction = 1.0
    layer: int | float = 0.625

    def bind(self, num_layers: int, n_image: int) -> BoundVisualTokenWithdrawal:
        return BoundVisualTokenWithdrawal(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": 0.0, "layer": self.layer}


class BoundVisualTokenWithdrawal(PruningMethod):
    def __init__(self, spec: VisualTokenWithdrawal, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.layer = resolve_layer(spec.layer, num_layers, "prune.layer")

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer == self.layer and state.n_image:
            state.drop_image(torch.zeros(state.batch_size, state.n_image, dtype=torch.bool, device=state.hidden.device))
