"""DivPrune — Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025 (arXiv:2503.02175; code github.com/vbdi/divprune).

Why this baseline: it prunes *before* the LLM and ranks nothing — it keeps the subset of projected
image tokens that is most *diverse* (a greedy max–min, i.e. farthest-point, subset under cosine
distance), so it needs neither attention nor a query, and it keeps a few tokens from every distinct
region rather than many near-duplicates of the salient one. Its only cost is one N×N similarity
matrix, charged as overhead (a ``matmul`` event).

What the authors' code does (`LLaVA/llava/model/llava_arch.py`, commit 799e2d9): the projected image
tokens of the spliced prompt (`new_input_embeds`, L374) are L2-normalised and multiplied into a
cosine-similarity matrix (`pairwise_cosine_similarity`, L147-150); D = 1 − similarity (L155); the
number kept is ``int(round(ratio·N))`` (L153); the first pick is the token whose *nearest other*
token is farthest — the second-smallest entry of each column of D, the smallest being the diagonal
(L164-165); each later pick is the token farthest from the tokens already picked, its score the
minimum of its column over the picked rows (L161-162, L166-167); ``torch.argmax`` takes the first
index among equal scores (L169). The picks are sorted back into sequence order (L377-379) and the
LLM runs on the shorter sequence with position ids 0..n−1 (position_ids stays None, L349-350). The
image span is found at a hard-coded offset (``SYS_TOKEN_LEN = 35``, L366) and chosen on sample 0 for
the whole batch (L374, L381).

Differences (also in docs/method.md): the count is ⌈keep·N⌉ unless ``count=round``; distances are
computed in float32 (the authors' in the model dtype, fp16); each sample of a batch gets its own
subset (the authors select on sample 0 for the batch); the image tokens are found by their kind, not
at offset 35; a token already picked is never picked again (the authors' loop could re-pick one, whose
score is its own diagonal ≈ 0, only if no unpicked token were farther than rounding error from the
picked set, i.e. exact duplicates); an all-zero token is at distance 1 from everything (the authors'
division gives NaN); RoPE positions stay the original ones unless ``positions=renumber``;
``keep=1.0`` computes nothing (every token is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from cspexp.pruning.methods.base import PruningContext, PruningMethod, PruningSpec
from cspexp.pruning.schedule import n_keep
from cspexp.pruning.selection import indices_to_mask
from cspexp.utils.choices import KeepFraction
from cspexp.utils.errors import ConfigError

Count = Literal["ceil", "round"]
Positions = Literal["keep", "renumber"]


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """[B, N, d] → [B, N, N] cosine distances 1 − x̂ᵢ·x̂ⱼ in float32 (the authors' D).

    A zero vector (no direction) is left at norm 0 and so is at distance 1 from everything, where the
    authors' division would give NaN."""
    x = features.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return 1.0 - torch.bmm(unit, unit.transpose(1, 2))


def max_min_picks(dist: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's greedy max–min selection. dist [B, N, N] (symmetric distances) → [B, count] token
    indices in the order they were picked.

    First pick: the token whose nearest other token is farthest (second-smallest entry of its column;
    the smallest is its own diagonal). Every later pick: the unpicked token whose distance to the
    picked set (the minimum over the picked rows of its column) is largest. Ties: the lowest index.
    """
    B, N, _ = dist.shape
    if not 1 <= count <= N:
        raise ValueError(f"cannot pick {count} of {N} tokens")
    rows = torch.arange(B, device=dist.device)
    picks = torch.empty(B, count, dtype=torch.long, device=dist.device)
    picked = torch.zeros(B, N, dtype=torch.bool, device=dist.device)
    if N == 1:
        return picks.zero_()
    scores = torch.topk(dist, 2, dim=1, largest=False).values[:, 1, :]  # [B, N] nearest-other distance
    for i in range(count):
        idx = scores.masked_fill(picked, float("-inf")).argmax(dim=1)  # argmax: first of equal maxima
        picks[:, i] = idx
        picked[rows, idx] = True
        row = dist[rows, idx, :]  # [B, N] distance of every token to the new pick
        scores = row if i == 0 else torch.minimum(scores, row)
    return picks


@dataclass(frozen=True)
class DivPrune(PruningSpec):
    """Before the LLM keep the most diverse subset of the projected image tokens — greedy max–min
    under cosine distance (see the module docstring) — and drop the rest; the subset is sorted back
    into position order.

    Args:
        keep: the fraction of image tokens kept, in (0, 1] (the authors' ``SUBSET_RATIO``).
        count: ``ceil`` — ⌈keep·N⌉ (every cspexp method; keeps ≥ 1); ``round`` — ``int(round(keep·N))``
            as the authors' code (a keep that rounds to 0 tokens is refused when the method is bound).
        positions: ``keep`` — the kept tokens keep their original RoPE positions (every cspexp
            method); ``renumber`` — the sequence gets RoPE positions 0..n−1, as the authors' LLM sees
            its shortened prompt.
    """

    name: ClassVar[str] = "divprune"

    keep: KeepFraction = 0.25
    count: Count = "ceil"
    positions: Positions = "keep"

    def bind(self, num_layers: int, n_image: int) -> BoundDivPrune:
        return BoundDivPrune(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "count": self.count, "positions": self.positions}


class BoundDivPrune(PruningMethod):
    """`DivPrune` resolved against a model: the number of tokens kept."""

    def __init__(self, spec: DivPrune, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        if spec.count == "round":
            self.count = int(round(spec.keep * n_image))  # the authors' rule, float arithmetic and all
            if self.count < 1:
                raise ConfigError(
                    f"prune.keep={spec.keep} with prune.count=round keeps round({spec.keep}·{n_image}) = 0 image "
                    f"tokens: use prune.keep > {0.5 / n_image!r} or prune.count=ceil"
                )
        else:
            self.count = n_keep(spec.keep, n_image)
        self.renumber = spec.positions == "renumber"

    def setup(self, state, ctx: PruningContext) -> None:
        """Drop before layer 0: the LLM runs only on the kept image tokens."""
        n = state.n_image
        if self.count < n:
            with torch.no_grad():  # a selection is a constant, also when fine-tuning
                features = state.take(state.image_columns()).hidden  # [B, n, d] in position order
                picks = max_min_picks(cosine_distances(features), self.count)
            # the similarity matrix is the method's own work: one [n, d] × [d, n] product per sample
            state.trace.overhead.append({"kind": "matmul", "what": "divprune cosine similarities",
                                         "m": n, "n": n, "k": int(features.shape[-1]), "widths": {"k": "hidden"}})
            state.drop_image(indices_to_mask(picks, n))
        if self.renumber:
            state.renumber()
