"""Image + prompt → masks: LISA's teacher-forced evaluation pass with a pruning method in the LLM.

One prefill per sample, like LISA's ``validate()``: the answer ``[SEG].`` is already in the prompt and
the [SEG] embedding is the final hidden state of the query token (by default the token before
``[SEG]``, LISA's one-token offset). Text tokens are never pruned, so the query token is found by its
original position whatever the method removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cspexp.features.vision import MERGED_FIELDS, VisionFeatures, encode_vision
from cspexp.models.clip_loop import ClipShape
from cspexp.models.lisa import LisaModel
from cspexp.pruning.engine import DecoderLoop, Observer, TokenState, Trace
from cspexp.pruning.methods.base import PruningContext, PruningMethod
from cspexp.utils.timing import NullStopwatch


@dataclass
class SegmentOutput:
    logits: list[torch.Tensor]  # per sample, mask logits [H, W] at the original image size
    masks: list[torch.Tensor]  # per sample, bool [H, W] (logits > 0)
    trace: Trace
    seg_embeds: torch.Tensor  # [B, C] the SAM prompt embeddings
    state: TokenState  # the LLM's final state (normed hidden states of the tokens still present)
    image_embeddings: torch.Tensor | None = None  # [B, C, h, w] SAM image embeddings (reused by training)


def run_llm(model: LisaModel, batch: dict, method: PruningMethod, stopwatch=None,
            observers: Sequence[Observer] = (), features: VisionFeatures | None = None,
            cache=None) -> tuple[TokenState, torch.Tensor]:
    """Vision tower → splice → pruned decoder loop. Returns the final state and the query states [B, d].

    `features` (optional): the batch's vision stage computed beforehand (`cspexp.features`); without
    it the CLIP tower runs here. `stopwatch` (optional) times the sections ``vision`` (when it runs
    here) and ``llm_prefill`` (the splice and the decoder loop). `observers` watch the decoder loop
    (see `cspexp.pruning.engine.Observer`). `cache` (optional): a transformers KV cache each layer
    fills with the tokens it ran (`DecoderLoop.run`; generation)."""
    stopwatch = stopwatch or NullStopwatch()
    merged = {}  # a vision stage that merged cells into fewer tokens (tome): each token's cell, each cell's token
    if features is None and method.changes_vision:  # the method makes its image tokens itself
        with stopwatch.section("vision"):
            image_tokens, merged = method.encode_image(model, batch["clip_pixels"])
        cls_attn = clip_keys = None
    elif features is not None:
        image_tokens, cls_attn, clip_keys = features.image_tokens, features.cls_attention, features.clip_keys
        merged = {k: getattr(features, k) for k in MERGED_FIELDS if getattr(features, k) is not None}
        if method.changes_vision != bool(merged):  # features of another vision stage than this method's
            made = "merged inside CLIP" if merged else "the dense tower's"
            raise RuntimeError(f"the given features are {made}, not prune={method.name}'s vision stage; compute "
                               "them with encode_vision(..., method=method)")
        if method.needs_cls_attention and cls_attn is None:
            raise RuntimeError("the method needs CLIP's [CLS] attention and the given features have none")
        if method.needs_clip_keys and clip_keys is None:
            raise RuntimeError("the method needs CLIP's patch keys and the given features have none")
    else:
        with stopwatch.section("vision"):
            image_tokens, cls_attn, *keys = model.encode_image(batch["clip_pixels"],
                                                               output_cls_attention=method.needs_cls_attention,
                                                               output_keys=method.needs_clip_keys)
        clip_keys = keys[0] if keys else None
    with stopwatch.section("llm_prefill"):
        state = _prefill(model, batch, method, image_tokens, cls_attn, observers, clip_keys, cache=cache,
                         image_grid=merged.get("image_grid"), image_source=merged.get("image_source"))
    cols = state.columns_of(state.query_pos)
    query_hidden = state.hidden[torch.arange(state.batch_size, device=cols.device), cols]
    return state, query_hidden


def _prefill(model, batch, method, image_tokens, cls_attn, observers, clip_keys=None, cache=None,
             image_grid=None, image_source=None) -> TokenState:
    if image_grid is not None:
        # A vision stage that merged cells (tome): each token goes on its cell of the full grid, so it has
        # that cell's position and grid index; the method's setup removes the empty cells before layer 0.
        B, n, d = image_tokens.shape
        image_tokens = image_tokens.new_zeros(B, model.n_image_tokens, d).scatter_(
            1, image_grid[..., None].expand(B, n, d).to(image_tokens.device), image_tokens)
    prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
    loop = DecoderLoop(model.decoder)
    state = TokenState.from_prompt(prompt, loop.num_layers)
    ctx = PruningContext(
        layers=model.decoder.layers,
        rotary_emb=model.decoder.rotary_emb,
        final_norm=model.decoder.norm,
        grid_size=model.grid_size,
        cls_attention=cls_attn,
        clip_keys=clip_keys,
        image_grid=image_grid,
        image_source=image_source,
        clip_shape=ClipShape.of(model.vision_tower.config, model.vision_select_layer),
        images=batch.get("images"),
        sample_ids=batch["idx"].tolist() if "idx" in batch else None,
    )
    return loop.run(state, method, ctx, observers, cache=cache)


def segment(model: LisaModel, batch: dict, method: PruningMethod, stopwatch=None,
            observers: Sequence[Observer] = (), features: VisionFeatures | None = None) -> SegmentOutput:
    """The whole pass for a collated batch (see `LisaProcessor.collate` for its keys); `observers`
    watch the decoder loop (see `cspexp.pruning.engine.Observer`).

    `features`: the batch's vision stage, given (from the feature cache) or, when None, computed here
    first. `stopwatch` times ``vision`` (when computed here), ``llm_prefill`` and ``mask_decoder``
    (the [SEG] projection, SAM's mask decoder and the resize to the original image)."""
    stopwatch = stopwatch or NullStopwatch()
    if features is None:
        with stopwatch.section("vision"):
            features = encode_vision(model, batch, cls_attention=method.needs_cls_attention,
                                     clip_keys=method.needs_clip_keys, method=method)
    state, query_hidden = run_llm(model, batch, method, stopwatch, observers, features=features)
    with stopwatch.section("mask_decoder"):
        seg_embeds = model.seg_embedding(query_hidden)
        low_res = model.decode_masks(features.sam_embeddings, seg_embeds)
        logits = [
            model.postprocess_masks(low_res[i], batch["resized_hw"][i], batch["original_hw"][i])
            for i in range(low_res.shape[0])
        ]
    return SegmentOutput(logits=logits, masks=[lg > 0 for lg in logits], trace=state.trace, seg_embeds=seg_embeds,
                         state=state, image_embeddings=features.sam_embeddings)
