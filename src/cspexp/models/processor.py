"""LISA's preprocessing: the CLIP branch, the SAM branch, the prompt, and batch collation.

- CLIP branch (``CLIPImageProcessor`` of ``openai/clip-vit-large-patch14``): shortest side → 224 (the
  other side truncated to an integer) with bicubic resampling, centre crop 224×224, scale to [0, 1], CLIP mean/std.
- SAM branch (LISA's ``ResizeLongestSide`` + ``Sam.preprocess``): longest side → 1024 with
  ``int(x·scale + 0.5)`` rounding and bilinear resampling, normalise on the 0–255 scale with SAM's
  mean/std, zero-pad bottom/right to a square.
Sizes come from the model's configs, so the tiny models use the same code at their own sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from cspexp.models import prompt as lisa_prompt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


def clip_preprocess(image: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, size, size]."""
    h, w = image.shape[:2]
    # transformers' get_resize_output_image_size: the long side is truncated, int(size · long / short)
    # (rounding it instead resizes 640×480 to 299×224, not LISA's 298×224: tests/test_preprocess.py).
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    pil = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = np.asarray(pil, dtype=np.float32)[top : top + size, left : left + size] / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def sam_resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape``."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_preprocess(image: np.ndarray, size: int, mean=SAM_MEAN, std=SAM_STD) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [H, W, 3] → (float [3, size, size], (resized_h, resized_w))."""
    h, w = image.shape[:2]
    new_h, new_w = sam_resized_shape(h, w, size)
    pil = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    arr = np.asarray(pil, dtype=np.float32)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    out = np.zeros((size, size, 3), dtype=np.float32)
    out[:new_h, :new_w] = arr
    return torch.from_numpy(out.transpose(2, 0, 1).copy()), (new_h, new_w)


#: Which tokenizer a model carries, said by its loader (never guessed from the object):
#: ``word_level`` — the small models' transformers tokenizer holding ``<image>`` and ``[SEG]``;
#: ``lisa`` — `cspexp.models.lisa_tokenizer.LisaTokenizer`, LISA's exact slow-tokenizer ids.
TokenizerKind = Literal["word_level", "lisa"]
TOKENIZER_KINDS: tuple[str, ...] = get_args(TokenizerKind)


def encode_lisa_prompt(tokenizer, kind: TokenizerKind, query: str, is_sentence: bool, answer: bool = True) -> list[int]:
    """Token ids of LISA's evaluation prompt (one image placeholder; answer ``[SEG].`` unless `answer` is False).

    LISA's tokenizer builds the ids itself (LISA's slow-tokenizer ids, -200 for the image); the
    word-level tokenizers of the small models encode the prompt text, with the ``<image>`` token's own
    id as the placeholder.
    """
    if kind == "lisa":
        return tokenizer.encode_prompt(query, is_sentence, answer=answer)
    text = lisa_prompt.lisa_prompt(query, is_sentence, answer=lisa_prompt.ANSWER if answer else None)
    return tokenizer(text)["input_ids"]


@dataclass
class LisaProcessor:
    """Turns dataset items into model batches. `collate` is the DataLoader's ``collate_fn``."""

    tokenizer: object  # a word-level transformers tokenizer holding <image> and [SEG], or a LisaTokenizer
    tokenizer_kind: TokenizerKind
    clip_size: int
    sam_size: int

    def __post_init__(self) -> None:
        if self.tokenizer_kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer_kind={self.tokenizer_kind!r} is not one of {list(TOKENIZER_KINDS)}")
        # The one place the special ids are read from the tokenizer; the model takes them from here.
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(lisa_prompt.IMAGE_TOKEN)
        self.seg_token_id = self.tokenizer.convert_tokens_to_ids(lisa_prompt.SEG_TOKEN)
        self.pad_token_id = self.tokenizer.pad_token_id

    def encode_prompt(self, query: str, is_sentence: bool, answer: bool = True) -> list[int]:
        """Token ids of LISA's evaluation prompt (one ``<image>`` placeholder, answer ``[SEG].``);
        ``answer=False``: the generation prompt, ending at ``ASSISTANT:`` (LISA's chat.py)."""
        return encode_lisa_prompt(self.tokenizer, self.tokenizer_kind, query, is_sentence, answer=answer)

    def collate(self, items: Sequence[dict], pixels: bool = True, answer: bool = True) -> dict:
        """A batch of `items`. ``pixels=False`` leaves out the two preprocessed images (``clip_pixels``,
        ``sam_pixels``) for a caller that may not need them — the feature cache computes them only for
        a batch it does not hold (`add_pixels`). ``answer=False`` builds generation prompts (no
        ``[SEG].</s>``; for `cspexp.pruning.generate.generate`)."""
        ids = [self.encode_prompt(it["query"], bool(it.get("is_sentence", False)), answer=answer) for it in items]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, row in enumerate(ids):  # right padding, as LISA's collate_fn
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        batch = {
            "idx": torch.tensor([int(it["idx"]) for it in items], dtype=torch.long),
            "resized_hw": torch.tensor([sam_resized_shape(*it["image"].shape[:2], self.sam_size) for it in items],
                                       dtype=torch.long),
            "original_hw": torch.tensor([it["image"].shape[:2] for it in items], dtype=torch.long),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "gt_masks": [torch.from_numpy(np.array(it["mask"], dtype=np.uint8)) for it in items],  # a copy: items may be shared
            "images": [it["image"] for it in items],
            "queries": [it["query"] for it in items],
            "query_kinds": [it.get("query_kind") for it in items],
        }
        return self.add_pixels(batch) if pixels else batch

    def add_pixels(self, batch: dict) -> dict:
        """`batch` with ``clip_pixels`` and ``sam_pixels`` made from its ``images`` (as it is if it has them)."""
        if "clip_pixels" in batch:
            return batch
        images = batch["images"]
        return {**batch,
                "clip_pixels": torch.stack([clip_preprocess(img, self.clip_size) for img in images]),
                "sam_pixels": torch.stack([sam_preprocess(img, self.sam_size)[0] for img in images])}
