"""LVLM_CSP — Chen et al., "LVLM_CSP: Accelerating Large Vision Language Models via Clustering,
Scattering, and Pruning for Reasoning Segmentation", arXiv:2504.10854 (2025).

Three consecutive stages over the decoder (defaults from DESIGN §5; the paper leaves them open):

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

import torch

from cspexp.pruning.engine import Tokens
from cspexp.pruning.methods.base import PruningMethod, keep_top, sample_ids, score_image_tokens
from cspexp.pruning.schedule import check_fraction, n_keep, resolve_span
from cspexp.pruning.scoring import check_query
from cspexp.pruning.segmenters import SEGMENTERS, build_segmenter, labels_to_grid
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

SELECT = ("uniform", "random", "cls_attn", "seg_first")
ASSIGN = ("grid", "feature")
SCATTER = ("residual", "copy", "reset")

CLUSTER_DEFAULTS = {
    "span": [0.0, 0.25],
    "ratio": 0.25,
    "select": "uniform",
    "assign": "grid",
    "seed": 0,
    "segmenter": "superpixel",
    "yolo_weights": None,
    "n_segments": 16,
}
SCATTER_DEFAULTS = {"span": [0.25, 0.5], "mode": "residual"}


def _choice(value, allowed, key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of {list(allowed)}")
    return value


class ClusterScatterPrune(PruningMethod):
    """Args: keep (fraction kept by the pruning stage), query (whose attention ranks tokens for
    pruning), cluster / scatter (dicts; keys as in ``conf/prune/csp.yaml``)."""

    name = "csp"

    def __init__(self, keep: float = 0.1, query: str = "seg", cluster: dict | None = None,
                 scatter: dict | None = None) -> None:
        super().__init__(keep)
        check_query(query)
        self.query = query
        unknown = set(cluster or {}) - CLUSTER_DEFAULTS.keys()
        unknown |= {f"scatter.{k}" for k in set(scatter or {}) - SCATTER_DEFAULTS.keys()}
        if unknown:
            raise ConfigError(f"unknown csp settings {sorted(unknown)}; cluster has {sorted(CLUSTER_DEFAULTS)}, "
                              f"scatter has {sorted(SCATTER_DEFAULTS)}")
        self.cluster = {**CLUSTER_DEFAULTS, **(cluster or {})}
        self.scatter = {**SCATTER_DEFAULTS, **(scatter or {})}
        c, s = self.cluster, self.scatter
        self.ratio = check_fraction(c["ratio"], "prune.cluster.ratio")
        self.select = _choice(c["select"], SELECT, "prune.cluster.select")
        self.assign = _choice(c["assign"], ASSIGN, "prune.cluster.assign")
        self.mode = _choice(s["mode"], SCATTER, "prune.scatter.mode")
        self.segmenter = None
        if self.select == "seg_first":
            _choice(c["segmenter"], SEGMENTERS, "prune.cluster.segmenter")
            if c["segmenter"] == "yolo" and not c["yolo_weights"]:
                raise ConfigError("prune.cluster.select=seg_first with segmenter=yolo needs prune.cluster.yolo_weights=<path>")

    @property
    def needs_cls_attention(self) -> bool:
        return self.select == "cls_attn"

    def validate(self, num_layers: int, n_image: int) -> None:
        c0, c1 = resolve_span(self.cluster["span"], num_layers, "prune.cluster.span")
        s0, s1 = resolve_span(self.scatter["span"], num_layers, "prune.scatter.span")
        if s0 < c1:
            raise ConfigError(f"prune.cluster.span [{c0}, {c1}) and prune.scatter.span [{s0}, {s1}) overlap")
        if s0 > c1:
            raise ConfigError(f"prune.scatter.span must start where prune.cluster.span ends (layer {c1}), not at {s0}")
        if s1 == s0:
            raise ConfigError(f"prune.scatter.span [{s0}, {s1}) is empty: the pruning stage ranks tokens in the last "
                              "scattering layer, and parked tokens return there")
        n_c = int(self.ratio * n_image + 1e-9)
        if n_c < 1:
            raise ConfigError(f"prune.cluster.ratio={self.ratio} gives N_c = ⌊{self.ratio}·{n_image}⌋ = 0 < 1 representative")
        self.c0, self.c1, self.s1, self.num_layers = c0, c1, s1, num_layers
        self.n_c, self.n_image = n_c, n_image
        self.n_keep = n_keep(self.keep, n_image)
        if self.select == "seg_first" and self.segmenter is None:
            self.segmenter = build_segmenter(self.cluster["segmenter"], self.cluster["yolo_weights"],
                                             self.cluster["n_segments"])

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
            return torch.stack([random_indices(self.n_c, N, sample_seed(self.cluster["seed"], i))
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

    def describe(self) -> dict:
        return {
            "name": self.name,
            "keep": self.keep,
            "query": self.query,
            "cluster": {k: v for k, v in self.cluster.items()},
            "scatter": dict(self.scatter),
        }
