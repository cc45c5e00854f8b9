"""SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025 (arXiv:2410.04417; code github.com/Gumpest/SparseVLMs, v1).

Why this baseline: it is the text-guided member of the in-LLM pruners. FastV and PyramidDrop rank
image tokens by one query token's attention; SparseVLM first picks the prompt's text tokens that
relate to the image (the *raters*), ranks image tokens by the raters' attention, lets the *rank* of
the raters' attention matrix decide how many to keep at each pruning layer, and does not simply
discard the rest: the best-scored part of the pruned tokens is clustered and each cluster is merged
into one new token (*recycling*).

What the authors' v1 code does (commit b72c5d6, `llava/model/language_model/`; line numbers there):

- raters, once, on the LLM's input embeddings (`modelling_sparse_llama.py` L215-220): the image
  tokens times the text tokens after the image (raw embeddings, no norm, no scaling), softmax over
  the text tokens, mean over the image tokens; the raters are the text tokens whose value is above
  the mean of those values;
- at each layer of ``pruning_loc = [2, 6, 15, 19]`` (L87) the layer runs with its attention
  probabilities returned (L224-235); `score.attn_postprocess_rank` (L23-44): heads averaged (L27),
  the raters' rows over the image columns (L29-30), r = `torch.linalg.matrix_rank` of that matrix
  in float32 with torch's default tolerance (L32), scores = the rows' mean (L33); unless r equals
  the number n of image tokens present (then nothing is pruned, L36, L40-42) the top
  min(int(r·scale + bias), n − 1) are kept (L38), scale 13.5 and bias 0 by default (L129-130);
- recycling (L251-266): of the pruned tokens, the int(0.3·n_pruned) + 1 with the highest scores
  (L256-259) are clustered into int(m/10) + 1 clusters (L262) by `utils.cluster_and_merge`
  (`utils.py` L155-213): density-peaks clustering with k-nearest-neighbour density, k = the
  number of clusters (distances ‖xᵢ − xⱼ‖/√d, density exp(−mean squared distance to the k nearest,
  itself included), a 1e-6 random jitter of the density, the distance to the nearest denser token
  (the largest distance of all for the densest), centres = the top-k of distance × density, every
  token joins its nearest centre, a centre its own cluster); each cluster becomes Σ members /
  (count + 1e-6) of the layer's *output* states; the merged tokens go right after the kept image
  tokens, and the position ids become 0..n−1 (L268-283);
- the merged tokens are image tokens from then on: later pruning layers rank, prune and recycle them
  like the others (L281-283).

cspexp follows that rule; the departures (docs/method.md, "`sparsevlm` — SparseVLM") are: `keep` caps the count
at ⌈keep·N⌉ per pruning layer (keep = 1 removes the cap: the authors' rule); the raters are drawn
from the text up to the [SEG]-producing token (the prefill the authors' rule sees at inference);
the ranking rows are recomputed from the layer's own q/k (charged as overhead) in float32; pairwise
distances come from a Gram matrix in float64; density ties (the jitter's job) go to the recycled
token with the higher score; a merged token takes the original position and grid cell of its
cluster's centre instead of a slot after the image; a batch keeps, at each pruning layer, the largest
of its samples' counts (a batch of one is the authors' rule exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from cspexp.models.lisa import IMAGE, PAD
from cspexp.pruning.engine import Tokens
from cspexp.pruning.merges import record_merges
from cspexp.pruning.methods.base import PruningContext, PruningMethod, PruningSpec
from cspexp.pruning.schedule import n_keep, resolve_layers
from cspexp.pruning.scoring import query_mask
from cspexp.pruning.selection import indices_to_mask, topk_indices
from cspexp.utils.choices import Fraction, KeepFraction, Range
from cspexp.utils.errors import ConfigError

PositiveFloat = Annotated[float, Range(0.0, lo_open=True)]
NonNegativeFloat = Annotated[float, Range(0.0)]

#: The authors' pruning layers [2, 6, 15, 19] of LLaVA-1.5-7B's 32 as fractions of depth (exact on 32 layers).
REFERENCE_LAYERS = (2 / 32, 6 / 32, 15 / 32, 19 / 32)
#: the 1e-6 the authors add to a cluster's count before dividing (`utils.py` L203)
COUNT_EPS = 1e-6


# ----------------------------------------------------------------------------- the rule's pieces
def choose_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[N, d] image and [T, d] candidate text embeddings → [T] bool: the raters.

    A text token's relevance is its softmax share (over the text tokens) of each image token's dot
    products, averaged over the image tokens; the raters are those above the mean relevance. If none
    is (all equal, e.g. one candidate), every candidate rates — the authors' rule would have none."""
    relevance = (image.float() @ text.float().T).softmax(dim=-1).mean(dim=0)  # [T]
    raters = relevance > relevance.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def adaptive_count(rows: torch.Tensor, scale: float, bias: float, cap: int) -> int:
    """How many of the n image tokens one sample keeps, from its raters' rows [R, n].

    r = rank of the rows (`torch.linalg.matrix_rank` in float32, default tolerance, as the authors);
    r = n prunes nothing; otherwise min(int(r·scale + bias), n − 1, cap)."""
    n = rows.shape[1]
    rank = int(torch.linalg.matrix_rank(rows.float()))
    if rank == n:
        return n
    return min(int(rank * scale + bias), n - 1, cap)


def density_peaks(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' `cluster_and_merge` clustering of m tokens x [m, d] into k clusters.

    Returns (centres [k] indices into x, best first; cluster [m] in 0..k−1, a centre in its own).
    Distances ‖xᵢ − xⱼ‖/√d come from the Gram matrix in float64 (the diagonal set to 0); a density
    tie — which the authors break with random jitter — goes to the earlier row of x."""
    m, d = x.shape
    xx = x.double()
    sq = (xx * xx).sum(dim=-1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (xx @ xx.T)).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    dist = dist.sqrt() / math.sqrt(d)
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values  # [m, k], itself (0) included
    density = (-(nearest**2).mean(dim=-1)).exp()
    idx = torch.arange(m, device=x.device)
    # j is denser than i: higher density, or equal density and an earlier row
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values  # the densest gets the largest distance
    score = parent * density
    centres = torch.sort(score, descending=True, stable=True).indices[:k]
    cluster = dist[centres].argmin(dim=0)  # nearest centre (first of equals)
    cluster[centres] = torch.arange(k, device=x.device)
    return centres, cluster


def merge_clusters(x: torch.Tensor, cluster: torch.Tensor, k: int) -> torch.Tensor:
    """[k, d]: Σ members / (count + 1e-6) per cluster (the authors' average), in float32."""
    onehot = torch.zeros(k, x.shape[0], dtype=torch.float32, device=x.device)
    onehot[cluster, torch.arange(x.shape[0], device=x.device)] = 1.0
    return (onehot @ x.float()) / (onehot.sum(dim=1, keepdim=True) + COUNT_EPS)


def rater_rows(layer, rotary_emb, state, raters: torch.Tensor) -> torch.Tensor:
    """[B, R, n_image] attention rows of each sample's raters at `layer` (the state being its input),
    heads averaged, softmax over every visible key (R = the most raters of any sample; a sample's
    rows past its own count are filler). Computed from the layer's own norm and q/k projections with
    RoPE at `state.rope_pos`, as `cspexp.pruning.scoring.query_attention`, without averaging rows."""
    attn = layer.self_attn
    x = layer.input_layernorm(state.hidden)  # [B, n, d]
    B, n, _ = x.shape
    head_dim = attn.head_dim
    width = int(raters.sum(1).max())
    cols = torch.sort((~raters).to(torch.int8), dim=1, stable=True).indices[:, :width]  # raters first
    cos, sin = rotary_emb(x, position_ids=state.rope_pos)
    pick = cols[..., None]
    q = attn.q_proj(torch.gather(x, 1, pick.expand(-1, -1, x.shape[-1])))
    q = q.view(B, width, -1, head_dim).transpose(1, 2)  # [B, H, R, hd]
    k = attn.k_proj(x).view(B, n, -1, head_dim).transpose(1, 2)  # [B, Hkv, n, hd]
    q, _ = apply_rotary_pos_emb(q, q, torch.gather(cos, 1, pick.expand(-1, -1, head_dim)),
                                torch.gather(sin, 1, pick.expand(-1, -1, head_dim)))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * attn.scaling  # [B, H, R, n]
    q_pos = torch.gather(state.pos, 1, cols)
    visible = (state.pos[:, None, :] <= q_pos[:, :, None]) & (state.kind != PAD)[:, None, :]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)  # [B, R, n]
    img = state.image_columns()
    return torch.gather(probs, 2, img[:, None, :].expand(-1, width, -1))


# ----------------------------------------------------------------------------- spec and method
@dataclass(frozen=True)
class SparseVLM(PruningSpec):
    """Text-rated pruning with a rank-adaptive count and recycling of pruned tokens (module docstring).

    Args:
        keep: caps the image tokens kept at each pruning layer at ⌈keep·N⌉ (merged tokens come on
            top); 1.0 removes the cap — the authors' rule.
        layers: the layers whose attention ranks the image tokens (the authors' ``pruning_loc``);
            the tokens leave after that layer, before the next. Indices or fractions of depth.
        scale: λ, kept tokens per unit of rank (the authors' ``--scale``).
        bias: added to r·λ before truncation (the authors' ``--bias``).
        recycle: merge part of the pruned tokens into new tokens (False: they are just dropped).
        recycle_ratio: int(ratio·n_pruned) + 1 of the pruned tokens, the best-scored, are recycled.
        cluster_ratio: they form int(ratio·m) + 1 clusters, one merged token each.
    """

    name: ClassVar[str] = "sparsevlm"

    keep: KeepFraction = 0.333
    layers: Sequence[int | float] = REFERENCE_LAYERS
    scale: PositiveFloat = 13.5
    bias: NonNegativeFloat = 0.0
    recycle: bool = True
    recycle_ratio: Fraction = 0.3
    cluster_ratio: Fraction = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("recycle_ratio", "cluster_ratio"):
            value = getattr(self, key)
            if not value < 1.0:  # int(1.0·n) + 1 would ask for more tokens than there are
                raise ConfigError(f"prune.{key}={value!r} must be < 1")
        self._set(layers=tuple(self.layers), scale=float(self.scale), bias=float(self.bias),
                  recycle_ratio=float(self.recycle_ratio), cluster_ratio=float(self.cluster_ratio))

    def bind(self, num_layers: int, n_image: int) -> BoundSparseVLM:
        return BoundSparseVLM(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "layers": list(self.layers), "scale": self.scale,
                "bias": self.bias, "recycle": self.recycle, "recycle_ratio": self.recycle_ratio,
                "cluster_ratio": self.cluster_ratio}


class BoundSparseVLM(PruningMethod):
    """`SparseVLM` resolved against a model: its scoring layers and the per-layer cap."""

    def __init__(self, spec: SparseVLM, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.layers = resolve_layers(spec.layers, num_layers, "prune.layers", 0, num_layers - 2,
                                     "SparseVLM's scoring layers", "the tokens leave before the layer after each")
        self.cap = n_keep(spec.keep, n_image)
        self.scale, self.bias = spec.scale, spec.bias
        self.recycle, self.recycle_ratio, self.cluster_ratio = spec.recycle, spec.recycle_ratio, spec.cluster_ratio

    # ------------------------------------------------------------------ hooks
    def setup(self, state, ctx: PruningContext) -> None:
        with torch.no_grad():
            raters = self.raters(state)
        # raters: [B, n] bool by original position; pending: a ranking waiting for the next layer;
        # recycled: per pruning step, the recycled tokens' grid cells, cluster ids and centres (for
        # pictures and tests; nothing reads it back)
        state.extras["sparsevlm"] = {"raters": raters, "pending": None, "recycled": []}

    def before_layer(self, layer: int, state, ctx: PruningContext) -> None:
        own = state.extras["sparsevlm"]
        if own["pending"] is not None and layer == own["pending"]["at"]:
            pending, own["pending"] = own["pending"], None
            with torch.no_grad():
                self.prune(state, pending)
        if layer in self.layers and state.n_image > 0:
            with torch.no_grad():
                own["pending"] = self.score(layer, state, ctx, own["raters"])

    # ------------------------------------------------------------------ steps
    def raters(self, state) -> torch.Tensor:
        """[B, n] bool over original positions: each sample's raters, chosen on the input embeddings
        from its text after the image up to the [SEG]-producing token."""
        candidates = query_mask(state, "text_mean")
        image = state.kind == IMAGE
        by_pos = torch.zeros(state.batch_size, int(state.pos.max()) + 1, dtype=torch.bool, device=state.pos.device)
        for b in range(state.batch_size):
            chosen = choose_raters(state.hidden[b][image[b]], state.hidden[b][candidates[b]])
            by_pos[b, state.pos[b][candidates[b]][chosen]] = True
        state.trace.overhead.append({"kind": "matmul", "what": "sparsevlm rater relevance (image·textᵀ)",
                                     "m": int(image[0].sum()), "n": candidates.sum(1).tolist(),
                                     "k": int(state.hidden.shape[-1]), "widths": {"k": "hidden"}})
        return by_pos

    def score(self, layer: int, state, ctx: PruningContext, raters_by_pos: torch.Tensor) -> dict:
        """Rank at `layer`: the raters' rows, per-sample counts and their batch reduction (the largest)."""
        raters = torch.gather(raters_by_pos, 1, state.pos)  # [B, n] the raters' columns now
        n_raters = raters.sum(1)
        state.trace.overhead.append({"kind": "query_attention", "layer": layer,
                                     "tokens": (state.kind != PAD).sum(1).tolist(), "queries": n_raters.tolist()})
        rows = rater_rows(ctx.layers[layer], ctx.rotary_emb, state, raters)  # [B, R, n]
        counts = [adaptive_count(rows[b, : int(r)], self.scale, self.bias, self.cap) for b, r in enumerate(n_raters)]
        weight = (torch.arange(rows.shape[1], device=rows.device)[None, :] < n_raters[:, None]).float()
        scores = (rows * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)  # mean over each sample's raters
        return {"at": layer + 1, "scores": scores, "count": max(counts)}

    def prune(self, state, pending: dict) -> None:
        """Keep the top `count` by score; recycle the best-scored of the rest into merged tokens."""
        scores, count = pending["scores"], pending["count"]
        B, n = scores.shape
        if count >= n:
            return
        keep = indices_to_mask(topk_indices(scores, count), n)
        dropped = state.drop_image(keep)  # the pruned tokens, in position order (= their order in scores)
        if not self.recycle:
            return
        n_pruned = n - count
        m = int(n_pruned * self.recycle_ratio) + 1
        k = int(m * self.cluster_ratio) + 1
        pruned_scores = scores[~keep].view(B, n_pruned)
        # the m best-scored pruned tokens, best first (ties: earlier position), as the authors' topk
        chosen = torch.sort(pruned_scores, dim=1, descending=True, stable=True).indices[:, :m]
        d = state.hidden.shape[-1]
        hidden, centre_cols, clusters = [], [], []
        for b in range(B):
            x = dropped.hidden[b][chosen[b]]  # [m, d]
            centres, cluster = density_peaks(x, k)
            hidden.append(merge_clusters(x, cluster, k))
            centre_cols.append(chosen[b][centres])
            clusters.append(cluster)
        state.trace.overhead.append({"kind": "matmul", "what": "sparsevlm recycled-token Gram matrix", "m": m,
                                     "n": m, "k": d, "widths": {"k": "hidden"}})
        state.trace.overhead.append({"kind": "matmul", "what": "sparsevlm cluster merge", "m": k, "n": d, "k": m,
                                     "widths": {"n": "hidden"}})
        cols = torch.stack(centre_cols)  # [B, k] the centres among the pruned tokens
        recycled = {"at": pending["at"], "grid": torch.gather(dropped.grid, 1, chosen),
                    "cluster": torch.stack(clusters), "centres": torch.gather(dropped.grid, 1, cols)}
        state.extras["sparsevlm"]["recycled"].append(recycled)
        record_merges(state, recycled["centres"], recycled["grid"], recycled["cluster"])
        pos = torch.gather(dropped.pos, 1, cols)
        state.insert(Tokens(hidden=torch.stack(hidden).to(state.hidden.dtype), pos=pos,
                            kind=torch.full_like(pos, IMAGE), grid=torch.gather(dropped.grid, 1, cols),
                            rope_pos=pos.clone()))
