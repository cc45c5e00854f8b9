"""VTW — Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for
Rapid Inference", AAAI 2025 (arXiv:2405.05803); its LISA variant withdraws at layer 20 of 32.

Every image token is withdrawn before layer K (`prune.layer`, default 0.625 of depth = 20 of 32);
K = 0 means the LLM never sees the image. `prune.keep` has no effect: the method keeps none.
"""

from __future__ import annotations

import torch

from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.schedule import resolve_layer


class VisualTokenWithdrawal(PruningMethod):
    name = "vtw"

    def __init__(self, keep: float = 1.0, layer: int | float = 0.625) -> None:
        super().__init__(keep)
        self.layer_spec = layer

    def validate(self, num_layers: int, n_image: int) -> None:
        self.layer = resolve_layer(self.layer_spec, num_layers, "prune.layer")

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer == self.layer and state.n_image:
            state.drop_image(torch.zeros(state.batch_size, state.n_image, dtype=torch.bool, device=state.hidden.device))

    def describe(self) -> dict:
        return {"name": self.name, "keep": 0.0, "layer": self.layer_spec}
