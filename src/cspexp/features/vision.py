"""`VisionFeatures`: everything of one batch that comes before the LLM and does not depend on the
prompt — what the feature cache stores. It depends on the pruning method only for a method that
`changes_vision` (tome merges tokens inside CLIP); the cache then keys it by the method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: What a vision stage that merged grid cells into fewer image tokens (tome) adds: per token its cell and
#: size, per cell the token that holds it.
MERGED_FIELDS = ("image_grid", "image_size", "image_source")
#: The tensors of a `VisionFeatures`, by the names the cache stores them under.
FIELDS = ("image_tokens", "sam_embeddings", "cls_attention", "clip_keys", *MERGED_FIELDS)


@dataclass
class VisionFeatures:
    """One batch's vision stage. All tensors are batch-first, in the order of the batch's samples."""

    image_tokens: torch.Tensor  # [B, N, d_llm] projected CLIP patch tokens (what is spliced into the prompt)
    sam_embeddings: torch.Tensor  # [B, C, h, w] SAM image embeddings (the mask decoder's input)
    cls_attention: torch.Tensor | None = None  # [B, N] CLIP [CLS] attention at the feature layer (csp cls_attn)
    clip_keys: torch.Tensor | None = None  # [B, N, head_dim] CLIP patch keys at that layer, heads averaged (visionzip)
    # A vision stage that merged cells (tome; then image_tokens is [B, n, d_llm] with n < N):
    image_grid: torch.Tensor | None = None  # [B, n] int64 the grid cell each image token stands for (its smallest)
    image_size: torch.Tensor | None = None  # [B, n] float32 how many cells each image token holds
    image_source: torch.Tensor | None = None  # [B, N] int64 which image token holds each grid cell

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in FIELDS if getattr(self, k) is not None}

    def to(self, device: torch.device | str) -> VisionFeatures:
        return VisionFeatures(**{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def encode_vision(model, batch: dict, cls_attention: bool, clip_keys: bool = False, method=None) -> VisionFeatures:
    """Run the vision stage of `model` (a `LisaModel`) on a collated batch. `cls_attention` also
    computes CLIP's [CLS] attention (cheap: one layer's q/k of one query), `clip_keys` that layer's
    patch keys (one k projection); neither changes the other tensors. A `method` that `changes_vision`
    makes the image tokens itself (`PruningMethod.encode_image`); they then come without [CLS]
    attention and keys (those describe the dense tower's tokens)."""
    if method is not None and method.changes_vision:
        tokens, merged = method.encode_image(model, batch["clip_pixels"])
        return VisionFeatures(image_tokens=tokens, sam_embeddings=model.image_embeddings(batch["sam_pixels"]), **merged)
    tokens, cls, *keys = model.encode_image(batch["clip_pixels"], output_cls_attention=cls_attention,
                                            output_keys=clip_keys)
    return VisionFeatures(image_tokens=tokens, sam_embeddings=model.image_embeddings(batch["sam_pixels"]),
                          cls_attention=cls, clip_keys=keys[0] if keys else None)
