"""LVLM_CSP — Chen et al., "LVLM_CSP: Accelerating Large Vision Language Models via Clustering,
Scattering, and Pruning for Reasoning Segmentation", arXiv:2504.10854 (2025).

Three consecutive stages over the decoder (the paper leaves the stage boundaries open; the defaults
below are ours):

1. **clustering** ``cluster.span`` = [0, 0.25): only N_c = ⌊cluster.ratio · N⌋ representative image
   tokens enter (``cluster.select``: uniform 2-D stride, seeded random, CLIP [CLS] attention, or
   ``seg_first`` instance quotas). Every other image token joins a representative
   (``cluster.assign``: nearest on the grid, or most similar feature) and is *parked* with the state
   it had when clustering began (layer 0 by default).
2. **scattering** ``scatter.span`` = [0.25, 0.5): all parked tokens return, back in position order.
   ``scatter.mode``: ``residual`` (own parked state + its representative's update over the
   clustering layers — default), ``copy`` (the representative's state), ``reset`` (own parked state).
3. **pruning** [scatter end, L): the image tokens are ranked by the attention of the query token
   (``query``, default the [SEG]-producing token) in the last scattering layer, and ⌈keep · N⌉ are
   kept for the remaining layers.

With L = 32, N = 256: 8 layers × 64 + 8 × 256 + 16 × 26 image tokens (keep 0.1) ≈ 36 % of dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch

from cspexp.utils.choices import KeepFraction
from cspexp.pruning.engine import Tokens
from cspexp.pruning.methods.base import PruningMethod, PruningSpec, keep_top, sample_ids, score_image_tokens
from cspexp.pruning.schedule import check_fraction, n_keep, resolve_span
from cspexp.pruning.scoring import Query
from cspexp.pruning.segmenters import Segmenter, build_segmenter, labels_to_grid
from cspexp.pruning.selection import (
    assign_feature,
    assign_grid,
    indices_to_mask,
    random_indices,
    sample_seed,
    seg_first_select,
    topk_indices,
    uniform_grid,
)
from cspexp.utils.errors import ConfigError

Select = Literal["uniform", "random", "cls_attn", "seg_first"]
Assign = Literal["grid", "feature"]
ScatterMode = Literal["residual", "copy", "reset"]


class ClusterSettings(TypedDict, total=False):
    """``prune.cluster``: the clustering stage."""

    span: Sequence[int | float]  # [start, end) in layers or fractions of depth
    ratio: float  # N_c = ⌊ratio·N⌋ representatives
    select: Select  # how the representatives are chosen
    assign: Assign  # how the other tokens join a representative
    seed: int  # select=random
    segmenter: Segmenter  # select=seg_first
    yolo_weights: str | None  # segmenter=yolo
    n_segments: int  # segmenter=superpixel


class ScatterSettings(TypedDict, total=False):
    """``prune.scatter``: the scattering stage."""

    span: Sequence[int | float]  # parked tokens return at its start; pruning starts at its end
    mode: ScatterMode  # what the returning tokens hold


CLUSTER_DEFAULTS: ClusterSettings = {
    "span": [0.0, 0.25],
    "ratio": 0.25,
    "select": "uniform",
    "assign": "grid",
    "seed": 0,
    "segmenter": "superpixel",
    "yolo_weights": None,
    "n_segments": 16,
}
SCATTER_DEFAULTS: ScatterSettings = {"span": [0.25, 0.5], "mode": "residual"}


@dataclass(frozen=True)
class ClusterScatterPrune(PruningSpec):
    """Args: keep (fraction kept by the pruning stage), query (whose attention ranks tokens for
    pruning), cluster / scatter (dicts; keys as in ``conf/prune/csp.yaml``, missing ones take the
    defaults above)."""

    name = "csp"

    keep: KeepFraction = 0.1
    query: Query = "seg"
    cluster: ClusterSettings | None = None
    scatter: ScatterSettings | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        cluster, scatter = self.cluster or {}, self.scatter or {}
        unknown = set(cluster) - CLUSTER_DEFAULTS.keys()
        unknown |= {f"scatter.{k}" for k in set(scatter) - SCATTER_DEFAULTS.keys()}
        if unknown:
            raise ConfigError(f"unknown csp settings {sorted(unknown)}; cluster has {sorted(CLUSTER_DEFAULTS)}, "
                              f"scatter has {sorted(SCATTER_DEFAULTS)}")
        self._set(cluster={**CLUSTER_DEFAULTS, **cluster}, scatter={**SCATTER_DEFAULTS, **scatter})
        check_fraction(self.cluster["ratio"], "prune.cluster.ratio")
        if self.select == "seg_first" and self.cluster["segmenter"] == "yolo" and not self.cluster["yolo_weights"]:
            raise ConfigError("prune.cluster.select=seg_first with segmenter=yolo needs prune.cluster.yolo_weights=<path>")

    @property
    def ratio(self) -> float:
        return float(self.cluster["ratio"])

    @property
    def select(self) -> Select:
        return self.cluster["select"]

    @property
    def needs_cls_attention(self) -> bool:
        return self.select == "cls_attn"

    @property
    def needs_images(self) -> bool:
        return self.select in ("cls_attn", "seg_first")

    def bind(self, num_layers: int, n_image: int) -> BoundClusterScatterPrune:
        return BoundClusterScatterPrune(self, num_layers, n_image)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "keep": self.keep,
            "query": self.query,
            "cluster": {k: v for k, v in self.cluster.items()},
            "scatter": dict(self.scatter),
        }


class BoundClusterScatterPrune(PruningMethod):
    def __init__(self, spec: ClusterScatterPrune, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        c0, c1 = resolve_span(spec.cluster["span"], num_layers, "prune.cluster.span")
        s0, s1 = resolve_span(spec.scatter["span"], num_layers, "prune.scatter.span")
        if s0 < c1:
            raise ConfigError(f"prune.cluster.span [{c0}, {c1}) and prune.scatter.span [{s0}, {s1}) overlap")
        if s0 > c1:
            raise ConfigError(f"prune.scatter.span must start where prune.cluster.span ends (layer {c1}), not at {s0}")
        if s1 == s0:
            raise ConfigError(f"prune.scatter.span [{s0}, {s1}) is empty: the pruning stage ranks tokens in the last "
                              "scattering layer, and parked tokens return there")
        ratio = spec.ratio
        n_c = int(ratio * n_image + 1e-9)
        if n_c < 1:
            raise ConfigError(f"prune.cluster.ratio={ratio} gives N_c = ⌊{ratio}·{n_image}⌋ = 0 < 1 representative")
        self.c0, self.c1, self.s1 = c0, c1, s1
        self.n_c = n_c
        self.n_keep = n_keep(spec.keep, n_image)
        self.query = spec.query
        self.select, self.seed = spec.select, spec.cluster["seed"]
        self.assign, self.mode = spec.cluster["assign"], spec.scatter["mode"]
        self.segmenter = None
        if self.select == "seg_first":
            self.segmenter = build_segmenter(spec.cluster["segmenter"], spec.cluster["yolo_weights"],
                                             spec.cluster["n_segments"])

    # ------------------------------------------------------------------ the schedule
    @property
    def clusters(self) -> bool:
        return self.c1 > self.c0 and self.n_c < self.n_image

    @property
    def prunes(self) -> bool:
        return self.s1 < self.num_layers and self.n_keep < self.n_image

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer == self.c0 and self.clusters:
            self._cluster(state, ctx)
        if layer == self.c1 and "csp_parked" in state.extras:
            self._scatter(state)
        if layer == self.s1 - 1 and self.prunes:
            state.extras["csp_scores"] = score_image_tokens(layer, state, ctx, self.query)
        if layer == self.s1 and self.prunes:
            keep_top(state, state.extras.pop("csp_scores"), self.n_keep)

    # ------------------------------------------------------------------ stages
    def representatives(self, state, ctx) -> torch.Tensor:
        """[B, N_c] grid indices of the representatives, sorted."""
        rows, cols = ctx.grid_size
        B, N = state.batch_size, rows * cols
        if self.select == "uniform":
            return uniform_grid(self.n_c, rows, cols).expand(B, -1)
        if self.select == "random":
            return torch.stack([random_indices(self.n_c, N, sample_seed(self.seed, i))
                                for i in sample_ids(state, ctx)])
        if self.select == "cls_attn":
            if ctx.cls_attention is None:
                raise RuntimeError("cluster.select=cls_attn needs the CLIP [CLS] attention in the context")
            return topk_indices(ctx.cls_attention, self.n_c).cpu()
        if ctx.images is None:
            raise RuntimeError("cluster.select=seg_first needs the original images in the context")
        return torch.stack([
            seg_first_select(labels_to_grid(self.segmenter(img), rows, cols), self.n_c, rows, cols)
            for img in ctx.images
        ])

    def _cluster(self, state, ctx) -> None:
        device = state.hidden.device
        img_cols = state.image_columns()
        if state.n_image != self.n_image:
            raise RuntimeError("csp clustering expects every image token to be present when it starts")
        reps = self.representatives(state, ctx).to(device)  # [B, N_c] grid indices
        is_rep = indices_to_mask(reps, self.n_image)  # over image tokens in grid (= position) order
        members = torch.sort((is_rep).to(torch.int8), dim=1, stable=True).indices[:, : self.n_image - self.n_c]
        members = torch.sort(members, dim=1).values  # [B, M] grid indices of the parked tokens
        hidden_img = torch.gather(state.hidden, 1, img_cols[..., None].expand(-1, -1, state.hidden.shape[-1]))
        rep_h = torch.gather(hidden_img, 1, reps[..., None].expand(-1, -1, hidden_img.shape[-1]))
        if self.assign == "grid":
            assignment = assign_grid(reps, members, ctx.grid_size[1])
        else:
            mem_h = torch.gather(hidden_img, 1, members[..., None].expand(-1, -1, hidden_img.shape[-1]))
            assignment = assign_feature(rep_h, mem_h)
            state.trace.overhead.append({"kind": "assign_feature", "members": int(members.shape[1]),
                                         "reps": int(reps.shape[1]), "dim": int(hidden_img.shape[-1])})
        parked = state.drop_image(is_rep)
        state.extras["csp_parked"] = parked
        state.extras["csp_assignment"] = assignment
        state.extras["csp_rep_start"] = rep_h

    def _scatter(self, state) -> None:
        parked: Tokens = state.extras.pop("csp_parked")
        assignment = state.extras.pop("csp_assignment")
        rep_start = state.extras.pop("csp_rep_start")
        d = state.hidden.shape[-1]
        rep_now = torch.gather(state.hidden, 1, state.image_columns()[..., None].expand(-1, -1, d))
        index = assignment[..., None].expand(-1, -1, d)
        if self.mode == "residual":
            update = rep_now - rep_start.to(rep_now.dtype)
            hidden = parked.hidden + torch.gather(update, 1, index)
        elif self.mode == "copy":
            hidden = torch.gather(rep_now, 1, index)
        else:  # reset
            hidden = parked.hidden
        state.insert(Tokens(hidden=hidden, pos=parked.pos, kind=parked.kind, grid=parked.grid))
