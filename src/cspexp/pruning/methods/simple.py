"""Attention-free baselines: drop image tokens at one layer by a fixed rule.

- `random`: a seeded random subset (per sample: the seed is combined with the dataset idx, so a
  sample gets the same subset in any batch);
- `uniform`: an even 2-D grid stride (the same lattice as csp's ``uniform`` clustering).
Both are the "is attention even needed?" controls used across the token-pruning literature
(e.g. FastV's random-drop ablation, arXiv:2403.06764 §5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.methods.base import PruningMethod, PruningSpec, sample_ids
from cspexp.pruning.schedule import n_keep, resolve_layer
from cspexp.pruning.selection import indices_to_mask, random_indices, sample_seed, uniform_grid
from cspexp.utils.errors import ConfigError


@dataclass(frozen=True)
class _DropAtLayer(PruningSpec, ABC):
    keep: KeepFraction = 0.5
    layer: int | float = 2

    @abstractmethod
    def bind(self, num_layers: int, n_image: int) -> _BoundDropAtLayer: ...

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layer": self.layer}


class _BoundDropAtLayer(PruningMethod, ABC):
    def __init__(self, spec: _DropAtLayer, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.layer = resolve_layer(spec.layer, num_layers, "prune.layer")
        if self.layer >= num_layers:
            raise ConfigError(f"prune.layer={spec.layer} must be below the model's depth {num_layers}")
        self.n_keep = n_keep(spec.keep, n_image)

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer == self.layer:
            state.drop_image(self.choose(state, ctx).to(state.hidden.device))

    @abstractmethod
    def choose(self, state, ctx) -> torch.Tensor:
        """[B, n_image] bool: the image tokens to keep."""


@dataclass(frozen=True)
class RandomDrop(_DropAtLayer):
    name = "random"

    seed: int = 0

    def bind(self, num_layers: int, n_image: int) -> BoundRandomDrop:
        return BoundRandomDrop(self, num_layers, n_image)

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed}


class BoundRandomDrop(_BoundDropAtLayer):
    def __init__(self, spec: RandomDrop, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.seed = spec.seed

    def choose(self, state, ctx) -> torch.Tensor:
        n = state.n_image
        rows = [random_indices(self.n_keep, n, sample_seed(self.seed, i)) for i in sample_ids(state, ctx)]
        return indices_to_mask(torch.stack(rows), n)


@dataclass(frozen=True)
class UniformDrop(_DropAtLayer):
    name = "uniform"

    def bind(self, num_layers: int, n_image: int) -> BoundUniformDrop:
        return BoundUniformDrop(self, num_layers, n_image)


class BoundUniformDrop(_BoundDropAtLayer):
    def choose(self, state, ctx) -> torch.Tensor:
        rows, cols = ctx.grid_size
        chosen = uniform_grid(self.n_keep, rows, cols).to(state.grid.device)
        grid = torch.gather(state.grid, 1, state.image_columns())  # grid index of each image token
        return torch.isin(grid, chosen)
