"""CLIP's vision encoder run layer by layer, so that a method can act *inside* the tower.

Why our own loop (the same reason as the LLaMA `cspexp.pruning.engine.DecoderLoop`): ToMe merges
tokens between a layer's attention and its MLP and feeds the merged tokens' sizes into the next
layers' attention, and transformers' `CLIPEncoder` only runs whole layers. The loop uses the tower's
own modules — embeddings, ``pre_layrnorm``, and per layer ``layer_norm1``, ``self_attn`` (q/k/v/out
projections, whichever attention implementation the model was built with), ``layer_norm2``, ``mlp``
— and stops at the feature layer: LISA reads ``hidden_states[vision_select_layer]`` (−2), so the
layers after it are not run (transformers' forward runs them and throws their output away).

A `ClipHook` may act at four points of every layer: before it, on the attention logits (an additive
bias over the keys), after attention (where ToMe merges, with the layer's attention keys at hand)
and after the layer. Without a hook each layer is called whole, exactly as `CLIPEncoder` calls it,
so `run_clip(tower, pixels, s)` is bit for bit ``tower(pixels, output_hidden_states=True)
.hidden_states[s]`` (tests/test_tome.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipShape:
    """What a schedule inside the tower is resolved against: the encoder layers run up to the
    feature layer, the patch tokens per image and the attention head width (the keys' width)."""

    layers: int
    n_patches: int
    head_dim: int

    @classmethod
    def of(cls, config, select_layer: int) -> ClipShape:
        """The shape of a tower of `config` (a `CLIPVisionConfig`) read at ``hidden_states[select_layer]``
        (hidden_states[0] is the embedding, hidden_states[k] the output of layer k−1: −2 of 24 → 23)."""
        n = config.num_hidden_layers
        if not -(n + 1) <= select_layer <= n:
            raise ValueError(f"select_layer={select_layer} is outside hidden_states of a {n}-layer tower")
        side = config.image_size // config.patch_size
        return cls(layers=select_layer % (n + 1), n_patches=side * side,
                   head_dim=config.hidden_size // config.num_attention_heads)


class ClipHook:
    """What a method may do inside the CLIP tower; every default leaves the layer as it is.

    `hidden` is [B, T, d] with [CLS] first. A hook that changes T (merging) keeps whatever
    bookkeeping it needs on itself: one hook object serves one forward pass."""

    def before_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def attention_bias(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """An additive bias on the attention logits, broadcast to [B, heads, T, T] (e.g. [B, 1, 1, T]
        over the keys), or None."""
        return None

    def after_attention(self, layer: int, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention, before the MLP; `keys` [B, T, heads, head_dim] are the
        layer's attention keys (its ``k_proj`` output)."""
        return hidden

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def run_clip(tower, pixel_values: torch.Tensor, select_layer: int = -2, hook: ClipHook | None = None) -> torch.Tensor:
    """``hidden_states[select_layer]`` of a transformers `CLIPVisionModel` [B, T, d] ([CLS] first),
    running only the layers up to it; `hook` (optional) acts inside each of them."""
    shape = ClipShape.of(tower.config, select_layer)
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
    for index, layer in enumerate(tower.encoder.layers[: shape.layers]):
        hidden = layer(hidden, None) if hook is None else _hooked_layer(layer, index, hidden, hook)
    return hidden


def _hooked_layer(layer, index: int, hidden: torch.Tensor, hook: ClipHook) -> torch.Tensor:
    """`CLIPEncoderLayer.forward` step by step with the hook's four points (same operations, same order)."""
    hidden = hook.before_layer(index, hidden)
    captured = []
    # the keys come from the layer's own k_proj call: a forward hook reads them without a second projection
    handle = layer.self_attn.k_proj.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden),
                                      attention_mask=hook.attention_bias(index, hidden))
    finally:
        handle.remove()
    hidden = hidden + attended
    B, T, _ = hidden.shape
    keys = captured[0].view(B, T, layer.self_attn.num_heads, layer.self_attn.head_dim)
    hidden = hook.after_attention(index, hidden, keys)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hook.after_layer(index, hidden)
