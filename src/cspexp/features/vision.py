"""`VisionFeatures`: everything of one batch that comes before the LLM and does not depend on the
prompt or the pruning method — what the feature cache stores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The tensors of a `VisionFeatures`, by the names the cache stores them under.
FIELDS = ("image_tokens", "sam_embeddings", "cls_attention", "clip_keys")


@dataclass
class VisionFeatures:
    """One batch's vision stage. All tensors are batch-first, in the order of the batch's samples."""

    image_tokens: torch.Tensor  # [B, N, d_llm] projected CLIP patch tokens (what is spliced into the prompt)
    sam_embeddings: torch.Tensor  # [B, C, h, w] SAM image embeddings (the mask decoder's input)
    cls_attention: torch.Tensor | None = None  # [B, N] CLIP [CLS] attention at the feature layer (csp cls_attn)
    clip_keys: torch.Tensor | None = None  # [B, N, head_dim] CLIP patch keys at that layer, heads averaged (visionzip)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in FIELDS if getattr(self, k) is not None}

    def to(self, device: torch.device | str) -> VisionFeatures:
        return VisionFeatures(**{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def encode_vision(model, batch: dict, cls_attention: bool, clip_keys: bool = False) -> VisionFeatures:
    """Run the vision stage of `model` (a `LisaModel`) on a collated batch. `cls_attention` also
    computes CLIP's [CLS] attention (cheap: one layer's q/k of one query), `clip_keys` that layer's
    patch keys (one k projection); neither changes the other tensors."""
    tokens, cls, *keys = model.encode_image(batch["clip_pixels"], output_cls_attention=cls_attention,
                                            output_keys=clip_keys)
    return VisionFeatures(image_tokens=tokens, sam_embeddings=model.image_embeddings(batch["sam_pixels"]),
                          cls_attention=cls, clip_keys=keys[0] if keys else None)
