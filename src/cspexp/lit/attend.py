"""Training aids that teach a from-scratch LLM to *look up* the target among the image tokens.

Measured on `scripts/probe_lookup.py` (a bare transformers LLaMA of tiny_lisa's LLM sizes that must
say where the blob of a named colour is among 256 grid tokens): the lookup has two hops, and plain
end-to-end training learns neither in the recipe's budget (row within ±1: 0.36 after 1 500 steps,
chance 0.19):

1. *hop 1*, the query token gathering the query's words, is drowned by the 256 image tokens: at
   initialisation every token gets ~1/260 of the query's attention, so the gradient towards "look at
   the previous words" is ~260× weaker than on text alone. Without image tokens it is learnt in
   < 50 steps. Hence a **text-only warm-up** (`train.text_only_steps`: the first steps withdraw all
   image tokens before layer 0) with a dense text target, **recall** (`recall_loss`: which words the
   query had, read from the prompt's last words). Heads formed that way stay sharp when the image
   tokens arrive.
2. *hop 2*, attending to the image tokens that match, gets a useful gradient from a mask or
   position loss only through attention weights of ~1/256. **attend** (`attend_loss`) supervises it
   directly: cross-entropy between one head's attention row of the query token and the target's
   share of each image-token cell, i.e. gradient ~ (p − target), not ~ p.

On the probe: warm-up + attend at one layer → row within ±1 0.90 after 300 image steps (neither
alone: 0.31 / 0.37 at 600 steps). All three are training aids: they add no parameter to the model
(recall's read-out lives in its loss term and is not saved). As loss terms (`cspexp.lit.losses`):
`Recall` and `Attend`; the warm-up is the training step's (`TrainModule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cspexp.lit.losses import SUFFIX_TOKENS, LossTerm, suffix_states
from cspexp.pruning.engine import Observer
from cspexp.pruning.scoring import query_attention
from cspexp.utils.errors import require


def target_cells(batch, grid_size: tuple[int, int]) -> torch.Tensor:
    """[B, rows·cols] the share of each image-token cell the target covers, in CLIP's frame.

    CLIP's preprocessing resizes the shortest side and centre-crops a square, so the image tokens see
    the centred square of side min(H, W) of the original; the target mask (value 1; 255 = ignore is
    not target) is cropped the same way and area-pooled to the token grid."""
    rows = []
    for gt in batch["gt_masks"]:
        h, w = gt.shape
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = (gt[top:top + side, left:left + side] == 1).float()[None, None]
        rows.append(F.adaptive_avg_pool2d(square, grid_size).flatten())
    return torch.stack(rows)


class AttentionTap(Observer):
    """Records, at `layers`, the attention row of the query token (the token whose final state is
    the [SEG] embedding) in head `head` over the image tokens present, with their grid cells — with
    gradients, as the layer computes it (`query_attention`, checked against eager attention in the
    tests). An observer of the decoder loop: it sees each layer's input after the pruning method
    acted, and changes nothing."""

    def __init__(self, layers: list[int], head: int = 0) -> None:
        self.layers, self.head = list(layers), int(head)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_setup(self, state, ctx) -> None:
        self.records = []

    def before_layer(self, layer: int, state, ctx) -> None:
        if layer in self.layers and state.n_image:
            probs = query_attention(ctx.layers[layer], ctx.rotary_emb, state, "seg", head=self.head)
            self.records.append((probs, torch.gather(state.grid, 1, state.image_columns())))


def attend_loss(records, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy between the target's distribution over the image tokens present (`cells`
    gathered by grid index and renormalised) and the recorded attention rows, averaged over layers
    and over the samples whose target is still present; and the attention mass on the target (for
    the log). The attention is not renormalised over image tokens: looking at text counts against."""
    losses, masses = [], []
    for probs, grid in records:
        share = torch.gather(cells.to(probs.device), 1, grid)
        total = share.sum(1)
        ok = total > 0
        if not bool(ok.any()):
            continue
        share = share[ok] / total[ok, None]
        p = probs[ok].float()
        losses.append(-(share * p.clamp_min(1e-9).log()).sum(1).mean())
        masses.append((p * (share > 0)).sum(1).mean().detach())
    if not losses:
        zero = cells.new_zeros((), requires_grad=False)
        return zero, zero
    return torch.stack(losses).mean(), torch.stack(masses).mean()


def query_words(batch, image_token_id: int, seg_token_id: int, vocab_size: int) -> torch.Tensor:
    """[B, vocab] multi-hot of the words of each user turn before the suffix ("Please output
    segmentation mask. ASSISTANT:"): the query and the template words around it."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    B, L = ids.shape
    img_at = (ids == image_token_id).float().argmax(1)
    seg_at = (ids == seg_token_id).float().argmax(1)
    idx = torch.arange(L, device=ids.device).expand(B, L)
    inside = (idx >= img_at[:, None] + 2) & (idx < seg_at[:, None] - SUFFIX_TOKENS) & attention
    hot = torch.zeros(B, vocab_size, device=ids.device)
    hot[inside.nonzero(as_tuple=True)[0], ids[inside]] = 1.0
    return hot


def recall_loss(head: torch.nn.Module, states: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a linear read-out of each of the final states [B, k, d] (the prompt's
    last words) against the multi-hot `words` [B, vocab] of the query."""
    logits = head(states.float())
    return F.binary_cross_entropy_with_logits(logits, words[:, None].expand_as(logits))


class Recall(LossTerm):
    """Which words the query had, read linearly from the prompt's last words (`recall_loss`): the dense
    text target of the text-only warm-up."""

    def setup(self, model) -> None:
        self.head = torch.nn.Linear(model.llm.config.hidden_size, model.llm.config.vocab_size)

    def forward(self, model, out, batch, ctx):
        words = query_words(batch, model.image_token_id, model.seg_token_id, self.head.out_features)
        recall = recall_loss(self.head, suffix_states(out.state), words)
        return recall, {"recall": recall}


class Attend(LossTerm):
    """Head `head`'s attention row of the query token at `layers`, supervised onto the target's
    cells (`attend_loss`). Nothing to supervise while the image tokens are withdrawn (the warm-up)."""

    def __init__(self, weight: float = 1.0, layers: list[int] = (), head: int = 0) -> None:
        super().__init__(weight)
        self.layers, self.head = list(layers), head

    def setup(self, model) -> None:
        n_layers, n_heads = model.num_layers, model.llm.config.num_attention_heads
        require(bool(self.layers) and all(isinstance(x, int) and 0 <= x < n_layers for x in self.layers),
                f"train.attend.layers={self.layers} must list layers in [0, {n_layers - 1}] when loss.attend > 0")
        require(isinstance(self.head, int) and 0 <= self.head < n_heads,
                f"train.attend.head={self.head} is outside [0, {n_heads - 1}]")

    def observer(self, ctx) -> AttentionTap | None:
        return None if ctx.text_only else AttentionTap(self.layers, self.head)

    def forward(self, model, out, batch, ctx):
        tap = ctx.observers.get(self)
        if tap is None:  # the warm-up: no image token to look at
            return out.state.hidden.new_zeros(()), {}
        attend, mass = attend_loss(tap.records, target_cells(batch, model.grid_size))
        return attend, {"attend": attend, "attend_mass": mass}
