"""FasterVLM — Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
Make VLM Inference Faster" (arXiv:2412.01818; code github.com/Theia-4869/FasterVLM).

Why this baseline: it prunes *before* the LLM, by a score the vision tower computes anyway — the
attention the CLIP [CLS] token pays to each patch in the feature layer. The LLM never sees the dropped
tokens, so every decoder layer is cheaper and the method costs no LLM-side work at all (no overhead
FLOPs). It is the natural foil to the in-LLM, text-aware rankings (FastV, PyramidDrop, csp's
pruning stage): text-agnostic, visual-saliency only.

What the authors' code does (commit f5d5f12): `CLIPVisionTower.feature_select` takes
``attentions[select_layer][:, :, 0, 1:]`` — the [CLS] row of the feature layer's attention
probabilities (softmax over all 1 + N keys, [CLS] included), patch columns only
(`llava/model/multimodal_encoder/clip_encoder.py` L36-47); `encode_images` averages it over heads and
keeps ``topk(k=visual_token_num)`` as an index mask (`llava/model/llava_arch.py` L141-157); the kept
projected features enter the prompt in their original order (L241-247) and the LLM runs on the
shorter sequence with position ids 0..n−1 (`position_ids` stays None, L366-367).

cspexp's `ctx.cls_attention` (`cspexp.models.lisa.clip_cls_attention`) is the same row: the layer
that produces the feature layer, softmax over all keys, patches, heads averaged. Differences (also in
docs/method.md): the count is ⌈keep·N⌉ (the authors pass an absolute count); ties go to the earlier
grid cell (`torch.topk` leaves them unspecified); RoPE positions stay the original ones unless
``positions=renumber`` (the authors' compact sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from cspexp.pruning.methods.base import PruningContext, PruningMethod, PruningSpec, keep_top
from cspexp.pruning.schedule import n_keep
from cspexp.utils.choices import KeepFraction

Positions = Literal["keep", "renumber"]


@dataclass(frozen=True)
class FasterVLM(PruningSpec):
    """Before the LLM keep the ⌈keep·N⌉ image tokens that CLIP's [CLS] token attends to most in the
    feature layer (heads averaged); the others never enter the LLM. Ties go to the earlier grid cell.

    Args:
        keep: the fraction of image tokens kept, in (0, 1] (the authors' ``visual_token_num`` / N).
        positions: ``keep`` — the kept tokens keep their original RoPE positions (every cspexp
            method); ``renumber`` — the sequence gets RoPE positions 0..n−1, as the authors' LLM sees
            its shortened prompt.
    """

    name: ClassVar[str] = "fastervlm"
    needs_cls_attention: ClassVar[bool] = True

    keep: KeepFraction = 0.25
    positions: Positions = "keep"

    def bind(self, num_layers: int, n_image: int) -> BoundFasterVLM:
        return BoundFasterVLM(self, num_layers, n_image)

    def describe(self) -> dict:
        return {"name": self.name, "keep": self.keep, "positions": self.positions}


class BoundFasterVLM(PruningMethod):
    """`FasterVLM` resolved against a model: the kept count ⌈keep·N⌉."""

    def __init__(self, spec: FasterVLM, num_layers: int, n_image: int) -> None:
        super().__init__(spec, num_layers, n_image)
        self.count = n_keep(spec.keep, n_image)
        self.renumber = spec.positions == "renumber"

    def setup(self, state, ctx: PruningContext) -> None:
        """Drop before layer 0: the LLM runs only on the kept image tokens."""
        if ctx.cls_attention is None:
            raise RuntimeError("prune=fastervlm needs CLIP's [CLS] attention in the context (ctx.cls_attention); "
                               "the caller must compute it (encode_image(..., output_cls_attention=True))")
        with torch.no_grad():  # a selection is a constant, also when fine-tuning
            cols = state.image_columns()  # [B, n_image] in position order
            grid = torch.gather(state.grid, 1, cols)  # each image token's grid cell
            scores = torch.gather(ctx.cls_attention.to(grid.device).float(), 1, grid)  # [B, n_image]
        keep_top(state, scores, self.count)
        if self.renumber:
            state.renumber()
