"""Attention-free baselines: drop image tokens at one layer by a fixed rule.

- `random`: a seeded random subset (per sample: the seed is combined with the dataset idx, so a
  sample gets the same subset in any batch);
- `uniform`: an even 2-D grid stride (the same lattice as csp's ``uniform`` clustering).
Both are the "is attention even needed?" controls used across the token-pruning literature
(e.g. FastV's random-drop ablation, arXiv:2403.06764 §5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from cspexp.pruning.methods.base import PruningMethod, sample_ids
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.pruning.selection import indices_to_mask, random_indices, sample_seed, uniform_grid
from cspexp.utils.errors import ConfigError


class _DropAtLayer(PruningMethod, ABC):
    def __init__(self, keep: float = 0.5, layer: int | float = 2) -> None:
        super().__init__(keep)
        self.layer_spec = layer

    def validate(self, num_layers: int, n_image: int) -> None:
        self.layer = resolve_layer(self.layer_spec, num_layers, "prune.layer")
        if self.layer >= num_layers:
            raise ConfigError(f"prune.layer={self.layer_spec} must be below the model's depth {num_layers}")
        self.n_keep = n_keep(self.keep, n_image)

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer == self.layer:
            state.drop_image(self.choose(state, ctx).to(state.hidden.device))

    @abstractmethod
    def choose(self, state, ctx) -> torch.Tensor:
        """[B, n_image] bool: the image tokens to keep."""

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layer": self.layer_spec}


class RandomDrop(_DropAtLayer):
    name = "random"

    def __init__(self, keep: float = 0.5, layer: int | float = 2, seed: int = 0) -> None:
        super().__init__(keep, layer)
        self.seed = seed

    def choose(self, state, ctx) -> torch.Tensor:
        n = state.n_image
        rows = [random_indices(self.n_keep, n, sample_seed(self.seed, i)) for i in sample_ids(state, ctx)]
        return indices_to_mask(torch.stack(rows), n)

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed}


class UniformDrop(_DropAtLayer):
    name = "uniform"

    def choose(self, state, ctx) -> torch.Tensor:
        rows, cols = ctx.grid_size
        chosen = uniform_grid(self.n_keep, rows, cols).to(state.grid.device)
        grid = torch.gather(state.grid, 1, state.image_columns())  # grid index of each image token
        return torch.isin(grid, chosen)
